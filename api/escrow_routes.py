"""Escrow over HTTP (REQUIREMENTS F7, DECISIONS D7): allocate, release, cancel, read.

- `POST /finance/allocate_escrow` (service, operator, admin) `{escrow_id, order_id, amount,
  currency, condition, payee | payee_account, provider?, funding_account?}`: funds the split
  escrow pool and holds the amount for the payee; 200 `{escrow}` with status `locked`.
- `POST /finance/release_escrow` `{escrow_id, evidence?}`: checks the condition and posts the
  hold; 200 `{escrow}` with status `released`. An `approval` condition, or an amount at or above
  the `escrow_release` threshold, answers `202 {action_id, status: "pending_approval",
  approvals_required}` and the approval that completes the quorum releases it.
- `POST /finance/cancel_escrow` `{escrow_id, reason?}`: voids the hold and refunds the funding
  account; 200 `{escrow}` with status `cancelled`.
- `GET /finance/escrow/{escrow_id}` (every reader role).

The same request again answers 200 with the escrow (a replay: no ledger call is repeated);
another payload for the escrow id is 409 IDEMPOTENCY_CONFLICT; a release of a cancelled escrow or
a cancel of a released one is 409 INVALID_STATE (`current`, `requested`). Each escrow is changed
under its advisory lock, and every ledger call is made as principal `system:escrow` under an id
derived from the escrow, so a retry after a crash replays it. The money flows are in
finance/escrow.py and docs/accounting.md "Escrow".

Audit events: `escrow.allocate`, `escrow.release`, `escrow.cancel`, `approval.request`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Final

import asyncpg
import msgspec
from aiohttp import web

from actors.messages import Result
from api import hold_calls
from api.approval_routes import GOVERNANCE
from api.audit_log import AUDIT_WRITER, audit_event, record_event
from api.auth import PRINCIPAL, READERS, WRITERS, Role
from api.envelope import ok
from api.posting import Submission
from api.requests import decode_json, json_body
from api.services import SERVICES, Services
from finance import escrow
from ledger.errors import ErrorCode, LedgerError, Rejection, validation_error
from ledger.journal import JournalIn, validate_journal
from ledger.timestamps import parse_rfc3339, rfc3339
from store import escrow_repo, royalty_repo

SYSTEM_PRINCIPAL: Final = "system:escrow"
_condition_decoder: Final = msgspec.json.Decoder(escrow.Condition)


def _not_found(escrow_id: str) -> LedgerError:
    return LedgerError(
        ErrorCode.NOT_FOUND, f"no escrow {escrow_id}", {"resource": "escrow", "escrow_id": escrow_id}
    )


def _time(value: datetime | None) -> str | None:
    return rfc3339(value) if value is not None else None


def _at(result: Result) -> datetime:
    """The ledger's commit time of a result (a replay carries the original one)."""
    parsed = parse_rfc3339(result.posted_at) if result.posted_at else None
    return parsed or datetime.now(UTC)


def _json(value: Any) -> Any:
    return None if value is None else msgspec.json.decode(value)


def escrow_view(row: asyncpg.Record) -> dict[str, Any]:
    """An escrow as the API shows it: the seeds' names and their snake_case twins (D4)."""
    escrow_id = row["escrow_id"]
    status = row["status"]
    return {
        "id": escrow_id, "escrow_id": escrow_id, "orderId": row["order_id"], "order_id": row["order_id"],
        "amount": row["amount"], "currency": row["currency"], "condition": _json(row["condition"]),
        "status": status, "createdAt": _time(row["created_at"]), "created_at": _time(row["created_at"]),
        "releasedAt": _time(row["released_at"]), "released_at": _time(row["released_at"]),
        "cancelledAt": _time(row["cancelled_at"]), "cancelled_at": _time(row["cancelled_at"]),
        "provider": row["provider"], "funding_account": row["funding_account"],
        "pool_account": row["pool_account"], "payee_account": row["payee_account"],
        "participant_id": row["participant_id"], "hold_id": row["hold_id"],
        "journals": {
            "fund": escrow.fund_journal_id(escrow_id),
            "release": row["hold_id"] if status == "released" else None,
            "refund": escrow.refund_journal_id(escrow_id) if status == "cancelled" else None,
        },
        "evidence": _json(row["evidence"]), "reason": row["reason"], "action_id": row["action_id"],
    }  # fmt: skip


