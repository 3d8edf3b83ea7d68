"""Exact money arithmetic for finance: half-even rounding, rates in basis points, allocation.

Amounts are `int` minor units (see `ledger.money`); a rate is an `int` number of basis points
(1 bp = 0.01 %, so 19 % is 1900 and 5.5 % is 550). Every function here is exact integer
arithmetic: no float ever touches an amount, and `Decimal` is used only to parse a rate string.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Final

from ledger.invariants import check

BASIS_POINTS_PER_UNIT: Final = 10_000
"""A rate of 10,000 bp is 100 %."""


def divide_half_even(numerator: int, denominator: int) -> int:
    """`numerator / denominator` rounded to the nearest integer, ties to the even one (banker's rounding)."""
    check(denominator > 0, "divide_half_even: denominator must be positive")
    quotient, remainder = divmod(numerator, denominator)  # floor division: 0 <= remainder < denominator
    twice = 2 * remainder
    if twice > denominator or (twice == denominator and quotient % 2 == 1):
        quotient += 1
    return quotient


def apply_rate_bp(amount_minor: int, rate_bp: int) -> int:
    """`amount_minor * rate_bp / 10,000`, rounded half-even to a whole minor unit."""
    check(rate_bp >= 0, "apply_rate_bp: negative rate")
    return divide_half_even(amount_minor * rate_bp, BASIS_POINTS_PER_UNIT)


def parse_rate_percent(text: str) -> int:
    """A percent decimal string (`"19"`, `"5.5"`, `"13.5"`, `"6.25"`) as basis points.

    Raises `ValueError` for anything that is not a plain non-negative decimal with at most two
    decimal places, or above 100 %.
    """
    if not text or text.strip() != text or any(c not in "0123456789." for c in text):
        raise ValueError(f"rate {text!r} must be a plain decimal percent string like '19' or '5.5'")
    try:
        value = Decimal(text)
    except InvalidOperation as exc:
        raise ValueError(f"rate {text!r} is not a decimal") from exc
    scaled = value * 100
    if scaled != scaled.to_integral_value():
        raise ValueError(f"rate {text!r} has more than two decimal places (finer than 1 bp)")
    rate_bp = int(scaled)
    if not 0 <= rate_bp <= BASIS_POINTS_PER_UNIT:
        raise ValueError(f"rate {text!r} is outside 0..100 %")
    return rate_bp


def format_rate_percent(rate_bp: int) -> str:
    """Basis points as the shortest percent string (`1900` -> `"19"`, `550` -> `"5.5"`)."""
    whole, fraction = divmod(rate_bp, 100)
    if fraction == 0:
        return str(whole)
    return f"{whole}.{fraction:02d}".rstrip("0")


def allocate_proportional(amount: int, weights: list[int]) -> list[int]:
    """Split `amount` into shares proportional to `weights` that sum exactly to `amount`.

    Largest-remainder method: every share is `floor(amount * w / W)` and the units left over go,
    one each, to the largest fractional remainders (ties to the lowest index), so the result is
    deterministic. When `0 <= amount <= sum(weights)` no share exceeds its weight.
    """
    check(amount >= 0 and all(w >= 0 for w in weights), "allocate_proportional: negative input")
    total = sum(weights)
    if amount == 0:
        return [0] * len(weights)
    check(total > 0, "allocate_proportional: nothing to allocate over")
    shares = [amount * w // total for w in weights]
    remainders = [amount * w % total for w in weights]
    left = amount - sum(shares)
    order = sorted(range(len(weights)), key=lambda i: (-remainders[i], i))
    for i in order[:left]:
        shares[i] += 1
    check(sum(shares) == amount, "allocate_proportional: shares do not add up")
    return shares
