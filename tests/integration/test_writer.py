"""The group-commit writer on the shared PostgreSQL: journals by COPY or, for small batches, by one
statement, and what happens on a conflict.

`commit_batch` writes journal rows with COPY, which cannot skip existing rows: a replayed journal id
or idempotency key aborts the COPY, and the batch is written again with INSERT ... ON CONFLICT DO
NOTHING to name the duplicates. The shard (actors/shard_engine.py) relies on getting exactly those
ids in `DuplicateJournals` with nothing of the batch written: it answers them as replays or
conflicts and commits the rest. A client would see a replay answered wrongly, or a batch half
written, if this broke.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest

import store.writer
from store.repository import _setup_connection, pg_microseconds
from store.writer import (
    JOURNALS_UNIQUE,
    LINKS_UNIQUE,
    BatchRows,
    DuplicateJournals,
    PartsAlreadyApplied,
    _insert_journals,
    _insert_links,
    _write_batch,
    commit_batch,
)
from tests.support.databases import migrated_database

PRINCIPAL = "service:writer-test"
CASH, SALES = "asset:w-cash", "revenue:w-sales"


class SpyConnection(asyncpg.Connection):  # type: ignore[misc]
    """Counts the COPYs into `journals`, the journals INSERTs (the conflict path), balance writes and the
    one-statement group commits (`_ONE_STATEMENT`)."""

    journal_copies = 0
    journal_inserts = 0
    one_statements = 0
    balance_statements: list[str] = []  # "UPDATE" / "INSERT", in order

    async def execute(self, query: str, *args: Any, **kwargs: Any) -> str:
        if query.lstrip().startswith("WITH journal_rows AS"):
            self.one_statements += 1
        if query.split()[:3] == ["INSERT", "INTO", "balances"]:
            self.balance_statements = [*self.balance_statements, "INSERT"]
        return await super().execute(query, *args, **kwargs)

    async def fetchval(self, query: str, *args: Any, **kwargs: Any) -> Any:
        if "add_posted_deltas(" in query:
            self.balance_statements = [*self.balance_statements, "UPDATE"]
        return await super().fetchval(query, *args, **kwargs)

    async def copy_records_to_table(self, table_name: str, **kwargs: Any) -> str:
        if table_name == "journals":
            self.journal_copies += 1
        return await super().copy_records_to_table(table_name, **kwargs)

    async def fetch(self, query: str, *args: Any, **kwargs: Any) -> list[Any]:
        if query.lstrip().startswith("INSERT INTO journals"):
            self.journal_inserts += 1
        return await super().fetch(query, *args, **kwargs)


@pytest.fixture
def dsn() -> Iterator[str]:
    """A fresh migrated database with shard 0; dropped after the test."""
    with migrated_database("ledger_test_writer") as created:

        async def add_shard(conn: SpyConnection) -> None:
            await conn.execute("INSERT INTO shards (shard_id) VALUES (0)")

        on(created, add_shard)
        yield created


def on(dsn: str, body: Callable[[SpyConnection], Awaitable[None]]) -> None:
    """Run ``body`` on a spying connection to ``dsn``."""

    async def run() -> None:
        conn = await asyncpg.connect(dsn, connection_class=SpyConnection)
        try:
            await body(conn)
        finally:
            await conn.close()

    asyncio.run(run())


def batch(
    journals: list[tuple[str, int, str | None]], *, batch_seq: int | None = None, amount: int = 100
) -> BatchRows:
    """A shard-0 batch of two-line journals (id, chain seq, idempotency key): cash debit, sales credit.

    The batch creates both accounts on first use and carries their summed balance deltas.
    """
    rows = BatchRows(0)
    now = datetime.now(UTC)
    for journal_id, seq, idem_key in journals:
        rows.j_id.append(journal_id)
        rows.j_seq.append(seq)
        rows.j_posted_at.append(now)
        rows.j_effective_at.append(None)
        rows.j_principal.append(PRINCIPAL)
        rows.j_idem_key.append(idem_key)
        rows.j_request_hash.append(journal_id.encode().ljust(32, b"r"))
        rows.j_reverses.append(None)
        rows.j_hash.append(journal_id.encode().ljust(32, b"h"))
        rows.j_prev_hash.append(None)
        rows.j_body.append(b'{"journal_id":"' + journal_id.encode() + b'"}')
        rows.lines.append((journal_id, 0, 0, CASH, "USD", "D", amount, now, False))
        rows.lines.append((journal_id, 1, 0, SALES, "USD", "C", amount, now, False))
    rows.accounts = [(CASH, "asset", 1), (SALES, "revenue", 2)]
    total = amount * len(journals)
    rows.deltas = [(CASH, "USD", 1, total, 0), (SALES, "USD", 2, 0, total)]
    if batch_seq is not None:
        seqs = [seq for _, seq, _ in journals]
        rows.batch = (batch_seq, min(seqs), max(seqs), b"{}", b"root", b"sig", "kid-1", now)
    return rows


async def snapshot(conn: asyncpg.Connection) -> tuple[Any, ...]:
    """Everything a batch writes, to compare before and after a failed one."""
    return (
        [tuple(r) for r in await conn.fetch("SELECT journal_id, stream_seq FROM journals ORDER BY 1")],
        [tuple(r) for r in await conn.fetch("SELECT journal_id, line_no FROM journal_lines ORDER BY 1, 2")],
        [
            tuple(r)
            for r in await conn.fetch(
                "SELECT account_id, debits_posted, credits_posted FROM balances ORDER BY 1"
            )
        ],
        [tuple(r) for r in await conn.fetch("SELECT account_id FROM accounts ORDER BY 1")],
        [tuple(r) for r in await conn.fetch("SELECT batch_seq FROM batches ORDER BY 1")],
    )


def test_new_journals_are_written_by_copy(dsn: str) -> None:
    """A batch of new journals is one COPY into journals (no INSERT), with its lines and balances."""

    async def body(conn: SpyConnection) -> None:
        await commit_batch(conn, batch([("w-1", 1, None), ("w-2", 2, "key-2")], batch_seq=1))
        assert (conn.journal_copies, conn.journal_inserts) == (1, 0)
        journals, lines, balances, _, batches = await snapshot(conn)
        assert journals == [("w-1", 1), ("w-2", 2)]
        assert lines == [("w-1", 0), ("w-1", 1), ("w-2", 0), ("w-2", 1)]
        assert balances == [(CASH, 200, 0), (SALES, 0, 200)]
        assert batches == [(1,)]
        row = await conn.fetchrow(
            "SELECT stream_id, principal, idem_key FROM journals WHERE journal_id = 'w-2'"
        )
        assert tuple(row) == (0, PRINCIPAL, "key-2")

    on(dsn, body)


def test_balances_update_in_place_and_new_rows_are_inserted_once(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Existing balance rows are updated in place; a new (account, currency) is inserted, never doubled.

    A batch that creates accounts upserts straight away. A batch of existing accounts updates; when one
    of its (account, currency) rows is missing (a first posting in a new currency), the UPDATE rolls
    the batch back and the batch is written again with the upsert: every delta lands exactly once.
    (The transaction's path: small batches would otherwise be one statement, which upserts.)
    """
    monkeypatch.setattr(store.writer, "ONE_STATEMENT_MAX", 0)

    async def body(conn: SpyConnection) -> None:
        await commit_batch(conn, batch([("u-1", 1, None)]))
        assert conn.balance_statements == ["INSERT"], "new accounts: the upsert"
        rows = batch([("u-2", 2, None), ("u-3", 3, None)])
        rows.accounts = []
        await commit_batch(conn, rows)
        assert conn.balance_statements == ["INSERT", "UPDATE"], "existing rows: one UPDATE"
        eur = batch([("u-4", 4, None)])
        eur.accounts = []
        eur.lines = [(*line[:4], "EUR", *line[5:]) for line in eur.lines]
        eur.deltas = [*eur.deltas, (CASH, "EUR", 1, 100, 0), (SALES, "EUR", 2, 0, 100)]
        usd = batch([("u-4", 4, None)]).lines  # u-4 moves 100 EUR (lines 0, 1) and 100 USD (lines 2, 3)
        eur.lines += [(line[0], line[1] + 2, *line[2:]) for line in usd]
        await commit_batch(conn, eur)
        assert conn.balance_statements == ["INSERT", "UPDATE", "UPDATE", "INSERT"]
        stored = await conn.fetch(
            "SELECT account_id, currency, debits_posted, credits_posted FROM balances ORDER BY 1, 2"
        )
        assert [tuple(r) for r in stored] == [
            (CASH, "EUR", 100, 0), (CASH, "USD", 400, 0), (SALES, "EUR", 0, 100), (SALES, "USD", 0, 400),
        ]  # fmt: skip
        _, lines, _, _, _ = await snapshot(conn)
        assert len(lines) == 10, "the rolled-back attempt left no lines behind"

    on(dsn, body)


