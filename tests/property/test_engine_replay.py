"""Property test on the real PostgreSQL: a shard engine applies each distinct journal exactly once.

Hypothesis plans rounds of postings; some are exact replays of earlier ones (same journal_id
and body, or same Idempotency-Key and body) and some re-use an id or key with a different
body. One database and one engine (all 16,384 slots, no Ray) serve every example; each
example works on its own accounts, ids and keys.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.messages import ENCODER, RESULTS, PostItem, Result
from actors.shard_engine import ShardEngine
from ledger.errors import ErrorCode
from ledger.journal import Journal, JournalIn, LineIn, validate_journal
from sharding.slots import SLOT_COUNT
from signer.canonical import request_hash
from store.check import run_check
from store.migrations import apply_migrations
from tests.support.databases import create_database, drop_database

ALICE = "service:aaaaaaaaaaaa"
BOB = "service:bbbbbbbbbbbb"
ACCOUNT_KINDS = ["asset", "liability", "revenue", "expense"]
CURRENCIES = ["USD", "EUR"]

# A pair: (debit account index, credit account index, amount, currency).
Pair = tuple[int, int, int, str]


@dataclass
class Harness:
    """The event loop, database and engine shared by the module's tests."""

    loop: asyncio.AbstractEventLoop
    dsn: str
    engine: ShardEngine

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)


async def _start_engine(dsn: str) -> ShardEngine:
    engine = ShardEngine(0, dsn, list(range(SLOT_COUNT)), batch_max=64)
    await engine.start()
    return engine


@pytest.fixture(scope="module")
def harness() -> Iterator[Harness]:
    """A fresh migrated database with one running shard engine; dropped at the end."""
    loop = asyncio.new_event_loop()
    dsn = loop.run_until_complete(create_database("ledger_prop"))
    try:

        async def setup() -> ShardEngine:
            conn = await asyncpg.connect(dsn)
            try:
                await apply_migrations(conn)
            finally:
                await conn.close()
            return await _start_engine(dsn)

        h = Harness(loop, dsn, loop.run_until_complete(setup()))
        try:
            yield h
        finally:
            h.run(h.engine.close())
    finally:
        loop.run_until_complete(drop_database(dsn))
        loop.close()


# -- plans -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Op:
    """One posting of the plan.

    kind: new_id | new_key | replay | conflict | other_principal. For the last three, `ref`
    picks (modulo) one of the journals the sender could know about: those answered in earlier
    steps and those earlier in the same payload; with none, the op posts `pairs` as a new journal.
    """

    kind: str
    pairs: tuple[Pair, ...]
    ref: int = 0


pair_strategy = st.tuples(
    st.integers(0, 3), st.integers(0, 3), st.integers(1, 10**6), st.sampled_from(CURRENCIES)
).filter(lambda p: p[0] != p[1])
op_strategy = st.builds(
    Op,
    kind=st.sampled_from(["new_id", "new_key", "replay", "replay", "conflict", "other_principal"]),
    pairs=st.lists(pair_strategy, min_size=1, max_size=2).map(tuple),
    ref=st.integers(0, 63),
)
# steps of 1-2 payloads sent concurrently (they share one engine batch), each of 1-4 ops
plans = st.lists(
    st.lists(st.lists(op_strategy, min_size=1, max_size=4), min_size=1, max_size=2), min_size=1, max_size=6
)


@dataclass
class Original:
    """A journal that should be stored once, with what is needed to replay it."""

    journal: Journal
    journal_id: str
    principal: str
    idem_key: str | None
    pairs: tuple[Pair, ...]
    posted_at: str | None = None


