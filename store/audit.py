"""The audit-event stream: one hash-chained, signed event per state-changing API call (DECISIONS D1).

`AuditWriter` is the single writer of the stream (one per node, in the front-end process; it holds
the session advisory lock of writer -2 for its whole life). `record()` queues an event and returns
once it is durable. One loop group-commits everything queued (like a shard): it assigns `seq`,
builds each event's `body` (canonical JSON of ``{seq, actor_id, event_type, payload, prev_hash,
created_at}``, `prev_hash` lower-case hex or null, `created_at` RFC 3339 with microseconds, `Z`),
`hash = H(body)` (H: the ledger's `hash_alg`, SHA-256 by default, see `store.settings`), links
`prev_hash` to the previous event's hash, has the signer sign one batch statement (``shard = -2``,
``first_seq..last_seq``, `root` = RFC 9162 Merkle root, in the same algorithm, whose leaf data are
the 32-byte event hashes, `signed_at` = the batch's `created_at`) and writes the events
and the `batches` row in one transaction. The payload is stored once, inside `body` (the row's
`payload` column is NULL since migration 0027; SQL readers use `audit_payload(payload, body)`).
The signer's checkpoints then take audit batches into the global log exactly like shard batches.
Without a signer (signing disabled) events are still chained but no batch row is written.

Failure semantics (who decides what):

* If signing fails, nothing of the batch is written, the chain head does not move and every
  `record()` of the batch raises `AuditSigningError`; if the write fails, `AuditWriteError`
  (the head is reloaded from PostgreSQL before the next batch, in case the commit did land).
* Audit events are recorded by the HTTP layer *after* the ledger acknowledged the state change
  (the journal is committed and signed by its shard). An audit failure of any kind, audit signing
  included, is logged and counted (``ledger_audit_failures_total``) but never turns a committed
  journal into an error response: answering 500 for a journal that is durably posted would make
  clients retry a posting that already happened. The one signing failure that *does* produce an
  error response is the ledger's own (the shard could not sign the journal's batch: 500
  SIGNING_FAILURE, nothing written, so there is no state change and no audit event either).
  A missing audit event is visible: `verify_audit_chain` cannot detect it, but the journal stream
  and `ledger-node check` can, and the failures metric says when it happened.

This module is in the `store` layer, which may not import `signer` (see the import-linter
contract), so the three small pieces it shares with `signer` are restated here: the canonical JSON
encoder (`signer.canonical.canonical`), the RFC 9162 root (`signer.merkle.root`) and the batch
statement (`signer.statements.batch_statement`). tests/integration/test_audit_events.py pins each
one to the original.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Protocol

import asyncpg
import msgspec

from ledger.timestamps import rfc3339
from signer.canonical import canonical, journal_digest
from signer.canonical import digest as sha256
from signer.merkle import root as merkle_root
from signer.statements import batch_statement as signed_batch_statement
from store import repository
from store.settings import ledger_hash_alg

log = logging.getLogger(__name__)

AUDIT_STREAM: Final = -2  # shard_id of audit batches in `batches`, and the writer-lock id
QUEUE_MAX: Final = 100_000
LINGER_S: Final = 0.01  # how long a batch waits for more events when no caller waits for it
BATCH_MAX: Final = 4096
SIGN_TIMEOUT_S: Final = 30.0
HASH_ALG: Final = "sha256"
BODY_FIELDS: Final = frozenset({"seq", "actor_id", "event_type", "payload", "prev_hash", "created_at"})


Clock = Callable[[], datetime]
SignatureCheck = Callable[[str, str, bytes, bytes], bool]  # (pem, algorithm, digest, signature) -> ok


def utc_now() -> datetime:
    """The real clock (UTC)."""
    return datetime.now(UTC)


class StatementSigner(Protocol):
    """The part of the signer port the audit writer uses (`actors.ports.SignerPort` satisfies it)."""

    async def sign_statements(self, statements: list[dict[str, Any]]) -> list[tuple[bytes, str, bytes]]: ...


class AuditError(Exception):
    """An audit event was not recorded."""


class AuditSigningError(AuditError):
    """The signer could not sign the audit batch; nothing of it was written."""


class AuditWriteError(AuditError):
    """The audit batch could not be written."""


class AuditUnavailable(AuditError):
    """The writer is not running (not started, closed) or its queue is full."""


@dataclass(frozen=True, slots=True)
class AuditEventRef:
    """Where a recorded event landed: its chain position and hash, and its signed batch (if any)."""

    seq: int
    hash: bytes
    prev_hash: bytes | None
    created_at: str
    batch_seq: int | None


def batch_statement(
    first_seq: int, last_seq: int, batch_seq: int, root: bytes, signed_at: str, hash_alg: str = HASH_ALG
) -> dict[str, Any]:
    """The statement of one audit batch, before the signer fills in `signer_kid` and `signer`."""
    return signed_batch_statement(
        shard=AUDIT_STREAM, batch_seq=batch_seq, first_seq=first_seq, last_seq=last_seq,
        hash_alg=hash_alg, root=root, signed_at=signed_at, signer_kid="", signer="",
    )  # fmt: skip


def event_body(
    seq: int, actor_id: str, event_type: str, payload: Any, prev_hash: bytes | None, created_at: str
) -> bytes:
    """The canonical bytes an event's hash covers (`payload` may be a `msgspec.Raw` of canonical JSON)."""
    return canonical(
        {
            "seq": seq,
            "actor_id": actor_id,
            "event_type": event_type,
            "payload": payload,
            "prev_hash": None if prev_hash is None else prev_hash.hex(),
            "created_at": created_at,
        }
    )


