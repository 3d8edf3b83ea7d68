"""Reads and small writes of the ledger tables (everything except the group commit)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import asyncpg

from ledger.invariants import check

COORDINATOR_STREAM = -1

# Plan every execution for its actual parameters. asyncpg keeps prepared statements, and
# PostgreSQL switches a prepared statement to a generic plan after five runs; a generic plan
# made while the ledger tables were still empty (sequential scans) stays in use until
# autoanalyze invalidates it, which made fresh nodes 10-30x slower for minutes.
#
# JIT off: the node's statements are short OLTP queries that never repay JIT compilation, and
# asyncpg's type introspection (run when a codec is installed on a new connection) crosses the
# JIT cost threshold and then takes ~100 ms instead of a few.
SERVER_SETTINGS = {"plan_cache_mode": "force_custom_plan", "jit": "off"}


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pool reset hook: nothing to undo (asyncpg itself still rolls back an open transaction).

    asyncpg's default reset sends `SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *;
    RESET ALL` on every release: one extra round trip per group commit and per read. The node
    never changes session state on pooled connections (no SET, LISTEN, session advisory locks
    or cursors outside a transaction; the writer locks live on dedicated connections), so
    there is nothing to reset.
    """


PG_EPOCH: Final = datetime(2000, 1, 1, tzinfo=UTC)
_MICROSECOND: Final = timedelta(microseconds=1)
_INFINITY_US: Final = 2**63 - 1


def pg_microseconds(moment: datetime) -> int:
    """A `timestamptz` as PostgreSQL stores it: microseconds since 2000-01-01 UTC.

    Writer pools (`create_pool(..., writer=True)`) take these integers wherever a `timestamptz` goes (see
    `_encode_timestamptz`); the group commit passes one per journal and per line instead of a
    datetime, which asyncpg's own encoder converts at about 1 us each (a third of a shard's
    COPY cost, measured by a 20,000-row COPY: 1.1-1.3 us per datetime, 0.2 us per integer).
    A naive datetime is local time, as asyncpg's own encoder reads it.
    """
    if moment.tzinfo is None:
        moment = moment.astimezone(UTC)
    return (moment - PG_EPOCH) // _MICROSECOND


def _encode_timestamptz(value: datetime | int) -> tuple[int]:
    return (value,) if isinstance(value, int) else (pg_microseconds(value),)


def _decode_timestamptz(value: tuple[int]) -> datetime:
    """The same aware UTC datetime asyncpg's decoder gives (infinity: datetime.max / min)."""
    (micros,) = value
    if micros == _INFINITY_US:
        return datetime.max.replace(tzinfo=UTC)
    if micros == -_INFINITY_US - 1:
        return datetime.min.replace(tzinfo=UTC)
    return PG_EPOCH + timedelta(microseconds=micros)


async def _setup_connection(conn: asyncpg.Connection) -> None:
    """Every pooled connection: `timestamptz` in its binary form (integers accepted, see above)."""
    await conn.set_type_codec(
        "timestamptz",
        schema="pg_catalog",
        encoder=_encode_timestamptz,
        decoder=_decode_timestamptz,
        format="tuple",
    )


async def create_pool(
    dsn: str, min_size: int, max_size: int, *, writer: bool = False, name: str = "ledger-node"
) -> asyncpg.Pool:
    """An asyncpg pool with the node's session settings.

    `name` is the connections' `application_name` (`ledger-api`, `ledger-shard-0`, ...): operators
    see in `pg_stat_activity` which part of the node holds a connection, and benchmarks split
    PostgreSQL's CPU by it (loadtests/cpu_meter.py).

    `writer` (the shards' and the coordinator's group-commit pools): connections also get the
    integer `timestamptz` codec. Installing a codec costs a type-introspection query per new
    connection (tens of ms, more while PostgreSQL JIT-compiles it), which is fine for the few
    long-lived writer connections and would show as latency spikes on the API's on-demand ones.
    """
    return await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        server_settings={**SERVER_SETTINGS, "application_name": name},
        reset=_keep_session,
        init=_setup_connection if writer else None,
    )


