"""The front end's path to the actors: route each journal, batch per destination.

A journal whose accounts all live on one shard goes to that shard; one that spans shards
goes to the coordinator. Each destination has a `Batcher`: at most `in_flight_max` Ray
calls outstanding; whatever arrives meanwhile waits and leaves in the next call, so under
load every Ray call carries many journals (one call per batch, never one per journal).
"""

from __future__ import annotations

import asyncio
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

from actors.messages import ENCODER, RESULTS, CrossItem, PostItem, Result
from actors.ports import CoordinatorPort, ShardPort
from actors.shard_engine import unavailable
from ledger.journal import Journal, Line
from sharding.slots import SlotMap
from signer.canonical import request_hash

BATCH_ITEMS_MAX: Final = 8192
IN_FLIGHT_MAX: Final = 2

Send = Callable[[bytes], Awaitable[bytes]]


@dataclass(slots=True)
class _Waiting:
    items: list[Any]
    future: asyncio.Future[list[Result]]


class Batcher:
    """Coalesces submissions to one destination into few, large calls."""

    def __init__(
        self, name: str, send: Send, items_max: int = BATCH_ITEMS_MAX, in_flight_max: int = IN_FLIGHT_MAX
    ):
        self.name = name
        self.send = send
        self.items_max = items_max
        self.in_flight_max = in_flight_max
        self.waiting: deque[_Waiting] = deque()
        self.waiting_items = 0
        self.in_flight = 0
        self.calls = 0
        self.items_sent = 0

    async def submit(self, items: list[Any]) -> list[Result]:
        """Send items (in one or more calls shared with others); results in order."""
        future: asyncio.Future[list[Result]] = asyncio.get_running_loop().create_future()
        self.waiting.append(_Waiting(items, future))
        self.waiting_items += len(items)
        self._flush()
        return await future

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
        items = [item for entry in take for item in entry.items]
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


@dataclass(frozen=True, slots=True)
class Submission:
    """One validated journal and who posts it."""

    journal: Journal
    principal: str
    idem_key: str | None


class Poster:
    """Routes journals to shards or the coordinator and gathers their results in order."""

    def __init__(self, slot_map: SlotMap, shards: dict[int, ShardPort], coordinator: CoordinatorPort) -> None:
        self.slot_map = slot_map
        self.shards = {shard_id: Batcher(f"shard {shard_id}", port.post) for shard_id, port in shards.items()}
        self.coordinator = Batcher("coordinator", coordinator.submit)

    def destination(self, journal: Journal) -> dict[int, tuple[Line, ...]]:
        """Lines per shard (the common case, every line on one shard, builds no lists)."""
        shard_of = self.slot_map.shard_of
        lines = journal.lines
        first = shard_of(lines[0].account_id)
        if all(shard_of(line.account_id) == first for line in lines[1:]):
            return {first: lines}
        parts: dict[int, list[Line]] = {}
        for line in journal.lines:
            parts.setdefault(self.slot_map.shard_of(line.account_id), []).append(line)
        return {shard: tuple(lines) for shard, lines in parts.items()}

    async def post(self, submissions: list[Submission]) -> list[Result]:
        """Post journals; one result per submission, in order."""
        groups: dict[Batcher, tuple[list[int], list[Any]]] = {}
        for index, sub in enumerate(submissions):
            journal_id = sub.journal.journal_id or f"jrn-{uuid.uuid4().hex}"
            hashed = request_hash(sub.journal)
            parts = self.destination(sub.journal)
            if len(parts) == 1:
                (shard,) = parts
                batcher = self.shards[shard]
                item: Any = PostItem(sub.journal, journal_id, sub.principal, sub.idem_key, hashed)
            else:
                batcher = self.coordinator
                item = CrossItem(sub.journal, journal_id, sub.principal, sub.idem_key, hashed, parts)
            indexes, items = groups.setdefault(batcher, ([], []))
            indexes.append(index)
            items.append(item)
        results: list[Result | None] = [None] * len(submissions)
        answers = await asyncio.gather(*(batcher.submit(items) for batcher, (_, items) in groups.items()))
        for (indexes, _), answer in zip(groups.values(), answers, strict=True):
            for index, result in zip(indexes, answer, strict=True):
                results[index] = result
        return [r for r in results if r is not None]

    def queue_depths(self) -> dict[str, int]:
        """Journals waiting per destination."""
        depths = {str(shard): b.queue_depth for shard, b in self.shards.items()}
        depths["coordinator"] = self.coordinator.queue_depth
        return depths
