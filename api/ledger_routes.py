"""Ledger endpoints: post, batch post, read a journal, balances, accounts, the journal stream."""

from __future__ import annotations

import base64
import binascii
import heapq
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, TypeVar, cast

import msgspec
from aiohttp import web

from actors.messages import RESULTS, Result
from api.audit_log import audit_account_create, audit_post, audit_post_batch
from api.audit_view import audit_block
from api.auth import ADMINS, PRINCIPAL, READERS, WRITERS, Principal
from api.envelope import error_response, ok
from api.fx_journals import fx_submission, load_rates
from api.posting import Submission
from api.requests import BATCH_BODY_MAX, idempotency_key, json_body, query_int, query_time
from api.services import SERVICES, Services
from ledger.accounts import AccountPolicy, account_type_of, normal_balance
from ledger.errors import ErrorCode, LedgerError, Rejection, validation_error
from ledger.invariants import check
from ledger.journal import (
    JournalIn,
    JournalWire,
    decode_journal,
    has_fx_fields,
    journal_from_wire,
    journal_in_of,
    rejection_from_msgspec,
    validate_fields,
    validate_journal,
)
from ledger.timestamps import rfc3339
from store import holds_repo, repository

BATCH_JOURNALS_MAX: Final = 8190
STREAM_LIMIT_MAX: Final = 1000


class BatchIn(msgspec.Struct, forbid_unknown_fields=True):
    """`POST /ledger/post_batch` body; journals stay raw so each one fails alone."""

    journals: list[msgspec.Raw]


class BatchWire(msgspec.Struct, forbid_unknown_fields=True):
    """`POST /ledger/post_batch` body decoded in one go (the fast path of `decode_batch`)."""

    journals: list[JournalWire]


class AccountIn(msgspec.Struct, forbid_unknown_fields=True):
    """`POST /accounts` body."""

    account_id: str
    policy: AccountPolicy = AccountPolicy()


_batch_decoder: Final = msgspec.json.Decoder(BatchIn)
_journal_decoder: Final = msgspec.json.Decoder(JournalIn)
_wire_decoder: Final = msgspec.json.Decoder(JournalWire)
_wire_batch_decoder: Final = msgspec.json.Decoder(BatchWire)
_account_decoder: Final = msgspec.json.Decoder(AccountIn)
_cursor_decoder: Final = msgspec.json.Decoder(dict[str, int])


def services(request: web.Request) -> Services:
    """The node's services."""
    return request.app[SERVICES]


def principal(request: web.Request) -> Principal:
    """The authenticated caller (set by the auth middleware)."""
    return request[PRINCIPAL]


def result_error(result: Result) -> LedgerError:
    """The error a rejected journal's result answers."""
    code = ErrorCode(result.code or ErrorCode.INTERNAL_ERROR)
    return LedgerError(code, result.message or code.value, dict(result.details or {}))


async def _check_reverses(svc: Services, submissions: list[Submission | Rejection]) -> None:
    """Replace submissions whose `reverses` names no stored journal with a VALIDATION_ERROR."""
    if not any(isinstance(sub, Submission) and sub.journal.reverses is not None for sub in submissions):
        return
    async with svc.pool.acquire() as conn:
        for index, sub in enumerate(submissions):
            target = sub.journal.reverses if isinstance(sub, Submission) else None
            if target is not None and not await repository.journal_exists(conn, target):
                submissions[index] = validation_error(
                    f"reverses names no posted journal ({target})", "$.reverses"
                )


async def _conflict_first(
    svc: Services, rejection: Rejection, journal_id: str | None, who: str, key: str | None
) -> Rejection:
    """D6 precedence: an id or key already used answers IDEMPOTENCY_CONFLICT before LEDGER_IMBALANCE.

    An unbalanced request can never equal a stored (balanced) journal, so any hit is a conflict.
    """
    if rejection.code is not ErrorCode.LEDGER_IMBALANCE or (journal_id is None and key is None):
        return rejection
    async with svc.pool.acquire() as conn:
        found = await repository.find_existing(
            conn, [journal_id] if journal_id else [], [who] if key else [], [key] if key else []
        )
    if not found:
        return rejection
    return Rejection(
        ErrorCode.IDEMPOTENCY_CONFLICT,
        "journal_id or Idempotency-Key already used with a different payload",
        {"journal_id": found[0].journal_id},
    )