def _answer(row: asyncpg.Record, status: int = 200) -> web.Response:
    return ok(status, escrowId=row["escrow_id"], escrow_id=row["escrow_id"], escrow=escrow_view(row))


def _terms(row: asyncpg.Record) -> escrow.Terms:
    return escrow.Terms(
        row["escrow_id"], row["order_id"], row["amount"], row["currency"],
        _condition_decoder.decode(row["condition"]), row["provider"], row["funding_account"],
        row["pool_account"], row["payee_account"], row["participant_id"],
    )  # fmt: skip


async def _post(
    svc: Services, journal_id: str, entries: list[dict[str, Any]], memo: str, escrow_id: str
) -> Result:
    body = {"journal_id": journal_id, "entries": entries, "memo": memo, "source_ref": escrow_id,
            "context": {"escrow_id": escrow_id}}  # fmt: skip
    journal = validate_journal(msgspec.convert(body, JournalIn))
    (result,) = await svc.poster.post([Submission(journal, SYSTEM_PRINCIPAL, None)])
    if not result.ok:
        raise hold_calls.result_error(result)
    return result


def _succeeded(result: Result) -> Result:
    if not result.ok:
        raise hold_calls.result_error(result)
    return result


# -- allocate ------------------------------------------------------------------------------------
async def _allocate_in_ledger(svc: Services, terms: escrow.Terms) -> None:
    """Fund the pool, then hold the amount for the payee (both replay after a crash)."""
    await hold_calls.ensure_split_account(svc, terms.pool_account)
    await _post(svc, escrow.fund_journal_id(terms.escrow_id), escrow.fund_entries(terms), "escrow funded",
                terms.escrow_id)  # fmt: skip
    body = {"journal_id": escrow.hold_id(terms.escrow_id), "entries": escrow.hold_entries(terms),
            "memo": "escrow locked", "source_ref": terms.escrow_id,
            "context": {"escrow_id": terms.escrow_id, "order_id": terms.order_id}}  # fmt: skip
    _succeeded(await hold_calls.create_hold(svc, SYSTEM_PRINCIPAL, body))


async def allocate(request: web.Request) -> web.Response:
    """POST /finance/allocate_escrow."""
    terms = escrow.terms_of(decode_json(await json_body(request), escrow.AllocateRequest))
    svc = request.app[SERVICES]
    digest = escrow.allocate_hash(terms)
    created = False
    async with svc.pool.acquire() as conn:
        if (
            terms.participant_id is not None
            and await royalty_repo.participant(conn, terms.participant_id) is None
        ):
            raise validation_error(f"unknown participant {terms.participant_id!r}", "$.payee")
        async with escrow_repo.locked(conn, terms.escrow_id):
            row = await escrow_repo.escrow(conn, terms.escrow_id)
            if row is not None and bytes(row["request_hash"]) != digest:
                raise Rejection(
                    ErrorCode.IDEMPOTENCY_CONFLICT, "escrow id already used with a different request",
                    {"escrow_id": terms.escrow_id},
                )  # fmt: skip
            if row is None:
                await _allocate_in_ledger(svc, terms)
                values = {**msgspec.structs.asdict(terms), "hold_id": escrow.hold_id(terms.escrow_id),
                          "condition": msgspec.json.encode(terms.condition).decode(),
                          "request_hash": digest, "principal": request[PRINCIPAL].name}  # fmt: skip
                await escrow_repo.insert_escrow(conn, values)
                row = await escrow_repo.escrow(conn, terms.escrow_id)
                created = True
    assert row is not None  # for mypy: found or just inserted
    if created:
        await audit_event(
            request, "escrow.allocate",
            {"escrow_id": terms.escrow_id, "order_id": terms.order_id, "amount": terms.amount,
             "currency": terms.currency, "payee_account": terms.payee_account,
             "condition": escrow.condition_type(terms.condition)},
        )  # fmt: skip
    return _answer(row)


