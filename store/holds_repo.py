"""Holds (pending amounts) in PostgreSQL: the `holds` and `hold_lines` tables (migration 0014).

The owning shard writes a hold, its lines and the pending columns of `balances` in one
transaction, and resolves it (posted, voided, expired) in the transaction that releases them
(and, for a post, writes its journal). Readers (the API, `ledger-node check`) only read.
"""

from __future__ import annotations

from datetime import datetime

import asyncpg

from ledger.invariants import check

# Pending deltas: (account_id, currency, slot, debits, credits); negative deltas release.
PendingDelta = tuple[str, str, int, int, int]
# Hold lines: (line_no, account_id, currency, side 'D'|'C', amount).
HoldLine = tuple[int, str, str, str, int]

_UPSERT_PENDING = """
INSERT INTO balances AS b (account_id, currency, slot, debits_pending, credits_pending)
SELECT * FROM unnest($1::text[], $2::text[], $3::integer[], $4::bigint[], $5::bigint[])
ON CONFLICT (account_id, currency) DO UPDATE
   SET debits_pending = b.debits_pending + EXCLUDED.debits_pending,
       credits_pending = b.credits_pending + EXCLUDED.credits_pending
"""

# Releases (negative deltas) update existing rows: an upsert's candidate row would fail the
# `>= 0` checks of the pending columns before its conflict is seen.
_RELEASE_PENDING = """
UPDATE balances AS b
   SET debits_pending = b.debits_pending + d.debits, credits_pending = b.credits_pending + d.credits
  FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[]) AS d(account_id, currency, debits, credits)
 WHERE b.account_id = d.account_id AND b.currency = d.currency
"""

_INSERT_HOLD = """
INSERT INTO holds (hold_id, shard_id, state, principal, idem_key, request_hash, journal, expires_at,
                   created_at)
VALUES ($1, $2, 'pending', $3, $4, $5, $6, $7, $8)
"""

_INSERT_LINES = """
INSERT INTO hold_lines (hold_id, line_no, account_id, currency, side, amount)
SELECT $1, * FROM unnest($2::smallint[], $3::text[], $4::text[], $5::text[], $6::bigint[])
"""

_RESOLVE = """
UPDATE holds SET state = $2, resolved_at = $3, resolve_hash = $4, posted_journal_id = $5
 WHERE hold_id = $1 AND state = 'pending'
RETURNING hold_id
"""

HOLD_COLUMNS = (
    "hold_id, shard_id, state, principal, idem_key, request_hash, journal, expires_at, created_at, "
    "resolved_at, resolve_hash, posted_journal_id"
)


async def add_pending(conn: asyncpg.Connection, deltas: list[PendingDelta]) -> None:
    """Add summed pending deltas, one per (account, currency), in key order (no deadlocks)."""
    if not deltas:
        return
    rows = sorted(deltas)
    check(len({(d[0], d[1]) for d in rows}) == len(rows), "one pending delta per (account, currency)")
    if all(d[3] >= 0 and d[4] >= 0 for d in rows):
        await conn.execute(_UPSERT_PENDING, *([d[i] for d in rows] for i in range(5)))
        return
    check(all(d[3] <= 0 and d[4] <= 0 for d in rows), "pending deltas either all add or all release")
    status = await conn.execute(_RELEASE_PENDING, *([d[i] for d in rows] for i in (0, 1, 3, 4)))
    check(status == f"UPDATE {len(rows)}", f"released pending of missing balances: {status}")


async def insert_hold(
    conn: asyncpg.Connection,
    hold: tuple[str, int, str, str | None, bytes, bytes, datetime | None, datetime],
    lines: list[HoldLine],
) -> None:
    """Insert a pending hold (hold_id, shard_id, principal, idem_key, request_hash, journal,
    expires_at, created_at) and its lines."""
    await conn.execute(_INSERT_HOLD, *hold)
    await conn.execute(_INSERT_LINES, hold[0], *([line[i] for line in lines] for i in range(5)))


async def resolve_hold(
    conn: asyncpg.Connection,
    hold_id: str,
    state: str,
    resolved_at: datetime,
    resolve_hash: bytes | None,
    posted_journal_id: str | None,
) -> None:
    """Mark an open hold posted, voided or expired; it must be open (the shard is its only writer)."""
    done = await conn.fetchval(_RESOLVE, hold_id, state, resolved_at, resolve_hash, posted_journal_id)
    check(done == hold_id, f"hold {hold_id} was not open in the store")


async def find_holds(
    conn: asyncpg.Connection, hold_id: str, principal: str, idem_key: str | None
) -> list[asyncpg.Record]:
    """Holds with this id, or this principal's idempotency key."""
    return await conn.fetch(
        f"SELECT {HOLD_COLUMNS} FROM holds WHERE hold_id = $1 "
        "OR ($3::text IS NOT NULL AND principal = $2 AND idem_key = $3)",
        hold_id,
        principal,
        idem_key,
    )


async def hold_row(conn: asyncpg.Connection, hold_id: str) -> asyncpg.Record | None:
    """One hold, or None."""
    return await conn.fetchrow(f"SELECT {HOLD_COLUMNS} FROM holds WHERE hold_id = $1", hold_id)


async def hold_lines(conn: asyncpg.Connection, hold_id: str) -> list[asyncpg.Record]:
    """The held lines of a hold, in line order."""
    return await conn.fetch(
        "SELECT line_no, account_id, currency, side, amount FROM hold_lines "
        "WHERE hold_id = $1 ORDER BY line_no",
        hold_id,
    )


async def open_holds(conn: asyncpg.Connection, shard_id: int) -> list[asyncpg.Record]:
    """The open (pending) holds a shard owns, for its start."""
    return await conn.fetch(
        "SELECT hold_id, journal, expires_at FROM holds WHERE shard_id = $1 AND state = 'pending'", shard_id
    )


async def expired_pending(conn: asyncpg.Connection, account_id: str, now: datetime) -> list[asyncpg.Record]:
    """Per currency, the amounts of this account's holds that expired but are not swept yet."""
    return await conn.fetch(
        """
        SELECT l.currency,
               COALESCE(sum(l.amount) FILTER (WHERE l.side = 'D'), 0)::bigint AS debits,
               COALESCE(sum(l.amount) FILTER (WHERE l.side = 'C'), 0)::bigint AS credits
          FROM hold_lines l JOIN holds h ON h.hold_id = l.hold_id
         WHERE l.account_id = $1 AND h.state = 'pending' AND h.expires_at <= $2
         GROUP BY l.currency
        """,
        account_id,
        now,
    )