async def post_journal(request: web.Request) -> web.Response:
    """POST /ledger/post: one journal; 200 {ok, journal_id, posted_at}."""
    svc = services(request)
    started = time.perf_counter()
    body = await json_body(request)
    key = idempotency_key(request)
    who = principal(request).name
    submission = vouched_submission(body, who, key)
    if submission is None:  # not vouched for by `journal_from_wire`: the detailed path, its exact errors
        submission = await _single_submission(svc, decode_journal(body), who, key)
    if submission.journal.reverses is not None:
        subs: list[Submission | Rejection] = [submission]
        await _check_reverses(svc, subs)
        if isinstance(subs[0], Rejection):
            raise subs[0]
    result = await post_one(request.app, submission, started)
    if not result.ok:
        return error_response(result_error(result))
    return ok(journal_id=result.journal_id, posted_at=result.posted_at)


def vouched_submission(body: bytes, who: str, key: str | None) -> Submission | None:
    """The submission of a `POST /ledger/post` body that the wire fast path (`journal_from_wire`, as
    in `decode_batch`) vouches for; None for anything else (the detailed path answers it)."""
    wire = _decode_or_none(_wire_decoder, body)
    journal = journal_from_wire(wire) if wire is not None else None
    return None if journal is None else Submission(journal, who, key)


async def post_one(app: web.Application, submission: Submission, started: float) -> Result:
    """Post one checked journal, count it (`started`: the request's `perf_counter()` at arrival) and
    record its `ledger.post` audit event: the end of `POST /ledger/post`, shared with `api.fast_lane`."""
    svc = app[SERVICES]
    (result,) = await svc.poster.post([submission])
    metrics = svc.metrics
    metrics.post_latency.labels("post").observe(time.perf_counter() - started)
    metrics.request_journals.observe(1)
    metrics.journal_results.labels(result.code or "OK").inc()
    await audit_post(app, submission.principal, result)
    return result


async def _single_submission(svc: Services, raw: JournalIn, who: str, key: str | None) -> Submission:
    """The submission of a decoded `POST /ledger/post` journal (FX fields completed, D2); a Rejection
    otherwise, IDEMPOTENCY_CONFLICT before LEDGER_IMBALANCE (D6)."""
    try:
        if has_fx_fields(raw.entries):  # D2: completed with the node's rates
            validate_fields(raw)  # a malformed journal fails before any rate is loaded
            return await fx_submission(svc, raw, await load_rates(svc, [raw]), who, key)
        return Submission(validate_journal(raw), who, key)
    except Rejection as rejection:
        raise await _conflict_first(svc, rejection, raw.journal_id, who, key) from None


@dataclass(slots=True)
class DecodedBatch:
    """A batch body decoded and validated: one submission or rejection per journal, in order."""

    subs: list[Submission | Rejection]
    rejected: int = 0
    """How many of `subs` are rejections."""
    unbalanced: dict[int, tuple[Rejection, str | None]] = field(default_factory=dict)
    """index -> (LEDGER_IMBALANCE rejection, the journal's client id), for the conflict lookup."""
    reverses: bool = False
    """True when some valid journal names a journal it reverses."""
    fx: dict[int, JournalIn] = field(default_factory=dict)
    """index -> a journal with FX fields, awaiting D2 completion (`complete_fx`); its place in
    `subs` holds `FX_PENDING` (counted in `rejected`) until then."""

    def add(self, index: int, sub: Submission | Rejection, journal_id: str | None) -> None:
        """Append the outcome of journal `index` (`journal_id`: its client id, if it decoded)."""
        self.subs.append(sub)
        self._count(index, sub, journal_id)

    def _count(self, index: int, sub: Submission | Rejection, journal_id: str | None) -> None:
        if isinstance(sub, Rejection):
            self.rejected += 1
            if sub.code is ErrorCode.LEDGER_IMBALANCE:
                self.unbalanced[index] = (sub, journal_id)
        elif sub.journal.reverses is not None:
            self.reverses = True

    def add_fx(self, index: int, journal_in: JournalIn) -> None:
        """Append journal `index`, which carries FX fields and passed `validate_fields`."""
        self.subs.append(FX_PENDING)
        self.rejected += 1
        self.fx[index] = journal_in

    def settle_fx(self, index: int, sub: Submission | Rejection) -> None:
        """Put the outcome of FX journal `index` in its place."""
        check(self.subs[index] is FX_PENDING, "settling a journal that is not pending completion")
        self.subs[index] = sub
        self.rejected -= 1
        self._count(index, sub, self.fx[index].journal_id)


