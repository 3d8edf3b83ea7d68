"""Multisig governance over HTTP (DECISIONS D7) and the operator's adjusting journal.

- `POST /admin/approvers` (admin): register an approver `{approver_id, public_key}` (PEM,
  Ed25519 or P-256); `GET /admin/approvers` (admin); `POST
  /admin/approvers/{approver_id}/revoke` (admin).
- `POST /finance/approvals/{action_id}` (operator, admin): `{approver_id, signature}`, the base64
  signature over the action's statement (`GET` shows it); answers the action's view, with
  `status: executed` once this approval completed the quorum and the action ran.
- `GET /finance/approvals?status=pending_approval&limit=100` (every reader role): newest actions
  first, in brief (`status` optional: any `ActionStatus`; `limit` 1-500, default 100).
- `GET /finance/approvals/{action_id}` (every reader role): the action, its statement, approvals.
- `POST /finance/approvals/{action_id}/reject` (operator, admin): `{reason}`.
- `POST /finance/journal` (operator, admin; D7): an adjusting journal, the journal shape of
  `POST /ledger/post` plus a required `reason`. Below the `journal` approval threshold it is
  posted at once (200, like `POST /ledger/post`); at or above it the call answers
  `202 {ok, action_id, status: "pending_approval", approvals_required}` and the journal is posted
  by the approval that completes the quorum.

Every call that changes something leaves an AuditEvent (`approver.register`, `approver.revoke`,
`approval.request`, `approval.approve`, `approval.reject`, `approval.execute`, `finance.journal`).
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Final

import msgspec
from aiohttp import web

from api.audit_log import audit_event
from api.auth import ADMINS, PRINCIPAL, READERS, Role
from api.envelope import ok
from api.posting import Submission
from api.requests import decode_json, json_body
from api.services import SERVICES, Services
from finance.governance import Governance, parse_thresholds
from finance.multisig import ActionStatus, parse_policy
from ledger.errors import ErrorCode, Rejection, validation_error
from ledger.journal import JournalIn, rejection_from_msgspec, validate_journal

GOVERNANCE: Final = web.AppKey("governance", Governance)
APPROVING: Final = frozenset({Role.OPERATOR, Role.ADMIN})
JOURNAL_KIND: Final = "journal"
REASON_MAX: Final = 500
LIST_LIMIT_DEFAULT: Final = 100
LIST_LIMIT_MAX: Final = 500


@dataclass(frozen=True, slots=True)
class GovernanceConfig:
    """`LEDGER_MULTISIG` (m-of-n), `LEDGER_APPROVAL_THRESHOLDS`, `LEDGER_APPROVAL_TTL_S`."""

    policy: str = "3-of-5"
    thresholds: str = "journal=10000000,payout_batch=10000000,payout=5000000,escrow_release=5000000"
    ttl_s: float = 7 * 24 * 3600.0


class ApproverIn(msgspec.Struct, forbid_unknown_fields=True):
    """`POST /admin/approvers`."""

    approver_id: str
    public_key: str


class ApprovalIn(msgspec.Struct, forbid_unknown_fields=True):
    """`POST /finance/approvals/{action_id}`."""

    approver_id: str
    signature: str


class RejectIn(msgspec.Struct, forbid_unknown_fields=True):
    """`POST /finance/approvals/{action_id}/reject`."""

    reason: str | None = None


class AdjustingJournalIn(msgspec.Struct, forbid_unknown_fields=True):
    """`POST /finance/journal`: a journal plus the reason for the adjustment."""

    entries: list[dict[str, Any]]
    reason: str
    journal_id: str | None = None
    context: dict[str, Any] = {}
    ts: str | None = None
    reverses: str | None = None
    memo: str | None = None
    source_ref: str | None = None


def _who(request: web.Request) -> str:
    return request[PRINCIPAL].name


def _gov(request: web.Request) -> Governance:
    return request.app[GOVERNANCE]


def install(app: web.Application, config: GovernanceConfig) -> None:
    """Attach the governance service and the `journal` executor (before the app starts)."""
    svc = app[SERVICES]
    governance = Governance(
        svc.pool,
        policy=parse_policy(config.policy),
        thresholds=parse_thresholds(config.thresholds),
        base_currency=svc.base_currency,
        ttl=timedelta(seconds=config.ttl_s),
    )

    async def post_adjustment(params: dict[str, Any], principal: str) -> dict[str, Any]:
        return await post_journal_body(svc, params["journal"], principal)

    governance.register(JOURNAL_KIND, post_adjustment)
    app[GOVERNANCE] = governance

    async def resume(_app: web.Application) -> None:
        await governance.resume()

    app.on_startup.append(resume)


# -- approvers ---------------------------------------------------------------------------------
async def add_approver(request: web.Request) -> web.Response:
    """POST /admin/approvers: 201 new, 200 replay."""
    decoded = decode_json(await json_body(request), ApproverIn)
    view, created = await _gov(request).add_approver(decoded.approver_id, decoded.public_key, _who(request))
    if created:
        await audit_event(request, "approver.register", {k: view[k] for k in ("approver_id", "fingerprint")})
    return ok(201 if created else 200, approver=view)


async def list_approvers(request: web.Request) -> web.Response:
    """GET /admin/approvers."""
    governance = _gov(request)
    return ok(approvers=await governance.list_approvers(), policy=governance.policy.label)


async def revoke_approver(request: web.Request) -> web.Response:
    """POST /admin/approvers/{approver_id}/revoke."""
    view = await _gov(request).revoke_approver(request.match_info["approver_id"], _who(request))
    await audit_event(request, "approver.revoke", {"approver_id": view["approver_id"]})
    return ok(approver=view)


# -- actions ------------------------------------------------------------------------------------
async def approve(request: web.Request) -> web.Response:
    """POST /finance/approvals/{action_id}: record one approval (executes on the quorum)."""
    decoded = decode_json(await json_body(request), ApprovalIn)
    action_id = request.match_info["action_id"]
    view, recorded = await _gov(request).approve(
        action_id, decoded.approver_id, decoded.signature, _who(request)
    )
    if recorded:
        await audit_event(
            request,
            "approval.approve",
            {"action_id": action_id, "approver_id": decoded.approver_id, "signature": decoded.signature,
             "params_hash": view["statement"]["params_hash"]},
        )  # fmt: skip
        if view["status"] in ("executed", "failed"):
            await audit_event(
                request,
                "approval.execute",
                {
                    "action_id": action_id,
                    "kind": view["kind"],
                    "status": view["status"],
                    "result": view["result"],
                },
            )
    return ok(action=view)


async def list_actions(request: web.Request) -> web.Response:
    """GET /finance/approvals?status=&limit=: the operator's queue of gated actions."""
    raw_status = request.query.get("status") or None
    try:
        status = None if raw_status is None else ActionStatus(raw_status)
    except ValueError:
        allowed = ", ".join(ActionStatus)
        raise validation_error(f"status must be one of {allowed}", "$.query.status") from None
    raw_limit = request.query.get("limit") or str(LIST_LIMIT_DEFAULT)
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= LIST_LIMIT_MAX:
        raise validation_error(f"limit must be an integer 1-{LIST_LIMIT_MAX}", "$.query.limit")
    actions = await _gov(request).list_actions(status, int(raw_limit))
    return ok(actions=actions, policy=_gov(request).policy.label)


