"""Approvers, gated actions and approvals (migration 0012; finance/governance.py uses these)."""

from __future__ import annotations

from datetime import datetime

import asyncpg

_ACTION_COLUMNS = (
    "action_id, kind, params, params_hash, amount_minor, currency, status, requested_by, request_hash,"
    " created_at, expires_at, decided_at, decided_by, reason, result"
)


async def insert_approver(
    conn: asyncpg.Connection,
    approver_id: str,
    algorithm: str,
    public_key_pem: str,
    fingerprint: str,
    principal: str,
) -> tuple[asyncpg.Record, bool]:
    """Register an approver; (the stored row, created). An existing id is left as it is."""
    row = await conn.fetchrow(
        "INSERT INTO approvers (approver_id, algorithm, public_key_pem, fingerprint, registered_by)"
        " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (approver_id) DO NOTHING RETURNING *",
        approver_id,
        algorithm,
        public_key_pem,
        fingerprint,
        principal,
    )
    if row is not None:
        return row, True
    existing = await conn.fetchrow("SELECT * FROM approvers WHERE approver_id = $1", approver_id)
    assert existing is not None  # inserted or present: rows are never deleted
    return existing, False


async def revoke_approver(
    conn: asyncpg.Connection, approver_id: str, principal: str
) -> asyncpg.Record | None:
    """Mark an approver revoked (first revocation wins); the row, or None when unknown."""
    await conn.execute(
        "UPDATE approvers SET revoked_at = now(), revoked_by = $2"
        " WHERE approver_id = $1 AND revoked_at IS NULL",
        approver_id,
        principal,
    )
    return await conn.fetchrow("SELECT * FROM approvers WHERE approver_id = $1", approver_id)


async def approvers(conn: asyncpg.Connection, *, active_only: bool) -> list[asyncpg.Record]:
    """Every approver (or only those not revoked), by id."""
    where = " WHERE revoked_at IS NULL" if active_only else ""
    return await conn.fetch(f"SELECT * FROM approvers{where} ORDER BY approver_id")


async def insert_action(
    conn: asyncpg.Connection,
    *,
    action_id: str,
    kind: str,
    params: str,
    params_hash: str,
    amount_minor: int,
    currency: str,
    requested_by: str,
    request_hash: bytes,
    created_at: datetime,
    expires_at: datetime,
) -> tuple[asyncpg.Record, bool]:
    """Store a new pending action; (the stored row, created). An existing id is left as it is."""
    row = await conn.fetchrow(
        "INSERT INTO gated_actions (action_id, kind, params, params_hash, amount_minor, currency, status,"
        " requested_by, request_hash, created_at, expires_at)"
        " VALUES ($1, $2, $3, $4, $5, $6, 'pending_approval', $7, $8, $9, $10)"
        f" ON CONFLICT (action_id) DO NOTHING RETURNING {_ACTION_COLUMNS}",
        action_id,
        kind,
        params,
        params_hash,
        amount_minor,
        currency,
        requested_by,
        request_hash,
        created_at,
        expires_at,
    )
    if row is not None:
        return row, True
    existing = await action_row(conn, action_id)
    assert existing is not None  # inserted or present: rows are never deleted
    return existing, False


async def action_row(
    conn: asyncpg.Connection, action_id: str, *, lock: bool = False
) -> asyncpg.Record | None:
    """One action (locked FOR UPDATE inside a transaction when `lock`)."""
    suffix = " FOR UPDATE" if lock else ""
    return await conn.fetchrow(
        f"SELECT {_ACTION_COLUMNS} FROM gated_actions WHERE action_id = $1{suffix}", action_id
    )


async def action_rows(
    conn: asyncpg.Connection, status: str | None, now: datetime, limit: int
) -> list[asyncpg.Record]:
    """Newest actions first, at most `limit`; `status` filters (`pending_approval` leaves out the
    expired ones, `expired` is a pending action past its expiry)."""
    args: list[object]
    if status == "pending_approval":
        where, args = " WHERE status = 'pending_approval' AND expires_at > $2", [now]
    elif status == "expired":
        where, args = " WHERE status = 'expired' OR (status = 'pending_approval' AND expires_at <= $2)", [now]
    elif status is not None:
        where, args = " WHERE status = $2", [status]
    else:
        where, args = "", []
    return await conn.fetch(
        f"SELECT {_ACTION_COLUMNS} FROM gated_actions{where} ORDER BY created_at DESC, action_id LIMIT $1",
        limit,
        *args,
    )


async def set_status(
    conn: asyncpg.Connection,
    action_id: str,
    status: str,
    *,
    decided_at: datetime | None = None,
    decided_by: str | None = None,
    reason: str | None = None,
    result: str | None = None,
) -> None:
    """Move an action to `status`, recording who decided, why and the execution's answer."""
    await conn.execute(
        "UPDATE gated_actions SET status = $2, decided_at = COALESCE($3, decided_at),"
        " decided_by = COALESCE($4, decided_by), reason = COALESCE($5, reason), result = COALESCE($6, result)"
        " WHERE action_id = $1",
        action_id,
        status,
        decided_at,
        decided_by,
        reason,
        result,
    )


async def approvals(conn: asyncpg.Connection, action_id: str) -> list[asyncpg.Record]:
    """The approvals of an action, oldest first."""
    return await conn.fetch(
        "SELECT approver_id, params_hash, signature, principal, approved_at FROM approvals"
        " WHERE action_id = $1 ORDER BY approved_at, approver_id",
        action_id,
    )


async def insert_approval(
    conn: asyncpg.Connection,
    action_id: str,
    approver_id: str,
    params_hash: str,
    signature: str,
    principal: str,
    approved_at: datetime,
) -> None:
    """Store one approval (the caller checked it is new)."""
    await conn.execute(
        "INSERT INTO approvals (action_id, approver_id, params_hash, signature, principal, approved_at)"
        " VALUES ($1, $2, $3, $4, $5, $6)",
        action_id,
        approver_id,
        params_hash,
        signature,
        principal,
        approved_at,
    )
