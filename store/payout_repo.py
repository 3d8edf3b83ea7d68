"""Payout batches, payouts and provider attempts in PostgreSQL (migration 0015).

Rows only: the money moves through holds and journals in the ledger; this records which payouts a
batch planned and what happened to each. Payables are read from `balances` (never written here);
participants from `royalty_participants` (read-only; owned by the royalty flow).
"""

from __future__ import annotations

from datetime import date
from typing import Any

import asyncpg

PAYABLE_PREFIX = "liability:royalty:"
HOLDBACK_PREFIX = "liability:royalty-holdback:"


async def participants(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    """Every royalty participant (id, stripe_account, minimum_currency, minimum_amount)."""
    return await conn.fetch(
        "SELECT participant_id, stripe_account, minimum_currency, minimum_amount FROM royalty_participants"
    )


async def payables(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    """Per (participant, currency): `due` (posted credits - posted debits - pending debits of the
    payable) and `holdback` (the holdback account's posted balance)."""
    return await conn.fetch(
        """
        SELECT substr(account_id, length($1) + 1) AS participant_id, currency::text AS currency,
               (credits_posted - debits_posted - debits_pending)::bigint AS due, 0::bigint AS holdback
          FROM balances WHERE account_id LIKE $1 || '%'
        UNION ALL
        SELECT substr(account_id, length($2) + 1), currency::text, 0::bigint,
               (credits_posted - debits_posted)::bigint
          FROM balances WHERE account_id LIKE $2 || '%'
        """,
        PAYABLE_PREFIX,
        HOLDBACK_PREFIX,
    )


async def planned_unheld(conn: asyncpg.Connection) -> dict[tuple[str, str], int]:
    """What batches planned but did not move to pending yet, per (participant, currency)."""
    rows = await conn.fetch(
        "SELECT participant_id, currency::text AS currency, sum(amount)::bigint AS amount"
        " FROM payouts WHERE state = 'planned' GROUP BY participant_id, currency"
    )
    return {(r["participant_id"], r["currency"]): int(r["amount"]) for r in rows}


async def lock_planning(conn: asyncpg.Connection) -> None:
    """Serialise planning (inside the caller's transaction) so two runs never plan the same money."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext('payout_planning'))")


async def batch(conn: asyncpg.Connection, batch_id: str) -> asyncpg.Record | None:
    """The batch row, or None."""
    return await conn.fetchrow("SELECT * FROM payout_batches WHERE batch_id = $1", batch_id)


async def insert_batch(
    conn: asyncpg.Connection,
    *,
    batch_id: str,
    payout_date: date,
    status: str,
    items: str | None,
    skipped: str,
    request_hash: str,
    principal: str,
) -> None:
    """Insert a batch (the caller checked it is new, under `lock_planning`)."""
    await conn.execute(
        "INSERT INTO payout_batches (batch_id, payout_date, status, items, skipped, request_hash, principal)"
        " VALUES ($1, $2, $3, $4::jsonb, $5::jsonb, $6, $7)",
        batch_id,
        payout_date,
        status,
        items,
        skipped,
        request_hash,
        principal,
    )


async def insert_payouts(conn: asyncpg.Connection, batch_id: str, rows: list[tuple[Any, ...]]) -> None:
    """Planned payouts (payout_id, participant_id, stripe_account, currency, amount, holdback)."""
    await conn.executemany(
        "INSERT INTO payouts (payout_id, batch_id, participant_id, stripe_account, currency, amount,"
        " holdback, state) VALUES ($1, $7, $2, $3, $4, $5, $6, 'planned')",
        [(*row, batch_id) for row in rows],
    )


async def set_batch(
    conn: asyncpg.Connection, batch_id: str, status: str, action_id: str | None = None
) -> None:
    """A batch's status (and the gated action that waits for approvals)."""
    await conn.execute(
        "UPDATE payout_batches SET status = $2, action_id = COALESCE($3, action_id),"
        " completed_at = CASE WHEN $2 = 'done' THEN COALESCE(completed_at, now()) END WHERE batch_id = $1",
        batch_id,
        status,
        action_id,
    )


async def batch_payouts(conn: asyncpg.Connection, batch_id: str) -> list[asyncpg.Record]:
    """A batch's payouts in id order."""
    return await conn.fetch("SELECT * FROM payouts WHERE batch_id = $1 ORDER BY payout_id", batch_id)


async def payout(conn: asyncpg.Connection, payout_id: str) -> asyncpg.Record | None:
    """One payout, or None."""
    return await conn.fetchrow("SELECT * FROM payouts WHERE payout_id = $1", payout_id)


async def attempts(conn: asyncpg.Connection, payout_id: str) -> list[asyncpg.Record]:
    """A payout's provider attempts, oldest first."""
    return await conn.fetch(
        "SELECT attempt, at, outcome, detail FROM payout_attempts WHERE payout_id = $1 ORDER BY attempt",
        payout_id,
    )


async def set_state(
    conn: asyncpg.Connection,
    payout_id: str,
    state: str,
    *,
    reason: str | None = None,
    hold_id: str | None = None,
    transfer_id: str | None = None,
) -> None:
    """Move a payout to `state` (never out of paid or failed)."""
    await conn.execute(
        "UPDATE payouts SET state = $2, reason = $3, hold_id = COALESCE($4, hold_id),"
        " transfer_id = COALESCE($5, transfer_id), updated_at = now()"
        " WHERE payout_id = $1 AND state NOT IN ('paid', 'failed')",
        payout_id,
        state,
        reason,
        hold_id,
        transfer_id,
    )


async def record_attempt(conn: asyncpg.Connection, payout_id: str, outcome: str, detail: str | None) -> int:
    """Record one provider call; its number."""
    number: int = await conn.fetchval(
        "UPDATE payouts SET attempts = attempts + 1, updated_at = now()"
        " WHERE payout_id = $1 RETURNING attempts",
        payout_id,
    )
    await conn.execute(
        "INSERT INTO payout_attempts (payout_id, attempt, outcome, detail) VALUES ($1, $2, $3, $4)",
        payout_id,
        number,
        outcome,
        detail,
    )
    return number


async def open_batches(conn: asyncpg.Connection) -> list[str]:
    """Batches left `open` (some payout planned or pending), oldest first: resumed at start-up."""
    rows = await conn.fetch(
        "SELECT batch_id FROM payout_batches WHERE status = 'open' ORDER BY created_at, batch_id"
    )
    return [r["batch_id"] for r in rows]


async def reversible_transfers(
    conn: asyncpg.Connection, participant_id: str, currency: str
) -> list[asyncpg.Record]:
    """A participant's paid payouts in a currency, newest first, with `reversible`: the amount less
    what clawback reversals requested or made on it (failed ones give it back)."""
    return await conn.fetch(
        """
        SELECT p.payout_id, p.transfer_id, p.amount,
               (p.amount - COALESCE(sum(r.amount) FILTER (WHERE r.state <> 'failed'), 0))::bigint
                   AS reversible
          FROM payouts p LEFT JOIN clawback_reversals r USING (payout_id)
         WHERE p.participant_id = $1 AND p.currency = $2 AND p.state = 'paid'
         GROUP BY p.payout_id
         ORDER BY p.updated_at DESC, p.payout_id DESC
        """,
        participant_id,
        currency,
    )


async def insert_reversal(conn: asyncpg.Connection, values: tuple[Any, ...]) -> None:
    """A reversal about to be requested (reversal_id, clawback_journal, participant_id, payout_id,
    transfer_id, currency, amount); a replay inserts nothing."""
    await conn.execute(
        "INSERT INTO clawback_reversals (reversal_id, clawback_journal, participant_id, payout_id,"
        " transfer_id, currency, amount, state) VALUES ($1, $2, $3, $4, $5, $6, $7, 'requested')"
        " ON CONFLICT (reversal_id) DO NOTHING",
        *values,
    )


async def open_reversals(
    conn: asyncpg.Connection, participant_id: str, currency: str
) -> list[asyncpg.Record]:
    """Reversals left `requested` (a crash between the provider call and its recording)."""
    return await conn.fetch(
        "SELECT * FROM clawback_reversals WHERE participant_id = $1 AND currency = $2 AND state = 'requested'"
        " ORDER BY created_at, reversal_id",
        participant_id,
        currency,
    )


async def finish_reversal(
    conn: asyncpg.Connection,
    reversal_id: str,
    state: str,
    *,
    provider_reversal_id: str | None = None,
    journal_id: str | None = None,
    reason: str | None = None,
) -> None:
    """Record a reversal's outcome (`reversed` or `failed`)."""
    await conn.execute(
        "UPDATE clawback_reversals SET state = $2, provider_reversal_id = $3, journal_id = $4, reason = $5,"
        " updated_at = now() WHERE reversal_id = $1 AND state = 'requested'",
        reversal_id,
        state,
        provider_reversal_id,
        journal_id,
        reason,
    )


async def participant_reversals(conn: asyncpg.Connection, participant_id: str) -> list[asyncpg.Record]:
    """Every clawback reversal of a participant, oldest first (its statement)."""
    return await conn.fetch(
        "SELECT * FROM clawback_reversals WHERE participant_id = $1 ORDER BY created_at, reversal_id",
        participant_id,
    )