@dataclass
class Runner:
    """Turns ops into PostItems and checks each result against the model."""

    prefix: str
    originals: list[Original] = field(default_factory=list)
    by_key: dict[tuple[str, str], Original] = field(default_factory=dict)
    counter: int = 0

    def account(self, index: int) -> str:
        return f"{ACCOUNT_KINDS[index]}:{self.prefix}.{index}"

    def fresh(self, what: str) -> str:
        self.counter += 1
        return f"{self.prefix}-{what}{self.counter}"

    def journal(self, pairs: tuple[Pair, ...], journal_id: str | None) -> Journal:
        entries: list[LineIn] = []
        for debit, credit, amount, currency in pairs:
            entries.append(LineIn(self.account(debit), "debit", amount, currency))
            entries.append(LineIn(self.account(credit), "credit", amount, currency))
        return validate_journal(JournalIn(entries=entries, journal_id=journal_id, context={"p": self.prefix}))

    def _new(
        self, journal: Journal, journal_id: str, principal: str, key: str | None, pairs: Any
    ) -> Original:
        original = Original(journal, journal_id, principal, key, pairs)
        self.originals.append(original)
        if key is not None:
            self.by_key[(principal, key)] = original
        return original

    def item(self, op: Op, known: list[Original]) -> tuple[PostItem, Any]:
        """The item to send and what its result must be (an Original, or (kind, original))."""
        kind = op.kind if known or op.kind.startswith("new") else "new_id"
        if kind == "new_id":
            jid = self.fresh("j")
            original = self._new(self.journal(op.pairs, jid), jid, ALICE, None, op.pairs)
            return self._post(original), original
        if kind == "new_key":
            journal = self.journal(op.pairs, None)
            original = self._new(journal, self.fresh("g"), ALICE, self.fresh("k"), op.pairs)
            return self._post(original), original
        base = known[op.ref % len(known)]
        if kind == "replay":
            jid = base.journal_id if base.idem_key is None else self.fresh("g")
            item = PostItem(base.journal, jid, base.principal, base.idem_key, request_hash(base.journal))
            return item, ("replay", base)
        if kind == "conflict":
            debit, credit, amount, currency = base.pairs[0]
            pairs = ((debit, credit, amount + 1, currency), *base.pairs[1:])
            journal = self.journal(pairs, base.journal.journal_id)
            jid = base.journal_id if base.idem_key is None else self.fresh("g")
            return PostItem(journal, jid, base.principal, base.idem_key, request_hash(journal)), (
                "conflict",
                base,
            )
        # other_principal: the same body under the other principal
        other = BOB if base.principal == ALICE else ALICE
        if base.idem_key is None:  # journal ids are global: a conflict
            item = PostItem(base.journal, base.journal_id, other, None, request_hash(base.journal))
            return item, ("conflict", base)
        # keys are per principal: a new journal, unless the other principal already used this key
        jid = self.fresh("g")
        item = PostItem(base.journal, jid, other, base.idem_key, request_hash(base.journal))
        existing = self.by_key.get((other, base.idem_key))
        if existing is not None:
            if existing.pairs == base.pairs:
                return item, ("replay", existing)
            return item, ("conflict", existing)
        return item, self._new(base.journal, jid, other, base.idem_key, base.pairs)

    @staticmethod
    def _post(original: Original) -> PostItem:
        journal = original.journal
        return PostItem(
            journal, original.journal_id, original.principal, original.idem_key, request_hash(journal)
        )

    @staticmethod
    def check(result: Result, expected: Any, sent: PostItem) -> None:
        if isinstance(expected, Original):
            assert result.ok, (result.code, result.message)
            assert result.journal_id == expected.journal_id
            assert result.posted_at is not None
            expected.posted_at = result.posted_at
            return
        kind, base = expected
        assert base.posted_at is not None
        if kind == "replay":
            assert result.ok, (result.code, result.message)
            assert result.journal_id == base.journal_id
            assert result.posted_at == base.posted_at
        else:
            assert not result.ok
            assert result.code == ErrorCode.IDEMPOTENCY_CONFLICT
            assert result.journal_id == sent.journal_id
            assert result.details == {"journal_id": base.journal_id}

    def model_balances(self) -> dict[tuple[str, str], list[int]]:
        totals: dict[tuple[str, str], list[int]] = {}
        for original in self.originals:
            for debit, credit, amount, currency in original.pairs:
                totals.setdefault((self.account(debit), currency), [0, 0])[0] += amount
                totals.setdefault((self.account(credit), currency), [0, 0])[1] += amount
        return totals


async def _stored_balances(conn: asyncpg.Connection, prefix: str) -> dict[tuple[str, str], list[int]]:
    rows = await conn.fetch(
        "SELECT account_id, currency, debits_posted, credits_posted, debits_pending, credits_pending"
        " FROM balances WHERE account_id LIKE '%:' || $1 || '.%'",
        prefix,
    )
    assert all(r["debits_pending"] == 0 and r["credits_pending"] == 0 for r in rows)
    return {(r["account_id"], r["currency"]): [r["debits_posted"], r["credits_posted"]] for r in rows}


def _book_balances(engine: ShardEngine, prefix: str) -> dict[tuple[str, str], list[int]]:
    return {k: v[:2] for k, v in engine.book.balances.items() if f":{prefix}." in k[0]}