# -- the writer ------------------------------------------------------------------------------------
@dataclass(slots=True)
class _Pending:
    actor_id: str
    event_type: str
    payload: bytes  # canonical JSON
    future: asyncio.Future[AuditEventRef]


# One batch in one statement (one round trip, atomic without BEGIN): the events as one array of rows
# (migration 0026: one element per event, not one per column and event) with the batch's one
# `created_at`, and the signed batch's row when there is one ($3 not null).
_INSERT_BATCH: Final = """
WITH events AS (
    INSERT INTO audit_events (seq, actor_id, event_type, payload, body, hash, prev_hash, created_at)
    SELECT e.seq, e.actor_id, e.event_type, e.payload::jsonb, e.body, e.hash, e.prev_hash, $2
      FROM unnest($1::commit_audit_event[]) AS e
)
INSERT INTO batches (shard_id, batch_seq, first_seq, last_seq, statement, root, signature, signer_kid,
                     signed_at)
SELECT $11, $3, $4, $5, $6, $7, $8, $9, $10 WHERE $3::bigint IS NOT NULL
"""
_NO_BATCH: Final = (None,) * 8


class AuditWriter:
    """The single writer of the audit stream (group commit, signed batches)."""

    def __init__(
        self,
        dsn: str,
        signer: StatementSigner | None,
        clock: Clock = utc_now,
        *,
        queue_max: int = QUEUE_MAX,
        batch_max: int = BATCH_MAX,
        sign_timeout_s: float = SIGN_TIMEOUT_S,
        hash_alg: str = HASH_ALG,
        answer_after_commit: bool = True,
    ) -> None:
        self.dsn = dsn
        self.hash_alg = hash_alg
        # Policy for the HTTP layer: wait for an event's commit before answering the call it records.
        self.answer_after_commit = answer_after_commit
        self.linger_s = LINGER_S
        self.signer = signer
        self.clock = clock
        self.batch_max = batch_max
        self.sign_timeout_s = sign_timeout_s
        self.queue: asyncio.Queue[_Pending] = asyncio.Queue(queue_max)
        self.seq = 0
        self.head_hash: bytes | None = None
        self.batch_seq = 0
        self.last_created_at = datetime.min.replace(tzinfo=UTC)
        self.pool: asyncpg.Pool | None = None
        self.lock_conn: asyncpg.Connection | None = None
        self.task: asyncio.Task[None] | None = None
        self.accepting = False
        self.stale = False
        self.events = 0
        self.batches = 0
        self.failures = 0
        self.last_queued: asyncio.Future[AuditEventRef] | None = None

    # -- life cycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        """Take the writer lock, load the chain head and the last audit batch, start the loop."""
        self.lock_conn = await repository.hold_writer_lock(self.dsn, AUDIT_STREAM)
        try:
            self.pool = await repository.create_pool(self.dsn, 1, 2, name="ledger-audit")
            async with self.pool.acquire() as conn:
                await self._load_head(conn)
        except BaseException:
            await self._release()
            raise
        self.accepting = True
        self.task = asyncio.create_task(self._run(), name="audit-writer")
        log.info("audit writer started at seq %s, batch %s", self.seq, self.batch_seq)

    async def close(self, drain_timeout_s: float = 10.0) -> None:
        """Stop accepting, let queued events commit (bounded wait), stop the loop, release the lock."""
        self.accepting = False
        if self.task is not None and not self.task.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.queue.join(), drain_timeout_s)
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        self.task = None
        while not self.queue.empty():
            pending = self.queue.get_nowait()
            self._fail([pending], AuditUnavailable("audit writer closed"))
            self.queue.task_done()
        await self._release()

    async def _release(self) -> None:
        if self.pool is not None:
            await self.pool.close()
            self.pool = None
        if self.lock_conn is not None:
            await self.lock_conn.close()
            self.lock_conn = None

    async def _load_head(self, conn: asyncpg.Connection) -> None:
        row = await conn.fetchrow("SELECT seq, hash, created_at FROM audit_events ORDER BY seq DESC LIMIT 1")
        if row is None:
            self.seq, self.head_hash = 0, None
        else:
            self.seq, self.head_hash = row["seq"], bytes(row["hash"])
            self.last_created_at = max(self.last_created_at, row["created_at"])
        self.batch_seq = await conn.fetchval(
            "SELECT COALESCE(max(batch_seq), 0) FROM batches WHERE shard_id = $1", AUDIT_STREAM
        )
        self.stale = False

    # -- calls -----------------------------------------------------------------------------------
    async def record(self, actor_id: str, event_type: str, payload: dict[str, Any]) -> AuditEventRef:
        """Append one event; returns once it is committed (and signed, with a signer). Raises AuditError."""
        return await (await self.enqueue(actor_id, event_type, payload))

    async def enqueue(
        self, actor_id: str, event_type: str, payload: dict[str, Any]
    ) -> asyncio.Future[AuditEventRef]:
        """Queue one event in order; the future resolves once it is committed (or fails with AuditError).

        Waits only while the queue is full (back-pressure: a writer that falls behind slows its
        callers down instead of dropping events). Raises AuditUnavailable when not running.
        """
        if not self.accepting:
            raise AuditUnavailable("audit writer is not running")
        encoded = canonical(payload)  # TypeError for a payload that is not JSON, in the caller's task
        future: asyncio.Future[AuditEventRef] = asyncio.get_running_loop().create_future()
        pending = _Pending(actor_id, event_type, encoded, future)
        if self.queue.full():
            await self.queue.put(pending)
        else:
            self.queue.put_nowait(pending)  # what `put` does when there is room, without its coroutine
        self.last_queued = future
        return future

    async def flush(self) -> None:
        """Wait until every event queued so far is committed or failed (read-your-writes for readers).

        Batches commit in queue order, so the last queued event settling means all earlier ones did.
        """
        last = self.last_queued
        if last is not None and not last.done():
            await asyncio.wait([last])

    def status(self) -> dict[str, Any]:
        """Queue depth, head and counters (for /ready or /metrics)."""
        return {
            "queue_depth": self.queue.qsize(),
            "seq": self.seq,
            "batch_seq": self.batch_seq,
            "events": self.events,
            "batches": self.batches,
            "failures": self.failures,
            "signed": self.signer is not None,
        }

    # -- the loop --------------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            batch = [await self.queue.get()]
            if not self.answer_after_commit and self.linger_s > 0:
                # Nobody waits for this commit (the HTTP layer answered already): let more events
                # join it, so a busy node signs and commits its audit stream in fewer, larger batches.
                await asyncio.sleep(self.linger_s)
            while len(batch) < self.batch_max and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            try:
                await self._commit(batch)
            except AuditError as exc:
                self.failures += len(batch)
                log.error("audit batch of %s events not recorded: %s", len(batch), exc)
                self._fail(batch, exc)
            except Exception as exc:
                self.failures += len(batch)
                log.exception("audit batch of %s events failed", len(batch))
                self._fail(batch, AuditWriteError(f"{type(exc).__name__}: {exc}"))
            except BaseException:
                self._fail(batch, AuditUnavailable("audit writer stopped"))
                raise
            finally:
                for _ in batch:
                    self.queue.task_done()

    @staticmethod
    def _fail(batch: list[_Pending], exc: Exception) -> None:
        for pending in batch:
            if not pending.future.done():
                pending.future.set_exception(exc)

    async def _commit(self, batch: list[_Pending]) -> None:
        assert self.pool is not None
        if repository.writer_lock_lost(self.lock_conn):
            # The server released the stream's writer lock with its connection (an outage): take it
            # again and reload the head (another writer may have appended meanwhile) before writing.
            log.warning("audit writer: the writer lock's connection is gone; taking the lock again")
            self.lock_conn = await repository.hold_writer_lock(self.dsn, AUDIT_STREAM)
            self.stale = True
        if self.stale:
            async with self.pool.acquire() as conn:
                await self._load_head(conn)
        stamp = max(self.clock(), self.last_created_at + timedelta(microseconds=1))
        created_at = rfc3339(stamp)
        seq, head = self.seq, self.head_hash
        first_seq = seq + 1
        rows: list[tuple[int, str, str, None, bytes, bytes, bytes | None]] = []
        hashes: list[bytes] = []
        for pending in batch:
            seq += 1
            body = event_body(
                seq, pending.actor_id, pending.event_type, msgspec.Raw(pending.payload), head, created_at
            )
            hashed = journal_digest(body, self.hash_alg)
            # `payload` NULL: it is stored once, inside `body` (migration 0027, `audit_payload`)
            rows.append((seq, pending.actor_id, pending.event_type, None, body, hashed, head))
            hashes.append(hashed)
            head = hashed
        batch_row = None
        if self.signer is not None:
            batch_row = await self._sign(first_seq, seq, hashes, stamp)
        try:
            async with self.pool.acquire() as conn:
                await conn.execute(_INSERT_BATCH, rows, stamp, *(batch_row or _NO_BATCH), AUDIT_STREAM)
        except Exception as exc:
            self.stale = True  # the commit may have landed with its acknowledgement lost: reload the head
            raise AuditWriteError(f"audit batch not written: {type(exc).__name__}: {exc}") from exc
        self.seq, self.head_hash, self.last_created_at = seq, head, stamp
        batch_seq = None
        if batch_row is not None:
            self.batch_seq = batch_seq = batch_row[0]
            self.batches += 1
        self.events += len(batch)
        for pending, row in zip(batch, rows, strict=True):
            if not pending.future.done():
                pending.future.set_result(AuditEventRef(row[0], row[5], row[6], created_at, batch_seq))

    async def _sign(
        self, first_seq: int, last_seq: int, hashes: list[bytes], signed_at: datetime
    ) -> tuple[int, int, int, bytes, bytes, bytes, str, datetime]:
        """Sign the batch statement before anything is written; AuditSigningError if that fails."""
        assert self.signer is not None
        root = merkle_root(hashes, self.hash_alg)
        batch_seq = self.batch_seq + 1
        statement = batch_statement(first_seq, last_seq, batch_seq, root, rfc3339(signed_at), self.hash_alg)
        try:
            signed = await asyncio.wait_for(self.signer.sign_statements([statement]), self.sign_timeout_s)
            ((body, kid, signature),) = signed
        except Exception as exc:
            raise AuditSigningError(
                f"signing the audit batch failed, nothing was written: {type(exc).__name__}: {exc}"
            ) from exc
        return (batch_seq, first_seq, last_seq, bytes(body), root, bytes(signature), kid, signed_at)


