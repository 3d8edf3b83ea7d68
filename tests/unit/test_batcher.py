"""Unit tests of the front end's call coalescing (`api.posting.Batcher`) with a fake `send`."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from actors.messages import ENCODER, POST_ITEMS, PostItem, Result
from api.posting import Batcher
from ledger.errors import ErrorCode
from ledger.journal import JournalIn, LineIn, validate_journal

JOURNAL = validate_journal(
    JournalIn(entries=[LineIn("asset:cash", "debit", 1, "USD"), LineIn("revenue:x", "credit", 1, "USD")])
)


def _item(journal_id: str) -> PostItem:
    return PostItem(JOURNAL, journal_id, "service:test", None, b"h" * 32)


@dataclass
class FakeShard:
    """Records every call; answers ok with the call number in posted_at; may fail chosen calls."""

    delay: float = 0.002
    fail_calls: set[int] = field(default_factory=set)
    short_calls: set[int] = field(default_factory=set)
    calls: list[list[str]] = field(default_factory=list)
    outstanding: int = 0
    max_outstanding: int = 0

    async def send(self, payload: bytes) -> bytes:
        ids = [item.journal_id for item in POST_ITEMS.decode(payload)]
        number = len(self.calls)
        self.calls.append(ids)
        self.outstanding += 1
        self.max_outstanding = max(self.max_outstanding, self.outstanding)
        try:
            await asyncio.sleep(self.delay)
            if number in self.fail_calls:
                raise ConnectionError("actor died")
            results = [Result(jid, True, posted_at=f"call-{number}") for jid in ids]
            if number in self.short_calls:
                results = results[:-1]
            return ENCODER.encode(results)
        finally:
            self.outstanding -= 1


def test_concurrent_submits_are_coalesced() -> None:
    """1,000 concurrent one-item submits go out in few calls, never more than in_flight_max at once."""
    shard = FakeShard()

    async def scenario() -> list[list[Result]]:
        batcher = Batcher("shard 0", shard.send, in_flight_max=2)
        answers = await asyncio.gather(*(batcher.submit([_item(f"j{i}")]) for i in range(1000)))
        assert batcher.items_sent == 1000
        assert batcher.calls == len(shard.calls)
        assert batcher.in_flight == 0 and batcher.queue_depth == 0
        return answers

    answers = asyncio.run(scenario())
    assert len(shard.calls) <= 10
    assert shard.max_outstanding <= 2
    assert sorted(jid for call in shard.calls for jid in call) == sorted(f"j{i}" for i in range(1000))
    for i, answer in enumerate(answers):
        assert [r.journal_id for r in answer] == [f"j{i}"]
        assert answer[0].ok


def test_results_come_back_in_order_per_submitter() -> None:
    """Each submitter gets its own results, in the order of its items, across shared calls."""
    shard = FakeShard()

    async def scenario() -> list[list[Result]]:
        batcher = Batcher("shard 0", shard.send, items_max=7, in_flight_max=3)
        return await asyncio.gather(
            *(batcher.submit([_item(f"s{s}-{k}") for k in range(s % 5 + 1)]) for s in range(200))
        )

    answers = asyncio.run(scenario())
    for s, answer in enumerate(answers):
        assert [r.journal_id for r in answer] == [f"s{s}-{k}" for k in range(s % 5 + 1)]
    assert shard.max_outstanding <= 3
    assert all(len(call) <= 7 for call in shard.calls)  # no call exceeds items_max
    assert len(shard.calls) < 200


def test_oversized_submission_still_goes_out_whole() -> None:
    """A single submission larger than items_max is sent in one call, not split or stuck."""
    shard = FakeShard()

    async def scenario() -> list[Result]:
        return await Batcher("shard 0", shard.send, items_max=4).submit([_item(f"j{i}") for i in range(10)])

    answer = asyncio.run(scenario())
    assert [r.journal_id for r in answer] == [f"j{i}" for i in range(10)]
    assert len(shard.calls) == 1


def test_failed_send_answers_exactly_its_items_unavailable() -> None:
    """A call that raises yields retryable SERVICE_UNAVAILABLE for its items only; others succeed."""
    shard = FakeShard(fail_calls={1})

    async def scenario() -> list[list[Result]]:
        batcher = Batcher("shard 0", shard.send, in_flight_max=1)
        return await asyncio.gather(*(batcher.submit([_item(f"j{i}")]) for i in range(50)))

    answers = asyncio.run(scenario())
    assert len(shard.calls) >= 2
    failed = set(shard.calls[1])
    assert failed and set(shard.calls[0])
    for i, (result,) in enumerate(answers):
        assert result.journal_id == f"j{i}"
        if result.journal_id in failed:
            assert not result.ok
            assert result.code == ErrorCode.SERVICE_UNAVAILABLE
            assert result.details == {"retryable": True}
        else:
            assert result.ok and result.code is None


def test_wrong_result_count_is_unavailable() -> None:
    """A destination answering fewer results than items fails that call's items, retryably."""
    shard = FakeShard(short_calls={0})

    async def scenario() -> list[Result]:
        batcher = Batcher("shard 0", shard.send)
        return await batcher.submit([_item("a"), _item("b"), _item("c")])

    answer = asyncio.run(scenario())
    assert [r.journal_id for r in answer] == ["a", "b", "c"]
    assert all(r.code == ErrorCode.SERVICE_UNAVAILABLE and r.details == {"retryable": True} for r in answer)


def test_batcher_recovers_after_a_failure() -> None:
    """After a failed call, later submits are sent and succeed."""
    shard = FakeShard(fail_calls={0})

    async def scenario() -> tuple[list[Result], list[Result]]:
        batcher = Batcher("shard 0", shard.send)
        first = await batcher.submit([_item("a")])
        second = await batcher.submit([_item("b")])
        return first, second

    first, second = asyncio.run(scenario())
    assert first[0].code == ErrorCode.SERVICE_UNAVAILABLE
    assert second[0].ok and second[0].posted_at == "call-1"


def test_full_queue_answers_unavailable_instead_of_growing() -> None:
    """Tried: with a call out and `queue_max` journals waiting, a further submission is answered
    SERVICE_UNAVAILABLE (retryable, reason queue_full) at once and never sent; the queued ones post."""
    shard = FakeShard(delay=0.05)

    async def scenario() -> tuple[list[list[Result]], list[Result], int]:
        batcher = Batcher("shard 0", shard.send, in_flight_max=1, queue_max=10)
        first = asyncio.ensure_future(batcher.submit([_item("first")]))
        await asyncio.sleep(0)  # the first call is out; what follows waits
        queued = [asyncio.ensure_future(batcher.submit([_item(f"q{i}")])) for i in range(10)]
        await asyncio.sleep(0)
        assert batcher.queue_depth == 10
        refused = await batcher.submit([_item("over")])
        return [await first, *[await q for q in queued]], refused, batcher.shed

    posted, refused, shed = asyncio.run(scenario())
    assert all(r.ok for answer in posted for r in answer)
    assert [(r.ok, r.code, r.journal_id) for r in refused] == [(False, ErrorCode.SERVICE_UNAVAILABLE, "over")]
    assert refused[0].details == {"retryable": True, "reason": "queue_full", "queue_max": 10}
    assert shed == 1 and "over" not in {jid for call in shard.calls for jid in call}
