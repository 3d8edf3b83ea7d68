"""The invoice as a PDF document (`GET /finance/invoice/{id}.pdf`), rendered with fpdf2.

Pure: takes the invoice's view (what `GET /finance/invoice/{id}` answers) and the seller's
details, returns the PDF bytes. The same invoice state gives the same bytes: the document's
creation date is the invoice's issue time (its creation time while a draft), and fpdf2 derives the
file identifier from the content and that date. Text uses the PDF core font Helvetica
(Windows-1252), so characters outside it are shown as `?`; amounts are shown in major units with
the currency's decimals and its ISO code.

Contents: seller (name, address, country, VAT id), buyer (id, country, address, VAT id), invoice
id, dates, terms, one row per line (SKU, quantity, unit price, net, tax rate, tax), the tax per
(jurisdiction, rate) with its net, subtotal / tax / total, the invoice's notes (the EU
reverse-charge wording for a B2B reverse-charge sale) and the payment status (paid, due,
refunded).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Final

import msgspec
from fpdf import FPDF
from fpdf.enums import XPos, YPos

from finance.money import format_rate_percent
from ledger.money import CURRENCY_MINOR_UNITS
from ledger.timestamps import parse_rfc3339

FONT: Final = "Helvetica"
LINE_COLUMNS: Final = (("SKU", 52.0), ("Qty", 14.0), ("Unit price", 28.0), ("Net", 28.0),
                       ("Tax rate", 20.0), ("Tax", 28.0))  # fmt: skip
TAX_COLUMNS: Final = (("Jurisdiction", 40.0), ("Rate", 30.0), ("Net", 40.0), ("Tax", 40.0))


class SellerDetails(msgspec.Struct, frozen=True):
    """Who issues the invoices (deployment configuration; `country` is the tax establishment)."""

    name: str
    country: str
    vat_id: str | None = None
    address: str | None = None


def money_text(amount_minor: int, currency: str) -> str:
    """`1234` EUR -> `EUR 12.34`; `-5` -> `EUR -0.05`; zero-decimal currencies without a point."""
    decimals = CURRENCY_MINOR_UNITS.get(currency, 2)
    sign = "-" if amount_minor < 0 else ""
    units, minor = divmod(abs(amount_minor), 10**decimals)
    text = f"{units:,}" if decimals == 0 else f"{units:,}.{minor:0{decimals}d}"
    return f"{currency} {sign}{text}"


def _safe(text: Any) -> str:
    """Text the core font can show (Windows-1252); anything else becomes `?`."""
    return str(text).encode("cp1252", "replace").decode("cp1252")


def _created(view: dict[str, Any]) -> datetime | None:
    for key in ("issued_at", "created_at"):
        value = view.get(key)
        if isinstance(value, str):
            parsed = parse_rfc3339(value)
            if parsed is not None:
                return parsed
    return None


class _Document:
    """An fpdf2 page with the few layout helpers the invoice needs."""

    def __init__(self, title: str, author: str, created: datetime | None) -> None:
        self.pdf = FPDF(format="A4")
        self.pdf.set_title(_safe(title))
        self.pdf.set_author(_safe(author))
        self.pdf.set_creator("Ledger Node")
        if created is not None:
            self.pdf.set_creation_date(created)
        self.pdf.set_auto_page_break(auto=True, margin=15)
        self.pdf.add_page()

    def text(self, text: str, size: float = 10, bold: bool = False) -> None:
        self.pdf.set_font(FONT, "B" if bold else "", size)
        self.pdf.multi_cell(0, size * 0.5, _safe(text), new_x=XPos.LMARGIN, new_y=YPos.NEXT)

    def gap(self, height: float = 3) -> None:
        self.pdf.ln(height)

    def row(self, cells: list[tuple[str, float]], bold: bool = False) -> None:
        self.pdf.set_font(FONT, "B" if bold else "", 9)
        for index, (text, width) in enumerate(cells):
            align = "L" if index == 0 else "R"
            self.pdf.cell(width, 6, _safe(text), border="B", align=align)
        self.pdf.ln(6)

    def output(self) -> bytes:
        return bytes(self.pdf.output())


def _parties(doc: _Document, view: dict[str, Any], seller: SellerDetails) -> None:
    doc.text("Seller", 11, bold=True)
    doc.text(seller.name)
    if seller.address:
        doc.text(seller.address)
    doc.text(f"Country: {seller.country}")
    doc.text(f"VAT ID: {seller.vat_id}" if seller.vat_id else "VAT ID: not registered")
    doc.gap()
    buyer = view.get("buyer") or {}
    doc.text("Buyer", 11, bold=True)
    doc.text(f"Buyer: {buyer.get('buyer_id', '')}")
    if buyer.get("address"):
        doc.text(str(buyer["address"]))
    location = "-".join(str(buyer[k]) for k in ("country", "region") if buyer.get(k))
    if location:
        doc.text(f"Country: {location}")
    if buyer.get("vat_id"):
        doc.text(f"VAT ID: {buyer['vat_id']}")
    doc.gap()


def _header(doc: _Document, view: dict[str, Any]) -> None:
    doc.text("INVOICE", 18, bold=True)
    doc.text(f"Invoice: {view['invoice_id']}")
    doc.text(f"Status: {view['status']}")
    for label, key in (("Issued", "issued_at"), ("Created", "created_at")):
        if view.get(key):
            doc.text(f"{label}: {view[key]}")
            break
    if view.get("due_date"):
        doc.text(f"Due date: {view['due_date']}")
    if view.get("terms"):
        doc.text(f"Terms: {view['terms']}")
    doc.text(f"Currency: {view['currency']}")
    doc.gap()


def _lines(doc: _Document, view: dict[str, Any]) -> None:
    currency = view["currency"]
    doc.text("Lines", 11, bold=True)
    doc.row([(name, width) for name, width in LINE_COLUMNS], bold=True)
    for line in view.get("line_items") or []:
        rate = "reverse charge" if line.get("reverse_charge") else f"{format_rate_percent(line['rate_bp'])}%"
        values = [line["sku"], str(line["qty"]), money_text(line["unit_price"], currency),
                  money_text(line["net"], currency), rate, money_text(line["tax"], currency)]  # fmt: skip
        doc.row([(v, w) for v, (_, w) in zip(values, LINE_COLUMNS, strict=True)])
    doc.gap()
    breakdown = view.get("tax_breakdown") or []
    if breakdown:
        doc.text("Tax per rate", 11, bold=True)
        doc.row([(name, width) for name, width in TAX_COLUMNS], bold=True)
        for tax in breakdown:
            rate = f"{tax['rate']}%" + (" (reverse charge)" if tax.get("reverse_charge") else "")
            values = [
                tax["jurisdiction"],
                rate,
                money_text(tax["net"], currency),
                money_text(tax["tax"], currency),
            ]
            doc.row([(v, w) for v, (_, w) in zip(values, TAX_COLUMNS, strict=True)])
        doc.gap()


def _totals(doc: _Document, view: dict[str, Any]) -> None:
    currency = view["currency"]
    for label, key in (("Subtotal", "subtotal"), ("Tax", "tax"), ("Total", "total")):
        doc.row([(label, 130.0), (money_text(view[key], currency), 40.0)], bold=key == "total")
    doc.gap()
    doc.text("Payment", 11, bold=True)
    paid, due = view.get("amount_paid") or 0, view.get("amount_due")
    doc.text(f"Amount paid: {money_text(paid, currency)}")
    if due is not None:
        doc.text(f"Amount due: {money_text(due, currency)}")
    if view.get("amount_refunded"):
        doc.text(f"Amount refunded: {money_text(view['amount_refunded'], currency)}")
    if view.get("customer_credit"):
        doc.text(f"Customer credit: {money_text(view['customer_credit'], currency)}")
    state = "Paid in full" if due == 0 and view["status"] not in ("draft", "voided") else None
    if view["status"] == "voided":
        state = "Voided: nothing is due"
    doc.text(state or ("Awaiting payment" if due else f"Status: {view['status']}"), bold=True)


def render_invoice(view: dict[str, Any], seller: SellerDetails) -> bytes:
    """The invoice's PDF (module docstring); `view` is `GET /finance/invoice/{id}`'s invoice."""
    doc = _Document(f"Invoice {view['invoice_id']}", seller.name, _created(view))
    _header(doc, view)
    _parties(doc, view, seller)
    if view.get("kind") == "external":
        doc.text(f"Recorded invoice; ledger journal: {view.get('journal_ref') or '-'}")
        doc.gap()
    else:
        _lines(doc, view)
    _totals(doc, view)
    notes = view.get("notes") or []
    if notes:
        doc.gap()
        doc.text("Notes", 11, bold=True)
        for note in notes:
            doc.text(str(note))
    return doc.output()
