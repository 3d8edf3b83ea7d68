"""The cross-shard coordinator: two-phase commit over shard engines, in batches.

A round takes every cross-shard journal queued since the last round and runs:
intent (one INSERT into the `xtx` log) -> PREPARE (one call per participant shard) ->
durable decision (one COPY of the committing ones' journal rows: that row is the commit
record, an abort writes nothing) -> COMMIT/ABORT (one call per shard, retried until
acknowledged) -> DONE (one DELETE of the finished ones' log rows). The decision's COPY is
the commit point (presumed abort).

Up to `rounds_max` rounds (default 3) are in flight at once (a round logs and prepares while
earlier ones decide and send their decisions). Their decision transactions take turns
(`_decide_lock`), and each takes its coordinator-stream positions and `posted_at` inside
its turn, so the stream's journals become visible in sequence order. A journal id or
idempotency key belongs to at most one live round: a later round answers its copy from
the store once the owning round is over.

A recovery pass, at start and periodically, finishes every logged transaction that no
live round owns: one with its journal row is committed, any other aborted.
See docs/ARCHITECTURE.md, "Cross-shard journals".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import asyncpg
import msgspec

from actors.messages import (
    CROSS_CALLS,
    ENCODER,
    MSGPACK_ONE_ITEM_ARRAY,
    RAW_ITEMS,
    VOTES,
    CrossCall,
    DecideItem,
    PrepareOut,
    Result,
)
from actors.ports import ShardPort
from actors.shard_engine import Clock, StateLost, stop_serving, unavailable, utc_now
from ledger.errors import ErrorCode
from ledger.invariants import check
from ledger.timestamps import parse_rfc3339, rfc3339
from sharding.twophase import CoordinatorTx, Decision, Phase, logged_decision
from signer.canonical import journal_digest, posted_body
from store import repository
from store.repository import COORDINATOR_STREAM, Existing, find_existing, hold_writer_lock, pg_microseconds
from store.writer import JOURNAL_COLUMNS, JOURNALS_UNIQUE

log = logging.getLogger(__name__)

# Rounds in flight (see the module docstring); the front end sends as many calls at once
# (`LEDGER_COORDINATOR_IN_FLIGHT`, api/posting.py), so the two knobs go together. Three keep the
# shards and PostgreSQL busy while a round waits on another hop (docs/benchmarks.md, "Sixth session").
ROUNDS_MAX: Final = int(os.environ.get("LEDGER_COORDINATOR_ROUNDS", "3"))

# Intents go in by COPY (PostgreSQL: 4.3 against 9.8 µs per row for the INSERT below, see
# docs/benchmarks.md "Sixth session") after one probe for stored journals of the round's ids.
# COPY cannot skip rows: an id whose earlier attempt is still logged fails it on `xtx_pkey` (rare),
# and the round then logs its intents with the INSERT, which skips those ids. No ON CONFLICT
# there: the coordinator is the only writer of `xtx` and a round's ids are its own (`_dedupe`),
# so the NOT EXISTS probes are exact.
_XTX_COLUMNS = ("txid", "state", "request")  # the participants are the keys of the request's parts
_STORED = "SELECT journal_id FROM journals WHERE journal_id = ANY($1::text[])"
_INSERT_INTENTS = """
INSERT INTO xtx (txid, state, request)
SELECT t.txid, 'preparing', t.request
  FROM unnest($1::text[], $2::bytea[]) AS t(txid, request)
 WHERE NOT EXISTS (SELECT 1 FROM xtx x WHERE x.txid = t.txid)
   AND NOT EXISTS (SELECT 1 FROM journals j WHERE j.journal_id = t.txid)
RETURNING txid
"""

_INSERT_JOURNALS = """
INSERT INTO journals (journal_id, stream_id, stream_seq, posted_at, effective_at, principal, idem_key,
                      request_hash, reverses, hash, prev_hash, body)
SELECT j.id, $1, j.seq, $2, j.effective_at, j.principal, j.idem_key, j.request_hash, j.reverses, j.hash,
       NULL, j.body
  FROM unnest($3::text[], $4::bigint[], $5::timestamptz[], $6::text[], $7::text[], $8::bytea[], $9::text[],
              $10::bytea[], $11::bytea[])
       AS j(id, seq, effective_at, principal, idem_key, request_hash, reverses, hash, body)
