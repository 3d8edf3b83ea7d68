"""A started `SignerEngine` (software key) on a fresh migrated database, for tests that sign in-process."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import asyncpg

from actors.signer_engine import SignerEngine
from signer.keys import SoftwareKeyBackend
from store.migrations import apply_migrations
from tests.support.databases import create_database, drop_database


@contextlib.asynccontextmanager
async def started_signer(
    prefix: str, **options: float
) -> AsyncIterator[tuple[str, asyncpg.Connection, SignerEngine]]:
    """(dsn, a connection, the started engine); `options` go to `SignerEngine` (checkpoint timings)."""
    dsn = await create_database(prefix)
    try:
        conn = await asyncpg.connect(dsn)
        try:
            await apply_migrations(conn)
            engine = SignerEngine(dsn, lambda: SoftwareKeyBackend(None), **options)
            await engine.start()
            try:
                yield dsn, conn, engine
            finally:
                await engine.close()
        finally:
            await conn.close()
    finally:
        await drop_database(dsn)
