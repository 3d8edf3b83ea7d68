"""Property tests: invoice totals, half-even tax, the lifecycle state machine, balanced journals."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from finance.invoices import (
    LEGAL_TRANSITIONS,
    Buyer,
    Invoice,
    LineItem,
    LineRefund,
    Step,
    close,
    create_invoice,
    deferred_of,
    fulfil,
    issue,
    line_refunds_of,
    recognise,
    record_payment,
    refund,
    void,
)
from finance.money import allocate_proportional, apply_rate_bp
from finance.recognition import Policy
from finance.tax import Seller
from ledger.errors import ErrorCode, Rejection
from ledger.journal import JournalIn, validate_journal

BUYERS = [
    Buyer("b-de", "DE"),
    Buyer("b-fr", "FR"),
    Buyer("b-ie", "IE"),
    Buyer("b-rc", "NL", vat_id="NL123456789B01"),
    Buyer("b-gb", "GB"),
    Buyer("b-au", "AU"),
    Buyer("b-nz", "NZ"),
    Buyer("b-us", "US", region="WA"),
]
items_strategy = st.lists(
    st.builds(
        LineItem,
        sku=st.sampled_from(["sku-a", "sku-b", "sku-c", "sku-d"]),
        qty=st.integers(1, 1000),
        unit_price=st.integers(0, 10**9),
        tax_code=st.sampled_from(["standard", "digital_services", "ebook", "exempt"]),
    ),
    min_size=1,
    max_size=12,
)


def _invoice(buyer: Buyer, items: list[LineItem]) -> Invoice | None:
    try:
        return create_invoice("inv-p", buyer, items, "EUR", Seller("IE"))
    except Rejection as exc:  # only a zero total is refused for these inputs
        assert exc.details["field"] == "$.line_items"
        return None


def _check_journal(journal: dict[str, Any] | None) -> None:
    if journal is not None:
        validate_journal(msgspec.convert(journal, JournalIn))


@given(st.sampled_from(BUYERS), items_strategy)
def test_total_is_sum_of_line_nets_and_taxes(buyer: Buyer, items: list[LineItem]) -> None:
    inv = _invoice(buyer, items)
    if inv is None:
        return
    assert inv.subtotal == sum(i.qty * i.unit_price for i in items)
    assert inv.tax == sum(line.tax for line in inv.lines)
    assert inv.total == inv.subtotal + inv.tax
    assert sum(row.tax for row in inv.tax_breakdown) == inv.tax
    assert sum(row.net for row in inv.tax_breakdown) == inv.subtotal
    _check_journal(issue(inv).journal)


@given(st.integers(0, 10**15), st.integers(0, 10_000))
def test_line_tax_is_exact_half_even(net: int, rate_bp: int) -> None:
    expected = (Decimal(net) * Decimal(rate_bp) / Decimal(10_000)).quantize(
        Decimal(1), rounding=ROUND_HALF_EVEN
    )
    assert apply_rate_bp(net, rate_bp) == int(expected)


@given(st.lists(st.integers(0, 10**6), min_size=1, max_size=20), st.data())
def test_allocation_sums_and_stays_within_weights(weights: list[int], data: st.DataObject) -> None:
    amount = data.draw(st.integers(0, sum(weights)))
    shares = allocate_proportional(amount, weights)
    assert sum(shares) == amount
    assert all(0 <= s <= w for s, w in zip(shares, weights, strict=True))


action_strategy = st.lists(
    st.one_of(
        st.tuples(st.just("pay"), st.integers(1, 5000)),
        st.tuples(st.just("refund"), st.integers(1, 5000)),
        st.tuples(st.sampled_from(["issue", "fulfil", "close", "void"]), st.just(0)),
    ),
    max_size=25,
)


def _apply(inv: Invoice, action: str, amount: int) -> Any:
    if action == "pay":
        return record_payment(inv, amount, "EUR", "stripe")
    if action == "refund":
        return refund(inv, amount, "EUR", "stripe")
    return {"issue": issue, "fulfil": fulfil, "close": close, "void": void}[action](inv)


@settings(max_examples=300)
@given(st.sampled_from(BUYERS), items_strategy, action_strategy)
def test_any_sequence_keeps_money_sane_and_transitions_legal(
    buyer: Buyer, items: list[LineItem], actions: list[tuple[str, int]]
) -> None:
    small = [msgspec.structs.replace(i, unit_price=i.unit_price % 2000, qty=i.qty % 3 + 1) for i in items]
    inv = _invoice(buyer, small)
    if inv is None:
        return
    balances: dict[tuple[str, str], int] = {}
    for action, amount in actions:
        try:
            step = _apply(inv, action, amount)
        except Rejection as exc:
            assert exc.code in (ErrorCode.INVALID_STATE, ErrorCode.REFUND_EXCEEDS_PAID), exc
            continue
        assert (inv.status, step.invoice.status) in LEGAL_TRANSITIONS
        _check_journal(step.journal)
        for e in (step.journal or {}).get("entries", []):
            key = (e["account_id"], e["currency"])
            balances[key] = balances.get(key, 0) + (
                e["amount_cents"] if e["side"] == "debit" else -e["amount_cents"]
            )
        inv = step.invoice
        assert inv.paid >= 0 and 0 <= inv.refunded <= inv.paid
        assert inv.customer_credit >= 0 and inv.refunded_invoice <= inv.total
        assert sum(inv.refunded_tax) <= inv.tax and sum(inv.refunded_net) <= inv.subtotal
    # the books agree with the invoice: deferred revenue and tax payable never go negative
    for (account, _), balance in balances.items():
        if account.startswith(("liability:deferred-revenue", "liability:tax-payable")):
            assert balance <= 0, (account, balance)
        if account.startswith("asset:ar:"):
            assert balance == (inv.amount_due if inv.status.value not in ("draft", "voided") else 0)


# -- refunds by line, proportional refunds and recognition schedules, interleaved -------------------
START = datetime(2026, 1, 31, 12, 0, tzinfo=UTC)

mixed_strategy = st.lists(
    st.one_of(
        st.tuples(st.just("pay"), st.integers(1, 3000), st.just(0)),
        st.tuples(st.just("refund"), st.integers(1, 5000), st.just(0)),
        st.tuples(st.just("line_qty"), st.integers(0, 11), st.integers(1, 3)),
        st.tuples(st.just("line_amount"), st.integers(0, 11), st.integers(1, 3000)),
        st.tuples(st.just("fulfil"), st.just(0), st.integers(0, 4)),
        st.tuples(st.just("recognise"), st.integers(1, 4), st.just(0)),
        st.tuples(st.just("close"), st.just(0), st.just(0)),
    ),
    max_size=30,
)


def _mixed(inv: Invoice, action: str, a: int, b: int) -> Step:
    if action == "pay":
        return record_payment(inv, a, "EUR", "stripe")
    if action == "refund":
        return refund(inv, a, "EUR", "stripe")
    if action in ("line_qty", "line_amount"):
        line = a % len(inv.lines)
        entry = LineRefund(line, qty=b) if action == "line_qty" else LineRefund(line, amount=b)
        try:  # ask with the computed amount, as a client that read the error would
            return refund(inv, 1, "EUR", "stripe", [entry])
        except Rejection as exc:
            if "computed" not in exc.details:
                raise
            return refund(inv, exc.details["computed"], "EUR", "stripe", [entry])
    if action == "fulfil":
        policy = Policy("ratable", b, "month") if b else None
        return fulfil(inv, policy, START)
    if action == "recognise":
        return recognise(inv, a, START)
    return close(inv)


@settings(max_examples=300)
@given(st.sampled_from(BUYERS), items_strategy, mixed_strategy)
def test_payments_amount_and_line_refunds_and_schedules_keep_money_sane(
    buyer: Buyer, items: list[LineItem], actions: list[tuple[str, int, int]]
) -> None:
    """Any sequence: paid >= refunded >= 0; per line refunded <= the line's net and tax; tax reversed
    per jurisdiction <= charged; recognised + refunded-from-deferred + still deferred = net per SKU;
    the schedule's open installments sum to what is deferred; the books never go negative."""
    small = [msgspec.structs.replace(i, unit_price=i.unit_price % 2000, qty=i.qty % 3 + 1) for i in items]
    inv = _invoice(buyer, small)
    if inv is None:
        return
    issued = issue(inv)
    paid = record_payment(issued.invoice, issued.invoice.total, "EUR", "stripe")
    inv = paid.invoice
    balances: dict[str, int] = {}
    for e in (issued.journal or {})["entries"] + (paid.journal or {})["entries"]:
        sign = 1 if e["side"] == "debit" else -1
        balances[e["account_id"]] = balances.get(e["account_id"], 0) + sign * e["amount_cents"]
    for action, a, b in actions:
        try:
            step = _mixed(inv, action, a, b)
        except Rejection as exc:
            assert exc.code in (
                ErrorCode.INVALID_STATE,
                ErrorCode.REFUND_EXCEEDS_PAID,
                ErrorCode.VALIDATION_ERROR,
            ), exc
            continue
        _check_journal(step.journal)
        for e in (step.journal or {}).get("entries", []):
            sign = 1 if e["side"] == "debit" else -1
            balances[e["account_id"]] = balances.get(e["account_id"], 0) + sign * e["amount_cents"]
        inv = step.invoice
        assert 0 <= inv.refunded <= inv.paid
        line_net, line_tax = line_refunds_of(inv)
        for li, n, t in zip(inv.lines, line_net, line_tax, strict=True):
            assert 0 <= n <= li.net and 0 <= t <= li.tax
        for (j, charged), reversed_tax in zip(inv.jurisdiction_taxes, inv.refunded_tax, strict=True):
            assert 0 <= reversed_tax <= charged
            assert reversed_tax == sum(
                t for li, t in zip(inv.lines, line_tax, strict=True) if li.jurisdiction == j
            )
        deferred = deferred_of(inv)
        for index, ((sku, net), done) in enumerate(zip(inv.sku_nets, inv.refunded_net, strict=True)):
            assert 0 <= deferred[index] <= net - done
            assert -balances.get(f"liability:deferred-revenue:{sku}", 0) == deferred[index]
            if inv.schedule is not None:
                assert inv.schedule.remaining(index) == deferred[index]
            revenue = -balances.get(f"revenue:sales:{sku}", 0)
            contra = balances.get(f"revenue:refunds:{sku}", 0)
            assert 0 <= contra <= revenue <= net
        for (j, charged), reversed_tax in zip(inv.jurisdiction_taxes, inv.refunded_tax, strict=True):
            assert -balances.get(f"liability:tax-payable:{j}", 0) == charged - reversed_tax
