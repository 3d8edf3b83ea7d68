"""Invoices: priced lines, totals, the lifecycle state machine, and the journals each step posts.

Pure: no I/O, no clock, no ids drawn here (the caller passes `invoice_id`, the payment provider,
and records times). Every step returns a `Step`: the new `Invoice` (a frozen struct) and the body
of the `POST /ledger/post` journal it implies (or None), built with `finance.chart`.

Money: integer minor units of the invoice currency. Per line, `net = qty * unit_price` and
`tax = round_half_even(net * rate)`; the invoice's `subtotal` is the sum of nets, its `tax` the
sum of line taxes and `total = subtotal + tax` (so the total always equals what the lines show).

Lifecycle (`LEGAL_TRANSITIONS`): draft -> issued -> paid -> fulfilled -> closed; voided from draft
or from issued while nothing is paid; refunded from paid, fulfilled or refunded (partial refunds
repeat); a partially refunded, undelivered invoice may still be fulfilled, and a refunded one
closed once nothing is left deferred. A partial payment keeps the invoice issued with an
`amount_due`; a payment beyond the total makes it paid and the excess becomes customer credit.
An illegal step raises `InvalidState` (INVALID_STATE, details {current, requested}).
"""

from __future__ import annotations

import enum
from typing import Any, Final

import msgspec

from finance import chart
from finance.money import allocate_proportional, apply_rate_bp, divide_half_even, format_rate_percent
from finance.tax import BuyerLocation, Seller, TaxEvidence, TaxRules, load_rules
from ledger.errors import ErrorCode, Rejection, validation_error
from ledger.invariants import check
from ledger.journal import JOURNAL_ID_PATTERN
from ledger.money import fits_int64, is_currency

LINE_ITEMS_MAX: Final = 100
"""At most this many line items, so every journal an invoice posts stays under 256 lines."""


class InvoiceStatus(enum.StrEnum):
    """Where an invoice is in its life."""

    DRAFT = "draft"
    ISSUED = "issued"
    PAID = "paid"
    FULFILLED = "fulfilled"
    CLOSED = "closed"
    VOIDED = "voided"
    REFUNDED = "refunded"


S = InvoiceStatus
LEGAL_TRANSITIONS: Final[frozenset[tuple[InvoiceStatus, InvoiceStatus]]] = frozenset(
    {
        (S.DRAFT, S.ISSUED),
        (S.DRAFT, S.VOIDED),
        (S.ISSUED, S.ISSUED),  # partial payment
        (S.ISSUED, S.PAID),
        (S.ISSUED, S.VOIDED),  # only while nothing is paid
        (S.PAID, S.PAID),  # further payment (customer credit), or that credit returned
        (S.PAID, S.FULFILLED),
        (S.PAID, S.REFUNDED),
        (S.FULFILLED, S.FULFILLED),  # returning overpaid customer credit only
        (S.FULFILLED, S.REFUNDED),
        (S.FULFILLED, S.CLOSED),
        (S.REFUNDED, S.REFUNDED),  # another partial refund
        (S.REFUNDED, S.FULFILLED),  # deliver what was not refunded
        (S.REFUNDED, S.CLOSED),  # once nothing is left deferred
    }
)
"""Every (current, next) status pair a step may produce; anything else raises `InvalidState`."""

STEP_SOURCES: Final[dict[str, tuple[frozenset[InvoiceStatus], InvoiceStatus]]] = {
    "issue": (frozenset({S.DRAFT}), S.ISSUED),
    "void": (frozenset({S.DRAFT, S.ISSUED}), S.VOIDED),
    "payment": (frozenset({S.ISSUED, S.PAID}), S.PAID),
    "fulfil": (frozenset({S.PAID, S.REFUNDED}), S.FULFILLED),
    "close": (frozenset({S.FULFILLED, S.REFUNDED}), S.CLOSED),
    "refund": (frozenset({S.PAID, S.FULFILLED, S.REFUNDED}), S.REFUNDED),
}
"""Per step: the statuses it may start from and the status it requests (for INVALID_STATE details).

Self-loops in `LEGAL_TRANSITIONS` belong to one step only (issued -> issued is a partial payment,
never a second issue), so each step checks its own sources first.
"""


