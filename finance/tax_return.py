"""Tax return aggregation: taxable base and tax per jurisdiction and rate for a period.

Input is one `TaxEntry` per invoice line's tax decision as posted: issuing books a positive base
and tax, a refund books negative ones at the time of the refund. A return covers the entries whose
posting time falls in the period (`2026-Q3` = July to September, `2026-09` = September; UTC,
half-open ranges), so a refund of a sale from an earlier period reduces the period in which the
refund is posted, which is how VAT and GST returns adjust for credit notes. Reverse-charge sales are
reported with their base and zero tax, in rows of their own (they also feed the EC Sales List).

Amounts are integers in the minor units of the entries' currency; a return never mixes currencies
(one row per currency).
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Final

import msgspec

from ledger.errors import validation_error

_PERIOD: Final = re.compile(r"^(\d{4})-(?:Q([1-4])|(0[1-9]|1[0-2]))$")
CSV_COLUMNS: Final = (
    "jurisdiction",
    "currency",
    "rate_bp",
    "reverse_charge",
    "taxable_base",
    "tax",
    "entries",
)


class Period(msgspec.Struct, frozen=True):
    """A return period: `start <= t < end` in UTC."""

    label: str
    start: datetime
    end: datetime


def parse_period(text: str) -> Period:
    """`YYYY-Qn` or `YYYY-MM`; anything else is VALIDATION_ERROR on `period`."""
    match = _PERIOD.fullmatch(text)
    if match is None:
        raise validation_error("period must be YYYY-Qn (quarter) or YYYY-MM (month)", "period")
    year = int(match.group(1))
    if year < 1970:
        raise validation_error("period must not be before 1970", "period")
    if match.group(2) is not None:
        first_month = 3 * (int(match.group(2)) - 1) + 1
        months = 3
    else:
        first_month, months = int(match.group(3)), 1
    start = datetime(year, first_month, 1, tzinfo=UTC)
    end_month = first_month + months
    end = datetime(year + (end_month - 1) // 12, (end_month - 1) % 12 + 1, 1, tzinfo=UTC)
    return Period(text, start, end)


class TaxEntry(msgspec.Struct, frozen=True):
    """One line's tax as posted: negative base and tax for a refund."""

    jurisdiction: str
    currency: str
    rate_bp: int
    reverse_charge: bool
    taxable_base: int
    tax: int
    posted_at: datetime
    invoice_id: str


class ReturnRow(msgspec.Struct, frozen=True):
    """Totals of one (jurisdiction, currency, rate, reverse charge) in the period."""

    jurisdiction: str
    currency: str
    rate_bp: int
    reverse_charge: bool
    taxable_base: int
    tax: int
    entries: int


class TaxReturn(msgspec.Struct, frozen=True):
    """A period's return: rows sorted by jurisdiction, currency, rate; totals per currency."""

    period: str
    jurisdiction: str | None
    rows: list[ReturnRow]
    tax_due: dict[str, int]


def aggregate(entries: Iterable[TaxEntry], period: Period, jurisdiction: str | None = None) -> TaxReturn:
    """Sum the entries posted in the period (optionally of one jurisdiction)."""
    sums: dict[tuple[str, str, int, bool], list[int]] = {}
    for entry in entries:
        if not period.start <= entry.posted_at < period.end:
            continue
        if jurisdiction is not None and entry.jurisdiction != jurisdiction:
            continue
        key = (entry.jurisdiction, entry.currency, entry.rate_bp, entry.reverse_charge)
        acc = sums.setdefault(key, [0, 0, 0])
        acc[0] += entry.taxable_base
        acc[1] += entry.tax
        acc[2] += 1
    rows = [ReturnRow(*key, base, tax, count) for key, (base, tax, count) in sorted(sums.items())]
    due: dict[str, int] = {}
    for row in rows:
        due[row.currency] = due.get(row.currency, 0) + row.tax
    return TaxReturn(period.label, jurisdiction, rows, due)


def to_csv(tax_return: TaxReturn) -> str:
    """The rows as CSV (`Accept: text/csv`), one header line, amounts in minor units."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in tax_return.rows:
        flag = "true" if row.reverse_charge else "false"
        writer.writerow(
            [row.jurisdiction, row.currency, row.rate_bp, flag, row.taxable_base, row.tax, row.entries]
        )
    return out.getvalue()
