"""The cross-shard coordinator: two-phase commit over shard engines, in batches.

A round takes every cross-shard journal queued since the last round and runs:
intent (one INSERT into the `xtx` log) -> PREPARE (one call per participant shard) ->
durable decision (one transaction that inserts the journal rows of the committing ones
and records commit/abort for all) -> COMMIT/ABORT (one call per shard, retried until
acknowledged) -> DONE. The decision transaction is the commit point (presumed abort).
A recovery pass, at start and periodically, finishes every logged transaction that no
live round owns: PREPARING ones are aborted, decided ones have their decision resent.
See docs/ARCHITECTURE.md, "Cross-shard journals".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from actors.messages import (
    CROSS_ITEMS,
    ENCODER,
    RESULTS,
    CrossItem,
    DecideItem,
    PrepareItem,
    Result,
)
from actors.ports import ShardPort
from actors.shard_engine import Clock, unavailable, utc_now
from ledger.errors import ErrorCode
from ledger.invariants import check
from ledger.timestamps import parse_rfc3339, rfc3339
from sharding.twophase import CoordinatorTx, Decision, Phase, recovery_decision
from signer.canonical import canonical, journal_digest, posted_journal
from store import repository
from store.repository import COORDINATOR_STREAM, find_existing, hold_writer_lock

log = logging.getLogger(__name__)

_INSERT_INTENTS = """
INSERT INTO xtx (txid, state, participants, request)
SELECT t.txid, 'preparing', string_to_array(t.participants, ',')::integer[], t.request
  FROM unnest($1::text[], $2::text[], $3::bytea[]) AS t(txid, participants, request)
ON CONFLICT (txid) DO UPDATE
   SET state = 'preparing', participants = EXCLUDED.participants, request = EXCLUDED.request,
       created_at = now(), decided_at = NULL
 WHERE xtx.state = 'done' AND NOT EXISTS (SELECT 1 FROM journals j WHERE j.journal_id = xtx.txid)
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

_DECIDE = """
UPDATE xtx SET state = CASE WHEN txid = ANY($1::text[]) THEN 'commit' ELSE 'abort' END, decided_at = $3
 WHERE txid = ANY($2::text[]) AND state = 'preparing'
"""


@dataclass(slots=True)
class _Round:
    """One cross-shard journal inside a round."""

    item: CrossItem
    tx: CoordinatorTx
    result: Result | None = None
    hash: bytes = b""
    posted_at: str = ""


