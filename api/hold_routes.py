"""Hold endpoints (REQUIREMENTS L6, DECISIONS D7): pending amounts that are later posted or voided.

`POST /ledger/holds` validates a journal like `POST /ledger/post` and sends it, as a hold, to
the shard that owns its accounts; `POST /ledger/holds/{id}/post` (full, or partial: smaller
amounts per line) and `/void` go to the shard recorded with the hold; `GET /ledger/holds/{id}`
reads the store. The owning shard is the single writer of a hold (see `actors/shard_holds.py`).
"""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime
from typing import Any, Final

import msgspec
from aiohttp import web

from actors.messages import JOURNAL, HoldItem, Result
from api.audit_log import audit_event
from api.auth import PRINCIPAL, READERS, WRITERS
from api.envelope import error_response, ok
from api.hold_calls import VOID_HASH, post_digest, result_error, send_hold
from api.requests import idempotency_key, json_body
from api.services import SERVICES, Services
from ledger.errors import ErrorCode, LedgerError, Rejection, validation_error
from ledger.journal import JournalIn, Line, rejection_from_msgspec, validate_journal
from ledger.timestamps import parse_rfc3339, rfc3339
from signer.canonical import canonical, request_hash
from store import holds_repo


class HoldIn(JournalIn, forbid_unknown_fields=True):
    """`POST /ledger/holds` body: the journal shape of `POST /ledger/post` plus `expires_at`."""

    expires_at: str | None = None


class LineAmount(msgspec.Struct, forbid_unknown_fields=True):
    """One line of a partial post: the held line's number and the amount to post."""

    line_no: int
    amount_cents: int


class HoldPostIn(msgspec.Struct, forbid_unknown_fields=True):
    """`POST /ledger/holds/{id}/post` body (all optional: no amounts posts the hold in full)."""

    amount_cents: int | None = None
    entries: list[LineAmount] | None = None


_hold_decoder: Final = msgspec.json.Decoder(HoldIn)
_post_decoder: Final = msgspec.json.Decoder(HoldPostIn)


def _decode(decoder: msgspec.json.Decoder[Any], body: bytes) -> Any:
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise rejection_from_msgspec(exc) from None
    except msgspec.DecodeError as exc:
        raise validation_error(f"malformed JSON: {exc}", "$") from None


def _answer(result: Result) -> web.Response:
    if not result.ok:
        return error_response(result_error(result))
    details = result.details or {}
    body: dict[str, Any] = {"hold_id": result.journal_id, "state": details.get("state")}
    if details.get("state") == "posted":
        body["posted_journal_id"] = details.get("posted_journal_id")
        body["posted_at"] = result.posted_at
    elif details.get("state") == "pending":
        body["created_at"] = result.posted_at
    else:
        body["resolved_at"] = result.posted_at
    return ok(**body)


async def create_hold(request: web.Request) -> web.Response:
    """POST /ledger/holds: a journal posted as pending; 200 {ok, hold_id, state, created_at}."""
    svc = request.app[SERVICES]
    body = await json_body(request)
    key = idempotency_key(request)
    raw: HoldIn = _decode(_hold_decoder, body)
    if raw.reverses is not None:
        raise validation_error("a hold cannot reverse a journal; post the reversal", "$.reverses")
    expires_at = None
    if raw.expires_at is not None:
        expires_at = parse_rfc3339(raw.expires_at)
        if expires_at is None:
            raise validation_error("expires_at must be an RFC 3339 timestamp", "$.expires_at")
    who = request[PRINCIPAL].name
    try:
        journal = validate_journal(raw)
    except Rejection as rejection:
        raise await _conflict_first(svc, rejection, raw.journal_id, who, key) from None
    hold_id = journal.journal_id or f"hold-{uuid.uuid4().hex}"
    shard = svc.poster.shard_of_lines(hold_id, journal.lines)
    if shard is None:
        raise validation_error(
            "a hold's accounts must live on one shard (cross-shard holds are not supported yet)", "$.entries"
        )
    digest = hashlib.sha256(request_hash(journal) + canonical(raw.expires_at)).digest()
    item = HoldItem(
        "create", hold_id, who, key, digest, journal.with_id(hold_id),
        expires_at=rfc3339(expires_at) if expires_at is not None else None,
    )  # fmt: skip
    result = await send_hold(svc, shard, item)
    if result.ok:
        await audit_event(
            request, "ledger.hold", {"hold_id": result.journal_id, "created_at": result.posted_at}
        )
    return _answer(result)


async def _conflict_first(
    svc: Services, rejection: Rejection, hold_id: str | None, who: str, key: str | None
) -> Rejection:
    """D6 precedence: a hold id or key already used answers IDEMPOTENCY_CONFLICT before LEDGER_IMBALANCE."""
    if rejection.code is not ErrorCode.LEDGER_IMBALANCE or (hold_id is None and key is None):
        return rejection
    async with svc.pool.acquire() as conn:
        found = await holds_repo.find_holds(conn, hold_id or "", who, key)
    if not found:
        return rejection
    return Rejection(
        ErrorCode.IDEMPOTENCY_CONFLICT,
        "hold id or Idempotency-Key already used with a different payload",
        {"hold_id": found[0]["hold_id"]},
    )


async def _hold_or_404(svc: Services, hold_id: str) -> tuple[Any, list[Any]]:
    async with svc.pool.acquire() as conn:
        row = await holds_repo.hold_row(conn, hold_id)
        lines = await holds_repo.hold_lines(conn, hold_id) if row is not None else []
    if row is None:
        raise LedgerError(ErrorCode.NOT_FOUND, f"no hold {hold_id}", {"resource": "hold", "id": hold_id})
    return row, lines


