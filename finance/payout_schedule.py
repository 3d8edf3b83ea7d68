"""Payout schedules (`LEDGER_PAYOUT_SCHEDULE`, DECISIONS D7): parsing and the next run time.

Pure: no I/O, no clock; the caller passes `now` (UTC).

- `off` (or unset): no scheduled runs.
- `every:<seconds>`: a run every so many seconds (a positive number), the first one interval
  after start-up.
- `daily@HH:MM`: a run every day at HH:MM UTC (00:00 to 23:59).

A scheduled run pays "all due" with `payout_date` = the UTC date of the run, so its batch id is
the date's default (`pb.{date}`): a second run on the same date resumes that batch instead of
planning another one, and a run that would plan no payout creates no batch (so `every:` keeps
looking until something is due).
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime, timedelta
from typing import Final

import msgspec

from ledger.invariants import check

ENV: Final = "LEDGER_PAYOUT_SCHEDULE"
EVERY_S_MAX: Final = 366 * 24 * 3600.0
"""`every:` intervals are at most a year (a longer one is a typo, not a schedule)."""
_EVERY: Final = re.compile(r"every:([0-9]+(?:\.[0-9]+)?)")
_DAILY: Final = re.compile(r"daily@([0-9]{2}):([0-9]{2})")


class Every(msgspec.Struct, frozen=True):
    """A run every `interval_s` seconds."""

    interval_s: float


class Daily(msgspec.Struct, frozen=True):
    """A run every day at `hour:minute` UTC."""

    hour: int
    minute: int


Schedule = Every | Daily


def parse(text: str | None) -> Schedule | None:
    """The schedule `text` describes, None for `off` or empty; ValueError saying what is accepted."""
    value = (text or "").strip()
    if value in ("", "off"):
        return None
    every = _EVERY.fullmatch(value)
    if every is not None:
        interval_s = float(every.group(1))
        if not 0 < interval_s <= EVERY_S_MAX:
            raise ValueError(f"every:<seconds> needs 0 < seconds <= {EVERY_S_MAX:.0f}, got {text!r}")
        return Every(interval_s)
    daily = _DAILY.fullmatch(value)
    if daily is not None:
        hour, minute = int(daily.group(1)), int(daily.group(2))
        if hour > 23 or minute > 59:
            raise ValueError(f"daily@HH:MM needs a time from 00:00 to 23:59 (UTC), got {text!r}")
        return Daily(hour, minute)
    raise ValueError(f"expected off, every:<seconds> or daily@HH:MM (UTC), got {text!r}")


def describe(schedule: Schedule | None) -> str:
    """The schedule as the environment spells it."""
    if schedule is None:
        return "off"
    if isinstance(schedule, Every):
        return f"every:{schedule.interval_s:g}"
    return f"daily@{schedule.hour:02d}:{schedule.minute:02d}"


def next_run(schedule: Schedule, now: datetime) -> datetime:
    """When the run after `now` is due: `now` + the interval, or the next HH:MM UTC strictly after `now`."""
    check(now.tzinfo is not None, "next_run: now must be timezone-aware")
    if isinstance(schedule, Every):
        check(math.isfinite(schedule.interval_s) and schedule.interval_s > 0, "every: positive interval")
        return now + timedelta(seconds=schedule.interval_s)
    utc = now.astimezone(UTC)
    at = utc.replace(hour=schedule.hour, minute=schedule.minute, second=0, microsecond=0)
    if at <= utc:
        at += timedelta(days=1)
    check(utc < at <= utc + timedelta(days=1), "daily: the next run is within a day")
    return at


def payout_date(due_at: datetime, now: datetime) -> str:
    """The payout date of a run due at `due_at` and started at `now`: the UTC date of the later
    of the two (a timer that wakes a little early never pays under the previous day)."""
    return max(due_at, now).astimezone(UTC).date().isoformat()