def test_existing_journal_id_raises_duplicates_and_writes_nothing(dsn: str) -> None:
    """A batch holding an already stored journal id: DuplicateJournals names exactly it; nothing written."""

    async def body(conn: SpyConnection) -> None:
        await commit_batch(conn, batch([("d-1", 1, None), ("d-2", 2, None)], batch_seq=1))
        before = await snapshot(conn)
        replay = batch([("d-3", 3, None), ("d-2", 4, None), ("d-4", 5, None)], batch_seq=2)
        with pytest.raises(DuplicateJournals) as caught:
            await commit_batch(conn, replay)
        assert caught.value.journal_ids == {"d-2"}
        assert (conn.journal_copies, conn.journal_inserts) == (2, 1), "COPY first, INSERT only on conflict"
        assert await snapshot(conn) == before
        # What the shard does next: the batch without the duplicate commits, by COPY again.
        await commit_batch(conn, batch([("d-3", 3, None), ("d-4", 4, None)], batch_seq=2))
        assert (conn.journal_copies, conn.journal_inserts) == (3, 1)
        journals, _, balances, _, _ = await snapshot(conn)
        assert [j for j, _ in journals] == ["d-1", "d-2", "d-3", "d-4"]
        assert balances == [(CASH, 400, 0), (SALES, 0, 400)]

    on(dsn, body)


