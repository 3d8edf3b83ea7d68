"""Property tests of the royalty split: exact sums, within one unit of the exact share, deterministic."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from fractions import Fraction

from hypothesis import given
from hypothesis import strategies as st

from finance import royalties
from finance.royalties import BP_TOTAL, Split


@st.composite
def rules(draw: st.DrawFn) -> tuple[list[Split], int, int]:
    count = draw(st.integers(1, royalties.SPLITS_MAX))
    cuts = sorted(draw(st.lists(st.integers(0, BP_TOTAL), min_size=count, max_size=count)))
    bounds = [0, *cuts, BP_TOTAL]
    weights = [b - a for a, b in itertools.pairwise(bounds)]
    ids = draw(
        st.lists(st.from_regex(r"[a-z0-9]{1,6}", fullmatch=True), min_size=count, max_size=count, unique=True)
    )
    splits = [Split(pid, bp) for pid, bp in zip(ids, weights[:count], strict=True)]
    holdback = draw(st.integers(0, BP_TOTAL))
    return splits, weights[count], holdback


@given(rules(), st.integers(0, 10**15))
def test_accrued_royalties_plus_platform_fee_equal_recognised_revenue(
    rule: tuple[list[Split], int, int], revenue: int
) -> None:
    splits, fee_bp, holdback_bp = rule
    shares, fee = royalties.split(revenue, splits, fee_bp)
    assert sum(shares) + fee == revenue
    assert all(s >= 0 for s in shares) and fee >= 0
    for share, s in zip(shares, splits, strict=True):
        assert abs(share - Fraction(revenue * s.share_bp, BP_TOTAL)) < 1
    assert abs(fee - Fraction(revenue * fee_bp, BP_TOTAL)) < 1
    assert royalties.split(revenue, splits, fee_bp) == (shares, fee)
    # the order the rule lists participants in does not change anyone's share
    turned, turned_fee = royalties.split(revenue, splits[::-1], fee_bp)
    assert (turned[::-1], turned_fee) == (shares, fee)

    start = datetime(2026, 1, 1, tzinfo=UTC)
    terms = royalties.Terms("sku", "s", start, tuple(splits), fee_bp, holdback_bp, 1)
    accruals, accrued_fee = royalties.accrue(revenue, terms)
    assert sum(a.amount for a in accruals) + accrued_fee == revenue
    assert all(0 <= a.holdback <= a.amount for a in accruals)
    entries = royalties.accrual_entries("s", accruals, "EUR")
    debits = sum(e["amount_cents"] for e in entries if e["side"] == "debit")
    credits = sum(e["amount_cents"] for e in entries if e["side"] == "credit")
    assert debits == credits == revenue - accrued_fee


@given(rules(), st.integers(1, 10**9), st.lists(st.integers(1, 10**6), min_size=1, max_size=8))
def test_clawbacks_of_any_partial_refunds_return_exactly_what_accrued(
    rule: tuple[list[Split], int, int], revenue: int, cuts: list[int]
) -> None:
    """Refunds that together reverse all recognised revenue claw back exactly each participant's
    accrual; after every refund each participant's cumulative clawback stays within [0, accrued],
    and every clawback journal balances."""
    splits, fee_bp, holdback_bp = rule
    terms = royalties.Terms(
        "sku", "s", datetime(2026, 1, 1, tzinfo=UTC), tuple(splits), fee_bp, holdback_bp, 1
    )
    accruals, _fee = royalties.accrue(revenue, terms)
    accrued = {a.participant_id: a.amount for a in accruals}
    total_cut = sum(cuts)
    parts = [revenue * c // total_cut for c in cuts]
    parts[-1] += revenue - sum(parts)
    parts = [p for p in parts if p > 0]
    clawed: dict[str, int] = {}
    reversed_so_far = 0
    for part in parts:
        so_far = royalties.Clawed(revenue, accrued, reversed_so_far, dict(clawed))
        amounts = royalties.clawback(part, so_far, terms)
        for pid, amount in amounts.items():
            clawed[pid] = clawed.get(pid, 0) + amount
            assert 0 <= clawed[pid] <= accrued[pid]
        entries = royalties.clawback_entries("s", amounts, "EUR")
        debits = sum(e["amount_cents"] for e in entries if e["side"] == "debit")
        assert debits == sum(e["amount_cents"] for e in entries if e["side"] == "credit")
        reversed_so_far += part
    assert clawed == accrued
