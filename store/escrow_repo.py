"""Escrows in PostgreSQL (migration 0017), and the audit-event lookup their conditions need.

Rows only: the money moves through journals and a hold in the ledger; this records each escrow's
terms, state and the release or cancel request that moved it. Every change of one escrow runs
under `locked` (a session advisory lock on its id), so a concurrent release and cancel of the same
escrow are serialised and the second sees the first's outcome.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import asyncpg

_LOCK_SPACE = "escrow"


@asynccontextmanager
async def locked(conn: asyncpg.Connection, escrow_id: str) -> AsyncIterator[None]:
    """Hold the escrow's advisory lock on `conn` for the block (waits for another holder)."""
    await conn.execute("SELECT pg_advisory_lock(hashtext($1), hashtext($2))", _LOCK_SPACE, escrow_id)
    try:
        yield
    finally:
        await conn.execute("SELECT pg_advisory_unlock(hashtext($1), hashtext($2))", _LOCK_SPACE, escrow_id)


async def escrow(conn: asyncpg.Connection, escrow_id: str) -> asyncpg.Record | None:
    """The escrow row, or None."""
    return await conn.fetchrow("SELECT * FROM escrows WHERE escrow_id = $1", escrow_id)


async def insert_escrow(conn: asyncpg.Connection, values: dict[str, Any]) -> None:
    """Insert a locked escrow (the caller holds its lock and checked it is new)."""
    await conn.execute(
        "INSERT INTO escrows (escrow_id, order_id, amount, currency, condition, provider, funding_account,"
        " pool_account, payee_account, participant_id, hold_id, status, request_hash, principal)"
        " VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7, $8, $9, $10, $11, 'locked', $12, $13)",
        values["escrow_id"],
        values["order_id"],
        values["amount"],
        values["currency"],
        values["condition"],
        values["provider"],
        values["funding_account"],
        values["pool_account"],
        values["payee_account"],
        values["participant_id"],
        values["hold_id"],
        values["request_hash"],
        values["principal"],
    )


async def record_action(
    conn: asyncpg.Connection,
    escrow_id: str,
    action: str,
    action_hash: bytes,
    evidence: str | None,
    reason: str | None,
) -> None:
    """Record the release or cancel about to run on a locked escrow (kept if it was recorded)."""
    await conn.execute(
        "UPDATE escrows SET action = $2, action_hash = $3, evidence = $4::jsonb, reason = $5"
        " WHERE escrow_id = $1 AND status = 'locked' AND action IS NULL",
        escrow_id,
        action,
        action_hash,
        evidence,
        reason,
    )


async def finish(conn: asyncpg.Connection, escrow_id: str, status: str, at: datetime) -> None:
    """Move a locked escrow to `released` or `cancelled` at `at`."""
    column = {"released": "released_at", "cancelled": "cancelled_at"}[status]
    await conn.execute(
        f"UPDATE escrows SET status = $2, {column} = $3 WHERE escrow_id = $1 AND status = 'locked'",
        escrow_id,
        status,
        at,
    )


async def set_action_id(conn: asyncpg.Connection, escrow_id: str, action_id: str) -> None:
    """Remember the governance action that gates the escrow's release."""
    await conn.execute("UPDATE escrows SET action_id = $2 WHERE escrow_id = $1", escrow_id, action_id)


async def audit_event_exists(conn: asyncpg.Connection, event_id: str) -> bool:
    """Whether the audit store holds the event `event_id`: its `seq` (digits) or its hash (hex)."""
    if event_id.isdigit():
        seq = int(event_id)
        if seq >= 2**63:
            return False
        return bool(await conn.fetchval("SELECT EXISTS (SELECT 1 FROM audit_events WHERE seq = $1)", seq))
    try:
        digest = bytes.fromhex(event_id)
    except ValueError:
        return False
    return bool(await conn.fetchval("SELECT EXISTS (SELECT 1 FROM audit_events WHERE hash = $1)", digest))
