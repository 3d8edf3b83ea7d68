"""Payout schedules (finance/payout_schedule.py, LEDGER_PAYOUT_SCHEDULE): parsing and next run times."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from finance import payout_schedule
from finance.payout_schedule import Daily, Every


@pytest.mark.parametrize(
    ("text", "expected"),
    [(None, None), ("", None), ("off", None), (" off ", None), ("every:1", Every(1.0)),
     ("every:0.5", Every(0.5)), ("every:86400", Every(86400.0)), ("daily@00:00", Daily(0, 0)),
     ("daily@23:59", Daily(23, 59)), ("daily@06:30", Daily(6, 30))],
)  # fmt: skip
def test_accepted_schedules(text: str | None, expected: object) -> None:
    """Tried: off, every:<seconds> (integer and decimal), daily@HH:MM at both ends of the day."""
    parsed = payout_schedule.parse(text)
    assert parsed == expected
    if parsed is not None:
        assert payout_schedule.parse(payout_schedule.describe(parsed)) == parsed


@pytest.mark.parametrize(
    "text",
    ["on", "every", "every:", "every:0", "every:-5", "every:1e3", "every:99999999999", "every: 5",
     "daily", "daily@24:00", "daily@12:60", "daily@6:30", "daily@06:30Z", "weekly@mon"],
)  # fmt: skip
def test_malformed_schedules_are_refused_with_what_is_accepted(text: str) -> None:
    """Tried: words, missing or zero/negative/huge intervals, exponent notation, hours 24 and
    minutes 60, a one-digit hour, a zone suffix, another period -> ValueError naming the forms."""
    with pytest.raises(ValueError, match=r"every:<seconds>|daily@HH:MM"):
        payout_schedule.parse(text)


def test_next_run_times() -> None:
    """Tried: every:90 -> now + 90 s; daily@06:30 before, at and after 06:30 UTC -> today 06:30,
    tomorrow, tomorrow; a non-UTC `now` is compared in UTC; the payout date is the UTC date of
    the later of the due time and the wake-up time."""
    now = datetime(2026, 3, 1, 6, 0, tzinfo=UTC)
    assert payout_schedule.next_run(Every(90.0), now) == now + timedelta(seconds=90)
    daily = Daily(6, 30)
    assert payout_schedule.next_run(daily, now) == datetime(2026, 3, 1, 6, 30, tzinfo=UTC)
    at = datetime(2026, 3, 1, 6, 30, tzinfo=UTC)
    assert payout_schedule.next_run(daily, at) == datetime(2026, 3, 2, 6, 30, tzinfo=UTC)
    assert payout_schedule.next_run(daily, at + timedelta(hours=5)) == datetime(2026, 3, 2, 6, 30, tzinfo=UTC)

    plus_two = datetime(2026, 3, 1, 8, 15, tzinfo=timezone(timedelta(hours=2)))  # 06:15 UTC
    assert payout_schedule.next_run(daily, plus_two) == datetime(2026, 3, 1, 6, 30, tzinfo=UTC)
    midnight = datetime(2026, 3, 2, tzinfo=UTC)
    early = midnight - timedelta(milliseconds=2)
    assert payout_schedule.payout_date(midnight, early) == "2026-03-02"
    assert payout_schedule.payout_date(midnight, midnight + timedelta(minutes=1)) == "2026-03-02"