ON CONFLICT DO NOTHING
RETURNING journal_id
"""


# Every participant acknowledged: the transaction is finished and leaves the log (migration 0023).
_FORGET = "DELETE FROM xtx WHERE txid = ANY($1::text[])"

# Every finished transaction leaves a dead `xtx` row behind. Left to autovacuum (or to nobody, where
# it is off), the log grows by ~250 MB per 30 s of cross-shard traffic at 12,000 journals/s: the
# recovery pass's scan and the intents' index inserts slow down, and the table crowds shared
# buffers. So the coordinator vacuums it itself after every `XTX_VACUUM_ROWS` forgotten rows, in the
# background: VACUUM's lock does not conflict with the rounds' INSERT and DELETE, and TRUNCATE false
# skips the end step that would take an exclusive lock to give empty pages back to the file system
# (the freed space is reused by the next intents instead). Measured in docs/benchmarks.md.
_VACUUM = "VACUUM (SKIP_LOCKED, TRUNCATE false) xtx"
XTX_VACUUM_ROWS: Final = 50_000

# Logged transactions with their outcome: the coordinator-stream journal row is the commit record.
_OPEN = """
SELECT x.txid, x.request, j.hash, j.posted_at FROM xtx x
  LEFT JOIN journals j ON j.journal_id = x.txid AND j.stream_id = -1
 WHERE x.txid = ANY($1::text[])