async def get_action(request: web.Request) -> web.Response:
    """GET /finance/approvals/{action_id}."""
    return ok(action=await _gov(request).view(request.match_info["action_id"]))


async def reject(request: web.Request) -> web.Response:
    """POST /finance/approvals/{action_id}/reject."""
    body = await json_body(request)
    decoded = decode_json(body, RejectIn) if body.strip() else RejectIn()
    view = await _gov(request).reject(request.match_info["action_id"], _who(request), decoded.reason)
    await audit_event(request, "approval.reject", {"action_id": view["action_id"], "reason": view["reason"]})
    return ok(action=view)


def _largest_side_total(journal_lines: Any) -> tuple[int, str]:
    """The largest per-currency debit total of a journal and its currency (what the gate weighs)."""
    totals: dict[str, int] = {}
    for line in journal_lines:
        if line.is_debit:
            totals[line.currency] = totals.get(line.currency, 0) + line.amount
    currency = max(sorted(totals), key=lambda c: totals[c])
    return totals[currency], currency


async def post_journal_body(svc: Services, body: dict[str, Any], principal: str) -> dict[str, Any]:
    """Post a journal body now: `{journal_id, posted_at}`; a rejection is raised."""
    journal = validate_journal(msgspec.convert(body, JournalIn))
    (result,) = await svc.poster.post([Submission(journal, principal, None)])
    if not result.ok:
        raise Rejection(
            ErrorCode(result.code or ErrorCode.INTERNAL_ERROR), result.message or "", result.details or {}
        )
    return {"journal_id": result.journal_id, "posted_at": result.posted_at}


