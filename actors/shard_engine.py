"""The shard engine: the single writer of one shard's accounts (wrapped by a Ray actor).

Every call (a batch of postings, a batch of PREPAREs or decisions, an account creation)
goes into one queue. One loop drains the queue: reservations and releases first (they
see only durable state), then one group commit for every posting and committed part that
arrived meanwhile: check each journal against the book, stamp time, chain position and
hash, write the whole batch in one PostgreSQL transaction, and only then apply it to the
book and answer. If the transaction fails, the book is untouched and every journal of the
batch is answered with a retryable error; nothing is half-written.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import asyncpg

from actors.messages import (
    CROSS_ITEMS,
    DECIDE_ITEMS,
    ENCODER,
    HOLD_ITEMS,
    POST_ITEMS,
    PREPARE_ITEMS,
    DecideItem,
    HoldItem,
    PostItem,
    PrepareItem,
    Result,
    Vote,
)
from actors.ports import SignerPort
from actors.shard_holds import ShardHolds
from actors.shard_moves import ShardMoves, moving
from ledger.accounts import AccountType, account_type_of
from ledger.book import Book, Staging
from ledger.errors import ErrorCode
from ledger.invariants import check
from ledger.timestamps import parse_rfc3339, rfc3339
from sharding.slots import slot_of
from sharding.twophase import Phase, stale_reservations
from signer.canonical import journal_digest, posted_body
from signer.merkle import root as merkle_root
from signer.statements import batch_statement
from store import repository
from store.repository import pg_microseconds
from store.writer import BatchRows, DuplicateJournals, PartsAlreadyApplied, commit_batch

log = logging.getLogger(__name__)

# Group-commit linger (see `_run`): when work was already waiting as the previous commit ended
# and the next batch holds fewer than LINGER_ITEMS journals, wait LINGER_S for more to join.
LINGER_S: Final = float(os.environ.get("LEDGER_SHARD_LINGER_MS", "2")) / 1000
LINGER_ITEMS: Final = 256


class SigningUnavailable(Exception):
    """The signer could not sign a batch; the batch was not written."""


class StateLost(Exception):
    """The engine can no longer trust its in-memory state (writer lock lost, commit outcome unknown)."""


def stop_serving(reason: str) -> None:
    """Default `on_state_lost` outside Ray: the engine stops; its owner builds a new one."""
    raise StateLost(reason)


Clock = Callable[[], datetime]


def utc_now() -> datetime:
    """The real clock (UTC)."""
    return datetime.now(UTC)


@dataclass(slots=True)
class _Work:
    kind: str
    items: list[Any]
    future: asyncio.Future[Any]


@dataclass(slots=True)
class _Pending:
    """One posting inside a batch, with where its answer goes."""

    item: PostItem
    work: int
    index: int


@dataclass(slots=True)
class _Batch:
    posts: list[_Pending] = field(default_factory=list)
    parts: list[tuple[DecideItem, int, int]] = field(default_factory=list)  # COMMITs of held reservations
    part_ids: set[str] = field(default_factory=set)
    resent: list[tuple[DecideItem, int, int]] = field(default_factory=list)  # COMMITs of no reservation


def _is_ok(answer: Any) -> bool:
    return isinstance(answer, Result) and answer.ok


def unavailable(journal_id: str, reason: str) -> Result:
    """A retryable failure: nothing was written for this journal."""
    return Result(
        journal_id, False, code=ErrorCode.SERVICE_UNAVAILABLE, message=reason, details={"retryable": True}
    )


class ShardEngine:
    """Owns the book of one shard and commits its postings in batches."""

    def __init__(
        self,
        shard_id: int,
        dsn: str,
        slots: list[int],
        *,
        batch_max: int = 8192,
        linger_s: float = LINGER_S,
        clock: Clock = utc_now,
        signer: SignerPort | None = None,
        hash_alg: str = "sha256",
    ) -> None:
        self.shard_id = shard_id
        self.dsn = dsn
        self.slots = slots
        self.batch_max = batch_max
        self.linger_s = linger_s
        self.linger_items = LINGER_ITEMS
        self.clock = clock
        self.signer = signer
        self.hash_alg = hash_alg
        self.batch_seq = 0
        self.book = Book()
        self.seq = 0
        self.head_hash: bytes | None = None
        self.last_posted_at = datetime.min.replace(tzinfo=UTC)
        self.queue: asyncio.Queue[_Work] = asyncio.Queue()
        self.pool: asyncpg.Pool | None = None
        self.lock_conn: asyncpg.Connection | None = None
        self.loop_task: asyncio.Task[None] | None = None
        self.sweep_task: asyncio.Task[None] | None = None
        self.sweep_every_s = 30.0
        self.holds = ShardHolds(self)
        self.expiry_task: asyncio.Task[None] | None = None
        self.expiry_every_s = 0.25
        self.committed_journals = 0
        self.batches = 0
        self.moves = ShardMoves(self)
        self.rate_samples: deque[tuple[float, int]] = deque(maxlen=32)
        # Called when the book may no longer match PostgreSQL; the Ray shell ends the process so
        # Ray restarts the actor, which re-takes the writer lock and rebuilds from PostgreSQL.
        self.on_state_lost: Callable[[str], None] = stop_serving
        self.lost: str | None = None

    # -- life cycle ------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect, rebuild the book from PostgreSQL, re-reserve in-doubt parts, start the loop."""
        self.lock_conn = await repository.hold_writer_lock(self.dsn, self.shard_id)
        self.pool = await repository.create_pool(
            self.dsn, 2, 3, writer=True, name=f"ledger-shard-{self.shard_id}"
        )
        async with self.pool.acquire() as conn:
            stored = await repository.shard_slots(conn, self.shard_id)
            if stored is not None:  # the stored slot map wins: a restart after a handoff
                self.slots = stored
            # Streamed in chunks: holding every record at once would leave ~235 B/account of
            # freed heap behind in the actor (docs/benchmarks.md, target 5).
            types = {str(t): t for t in AccountType}
            async for rows in repository.stream_accounts(conn, self.slots):
                for row in rows:
                    self.book.load_account(row[0], types[row[1]], row[2])
            async for rows in repository.stream_balances(conn, self.slots):
                for row in rows:
                    self.book.load_balance((row[0], row[1]), row[2:6])
            head = await repository.load_chain_head(conn, self.shard_id)
            self.seq, self.head_hash = head.seq, head.hash
            self.batch_seq = await conn.fetchval(
                "SELECT COALESCE(max(batch_seq), 0) FROM batches WHERE shard_id = $1", self.shard_id
            )
            for row in await repository.load_in_doubt(conn, self.shard_id):
                (item,) = CROSS_ITEMS.decode(row["request"])
                lines = item.parts.get(self.shard_id)
                if lines is not None:  # a transaction this shard takes part in
                    self.book.reserve(item.journal_id, lines, force=True)
            await self.holds.load(conn)
        self.loop_task = asyncio.create_task(self._run(), name=f"shard-{self.shard_id}")
        self.sweep_task = asyncio.create_task(self._sweep_loop(), name=f"shard-{self.shard_id}-sweep")
        self.expiry_task = asyncio.create_task(self._expiry_loop(), name=f"shard-{self.shard_id}-expiry")
        log.info("shard %s started: %s accounts, seq %s", self.shard_id, len(self.book.accounts), self.seq)

    async def close(self) -> None:
        """Stop the loop and the pool."""
        for task in (self.expiry_task, self.sweep_task, self.loop_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.pool is not None:
            await self.pool.close()
        if self.lock_conn is not None:
            await self.lock_conn.close()

    # -- calls -----------------------------------------------------------------------------
    async def _submit(self, kind: str, items: list[Any]) -> Any:
        if self.lost is not None:
            raise StateLost(self.lost)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.queue.put_nowait(_Work(kind, items, future))
        return await future

    async def post(self, payload: bytes) -> bytes:
        """Post a batch of single-shard journals; msgpack list of `Result` in order."""
        results = await self._submit("post", POST_ITEMS.decode(payload))
        return ENCODER.encode(results)

    async def prepare(self, payload: bytes) -> bytes:
        """Reserve cross-shard parts; msgpack list of votes (`messages.VOTES`: True = YES, else a refusal)."""
        return ENCODER.encode(await self._submit("prepare", PREPARE_ITEMS.decode(payload)))

    async def decide(self, payload: bytes) -> bytes:
        """Apply (commit) or release (abort) parts; msgpack list of acks (all True on return)."""
        return ENCODER.encode(await self._submit("decide", DECIDE_ITEMS.decode(payload)))

    async def create_account(self, account_id: str, no_negative: bool, split: bool = False) -> bytes:
        """Create an account explicitly with its policy; a `Result` (journal_id = account_id)."""
        return ENCODER.encode(await self._submit("account", [(account_id, no_negative, split)]))

    async def hold(self, payload: bytes) -> bytes:
        """Hold calls (create, post, void); msgpack list of `Result` in order (see shard_holds)."""
        return ENCODER.encode(await self._submit("hold", HOLD_ITEMS.decode(payload)))

    async def move(self, op: str, slots: list[int]) -> dict[str, Any]:
        """A handoff step (`fence`, `unfence`, `release`, `acquire`; see actors/shard_moves.py)."""
        answers = await self._submit("move", [(op, slots)])
        return answers[0]  # type: ignore[no-any-return]

    def _rate(self) -> float:
        """Journals committed per second over the last ~10 s of status calls."""
        now = time.monotonic()
        self.rate_samples.append((now, self.committed_journals))
        while len(self.rate_samples) > 2 and now - self.rate_samples[1][0] > 10:
            self.rate_samples.popleft()
        first_s, first = self.rate_samples[0]
        return round((self.committed_journals - first) / (now - first_s), 1) if now > first_s else 0.0

    def status(self) -> dict[str, Any]:
        """Queue depth and counters for /ready, /metrics and GET /admin/shards."""
        return {
            "slots": len(self.slots),
            "fenced_slots": len(self.moves.fenced),
            "journals_per_s": self._rate(),
            "shard_id": self.shard_id,
            "queue_depth": self.queue.qsize(),
            "accounts": len(self.book.accounts),
            "seq": self.seq,
            "journals": self.committed_journals,
            "batches": self.batches,
            "reservations": len(self.book.reservations),
            "holds": len(self.holds.open),
        }

    # -- the loop --------------------------------------------------------------------------
    async def _run(self) -> None:
        backlog = False  # was work already waiting when the previous group commit ended?
        while True:
            work = [await self.queue.get()]
            count = len(work[0].items)
            if backlog and count < self.linger_items and self.linger_s > 0:
                # Work arrives continuously: let a little more join this group commit. Each
                # commit costs a signature (a Ray call), a transaction and an fsync whatever its
                # size, so under many small requests a few ms of waiting buys much larger
                # batches. At light load the queue is empty after each commit: no waiting.
                await asyncio.sleep(self.linger_s)
            while not self.queue.empty() and count < self.batch_max:
                item = self.queue.get_nowait()
                work.append(item)
                count += len(item.items)
            if repository.writer_lock_lost(self.lock_conn):  # fenced: never write without the lock
                self._state_lost(work, "the writer lock's connection is gone")
            try:
                await self._process(work)
            except Exception as exc:  # the batch failed as a whole: answer everything retryable
                log.exception("shard %s batch failed", self.shard_id)
                for entry in work:
                    if not entry.future.done():
                        entry.future.set_exception(exc)
                if repository.is_connection_failure(exc):  # a COMMIT may have landed unacknowledged
                    self._state_lost(work, f"database connection failed mid-round: {exc!r}")
            backlog = not self.queue.empty()

    def _state_lost(self, work: list[_Work], reason: str) -> None:
        """Fail this round and everything queued, then hand over to `on_state_lost` (never returns)."""
        log.error("shard %s: %s; restarting from PostgreSQL", self.shard_id, reason)
        self.lost = reason
        while not self.queue.empty():
            work.append(self.queue.get_nowait())
        for entry in work:
            if not entry.future.done():
                entry.future.set_exception(StateLost(reason))
        self.on_state_lost(reason)
        raise StateLost(reason)  # `on_state_lost` must not return; stop the loop if it does

    async def _process(self, work: list[_Work]) -> None:
        answers: list[list[Any]] = [[None] * len(w.items) for w in work]
        batch = _Batch()
        if self.holds.due(self.clock()):  # once per round: expired holds are never counted as held
            await self._expire_holds()
        for w_index, entry in enumerate(work):
            if entry.kind == "prepare":
                answers[w_index] = [self._prepare_one(p) for p in entry.items]
            elif entry.kind == "hold":
                answers[w_index] = [await self._hold(item) for item in entry.items]
            elif entry.kind == "move":
                answers[w_index] = [await self.moves.handle(*entry.items[0])]
            elif entry.kind == "expire":
                answers[w_index] = [0]
            elif entry.kind == "sweep":
                answers[w_index] = [await self._sweep()]
            elif entry.kind == "account":
                answers[w_index] = [await self._create_account(*entry.items[0])]
            elif entry.kind == "decide":
                self._sort_decisions(entry.items, w_index, batch, answers)
            elif self.moves.fenced:  # a handoff fenced some slots: refuse postings touching them
                for i, item in enumerate(entry.items):
                    slots = self.moves.blocked(item.journal.lines)
                    if slots:
                        answers[w_index][i] = moving(item.journal_id, slots)
                    else:
                        batch.posts.append(_Pending(item, w_index, i))
            else:
                batch.posts.extend(_Pending(item, w_index, i) for i, item in enumerate(entry.items))
        if batch.posts or batch.parts:
            await self._group_commit(batch, answers)
        if batch.resent:
            await self._ack_resent(batch.resent, answers, work)
        for entry, answer in zip(work, answers, strict=True):
            if entry.future.done():
                continue
            failure = next((a for a in answer if isinstance(a, BaseException)), None)
            if failure is not None:
                entry.future.set_exception(failure)
            else:
                entry.future.set_result(answer)

    def _sort_decisions(
        self, decisions: list[DecideItem], w_index: int, batch: _Batch, answers: list[list[Any]]
    ) -> None:
        """ABORTs release at once; a COMMIT applies its part's reservation in this group commit.

        A COMMIT applies the lines reserved at PREPARE (the decision carries none). With no
        reservation held, or a second COMMIT of a part already in this batch, it is a resent COMMIT
        of a part applied before: `_ack_resent` checks the store after the group commit.
        """
        for i, decision in enumerate(decisions):
            txid = decision.txid
            if not decision.commit:
                self.book.release(txid)
                answers[w_index][i] = True
            elif txid in self.book.reservations and txid not in batch.part_ids:
                batch.parts.append((decision, w_index, i))
                batch.part_ids.add(txid)
            else:
                batch.resent.append((decision, w_index, i))

    async def _ack_resent(
        self, resent: list[tuple[DecideItem, int, int]], answers: list[list[Any]], work: list[_Work]
    ) -> None:
        """Acknowledge COMMITs of parts applied before (their chain link is stored).

        A part neither applied nor reserved means the book lost a reservation the log still holds:
        restart from PostgreSQL, which reloads it (`repository.load_in_doubt`); the coordinator
        resends the COMMIT. A part still reserved (the batch holding its first COMMIT failed, e.g.
        signing) fails the call, and the coordinator resends it.
        """
        assert self.pool is not None
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT journal_id FROM shard_links WHERE shard_id = $1 AND journal_id = ANY($2::text[])",
                self.shard_id,
                [d.txid for d, _, _ in resent],
            )
        applied = {r[0] for r in rows}
        lost: list[str] = []
        for decision, w, i in resent:
            if decision.txid in applied:
                answers[w][i] = True
            elif decision.txid in self.book.reservations:
                answers[w][i] = RuntimeError(f"part {decision.txid} is not applied yet; resend the COMMIT")
            else:
                lost.append(decision.txid)
        if lost:
            self._state_lost(work, f"COMMIT of {len(lost)} part(s) neither reserved nor applied: {lost[:3]}")

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_every_s)
            with contextlib.suppress(Exception):
                await self._submit("sweep", [None])

    async def _expiry_loop(self) -> None:
        while True:
            await asyncio.sleep(self.expiry_every_s)
            if self.holds.due(self.clock()):
                with contextlib.suppress(Exception):
                    await self._submit("expire", [None])

    async def _expire_holds(self) -> None:
        try:
            await self.holds.expire_due()
        except Exception:  # retried next round; meanwhile the hold stays counted (the safe side)
            log.exception("shard %s: expiring holds failed", self.shard_id)

    async def _sweep(self) -> int:
        """Release reservations whose transaction is finished in the log (see twophase.stale_reservations)."""
        held = list(self.book.reservations)
        if not held:
            return 0
        assert self.pool is not None
        async with self.pool.acquire() as conn:
            rows = await conn.fetch("SELECT txid, state FROM xtx WHERE txid = ANY($1::text[])", held)
        stale = stale_reservations(held, {r["txid"]: Phase(r["state"]) for r in rows})
        for txid in stale:
            self.book.release(txid)
        return len(stale)

    async def _hold(self, item: HoldItem) -> Result:
        if self.moves.fenced:
            slots = self.moves.blocked_hold(item)
            if slots:
                return moving(item.hold_id, slots)
        return await self.holds.handle(item)

    def _prepare_one(self, item: PrepareItem) -> Vote:
        if self.moves.fenced:
            slots = self.moves.blocked(item.lines)
            if slots:  # a NO vote: the coordinator aborts and answers SHARD_MOVING (retryable)
                return moving(item.txid, slots)
        rejection = self.book.reserve(item.txid, item.lines)
        if rejection is None:
            return True  # YES: one byte on the wire, thousands per round
        return Result(
            item.txid, False, code=rejection.code, message=rejection.message, details=rejection.details
        )

    async def _create_account(self, account_id: str, no_negative: bool, split: bool) -> Result:
        account_type = account_type_of(account_id)
        check(account_type is not None, f"create_account got a malformed id {account_id}")
        check(not (split and no_negative), "a split account cannot be overdraft-guarded")
        assert account_type is not None
        assert self.pool is not None
        fenced = self.moves.blocked_account(account_id)
        if fenced:  # its policy must reach the slot's next owner, which loads it from the store
            return moving(account_id, fenced)
        async with self.pool.acquire() as conn:  # the store knows `split`, the book does not
            created, stored, stored_split = await repository.create_account(
                conn, account_id, str(account_type), slot_of(account_id), no_negative, split
            )
        if self.book.account(account_id) is None:
            self.book.load_account(account_id, account_type, stored)
        if (stored, stored_split) != (no_negative, split):
            return Result(
                account_id,
                False,
                code=ErrorCode.IDEMPOTENCY_CONFLICT,
                message=f"account {account_id} exists with a different policy",
                details={"account_id": account_id, "no_negative": stored, "split": stored_split},
            )
        return Result(account_id, True, details={"created": created})

    # -- group commit ----------------------------------------------------------------------
    async def _group_commit(self, batch: _Batch, answers: list[list[Any]]) -> None:
        assert self.pool is not None
        async with self.pool.acquire() as conn:
            deferred = self._dedupe(batch)
            # No look-up before writing: a journal id or key that already exists makes the write
            # fail on the unique index (DuplicateJournals below), so the common batch of new
            # journals costs no extra query. Replays the book rejects are looked up afterwards.
            for _attempt in range(8):
                try:
                    await self._write(conn, batch, answers)
                    break
                except SigningUnavailable as exc:
                    self._answer_signing_failure(batch, answers, exc)
                    break
                except DuplicateJournals as exc:
                    dupes = [p for p in batch.posts if p.item.journal_id in exc.journal_ids]
                    batch.posts = [p for p in batch.posts if p.item.journal_id not in exc.journal_ids]
                    for p in dupes:
                        answers[p.work][p.index] = None
                    await self._answer_existing(conn, dupes, answers)
                except PartsAlreadyApplied as exc:
                    for part, w, i in batch.parts:
                        if part.txid in exc.journal_ids:
                            self.book.release(part.txid)
                            answers[w][i] = True
                    batch.parts = [p for p in batch.parts if p[0].txid not in exc.journal_ids]
            else:
                check(False, "group commit kept colliding with duplicates")
            # A journal the book rejected (or that failed signing) may be a replay of a stored
            # one: its stored result (or IDEMPOTENCY_CONFLICT) wins over the rejection.
            refused = [p for p in batch.posts if not _is_ok(answers[p.work][p.index])]
            await self._answer_existing(conn, refused, answers, must_exist=False)
            await self._answer_existing(conn, deferred, answers)

    @staticmethod
    def _answer_signing_failure(batch: _Batch, answers: list[list[Any]], exc: SigningUnavailable) -> None:
        """Nothing was written: postings get 500 SIGNING_FAILURE; the coordinator retries committed parts."""
        for p in batch.posts:
            if answers[p.work][p.index] is None:
                answers[p.work][p.index] = Result(
                    p.item.journal_id, False, code=ErrorCode.SIGNING_FAILURE, message=str(exc), details={}
                )
        for _part, w, i in batch.parts:
            answers[w][i] = exc

    def _dedupe(self, batch: _Batch) -> list[_Pending]:
        """Keep the first of journals sharing an id or idempotency key; the rest wait for it."""
        seen_ids: set[str] = set()
        seen_keys: set[tuple[str, str]] = set()
        keep: list[_Pending] = []
        deferred: list[_Pending] = []
        for pending in batch.posts:
            item = pending.item
            key = (item.principal, item.idem_key) if item.idem_key is not None else None
            if item.journal_id in seen_ids or (key is not None and key in seen_keys):
                deferred.append(pending)
                continue
            seen_ids.add(item.journal_id)
            if key is not None:
                seen_keys.add(key)
            keep.append(pending)
        batch.posts = keep
        return deferred

    async def _answer_existing(
        self,
        conn: asyncpg.Connection,
        posts: list[_Pending],
        answers: list[list[Any]],
        *,
        must_exist: bool = True,
    ) -> None:
        """Answer postings that collide with stored journals: replay, or IDEMPOTENCY_CONFLICT."""
        if not posts:
            return
        keyed = [p.item for p in posts if p.item.idem_key is not None]
        existing = await repository.find_existing(
            conn,
            [p.item.journal_id for p in posts],
            [i.principal for i in keyed],
            [i.idem_key for i in keyed if i.idem_key is not None],
        )
        by_id = {e.journal_id: e for e in existing}
        by_key = {(e.principal, e.idem_key): e for e in existing if e.idem_key is not None}
        for p in posts:
            item = p.item
            found = by_key.get((item.principal, item.idem_key)) if item.idem_key is not None else None
            found = found or by_id.get(item.journal_id)
            if found is None:
                if must_exist:
                    answers[p.work][p.index] = unavailable(
                        item.journal_id, "conflicting journal not found; retry"
                    )
            elif found.request_hash == item.request_hash and found.principal == item.principal:
                answers[p.work][p.index] = Result(
                    found.journal_id, True, rfc3339(found.posted_at), hash=found.hash
                )
            else:
                answers[p.work][p.index] = Result(
                    item.journal_id,
                    False,
                    code=ErrorCode.IDEMPOTENCY_CONFLICT,
                    message="journal_id or Idempotency-Key already used with a different payload",
                    details={"journal_id": found.journal_id},
                )

    def _stamp(self) -> datetime:
        now = max(self.clock(), self.last_posted_at + timedelta(microseconds=1))
        return now

    async def _write(self, conn: asyncpg.Connection, batch: _Batch, answers: list[list[Any]]) -> None:
        """Stage, write and apply one batch; rejected journals are answered, the rest committed."""
        staging = Staging()
        rows = BatchRows(self.shard_id)
        posted_at = self._stamp()
        stamp = rfc3339(posted_at)
        posted_us = pg_microseconds(posted_at)  # what the rows carry (see store.repository)
        seq, head = self.seq, self.head_hash
        first_seq = seq + 1
        leaves: list[bytes] = []
        accepted: list[tuple[_Pending, bytes]] = []
        for pending in batch.posts:
            item = pending.item
            rejection = self.book.stage(item.journal.lines, staging)
            if rejection is not None:
                answers[pending.work][pending.index] = Result(
                    item.journal_id,
                    False,
                    code=rejection.code,
                    message=rejection.message,
                    details=rejection.details,
                )
                continue
            seq += 1
            body = posted_body(item.journal, item.journal_id, item.principal, stamp)
            hashed = journal_digest(body, self.hash_alg)
            self._add_journal(rows, item, seq, posted_us, body, hashed, head)
            leaves.append(hashed)
            head = hashed
            accepted.append((pending, hashed))
        seq, head = self._add_parts(rows, batch, staging, seq, head, leaves)
        self._add_deltas(rows, staging)
        if leaves and self.signer is not None:
            rows.batch = await self._sign_batch(first_seq, seq, leaves, posted_at)
        if not rows.is_empty():
            started = time.perf_counter()
            await commit_batch(conn, rows)
            self.batches += 1
            log.debug("shard %s committed %s rows in %.1f ms", self.shard_id, len(rows.j_id),
                      (time.perf_counter() - started) * 1000)  # fmt: skip
        self.book.apply(staging)
        self.seq, self.head_hash, self.last_posted_at = seq, head, posted_at
        if rows.batch is not None:
            self.batch_seq = rows.batch[0]
        self.committed_journals += len(accepted) + len(batch.parts)
        for pending, hashed in accepted:
            answers[pending.work][pending.index] = Result(pending.item.journal_id, True, stamp, hash=hashed)
        for _part, w, i in batch.parts:
            answers[w][i] = True

    def _add_parts(
        self,
        rows: BatchRows,
        batch: _Batch,
        staging: Staging,
        seq: int,
        head: bytes | None,
        leaves: list[bytes],
    ) -> tuple[int, bytes | None]:
        """Stage the batch's committed cross-shard parts and add their links and lines to the chain."""
        part_stamps: dict[str, int] = {}  # the parts of one coordinator round share their posted_at
        reservations = self.book.reservations
        for part, _w, _i in batch.parts:
            lines = reservations[part.txid]  # a COMMIT applies what PREPARE reserved (`_sort_decisions`)
            self.book.stage_reserved(part.txid, lines, staging)
            seq += 1
            part_us = part_stamps.get(part.posted_at)
            if part_us is None:
                part_time = parse_rfc3339(part.posted_at)
                check(part_time is not None, "decision carries a malformed posted_at")
                assert part_time is not None
                part_us = part_stamps[part.posted_at] = pg_microseconds(part_time)
            rows.l_seq.append(seq)
            rows.l_journal_id.append(part.txid)
            rows.l_hash.append(part.hash)
            rows.l_prev_hash.append(head)
            leaves.append(part.hash)
            head = part.hash
            for line in lines:
                rows.lines.append(
                    (part.txid, line.line_no, self.shard_id, line.account_id, line.currency,
                     "D" if line.is_debit else "C", line.amount, part_us, True)
                )  # fmt: skip
        return seq, head

    async def _sign_batch(
        self, first_seq: int, last_seq: int, leaves: list[bytes], signed_at: datetime
    ) -> tuple[int, int, int, bytes, bytes, bytes, str, datetime]:
        """Merkle root of the batch's entries, signed by the signer before anything is written."""
        assert self.signer is not None
        root = merkle_root(leaves, self.hash_alg)
        batch_seq = self.batch_seq + 1
        statement = batch_statement(
            shard=self.shard_id, batch_seq=batch_seq, first_seq=first_seq, last_seq=last_seq,
            hash_alg=self.hash_alg, root=root, signed_at=rfc3339(signed_at), signer_kid="", signer="",
        )  # fmt: skip
        try:
            ((body, kid, signature),) = await self.signer.sign_statements([statement])
        except Exception as exc:
            raise SigningUnavailable(
                f"signing failed, nothing was written: {type(exc).__name__}: {exc}"
            ) from exc
        return (batch_seq, first_seq, last_seq, body, root, signature, kid, signed_at)

    def _add_journal(
        self, rows: BatchRows, item: PostItem, seq: int, posted_us: int, body: bytes, hashed: bytes,
        prev: bytes | None,
    ) -> None:  # fmt: skip
        journal = item.journal
        rows.j_id.append(item.journal_id)
        rows.j_seq.append(seq)
        rows.j_posted_at.append(posted_us)
        rows.j_effective_at.append(parse_rfc3339(journal.effective_at) if journal.effective_at else None)
        rows.j_principal.append(item.principal)
        rows.j_idem_key.append(item.idem_key)
        rows.j_request_hash.append(item.request_hash)
        rows.j_reverses.append(journal.reverses)
        rows.j_hash.append(hashed)
        rows.j_prev_hash.append(prev)
        rows.j_body.append(body)
        for line in journal.lines:
            rows.lines.append(
                (item.journal_id, line.line_no, self.shard_id, line.account_id, line.currency,
                 "D" if line.is_debit else "C", line.amount, posted_us, False)
            )  # fmt: skip

    @staticmethod
    def _add_deltas(rows: BatchRows, staging: Staging) -> None:
        for account_id, account_type in staging.new_accounts.items():
            rows.accounts.append((account_id, str(account_type), slot_of(account_id)))
        for (account_id, currency), (debits, credits) in staging.deltas.items():
            rows.deltas.append((account_id, currency, slot_of(account_id), debits, credits))