def test_existing_idempotency_key_raises_duplicates_and_writes_nothing(dsn: str) -> None:
    """A new journal id reusing a stored (principal, idempotency key): DuplicateJournals names it."""

    async def body(conn: SpyConnection) -> None:
        await commit_batch(conn, batch([("k-1", 1, "order-7")]))
        before = await snapshot(conn)
        with pytest.raises(DuplicateJournals) as caught:
            await commit_batch(conn, batch([("k-2", 2, "order-8"), ("k-3", 3, "order-7")]))
        assert caught.value.journal_ids == {"k-3"}
        assert conn.journal_inserts == 1
        assert await snapshot(conn) == before

    on(dsn, body)


@pytest.mark.parametrize(
    ("stored", "incoming"),
    [
        pytest.param([("e-1", 1, None)], [("e-2", 2, None), ("e-1", 3, None)], id="existing-id"),
        pytest.param([("e-1", 1, "k")], [("e-2", 2, "k")], id="existing-key"),
        pytest.param([("e-1", 1, None)], [("e-2", 1, None)], id="existing-chain-position"),
        pytest.param([], [("e-1", 1, None), ("e-1", 2, None)], id="id-twice-in-batch"),
        pytest.param([("e-1", 1, "k")], [("e-1", 2, "k"), ("e-3", 3, None)], id="id-and-key"),
    ],
)
def test_copy_path_raises_what_the_insert_path_raises(
    dsn: str, stored: list[tuple[str, int, str | None]], incoming: list[tuple[str, int, str | None]]
) -> None:
    """On every kind of journals conflict, commit_batch raises the ids the INSERT-only writer raised."""

    async def body(conn: SpyConnection) -> None:
        if stored:
            await commit_batch(conn, batch(stored))
        with pytest.raises(DuplicateJournals) as legacy:
            await _write_batch(conn, batch(incoming), _insert_journals, _insert_links)
        before = await snapshot(conn)
        with pytest.raises(DuplicateJournals) as caught:
            await commit_batch(conn, batch(incoming))
        assert caught.value.journal_ids == legacy.value.journal_ids
        assert await snapshot(conn) == before

    on(dsn, body)


