"""Migrations on the shared PostgreSQL 15 and an embedded PostgreSQL 18, plus the 0001 ledger invariants."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import pathlib
import shutil
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from typing import TypeVar

import asyncpg
import pytest

from store import repository
from store.check import run_check
from store.embedded import FALLBACK_ROOT, EmbeddedPostgres
from store.migrations import Migration, MigrationError, applied_versions, apply_migrations, load_migrations
from store.writer import BatchRows, DuplicateJournals, commit_batch
from tests.support.databases import SHARED_ADMIN_DSN, create_database, drop_database

T = TypeVar("T")
CORE_TABLES = {
    "shards",
    "slot_map",
    "accounts",
    "balances",
    "journals",
    "journal_lines",
    "shard_links",
    "xtx",
}


@pytest.fixture(scope="module")
def embedded_admin_dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One embedded PostgreSQL 18 for the module; yields the superuser DSN of its ``ledger`` database."""
    pg = EmbeddedPostgres(tmp_path_factory.mktemp("embedded") / "node")
    try:
        yield pg.start()
    finally:
        pg.stop()
        base = pg.cluster_dir.parent
        if base.parent == FALLBACK_ROOT:
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(params=["shared-pg15", "embedded-pg18"])
def admin_dsn(request: pytest.FixtureRequest) -> str:
    """The admin DSN of the server under test (parametrised over both servers)."""
    if request.param == "shared-pg15":
        return SHARED_ADMIN_DSN
    dsn: str = request.getfixturevalue("embedded_admin_dsn")
    return dsn


def on_fresh_database(admin_dsn: str, body: Callable[[asyncpg.Connection, str], Awaitable[T]]) -> T:
    """Run ``body(conn, dsn)`` against a new empty database on ``admin_dsn``'s server, then drop it."""

    async def run() -> T:
        dsn = await create_database("ledger_test_mig", admin_dsn=admin_dsn)
        try:
            conn = await asyncpg.connect(dsn)
            try:
                return await body(conn, dsn)
            finally:
                await conn.close()
        finally:
            await drop_database(dsn, admin_dsn=admin_dsn)

    return asyncio.run(run())


