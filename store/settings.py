"""Per-ledger settings fixed when the ledger is created (the `ledger_settings` table, migration 0003).

`hash_alg` names the algorithm of journal hashes and of every Merkle tree (batch roots, the global
log): "sha256" (default) or "blake3". It is chosen once, by `LEDGER_HASH_ALG` at the first start of
a node on an empty database, and can never change afterwards (every stored hash depends on it).
"""

from __future__ import annotations

from typing import Final

import asyncpg

from signer.merkle import HASHES

DEFAULT_HASH_ALG: Final = "sha256"


class SettingsError(ValueError):
    """A configured setting is invalid or conflicts with the one the ledger was created with."""


def validate_hash_alg(alg: str) -> str:
    """`alg` if it is a known algorithm name, else `SettingsError`."""
    if alg not in HASHES:
        raise SettingsError(f"LEDGER_HASH_ALG={alg!r} is not one of {sorted(HASHES)}")
    return alg


async def stored_hash_alg(conn: asyncpg.Connection) -> str | None:
    """The ledger's recorded hash algorithm, or None (no row, or no settings table yet)."""
    exists = await conn.fetchval("SELECT to_regclass('ledger_settings') IS NOT NULL")
    if not exists:
        return None
    value: str | None = await conn.fetchval("SELECT value FROM ledger_settings WHERE name = 'hash_alg'")
    return value


async def ledger_hash_alg(conn: asyncpg.Connection) -> str:
    """The ledger's hash algorithm; "sha256" for a ledger that has not recorded one."""
    return await stored_hash_alg(conn) or DEFAULT_HASH_ALG


async def resolve_hash_alg(conn: asyncpg.Connection, configured: str | None) -> str:
    """Fix the ledger's hash algorithm at creation, or check the configured one against the stored one.

    `configured` is the explicitly configured name (None: not configured, the default applies to a
    new ledger). A new ledger records it; an existing ledger keeps its own, and an explicit value
    that differs raises `SettingsError`.
    """
    if configured is not None:
        validate_hash_alg(configured)
    async with conn.transaction():
        await conn.execute(
            "INSERT INTO ledger_settings (name, value) VALUES ('hash_alg', $1) ON CONFLICT (name) DO NOTHING",
            configured or DEFAULT_HASH_ALG,
        )
        stored: str = await conn.fetchval("SELECT value FROM ledger_settings WHERE name = 'hash_alg'")
    if configured is not None and stored != configured:
        raise SettingsError(
            f"this ledger was created with {stored}; LEDGER_HASH_ALG={configured} cannot change it"
        )
    return validate_hash_alg(stored)
