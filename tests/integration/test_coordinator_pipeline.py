"""The coordinator with several rounds in flight, on real PostgreSQL and real shard engines (no Ray).

Two `ShardEngine`s own half the slots each; the coordinator calls them through a port that
delays PREPARE and COMMIT/ABORT by a random few milliseconds, so rounds overlap: one logs and
prepares while the one before it decides and sends its decisions. Many clients submit at once,
replays and idempotency-key twins included, while a reader follows the coordinator stream
with `repository.stream_heads`. Checked: rounds really overlapped; every journal is stored
once and answered the same way to each of its copies; the coordinator stream's positions are
gap-free and its `posted_at` never goes back; the reader, moving its cursor as a client does,
never skipped a position and never passed a journal whose lines were not all written; no
guarded balance went negative; `store.check.run_check` is clean.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import msgspec
import pytest

from actors.coordinator_engine import CoordinatorEngine
from actors.messages import ENCODER, RESULTS, CrossItem, Result
from actors.shard_engine import ShardEngine
from ledger.errors import ErrorCode
from ledger.journal import JournalIn, Line, LineIn, validate_journal
from sharding.slots import SLOT_COUNT, slot_of
from signer.canonical import request_hash
from store import repository
from store.check import run_check
from store.migrations import apply_migrations
from store.repository import COORDINATOR_STREAM
from tests.support.databases import create_database, drop_database

PRINCIPAL = "service:pipeline"
HALF = SLOT_COUNT // 2
SEED = 20_251


def _shard(account_id: str) -> int:
    return 0 if slot_of(account_id) < HALF else 1


def _accounts(prefix: str, shard: int, count: int) -> list[str]:
    found: list[str] = []
    i = 0
    while len(found) < count:
        candidate = f"{prefix}{i}"
        if _shard(candidate) == shard:
            found.append(candidate)
        i += 1
    return found


class _DelayedShard:
    """A shard port that delays every PREPARE and COMMIT/ABORT call by 0-`max_s` seconds."""

    def __init__(self, engine: ShardEngine, rng: random.Random, max_s: float) -> None:
        self.engine, self.rng, self.max_s = engine, rng, max_s

    async def post(self, payload: bytes) -> bytes:
        return await self.engine.post(payload)

    async def prepare(self, payload: bytes) -> bytes:
        await asyncio.sleep(self.rng.uniform(0, self.max_s))
        return await self.engine.prepare(payload)

    async def decide(self, payload: bytes) -> bytes:
        await asyncio.sleep(self.rng.uniform(0, self.max_s))
        return await self.engine.decide(payload)

    async def create_account(self, account_id: str, no_negative: bool, split: bool = False) -> bytes:
        return await self.engine.create_account(account_id, no_negative, split)

    async def hold(self, payload: bytes) -> bytes:
        return await self.engine.hold(payload)

    async def status(self) -> dict[str, Any]:
        return self.engine.status()


@dataclass
class _Reader:
    """Follows the coordinator stream the way a client pages it: cursor = last position seen."""

    dsn: str
    cursor: int = 0
    seen: list[int] = field(default_factory=list)
    missing_lines: list[str] = field(default_factory=list)
    holes: list[tuple[int, int]] = field(default_factory=list)
    reads: int = 0

    async def read_once(self, conn: asyncpg.Connection) -> int:
        # One snapshot for the page and its lines: a journal passed must have every line already.
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            rows = await repository.stream_heads(
                conn, {COORDINATOR_STREAM: self.cursor}, 50, None, None, None
            )
            ids = [_journal_id(r["body"]) for r in rows]
            lines = Counter(
                r[0]
                for r in await conn.fetch(
                    "SELECT journal_id FROM journal_lines WHERE journal_id = ANY($1::text[])", ids
                )
            )
            # Decisions commit in position order, so the visible positions are always 1..n.
            count, last = await conn.fetchrow(
                "SELECT count(*), COALESCE(max(stream_seq), 0) FROM journals WHERE stream_id = $1",
                COORDINATOR_STREAM,
            )
        self.reads += 1
        if count != last:
            self.holes.append((count, last))
        self.missing_lines += [i for i in ids if lines[i] != 2]
        for row in rows:
            self.seen.append(row["stream_seq"])
            self.cursor = row["stream_seq"]
        return len(rows)

    async def follow(self, stop: asyncio.Event) -> None:
        conn = await asyncpg.connect(self.dsn)
        try:
            while not stop.is_set():
                if not await self.read_once(conn):
                    await asyncio.sleep(0.002)
        finally:
            await conn.close()


def _journal_id(body: bytes) -> str:
    """The id inside a stored journal body (canonical JSON)."""
    return str(msgspec.json.decode(body)["journal_id"])


@dataclass
class _Setup:
    loop: asyncio.AbstractEventLoop
    dsn: str

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)


@pytest.fixture(scope="module")
def setup() -> Iterator[_Setup]:
    """A fresh migrated database (dropped at the end) and the event loop of the module."""
    loop = asyncio.new_event_loop()
    dsn = loop.run_until_complete(create_database("ledger_pipeline"))
    try:

        async def migrate() -> None:
            conn = await asyncpg.connect(dsn)
            try:
                await apply_migrations(conn)
            finally:
                await conn.close()

        loop.run_until_complete(migrate())
        yield _Setup(loop, dsn)
    finally:
        loop.run_until_complete(drop_database(dsn))
        loop.close()


def _item(journal_id: str, debit: str, credit: str, amount: int, idem_key: str | None = None) -> CrossItem:
    journal = validate_journal(
        JournalIn(
            entries=[LineIn(debit, "debit", amount, "USD"), LineIn(credit, "credit", amount, "USD")],
            journal_id=journal_id,
        )
    )
    parts: dict[int, tuple[Line, ...]] = {
        _shard(debit): (journal.lines[0],),
        _shard(credit): (journal.lines[1],),
    }
    return CrossItem(journal, journal_id, PRINCIPAL, idem_key, request_hash(journal), parts)


async def _started(dsn: str, rng: random.Random) -> tuple[list[ShardEngine], CoordinatorEngine]:
    engines = [
        ShardEngine(0, dsn, list(range(HALF)), batch_max=64),
        ShardEngine(1, dsn, list(range(HALF, SLOT_COUNT)), batch_max=64),
    ]
    for engine in engines:
        await engine.start()
    ports = {e.shard_id: _DelayedShard(e, rng, 0.03) for e in engines}
    coordinator = CoordinatorEngine(dsn, ports, batch_max=24, rounds_max=3, recovery_every_s=0.2)
    await coordinator.start()
    return engines, coordinator


async def _stop(engines: list[ShardEngine], coordinator: CoordinatorEngine) -> None:
    await coordinator.close()
    for engine in engines:
        await engine.close()


async def _submit(coordinator: CoordinatorEngine, items: list[CrossItem]) -> list[Result]:
    return RESULTS.decode(await coordinator.submit(ENCODER.encode(items)))


def _batches(rng: random.Random, debits: list[str], credits: list[str]) -> list[list[CrossItem]]:
    """Client batches: new journals, plus replays and key twins of journals of other batches."""
    batches: list[list[CrossItem]] = []
    made: list[CrossItem] = []
    for b in range(60):
        batch: list[CrossItem] = []
        for n in range(rng.randint(3, 12)):
            roll = rng.random()
            if made and roll < 0.15:  # exact replay (same id, same body), maybe still in flight
                original = rng.choice(made)
                batch.append(original)
                continue
            if made and roll < 0.25:  # same idempotency key, another id, same body
                original = rng.choice([m for m in made if m.idem_key] or made)
                if original.idem_key is not None:
                    twin = CrossItem(original.journal, f"twin-{b}-{n}", PRINCIPAL, original.idem_key,
                                     original.request_hash, original.parts)  # fmt: skip
                    batch.append(twin)
                    continue
            debit, credit = rng.choice(debits), rng.choice(credits)
            key = f"key-{b}-{n}" if rng.random() < 0.5 else None
            item = _item(f"pipe-{b}-{n}", debit, credit, rng.randint(1, 500), key)
            made.append(item)
            batch.append(item)
        batches.append(batch)
    return batches


async def _pipelined_scenario(dsn: str) -> None:
    rng = random.Random(SEED)
    engines, coordinator = await _started(dsn, rng)
    # Debits on revenue accounts of shard 0, credits on asset accounts of shard 1: always fundable.
    debits = _accounts("revenue:pipe:r", 0, 8)
    credits = _accounts("asset:pipe:a", 1, 8)
    reader = _Reader(dsn)
    stop = asyncio.Event()
    overlap = 0

    async def watch() -> None:
        nonlocal overlap
        while not stop.is_set():
            overlap = max(overlap, len(coordinator.rounds))
            await asyncio.sleep(0.001)

    following = asyncio.create_task(reader.follow(stop))
    watching = asyncio.create_task(watch())
    try:
        batches = _batches(rng, debits, credits)

        async def client(batch: list[CrossItem], delay_s: float) -> tuple[list[CrossItem], list[Result]]:
            await asyncio.sleep(delay_s)
            return batch, await _submit(coordinator, batch)

        answered = await asyncio.gather(*(client(b, rng.uniform(0, 0.5)) for b in batches))
        stop.set()
        await asyncio.gather(following, watching)
        conn = await asyncpg.connect(dsn)
        try:
            more = True
            while more:  # catch up with the end of the stream
                more = await reader.read_once(conn)
        finally:
            await conn.close()
    finally:
        stop.set()
        await _stop(engines, coordinator)

    assert overlap >= 2, f"rounds never overlapped (max in flight {overlap}); the test proves nothing"
    _check_answers(answered)
    await _check_store(dsn, answered, reader)


def _check_answers(answered: list[tuple[list[CrossItem], list[Result]]]) -> None:
    """Every copy of a journal (same id, or same idempotency key) got one same successful answer."""
    by_id: dict[str, set[tuple[str, str | None]]] = {}
    by_key: dict[str, set[tuple[str, str | None]]] = {}
    for batch, results in answered:
        assert len(results) == len(batch)
        for item, result in zip(batch, results, strict=True):
            assert result.ok, (item.journal_id, result)
            answer = (result.journal_id, result.posted_at)
            by_id.setdefault(item.journal_id, set()).add(answer)
            if item.idem_key is not None:
                by_key.setdefault(item.idem_key, set()).add(answer)
    assert all(len(a) == 1 for a in by_id.values() if not next(iter(a))[0].startswith("twin-"))
    assert all(len(a) == 1 for a in by_key.values()), [a for a in by_key.values() if len(a) > 1][:3]


async def _check_store(
    dsn: str, answered: list[tuple[list[CrossItem], list[Result]]], reader: _Reader
) -> None:
    ok_ids = {r.journal_id for _, results in answered for r in results if r.ok}
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT journal_id, stream_seq, posted_at FROM journals WHERE stream_id = $1 ORDER BY stream_seq",
            COORDINATOR_STREAM,
        )
        assert {r["journal_id"] for r in rows} == ok_ids
        seqs = [r["stream_seq"] for r in rows]
        assert seqs == list(range(1, len(rows) + 1)), "coordinator stream positions have gaps"
        times = [r["posted_at"] for r in rows]
        assert times == sorted(times), "coordinator stream posted_at goes back in sequence order"
        assert not await conn.fetchval("SELECT count(*) FROM xtx WHERE state <> 'done'")
        problems = await run_check(conn)
        assert not problems, [str(p) for p in problems[:10]]
    finally:
        await conn.close()
    assert reader.reads > 10
    assert not reader.holes, (
        f"a later decision was visible before an earlier one (count, max): {reader.holes[:3]}"
    )
    assert reader.seen == seqs, "the stream reader skipped or repeated a coordinator journal"
    assert not reader.missing_lines, (
        f"the reader passed journals with missing lines: {reader.missing_lines[:5]}"
    )


def test_overlapping_rounds_keep_the_stream_in_order(setup: _Setup) -> None:
    """Rounds in flight together: each journal once, stream gap-free and in time order, reader skips none."""
    setup.run(_pipelined_scenario(setup.dsn))


async def _overdraft_scenario(dsn: str) -> None:
    """Guarded account on shard 0 with 100 USD; 30 concurrent cross-shard spends of 10 each."""
    rng = random.Random(SEED + 1)
    engines, coordinator = await _started(dsn, rng)
    (guarded,) = _accounts("asset:pipe:guarded", 0, 1)
    (funder,) = _accounts("equity:pipe:funder", 1, 1)
    sinks = _accounts("expense:pipe:sink", 1, 4)
    try:
        (account,) = RESULTS.decode(await engines[0].create_account(guarded, True))
        assert account.ok, account
        (funded,) = await _submit(coordinator, [_item("fund-guarded", guarded, funder, 100)])
        assert funded.ok, funded
        spends = [_item(f"spend-{i}", rng.choice(sinks), guarded, 10) for i in range(30)]
        answered = await asyncio.gather(
            *(_submit(coordinator, spends[i : i + 3]) for i in range(0, len(spends), 3))
        )
    finally:
        await _stop(engines, coordinator)
    results = [r for batch in answered for r in batch]
    ok = [r for r in results if r.ok]
    refused = [r for r in results if not r.ok]
    assert len(ok) == 10, (len(ok), [r.code for r in refused][:5])
    assert all(r.code == ErrorCode.INSUFFICIENT_FUNDS for r in refused), {r.code for r in refused}
    conn = await asyncpg.connect(dsn)
    try:
        balance = await conn.fetchval(
            "SELECT debits_posted - credits_posted FROM balances WHERE account_id = $1", guarded
        )
        assert balance == 0
        assert not await run_check(conn)
    finally:
        await conn.close()


def test_overlapping_rounds_never_overdraw(setup: _Setup) -> None:
    """Spends of one guarded balance spread over overlapping rounds: exactly the funded ones commit."""
    setup.run(_overdraft_scenario(setup.dsn))


async def _vacuum_scenario(dsn: str) -> None:
    rng = random.Random(SEED + 1)
    engines = [
        ShardEngine(0, dsn, list(range(HALF)), batch_max=64),
        ShardEngine(1, dsn, list(range(HALF, SLOT_COUNT)), batch_max=64),
    ]
    for engine in engines:
        await engine.start()
    coordinator = CoordinatorEngine(dsn, {e.shard_id: e for e in engines}, batch_max=24, vacuum_rows=20)
    await coordinator.start()
    try:
        debits, credits = _accounts("revenue:vac:r", 0, 4), _accounts("asset:vac:a", 1, 4)
        conn = await asyncpg.connect(dsn)
        try:
            before = await conn.fetchval("SELECT vacuum_count FROM pg_stat_user_tables WHERE relname = 'xtx'")
            for round_no in range(3):  # 3 x 12 forgotten rows: one vacuum after the second call
                items = [
                    _item(f"vac-{round_no}-{n}", rng.choice(debits), rng.choice(credits), rng.randint(1, 99))
                    for n in range(12)
                ]
                assert all(r.ok for r in await _submit(coordinator, items))
            assert coordinator.vacuum_task is not None, "past vacuum_rows forgotten rows, a vacuum started"
            await coordinator.vacuum_task
            status = coordinator.status()
            assert (status["xtx_vacuums"], status["xtx_vacuum_failures"]) == (1, 0)
            assert coordinator.forgotten == 12, "the count starts over when a vacuum starts"
            assert await conn.fetchval("SELECT count(*) FROM xtx") == 0
            # The server's own record of it (statistics reach the view within a moment: bounded wait).
            for _ in range(100):
                after = await conn.fetchval(
                    "SELECT vacuum_count FROM pg_stat_user_tables WHERE relname = 'xtx'"
                )
                if after > before:
                    break
                await asyncio.sleep(0.1)
            assert after == before + 1
        finally:
            await conn.close()
    finally:
        await _stop(engines, coordinator)


def test_the_coordinator_vacuums_its_log_after_enough_finished_transactions(setup: _Setup) -> None:
    """Every finished cross-shard transaction leaves a dead `xtx` row; past `vacuum_rows` of them the
    coordinator runs VACUUM on the log in the background, so the log does not grow without bound where
    autovacuum is off or behind (this benchmark machine's PostgreSQL runs with autovacuum off).

    Tried: 36 journals in three calls with `vacuum_rows=20`: exactly one vacuum, counted in the status
    (and so in `/metrics`), seen by PostgreSQL, the log empty, the count started over.
    """
    setup.run(_vacuum_scenario(setup.dsn))