class InvalidState(Rejection):
    """The requested step is not legal from the invoice's current status (INVALID_STATE, 409)."""

    def __init__(self, current: InvoiceStatus, requested: InvoiceStatus, reason: str | None = None) -> None:
        details: dict[str, Any] = {"current": str(current), "requested": str(requested)}
        message = f"invoice is {current}; cannot become {requested}"
        if reason is not None:
            details["reason"] = reason
            message = f"{message}: {reason}"
        super().__init__(ErrorCode.INVALID_STATE, message, details)


class LineItem(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A line as the client sends it (the seeds' names)."""

    sku: str
    qty: int
    unit_price: int
    tax_code: str


class Buyer(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The buyer: ledger id plus the location facts tax depends on."""

    buyer_id: str
    country: str
    region: str | None = None
    address: str | None = None
    vat_id: str | None = None
    ip_country: str | None = None

    def location(self) -> BuyerLocation:
        """The tax-relevant part."""
        return BuyerLocation(self.country, self.region, self.address, self.vat_id, self.ip_country)


class PricedLine(msgspec.Struct, frozen=True):
    """A line with its net, tax and the tax decision's evidence."""

    sku: str
    qty: int
    unit_price: int
    tax_code: str
    net: int
    tax: int
    rate_bp: int
    jurisdiction: str
    reverse_charge: bool
    rule_id: str
    evidence: TaxEvidence


class TaxBreakdownRow(msgspec.Struct, frozen=True):
    """Net and tax per (jurisdiction, rate, reverse charge) across the invoice's lines."""

    jurisdiction: str
    rate: str
    rate_bp: int
    reverse_charge: bool
    net: int
    tax: int


class Invoice(msgspec.Struct, frozen=True):
    """An invoice and its money state. Build with `create_invoice`; change with the step functions.

    `refunded_net` is aligned with `sku_nets` and `refunded_tax` with `jurisdiction_taxes`: what
    refunds have reversed so far, per SKU and per jurisdiction.
    """

    invoice_id: str
    buyer: Buyer
    currency: str
    lines: tuple[PricedLine, ...]
    subtotal: int
    tax: int
    total: int
    tax_breakdown: tuple[TaxBreakdownRow, ...]
    sku_nets: tuple[tuple[str, int], ...]
    jurisdiction_taxes: tuple[tuple[str, int], ...]
    reverse_charge: bool
    notes: tuple[str, ...]
    status: InvoiceStatus = InvoiceStatus.DRAFT
    paid: int = 0
    refunded_invoice: int = 0
    refunded_credit: int = 0
    refunded_net: tuple[int, ...] = ()
    refunded_tax: tuple[int, ...] = ()
    fulfilled: bool = False

    @property
    def refunded(self) -> int:
        """Everything refunded: against the invoice plus returned customer credit."""
        return self.refunded_invoice + self.refunded_credit

    @property
    def amount_due(self) -> int:
        """What the buyer still owes."""
        return max(0, self.total - self.paid)

    @property
    def customer_credit(self) -> int:
        """Overpayment still held for the buyer."""
        return max(0, self.paid - self.total) - self.refunded_credit


class Step(msgspec.Struct, frozen=True):
    """The result of one lifecycle step: the new invoice and the journal to post (or None).

    `amounts` names the money the step moved (e.g. `applied`, `credit`, `tax`, `net`).
    """

    invoice: Invoice
    journal: dict[str, Any] | None
    amounts: dict[str, int] = {}


# --- pricing ---------------------------------------------------------------------------------


def _check_item(index: int, item: LineItem) -> int:
    path = f"$.line_items[{index}]"
    chart.check_segment(item.sku, f"{path}.sku")
    if item.qty < 1 or not fits_int64(item.qty):
        raise validation_error("qty must be an integer >= 1 that fits int64", f"{path}.qty")
    if item.unit_price < 0 or not fits_int64(item.unit_price):
        raise validation_error(
            "unit_price must be an integer >= 0 (minor units) that fits int64", f"{path}.unit_price"
        )
    net = item.qty * item.unit_price
    if not fits_int64(net):
        raise validation_error("qty * unit_price exceeds 2^63-1", path)
    return net


def price_line(index: int, item: LineItem, buyer: Buyer, seller: Seller, rules: TaxRules) -> PricedLine:
    """One line's net, tax (half-even per line) and tax decision."""
    net = _check_item(index, item)
    decision = rules.decide(
        buyer.location(),
        item.tax_code,
        seller,
        field=f"$.line_items[{index}].tax_code",
        buyer_field="$.buyer",
    )
    tax = apply_rate_bp(net, decision.rate_bp)
    return PricedLine(
        item.sku,
        item.qty,
        item.unit_price,
        item.tax_code,
        net,
        tax,
        decision.rate_bp,
        decision.jurisdiction,
        decision.reverse_charge,
        decision.rule_id,
        decision.evidence,
    )


def _breakdown(lines: tuple[PricedLine, ...]) -> tuple[TaxBreakdownRow, ...]:
    rows: dict[tuple[str, int, bool], list[int]] = {}
    for line in lines:
        pair = rows.setdefault((line.jurisdiction, line.rate_bp, line.reverse_charge), [0, 0])
        pair[0] += line.net
        pair[1] += line.tax
    return tuple(
        TaxBreakdownRow(j, format_rate_percent(bp), bp, rc, net, tax)
        for (j, bp, rc), (net, tax) in rows.items()
    )


def _sum_by(pairs: list[tuple[str, int]]) -> tuple[tuple[str, int], ...]:
    sums: dict[str, int] = {}
    for key, value in pairs:
        sums[key] = sums.get(key, 0) + value
    return tuple(sums.items())


def create_invoice(
    invoice_id: str,
    buyer: Buyer,
    items: list[LineItem],
    currency: str,
    seller: Seller | None = None,
    rules: TaxRules | None = None,
) -> Invoice:
    """A draft invoice with every line priced and taxed; VALIDATION_ERROR names the bad field."""
    seller = seller or Seller()
    rules = rules or load_rules()
    if not JOURNAL_ID_PATTERN.fullmatch(invoice_id):
        raise validation_error("invoice id must be 1-200 characters of [A-Za-z0-9:._-]", "$.invoiceId")
    chart.check_segment(buyer.buyer_id, "$.buyer.buyer_id")
    if not is_currency(currency):
        raise validation_error(f"unknown currency code {currency!r} (ISO 4217)", "$.currency")
    if not 1 <= len(items) <= LINE_ITEMS_MAX:
        raise validation_error(
            f"an invoice has 1 to {LINE_ITEMS_MAX} line items, got {len(items)}", "$.line_items"
        )
    lines = tuple(price_line(i, item, buyer, seller, rules) for i, item in enumerate(items))
    subtotal = sum(line.net for line in lines)
    tax = sum(line.tax for line in lines)
    total = subtotal + tax
    if not fits_int64(total):
        raise validation_error("invoice total exceeds 2^63-1", "$.line_items")
    if total == 0:
        raise validation_error("invoice total must be positive", "$.line_items")
    sku_nets = _sum_by([(line.sku, line.net) for line in lines])
    jurisdiction_taxes = _sum_by([(line.jurisdiction, line.tax) for line in lines])
    reverse_charge = any(line.reverse_charge for line in lines)
    invoice = Invoice(
        invoice_id=invoice_id,
        buyer=buyer,
        currency=currency,
        lines=lines,
        subtotal=subtotal,
        tax=tax,
        total=total,
        tax_breakdown=_breakdown(lines),
        sku_nets=sku_nets,
        jurisdiction_taxes=jurisdiction_taxes,
        reverse_charge=reverse_charge,
        notes=(rules.reverse_charge_wording,) if reverse_charge else (),
        refunded_net=(0,) * len(sku_nets),
        refunded_tax=(0,) * len(jurisdiction_taxes),
    )
    check(invoice.total == sum(li.net + li.tax for li in lines), "invoice total differs from its lines")
    return invoice


# --- journals ----------------------------------------------------------------------------------


def _entry(account_id: str, side: str, amount: int, currency: str) -> dict[str, Any]:
    return {"account_id": account_id, "side": side, "amount_cents": amount, "currency": currency}


def _journal(invoice: Invoice, flow: str, entries: list[tuple[str, str, int]]) -> dict[str, Any] | None:
    kept = [
        _entry(account, side, amount, invoice.currency) for account, side, amount in entries if amount > 0
    ]
    if not kept:
        return None
    debits = sum(e["amount_cents"] for e in kept if e["side"] == "debit")
    credits = sum(e["amount_cents"] for e in kept if e["side"] == "credit")
    check(debits == credits, f"finance built an unbalanced {flow} journal")
    return {
        "entries": kept,
        "memo": f"invoice {flow}",
        "source_ref": invoice.invoice_id,
        "context": {"invoice_id": invoice.invoice_id, "flow": f"invoice.{flow}"},
    }


def issue_journal(invoice: Invoice) -> dict[str, Any] | None:
    """Debit AR the total; credit deferred revenue per SKU (net) and tax payable per jurisdiction."""
    entries = [(chart.receivable(invoice.buyer.buyer_id), "debit", invoice.total)]
    entries += [(chart.deferred_revenue(sku), "credit", net) for sku, net in invoice.sku_nets]
    entries += [(chart.tax_payable(j), "credit", tax) for j, tax in invoice.jurisdiction_taxes]
    return _journal(invoice, "issue", entries)


def _void_journal(invoice: Invoice) -> dict[str, Any] | None:
    entries = [(chart.deferred_revenue(sku), "debit", net) for sku, net in invoice.sku_nets]
    entries += [(chart.tax_payable(j), "debit", tax) for j, tax in invoice.jurisdiction_taxes]
    entries.append((chart.receivable(invoice.buyer.buyer_id), "credit", invoice.total))
    return _journal(invoice, "void", entries)


# --- lifecycle steps ------------------------------------------------------------------------------


def _require(invoice: Invoice, step: str) -> None:
    sources, requested = STEP_SOURCES[step]
    if invoice.status not in sources:
        raise InvalidState(invoice.status, requested)


def _move(invoice: Invoice, requested: InvoiceStatus, **changes: Any) -> Invoice:
    if (invoice.status, requested) not in LEGAL_TRANSITIONS:
        raise InvalidState(invoice.status, requested)
    return msgspec.structs.replace(invoice, status=requested, **changes)


def issue(invoice: Invoice) -> Step:
    """draft -> issued; posts the accrual (AR / deferred revenue / tax payable)."""
    _require(invoice, "issue")
    issued = _move(invoice, InvoiceStatus.ISSUED)
    return Step(issued, issue_journal(issued))


def void(invoice: Invoice) -> Step:
    """draft|issued -> voided, only while nothing is paid; an issued invoice's accrual is reversed."""
    _require(invoice, "void")
    if invoice.paid > 0:
        raise InvalidState(invoice.status, InvoiceStatus.VOIDED, "payments were received; refund instead")
    voided = _move(invoice, InvoiceStatus.VOIDED)
    journal = _void_journal(invoice) if invoice.status is InvoiceStatus.ISSUED else None
    return Step(voided, journal)


def _check_amount(amount: int, currency: str, invoice: Invoice, field: str) -> None:
    if amount <= 0 or not fits_int64(amount):
        raise validation_error("amount must be a positive integer (minor units) that fits int64", field)
    if currency != invoice.currency:
        raise validation_error(
            f"currency {currency} differs from the invoice currency {invoice.currency}", "$.currency"
        )


def record_payment(invoice: Invoice, amount: int, currency: str, provider: str) -> Step:
    """issued|paid -> issued (still due) or paid; debit cash, credit AR and, beyond the total, credit."""
    _require(invoice, "payment")
    _check_amount(amount, currency, invoice, "$.amount")
    chart.check_segment(provider, "$.payment_provider")
    paid = invoice.paid + amount
    if not fits_int64(paid):
        raise validation_error("total paid exceeds 2^63-1", "$.amount")
    target = InvoiceStatus.PAID if paid >= invoice.total else InvoiceStatus.ISSUED
    after = _move(invoice, target, paid=paid)
    applied = min(amount, invoice.amount_due)
    credit = amount - applied
    entries = [
        (chart.cash(provider, invoice.currency), "debit", amount),
        (chart.receivable(invoice.buyer.buyer_id), "credit", applied),
        (chart.customer_credit(invoice.buyer.buyer_id), "credit", credit),
    ]
    return Step(after, _journal(after, "payment", entries), {"applied": applied, "credit": credit})


def _remaining_net(invoice: Invoice) -> list[int]:
    return [net - done for (_, net), done in zip(invoice.sku_nets, invoice.refunded_net, strict=True)]


def fulfil(invoice: Invoice) -> Step:
    """paid|refunded -> fulfilled: recognise what is still deferred (deferred -> revenue per SKU)."""
    _require(invoice, "fulfil")
    if invoice.fulfilled:
        raise InvalidState(invoice.status, InvoiceStatus.FULFILLED, "already fulfilled")
    if invoice.refunded_invoice >= invoice.total:
        raise InvalidState(invoice.status, InvoiceStatus.FULFILLED, "fully refunded")
    after = _move(invoice, InvoiceStatus.FULFILLED, fulfilled=True)
    entries: list[tuple[str, str, int]] = []
    for (sku, _), remaining in zip(invoice.sku_nets, _remaining_net(invoice), strict=True):
        entries += [
            (chart.deferred_revenue(sku), "debit", remaining),
            (chart.revenue(sku), "credit", remaining),
        ]
    return Step(after, _journal(after, "fulfil", entries), {"recognised": sum(_remaining_net(invoice))})


def close(invoice: Invoice) -> Step:
    """fulfilled|refunded -> closed; a refunded invoice only once nothing is left deferred."""
    _require(invoice, "close")
    if invoice.status is InvoiceStatus.REFUNDED and not (
        invoice.fulfilled or invoice.refunded_invoice >= min(invoice.paid, invoice.total)
    ):
        raise InvalidState(invoice.status, InvoiceStatus.CLOSED, "deferred revenue remains; fulfil first")
    return Step(_move(invoice, InvoiceStatus.CLOSED), None)


def refund(invoice: Invoice, amount: int, currency: str, provider: str) -> Step:
    """paid|fulfilled|refunded -> refunded: return money, overpaid customer credit first.

    A refund that only returns customer credit leaves the status as it was.

    The part against the invoice reverses tax in proportion (cumulatively, so a full refund
    reverses exactly the tax charged) and the net per SKU in proportion to what is left: from
    deferred revenue before fulfilment, from contra revenue after. REFUND_EXCEEDS_PAID when
    `amount` exceeds what was paid and not yet refunded.
    """
    _check_amount(amount, currency, invoice, "$.amount")
    chart.check_segment(provider, "$.payment_provider")
    _require(invoice, "refund")  # the state check comes before the amount check
    refundable = invoice.paid - invoice.refunded
    if amount > refundable:
        raise Rejection(
            ErrorCode.REFUND_EXCEEDS_PAID,
            f"refund {amount} exceeds the refundable {refundable}",
            {"paid": invoice.paid, "refunded": invoice.refunded, "requested": amount},
        )
    credit_part = min(amount, invoice.customer_credit)
    invoice_part = amount - credit_part
    # returning overpaid credit only does not touch the invoice, so its status stays
    after_status = _move(invoice, InvoiceStatus.REFUNDED if invoice_part > 0 else invoice.status)
    cumulative = invoice.refunded_invoice + invoice_part
    check(cumulative <= invoice.total, "refund beyond the invoice total")
    tax_part = divide_half_even(cumulative * invoice.tax, invoice.total) - sum(invoice.refunded_tax)
    net_part = invoice_part - tax_part
    remaining_tax = [
        t - done for (_, t), done in zip(invoice.jurisdiction_taxes, invoice.refunded_tax, strict=True)
    ]
    tax_shares = allocate_proportional(tax_part, remaining_tax)
    net_shares = allocate_proportional(net_part, _remaining_net(invoice))
    after = msgspec.structs.replace(
        after_status,
        refunded_invoice=cumulative,
        refunded_credit=invoice.refunded_credit + credit_part,
        refunded_tax=tuple(a + b for a, b in zip(invoice.refunded_tax, tax_shares, strict=True)),
        refunded_net=tuple(a + b for a, b in zip(invoice.refunded_net, net_shares, strict=True)),
    )
    check(0 <= after.refunded <= after.paid, "refund state out of bounds")
    net_account = chart.refunds_contra if invoice.fulfilled else chart.deferred_revenue
    entries = [(chart.customer_credit(invoice.buyer.buyer_id), "debit", credit_part)]
    entries += [
        (net_account(sku), "debit", share)
        for (sku, _), share in zip(invoice.sku_nets, net_shares, strict=True)
    ]
    entries += [
        (chart.tax_payable(j), "debit", share)
        for (j, _), share in zip(invoice.jurisdiction_taxes, tax_shares, strict=True)
    ]
    entries.append((chart.cash(provider, invoice.currency), "credit", amount))
    amounts = {"credit": credit_part, "net": net_part, "tax": tax_part}
    return Step(after, _journal(after, "refund", entries), amounts)
