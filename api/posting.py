"""The front end's path to the actors: route each journal, batch per destination.

A journal whose accounts all live on one shard goes to that shard; one that spans shards
goes to the coordinator. Each destination has a `Batcher`: at most `in_flight_max` Ray
calls outstanding; whatever arrives meanwhile waits and leaves in the next call, so under
load every Ray call carries many journals (one call per batch, never one per journal).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final, cast

import msgspec

from actors.messages import ENCODER, RESULTS, CrossItem, PostItem, Result
from actors.ports import CoordinatorPort, ShardPort
from actors.shard_engine import unavailable
from ledger.errors import ErrorCode
from ledger.invariants import check
from ledger.journal import Journal, Line
from sharding.slots import SlotMap, slot_of
from signer.canonical import request_hash

BATCH_ITEMS_MAX: Final = 8192
# Ray calls in flight per destination. One per shard: whatever arrives while a shard's call is
# out leaves in the next one, so a shard's group commit gets everything that accumulated during
# its previous cycle (bigger commits: +45% single-journal throughput against two in flight). The
# coordinator keeps three, so rounds overlap (one prepares while others decide and send; as many as
# the coordinator runs at once, `LEDGER_COORDINATOR_ROUNDS`).
SHARD_IN_FLIGHT: Final = int(os.environ.get("LEDGER_SHARD_IN_FLIGHT", "1"))
COORDINATOR_IN_FLIGHT: Final = int(os.environ.get("LEDGER_COORDINATOR_IN_FLIGHT", "3"))
IN_FLIGHT_MAX: Final = 2
# Journals waiting per destination (front-end queue). Beyond it a submission is answered 503
# SERVICE_UNAVAILABLE (retryable) at once instead of queued: memory stays bounded under overload.
# The actor's own queue is bounded by the in-flight calls above (each at most BATCH_ITEMS_MAX).
QUEUE_JOURNALS_MAX: Final = int(os.environ.get("LEDGER_SHARD_QUEUE_MAX", "65536"))

# Resharding: how long a posting touching a slot being moved waits for the handoff before it is
# answered 503 SHARD_MOVING (retryable), and how often a refused one is sent again after a wait.
MOVE_WAIT_S: Final = float(os.environ.get("LEDGER_MOVE_WAIT_MS", "3000")) / 1000
MOVE_RETRIES: Final = 3

Send = Callable[[bytes], Awaitable[bytes]]


@dataclass(slots=True)
class _Waiting:
    items: list[Any]
    future: asyncio.Future[list[Result]]


class Batcher:
    """Coalesces submissions to one destination into few, large calls."""

    def __init__(
        self,
        name: str,
        send: Send,
        items_max: int = BATCH_ITEMS_MAX,
        in_flight_max: int = IN_FLIGHT_MAX,
        queue_max: int = QUEUE_JOURNALS_MAX,
    ):
        self.name = name
        self.send = send
        self.items_max = items_max
        self.in_flight_max = in_flight_max
        self.queue_max = queue_max
        self.shed = 0
        """Journals answered 503 because the queue was full."""
        self.waiting: deque[_Waiting] = deque()
        self.waiting_items = 0
        self.in_flight = 0
        self.calls = 0
        self.items_sent = 0

    async def submit(self, items: list[Any]) -> list[Result]:
        """Send items (in one or more calls shared with others); results in order.

        When `queue_max` journals already wait, the items are answered SERVICE_UNAVAILABLE
        (retryable, nothing written) without being queued; an empty queue takes any submission.
        """
        if self.waiting_items and self.waiting_items + len(items) > self.queue_max:
            self.shed += len(items)
            return [self._queue_full(item.journal_id) for item in items]
        future: asyncio.Future[list[Result]] = asyncio.get_running_loop().create_future()
        self.waiting.append(_Waiting(items, future))
        self.waiting_items += len(items)
        self._flush()
        return await future

    def _queue_full(self, journal_id: str) -> Result:
        details = {"retryable": True, "reason": "queue_full", "queue_max": self.queue_max}
        message = f"{self.name} queue full ({self.queue_max} journals), retry later"
        return Result(journal_id, False, code=ErrorCode.SERVICE_UNAVAILABLE, message=message, details=details)

    @property
    def queue_depth(self) -> int:
        """Journals waiting for a call."""
        return self.waiting_items

    def _flush(self) -> None:
        while self.waiting and self.in_flight < self.in_flight_max:
            take: list[_Waiting] = []
            count = 0
            while self.waiting and (not take or count + len(self.waiting[0].items) <= self.items_max):
                entry = self.waiting.popleft()
                take.append(entry)
                count += len(entry.items)
            self.waiting_items -= count
            self.in_flight += 1
            asyncio.get_running_loop().create_task(self._call(take))

    async def _call(self, take: list[_Waiting]) -> None:
        items = take[0].items if len(take) == 1 else [item for entry in take for item in entry.items]
        try:
            results = RESULTS.decode(await self.send(ENCODER.encode(items)))
            if len(results) != len(items):
                raise RuntimeError(f"{self.name} answered {len(results)} results for {len(items)} items")
        except Exception as exc:
            results = [
                unavailable(item.journal_id, f"{self.name} unavailable: {type(exc).__name__}")
                for item in items
            ]
        finally:
            self.in_flight -= 1
            self.calls += 1
            self.items_sent += len(items)
        offset = 0
        for entry in take:
            if not entry.future.done():
                entry.future.set_result(results[offset : offset + len(entry.items)])
            offset += len(entry.items)
        self._flush()


class Submission(msgspec.Struct, frozen=True, gc=False):
    """One validated journal and who posts it (a Struct: built once per journal, cheaply).

    `request_digest`: the idempotency hash when it is not `request_hash(journal)`: a journal the
    node completed (D2, `finance.fx_journal.request_digest`) is compared on the client's payload.
    """

    journal: Journal
    principal: str
    idem_key: str | None
    request_digest: bytes | None = None
    assigned_id: str | None = None  # the id `route` generated on a first attempt (a retry keeps it)


COORDINATOR: Final = -1
"""The destination key of cross-shard journals in `route`'s answer (shard ids are >= 0)."""