FX_PENDING: Final = Rejection(ErrorCode.INTERNAL_ERROR, "journal awaiting FX completion", {})


class _PostedItem(msgspec.Struct, gc=False):
    """A batch answer item of a posted journal (encodes as {ok, journal_id, posted_at})."""

    ok: bool
    journal_id: str
    posted_at: str | None


class _FailedItem(msgspec.Struct, gc=False):
    """A batch answer item of a refused journal (encodes as {ok, journal_id, error})."""

    ok: bool
    journal_id: str | None
    error: dict[str, Any]


BatchItem = _PostedItem | _FailedItem


def _check_batch_size(count: int) -> None:
    if count > BATCH_JOURNALS_MAX:
        raise LedgerError(
            ErrorCode.BATCH_TOO_LARGE,
            f"a batch holds at most {BATCH_JOURNALS_MAX} journals, got {count}",
            {"limit": BATCH_JOURNALS_MAX, "count": count},
        )
    if not count:
        raise validation_error("journals must not be empty", "$.journals")


def _batch_key(key: str | None, index: int) -> str | None:
    return f"{key}#{index}" if key is not None else None


def _under_item(index: int, rejection: Rejection) -> Rejection:
    """`rejection` with its field moved under `$.journals[index]`."""
    field = rejection.details.get("field")
    if isinstance(field, str) and field.startswith("$"):
        rejection.details["field"] = f"$.journals[{index}]" + field[1:]
    return rejection


def _detailed_item(index: int, journal_in: JournalIn, who: str, key: str | None) -> Submission | Rejection:
    """`validate_journal` with a rejection's field moved under `$.journals[index]`."""
    try:
        journal = validate_journal(journal_in)
    except Rejection as rejection:
        return _under_item(index, rejection)
    return Submission(journal, who, _batch_key(key, index))


def _add_detailed(batch: DecodedBatch, index: int, journal_in: JournalIn, who: str, key: str | None) -> None:
    """The detailed path: `validate_journal`, or for a journal with FX fields `validate_fields` and
    a place among the journals awaiting D2 completion (`complete_fx`)."""
    if not has_fx_fields(journal_in.entries):
        batch.add(index, _detailed_item(index, journal_in, who, key), journal_in.journal_id)
        return
    try:
        validate_fields(journal_in)
    except Rejection as rejection:
        batch.add(index, _under_item(index, rejection), journal_in.journal_id)
        return
    batch.add_fx(index, journal_in)


async def complete_fx(svc: Services, batch: DecodedBatch, who: str, key: str | None) -> None:
    """Complete the batch's FX journals with the node's rates (one query for all of them)."""
    table = await load_rates(svc, batch.fx.values())
    for index, journal_in in batch.fx.items():
        try:
            sub: Submission | Rejection = await fx_submission(
                svc, journal_in, table, who, _batch_key(key, index)
            )
        except Rejection as rejection:
            sub = _under_item(index, rejection)
        batch.settle_fx(index, sub)


def _add_wire(batch: DecodedBatch, index: int, wire: JournalWire, who: str, key: str | None) -> None:
    """A journal that decoded as `JournalWire`: the fast check, the detailed one only if it fails."""
    journal = journal_from_wire(wire)
    if journal is not None:
        batch.add(index, Submission(journal, who, _batch_key(key, index)), wire.journal_id)
    else:
        _add_detailed(batch, index, journal_in_of(wire), who, key)


T = TypeVar("T")


def _decode_or_none(decoder: msgspec.json.Decoder[T], data: bytes | msgspec.Raw) -> T | None:
    """The fast shape, or None when the input does not fit it (the detailed path then explains why)."""
    try:
        return decoder.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return None


