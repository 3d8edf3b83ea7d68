"""Tax return endpoint: taxable base and tax per jurisdiction and rate for a period.

`GET /finance/tax/return/{period}` (readers) builds one `finance.tax_return.TaxEntry` per invoice
line from what is stored and sums them with `finance.tax_return.aggregate`:

- issuing books each line's net and tax (jurisdiction, rate, reverse charge from the line's tax
  decision in the invoice body) at the invoice's issue time;
- voiding an issued invoice books the negative of every line at the void time;
- a refund books negative base and tax at the refund journal's `posted_at`. Its tax per
  jurisdiction is read from the ledger (the refund journal's debits on the tax-payable accounts),
  its net from the refund's recorded answer; both are spread over the invoice's lines in
  proportion to their tax and net (largest remainder), so per jurisdiction the return equals what
  the ledger booked on `liability:tax-payable:{jurisdiction}` to the minor unit. A refund whose
  answer records what it reversed per line (`refund_lines`: every refund since refunds by line,
  and necessarily a refund by lines) books exactly those figures against each line's own
  jurisdiction and rate, provided they agree per jurisdiction with the ledger's tax lines.

`Accept: text/csv` answers the CSV of `finance.tax_return.to_csv` instead of the JSON envelope.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, Final

import msgspec
from aiohttp import web

from api.auth import READERS, Role
from api.envelope import ok
from api.services import SERVICES
from finance.chart import JURISDICTION_PATTERN
from finance.invoices import Invoice
from finance.money import allocate_proportional
from finance.tax_return import TaxEntry, aggregate, parse_period, to_csv
from ledger.errors import validation_error
from ledger.invariants import check
from store import finance_repo

CSV_TYPE: Final = "text/csv"


def _entries(
    invoice: Invoice, posted_at: datetime, sign: int, bases: list[int], taxes: list[int]
) -> list[TaxEntry]:
    return [
        TaxEntry(
            line.jurisdiction,
            invoice.currency,
            line.rate_bp,
            line.reverse_charge,
            sign * base,
            sign * tax,
            posted_at,
            invoice.invoice_id,
        )
        for line, base, tax in zip(invoice.lines, bases, taxes, strict=True)
    ]


def invoice_entries(invoice: Invoice, issued_at: datetime, voided_at: datetime | None) -> list[TaxEntry]:
    """Each line's base and tax at issue; their negatives at void time when voided after issue."""
    bases = [line.net for line in invoice.lines]
    taxes = [line.tax for line in invoice.lines]
    entries = _entries(invoice, issued_at, 1, bases, taxes)
    if voided_at is not None:
        entries += _entries(invoice, voided_at, -1, bases, taxes)
    return entries


def refund_entries(
    invoice: Invoice, posted_at: datetime, net: int, tax_by_jurisdiction: dict[str, int]
) -> list[TaxEntry]:
    """A refund's reversal per line: `net` spread by line net, each jurisdiction's tax by line tax."""
    check(net >= 0 and all(t >= 0 for t in tax_by_jurisdiction.values()), "negative refund figures")
    bases = (
        allocate_proportional(net, [line.net for line in invoice.lines]) if net else [0] * len(invoice.lines)
    )
    taxes = [0] * len(invoice.lines)
    for jurisdiction, tax in tax_by_jurisdiction.items():
        indexes = [i for i, line in enumerate(invoice.lines) if line.jurisdiction == jurisdiction]
        check(
            bool(indexes) or tax == 0,
            f"refund tax for {jurisdiction} not on the invoice {invoice.invoice_id}",
        )
        shares = allocate_proportional(tax, [invoice.lines[i].tax for i in indexes]) if tax else []
        for i, share in zip(indexes, shares, strict=False):
            taxes[i] = share
    return _entries(invoice, posted_at, -1, bases, taxes)


def recorded_line_entries(
    invoice: Invoice, posted_at: datetime, answer: dict[str, Any], tax_by_jurisdiction: dict[str, int]
) -> list[TaxEntry] | None:
    """A refund's reversal from its recorded `refund_lines` (each line's own net and tax), or None
    when it has none or they disagree with the ledger's tax per jurisdiction."""
    recorded = answer.get("refund_lines")
    if not isinstance(recorded, list):
        return None
    bases, taxes = [0] * len(invoice.lines), [0] * len(invoice.lines)
    for item in recorded:
        bases[int(item["line"])], taxes[int(item["line"])] = int(item["net"]), int(item["tax"])
    booked: dict[str, int] = {}
    for line, tax in zip(invoice.lines, taxes, strict=True):
        booked[line.jurisdiction] = booked.get(line.jurisdiction, 0) + tax
    if {j: t for j, t in booked.items() if t} != {j: t for j, t in tax_by_jurisdiction.items() if t}:
        return None
    listed = {int(item["line"]) for item in recorded}
    entries = _entries(invoice, posted_at, -1, bases, taxes)
    return [entry for index, entry in enumerate(entries) if index in listed]


def _refund_net(answer: dict[str, Any], tax: int) -> int:
    """The refund's net part (its recorded answer; older answers: amount - credit - tax)."""
    if "net" in answer:
        return int(answer["net"])
    return int(answer["amount"]) - int(answer.get("credit", 0)) - tax


async def tax_return(request: web.Request) -> web.Response:
    """GET /finance/tax/return/{period}?jurisdiction=XX: the period's return (JSON or CSV)."""
    period = parse_period(request.match_info["period"])
    jurisdiction = request.query.get("jurisdiction")
    if jurisdiction is not None and not JURISDICTION_PATTERN.fullmatch(jurisdiction):
        raise validation_error("jurisdiction must look like DE or US-WA", "jurisdiction")
    async with (
        request.app[SERVICES].pool.acquire() as conn,
        conn.transaction(isolation="repeatable_read", readonly=True),
    ):
        invoices = await finance_repo.tax_invoices(conn, period.start, period.end)
        refunds = await finance_repo.tax_refunds(conn, period.start, period.end)
    entries: list[TaxEntry] = []
    for row in invoices:
        invoice = msgspec.json.decode(row["body"], type=Invoice)
        entries += invoice_entries(invoice, row["issued_at"], row["voided_at"])
    prefix = finance_repo.TAX_PAYABLE_PREFIX
    for row in refunds:
        invoice = msgspec.json.decode(row["body"], type=Invoice)
        lines: dict[str, int] = msgspec.json.decode(row["tax_lines"])
        taxes = {account.removeprefix(prefix): amount for account, amount in lines.items()}
        answer = msgspec.json.decode(row["answer"])
        net = _refund_net(answer, sum(taxes.values()))
        if net == 0 and not any(taxes.values()):
            continue  # returned overpaid customer credit only: no sale is reversed
        by_line = recorded_line_entries(invoice, row["posted_at"], answer, taxes)
        entries += by_line if by_line is not None else refund_entries(invoice, row["posted_at"], net, taxes)
    result = aggregate(entries, period, jurisdiction)
    if CSV_TYPE in request.headers.get("Accept", ""):
        filename = f"tax-return-{period.label}{'-' + jurisdiction if jurisdiction else ''}.csv"
        return web.Response(
            text=to_csv(result),
            content_type=CSV_TYPE,
            headers={"Content-Disposition": f'attachment; filename="{filename}"'},
        )
    return ok(**msgspec.to_builtins(result))


ROUTES: Final[
    list[tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]], frozenset[Role]]]
] = [
    ("GET", "/finance/tax/return/{period}", tax_return, READERS),
]