# -- verification ----------------------------------------------------------------------------------
@dataclass(slots=True)
class _Batch:
    batch_seq: int
    first_seq: int
    last_seq: int
    root: bytes
    hashes: list[bytes]


_EVENTS_PAGE: Final = """
SELECT seq, actor_id, event_type, payload::text AS payload, body, hash, prev_hash, created_at
  FROM audit_events WHERE seq > $1 ORDER BY seq LIMIT $2
"""


async def verify_audit_chain(
    conn: asyncpg.Connection, *, check_signature: SignatureCheck | None = None, page: int = 10_000
) -> list[str]:
    """Problems of the stored audit stream; empty when it is intact.

    Every event: seq contiguous from 1, H(body) == hash (H: the ledger's `hash_alg`), the body's
    fields equal the row's columns (so an edited payload is caught where a row stores one; since
    migration 0027 new rows keep it only in the body), prev_hash links to the previous
    event's hash.
    Every audit batch: batch_seq 1..n, consecutive non-overlapping ranges over existing events, a
    canonical statement agreeing with the row, and the root recomputed from the event hashes.
    With `check_signature` (e.g. `signer.keys.verify_signature`) every batch signature is also
    verified with its key from `signer_keys`.
    """
    problems: list[str] = []
    alg = await ledger_hash_alg(conn)
    batches = await _load_batches(conn, problems, check_signature, alg)
    pending = iter(batches)
    current = next(pending, None)
    after, prev_hash = 0, None
    while True:
        rows = await conn.fetch(_EVENTS_PAGE, after, page)
        for row in rows:
            seq = row["seq"]
            if seq != after + 1:
                problems.append(
                    f"audit event seq {seq}: follows seq {after} (events {after + 1}..{seq - 1} missing)"
                )
            problems.extend(_event_problems(row, prev_hash, alg))
            while current is not None and current.last_seq < seq:
                problems.extend(_finish(current, alg))
                current = next(pending, None)
            if current is not None and current.first_seq <= seq:
                current.hashes.append(bytes(row["hash"]))
            after, prev_hash = seq, bytes(row["hash"])
        if len(rows) < page:
            break
    while current is not None:
        problems.extend(_finish(current, alg))
        current = next(pending, None)
    return problems


