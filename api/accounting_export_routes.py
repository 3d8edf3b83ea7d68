"""Accounting exports over HTTP (issue 8 item 2, DECISIONS D9).

`GET /finance/exports/journal.csv?from=&to=&format=xero|quickbooks|generic&currency=` (operator,
auditor, admin: the "exports" row of D5): the journals posted in `[from, to)` (RFC 3339 times or
`YYYY-MM-DD` dates, meaning midnight UTC; at most `WINDOW_MAX_DAYS`) as a manual-journal import
file (finance/accounting_export.py). Ledger accounts map to external account codes through the
file named by `LEDGER_ACCOUNT_MAP` (JSON, or TOML when it ends in `.toml`), read on each export
so an edited map applies at once.

Errors: a bad `from`, `to`, `format` or `currency` -> 400 VALIDATION_ERROR naming `$.query.x`;
a Xero export spanning several currencies -> 400 on `$.query.currency` (Xero manual journals
carry no currency: export one at a time); more than `journal_export_repo.LINES_MAX` lines -> 400
on `$.query.to`; accounts the map does not map (Xero, QuickBooks) -> 422 ACCOUNT_UNMAPPED listing
them in `details.accounts`; a map file that is missing or unreadable -> 503 SERVICE_UNAVAILABLE
(`retryable: false`, `details.env`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Final

import asyncpg
from aiohttp import web

from api.auth import Role
from api.report_routes import _currency
from api.services import SERVICES
from finance import accounting_export
from finance.accounting_export import AccountMap, AccountMapError, Journal, Line
from ledger.errors import ErrorCode, LedgerError, Rejection, validation_error
from ledger.timestamps import parse_rfc3339
from store import journal_export_repo

EXPORTERS: Final = frozenset({Role.OPERATOR, Role.AUDITOR, Role.ADMIN})
WINDOW_MAX_DAYS: Final = 366
MAP_ENV: Final = "LEDGER_ACCOUNT_MAP"
_DATE: Final = re.compile(r"\d{4}-\d{2}-\d{2}")


def _moment(request: web.Request, name: str) -> datetime:
    text = request.query.get(name)
    if not text:
        raise validation_error(f"{name} is required (RFC 3339 time or YYYY-MM-DD)", f"$.query.{name}")
    parsed = None
    if _DATE.fullmatch(text):
        try:
            parsed = datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=UTC)
        except ValueError:
            parsed = None
    else:
        parsed = parse_rfc3339(text)
    if parsed is None:
        raise validation_error(f"{name} must be an RFC 3339 time or a YYYY-MM-DD date", f"$.query.{name}")
    return parsed.astimezone(UTC)


def _window(request: web.Request) -> tuple[datetime, datetime]:
    start, end = _moment(request, "from"), _moment(request, "to")
    if start >= end:
        raise validation_error("from must be before to", "$.query.to")
    if end - start > timedelta(days=WINDOW_MAX_DAYS):
        raise validation_error(
            f"the window may span at most {WINDOW_MAX_DAYS} days", "$.query.to", max_days=WINDOW_MAX_DAYS
        )
    return start, end


def _format(request: web.Request) -> accounting_export.Format:
    value = request.query.get("format") or "generic"
    if value not in accounting_export.FORMATS:
        raise validation_error(
            f"format must be one of {', '.join(accounting_export.FORMATS)}", "$.query.format"
        )
    return value


def load_account_map() -> AccountMap:
    """The map named by `LEDGER_ACCOUNT_MAP` (an empty map when unset); 503 when unreadable."""
    path = os.environ.get(MAP_ENV)
    if not path:
        return AccountMap()
    try:
        with open(path, encoding="utf-8") as handle:
            return accounting_export.parse_account_map(handle.read(), path)
    except (OSError, UnicodeDecodeError, AccountMapError) as exc:
        raise LedgerError(
            ErrorCode.SERVICE_UNAVAILABLE,
            f"the account map cannot be read: {exc}",
            {"env": MAP_ENV, "retryable": False},
        ) from None


def journals_of(rows: list[asyncpg.Record]) -> list[Journal]:
    """Group lines (in journal order) into journals."""
    journals: list[Journal] = []
    lines: list[Line] = []
    for n, row in enumerate(rows):
        lines.append(Line(row["line_no"], row["account_id"], row["currency"], row["side"], row["amount"]))
        if n + 1 == len(rows) or rows[n + 1]["journal_id"] != row["journal_id"]:
            journals.append(
                Journal(row["journal_id"], row["posted_at"], tuple(lines), row["memo"], row["source_ref"])
            )
            lines = []
    return journals


async def journal_csv(request: web.Request) -> web.StreamResponse:
    """GET /finance/exports/journal.csv."""
    start, end = _window(request)
    fmt = _format(request)
    currency = _currency(request)
    mapping = load_account_map()
    limit = journal_export_repo.LINES_MAX
    async with request.app[SERVICES].pool.acquire() as conn:
        rows = await journal_export_repo.journal_lines(conn, start, end, currency, limit + 1)
    if len(rows) > limit:
        raise validation_error(
            f"more than {limit} lines in the window; export a shorter one", "$.query.to", lines_max=limit
        )
    journals = journals_of(rows)
    moved = accounting_export.currencies(journals)
    if fmt == "xero" and len(moved) > 1:
        raise validation_error(
            "Xero manual journals carry no currency; export one currency at a time (currency=)",
            "$.query.currency",
            currencies=moved,
        )
    try:
        text = accounting_export.journal_csv(journals, fmt, mapping)
    except accounting_export.UnmappedAccounts as exc:
        raise Rejection(
            ErrorCode.ACCOUNT_UNMAPPED,
            f"{len(exc.accounts)} ledger accounts have no external account in {MAP_ENV}",
            {"accounts": exc.accounts, "format": fmt, "env": MAP_ENV},
        ) from None
    stamp = f"{start:%Y%m%dT%H%M%SZ}-{end:%Y%m%dT%H%M%SZ}"
    return web.Response(
        text=text,
        content_type="text/csv",
        charset="utf-8",
        headers={"Content-Disposition": f'attachment; filename="journal-{fmt}-{stamp}.csv"'},
    )


ROUTES: Final[
    list[tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]], frozenset[Role]]]
] = [
    ("GET", "/finance/exports/journal.csv", journal_csv, EXPORTERS),
]
