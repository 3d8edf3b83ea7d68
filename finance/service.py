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
import contextlib
import hashlib
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any, Final, Protocol

import asyncpg
import msgspec

from finance import chart, fx, invoices
from finance.invoices import Buyer, Invoice, InvoiceStatus, LineItem, Step
from finance.stripe_events import (
    Action,
    DisputeOpened,
    Event,
    Ignored,
    InboxState,
    Outcome,
    PaymentSucceeded,
    Refunded,
    WebhookInbox,
)
from finance.stripe_gateway import PermanentProviderError, StripeGateway, TransientProviderError
from finance.tax import Seller, TaxRules, load_rules
from ledger.errors import ErrorCode, LedgerError, Rejection, validation_error
from ledger.invariants import check
from ledger.journal import JOURNAL_ID_PATTERN, Journal, JournalIn, validate_journal
from ledger.money import fits_int64, is_currency
from ledger.timestamps import rfc3339
from signer.canonical import canonical
from store import finance_repo, fx_repo, repository
from store.finance_repo import InvoiceRow

REFERENCE_MAX: Final = 200
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
}


def _stripe_key(action: Refunded | DisputeOpened) -> str:
    return action.refund_id if isinstance(action, Refunded) else action.dispute_id


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


STEP_JOURNALS: Final[dict[str, tuple[Callable[[Invoice], Step], str]]] = {
    "issue": (invoices.issue, "issue"),
    "void": (invoices.void, "void"),
    "fulfil": (invoices.fulfil, "fulfil"),
    "close": (invoices.close, "close"),
}
"""Step name -> (pure step, journal id suffix)."""


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

    # -- reading ---------------------------------------------------------------------------------
    async def view(self, invoice_id: str) -> dict[str, Any]:
        """The invoice's view; 404 NOT_FOUND."""
        async with self.pool.acquire() as conn:
            row = await finance_repo.invoice_row(conn, invoice_id)
            if row is None:
                raise not_found(invoice_id)
            payments = await finance_repo.money_ids(conn, "payment", invoice_id)
            refunds = await finance_repo.money_ids(conn, "refund", invoice_id)
        return {**invoice_view(row, payments), "refunds": refunds}

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
        raw = msgspec.convert({**body, "journal_id": journal_id}, JournalIn)
        journal = validate_journal(raw)
        (posted,) = await self.poster.post_journals([journal], principal)
        if not posted.ok:
            code = ErrorCode(posted.code or ErrorCode.INTERNAL_ERROR)
            raise LedgerError(code, posted.message or str(code), dict(posted.details or {}))
        return posted.journal_id

    async def _store(
        self, conn: asyncpg.Connection, row: asyncpg.Record, after: Invoice, journal_id: str | None
    ) -> None:
        ok = await finance_repo.update_invoice(
            conn, row["invoice_id"], row["version"], _row_of(after), journal_id
        )
        if not ok:
            raise Rejection(
                ErrorCode.INVALID_STATE,
                "the invoice changed concurrently; read it and retry",
                {
                    "current": row["status"],
                    "requested": str(after.status),
                    "reason": "concurrent change",
                    "version": row["version"],
                },
            )

    # -- steps -----------------------------------------------------------------------------------
    async def step(self, invoice_id: str, name: str, principal: str) -> tuple[dict[str, Any], str | None]:
        """Apply `issue`, `void`, `fulfil` or `close`; (the invoice's view, the posted journal id)."""
        function, suffix = STEP_JOURNALS[name]
        async with self._locked(f"invoice:{invoice_id}"):
            invoice, row = await self._load(invoice_id, invoices.STEP_SOURCES[name][1])
            step = function(invoice)
            journal_id = None
            if step.journal is not None:
                body = step.journal
                if name == "issue":
                    body = {**body, "context": {**body["context"], "invoice_hash": row["document_hash"]}}
                journal_id = await self._post(body, f"{invoice_id}.{suffix}", principal)
            async with self.pool.acquire() as conn:
                await self._store(conn, row, step.invoice, journal_id)
        return await self.view(invoice_id), journal_id

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

    async def refund(self, request: PaymentRequest, principal: str) -> tuple[dict[str, Any], bool]:
        """Return money: customer credit first, then the invoice (tax and net in proportion).

        Same shape and idempotency as `pay` (the refund's provider reference names it).
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

        The refund of the invoice's (first) Stripe payment intent is created with the idempotency
        key `{invoice_id}.refund.{id of the request's reference}`, so a retry of the same request
        names the same Stripe refund. The row is stored with provider reference = the Stripe refund
        id (the key a later `charge.refunded` webhook applies), so the webhook replays it instead of
        posting again; the answer carries `provider_refund_id` and `request_reference`.
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
                paid = await conn.fetchrow(
                    "SELECT provider_reference, currency FROM payments WHERE invoice_id = $1"
                    " AND provider = $2 ORDER BY created_at, payment_id LIMIT 1",
                    invoice_id,
                    finance_repo.STRIPE,
                )
            if existing is not None:
                return _replayed("refund", existing, invoice_id, request, None), False
            if paid is None:
                raise Rejection(
                    ErrorCode.INVALID_STATE,
                    "invoice has no Stripe payment to refund",
                    {"invoice_id": invoice_id, "provider": finance_repo.STRIPE},
                )
            if paid["currency"] != request.currency:
                raise validation_error(
                    "refund currency differs from the Stripe payment's",
                    "$.currency",
                    payment_currency=paid["currency"],
                )
            invoice, _ = await self._load(invoice_id, InvoiceStatus.REFUNDED)
            invoices.refund(
                invoice, request.amount, request.currency, finance_repo.STRIPE
            )  # refusals before Stripe
            try:
                result = await gateway.refund(
                    payment_intent=paid["provider_reference"],
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
            recorded = PaymentRequest(
                amount=request.amount,
                currency=request.currency,
                payment_provider=finance_repo.STRIPE,
                provider_reference=result.refund_id,
                invoice_id=invoice_id,
            )
            extra = {"provider_refund_id": result.refund_id, "request_reference": reference}
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
            if existing is not None:
                return _replayed(kind, existing, invoice_id, request, settlement_id), False
            requested = InvoiceStatus.PAID if kind == "payment" else InvoiceStatus.REFUNDED
            invoice, row = await self._load(invoice_id, requested)
            settled: dict[str, Any] = {}
            if kind == "payment" and request.currency != invoice.currency:
                step, settled = await self._settle_across(invoice, row, request)
            elif kind == "payment":
                step = invoices.record_payment(
                    invoice, request.amount, request.currency, request.payment_provider
                )
            else:
                step = invoices.refund(invoice, request.amount, request.currency, request.payment_provider)
            journal_id = None
            if step.journal is not None:
                suffix = "pay" if kind == "payment" else "refund"
                journal_id = await self._post(step.journal, f"{invoice_id}.{suffix}.{money_id}", principal)
            answer = {
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
                **(extra or {}),
            }
            values = {
                "id": money_id,
                "invoice_id": invoice_id,
                "provider": request.payment_provider,
                "provider_reference": reference,
                "amount": request.amount,
                "currency": request.currency,
                "journal_id": journal_id or "",
                "settlement_id": settlement_id,
                "principal": principal,
                "answer": msgspec.json.encode(answer).decode(),
            }
            async with self.pool.acquire() as conn, conn.transaction():
                await self._store(conn, row, step.invoice, journal_id)
                await finance_repo.insert_money(conn, kind, values)
                if settled:
                    await fx_repo.record_applied(conn, money_id, settled["applied_amount"], invoice.currency)
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
        loaded = [msgspec.json.decode(text, type=Refunded | DisputeOpened) for text in stored]
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
            answer, posted = await self._move_money("refund", request, principal, None)
            return StripeApplied(action, answer, posted)
        values = {
            "dispute_id": action.dispute_id,
            "payment_intent": action.payment_intent,
            "event_id": action.event_id,
            "amount": action.amount,
            "currency": action.currency,
            "reason": action.reason,
        }
        async with self.pool.acquire() as conn:
            await finance_repo.insert_stripe_dispute(conn, values)
        return StripeApplied(action, {**values, "invoice_id": invoice_id}, True)