def test_unique_violation_elsewhere_is_not_taken_for_a_duplicate_journal(dsn: str) -> None:
    """A signed batch row that already exists is a real error: it propagates, no INSERT retry."""

    async def body(conn: SpyConnection) -> None:
        await commit_batch(conn, batch([("b-1", 1, None)], batch_seq=1))
        before = await snapshot(conn)
        with pytest.raises(asyncpg.UniqueViolationError) as caught:
            await commit_batch(conn, batch([("b-2", 2, None)], batch_seq=1))
        assert caught.value.constraint_name == "batches_pkey"
        assert conn.journal_inserts == 0
        assert await snapshot(conn) == before

    on(dsn, body)


def test_journals_unique_names_every_unique_index_of_journals(dsn: str) -> None:
    """The writer's list of journals' unique constraints matches the schema (a renamed one would leak)."""

    async def body(conn: SpyConnection) -> None:
        names = await conn.fetch(
            "SELECT i.relname FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid"
            " WHERE x.indrelid = 'journals'::regclass AND x.indisunique"
        )
        assert {r[0] for r in names} == JOURNALS_UNIQUE

    on(dsn, body)


def parts(links: list[tuple[str, int]]) -> BatchRows:
    """A shard-0 batch applying cross-shard parts (txid, chain seq): one cash debit line each."""
    rows = BatchRows(0)
    now = datetime.now(UTC)
    for txid, seq in links:
        rows.l_seq.append(seq)
        rows.l_journal_id.append(txid)
        rows.l_hash.append(txid.encode().ljust(32, b"h"))
        rows.l_prev_hash.append(None)
        rows.lines.append((txid, 0, 0, CASH, "USD", "D", 100, now, True))
    rows.accounts = [(CASH, "asset", 1)]
    rows.deltas = [(CASH, "USD", 1, 100 * len(links), 0)]
    return rows


def test_links_by_copy_and_a_part_applied_before_is_named(dsn: str) -> None:
    """Chain links go in by COPY; a resent COMMIT of an applied part is named, nothing else written.

    The shard releases the named parts' reservations and commits the rest, so a client would see a
    cross-shard journal applied twice (or a batch lost) if the COPY's conflict were misread.
    """

    async def body(conn: SpyConnection) -> None:
        await commit_batch(conn, parts([("x-1", 1), ("x-2", 2)]))
        before = await snapshot(conn)
        links = await conn.fetchval("SELECT count(*) FROM shard_links")
        with pytest.raises(PartsAlreadyApplied) as caught:
            await commit_batch(conn, parts([("x-3", 3), ("x-2", 4)]))
        assert caught.value.journal_ids == {"x-2"}
        assert await snapshot(conn) == before
        assert await conn.fetchval("SELECT count(*) FROM shard_links") == links == 2
        await commit_batch(conn, parts([("x-3", 3)]))
        stored = await conn.fetch("SELECT journal_id, seq FROM shard_links ORDER BY seq")
        assert [tuple(r) for r in stored] == [("x-1", 1), ("x-2", 2), ("x-3", 3)]
        names = await conn.fetch(
            "SELECT i.relname FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid"
            " WHERE x.indrelid = 'shard_links'::regclass AND x.indisunique AND NOT x.indisprimary"
        )
        assert {r[0] for r in names} == {LINKS_UNIQUE}

    on(dsn, body)


# -- the one-statement path: small batches of known accounts ---------------------------------------


def known(rows: BatchRows) -> BatchRows:
    """`rows` for accounts already stored (no account to create), as most group commits are."""
    rows.accounts = []
    return rows


def seed(conn: SpyConnection) -> Awaitable[None]:
    """The accounts `batch` uses, stored by a first (COPY) batch."""
    return commit_batch(conn, batch([("seed-1", 1, None)], batch_seq=1))


