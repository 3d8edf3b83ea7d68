"""Property tests for D2: a journal balanced in base currency (within rounding) completes to one
that balances per currency and validates; a larger residual is LEDGER_IMBALANCE.

The client side is modelled independently of `finance.fx`: it converts with exact fractions and
rounds the total (floor, ceiling or half-even) or each line (half-up), as real clients do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from fractions import Fraction

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from finance.fx import FxLine, RateTable, complete_journal, parse_rate
from ledger.errors import ErrorCode, Rejection
from ledger.journal import JournalIn, balance_by_currency, validate_journal

AS_OF = "2026-03-01T00:00:00Z"
RATE_TS = "2026-03-02T12:00:00Z"
RATE_TIME = datetime(2026, 3, 2, 12, tzinfo=UTC)
EXPONENT = {"USD": 2, "EUR": 2, "GBP": 2, "JPY": 0, "KWD": 3, "BHD": 3}
FOREIGN_ACCOUNTS = ["asset:cash:fx", "liability:seller:1", "expense:fees", "revenue:sales:eu"]
BASE_ACCOUNTS = ["asset:cash", "revenue:sales", "liability:tax", "expense:cogs"]


@dataclass
class Case:
    base: str
    table: RateTable
    foreign: list[FxLine]
    exact_base: Fraction  # exact base value of the foreign lines, signed (debits positive)


def _exact_in_base(line: FxLine, base: str, rate: Fraction) -> Fraction:
    signed = line.amount_cents if line.side == "debit" else -line.amount_cents
    return Fraction(signed * 10 ** EXPONENT[base]) / (rate * 10 ** EXPONENT[line.currency])


def _decimal_text(digits: int, scale: int) -> str:
    """`digits / 10**scale` as a plain decimal string (`12345, 2` -> `123.45`)."""
    if scale == 0:
        return str(digits)
    return f"{digits // 10**scale}.{digits % 10**scale:0{scale}d}"


rates_text = st.builds(
    _decimal_text, st.integers(min_value=1, max_value=10**9), st.integers(min_value=0, max_value=8)
)


@st.composite
def cases(draw: st.DrawFn) -> Case:
    base = draw(st.sampled_from(["USD", "JPY", "KWD"]))
    currencies = draw(
        st.lists(st.sampled_from([c for c in EXPONENT if c != base]), min_size=1, max_size=3, unique=True)
    )
    table = RateTable(base)
    values: dict[str, Fraction] = {}
    for currency in currencies:
        text = draw(rates_text)
        table.add(parse_rate(base, currency, text, "test", AS_OF))
        values[currency] = Fraction(text)
    foreign = draw(
        st.lists(
            st.builds(
                FxLine,
                account_id=st.sampled_from(FOREIGN_ACCOUNTS),
                side=st.sampled_from(["debit", "credit"]),
                amount_cents=st.integers(min_value=1, max_value=10**12),
                currency=st.sampled_from(currencies),
                rate_ts=st.just(RATE_TS),
            ),
            min_size=1,
            max_size=12,
        )
    )
    in_base = [_exact_in_base(line, base, values[line.currency]) for line in foreign]
    assume(sum(abs(value) for value in in_base) < 2**61)  # the completed journal's sides fit int64
    exact = sum(in_base, Fraction(0))
    return Case(base, table, foreign, exact)


def _client_total(case: Case, mode: str) -> int:
    """The client's own base amount for the foreign lines."""
    if mode == "floor":
        return math.floor(case.exact_base)
    if mode == "ceil":
        return math.ceil(case.exact_base)
    if mode == "half_even":
        return round(case.exact_base)
    total = 0  # per line, half away from zero
    for line in case.foreign:
        value = _exact_in_base(line, case.base, case.table.at(line.currency, RATE_TIME).value)
        rounded = math.floor(abs(value) + Fraction(1, 2))
        total += rounded if value >= 0 else -rounded
    return total


def _base_lines(base: str, net: int, accounts: list[str]) -> list[FxLine]:
    """Base lines netting to `net` (debits minus credits), at least one line."""
    if net == 0:
        return [FxLine(accounts[0], "debit", 7, base), FxLine(accounts[1], "credit", 7, base)]
    side = "debit" if net > 0 else "credit"
    lines = [FxLine(accounts[0], side, abs(net), base)]
    if abs(net) > 1:  # split it in two
        half = abs(net) // 2
        lines = [FxLine(accounts[0], side, half, base), FxLine(accounts[1], side, abs(net) - half, base)]
    return lines


@settings(max_examples=300, deadline=None)
@given(
    case=cases(),
    mode=st.sampled_from(["floor", "ceil", "half_even", "per_line_half_up"]),
    accounts=st.permutations(BASE_ACCOUNTS),
    order=st.randoms(use_true_random=False),
)
def test_base_balanced_journal_completes_to_a_per_currency_balanced_journal(
    case: Case, mode: str, accounts: list[str], order: object
) -> None:
    lines = case.foreign + _base_lines(case.base, -_client_total(case, mode), accounts)
    order.shuffle(lines)  # type: ignore[attr-defined]
    result = complete_journal(lines, case.table)

    foreign_count = len(case.foreign)
    assert abs(result.residual_minor) <= foreign_count
    rounding = [x for x in result.added if x.account_id == "expense:fx-rounding"]
    assert sum(x.amount_cents for x in rounding) == abs(result.residual_minor)
    assert all(x.currency == case.base for x in rounding)
    assert all(x.account_id.startswith("equity:fx-position:") for x in result.added if x not in rounding)

    journal = validate_journal(JournalIn(entries=result.journal_lines()))
    assert set(balance_by_currency(journal.lines).values()) == {0}
    assert all(line.meta.get("fx_rate") for line in journal.lines[: len(lines)] if line.currency != case.base)
    # Completing again adds nothing: the stored journal already balances per currency.
    assert complete_journal([*result.lines, *result.added], case.table).added == ()


@settings(max_examples=200, deadline=None)
@given(
    case=cases(),
    excess=st.integers(min_value=1, max_value=10**6),
    sign=st.sampled_from([1, -1]),
    accounts=st.permutations(BASE_ACCOUNTS),
)
def test_residual_beyond_one_unit_per_foreign_line_is_ledger_imbalance(
    case: Case, excess: int, sign: int, accounts: list[str]
) -> None:
    # Start from the node's own per-line rounding (residual 0), then move it past the tolerance.
    exact_rounded = sum(
        round(_exact_in_base(line, case.base, case.table.at(line.currency, RATE_TIME).value))
        for line in case.foreign
    )
    off = sign * (len(case.foreign) + excess)
    lines = case.foreign + _base_lines(case.base, -exact_rounded + off, accounts)
    with pytest.raises(Rejection) as info:
        complete_journal(lines, case.table)
    assert info.value.code is ErrorCode.LEDGER_IMBALANCE
    assert abs(info.value.details["residual_minor"]) > len(case.foreign)
