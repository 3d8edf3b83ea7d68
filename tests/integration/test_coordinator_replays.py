"""Replays and conflicts of cross-shard journals, answered without a look-up before the round.

Real PostgreSQL and two real `ShardEngine`s (no Ray). The coordinator logs every entry of a
round without looking it up first; replays are caught by the `xtx` row of their id or by the
journal row's unique keys at the decision, and answered from the store after the round.
Checked, as a client would notice: a replay gets the original answer even when the funds it
needed are gone; an Idempotency-Key replay under a new server id gets the original; a changed
body under the same id or key is IDEMPOTENCY_CONFLICT; a replay of a transaction that is not
finished yet is "retry", and the original once it is; nothing is posted twice, the coordinator
stream stays gap-free and `store.check.run_check` is clean. Also: the intent logs each item's
bytes exactly as encoding the item alone would.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest

from actors.coordinator_engine import CoordinatorEngine
from actors.messages import (
    CROSS_ITEM,
    CROSS_ITEMS,
    ENCODER,
    MSGPACK_ONE_ITEM_ARRAY,
    RAW_ITEMS,
    RESULTS,
    CrossItem,
    PostItem,
    Result,
)
from actors.shard_engine import ShardEngine
from ledger.errors import ErrorCode
from ledger.journal import JournalIn, Line, LineIn, validate_journal
from sharding.slots import SLOT_COUNT
from signer.canonical import request_hash
from store.check import run_check
from store.migrations import apply_migrations
from store.repository import COORDINATOR_STREAM
from tests.integration.test_coordinator_pipeline import HALF, PRINCIPAL, _accounts, _shard
from tests.support.databases import create_database, drop_database


class _Port:
    """A shard port that can be told to fail every COMMIT/ABORT call (a participant down)."""

    def __init__(self, engine: ShardEngine) -> None:
        self.engine = engine
        self.decide_fails = False

    async def post(self, payload: bytes) -> bytes:
        return await self.engine.post(payload)

    async def prepare(self, payload: bytes) -> bytes:
        return await self.engine.prepare(payload)

    async def decide(self, payload: bytes) -> bytes:
        if self.decide_fails:
            raise ConnectionError("shard down")
        return await self.engine.decide(payload)

    async def create_account(self, account_id: str, no_negative: bool, split: bool = False) -> bytes:
        return await self.engine.create_account(account_id, no_negative, split)

    async def hold(self, payload: bytes) -> bytes:
        return await self.engine.hold(payload)

    async def status(self) -> dict[str, Any]:
        return self.engine.status()


@pytest.fixture(scope="module")
def dsn() -> Iterator[str]:
    """A fresh migrated database, dropped at the end."""
    loop = asyncio.new_event_loop()
    url = loop.run_until_complete(create_database("ledger_replays"))
    try:

        async def migrate() -> None:
            conn = await asyncpg.connect(url)
            try:
                await apply_migrations(conn)
            finally:
                await conn.close()

        loop.run_until_complete(migrate())
        yield url
    finally:
        loop.run_until_complete(drop_database(url))
        loop.close()


def _cross(
    journal_id: str, debit: str, credit: str, amount: int, key: str | None = None, *, server_id: bool = False
) -> CrossItem:
    """A two-shard item; with `server_id` the client sent no id (the request hash says so)."""
    journal = validate_journal(
        JournalIn(
            entries=[LineIn(debit, "debit", amount, "USD"), LineIn(credit, "credit", amount, "USD")],
            journal_id=None if server_id else journal_id,
        )
    )
    parts: dict[int, tuple[Line, ...]] = {
        _shard(debit): (journal.lines[0],),
        _shard(credit): (journal.lines[1],),
    }
    return CrossItem(journal, journal_id, PRINCIPAL, key, request_hash(journal), parts)


async def _submit(coordinator: CoordinatorEngine, *items: CrossItem) -> list[Result]:
    return RESULTS.decode(await coordinator.submit(ENCODER.encode(list(items))))


async def _replay_scenario(url: str) -> None:
    engines = [
        ShardEngine(0, url, list(range(HALF)), batch_max=64),
        ShardEngine(1, url, list(range(HALF, SLOT_COUNT)), batch_max=64),
    ]
    for engine in engines:
        await engine.start()
    ports = {e.shard_id: _Port(e) for e in engines}
    coordinator = CoordinatorEngine(url, ports, decide_timeout_s=0.2, recovery_every_s=3600)
    await coordinator.start()
    (guarded,) = _accounts("asset:replay:guarded", 0, 1)
    (funder,) = _accounts("equity:replay:funder", 1, 1)
    (sink,) = _accounts("expense:replay:sink", 1, 1)
    (other,) = _accounts("expense:replay:other", 0, 1)
    try:
        (account,) = RESULTS.decode(await engines[0].create_account(guarded, True))
        assert account.ok, account
        (funded,) = await _submit(coordinator, _cross("fund", guarded, funder, 100))
        assert funded.ok, funded
        # Spend all of it, with an idempotency key and a server id.
        spend = _cross("srv-1", sink, guarded, 100, "k-spend", server_id=True)
        (original,) = await _submit(coordinator, spend)
        assert original.ok and original.posted_at, original

        # The funds are gone: an exact replay, or the same key under a new server id (which the
        # book refuses: INSUFFICIENT_FUNDS), still gets the original answer.
        (replay,) = await _submit(coordinator, spend)
        (by_key,) = await _submit(coordinator, _cross("srv-2", sink, guarded, 100, "k-spend", server_id=True))
        for answer in (replay, by_key):
            assert (answer.ok, answer.journal_id, answer.posted_at, answer.hash) == (
                True, "srv-1", original.posted_at, original.hash
            ), answer  # fmt: skip

        # A key replay the book accepts collides at the decision; a new journal of the same round
        # still commits, at the next stream position.
        (paid,) = await _submit(coordinator, _cross("pay-1", other, funder, 3, "k-pay", server_id=True))
        assert paid.ok, paid
        fresh = _cross("fresh-1", other, funder, 7)
        again, new = await _submit(
            coordinator, _cross("pay-2", other, funder, 3, "k-pay", server_id=True), fresh
        )
        assert (again.ok, again.journal_id, again.posted_at) == (True, "pay-1", paid.posted_at), again
        assert new.ok, new

        # Changed bodies under the same id, or the same key: conflicts naming the stored journal.
        same_id = _cross("srv-1", sink, guarded, 50, server_id=True)
        same_key = _cross("srv-3", sink, guarded, 60, "k-spend", server_id=True)
        conflicts = await _submit(coordinator, same_id, same_key)
        for answer in conflicts:
            assert answer.code == ErrorCode.IDEMPOTENCY_CONFLICT, answer
            assert answer.details == {"journal_id": "srv-1"}, answer

        # The id of a single-shard journal, reused for a cross-shard one: a conflict.
        local = validate_journal(
            JournalIn(
                entries=[LineIn(sink, "debit", 5, "USD"), LineIn(funder, "credit", 5, "USD")],
                journal_id="local-1",
            )
        )
        post = PostItem(local, "local-1", PRINCIPAL, None, request_hash(local))
        (posted,) = RESULTS.decode(await engines[1].post(ENCODER.encode([post])))
        assert posted.ok, posted
        (clash,) = await _submit(coordinator, _cross("local-1", other, funder, 5))
        assert clash.code == ErrorCode.IDEMPOTENCY_CONFLICT, clash

        await _unfinished(coordinator, ports[1], other, funder)
    finally:
        await coordinator.close()
        for engine in engines:
            await engine.close()
    await _check_store(url, guarded)


async def _unfinished(coordinator: CoordinatorEngine, port: _Port, debit: str, credit: str) -> None:
    """A committed transaction that a participant has not acknowledged: replays are told to retry."""
    port.decide_fails = True
    item = _cross("doubt-1", debit, credit, 9, "k-doubt", server_id=True)
    (first,) = await _submit(coordinator, item)
    assert first.code == ErrorCode.SERVICE_UNAVAILABLE, first  # committed, a participant is recovering
    twin = _cross("doubt-2", debit, credit, 9, "k-doubt", server_id=True)
    for answer in (*await _submit(coordinator, item), *await _submit(coordinator, twin)):
        assert answer.code == ErrorCode.SERVICE_UNAVAILABLE, answer
        assert answer.details == {"retryable": True}, answer
    port.decide_fails = False
    assert await coordinator.recover() >= 1
    for answer in (*await _submit(coordinator, item), *await _submit(coordinator, twin)):
        assert (answer.ok, answer.journal_id) == (True, "doubt-1"), answer


async def _check_store(url: str, guarded: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        ids = [r[0] for r in await conn.fetch("SELECT journal_id FROM journals ORDER BY journal_id")]
        assert ids == ["doubt-1", "fresh-1", "fund", "local-1", "pay-1", "srv-1"], ids
        lines = await conn.fetchval("SELECT count(*) FROM journal_lines")
        assert lines == 2 * len(ids)
        balance = await conn.fetchval(
            "SELECT debits_posted - credits_posted FROM balances WHERE account_id = $1", guarded
        )
        assert balance == 0
        seqs = [
            r[0]
            for r in await conn.fetch(
                "SELECT stream_seq FROM journals WHERE stream_id = $1 ORDER BY stream_seq", COORDINATOR_STREAM
            )
        ]
        assert seqs == list(range(1, len(seqs) + 1)), f"coordinator stream positions have gaps: {seqs}"
        assert not await conn.fetchval("SELECT count(*) FROM xtx WHERE state <> 'done'")
        problems = await run_check(conn)
        assert not problems, [str(p) for p in problems[:10]]
    finally:
        await conn.close()


def test_replays_and_conflicts_get_the_stored_answer(dsn: str) -> None:
    """Replays by id or key get the original (funds gone or not), conflicts 409, unfinished ones retry."""
    asyncio.run(_replay_scenario(dsn))


def test_logged_request_is_the_item_encoded_alone(dsn: str) -> None:
    """The intent stores each item's own bytes: identical to `ENCODER.encode([item])`, decodable alike.

    A participant refuses every decision, so the committed transactions stay in the log (a finished
    one leaves it) and the recovery pass then finishes them from those bytes alone."""
    rng = random.Random(7)
    debits = _accounts("revenue:raw:r", 0, 4)
    credits = _accounts("asset:raw:a", 1, 4)
    items = [
        _cross(f"raw-{n}", rng.choice(debits), rng.choice(credits), rng.randint(1, 2**40), key)
        for n, key in enumerate([None, "k-raw-1", None, "k-raw-" + "x" * 300])
    ]
    raws = RAW_ITEMS.decode(ENCODER.encode(items))
    for item, raw in zip(items, raws, strict=True):
        assert CROSS_ITEM.decode(raw) == item
        assert MSGPACK_ONE_ITEM_ARRAY + raw == ENCODER.encode([item])

    async def scenario() -> dict[str, bytes]:
        engines = [
            ShardEngine(0, dsn, list(range(HALF)), batch_max=64),
            ShardEngine(1, dsn, list(range(HALF, SLOT_COUNT)), batch_max=64),
        ]
        for engine in engines:
            await engine.start()
        ports = {e.shard_id: _Port(e) for e in engines}
        ports[1].decide_fails = True
        coordinator = CoordinatorEngine(dsn, ports, decide_timeout_s=0.2, recovery_every_s=3600)
        await coordinator.start()
        conn = await asyncpg.connect(dsn)
        try:
            results = await _submit(coordinator, *items)
            assert all(r.code == ErrorCode.SERVICE_UNAVAILABLE for r in results), results
            rows = await conn.fetch(
                "SELECT txid, request FROM xtx WHERE txid = ANY($1::text[])", [i.journal_id for i in items]
            )
            ports[1].decide_fails = False
            assert await coordinator.recover() == len(items)
            assert await conn.fetchval("SELECT count(*) FROM xtx") == 0
            assert all(r.ok for r in await _submit(coordinator, *items))  # replays of committed ones
        finally:
            await conn.close()
            await coordinator.close()
            for engine in engines:
                await engine.close()
        return {r[0]: bytes(r[1]) for r in rows}

    stored = asyncio.run(scenario())
    for item in items:
        assert stored[item.journal_id] == ENCODER.encode([item])
        assert CROSS_ITEMS.decode(stored[item.journal_id]) == [item]
