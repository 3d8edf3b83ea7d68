"""What `POST /admin/resend-journal` reads: the signing-off approver and an earlier resend of the same id.

A resend leaves nothing but its `ledger.resend` audit event, so the audit stream is where an
earlier resend with the same `resend_id` is found (an admin-rate lookup, filtered by event type).
"""

from __future__ import annotations

from typing import Final

import asyncpg

RESEND_EVENT: Final = "ledger.resend"


async def active_approver(conn: asyncpg.Connection, approver_id: str) -> asyncpg.Record | None:
    """The approver's row when it is registered and not revoked."""
    return await conn.fetchrow(
        "SELECT approver_id, algorithm, public_key_pem, fingerprint FROM approvers "
        "WHERE approver_id = $1 AND revoked_at IS NULL",
        approver_id,
    )


async def earlier_resend(conn: asyncpg.Connection, resend_id: str) -> asyncpg.Record | None:
    """The `ledger.resend` event recorded for `resend_id`, if any (seq, hash, created_at, payload)."""
    return await conn.fetchrow(
        "SELECT seq, hash, created_at, audit_payload(payload, body) AS payload FROM audit_events "
        "WHERE event_type = $1 AND audit_payload(payload, body)->>'resend_id' = $2 ORDER BY seq LIMIT 1",
        RESEND_EVENT,
        resend_id,
    )
