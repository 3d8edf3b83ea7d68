"""Auditor exports in PostgreSQL (migration 0021): the export rows, and the records of a range.

The range readers stream rows with a server-side cursor (`PAGE_ROWS` at a time) inside the caller's
transaction, so an export of any size is written without holding it in memory, and one
REPEATABLE READ transaction gives every file the same snapshot.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any, Final

import asyncpg
import msgspec

from ledger.timestamps import rfc3339

PAGE_ROWS: Final = 500

_EXPORT_COLUMNS: Final = (
    "export_id, principal, request::text AS request, status, attempt, destination, location, "
    "files::text AS files, manifest::text AS manifest, error::text AS error, created_at, completed_at"
)

RANGE_QUERIES: Final = {
    "journals": (
        "SELECT journal_id, stream_id, stream_seq, posted_at, effective_at, principal, hash, prev_hash, body "
        "FROM journals WHERE posted_at BETWEEN $1 AND $2 ORDER BY posted_at, stream_id, stream_seq"
    ),
    "invoices": (
        "SELECT * FROM invoices WHERE created_at BETWEEN $1 AND $2 OR updated_at BETWEEN $1 AND $2 "
        "ORDER BY created_at, invoice_id"
    ),
    "payments": (
        "SELECT payment_id, invoice_id, provider, provider_reference, amount, currency, journal_id, "
        "settlement_id, principal, created_at FROM payments WHERE created_at BETWEEN $1 AND $2 "
        "ORDER BY created_at, payment_id"
    ),
    "refunds": (
        "SELECT refund_id, invoice_id, provider, provider_reference, amount, currency, journal_id, "
        "principal, created_at FROM refunds WHERE created_at BETWEEN $1 AND $2 ORDER BY created_at, refund_id"
    ),
    "payouts": (
        "SELECT payout_id, batch_id, participant_id, stripe_account, currency, amount, holdback, state, "
        "reason, hold_id, transfer_id, attempts, created_at, updated_at FROM payouts "
        "WHERE created_at BETWEEN $1 AND $2 OR updated_at BETWEEN $1 AND $2 ORDER BY created_at, payout_id"
    ),
    "audit_events": (
        "SELECT seq, actor_id, event_type, audit_payload(payload, body)::text AS payload, hash, prev_hash, "
        "created_at "
        "FROM audit_events WHERE created_at BETWEEN $1 AND $2 ORDER BY seq"
    ),
}


def plain(row: asyncpg.Record) -> dict[str, Any]:
    """A row as JSON-ready values: times as RFC 3339, bytes as hex (`body` and jsonb text decoded)."""
    out: dict[str, Any] = {}
    for name, value in row.items():
        if isinstance(value, datetime):
            out[name] = rfc3339(value)
        elif name in {"body", "payload", "buyer"} and isinstance(value, bytes | str):
            out[name] = msgspec.json.decode(value)
        elif isinstance(value, bytes):
            out[name] = value.hex()
        elif isinstance(value, list):
            out[name] = list(value)
        else:
            out[name] = value
    return out


async def range_rows(
    conn: asyncpg.Connection, kind: str, start: datetime, end: datetime
) -> AsyncIterator[asyncpg.Record]:
    """The rows of one file's kind in [start, end] (inside a transaction)."""
    async for row in conn.cursor(RANGE_QUERIES[kind], start, end, prefetch=PAGE_ROWS):
        yield row


async def claim(
    conn: asyncpg.Connection,
    export_id: str,
    principal: str,
    request: dict[str, Any],
    destination: str,
) -> tuple[asyncpg.Record, bool]:
    """(row, run_it): a new row `running`, or the existing one (a `failed` one is reset to run again)."""
    created = await conn.fetchrow(
        f"INSERT INTO exports (export_id, principal, request, from_ts, to_ts, pii_included, status, "
        f"destination) VALUES ($1, $2, $3::jsonb, $4::text::timestamptz, $5::text::timestamptz, $6, "
        f"'running', $7) ON CONFLICT (export_id) DO NOTHING RETURNING {_EXPORT_COLUMNS}",
        export_id,
        principal,
        msgspec.json.encode(request).decode(),
        request["from_ts"],
        request["to_ts"],
        request["pii_included"],
        destination,
    )
    if created is not None:
        return created, True
    existing = await export_row(conn, export_id)
    if existing is None:
        raise LookupError(export_id)
    if existing["status"] == "failed" and msgspec.json.decode(existing["request"]) == request:
        retried = await conn.fetchrow(
            f"UPDATE exports SET status = 'running', attempt = attempt + 1, error = NULL, destination = $2, "
            f"completed_at = NULL WHERE export_id = $1 AND status = 'failed' RETURNING {_EXPORT_COLUMNS}",
            export_id,
            destination,
        )
        if retried is not None:
            return retried, True
        existing = await export_row(conn, export_id) or existing
    return existing, False


async def export_row(conn: asyncpg.Connection, export_id: str) -> asyncpg.Record | None:
    """One export row."""
    return await conn.fetchrow(f"SELECT {_EXPORT_COLUMNS} FROM exports WHERE export_id = $1", export_id)


async def complete(
    conn: asyncpg.Connection, export_id: str, location: str, files: dict[str, Any], manifest: dict[str, Any]
) -> None:
    """Mark an export completed with where it is and what it holds."""
    await conn.execute(
        "UPDATE exports SET status = 'completed', location = $2, files = $3::jsonb, manifest = $4::jsonb, "
        "completed_at = now() WHERE export_id = $1 AND status = 'running'",
        export_id,
        location,
        msgspec.json.encode(files).decode(),
        msgspec.json.encode(manifest).decode(),
    )


async def fail(conn: asyncpg.Connection, export_id: str, error: dict[str, Any]) -> None:
    """Mark an export failed (nothing of it is reported as published)."""
    await conn.execute(
        "UPDATE exports SET status = 'failed', error = $2::jsonb, location = NULL, files = NULL, "
        "manifest = NULL, completed_at = now() WHERE export_id = $1",
        export_id,
        msgspec.json.encode(error).decode(),
    )


async def fail_interrupted(conn: asyncpg.Connection, started: datetime, error: dict[str, Any]) -> None:
    """Rows left `running` by an earlier process will never finish: mark them failed."""
    await conn.execute(
        "UPDATE exports SET status = 'failed', error = $2::jsonb, completed_at = now() "
        "WHERE status = 'running' AND created_at < $1",
        started,
        msgspec.json.encode(error).decode(),
    )
