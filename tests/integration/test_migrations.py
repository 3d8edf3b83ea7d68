"""Migrations on the shared PostgreSQL 15 and an embedded PostgreSQL 18, plus the 0001 ledger invariants."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import pathlib
import shutil
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

import asyncpg
import pytest

from store.embedded import FALLBACK_ROOT, EmbeddedPostgres
from store.migrations import Migration, MigrationError, applied_versions, apply_migrations, load_migrations
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
