"""Unit tests of the pure report shaping (`finance.reports`) and the invoice PDF (`finance.invoice_pdf`)."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest
from pypdf import PdfReader

from finance import invoice_pdf, reports
from finance.invoices import Buyer, LineItem, create_invoice
from finance.reports import AccountFigure, InvoiceFacts, PeriodFigure, ReceivableFigure
from finance.tax import Seller

AS_OF = datetime(2026, 6, 30, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("days", "bucket"),
    [(-5, "current"), (0, "current"), (1, "1-30"), (30, "1-30"), (31, "31-60"), (60, "31-60"),
     (61, "61-90"), (90, "61-90"), (91, "90+"), (400, "90+")],
)  # fmt: skip
def test_age_buckets_have_inclusive_upper_edges(days: int, bucket: str) -> None:
    """Tried: days past due at and around every bucket edge -> current up to 0, then 1-30, 31-60,
    61-90, 90+ with inclusive upper edges."""
    assert reports.age_bucket(days) == bucket


def _facts(invoice_id: str, buyer: str, due: str | None, issued: datetime, total: int = 0) -> InvoiceFacts:
    return InvoiceFacts(invoice_id, buyer, "EUR", total, issued, due)


def test_ar_aging_buckets_by_due_date_and_reconciles_to_the_account() -> None:
    """Tried: buyer b1 with invoices due in the future, 10 and 45 days ago, one without a due date
    issued 100 days ago, one fully paid, and a client journal on its AR account (no invoice) ->
    each outstanding amount lands in its bucket, the client line is `unallocated`, and the row
    total equals the AR balance (sum of all lines); a USD invoice makes its own row."""
    issued = datetime(2026, 1, 1, tzinfo=UTC)
    invoices = {
        "i-future": _facts("i-future", "b1", "2026-07-15", issued),
        "i-10": _facts("i-10", "b1", "2026-06-20", issued),
        "i-45": _facts("i-45", "b1", "2026-05-16", issued),
        "i-none": _facts("i-none", "b1", None, datetime(2026, 3, 22, 9, tzinfo=UTC)),
        "i-paid": _facts("i-paid", "b1", "2026-01-31", issued),
        "i-usd": InvoiceFacts("i-usd", "b1", "USD", 0, issued, "2026-06-29"),
    }
    ar = "asset:ar:b1"
    figures = [
        ReceivableFigure(ar, "EUR", "i-future", 1000, 0),
        ReceivableFigure(ar, "EUR", "i-10", 2000, 500),
        ReceivableFigure(ar, "EUR", "i-45", 300, 0),
        ReceivableFigure(ar, "EUR", "i-none", 70, 0),
        ReceivableFigure(ar, "EUR", "i-paid", 900, 900),
        ReceivableFigure(ar, "EUR", None, 5, 0),
        ReceivableFigure(ar, "USD", "i-usd", 4000, 1000),
    ]
    report = reports.ar_aging(AS_OF, "t", None, figures, invoices)
    eur, usd = report.rows
    assert eur == {"account_id": ar, "buyer_id": "b1", "currency": "EUR", "current": 1000, "1-30": 1500,
                   "31-60": 300, "61-90": 0, "90+": 70, "unallocated": 5, "total": 2875}  # fmt: skip
    assert eur["total"] == sum(f.debits - f.credits for f in figures if f.currency == "EUR")
    assert usd["1-30"] == 3000 and usd["total"] == 3000
    assert report.totals["EUR"]["total"] == 2875 and report.totals["USD"]["1-30"] == 3000
    only_usd = reports.ar_aging(AS_OF, "t", "USD", figures, invoices)
    assert [r["currency"] for r in only_usd.rows] == ["USD"] and set(only_usd.totals) == {"USD"}


def test_outstanding_invoices_list_open_invoices_and_unallocated_totals() -> None:
    """Tried: an open and a fully paid invoice plus a line whose source_ref is an invoice of
    another buyer -> one row (the open invoice) with its days overdue and bucket; the foreign line
    counts as unallocated and receivables = outstanding + unallocated."""
    issued = datetime(2026, 6, 1, tzinfo=UTC)
    invoices = {"a": _facts("a", "b1", "2026-06-10", issued, 1190), "p": _facts("p", "b1", None, issued, 50),
                "x": _facts("x", "b2", None, issued, 10)}  # fmt: skip
    figures = [
        ReceivableFigure("asset:ar:b1", "EUR", "a", 1190, 190),
        ReceivableFigure("asset:ar:b1", "EUR", "p", 50, 50),
        ReceivableFigure("asset:ar:b1", "EUR", "x", 10, 0),
    ]
    report = reports.outstanding_invoices(AS_OF, "t", None, figures, invoices, lambda d: d.isoformat())
    assert report.rows == [{
        "invoice_id": "a", "account_id": "asset:ar:b1", "buyer_id": "b1", "currency": "EUR",
        "issued_at": issued.isoformat(), "due_date": "2026-06-10", "total": 1190, "outstanding": 1000,
        "days_overdue": 20, "bucket": "1-30",
    }]  # fmt: skip
    assert report.totals == {"EUR": {"outstanding": 1000, "receivables": 1010, "unallocated": 10}}


def test_account_reports_use_normal_balances_and_sum_totals() -> None:
    """Tried: payables (royalty, holdback, tax, a clawed-back negative payable), cash, deferred
    revenue and in-transit figures -> each report keeps only its accounts, shows the normal-side
    balance, labels the party, and its totals are the sums per currency (AP also per category)."""
    figures = [
        AccountFigure("liability:royalty:alice", "EUR", 0, 450),
        AccountFigure("liability:royalty:bob", "EUR", 300, 100),
        AccountFigure("liability:royalty-holdback:alice", "EUR", 0, 50),
        AccountFigure("liability:tax-payable:DE", "EUR", 19, 190),
        AccountFigure("liability:tax-payable:FR", "USD", 0, 20),
        AccountFigure("liability:payouts-in-transit:stripe:EUR", "EUR", 400, 400),
        AccountFigure("asset:cash:stripe:EUR", "EUR", 5000, 1200),
        AccountFigure("liability:deferred-revenue:sku-a", "EUR", 100, 900),
    ]
    ap = reports.account_report("ap", "t", None, figures)
    assert [(r["category"], r["party"], r["amount"]) for r in ap.rows] == [
        ("royalty_holdback", "alice", 50), ("royalty_payable", "alice", 450),
        ("royalty_payable", "bob", -200), ("tax_payable", "DE", 171), ("tax_payable", "FR", 20),
    ]  # fmt: skip
    assert ap.totals["EUR"] == {
        "amount": 471,
        "royalty_payable": 250,
        "royalty_holdback": 50,
        "tax_payable": 171,
    }
    cash = reports.account_report("cash_position", "t", None, figures)
    assert cash.rows == [{"account_id": "asset:cash:stripe:EUR", "provider": "stripe", "currency": "EUR",
                          "amount": 3800}]  # fmt: skip
    vat = reports.account_report("vat_owed", "t", "USD", figures)
    assert [(r["jurisdiction"], r["amount"]) for r in vat.rows] == [("FR", 20)]
    deferred = reports.account_report("deferred_revenue", "t", None, figures)
    assert [(r["sku"], r["amount"]) for r in deferred.rows] == [("sku-a", 800)]
    payouts = reports.account_report("payout_liabilities", "t", None, figures)
    shown = [
        (r["party"], r["kind"], r["payable"], r["holdback"], r["in_transit"], r["total"])
        for r in payouts.rows
    ]
    assert shown == [
        ("alice", "participant", 450, 50, 0, 500), ("bob", "participant", -200, 0, 0, -200),
        ("stripe", "provider", 0, 0, 0, 0),
    ]  # fmt: skip
    assert payouts.totals["EUR"]["total"] == 300


def test_revenue_nets_the_contra_account_per_period_and_sku() -> None:
    """Tried: sales of two SKUs in two months and a refund from contra revenue -> rows per
    (period, SKU, currency) with sales, refunds and net = sales - refunds; totals sum them."""
    figures = [
        PeriodFigure("2026-05", "revenue:sales:a", "EUR", 0, 1000),
        PeriodFigure("2026-06", "revenue:sales:a", "EUR", 0, 500),
        PeriodFigure("2026-06", "revenue:refunds:a", "EUR", 300, 0),
        PeriodFigure("2026-06", "revenue:sales:b", "USD", 0, 70),
    ]
    report = reports.revenue_report("t", None, "month", figures)
    shown = [(r["period"], r["sku"], r["currency"], r["sales"], r["refunds"], r["net"]) for r in report.rows]
    assert shown == [
        ("2026-05", "a", "EUR", 1000, 0, 1000), ("2026-06", "a", "EUR", 500, 300, 200),
        ("2026-06", "b", "USD", 70, 0, 70),
    ]  # fmt: skip
    assert report.totals["EUR"] == {"sales": 1500, "refunds": 300, "net": 1200}
    assert reports.report_body(report)["period"] == "month"


def test_csv_has_a_header_and_the_json_rows() -> None:
    """Tried: the AR aging report as CSV -> the header is the column list and parsing the CSV
    gives back the JSON rows (None as empty)."""
    report = reports.outstanding_invoices(
        AS_OF, "t", None,
        [ReceivableFigure("asset:ar:b1", "EUR", "a", 10, 0)],
        {"a": InvoiceFacts("a", "b1", "EUR", 10, None, None)},
        lambda d: d.isoformat(),
    )  # fmt: skip
    parsed = list(csv.DictReader(io.StringIO(reports.report_csv(report))))
    assert list(parsed[0]) == list(reports.OUTSTANDING_COLUMNS)
    assert parsed == [{k: "" if v is None else str(v) for k, v in row.items()} for row in report.rows]


def _view(status: str = "paid") -> dict[str, Any]:
    buyer = Buyer("acme-gmbh", "DE", address="Hauptstr. 1, Berlin", vat_id="DE123456789")
    items = [LineItem("course-a", 2, 4999, "standard"), LineItem("ebook-b", 1, 1000, "ebook")]
    invoice = create_invoice("inv-pdf-1", buyer, items, "EUR", Seller(country="IE", vat_id="IE1234567T"))
    return {
        "invoice_id": invoice.invoice_id, "kind": "priced", "status": status, "currency": "EUR",
        "buyer": msgspec.to_builtins(buyer), "subtotal": invoice.subtotal, "tax": invoice.tax,
        "total": invoice.total, "amount_paid": invoice.total if status == "paid" else 0,
        "amount_due": 0 if status == "paid" else invoice.total, "amount_refunded": 0, "customer_credit": 0,
        "line_items": msgspec.to_builtins(invoice.lines),
        "tax_breakdown": msgspec.to_builtins(invoice.tax_breakdown),
        "notes": list(invoice.notes), "due_date": "2026-07-31", "terms": "net 30",
        "created_at": "2026-06-01T10:00:00.000000Z", "issued_at": "2026-06-01T10:00:01.000000Z",
    }  # fmt: skip


def test_invoice_pdf_shows_parties_lines_tax_totals_and_reverse_charge() -> None:
    """Tried: a B2B reverse-charge invoice (IE seller, DE buyer with a VAT id) rendered twice ->
    the text layer names seller and buyer with VAT ids, the lines, the 0 % reverse-charge rate,
    the totals, the Article 196 wording and 'Paid in full'; the bytes are identical both times."""
    seller = invoice_pdf.SellerDetails("Example Marketplace Ltd", "IE", "IE1234567T", "1 Dock Rd, Dublin")
    pdf = invoice_pdf.render_invoice(_view(), seller)
    assert pdf.startswith(b"%PDF-")
    assert pdf == invoice_pdf.render_invoice(_view(), seller)
    text = "\n".join(page.extract_text() for page in PdfReader(io.BytesIO(pdf)).pages)
    for expected in ("Example Marketplace Ltd", "IE1234567T", "acme-gmbh", "DE123456789", "Hauptstr. 1",
                     "course-a", "ebook-b", "EUR 99.98", "EUR 10.00", "Total", "EUR 109.98",
                     "reverse charge", "Article 196", "Paid in full", "inv-pdf-1", "2026-07-31"):  # fmt: skip
        assert expected in text, (expected, text)
    unpaid = "\n".join(p.extract_text() for p in PdfReader(io.BytesIO(invoice_pdf.render_invoice(
        _view("issued"), seller))).pages)  # fmt: skip
    assert "Amount due: EUR 109.98" in unpaid and "Awaiting payment" in unpaid


def test_money_text_uses_the_currency_decimals() -> None:
    """Tried: EUR, JPY (no decimals), a negative amount -> `EUR 1,234.56`, `JPY 1,234`, `EUR -0.05`."""
    assert invoice_pdf.money_text(123456, "EUR") == "EUR 1,234.56"
    assert invoice_pdf.money_text(1234, "JPY") == "JPY 1,234"
    assert invoice_pdf.money_text(-5, "EUR") == "EUR -0.05"
