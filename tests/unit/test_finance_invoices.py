"""Unit tests of invoices (`finance.invoices`) and the chart (`finance.chart`)."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from finance import chart
from finance.invoices import (
    LINE_ITEMS_MAX,
    Buyer,
    Invoice,
    InvoiceStatus,
    LineItem,
    close,
    create_invoice,
    fulfil,
    issue,
    record_payment,
    refund,
    void,
)
from finance.tax import Seller
from ledger.accounts import AccountType, account_type_of
from ledger.errors import ErrorCode, Rejection
from ledger.journal import JournalIn, validate_journal
from ledger.money import INT64_MAX

FR_B2C = Buyer("buyer-1", "FR", address="1 rue X")
FR_B2B = Buyer("buyer-2", "FR", vat_id="FR40303265045")


def _valid(journal: dict[str, Any] | None) -> dict[str, Any]:
    assert journal is not None
    validate_journal(msgspec.convert(journal, JournalIn))
    return journal


def _lines(journal: dict[str, Any]) -> list[tuple[str, str, int]]:
    return [(e["account_id"], e["side"], e["amount_cents"]) for e in journal["entries"]]


def _invoice(buyer: Buyer = FR_B2C, currency: str = "EUR") -> Invoice:
    items = [LineItem("sku-a", 3, 333, "standard"), LineItem("sku-b", 1, 999, "ebook")]
    return create_invoice("inv-1", buyer, items, currency)


def test_totals_per_line_half_even_and_breakdown() -> None:
    inv = _invoice()
    assert [(li.net, li.tax) for li in inv.lines] == [(999, 200), (999, 55)]  # 199.8, 54.945
    assert (inv.subtotal, inv.tax, inv.total) == (1998, 255, 2253)
    assert [(r.rate, r.net, r.tax) for r in inv.tax_breakdown] == [("20", 999, 200), ("5.5", 999, 55)]
    assert inv.status is InvoiceStatus.DRAFT and inv.notes == ()


def test_reverse_charge_invoice_carries_wording_and_no_tax_line() -> None:
    inv = create_invoice("inv-rc", FR_B2B, [LineItem("sku-a", 1, 10_000, "standard")], "EUR", Seller("IE"))
    assert inv.tax == 0 and inv.total == 10_000 and inv.reverse_charge
    assert "reverse charge" in inv.notes[0].lower()
    journal = _valid(issue(inv).journal)
    assert not any(e["account_id"].startswith("liability:tax-payable") for e in journal["entries"])
    assert inv.lines[0].evidence.buyer_vat_id == "FR40303265045"


def test_uk_au_nz_us_invoices() -> None:
    for buyer, tax in [
        (Buyer("b", "GB"), 2000),
        (Buyer("b", "AU"), 1000),
        (Buyer("b", "NZ"), 1500),
        (Buyer("b", "US", region="WA"), 650),
    ]:
        inv = create_invoice("i", buyer, [LineItem("s", 1, 10_000, "standard")], "USD")
        assert inv.tax == tax


def test_zero_decimal_currency_rounds_in_minor_units() -> None:
    inv = create_invoice("i", Buyer("b", "DE"), [LineItem("s", 1, 1_05, "reduced")], "JPY")
    assert inv.tax == 7  # 105 * 7 % = 7.35


@pytest.mark.parametrize(
    ("items", "currency", "field"),
    [
        ([LineItem("s", 0, 100, "standard")], "EUR", "$.line_items[0].qty"),
        ([LineItem("s", 1, -1, "standard")], "EUR", "$.line_items[0].unit_price"),
        ([LineItem("s s", 1, 1, "standard")], "EUR", "$.line_items[0].sku"),
        ([LineItem("s", 1, 1, "nope")], "EUR", "$.line_items[0].tax_code"),
        ([LineItem("s", 2, INT64_MAX, "standard")], "EUR", "$.line_items[0]"),
        ([LineItem("s", 1, INT64_MAX, "standard")], "EUR", "$.line_items"),
        ([LineItem("s", 1, 0, "standard")], "EUR", "$.line_items"),
        ([], "EUR", "$.line_items"),
        ([LineItem("s", 1, 1, "standard")] * (LINE_ITEMS_MAX + 1), "EUR", "$.line_items"),
        ([LineItem("s", 1, 1, "standard")], "XXQ", "$.currency"),
    ],
)
def test_limits_are_precise_validation_errors(items: list[LineItem], currency: str, field: str) -> None:
    with pytest.raises(Rejection) as info:
        create_invoice("inv", FR_B2C, items, currency)
    assert info.value.code is ErrorCode.VALIDATION_ERROR
    assert info.value.details["field"] == field


def test_happy_path_journals() -> None:
    inv = _invoice()
    step = issue(inv)
    assert _lines(_valid(step.journal)) == [
        ("asset:ar:buyer-1", "debit", 2253),
        ("liability:deferred-revenue:sku-a", "credit", 999),
        ("liability:deferred-revenue:sku-b", "credit", 999),
        ("liability:tax-payable:FR", "credit", 255),
    ]
    step = record_payment(step.invoice, 2253, "EUR", "stripe")
    assert step.invoice.status is InvoiceStatus.PAID and step.invoice.amount_due == 0
    assert _lines(_valid(step.journal)) == [
        ("asset:cash:stripe:EUR", "debit", 2253),
        ("asset:ar:buyer-1", "credit", 2253),
    ]
    step = fulfil(step.invoice)
    assert _lines(_valid(step.journal))[:2] == [
        ("liability:deferred-revenue:sku-a", "debit", 999),
        ("revenue:sales:sku-a", "credit", 999),
    ]
    step = close(step.invoice)
    assert step.invoice.status is InvoiceStatus.CLOSED and step.journal is None


def test_partial_payment_then_overpayment() -> None:
    inv = issue(_invoice()).invoice
    step = record_payment(inv, 1000, "EUR", "stripe")
    assert step.invoice.status is InvoiceStatus.ISSUED and step.invoice.amount_due == 1253
    step = record_payment(step.invoice, 2000, "EUR", "adyen")
    assert step.invoice.status is InvoiceStatus.PAID and step.invoice.customer_credit == 747
    assert _lines(_valid(step.journal)) == [
        ("asset:cash:adyen:EUR", "debit", 2000),
        ("asset:ar:buyer-1", "credit", 1253),
        ("liability:customer-credit:buyer-1", "credit", 747),
    ]


def test_refunds_before_and_after_fulfilment_reverse_tax_exactly() -> None:
    paid = record_payment(issue(_invoice()).invoice, 2253, "EUR", "stripe").invoice
    first = refund(paid, 1000, "EUR", "stripe")
    assert first.invoice.status is InvoiceStatus.REFUNDED
    assert first.amounts == {"credit": 0, "net": 887, "tax": 113}  # round(1000 * 255 / 2253)
    assert all(a.startswith(("liability:", "asset:cash")) for a, _, _ in _lines(_valid(first.journal)))
    delivered = fulfil(first.invoice)
    assert (
        sum(amount for _, side, amount in _lines(_valid(delivered.journal)) if side == "debit") == 1998 - 887
    )
    second = refund(delivered.invoice, 1253, "EUR", "stripe")
    journal = _valid(second.journal)
    assert any(a.startswith("revenue:refunds:") for a, _, _ in _lines(journal))
    assert second.invoice.refunded_tax == (255,) and sum(second.invoice.refunded_net) == 1998
    with pytest.raises(Rejection) as info:
        refund(second.invoice, 1, "EUR", "stripe")
    assert info.value.code is ErrorCode.REFUND_EXCEEDS_PAID and info.value.http_status == 409
    assert close(second.invoice).invoice.status is InvoiceStatus.CLOSED


def test_refund_returns_customer_credit_first() -> None:
    paid = record_payment(issue(_invoice()).invoice, 3000, "EUR", "stripe").invoice
    step = refund(paid, 500, "EUR", "stripe")
    assert step.invoice.status is InvoiceStatus.PAID and step.amounts["credit"] == 500
    assert _lines(_valid(step.journal)) == [
        ("liability:customer-credit:buyer-1", "debit", 500),
        ("asset:cash:stripe:EUR", "credit", 500),
    ]
    step = refund(step.invoice, 300, "EUR", "stripe")
    assert step.amounts["credit"] == 247 and step.invoice.status is InvoiceStatus.REFUNDED


def test_void_rules() -> None:
    assert void(_invoice()).journal is None
    issued = issue(_invoice()).invoice
    step = void(issued)
    assert step.invoice.status is InvoiceStatus.VOIDED
    assert _lines(_valid(step.journal))[-1] == ("asset:ar:buyer-1", "credit", 2253)
    part_paid = record_payment(issued, 1, "EUR", "stripe").invoice
    with pytest.raises(Rejection) as info:
        void(part_paid)
    assert info.value.code is ErrorCode.INVALID_STATE
    assert info.value.details["current"] == "issued" and info.value.details["requested"] == "voided"


@pytest.mark.parametrize(
    ("action", "requested"),
    [
        (lambda inv: record_payment(inv, 1, "EUR", "stripe"), "paid"),
        (fulfil, "fulfilled"),
        (close, "closed"),
        (lambda inv: refund(inv, 1, "EUR", "stripe"), "refunded"),
    ],
)
def test_illegal_transitions_from_draft(action: Any, requested: str) -> None:
    with pytest.raises(Rejection) as info:
        action(_invoice())
    assert info.value.code is ErrorCode.INVALID_STATE and info.value.http_status == 409
    assert info.value.details == {"current": "draft", "requested": requested}


def test_payment_currency_must_match() -> None:
    with pytest.raises(Rejection) as info:
        record_payment(issue(_invoice()).invoice, 100, "USD", "stripe")
    assert info.value.details["field"] == "$.currency"


def test_chart_ids_are_valid_and_typed() -> None:
    expected = {
        chart.cash("stripe", "EUR"): AccountType.ASSET,
        chart.receivable("b-1"): AccountType.ASSET,
        chart.deferred_revenue("sku.1"): AccountType.LIABILITY,
        chart.tax_payable("US-WA"): AccountType.LIABILITY,
        chart.customer_credit("b-1"): AccountType.LIABILITY,
        chart.royalties_payable("creator_9"): AccountType.LIABILITY,
        chart.revenue("sku.1"): AccountType.REVENUE,
        chart.platform_fees("sku.1"): AccountType.REVENUE,
        chart.refunds_contra("sku.1"): AccountType.REVENUE,
        chart.royalty_expense("sku.1"): AccountType.EXPENSE,
        chart.payment_fees("stripe"): AccountType.EXPENSE,
        chart.fx_gain(): AccountType.REVENUE,
        chart.fx_loss(): AccountType.EXPENSE,
    }
    assert len(expected) == 13
    for account_id, account_type in expected.items():
        assert account_type_of(account_id) is account_type
    with pytest.raises(Rejection):
        chart.revenue("a:b")
