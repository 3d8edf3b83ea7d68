"""Recognition schedules: policy validation, due times (calendar months), exact splits, shrinking."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from finance import recognition
from finance.recognition import Policy
from ledger.errors import Rejection

START = datetime(2026, 1, 31, 9, 30, tzinfo=UTC)


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"method": "straight"}, "$.recognition.method"),
        ({"periods": 3, "interval": "month"}, "$.recognition.method"),
        ({"method": "ratable", "interval": "month"}, "$.recognition.periods"),
        ({"method": "ratable", "periods": 0, "interval": "month"}, "$.recognition.periods"),
        ({"method": "ratable", "periods": 121, "interval": "month"}, "$.recognition.periods"),
        ({"method": "ratable", "periods": True, "interval": "month"}, "$.recognition.periods"),
        ({"method": "ratable", "periods": "3", "interval": "month"}, "$.recognition.periods"),
        ({"method": "ratable", "periods": 3, "interval": "year"}, "$.recognition.interval"),
        ({"method": "ratable", "periods": 3}, "$.recognition.interval"),
        ({"method": "ratable", "periods": 3, "interval": "month", "start": "x"}, "$.recognition.start"),
        ({"method": "on_delivery", "periods": 3}, "$.recognition.periods"),
        ([1, 2], "$.recognition"),
    ],
)
def test_bad_policies_name_the_field(raw: object, field: str) -> None:
    with pytest.raises(Rejection) as caught:
        recognition.parse_policy(raw)  # type: ignore[arg-type]
    assert caught.value.details["field"] == field


def test_policies_parse() -> None:
    assert recognition.parse_policy(None) is None
    assert recognition.parse_policy({"method": "on_delivery"}) is None
    parsed = recognition.parse_policy({"method": "ratable", "periods": 120, "interval": "week"})
    assert parsed == Policy("ratable", 120, "week")


def test_months_are_calendar_months_clamped_to_the_month_end() -> None:
    dues = [recognition.due_at(START, "month", k) for k in range(1, 5)]
    assert [d.date().isoformat() for d in dues] == ["2026-02-28", "2026-03-31", "2026-04-30", "2026-05-31"]
    assert all(d.time() == START.time() and d.tzinfo is UTC for d in dues)
    assert (
        recognition.due_at(datetime(2027, 11, 30, tzinfo=UTC), "month", 3).date().isoformat() == "2028-02-29"
    )
    assert recognition.due_at(START, "week", 2) == datetime(2026, 2, 14, 9, 30, tzinfo=UTC)
    assert recognition.due_at(START, "day", 1) == datetime(2026, 2, 1, 9, 30, tzinfo=UTC)


def test_split_gives_the_remainder_to_the_first_installments() -> None:
    assert recognition.split_evenly(1000, 3) == [334, 333, 333]
    assert recognition.split_evenly(1001, 3) == [334, 334, 333]
    assert recognition.split_evenly(2, 3) == [1, 1, 0]
    assert recognition.split_evenly(0, 2) == [0, 0]


def test_schedule_posting_and_shrinking() -> None:
    schedule = recognition.build(Policy("ratable", 3, "month"), START, [("a", 1000), ("b", 200)])
    assert [i.amounts for i in schedule.installments] == [(334, 67), (333, 67), (333, 66)]
    assert recognition.due(schedule, START) == []
    assert recognition.due(schedule, schedule.installments[1].due_at) == [1, 2]
    posted = recognition.mark_posted(schedule, 1, "inv.recognise.1", START)
    assert posted.recognised() == 401 and posted.remaining(0) == 666
    shrunk = recognition.shrink(posted, 0, 500)
    assert [i.amounts for i in shrunk.installments] == [(334, 67), (250, 67), (250, 66)]
    assert recognition.shrink(shrunk, 1, 0).remaining(1) == 0
    assert recognition.journal_id("inv-1", 3) == "inv-1.recognise.3"
