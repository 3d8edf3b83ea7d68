"""Finance endpoints: invoices, their lifecycle steps, payments, settlements, recorded invoices.

Writes (service, operator, admin) accept an `Idempotency-Key` (per principal, compared on the
decoded canonical payload and the endpoint: an exact replay answers the original answer, a
different payload 409 IDEMPOTENCY_CONFLICT) and record an audit event after success. The work is
done by `finance.service.FinanceService`; journals go through the node's `Poster` (`LedgerJournals`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import Any, Final

import msgspec
from aiohttp import web

from api.audit_log import AUDIT_WRITER, audit_event, audit_failures
from api.auth import PRINCIPAL, PUBLIC, READERS, WRITERS, Role
from api.hold_calls import ensure_split_account
from api.posting import Poster, Submission
from api.requests import decode_json, idempotency_key, json_body
from api.services import SERVICES, Services
from finance import chart, recognition
from finance.service import (
    ExternalInvoiceRequest,
    FinanceService,
    InvoiceRequest,
    PaymentRequest,
    Posted,
    RefundRequest,
    StripeApplied,
    one_id,
    request_digest,
)
from finance.stripe_events import DisputeClosed, DisputeOpened, PaymentSucceeded, verify_event
from ledger.errors import ErrorCode, LedgerError, Rejection, validation_error
from ledger.journal import Journal
from ledger.timestamps import parse_rfc3339
from store import finance_repo

FINANCE: Final = web.AppKey("finance", FinanceService)
STRIPE_SECRET_ENV: Final = "STRIPE_WEBHOOK_SECRET"
STRIPE_ACTOR: Final = "stripe:webhook"
"""The audit actor and posting principal of `POST /webhooks/stripe` (authenticated by signature, D5)."""
log = logging.getLogger(__name__)


class LedgerJournals:
    """`finance.service.JournalPoster` over the node's poster (shards and coordinator).

    The chart's platform-wide accounts (`chart.is_platform_wide`: cash, tax payable, revenue, ...)
    are created as split accounts before their first journal, so the journals pairing them with
    one buyer's or participant's account stay single-shard. One that already exists unsplit (made
    by an older node) stays as it is: correct, only cross-shard."""

    def __init__(self, svc: Services) -> None:
        self.svc = svc
        self.poster: Poster = svc.poster
        self.ordinary: set[str] = set()
        """Platform-wide accounts found to exist unsplit (not asked again)."""

    async def post_journals(self, journals: list[Journal], principal: str) -> list[Posted]:
        """Post through the ledger; one answer per journal, in order."""
        await self._split_platform_accounts(journals)
        results = await self.poster.post([Submission(j, principal, None) for j in journals])
        return [Posted(r.journal_id, r.ok, r.posted_at, r.code, r.message, r.details) for r in results]

    async def _split_platform_accounts(self, journals: list[Journal]) -> None:
        """Create the journals' platform-wide accounts split, once each (a refusal is raised)."""
        known = self.poster.split
        wanted = {
            line.account_id
            for journal in journals
            for line in journal.lines
            if line.account_id not in known and chart.is_platform_wide(line.account_id)
        }
        for account in sorted(wanted - self.ordinary):
            try:
                await ensure_split_account(self.svc, account)
            except LedgerError as exc:
                if exc.code != ErrorCode.IDEMPOTENCY_CONFLICT:
                    raise
                self.ordinary.add(account)
                log.info("platform account %s exists unsplit (an older node made it); kept", account)


def install(app: web.Application) -> None:
    """Attach the finance service to the application (before it starts)."""
    svc = app[SERVICES]
    app[FINANCE] = FinanceService(svc.pool, LedgerJournals(svc), base_currency=svc.base_currency)
    app.cleanup_ctx.append(recognition_task)