# What "the database is unreachable" looks like from asyncpg: the server closed or reset the
# connection, refused or timed out a new one, or is shutting down / starting up (class 08 and
# 57P01-57P03). A statement that fails for any of these reasons may or may not have been applied
# when it was a COMMIT; callers treat the outcome as unknown.
_CONNECTION_FAILURES: Final = (
    OSError,  # ConnectionError (refused, reset) and socket errors
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.CannotConnectNowError,
)


def is_connection_failure(exc: BaseException) -> bool:
    """True if `exc` (or what caused it) means the database connection was lost or refused."""
    seen: BaseException | None = exc
    for _ in range(8):  # follow __cause__/__context__ a few steps (wrapped errors)
        if seen is None:
            return False
        if isinstance(seen, _CONNECTION_FAILURES):
            return True
        if isinstance(seen, asyncpg.InterfaceError) and "closed" in str(seen):
            return True  # "connection is closed", "pool is closed"
        if isinstance(seen, asyncpg.exceptions.InternalClientError):
            return True  # a connection left mid-protocol by a reset ("another operation is in progress")
        seen = seen.__cause__ or seen.__context__
    return False


def writer_lock_lost(conn: asyncpg.Connection | None) -> bool:
    """True if the connection that held a writer lock is gone (the server released the lock with it).

    A writer must not write again on the strength of a lock it may no longer hold: another
    incarnation may have taken the lock and written meanwhile. Its owner re-takes the lock and
    reloads its state from PostgreSQL first (or, for an actor, restarts).
    """
    return conn is not None and conn.is_closed()


WRITER_LOCK_NAMESPACE = 0x4C4E  # "LN": first key of the per-writer advisory locks
WRITER_KEEPALIVES = {"tcp_keepalives_idle": "10", "tcp_keepalives_interval": "5", "tcp_keepalives_count": "3"}
SWITCH_LOCK_ID = -100  # second key of the slot-map switch's transaction lock (resharding)


async def hold_writer_lock(dsn: str, writer_id: int) -> asyncpg.Connection:
    """Open a connection holding the session advisory lock of one writer (a shard, or -1 for the coordinator).

    A restarted actor blocks here until the previous incarnation's session is gone, so two
    incarnations of the same single writer never overlap. The caller keeps the connection
    open for its whole life; closing it (or the process dying) releases the lock.
    """
    # If the holder's machine dies (a Ray node lost), PostgreSQL only ends its session - and frees
    # the lock for the incarnation Ray restarts elsewhere - once TCP keepalives give up: ~25 s here
    # instead of the kernel default of over two hours.
    conn = await asyncpg.connect(dsn, server_settings=WRITER_KEEPALIVES)
    try:
        await conn.execute(
            "SELECT pg_advisory_lock($1::integer, $2::integer)", WRITER_LOCK_NAMESPACE, writer_id
        )
    except BaseException:
        await conn.close()
        raise
    return conn


# -- slot map ------------------------------------------------------------------------------
async def load_slot_map(conn: asyncpg.Connection) -> dict[int, int]:
    """slot -> shard as stored (empty on a fresh database)."""
    return {r["slot"]: r["shard_id"] for r in await conn.fetch("SELECT slot, shard_id FROM slot_map")}


async def store_slot_map(conn: asyncpg.Connection, rows: Sequence[tuple[int, int]]) -> None:
    """Write a fresh slot map (the first start of a node); the shards it names become the shard set."""
    shards = sorted({shard for _, shard in rows})
    async with conn.transaction():
        await conn.executemany(
            "INSERT INTO shards (shard_id) VALUES ($1) ON CONFLICT DO NOTHING", [(s,) for s in shards]
        )
        await conn.execute(
            "INSERT INTO slot_map (slot, shard_id) SELECT * FROM unnest($1::integer[], $2::integer[])",
            [r[0] for r in rows],
            [r[1] for r in rows],
        )


async def active_shards(conn: asyncpg.Connection) -> list[int]:
    """Ids of the shards a node runs (migration 0022: not retired), ascending."""
    rows = await conn.fetch("SELECT shard_id FROM shards WHERE retired_at IS NULL ORDER BY shard_id")
    return [r[0] for r in rows]


async def known_shards(conn: asyncpg.Connection) -> list[int]:
    """Every shard id ever used, retired ones included (new ids come after them)."""
    return [r[0] for r in await conn.fetch("SELECT shard_id FROM shards ORDER BY shard_id")]


