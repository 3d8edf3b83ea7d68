"""Crashes of the coordinator around its commit record, on real PostgreSQL and real shard engines.

The decision writes nothing to `xtx`: a logged transaction committed iff its journal row is in
the coordinator stream, and a finished one leaves the log (migration 0023). Each scenario stops
a round at one step, as a crash there would, restarts what a crash would restart (a participant
shard, a fresh coordinator) and lets the recovery pass finish. Checked, as a client would
notice: a transaction stopped after its decision is applied on every participant and replays
get its answer; one stopped before it is aborted, its reserved funds come back and its id can be
posted again; while in doubt, a restarted participant keeps the funds reserved; the log ends
empty, the coordinator stream gap-free and `store.check.run_check` clean.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import asyncpg
import pytest

from actors.coordinator_engine import CoordinatorEngine
from actors.messages import ACKS, ENCODER, RESULTS, DecideItem, PostItem, Result
from actors.shard_engine import ShardEngine, StateLost
from ledger.errors import ErrorCode
from ledger.journal import JournalIn, LineIn, validate_journal
from sharding.slots import SLOT_COUNT
from signer.canonical import request_hash
from store.check import run_check
from store.repository import COORDINATOR_STREAM
from tests.integration.test_coordinator_pipeline import HALF, PRINCIPAL, _accounts, _item
from tests.support.databases import migrated_database


class _Crash(Exception):
    """Stands for the coordinator process dying at this step."""


@pytest.fixture
def dsn() -> Iterator[str]:
    """A fresh migrated database per scenario, dropped at the end."""
    with migrated_database("ledger_xrecovery") as url:
        yield url


class _Node:
    """Two shard engines (half the slots each) and a coordinator calling them directly."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.engines: list[ShardEngine] = []
        self.coordinator: CoordinatorEngine | None = None

    async def start(self) -> None:
        self.engines = [await self._shard(0), await self._shard(1)]
        await self.new_coordinator()

    async def _shard(self, shard_id: int) -> ShardEngine:
        slots = list(range(HALF)) if shard_id == 0 else list(range(HALF, SLOT_COUNT))
        engine = ShardEngine(shard_id, self.dsn, slots, batch_max=64)
        await engine.start()
        return engine

    async def restart_shard(self, shard_id: int) -> None:
        """A participant dies and comes back: its book and reservations are rebuilt from PostgreSQL."""
        await self.engines[shard_id].close()
        self.engines[shard_id] = await self._shard(shard_id)

    async def new_coordinator(self) -> CoordinatorEngine:
        """The coordinator dies (its rounds with it) and a new incarnation starts on the same log."""
        if self.coordinator is not None:
            await self.coordinator.close()
        ports: dict[int, Any] = {e.shard_id: e for e in self.engines}
        self.coordinator = CoordinatorEngine(self.dsn, ports, decide_timeout_s=0.2, recovery_every_s=3600)
        await self.coordinator.start()
        return self.coordinator

    async def submit(self, *items: Any) -> list[Result]:
        assert self.coordinator is not None
        return RESULTS.decode(await self.coordinator.submit(ENCODER.encode(list(items))))

    async def post(self, journal_id: str, debit: str, credit: str, amount: int) -> Result:
        """A single-shard journal on shard 0."""
        journal = validate_journal(
            JournalIn(
                entries=[LineIn(debit, "debit", amount, "USD"), LineIn(credit, "credit", amount, "USD")],
                journal_id=journal_id,
            )
        )
        item = PostItem(journal, journal_id, PRINCIPAL, None, request_hash(journal))
        (result,) = RESULTS.decode(await self.engines[0].post(ENCODER.encode([item])))
        return result

    async def stop(self) -> None:
        if self.coordinator is not None:
            await self.coordinator.close()
        for engine in self.engines:
            await engine.close()


