"""The group-commit writer: one PostgreSQL transaction per shard batch.

A batch holds the new single-shard journals of one shard, the chain links and lines of
the cross-shard parts it applies, the accounts created on first use, and one summed
balance delta per (account, currency). Everything is written with array parameters
(`unnest`) or COPY, in a fixed order, so a batch costs a handful of round trips however
many journals it holds. Balances are updated once per account per batch, sorted by key,
so concurrent batches never deadlock.

Journal rows go in by COPY, which costs PostgreSQL half of an `INSERT ... ON CONFLICT DO
NOTHING RETURNING` (see `loadtests/pg_commit.py`) but has no ON CONFLICT: a journal id,
idempotency key or chain position that already exists aborts the transaction with a
unique violation on `journals`. Such batches (replays, races: rare) are then written again
with the INSERT, which skips the existing rows and tells which they are, so the caller
gets the same `DuplicateJournals` either way. The chain links of cross-shard parts go the
same way: by COPY, and a part applied before (a resent COMMIT: rare) makes the batch be
written again with the INSERT, which names it (`PartsAlreadyApplied`).

Balances go in by a plain `UPDATE ... FROM unnest` (the function `add_posted_deltas`, migration
0024), which costs PostgreSQL less than `INSERT ... ON CONFLICT DO UPDATE` (no speculative-insertion
probe, no WAL-logged tuple lock before each update; `docs/benchmarks.md`, "Eighth session") but
only updates rows that exist. A batch that creates accounts writes its balances with the upsert
straight away; any other batch whose UPDATE finds fewer rows than it has deltas (an existing
account's first posting in a currency: rare) is rolled back and written again with the upsert, so no
delta is ever applied twice or lost.

A small batch (at most `ONE_STATEMENT_MAX` journals and parts, no new accounts: the group commits
of one-journal-per-request traffic and of light load) is written instead as one statement whose
`WITH` clauses insert every row (`_ONE_STATEMENT`): one round trip where the transaction above
takes about nine (BEGIN, two COPYs of two exchanges each, the batch row, the balances, COMMIT).
A single statement is atomic without BEGIN, and its unique violations name the same constraints,
so a conflict falls back to the transaction and its INSERTs. Its balances go in by the
upsert (one statement cannot roll back and retry on a missing row). Its rows travel as arrays of
composite types (migration 0026), one element per row: asyncpg checks every array element against
the iterable ABCs in Python, so 36 column arrays cost ~40% of the writer's CPU. Measured with
`python -m loadtests.commit_paths` (docs/benchmarks.md, "Eleventh session"), per commit at 33
journals: the statement costs the writer about half of what the transaction costs, and
PostgreSQL a fifth to a third less. The two cost about the same at ~128-256 journals. At 1,000, COPY's
records are cheaper for both, hence the limit.
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

import asyncpg

from ledger.invariants import check


class DuplicateJournals(Exception):
    """Some journals of the batch already exist (id or idempotency key): the batch rolled back."""

    def __init__(self, journal_ids: set[str]) -> None:
        super().__init__(f"{len(journal_ids)} journal(s) already exist")
        self.journal_ids = journal_ids


class _NewBalanceRows(Exception):
    """The balances UPDATE found fewer rows than deltas: the batch is written again with the upsert."""


class PartsAlreadyApplied(Exception):
    """Some cross-shard parts were applied before (a resent COMMIT): the batch rolled back."""

    def __init__(self, journal_ids: set[str]) -> None:
        super().__init__(f"{len(journal_ids)} part(s) already applied")
        self.journal_ids = journal_ids


@dataclass(slots=True)
class BatchRows:
    """Rows of one group commit, as column lists ready for `unnest`."""

    shard_id: int
    # journals (single-shard, stream = this shard)
    j_id: list[str] = field(default_factory=list)
    j_seq: list[int] = field(default_factory=list)
    j_posted_at: list[datetime | int] = field(default_factory=list)  # int: `pg_microseconds`
    j_effective_at: list[datetime | None] = field(default_factory=list)
    j_principal: list[str] = field(default_factory=list)
    j_idem_key: list[str | None] = field(default_factory=list)
    j_request_hash: list[bytes] = field(default_factory=list)
    j_reverses: list[str | None] = field(default_factory=list)
    j_hash: list[bytes] = field(default_factory=list)
    j_prev_hash: list[bytes | None] = field(default_factory=list)
    j_body: list[bytes] = field(default_factory=list)
    # chain links of cross-shard parts
    l_seq: list[int] = field(default_factory=list)
    l_journal_id: list[str] = field(default_factory=list)
    l_hash: list[bytes] = field(default_factory=list)
    l_prev_hash: list[bytes | None] = field(default_factory=list)
    # lines: (journal_id, line_no, shard_id, account_id, currency, side, amount, posted_at, cross)
    lines: list[tuple[str, int, int, str, str, str, int, datetime | int, bool]] = field(default_factory=list)
    # accounts created on first use: (account_id, type, slot)
    accounts: list[tuple[str, str, int]] = field(default_factory=list)
    # summed deltas: (account_id, currency, slot, debits, credits), sorted before writing
    deltas: list[tuple[str, str, int, int, int]] = field(default_factory=list)
    # the signed batch: (batch_seq, first_seq, last_seq, statement, root, signature, kid, signed_at)
    batch: tuple[int, int, int, bytes, bytes, bytes, str, datetime] | None = None

    def journal_columns(self) -> tuple[list[Any], ...]:
        """The journal columns in `JOURNAL_COLUMNS` order, without `stream_id` (the shard's id)."""
        return (
            self.j_id, self.j_seq, self.j_posted_at, self.j_effective_at, self.j_principal, self.j_idem_key,
            self.j_request_hash, self.j_reverses, self.j_hash, self.j_prev_hash, self.j_body,
        )  # fmt: skip

    def is_empty(self) -> bool:
        """True when there is nothing to write."""
        return not (self.j_id or self.l_journal_id or self.accounts)


_INSERT_JOURNALS = """
INSERT INTO journals (journal_id, stream_id, stream_seq, posted_at, effective_at, principal, idem_key,
                      request_hash, reverses, hash, prev_hash, body)
SELECT j.id, $1, j.seq, j.posted_at, j.effective_at, j.principal, j.idem_key, j.request_hash,
       j.reverses, j.hash, j.prev_hash, j.body
  FROM unnest($2::text[], $3::bigint[], $4::timestamptz[], $5::timestamptz[], $6::text[], $7::text[],
              $8::bytea[], $9::text[], $10::bytea[], $11::bytea[], $12::bytea[])
       AS j(id, seq, posted_at, effective_at, principal, idem_key, request_hash, reverses, hash,
            prev_hash, body)
ON CONFLICT DO NOTHING
RETURNING journal_id
"""

JOURNAL_COLUMNS = (  # the column order of journal records written by COPY
    "journal_id",
    "stream_id",
    "stream_seq",
    "posted_at",
    "effective_at",
    "principal",
    "idem_key",
    "request_hash",
    "reverses",
    "hash",
    "prev_hash",
    "body",
)

# The unique constraints and indexes of `journals` (migration 0001), i.e. every conflict that
# `_INSERT_JOURNALS` skips with ON CONFLICT DO NOTHING. A COPY that violates one of them is retried
# with that INSERT; a unique violation anywhere else is a real error and propagates.
JOURNALS_UNIQUE = frozenset({"journals_pkey", "journals_stream_id_stream_seq_key", "journals_idem"})

_INSERT_LINKS = """
INSERT INTO shard_links (shard_id, seq, journal_id, hash, prev_hash)
SELECT $1, l.seq, l.journal_id, l.hash, l.prev_hash
  FROM unnest($2::bigint[], $3::text[], $4::bytea[], $5::bytea[]) AS l(seq, journal_id, hash, prev_hash)
ON CONFLICT (journal_id, shard_id) DO NOTHING
RETURNING journal_id
"""

_LINK_COLUMNS = ("shard_id", "seq", "journal_id", "hash", "prev_hash")
# UNIQUE (journal_id, shard_id) of `shard_links` (migration 0001): the part is applied already.
LINKS_UNIQUE = "shard_links_journal_id_shard_id_key"

_INSERT_ACCOUNTS = """
INSERT INTO accounts (account_id, account_type, slot)
SELECT * FROM unnest($1::text[], $2::text[], $3::integer[])
ON CONFLICT (account_id) DO NOTHING
"""

_UPSERT_BALANCES = """
INSERT INTO balances AS b (account_id, currency, slot, debits_posted, credits_posted)
SELECT * FROM unnest($1::commit_delta[])
ON CONFLICT (account_id, currency) DO UPDATE
   SET debits_posted = b.debits_posted + EXCLUDED.debits_posted,
       credits_posted = b.credits_posted + EXCLUDED.credits_posted
"""

# Every (account, currency) exists: add the deltas in place, probing balances_pkey once per delta in
# the sorted order of the array (migrations 0024 and 0026). Returns the number of rows updated.
_UPDATE_BALANCES = "SELECT add_posted_deltas($1::commit_delta[])"

_INSERT_BATCH = """
INSERT INTO batches (shard_id, batch_seq, first_seq, last_seq, statement, root, signature, signer_kid,
                     signed_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
"""

_LINE_COLUMNS = (
    "journal_id",
    "line_no",
    "shard_id",
    "account_id",
    "currency",
    "side",
    "amount",
    "posted_at",
    "cross_shard",
)


# The whole group commit as one statement (see the module docstring). The sub-statements see the
# same snapshot and none reads another's rows; the batches row goes in only when the batch is signed
# ($5 not null); the balances upsert is the main statement, its deltas sorted by key as below. Rows
# come as arrays of the composite types of migration 0026, one element per row.
_ONE_STATEMENT = """
WITH journal_rows AS (
    INSERT INTO journals (journal_id, stream_id, stream_seq, posted_at, effective_at, principal,
                          idem_key, request_hash, reverses, hash, prev_hash, body)
    SELECT * FROM unnest($1::commit_journal[])
), link_rows AS (
    INSERT INTO shard_links (shard_id, seq, journal_id, hash, prev_hash)
    SELECT * FROM unnest($2::commit_link[])
), line_rows AS (
    INSERT INTO journal_lines (journal_id, line_no, shard_id, account_id, currency, side, amount,
                               posted_at, cross_shard)
    SELECT * FROM unnest($3::commit_line[])
), batch_row AS (
    INSERT INTO batches (shard_id, batch_seq, first_seq, last_seq, statement, root, signature,
                         signer_kid, signed_at)
    SELECT $4, $5, $6, $7, $8, $9, $10, $11, $12 WHERE $5::bigint IS NOT NULL
)
INSERT INTO balances AS b (account_id, currency, slot, debits_posted, credits_posted)
SELECT * FROM unnest($13::commit_delta[])
ON CONFLICT (account_id, currency) DO UPDATE
   SET debits_posted = b.debits_posted + EXCLUDED.debits_posted,
       credits_posted = b.credits_posted + EXCLUDED.credits_posted
"""

ONE_STATEMENT_MAX = 128
"""Journals plus cross-shard parts up to which a batch is written as one statement (above it, COPY:
cheaper per row, and a few round trips more do not matter)."""

_NO_BATCH_ROW: Final = (None,) * 8


After = Callable[[asyncpg.Connection], Awaitable[None]]


async def commit_batch(conn: asyncpg.Connection, rows: BatchRows, after: After | None = None) -> None:
    """Write one batch in one transaction; raise DuplicateJournals / PartsAlreadyApplied on conflict.

    Nothing of the batch is written when either is raised. `after` (holds only, never the posting
    path) runs last inside the same transaction.
    """
    write_journals, write_links = _copy_journals, _copy_links
    if after is None and not rows.accounts and len(rows.j_id) + len(rows.l_journal_id) <= ONE_STATEMENT_MAX:
        try:
            await _write_one_statement(conn, rows)
            return
        except asyncpg.UniqueViolationError as exc:  # nothing was written: the transaction below names it
            if exc.constraint_name not in JOURNALS_UNIQUE and exc.constraint_name != LINKS_UNIQUE:
                raise
    write_balances = _upsert_balances if rows.accounts else _update_balances
    for _attempt in range(4):
        try:
            await _write_batch(conn, rows, write_journals, write_links, after, write_balances)
            return
        except _NewBalanceRows:
            check(write_balances is _update_balances, "the balance upsert reported missing rows")
            write_balances = _upsert_balances
        except asyncpg.UniqueViolationError as exc:
            # Some journal already exists (or appears twice), or a part was applied before: the COPY
            # rolled back. The INSERT finds out which, and raises DuplicateJournals / PartsAlreadyApplied.
            if exc.constraint_name in JOURNALS_UNIQUE and write_journals is _copy_journals:
                write_journals = _insert_journals
            elif exc.constraint_name == LINKS_UNIQUE and write_links is _copy_links:
                write_links = _insert_links
            else:
                raise
    check(False, "a batch written by INSERT still hit a unique violation")


async def _write_one_statement(conn: asyncpg.Connection, rows: BatchRows) -> None:
    """A small batch in one statement (`_ONE_STATEMENT`): one round trip, atomic without BEGIN."""
    await conn.execute(
        _ONE_STATEMENT, list(_journal_records(rows)), list(_link_records(rows)), rows.lines,
        rows.shard_id, *(rows.batch or _NO_BATCH_ROW), _sorted_deltas(rows),
    )  # fmt: skip


def _journal_records(rows: BatchRows) -> Iterator[tuple[Any, ...]]:
    """The journal rows as records in `JOURNAL_COLUMNS` order (COPY's records, the statement's rows)."""
    first, *rest = rows.journal_columns()
    return zip(first, itertools.repeat(rows.shard_id, len(first)), *rest, strict=True)


def _link_records(rows: BatchRows) -> Iterator[tuple[Any, ...]]:
    """The chain links as records in `_LINK_COLUMNS` order."""
    return zip(
        itertools.repeat(rows.shard_id, len(rows.l_seq)), rows.l_seq, rows.l_journal_id, rows.l_hash,
        rows.l_prev_hash, strict=True,
    )  # fmt: skip


async def _copy_journals(conn: asyncpg.Connection, rows: BatchRows) -> None:
    """The fast path: every journal row by COPY; any existing one aborts with a unique violation."""
    await conn.copy_records_to_table("journals", records=_journal_records(rows), columns=JOURNAL_COLUMNS)


async def _insert_journals(conn: asyncpg.Connection, rows: BatchRows) -> None:
    """The conflict path: insert what is new; raise DuplicateJournals naming the rows that were not."""
    inserted = await conn.fetch(_INSERT_JOURNALS, rows.shard_id, *rows.journal_columns())
    if len(inserted) != len(rows.j_id):
        raise DuplicateJournals(set(rows.j_id) - {r[0] for r in inserted})


async def _copy_links(conn: asyncpg.Connection, rows: BatchRows) -> None:
    """The fast path: every chain link by COPY; a part applied before aborts with a unique violation."""
    await conn.copy_records_to_table("shard_links", records=_link_records(rows), columns=_LINK_COLUMNS)


async def _insert_links(conn: asyncpg.Connection, rows: BatchRows) -> None:
    """The conflict path: insert the new links; raise PartsAlreadyApplied naming the parts that were not."""
    applied = await conn.fetch(
        _INSERT_LINKS, rows.shard_id, rows.l_seq, rows.l_journal_id, rows.l_hash, rows.l_prev_hash
    )
    if len(applied) != len(rows.l_journal_id):
        raise PartsAlreadyApplied(set(rows.l_journal_id) - {r[0] for r in applied})


def _sorted_deltas(rows: BatchRows) -> list[tuple[str, str, int, int, int]]:
    """The summed deltas (account_id, currency, slot, debits, credits), sorted by key (the lock order)."""
    deltas = sorted(rows.deltas)
    check(len({(d[0], d[1]) for d in deltas}) == len(deltas), "one delta per (account, currency)")
    return deltas


async def _update_balances(conn: asyncpg.Connection, rows: BatchRows) -> None:
    """The fast path: add the deltas to existing rows; raise _NewBalanceRows if a row is missing."""
    deltas = _sorted_deltas(rows)
    updated = await conn.fetchval(_UPDATE_BALANCES, deltas)
    if updated != len(deltas):
        raise _NewBalanceRows


async def _upsert_balances(conn: asyncpg.Connection, rows: BatchRows) -> None:
    """The path for new (account, currency) rows: insert them, add to the others."""
    await conn.execute(_UPSERT_BALANCES, _sorted_deltas(rows))


Write = Callable[[asyncpg.Connection, BatchRows], Awaitable[None]]


async def _write_batch(
    conn: asyncpg.Connection,
    rows: BatchRows,
    write_journals: Write,
    write_links: Write,
    after: After | None = None,
    write_balances: Write = _upsert_balances,
) -> None:
    """The batch's transaction, its journal rows, chain links and balances written by the given writers."""
    async with conn.transaction():
        if rows.accounts:
            accounts = sorted(rows.accounts)
            await conn.execute(
                _INSERT_ACCOUNTS, [a[0] for a in accounts], [a[1] for a in accounts], [a[2] for a in accounts]
            )
        if rows.j_id:
            await write_journals(conn, rows)
        if rows.l_journal_id:
            await write_links(conn, rows)
        if rows.lines:
            await conn.copy_records_to_table("journal_lines", records=rows.lines, columns=_LINE_COLUMNS)
        if rows.batch is not None:
            await conn.execute(_INSERT_BATCH, rows.shard_id, *rows.batch)
        if rows.deltas:
            await write_balances(conn, rows)
        if after is not None:
            await after(conn)