def _event_problems(row: Any, prev_hash: bytes | None, alg: str = HASH_ALG) -> list[str]:
    seq, where = row["seq"], f"audit event seq {row['seq']}"
    body, hashed = bytes(row["body"]), bytes(row["hash"])
    stored_prev = None if row["prev_hash"] is None else bytes(row["prev_hash"])
    out: list[str] = []
    computed = journal_digest(body, alg)
    if computed != hashed:
        name = "SHA-256" if alg == HASH_ALG else alg
        out.append(f"{where}: hash {hashed.hex()} is not {name} of its body ({computed.hex()})")
    if stored_prev != prev_hash:
        out.append(f"{where}: prev_hash does not link to the previous event's hash")
    try:
        fields = msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        return [*out, f"{where}: body is not JSON: {exc}"]
    if not isinstance(fields, dict) or set(fields) != BODY_FIELDS:
        return [*out, f"{where}: body fields are not {sorted(BODY_FIELDS)}"]
    if canonical(fields) != body:
        out.append(f"{where}: body is not canonical JSON")
    expected = {
        "seq": seq,
        "actor_id": row["actor_id"],
        "event_type": row["event_type"],
        # rows since migration 0027 keep the payload only in the body; older rows also in `payload`
        "payload": fields["payload"] if row["payload"] is None else msgspec.json.decode(row["payload"]),
        "prev_hash": None if stored_prev is None else stored_prev.hex(),
        "created_at": rfc3339(row["created_at"]),
    }
    out.extend(
        f"{where}: {name} differs from its hashed body"
        for name in sorted(BODY_FIELDS)
        if fields[name] != expected[name]
    )
    return out


