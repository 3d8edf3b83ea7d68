"""Revenue recognition schedules in PostgreSQL (migration 0009): the due-installment index.

Rows only: the schedule itself (amounts per SKU) lives in the invoice body; these rows are written
in the same transaction as the invoice update and let a recognition run find what is due.
"""

from __future__ import annotations

from datetime import datetime
from typing import Final

import asyncpg

DUE_BATCH_MAX: Final = 1000
"""At most this many installments per recognition run (the next run takes the rest)."""


async def insert_schedule(
    conn: asyncpg.Connection,
    invoice_id: str,
    policy: tuple[str, int, str, datetime],
    installments: list[tuple[int, datetime, int]],
) -> None:
    """Record a new schedule, `policy` = (method, periods, interval, start_at), and its
    installments `(k, due_at, amount)` (inside the caller's transaction)."""
    method, periods, interval, start_at = policy
    await conn.execute(
        'INSERT INTO revenue_schedules (invoice_id, method, periods, "interval", start_at, total)'
        " VALUES ($1, $2, $3, $4, $5, $6)",
        invoice_id,
        method,
        periods,
        interval,
        start_at,
        sum(amount for _, _, amount in installments),
    )
    await conn.executemany(
        "INSERT INTO revenue_installments (invoice_id, k, due_at, amount) VALUES ($1, $2, $3, $4)",
        [(invoice_id, *row) for row in installments],
    )


async def sync_installments(
    conn: asyncpg.Connection,
    invoice_id: str,
    installments: list[tuple[int, int, str | None, datetime | None]],
) -> None:
    """Mirror the installments `(k, amount, journal_id, posted_at)` onto their rows (inside the
    caller's transaction)."""
    await conn.executemany(
        "UPDATE revenue_installments SET amount = $3, journal_id = $4, posted_at = $5"
        " WHERE invoice_id = $1 AND k = $2",
        [(invoice_id, *row) for row in installments],
    )


async def due_installments(
    conn: asyncpg.Connection, as_of: datetime, limit: int = DUE_BATCH_MAX
) -> list[tuple[str, int]]:
    """(invoice id, k) of the unposted installments due at `as_of`, oldest due first."""
    rows = await conn.fetch(
        "SELECT invoice_id, k FROM revenue_installments WHERE posted_at IS NULL AND due_at <= $1"
        " ORDER BY due_at, invoice_id, k LIMIT $2",
        as_of,
        limit,
    )
    return [(r["invoice_id"], r["k"]) for r in rows]
