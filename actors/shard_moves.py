"""Slot handoffs in the shard engine: fence, release and acquire slots (online resharding).

The orchestrator (`api/resharding.py`) moves slots S from shard A to shard B in steps; the
shard's part of each step runs in the shard's own queue, between group commits, so it is
ordered with every posting, PREPARE, decision and hold call (docs/ARCHITECTURE.md,
"Resharding"):

- `fence(S)` on A: from this point of A's queue on, postings, PREPAREs, hold calls and account
  creations touching S are refused with the retryable `SHARD_MOVING` (nothing written); the
  answer counts A's live reservations on S (prepared cross-shard parts whose decision A has not
  applied yet), after releasing those whose transaction is finished. The orchestrator repeats
  it until that count is 0 (the drain). Lines on split accounts are never fenced: every shard
  books them.
- `release(S)` on A, after the slot map was switched in PostgreSQL: A forgets S's accounts and
  the open holds that moved with them; S stays fenced on A, so a late call is refused, not
  booked.
- `acquire(S)` on B: B loads S's accounts, balances (posted and pending) and the open holds
  now recorded as its own from PostgreSQL, exactly what a restart with S would load, and
  takes S.
- `unfence(S)`: a move that was abandoned before the switch; A keeps S.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from actors.messages import HoldItem, Result
from ledger.accounts import AccountType
from ledger.errors import ErrorCode
from ledger.invariants import check
from ledger.journal import Line
from sharding.slots import slot_of
from sharding.twophase import Phase, stale_reservations
from store import repository

if TYPE_CHECKING:
    from actors.shard_engine import ShardEngine

log = logging.getLogger(__name__)


def moving(target: str, slots: set[int]) -> Result:
    """The retryable refusal of a call touching a fenced slot: nothing was written."""
    return Result(
        target, False, code=ErrorCode.SHARD_MOVING,
        message="an account of this journal is moving to another shard; retry with the same id",
        details={"retryable": True, "slots": sorted(slots)[:16]},
    )  # fmt: skip


class ShardMoves:
    """The fenced slots of one shard and the handoff steps (the engine's single writer runs them)."""

    def __init__(self, engine: ShardEngine) -> None:
        self.engine = engine
        self.fenced: set[int] = set()
        self.exempt: set[str] = set()  # split accounts in fenced slots: booked by every shard

    # -- the fence, on the hot path only while some slot is fenced ----------------------------
    def blocked(self, lines: tuple[Line, ...]) -> set[int]:
        """Fenced slots these lines touch (empty: go ahead)."""
        fenced, exempt = self.fenced, self.exempt
        return {
            slot
            for line in lines
            if (slot := slot_of(line.account_id)) in fenced and line.account_id not in exempt
        }

    def blocked_hold(self, item: HoldItem) -> set[int]:
        """Fenced slots a hold call touches: the lines it creates, or those of the open hold it resolves."""
        if item.journal is not None:
            return self.blocked(item.journal.lines)
        held = self.engine.holds.open.get(item.hold_id)
        return self.blocked(held.journal.lines) if held is not None else set()

    def blocked_account(self, account_id: str) -> set[int]:
        """The fenced slot of an account being created (split ones are created anywhere)."""
        slot = slot_of(account_id)
        return {slot} if slot in self.fenced else set()

    # -- steps -------------------------------------------------------------------------------
    async def handle(self, op: str, slots: list[int]) -> dict[str, Any]:
        """One handoff step (see the module docstring)."""
        wanted = set(slots)
        if op == "fence":
            return await self._fence(wanted)
        if op == "unfence":
            self.fenced -= wanted & set(self.engine.slots)
            return {"ok": True, "fenced": len(self.fenced)}
        if op == "release":
            return await self._release(wanted)
        check(op == "acquire", f"unknown handoff step {op}")
        return await self._acquire(wanted)

    def _reservations_on(self, slots: set[int]) -> list[str]:
        return [
            txid
            for txid, lines in self.engine.book.reservations.items()
            if any(slot_of(line.account_id) in slots for line in lines)
        ]

    async def _fence(self, slots: set[int]) -> dict[str, Any]:
        engine = self.engine
        own = set(engine.slots)
        check(
            slots <= own, f"shard {engine.shard_id} fencing slots it does not own: {sorted(slots - own)[:5]}"
        )
        assert engine.pool is not None
        async with engine.pool.acquire() as conn:
            exempt = await conn.fetch(
                "SELECT account_id FROM accounts WHERE split AND slot = ANY($1::integer[])", sorted(slots)
            )
            self.fenced |= slots
            self.exempt |= {r[0] for r in exempt}
            held = self._reservations_on(slots)
            if held:  # a duplicate PREPARE may have reserved for a finished transaction: release it
                rows = await conn.fetch("SELECT txid, state FROM xtx WHERE txid = ANY($1::text[])", held)
                for txid in stale_reservations(held, {r["txid"]: Phase(r["state"]) for r in rows}):
                    engine.book.release(txid)
        live = self._reservations_on(slots)
        return {"ok": True, "reservations": len(live), "txids": live[:8]}

    async def _release(self, wanted: set[int]) -> dict[str, Any]:
        engine = self.engine
        slots = wanted & set(engine.slots)  # after a restart from the switched map: none left
        check(slots <= self.fenced, "releasing slots that were not fenced")
        live = self._reservations_on(slots)
        check(not live, f"releasing slots with live reservations {live[:3]} (the drain was skipped)")
        assert engine.pool is not None
        async with engine.pool.acquire() as conn:
            gone = await conn.fetch(
                "SELECT hold_id FROM holds WHERE hold_id = ANY($1::text[]) AND shard_id <> $2",
                list(engine.holds.open),
                engine.shard_id,
            )
        engine.holds.drop([r[0] for r in gone])
        forgotten = engine.book.forget(
            [a for a in engine.book.accounts if slot_of(a) in slots and a not in self.exempt]
        )
        engine.slots = sorted(set(engine.slots) - slots)
        log.info("shard %s released %s slots (%s accounts, %s holds)", engine.shard_id, len(slots),
                 forgotten, len(gone))  # fmt: skip
        return {"ok": True, "accounts": forgotten, "holds": len(gone)}

    async def _acquire(self, slots: set[int]) -> dict[str, Any]:
        engine = self.engine
        assert engine.pool is not None
        book = engine.book
        types = {str(t): t for t in AccountType}
        accounts = 0
        engine.slots = sorted(set(engine.slots) | slots)
        ordered = sorted(slots)
        async with engine.pool.acquire() as conn:
            async for rows in repository.stream_accounts(conn, ordered):
                for row in rows:
                    book.load_account(row[0], types[row[1]], row[2])
                accounts += len(rows)
            async for rows in repository.stream_balances(conn, ordered):
                for row in rows:
                    book.load_balance((row[0], row[1]), row[2:6])
            adopted = await engine.holds.adopt(conn)
        self.fenced -= slots
        self.exempt = {a for a in self.exempt if slot_of(a) in self.fenced}
        log.info("shard %s acquired %s slots (%s accounts, %s holds)", engine.shard_id, len(slots),
                 accounts, adopted)  # fmt: skip
        return {"ok": True, "accounts": accounts, "holds": adopted}