ANY: Final = -2
"""What a split-aware `shard_of` answers for a split (hot) account: booked by whichever shard
the journal's other lines live on (migration 0005, docs/ARCHITECTURE.md "Hot accounts")."""


def place(
    lines: tuple[Line, ...], shard_of: Callable[[str], int], anchor: int
) -> tuple[int, dict[int, tuple[Line, ...]] | None]:
    """Destination of a journal whose lines may include split accounts: (shard, None) or (COORDINATOR, parts).

    Lines of split accounts follow the others: to their shard when they share one, else to the
    lowest participant shard; a journal of split accounts only goes to `anchor`.
    """
    shards = [shard_of(line.account_id) for line in lines]
    fixed = sorted({s for s in shards if s != ANY})
    if not fixed:
        return anchor, None
    if len(fixed) == 1:
        return fixed[0], None
    parts: dict[int, list[Line]] = {}
    for line, shard in zip(lines, shards, strict=True):
        parts.setdefault(fixed[0] if shard == ANY else shard, []).append(line)
    return COORDINATOR, {shard: tuple(group) for shard, group in parts.items()}


def destination(journal: Journal, shard_of: Callable[[str], int]) -> dict[int, tuple[Line, ...]]:
    """Lines per shard (the common case, every line on one shard, builds no lists)."""
    lines = journal.lines
    first = shard_of(lines[0].account_id)
    if all(shard_of(line.account_id) == first for line in lines[1:]):
        return {first: lines}
    parts: dict[int, list[Line]] = {}
    for line in journal.lines:
        parts.setdefault(shard_of(line.account_id), []).append(line)
    return {shard: tuple(lines) for shard, lines in parts.items()}


def _single_shard(lines: tuple[Line, ...], shard_of: Callable[[str], int]) -> int | None:
    """The shard of every line, or None when the lines span shards."""
    first = shard_of(lines[0].account_id)
    for line in lines[1:]:
        if shard_of(line.account_id) != first:
            return None
    return first