def _posted_lines(held: tuple[Line, ...], post: HoldPostIn) -> tuple[Line, ...]:
    """The lines to post: the held ones, with smaller amounts where the request asks for them."""
    if post.amount_cents is not None and post.entries is not None:
        raise validation_error("give amount_cents or entries, not both", "$.amount_cents")
    amounts = [line.amount for line in held]
    if post.amount_cents is not None:
        if len(held) != 2:
            raise validation_error("amount_cents is for two-line holds; give entries", "$.amount_cents")
        if not 0 < post.amount_cents <= held[0].amount:
            raise validation_error(
                f"amount_cents must be 1..{held[0].amount} (the held amount)", "$.amount_cents",
                held=held[0].amount, requested=post.amount_cents,
            )  # fmt: skip
        amounts = [post.amount_cents, post.amount_cents]
    seen: set[int] = set()
    for index, entry in enumerate(post.entries or ()):
        field = f"$.entries[{index}]"
        if not 0 <= entry.line_no < len(held) or entry.line_no in seen:
            raise validation_error("line_no must name a held line, once", f"{field}.line_no")
        seen.add(entry.line_no)
        limit = held[entry.line_no].amount
        if not 0 < entry.amount_cents <= limit:
            raise validation_error(
                f"amount_cents must be 1..{limit} (the held amount)", f"{field}.amount_cents",
                held=limit, requested=entry.amount_cents,
            )  # fmt: skip
        amounts[entry.line_no] = entry.amount_cents
    lines = tuple(msgspec.structs.replace(line, amount=n) for line, n in zip(held, amounts, strict=True))
    totals: dict[str, int] = {}
    for line in lines:
        totals[line.currency] = totals.get(line.currency, 0) + (
            line.amount if line.is_debit else -line.amount
        )
    for currency, net in sorted(totals.items()):
        if net:
            raise Rejection(
                ErrorCode.LEDGER_IMBALANCE, f"the posted amounts do not balance in {currency} (net {net})",
                {"currency": currency, "net": net, "field": "$.entries"},
            )  # fmt: skip
    return lines


async def post_hold(request: web.Request) -> web.Response:
    """POST /ledger/holds/{id}/post: post the hold in full or in part (releasing the rest)."""
    svc = request.app[SERVICES]
    hold_id = request.match_info["hold_id"]
    body = await json_body(request) if request.can_read_body else b""
    post = _decode(_post_decoder, body) if body.strip() else HoldPostIn()
    row, _ = await _hold_or_404(svc, hold_id)
    lines = _posted_lines(JOURNAL.decode(row["journal"]).lines, post)
    who = request[PRINCIPAL].name
    item = HoldItem("post", hold_id, who, None, post_digest(lines), lines=lines)
    result = await send_hold(svc, row["shard_id"], item)
    if result.ok:
        payload = {"hold_id": hold_id, "journal_id": hold_id, "posted_at": result.posted_at,
                   "hash": result.hash.hex() if result.hash is not None else None}  # fmt: skip
        await audit_event(request, "ledger.hold_post", payload)
    return _answer(result)


async def void_hold(request: web.Request) -> web.Response:
    """POST /ledger/holds/{id}/void: release the hold's pending amounts."""
    svc = request.app[SERVICES]
    hold_id = request.match_info["hold_id"]
    row, _ = await _hold_or_404(svc, hold_id)
    who = request[PRINCIPAL].name
    result = await send_hold(svc, row["shard_id"], HoldItem("void", hold_id, who, None, VOID_HASH))
    if result.ok:
        await audit_event(request, "ledger.hold_void", {"hold_id": hold_id, "voided_at": result.posted_at})
    return _answer(result)


def _time(value: datetime | None) -> str | None:
    return rfc3339(value) if value is not None else None


async def get_hold(request: web.Request) -> web.Response:
    """GET /ledger/holds/{id}: state (pending|posted|voided|expired), lines, expiry, posted journal."""
    svc = request.app[SERVICES]
    row, lines = await _hold_or_404(svc, request.match_info["hold_id"])
    state = row["state"]
    if state == "pending" and row["expires_at"] is not None and row["expires_at"] <= datetime.now(UTC):
        state = "expired"  # past its expiry: expired now, whether or not the shard's sweeper has run
    return ok(
        hold={
            "hold_id": row["hold_id"],
            "state": state,
            "lines": [
                {
                    "line_no": r["line_no"],
                    "account_id": r["account_id"],
                    "side": "debit" if r["side"] == "D" else "credit",
                    "amount_cents": r["amount"],
                    "currency": r["currency"],
                }
                for r in lines
            ],
            "expires_at": _time(row["expires_at"]),
            "created_at": _time(row["created_at"]),
            "resolved_at": _time(row["resolved_at"]) if state == row["state"] else _time(row["expires_at"]),
            "posted_journal_id": row["posted_journal_id"],
            "principal": row["principal"],
        }
    )


ROUTES: Final = [
    ("POST", "/ledger/holds", create_hold, WRITERS),
    ("POST", "/ledger/holds/{hold_id}/post", post_hold, WRITERS),
    ("POST", "/ledger/holds/{hold_id}/void", void_hold, WRITERS),
    ("GET", "/ledger/holds/{hold_id}", get_hold, READERS),
]