def _add_raw(batch: DecodedBatch, index: int, raw: msgspec.Raw, who: str, key: str | None) -> None:
    """A journal of a batch that did not decode as a whole: each one decoded on its own."""
    wire = _decode_or_none(_wire_decoder, raw)
    if wire is not None:
        _add_wire(batch, index, wire, who, key)
        return
    try:
        journal_in = _journal_decoder.decode(raw)
    except msgspec.ValidationError as exc:
        batch.add(index, rejection_from_msgspec(exc, prefix=f"$.journals[{index}]"), None)
        return
    _add_detailed(batch, index, journal_in, who, key)


def decode_batch(body: bytes, who: str, key: str | None) -> DecodedBatch:
    """Decode and validate a batch body; each invalid journal fails alone, in its own result.

    Raises (the whole request fails) when the body is not a batch of 1..8,190 journals.
    Fast path: one msgspec call decodes the whole body as `JournalWire`s (a well-formed batch),
    then `journal_from_wire` checks each. Only when that decode fails is the body decoded as
    raw journals and each journal decoded on its own, to find which ones are malformed; only a
    journal failing a check goes through `JournalIn` and `validate_journal`, whose error it gets.
    """
    whole = _decode_or_none(_wire_batch_decoder, body)
    if whole is not None:
        wires = whole.journals
        _check_batch_size(len(wires))
        batch = DecodedBatch([])
        append = batch.subs.append
        for index, wire in enumerate(wires):  # _add_wire, inlined for the common case
            journal = journal_from_wire(wire)
            if journal is None:
                _add_detailed(batch, index, journal_in_of(wire), who, key)
                continue
            append(Submission(journal, who, None if key is None else f"{key}#{index}"))
            if journal.reverses is not None:
                batch.reverses = True
        return batch
    try:
        raws = _batch_decoder.decode(body).journals
    except msgspec.ValidationError as exc:
        raise rejection_from_msgspec(exc) from None
    except msgspec.DecodeError as exc:
        raise validation_error(f"malformed JSON: {exc}", "$") from None
    _check_batch_size(len(raws))
    batch = DecodedBatch([])
    for index, raw in enumerate(raws):
        _add_raw(batch, index, raw, who, key)
    return batch


@dataclass(slots=True)
class BatchAnswer:
    """The per-journal answer items, what the audit event needs, and a count per outcome."""

    items: list[BatchItem]
    posted: list[str]
    """Ids of the acknowledged journals, in request order."""
    hashes: dict[str, str]
    """Journal id -> hex journal hash, for the acknowledged journals whose result carries one."""
    outcomes: Counter[str]


def _in_order(subs: list[Submission | Rejection], posted: list[Result]) -> Iterator[Result | Rejection]:
    """Each journal's rejection or result, in request order."""
    answers = iter(posted)
    for sub in subs:
        yield sub if isinstance(sub, Rejection) else next(answers)


def batch_answer(subs: list[Submission | Rejection], posted: list[Result]) -> BatchAnswer:
    """Answer items in request order; `posted` holds one result per `Submission` of `subs`, in order."""
    items: list[BatchItem] = []
    ids: list[str] = []
    hashes: dict[str, str] = {}
    outcomes: Counter[str] = Counter()
    plain_ok = 0  # ok results without a code, counted as "OK" at the end (key kept in first-seen order)
    answers = posted if len(posted) == len(subs) else _in_order(subs, posted)
    for answer in answers:
        if isinstance(answer, Rejection):
            items.append(_FailedItem(False, None, answer.as_dict()))
            outcomes[str(answer.code)] += 1
        elif answer.ok:
            journal_id = answer.journal_id
            items.append(_PostedItem(True, journal_id, answer.posted_at))
            ids.append(journal_id)
            if answer.hash is not None:
                hashes[journal_id] = answer.hash.hex()
            if answer.code:
                outcomes[answer.code] += 1
                continue
            if not plain_ok:
                outcomes["OK"] += 0
            plain_ok += 1
        else:
            items.append(_FailedItem(False, answer.journal_id, result_error(answer).as_dict()))
            outcomes[answer.code or "OK"] += 1
    if plain_ok:
        outcomes["OK"] += plain_ok
    return BatchAnswer(items, ids, hashes, outcomes)


