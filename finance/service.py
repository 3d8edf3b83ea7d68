"""Finance service: invoices and payments persisted (store.finance_repo), journals posted through the ledger.

Each lifecycle step reads the invoice, applies the pure step of `finance.invoices` (which raises
INVALID_STATE for an illegal transition), posts the step's journal through a `JournalPoster`
(the ledger; balances are never written here) and then stores the new state with an optimistic
`version` check. Journal ids are deterministic (`{invoice_id}.issue`, `{invoice_id}.void`,
`{invoice_id}.fulfil`, `{invoice_id}.pay.{payment_id}`, `{invoice_id}.refund.{refund_id}`), so a
retry after a crash between the posting and the row update replays the stored journal instead of
posting a second one.

Changes to one invoice are serialised by an `asyncio.Lock` per invoice id in this process; a change
from elsewhere (another node) is caught by the `version` check and answered 409 INVALID_STATE with
`details.reason = "concurrent change"`. A payment also holds a lock per (provider, reference),
taken before the invoice's, so one reference never posts twice.

The issue journal's `context.invoice_hash` is the hex SHA-256 of the canonical encoding
(`signer.canonical.canonical`: sorted keys, compact JSON) of the invoice document
(`invoice_document`), so the priced invoice is covered by the signature of the journal's batch.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import os
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any, Final, Protocol

import asyncpg
import msgspec

from finance import chart, fx, holdbacks, invoices, payouts, recognition, royalties
from finance.invoices import Buyer, Invoice, InvoiceStatus, LineItem, LineRefund, Step
from finance.recognition import Policy
from finance.stripe_events import (
    Action,
    DisputeClosed,
    DisputeOpened,
    Event,
    Ignored,
    InboxState,
    Outcome,
    PaymentSucceeded,
    Pending,
    Refunded,
    WebhookInbox,
    action_key,
)
from finance.stripe_gateway import PermanentProviderError, StripeGateway, TransientProviderError
from finance.tax import Seller, TaxRules, load_rules
from ledger.errors import ErrorCode, LedgerError, Rejection, validation_error
from ledger.invariants import check
from ledger.journal import (
    JOURNAL_ID_PATTERN,
    LINES_MAX,
    Journal,
    JournalIn,
    JournalWire,
    journal_from_wire,
    validate_journal,
)
from ledger.money import fits_int64, is_currency
from ledger.timestamps import rfc3339
from signer.canonical import canonical, request_hash
from store import finance_repo, fx_repo, payout_repo, recognition_repo, repository, royalty_repo
from store.finance_repo import InvoiceRow

REFERENCE_MAX: Final = 200
log = logging.getLogger(__name__)

INVOICE_ID_MAX: Final = 150
"""Invoice ids stay short enough that every journal id derived from them fits the ledger's 200."""


class Posted(msgspec.Struct, frozen=True):
    """The ledger's answer for one journal."""

    journal_id: str
    ok: bool
    posted_at: str | None = None
    code: str | None = None
    message: str | None = None
    details: dict[str, Any] | None = None


class JournalPoster(Protocol):
    """Posts validated journals through the ledger (implemented by the API with its poster)."""

    async def post_journals(self, journals: list[Journal], principal: str) -> list[Posted]:
        """One answer per journal, in order."""
        ...


# -- requests ---------------------------------------------------------------------------------------
class InvoiceRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """`POST /finance/invoice` (the seed's names; `tax`, when sent, must equal the computed tax)."""

    buyer: Buyer
    line_items: list[LineItem]
    currency: str
    due_date: str | None = None
    terms: str | None = None
    invoice_id: str | None = None
    invoiceId: str | None = None
    tax: int | None = None
    draft: bool = False
    related_manifest: Any = None


class PaymentRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """`POST /finance/payment` (the seed's names)."""

    amount: int
    currency: str
    payment_provider: str
    provider_reference: str
    invoiceId: str | None = None
    invoice_id: str | None = None


class RefundRequest(PaymentRequest, kw_only=True, forbid_unknown_fields=True):
    """`POST /finance/refund`: a payment-shaped request, plus `lines` to refund specific invoice
    lines (their own net and tax; `amount` must equal their sum)."""

    lines: list[LineRefund] | None = None


class ExternalInvoiceRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """`POST /invoices`: an issued invoice recorded against an existing journal (posts nothing)."""

    invoice_id: str
    journal_ref: str
    amount_cents: int
    currency: str
    payer: dict[str, Any] | None = None
    due_date: str | None = None


def request_digest(value: Any) -> str:
    """Hex SHA-256 of the canonical encoding of a decoded request (idempotency comparisons)."""
    return hashlib.sha256(canonical(msgspec.to_builtins(value))).hexdigest()


def one_id(first: str | None, second: str | None, field: str) -> str | None:
    """The id given under either of the seed's two names (they must agree)."""
    if first is not None and second is not None and first != second:
        raise validation_error("invoiceId and invoice_id differ", field)
    return first if first is not None else second


MONEY_PREFIX: Final = {"payment": "pay", "refund": "rfd"}

RETRYABLE_CODES: Final = frozenset(
    {
        ErrorCode.SERVICE_UNAVAILABLE,
        ErrorCode.SHARD_MOVING,
        ErrorCode.RATE_LIMITED,
        ErrorCode.SIGNING_FAILURE,
        ErrorCode.INTERNAL_ERROR,
    }
)
PayOutcome = tuple[dict[str, Any], bool] | BaseException | None
"""One item of `FinanceService.pay_many`: (answer, posted), the error, or None (not tried)."""


def retryable(exc: BaseException) -> bool:
    """A temporary failure (nothing final decided): not a ledger answer, or a retryable code."""
    return not isinstance(exc, LedgerError) or exc.code in RETRYABLE_CODES


def money_target(request: PaymentRequest) -> tuple[str, str]:
    """The invoice id and provider reference of a payment or refund request; 400 when malformed."""
    invoice_id = one_id(request.invoiceId, request.invoice_id, "$.invoiceId")
    if invoice_id is None:
        raise validation_error("invoiceId is required", "$.invoiceId")
    reference = request.provider_reference
    if not 1 <= len(reference) <= REFERENCE_MAX or not reference.isprintable():
        raise validation_error(
            "provider_reference must be 1-200 printable characters", "$.provider_reference"
        )
    return invoice_id, reference


def payment_id_of(provider: str, provider_reference: str, prefix: str = "pay") -> str:
    """A payment's (or refund's) id: derived from (provider, reference), so a retry names the same one."""
    raw = f"{provider}\x00{provider_reference}".encode()
    return f"{prefix}-" + hashlib.sha256(raw).hexdigest()[:32]


def _replayed(
    kind: str, existing: Any, invoice_id: str, request: PaymentRequest, settlement_id: str | None
) -> dict[str, Any]:
    """The original answer of a duplicate reference; IDEMPOTENCY_CONFLICT when it differs."""
    same = (existing["invoice_id"], existing["amount"], existing["currency"]) == (
        invoice_id,
        request.amount,
        request.currency,
    )
    if settlement_id is not None and existing.get("settlement_id") not in (None, settlement_id):
        same = False
    if not same:
        raise Rejection(
            ErrorCode.IDEMPOTENCY_CONFLICT,
            "provider_reference already recorded with a different invoice, amount or currency",
            {f"{kind}_id": existing["id"], "invoice_id": existing["invoice_id"]},
        )
    answer: dict[str, Any] = msgspec.json.decode(existing["answer"])
    return answer


def money_answer(
    kind: str,
    money_id: str,
    invoice_id: str,
    journal_id: str | None,
    step: Step,
    request: PaymentRequest,
    settled: dict[str, Any],
) -> dict[str, Any]:
    """A payment's (or refund's) answer: the common keys (refunds add their details after)."""
    return {
        f"{kind}Id": money_id,
        f"{kind}_id": money_id,
        "invoiceId": invoice_id,
        "invoice_id": invoice_id,
        "journal_id": journal_id,
        "status": str(step.invoice.status),
        "amount": request.amount,
        "currency": request.currency,
        **step.amounts,
        "amount_due": step.invoice.amount_due,
        "amount_refunded": step.invoice.refunded,
        "customer_credit": step.invoice.customer_credit,
        **settled,
    }


def money_values(
    money_id: str,
    invoice_id: str,
    request: PaymentRequest,
    journal_id: str | None,
    settlement_id: str | None,
    principal: str,
    answer: dict[str, Any],
) -> dict[str, Any]:
    """The payment's (or refund's) row (`finance_repo.insert_money`)."""
    return {
        "id": money_id,
        "invoice_id": invoice_id,
        "provider": request.payment_provider,
        "provider_reference": request.provider_reference,
        "amount": request.amount,
        "currency": request.currency,
        "journal_id": journal_id or "",
        "settlement_id": settlement_id,
        "principal": principal,
        "answer": msgspec.json.encode(answer).decode(),
    }


def concurrent_change(row: asyncpg.Record, after: Invoice) -> Rejection:
    """409 INVALID_STATE: the invoice row moved past the version the step was computed from."""
    return Rejection(
        ErrorCode.INVALID_STATE,
        "the invoice changed concurrently; read it and retry",
        {
            "current": row["status"],
            "requested": str(after.status),
            "reason": "concurrent change",
            "version": row["version"],
        },
    )


def journal_of(body: dict[str, Any], journal_id: str) -> Journal:
    """A step's journal body validated under its deterministic id.

    The ledger's wire fast path (`journal_from_wire`, a few times cheaper per journal) answers the
    journal `validate_journal` would; anything it does not vouch for takes `validate_journal`,
    which raises the exact error.
    """
    raw = {**body, "journal_id": journal_id}
    try:
        journal = journal_from_wire(msgspec.convert(raw, JournalWire))
    except msgspec.ValidationError:
        journal = None
    return journal if journal is not None else validate_journal(msgspec.convert(raw, JournalIn))


def invoice_document(invoice: Invoice, due_date: str | None, terms: str | None) -> dict[str, Any]:
    """What the buyer is shown: the priced invoice without its money state."""
    return {
        "invoice_id": invoice.invoice_id,
        "buyer": msgspec.to_builtins(invoice.buyer),
        "currency": invoice.currency,
        "lines": msgspec.to_builtins(invoice.lines),
        "subtotal": invoice.subtotal,
        "tax": invoice.tax,
        "total": invoice.total,
        "tax_breakdown": msgspec.to_builtins(invoice.tax_breakdown),
        "notes": list(invoice.notes),
        "due_date": due_date,
        "terms": terms,
    }


def document_hash(document: dict[str, Any]) -> str:
    """Hex SHA-256 of the canonical encoding of the invoice document."""
    return hashlib.sha256(canonical(document)).hexdigest()


def not_found(invoice_id: str) -> LedgerError:
    """404 NOT_FOUND for an unknown invoice."""
    return LedgerError(
        ErrorCode.NOT_FOUND, f"no invoice {invoice_id}", {"resource": "invoice", "id": invoice_id}
    )


class StripeApplied(msgspec.Struct, frozen=True):
    """One inbox action applied by `FinanceService.apply_stripe`: its answer, and whether it posted
    (False when the payment or refund was already recorded: a replay)."""

    action: Action
    answer: dict[str, Any]
    posted: bool


STRIPE_EVENT_TYPES: Final = {
    PaymentSucceeded: "payment_intent.succeeded",
    Refunded: "charge.refunded",
    DisputeOpened: "charge.dispute.created",
    DisputeClosed: "charge.dispute.closed",
}


def _stripe_key(action: Pending) -> str:
    return action_key(action)


def _row_of(invoice: Invoice) -> InvoiceRow:
    return InvoiceRow(
        buyer=msgspec.json.encode(invoice.buyer).decode(),
        currency=invoice.currency,
        status=str(invoice.status),
        subtotal=invoice.subtotal,
        tax=invoice.tax,
        total=invoice.total,
        body=msgspec.json.encode(invoice).decode(),
        amount_paid=invoice.paid,
        amount_refunded=invoice.refunded,
        customer_credit=invoice.customer_credit,
    )


def _time(value: Any) -> str | None:
    return rfc3339(value) if value is not None else None


