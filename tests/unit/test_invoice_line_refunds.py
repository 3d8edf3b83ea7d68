"""Refunds by line (each line's own net and tax) and refunds against a running recognition schedule."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from finance import invoices
from finance.invoices import Buyer, Invoice, LineItem, LineRefund
from finance.recognition import Policy
from finance.tax import Seller
from ledger.errors import ErrorCode, Rejection

START = datetime(2026, 3, 1, tzinfo=UTC)


def _paid(items: list[LineItem]) -> Invoice:
    draft = invoices.create_invoice("inv-lr", Buyer("b-de", "DE"), items, "EUR", Seller("IE"))
    issued = invoices.issue(draft).invoice
    return invoices.record_payment(issued, issued.total, "EUR", "stripe").invoice


def _lines(journal: dict[str, object] | None) -> set[tuple[str, str, int]]:
    assert journal is not None
    entries = journal["entries"]
    assert isinstance(entries, list)
    return {(e["account_id"], e["side"], e["amount_cents"]) for e in entries}


TWO_RATES = [
    LineItem("lr-a", 3, 1000, "standard"),  # DE 19 %: net 3000, tax 570
    LineItem("lr-b", 1, 999, "ebook"),  # DE 7 %: net 999, tax 70
]


def test_a_line_refund_reverses_that_lines_net_and_its_own_tax() -> None:
    inv = _paid(TWO_RATES)
    with pytest.raises(Rejection) as wrong:
        invoices.refund(inv, 1000, "EUR", "stripe", [LineRefund(0, qty=1)])
    assert wrong.value.code is ErrorCode.VALIDATION_ERROR
    assert (wrong.value.details["field"], wrong.value.details["computed"]) == ("$.amount", 1190)
    step = invoices.refund(inv, 1190, "EUR", "stripe", [LineRefund(0, qty=1)])
    assert _lines(step.journal) == {
        ("liability:deferred-revenue:lr-a", "debit", 1000),
        ("liability:tax-payable:DE", "debit", 190),
        ("asset:cash:stripe:EUR", "credit", 1190),
    }
    assert [(s.line, s.net, s.tax, s.rate_bp) for s in step.lines] == [(0, 1000, 190, 1900)]
    inv = step.invoice
    assert (inv.line_refunded_net, inv.line_refunded_tax) == ((1000, 0), (190, 0))
    # more than remains on the line -> 409 naming it; the whole of line 1 by gross amount
    with pytest.raises(Rejection) as over:
        invoices.refund(inv, 2380 + 1190, "EUR", "stripe", [LineRefund(0, qty=3)])
    assert over.value.code is ErrorCode.REFUND_EXCEEDS_PAID
    assert (over.value.details["line"], over.value.details["remaining"]) == (0, 2000)
    step = invoices.refund(inv, 1069, "EUR", "stripe", [LineRefund(1, amount=1069)])
    assert (step.amounts["net"], step.amounts["tax"]) == (999, 70)
    inv = step.invoice
    # a proportional refund takes from what remains per line: only line 0 is left
    step = invoices.refund(inv, 2380, "EUR", "stripe")
    assert (step.amounts["net"], step.amounts["tax"]) == (2000, 380)
    inv = step.invoice
    assert (inv.line_refunded_net, inv.line_refunded_tax) == ((3000, 999), (570, 70))
    assert inv.refunded == inv.paid == inv.total


@pytest.mark.parametrize(
    ("lines", "field"),
    [
        ([LineRefund(2, qty=1)], "$.lines[0].line"),
        ([LineRefund(0, qty=1), LineRefund(0, amount=5)], "$.lines[1].line"),
        ([LineRefund(0)], "$.lines[0]"),
        ([LineRefund(0, qty=1, amount=5)], "$.lines[0]"),
        ([LineRefund(0, qty=0)], "$.lines[0].qty"),
        ([LineRefund(0, amount=-1)], "$.lines[0].amount"),
        ([], "$.lines"),
    ],
)
def test_malformed_line_requests_name_the_field(lines: list[LineRefund], field: str) -> None:
    with pytest.raises(Rejection) as caught:
        invoices.refund(_paid(TWO_RATES), 100, "EUR", "stripe", lines)
    assert caught.value.code is ErrorCode.VALIDATION_ERROR
    assert caught.value.details["field"] == field


def test_a_refund_takes_from_deferred_first_and_shrinks_the_schedule() -> None:
    inv = _paid([LineItem("lr-s", 3, 1000, "standard")])  # net 3000, tax 570
    step = invoices.fulfil(inv, Policy("ratable", 3, "month"), START)
    assert step.journal is None and step.invoice.status is invoices.InvoiceStatus.FULFILLED
    inv = step.invoice
    assert inv.schedule is not None
    assert [i.amount for i in inv.schedule.installments] == [1000, 1000, 1000]
    step = invoices.recognise(inv, 1, START)
    assert _lines(step.journal) == {
        ("liability:deferred-revenue:lr-s", "debit", 1000),
        ("revenue:sales:lr-s", "credit", 1000),
    }
    inv = step.invoice
    with pytest.raises(invoices.InvalidState):
        invoices.recognise(inv, 1, START)
    # one unit: its net comes out of what is still deferred; the open installments shrink
    step = invoices.refund(inv, 1190, "EUR", "stripe", [LineRefund(0, qty=1)])
    assert ("liability:deferred-revenue:lr-s", "debit", 1000) in _lines(step.journal)
    assert step.split == {"net_from_deferred": 1000, "net_from_contra": 0}
    inv = step.invoice
    assert inv.schedule is not None
    assert [i.amount for i in inv.schedule.installments] == [1000, 500, 500]
    with pytest.raises(invoices.InvalidState):
        invoices.close(inv)  # the schedule still has 1000 to post
    # the rest: 1000 deferred, then 1000 of recognised revenue back through contra revenue
    step = invoices.refund(inv, 2380, "EUR", "stripe")
    assert _lines(step.journal) == {
        ("liability:deferred-revenue:lr-s", "debit", 1000),
        ("revenue:refunds:lr-s", "debit", 1000),
        ("liability:tax-payable:DE", "debit", 380),
        ("asset:cash:stripe:EUR", "credit", 2380),
    }
    inv = step.invoice
    assert inv.schedule is not None
    assert [i.amount for i in inv.schedule.installments] == [1000, 0, 0]
    step = invoices.recognise(inv, 2, START)
    assert step.journal is None and step.invoice.schedule is not None
    assert step.invoice.schedule.installments[1].posted
    assert invoices.close(step.invoice).invoice.status is invoices.InvoiceStatus.CLOSED


def test_on_delivery_fulfilment_is_unchanged() -> None:
    inv = _paid(TWO_RATES)
    step = invoices.fulfil(inv)
    assert step.amounts == {"recognised": 3999}
    assert invoices.deferred_of(step.invoice) == [0, 0]
    refund = invoices.refund(step.invoice, 1190, "EUR", "stripe", [LineRefund(0, qty=1)])
    assert ("revenue:refunds:lr-a", "debit", 1000) in _lines(refund.journal)
