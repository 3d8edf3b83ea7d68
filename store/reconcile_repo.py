"""Reconciliation runs, discrepancies and resolutions in PostgreSQL (migration 0019); the ledger's
provider-referenced money movements read for matching.

Rows only: the adjusting journals of resolutions go through the ledger. The ledger side of a
window is read from `payments` and `refunds` (provider reference = the payment intent / refund id)
and paid `payouts` (`transfer_id`), timed by their journal's `posted_at` (D3).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, Final

import asyncpg

_LEDGER: Final = """
SELECT 'payment' AS kind, m.provider_reference AS reference, m.amount, m.currency::text AS currency,
       COALESCE(j.posted_at, m.created_at) AS at, m.journal_id
  FROM payments m LEFT JOIN journals j ON j.journal_id = m.journal_id
 WHERE m.provider = $1 AND m.created_at >= $2 AND m.created_at < $3
UNION ALL
SELECT 'refund', m.provider_reference, m.amount, m.currency::text,
       COALESCE(j.posted_at, m.created_at), m.journal_id
  FROM refunds m LEFT JOIN journals j ON j.journal_id = m.journal_id
 WHERE m.provider = $1 AND m.created_at >= $2 AND m.created_at < $3
UNION ALL
SELECT 'payout', p.transfer_id, p.amount, p.currency::text, p.updated_at, p.payout_id
  FROM payouts p
 WHERE $1 = 'stripe' AND p.state = 'paid' AND p.updated_at >= $2 AND p.updated_at < $3