async def _run_plan(engine: ShardEngine, dsn: str, plan: list[list[list[Op]]]) -> None:
    runner = Runner(uuid.uuid4().hex[:12])
    for step in plan:
        answered = list(runner.originals)
        sent: list[list[tuple[PostItem, Any]]] = []
        for payload in step:
            items: list[tuple[PostItem, Any]] = []
            for op in payload:
                mine = [exp for _, exp in items if isinstance(exp, Original)]
                items.append(runner.item(op, answered + mine))
            sent.append(items)
        answers = await asyncio.gather(
            *(engine.post(ENCODER.encode([item for item, _ in payload])) for payload in sent)
        )
        for payload, answer in zip(sent, answers, strict=True):
            results = RESULTS.decode(answer)
            assert len(results) == len(payload)
            for result, (item, expected) in zip(results, payload, strict=True):
                runner.check(result, expected, item)
    model = runner.model_balances()
    assert _book_balances(engine, runner.prefix) == model
    conn = await asyncpg.connect(dsn)
    try:
        assert await _stored_balances(conn, runner.prefix) == model
        count = await conn.fetchval(
            "SELECT count(*) FROM journals WHERE journal_id LIKE $1 || '-%'", runner.prefix
        )
        assert count == len(runner.originals)
        assert await run_check(conn) == []
    finally:
        await conn.close()


@settings(max_examples=20, deadline=None)
@given(plan=plans)
def test_replays_and_conflicts_apply_each_journal_once(harness: Harness, plan: list[list[list[Op]]]) -> None:
    """Replays answer the original id and posted_at, conflicts IDEMPOTENCY_CONFLICT, nothing doubles."""
    harness.run(_run_plan(harness.engine, harness.dsn, plan))


def test_replay_after_restart_returns_the_original(harness: Harness) -> None:
    """After a restart the book reloads the same balances and replays still answer the original."""
    runner = Runner(uuid.uuid4().hex[:12])
    original_item, original = runner.item(Op("new_key", ((0, 1, 500, "USD"), (2, 3, 7, "EUR"))), [])

    async def scenario() -> None:
        (first,) = RESULTS.decode(await harness.engine.post(ENCODER.encode([original_item])))
        runner.check(first, original, original_item)
        before = {k: list(v) for k, v in harness.engine.book.balances.items()}
        await harness.engine.close()
        harness.engine = await _start_engine(harness.dsn)
        assert {k: list(v) for k, v in harness.engine.book.balances.items()} == before
        replay_item, expected = runner.item(Op("replay", ()), [original])
        (again,) = RESULTS.decode(await harness.engine.post(ENCODER.encode([replay_item])))
        runner.check(again, expected, replay_item)
        assert _book_balances(harness.engine, runner.prefix) == runner.model_balances()

    harness.run(scenario())


def test_replay_the_book_would_now_refuse_answers_the_original(harness: Harness) -> None:
    """A replay is answered from the store even when posting it again would overdraw the account.

    Tried: drain a no-negative account to zero, then resend the draining journal (same id, same
    body: must answer the original, not INSUFFICIENT_FUNDS) and a different journal under that id
    that would also overdraw (must be IDEMPOTENCY_CONFLICT, not INSUFFICIENT_FUNDS).
    """
    runner = Runner(uuid.uuid4().hex[:12])
    guarded = runner.account(0)  # asset: debits raise it, credits lower it

    async def scenario() -> None:
        engine = harness.engine
        (made,) = RESULTS.decode(await engine.create_account(guarded, True))
        assert made.ok
        fund_item, fund = runner.item(Op("new_id", ((0, 2, 100, "USD"),)), [])
        drain_item, drain = runner.item(Op("new_id", ((3, 0, 100, "USD"),)), [])
        for item, expected in ((fund_item, fund), (drain_item, drain)):
            (result,) = RESULTS.decode(await engine.post(ENCODER.encode([item])))
            runner.check(result, expected, item)
        replay_item, replay = runner.item(Op("replay", (), ref=1), [fund, drain])
        conflict_item, conflict = runner.item(Op("conflict", (), ref=1), [fund, drain])
        assert replay_item.journal_id == conflict_item.journal_id == drain.journal_id
        for item, expected in ((replay_item, replay), (conflict_item, conflict)):
            (result,) = RESULTS.decode(await engine.post(ENCODER.encode([item])))
            runner.check(result, expected, item)
        assert _book_balances(engine, runner.prefix) == runner.model_balances()

    harness.run(scenario())