def test_small_batch_of_known_accounts_is_written_as_one_statement(dsn: str) -> None:
    """Every row a COPY batch writes, written by one statement: journals, lines, balances, batch row.

    Tried: a signed two-journal batch on known accounts, then an unsigned one. If the one statement
    dropped a column, a row or the balances, the stored values below would differ.
    """

    async def body(conn: SpyConnection) -> None:
        await seed(conn)
        await commit_batch(
            conn, known(batch([("s-1", 2, None), ("s-2", 3, "key-s2")], batch_seq=2, amount=7))
        )
        assert (conn.journal_copies, conn.one_statements, conn.journal_inserts) == (1, 1, 0)
        journals, lines, balances, _, batches = await snapshot(conn)
        assert journals == [("s-1", 2), ("s-2", 3), ("seed-1", 1)]
        assert lines[:4] == [("s-1", 0), ("s-1", 1), ("s-2", 0), ("s-2", 1)]
        assert balances == [(CASH, 114, 0), (SALES, 0, 114)]
        assert batches == [(1,), (2,)]
        row = await conn.fetchrow("SELECT * FROM journals WHERE journal_id = 's-2'")
        assert (row["stream_id"], row["principal"], row["idem_key"], row["effective_at"]) == (
            0,
            PRINCIPAL,
            "key-s2",
            None,
        )
        assert (row["hash"], row["prev_hash"], row["reverses"]) == (b"s-2".ljust(32, b"h"), None, None)
        assert (row["request_hash"], row["body"]) == (b"s-2".ljust(32, b"r"), b'{"journal_id":"s-2"}')
        line = await conn.fetchrow("SELECT * FROM journal_lines WHERE journal_id = 's-2' AND line_no = 1")
        assert (line["shard_id"], line["account_id"], line["currency"], line["side"], line["amount"]) == (
            0, SALES, "USD", "C", 7,
        )  # fmt: skip
        assert line["cross_shard"] is False and line["posted_at"] == row["posted_at"]
        signed = await conn.fetchrow("SELECT * FROM batches WHERE batch_seq = 2")
        assert (signed["first_seq"], signed["last_seq"], signed["signer_kid"]) == (2, 3, "kid-1")
        await commit_batch(conn, known(batch([("s-3", 4, None)])))  # unsigned: no batch row
        assert conn.one_statements == 2
        assert (await snapshot(conn))[4] == [(1,), (2,)]

    on(dsn, body)


@pytest.mark.parametrize(
    ("stored", "incoming"),
    [
        pytest.param([("e-1", 2, None)], [("e-2", 3, None), ("e-1", 4, None)], id="existing-id"),
        pytest.param([("e-1", 2, "k")], [("e-2", 3, "k")], id="existing-key"),
        pytest.param([("e-1", 2, None)], [("e-2", 2, None)], id="existing-chain-position"),
        pytest.param([], [("e-1", 2, None), ("e-1", 3, None)], id="id-twice-in-batch"),
    ],
)
def test_one_statement_conflicts_raise_what_the_insert_path_raises(
    dsn: str, stored: list[tuple[str, int, str | None]], incoming: list[tuple[str, int, str | None]]
) -> None:
    """A replayed id, key or chain position in a small batch: the same DuplicateJournals, nothing written.

    The one statement fails on the unique index, and the transaction with the INSERT names the rows.
    """

    async def body(conn: SpyConnection) -> None:
        await seed(conn)
        if stored:
            await commit_batch(conn, known(batch(stored)))
        with pytest.raises(DuplicateJournals) as legacy:
            await _write_batch(conn, known(batch(incoming)), _insert_journals, _insert_links)
        before = await snapshot(conn)
        tried = conn.one_statements
        with pytest.raises(DuplicateJournals) as caught:
            await commit_batch(conn, known(batch(incoming)))
        assert conn.one_statements == tried + 1, "the one statement was tried first"
        assert caught.value.journal_ids == legacy.value.journal_ids
        assert await snapshot(conn) == before

    on(dsn, body)


