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
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Final

import msgspec

from finance import chart, recognition, royalties
from finance.money import allocate_proportional, apply_rate_bp, divide_half_even, format_rate_percent
from finance.recognition import Policy, Schedule
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


class LineItem(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """A line as the client sends it (the seeds' names); `contract` (optional) names the royalty
    contract whose rule applies to the line's SKU instead of the SKU's rule (finance/royalties.py)."""

    sku: str
    qty: int
    unit_price: int
    tax_code: str
    contract: str | None = None


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


class PricedLine(msgspec.Struct, frozen=True, omit_defaults=True):
    """A line with its net, tax and the tax decision's evidence (and its royalty `contract`, if any)."""

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
    contract: str | None = None


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
    refunds have reversed so far, per SKU and per jurisdiction; `line_refunded_net` and
    `line_refunded_tax` are aligned with `lines` (the same figures per line). `deferred_net`
    (aligned with `sku_nets`) is what is still on deferred revenue once issued; `schedule` is
    the recognition schedule of a ratable fulfilment. Invoices stored before these fields existed
    decode with empty tuples, and `deferred_of` / `line_refunds_of` derive them.
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
    deferred_net: tuple[int, ...] = ()
    line_refunded_net: tuple[int, ...] = ()
    line_refunded_tax: tuple[int, ...] = ()
    refunded_by_lines: int = 0
    schedule: Schedule | None = None

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


class LineShare(msgspec.Struct, frozen=True):
    """What a refund reversed on one invoice line: net and that line's own tax."""

    line: int
    sku: str
    jurisdiction: str
    rate_bp: int
    net: int
    tax: int


class LineRefund(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One entry of a refund's `lines`: the line's index in `line_items` and exactly one of `qty`
    (units: net `qty * unit_price`) or `amount` (gross minor units, net plus the line's tax)."""

    line: int
    qty: int | None = None
    amount: int | None = None


class Step(msgspec.Struct, frozen=True):
    """The result of one lifecycle step: the new invoice and the journal to post (or None).

    `amounts` names the money the step moved (e.g. `applied`, `credit`, `tax`, `net`);
    `lines` what a refund reversed per invoice line; `split` where a refund's net came from.
    """

    invoice: Invoice
    journal: dict[str, Any] | None
    amounts: dict[str, int] = {}
    lines: tuple[LineShare, ...] = ()
    split: dict[str, int] = {}


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
        item.contract,
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
    royalties.check_contracts([(item.sku, item.contract) for item in items])
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
        deferred_net=tuple(net for _, net in sku_nets),
        line_refunded_net=(0,) * len(lines),
        line_refunded_tax=(0,) * len(lines),
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


# --- derived money state ------------------------------------------------------------------------


def _remaining_net(invoice: Invoice) -> list[int]:
    return [net - done for (_, net), done in zip(invoice.sku_nets, invoice.refunded_net, strict=True)]


def deferred_of(invoice: Invoice) -> list[int]:
    """What is still on deferred revenue per SKU (aligned with `sku_nets`).

    Invoices stored before `deferred_net` existed: nothing after an on-delivery fulfilment,
    everything not refunded before it.
    """
    if len(invoice.deferred_net) == len(invoice.sku_nets):
        return list(invoice.deferred_net)
    return [0] * len(invoice.sku_nets) if invoice.fulfilled else _remaining_net(invoice)


def _spread(totals: list[int], groups: list[list[int]], weights: list[int], size: int) -> list[int]:
    """Each group's total over its members in proportion to `weights` (largest remainder)."""
    out = [0] * size
    for total, members in zip(totals, groups, strict=True):
        if total:
            for index, share in zip(
                members, allocate_proportional(total, [weights[i] for i in members]), strict=True
            ):
                out[index] = share
    return out


def _sku_groups(invoice: Invoice) -> list[list[int]]:
    return [[i for i, line in enumerate(invoice.lines) if line.sku == sku] for sku, _ in invoice.sku_nets]


def _jurisdiction_groups(invoice: Invoice) -> list[list[int]]:
    return [
        [i for i, line in enumerate(invoice.lines) if line.jurisdiction == j]
        for j, _ in invoice.jurisdiction_taxes
    ]


def line_refunds_of(invoice: Invoice) -> tuple[list[int], list[int]]:
    """(net, tax) refunded so far per line; for invoices stored before per-line tracking, the
    per-SKU and per-jurisdiction figures spread over their lines by line net and line tax."""
    size = len(invoice.lines)
    if len(invoice.line_refunded_net) == size and len(invoice.line_refunded_tax) == size:
        return list(invoice.line_refunded_net), list(invoice.line_refunded_tax)
    nets = _spread(list(invoice.refunded_net), _sku_groups(invoice), [li.net for li in invoice.lines], size)
    taxes = _spread(
        list(invoice.refunded_tax), _jurisdiction_groups(invoice), [li.tax for li in invoice.lines], size
    )
    return nets, taxes


# --- fulfilment and recognition -------------------------------------------------------------------


def fulfil(invoice: Invoice, policy: Policy | None = None, start: datetime | None = None) -> Step:
    """paid|refunded -> fulfilled. Without a policy: recognise what is still deferred (deferred ->
    revenue per SKU). With a ratable policy: post nothing now and attach a schedule from `start`
    of what is still deferred (installments posted by `recognise`)."""
    _require(invoice, "fulfil")
    if invoice.fulfilled:
        raise InvalidState(invoice.status, InvoiceStatus.FULFILLED, "already fulfilled")
    if invoice.refunded_invoice >= invoice.total:
        raise InvalidState(invoice.status, InvoiceStatus.FULFILLED, "fully refunded")
    deferred = deferred_of(invoice)
    if policy is not None:
        check(start is not None, "a ratable fulfilment needs its start time")
        assert start is not None  # for mypy; checked just above
        schedule = recognition.build(
            policy, start, [(sku, d) for (sku, _), d in zip(invoice.sku_nets, deferred, strict=True)]
        )
        after = _move(
            invoice, InvoiceStatus.FULFILLED, fulfilled=True, deferred_net=tuple(deferred), schedule=schedule
        )
        return Step(after, None, {"recognised": 0, "scheduled": sum(deferred)})
    after = _move(invoice, InvoiceStatus.FULFILLED, fulfilled=True, deferred_net=(0,) * len(invoice.sku_nets))
    entries: list[tuple[str, str, int]] = []
    for (sku, _), remaining in zip(invoice.sku_nets, deferred, strict=True):
        entries += [
            (chart.deferred_revenue(sku), "debit", remaining),
            (chart.revenue(sku), "credit", remaining),
        ]
    return Step(after, _journal(after, "fulfil", entries), {"recognised": sum(deferred)})


def recognise(invoice: Invoice, k: int, posted_at: datetime) -> Step:
    """Post installment `k` of the schedule: deferred -> revenue per SKU by its (current) amounts.

    The status does not change. An installment shrunk to nothing is marked posted without a
    journal. INVALID_STATE when there is no schedule or `k` is unknown or already posted.
    """
    schedule = invoice.schedule
    if schedule is None or not 1 <= k <= len(schedule.installments):
        raise InvalidState(invoice.status, invoice.status, f"no recognition installment {k}")
    installment = schedule.installments[k - 1]
    if installment.posted:
        raise InvalidState(invoice.status, invoice.status, f"installment {k} already posted")
    deferred = deferred_of(invoice)
    entries: list[tuple[str, str, int]] = []
    for sku, amount in zip(schedule.skus, installment.amounts, strict=True):
        entries += [(chart.deferred_revenue(sku), "debit", amount), (chart.revenue(sku), "credit", amount)]
    journal = _journal(invoice, "recognise", entries)
    if journal is not None:
        journal["context"]["installment"] = k
    posted_id = recognition.journal_id(invoice.invoice_id, k) if journal is not None else None
    after = msgspec.structs.replace(
        invoice,
        deferred_net=tuple(d - a for d, a in zip(deferred, installment.amounts, strict=True)),
        schedule=recognition.mark_posted(schedule, k, posted_id, posted_at),
    )
    check(all(d >= 0 for d in after.deferred_net), "recognised more than was deferred")
    return Step(after, journal, {"recognised": installment.amount})


def _schedule_open(invoice: Invoice) -> bool:
    schedule = invoice.schedule
    return schedule is not None and any(i.amount > 0 for i in schedule.installments if not i.posted)


def close(invoice: Invoice) -> Step:
    """fulfilled|refunded -> closed; a refunded invoice only once nothing is left deferred, and
    never while a recognition schedule still has amounts to post."""
    _require(invoice, "close")
    if invoice.status is InvoiceStatus.REFUNDED and not (
        invoice.fulfilled or invoice.refunded_invoice >= min(invoice.paid, invoice.total)
    ):
        raise InvalidState(invoice.status, InvoiceStatus.CLOSED, "deferred revenue remains; fulfil first")
    if _schedule_open(invoice):
        raise InvalidState(invoice.status, InvoiceStatus.CLOSED, "recognition schedule still running")
    return Step(_move(invoice, InvoiceStatus.CLOSED), None)


# --- refunds --------------------------------------------------------------------------------------


def _exceeds(message: str, details: dict[str, Any]) -> Rejection:
    return Rejection(ErrorCode.REFUND_EXCEEDS_PAID, message, details)


def _proportional_shares(invoice: Invoice, invoice_part: int) -> tuple[list[int], list[int]]:
    """(net, tax) per line of a refund of `invoice_part` taken in proportion to what remains.

    Tax: while no line refund happened, the cumulative share of the invoice's tax
    (`round_half_even(refunded * tax / total)` minus what was reversed); afterwards the share of
    what remains (`remaining_tax - round_half_even((remaining - part) * remaining_tax / remaining)`).
    Both reverse exactly the tax left when everything left is refunded. Tax goes to jurisdictions
    by their remaining tax, then to their lines by remaining line tax; net to SKUs by remaining
    net, then to their lines by remaining line net (largest remainder at each step).
    """
    line_net, line_tax = line_refunds_of(invoice)
    rem_net = [li.net - done for li, done in zip(invoice.lines, line_net, strict=True)]
    rem_tax = [li.tax - done for li, done in zip(invoice.lines, line_tax, strict=True)]
    remaining = sum(rem_net) + sum(rem_tax)
    check(0 <= invoice_part <= remaining, "refund beyond what remains on the invoice")
    if invoice.refunded_by_lines == 0:
        cumulative = invoice.refunded_invoice + invoice_part
        tax_part = divide_half_even(cumulative * invoice.tax, invoice.total) - sum(invoice.refunded_tax)
    else:
        kept = divide_half_even((remaining - invoice_part) * sum(rem_tax), remaining) if remaining else 0
        tax_part = sum(rem_tax) - kept
    net_part = invoice_part - tax_part
    sku_groups, jurisdiction_groups = _sku_groups(invoice), _jurisdiction_groups(invoice)
    sku_remaining = [sum(rem_net[i] for i in group) for group in sku_groups]
    jurisdiction_remaining = [sum(rem_tax[i] for i in group) for group in jurisdiction_groups]
    size = len(invoice.lines)
    nets = _spread(allocate_proportional(net_part, sku_remaining), sku_groups, rem_net, size)
    taxes = _spread(
        allocate_proportional(tax_part, jurisdiction_remaining), jurisdiction_groups, rem_tax, size
    )
    return nets, taxes


def _check_line_requests(invoice: Invoice, lines: Sequence[LineRefund]) -> None:
    if not 1 <= len(lines) <= LINE_ITEMS_MAX:
        raise validation_error(f"lines must hold 1 to {LINE_ITEMS_MAX} entries", "$.lines")
    seen: set[int] = set()
    for n, entry in enumerate(lines):
        path = f"$.lines[{n}]"
        if not 0 <= entry.line < len(invoice.lines):
            raise validation_error(
                f"line must be an index into line_items (0 to {len(invoice.lines) - 1})", f"{path}.line"
            )
        if entry.line in seen:
            raise validation_error(f"line {entry.line} appears twice", f"{path}.line")
        seen.add(entry.line)
        if (entry.qty is None) == (entry.amount is None):
            raise validation_error("give exactly one of qty or amount", path)
        value, name = (entry.qty, "qty") if entry.qty is not None else (entry.amount, "amount")
        if value is None or value < 1 or not fits_int64(value):
            raise validation_error(f"{name} must be a positive integer that fits int64", f"{path}.{name}")
        if entry.qty is not None and not fits_int64(entry.qty * invoice.lines[entry.line].unit_price):
            raise validation_error("qty * unit_price exceeds 2^63-1", f"{path}.qty")


def _line_shares(invoice: Invoice, lines: Sequence[LineRefund]) -> tuple[list[int], list[int]]:
    """(net, tax) per line of a refund by lines: each line's own net and its own tax.

    `qty`: net `qty * unit_price`, tax `round_half_even(net * remaining_tax / remaining_net)`;
    `amount` (gross): tax `round_half_even(amount * remaining_tax / remaining_gross)`, net the
    rest; all that remains on the line -> exactly its remaining net and tax. More than remains ->
    REFUND_EXCEEDS_PAID naming the line.
    """
    line_net, line_tax = line_refunds_of(invoice)
    nets, taxes = [0] * len(invoice.lines), [0] * len(invoice.lines)
    for entry in lines:
        li = invoice.lines[entry.line]
        rem_net, rem_tax = li.net - line_net[entry.line], li.tax - line_tax[entry.line]
        if entry.qty is not None:
            net = entry.qty * li.unit_price
            requested, remaining = net, rem_net
            tax = rem_tax if net == rem_net else divide_half_even(net * rem_tax, rem_net) if rem_net else 0
        else:
            assert entry.amount is not None  # for mypy; _check_line_requests ensures one of them
            requested, remaining = entry.amount, rem_net + rem_tax
            tax = divide_half_even(entry.amount * rem_tax, remaining) if remaining else 0
            net = entry.amount - tax
        if requested > remaining:
            raise _exceeds(
                f"refund of line {entry.line} exceeds what remains on it",
                {"line": entry.line, "sku": li.sku, "remaining": remaining, "requested": requested},
            )
        if net + tax == 0:
            raise validation_error(f"line {entry.line} has nothing to refund", "$.lines")
        check(0 <= net <= rem_net and 0 <= tax <= rem_tax, "line refund out of the line's bounds")
        nets[entry.line], taxes[entry.line] = net, tax
    return nets, taxes


def refund(
    invoice: Invoice,
    amount: int,
    currency: str,
    provider: str,
    lines: Sequence[LineRefund] | None = None,
) -> Step:
    """paid|fulfilled|refunded -> refunded: return money.

    Without `lines`: overpaid customer credit first (a refund that only returns credit leaves the
    status as it was), the rest against the invoice in proportion (`_proportional_shares`). With
    `lines`: each line's own net and tax (`_line_shares`); `amount` must equal their sum
    (VALIDATION_ERROR with `computed`). Net per SKU comes from what is still deferred first (a
    running schedule's unposted installments shrink), the rest from contra revenue
    `revenue:refunds:{sku}`. REFUND_EXCEEDS_PAID beyond what was paid and not refunded.
    """
    _check_amount(amount, currency, invoice, "$.amount")
    chart.check_segment(provider, "$.payment_provider")
    if lines is not None:
        _check_line_requests(invoice, lines)
    _require(invoice, "refund")  # the state check comes before the amount check
    refundable = invoice.paid - invoice.refunded
    by_lines: tuple[list[int], list[int]] | None = None
    if lines is not None:
        by_lines = _line_shares(invoice, lines)
        computed = sum(by_lines[0]) + sum(by_lines[1])
        if amount != computed:
            raise validation_error(
                f"amount {amount} differs from the lines' refund {computed}",
                "$.amount",
                computed=computed,
                sent=amount,
            )
    if amount > refundable:
        raise _exceeds(
            f"refund {amount} exceeds the refundable {refundable}",
            {"paid": invoice.paid, "refunded": invoice.refunded, "requested": amount},
        )
    credit_part = 0 if lines is not None else min(amount, invoice.customer_credit)
    invoice_part = amount - credit_part
    nets, taxes = by_lines if by_lines is not None else _proportional_shares(invoice, invoice_part)
    return _apply_refund(invoice, amount, provider, credit_part, nets, taxes, lines is not None)


def _apply_refund(
    invoice: Invoice,
    amount: int,
    provider: str,
    credit_part: int,
    nets: list[int],
    taxes: list[int],
    by_lines: bool,
) -> Step:
    """The refund's new state and journal from its per-line (net, tax) shares."""
    invoice_part = amount - credit_part
    check(sum(nets) + sum(taxes) == invoice_part, "refund shares do not add up")
    # returning overpaid credit only does not touch the invoice, so its status stays
    after_status = _move(invoice, InvoiceStatus.REFUNDED if invoice_part > 0 else invoice.status)
    sku_shares = [sum(nets[i] for i in group) for group in _sku_groups(invoice)]
    tax_shares = [sum(taxes[i] for i in group) for group in _jurisdiction_groups(invoice)]
    deferred = deferred_of(invoice)
    from_deferred = [min(share, d) for share, d in zip(sku_shares, deferred, strict=True)]
    from_contra = [share - d for share, d in zip(sku_shares, from_deferred, strict=True)]
    new_deferred = [d - f for d, f in zip(deferred, from_deferred, strict=True)]
    schedule = invoice.schedule
    if schedule is not None:
        for index, taken in enumerate(from_deferred):
            if taken:
                schedule = recognition.shrink(schedule, index, new_deferred[index])
    line_net, line_tax = line_refunds_of(invoice)
    after = msgspec.structs.replace(
        after_status,
        refunded_invoice=invoice.refunded_invoice + invoice_part,
        refunded_credit=invoice.refunded_credit + credit_part,
        refunded_tax=tuple(a + b for a, b in zip(invoice.refunded_tax, tax_shares, strict=True)),
        refunded_net=tuple(a + b for a, b in zip(invoice.refunded_net, sku_shares, strict=True)),
        line_refunded_net=tuple(a + b for a, b in zip(line_net, nets, strict=True)),
        line_refunded_tax=tuple(a + b for a, b in zip(line_tax, taxes, strict=True)),
        refunded_by_lines=invoice.refunded_by_lines + (invoice_part if by_lines else 0),
        deferred_net=tuple(new_deferred),
        schedule=schedule,
    )
    check(0 <= after.refunded <= after.paid, "refund state out of bounds")
    check(after.refunded_invoice <= invoice.total, "refund beyond the invoice total")
    check(
        all(0 <= n <= li.net for n, li in zip(after.line_refunded_net, invoice.lines, strict=True))
        and all(0 <= t <= li.tax for t, li in zip(after.line_refunded_tax, invoice.lines, strict=True)),
        "line refunds out of bounds",
    )
    buyer = invoice.buyer.buyer_id
    entries = [(chart.customer_credit(buyer), "debit", credit_part)]
    entries += [
        (chart.deferred_revenue(sku), "debit", share)
        for (sku, _), share in zip(invoice.sku_nets, from_deferred, strict=True)
    ]
    entries += [
        (chart.refunds_contra(sku), "debit", share)
        for (sku, _), share in zip(invoice.sku_nets, from_contra, strict=True)
    ]
    entries += [
        (chart.tax_payable(j), "debit", share)
        for (j, _), share in zip(invoice.jurisdiction_taxes, tax_shares, strict=True)
    ]
    entries.append((chart.cash(provider, invoice.currency), "credit", amount))
    amounts = {"credit": credit_part, "net": sum(nets), "tax": sum(taxes)}
    split = {"net_from_deferred": sum(from_deferred), "net_from_contra": sum(from_contra)}
    shares = tuple(
        LineShare(i, li.sku, li.jurisdiction, li.rate_bp, n, t)
        for i, (li, n, t) in enumerate(zip(invoice.lines, nets, taxes, strict=True))
        if n or t
    )
    return Step(after, _journal(after, "refund", entries), amounts, shares, split)
