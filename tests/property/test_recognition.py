"""Property tests: recognition schedules sum exactly, stay non-negative and are deterministic."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from finance import recognition
from finance.recognition import Policy

policies = st.builds(
    Policy,
    st.just("ratable"),
    st.integers(1, recognition.PERIODS_MAX),
    st.sampled_from(recognition.INTERVALS),
)
starts = st.datetimes(datetime(2000, 1, 1), datetime(2090, 1, 1), timezones=st.just(UTC))
amounts = st.lists(st.integers(0, 10**15), min_size=1, max_size=6)


@given(policies, starts, amounts)
def test_installments_sum_exactly_and_are_deterministic(
    policy: Policy, start: datetime, deferred: list[int]
) -> None:
    pairs = [(f"sku-{i}", a) for i, a in enumerate(deferred)]
    schedule = recognition.build(policy, start, pairs)
    assert schedule == recognition.build(policy, start, pairs)
    assert len(schedule.installments) == policy.periods
    for index, amount in enumerate(deferred):
        column = [i.amounts[index] for i in schedule.installments]
        assert sum(column) == amount
        assert all(x >= 0 for x in column) and max(column) - min(column) <= 1
    dues = [i.due_at for i in schedule.installments]
    assert dues == sorted(dues) and dues[0] > start
    assert all(
        d - start <= timedelta(days=31 * i.k) for d, i in zip(dues, schedule.installments, strict=True)
    )


@given(policies, starts, amounts, st.data())
def test_shrinking_keeps_sums_exact_and_never_grows(
    policy: Policy, start: datetime, deferred: list[int], data: st.DataObject
) -> None:
    schedule = recognition.build(policy, start, [(f"sku-{i}", a) for i, a in enumerate(deferred)])
    posted = data.draw(st.integers(0, policy.periods))
    for k in range(1, posted + 1):
        schedule = recognition.mark_posted(schedule, k, None, start)
    index = data.draw(st.integers(0, len(deferred) - 1))
    target = data.draw(st.integers(0, schedule.remaining(index)))
    shrunk = recognition.shrink(schedule, index, target)
    assert shrunk.remaining(index) == target
    for before, after in zip(schedule.installments, shrunk.installments, strict=True):
        assert all(0 <= a <= b for a, b in zip(after.amounts, before.amounts, strict=True))
        if before.posted:
            assert after == before
    assert recognition.shrink(schedule, index, target) == shrunk