def _finish(batch: _Batch, alg: str = HASH_ALG) -> list[str]:
    size = batch.last_seq - batch.first_seq + 1
    where = f"audit batch {batch.batch_seq} (seq {batch.first_seq}..{batch.last_seq})"
    if len(batch.hashes) != size:
        return [f"{where}: {len(batch.hashes)} of its {size} events exist"]
    root = merkle_root(batch.hashes, alg)
    if root != batch.root:
        return [f"{where}: root {batch.root.hex()} differs from the root of its events ({root.hex()})"]
    return []


async def _load_batches(
    conn: asyncpg.Connection, problems: list[str], check_signature: SignatureCheck | None, alg: str = HASH_ALG
) -> list[_Batch]:
    rows = await conn.fetch(
        "SELECT batch_seq, first_seq, last_seq, statement, root, signature, signer_kid FROM batches "
        "WHERE shard_id = $1 ORDER BY batch_seq",
        AUDIT_STREAM,
    )
    keys: dict[str, tuple[str, str]] = {}
    if check_signature is not None:
        keys = {
            r["kid"]: (r["pem"], r["algorithm"])
            for r in await conn.fetch("SELECT kid, pem, algorithm FROM signer_keys")
        }
    batches: list[_Batch] = []
    last_seq = 0
    for number, row in enumerate(rows, start=1):
        batch = _Batch(row["batch_seq"], row["first_seq"], row["last_seq"], bytes(row["root"]), [])
        where = f"audit batch {batch.batch_seq} (seq {batch.first_seq}..{batch.last_seq})"
        if batch.batch_seq != number:
            problems.append(f"{where}: batch_seq {batch.batch_seq} where {number} was expected")
        if batch.first_seq <= last_seq:
            problems.append(f"{where}: overlaps the previous audit batch (ending at seq {last_seq})")
            continue
        if last_seq and batch.first_seq != last_seq + 1:
            problems.append(f"{where}: events {last_seq + 1}..{batch.first_seq - 1} are in no audit batch")
        last_seq = batch.last_seq
        statement = bytes(row["statement"])
        problems.extend(_statement_problems(where, statement, row, alg))
        if check_signature is not None:
            key = keys.get(row["signer_kid"])
            if key is None:
                problems.append(f"{where}: signer key {row['signer_kid']} is not published")
            elif not check_signature(key[0], key[1], sha256(statement), bytes(row["signature"])):
                problems.append(f"{where}: signature does not verify with key {row['signer_kid']}")
        batches.append(batch)
    return batches


def _statement_problems(where: str, statement: bytes, row: Any, alg: str = HASH_ALG) -> list[str]:
    try:
        fields = msgspec.json.decode(statement)
    except msgspec.DecodeError as exc:
        return [f"{where}: statement is not JSON: {exc}"]
    if not isinstance(fields, dict):
        return [f"{where}: statement is not an object"]
    out = [] if canonical(fields) == statement else [f"{where}: statement is not canonical JSON"]
    expected = batch_statement(
        row["first_seq"], row["last_seq"], row["batch_seq"], bytes(row["root"]), "", alg
    )
    expected.update(
        signed_at=fields.get("signed_at"), signer=fields.get("signer"), signer_kid=row["signer_kid"]
    )
    out.extend(
        f"{where}: statement {name} is {fields.get(name)!r}, expected {value!r}"
        for name, value in expected.items()
        if fields.get(name) != value
    )
    if set(fields) != set(expected):
        out.append(f"{where}: statement fields are {sorted(fields)}")
    return out
