"""Holds in one shard engine on real PostgreSQL (no Ray), with a clock the test moves.

Checked: an expired hold stops counting against the overdraft guard in the very next round,
before any timer has run (the timer is off here); the store answers the expired amounts for
balance reads meanwhile; an open hold survives an engine restart (its pending amounts still
guard the balance, and it can be posted afterwards, continuing the shard's chain); `run_check`
is clean after each step.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from actors.messages import ENCODER, RESULTS, HoldItem, PostItem, Result
from actors.shard_engine import ShardEngine
from ledger.journal import Journal, JournalIn, LineIn, validate_journal
from ledger.timestamps import rfc3339
from sharding.slots import SLOT_COUNT
from signer.canonical import request_hash
from store import holds_repo
from store.check import run_check
from store.migrations import apply_migrations
from tests.support.databases import create_database, drop_database

WALLET, CASH, SHOP = "liability:he-wallet", "asset:he-cash", "liability:he-shop"
PRINCIPAL = "service:holds"


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture(scope="module")
def dsn() -> Iterator[str]:
    loop = asyncio.new_event_loop()
    name = loop.run_until_complete(create_database("ledger_holds"))

    async def migrate() -> None:
        conn = await asyncpg.connect(name)
        try:
            await apply_migrations(conn)
        finally:
            await conn.close()

    try:
        loop.run_until_complete(migrate())
        yield name
    finally:
        loop.run_until_complete(drop_database(name))
        loop.close()


def _journal(journal_id: str, debit: str, credit: str, amount: int) -> Journal:
    return validate_journal(
        JournalIn(
            entries=[LineIn(debit, "debit", amount, "USD"), LineIn(credit, "credit", amount, "USD")],
            journal_id=journal_id,
        )
    )


async def _post(engine: ShardEngine, journal_id: str, debit: str, credit: str, amount: int) -> Result:
    journal = _journal(journal_id, debit, credit, amount)
    item = PostItem(journal, journal_id, PRINCIPAL, None, request_hash(journal))
    (result,) = RESULTS.decode(await engine.post(ENCODER.encode([item])))
    return result


async def _hold(engine: ShardEngine, item: HoldItem) -> Result:
    (result,) = RESULTS.decode(await engine.hold(ENCODER.encode([item])))
    return result


async def _engine(dsn: str, clock: Clock) -> ShardEngine:
    engine = ShardEngine(0, dsn, list(range(SLOT_COUNT)), clock=clock)
    engine.expiry_every_s = 3600.0  # no timer: only the next round may expire holds
    await engine.start()
    return engine


async def _clean(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        assert await run_check(conn) == []
    finally:
        await conn.close()


def test_expiry_counts_at_once_and_holds_survive_a_restart(dsn: str) -> None:
    async def main() -> None:
        clock = Clock()
        engine = await _engine(dsn, clock)
        try:
            assert RESULTS.decode(await engine.create_account(WALLET, True))[0].ok
            assert (await _post(engine, "he-fund", CASH, WALLET, 1000)).ok
            expires = clock.now + timedelta(seconds=60)
            held = _journal("he-1", WALLET, SHOP, 800)
            made = await _hold(
                engine, HoldItem("create", "he-1", PRINCIPAL, None, b"h1", held, expires_at=rfc3339(expires))
            )
            assert made.ok and (made.details or {})["state"] == "pending"
            refused = await _post(engine, "he-spend-1", WALLET, CASH, 500)
            assert refused.code == "INSUFFICIENT_FUNDS" and (refused.details or {})["available"] == 200
            await _clean(dsn)

            clock.now = expires + timedelta(seconds=1)
            conn = await asyncpg.connect(dsn)
            try:
                assert await conn.fetchval("SELECT state FROM holds WHERE hold_id = 'he-1'") == "pending"
                expired = await holds_repo.expired_pending(conn, WALLET, clock.now)
                assert [(r["currency"], r["debits"], r["credits"]) for r in expired] == [("USD", 800, 0)]
                assert (await _post(engine, "he-spend-1", WALLET, CASH, 500)).ok  # the round expired it first
                assert await conn.fetchval("SELECT state FROM holds WHERE hold_id = 'he-1'") == "expired"
            finally:
                await conn.close()
            late = await _hold(engine, HoldItem("post", "he-1", PRINCIPAL, None, b"p", lines=held.lines))
            assert late.code == "INVALID_STATE" and (late.details or {})["current_state"] == "expired"
            await _clean(dsn)

            kept = _journal("he-2", WALLET, SHOP, 400)
            assert (await _hold(engine, HoldItem("create", "he-2", PRINCIPAL, None, b"h2", kept))).ok
            seq_before = engine.seq
        finally:
            await engine.close()

        engine = await _engine(dsn, clock)  # a restart: the book and the open holds come from PostgreSQL
        try:
            assert engine.status()["holds"] == 1 and engine.book.balance((WALLET, "USD"))[2] == 400
            refused = await _post(engine, "he-spend-2", WALLET, CASH, 200)
            assert refused.code == "INSUFFICIENT_FUNDS"
            posted = await _hold(engine, HoldItem("post", "he-2", PRINCIPAL, None, b"p2", lines=kept.lines))
            assert posted.ok and posted.hash is not None and engine.seq == seq_before + 1
            assert engine.book.balance((WALLET, "USD")) == [900, 1000, 0, 0]
            replay = await _hold(engine, HoldItem("post", "he-2", PRINCIPAL, None, b"p2", lines=kept.lines))
            assert replay.ok and replay.posted_at == posted.posted_at
            await _clean(dsn)
        finally:
            await engine.close()

    asyncio.run(main())