def _write(directory: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
    """Write migration files into ``directory`` and return it."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, sql in files.items():
        (directory / name).write_text(sql, encoding="utf-8")
    return directory


def test_load_packaged_migrations() -> None:
    """The packaged migrations start at 0001_ledger_core and carry the sha256 of their bytes."""
    migrations = load_migrations()
    assert [m.version for m in migrations] == list(range(1, len(migrations) + 1))
    first = migrations[0]
    assert (first.version, first.name) == (1, "ledger_core")
    raw = (pathlib.Path(__file__).parents[2] / "store" / "migrations" / "0001_ledger_core.sql").read_bytes()
    assert first.checksum == hashlib.sha256(raw).hexdigest()


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"0001_a.sql": "", "0001_b.sql": ""}, "duplicate"),
        ({"1_a.sql": ""}, "malformed"),
        ({"0001_A-b.sql": ""}, "malformed"),
        ({"0000_zero.sql": ""}, "malformed"),
        ({"0001_a.sql": "", "0003_c.sql": ""}, "missing"),
    ],
)
def test_load_rejects_bad_sets(tmp_path: pathlib.Path, files: dict[str, str], message: str) -> None:
    """Duplicate versions, malformed names and gaps are refused when loading."""
    with pytest.raises(MigrationError, match=message):
        load_migrations(_write(tmp_path, files))


def test_all_migrations_apply_and_reapply_is_noop(admin_dsn: str) -> None:
    """All migrations apply to an empty database; a second run applies nothing."""
    migrations = load_migrations()

    async def body(conn: asyncpg.Connection, dsn: str) -> None:
        assert await applied_versions(conn) == {}
        assert await apply_migrations(conn) == [m.version for m in migrations]
        assert await applied_versions(conn) == {m.version: m.checksum for m in migrations}
        assert await apply_migrations(conn) == []
        tables = {r["tablename"] for r in await conn.fetch("SELECT tablename FROM pg_tables")}
        assert CORE_TABLES | {"schema_migrations"} <= tables

    on_fresh_database(admin_dsn, body)


def test_server_versions(admin_dsn: str) -> None:
    """The shared server is PostgreSQL 15 and the embedded one PostgreSQL 18."""

    async def body(conn: asyncpg.Connection, dsn: str) -> int:
        return int(await conn.fetchval("SHOW server_version_num")) // 10000

    major = on_fresh_database(admin_dsn, body)
    assert major == (18 if admin_dsn != SHARED_ADMIN_DSN else 15)


def test_changed_checksum_is_refused(admin_dsn: str) -> None:
    """An applied migration whose file changed stops apply_migrations, naming the migration."""
    migrations = load_migrations()
    edited = dataclasses.replace(migrations[0], sql=migrations[0].sql + "\n-- edited\n", checksum="0" * 64)

    async def body(conn: asyncpg.Connection, dsn: str) -> None:
        await apply_migrations(conn)
        with pytest.raises(MigrationError, match="0001_ledger_core"):
            await apply_migrations(conn, [edited, *migrations[1:]])

    on_fresh_database(admin_dsn, body)


def test_unknown_and_gap_in_history_are_refused(admin_dsn: str, tmp_path: pathlib.Path) -> None:
    """An applied version the code lacks, or a hole in the applied versions, is refused."""
    files = {"0001_a.sql": "CREATE TABLE a (x int);", "0002_b.sql": "CREATE TABLE b (x int);"}
    both = load_migrations(_write(tmp_path, files))

    async def body(conn: asyncpg.Connection, dsn: str) -> None:
        assert await apply_migrations(conn, both) == [1, 2]
        with pytest.raises(MigrationError, match="unknown"):
            await apply_migrations(conn, both[:1])
        await conn.execute("DELETE FROM schema_migrations WHERE version = 1")
        with pytest.raises(MigrationError, match="gap"):
            await apply_migrations(conn, both)

    on_fresh_database(admin_dsn, body)


def test_failed_migration_rolls_back_with_its_row(admin_dsn: str, tmp_path: pathlib.Path) -> None:
    """A failing migration leaves neither partial schema nor a schema_migrations row; earlier ones stay."""
    files = {"0001_a.sql": "CREATE TABLE a (x int);", "0002_bad.sql": "CREATE TABLE b (x int); SELECT 1/0;"}
    migrations = load_migrations(_write(tmp_path, files))

    async def body(conn: asyncpg.Connection, dsn: str) -> None:
        with pytest.raises(asyncpg.exceptions.DivisionByZeroError):
            await apply_migrations(conn, migrations)
        assert set(await applied_versions(conn)) == {1}
        assert await conn.fetchval("SELECT to_regclass('b')") is None

    on_fresh_database(admin_dsn, body)


def test_concurrent_appliers_apply_once(admin_dsn: str) -> None:
    """Several nodes starting together apply every migration exactly once between them."""
    migrations = load_migrations()

    async def body(conn: asyncpg.Connection, dsn: str) -> None:
        others = [await asyncpg.connect(dsn) for _ in range(3)]
        try:
            results = await asyncio.gather(*(apply_migrations(c) for c in [conn, *others]))
        finally:
            for other in others:
                await other.close()
        assert sorted(v for result in results for v in result) == [m.version for m in migrations]
        assert await conn.fetchval("SELECT count(*) FROM schema_migrations") == len(migrations)

    on_fresh_database(admin_dsn, body)


def _line(
    journal: str, no: int, account: str, side: str, amount: int, cross: bool = False
) -> tuple[object, ...]:
    """Build one journal_lines row (shard 0, USD)."""
    return (journal, no, 0, account, "USD", side, amount, cross)


async def _insert_lines(conn: asyncpg.Connection, rows: list[tuple[object, ...]]) -> None:
    """Insert ``rows`` into journal_lines in one statement (the balancing trigger is per statement)."""
    await conn.execute(
        """
        INSERT INTO journal_lines (journal_id, line_no, shard_id, account_id, currency, side, amount,
                                   posted_at, cross_shard)
        SELECT j, n, s, a, c, sd, am, now(), x
          FROM unnest($1::text[], $2::smallint[], $3::int[], $4::text[], $5::text[], $6::text[],
                      $7::bigint[], $8::bool[]) AS t(j, n, s, a, c, sd, am, x)
        """,
        *[list(col) for col in zip(*rows, strict=True)],
    )


def test_balancing_trigger(admin_dsn: str) -> None:
    """0001's trigger rejects an unbalanced single-shard journal and accepts balanced/cross-shard parts."""

    async def body(conn: asyncpg.Connection, dsn: str) -> None:
        await apply_migrations(conn)
        await conn.execute(
            "INSERT INTO accounts (account_id, account_type, slot) VALUES"
            " ('asset:cash', 'asset', 1), ('liability:customer:42', 'liability', 2)"
        )
        unbalanced = [
            _line("j-bad", 0, "asset:cash", "D", 100),
            _line("j-bad", 1, "liability:customer:42", "C", 90),
        ]
        with pytest.raises(asyncpg.exceptions.CheckViolationError, match="j-bad"):
            await _insert_lines(conn, unbalanced)
        balanced = [
            _line("j-ok", 0, "asset:cash", "D", 100),
            _line("j-ok", 1, "liability:customer:42", "C", 100),
        ]
        await _insert_lines(conn, balanced)
        await _insert_lines(conn, [_line("j-x", 0, "asset:cash", "D", 7, cross=True)])
        counts = await conn.fetch("SELECT journal_id, count(*) AS n FROM journal_lines GROUP BY 1 ORDER BY 1")
        assert [(r["journal_id"], r["n"]) for r in counts] == [("j-ok", 2), ("j-x", 1)]

    on_fresh_database(admin_dsn, body)


async def _post_by_sql(conn: asyncpg.Connection, journal_id: str, seq: int, amount: int) -> None:
    """Store a two-line single-shard journal on stream 0 with its balances, in plain SQL.

    Its hash is its id's bytes, its prev_hash the previous journal's (`old-<seq - 1>`).
    """
    await conn.execute(
        "INSERT INTO journals (journal_id, stream_id, stream_seq, posted_at, principal, idem_key,"
        " request_hash, hash, prev_hash, body) VALUES ($1, 0, $2, now(), 'service:mig', $1, '\\x00', $3, $4,"
        " '\\x02')",
        journal_id,
        seq,
        journal_id.encode(),
        f"old-{seq - 1}".encode() if seq > 1 else None,
    )
    await _insert_lines(
        conn,
        [_line(journal_id, 0, "asset:cash", "D", amount), _line(journal_id, 1, "revenue:sales", "C", amount)],
    )
    await conn.execute(
        "UPDATE balances SET debits_posted = debits_posted + $1 WHERE account_id = 'asset:cash'", amount
    )
    await conn.execute(
        "UPDATE balances SET credits_posted = credits_posted + $1 WHERE account_id = 'revenue:sales'", amount
    )


def _one_journal(journal_id: str, seq: int, amount: int, prev_hash: bytes) -> BatchRows:
    """A shard-0 batch of one two-line journal between the accounts of `_post_by_sql`."""
    rows = BatchRows(0)
    now = datetime.now(UTC)
    rows.j_id, rows.j_seq, rows.j_posted_at, rows.j_effective_at = [journal_id], [seq], [now], [None]
    rows.j_principal, rows.j_idem_key, rows.j_request_hash = ["service:mig"], [journal_id], [b"\x00"]
    rows.j_reverses, rows.j_hash, rows.j_prev_hash = [None], [journal_id.encode()], [prev_hash]
    rows.j_body = [b"\x02"]
    rows.lines = [
        (journal_id, 0, 0, "asset:cash", "USD", "D", amount, now, False),
        (journal_id, 1, 0, "revenue:sales", "USD", "C", amount, now, False),
    ]
    rows.deltas = [("asset:cash", "USD", 1, amount, 0), ("revenue:sales", "USD", 2, 0, amount)]
    # Named as accounts of the batch (they exist: ON CONFLICT DO NOTHING), so the balances go by the
    # upsert rather than migration 0024's plain UPDATE.
    rows.accounts = [("asset:cash", "asset", 1), ("revenue:sales", "revenue", 2)]
    return rows


def test_lean_writes_migration_applies_to_a_ledger_holding_data(admin_dsn: str) -> None:
    """0004 on a ledger at 0003 with journals: data kept and coherent, lines PK gone, BRIN posted_at,
    balances fillfactor 70, balancing trigger still on; 0005 after it; and, with every later
    migration applied, the writer works on the result."""

    async def body(conn: asyncpg.Connection, dsn: str) -> None:
        assert await apply_migrations(conn, load_migrations()[:3]) == [1, 2, 3]
        await conn.execute(
            "INSERT INTO accounts (account_id, account_type, slot) VALUES"
            " ('asset:cash', 'asset', 1), ('revenue:sales', 'revenue', 2);"
            "INSERT INTO balances (account_id, currency, slot) VALUES"
            " ('asset:cash', 'USD', 1), ('revenue:sales', 'USD', 2)"
        )
        for seq in range(1, 51):
            await _post_by_sql(conn, f"old-{seq}", seq, 10 * seq)
        lines_before = await conn.fetch("SELECT * FROM journal_lines ORDER BY journal_id, line_no")

        assert await apply_migrations(conn, load_migrations()[:4]) == [4]
        assert await conn.fetch("SELECT * FROM journal_lines ORDER BY journal_id, line_no") == lines_before
        assert await conn.fetchval("SELECT count(*) FROM journals") == 50
        assert await run_check(conn) == []
        constraints = {
            r[0]
            for r in await conn.fetch(
                "SELECT contype FROM pg_constraint WHERE conrelid = 'journal_lines'::regclass"
            )
        }
        assert "p" not in constraints
        indexes = {
            r["indexname"]: r["indexdef"]
            for r in await conn.fetch(
                "SELECT indexname, indexdef FROM pg_indexes WHERE tablename IN ('journals', 'journal_lines')"
            )
        }
        assert "USING brin (posted_at)" in indexes["journals_posted_at"]
        assert "journal_lines_account" in indexes
        assert await conn.fetchval("SELECT reloptions FROM pg_class WHERE relname = 'balances'") == [
            "fillfactor=70"
        ]
        with pytest.raises(asyncpg.exceptions.CheckViolationError, match="j-bad"):
            await _insert_lines(conn, [_line("j-bad", 0, "asset:cash", "D", 5)])

        # 0005 (split accounts) on the same ledger: existing accounts stay unsplit, and a split
        # account cannot be overdraft-guarded.
        assert await apply_migrations(conn, load_migrations()[:5]) == [5]
        assert await conn.fetchval("SELECT count(*) FROM accounts WHERE split") == 0
        with pytest.raises(asyncpg.exceptions.CheckViolationError, match="accounts_split_unguarded"):
            await conn.execute(
                "INSERT INTO accounts (account_id, account_type, slot, no_negative, split)"
                " VALUES ('revenue:fee', 'revenue', 3, true, true)"
            )
        assert await run_check(conn) == []

        # The later migrations on the same ledger; then today's writer (whose statements need
        # migration 0026's row types) works on it.
        await apply_migrations(conn)
        await commit_batch(conn, _one_journal("new-51", 51, 3, b"old-50"))
        with pytest.raises(DuplicateJournals) as caught:
            await commit_batch(conn, _one_journal("old-7", 52, 3, b"new-51"))
        assert caught.value.journal_ids == {"old-7"}
        assert await run_check(conn) == []
        total = await conn.fetchval("SELECT debits_posted FROM balances WHERE account_id = 'asset:cash'")
        assert total == sum(10 * s for s in range(1, 51)) + 3

    on_fresh_database(admin_dsn, body)


def test_account_hash_index_serves_account_reads(admin_dsn: str) -> None:
    """0011 on a ledger holding journals: the per-account lines index becomes
    (hashtext(account_id), posted_at); balances as of a time and the stream's account filter read
    through it (EXPLAIN names it) and answer the same as before; two accounts sharing nothing but
    the index probe never mix."""

    async def body(conn: asyncpg.Connection, dsn: str) -> None:
        assert await apply_migrations(conn, load_migrations()[:10]) == list(range(1, 11))
        await conn.execute(
            "INSERT INTO accounts (account_id, account_type, slot) VALUES"
            " ('asset:cash', 'asset', 1), ('revenue:sales', 'revenue', 2);"
            "INSERT INTO balances (account_id, currency, slot) VALUES"
            " ('asset:cash', 'USD', 1), ('revenue:sales', 'USD', 2)"
        )
        for seq in range(1, 31):
            await _post_by_sql(conn, f"old-{seq}", seq, 10 * seq)
        as_of = await conn.fetchval("SELECT max(posted_at) FROM journal_lines")
        before = await repository.balances_as_of(conn, "asset:cash", as_of)
        assert await apply_migrations(conn, load_migrations()[:11]) == [11]
        indexdef = await conn.fetchval(
            "SELECT indexdef FROM pg_indexes WHERE indexname = 'journal_lines_account'"
        )
        assert "hashtext(account_id), posted_at" in indexdef
        assert await repository.balances_as_of(conn, "asset:cash", as_of) == before
        assert before[0]["debits_posted"] == sum(10 * seq for seq in range(1, 31))
        await conn.execute("SET enable_seqscan = off")
        plan = "\n".join(
            r[0]
            for r in await conn.fetch(
                "EXPLAIN SELECT currency, sum(amount) FROM journal_lines"
                " WHERE hashtext(account_id) = hashtext($1) AND account_id = $1 AND posted_at <= $2"
                " GROUP BY currency",
                "asset:cash",
                as_of,
            )
        )
        assert "journal_lines_account" in plan
        assert await repository.balances_as_of(conn, "asset:nobody", as_of) == []
        # asset:c58178 and asset:c206068 share a hashtext value (found by grouping 300,000 ids)
        twins = ("asset:c58178", "asset:c206068")
        assert await conn.fetchval("SELECT hashtext($1) = hashtext($2)", *twins)
        await _insert_lines(
            conn,
            [_line("twin-1", 0, twins[0], "D", 7), _line("twin-1", 1, twins[1], "C", 7)],
        )
        later = await conn.fetchval("SELECT max(posted_at) FROM journal_lines")
        first = await repository.balances_as_of(conn, twins[0], later)
        second = await repository.balances_as_of(conn, twins[1], later)
        assert [(r["debits_posted"], r["credits_posted"]) for r in first] == [(7, 0)]
        assert [(r["debits_posted"], r["credits_posted"]) for r in second] == [(0, 7)]

    on_fresh_database(admin_dsn, body)


def test_apply_refuses_open_transaction(admin_dsn: str) -> None:
    """apply_migrations needs its own transactions, so an open one is refused."""

    async def body(conn: asyncpg.Connection, dsn: str) -> None:
        async with conn.transaction():
            with pytest.raises(MigrationError, match="transaction"):
                await apply_migrations(conn)

    on_fresh_database(admin_dsn, body)


def test_migration_dataclass_is_frozen() -> None:
    """Migration values are immutable."""
    migration = Migration(1, "x", "", "0" * 64)
    with pytest.raises(dataclasses.FrozenInstanceError):
        migration.version = 2  # type: ignore[misc]


def test_revenue_schedule_tables_refuse_bad_rows(admin_dsn: str) -> None:
    """Migration 0009: schedules bound periods to 1..120; an installment's k too; a journal id only
    once posted; the due index serves the recognition run's query."""

    async def body(conn: asyncpg.Connection, dsn: str) -> None:
        await apply_migrations(conn)
        await conn.execute(
            "INSERT INTO invoices (invoice_id, principal, buyer, currency, status, subtotal, tax, total,"
            " body, document_hash, request_hash) VALUES ('m9', 'svc', '{}', 'EUR', 'fulfilled', 10, 0, 10,"
            " '{}', 'h', 'h')"
        )
        insert = (
            'INSERT INTO revenue_schedules (invoice_id, method, periods, "interval", start_at, total)'
            " VALUES ('m9', 'ratable', $1, 'month', now(), 10)"
        )
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute(insert, 121)
        await conn.execute(insert, 2)
        row = (
            "INSERT INTO revenue_installments (invoice_id, k, due_at, amount, journal_id)"
            " VALUES ('m9', $1, now(), 5, $2)"
        )
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute(row, 0, None)
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute(row, 1, "m9.recognise.1")  # a journal id but not posted
        await conn.execute(row, 1, None)
        indexes = {r["indexname"] for r in await conn.fetch("SELECT indexname FROM pg_indexes")}
        assert "revenue_installments_due" in indexes

    on_fresh_database(admin_dsn, body)
