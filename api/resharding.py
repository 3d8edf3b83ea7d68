"""Online resharding: add and remove shards, move slots, while traffic flows.

The orchestrator runs one operation at a time. A plan (`sharding.rebalance`) is a list of
moves; each move of slots S from shard A to shard B is one handoff (docs/ARCHITECTURE.md,
"Resharding"):

1. freeze S in the front end (new postings touching S wait, see `Poster.freeze`);
2. fence S on A, in A's queue, and repeat until A holds no reservation on S (the drain);
3. switch, durably: one PostgreSQL transaction moves S's `slot_map` rows and the open holds on
   S's accounts to B (the point of no return; before it, the move is undone by unfencing);
4. release S on A (it forgets S's accounts and holds; S stays fenced there);
5. acquire S on B (it loads S's accounts, balances and holds from PostgreSQL);
6. switch the front end's slot map and thaw S.

Steps 4-6 roll forward: a shard that died meanwhile restarts from the switched map.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from actors.ports import ShardMovesPort, ShardPort
from api.services import Services
from ledger.errors import ErrorCode, LedgerError
from sharding.rebalance import (
    Move,
    PlanError,
    apply_moves,
    next_shard_ids,
    plan_balance,
    plan_remove,
    plan_slots,
    slot_ranges,
)
from store import repository

log = logging.getLogger(__name__)

DRAIN_TIMEOUT_S: Final = 30.0
ROLL_FORWARD_TIMEOUT_S: Final = 120.0


class MovableShard(ShardPort, ShardMovesPort, Protocol):
    """A shard port the orchestrator can also hand slots off with."""


class ShardFleet(Protocol):
    """Starts and stops shard actors (the composition root implements it over Ray)."""

    def spawn(self, shard_id: int) -> MovableShard: ...
    def stop(self, shard_id: int) -> None: ...


@dataclass(slots=True)
class Resharder:
    """Runs resharding operations against the node's services, one at a time."""

    svc: Services
    fleet: ShardFleet
    active: list[int]
    drain_timeout_s: float = DRAIN_TIMEOUT_S
    poll_s: float = 0.02
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    moves_done: int = 0

    def _port(self, shard_id: int) -> MovableShard:
        port: Any = self.svc.shards[shard_id]
        return port  # type: ignore[no-any-return]

    # -- operations --------------------------------------------------------------------------
    async def move_slots(self, slots: list[int], target: int) -> dict[str, Any]:
        """`ledger-node slots move SLOT.. --to SHARD`."""
        async with self.lock:
            plan = _planned(lambda: plan_slots(self.svc.slot_map, slots, target, self.active))
            done = [await self._move(move) for move in plan]
        return {"moves": done, "slots_moved": sum(d["slots"] for d in done)}

    async def add_shards(self, count: int, rebalance: bool = True) -> dict[str, Any]:
        """`ledger-node shards add N`: new shard actors, then (by default) an even spread of slots."""
        async with self.lock:
            async with self.svc.pool.acquire() as conn:
                known = await repository.known_shards(conn)
                ids: list[int] = _planned(lambda: next_shard_ids(known, count))
                await repository.add_shards(conn, ids)  # first: a restart spawns them
            for shard_id in ids:
                port = self.fleet.spawn(shard_id)
                await asyncio.wait_for(port.status(), 120)
                self.svc.shards[shard_id] = port
                self.svc.poster.add_shard(shard_id, port)
                self.active.append(shard_id)
            plan = plan_balance(self.svc.slot_map, self.active) if rebalance else []
            done = [await self._move(move) for move in plan]
        return {"added": ids, "moves": done, "slots_moved": sum(d["slots"] for d in done)}

    async def remove_shard(self, shard_id: int) -> dict[str, Any]:
        """`ledger-node shards remove ID`: move its slots away, stop its actor, retire it."""
        async with self.lock:
            plan = _planned(lambda: plan_remove(self.svc.slot_map, shard_id, self.active))
            done = [await self._move(move) for move in plan]
            self.fleet.stop(shard_id)  # before its leftover holds move: it must not expire them
            heir = min(s for s in self.active if s != shard_id)
            async with self.svc.pool.acquire() as conn:
                leftover = await conn.fetchval(
                    "WITH m AS (UPDATE holds SET shard_id = $2 WHERE shard_id = $1 AND state = 'pending' "
                    "RETURNING 1) SELECT count(*) FROM m",
                    shard_id,
                    heir,
                )
            if leftover:  # holds on split accounts only: booked anywhere, the heir adopts them
                await self._port(heir).move("acquire", [])
            async with self.svc.pool.acquire() as conn:
                await repository.retire_shard(conn, shard_id)
            self.svc.shards.pop(shard_id, None)
            self.svc.poster.remove_shard(shard_id)
            self.active.remove(shard_id)
        return {"removed": shard_id, "moves": done, "slots_moved": sum(d["slots"] for d in done)}

    async def overview(self) -> dict[str, Any]:
        """`GET /admin/shards`: per shard its slots, queue depths and throughput."""
        slot_map = self.svc.slot_map
        owned: dict[int, list[int]] = {shard: [] for shard in self.active}
        for slot, shard in slot_map.as_rows():
            owned.setdefault(shard, []).append(slot)
        depths = self.svc.poster.queue_depths()

        async def one(shard_id: int) -> dict[str, Any]:
            try:
                status = await asyncio.wait_for(self.svc.shards[shard_id].status(), 3.0)
            except Exception:
                status = None
            ranges = slot_ranges(owned.get(shard_id, []))
            return {
                "shard_id": shard_id,
                "ok": status is not None,
                "slots": len(owned.get(shard_id, [])),
                "slot_ranges": [list(r) for r in ranges[:64]],
                "slot_ranges_truncated": len(ranges) > 64,
                "queue_depth": {
                    "front_end": depths.get(str(shard_id), 0),
                    "actor": (status or {}).get("queue_depth"),
                },
                "journals": (status or {}).get("journals"),
                "journals_per_s": (status or {}).get("journals_per_s"),
                "accounts": (status or {}).get("accounts"),
                "fenced_slots": (status or {}).get("fenced_slots"),
            }

        shards = await asyncio.gather(*(one(s) for s in sorted(self.active)))
        async with self.svc.pool.acquire() as conn:
            retired = [
                r[0] for r in await conn.fetch("SELECT shard_id FROM shards WHERE retired_at IS NOT NULL")
            ]
        return {
            "shards": shards,
            "retired": sorted(retired),
            "frozen_slots": sorted(self.svc.poster.frozen),
            "coordinator_queue_depth": depths.get("coordinator", 0),
            "moves_done": self.moves_done,
        }

    # -- one handoff -------------------------------------------------------------------------
    async def _move(self, move: Move) -> dict[str, Any]:
        slots = list(move.slots)
        source, target = self._port(move.source), self._port(move.target)
        started = time.perf_counter()
        poster = self.svc.poster
        poster.freeze(slots)
        switched = False
        try:
            await self._drain(source, move)
            holds = await self._switch(move)
            switched = True
            await _roll_forward(lambda: source.move("release", slots), f"release on shard {move.source}")
            await _roll_forward(lambda: target.move("acquire", slots), f"acquire on shard {move.target}")
        finally:
            if switched:
                slot_map = apply_moves(self.svc.slot_map, [move])
                self.svc.slot_map = slot_map  # the API's routing (holds, accounts) and
                poster.switch(slot_map)  # the postings' routing switch together (no await between)
                self.moves_done += 1
            else:
                try:
                    await source.move("unfence", slots)
                except Exception:  # it died: it restarts unfenced, from the unchanged map
                    log.warning("unfencing slots on shard %s failed", move.source, exc_info=True)
            poster.thaw(slots)
        elapsed_ms = round((time.perf_counter() - started) * 1000, 1)
        log.info("moved %s slots %s -> %s in %s ms", len(slots), move.source, move.target, elapsed_ms)
        return {"source": move.source, "target": move.target, "slots": len(slots), "holds": holds,
                "ms": elapsed_ms}  # fmt: skip

    async def _drain(self, source: MovableShard, move: Move) -> None:
        """Fence the slots on the source until it holds no reservation on them."""
        deadline = time.monotonic() + self.drain_timeout_s
        while True:
            answer = await source.move("fence", list(move.slots))
            if answer["reservations"] == 0:
                return
            if time.monotonic() > deadline:
                raise LedgerError(
                    ErrorCode.SERVICE_UNAVAILABLE,
                    f"shard {move.source} still holds prepared cross-shard parts on the slots; retry",
                    {"retryable": True, "txids": answer.get("txids", [])},
                )
            await asyncio.sleep(self.poll_s)

    async def _switch(self, move: Move) -> int:
        """The durable switch; an unknown outcome (connection lost at COMMIT) is read back."""
        try:
            async with self.svc.pool.acquire() as conn:
                return await repository.switch_slots(conn, move.slots, move.source, move.target)
        except repository.SlotMoveRefused as exc:
            raise LedgerError(ErrorCode.INVALID_STATE, str(exc), {"source": move.source}) from None
        except Exception:
            async with self.svc.pool.acquire() as conn:
                stored = await repository.load_slot_map(conn)
            if all(stored.get(slot) == move.target for slot in move.slots):
                return -1  # it did commit; how many holds moved is in `slot_moves`
            raise


def _planned(plan: Callable[[], Any]) -> Any:
    """Run a planner; an operator error becomes VALIDATION_ERROR (400)."""
    try:
        return plan()
    except PlanError as exc:
        raise LedgerError(ErrorCode.VALIDATION_ERROR, str(exc), {}) from None


async def _roll_forward(step: Callable[[], Awaitable[dict[str, Any]]], what: str) -> None:
    """After the switch a step must happen: retry it (a restarted shard answers from the new map)."""
    deadline = time.monotonic() + ROLL_FORWARD_TIMEOUT_S
    delay = 0.05
    while True:
        try:
            await step()
            return
        except Exception:
            if time.monotonic() > deadline:
                log.exception("%s kept failing; the shard will load the switched map when it restarts", what)
                return
            log.warning("%s failed; retrying", what, exc_info=True)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
