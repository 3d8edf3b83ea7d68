"""Versioned SQL migrations: ``store/migrations/NNNN_name.sql``, applied in order, each exactly once.

Every node runs :func:`apply_migrations` at start-up. A transaction-level advisory lock serialises
concurrent appliers; each migration commits together with its ``schema_migrations`` row, so a crash leaves
the schema at a migration boundary. Applied migrations are immutable: a changed checksum, an applied version
the code does not know, or a gap in the applied versions stops the node with :class:`MigrationError`.
"""

from __future__ import annotations

import hashlib
import pathlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

MIGRATIONS_DIR = pathlib.Path(__file__).parent / "migrations"
# Fixed key of the advisory lock taken by every applier (ASCII "LEDGMIGR").
ADVISORY_LOCK_KEY = 0x4C4544474D494752
_FILE_RE = re.compile(r"^(?P<version>[0-9]{4})_(?P<name>[a-z0-9][a-z0-9_]*)\.sql$")

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    checksum    text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)
"""


class MigrationError(Exception):
    """The migration files or the database's migration history are inconsistent."""


@dataclass(frozen=True)
class Migration:
    """One migration file: ``NNNN_name.sql`` with its SQL text and the sha256 hex of its bytes."""

    version: int
    name: str
    sql: str
    checksum: str


def _parse_file(path: pathlib.Path) -> Migration:
    """Read one migration file; a malformed name or non-UTF-8 content raises MigrationError."""
    match = _FILE_RE.match(path.name)
    if match is None or int(match["version"]) < 1:
        raise MigrationError(
            f"malformed migration file name {path.name!r} (expected NNNN_name.sql, NNNN >= 0001)"
        )
    raw = path.read_bytes()
    try:
        sql = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MigrationError(f"migration {path.name} is not valid UTF-8") from exc
    return Migration(int(match["version"]), match["name"], sql, hashlib.sha256(raw).hexdigest())


def _validate_sequence(migrations: Sequence[Migration]) -> list[Migration]:
    """Return ``migrations`` sorted by version; duplicates or a gap (versions must be 1..n) raise."""
    ordered = sorted(migrations, key=lambda m: m.version)
    for expected, migration in enumerate(ordered, start=1):
        if migration.version < expected:
            raise MigrationError(f"duplicate migration version {migration.version:04d} ({migration.name})")
        if migration.version > expected:
            raise MigrationError(f"migration {expected:04d} is missing (next is {migration.version:04d})")
    return ordered


def load_migrations(directory: pathlib.Path | None = None) -> list[Migration]:
    """Load the ``*.sql`` migrations of ``directory`` (default: the packaged ones), sorted by version."""
    root = MIGRATIONS_DIR if directory is None else directory
    if not root.is_dir():
        raise MigrationError(f"migration directory {root} does not exist")
    files = sorted(p for p in root.iterdir() if p.suffix == ".sql" and p.is_file())
    return _validate_sequence([_parse_file(p) for p in files])


async def applied_versions(conn: asyncpg.Connection) -> dict[int, str]:
    """Return ``{version: checksum}`` of the applied migrations ({} before the first one)."""
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    if not exists:
        return {}
    rows = await conn.fetch("SELECT version, checksum FROM schema_migrations ORDER BY version")
    return {int(row["version"]): str(row["checksum"]) for row in rows}


async def _applied_rows(conn: asyncpg.Connection) -> dict[int, tuple[str, str]]:
    """Return ``{version: (name, checksum)}`` from schema_migrations (which must exist)."""
    rows = await conn.fetch("SELECT version, name, checksum FROM schema_migrations ORDER BY version")
    return {int(row["version"]): (str(row["name"]), str(row["checksum"])) for row in rows}


def _check_history(applied: dict[int, tuple[str, str]], known: list[Migration]) -> None:
    """Raise MigrationError unless ``applied`` is an unchanged prefix ``1..k`` of ``known``."""
    by_version = {m.version: m for m in known}
    unknown = sorted(set(applied) - set(by_version))
    if unknown:
        raise MigrationError(f"database has migrations unknown to this code: {unknown} (code is older?)")
    if sorted(applied) != list(range(1, len(applied) + 1)):
        raise MigrationError(f"applied migrations have a gap: {sorted(applied)}")
    for version, (name, checksum) in applied.items():
        migration = by_version[version]
        if checksum != migration.checksum:
            raise MigrationError(
                f"migration {version:04d}_{migration.name} was changed after it was applied "
                f"(applied sha256 {checksum}, file sha256 {migration.checksum})"
            )
        if name != migration.name:
            raise MigrationError(
                f"migration {version:04d} was applied as {name!r} but is now {migration.name!r}"
            )


async def _lock_and_check(conn: asyncpg.Connection, known: list[Migration]) -> dict[int, tuple[str, str]]:
    """In the current transaction: take the advisory lock, read and verify the history, return it."""
    await conn.execute("SELECT pg_advisory_xact_lock($1)", ADVISORY_LOCK_KEY)
    applied = await _applied_rows(conn)
    _check_history(applied, known)
    return applied


async def _apply_one(conn: asyncpg.Connection, migration: Migration, known: list[Migration]) -> bool:
    """Apply ``migration`` with its schema_migrations row in one transaction; False if already applied."""
    async with conn.transaction():
        applied = await _lock_and_check(conn, known)
        if migration.version in applied:
            return False
        await conn.execute(migration.sql)
        await conn.execute(
            "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
            migration.version,
            migration.name,
            migration.checksum,
        )
    return True


async def apply_migrations(conn: asyncpg.Connection, migrations: list[Migration] | None = None) -> list[int]:
    """Apply every pending migration in version order; return the versions applied by this call.

    ``conn`` must not be inside a transaction. Safe to run concurrently from several nodes.
    """
    if conn.is_in_transaction():
        raise MigrationError("apply_migrations needs a connection outside any transaction")
    known = _validate_sequence(load_migrations() if migrations is None else migrations)
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", ADVISORY_LOCK_KEY)
        await conn.execute(_CREATE_TABLE)
        applied = await _applied_rows(conn)
        _check_history(applied, known)
    newly: list[int] = []
    for migration in known:
        if migration.version not in applied and await _apply_one(conn, migration, known):
            newly.append(migration.version)
    return newly