async def shard_slots(conn: asyncpg.Connection, shard_id: int) -> list[int] | None:
    """The slots the stored slot map gives a shard; None when no slot map is stored yet."""
    if not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM slot_map)"):
        return None
    rows = await conn.fetch("SELECT slot FROM slot_map WHERE shard_id = $1 ORDER BY slot", shard_id)
    return [r[0] for r in rows]


async def add_shards(conn: asyncpg.Connection, shard_ids: Sequence[int]) -> None:
    """Record new shards (owning no slots yet)."""
    await conn.executemany("INSERT INTO shards (shard_id) VALUES ($1)", [(s,) for s in shard_ids])


async def retire_shard(conn: asyncpg.Connection, shard_id: int) -> None:
    """Mark a shard retired; it must own no slot and no open hold any more."""
    async with conn.transaction():
        owned = await conn.fetchval("SELECT count(*) FROM slot_map WHERE shard_id = $1", shard_id)
        holds = await conn.fetchval(
            "SELECT count(*) FROM holds WHERE shard_id = $1 AND state = 'pending'", shard_id
        )
        check(owned == 0 and holds == 0, f"retiring shard {shard_id} with {owned} slots, {holds} open holds")
        await conn.execute("UPDATE shards SET retired_at = now() WHERE shard_id = $1", shard_id)


# A hold moves with the slots of its (non-split) accounts; one whose accounts would end up on
# two shards cannot move (holds are single-shard): the move is refused until it is posted or voided.
_HOLDS_SPANNING = """
SELECT h.hold_id FROM holds h
  JOIN hold_lines l ON l.hold_id = h.hold_id JOIN accounts a ON a.account_id = l.account_id
 WHERE h.state = 'pending' AND h.shard_id = $1 AND NOT a.split
 GROUP BY h.hold_id
HAVING bool_or(a.slot = ANY($2::integer[])) AND NOT bool_and(a.slot = ANY($2::integer[]))
 LIMIT 5
"""

_MOVE_HOLDS = """
UPDATE holds h SET shard_id = $3
 WHERE h.state = 'pending' AND h.shard_id = $1 AND EXISTS (
       SELECT 1 FROM hold_lines l JOIN accounts a ON a.account_id = l.account_id
        WHERE l.hold_id = h.hold_id AND NOT a.split AND a.slot = ANY($2::integer[]))
"""


class SlotMoveRefused(Exception):
    """The stored state forbids this slot move (open holds spanning the moving slots)."""


async def holds_spanning(conn: asyncpg.Connection, source: int, slots: Sequence[int]) -> list[str]:
    """Open holds of `source` with accounts both inside and outside `slots` (they block a move)."""
    return [r[0] for r in await conn.fetch(_HOLDS_SPANNING, source, list(slots))]


async def switch_slots(conn: asyncpg.Connection, slots: Sequence[int], source: int, target: int) -> int:
    """The durable switch of a handoff, in one transaction: the slots' rows in `slot_map`, the open
    holds on their accounts, and a `slot_moves` row. Returns how many holds moved."""
    async with conn.transaction():
        # One switch at a time, even from two front ends (-1..-3 are the coordinator, audit, signer).
        await conn.execute(
            "SELECT pg_advisory_xact_lock($1::integer, $2)", WRITER_LOCK_NAMESPACE, SWITCH_LOCK_ID
        )
        spanning = await holds_spanning(conn, source, slots)
        if spanning:
            raise SlotMoveRefused(f"open holds span the moving slots and others: {spanning}")
        updated = await conn.execute(
            "UPDATE slot_map SET shard_id = $3 WHERE slot = ANY($1::integer[]) AND shard_id = $2",
            list(slots),
            source,
            target,
        )
        check(updated == f"UPDATE {len(slots)}", f"slots {list(slots)[:5]}... not all on shard {source}")
        moved = int((await conn.execute(_MOVE_HOLDS, source, list(slots), target)).split()[-1])
        await conn.execute(
            "INSERT INTO slot_moves (slots, source, target, holds_moved) VALUES ($1, $2, $3, $4)",
            list(slots),
            source,
            target,
            moved,
        )
    return moved


# -- shard start-up ------------------------------------------------------------------------
@dataclass(slots=True)
class ChainHead:
    """The last position of a shard's hash chain."""

    seq: int
    hash: bytes | None


