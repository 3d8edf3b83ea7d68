"""Throw-away databases on the shared test PostgreSQL server (never touches databases it did not make)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from store.migrations import apply_migrations

SHARED_ADMIN_DSN: str = os.environ.get("LEDGER_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
_IDENT_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def _with_database(dsn: str, database: str) -> str:
    """Return ``dsn`` with its database (path) replaced by ``database``."""
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))


def _database_of(dsn: str) -> str:
    """Return the database name of ``dsn``, checked to be a plain identifier."""
    name = urlsplit(dsn).path.lstrip("/")
    if not _IDENT_RE.match(name):
        raise ValueError(f"not a test database name: {name!r}")
    return name


async def create_database(prefix: str = "ledger_test", admin_dsn: str = SHARED_ADMIN_DSN) -> str:
    """Create an empty database named ``<prefix>_<random hex>`` and return its DSN."""
    name = f"{prefix}_{secrets.token_hex(6)}"
    if not _IDENT_RE.match(name):
        raise ValueError(f"bad database prefix {prefix!r}")
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return _with_database(admin_dsn, name)


async def drop_database(dsn: str, admin_dsn: str = SHARED_ADMIN_DSN) -> None:
    """Terminate the connections to the database of ``dsn`` and drop it (if it exists)."""
    name = _database_of(dsn)
    if name == _database_of(admin_dsn):
        raise ValueError(f"refusing to drop the admin database {name!r}")
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = $1 AND pid <> pg_backend_pid()",
            name,
        )
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@contextlib.contextmanager
def migrated_database(prefix: str) -> Iterator[str]:
    """A fresh database with the node's migrations applied; dropped on exit (for sync fixtures)."""

    async def make() -> str:
        created = await create_database(prefix)
        conn = await asyncpg.connect(created)
        try:
            await apply_migrations(conn)
        finally:
            await conn.close()
        return created

    dsn = asyncio.run(make())
    try:
        yield dsn
    finally:
        asyncio.run(drop_database(dsn))