def invoice_view(row: asyncpg.Record, payment_ids: list[str]) -> dict[str, Any]:
    """The invoice as `GET /finance/invoice/{id}` answers it."""
    body = msgspec.json.decode(row["body"])
    view: dict[str, Any] = {
        "invoiceId": row["invoice_id"],
        "invoice_id": row["invoice_id"],
        "kind": row["kind"],
        "status": row["status"],
        "currency": row["currency"],
        "buyer": msgspec.json.decode(row["buyer"]),
        "subtotal": row["subtotal"],
        "tax": row["tax"],
        "total": row["total"],
        "amount_paid": row["amount_paid"],
        "amount_due": max(0, row["total"] - row["amount_paid"]) if row["kind"] == "priced" else None,
        "amount_refunded": row["amount_refunded"],
        "customer_credit": row["customer_credit"],
        "document_hash": row["document_hash"],
        "journal_ids": list(row["journal_ids"]),
        "ledger_entries": list(row["journal_ids"]) or ([row["journal_ref"]] if row["journal_ref"] else []),
        "journal_ref": row["journal_ref"],
        "payments": payment_ids,
        "due_date": row["due_date"],
        "terms": row["terms"],
        "version": row["version"],
    }
    if row["kind"] == "priced":
        view["line_items"] = body["lines"]
        view["tax_breakdown"] = body["tax_breakdown"]
        view["reverse_charge"] = body["reverse_charge"]
        view["notes"] = body["notes"]
    for name in ("created_at", "issued_at", "paid_at", "fulfilled_at", "closed_at", "voided_at"):
        view[name] = _time(row[name])
    view["createdAt"], view["issuedAt"], view["paidAt"] = (
        view["created_at"],
        view["issued_at"],
        view["paid_at"],
    )
    return view


def dispute_view(row: asyncpg.Record) -> dict[str, Any]:
    """One dispute as the invoice view lists it (`status`: open | won | lost)."""
    return {
        "dispute_id": row["dispute_id"],
        "payment_intent": row["payment_intent"],
        "amount": row["amount"],
        "currency": row["currency"],
        "reason": row["reason"],
        "status": row["status"],
        "journal_id": row["journal_id"],
        "closed_journal_id": row["closed_journal_id"],
        "created_at": _time(row["created_at"]),
        "closed_at": _time(row["closed_at"]),
    }


def dispute_journal_id(invoice_id: str, dispute_id: str) -> str:
    """The hold journal of a dispute (`.won` / `.lost` appended for its close): at most 200 characters."""
    return f"{invoice_id}.dispute.{payment_id_of(finance_repo.STRIPE, dispute_id, 'dsp')}"


def _refund_source(payments: list[asyncpg.Record], request: PaymentRequest) -> asyncpg.Record:
    """The oldest Stripe payment that can take the whole refund; 409 REFUND_EXCEEDS_PAID naming
    what is refundable on each payment in the refund's currency otherwise."""
    for payment in payments:
        if payment["refundable"] >= request.amount:
            return payment
    raise Rejection(
        ErrorCode.REFUND_EXCEEDS_PAID,
        f"no single Stripe payment in {request.currency} has {request.amount} left to refund;"
        " split the refund across payments",
        {
            "requested": request.amount,
            "currency": request.currency,
            "refundable": [
                {
                    "payment_id": p["payment_id"],
                    "payment_intent": p["payment_intent"],
                    "currency": p["currency"],
                    "amount": p["amount"],
                    "refundable": max(0, p["refundable"]),
                }
                for p in payments
            ],
        },
    )


class RefundRates(msgspec.Struct, frozen=True):
    """The base/CCY rates a cross-currency refund uses (None for the base currency): `refund` and
    `invoice` in force now, `issue` at the invoice's issue (tax and net were booked at it) and
    `credit` at its latest payment (customer credit was booked then)."""

    refund: fx.Rate | None
    invoice: fx.Rate | None
    issue: fx.Rate | None
    credit: fx.Rate | None


def _in_base(amount: int, currency: str, rate: fx.Rate | None) -> int:
    return amount if rate is None else fx.to_base(amount, currency, rate)


def _rate_json(rate: fx.Rate | None) -> dict[str, Any] | None:
    return None if rate is None else msgspec.to_builtins(rate)


def _refund_details(kind: str, step: Step, lines: list[LineRefund] | None) -> dict[str, Any]:
    """A refund answer's extra keys: where its net came from and what it reversed per line
    (`refund_lines`); `requested_lines` echoes a refund by lines (compared on replay)."""
    if kind != "refund":
        return {}
    details: dict[str, Any] = {**step.split, "refund_lines": msgspec.to_builtins(step.lines)}
    if lines is not None:
        details["requested_lines"] = msgspec.to_builtins(lines)
    return details


def _check_same_lines(replay: dict[str, Any], lines: list[LineRefund] | None) -> None:
    """A duplicate refund reference must ask for the same lines (else IDEMPOTENCY_CONFLICT)."""
    requested = None if lines is None else msgspec.to_builtins(lines)
    if "refund_id" in replay and replay.get("requested_lines") != requested:
        raise Rejection(
            ErrorCode.IDEMPOTENCY_CONFLICT,
            "provider_reference already recorded with different lines",
            {"refund_id": replay["refund_id"], "invoice_id": replay["invoice_id"]},
        )


def _installment_rows(schedule: recognition.Schedule) -> list[tuple[int, int, str | None, datetime | None]]:
    """A schedule's installments as `recognition_repo.sync_installments` rows."""
    return [(i.k, i.amount, i.journal_id, i.posted_at) for i in schedule.installments]


def _iso(value: datetime | None) -> str | None:
    return rfc3339(value) if value is not None else None


def _schedule_view(invoice: Invoice) -> dict[str, Any]:
    deferred = sum(invoices.deferred_of(invoice))
    schedule = invoice.schedule
    if schedule is None:
        return {"method": "on_delivery", "deferred": deferred}
    installments = [
        {
            "k": i.k,
            "due_at": rfc3339(i.due_at),
            "amount": i.amount,
            "amounts": dict(zip(schedule.skus, i.amounts, strict=True)),
            "posted": i.posted,
            "journal_id": i.journal_id,
            "posted_at": _iso(i.posted_at),
        }
        for i in schedule.installments
    ]
    return {
        "method": schedule.method,
        "periods": schedule.periods,
        "interval": schedule.interval,
        "start_at": rfc3339(schedule.start_at),
        "recognised": schedule.recognised(),
        "deferred": deferred,
        "installments": installments,
    }


def money_view(invoice: Invoice) -> dict[str, Any]:
    """The invoice's `recognition` (`on_delivery`, or the schedule with its installments) and
    `line_refunds` (what refunds reversed per line), for `GET /finance/invoice/{id}`."""
    line_net, line_tax = invoices.line_refunds_of(invoice)
    line_refunds = [
        {
            "line": i,
            "sku": li.sku,
            "refunded_net": net,
            "refunded_tax": tax,
            "remaining_net": li.net - net,
            "remaining_tax": li.tax - tax,
        }
        for i, (li, net, tax) in enumerate(zip(invoice.lines, line_net, line_tax, strict=True))
    ]
    return {"recognition": _schedule_view(invoice), "line_refunds": line_refunds}


STEP_JOURNALS: Final[dict[str, tuple[Callable[[Invoice], Step], str]]] = {
    "issue": (invoices.issue, "issue"),
    "void": (invoices.void, "void"),
    "fulfil": (invoices.fulfil, "fulfil"),
    "close": (invoices.close, "close"),
}
"""Step name -> (pure step, journal id suffix)."""


def issue_journal_id(invoice_id: str) -> str:
    """The journal that issued (accrued) an invoice."""
    return f"{invoice_id}.{STEP_JOURNALS['issue'][1]}"


def _reversing(body: dict[str, Any], invoice_id: str) -> dict[str, Any]:
    """A refund's journal body naming the sale it (partly) reverses: `reverses` = the issue
    journal (REQUIREMENTS L2; the ledger stores the reference with the journal)."""
    return {**body, "reverses": issue_journal_id(invoice_id)}


class AccrualPlan(msgspec.Struct, frozen=True):
    """What a recognition journal accrues for one SKU under one rule version."""

    sku: str
    rule: royalties.Rule
    revenue: int
    platform_fee: int
    accruals: tuple[royalties.Accrual, ...]


def _missing(resource: str, resource_id: str) -> LedgerError:
    return LedgerError(
        ErrorCode.NOT_FOUND, f"no {resource} {resource_id}", {"resource": resource, "id": resource_id}
    )


class ClawbackPlan(msgspec.Struct, frozen=True):
    """A posted clawback journal (None: every amount was zero) and its rows (source_journal,
    invoice_id, sku, participant_id, rule_id, rule_version, currency, revenue, amount)."""

    journal_id: str | None
    rows: tuple[tuple[Any, ...], ...]


def _int_map(value: Any) -> dict[str, int]:
    """A jsonb object of integers (text on pools without a json codec) as a dict."""
    decoded = msgspec.json.decode(value) if isinstance(value, str | bytes) else value
    return {str(k): int(v) for k, v in dict(decoded or {}).items()}


def _rule_of(record: asyncpg.Record) -> royalties.Rule:
    terms = msgspec.json.decode(record["body"], type=royalties.Terms)
    return royalties.Rule(record["rule_id"], record["version"], terms)


def rule_view(rule: royalties.Rule) -> dict[str, Any]:
    """A rule version as the API shows it."""
    terms = rule.terms
    return {
        "rule_id": rule.rule_id,
        "version": rule.version,
        terms.subject: terms.key,
        "effective_from": rfc3339(terms.effective_from),
        "splits": [{"participant_id": s.participant_id, "share_bp": s.share_bp} for s in terms.splits],
        "platform_fee_bp": terms.platform_fee_bp,
        "holdback_bp": terms.holdback_bp,
        "holdback_days": terms.holdback_days,
        "holdback_release_at": _iso(terms.holdback_release_at),
    }


def participant_view(row: asyncpg.Record) -> dict[str, Any]:
    """A participant as the API shows it."""
    minimum = None
    if row["minimum_currency"] is not None:
        minimum = {"currency": row["minimum_currency"], "amount": row["minimum_amount"]}
    return {
        "participant_id": row["participant_id"],
        "name": row["name"],
        "stripe_account": row["stripe_account"],
        "minimum_payout": minimum,
        "created_at": rfc3339(row["created_at"]),
    }


def accrual_view(row: asyncpg.Record) -> dict[str, Any]:
    """One accrual row of a participant statement."""
    return {
        "invoice_id": row["invoice_id"],
        "sku": row["sku"],
        "rule_id": row["rule_id"],
        "rule_version": row["rule_version"],
        "installment": row["installment"],
        "currency": row["currency"],
        "revenue": row["revenue"],
        "amount": row["amount"],
        "holdback": row["holdback"],
        "payable": row["amount"] - row["holdback"],
        "holdback_release_at": _iso(row["holdback_release_at"]),
        "posted_at": rfc3339(row["posted_at"]),
        "journal_id": row["journal_id"],
        "holdback_released_at": _iso(row["holdback_released_at"]),
        "holdback_release_journal_id": row["holdback_release_journal"],
    }


def _held(row: asyncpg.Record) -> holdbacks.HeldAccrual:
    return holdbacks.HeldAccrual(
        row["journal_id"], row["sku"], row["participant_id"], row["currency"], row["holdback"],
        row["holdback_release_at"], row["released"],
    )  # fmt: skip


def release_view(release: holdbacks.Release, released_at: datetime | None) -> dict[str, Any]:
    """One holdback release as `POST /finance/holdbacks/release` and its audit event show it."""
    return {
        "journal_id": release.journal_id,
        "accrual_journal_id": release.accrual_journal_id,
        "holdback_release_at": rfc3339(release.release_at),
        "released_at": _iso(released_at),
        "amounts": [
            {"participant_id": a.participant_id, "currency": a.currency, "amount": a.amount}
            for a in release.amounts
        ],
    }


def clawback_view(row: asyncpg.Record) -> dict[str, Any]:
    """One clawback row of a participant statement (`amount` is taken from the payable)."""
    return {
        "invoice_id": row["invoice_id"],
        "sku": row["sku"],
        "rule_id": row["rule_id"],
        "rule_version": row["rule_version"],
        "currency": row["currency"],
        "revenue_reversed": row["revenue"],
        "amount": row["amount"],
        "source_journal_id": row["source_journal"],
        "journal_id": row["journal_id"],
        "posted_at": rfc3339(row["posted_at"]),
    }


def reversal_view(row: asyncpg.Record) -> dict[str, Any]:
    """One clawback transfer reversal of a participant statement (LEDGER_CLAWBACK_REVERSALS)."""
    return {
        "reversal_id": row["reversal_id"],
        "clawback_journal_id": row["clawback_journal"],
        "payout_id": row["payout_id"],
        "transfer_id": row["transfer_id"],
        "currency": row["currency"],
        "amount": row["amount"],
        "state": row["state"],
        "provider_reversal_id": row["provider_reversal_id"],
        "journal_id": row["journal_id"],
        "reason": row["reason"],
        "created_at": rfc3339(row["created_at"]),
    }