ACCOUNTS_QUERY = "SELECT account_id, account_type, no_negative FROM accounts WHERE slot = ANY($1::integer[])"
BALANCES_QUERY = (
    "SELECT account_id, currency, debits_posted, credits_posted, debits_pending, credits_pending "
    "FROM balances WHERE slot = ANY($1::integer[])"
)


async def load_accounts(conn: asyncpg.Connection, slots: list[int]) -> list[asyncpg.Record]:
    """Accounts (id, type, no_negative) in the given slots."""
    return await conn.fetch(ACCOUNTS_QUERY, slots)


async def load_balances(conn: asyncpg.Connection, slots: list[int]) -> list[asyncpg.Record]:
    """Stored balances in the given slots."""
    return await conn.fetch(BALANCES_QUERY, slots)


LOAD_CHUNK_ROWS = 50_000


async def stream_rows(
    conn: asyncpg.Connection, query: str, slots: list[int], chunk: int = LOAD_CHUNK_ROWS
) -> AsyncIterator[list[asyncpg.Record]]:
    """Rows of a `load_*` query in chunks of `chunk` (a server-side cursor in a transaction),
    so a shard's (re)start never holds all its records at once."""
    async with conn.transaction(readonly=True):
        cursor = await conn.cursor(query, slots)
        while rows := await cursor.fetch(chunk):
            yield rows


def stream_accounts(conn: asyncpg.Connection, slots: list[int]) -> AsyncIterator[list[asyncpg.Record]]:
    """`load_accounts` in chunks: lists of (account_id, account_type, no_negative)."""
    return stream_rows(conn, ACCOUNTS_QUERY, slots)


def stream_balances(conn: asyncpg.Connection, slots: list[int]) -> AsyncIterator[list[asyncpg.Record]]:
    """`load_balances` in chunks: lists of (account_id, currency, dp, cp, dpend, cpend)."""
    return stream_rows(conn, BALANCES_QUERY, slots)


async def load_chain_head(conn: asyncpg.Connection, shard_id: int) -> ChainHead:
    """Highest seq and its hash over the shard's journals and cross-shard links."""
    row = await conn.fetchrow(
        """
        SELECT seq, hash FROM (
            SELECT stream_seq AS seq, hash FROM journals WHERE stream_id = $1
            UNION ALL
            SELECT seq, hash FROM shard_links WHERE shard_id = $1
        ) chain ORDER BY seq DESC LIMIT 1
        """,
        shard_id,
    )
    return ChainHead(0, None) if row is None else ChainHead(row["seq"], row["hash"])


async def load_in_doubt(conn: asyncpg.Connection, shard_id: int) -> list[asyncpg.Record]:
    """Logged cross-shard transactions that may commit and that this shard has not applied.

    Rows written since migration 0023 carry no `participants` (they are the keys of the request's
    parts): the caller keeps the transactions whose request names this shard.
    """
    return await conn.fetch(
        """
        SELECT x.txid, x.state, x.request FROM xtx x
         WHERE x.state IN ('preparing', 'commit') AND (x.participants IS NULL OR $1 = ANY(x.participants))
           AND NOT EXISTS (SELECT 1 FROM shard_links l WHERE l.journal_id = x.txid AND l.shard_id = $1)
         ORDER BY x.created_at
        """,
        shard_id,
    )


# -- duplicates ----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Existing:
    """A stored journal that a new request collides with (by id or idempotency key)."""

    journal_id: str
    principal: str
    idem_key: str | None
    request_hash: bytes
    posted_at: datetime
    hash: bytes


async def find_existing(
    conn: asyncpg.Connection, journal_ids: list[str], principals: list[str], idem_keys: list[str]
) -> list[Existing]:
    """Stored journals whose id is in `journal_ids` or whose (principal, key) pair is given."""
    rows = await conn.fetch(
        """
        SELECT journal_id, principal, idem_key, request_hash, posted_at, hash FROM journals
         WHERE journal_id = ANY($1::text[])
        UNION
        SELECT j.journal_id, j.principal, j.idem_key, j.request_hash, j.posted_at, j.hash
          FROM unnest($2::text[], $3::text[]) AS k(principal, idem_key)
          JOIN journals j ON j.principal = k.principal AND j.idem_key = k.idem_key
        """,
        journal_ids,
        principals,
        idem_keys,
    )
    return [Existing(r[0], r[1], r[2], bytes(r[3]), r[4], bytes(r[5])) for r in rows]


