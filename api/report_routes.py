"""Finance reports and invoice PDFs (reader roles, DECISIONS D5).

`GET /finance/reports/{name}?as_of=&currency=&format=json|csv&period=day|month`: the figures are
read by `store/report_repo.py` (as of `as_of`, default now) and shaped by `finance/reports.py`.
`GET /finance/invoice/{id}.pdf`: the invoice rendered by `finance/invoice_pdf.py`; the seller's
details come from `LEDGER_SELLER_NAME`, `LEDGER_SELLER_ADDRESS`, `LEDGER_SELLER_VAT_ID` (the
country is the finance service's tax establishment).
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Final

import asyncpg
from aiohttp import web

from api.auth import READERS, Role
from api.envelope import ok
from api.finance_routes import FINANCE, _answer
from api.royalty_routes import _time
from api.services import SERVICES
from finance import invoice_pdf, reports
from ledger.errors import ErrorCode, LedgerError, validation_error
from ledger.money import is_currency
from ledger.timestamps import rfc3339
from store import report_repo

DEFAULT_SELLER_NAME: Final = "Ledger Node marketplace"


def _query(request: web.Request, name: str, allowed: tuple[str, ...], default: str) -> str:
    value = request.query.get(name) or default
    if value not in allowed:
        raise validation_error(f"{name} must be one of {', '.join(allowed)}", f"$.query.{name}")
    return value


def _currency(request: web.Request) -> str | None:
    value = request.query.get("currency") or None
    if value is not None and not is_currency(value):
        raise validation_error(f"unknown currency code {value!r} (ISO 4217)", "$.query.currency")
    return value


async def _account_figures(
    conn: asyncpg.Connection, prefixes: tuple[str, ...], as_of: datetime | None
) -> list[reports.AccountFigure]:
    if as_of is None:
        rows = await report_repo.balances_now(conn, prefixes)
    else:
        rows = await report_repo.balances_as_of(conn, prefixes, as_of)
    return [reports.AccountFigure(r["account_id"], r["currency"], r["debits"], r["credits"]) for r in rows]


async def _invoice_report(
    conn: asyncpg.Connection, name: str, moment: datetime, currency: str | None
) -> reports.Report:
    rows = await report_repo.sums_by_source(conn, (reports.AR_PREFIX,), moment)
    figures = [
        reports.ReceivableFigure(r["account_id"], r["currency"], r["source_ref"], r["debits"], r["credits"])
        for r in rows
    ]
    refs = sorted({f.source_ref for f in figures if f.source_ref})
    invoices = {
        r["invoice_id"]: reports.InvoiceFacts(
            r["invoice_id"], r["buyer_id"] or "", r["currency"], r["total"], r["issued_at"], r["due_date"]
        )
        for r in await report_repo.invoice_facts(conn, refs)
    }
    if name == "ar_aging":
        return reports.ar_aging(moment, rfc3339(moment), currency, figures, invoices)
    return reports.outstanding_invoices(moment, rfc3339(moment), currency, figures, invoices, rfc3339)


async def build_report(
    pool: asyncpg.Pool, name: str, as_of: datetime | None, currency: str | None, period: str
) -> reports.Report:
    """Read the figures of report `name` as of `as_of` (None: now) and shape them."""
    moment = as_of or datetime.now(UTC)
    async with pool.acquire() as conn:
        if name in reports.ACCOUNT_REPORTS:
            figures = await _account_figures(conn, reports.ACCOUNT_REPORTS[name], as_of)
            return reports.account_report(name, rfc3339(moment), currency, figures)
        if name in reports.PERIOD_REPORTS:
            rows = await report_repo.sums_by_period(conn, reports.PERIOD_REPORTS[name], moment, period)
            periods = [
                reports.PeriodFigure(r["period"], r["account_id"], r["currency"], r["debits"], r["credits"])
                for r in rows
            ]
            return reports.revenue_report(rfc3339(moment), currency, period, periods)
        return await _invoice_report(conn, name, moment, currency)


async def get_report(request: web.Request) -> web.StreamResponse:
    """GET /finance/reports/{name}: JSON `{ok, report: {...}}` or CSV with a header row."""
    name = request.match_info["name"]
    if name not in reports.REPORT_NAMES:
        raise LedgerError(ErrorCode.NOT_FOUND, f"no report {name}", {"resource": "report", "id": name})
    as_of = _time(request, "as_of")
    currency = _currency(request)
    fmt = _query(request, "format", reports.FORMATS, "json")
    period = _query(request, "period", reports.PERIODS, "month")
    if "period" in request.query and name not in reports.PERIOD_REPORTS:
        raise validation_error("period applies to the revenue report only", "$.query.period")
    report = await build_report(request.app[SERVICES].pool, name, as_of, currency, period)
    if fmt == "json":
        return ok(report=reports.report_body(report))
    return web.Response(
        text=reports.report_csv(report),
        content_type="text/csv",
        headers={"Content-Disposition": f'attachment; filename="{name}.csv"'},
    )


def seller_details(request: web.Request) -> invoice_pdf.SellerDetails:
    """The seller shown on invoices (module docstring)."""
    return seller_of(request.app)


def seller_of(app: web.Application) -> invoice_pdf.SellerDetails:
    """The seller shown on an application's invoices (also on the PDFs of auditor exports)."""
    seller = app[FINANCE].seller
    return invoice_pdf.SellerDetails(
        name=os.environ.get("LEDGER_SELLER_NAME") or DEFAULT_SELLER_NAME,
        country=seller.country,
        vat_id=os.environ.get("LEDGER_SELLER_VAT_ID") or seller.vat_id,
        address=os.environ.get("LEDGER_SELLER_ADDRESS") or None,
    )


async def get_invoice_pdf(request: web.Request) -> web.StreamResponse:
    """GET /finance/invoice/{id}.pdf: the invoice as a PDF; 404 NOT_FOUND for an unknown invoice.

    The route is matched before `GET /finance/invoice/{id}`, so an invoice whose own id ends in
    `.pdf` (and no invoice has the id without it) is answered with its JSON view, as before.
    """
    invoice_id = request.match_info["invoice_id"]
    finance = request.app[FINANCE]
    try:
        view: dict[str, Any] = await finance.view(invoice_id)
    except LedgerError as exc:
        if exc.code is not ErrorCode.NOT_FOUND:
            raise
        try:
            return _answer(200, await finance.view(f"{invoice_id}.pdf"))
        except LedgerError:
            raise exc from None
    body = invoice_pdf.render_invoice(view, seller_details(request))
    return web.Response(
        body=body,
        content_type="application/pdf",
        headers={"Content-Disposition": f'inline; filename="{invoice_id}.pdf"'},
    )


ROUTES: Final[
    list[tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]], frozenset[Role]]]
] = [
    ("GET", "/finance/reports/{name}", get_report, READERS),
    ("GET", "/finance/invoice/{invoice_id}.pdf", get_invoice_pdf, READERS),
]
"""Install before `finance_routes.ROUTES`: aiohttp tries routes in order, and
`/finance/invoice/{invoice_id}` would also match `{id}.pdf`."""
