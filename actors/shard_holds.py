"""Holds in the shard engine: create, post, void and expire pending amounts (REQUIREMENTS L6).

A hold is handled by the shard that owns its accounts, between group commits, one hold call
per transaction (holds are not on the posting hot path and never add work to it):

- create: checked like a posting against the book (overdraft guard, counting pending and
  reserved amounts), then the hold row, its lines and the pending columns of `balances` are
  written in one transaction, and only then the book's pending columns are updated;
- post: the hold becomes a normal journal (id = hold id) with the posted (possibly smaller)
  amounts, chained, hashed and signed like any other (a batch of one), written with the release
  of the pending amounts and the hold's new state in one transaction;
- void / expire: the pending amounts are released and the state set in one transaction.

Open holds are kept in memory (`OpenHold`) and reloaded at start from `holds`; the balances'
pending columns come back with the book. A hold past `expires_at` is expired before any other
work of the shard's next round (so the guard never counts it) and by a timer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

import asyncpg
import msgspec

from actors.messages import ENCODER, JOURNAL, HoldItem, PostItem, Result
from ledger.book import Staging
from ledger.errors import ErrorCode
from ledger.invariants import check
from ledger.journal import Journal
from ledger.timestamps import parse_rfc3339, rfc3339
from sharding.slots import slot_of
from signer.canonical import journal_digest, posted_body, request_hash
from store import holds_repo, repository
from store.repository import pg_microseconds
from store.writer import BatchRows, DuplicateJournals, commit_batch

if TYPE_CHECKING:
    from actors.shard_engine import ShardEngine

log = logging.getLogger(__name__)

REQUESTED_STATE = {"post": "posted", "void": "voided"}


@dataclass(slots=True)
class OpenHold:
    """A pending hold as its shard keeps it: the journal held and its expiry."""

    journal: Journal
    expires_at: datetime | None


def _failure(target: str, code: ErrorCode, message: str, **details: object) -> Result:
    return Result(target, False, code=code, message=message, details=dict(details))


def _pending_rows(staging: Staging) -> list[holds_repo.PendingDelta]:
    return [
        (account_id, currency, slot_of(account_id), debits, credits)
        for (account_id, currency), (debits, credits) in staging.pending.items()
        if debits or credits
    ]


def _answer(hold_id: str, at: datetime, state: str, posted_journal_id: str | None = None) -> Result:
    details: dict[str, object] = {"state": state}
    if posted_journal_id is not None:
        details["posted_journal_id"] = posted_journal_id
    return Result(hold_id, True, rfc3339(at), details=details)


class ShardHolds:
    """The open holds of one shard and the operations on them (the engine's single writer runs them)."""

    def __init__(self, engine: ShardEngine) -> None:
        self.engine = engine
        self.open: dict[str, OpenHold] = {}
        self.next_expiry: datetime | None = None

    async def load(self, conn: asyncpg.Connection) -> None:
        """Reload the shard's open holds.

        Their pending amounts come back with the balances of the shard's own slots. A line on a
        split account homed in another shard's slot is the exception: its one `balances` row is
        loaded by that shard, so this shard re-adds the pending amounts of its own open holds on
        it (without them, posting or voiding such a hold after a restart would take this shard's
        in-memory pending figure below zero)."""
        await self.adopt(conn)

    async def adopt(self, conn: asyncpg.Connection) -> int:
        """Load the open holds `holds` gives this shard that it does not hold yet: all of them at
        start, those that came with acquired slots in a handoff (see `load` for split lines).
        Returns how many were adopted."""
        own = set(self.engine.slots)
        foreign = Staging()
        adopted = 0
        for row in await holds_repo.open_holds(conn, self.engine.shard_id):
            if row["hold_id"] in self.open:
                continue
            adopted += 1
            journal = JOURNAL.decode(row["journal"])
            self.open[row["hold_id"]] = OpenHold(journal, row["expires_at"])
            elsewhere = tuple(ln for ln in journal.lines if slot_of(ln.account_id) not in own)
            if elsewhere:
                check(
                    self.engine.book.hold(elsewhere, foreign) is None,
                    "a held line on another shard's slot must be on an unguarded (split) account",
                )
        self.engine.book.apply(foreign)
        self._reschedule()
        return adopted

    def drop(self, hold_ids: list[str]) -> None:
        """Forget open holds another shard owns now (they moved with their slots)."""
        for hold_id in hold_ids:
            del self.open[hold_id]
        self._reschedule()

    def _reschedule(self) -> None:
        expiries = [h.expires_at for h in self.open.values() if h.expires_at is not None]
        self.next_expiry = min(expiries) if expiries else None

    def due(self, now: datetime) -> bool:
        """True when some open hold has expired (one comparison: checked once per round)."""
        return self.next_expiry is not None and self.next_expiry <= now

    async def expire_due(self) -> int:
        """Expire every open hold past its `expires_at`; how many were expired."""
        now = self.engine.clock()
        due = [h for h, o in self.open.items() if o.expires_at is not None and o.expires_at <= now]
        if not due:
            return 0
        pool = self.engine.pool
        assert pool is not None
        async with pool.acquire() as conn:
            for hold_id in due:
                await self._release(conn, hold_id, "expired", None)
        return len(due)

    async def handle(self, item: HoldItem) -> Result:
        """One hold call; a store failure answers 503 (retryable), nothing half-written."""
        pool = self.engine.pool
        assert pool is not None
        try:
            async with pool.acquire() as conn:
                if item.kind == "create":
                    return await self._create(conn, item)
                return await self._resolve(conn, item)
        except Exception as exc:
            log.exception("hold %s %s failed", item.kind, item.hold_id)
            return Result(
                item.hold_id, False, code=ErrorCode.SERVICE_UNAVAILABLE,
                message=f"hold {item.kind} failed, nothing was written: {type(exc).__name__}",
                details={"retryable": True},
            )  # fmt: skip

    # -- create ----------------------------------------------------------------------------
    async def _create(self, conn: asyncpg.Connection, item: HoldItem) -> Result:
        journal = item.journal
        check(journal is not None, "a hold create carries its journal")
        assert journal is not None
        found = await holds_repo.find_holds(conn, item.hold_id, item.principal, item.idem_key)
        if found:
            return self._replay_create(item, found)
        if await repository.journal_exists(conn, item.hold_id):
            return _failure(
                item.hold_id, ErrorCode.IDEMPOTENCY_CONFLICT,
                "a journal with this id exists; a hold id becomes its posted journal's id",
                journal_id=item.hold_id,
            )  # fmt: skip
        staging = Staging()
        rejection = self.engine.book.hold(journal.lines, staging)
        if rejection is not None:
            return Result(
                item.hold_id, False, code=rejection.code, message=rejection.message, details=rejection.details
            )
        created_at = self.engine.clock()
        expires_at = parse_rfc3339(item.expires_at) if item.expires_at else None
        rows = BatchRows(self.engine.shard_id)
        rows.accounts.extend((a, str(t), slot_of(a)) for a, t in staging.new_accounts.items())
        hold = (item.hold_id, self.engine.shard_id, item.principal, item.idem_key, item.request_hash,
                ENCODER.encode(journal), expires_at, created_at)  # fmt: skip
        lines = [(ln.line_no, ln.account_id, ln.currency, "D" if ln.is_debit else "C", ln.amount)
                 for ln in journal.lines]  # fmt: skip

        async def write(c: asyncpg.Connection) -> None:
            await holds_repo.insert_hold(c, hold, lines)
            await holds_repo.add_pending(c, _pending_rows(staging))

        await commit_batch(conn, rows, write)
        self.engine.book.apply(staging)
        self.open[item.hold_id] = OpenHold(journal, expires_at)
        self._reschedule()
        return _answer(item.hold_id, created_at, "pending")

    @staticmethod
    def _replay_create(item: HoldItem, found: list[asyncpg.Record]) -> Result:
        by_key = [r for r in found if item.idem_key is not None and r["idem_key"] == item.idem_key]
        row = (by_key or found)[0]
        if row["request_hash"] == item.request_hash and row["principal"] == item.principal:
            return _answer(row["hold_id"], row["created_at"], "pending")
        return _failure(
            item.hold_id, ErrorCode.IDEMPOTENCY_CONFLICT,
            "hold id or Idempotency-Key already used with a different payload", hold_id=row["hold_id"],
        )  # fmt: skip

    # -- post / void -----------------------------------------------------------------------
    async def _resolve(self, conn: asyncpg.Connection, item: HoldItem) -> Result:
        hold = self.open.get(item.hold_id)
        if hold is not None and hold.expires_at is not None and hold.expires_at <= self.engine.clock():
            await self._release(conn, item.hold_id, "expired", None)
            hold = None
        if hold is None:
            return await self._answer_closed(conn, item)
        if item.kind == "void":
            return await self._release(conn, item.hold_id, "voided", item.request_hash)
        check(item.kind == "post", f"unknown hold call {item.kind}")
        return await self._post(conn, item, hold)

    async def _answer_closed(self, conn: asyncpg.Connection, item: HoldItem) -> Result:
        """A call on a hold that is not open here: a replay, INVALID_STATE or NOT_FOUND."""
        row = await holds_repo.hold_row(conn, item.hold_id)
        if row is None:
            return _failure(item.hold_id, ErrorCode.NOT_FOUND, f"no hold {item.hold_id}",
                            resource="hold", id=item.hold_id)  # fmt: skip
        state, requested = row["state"], REQUESTED_STATE[item.kind]
        if state == "pending":  # owned by another shard, or not loaded yet: let the caller retry
            return _failure(item.hold_id, ErrorCode.SERVICE_UNAVAILABLE, "hold not open on this shard; retry",
                            retryable=True)  # fmt: skip
        if state == requested and row["resolve_hash"] == item.request_hash:
            return _answer(item.hold_id, row["resolved_at"], state, row["posted_journal_id"])
        return _failure(
            item.hold_id, ErrorCode.INVALID_STATE,
            f"hold {item.hold_id} is {state}; it cannot be {requested}"
            + (" again with a different request" if state == requested else ""),
            hold_id=item.hold_id, current_state=state, requested_state=requested,
        )  # fmt: skip

    async def _release(
        self, conn: asyncpg.Connection, hold_id: str, state: str, resolve_hash: bytes | None
    ) -> Result:
        """Void or expire an open hold: release its pending amounts and set its state, in one transaction."""
        hold = self.open[hold_id]
        staging = Staging()
        self.engine.book.stage_hold_release(hold.journal.lines, staging)
        at = self.engine.clock()
        async with conn.transaction():
            await holds_repo.add_pending(conn, _pending_rows(staging))
            await holds_repo.resolve_hold(conn, hold_id, state, at, resolve_hash, None)
        self.engine.book.apply(staging)
        del self.open[hold_id]
        self._reschedule()
        return _answer(hold_id, at, state)

    async def _post(self, conn: asyncpg.Connection, item: HoldItem, hold: OpenHold) -> Result:
        """The hold becomes a normal journal: chained, hashed and signed (a batch of one)."""
        engine = self.engine
        staging = Staging()
        engine.book.stage_hold_post(hold.journal.lines, item.lines, staging)
        journal = msgspec.structs.replace(hold.journal, journal_id=item.hold_id, lines=item.lines)
        posted_at = engine._stamp()
        stamp = rfc3339(posted_at)
        seq = engine.seq + 1
        body = posted_body(journal, item.hold_id, item.principal, stamp)
        hashed = journal_digest(body, engine.hash_alg)
        rows = BatchRows(engine.shard_id)
        post = PostItem(journal, item.hold_id, item.principal, None, request_hash(journal))
        engine._add_journal(rows, post, seq, pg_microseconds(posted_at), body, hashed, engine.head_hash)
        engine._add_deltas(rows, staging)
        if engine.signer is not None:
            try:
                rows.batch = await engine._sign_batch(seq, seq, [hashed], posted_at)
            except Exception as exc:  # SigningUnavailable: nothing was written
                return _failure(item.hold_id, ErrorCode.SIGNING_FAILURE, str(exc))

        async def write(c: asyncpg.Connection) -> None:
            await holds_repo.add_pending(c, _pending_rows(staging))
            await holds_repo.resolve_hold(
                c, item.hold_id, "posted", posted_at, item.request_hash, item.hold_id
            )

        try:
            await commit_batch(conn, rows, write)
        except DuplicateJournals:
            return _failure(
                item.hold_id, ErrorCode.IDEMPOTENCY_CONFLICT,
                "a journal with the hold's id was posted meanwhile; void the hold", journal_id=item.hold_id,
            )  # fmt: skip
        engine.book.apply(staging)
        engine.seq, engine.head_hash, engine.last_posted_at = seq, hashed, posted_at
        if rows.batch is not None:
            engine.batch_seq = rows.batch[0]
        engine.committed_journals += 1
        engine.batches += 1
        del self.open[item.hold_id]
        self._reschedule()
        answer = _answer(item.hold_id, posted_at, "posted", item.hold_id)
        return msgspec.structs.replace(answer, hash=hashed)