# -- release -------------------------------------------------------------------------------------
async def _condition_holds(
    app: web.Application, conn: asyncpg.Connection, row: asyncpg.Record, evidence: escrow.Evidence | None
) -> None:
    condition = _condition_decoder.decode(row["condition"])
    found = False
    if isinstance(condition, escrow.AuditEvent):
        writer = app.get(AUDIT_WRITER)
        if writer is not None:
            await writer.flush()  # events of calls already answered count
        found = await escrow_repo.audit_event_exists(conn, condition.event_id)
    escrow.check_condition(row["escrow_id"], condition, evidence, found)


async def perform_release(
    app: web.Application, request: escrow.ReleaseRequest
) -> tuple[asyncpg.Record, bool]:
    """Release under the escrow's lock: (the escrow, whether this call released it)."""
    svc = app[SERVICES]
    params = escrow.release_params(request)
    digest = escrow.action_hash(escrow.Action.RELEASE, params)
    async with svc.pool.acquire() as conn, escrow_repo.locked(conn, request.escrow_id):
        row = await _existing(conn, request.escrow_id)
        step = _step(row, escrow.Action.RELEASE, digest)
        if step is escrow.Step.REPLAY:
            return row, False
        await _condition_holds(app, conn, row, request.evidence)
        evidence = None if params["evidence"] is None else msgspec.json.encode(params["evidence"]).decode()
        await escrow_repo.record_action(conn, request.escrow_id, "release", digest, evidence, None)
        posted = _succeeded(await hold_calls.resolve_hold(svc, row["hold_id"], SYSTEM_PRINCIPAL, True, conn))
        await escrow_repo.finish(conn, request.escrow_id, "released", _at(posted))
        return await _existing(conn, request.escrow_id), True


async def _existing(conn: asyncpg.Connection, escrow_id: str) -> asyncpg.Record:
    row = await escrow_repo.escrow(conn, escrow_id)
    if row is None:
        raise _not_found(escrow_id)
    return row


def _step(row: asyncpg.Record, requested: escrow.Action, digest: bytes) -> escrow.Step:
    recorded = None if row["action"] is None else escrow.Action(row["action"])
    recorded_hash = None if row["action_hash"] is None else bytes(row["action_hash"])
    return escrow.next_step(
        row["escrow_id"], escrow.Status(row["status"]), recorded, recorded_hash, requested, digest
    )


def _release_event(row: asyncpg.Record) -> dict[str, Any]:
    return {"escrow_id": row["escrow_id"], "hold_id": row["hold_id"], "amount": row["amount"],
            "currency": row["currency"], "payee_account": row["payee_account"],
            "released_at": _time(row["released_at"])}  # fmt: skip


async def release(request: web.Request) -> web.Response:
    """POST /finance/release_escrow: release now, or 202 when governance must approve first."""
    decoded = decode_json(await json_body(request), escrow.ReleaseRequest)
    escrow.check_release(decoded)
    svc = request.app[SERVICES]
    params = escrow.release_params(decoded)
    async with svc.pool.acquire() as conn:
        row = await _existing(conn, decoded.escrow_id)
        step = _step(row, escrow.Action.RELEASE, escrow.action_hash(escrow.Action.RELEASE, params))
        if step is escrow.Step.REPLAY:
            return _answer(row)
        await _condition_holds(request.app, conn, row, decoded.evidence)
    condition = _condition_decoder.decode(row["condition"])
    governance = request.app[GOVERNANCE]
    if escrow.needs_approval(condition) or await governance.requires_approval(
        escrow.KIND, row["amount"], row["currency"]
    ):
        return await _submit(request, row, params)
    row, released = await perform_release(request.app, decoded)
    if released:
        await audit_event(request, "escrow.release", _release_event(row))
    return _answer(row)