async def journal_exists(conn: asyncpg.Connection, journal_id: str) -> bool:
    """True if a journal with this id was posted."""
    return bool(
        await conn.fetchval("SELECT EXISTS (SELECT 1 FROM journals WHERE journal_id = $1)", journal_id)
    )


# -- accounts ------------------------------------------------------------------------------
async def create_account(
    conn: asyncpg.Connection,
    account_id: str,
    account_type: str,
    slot: int,
    no_negative: bool,
    split: bool = False,
) -> tuple[bool, bool, bool]:
    """Insert an account; returns (created, stored no_negative, stored split)."""
    row = await conn.fetchrow(
        """
        WITH ins AS (
            INSERT INTO accounts (account_id, account_type, slot, no_negative, split)
            VALUES ($1, $2, $3, $4, $5)
            ON CONFLICT (account_id) DO NOTHING RETURNING no_negative, split
        )
        SELECT true AS created, no_negative, split FROM ins
        UNION ALL
        SELECT false, no_negative, split FROM accounts
         WHERE account_id = $1 AND NOT EXISTS (SELECT 1 FROM ins)
        """,
        account_id,
        account_type,
        slot,
        no_negative,
        split,
    )
    check(row is not None, f"account {account_id} neither inserted nor found")
    assert row is not None
    return bool(row["created"]), bool(row["no_negative"]), bool(row["split"])


async def split_accounts(conn: asyncpg.Connection) -> list[str]:
    """Ids of the split (hot) accounts, which every shard books (migration 0005)."""
    return [r[0] for r in await conn.fetch("SELECT account_id FROM accounts WHERE split ORDER BY account_id")]


async def account_row(conn: asyncpg.Connection, account_id: str) -> asyncpg.Record | None:
    """The account row, or None."""
    return await conn.fetchrow(
        "SELECT account_id, account_type, no_negative, split, created_at FROM accounts WHERE account_id = $1",
        account_id,
    )


async def balances_now(conn: asyncpg.Connection, account_id: str) -> list[asyncpg.Record]:
    """Current stored balances of an account, per currency."""
    return await conn.fetch(
        "SELECT currency, debits_posted, credits_posted, debits_pending, credits_pending "
        "FROM balances WHERE account_id = $1 ORDER BY currency",
        account_id,
    )


async def balances_as_of(conn: asyncpg.Connection, account_id: str, as_of: datetime) -> list[asyncpg.Record]:
    """Posted balances of an account as of a past commit time, from the journal lines."""
    return await conn.fetch(
        """
        SELECT currency,
               COALESCE(sum(amount) FILTER (WHERE side = 'D'), 0)::bigint AS debits_posted,
               COALESCE(sum(amount) FILTER (WHERE side = 'C'), 0)::bigint AS credits_posted,
               0::bigint AS debits_pending, 0::bigint AS credits_pending
          FROM journal_lines
         WHERE hashtext(account_id) = hashtext($1) AND account_id = $1 AND posted_at <= $2
         GROUP BY currency ORDER BY currency
        """,
        account_id,
        as_of,
    )


# -- journals ------------------------------------------------------------------------------
async def journal_row(conn: asyncpg.Connection, journal_id: str) -> asyncpg.Record | None:
    """A stored journal with its chain position(s)."""
    return await conn.fetchrow(
        """
        SELECT j.journal_id, j.stream_id, j.stream_seq, j.posted_at, j.hash, j.prev_hash, j.body,
               COALESCE((SELECT array_agg(ARRAY[l.shard_id::bigint, l.seq] ORDER BY l.shard_id)
                           FROM shard_links l WHERE l.journal_id = j.journal_id), '{}') AS links,
               COALESCE((SELECT array_agg(l.prev_hash ORDER BY l.shard_id)
                           FROM shard_links l WHERE l.journal_id = j.journal_id), '{}') AS link_prev
          FROM journals j WHERE j.journal_id = $1
        """,
        journal_id,
    )


