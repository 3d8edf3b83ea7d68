"""Royalty participants, rule versions and accruals in PostgreSQL (migration 0013).

Rows only: the accrual journals go through the ledger and balances are never written here. Rule
versions are inserted, never updated; `insert_rule` numbers the version per subject under a
transaction-level advisory lock so concurrent writers of one subject never collide.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import asyncpg


async def insert_participant(conn: asyncpg.Connection, values: dict[str, Any]) -> bool:
    """Insert a participant; False when the id is taken (the caller compares `request_hash`)."""
    status = await conn.execute(
        "INSERT INTO royalty_participants (participant_id, name, stripe_account, minimum_currency,"
        " minimum_amount, request_hash, principal) VALUES ($1, $2, $3, $4, $5, $6, $7)"
        " ON CONFLICT (participant_id) DO NOTHING",
        values["participant_id"],
        values["name"],
        values["stripe_account"],
        values["minimum_currency"],
        values["minimum_amount"],
        values["request_hash"],
        values["principal"],
    )
    return bool(status == "INSERT 0 1")


async def participant(conn: asyncpg.Connection, participant_id: str) -> asyncpg.Record | None:
    """The participant row, or None."""
    return await conn.fetchrow("SELECT * FROM royalty_participants WHERE participant_id = $1", participant_id)


async def existing_participants(conn: asyncpg.Connection, ids: list[str]) -> set[str]:
    """Which of `ids` are participants."""
    rows = await conn.fetch(
        "SELECT participant_id FROM royalty_participants WHERE participant_id = ANY($1::text[])", ids
    )
    return {r["participant_id"] for r in rows}


async def rule(conn: asyncpg.Connection, rule_id: str) -> asyncpg.Record | None:
    """One rule version by id, or None."""
    return await conn.fetchrow("SELECT * FROM royalty_rules WHERE rule_id = $1", rule_id)


async def insert_rule(conn: asyncpg.Connection, values: dict[str, Any]) -> bool:
    """Insert a new version of the subject's rule (inside the caller's transaction); False when
    `rule_id` is taken."""
    subject, key = values["subject"], values["subject_key"]
    await conn.execute(
        "SELECT pg_advisory_xact_lock(hashtext('royalty_rules:' || $1 || ':' || $2))", subject, key
    )
    if await conn.fetchval("SELECT 1 FROM royalty_rules WHERE rule_id = $1", values["rule_id"]):
        return False
    version = await conn.fetchval(
        "SELECT COALESCE(max(version), 0) + 1 FROM royalty_rules WHERE subject = $1 AND subject_key = $2",
        subject,
        key,
    )
    await conn.execute(
        "INSERT INTO royalty_rules (rule_id, subject, subject_key, version, effective_from, body,"
        " request_hash, principal) VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7, $8)",
        values["rule_id"],
        subject,
        key,
        version,
        values["effective_from"],
        values["body"],
        values["request_hash"],
        values["principal"],
    )
    return True


async def rule_in_force(
    conn: asyncpg.Connection, subject: str, key: str, at: datetime
) -> asyncpg.Record | None:
    """The subject's version in force at `at`: latest `effective_from <= at`, ties to the higher version."""
    return await conn.fetchrow(
        "SELECT * FROM royalty_rules WHERE subject = $1 AND subject_key = $2 AND effective_from <= $3"
        " ORDER BY effective_from DESC, version DESC LIMIT 1",
        subject,
        key,
        at,
    )


async def accrued_rule(conn: asyncpg.Connection, invoice_id: str, sku: str) -> asyncpg.Record | None:
    """The rule version an invoice already accrued a SKU under (its earlier installments), or None."""
    return await conn.fetchrow(
        "SELECT r.* FROM royalty_accruals a JOIN royalty_rules r USING (rule_id)"
        " WHERE a.invoice_id = $1 AND a.sku = $2 LIMIT 1",
        invoice_id,
        sku,
    )


async def insert_accruals(conn: asyncpg.Connection, rows: list[tuple[Any, ...]]) -> None:
    """Record accrual rows (journal_id, invoice_id, sku, participant_id, rule_id, rule_version,
    installment, currency, revenue, amount, holdback, holdback_release_at, posted_at); a replay of
    the same journal inserts nothing."""
    await conn.executemany(
        "INSERT INTO royalty_accruals (journal_id, invoice_id, sku, participant_id, rule_id, rule_version,"
        " installment, currency, revenue, amount, holdback, holdback_release_at, posted_at)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"
        " ON CONFLICT (journal_id, sku, participant_id) DO NOTHING",
        rows,
    )


async def participant_accruals(
    conn: asyncpg.Connection, participant_id: str, start: datetime | None, end: datetime | None
) -> list[asyncpg.Record]:
    """A participant's accruals with `start <= posted_at < end` (either bound optional), oldest first."""
    return await _participant_rows(conn, "royalty_accruals", "journal_id", participant_id, start, end)