class CoordinatorEngine:
    """Runs two-phase commit for journals that touch several shards."""

    def __init__(
        self,
        dsn: str,
        shards: Mapping[int, ShardPort],
        *,
        clock: Clock = utc_now,
        batch_max: int = 8192,
        decide_timeout_s: float = 60.0,
        recovery_every_s: float = 5.0,
        hash_alg: str = "sha256",
    ) -> None:
        self.dsn = dsn
        self.hash_alg = hash_alg
        self.shards = dict(shards)
        self.clock = clock
        self.batch_max = batch_max
        self.decide_timeout_s = decide_timeout_s
        self.recovery_every_s = recovery_every_s
        self.seq = 0
        self.last_posted_at = datetime.min.replace(tzinfo=UTC)
        self.queue: asyncio.Queue[tuple[list[CrossItem], asyncio.Future[list[Result]]]] = asyncio.Queue()
        self.in_flight: set[str] = set()
        self.pool: asyncpg.Pool | None = None
        self.lock_conn: asyncpg.Connection | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.outcomes = {"commit": 0, "abort": 0, "recovered_commit": 0, "recovered_abort": 0}

    async def start(self) -> None:
        """Connect, load the stream position, start the round loop and the recovery loop."""
        self.lock_conn = await hold_writer_lock(self.dsn, COORDINATOR_STREAM)
        self.pool = await repository.create_pool(self.dsn, 2, 4)
        async with self.pool.acquire() as conn:
            self.seq = await conn.fetchval(
                "SELECT COALESCE(max(stream_seq), 0) FROM journals WHERE stream_id = $1", COORDINATOR_STREAM
            )
        self.tasks = [
            asyncio.create_task(self._run(), name="coordinator-rounds"),
            asyncio.create_task(self._recovery_loop(), name="coordinator-recovery"),
        ]

    async def close(self) -> None:
        """Stop the loops and the pool."""
        for task in self.tasks:
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
        self.queue.put_nowait((CROSS_ITEMS.decode(payload), future))
        return ENCODER.encode(await future)

    def status(self) -> dict[str, Any]:
        """Queue depth and 2PC outcome counters."""
        return {"queue_depth": self.queue.qsize(), "in_flight": len(self.in_flight), **self.outcomes}

    # -- rounds ----------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            work = [await self.queue.get()]
            count = len(work[0][0])
            while not self.queue.empty() and count < self.batch_max:
                entry = self.queue.get_nowait()
                work.append(entry)
                count += len(entry[0])
            items = [item for batch, _ in work for item in batch]
            try:
                results = await self._round(items)
            except Exception:
                log.exception("coordinator round failed; recovery will finish its transactions")
                results = [unavailable(i.journal_id, "coordinator round failed; retry") for i in items]
            finally:
                self.in_flight.difference_update(i.journal_id for i in items)
            offset = 0
            for batch, future in work:
                if not future.done():
                    future.set_result(results[offset : offset + len(batch)])
                offset += len(batch)

    async def _round(self, items: list[CrossItem]) -> list[Result]:
        assert self.pool is not None
        entries = [_Round(item, CoordinatorTx(item.journal_id, frozenset(item.parts))) for item in items]
        later = {id(e) for e in self._dedupe(entries)}
        async with self.pool.acquire() as conn:
            await self._answer_existing(conn, [e for e in entries if id(e) not in later])
            live = [e for e in entries if e.result is None and id(e) not in later]
            live = await self._log_intents(conn, live)
            await self._prepare(live)
            await self._decide(conn, live)
        await self._send_decisions(live)
        async with self.pool.acquire() as conn:
            done = [e.item.journal_id for e in live if not e.tx.unacked()]
            await conn.execute(
                "UPDATE xtx SET state = 'done' WHERE txid = ANY($1::text[]) AND state IN ('commit', 'abort')",
                done,
            )
            await self._answer_existing(conn, [e for e in entries if e.result is None])
        return [e.result or unavailable(e.item.journal_id, "not posted; retry") for e in entries]

    def _dedupe(self, entries: list[_Round]) -> list[_Round]:
        """Keep the first of entries sharing an id or key; the others are answered after the round."""
        seen: set[str] = set()
        seen_keys: set[tuple[str, str]] = set()
        later: list[_Round] = []
        for e in entries:
            key = e.item.journal_id
            idem = (e.item.principal, e.item.idem_key) if e.item.idem_key is not None else None
            if key in self.in_flight:
                e.result = unavailable(key, "the same journal is being recovered; retry")
            elif key in seen or (idem is not None and idem in seen_keys):
                later.append(e)
            seen.add(key)
            if idem is not None:
                seen_keys.add(idem)
        self.in_flight.update(seen)
        return later

    async def _answer_existing(self, conn: asyncpg.Connection, entries: list[_Round]) -> None:
        pending = [e for e in entries if e.result is None]
        if not pending:
            return
        keyed = [e.item for e in pending if e.item.idem_key is not None]
        existing = await find_existing(
            conn,
            [e.item.journal_id for e in pending],
            [i.principal for i in keyed],
            [i.idem_key for i in keyed if i.idem_key is not None],
        )
        by_id = {x.journal_id: x for x in existing}
        by_key = {(x.principal, x.idem_key): x for x in existing if x.idem_key is not None}
        for e in pending:
            item = e.item
            found = by_key.get((item.principal, item.idem_key)) if item.idem_key is not None else None
            found = found or by_id.get(item.journal_id)
            if found is None:
                continue
            if found.request_hash == item.request_hash and found.principal == item.principal:
                e.result = Result(found.journal_id, True, rfc3339(found.posted_at), hash=found.hash)
            else:
                e.result = Result(
                    item.journal_id,
                    False,
                    code=ErrorCode.IDEMPOTENCY_CONFLICT,
                    message="journal_id or Idempotency-Key already used with a different payload",
                    details={"journal_id": found.journal_id},
                )

    async def _log_intents(self, conn: asyncpg.Connection, live: list[_Round]) -> list[_Round]:
        if not live:
            return live
        inserted = await conn.fetch(
            _INSERT_INTENTS,
            [e.item.journal_id for e in live],
            [",".join(str(s) for s in sorted(e.item.parts)) for e in live],
            [ENCODER.encode([e.item]) for e in live],
        )
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
            payload = ENCODER.encode([PrepareItem(e.item.journal_id, e.item.parts[shard]) for e in group])
            try:
                votes = RESULTS.decode(await self.shards[shard].prepare(payload))
            except Exception as exc:
                log.warning("prepare on shard %s failed: %s", shard, exc)
                for e in group:
                    e.tx.on_failure(shard)
                    e.result = e.result or unavailable(e.item.journal_id, f"shard {shard} unavailable; retry")
                return
            check(len(votes) == len(group), "a shard answered a different number of votes")
            for e, vote in zip(group, votes, strict=True):
                e.tx.on_vote(shard, vote.ok)
                if not vote.ok and e.result is None:
                    e.result = Result(e.item.journal_id, False, code=vote.code, message=vote.message,
                                      details=vote.details)  # fmt: skip

        await asyncio.gather(*(ask(shard, group) for shard, group in per_shard.items()))

    def _stamp(self) -> datetime:
        self.last_posted_at = max(self.clock(), self.last_posted_at + timedelta(microseconds=1))
        return self.last_posted_at

    async def _decide(self, conn: asyncpg.Connection, live: list[_Round]) -> None:
        """The commit point: journal rows of the committing ones plus every decision, in one transaction."""
        if not live:
            return
        posted_at = self._stamp()
        stamp = rfc3339(posted_at)
        committing = [e for e in live if e.tx.proposal is Decision.COMMIT]
        seq = self.seq
        bodies: list[bytes] = []
        for e in committing:
            body = canonical(posted_journal(e.item.journal, e.item.journal_id, e.item.principal, stamp))
            e.hash, e.posted_at = journal_digest(body, self.hash_alg), stamp
            bodies.append(body)
        seqs = list(range(seq + 1, seq + 1 + len(committing)))
        async with conn.transaction():
            inserted: set[str] = set()
            if committing:
                rows = await conn.fetch(
                    _INSERT_JOURNALS,
                    COORDINATOR_STREAM,
                    posted_at,
                    [e.item.journal_id for e in committing],
                    seqs,
                    [_effective(e.item) for e in committing],
                    [e.item.principal for e in committing],
                    [e.item.idem_key for e in committing],
                    [e.item.request_hash for e in committing],
                    [e.item.journal.reverses for e in committing],
                    [e.hash for e in committing],
                    bodies,
                )
                inserted = {r[0] for r in rows}
            await conn.execute(_DECIDE, list(inserted), [e.item.journal_id for e in live], posted_at)
        self.seq = seq + len(committing)
        for e in live:
            decision = Decision.COMMIT if e.item.journal_id in inserted else Decision.ABORT
            e.tx.decided(decision)
            self.outcomes[str(decision)] += 1
            if decision is Decision.COMMIT:
                e.result = Result(e.item.journal_id, True, stamp, hash=e.hash)

    async def _send_decisions(self, live: list[_Round]) -> None:
        """Send COMMIT/ABORT to every participant, retrying each shard until it acknowledges."""
        per_shard: dict[int, list[_Round]] = {}
        for e in live:
            for shard in e.item.parts:
                per_shard.setdefault(shard, []).append(e)

        async def tell(shard: int, group: list[_Round]) -> None:
            payload = ENCODER.encode([_decide_item(e, shard) for e in group])
            if await self._call_decide(shard, payload):
                for e in group:
                    e.tx.on_ack(shard)

        await asyncio.gather(*(tell(shard, group) for shard, group in per_shard.items()))
        for e in live:
            if e.tx.unacked() and e.result is not None and e.result.ok:
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
        """Finish every open transaction that no live round owns; returns how many were finished."""
        assert self.pool is not None
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT x.txid, x.state, x.request, j.hash, j.posted_at FROM xtx x "
                "LEFT JOIN journals j ON j.journal_id = x.txid WHERE x.state <> 'done'"
            )
            rows = [r for r in rows if r["txid"] not in self.in_flight]
            if not rows:
                return 0
            stale = [r["txid"] for r in rows if r["state"] == Phase.PREPARING]
            await conn.execute(
                "UPDATE xtx SET state = 'abort', decided_at = now() WHERE txid = ANY($1::text[]) "
                "AND state = 'preparing'",
                stale,
            )
        finished: list[str] = []
        for row in rows:
            decision = recovery_decision(Phase(row["state"]))
            if decision is None:
                continue
            (item,) = CROSS_ITEMS.decode(row["request"])
            ok = await self._resend(item, decision, row["hash"], row["posted_at"])
            if ok:
                finished.append(item.journal_id)
                self.outcomes[f"recovered_{decision}"] += 1
        async with self.pool.acquire() as conn:
            await conn.execute(
                "UPDATE xtx SET state = 'done' WHERE txid = ANY($1::text[]) AND state IN ('commit', 'abort')",
                finished,
            )
        return len(finished)

    async def _resend(self, item: CrossItem, decision: Decision, hashed: bytes | None, posted: Any) -> bool:
        commit = decision is Decision.COMMIT
        check(not commit or hashed is not None, f"committed transaction {item.journal_id} has no journal row")
        stamp = rfc3339(posted) if commit else ""
        acks = await asyncio.gather(
            *(
                self._call_decide(
                    shard,
                    ENCODER.encode([DecideItem(item.journal_id, commit, lines, bytes(hashed or b""), stamp)]),
                )
                for shard, lines in item.parts.items()
            )
        )
        return all(acks)


def _effective(item: CrossItem) -> datetime | None:
    return parse_rfc3339(item.journal.effective_at) if item.journal.effective_at else None


def _decide_item(e: _Round, shard: int) -> DecideItem:
    return DecideItem(
        e.item.journal_id, e.tx.decision is Decision.COMMIT, e.item.parts[shard], e.hash, e.posted_at
    )
