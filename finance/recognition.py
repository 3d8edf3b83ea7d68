"""Revenue recognition over time: the policy, the schedule of installments and its arithmetic.

Pure: no I/O, no clock (the caller passes the start time and `as_of`), no ids drawn here.

A fulfilment with a `ratable` policy `{method, periods, interval}` does not recognise on delivery:
the net still deferred per SKU is split into `periods` installments, installment `k` (1-based)
due at `start + k * interval` (start = the fulfilment time, UTC; `month` is a calendar month
counted from the start each time, the day clamped to the month's last day, so Jan 31 -> Feb 28
(29) -> Mar 31). Each SKU's amount is split with the largest-remainder method over equal weights:
every installment gets `amount // periods` and the first `amount % periods` installments one
minor unit more, so the installments sum exactly to the deferred amount, differ by at most one
unit and are the same for the same input.

A refund that takes net from what is still deferred shrinks the unposted installments of that
SKU (`shrink`): the new remainder is allocated over them in proportion to their current amounts
(largest remainder, ties to the earliest), so no installment grows and they still sum exactly.
Installment `k` is posted under the journal id `{invoice_id}.recognise.{k}` (`journal_id`).
"""

from __future__ import annotations

import calendar
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any, Final

import msgspec

from finance.money import allocate_proportional
from ledger.errors import validation_error
from ledger.invariants import check

PERIODS_MAX: Final = 120
"""At most this many installments (ten years of months)."""
METHODS: Final = ("on_delivery", "ratable")
INTERVALS: Final = ("day", "week", "month")
FIELD: Final = "$.recognition"


class Policy(msgspec.Struct, frozen=True):
    """A validated ratable policy: `periods` installments, one per `interval`."""

    method: str
    periods: int
    interval: str


class Installment(msgspec.Struct, frozen=True):
    """One installment: its due time, amount per SKU (aligned with `Schedule.skus`), and posting."""

    k: int
    due_at: datetime
    amounts: tuple[int, ...]
    posted: bool = False
    journal_id: str | None = None
    posted_at: datetime | None = None

    @property
    def amount(self) -> int:
        """The installment's total over its SKUs."""
        return sum(self.amounts)


class Schedule(msgspec.Struct, frozen=True):
    """A recognition schedule for one invoice."""

    method: str
    periods: int
    interval: str
    start_at: datetime
    skus: tuple[str, ...]
    installments: tuple[Installment, ...]

    def remaining(self, sku_index: int) -> int:
        """What is still scheduled (unposted) for one SKU."""
        return sum(i.amounts[sku_index] for i in self.installments if not i.posted)

    def recognised(self) -> int:
        """Everything posted so far."""
        return sum(i.amount for i in self.installments if i.posted)


def parse_policy(raw: Mapping[str, Any] | None) -> Policy | None:
    """The ratable policy of a `recognition` object, None for on-delivery; VALIDATION_ERROR naming
    the field (`$.recognition.method`, `.periods`, `.interval`, or an unknown key)."""
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise validation_error("recognition must be an object", FIELD)
    for key in raw:
        if key not in ("method", "periods", "interval"):
            raise validation_error(f"unknown field {key!r}", f"{FIELD}.{key}")
    method = raw.get("method")
    if method not in METHODS:
        raise validation_error(f"method must be one of {', '.join(METHODS)}", f"{FIELD}.method")
    if method == "on_delivery":
        for key in ("periods", "interval"):
            if key in raw:
                raise validation_error(f"{key} applies only to method ratable", f"{FIELD}.{key}")
        return None
    periods = raw.get("periods")
    if type(periods) is not int or not 1 <= periods <= PERIODS_MAX:
        raise validation_error(f"periods must be an integer from 1 to {PERIODS_MAX}", f"{FIELD}.periods")
    interval = raw.get("interval")
    if interval not in INTERVALS:
        raise validation_error(f"interval must be one of {', '.join(INTERVALS)}", f"{FIELD}.interval")
    return Policy(str(method), periods, str(interval))


def add_months(start: datetime, months: int) -> datetime:
    """`start` plus calendar months, the day clamped to the target month's last day."""
    index = start.month - 1 + months
    year, month = start.year + index // 12, index % 12 + 1
    day = min(start.day, calendar.monthrange(year, month)[1])
    return start.replace(year=year, month=month, day=day)


def due_at(start: datetime, interval: str, k: int) -> datetime:
    """When installment `k` falls due: `start + k * interval`."""
    check(k >= 0 and interval in INTERVALS, "due_at: bad installment or interval")
    if interval == "month":
        return add_months(start, k)
    return start + timedelta(days=k * (7 if interval == "week" else 1))


def split_evenly(amount: int, periods: int) -> list[int]:
    """`amount` in `periods` parts: `amount // periods` each, the first `amount % periods` one more."""
    check(amount >= 0 and periods >= 1, "split_evenly: negative amount or no periods")
    return allocate_proportional(amount, [1] * periods) if amount else [0] * periods


def build(policy: Policy, start: datetime, deferred: list[tuple[str, int]]) -> Schedule:
    """The schedule of `deferred` (SKU, amount) pairs under `policy` from `start`."""
    check(start.tzinfo is not None, "schedule start must be timezone-aware (UTC)")
    columns = [split_evenly(amount, policy.periods) for _, amount in deferred]
    installments = tuple(
        Installment(k + 1, due_at(start, policy.interval, k + 1), tuple(c[k] for c in columns))
        for k in range(policy.periods)
    )
    schedule = Schedule(
        policy.method,
        policy.periods,
        policy.interval,
        start,
        tuple(sku for sku, _ in deferred),
        installments,
    )
    for index, (_, amount) in enumerate(deferred):
        check(schedule.remaining(index) == amount, "schedule does not sum to the deferred amount")
    return schedule


def shrink(schedule: Schedule, sku_index: int, remaining: int) -> Schedule:
    """Reduce the SKU's unposted installments so they sum to `remaining` (never growing one)."""
    open_ks = [i.k for i in schedule.installments if not i.posted]
    weights = [schedule.installments[k - 1].amounts[sku_index] for k in open_ks]
    check(0 <= remaining <= sum(weights), "shrink: the remainder would grow the schedule")
    shares = dict(zip(open_ks, allocate_proportional(remaining, weights), strict=True))
    installments = tuple(
        i
        if i.posted
        else msgspec.structs.replace(
            i, amounts=tuple(shares[i.k] if s == sku_index else a for s, a in enumerate(i.amounts))
        )
        for i in schedule.installments
    )
    after = msgspec.structs.replace(schedule, installments=installments)
    check(after.remaining(sku_index) == remaining, "shrink: installments do not add up")
    return after


def due(schedule: Schedule, as_of: datetime) -> list[int]:
    """The unposted installments due at `as_of` (`due_at <= as_of`), in order."""
    return [i.k for i in schedule.installments if not i.posted and i.due_at <= as_of]


def mark_posted(schedule: Schedule, k: int, journal_id: str | None, posted_at: datetime) -> Schedule:
    """Installment `k` posted (under `journal_id`, None when it had nothing to post)."""
    current = schedule.installments[k - 1]
    check(current.k == k and not current.posted, "installment missing or already posted")
    done = msgspec.structs.replace(current, posted=True, journal_id=journal_id, posted_at=posted_at)
    installments = tuple(done if i.k == k else i for i in schedule.installments)
    return msgspec.structs.replace(schedule, installments=installments)


def journal_id(invoice_id: str, k: int) -> str:
    """The deterministic journal id of installment `k`."""
    return f"{invoice_id}.recognise.{k}"