async def _submit(request: web.Request, row: asyncpg.Record, params: dict[str, Any]) -> web.Response:
    governance = request.app[GOVERNANCE]
    action_id = f"{escrow.KIND}.{row['escrow_id']}"
    who = request[PRINCIPAL].name
    view, created = await governance.submit(
        escrow.KIND, action_id, params, row["amount"], row["currency"], who
    )
    if created:
        async with request.app[SERVICES].pool.acquire() as conn:
            await escrow_repo.set_action_id(conn, row["escrow_id"], action_id)
        await audit_event(
            request, "approval.request",
            {"action_id": action_id, "kind": escrow.KIND, "params_hash": view["statement"]["params_hash"],
             "escrow_id": row["escrow_id"]},
        )  # fmt: skip
    return ok(
        202, action_id=action_id, status=view["status"], approvals_required=view["approvals_required"],
        escrowId=row["escrow_id"], escrow_id=row["escrow_id"], action=view,
    )  # fmt: skip


# -- cancel --------------------------------------------------------------------------------------
async def cancel(request: web.Request) -> web.Response:
    """POST /finance/cancel_escrow: void the hold and give the money back to the funding account."""
    decoded = decode_json(await json_body(request), escrow.CancelRequest)
    escrow.check_cancel(decoded)
    svc = request.app[SERVICES]
    digest = escrow.action_hash(
        escrow.Action.CANCEL, {"escrow_id": decoded.escrow_id, "reason": decoded.reason}
    )
    async with svc.pool.acquire() as conn, escrow_repo.locked(conn, decoded.escrow_id):
        row = await _existing(conn, decoded.escrow_id)
        if _step(row, escrow.Action.CANCEL, digest) is escrow.Step.REPLAY:
            return _answer(row)
        await escrow_repo.record_action(conn, decoded.escrow_id, "cancel", digest, None, decoded.reason)
        _succeeded(await hold_calls.resolve_hold(svc, row["hold_id"], SYSTEM_PRINCIPAL, False, conn))
        terms = _terms(row)
        refund = await _post(svc, escrow.refund_journal_id(terms.escrow_id), escrow.refund_entries(terms),
                             "escrow cancelled", terms.escrow_id)  # fmt: skip
        await escrow_repo.finish(conn, decoded.escrow_id, "cancelled", _at(refund))
        row = await _existing(conn, decoded.escrow_id)
    await audit_event(
        request, "escrow.cancel",
        {"escrow_id": row["escrow_id"], "refund_journal_id": escrow.refund_journal_id(row["escrow_id"]),
         "amount": row["amount"], "currency": row["currency"], "reason": row["reason"]},
    )  # fmt: skip
    return _answer(row)


async def get_escrow(request: web.Request) -> web.Response:
    """GET /finance/escrow/{escrow_id}."""
    async with request.app[SERVICES].pool.acquire() as conn:
        row = await _existing(conn, request.match_info["escrow_id"])
    return _answer(row)


def install(app: web.Application) -> None:
    """The governance executor of gated releases (after `approval_routes.install`)."""

    async def execute(params: dict[str, Any], principal: str) -> dict[str, Any]:
        decoded = msgspec.convert(params, escrow.ReleaseRequest)
        try:
            row, released = await perform_release(app, decoded)
        except LedgerError as exc:
            raise Rejection(exc.code, exc.message, exc.details) from exc
        if released:
            await record_event(app, principal, "escrow.release", _release_event(row))
        return {
            "escrow_id": row["escrow_id"],
            "status": row["status"],
            "released_at": _time(row["released_at"]),
        }

    app[GOVERNANCE].register(escrow.KIND, execute)


ROUTES: Final[
    list[tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]], frozenset[Role]]]
] = [
    ("POST", "/finance/allocate_escrow", allocate, WRITERS),
    ("POST", "/finance/release_escrow", release, WRITERS),
    ("POST", "/finance/cancel_escrow", cancel, WRITERS),
    ("GET", "/finance/escrow/{escrow_id}", get_escrow, READERS),
]