def test_one_statement_refuses_an_unbalanced_journal_and_writes_nothing(dsn: str) -> None:
    """The balancing trigger guards the one statement too: a journal whose lines do not balance is refused.

    Tried: a small batch whose second journal debits 100 and credits 99.
    """

    async def body(conn: SpyConnection) -> None:
        await seed(conn)
        before = await snapshot(conn)
        rows = known(batch([("u-1", 2, None), ("u-2", 3, None)]))
        journal_id, line_no, shard, account, currency, side, _, at, cross = rows.lines[3]
        rows.lines[3] = (journal_id, line_no, shard, account, currency, side, 99, at, cross)
        with pytest.raises(asyncpg.CheckViolationError, match="u-2 does not balance"):
            await commit_batch(conn, rows)
        assert conn.one_statements == 1
        assert await snapshot(conn) == before

    on(dsn, body)


def test_one_statement_links_and_a_part_applied_before_is_named(dsn: str) -> None:
    """Cross-shard parts in a small batch: links and lines in the one statement; a resent part named."""

    async def body(conn: SpyConnection) -> None:
        await commit_batch(conn, parts([("x-1", 1)]))  # creates the account (COPY path)
        await commit_batch(conn, known(parts([("x-2", 2), ("x-3", 3)])))
        assert conn.one_statements == 1
        stored = await conn.fetch("SELECT journal_id, seq FROM shard_links ORDER BY seq")
        assert [tuple(r) for r in stored] == [("x-1", 1), ("x-2", 2), ("x-3", 3)]
        cross = await conn.fetch("SELECT cross_shard FROM journal_lines WHERE journal_id = 'x-3'")
        assert [r[0] for r in cross] == [True]
        before = await snapshot(conn)
        with pytest.raises(PartsAlreadyApplied) as caught:
            await commit_batch(conn, known(parts([("x-4", 4), ("x-3", 5)])))
        assert caught.value.journal_ids == {"x-3"}
        assert await snapshot(conn) == before

    on(dsn, body)