class FinanceService:
    """Invoices and payments: persisted rows plus journals posted through the ledger."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        poster: JournalPoster,
        rules: TaxRules | None = None,
        seller: Seller | None = None,
        base_currency: str = "USD",
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        gateway_factory: Callable[[], StripeGateway | None] = StripeGateway.from_env,
    ) -> None:
        check(is_currency(base_currency), f"base currency {base_currency!r} is not ISO 4217")
        self.pool = pool
        self.poster = poster
        self.base_currency = base_currency
        self.clock = clock
        self.rules = rules or load_rules()
        self.seller = seller or Seller()
        self.gateway_factory = gateway_factory
        """Read per refund (so `STRIPE_API_KEY` / `STRIPE_API_BASE` set after start apply)."""
        self._locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}

    @contextlib.asynccontextmanager
    async def _locked(self, name: str) -> AsyncIterator[None]:
        """Hold the in-process lock of `name` (dropped once nobody waits for it)."""
        entry = self._locks.get(name)
        if entry is None:
            entry = self._locks[name] = (asyncio.Lock(), [0])
        entry[1][0] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1][0] -= 1
            if entry[1][0] == 0:
                del self._locks[name]

    @contextlib.asynccontextmanager
    async def _locked_all(self, names: list[str]) -> AsyncIterator[None]:
        """`_locked` for many names, taken in the given order (one context for a whole batch)."""
        entries: list[tuple[str, tuple[asyncio.Lock, list[int]]]] = []
        acquired = 0
        try:
            for name in names:
                entry = self._locks.get(name)
                if entry is None:
                    entry = self._locks[name] = (asyncio.Lock(), [0])
                entry[1][0] += 1
                entries.append((name, entry))
                await entry[0].acquire()
                acquired += 1
            yield
        finally:
            for position in range(len(entries) - 1, -1, -1):
                name, entry = entries[position]
                if position < acquired:
                    entry[0].release()
                entry[1][0] -= 1
                if entry[1][0] == 0:
                    del self._locks[name]

    # -- reading ---------------------------------------------------------------------------------
    async def view(self, invoice_id: str) -> dict[str, Any]:
        """The invoice's view; 404 NOT_FOUND."""
        async with self.pool.acquire() as conn:
            row = await finance_repo.invoice_row(conn, invoice_id)
            if row is None:
                raise not_found(invoice_id)
            payments = await finance_repo.money_ids(conn, "payment", invoice_id)
            refunds = await finance_repo.money_ids(conn, "refund", invoice_id)
            disputes = await finance_repo.invoice_disputes(conn, invoice_id)
        return {
            **invoice_view(row, payments),
            "refunds": refunds,
            "disputes": [dispute_view(d) for d in disputes],
            **(money_view(msgspec.json.decode(row["body"], type=Invoice)) if row["kind"] == "priced" else {}),
        }

    async def _load(self, invoice_id: str, requested: InvoiceStatus) -> tuple[Invoice, asyncpg.Record]:
        async with self.pool.acquire() as conn:
            row = await finance_repo.invoice_row(conn, invoice_id)
        if row is None:
            raise not_found(invoice_id)
        if row["kind"] != "priced":
            raise invoices.InvalidState(
                InvoiceStatus(row["status"]), requested, "recorded external invoice (POST /invoices)"
            )
        return msgspec.json.decode(row["body"], type=Invoice), row

    # -- posting ---------------------------------------------------------------------------------
    async def _post(self, body: dict[str, Any], journal_id: str, principal: str) -> str:
        """Validate and post one journal body under a deterministic id; its id, or the ledger's error."""
        (posted,) = await self._post_many([journal_of(body, journal_id)], principal)
        if isinstance(posted, LedgerError):
            raise posted
        return posted

    async def _post_many(self, journals: list[Journal], principal: str) -> list[str | LedgerError]:
        """Post validated journals in one ledger call; per journal its id, or the ledger's error."""
        answers = await self.poster.post_journals(journals, principal)
        conflicts = [
            posted.journal_id
            for j, posted in zip(journals, answers, strict=True)
            if not posted.ok and posted.code == ErrorCode.IDEMPOTENCY_CONFLICT
        ]
        stored: dict[str, bytes] = {}
        if conflicts:
            # The ledger replays a journal id only for its first principal. This id is derived from
            # the finance request (invoice, step, provider reference), so the same journal stored
            # by another principal (a crash between posting and storing the row, then a retry by
            # someone else) is this request's replay; a different payload still conflicts.
            async with self.pool.acquire() as conn:
                rows = await conn.fetch(
                    "SELECT journal_id, request_hash FROM journals WHERE journal_id = ANY($1::text[])",
                    conflicts,
                )
            stored = {r["journal_id"]: bytes(r["request_hash"]) for r in rows}
        out: list[str | LedgerError] = []
        for journal, posted in zip(journals, answers, strict=True):
            if posted.ok or stored.get(posted.journal_id, b"") == request_hash(journal):
                out.append(posted.journal_id)
            else:
                code = ErrorCode(posted.code or ErrorCode.INTERNAL_ERROR)
                out.append(LedgerError(code, posted.message or str(code), dict(posted.details or {})))
        return out

    async def _store(
        self, conn: asyncpg.Connection, row: asyncpg.Record, after: Invoice, journal_id: str | None
    ) -> None:
        ok = await finance_repo.update_invoice(
            conn, row["invoice_id"], row["version"], _row_of(after), journal_id
        )
        if not ok:
            raise concurrent_change(row, after)

    # -- steps -----------------------------------------------------------------------------------
    async def step(self, invoice_id: str, name: str, principal: str) -> tuple[dict[str, Any], str | None]:
        """Apply `issue`, `void`, `fulfil` or `close`; (the invoice's view, the posted journal id)."""
        function, suffix = STEP_JOURNALS[name]
        async with self._locked(f"invoice:{invoice_id}"):
            invoice, row = await self._load(invoice_id, invoices.STEP_SOURCES[name][1])
            step = function(invoice)
            journal_id = None
            plans: list[AccrualPlan] = []
            if step.journal is not None:
                body = step.journal
                if name == "issue":
                    body = {**body, "context": {**body["context"], "invoice_hash": row["document_hash"]}}
                if name == "fulfil":
                    body, plans = await self._with_royalties(invoice, row, body)
                journal_id = await self._post(body, f"{invoice_id}.{suffix}", principal)
            async with self.pool.acquire() as conn, conn.transaction():
                await self._store(conn, row, step.invoice, journal_id)
                await self._record_accruals(conn, invoice, plans, journal_id, None)
        return await self.view(invoice_id), journal_id

    # -- revenue recognition ---------------------------------------------------------------------
    async def fulfil(
        self, invoice_id: str, policy: Policy | None, principal: str
    ) -> tuple[dict[str, Any], str | None]:
        """`POST /finance/fulfill`: on delivery (no policy: the `fulfil` step), or ratable: no
        journal now, the schedule from the current time stored with the invoice (migration 0009)."""
        if policy is None:
            return await self.step(invoice_id, "fulfil", principal)
        async with self._locked(f"invoice:{invoice_id}"):
            invoice, row = await self._load(invoice_id, InvoiceStatus.FULFILLED)
            step = invoices.fulfil(invoice, policy, self.clock())
            schedule = step.invoice.schedule
            check(schedule is not None, "a ratable fulfilment made no schedule")
            assert schedule is not None  # for mypy; checked just above
            async with self.pool.acquire() as conn, conn.transaction():
                await self._store(conn, row, step.invoice, None)
                await recognition_repo.insert_schedule(
                    conn,
                    invoice_id,
                    (schedule.method, schedule.periods, schedule.interval, schedule.start_at),
                    [(i.k, i.due_at, i.amount) for i in schedule.installments],
                )
        return await self.view(invoice_id), None

    async def run_recognition(self, as_of: datetime, principal: str) -> dict[str, Any]:
        """Post every installment due at `as_of` (`{invoice_id}.recognise.{k}`, each exactly once);
        `{as_of, posted: [...], failed: [...]}`. A failing installment is reported and retried by the
        next run; the others still post."""
        async with self.pool.acquire() as conn:
            due = await recognition_repo.due_installments(conn, as_of)
        posted: list[dict[str, Any]] = []
        failed: list[dict[str, Any]] = []
        for invoice_id, k in due:
            try:
                done = await self._recognise(invoice_id, k, principal)
            except LedgerError as exc:
                failed.append(
                    {"invoice_id": invoice_id, "k": k, "code": str(exc.code), "message": exc.message}
                )
                continue
            if done is not None:
                posted.append(done)
        return {"as_of": rfc3339(as_of), "posted": posted, "failed": failed}

    async def _recognise(self, invoice_id: str, k: int, principal: str) -> dict[str, Any] | None:
        """Post installment k unless it already is (then only its row is brought up to date)."""
        async with self._locked(f"invoice:{invoice_id}"):
            return await self._recognise_locked(invoice_id, k, principal)

    async def _finish_crashed_installments(self, invoice_id: str, invoice: Invoice, principal: str) -> bool:
        """Before a refund changes a schedule: store installments whose journal a crashed run
        already posted (so the refund never shrinks what the ledger recognised); True if any."""
        if invoice.schedule is None:
            return False
        open_ks = [i.k for i in invoice.schedule.installments if not i.posted and i.amount > 0]
        async with self.pool.acquire() as conn:
            crashed = [
                k
                for k in open_ks
                if await repository.journal_exists(conn, recognition.journal_id(invoice_id, k))
            ]
        for k in crashed:
            await self._recognise_locked(invoice_id, k, principal)
        return bool(crashed)

    async def _recognise_locked(self, invoice_id: str, k: int, principal: str) -> dict[str, Any] | None:
        invoice, row = await self._load(invoice_id, InvoiceStatus.FULFILLED)
        schedule = invoice.schedule
        if schedule is None or not 1 <= k <= len(schedule.installments):
            return None
        if schedule.installments[k - 1].posted:  # a run elsewhere posted it: mirror the body
            async with self.pool.acquire() as conn:
                await recognition_repo.sync_installments(conn, invoice_id, _installment_rows(schedule))
            return None
        step = invoices.recognise(invoice, k, self.clock())
        journal_id = None
        plans: list[AccrualPlan] = []
        if step.journal is not None:
            body, plans = await self._with_royalties(invoice, row, step.journal)
            journal_id = await self._post(body, recognition.journal_id(invoice_id, k), principal)
        after = step.invoice.schedule
        assert after is not None  # for mypy; recognise keeps the schedule
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                await self._store(conn, row, step.invoice, journal_id)
                await recognition_repo.sync_installments(conn, invoice_id, _installment_rows(after))
                await self._record_accruals(conn, invoice, plans, journal_id, k)
        except Rejection as exc:
            if exc.details.get("reason") == "concurrent change":
                return None  # another node stored it (the journal id made its posting a replay)
            raise
        installment = after.installments[k - 1]
        return {
            "invoice_id": invoice_id,
            "k": k,
            "due_at": rfc3339(installment.due_at),
            "amount": installment.amount,
            "amounts": dict(zip(after.skus, installment.amounts, strict=True)),
            "journal_id": journal_id,
            "status": str(step.invoice.status),
        }

    # -- royalties (finance/royalties.py, migration 0013) ------------------------------------------
    async def _rule_for(
        self, conn: asyncpg.Connection, invoice: Invoice, issued_at: datetime | None, sku: str
    ) -> asyncpg.Record | None:
        """The rule version a SKU of the invoice accrues under: the version it already accrued
        under, else the contract's (if its lines carry one and it has a rule in force), else the
        SKU's, in force at the invoice's issue time."""
        pinned = await royalty_repo.accrued_rule(conn, invoice.invoice_id, sku)
        if pinned is not None or issued_at is None:
            return pinned
        contract = royalties.contract_of(invoice.lines, sku)
        if contract is not None:
            found = await royalty_repo.rule_in_force(conn, "contract", contract, issued_at)
            if found is not None:
                return found
        return await royalty_repo.rule_in_force(conn, "sku", sku, issued_at)

    async def _with_royalties(
        self, invoice: Invoice, row: asyncpg.Record, body: dict[str, Any]
    ) -> tuple[dict[str, Any], list[AccrualPlan]]:
        """The recognition journal `body` plus the royalty accrual lines of every SKU it recognises
        that has a rule; and what to record once it is posted."""
        plans: list[AccrualPlan] = []
        entries = list(body["entries"])
        async with self.pool.acquire() as conn:
            for sku, revenue in royalties.recognised_by_sku(body).items():
                record = await self._rule_for(conn, invoice, row["issued_at"], sku)
                if record is None:
                    continue
                rule = _rule_of(record)
                accruals, fee = royalties.accrue(revenue, rule.terms)
                entries += royalties.accrual_entries(sku, accruals, invoice.currency)
                plans.append(AccrualPlan(sku, rule, revenue, fee, tuple(accruals)))
        if len(entries) > LINES_MAX:
            raise validation_error(
                f"royalty accrual would exceed a journal's {LINES_MAX} lines",
                "$.invoiceId",
                lines=len(entries),
            )
        return {**body, "entries": entries}, plans

    async def _record_accruals(
        self,
        conn: asyncpg.Connection,
        invoice: Invoice,
        plans: list[AccrualPlan],
        journal_id: str | None,
        installment: int | None,
    ) -> None:
        """Store what a posted journal accrued (inside the caller's transaction)."""
        if not plans or journal_id is None:
            return
        posted_at = await royalty_repo.journal_posted_at(conn, journal_id) or self.clock()
        rows = [
            (
                journal_id,
                invoice.invoice_id,
                plan.sku,
                a.participant_id,
                plan.rule.rule_id,
                plan.rule.version,
                installment,
                invoice.currency,
                plan.revenue,
                a.amount,
                a.holdback,
                royalties.release_at(plan.rule.terms, posted_at) if a.holdback else None,
                posted_at,
            )
            for plan in plans
            for a in plan.accruals
        ]
        await royalty_repo.insert_accruals(conn, rows)

    async def _claw_back(
        self, invoice: Invoice, body: dict[str, Any], source_journal: str, refund_id: str, principal: str
    ) -> ClawbackPlan | None:
        """Post the royalty clawback of a refund or lost-dispute journal `body` (royalties.clawback):
        journal `{invoice_id}.clawback.{refund_id}`, derived, so a retry replays it. None when the
        journal reversed no recognised revenue of a SKU that accrued royalties."""
        reversed_ = royalties.reversed_by_sku(body, invoice.currency)
        if not reversed_:
            return None
        entries: list[dict[str, Any]] = []
        rows: list[tuple[Any, ...]] = []
        async with self.pool.acquire() as conn:
            for sku, revenue in sorted(reversed_.items()):
                found = await royalty_repo.clawed_so_far(conn, invoice.invoice_id, sku)
                rule_row = await royalty_repo.accrued_rule(conn, invoice.invoice_id, sku)
                if found is None or rule_row is None:
                    continue
                rule = _rule_of(rule_row)
                so_far = royalties.Clawed(
                    int(found["accrued_revenue"]),
                    _int_map(found["accrued"]),
                    int(found["reversed_revenue"]),
                    _int_map(found["clawed"]),
                )
                amounts = royalties.clawback(revenue, so_far, rule.terms)
                entries += royalties.clawback_entries(sku, amounts, invoice.currency)
                rows += [
                    (source_journal, invoice.invoice_id, sku, p, rule.rule_id, rule.version,
                     invoice.currency, revenue, amount)
                    for p, amount in amounts.items()
                ]  # fmt: skip
        if not rows:
            return None
        journal_id = None
        if entries:
            clawback_body = {
                "entries": entries,
                "memo": "royalty clawback",
                "source_ref": invoice.invoice_id,
                "context": {
                    "invoice_id": invoice.invoice_id,
                    "flow": "royalty.clawback",
                    "source_journal": source_journal,
                },
            }
            journal_id = await self._post(
                clawback_body, f"{invoice.invoice_id}.clawback.{refund_id}", principal
            )
        return ClawbackPlan(journal_id, tuple(rows))

    async def _reverse_transfers(self, plan: ClawbackPlan | None, currency: str, principal: str) -> None:
        """With `LEDGER_CLAWBACK_REVERSALS=on` and Stripe configured: take what a clawback left a
        participant owing (its payable below zero, at most what this clawback took) back from its
        paid transfers, newest first (Stripe transfer reversals, idempotency key = reversal id),
        each booked by journal `{reversal_id}`: provider cash debited, payable credited. A
        provider failure leaves the negative payable to be netted by later accruals; a transient
        one leaves the reversal `requested`, finished by the participant's next reversal run."""
        if plan is None or plan.journal_id is None:
            return
        if not payouts.parse_reversals(os.environ.get(payouts.REVERSALS_ENV, "")):
            return
        clawed: dict[str, int] = {}
        for row in plan.rows:
            clawed[row[3]] = clawed.get(row[3], 0) + row[8]
        gateway = self.gateway_factory()
        if gateway is None:
            return
        try:
            for participant, amount in sorted(clawed.items()):
                if amount > 0:
                    async with self._locked(f"reversal:{participant}:{currency}"):
                        await self._reverse_for(
                            gateway, plan.journal_id, participant, amount, currency, principal
                        )
        finally:
            await gateway.close()

    async def _reverse_for(
        self, gateway: StripeGateway, clawback_journal: str, participant: str, clawed: int, currency: str,
        principal: str,
    ) -> None:  # fmt: skip
        async with self.pool.acquire() as conn:
            unfinished = await payout_repo.open_reversals(conn, participant, currency)
        for row in unfinished:
            await self._request_reversal(gateway, row, principal)
        async with self.pool.acquire() as conn:
            found = [
                b for b in await repository.balances_now(conn, payouts.payable_account(participant))
                if b["currency"] == currency
            ]  # fmt: skip
            payable = int(found[0]["credits_posted"] - found[0]["debits_posted"]) if found else 0
            rows = await payout_repo.reversible_transfers(conn, participant, currency)
            owed = min(clawed, max(0, -payable))
            transfers = [
                payouts.Reversible(r["payout_id"], r["transfer_id"], int(r["reversible"])) for r in rows
            ]
            planned = payouts.reversal_plan(owed, transfers)
            for transfer, amount in planned:
                values = (
                    payouts.reversal_id(clawback_journal, transfer.payout_id), clawback_journal, participant,
                    transfer.payout_id, transfer.transfer_id, currency, amount,
                )  # fmt: skip
                await payout_repo.insert_reversal(conn, values)
            unfinished = await payout_repo.open_reversals(conn, participant, currency)
        for row in unfinished:
            await self._request_reversal(gateway, row, principal)

    async def _request_reversal(self, gateway: StripeGateway, row: asyncpg.Record, principal: str) -> None:
        reversal_id = row["reversal_id"]
        try:
            result = await gateway.reverse_transfer(row["transfer_id"], row["amount"], reversal_id)
        except TransientProviderError as exc:
            log.warning("transfer reversal %s left requested: %s", reversal_id, exc)
            return
        except PermanentProviderError as exc:
            async with self.pool.acquire() as conn:
                await payout_repo.finish_reversal(conn, reversal_id, "failed", reason=str(exc)[:500])
            return
        body = {
            "entries": payouts.reversal_entries(row["participant_id"], row["currency"], row["amount"]),
            "memo": "clawback transfer reversal",
            "source_ref": row["payout_id"],
            "context": {
                "flow": "royalty.clawback_reversal",
                "clawback_journal": row["clawback_journal"],
                "transfer_id": row["transfer_id"],
                "provider_reversal_id": result.reversal_id,
            },
        }
        journal_id = await self._post(body, reversal_id, principal)
        async with self.pool.acquire() as conn:
            await payout_repo.finish_reversal(
                conn, reversal_id, "reversed", provider_reversal_id=result.reversal_id, journal_id=journal_id
            )

    async def _record_clawbacks(self, conn: asyncpg.Connection, plan: ClawbackPlan | None) -> None:
        """Store what a clawback took back (inside the caller's transaction)."""
        if plan is None:
            return
        posted_at = None
        if plan.journal_id is not None:
            posted_at = await royalty_repo.journal_posted_at(conn, plan.journal_id)
        posted_at = posted_at or self.clock()
        await royalty_repo.insert_clawbacks(
            conn,
            [(*row[:4], plan.journal_id, *row[4:], posted_at) for row in plan.rows],
        )

    # -- holdback release (finance/holdbacks.py, migration 0018) ----------------------------------
    async def release_holdbacks(self, as_of: datetime, principal: str) -> dict[str, Any]:
        """Release every holdback due at `as_of` (one journal per accrual journal and release time,
        id derived from it, then its rows marked released); `{as_of, released: [...], failed:
        [...]}`. A release that fails is reported and retried by the next run; the others still
        go through. A crash between the posting and the marking is repaired by the next run, whose
        posting of the same id is a replay."""
        async with self._locked("holdback-release"):
            async with self.pool.acquire() as conn:
                rows = await royalty_repo.held_accruals(conn, as_of, holdbacks.JOURNALS_MAX)
            released: list[dict[str, Any]] = []
            failed: list[dict[str, Any]] = []
            for release in holdbacks.plan_releases([_held(r) for r in rows], as_of):
                try:
                    view = await self._release(release, principal)
                except LedgerError as exc:
                    failed.append(
                        {"journal_id": release.journal_id, "accrual_journal_id": release.accrual_journal_id,
                         "code": str(exc.code), "message": exc.message}
                    )  # fmt: skip
                    continue
                if view is not None:
                    released.append(view)
        return {"as_of": rfc3339(as_of), "released": released, "failed": failed}

    async def _release(self, release: holdbacks.Release, principal: str) -> dict[str, Any] | None:
        """Post one release (or replay it) and mark its rows; its view, None if another run marked them."""
        journal_id = await self._post(holdbacks.release_body(release), release.journal_id, principal)
        async with self.pool.acquire() as conn, conn.transaction():
            released_at = await royalty_repo.journal_posted_at(conn, journal_id) or self.clock()
            marked = await royalty_repo.mark_released(
                conn, release.accrual_journal_id, release.release_at, journal_id, released_at
            )
        return release_view(release, released_at) if marked else None

    async def create_participant(
        self, request: royalties.ParticipantRequest, principal: str
    ) -> tuple[dict[str, Any], bool]:
        """`POST /finance/participants`: (view, created); an exact replay answers the stored one."""
        royalties.check_participant(request)
        minimum = request.minimum_payout
        digest = request_digest(request)
        values = {
            "participant_id": request.participant_id,
            "name": request.name,
            "stripe_account": request.stripe_account,
            "minimum_currency": None if minimum is None else minimum.currency,
            "minimum_amount": None if minimum is None else minimum.amount,
            "request_hash": digest,
            "principal": principal,
        }
        async with self.pool.acquire() as conn:
            created = await royalty_repo.insert_participant(conn, values)
            row = await royalty_repo.participant(conn, request.participant_id)
        check(row is not None, "participant missing right after its insert")
        assert row is not None  # for mypy; checked just above
        if not created and row["request_hash"] != digest:
            raise Rejection(
                ErrorCode.IDEMPOTENCY_CONFLICT,
                "participant id already used with a different payload",
                {"participant_id": request.participant_id},
            )
        return participant_view(row), created

    async def participant(self, participant_id: str) -> dict[str, Any]:
        """`GET /finance/participants/{id}`; 404 NOT_FOUND."""
        async with self.pool.acquire() as conn:
            row = await royalty_repo.participant(conn, participant_id)
        if row is None:
            raise _missing("participant", participant_id)
        return participant_view(row)

    async def create_rule(
        self, request: royalties.RuleRequest, principal: str
    ) -> tuple[dict[str, Any], bool]:
        """`POST /finance/royalty_rules`: a new version of the SKU's or contract's rule; (view,
        created). Without `rule_id` the id derives from the payload, so a resend is a replay."""
        if request.rule_id is not None:
            chart.check_segment(request.rule_id, "$.rule_id")
        ids = [s.participant_id for s in request.splits]
        async with self.pool.acquire() as conn:
            known = await royalty_repo.existing_participants(conn, ids)
        terms = royalties.validate(request, known)
        rule_id = request.rule_id or "rr-" + request_digest(request)[:32]
        digest = request_digest(msgspec.structs.replace(request, rule_id=rule_id))
        values = {
            "rule_id": rule_id,
            "subject": terms.subject,
            "subject_key": terms.key,
            "effective_from": terms.effective_from,
            "body": msgspec.json.encode(terms).decode(),
            "request_hash": digest,
            "principal": principal,
        }
        async with self.pool.acquire() as conn, conn.transaction():
            created = await royalty_repo.insert_rule(conn, values)
            row = await royalty_repo.rule(conn, rule_id)
        check(row is not None, "rule missing right after its insert")
        assert row is not None  # for mypy; checked just above
        if not created and row["request_hash"] != digest:
            raise Rejection(
                ErrorCode.IDEMPOTENCY_CONFLICT,
                "rule id already used with a different payload",
                {"rule_id": rule_id},
            )
        return rule_view(_rule_of(row)), created

    async def rule_in_force(self, subject: str, key: str, at: datetime) -> dict[str, Any]:
        """`GET /finance/royalty_rules?sku=|contract=&at=`: the version in force; 404 NOT_FOUND."""
        async with self.pool.acquire() as conn:
            row = await royalty_repo.rule_in_force(conn, subject, key, at)
        if row is None:
            raise _missing("royalty_rule", f"{subject}:{key}")
        return rule_view(_rule_of(row))

    async def statement(
        self, participant_id: str, start: datetime | None, end: datetime | None
    ) -> dict[str, Any]:
        """`GET /finance/participants/{id}/statement`: accruals and clawbacks with
        `start <= posted_at < end` and the current ledger balances of the participant's payable and
        holdback accounts (a negative payable is a clawback not yet netted by later accruals)."""
        accounts = {
            "payable": chart.royalty_payable(participant_id),
            "holdback": chart.royalty_holdback(participant_id),
        }
        async with self.pool.acquire() as conn:
            if await royalty_repo.participant(conn, participant_id) is None:
                raise _missing("participant", participant_id)
            rows = await royalty_repo.participant_accruals(conn, participant_id, start, end)
            clawbacks = await royalty_repo.participant_clawbacks(conn, participant_id, start, end)
            reversals = await payout_repo.participant_reversals(conn, participant_id)
            balances = {name: await repository.balances_now(conn, a) for name, a in accounts.items()}
        totals: dict[str, dict[str, int]] = {}
        for r in rows:
            total = totals.setdefault(r["currency"], {"accrued": 0, "holdback": 0, "clawed_back": 0})
            total["accrued"] += r["amount"]
            total["holdback"] += r["holdback"]
        for r in clawbacks:
            total = totals.setdefault(r["currency"], {"accrued": 0, "holdback": 0, "clawed_back": 0})
            total["clawed_back"] += r["amount"]
        return {
            "participant_id": participant_id,
            "from": _iso(start),
            "to": _iso(end),
            "accruals": [accrual_view(r) for r in rows],
            "clawbacks": [clawback_view(r) for r in clawbacks],
            "reversals": [reversal_view(r) for r in reversals],
            "totals": [{"currency": c, **t} for c, t in sorted(totals.items())],
            "balances": {
                name: {
                    "account_id": accounts[name],
                    "balances": [
                        {"currency": b["currency"], "balance": b["credits_posted"] - b["debits_posted"]}
                        for b in found
                    ],
                }
                for name, found in balances.items()
            },
        }

    async def create(
        self, request: InvoiceRequest, new_id: str, principal: str
    ) -> tuple[dict[str, Any], bool]:
        """Price, store and (unless a draft) issue an invoice; (view, created). Replays answer it."""
        invoice_id = one_id(request.invoiceId, request.invoice_id, "$.invoiceId") or new_id
        if len(invoice_id) > INVOICE_ID_MAX:
            raise validation_error(f"invoice id must be at most {INVOICE_ID_MAX} characters", "$.invoiceId")
        invoice = invoices.create_invoice(
            invoice_id, request.buyer, request.line_items, request.currency, self.seller, self.rules
        )
        if request.tax is not None and request.tax != invoice.tax:
            raise validation_error(
                f"tax {request.tax} differs from the computed tax {invoice.tax}",
                "$.tax",
                computed=invoice.tax,
                sent=request.tax,
            )
        digest = request_digest(msgspec.structs.replace(request, invoiceId=None, invoice_id=invoice_id))
        document = invoice_document(invoice, request.due_date, request.terms)
        async with self._locked(f"invoice:{invoice_id}"), self.pool.acquire() as conn:
            created = await finance_repo.insert_invoice(
                conn,
                invoice_id,
                "priced",
                principal,
                _row_of(invoice),
                document_hash=document_hash(document),
                request_hash=digest,
                due_date=request.due_date,
                terms=request.terms,
            )
            row = await finance_repo.invoice_row(conn, invoice_id)
        if row is None:  # pragma: no cover - inserted or present just above
            raise not_found(invoice_id)
        if not created and row["request_hash"] != digest:
            raise Rejection(
                ErrorCode.IDEMPOTENCY_CONFLICT,
                "invoice id already used with a different payload",
                {"invoice_id": invoice_id},
            )
        if not request.draft and row["status"] == InvoiceStatus.DRAFT:
            view, _ = await self.step(invoice_id, "issue", principal)
            return view, created
        return await self.view(invoice_id), created

    async def pay(
        self, request: PaymentRequest, principal: str, settlement_id: str | None = None
    ) -> tuple[dict[str, Any], bool]:
        """Record a payment: debit cash, credit AR (and customer credit beyond the total).

        (answer, posted): a duplicate (provider, reference) answers the original answer, posted False.
        """
        return await self._move_money("payment", request, principal, settlement_id)

    async def pay_many(
        self,
        items: list[tuple[PaymentRequest, str | None]],
        principal: str,
        halts: Callable[[BaseException], bool] = retryable,
    ) -> list[PayOutcome]:
        """`pay` for many (request, settlement id) pairs at once: the same answers, journals (ids and
        bodies), rows and idempotency (replays, IDEMPOTENCY_CONFLICT), in fewer round trips.

        Each item's outcome, in order: (answer, posted), the exception `pay` would have raised, or
        None when it was not tried because an earlier item of its invoice failed with an error that
        `halts` (by default a retryable one: the invoice's later payments must not overtake it).
        The payments of one invoice apply in order; different invoices side by side. Round by round,
        each invoice's next payment is computed with the pure steps (`invoices.record_payment`, or
        `_settle_across` in another currency) and every round's journals go to the ledger in one
        call; at the end the invoice updates and payment rows are stored in one transaction. A
        failure there fails every payment posted by this call (its journals are replayed by the
        retry, as after a crash between posting and storing in `pay`).
        """
        outcomes: list[PayOutcome] = [None] * len(items)
        targets: dict[int, tuple[str, str]] = {}
        for index, (request, _settlement) in enumerate(items):
            try:
                invoice_id, _reference = money_target(request)
            except LedgerError as exc:
                outcomes[index] = exc
                continue
            targets[index] = (invoice_id, payment_id_of(request.payment_provider, request.provider_reference))
        names = sorted({f"payment:{m}" for _, m in targets.values()})
        names += sorted({f"invoice:{i}" for i, _ in targets.values()})
        async with self._locked_all(names):  # one global order: never a lock cycle
            batch = _PayBatch(self, items, targets, outcomes, principal, halts)
            await batch.run()
        return outcomes

    async def refund(self, request: PaymentRequest, principal: str) -> tuple[dict[str, Any], bool]:
        """Return money: customer credit first, then the invoice (tax and net in proportion).

        Same shape and idempotency as `pay` (the refund's provider reference names it). A
        `RefundRequest` with `lines` refunds those invoice lines (`invoices.refund`).
        A "stripe" refund with a gateway configured is first created at Stripe (`_refund_at_stripe`).
        """
        if request.payment_provider == finance_repo.STRIPE:
            gateway = self.gateway_factory()
            if gateway is not None:
                try:
                    return await self._refund_at_stripe(gateway, request, principal)
                finally:
                    await gateway.close()
        return await self._move_money("refund", request, principal, None)

    async def _refund_at_stripe(
        self, gateway: StripeGateway, request: PaymentRequest, principal: str
    ) -> tuple[dict[str, Any], bool]:
        """Create the refund at Stripe, then post it recorded under the Stripe refund id.

        The refund is created against one Stripe payment of the invoice: the oldest whose currency
        is the refund's and that still has the whole amount refundable (its amount less refunds
        recorded against its intent and disputes open or lost on it); none in that currency -> 400
        VALIDATION_ERROR on `$.currency`; no single payment covers it -> 409 REFUND_EXCEEDS_PAID
        with `details.refundable` per payment (split the refund; one request is one Stripe refund).
        The idempotency key is `{invoice_id}.refund.{id of the request's reference}`, so a retry of
        the same request names the same Stripe refund. The row is stored with provider reference =
        the Stripe refund id (the key a later `charge.refunded` webhook applies), so the webhook
        replays it instead of posting again; the answer carries `provider_refund_id`,
        `request_reference` and `payment_intent`.
        Transient provider errors -> 503 SERVICE_UNAVAILABLE (retryable), refusals -> 409
        INVALID_STATE with the provider's reason; nothing is posted in either case.
        """
        invoice_id, reference = money_target(request)
        request_id = payment_id_of(finance_repo.STRIPE, reference, MONEY_PREFIX["refund"])
        async with self._locked(f"stripe-refund:{request_id}"):
            async with self.pool.acquire() as conn:
                existing = await finance_repo.money_by_reference(
                    conn, "refund", finance_repo.STRIPE, reference
                )
                if existing is None:
                    existing = await conn.fetchrow(
                        "SELECT refund_id AS id, * FROM refunds WHERE invoice_id = $1 AND provider = $2"
                        " AND answer->>'request_reference' = $3",
                        invoice_id,
                        finance_repo.STRIPE,
                        reference,
                    )
                payments = await finance_repo.stripe_payments_refundable(conn, invoice_id)
            if existing is not None:
                return _replayed("refund", existing, invoice_id, request, None), False
            if not payments:
                raise Rejection(
                    ErrorCode.INVALID_STATE,
                    "invoice has no Stripe payment to refund",
                    {"invoice_id": invoice_id, "provider": finance_repo.STRIPE},
                )
            matching = [p for p in payments if p["currency"] == request.currency]
            if not matching:
                raise validation_error(
                    "refund currency differs from the Stripe payment's",
                    "$.currency",
                    payment_currency=payments[0]["currency"],
                    payment_currencies=sorted({p["currency"] for p in payments}),
                )
            invoice, row = await self._load(invoice_id, InvoiceStatus.REFUNDED)
            lines = request.lines if isinstance(request, RefundRequest) else None
            if lines is not None:  # refusals before Stripe: the line-aware step, as posting will run it
                invoices.refund(invoice, request.amount, request.currency, request.payment_provider, lines)
            else:
                await self._refund_step(invoice, row, request)  # refusals before Stripe
            paid = _refund_source(matching, request)
            try:
                result = await gateway.refund(
                    payment_intent=paid["payment_intent"],
                    amount=request.amount,
                    idempotency_key=f"{invoice_id}.refund.{request_id}",
                )
            except TransientProviderError as exc:
                raise Rejection(
                    ErrorCode.SERVICE_UNAVAILABLE,
                    "payment provider unavailable; retry the same request",
                    {"provider": finance_repo.STRIPE, "reason": str(exc), "retryable": True},
                ) from exc
            except PermanentProviderError as exc:
                raise Rejection(
                    ErrorCode.INVALID_STATE,
                    "payment provider refused the refund",
                    {"provider": finance_repo.STRIPE, "reason": str(exc)},
                ) from exc
            recorded = RefundRequest(
                amount=request.amount,
                currency=request.currency,
                payment_provider=finance_repo.STRIPE,
                provider_reference=result.refund_id,
                invoice_id=invoice_id,
                lines=lines,
            )
            extra = {
                "provider_refund_id": result.refund_id,
                "request_reference": reference,
                "payment_intent": paid["payment_intent"],
            }
            answer, posted = await self._move_money("refund", recorded, principal, None, extra)
        return {**answer, "provider_refund_id": result.refund_id}, posted

    async def _move_money(
        self,
        kind: str,
        request: PaymentRequest,
        principal: str,
        settlement_id: str | None,
        extra: dict[str, Any] | None = None,
    ) -> tuple[dict[str, Any], bool]:
        invoice_id, reference = money_target(request)
        money_id = payment_id_of(request.payment_provider, reference, MONEY_PREFIX[kind])
        async with self._locked(f"{kind}:{money_id}"), self._locked(f"invoice:{invoice_id}"):
            async with self.pool.acquire() as conn:
                existing = await finance_repo.money_by_reference(
                    conn, kind, request.payment_provider, reference
                )
            lines = request.lines if isinstance(request, RefundRequest) else None
            if existing is not None:
                replay = _replayed(kind, existing, invoice_id, request, settlement_id)
                _check_same_lines(replay, lines)
                return replay, False
            requested = InvoiceStatus.PAID if kind == "payment" else InvoiceStatus.REFUNDED
            invoice, row = await self._load(invoice_id, requested)
            if kind == "refund" and await self._finish_crashed_installments(invoice_id, invoice, principal):
                invoice, row = await self._load(invoice_id, requested)
            settled: dict[str, Any] = {}
            clawback: ClawbackPlan | None = None
            if kind == "payment" and request.currency != invoice.currency:
                step, settled = await self._settle_across(invoice, row, request)
            elif kind == "payment":
                step = invoices.record_payment(
                    invoice, request.amount, request.currency, request.payment_provider
                )
            elif lines is not None:  # a refund by lines: in the invoice's currency only
                step = invoices.refund(
                    invoice, request.amount, request.currency, request.payment_provider, lines
                )
            else:
                step, settled = await self._refund_step(invoice, row, request)
            journal_id = None
            if step.journal is not None:
                suffix = "pay" if kind == "payment" else "refund"
                body = step.journal if kind == "payment" else _reversing(step.journal, invoice_id)
                journal_id = await self._post(body, f"{invoice_id}.{suffix}.{money_id}", principal)
                if kind == "refund":
                    clawback = await self._claw_back(invoice, body, journal_id, money_id, principal)
            answer = {
                **money_answer(kind, money_id, invoice_id, journal_id, step, request, settled),
                **(extra or {}),
                **_refund_details(kind, step, lines),
                **_clawback_answer(clawback),
            }
            values = money_values(money_id, invoice_id, request, journal_id, settlement_id, principal, answer)
            async with self.pool.acquire() as conn, conn.transaction():
                await self._store(conn, row, step.invoice, journal_id)
                await finance_repo.insert_money(conn, kind, values)
                await self._record_clawbacks(conn, clawback)
                if kind == "refund" and step.invoice.schedule is not None:
                    await recognition_repo.sync_installments(
                        conn, invoice_id, _installment_rows(step.invoice.schedule)
                    )
                if settled:
                    await fx_repo.record_applied(conn, money_id, settled["applied_amount"], invoice.currency)
            await self._reverse_transfers(clawback, invoice.currency, principal)
        return answer, True

    # -- FX settlement ---------------------------------------------------------------------------
    async def _rate(self, conn: asyncpg.Connection, currency: str, when: datetime) -> fx.Rate | None:
        """The base/`currency` rate in force at `when` (None for the base currency); FX_RATE_MISSING."""
        if currency == self.base_currency:
            return None
        row = await fx_repo.rate_at(conn, self.base_currency, currency, when)
        if row is None:
            raise fx.fx_rate_missing(self.base_currency, currency, when)
        return fx.Rate(*row)

    async def _settle_across(
        self, invoice: Invoice, row: asyncpg.Record, request: PaymentRequest
    ) -> tuple[Step, dict[str, Any]]:
        """A payment in another currency than the invoice's (DECISIONS D2, docs/accounting.md).

        Both currencies are converted through the base currency at the rates in force now (the
        payment time); the result, in the invoice's currency, is applied like a same-currency
        payment (overpayment -> customer credit). The receivable is released at the rate in force
        at the invoice's `issued_at` (the payment-time rate when none was stored then), so the
        difference is realised on `revenue:fx-gain:realised` / `expense:fx-loss:realised`.
        """
        if request.amount <= 0 or not fits_int64(request.amount):
            raise validation_error(
                "amount must be a positive integer (minor units) that fits int64", "$.amount"
            )
        if not is_currency(request.currency):
            raise validation_error(f"unknown currency code {request.currency!r} (ISO 4217)", "$.currency")
        chart.check_segment(request.payment_provider, "$.payment_provider")
        base = self.base_currency
        when = self.clock()
        async with self.pool.acquire() as conn:
            paid_rate = await self._rate(conn, request.currency, when)
            invoice_rate = await self._rate(conn, invoice.currency, when)
            issue_rate = invoice_rate
            if invoice.currency != base and row["issued_at"] is not None:
                stored = await fx_repo.rate_at(conn, base, invoice.currency, row["issued_at"])
                issue_rate = fx.Rate(*stored) if stored is not None else invoice_rate
        paid_base = (
            request.amount if paid_rate is None else fx.to_base(request.amount, request.currency, paid_rate)
        )
        converted = (
            paid_base if invoice_rate is None else fx.from_base(paid_base, invoice.currency, invoice_rate)
        )
        if converted <= 0:
            raise validation_error(
                f"amount is less than one minor unit of {invoice.currency} at the current rate", "$.amount"
            )
        step = invoices.record_payment(invoice, converted, invoice.currency, request.payment_provider)
        applied, credit = step.amounts["applied"], step.amounts["credit"]
        buyer = invoice.buyer.buyer_id
        cash = fx.FxLine(
            chart.cash(request.payment_provider, request.currency), "debit", request.amount, request.currency
        )
        parts = [
            (chart.receivable(buyer), applied, issue_rate),
            (chart.customer_credit(buyer), credit, invoice_rate),
        ]
        kept = [(account, amount, rate) for account, amount, rate in parts if amount > 0]
        released_base = sum(
            amount if rate is None else fx.to_base(amount, invoice.currency, rate) for _, amount, rate in kept
        )
        if credit == 0:
            completion = fx.settlement_lines(
                base=base,
                receivable_account=chart.receivable(buyer),
                invoice_amount_minor=applied,
                invoice_currency=invoice.currency,
                invoice_rate=issue_rate,
                cash_account=cash.account_id,
                paid_amount_minor=request.amount,
                paid_currency=request.currency,
                paid_rate=paid_rate,
            )
        else:
            gain_or_loss = fx.realised_fx_lines(released_base, paid_base, base)
            lines = [cash, *(fx.FxLine(a, "credit", amount, invoice.currency) for a, amount, _ in kept)]
            rates = [paid_rate, *(rate for _, _, rate in kept)]
            completion = fx.complete_with_rates(
                [*lines, *gain_or_loss], [*rates, *(None for _ in gain_or_loss)], base
            )
        journal = {
            "entries": [msgspec.to_builtins(line) for line in completion.journal_lines()],
            "memo": "invoice payment (fx)",
            "source_ref": invoice.invoice_id,
            "context": {"invoice_id": invoice.invoice_id, "flow": "invoice.payment", "fx": True},
        }
        step = msgspec.structs.replace(step, journal=journal)
        settled = {
            "applied_amount": converted,
            "applied_currency": invoice.currency,
            "fx": {
                "base": base,
                "paid_rate": None if paid_rate is None else msgspec.to_builtins(paid_rate),
                "invoice_rate": None if invoice_rate is None else msgspec.to_builtins(invoice_rate),
                "issue_rate": None if issue_rate is None else msgspec.to_builtins(issue_rate),
                "paid_base": paid_base,
                "released_base": released_base,
                "realised_minor": paid_base - released_base,
            },
        }
        return step, settled

    async def record_external(self, request: ExternalInvoiceRequest, principal: str) -> bool:
        """`POST /invoices`: store an issued invoice pointing at an existing journal; True when new."""
        if not JOURNAL_ID_PATTERN.fullmatch(request.invoice_id):
            raise validation_error("invoice_id must be 1-200 characters of [A-Za-z0-9:._-]", "$.invoice_id")
        if request.amount_cents <= 0 or not fits_int64(request.amount_cents):
            raise validation_error(
                "amount_cents must be a positive integer that fits int64", "$.amount_cents"
            )
        if not is_currency(request.currency):
            raise validation_error(f"unknown currency code {request.currency!r} (ISO 4217)", "$.currency")
        digest = request_digest(request)
        async with self._locked(f"invoice:{request.invoice_id}"), self.pool.acquire() as conn:
            if not JOURNAL_ID_PATTERN.fullmatch(request.journal_ref) or not await repository.journal_exists(
                conn, request.journal_ref
            ):
                raise LedgerError(
                    ErrorCode.NOT_FOUND,
                    f"no journal {request.journal_ref}",
                    {"resource": "journal", "id": request.journal_ref},
                )
            body = msgspec.json.encode(request).decode()
            row = InvoiceRow(
                buyer=msgspec.json.encode(request.payer or {}).decode(),
                currency=request.currency,
                status=str(InvoiceStatus.ISSUED),
                subtotal=request.amount_cents,
                tax=0,
                total=request.amount_cents,
                body=body,
            )
            created = await finance_repo.insert_invoice(
                conn,
                request.invoice_id,
                "external",
                principal,
                row,
                document_hash=digest,
                request_hash=digest,
                journal_ref=request.journal_ref,
                due_date=request.due_date,
            )
            if not created:
                stored = await finance_repo.invoice_row(conn, request.invoice_id)
                if stored is None or stored["request_hash"] != digest:
                    raise Rejection(
                        ErrorCode.IDEMPOTENCY_CONFLICT,
                        "invoice_id already used with a different payload",
                        {"invoice_id": request.invoice_id},
                    )
        return created

    # -- Stripe webhook --------------------------------------------------------------------------
    async def apply_stripe(self, events: list[Event], principal: str) -> tuple[Outcome, list[StripeApplied]]:
        """Apply one verified Stripe delivery exactly once; (outcome, the actions applied, in order).

        Deliveries are serialised in this process. The inbox state this delivery needs is loaded
        from the store (seen event id, paid intents = `payments` rows with provider 'stripe',
        applied refunds/disputes, parked actions), `WebhookInbox.accept` decides, the actions are
        applied through `pay` / `refund` (unique per provider reference) and only then the event
        id, the new parked actions and the released ones are stored. A crash in between leaves the
        event unrecorded: Stripe's retry applies it again and the references make that a replay.
        Parked actions whose payment is already recorded (such a crash) are applied first.
        """
        async with self._locked("stripe:webhook"):
            return await self._apply_stripe(events, principal)

    async def _apply_stripe(self, events: list[Event], principal: str) -> tuple[Outcome, list[StripeApplied]]:
        if not events:
            return "ignored", []
        event_id = events[0].event_id
        acting = [e for e in events if not isinstance(e, Ignored)]
        intents = sorted({e.payment_intent for e in acting})
        keys = sorted({_stripe_key(e) for e in acting if not isinstance(e, PaymentSucceeded)})
        async with self.pool.acquire() as conn:
            seen = await finance_repo.stripe_event_seen(conn, event_id)
            paid = await finance_repo.stripe_paid_intents(conn, intents)
            applied = await finance_repo.stripe_applied_keys(conn, keys)
            stored = await finance_repo.stripe_parked(conn, intents, keys)
        loaded = [msgspec.json.decode(text, type=Pending) for text in stored]
        stuck = [p for p in loaded if p.payment_intent in paid and _stripe_key(p) not in applied]
        waiting = [p for p in loaded if p.payment_intent not in paid and _stripe_key(p) not in applied]
        inbox = WebhookInbox(
            InboxState(
                events={event_id} if seen else set(),
                paid=set(paid),
                applied=applied | {_stripe_key(p) for p in stuck},
                parked=waiting,
            )
        )
        outcome, accepted = inbox.accept(events)
        actions: list[Action] = [*stuck, *accepted]
        if stuck:
            outcome = "applied"
        for action in actions:
            if isinstance(action, PaymentSucceeded) and action.invoice_id is None:
                raise validation_error(
                    "payment_intent.succeeded lacks metadata.invoice_id",
                    "$.data.object.metadata.invoice_id",
                )
        results = [await self._apply_stripe_action(action, paid, principal) for action in actions]
        loaded_keys = {_stripe_key(p) for p in loaded}
        parked_keys = {_stripe_key(p) for p in inbox.state.parked}
        new_parked = [
            (_stripe_key(p), p.payment_intent, p.event_id, msgspec.json.encode(p).decode())
            for p in inbox.state.parked
            if _stripe_key(p) not in loaded_keys
        ]
        first = events[0]
        kind = first.event_type if isinstance(first, Ignored) else STRIPE_EVENT_TYPES[type(first)]
        async with self.pool.acquire() as conn:
            await finance_repo.record_stripe_delivery(
                conn, (event_id, kind, outcome), new_parked, sorted(loaded_keys - parked_keys)
            )
        return outcome, results

    async def _apply_stripe_action(
        self, action: Action, paid: dict[str, str], principal: str
    ) -> StripeApplied:
        """Post one inbox action; `paid` (intent -> invoice id) learns the payments made here."""
        if isinstance(action, PaymentSucceeded):
            invoice_id = action.invoice_id or ""
            request = PaymentRequest(
                amount=action.amount,
                currency=action.currency,
                payment_provider=finance_repo.STRIPE,
                provider_reference=action.payment_intent,
                invoice_id=invoice_id,
            )
            answer, posted = await self.pay(request, principal)
            paid[action.payment_intent] = invoice_id
            return StripeApplied(action, answer, posted)
        invoice_id = paid[action.payment_intent]
        if isinstance(action, Refunded):
            request = PaymentRequest(
                amount=action.amount,
                currency=action.currency,
                payment_provider=finance_repo.STRIPE,
                provider_reference=action.refund_id,
                invoice_id=invoice_id,
            )
            extra = {"payment_intent": action.payment_intent}
            answer, posted = await self._move_money("refund", request, principal, None, extra)
            return StripeApplied(action, answer, posted)
        return await self._apply_dispute(action, invoice_id, principal)

    # -- Stripe disputes (docs/accounting.md "Disputes") -----------------------------------------
    async def _apply_dispute(
        self, action: DisputeOpened | DisputeClosed, invoice_id: str, principal: str
    ) -> StripeApplied:
        """Open (hold) or close (won / lost) one dispute, each exactly once per dispute id.

        A close whose opening never arrived opens it first (the close carries the amount).
        A repeat answers the stored result with `posted` False.
        """
        async with self._locked(f"dispute:{action.dispute_id}"):
            async with self.pool.acquire() as conn:
                found = await finance_repo.stripe_dispute(conn, action.dispute_id)
            opened = found is None
            if found is None:
                found = await self._hold_dispute(action, invoice_id, principal)
            if isinstance(action, DisputeOpened):
                return StripeApplied(action, {**_dispute_answer(found), "event_id": action.event_id}, opened)
            if found["status"] != "open":
                answer: dict[str, Any] = msgspec.json.decode(found["answer_text"] or "{}")
                return StripeApplied(action, answer, False)
            if action.outcome == "won":
                answer = await self._dispute_won(action, found, principal)
            else:
                answer = await self._dispute_lost(action, found, principal)
            return StripeApplied(action, answer, True)

    async def _hold_dispute(
        self, action: DisputeOpened | DisputeClosed, invoice_id: str, principal: str
    ) -> asyncpg.Record:
        """Post Stripe's cash -> `asset:disputes-held:stripe:{CCY}` and record the dispute row."""
        if action.amount <= 0 or not fits_int64(action.amount):
            raise validation_error("a dispute's amount must be a positive integer", "$.data.object.amount")
        if not is_currency(action.currency):
            raise validation_error(
                f"unknown currency code {action.currency!r} (ISO 4217)", "$.data.object.currency"
            )
        stripe = finance_repo.STRIPE
        body = _dispute_body(
            invoice_id,
            action.dispute_id,
            "opened",
            [
                (chart.disputes_held(stripe, action.currency), "debit", action.amount, action.currency),
                (chart.cash(stripe, action.currency), "credit", action.amount, action.currency),
            ],
        )
        journal_id = await self._post(body, dispute_journal_id(invoice_id, action.dispute_id), principal)
        values = {
            "dispute_id": action.dispute_id,
            "payment_intent": action.payment_intent,
            "event_id": action.event_id,
            "amount": action.amount,
            "currency": action.currency,
            "reason": action.reason if isinstance(action, DisputeOpened) else "unknown",
            "invoice_id": invoice_id,
            "journal_id": journal_id,
        }
        async with self.pool.acquire() as conn:
            await finance_repo.insert_stripe_dispute(conn, values)
            found = await finance_repo.stripe_dispute(conn, action.dispute_id)
        check(found is not None, f"dispute {action.dispute_id} not stored")
        assert found is not None  # for mypy; checked above
        return found

    async def _dispute_won(
        self, action: DisputeClosed, found: asyncpg.Record, principal: str
    ) -> dict[str, Any]:
        """The held money returns to Stripe's cash (`{hold journal}.won`)."""
        stripe, currency, amount = finance_repo.STRIPE, found["currency"], found["amount"]
        invoice_id = found["invoice_id"] or ""
        journal_id = None
        if found["journal_id"] is not None:  # a row from before 0010 held nothing
            body = _dispute_body(
                invoice_id,
                action.dispute_id,
                "won",
                [
                    (chart.cash(stripe, currency), "debit", amount, currency),
                    (chart.disputes_held(stripe, currency), "credit", amount, currency),
                ],
            )
            journal_id = await self._post(
                body, f"{dispute_journal_id(invoice_id, action.dispute_id)}.won", principal
            )
        answer = {
            **_dispute_answer(found),
            "status": "won",
            "stripe_status": action.status,
            "event_id": action.event_id,
            "closed_journal_id": journal_id,
        }
        async with self.pool.acquire() as conn:
            await finance_repo.close_stripe_dispute(
                conn,
                action.dispute_id,
                "won",
                action.event_id,
                journal_id,
                msgspec.json.encode(answer).decode(),
            )
        return answer

    async def _dispute_lost(
        self, action: DisputeClosed, found: asyncpg.Record, principal: str
    ) -> dict[str, Any]:
        """The buyer keeps the money: a refund of the invoice taken from the held account.

        What is still refundable on the invoice (paid less refunded, in the invoice's currency,
        converted through the base currency when the dispute is in another) is reversed by the
        rules of `invoices.refund` and counts as refunded (a refund row keyed by the dispute id);
        anything beyond it (already refunded separately, or an invoice in a state that takes no
        refund) goes to `expense:dispute-losses:stripe`, so a refund and a lost dispute for the
        same money never reverse tax and revenue twice.
        """
        stripe, dispute_id = finance_repo.STRIPE, action.dispute_id
        invoice_id = found["invoice_id"] or ""
        held = found["journal_id"] is not None
        source = (chart.disputes_held if held else chart.cash)(stripe, found["currency"])
        request = PaymentRequest(
            amount=found["amount"],
            currency=found["currency"],
            payment_provider=stripe,
            provider_reference=dispute_id,
            invoice_id=invoice_id,
        )
        async with self._locked(f"invoice:{invoice_id}"):
            invoice, row = await self._load(invoice_id, InvoiceStatus.REFUNDED)
            if request.currency == invoice.currency:
                step, settled = _lost_in_currency(invoice, request.amount, source)
            else:
                step, settled = await self._refund_across(invoice, row, request, source=source, lost=True)
            check(step.journal is not None, "a lost dispute posts a journal")
            assert step.journal is not None  # for mypy; checked above
            body = {
                **_reversing(step.journal, invoice_id),
                "memo": "stripe dispute lost",
                "context": {"invoice_id": invoice_id, "flow": "dispute.lost", "dispute_id": dispute_id},
            }
            journal_id = await self._post(
                body, f"{dispute_journal_id(invoice_id, dispute_id)}.lost", principal
            )
            covered = settled["applied_amount"]
            refund_id = payment_id_of(stripe, dispute_id, MONEY_PREFIX["refund"]) if covered else None
            clawback = None
            if refund_id is not None:
                clawback = await self._claw_back(invoice, body, journal_id, refund_id, principal)
            answer = {
                **_dispute_answer(found),
                "status": "lost",
                "stripe_status": action.status,
                "event_id": action.event_id,
                "closed_journal_id": journal_id,
                "refund_id": refund_id,
                "invoice_status": str(step.invoice.status),
                **step.amounts,
                "amount_refunded": step.invoice.refunded,
                **settled,
                **_clawback_answer(clawback),
            }
            encoded = msgspec.json.encode(answer).decode()
            async with self.pool.acquire() as conn, conn.transaction():
                if refund_id is not None:
                    await self._store(conn, row, step.invoice, journal_id)
                    values = {
                        "id": refund_id,
                        "invoice_id": invoice_id,
                        "provider": stripe,
                        "provider_reference": dispute_id,
                        "amount": request.amount,
                        "currency": request.currency,
                        "journal_id": journal_id,
                        "principal": principal,
                        "answer": encoded,
                    }
                    await finance_repo.insert_money(conn, "refund", values)
                    await self._record_clawbacks(conn, clawback)
                await finance_repo.close_stripe_dispute(
                    conn, dispute_id, "lost", action.event_id, journal_id, encoded
                )
            await self._reverse_transfers(clawback, invoice.currency, principal)
        return answer

    # -- cross-currency refunds (docs/accounting.md "Cross-currency refund") ---------------------
    async def _refund_step(
        self, invoice: Invoice, row: asyncpg.Record, request: PaymentRequest
    ) -> tuple[Step, dict[str, Any]]:
        """A refund's step: `invoices.refund` in the invoice's currency, else `_refund_across`."""
        if request.currency == invoice.currency:
            step = invoices.refund(invoice, request.amount, request.currency, request.payment_provider)
            return step, {}
        return await self._refund_across(invoice, row, request)

    async def _refund_rates(self, invoice: Invoice, row: asyncpg.Record, currency: str) -> RefundRates:
        """The rates of a cross-currency refund now (FX_RATE_MISSING when one is missing)."""
        base, when = self.base_currency, self.clock()
        async with self.pool.acquire() as conn:
            refund_rate = await self._rate(conn, currency, when)
            invoice_rate = await self._rate(conn, invoice.currency, when)
            issue_rate = credit_rate = invoice_rate
            if invoice.currency != base:
                if row["issued_at"] is not None:
                    stored = await fx_repo.rate_at(conn, base, invoice.currency, row["issued_at"])
                    issue_rate = fx.Rate(*stored) if stored is not None else invoice_rate
                paid_at = await finance_repo.last_payment_at(conn, invoice.invoice_id)
                if paid_at is not None:
                    stored = await fx_repo.rate_at(conn, base, invoice.currency, paid_at)
                    credit_rate = fx.Rate(*stored) if stored is not None else invoice_rate
        return RefundRates(refund_rate, invoice_rate, issue_rate, credit_rate)

    async def _refund_across(
        self,
        invoice: Invoice,
        row: asyncpg.Record,
        request: PaymentRequest,
        *,
        source: str | None = None,
        lost: bool = False,
    ) -> tuple[Step, dict[str, Any]]:
        """A refund in another currency than the invoice's (DECISIONS D2, docs/accounting.md).

        The refund is converted through the base currency at the rates in force now; that amount,
        in the invoice's currency, is refunded by `invoices.refund` (customer credit first, then
        tax and net in proportion; REFUND_EXCEEDS_PAID decided on it). The reversed lines are
        valued at the rates they were booked at (tax and net at the issue, customer credit at the
        latest payment), the cash (or `source`) credit at the refund's rate, and the difference
        is realised on `revenue:fx-gain:realised` / `expense:fx-loss:realised`; D2 completion
        adds the fx-position lines. `lost` (a lost dispute) caps the invoice part at what is
        still refundable and books the rest, in base, on `expense:dispute-losses:{provider}`.
        """
        if request.amount <= 0 or not fits_int64(request.amount):
            raise validation_error(
                "amount must be a positive integer (minor units) that fits int64", "$.amount"
            )
        if not is_currency(request.currency):
            raise validation_error(f"unknown currency code {request.currency!r} (ISO 4217)", "$.currency")
        provider = chart.check_segment(request.payment_provider, "$.payment_provider")
        async with self.pool.acquire() as conn:
            currencies = await finance_repo.payment_currencies(conn, invoice.invoice_id)
        if request.currency not in currencies:
            raise validation_error(
                f"refund currency {request.currency} is neither the invoice's ({invoice.currency})"
                " nor that of a payment on it",
                "$.currency",
                invoice_currency=invoice.currency,
                payment_currencies=sorted(currencies),
            )
        refundable_state = invoice.status in invoices.STEP_SOURCES["refund"][0]
        if not refundable_state and not lost:
            raise invoices.InvalidState(invoice.status, InvoiceStatus.REFUNDED)
        base = self.base_currency
        rates = await self._refund_rates(invoice, row, request.currency)
        refund_base = _in_base(request.amount, request.currency, rates.refund)
        converted = (
            refund_base
            if rates.invoice is None
            else fx.from_base(refund_base, invoice.currency, rates.invoice)
        )
        if converted <= 0 and not lost:
            raise validation_error(
                f"amount is less than one minor unit of {invoice.currency} at the current rate", "$.amount"
            )
        covered = converted
        if lost:
            covered = max(0, min(converted, invoice.paid - invoice.refunded)) if refundable_state else 0
        step = Step(invoice, None, {"credit": 0, "net": 0, "tax": 0})
        if covered > 0:
            step = invoices.refund(invoice, covered, invoice.currency, provider)
        own_cash = chart.cash(provider, invoice.currency)
        reversed_entries = [
            e
            for e in (step.journal or {}).get("entries", [])
            if not (e["account_id"] == own_cash and e["side"] == "credit")
        ]
        check(all(e["side"] == "debit" for e in reversed_entries), "a refund reverses with debits only")
        credit_account = chart.customer_credit(invoice.buyer.buyer_id)
        debits = [
            fx.FxLine(e["account_id"], "debit", e["amount_cents"], e["currency"]) for e in reversed_entries
        ]
        debit_rates = [
            rates.credit if e["account_id"] == credit_account else rates.issue for e in reversed_entries
        ]
        released_base = sum(
            _in_base(d.amount_cents, d.currency, r) for d, r in zip(debits, debit_rates, strict=True)
        )
        covered_base = refund_base
        if covered != converted:
            covered_base = min(refund_base, _in_base(covered, invoice.currency, rates.invoice))
        excess_base = refund_base - covered_base
        excess = (
            [fx.FxLine(chart.dispute_losses(provider), "debit", excess_base, base)] if excess_base else []
        )
        cash = fx.FxLine(
            source or chart.cash(provider, request.currency), "credit", request.amount, request.currency
        )
        gain_or_loss = fx.realised_fx_lines(covered_base, released_base, base)
        completion = fx.complete_with_rates(
            [*debits, *excess, cash, *gain_or_loss],
            [*debit_rates, *(None for _ in excess), rates.refund, *(None for _ in gain_or_loss)],
            base,
        )
        journal = {
            "entries": [msgspec.to_builtins(line) for line in completion.journal_lines()],
            "memo": "invoice refund (fx)",
            "source_ref": invoice.invoice_id,
            "context": {"invoice_id": invoice.invoice_id, "flow": "invoice.refund", "fx": True},
        }
        settled: dict[str, Any] = {
            "applied_amount": covered,
            "applied_currency": invoice.currency,
            "fx": {
                "base": base,
                "refund_rate": _rate_json(rates.refund),
                "invoice_rate": _rate_json(rates.invoice),
                "issue_rate": _rate_json(rates.issue),
                "credit_rate": _rate_json(rates.credit),
                "refund_base": refund_base,
                "released_base": released_base,
                "realised_minor": released_base - covered_base,
            },
        }
        if lost:
            settled["excess_base"] = excess_base
        return msgspec.structs.replace(step, journal=journal), settled