"""


async def ledger_records(
    conn: asyncpg.Connection, provider: str, start: datetime, end: datetime
) -> list[asyncpg.Record]:
    """The ledger's movements with a provider reference recorded in `[start, end)`:
    (kind, reference, amount, currency, at, journal_id); a payout's `journal_id` is its payout id
    (the caller names its settle journal)."""
    return await conn.fetch(_LEDGER, provider, start, end)


async def resolutions(
    conn: asyncpg.Connection, provider: str, references: Sequence[str]
) -> list[asyncpg.Record]:
    """The resolutions recorded for these provider references (every run's), oldest first."""
    return await conn.fetch(
        "SELECT kind, provider_reference, journal_id, created_at, amount, currency::text AS currency"
        " FROM reconcile_resolutions WHERE provider = $1 AND provider_reference = ANY($2::text[])"
        " ORDER BY created_at",
        provider,
        list(references),
    )


async def run_row(conn: asyncpg.Connection, reconcile_id: str) -> asyncpg.Record | None:
    """The run, or None."""
    return await conn.fetchrow("SELECT * FROM reconcile_runs WHERE reconcile_id = $1", reconcile_id)


async def insert_run(conn: asyncpg.Connection, values: dict[str, Any]) -> bool:
    """Create a run in `running`; False when its request id exists (the caller compares hashes)."""
    status = await conn.execute(
        "INSERT INTO reconcile_runs (reconcile_id, request_id, provider, from_ts, to_ts, trigger, status,"
        " request_hash, principal) VALUES ($1, $2, $3, $4, $5, $6, 'running', $7, $8)"
        " ON CONFLICT DO NOTHING",
        values["reconcile_id"],
        values["request_id"],
        values["provider"],
        values["from_ts"],
        values["to_ts"],
        values["trigger"],
        values["request_hash"],
        values["principal"],
    )
    return bool(status == "INSERT 0 1")


async def restart_run(conn: asyncpg.Connection, reconcile_id: str) -> bool:
    """A failed run back to `running` (a retry); False when it is not failed (someone else has it)."""
    status = await conn.execute(
        "UPDATE reconcile_runs SET status = 'running', error = NULL"
        " WHERE reconcile_id = $1 AND status = 'failed'",
        reconcile_id,
    )
    return bool(status == "UPDATE 1")


_DISCREPANCY_COLUMNS: Final = (
    "discrepancy_id",
    "kind",
    "reason",
    "provider_reference",
    "journal_id",
    "ledger_amount",
    "provider_amount",
    "ledger_currency",
    "provider_currency",
    "details",
)


async def complete_run(
    conn: asyncpg.Connection,
    reconcile_id: str,
    counts: tuple[int, int, int],
    discrepancies: Sequence[dict[str, Any]],
) -> None:
    """Store the discrepancies (`details` as JSON text) and mark the run completed; counts =
    (matched, provider records, ledger records)."""
    async with conn.transaction():
        await conn.executemany(
            "INSERT INTO reconcile_discrepancies (reconcile_id, discrepancy_id, kind, reason,"
            " provider_reference,"
            " journal_id, ledger_amount, provider_amount, ledger_currency, provider_currency, details)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11::jsonb)",
            [(reconcile_id, *(d[c] for c in _DISCREPANCY_COLUMNS)) for d in discrepancies],
        )
        await conn.execute(
            "UPDATE reconcile_runs SET status = 'completed', completed_at = now(), matched = $2,"
            " provider_records = $3, ledger_records = $4 WHERE reconcile_id = $1",
            reconcile_id,
            *counts,
        )


async def fail_run(conn: asyncpg.Connection, reconcile_id: str, error: str) -> None:
    """Mark a run failed with its error envelope (JSON text)."""
    await conn.execute(
        "UPDATE reconcile_runs SET status = 'failed', error = $2::jsonb, completed_at = now()"
        " WHERE reconcile_id = $1",
        reconcile_id,
        error,
    )


async def discrepancy_rows(conn: asyncpg.Connection, reconcile_id: str) -> list[asyncpg.Record]:
    """The run's discrepancies in id order."""
    return await conn.fetch(
        "SELECT * FROM reconcile_discrepancies WHERE reconcile_id = $1 ORDER BY discrepancy_id", reconcile_id
    )


async def discrepancy_row(
    conn: asyncpg.Connection, reconcile_id: str, discrepancy_id: str
) -> asyncpg.Record | None:
    """One discrepancy, or None."""
    return await conn.fetchrow(
        "SELECT * FROM reconcile_discrepancies WHERE reconcile_id = $1 AND discrepancy_id = $2",
        reconcile_id,
        discrepancy_id,
    )


async def resolution_row(
    conn: asyncpg.Connection, reconcile_id: str, discrepancy_id: str
) -> asyncpg.Record | None:
    """The resolution of a discrepancy, or None."""
    return await conn.fetchrow(
        "SELECT * FROM reconcile_resolutions WHERE reconcile_id = $1 AND discrepancy_id = $2",
        reconcile_id,
        discrepancy_id,
    )


async def record_resolution(conn: asyncpg.Connection, values: dict[str, Any]) -> bool:
    """Record a resolution and mark its discrepancy resolved (one transaction); False if it was."""
    async with conn.transaction():
        status = await conn.execute(
            "INSERT INTO reconcile_resolutions (reconcile_id, discrepancy_id, provider, kind,"
            " provider_reference,"
            " journal_id, amount, currency, reason, principal, request_hash, answer)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12::jsonb) ON CONFLICT DO NOTHING",
            *(
                values[k]
                for k in (
                    "reconcile_id",
                    "discrepancy_id",
                    "provider",
                    "kind",
                    "provider_reference",
                    "journal_id",
                    "amount",
                    "currency",
                    "reason",
                    "principal",
                    "request_hash",
                    "answer",
                )
            ),
        )
        if status != "INSERT 0 1":
            return False
        await conn.execute(
            "UPDATE reconcile_discrepancies SET status = 'resolved', resolution_journal_id = $3"
            " WHERE reconcile_id = $1 AND discrepancy_id = $2",
            values["reconcile_id"],
            values["discrepancy_id"],
            values["journal_id"],
        )
    return True


async def newest_reconciled_end(conn: asyncpg.Connection, provider: str | None = None) -> datetime | None:
    """The latest `to_ts` of a completed run (of `provider`, or any), or None."""
    value = await conn.fetchval(
        "SELECT max(to_ts) FROM reconcile_runs WHERE status = 'completed'"
        " AND ($1::text IS NULL OR provider = $1)",
        provider,
    )
    return value if isinstance(value, datetime) else None


async def newest_scheduled_end(conn: asyncpg.Connection, provider: str) -> datetime | None:
    """The latest `to_ts` of a completed scheduled run, or None."""
    value = await conn.fetchval(
        "SELECT max(to_ts) FROM reconcile_runs WHERE status = 'completed' AND trigger = 'schedule'"
        " AND provider = $1",
        provider,
    )
    return value if isinstance(value, datetime) else None