def test_batches_above_the_one_statement_limit_go_by_copy(dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past `ONE_STATEMENT_MAX` journals the batch is written by COPY (cheaper per row at that size)."""
    monkeypatch.setattr(store.writer, "ONE_STATEMENT_MAX", 2)

    async def body(conn: SpyConnection) -> None:
        await seed(conn)
        await commit_batch(conn, known(batch([("l-1", 2, None), ("l-2", 3, None)])))
        assert (conn.journal_copies, conn.one_statements) == (1, 1)
        await commit_batch(conn, known(batch([("l-3", 4, None), ("l-4", 5, None), ("l-5", 6, None)])))
        assert (conn.journal_copies, conn.one_statements) == (2, 1)

    on(dsn, body)


def test_one_statement_inserts_the_balance_row_of_a_new_currency(dsn: str) -> None:
    """A small batch posting a known account's first EUR: the one statement's upsert inserts that row.

    Tried: after a USD batch, a one-journal EUR batch on the same accounts (no account to create).
    """

    async def body(conn: SpyConnection) -> None:
        await seed(conn)
        eur = known(batch([("c-1", 2, None)], amount=5))
        eur.lines = [(*line[:4], "EUR", *line[5:]) for line in eur.lines]
        eur.deltas = [
            (account, "EUR", slot, debits, credits) for account, _, slot, debits, credits in eur.deltas
        ]
        await commit_batch(conn, eur)
        assert conn.one_statements == 1
        stored = await conn.fetch(
            "SELECT account_id, currency, debits_posted, credits_posted FROM balances ORDER BY 1, 2"
        )
        assert [tuple(r) for r in stored] == [
            (CASH, "EUR", 5, 0), (CASH, "USD", 100, 0), (SALES, "EUR", 0, 5), (SALES, "USD", 0, 100),
        ]  # fmt: skip

    on(dsn, body)


@pytest.mark.parametrize("limit", [store.writer.ONE_STATEMENT_MAX, 0], ids=["statement", "copy"])
def test_both_paths_store_the_same_values(dsn: str, monkeypatch: pytest.MonkeyPatch, limit: int) -> None:
    """The one statement (rows as composite arrays, migration 0026) and COPY store identical rows.

    Tried: a signed two-journal batch as the shards pass it (posted_at as `pg_microseconds`
    integers, an effective_at, a reversal, a chained prev_hash) and one cross-shard part, by each
    path. If the statement swapped, dropped or mis-encoded a field of a row type, a value below
    would differ from what the COPY path stores.
    """
    monkeypatch.setattr(store.writer, "ONE_STATEMENT_MAX", limit)
    posted = datetime(2026, 12, 7, 21, 30, 15, 123456, tzinfo=UTC)
    effective = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)
    us = pg_microseconds(posted)

    async def body(conn: SpyConnection) -> None:
        await _setup_connection(conn)  # as the shards' writer pools: timestamptz takes integers
        await seed(conn)
        await commit_batch(conn, parts([("p-0", 2)]))  # creates the part's account (COPY path)
        rows = known(batch([("v-1", 3, "key-v1"), ("v-2", 4, None)], batch_seq=3, amount=9))
        rows.j_posted_at = [us, us]
        rows.j_effective_at = [effective, None]
        rows.j_reverses = [None, "seed-1"]
        rows.j_prev_hash = [b"p" * 32, rows.j_hash[0]]
        rows.lines = [(*line[:7], us, False) for line in rows.lines]
        link = known(parts([("x-9", 5)]))
        rows.l_seq, rows.l_journal_id, rows.l_hash, rows.l_prev_hash = (
            link.l_seq, link.l_journal_id, link.l_hash, [rows.j_hash[1]],
        )  # fmt: skip
        rows.lines += [(*line[:7], us, True) for line in link.lines]
        rows.deltas = [(CASH, "USD", 1, 18 + 100, 0), (SALES, "USD", 2, 0, 18)]
        await commit_batch(conn, rows)
        assert conn.one_statements == (1 if limit else 0)
        journals = await conn.fetch(
            "SELECT journal_id, stream_id, stream_seq, posted_at, effective_at, principal, idem_key,"
            " request_hash, reverses, hash, prev_hash, body FROM journals WHERE journal_id LIKE 'v-%'"
            " ORDER BY 1"
        )
        assert [tuple(r) for r in journals] == [
            ("v-1", 0, 3, posted, effective, PRINCIPAL, "key-v1", b"v-1".ljust(32, b"r"), None,
             b"v-1".ljust(32, b"h"), b"p" * 32, b'{"journal_id":"v-1"}'),
            ("v-2", 0, 4, posted, None, PRINCIPAL, None, b"v-2".ljust(32, b"r"), "seed-1",
             b"v-2".ljust(32, b"h"), b"v-1".ljust(32, b"h"), b'{"journal_id":"v-2"}'),
        ]  # fmt: skip
        lines = await conn.fetch(
            "SELECT journal_id, line_no, shard_id, account_id, currency, side, amount, posted_at,"
            " cross_shard FROM journal_lines WHERE journal_id IN ('v-1', 'v-2', 'x-9') ORDER BY 1, 2"
        )
        assert [tuple(r) for r in lines] == [
            ("v-1", 0, 0, CASH, "USD", "D", 9, posted, False),
            ("v-1", 1, 0, SALES, "USD", "C", 9, posted, False),
            ("v-2", 0, 0, CASH, "USD", "D", 9, posted, False),
            ("v-2", 1, 0, SALES, "USD", "C", 9, posted, False),
            *[(*line[:7], posted, True) for line in link.lines],
        ]
        stored = await conn.fetchrow("SELECT * FROM shard_links WHERE journal_id = 'x-9'")
        assert (stored["shard_id"], stored["seq"], stored["hash"], stored["prev_hash"]) == (
            0, 5, link.l_hash[0], b"v-2".ljust(32, b"h"),
        )  # fmt: skip
        signed = await conn.fetchrow("SELECT * FROM batches WHERE batch_seq = 3")
        assert (signed["first_seq"], signed["last_seq"], signed["root"], signed["signature"]) == (
            3, 4, b"root", b"sig",
        )  # fmt: skip
        # seed-1 (100), the part p-0 (100 on cash), then this batch: 2 x 9 and the part x-9 (100)
        assert (await snapshot(conn))[2] == [(CASH, 318, 0), (SALES, 0, 118)]

    on(dsn, body)