def _clawback_answer(plan: ClawbackPlan | None) -> dict[str, Any]:
    """The `royalty_clawback` part of a refund's answer: its journal and per-participant amounts."""
    if plan is None:
        return {}
    amounts: dict[str, int] = {}
    for row in plan.rows:
        amounts[row[3]] = amounts.get(row[3], 0) + row[8]
    return {"royalty_clawback": {"journal_id": plan.journal_id, "participants": amounts}}


def _dispute_answer(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "dispute_id": row["dispute_id"],
        "invoice_id": row["invoice_id"],
        "payment_intent": row["payment_intent"],
        "amount": row["amount"],
        "currency": row["currency"],
        "reason": row["reason"],
        "status": row["status"],
        "journal_id": row["journal_id"],
    }


def _dispute_body(
    invoice_id: str, dispute_id: str, what: str, lines: list[tuple[str, str, int, str]]
) -> dict[str, Any]:
    return {
        "entries": [
            {"account_id": account, "side": side, "amount_cents": amount, "currency": currency}
            for account, side, amount, currency in lines
        ],
        "memo": f"stripe dispute {what}",
        "source_ref": invoice_id,
        "context": {"invoice_id": invoice_id, "flow": f"dispute.{what}", "dispute_id": dispute_id},
    }


def _lost_in_currency(invoice: Invoice, amount: int, source: str) -> tuple[Step, dict[str, Any]]:
    """A lost dispute in the invoice's currency: the refundable part refunded (cash side from
    `source`), the rest on `expense:dispute-losses:stripe` (see `FinanceService._dispute_lost`)."""
    stripe = finance_repo.STRIPE
    refundable = invoice.paid - invoice.refunded
    refundable_state = invoice.status in invoices.STEP_SOURCES["refund"][0]
    covered = max(0, min(amount, refundable)) if refundable_state else 0
    step = Step(invoice, None, {"credit": 0, "net": 0, "tax": 0})
    entries: list[dict[str, Any]] = []
    if covered > 0:
        step = invoices.refund(invoice, covered, invoice.currency, stripe)
        own_cash = chart.cash(stripe, invoice.currency)
        entries = [
            e
            for e in (step.journal or {}).get("entries", [])
            if not (e["account_id"] == own_cash and e["side"] == "credit")
        ]
    excess = amount - covered
    if excess:
        entries.append(
            {
                "account_id": chart.dispute_losses(stripe),
                "side": "debit",
                "amount_cents": excess,
                "currency": invoice.currency,
            }
        )
    entries.append(
        {"account_id": source, "side": "credit", "amount_cents": amount, "currency": invoice.currency}
    )
    journal = {"entries": entries, "source_ref": invoice.invoice_id}
    return msgspec.structs.replace(step, journal=journal), {
        "applied_amount": covered,
        "applied_currency": invoice.currency,
        "excess": excess,
    }