async def _participant_rows(
    conn: asyncpg.Connection,
    table: str,
    journal_column: str,
    participant_id: str,
    start: datetime | None,
    end: datetime | None,
) -> list[asyncpg.Record]:
    return await conn.fetch(
        f"SELECT * FROM {table} WHERE participant_id = $1"
        " AND ($2::timestamptz IS NULL OR posted_at >= $2) AND ($3::timestamptz IS NULL OR posted_at < $3)"
        f" ORDER BY posted_at, {journal_column}, sku",
        participant_id,
        start,
        end,
    )


async def journal_posted_at(conn: asyncpg.Connection, journal_id: str) -> datetime | None:
    """The ledger's commit time of a journal (DECISIONS D3), or None."""
    value = await conn.fetchval("SELECT posted_at FROM journals WHERE journal_id = $1", journal_id)
    return value if isinstance(value, datetime) else None


async def clawed_so_far(conn: asyncpg.Connection, invoice_id: str, sku: str) -> asyncpg.Record | None:
    """What an invoice's SKU accrued and had clawed back: `accrued_revenue`, `accrued` (jsonb
    participant -> amount), `reversed_revenue`, `clawed` (jsonb); None when it accrued nothing."""
    return await conn.fetchrow(
        """
        WITH acc AS (SELECT * FROM royalty_accruals WHERE invoice_id = $1 AND sku = $2),
             cb AS (SELECT * FROM royalty_clawbacks WHERE invoice_id = $1 AND sku = $2)
        SELECT (SELECT coalesce(sum(revenue), 0)
                  FROM (SELECT DISTINCT journal_id, revenue FROM acc) j)::bigint AS accrued_revenue,
               (SELECT coalesce(jsonb_object_agg(participant_id, total), '{}') FROM
                   (SELECT participant_id, sum(amount) AS total FROM acc GROUP BY participant_id) a)
                   AS accrued,
               (SELECT coalesce(sum(revenue), 0)
                  FROM (SELECT DISTINCT source_journal, revenue FROM cb) j)::bigint AS reversed_revenue,
               (SELECT coalesce(jsonb_object_agg(participant_id, total), '{}') FROM
                   (SELECT participant_id, sum(amount) AS total FROM cb GROUP BY participant_id) c)
                   AS clawed
         WHERE EXISTS (SELECT 1 FROM acc)
        """,
        invoice_id,
        sku,
    )


async def insert_clawbacks(conn: asyncpg.Connection, rows: list[tuple[Any, ...]]) -> None:
    """Record clawback rows (source_journal, invoice_id, sku, participant_id, journal_id, rule_id,
    rule_version, currency, revenue, amount, posted_at); a replay inserts nothing."""
    await conn.executemany(
        "INSERT INTO royalty_clawbacks (source_journal, invoice_id, sku, participant_id, journal_id,"
        " rule_id, rule_version, currency, revenue, amount, posted_at)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
        " ON CONFLICT (source_journal, sku, participant_id) DO NOTHING",
        rows,
    )


async def participant_clawbacks(
    conn: asyncpg.Connection, participant_id: str, start: datetime | None, end: datetime | None
) -> list[asyncpg.Record]:
    """A participant's clawbacks with `start <= posted_at < end` (either bound optional), oldest first."""
    return await _participant_rows(conn, "royalty_clawbacks", "source_journal", participant_id, start, end)


async def held_accruals(conn: asyncpg.Connection, as_of: datetime, journals_max: int) -> list[asyncpg.Record]:
    """Every accrual row with a holdback of the (at most `journals_max`, oldest release first)
    accrual journals that have a holdback due at `as_of` and not released yet: released rows and
    rows due later included, so a journal's release times (and the ids derived from them) are
    always seen whole."""
    return await conn.fetch(
        """
        WITH due AS (
            SELECT journal_id, min(holdback_release_at) AS first_due FROM royalty_accruals
             WHERE holdback > 0 AND holdback_released_at IS NULL AND holdback_release_at <= $1
             GROUP BY journal_id ORDER BY first_due, journal_id LIMIT $2
        )
        SELECT a.journal_id, a.sku, a.participant_id, a.currency::text AS currency, a.holdback,
               a.holdback_release_at, a.holdback_released_at IS NOT NULL AS released
          FROM royalty_accruals a JOIN due USING (journal_id)
         WHERE a.holdback > 0 AND a.holdback_release_at IS NOT NULL
         ORDER BY due.first_due, a.journal_id, a.sku, a.participant_id
        """,
        as_of,
        journals_max,
    )


async def mark_released(
    conn: asyncpg.Connection,
    accrual_journal_id: str,
    release_at: datetime,
    release_journal_id: str,
    released_at: datetime,
) -> int:
    """Mark the accrual journal's rows due at `release_at` released by `release_journal_id`; how
    many rows this call marked (0: another run marked them first)."""
    status = await conn.execute(
        "UPDATE royalty_accruals SET holdback_released_at = $4, holdback_release_journal = $3"
        " WHERE journal_id = $1 AND holdback_release_at = $2 AND holdback > 0"
        " AND holdback_released_at IS NULL",
        accrual_journal_id,
        release_at,
        release_journal_id,
        released_at,
    )
    return int(status.split()[-1])
