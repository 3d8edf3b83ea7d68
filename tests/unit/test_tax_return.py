"""Tax return aggregation: periods, refunds crossing a period boundary, reverse charge, CSV."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from finance.tax_return import TaxEntry, aggregate, parse_period, to_csv
from ledger.errors import ErrorCode, Rejection


def at(month: int, day: int = 15, year: int = 2026) -> datetime:
    return datetime(year, month, day, 12, tzinfo=UTC)


def test_periods_are_half_open_utc_ranges() -> None:
    """Tried: quarters 1 and 4 (the year boundary), a month, December."""
    q3 = parse_period("2026-Q3")
    assert (q3.start, q3.end) == (datetime(2026, 7, 1, tzinfo=UTC), datetime(2026, 10, 1, tzinfo=UTC))
    q4 = parse_period("2026-Q4")
    assert q4.end == datetime(2027, 1, 1, tzinfo=UTC)
    sep = parse_period("2026-09")
    assert (sep.start, sep.end) == (datetime(2026, 9, 1, tzinfo=UTC), datetime(2026, 10, 1, tzinfo=UTC))
    assert parse_period("2026-12").end == datetime(2027, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    "bad", ["2026-Q5", "2026-Q0", "2026-13", "2026-00", "2026-9", "26-Q1", "2026Q1", "", "1969-01"]
)
def test_malformed_periods_are_validation_errors(bad: str) -> None:
    """Tried: quarter 5 and 0, month 13 and 00, one-digit month, two-digit year, no dash, empty, 1969."""
    with pytest.raises(Rejection) as caught:
        parse_period(bad)
    assert caught.value.code is ErrorCode.VALIDATION_ERROR and caught.value.details["field"] == "period"


def test_refund_crossing_the_period_boundary_reduces_the_later_period() -> None:
    """Tried: a DE sale of 10,000 at 19% in September (Q3), refunded half in October (Q4), a FR sale at
    5.5% in Q3, and a reverse-charge sale to an IE business in Q3 -> Q3 shows the full DE sale, Q4 the
    negative half; reverse charge has its own row with zero tax; the jurisdiction filter keeps only DE."""
    entries = [
        TaxEntry("DE", "EUR", 1900, False, 10_000, 1_900, at(9), "inv-1"),
        TaxEntry("DE", "EUR", 1900, False, -5_000, -950, at(10, 3), "inv-1"),
        TaxEntry("FR", "EUR", 550, False, 2_000, 110, at(8), "inv-2"),
        TaxEntry("DE", "EUR", 0, True, 7_000, 0, at(7, 1), "inv-3"),
        TaxEntry("DE", "EUR", 1900, False, 99, 19, at(6, 30), "inv-0"),  # Q2: outside
    ]
    q3 = aggregate(entries, parse_period("2026-Q3"))
    assert [
        (r.jurisdiction, r.rate_bp, r.reverse_charge, r.taxable_base, r.tax, r.entries) for r in q3.rows
    ] == [
        ("DE", 0, True, 7_000, 0, 1),
        ("DE", 1900, False, 10_000, 1_900, 1),
        ("FR", 550, False, 2_000, 110, 1),
    ]
    assert q3.tax_due == {"EUR": 2_010}
    q4_de = aggregate(entries, parse_period("2026-Q4"), "DE")
    assert [(r.taxable_base, r.tax) for r in q4_de.rows] == [(-5_000, -950)] and q4_de.tax_due == {
        "EUR": -950
    }
    assert to_csv(q4_de) == (
        "jurisdiction,currency,rate_bp,reverse_charge,taxable_base,tax,entries\nDE,EUR,1900,false,-5000,-950,1\n"
    )