def route(
    submissions: list[Submission],
    shard_of: Callable[[str], int],
    anchor: Callable[[str], int] | None = None,
) -> dict[int, tuple[list[int], list[Any]]]:
    """Group submissions per destination (a shard id, or `COORDINATOR`): their indexes and items.

    Pure (no Ray, no I/O): the per-journal part of `Poster.post`, so it can be timed alone.
    A journal without a client id gets `jrn-<uuid4 hex>`. `shard_of` may answer `ANY` for split
    accounts (see `place`); `anchor(journal_id)` then picks the shard of a journal made only of them.
    """
    groups: dict[int, tuple[list[int], list[Any]]] = {}
    for index, sub in enumerate(submissions):
        journal = sub.journal
        journal_id = journal.journal_id or sub.assigned_id or f"jrn-{uuid.uuid4().hex}"
        hashed = sub.request_digest or request_hash(journal)
        lines = journal.lines
        parts: dict[int, tuple[Line, ...]] | None = None
        if len(lines) == 2:  # the common journal: inline, no loop
            dest = shard_of(lines[0].account_id)
            other = shard_of(lines[1].account_id)
            if other != dest:  # what destination() answers for two lines on two shards
                if dest == ANY:  # a split account follows the other line
                    dest = other
                elif other != ANY:
                    parts = {dest: (lines[0],), other: (lines[1],)}
            elif dest == ANY:
                dest = anchor(journal_id) if anchor is not None else 0
        else:
            single = _single_shard(lines, shard_of)
            if single is None or single == ANY:
                if anchor is None:
                    parts = destination(journal, shard_of)
                else:
                    dest, parts = place(lines, shard_of, anchor(journal_id))
            else:
                dest = single
        if parts is None:
            item: Any = PostItem(journal, journal_id, sub.principal, sub.idem_key, hashed)
        else:
            dest = COORDINATOR
            item = CrossItem(journal, journal_id, sub.principal, sub.idem_key, hashed, parts)
        group = groups.get(dest)
        if group is None:
            group = groups[dest] = ([], [])
        group[0].append(index)
        group[1].append(item)
    return groups


def _moving(sub: Submission) -> Result:
    """The 503 of a posting that waited for a handoff longer than `MOVE_WAIT_S` (nothing was sent)."""
    return Result(
        sub.journal.journal_id or sub.assigned_id or "",
        False,
        code=ErrorCode.SHARD_MOVING,
        message="an account of this journal is moving to another shard; retry with the same id",
        details={"retryable": True},
    )