async def post_batch(request: web.Request) -> web.Response:
    """POST /ledger/post_batch: up to 8,190 journals, one result each, in order."""
    svc = services(request)
    started = time.perf_counter()
    body = await json_body(request, BATCH_BODY_MAX)
    key = idempotency_key(request)
    who = principal(request).name
    batch = decode_batch(body, who, key)
    if batch.fx:
        await complete_fx(svc, batch, who, key)
    subs = batch.subs
    for index, (rejection, journal_id) in batch.unbalanced.items():
        subs[index] = await _conflict_first(
            svc, rejection, journal_id, who, f"{key}#{index}" if key else None
        )
    if batch.reverses:
        await _check_reverses(svc, subs)
    if batch.rejected or batch.reverses:
        valid = [s for s in subs if isinstance(s, Submission)]
    else:
        valid = cast(list[Submission], subs)
    posted = await svc.poster.post(valid) if valid else []
    answer = batch_answer(subs, posted)
    for code, count in answer.outcomes.items():
        svc.metrics.journal_results.labels(code).inc(count)
    svc.metrics.post_latency.labels("post_batch").observe(time.perf_counter() - started)
    svc.metrics.request_journals.observe(len(subs))
    await audit_post_batch(request, answer.posted, len(subs), answer.hashes)
    return ok(results=answer.items)


async def get_journal(request: web.Request) -> web.Response:
    """GET /ledger/{journal_id}: the journal as posted plus its audit metadata (chain, signature, proofs)."""
    svc = services(request)
    journal_id = request.match_info["journal_id"]
    async with svc.pool.acquire() as conn:
        row = await repository.journal_row(conn, journal_id)
        if row is None:
            raise LedgerError(
                ErrorCode.NOT_FOUND, f"no journal {journal_id}", {"resource": "journal", "id": journal_id}
            )
        audit = await audit_block(conn, row, svc.signer, svc.hash_alg)
    return ok(journal=msgspec.Raw(bytes(row["body"])), audit=audit)


async def get_keys(request: web.Request) -> web.Response:
    """GET /keys: every signer public key, rotated ones included."""
    svc = services(request)
    async with svc.pool.acquire() as conn:
        rows = await repository.signer_keys(conn)
    keys = [
        {
            "kid": r["kid"],
            "algorithm": r["algorithm"],
            "kind": r["kind"],
            "pem": r["pem"],
            "created_at": rfc3339(r["created_at"]),
            "retired_at": rfc3339(r["retired_at"]) if r["retired_at"] else None,
        }
        for r in rows
    ]
    return ok(keys=keys)


async def get_balances(request: web.Request) -> web.Response:
    """GET /accounts/{account_id}/balances[?as_of=]: balances per currency."""
    svc = services(request)
    account_id = request.match_info["account_id"]
    account_type = account_type_of(account_id)
    if account_type is None:
        raise validation_error("malformed account_id", "account_id")
    as_of = query_time(request, "as_of")
    async with svc.pool.acquire() as conn:
        account = await repository.account_row(conn, account_id)
        if account is None:
            raise LedgerError(
                ErrorCode.NOT_FOUND, f"no account {account_id}", {"resource": "account", "id": account_id}
            )
        expired: dict[str, tuple[int, int]] = {}
        if as_of is None:
            rows = await repository.balances_now(conn, account_id)
            if any(r["debits_pending"] or r["credits_pending"] for r in rows):
                # Holds past expires_at are not pending any more, even before the shard's sweeper
                # has voided them (docs/api.md "Holds").
                now = datetime.now(UTC)
                expired = {
                    r[0]: (r[1], r[2]) for r in await holds_repo.expired_pending(conn, account_id, now)
                }
        else:
            rows = await repository.balances_as_of(conn, account_id, as_of)
    balances = [
        {
            "currency": r["currency"],
            "debits_posted": r["debits_posted"],
            "credits_posted": r["credits_posted"],
            "debits_pending": r["debits_pending"] - expired.get(r["currency"], (0, 0))[0],
            "credits_pending": r["credits_pending"] - expired.get(r["currency"], (0, 0))[1],
            "balance": normal_balance(account_type, r["debits_posted"], r["credits_posted"]),
        }
        for r in rows
    ]
    return ok(
        account_id=account_id,
        account_type=str(account_type),
        policy={"no_negative": account["no_negative"], "split": account["split"]},
        as_of=request.query.get("as_of"),
        balances=balances,
    )


