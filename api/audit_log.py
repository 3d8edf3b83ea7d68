"""The audit-event stream over HTTP: `GET /audit/events`, and recording events from the routes.

`GET /audit/events?cursor=&limit=` (every reader role, auditor included) answers
``{ok, events: [...], next_cursor}`` in `seq` order. Each event carries
``seq, actor_id, event_type, payload, hash, prev_hash, created_at`` (hashes lower-case hex) and
the signed batch that holds it: ``signature`` (base64) and ``signer_kid`` of the audit batch
statement, ``batch: {batch_seq, root, statement, log_index}`` (all null when the event is not in
a signed batch, i.e. signing is disabled). ``signature`` verifies over SHA-256 of the canonical
bytes of ``batch.statement`` with the key ``signer_kid`` of `GET /keys`; ``log_index`` is the
batch's position in the global log once a checkpoint took it in (null before).
A client re-derives the event hash as SHA-256 of the canonical JSON (sorted
keys, compact) of ``{seq, actor_id, event_type, payload, prev_hash, created_at}``; the batch root
is the RFC 9162 root over the hashes of events ``first_seq..last_seq`` of the batch (see
store/audit.py). `cursor` is opaque (URL-safe base64 of the last seq returned); `next_cursor` is
present on every page, an empty one included, so a client can poll for new events with it.

Recording (`audit_post`, `audit_post_batch`, `audit_account_create`, `audit_event`) happens after
the ledger acknowledged the change: the event is queued in order before the response is sent and
committed by the audit writer's next group commit (the response waits for that commit only with
`LEDGER_AUDIT_WAIT=1`); `GET /audit/events` waits for the queue first, so a client reads the events
of the calls it was answered. A failure to record is logged and counted in
``ledger_audit_failures_total`` and never changes the response (see store/audit.py).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, Final

import asyncpg
import msgspec
from aiohttp import web
from prometheus_client import Counter

from actors.messages import Result
from api.auth import PRINCIPAL, READERS, Role
from api.envelope import ok
from api.metrics import Metrics
from api.requests import query_int
from api.services import SERVICES
from ledger.errors import validation_error
from ledger.timestamps import rfc3339
from store.audit import AUDIT_STREAM, AuditWriter

log = logging.getLogger(__name__)

AUDIT_WRITER: Final = web.AppKey("audit_writer", AuditWriter)
LIMIT_DEFAULT: Final = 100
LIMIT_MAX: Final = 1000
_SEQ_MAX: Final = 2**63 - 1

_failure_counters: weakref.WeakKeyDictionary[Metrics, Counter] = weakref.WeakKeyDictionary()


def audit_failures(metrics: Metrics) -> Counter:
    """`ledger_audit_failures_total{event_type}` on the node's registry (created on first use)."""
    counter = _failure_counters.get(metrics)
    if counter is None:
        counter = Counter(
            "ledger_audit_failures_total",
            "Audit events not recorded after an acknowledged state change",
            ["event_type"],
            registry=metrics.registry,
        )
        _failure_counters[metrics] = counter
    return counter


# -- reading -----------------------------------------------------------------------------------
def encode_cursor(seq: int) -> str:
    """The opaque cursor after `seq`."""
    return base64.urlsafe_b64encode(str(seq).encode()).decode().rstrip("=")


def decode_cursor(text: str | None) -> int:
    """The last seq a cursor names (0 without one); 400 VALIDATION_ERROR when malformed."""
    if not text:
        return 0
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode("ascii")
    except (binascii.Error, ValueError):
        raise validation_error("malformed cursor", "cursor") from None
    if not raw.isdigit() or not raw.isascii() or len(raw) > 19 or int(raw) > _SEQ_MAX:
        raise validation_error("malformed cursor", "cursor")
    return int(raw)


_EVENTS: Final = """
SELECT seq, actor_id, event_type, body, hash, prev_hash, created_at
  FROM audit_events WHERE seq > $1 ORDER BY seq LIMIT $2
"""

_BATCHES: Final = """
SELECT batch_seq, first_seq, last_seq, root, signature, signer_kid, statement, log_index FROM batches
 WHERE shard_id = $1 AND last_seq >= $2 AND first_seq <= $3 ORDER BY first_seq
"""


class _HashedPayload(msgspec.Struct):
    """The payload exactly as hashed (the canonical bytes inside the event's body)."""

    payload: msgspec.Raw


_body_decoder: Final = msgspec.json.Decoder(_HashedPayload)


def _hex(value: bytes | None) -> str | None:
    return None if value is None else bytes(value).hex()


def _batch(row: Any) -> dict[str, Any]:
    """The signed batch holding an event: its statement is what `signature` signs (SHA-256 of it)."""
    return {
        "batch_seq": row["batch_seq"],
        "root": _hex(row["root"]),
        "statement": msgspec.Raw(bytes(row["statement"])),
        "log_index": row["log_index"],
    }