async def stream_heads(
    conn: asyncpg.Connection,
    positions: dict[int, int],
    limit: int,
    from_ts: datetime | None,
    to_ts: datetime | None,
    account_id: str | None,
) -> list[asyncpg.Record]:
    """For every stream, up to `limit` journals after its cursor position, in seq order.

    The caller merges the per-stream prefixes by commit time: taking prefixes per stream is
    what makes a cursor see every committed journal exactly once. The coordinator's stream
    stops before its first cross-shard journal whose parts are not all applied yet (its
    transaction is not `done`), so a reader never passes a journal whose lines are missing.

    The account filter probes the lines index (hashtext(account_id), posted_at) with the journal's
    own `posted_at` (a line carries its journal's commit time, cross-shard parts included), so each
    probe reads only that commit's lines of the account (migration 0011); journal_lines has no
    index on journal_id (migration 0004).
    """
    streams = sorted(positions)
    return await conn.fetch(
        """
        SELECT j.stream_id, j.stream_seq, j.posted_at, j.body
          FROM unnest($1::integer[], $2::bigint[]) AS c(stream_id, after_seq)
          CROSS JOIN LATERAL (
              SELECT stream_id, stream_seq, posted_at, body FROM journals j
               WHERE j.stream_id = c.stream_id AND j.stream_seq > c.after_seq
                 AND (c.stream_id >= 0 OR j.stream_seq < COALESCE(
                        (SELECT min(o.stream_seq) FROM xtx x JOIN journals o ON o.journal_id = x.txid
                          WHERE x.state <> 'done' AND o.stream_id = -1), 9223372036854775807))
                 AND ($3::timestamptz IS NULL OR j.posted_at >= $3)
                 AND ($4::timestamptz IS NULL OR j.posted_at <= $4)
                 AND ($5::text IS NULL OR EXISTS (
                        SELECT 1 FROM journal_lines l
                         WHERE hashtext(l.account_id) = hashtext($5) AND l.account_id = $5
                           AND l.posted_at = j.posted_at AND l.journal_id = j.journal_id))
               ORDER BY j.stream_seq LIMIT $6
          ) j
         ORDER BY j.stream_id, j.stream_seq
        """,
        streams,
        [positions[s] for s in streams],
        from_ts,
        to_ts,
        account_id,
        limit,
    )


def row_dict(record: asyncpg.Record) -> dict[str, Any]:
    """A record as a plain dict."""
    return dict(record.items())


# -- signatures --------------------------------------------------------------------------
async def batch_of(conn: asyncpg.Connection, shard_id: int, seq: int) -> asyncpg.Record | None:
    """The signed batch holding a shard's chain position `seq`."""
    return await conn.fetchrow(
        "SELECT shard_id, batch_seq, first_seq, last_seq, statement, root, signature, signer_kid, log_index "
        "FROM batches WHERE shard_id = $1 AND last_seq >= $2 AND first_seq <= $2",
        shard_id,
        seq,
    )


async def chain_hashes(conn: asyncpg.Connection, shard_id: int, first_seq: int, last_seq: int) -> list[bytes]:
    """Journal hashes of a shard's chain positions first_seq..last_seq, in order."""
    rows = await conn.fetch(
        """
        SELECT seq, hash FROM (
            SELECT stream_seq AS seq, hash FROM journals
             WHERE stream_id = $1 AND stream_seq BETWEEN $2 AND $3
            UNION ALL
            SELECT seq, hash FROM shard_links WHERE shard_id = $1 AND seq BETWEEN $2 AND $3
        ) chain ORDER BY seq
        """,
        shard_id,
        first_seq,
        last_seq,
    )
    return [bytes(r["hash"]) for r in rows]


async def latest_checkpoint(conn: asyncpg.Connection) -> asyncpg.Record | None:
    """The newest signed checkpoint."""
    return await conn.fetchrow(
        "SELECT tree_size, root, statement, signature, signer_kid, signed_at FROM checkpoints "
        "ORDER BY tree_size DESC LIMIT 1"
    )


async def checkpoint_at(conn: asyncpg.Connection, tree_size: int) -> asyncpg.Record | None:
    """The checkpoint of a given tree size."""
    return await conn.fetchrow(
        "SELECT tree_size, root, statement, signature, signer_kid, signed_at FROM checkpoints "
        "WHERE tree_size = $1",
        tree_size,
    )


async def signer_keys(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    """Every published signer key, oldest first."""
    return await conn.fetch(
        "SELECT kid, algorithm, kind, pem, created_at, retired_at FROM signer_keys ORDER BY created_at, kid"
    )