"""


@dataclass(slots=True)
class _Round:
    """One cross-shard journal inside a round (`raw`: its msgpack bytes as the caller sent them)."""

    item: CrossCall
    raw: msgspec.Raw
    tx: CoordinatorTx
    result: Result | None = None
    hash: bytes = b""
    posted_at: str = ""


IdemKey = tuple[str, str]
_Call = tuple[list[tuple[CrossCall, msgspec.Raw]], asyncio.Future[list[Result]]]


@dataclass(slots=True)
class _Work:
    """One round as `_run` opens it: the queued calls, their entries, and what this round owns."""

    calls: list[_Call]
    entries: list[_Round]
    later: list[_Round]
    ids: set[str]
    keys: set[IdemKey]
    earlier: list[asyncio.Task[None]]


class CoordinatorEngine:
    """Runs two-phase commit for journals that touch several shards."""

    def __init__(
        self,
        dsn: str,
        shards: Mapping[int, ShardPort],
        *,
        clock: Clock = utc_now,
        batch_max: int = 8192,
        rounds_max: int = ROUNDS_MAX,
        decide_timeout_s: float = 60.0,
        recovery_every_s: float = 5.0,
        hash_alg: str = "sha256",
        vacuum_rows: int = XTX_VACUUM_ROWS,
    ) -> None:
        self.dsn = dsn
        self.hash_alg = hash_alg
        self.shards = shards  # kept as given: the Ray shell's mapping resolves new shards by name
        self.clock = clock
        self.batch_max = batch_max
        check(rounds_max >= 1, "the coordinator needs at least one round in flight")
        self.rounds_max = rounds_max
        self.decide_timeout_s = decide_timeout_s
        self.recovery_every_s = recovery_every_s
        self.seq = 0
        self.seq_known = False  # False after a failed decision: reload the position before the next one
        self.last_posted_at = datetime.min.replace(tzinfo=UTC)
        self.queue: asyncio.Queue[_Call] = asyncio.Queue()
        self.in_flight: set[str] = set()  # journal ids owned by live rounds
        self.keys_in_flight: set[IdemKey] = set()  # (principal, idempotency key) owned by live rounds
        self.rounds: set[asyncio.Task[None]] = set()
        self._decide_lock = asyncio.Lock()
        self.pool: asyncpg.Pool | None = None
        self.lock_conn: asyncpg.Connection | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.outcomes = {
            "commit": 0, "abort": 0, "recovered_commit": 0, "recovered_abort": 0, "xtx_vacuums": 0,
            "xtx_vacuum_failures": 0,
        }  # fmt: skip
        self.vacuum_rows = vacuum_rows
        self.forgotten = 0  # `xtx` rows deleted since the last vacuum started
        self.vacuum_task: asyncio.Task[None] | None = None
        self.on_state_lost: Callable[[str], None] = stop_serving  # the Ray shell restarts the actor
        self.phase_s: dict[str, float] = {}  # wall time per round phase, summed over rounds

    @contextlib.contextmanager
    def _timed(self, phase: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.phase_s[phase] = self.phase_s.get(phase, 0.0) + time.perf_counter() - started

    async def start(self) -> None:
        """Connect, load the stream position, start the round loop and the recovery loop."""
        self.lock_conn = await hold_writer_lock(self.dsn, COORDINATOR_STREAM)
        # Each round holds at most one connection at a time; one more for the recovery pass, one for
        # the log's vacuum.
        self.pool = await repository.create_pool(
            self.dsn, 2, self.rounds_max + 3, writer=True, name="ledger-coordinator"
        )
        async with self.pool.acquire() as conn:
            await self._load_seq(conn)
        self.tasks = [
            asyncio.create_task(self._run(), name="coordinator-rounds"),
            asyncio.create_task(self._recovery_loop(), name="coordinator-recovery"),
        ]

    async def close(self) -> None:
        """Stop the loops, the rounds in flight and the pool."""
        for task in [*self.tasks, *self.rounds, *([self.vacuum_task] if self.vacuum_task else [])]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.pool is not None:
            await self.pool.close()
        if self.lock_conn is not None:
            await self.lock_conn.close()

    async def submit(self, payload: bytes) -> bytes:
        """Post a batch of cross-shard journals; msgpack list of `Result` in order."""
        future: asyncio.Future[list[Result]] = asyncio.get_running_loop().create_future()
        with self._timed("decode"):
            # Each item with its own bytes: the intent logs them as they came. The parts' lines stay
            # msgpack (`CrossCall`): PREPARE forwards them as they came.
            items = list(zip(CROSS_CALLS.decode(payload), RAW_ITEMS.decode(payload), strict=True))
        self.queue.put_nowait((items, future))
        results = await future
        with self._timed("encode"):
            return ENCODER.encode(results)

    def status(self) -> dict[str, Any]:
        """Queue depth and 2PC outcome counters."""
        return {"queue_depth": self.queue.qsize(), "in_flight": len(self.in_flight), **self.outcomes}

    # -- rounds ----------------------------------------------------------------------------
    async def _run(self) -> None:
        slots = asyncio.Semaphore(self.rounds_max)

        def finished(task: asyncio.Task[None]) -> None:
            self.rounds.discard(task)
            slots.release()

        while True:
            await slots.acquire()
            calls = [await self.queue.get()]
            if repository.writer_lock_lost(self.lock_conn):  # fenced: never decide without the lock
                log.error("coordinator: the writer lock's connection is gone; restarting from PostgreSQL")
                for _, future in calls:
                    future.set_exception(StateLost("coordinator writer lock lost"))
                self.on_state_lost("coordinator writer lock lost")
                raise StateLost("coordinator writer lock lost")
            count = len(calls[0][0])
            while not self.queue.empty() and count < self.batch_max:
                entry = self.queue.get_nowait()
                calls.append(entry)
                count += len(entry[0])
            work = self._open(calls)  # synchronous: rounds claim their ids in the order they start
            task = asyncio.create_task(self._serve(work), name="coordinator-round")
            self.rounds.add(task)
            task.add_done_callback(finished)

    def _open(self, calls: list[_Call]) -> _Work:
        """Build a round and claim its journal ids and keys (see `_dedupe`)."""
        entries = [
            _Round(item, raw, CoordinatorTx(item.journal_id, frozenset(item.parts)))
            for batch, _ in calls
            for item, raw in batch
        ]
        work = _Work(calls, entries, [], set(), set(), [])
        deferred = self._dedupe(work)
        if deferred:
            work.earlier = list(self.rounds)
        self.in_flight |= work.ids
        self.keys_in_flight |= work.keys
        return work

    async def _serve(self, work: _Work) -> None:
        """Run one round and answer its calls."""
        items = [e.item for e in work.entries]
        try:
            results = await self._round(work)
        except Exception:
            log.exception("coordinator round failed; recovery will finish its transactions")
            results = [unavailable(i.journal_id, "coordinator round failed; retry") for i in items]
        finally:
            self.in_flight -= work.ids
            self.keys_in_flight -= work.keys
        offset = 0
        for batch, future in work.calls:
            if not future.done():
                future.set_result(results[offset : offset + len(batch)])
            offset += len(batch)

    async def _round(self, work: _Work) -> list[Result]:
        """Log, prepare, decide and send; then answer replays and conflicts from the store.

        Nothing is looked up before the intents: a replayed cross-shard id already has its `xtx`
        row (the intents INSERT skips it), and an id or key of another stored journal makes its
        journal row conflict at the decision (it aborts). Whatever did not commit in this round
        is looked up once at the end (`_answer_existing`).
        """
        assert self.pool is not None
        entries = work.entries
        later = {id(e) for e in work.later}
        async with self.pool.acquire() as conn:
            with self._timed("intents"):
                live = await self._log_intents(conn, [e for e in entries if id(e) not in later])
        with self._timed("prepare"):
            await self._prepare(live)
        with self._timed("decide"):
            await self._decide(live)
        with self._timed("send"):
            await self._send_decisions(live)
        async with self.pool.acquire() as conn:
            done = [e.item.journal_id for e in live if e.tx.phase is Phase.DONE]
            with self._timed("done"):
                await conn.execute(_FORGET, done)
            self._forgot(len(done))
            if not work.earlier:
                with self._timed("answer"):
                    await self._answer_existing(conn, entries)
        if work.earlier:  # entries left to earlier rounds are answered once those are over
            await asyncio.wait(work.earlier)
            async with self.pool.acquire() as conn:
                await self._answer_existing(conn, entries)
        return [e.result or unavailable(e.item.journal_id, "not posted; retry") for e in entries]

    def _dedupe(self, work: _Work) -> bool:
        """Claim the first of the entries sharing an id or key; the others wait in `work.later`.

        An entry whose id or key a live round already owns also waits: it is answered from the store
        after that round (returns True when there is such an entry). A journal therefore never is in
        two live rounds, and a replay sent while the original is in flight gets the original's answer.
        """
        seen: set[str] = set()
        seen_keys: set[IdemKey] = set()
        deferred = False
        for e in work.entries:
            key = e.item.journal_id
            idem = (e.item.principal, e.item.idem_key) if e.item.idem_key is not None else None
            if key in self.in_flight or (idem is not None and idem in self.keys_in_flight):
                work.later.append(e)
                deferred = True
            elif key in seen or (idem is not None and idem in seen_keys):
                work.later.append(e)
            else:
                work.ids.add(key)
                if idem is not None:
                    work.keys.add(idem)
            seen.add(key)
            if idem is not None:
                seen_keys.add(idem)
        return deferred

    async def _answer_existing(self, conn: asyncpg.Connection, entries: list[_Round]) -> None:
        """Answer every entry that did not commit in this round and collides with a stored journal.

        One look-up for all of them (NO votes, aborts, ids whose `xtx` row exists, entries left to
        an earlier round): a stored journal with the same id or (principal, key) answers with its
        stored result (a replay) or IDEMPOTENCY_CONFLICT. A replay of a cross-shard journal whose
        transaction is not finished yet (some part not applied) answers "retry" instead.
        """
        pending = [
            e
            for e in entries
            if e.tx.decision is not Decision.COMMIT and (e.result is None or not e.result.ok)
        ]
        if not pending:
            return
        keyed = [e.item for e in pending if e.item.idem_key is not None]
        existing = await find_existing(
            conn,
            [e.item.journal_id for e in pending],
            [i.principal for i in keyed],
            [i.idem_key for i in keyed if i.idem_key is not None],
        )
        if not existing:
            return
        by_id = {x.journal_id: x for x in existing}
        by_key = {(x.principal, x.idem_key): x for x in existing if x.idem_key is not None}
        replays: list[tuple[_Round, Existing]] = []
        for e in pending:
            item = e.item
            found = by_key.get((item.principal, item.idem_key)) if item.idem_key is not None else None
            found = found or by_id.get(item.journal_id)
            if found is None:
                continue
            if found.request_hash == item.request_hash and found.principal == item.principal:
                replays.append((e, found))
            else:
                e.result = Result(
                    item.journal_id,
                    False,
                    code=ErrorCode.IDEMPOTENCY_CONFLICT,
                    message="journal_id or Idempotency-Key already used with a different payload",
                    details={"journal_id": found.journal_id},
                )
        if not replays:
            return
        unfinished = {
            r[0]
            for r in await conn.fetch(
                "SELECT txid FROM xtx WHERE txid = ANY($1::text[])",
                [found.journal_id for _, found in replays],
            )
        }
        for e, found in replays:
            if found.journal_id in unfinished:
                e.result = unavailable(e.item.journal_id, "a previous attempt is being resolved; retry")
            else:
                e.result = Result(found.journal_id, True, rfc3339(found.posted_at), hash=found.hash)

    async def _log_intents(self, conn: asyncpg.Connection, live: list[_Round]) -> list[_Round]:
        """Log the intents; an id with an `xtx` row (unfinished) or a stored journal (a replay) is skipped.

        One probe for stored journals, then one COPY; an id still logged by an unfinished attempt
        fails the COPY, and the INSERT then skips it (see `_INSERT_INTENTS`). A log row beside an
        older journal of the same id would read as committed (`recover`), hence the probe.
        """
        if not live:
            return live
        stored = {r[0] for r in await conn.fetch(_STORED, [e.item.journal_id for e in live])}
        fresh = [e for e in live if e.item.journal_id not in stored] if stored else live
        # The request as `ENCODER.encode([e.item])`, without encoding again: the item's bytes as they came.
        records = [(e.item.journal_id, "preparing", MSGPACK_ONE_ITEM_ARRAY + e.raw) for e in fresh]
        try:
            if records:
                await conn.copy_records_to_table("xtx", records=records, columns=_XTX_COLUMNS)
            logged = {r[0] for r in records}
        except asyncpg.UniqueViolationError as exc:
            if exc.constraint_name != "xtx_pkey":
                raise
            inserted = await conn.fetch(_INSERT_INTENTS, [r[0] for r in records], [r[2] for r in records])
            logged = {r[0] for r in inserted}
        for e in live:
            if e.item.journal_id not in logged:
                e.result = unavailable(e.item.journal_id, "a previous attempt is being resolved; retry")
        return [e for e in live if e.item.journal_id in logged]

    async def _prepare(self, live: list[_Round]) -> None:
        per_shard: dict[int, list[_Round]] = {}
        for e in live:
            for shard in e.item.parts:
                per_shard.setdefault(shard, []).append(e)

        async def ask(shard: int, group: list[_Round]) -> None:
            payload = ENCODER.encode([PrepareOut(e.item.journal_id, e.item.parts[shard]) for e in group])
            try:
                votes = VOTES.decode(await self.shards[shard].prepare(payload))
            except Exception as exc:
                log.warning("prepare on shard %s failed: %s", shard, exc)
                for e in group:
                    e.tx.on_failure(shard)
                    e.result = e.result or unavailable(e.item.journal_id, f"shard {shard} unavailable; retry")
                return
            check(len(votes) == len(group), "a shard answered a different number of votes")
            for e, vote in zip(group, votes, strict=True):
                if vote is True:
                    e.tx.on_vote(shard, True)
                    continue
                check(isinstance(vote, Result) and not vote.ok, "a NO vote must carry its refusal")
                assert isinstance(vote, Result)
                e.tx.on_vote(shard, False)
                if e.result is None:
                    e.result = Result(e.item.journal_id, False, code=vote.code, message=vote.message,
                                      details=vote.details)  # fmt: skip

        await asyncio.gather(*(ask(shard, group) for shard, group in per_shard.items()))

    def _stamp(self) -> datetime:
        self.last_posted_at = max(self.clock(), self.last_posted_at + timedelta(microseconds=1))
        return self.last_posted_at

    async def _load_seq(self, conn: asyncpg.Connection) -> None:
        self.seq = await conn.fetchval(
            "SELECT COALESCE(max(stream_seq), 0) FROM journals WHERE stream_id = $1", COORDINATOR_STREAM
        )
        self.seq_known = True

    async def _decide(self, live: list[_Round]) -> None:
        """The commit point: journal rows of the committing ones plus every decision, in one transaction.

        Decisions take turns: a round takes its stream positions and `posted_at` and commits inside its
        turn, so the coordinator stream becomes visible in sequence (and time) order.
        """
        if not live:
            return
        assert self.pool is not None
        async with self.pool.acquire() as conn, self._decide_lock:
            if not self.seq_known:  # a failed decision may or may not have committed
                await self._load_seq(conn)
            posted_at = self._stamp()
            stamp = rfc3339(posted_at)
            posted_us = pg_microseconds(posted_at)  # what the rows carry (see store.repository)
            committing = [e for e in live if e.tx.proposal is Decision.COMMIT]
            records: list[tuple[Any, ...]] = []
            for seq, e in enumerate(committing, start=self.seq + 1):
                item = e.item
                body = posted_body(item.journal, item.journal_id, item.principal, stamp)
                e.hash, e.posted_at = journal_digest(body, self.hash_alg), stamp
                records.append((item.journal_id, COORDINATOR_STREAM, seq, posted_us, _effective(item),
                                item.principal, item.idem_key, item.request_hash, item.journal.reverses,
                                e.hash, None, body))  # fmt: skip
            self.seq_known = False
            inserted, positions = await self._commit_point(conn, records, posted_at)
            self.seq += positions
            self.seq_known = True
        for e in live:
            if e.item.journal_id in inserted:
                e.tx.decided(Decision.COMMIT)
                e.result = Result(e.item.journal_id, True, stamp, hash=e.hash)
            else:
                e.tx.decided(Decision.ABORT)
        self.outcomes["commit"] += len(inserted)
        self.outcomes["abort"] += len(live) - len(inserted)

    async def _commit_point(
        self,
        conn: asyncpg.Connection,
        records: list[tuple[Any, ...]],
        posted_at: datetime,
    ) -> tuple[set[str], int]:
        """Write the decision; returns the committed ids and how many stream positions were used.

        A journal row whose id or key is stored already (a replay with a new server id and the same
        key, an id of a single-shard journal, a race with another writer) fails the COPY. Those rows
        are then looked up and left out (their transactions abort; the round answers them from the
        store), and the rest get their positions again, so the coordinator stream stays gap-free.
        If rows keep colliding, the INSERT ... ON CONFLICT DO NOTHING skips them (leaving gaps).
        """
        for _attempt in range(3):
            try:
                return await self._write_decision(conn, records, posted_at, copy=True), len(records)
            except asyncpg.UniqueViolationError as exc:
                if exc.constraint_name not in JOURNALS_UNIQUE:
                    raise
            keyed = [r for r in records if r[6] is not None]
            existing = await find_existing(
                conn, [r[0] for r in records], [r[5] for r in keyed], [r[6] for r in keyed]
            )
            ids = {x.journal_id for x in existing}
            keys = {(x.principal, x.idem_key) for x in existing if x.idem_key is not None}
            kept = [r for r in records if r[0] not in ids and (r[5], r[6]) not in keys]
            records = [(r[0], r[1], seq, *r[3:]) for seq, r in enumerate(kept, start=self.seq + 1)]
        return await self._write_decision(conn, records, posted_at, copy=False), len(records)

    @staticmethod
    async def _write_decision(
        conn: asyncpg.Connection,
        records: list[tuple[Any, ...]],
        posted_at: datetime,
        *,
        copy: bool,
    ) -> set[str]:
        """The decision: one statement; returns the ids whose journal row went in (they commit).

        The coordinator-stream journal row is the commit record (migration 0023): a logged
        transaction with that row committed, one without it aborts (presumed abort), so nothing
        else is written here. With `copy`, every row goes in by COPY (an existing id or key aborts
        it with a unique violation); otherwise by INSERT ... ON CONFLICT DO NOTHING, which skips the
        existing ones. Either is a single statement, hence atomic without an explicit transaction.
        """
        if not records:
            return set()
        if copy:
            await conn.copy_records_to_table("journals", records=records, columns=JOURNAL_COLUMNS)
            return {r[0] for r in records}
        ids, _, seqs, _, *middle, _, bodies = (list(column) for column in zip(*records, strict=True))
        rows = await conn.fetch(_INSERT_JOURNALS, COORDINATOR_STREAM, posted_at, ids, seqs, *middle, bodies)
        return {r[0] for r in rows}

    async def _send_decisions(self, live: list[_Round]) -> None:
        """Send COMMIT/ABORT to every participant, retrying each shard until it acknowledges."""
        per_shard: dict[int, list[tuple[_Round, DecideItem]]] = {}
        for e in live:
            decision = _decide_item(e)  # the same for every participant
            for shard in e.item.parts:
                per_shard.setdefault(shard, []).append((e, decision))

        async def tell(shard: int, group: list[tuple[_Round, DecideItem]]) -> None:
            payload = ENCODER.encode([decision for _, decision in group])
            if await self._call_decide(shard, payload):
                for e, _ in group:
                    e.tx.on_ack(shard)

        await asyncio.gather(*(tell(shard, group) for shard, group in per_shard.items()))
        for e in live:
            if e.tx.phase is not Phase.DONE and e.result is not None and e.result.ok:
                e.result = unavailable(e.item.journal_id, "committed; a participant is recovering")

    async def _call_decide(self, shard: int, payload: bytes) -> bool:
        delay = 0.05
        deadline = asyncio.get_running_loop().time() + self.decide_timeout_s
        while True:
            try:
                await self.shards[shard].decide(payload)
                return True
            except Exception as exc:
                if asyncio.get_running_loop().time() > deadline:
                    log.error("shard %s did not acknowledge decisions: %s", shard, exc)
                    return False
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    # -- recovery --------------------------------------------------------------------------
    async def _recovery_loop(self) -> None:
        while True:
            try:
                await self.recover()
            except Exception:
                log.exception("coordinator recovery pass failed")
            await asyncio.sleep(self.recovery_every_s)

    async def recover(self) -> int:
        """Finish every open transaction that no live round owns; returns how many were finished.

        A logged transaction whose journal row is in the coordinator stream committed; any other
        is presumed aborted (`sharding.twophase.logged_decision`). Its decision is resent until
        every participant acknowledged, then its row leaves the log.
        """
        assert self.pool is not None
        busy = set(self.in_flight)
        async with self.pool.acquire() as conn:
            txids = [r[0] for r in await conn.fetch("SELECT txid FROM xtx")]
            # A round owning a row at any time during the read may have moved it on since: leave it.
            busy |= self.in_flight
            txids = [t for t in txids if t not in busy]
            if not txids:
                return 0
            rows = await conn.fetch(_OPEN, txids)
        finished: list[str] = []
        for row in rows:
            decision = logged_decision(committed=row["hash"] is not None)
            (item,) = CROSS_CALLS.decode(row["request"])
            ok = await self._resend(item, decision, row["hash"], row["posted_at"])
            if ok:
                finished.append(item.journal_id)
                self.outcomes[f"recovered_{decision}"] += 1
        async with self.pool.acquire() as conn:
            await conn.execute(_FORGET, finished)
        self._forgot(len(finished))
        return len(finished)

    def _forgot(self, rows: int) -> None:
        """Count deleted log rows; past `vacuum_rows`, vacuum the log in the background (one at a time)."""
        self.forgotten += rows
        if self.forgotten >= self.vacuum_rows and (self.vacuum_task is None or self.vacuum_task.done()):
            self.forgotten = 0
            self.vacuum_task = asyncio.create_task(self._vacuum(), name="coordinator-xtx-vacuum")

    async def _vacuum(self) -> None:
        assert self.pool is not None
        try:
            async with self.pool.acquire() as conn:
                await conn.execute(_VACUUM)
            self.outcomes["xtx_vacuums"] += 1
        except Exception as exc:  # a failed vacuum costs space, never correctness: the next one retries
            self.outcomes["xtx_vacuum_failures"] += 1
            log.warning("coordinator: VACUUM of the xtx log failed: %s", exc)

    async def _resend(self, item: CrossCall, decision: Decision, hashed: bytes | None, posted: Any) -> bool:
        commit = decision is Decision.COMMIT
        check(not commit or hashed is not None, f"committed transaction {item.journal_id} has no journal row")
        stamp = rfc3339(posted) if commit else ""
        payload = ENCODER.encode([DecideItem(item.journal_id, commit, bytes(hashed or b""), stamp)])
        acks = await asyncio.gather(*(self._call_decide(shard, payload) for shard in item.parts))
        return all(acks)


def _effective(item: CrossCall) -> datetime | None:
    return parse_rfc3339(item.journal.effective_at) if item.journal.effective_at else None


def _decide_item(e: _Round) -> DecideItem:
    """The decision for every participant of `e` (a COMMIT applies the part each one reserved)."""
    return DecideItem(e.item.journal_id, e.tx.decision is Decision.COMMIT, e.hash, e.posted_at)