async def adjust(
    request: web.Request, body: dict[str, Any], kind: str = JOURNAL_KIND, params: dict[str, Any] | None = None
) -> tuple[int, dict[str, Any]]:
    """Post an adjusting journal body, or submit it for approval when its largest per-currency side
    reaches the `journal` threshold (as action `{kind}.{journal_id}` of `kind` with `params`,
    default `{"journal": body}`): (200, {journal_id, posted_at}) or (202, the pending action)."""
    try:
        journal = validate_journal(msgspec.convert(body, JournalIn))
    except msgspec.ValidationError as exc:
        raise rejection_from_msgspec(exc) from None
    amount, currency = _largest_side_total(journal.lines)
    governance = _gov(request)
    who = _who(request)
    if await governance.requires_approval(JOURNAL_KIND, amount, currency):
        action_id = f"{kind}.{body['journal_id']}"
        view, created = await governance.submit(
            kind, action_id, params or {"journal": body}, amount, currency, who
        )
        if created:
            await audit_event(
                request,
                "approval.request",
                {"action_id": action_id, "kind": kind, "params_hash": view["statement"]["params_hash"]},
            )
        return 202, {"action_id": action_id, "status": view["status"],
                     "approvals_required": view["approvals_required"], "action": view}  # fmt: skip
    return 200, await post_journal_body(request.app[SERVICES], body, who)


async def adjusting_journal(request: web.Request) -> web.Response:
    """POST /finance/journal: an operator's adjusting journal, gated above the `journal` threshold."""
    decoded = decode_json(await json_body(request), AdjustingJournalIn)
    reason = decoded.reason.strip()
    if not 1 <= len(reason) <= REASON_MAX:
        raise validation_error(f"reason is required, 1-{REASON_MAX} characters", "$.reason")
    who = _who(request)
    journal_id = decoded.journal_id or f"adj-{uuid.uuid4()}"
    body = {
        "entries": decoded.entries,
        "journal_id": journal_id,
        "context": {**decoded.context, "adjustment": {"reason": reason, "requested_by": who}},
        "ts": decoded.ts,
        "reverses": decoded.reverses,
        "memo": decoded.memo,
        "source_ref": decoded.source_ref,
    }
    status, answer = await adjust(request, body)
    if status == 200:
        await audit_event(request, "finance.journal", {"journal_id": answer["journal_id"], "reason": reason})
    return ok(status, **answer)


ROUTES: Final[
    list[tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]], frozenset[Role]]]
] = [
    ("POST", "/admin/approvers", add_approver, ADMINS),
    ("GET", "/admin/approvers", list_approvers, ADMINS),
    ("POST", "/admin/approvers/{approver_id}/revoke", revoke_approver, ADMINS),
    ("POST", "/finance/approvals/{action_id}", approve, APPROVING),
    ("GET", "/finance/approvals", list_actions, READERS),
    ("GET", "/finance/approvals/{action_id}", get_action, READERS),
    ("POST", "/finance/approvals/{action_id}/reject", reject, APPROVING),
    ("POST", "/finance/journal", adjusting_journal, APPROVING),
]