class _Moved(Exception):
    """Invoices whose row changed since the batch read it (another node)."""

    def __init__(self, invoice_ids: set[str]) -> None:
        super().__init__(sorted(invoice_ids))
        self.invoice_ids = invoice_ids


class _Posting(msgspec.Struct):
    index: int
    invoice_id: str
    money_id: str
    step: Step
    settled: dict[str, Any]
    journal: Journal | None


class _PayBatch:
    """One `FinanceService.pay_many` call (under the locks of all its payments and invoices)."""

    def __init__(
        self,
        svc: FinanceService,
        items: list[tuple[PaymentRequest, str | None]],
        targets: dict[int, tuple[str, str]],
        outcomes: list[PayOutcome],
        principal: str,
        halts: Callable[[BaseException], bool],
    ) -> None:
        self.svc = svc
        self.items = items
        self.targets = targets
        self.outcomes = outcomes
        self.principal = principal
        self.halts = halts
        self.queues: dict[str, collections.deque[int]] = {}
        self.claimants: dict[str, collections.deque[int]] = {}
        """Per payment id, the items naming it in order; the first records it, the others replay it."""
        for index, (invoice_id, money_id) in targets.items():
            self.queues.setdefault(invoice_id, collections.deque()).append(index)
            self.claimants.setdefault(money_id, collections.deque()).append(index)
        self.existing: dict[tuple[str, str], Any] = {}
        self.rows: dict[str, asyncpg.Record] = {}
        self.current: dict[str, Invoice] = {}
        self.pending: set[int] = set()
        self.values: dict[int, dict[str, Any]] = {}
        """Recorded by this call: the payment rows by item (stored at the end)."""
        self.recorded: dict[str, list[int]] = {}
        self.replays_of: dict[int, int] = {}
        self.applied: dict[int, tuple[str, int, str]] = {}

    async def run(self) -> None:
        if not self.targets:
            return
        keys = [
            (self.items[i][0].payment_provider, self.items[i][0].provider_reference) for i in self.targets
        ]
        async with self.svc.pool.acquire() as conn:
            self.existing = await finance_repo.payments_by_reference(conn, keys)
            self.rows = await finance_repo.invoice_rows(conn, list(self.queues))
        progress = True
        while progress:
            progress = False
            wave: list[_Posting] = []
            for invoice_id, queue in self.queues.items():
                before = len(queue)
                posting = await self._advance(invoice_id, queue)
                progress = progress or len(queue) != before
                if posting is not None:
                    wave.append(posting)
            if wave:
                await self._post(wave)
        await self._store(set(self.recorded))

    def _fail(self, index: int, exc: BaseException) -> None:
        self.outcomes[index] = exc
        invoice_id, money_id = self.targets[index]
        claimants = self.claimants[money_id]
        if claimants and claimants[0] == index:
            claimants.popleft()  # not recorded: the next item naming it records it
        if self.halts(exc):
            self.queues[invoice_id].clear()  # its later payments are not tried (None)

    async def _advance(self, invoice_id: str, queue: collections.deque[int]) -> _Posting | None:
        """Answer the invoice's next items until one needs a journal posted (returned) or waits."""
        while queue:
            index = queue[0]
            request, settlement_id = self.items[index]
            money_id = self.targets[index][1]
            existing = self.existing.get((request.payment_provider, request.provider_reference))
            first = self.claimants[money_id][0]
            if existing is None and first != index:
                if first not in self.values:
                    return None  # wait for the item that records this payment
                self.replays_of[index] = first
                existing = {**self.values[first], "id": money_id}
            queue.popleft()
            if existing is not None:
                try:
                    replay = _replayed("payment", existing, invoice_id, request, settlement_id)
                    _check_same_lines(replay, None)
                except LedgerError as exc:
                    self._fail(index, exc)
                    continue
                self.outcomes[index] = (replay, False)
                continue
            try:
                posting = await self._compute(index, invoice_id, money_id, request)
            except Exception as exc:  # what `pay` would raise (an FX rate read may fail too)
                self._fail(index, exc)
                continue
            if posting.journal is None:
                self._record(posting, None)
                continue
            self.pending.add(index)
            return posting
        return None

    async def _compute(self, index: int, invoice_id: str, money_id: str, request: PaymentRequest) -> _Posting:
        """`_move_money`'s step for a payment, from the invoice's state after its earlier items."""
        row = self.rows.get(invoice_id)
        if row is None:
            raise not_found(invoice_id)
        if row["kind"] != "priced":
            raise invoices.InvalidState(
                InvoiceStatus(row["status"]), InvoiceStatus.PAID, "recorded external invoice (POST /invoices)"
            )
        invoice = self.current.get(invoice_id)
        if invoice is None:
            invoice = self.current[invoice_id] = msgspec.json.decode(row["body"], type=Invoice)
        settled: dict[str, Any] = {}
        if request.currency != invoice.currency:
            step, settled = await self.svc._settle_across(invoice, row, request)
        else:
            step = invoices.record_payment(
                invoice, request.amount, request.currency, request.payment_provider
            )
        journal = None
        if step.journal is not None:
            journal = journal_of(step.journal, f"{invoice_id}.pay.{money_id}")
        return _Posting(index, invoice_id, money_id, step, settled, journal)

    async def _post(self, wave: list[_Posting]) -> None:
        """One ledger call for the round's journals; each answer records or fails its payment."""
        journals = [p.journal for p in wave if p.journal is not None]
        results: list[str | LedgerError] | list[Exception]
        try:
            results = await self.svc._post_many(journals, self.principal)
        except Exception as exc:  # the poster answers errors; anything else is retried
            results = [exc] * len(wave)
        for posting, result in zip(wave, results, strict=True):
            self.pending.discard(posting.index)
            if isinstance(result, BaseException):
                self._fail(posting.index, result)
            else:
                self._record(posting, result)

    def _record(self, posting: _Posting, journal_id: str | None) -> None:
        index, invoice_id = posting.index, posting.invoice_id
        request, settlement_id = self.items[index]
        answer = money_answer(
            "payment", posting.money_id, invoice_id, journal_id, posting.step, request, posting.settled
        )
        self.values[index] = money_values(
            posting.money_id, invoice_id, request, journal_id, settlement_id, self.principal, answer
        )
        self.outcomes[index] = (answer, True)
        self.current[invoice_id] = posting.step.invoice
        self.recorded.setdefault(invoice_id, []).append(index)
        if posting.settled:
            currency = self.rows[invoice_id]["currency"]
            self.applied[index] = (posting.money_id, posting.settled["applied_amount"], currency)

    async def _store(self, invoice_ids: set[str]) -> None:
        """The invoice updates and payment rows of `invoice_ids` in one transaction."""
        if not invoice_ids:
            return
        updates = [
            finance_repo.InvoiceSteps(
                invoice_id,
                self.rows[invoice_id]["version"],
                len(indices),
                _row_of(self.current[invoice_id]),
                [self.values[i]["journal_id"] for i in indices if self.values[i]["journal_id"]],
            )
            for invoice_id, indices in self.recorded.items()
            if invoice_id in invoice_ids
        ]
        stored = [i for invoice_id in invoice_ids for i in self.recorded[invoice_id]]
        try:
            async with self.svc.pool.acquire() as conn, conn.transaction():
                done = await finance_repo.update_invoices(conn, updates)
                if len(done) != len(updates):
                    raise _Moved(invoice_ids - done)
                await finance_repo.insert_payments(conn, [self.values[i] for i in sorted(stored)])
                for index in sorted(stored):
                    if index in self.applied:
                        await fx_repo.record_applied(conn, *self.applied[index])
        except _Moved as moved:
            for invoice_id in moved.invoice_ids:
                row, after = self.rows[invoice_id], self.current[invoice_id]
                self._fail_stored(self.recorded[invoice_id], concurrent_change(row, after))
            await self._store(invoice_ids - moved.invoice_ids)
        except Exception as exc:
            self._fail_stored(stored, exc)

    def _fail_stored(self, indices: list[int], exc: BaseException) -> None:
        """Posted but not stored: the items fail (and the in-call replays of them)."""
        failed = set(indices)
        for index in indices:
            self.outcomes[index] = exc
        for index, first in self.replays_of.items():
            if first in failed:
                self.outcomes[index] = exc