async def audit_events(request: web.Request) -> web.Response:
    """GET /audit/events?cursor=&limit=: audit events in seq order with their signed batch."""
    svc = request.app[SERVICES]
    limit = query_int(request, "limit", LIMIT_DEFAULT, 1, LIMIT_MAX)
    after = decode_cursor(request.query.get("cursor"))
    writer = request.app.get(AUDIT_WRITER)
    if writer is not None:
        await writer.flush()  # events of calls already answered are readable here
    async with svc.pool.acquire() as conn:
        rows = await conn.fetch(_EVENTS, after, limit)
        batches = await conn.fetch(_BATCHES, AUDIT_STREAM, rows[0]["seq"], rows[-1]["seq"]) if rows else []
    events: list[dict[str, Any]] = []
    index = 0
    for row in rows:
        seq = row["seq"]
        while index < len(batches) and batches[index]["last_seq"] < seq:
            index += 1
        batch = batches[index] if index < len(batches) and batches[index]["first_seq"] <= seq else None
        events.append(
            {
                "seq": seq,
                "actor_id": row["actor_id"],
                "event_type": row["event_type"],
                "payload": _body_decoder.decode(bytes(row["body"])).payload,
                "hash": _hex(row["hash"]),
                "prev_hash": _hex(row["prev_hash"]),
                "created_at": rfc3339(row["created_at"]),
                "signature": base64.b64encode(bytes(batch["signature"])).decode() if batch else None,
                "signer_kid": batch["signer_kid"] if batch else None,
                "batch": _batch(batch) if batch else None,
            }
        )
    last = rows[-1]["seq"] if rows else after
    return ok(events=events, next_cursor=encode_cursor(last))


ROUTES: Final[
    list[tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]], frozenset[Role]]]
] = [
    ("GET", "/audit/events", audit_events, READERS),
]


# -- recording ---------------------------------------------------------------------------------
async def audit_event(request: web.Request, event_type: str, payload: dict[str, Any]) -> None:
    """Record one event for the authenticated caller; failures are logged and counted, never raised."""
    await audit_event_by(request.app, request[PRINCIPAL].name, event_type, payload)


async def audit_event_by(app: web.Application, who: str, event_type: str, payload: dict[str, Any]) -> None:
    """Record one event for principal `who`; failures are logged and counted, never raised."""
    writer = app.get(AUDIT_WRITER)
    if writer is None:
        return
    metrics = app[SERVICES].metrics

    def settled(future: asyncio.Future[Any]) -> None:
        if not future.cancelled() and future.exception() is not None:
            log.error("audit event %s not recorded: %s", event_type, future.exception())
            audit_failures(metrics).labels(event_type).inc()

    try:
        future = await writer.enqueue(who, event_type, payload)
    except Exception:
        log.exception("audit event %s not recorded", event_type)
        audit_failures(metrics).labels(event_type).inc()
        return
    future.add_done_callback(settled)
    if writer.answer_after_commit:
        await asyncio.wait([future])


async def record_event(app: web.Application, actor: str, event_type: str, payload: dict[str, Any]) -> None:
    """Record one event for a flow acting on its own (an executor, a run): failures are logged,
    never raised (the change it records already happened)."""
    writer = app.get(AUDIT_WRITER)
    if writer is None:
        return
    try:
        future = await writer.enqueue(actor, event_type, payload)
        if writer.answer_after_commit:
            await asyncio.wait([future])
    except Exception:
        log.exception("audit event %s not recorded", event_type)


async def journal_hashes(pool: asyncpg.Pool, journal_ids: list[str]) -> dict[str, str]:
    """The stored journals' hashes (hex) by id; ids not stored are absent."""
    if not journal_ids:
        return {}
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT journal_id, hash FROM journals WHERE journal_id = ANY($1::text[])", journal_ids
        )
    return {r["journal_id"]: bytes(r["hash"]).hex() for r in rows}


async def audit_post(app: web.Application, who: str, result: Result) -> None:
    """`ledger.post` by `who` for an acknowledged journal: {journal_id, hash, posted_at}."""
    if not result.ok or app.get(AUDIT_WRITER) is None:
        return
    payload = {
        "journal_id": result.journal_id,
        "hash": result.hash.hex() if result.hash is not None else None,
        "posted_at": result.posted_at,
    }
    await audit_event_by(app, who, "ledger.post", payload)


async def audit_post_batch(
    request: web.Request, posted: list[str], count: int, known: dict[str, str] | None = None
) -> None:
    """`ledger.post_batch`, one event per request with at least one acknowledged journal.

    `posted` are the ids of the acknowledged journals in request order, `count` the number of
    journals in the request; the payload is {journals: [{journal_id, hash}] of the posted ones,
    rejected: count of the others}. Hashes come from `known` (id -> hex), else from the database.
    """
    if not posted or request.app.get(AUDIT_WRITER) is None:
        return
    try:
        hashes = known if known is not None else await journal_hashes(request.app[SERVICES].pool, posted)
    except Exception:
        log.exception("audit event ledger.post_batch not recorded (journal hash lookup)")
        audit_failures(request.app[SERVICES].metrics).labels("ledger.post_batch").inc()
        return
    await audit_event(request, "ledger.post_batch", post_batch_payload(posted, count, hashes))


class _PostedJournal(msgspec.Struct, gc=False):
    """One journal of a `ledger.post_batch` payload; canonical JSON sorts its fields like a dict's keys."""

    journal_id: str
    hash: str | None


def post_batch_payload(posted: list[str], count: int, hashes: dict[str, str]) -> dict[str, Any]:
    """The `ledger.post_batch` payload: the ok journals' ids and hashes in order, and the rejected count.

    Its canonical bytes equal those of `{journals: [{journal_id, hash}, ...], rejected}` with dicts.
    """
    return {
        "journals": [_PostedJournal(j, hashes.get(j)) for j in posted],
        "rejected": count - len(posted),
    }


async def audit_account_create(
    request: web.Request, account_id: str, no_negative: bool, created: bool, split: bool = False
) -> None:
    """`account.create` when the account was created (a replay of an existing one changes nothing).

    The payload names `split` only for split accounts, so events of ordinary accounts keep the
    shape (and hash input) they had before split accounts existed.
    """
    if created:
        payload: dict[str, Any] = {"account_id": account_id, "no_negative": no_negative}
        if split:
            payload["split"] = True
        await audit_event(request, "account.create", payload)