async def create_account(request: web.Request) -> web.Response:
    """POST /accounts: create an account with its policy (admin)."""
    svc = services(request)
    body = await json_body(request)
    try:
        account = _account_decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise rejection_from_msgspec(exc) from None
    except msgspec.DecodeError as exc:
        raise validation_error(f"malformed JSON: {exc}", "$") from None
    if account_type_of(account.account_id) is None:
        raise validation_error(
            "account_id must be `type:rest` (asset|liability|equity|revenue|expense) of [A-Za-z0-9:._-]",
            "$.account_id",
        )
    policy = account.policy
    if policy.split and policy.no_negative:
        raise validation_error(
            "a split account is booked by every shard and cannot have the overdraft guard (no_negative)",
            "$.policy.split",
        )
    shard = svc.slot_map.shard_of(account.account_id)
    raw = await svc.shards[shard].create_account(account.account_id, policy.no_negative, policy.split)
    (result,) = RESULTS.decode(raw)
    if not result.ok:
        return error_response(result_error(result))
    if policy.split:
        svc.poster.add_split(account.account_id)
    created = bool((result.details or {}).get("created"))
    await audit_account_create(request, account.account_id, policy.no_negative, created, policy.split)
    return ok(
        201 if created else 200,
        account_id=account.account_id,
        policy={"no_negative": policy.no_negative, "split": policy.split},
        created=created,
    )


# -- the journal stream ---------------------------------------------------------------------
def _decode_cursor(text: str | None, streams: list[int]) -> dict[int, int]:
    positions = dict.fromkeys(streams, 0)
    if not text:
        return positions
    try:
        padded = text + "=" * (-len(text) % 4)
        stored = _cursor_decoder.decode(base64.urlsafe_b64decode(padded))
        for stream, seq in stored.items():
            if int(stream) in positions and seq >= 0:
                positions[int(stream)] = seq
    except (binascii.Error, msgspec.DecodeError, ValueError):
        raise validation_error("malformed cursor", "cursor") from None
    return positions


def _encode_cursor(positions: dict[int, int]) -> str:
    raw = msgspec.json.encode({str(k): v for k, v in sorted(positions.items())})
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _merge(rows: list[Any], limit: int) -> Iterator[Any]:
    """K-way merge of per-stream prefixes by commit time, keeping each stream's order."""
    per_stream: dict[int, list[Any]] = {}
    for row in rows:
        per_stream.setdefault(row["stream_id"], []).append(row)
    heap = [(r[0]["posted_at"], stream, 0) for stream, r in per_stream.items()]
    heapq.heapify(heap)
    taken = 0
    while heap and taken < limit:
        _, stream, index = heapq.heappop(heap)
        yield per_stream[stream][index]
        taken += 1
        if index + 1 < len(per_stream[stream]):
            heapq.heappush(heap, (per_stream[stream][index + 1]["posted_at"], stream, index + 1))


async def journal_stream(request: web.Request) -> web.Response:
    """GET /finance/ledger/journal: journals in commit order, with an opaque cursor."""
    svc = services(request)
    limit = query_int(request, "limit", 100, 1, STREAM_LIMIT_MAX)
    from_ts = query_time(request, "from_ts")
    to_ts = query_time(request, "to_ts")
    account_id = request.query.get("account_id") or None
    if account_id is not None and account_type_of(account_id) is None:
        raise validation_error("malformed account_id", "account_id")
    streams = [*svc.slot_map.shards, repository.COORDINATOR_STREAM]
    positions = _decode_cursor(request.query.get("cursor"), streams)
    async with svc.pool.acquire() as conn:
        rows = await repository.stream_heads(conn, positions, limit, from_ts, to_ts, account_id)
    journals = []
    for row in _merge(rows, limit):
        positions[row["stream_id"]] = row["stream_seq"]
        journals.append(msgspec.Raw(bytes(row["body"])))
    return ok(journals=journals, next_cursor=_encode_cursor(positions))


ROUTES: Final = [
    ("POST", "/ledger/post", post_journal, WRITERS),
    ("POST", "/ledger/post_batch", post_batch, WRITERS),
    ("GET", "/ledger/{journal_id}", get_journal, READERS),
    ("GET", "/accounts/{account_id}/balances", get_balances, READERS),
    ("POST", "/accounts", create_account, ADMINS),
    ("GET", "/finance/ledger/journal", journal_stream, READERS),
    ("GET", "/keys", get_keys, READERS),
]