async def _funded(node: _Node, tag: str) -> tuple[str, str, str]:
    """A guarded asset on shard 0 holding 100 (funded cross-shard), a sink on shard 0, a funder on 1."""
    (guarded,) = _accounts(f"asset:{tag}:guarded", 0, 1)
    (sink,) = _accounts(f"expense:{tag}:sink", 0, 1)
    (funder,) = _accounts(f"equity:{tag}:funder", 1, 1)
    (account,) = RESULTS.decode(await node.engines[0].create_account(guarded, True))
    assert account.ok, account
    (funded,) = await node.submit(_item(f"{tag}-fund", guarded, funder, 100))
    assert funded.ok, funded
    return guarded, sink, funder


async def _balance(dsn: str, account_id: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        value = await conn.fetchval(
            "SELECT debits_posted - credits_posted FROM balances WHERE account_id = $1", account_id
        )
        return int(value or 0)
    finally:
        await conn.close()


async def _check_store(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM xtx") == 0, "a finished transaction stayed logged"
        seqs = [
            r[0]
            for r in await conn.fetch(
                "SELECT stream_seq FROM journals WHERE stream_id = $1 ORDER BY stream_seq", COORDINATOR_STREAM
            )
        ]
        assert seqs == list(range(1, len(seqs) + 1)), f"coordinator stream positions have gaps: {seqs}"
        problems = await run_check(conn)
        assert not problems, [str(p) for p in problems[:10]]
    finally:
        await conn.close()


async def _stopped_in_doubt(node: _Node, tag: str, step: str) -> tuple[str, str, CoordinatorEngine]:
    """Spend a guarded account's 100 cross-shard with the coordinator dying at `step`, then restart
    the participant holding the account: it must keep the funds reserved while the outcome is open.

    Returns the guarded and funder accounts and the coordinator's next incarnation.
    """
    guarded, sink, funder = await _funded(node, tag)
    assert node.coordinator is not None

    async def crash(live: Any) -> None:
        raise _Crash(f"the coordinator died at {step}")

    setattr(node.coordinator, step, crash)
    spend = _item(f"{tag}-spend", funder, guarded, 100)  # credit: spends the 100
    (first,) = await node.submit(spend)
    assert first.code == ErrorCode.SERVICE_UNAVAILABLE, first
    # A retry while the first attempt is logged and unresolved is told to retry, not run twice
    # (its intent is skipped: by the stored-journal probe, or by the INSERT after the COPY failed).
    delattr(node.coordinator, step)
    (retry,) = await node.submit(spend)
    assert retry.code == ErrorCode.SERVICE_UNAVAILABLE and "previous attempt" in str(retry.message), retry
    await node.restart_shard(0)
    assert f"{tag}-spend" in node.engines[0].book.reservations
    blocked = await node.post(f"{tag}-other", sink, guarded, 1)
    assert blocked.code == ErrorCode.INSUFFICIENT_FUNDS, blocked
    coordinator = await node.new_coordinator()
    await coordinator.recover()  # (its start-up pass may be finishing it at the same time)
    assert not node.engines[0].book.reservations and not node.engines[1].book.reservations
    return guarded, funder, coordinator


def _on_node(dsn: str, scenario: Callable[[_Node], Awaitable[None]]) -> None:
    """Run `scenario` on a started node, stop it, then check the store."""

    async def run() -> None:
        node = _Node(dsn)
        await node.start()
        try:
            await scenario(node)
        finally:
            await node.stop()
        await _check_store(dsn)

    asyncio.run(run())


async def _crash_after_decision(node: _Node) -> None:
    guarded, funder, coordinator = await _stopped_in_doubt(node, "after", "_send_decisions")
    assert coordinator.outcomes["recovered_commit"] >= 1  # the journal row says COMMIT
    assert coordinator.outcomes["recovered_abort"] == 0
    assert await _balance(node.dsn, guarded) == 0
    assert await _balance(node.dsn, funder) == 0
    (replay,) = await node.submit(_item("after-spend", funder, guarded, 100))
    assert replay.ok and replay.journal_id == "after-spend", replay


async def _crash_before_decision(node: _Node) -> None:
    guarded, funder, coordinator = await _stopped_in_doubt(node, "before", "_decide")
    assert coordinator.outcomes["recovered_abort"] >= 1  # no journal row: presumed abort
    assert coordinator.outcomes["recovered_commit"] == 0
    assert await _balance(node.dsn, guarded) == 100  # nothing of it was applied
    # The funds are back, and the aborted id may be posted again.
    (again,) = await node.submit(_item("before-spend", funder, guarded, 100))
    assert again.ok, again
    assert await _balance(node.dsn, guarded) == 0


async def _decision_answer_lost(node: _Node) -> None:
    guarded, _sink, funder = await _funded(node, "lost")
    coordinator = node.coordinator
    assert coordinator is not None
    write = coordinator._write_decision

    async def lost(*args: Any, **kwargs: Any) -> set[str]:
        await write(*args, **kwargs)
        raise ConnectionResetError("the decision committed; its answer never came")

    coordinator._write_decision = lost  # type: ignore[method-assign]
    (first,) = await node.submit(_item("lost-spend", funder, guarded, 40))
    assert first.code == ErrorCode.SERVICE_UNAVAILABLE, first
    coordinator._write_decision = write  # type: ignore[method-assign]
    assert await coordinator.recover() == 1  # the journal row is there: COMMIT
    assert coordinator.outcomes["recovered_commit"] == 1
    assert await _balance(node.dsn, guarded) == 60
    (later,) = await node.submit(_item("lost-later", funder, guarded, 10))
    assert later.ok, later  # the next decision reloads the stream position: no gap, no clash
    assert await _balance(node.dsn, guarded) == 50


async def _resent_commits(node: _Node) -> None:
    guarded, _sink, funder = await _funded(node, "resent")
    engine = node.engines[0]
    conn = await asyncpg.connect(node.dsn)
    try:
        hashed = await conn.fetchval("SELECT hash FROM journals WHERE journal_id = 'resent-fund'")
    finally:
        await conn.close()
    # A COMMIT carries no lines: the participant applies what it reserved. Resent for a part applied
    # before (an acknowledgement lost), twice in one call, it is acknowledged and applied only once.
    resent = DecideItem("resent-fund", True, hashed, "2026-12-07T00:00:00Z")
    assert ACKS.decode(await engine.decide(ENCODER.encode([resent, resent]))) == [True, True]
    assert await _balance(node.dsn, guarded) == 100
    assert await _balance(node.dsn, funder) == -100
    # A COMMIT of a part neither reserved nor applied: the book lost what the log holds, so the
    # participant stops serving (its actor restarts and reloads its reservations from the log).
    unknown = DecideItem("never-prepared", True, hashed, "2026-12-07T00:00:00Z")
    with pytest.raises(StateLost):
        await engine.decide(ENCODER.encode([unknown]))
    assert await _balance(node.dsn, guarded) == 100


def test_resent_commits_apply_once_and_unknown_ones_stop_the_participant(dsn: str) -> None:
    """COMMITs without lines: a resent one is acknowledged, one the participant never reserved is refused."""
    _on_node(dsn, _resent_commits)


def test_crash_after_the_decision_commits_on_every_participant(dsn: str) -> None:
    """The journal row is the commit record: recovery applies it; a restarted participant kept the funds."""
    _on_node(dsn, _crash_after_decision)


def test_crash_before_the_decision_is_presumed_abort(dsn: str) -> None:
    """No journal row: recovery aborts, reservations (reloaded after a restart too) are released."""
    _on_node(dsn, _crash_before_decision)


def test_decision_with_a_lost_answer_commits(dsn: str) -> None:
    """A decision that landed although its statement failed in the client is found and finished."""
    _on_node(dsn, _decision_answer_lost)
