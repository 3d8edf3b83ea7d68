"""Unit tests for finance.fx: rate parsing, lookup by time, conversion, D2 completion, settlement."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from finance.fx import (
    FxLine,
    Rate,
    RateTable,
    complete_journal,
    from_base,
    parse_rate,
    settlement_lines,
    to_base,
)
from ledger.errors import HTTP_STATUS, ErrorCode, Rejection
from ledger.invariants import InvariantViolation
from ledger.journal import JournalIn, balance_by_currency, validate_journal

T0 = "2026-01-01T00:00:00Z"
T1 = "2026-01-02T00:00:00Z"
T2 = "2026-01-03T00:00:00Z"


def at(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def rate(quote: str, value: str, as_of: str = T0, base: str = "USD") -> Rate:
    return parse_rate(base, quote, value, "ecb", as_of)


def table(*rates: Rate, base: str = "USD") -> RateTable:
    rate_table = RateTable(base)
    for one in rates:
        rate_table.add(one)
    return rate_table


def rejected(call: object, *args: object, **kwargs: object) -> Rejection:
    with pytest.raises(Rejection) as info:
        call(*args, **kwargs)  # type: ignore[operator]
    return info.value


# Rate parsing


@pytest.mark.parametrize("text", ["1", "0.92", "150.25", "0.000123", "1.0842", "123456789.123456789"])
def test_rate_accepts_plain_positive_decimals(text: str) -> None:
    assert rate("EUR", text).rate == text


def test_rate_as_of_is_canonical_utc() -> None:
    assert rate("EUR", "1", "2026-01-01T01:00:00+01:00").as_of == "2026-01-01T00:00:00.000000Z"


@pytest.mark.parametrize(
    "text",
    ["0", "0.000", "-1", "+1", "1e3", "1E-2", "1.0E2", "", " 1", "1 ", "01.5", ".5", "1.", "nan", "inf",
     "1,5", "0x10", "1234567890.1234567891"],
)  # fmt: skip
def test_rate_rejects_anything_else(text: str) -> None:
    error = rejected(parse_rate, "USD", "EUR", text, "ecb", T0)
    assert error.code is ErrorCode.VALIDATION_ERROR
    assert error.details["field"] == "$.rate"


@pytest.mark.parametrize(
    ("base", "quote", "source", "as_of", "field"),
    [
        ("usd", "EUR", "ecb", T0, "$.base"),
        ("USD", "XXY", "ecb", T0, "$.quote"),
        ("USD", "USD", "ecb", T0, "$.quote"),
        ("USD", "EUR", "", T0, "$.source"),
        ("USD", "EUR", "ecb", "2026-01-01", "$.as_of"),
        ("USD", "EUR", "ecb", "2026-01-01T00:00:00", "$.as_of"),
    ],
)
def test_rate_names_the_bad_field(base: str, quote: str, source: str, as_of: str, field: str) -> None:
    error = rejected(parse_rate, base, quote, "1.1", source, as_of)
    assert (error.code, error.details["field"]) == (ErrorCode.VALIDATION_ERROR, field)


# Lookup by time


def test_lookup_returns_latest_rate_not_after_the_time() -> None:
    rates = table(rate("EUR", "0.93", T2), rate("EUR", "0.91", T0), rate("EUR", "0.92", T1))
    assert rates.at("EUR", at(T0)).rate == "0.91"
    assert rates.at("EUR", at("2026-01-02T23:59:59Z")).rate == "0.92"
    assert rates.at("EUR", at(T1)).rate == "0.92"
    assert rates.at("EUR", at("2027-01-01T00:00:00Z")).rate == "0.93"
    assert len(rates) == 3


@pytest.mark.parametrize(("quote", "when"), [("EUR", "2025-12-31T23:59:59Z"), ("GBP", T2)])
def test_missing_rate_is_fx_rate_missing_422(quote: str, when: str) -> None:
    error = rejected(table(rate("EUR", "0.9")).at, quote, at(when))
    assert error.code is ErrorCode.FX_RATE_MISSING
    assert error.http_status == 422 == HTTP_STATUS[ErrorCode.FX_RATE_MISSING]
    assert error.details["quote"] == quote


def test_adding_a_rate_twice_is_a_no_op_but_a_different_one_conflicts() -> None:
    rates = table(rate("EUR", "0.9"))
    rates.add(rate("EUR", "0.90"))
    assert len(rates) == 1
    assert rejected(rates.add, rate("EUR", "0.8")).code is ErrorCode.INVALID_STATE
    assert rejected(rates.add, rate("USD", "1.1", base="EUR")).code is ErrorCode.VALIDATION_ERROR


# Conversion


def test_to_base_converts_between_exponents() -> None:
    assert to_base(10000, "EUR", rate("EUR", "0.8")) == 12500  # EUR 100.00 -> USD 125.00
    assert to_base(15000, "JPY", rate("JPY", "150")) == 10000  # JPY 15000 -> USD 100.00
    assert to_base(1000, "KWD", rate("KWD", "0.25")) == 400  # KWD 1.000 -> USD 4.00
    assert to_base(1, "KWD", rate("KWD", "0.25")) == 0  # KWD 0.001 -> USD 0.004
    assert to_base(100, "USD", rate("USD", "4", base="KWD")) == 250  # USD 1.00 -> KWD 0.250
    assert to_base(1, "EUR", rate("EUR", "1", base="JPY")) == 0  # EUR 0.01 -> JPY 0.01


def test_from_base_converts_between_exponents() -> None:
    assert from_base(12500, "EUR", rate("EUR", "0.8")) == 10000
    assert from_base(10000, "JPY", rate("JPY", "150.5")) == 15050
    assert from_base(400, "KWD", rate("KWD", "0.25")) == 1000


@pytest.mark.parametrize(
    ("amount", "expected"), [(1, 0), (3, 2), (5, 2), (7, 4), (-1, 0), (-3, -2), (-5, -2)]
)
def test_to_base_rounds_ties_to_even(amount: int, expected: int) -> None:
    assert to_base(amount, "EUR", rate("EUR", "2")) == expected  # amount / 2 exactly on .5


@pytest.mark.parametrize(("cents", "yen"), [(1, 2), (3, 4), (5, 8), (7, 10)])
def test_from_base_rounds_ties_to_even(cents: int, yen: int) -> None:
    assert from_base(cents, "JPY", rate("JPY", "150")) == yen  # cents * 1.5 yen


def test_conversion_is_exact_for_long_rates() -> None:
    long_rate = rate("EUR", "0.123456789012345678")
    assert to_base(123456789012345678, "EUR", long_rate) == 10**18


# D2 completion

SALE = [
    FxLine("asset:cash", "debit", 10000, "EUR", rate_ts=T1),
    FxLine("revenue:sales", "credit", 11111, "USD"),
]


def completed(lines: list[FxLine], rates: RateTable) -> JournalIn:
    return JournalIn(entries=complete_journal(lines, rates).journal_lines())


def test_foreign_sale_is_completed_with_position_lines() -> None:
    result = complete_journal(SALE, table(rate("EUR", "0.9")))
    assert [(x.account_id, x.side, x.amount_cents, x.currency) for x in result.added] == [
        ("equity:fx-position:EUR", "credit", 10000, "EUR"),
        ("equity:fx-position:EUR", "debit", 11111, "USD"),
    ]
    assert result.residual_minor == 0
    assert result.lines[0].fx_rate == "0.9"
    assert result.lines[0].rate_ts == "2026-01-01T00:00:00.000000Z"
    journal = validate_journal(JournalIn(entries=result.journal_lines()))
    assert set(balance_by_currency(journal.lines).values()) == {0}


def test_rounding_residual_within_one_unit_per_foreign_line_goes_to_fx_rounding() -> None:
    lines = [SALE[0], FxLine("revenue:sales", "credit", 11112, "USD")]
    result = complete_journal(lines, table(rate("EUR", "0.9")))
    assert result.residual_minor == -1
    assert result.added[-1] == FxLine("expense:fx-rounding", "debit", 1, "USD")
    validate_journal(JournalIn(entries=result.journal_lines()))


def test_residual_beyond_tolerance_is_ledger_imbalance() -> None:
    lines = [SALE[0], FxLine("revenue:sales", "credit", 11113, "USD")]
    error = rejected(complete_journal, lines, table(rate("EUR", "0.9")))
    assert error.code is ErrorCode.LEDGER_IMBALANCE
    assert (error.details["residual_minor"], error.details["tolerance_minor"]) == (-2, 1)


def test_unbalanced_base_only_journal_is_ledger_imbalance() -> None:
    lines = [FxLine("asset:cash", "debit", 2, "USD"), FxLine("revenue:sales", "credit", 1, "USD")]
    assert rejected(complete_journal, lines, table()).code is ErrorCode.LEDGER_IMBALANCE


def test_node_rate_wins_a_different_client_rate_is_rejected() -> None:
    rates = table(rate("EUR", "0.9"))
    lines = [FxLine("asset:cash", "debit", 10000, "EUR", fx_rate="0.95", rate_ts=T1), SALE[1]]
    error = rejected(complete_journal, lines, rates)
    assert (error.code, error.details["field"]) == (ErrorCode.VALIDATION_ERROR, "$.entries[0].fx_rate")
    assert error.details["node_rate"] == "0.9"
    same_value = [FxLine("asset:cash", "debit", 10000, "EUR", fx_rate="0.900", rate_ts=T1), SALE[1]]
    assert complete_journal(same_value, rates).lines[0].fx_rate == "0.9"


def test_missing_node_rate_names_the_line() -> None:
    lines = [FxLine("asset:cash", "debit", 10000, "EUR", rate_ts="2025-01-01T00:00:00Z"), SALE[1]]
    error = rejected(complete_journal, lines, table(rate("EUR", "0.9")))
    assert (error.code, error.details["field"]) == (ErrorCode.FX_RATE_MISSING, "$.entries[0].rate_ts")


@pytest.mark.parametrize(
    ("line", "field"),
    [
        (FxLine("asset:cash", "debit", 10000, "EUR"), "$.entries[0].rate_ts"),
        (FxLine("asset:cash", "debit", 10000, "EUR", fx_rate="0.9"), "$.entries[0].rate_ts"),
        (FxLine("asset:cash", "debit", 10000, "EUR", rate_ts="yesterday"), "$.entries[0].rate_ts"),
        (FxLine("asset:cash", "debit", 10000, "EUR", fx_rate="9e-1", rate_ts=T1), "$.entries[0].fx_rate"),
        (FxLine("asset:cash", "debit", 11111, "USD", fx_rate="1", rate_ts=T1), "$.entries[0].fx_rate"),
        (FxLine("cash", "debit", 10000, "EUR", rate_ts=T1), "$.entries[0].account_id"),
        (FxLine("asset:cash", "debit", 0, "EUR", rate_ts=T1), "$.entries[0].amount_cents"),
        (FxLine("asset:cash", "debit", 10000, "EURO", rate_ts=T1), "$.entries[0].currency"),
    ],
)
def test_bad_foreign_line_is_validation_error(line: FxLine, field: str) -> None:
    error = rejected(complete_journal, [line, SALE[1]], table(rate("EUR", "0.9")))
    assert (error.code, error.details["field"]) == (ErrorCode.VALIDATION_ERROR, field)


def test_journal_balanced_per_currency_needs_no_rate_and_gets_no_lines() -> None:
    lines = [FxLine("asset:cash", "debit", 500, "EUR"), FxLine("revenue:sales", "credit", 500, "EUR")]
    result = complete_journal(lines, table())
    assert (result.added, result.residual_minor) == ((), 0)


def test_completing_a_completed_journal_adds_nothing() -> None:
    rates = table(rate("EUR", "0.9"))
    first = complete_journal(SALE, rates)
    again = complete_journal([*first.lines, *first.added], rates)
    assert again.added == ()


def test_jpy_and_kwd_lines_complete_in_base() -> None:
    rates = table(rate("JPY", "150"), rate("KWD", "0.3"))
    lines = [
        FxLine("asset:cash:jp", "debit", 1501, "JPY", rate_ts=T1),  # 1000.67 -> 1001 cents
        FxLine("asset:cash:kw", "debit", 1000, "KWD", rate_ts=T1),  # 333.33 -> 333 cents
        FxLine("revenue:sales", "credit", 1334, "USD"),
    ]
    result = complete_journal(lines, rates)
    assert result.residual_minor == 0
    assert [(x.account_id, x.amount_cents, x.currency) for x in result.added] == [
        ("equity:fx-position:JPY", 1501, "JPY"),
        ("equity:fx-position:JPY", 1001, "USD"),
        ("equity:fx-position:KWD", 1000, "KWD"),
        ("equity:fx-position:KWD", 333, "USD"),
    ]
    validate_journal(JournalIn(entries=result.journal_lines()))


# Realised FX gain/loss on settlement


def _summary(lines: list[FxLine] | tuple[FxLine, ...]) -> list[tuple[str, str, int, str]]:
    return [(x.account_id, x.side, x.amount_cents, x.currency) for x in lines]


@pytest.mark.parametrize(
    ("paid_usd", "expected"),
    [
        (11500, ("revenue:fx-gain:realised", "credit", 389, "USD")),  # B2 11500 - B1 11111
        (11000, ("expense:fx-loss:realised", "debit", 111, "USD")),
    ],
)
def test_eur_invoice_paid_in_usd_books_realised_gain_or_loss(
    paid_usd: int, expected: tuple[str, str, int, str]
) -> None:
    result = settlement_lines(
        base="USD",
        receivable_account="asset:ar",
        invoice_amount_minor=10000,
        invoice_currency="EUR",
        invoice_rate=rate("EUR", "0.9"),  # booked: EUR 100.00 = USD 111.11
        cash_account="asset:cash",
        paid_amount_minor=paid_usd,
        paid_currency="USD",
        paid_rate=None,
    )
    assert _summary(result.lines) == [
        ("asset:cash", "debit", paid_usd, "USD"),
        ("asset:ar", "credit", 10000, "EUR"),
        expected,
    ]
    assert _summary(result.added) == [
        ("equity:fx-position:EUR", "debit", 10000, "EUR"),
        ("equity:fx-position:EUR", "credit", 11111, "USD"),
    ]
    journal = validate_journal(JournalIn(entries=result.journal_lines()))
    assert set(balance_by_currency(journal.lines).values()) == {0}


def test_eur_invoice_paid_in_usd_with_a_third_base_currency() -> None:
    result = settlement_lines(
        base="GBP",
        receivable_account="asset:ar",
        invoice_amount_minor=10000,
        invoice_currency="EUR",
        invoice_rate=rate("EUR", "1.2", base="GBP"),  # B1 = GBP 83.33
        cash_account="asset:cash",
        paid_amount_minor=11000,
        paid_currency="USD",
        paid_rate=rate("USD", "1.25", T1, base="GBP"),  # B2 = GBP 88.00
    )
    assert ("revenue:fx-gain:realised", "credit", 467, "GBP") in _summary(result.lines)
    validate_journal(JournalIn(entries=result.journal_lines()))


def test_eur_invoice_paid_in_eur_at_a_later_rate_books_the_rate_difference() -> None:
    result = settlement_lines(
        base="USD",
        receivable_account="asset:ar",
        invoice_amount_minor=10000,
        invoice_currency="EUR",
        invoice_rate=rate("EUR", "0.9"),
        cash_account="asset:cash",
        paid_amount_minor=10000,
        paid_currency="EUR",
        paid_rate=rate("EUR", "0.8", T1),  # B2 = 12500
    )
    assert ("expense:fx-loss:realised", "debit", 0, "USD") not in _summary(result.lines)
    assert ("revenue:fx-gain:realised", "credit", 1389, "USD") in _summary(result.lines)
    validate_journal(JournalIn(entries=result.journal_lines()))


def test_settlement_rejects_a_missing_or_wrong_rate() -> None:
    kwargs: dict[str, object] = {
        "base": "USD",
        "receivable_account": "asset:ar",
        "invoice_amount_minor": 10000,
        "invoice_currency": "EUR",
        "cash_account": "asset:cash",
        "paid_amount_minor": 11000,
        "paid_currency": "USD",
        "paid_rate": None,
    }
    for bad in (None, rate("GBP", "0.8")):
        error = rejected(settlement_lines, invoice_rate=bad, **kwargs)
        assert (error.code, error.details["field"]) == (ErrorCode.VALIDATION_ERROR, "$.invoice_rate")


def test_rate_table_needs_aware_times() -> None:
    with pytest.raises(InvariantViolation, match="aware"):
        table(rate("EUR", "0.9")).at("EUR", datetime(2026, 1, 2))
    assert table(rate("EUR", "0.9")).at("EUR", datetime(2026, 1, 2, tzinfo=UTC)).rate == "0.9"