class SettlementPayment(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The `payment` object of `POST /settlement`."""

    provider: str
    reference: str
    amount_cents: int
    currency: str


class SettlementRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """`POST /settlement` (the seed's shape)."""

    settlement_id: str
    invoice_id: str
    payment: SettlementPayment
    context: dict[str, Any] = {}


class FulfilRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """`POST /finance/fulfill`; `recognition` (optional) is `{"method": "on_delivery"}` (the default)
    or `{"method": "ratable", "periods": 1..120, "interval": "day" | "week" | "month"}`."""

    invoiceId: str | None = None
    invoice_id: str | None = None
    context: dict[str, Any] = {}
    recognition: Any = None


class EmptyRequest(msgspec.Struct, forbid_unknown_fields=True):
    """A step endpoint's (optional) body."""

    reason: str | None = None


def _finance(request: web.Request) -> FinanceService:
    return request.app[FINANCE]


def _who(request: web.Request) -> str:
    return str(request[PRINCIPAL].name)


def _answer(http_status: int, answer: dict[str, Any]) -> web.Response:
    """`ok()` for answers that carry their own `status` field (the invoice status)."""
    body = msgspec.json.encode({"ok": True, **answer})
    return web.Response(body=body, status=http_status, content_type="application/json")


Work = Callable[[], Awaitable[tuple[int, dict[str, Any]]]]


async def _idempotent(request: web.Request, endpoint: str, decoded: Any, work: Work) -> web.Response:
    """Run `work` once per (principal, Idempotency-Key); a replay answers the remembered answer."""
    key = idempotency_key(request)
    if key is None:
        status, answer = await work()
        return _answer(status, answer)
    who = _who(request)
    digest = request_digest({"endpoint": endpoint, "body": msgspec.to_builtins(decoded)})
    pool = request.app[SERVICES].pool
    async with pool.acquire() as conn:
        found = await finance_repo.finance_request(conn, who, key)
    if found is not None:
        if found["endpoint"] != endpoint or found["request_hash"] != digest:
            raise Rejection(
                ErrorCode.IDEMPOTENCY_CONFLICT,
                "Idempotency-Key already used with a different payload",
                {"endpoint": found["endpoint"]},
            )
        stored = msgspec.json.decode(found["answer"])
        return _answer(stored.pop("_status", 200), stored)
    status, answer = await work()
    async with pool.acquire() as conn:
        await finance_repo.remember_request(
            conn, who, key, endpoint, digest, msgspec.json.encode({**answer, "_status": status}).decode()
        )
    return _answer(status, answer)


def _new_invoice_id(request: web.Request) -> str:
    """The id of an invoice sent without one: derived from (principal, Idempotency-Key) when a key
    is given, so concurrent retries under one key land on one invoice; random otherwise."""
    key = idempotency_key(request)
    if key is None:
        return f"inv-{uuid.uuid4().hex}"
    return "inv-" + hashlib.sha256(f"{_who(request)}\x00{key}".encode()).hexdigest()[:32]


async def create_invoice(request: web.Request) -> web.Response:
    """POST /finance/invoice: price, store and issue (unless `draft`) an invoice."""
    decoded = decode_json(await json_body(request), InvoiceRequest)

    async def work() -> tuple[int, dict[str, Any]]:
        view, created = await _finance(request).create(decoded, _new_invoice_id(request), _who(request))
        if created:
            payload = {k: view[k] for k in ("invoice_id", "status", "total", "currency", "document_hash")}
            await audit_event(request, "invoice.created", payload)
            if view["status"] == "issued":
                await audit_event(request, "invoice.issued", {**payload, "journal_ids": view["journal_ids"]})
        return (201 if created else 200), view

    return await _idempotent(request, "invoice.create", decoded, work)


def _step_handler(name: str, event: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        decoded = (
            decode_json(await json_body(request), EmptyRequest) if request.can_read_body else EmptyRequest()
        )
        invoice_id = request.match_info["invoice_id"]

        async def work() -> tuple[int, dict[str, Any]]:
            view, journal_id = await _finance(request).step(invoice_id, name, _who(request))
            payload = {"invoice_id": invoice_id, "status": view["status"], "journal_id": journal_id}
            if decoded.reason is not None:
                payload["reason"] = decoded.reason
            await audit_event(request, event, payload)
            return 200, {**view, "journal_id": journal_id}

        return await _idempotent(request, f"invoice.{name}:{invoice_id}", decoded, work)

    handler.__doc__ = f"POST /finance/invoice/{{id}}/{name}: the {name} step (D7)."
    return handler


issue_invoice = _step_handler("issue", "invoice.issued")
void_invoice = _step_handler("void", "invoice.voided")
close_invoice = _step_handler("close", "invoice.closed")


async def fulfil_invoice(request: web.Request) -> web.Response:
    """POST /finance/fulfill: recognise revenue (deferred revenue -> revenue) on delivery, or
    attach a ratable recognition schedule (`recognition`, finance/recognition.py)."""
    decoded = decode_json(await json_body(request), FulfilRequest)
    invoice_id = one_id(decoded.invoiceId, decoded.invoice_id, "$.invoiceId")
    if invoice_id is None:
        raise validation_error("invoiceId is required", "$.invoiceId")
    policy = recognition.parse_policy(decoded.recognition)

    async def work() -> tuple[int, dict[str, Any]]:
        view, journal_id = await _finance(request).fulfil(invoice_id, policy, _who(request))
        payload = {"invoice_id": invoice_id, "status": view["status"], "journal_id": journal_id}
        if policy is not None:
            payload["recognition"] = msgspec.to_builtins(policy)
            payload["installments"] = [
                {"k": i["k"], "due_at": i["due_at"], "amount": i["amount"]}
                for i in view["recognition"]["installments"]
            ]
        await audit_event(request, "invoice.fulfilled", payload)
        return 200, {**view, "journal_id": journal_id}

    return await _idempotent(request, "invoice.fulfil", decoded, work)


async def get_invoice(request: web.Request) -> web.Response:
    """GET /finance/invoice/{id}: the invoice, its amounts, tax evidence and journal ids."""
    return _answer(200, await _finance(request).view(request.match_info["invoice_id"]))


async def _payment(
    request: web.Request, decoded: PaymentRequest, settlement_id: str | None
) -> dict[str, Any]:
    answer, posted = await _finance(request).pay(decoded, _who(request), settlement_id)
    if posted:
        payload = {
            k: answer[k] for k in ("payment_id", "invoice_id", "journal_id", "amount", "currency", "status")
        }
        await audit_event(request, "payment.received", {**payload, "settlement_id": settlement_id})
    return answer


async def create_payment(request: web.Request) -> web.Response:
    """POST /finance/payment: debit cash, credit AR (overpayment -> customer credit)."""
    decoded = decode_json(await json_body(request), PaymentRequest)

    async def work() -> tuple[int, dict[str, Any]]:
        return 200, await _payment(request, decoded, None)

    return await _idempotent(request, "payment", decoded, work)


async def create_refund(request: web.Request) -> web.Response:
    """POST /finance/refund: return money (customer credit first, or the given `lines`); reversing
    journal through the ledger."""
    decoded = decode_json(await json_body(request), RefundRequest)

    async def work() -> tuple[int, dict[str, Any]]:
        answer, posted = await _finance(request).refund(decoded, _who(request))
        if posted:
            payload = {
                k: answer[k]
                for k in ("refund_id", "invoice_id", "journal_id", "amount", "currency", "status")
            }
            if decoded.lines is not None:
                payload["lines"] = answer["refund_lines"]
            if "royalty_clawback" in answer:
                payload["royalty_clawback"] = answer["royalty_clawback"]
            await audit_event(request, "refund.issued", payload)
        return 200, answer

    return await _idempotent(request, "refund", decoded, work)


# -- revenue recognition runs ----------------------------------------------------------------------
RECOGNITION_INTERVAL_S: Final = web.AppKey("recognition_interval_s", float)
"""Seconds between the node's recognition runs (`LEDGER_RECOGNITION_INTERVAL_S`); absent or <= 0: off."""
RECOGNITION_ACTOR: Final = "node:recognition"
"""The audit actor and posting principal of the node's periodic recognition runs."""
HOLDBACK_ACTOR: Final = "node:holdbacks"
"""The audit actor and posting principal of the node's periodic holdback releases."""


class RecognitionRunRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """`POST /finance/recognition/run`: post what is due at `as_of` (RFC 3339; default now)."""

    as_of: str | None = None


def _run_payload(result: dict[str, Any], trigger: str) -> dict[str, Any]:
    posted = [{k: p[k] for k in ("invoice_id", "k", "journal_id", "amount")} for p in result["posted"]]
    return {"as_of": result["as_of"], "trigger": trigger, "posted": posted, "failed": result["failed"]}


async def run_recognition(request: web.Request) -> web.Response:
    """POST /finance/recognition/run: post every recognition installment due at `as_of`."""
    decoded = (
        decode_json(await json_body(request), RecognitionRunRequest)
        if request.can_read_body
        else RecognitionRunRequest()
    )
    finance = _finance(request)
    as_of: datetime = finance.clock()
    if decoded.as_of is not None:
        parsed = parse_rfc3339(decoded.as_of)
        if parsed is None:
            raise validation_error("as_of must be an RFC 3339 time with an offset", "$.as_of")
        as_of = parsed
    result = await finance.run_recognition(as_of, _who(request))
    await audit_event(request, "revenue.recognition_run", _run_payload(result, "api"))
    return _answer(200, result)


async def audit_app(app: web.Application, actor_id: str, event_type: str, payload: dict[str, Any]) -> None:
    """An audit event recorded by the node itself (no request): `actor_id` acts."""
    writer = app.get(AUDIT_WRITER)
    if writer is None:
        return
    try:
        future = await writer.enqueue(actor_id, event_type, payload)
        await asyncio.wait([future])
        future.result()
    except Exception:
        log.exception("audit event %s not recorded", event_type)
        audit_failures(app[SERVICES].metrics).labels(event_type).inc()


def holdback_release_payload(result: dict[str, Any], trigger: str) -> dict[str, Any]:
    """The `royalty.holdback_release` audit payload (`trigger`: api, schedule or payout_run)."""
    return {"as_of": result["as_of"], "trigger": trigger, "released": result["released"],
            "failed": result["failed"]}  # fmt: skip


async def release_holdbacks(app: web.Application, actor: str, trigger: str) -> dict[str, Any]:
    """Release the holdbacks due now as `actor` (no request: the node's ticker, a payout run);
    one `royalty.holdback_release` audit event when the run released something."""
    finance = app[FINANCE]
    result = await finance.release_holdbacks(finance.clock(), actor)
    if result["released"]:
        await audit_app(app, actor, "royalty.holdback_release", holdback_release_payload(result, trigger))
    return result


async def _recognition_loop(app: web.Application, interval_s: float) -> None:
    """Every `interval_s`: post the installments due now, then release the holdbacks due now (so an
    accrual whose holdback is already due is released in the same tick); each run is audited when
    it changed something."""
    while True:
        await asyncio.sleep(interval_s)
        finance = app[FINANCE]
        try:
            result = await finance.run_recognition(finance.clock(), RECOGNITION_ACTOR)
        except Exception:
            log.exception("recognition run failed; retrying in %ss", interval_s)
        else:
            if result["posted"] or result["failed"]:
                await audit_app(
                    app, RECOGNITION_ACTOR, "revenue.recognition_run", _run_payload(result, "schedule")
                )
        try:
            await release_holdbacks(app, HOLDBACK_ACTOR, "schedule")
        except Exception:
            log.exception("holdback release failed; retrying in %ss", interval_s)


async def recognition_task(app: web.Application) -> AsyncIterator[None]:
    """`cleanup_ctx`: the periodic recognition run while the app serves; cancelled at shutdown."""
    interval_s = app.get(RECOGNITION_INTERVAL_S, 0.0)
    task = asyncio.create_task(_recognition_loop(app, interval_s)) if interval_s > 0 else None
    yield
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def settle(request: web.Request) -> web.Response:
    """POST /settlement: the seed's settlement, mapped onto the payment path."""
    decoded = decode_json(await json_body(request), SettlementRequest)
    payment = PaymentRequest(
        amount=decoded.payment.amount_cents,
        currency=decoded.payment.currency,
        payment_provider=decoded.payment.provider,
        provider_reference=decoded.payment.reference,
        invoice_id=decoded.invoice_id,
    )

    async def work() -> tuple[int, dict[str, Any]]:
        answer = await _payment(request, payment, decoded.settlement_id)
        return 200, {
            "settlement_id": decoded.settlement_id,
            "status": "posted",
            "journal_id": answer["journal_id"],
            "paymentId": answer["payment_id"],
            "payment_id": answer["payment_id"],
            "invoice_status": answer["status"],
            "amount_due": answer["amount_due"],
        }

    return await _idempotent(request, "settlement", decoded, work)


async def record_invoice(request: web.Request) -> web.Response:
    """POST /invoices: record an issued invoice referring to an existing journal; posts nothing."""
    decoded = decode_json(await json_body(request), ExternalInvoiceRequest)

    async def work() -> tuple[int, dict[str, Any]]:
        created = await _finance(request).record_external(decoded, _who(request))
        if created:
            payload = {
                "invoice_id": decoded.invoice_id,
                "journal_ref": decoded.journal_ref,
                "amount_cents": decoded.amount_cents,
                "currency": decoded.currency,
            }
            await audit_event(request, "invoice.recorded", payload)
        return (201 if created else 200), {"invoice_id": decoded.invoice_id, "invoiceId": decoded.invoice_id}

    return await _idempotent(request, "invoices.record", decoded, work)


async def audit_as(request: web.Request, actor_id: str, event_type: str, payload: dict[str, Any]) -> None:
    """`audit_event` for a request without a bearer principal (the Stripe webhook): `actor_id` acts."""
    writer = request.app.get(AUDIT_WRITER)
    if writer is None:
        return
    metrics = request.app[SERVICES].metrics
    try:
        future = await writer.enqueue(actor_id, event_type, payload)
    except Exception:
        log.exception("audit event %s not recorded", event_type)
        audit_failures(metrics).labels(event_type).inc()
        return

    def settled(done: asyncio.Future[Any]) -> None:
        if not done.cancelled() and done.exception() is not None:
            log.error("audit event %s not recorded: %s", event_type, done.exception())
            audit_failures(metrics).labels(event_type).inc()

    future.add_done_callback(settled)
    if writer.answer_after_commit:
        await asyncio.wait([future])


async def _audit_stripe(request: web.Request, done: StripeApplied) -> None:
    """The audit event of one applied webhook action (a replayed payment or refund records none)."""
    action, answer = done.action, done.answer
    if isinstance(action, DisputeOpened | DisputeClosed):
        if done.posted:
            kind = "payment.disputed" if isinstance(action, DisputeOpened) else "payment.dispute_closed"
            await audit_as(request, STRIPE_ACTOR, kind, {**answer, "event_id": action.event_id})
        return
    if not done.posted:
        return
    kind = "payment" if isinstance(action, PaymentSucceeded) else "refund"
    payload = {
        k: answer[k] for k in (f"{kind}_id", "invoice_id", "journal_id", "amount", "currency", "status")
    }
    payload["event_id"] = action.event_id
    if "royalty_clawback" in answer:
        payload["royalty_clawback"] = answer["royalty_clawback"]
    await audit_as(
        request, STRIPE_ACTOR, "payment.received" if kind == "payment" else "refund.issued", payload
    )


async def stripe_webhook(request: web.Request) -> web.Response:
    """POST /webhooks/stripe: a signed Stripe event applied to the ledger exactly once (D5, D6)."""
    secret = os.environ.get(STRIPE_SECRET_ENV)
    if not secret:
        raise LedgerError(
            ErrorCode.SERVICE_UNAVAILABLE, "webhooks not configured", {"env": STRIPE_SECRET_ENV}
        )
    body = await json_body(request)
    try:
        events = verify_event(body, request.headers.get("Stripe-Signature"), secret)
    except LedgerError as exc:
        if exc.code == ErrorCode.WEBHOOK_SIGNATURE_INVALID:
            reason = {"reason": exc.details.get("reason"), "message": exc.message}
            await audit_as(request, STRIPE_ACTOR, "webhook.rejected", reason)
        raise
    outcome, applied = await _finance(request).apply_stripe(events, STRIPE_ACTOR)
    for done in applied:
        await _audit_stripe(request, done)
    event_id = events[0].event_id if events else None
    return _answer(200, {"event_id": event_id, "outcome": outcome})


ROUTES: Final[
    list[tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]], frozenset[Role]]]
] = [
    ("POST", "/finance/invoice", create_invoice, WRITERS),
    ("GET", "/finance/invoice/{invoice_id}", get_invoice, READERS),
    ("POST", "/finance/invoice/{invoice_id}/issue", issue_invoice, WRITERS),
    ("POST", "/finance/invoice/{invoice_id}/void", void_invoice, WRITERS),
    ("POST", "/finance/invoice/{invoice_id}/close", close_invoice, WRITERS),
    ("POST", "/finance/payment", create_payment, WRITERS),
    ("POST", "/finance/fulfill", fulfil_invoice, WRITERS),
    ("POST", "/finance/refund", create_refund, WRITERS),
    ("POST", "/finance/recognition/run", run_recognition, WRITERS),
    ("POST", "/settlement", settle, WRITERS),
    ("POST", "/invoices", record_invoice, WRITERS),
    ("POST", "/webhooks/stripe", stripe_webhook, PUBLIC),
]