class Poster:
    """Routes journals to shards or the coordinator and gathers their results in order."""

    def __init__(
        self,
        slot_map: SlotMap,
        shards: dict[int, ShardPort],
        coordinator: CoordinatorPort,
        split_accounts: Iterable[str] = (),
    ) -> None:
        self.slot_map = slot_map
        self.shards = {
            shard_id: Batcher(f"shard {shard_id}", port.post, in_flight_max=SHARD_IN_FLIGHT)
            for shard_id, port in shards.items()
        }
        self.coordinator = Batcher("coordinator", coordinator.submit, in_flight_max=COORDINATOR_IN_FLIGHT)
        self.split: set[str] = set(split_accounts)
        self.frozen: set[int] = set()  # slots being handed off (api/resharding.py)
        self._thawed = asyncio.Event()
        self._thawed.set()
        self.move_wait_s = MOVE_WAIT_S

    # -- resharding ------------------------------------------------------------------------
    def freeze(self, slots: Iterable[int]) -> None:
        """Hold back new postings touching these slots until `thaw` (step 1 of a handoff)."""
        self.frozen |= set(slots)
        self._thawed.clear()

    def thaw(self, slots: Iterable[int]) -> None:
        """Let postings touching these slots go again (routed with the map as it is now)."""
        self.frozen -= set(slots)
        if not self.frozen:
            self._thawed.set()

    def switch(self, slot_map: SlotMap) -> None:
        """Route with a new slot map from now on (a handoff's switch; synchronous, so atomic)."""
        self.slot_map = slot_map

    def add_shard(self, shard_id: int, port: ShardPort) -> None:
        """A new shard may receive postings (once the map gives it slots)."""
        self.shards[shard_id] = Batcher(f"shard {shard_id}", port.post, in_flight_max=SHARD_IN_FLIGHT)

    def remove_shard(self, shard_id: int) -> None:
        """A removed shard (owning no slot any more) gets nothing more."""
        self.shards.pop(shard_id, None)

    def _touches_frozen(self, submissions: list[Submission]) -> bool:
        frozen, split = self.frozen, self.split
        return any(
            slot_of(line.account_id) in frozen and line.account_id not in split
            for sub in submissions
            for line in sub.journal.lines
        )

    async def _until_thawed(self, submissions: list[Submission]) -> bool:
        """Wait (at most `move_wait_s`) while these submissions touch frozen slots; False on timeout."""
        deadline = asyncio.get_running_loop().time() + self.move_wait_s
        while self.frozen and self._touches_frozen(submissions):
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._thawed.wait(), min(remaining, 0.05))
        return True

    def add_split(self, account_id: str) -> None:
        """Route an account split from now on (after `POST /accounts` made it so)."""
        self.split.add(account_id)

    def _split_shard_of(self, account_id: str) -> int:
        return ANY if account_id in self.split else self.slot_map.shard_of(account_id)

    def shard_of_lines(self, journal_id: str, lines: tuple[Line, ...]) -> int | None:
        """The one shard that books these lines (split accounts follow the others), or None
        when they span shards (holds use it; postings go through `route`)."""
        shard, parts = place(lines, self._split_shard_of, self.slot_map.shard_of(journal_id))
        return None if parts is not None else shard

    def destination(self, journal: Journal) -> dict[int, tuple[Line, ...]]:
        """Lines per shard (the common case, every line on one shard, builds no lists)."""
        return destination(journal, self.slot_map.shard_of)

    async def post(self, submissions: list[Submission]) -> list[Result]:
        """Post journals; one result per submission, in order.

        While slots move (resharding), postings touching them wait for the handoff; a journal a
        shard refused with SHARD_MOVING (nothing written) is sent again, with the id it was
        given, once the slot map has switched; after `MOVE_RETRIES` it is answered 503."""
        if self.frozen and not await self._until_thawed(submissions):
            return [_moving(sub) for sub in submissions]
        results = await self._post(submissions)
        if len(results) == 1 and results[0].code != ErrorCode.SHARD_MOVING:
            return results  # a single post that was not refused for a move (the common case)
        for _attempt in range(MOVE_RETRIES):
            again = [i for i, r in enumerate(results) if r.code == ErrorCode.SHARD_MOVING]
            if not again:
                break
            retry = [
                msgspec.structs.replace(submissions[i], assigned_id=results[i].journal_id) for i in again
            ]
            await asyncio.sleep(0.01)
            if not await self._until_thawed(retry):
                break
            for i, result in zip(again, await self._post(retry), strict=True):
                results[i] = result
        return results

    async def _post(self, submissions: list[Submission]) -> list[Result]:
        if self.split:
            groups = route(submissions, self._split_shard_of, self.slot_map.shard_of)
        else:
            groups = route(submissions, self.slot_map.shard_of)
        if len(groups) == 1:  # one destination (every single post): no gather, no task; indexes 0..n-1
            ((dest, (_, items)),) = groups.items()
            answer = await (self.coordinator if dest == COORDINATOR else self.shards[dest]).submit(items)
            check(len(answer) == len(submissions), "one result per submission")
            return answer
        batchers = [self.coordinator if dest == COORDINATOR else self.shards[dest] for dest in groups]
        answers = await asyncio.gather(
            *(batcher.submit(items) for batcher, (_, items) in zip(batchers, groups.values(), strict=True))
        )
        results: list[Result | None] = [None] * len(submissions)
        for (indexes, _), answer in zip(groups.values(), answers, strict=True):
            for index, result in zip(indexes, answer, strict=True):
                results[index] = result
        # The groups' indexes partition 0..n-1 and each answer has one result per index (strict zip).
        return cast(list[Result], results)

    def queue_depths(self) -> dict[str, int]:
        """Journals waiting per destination."""
        depths = {str(shard): b.queue_depth for shard, b in self.shards.items()}
        depths["coordinator"] = self.coordinator.queue_depth
        return depths

    def shed_counts(self) -> dict[str, int]:
        """Journals refused per destination because its queue was full."""
        counts = {str(shard): b.shed for shard, b in self.shards.items()}
        counts["coordinator"] = self.coordinator.shed
        return counts
