"""Unit tests of journal decoding and validation (`ledger.journal`)."""

from __future__ import annotations

from typing import Any

import pytest

from ledger.errors import ErrorCode, Rejection
from ledger.journal import (
    JournalIn,
    LineIn,
    balance_by_currency,
    decode_journal,
    validate_journal,
)
from ledger.money import INT64_MAX


def _line(account: str, side: str, amount: int, currency: str = "USD") -> LineIn:
    return LineIn(account_id=account, side=side, amount_cents=amount, currency=currency)  # type: ignore[arg-type]


def _pair(amount: int = 100, currency: str = "USD") -> list[LineIn]:
    return [
        _line("asset:cash", "debit", amount, currency),
        _line("equity:capital", "credit", amount, currency),
    ]


def _reject(raw: JournalIn) -> Rejection:
    with pytest.raises(Rejection) as info:
        validate_journal(raw)
    return info.value


def _decode(doc: dict[str, Any]) -> JournalIn:
    import json

    return decode_journal(json.dumps(doc).encode())


def test_two_lines_is_the_smallest_valid_journal() -> None:
    """A debit and a credit of the same amount validate, lines keep their order and number."""
    journal = validate_journal(JournalIn(entries=_pair()))
    assert [(ln.line_no, ln.account_id, ln.side) for ln in journal.lines] == [
        (0, "asset:cash", "debit"),
        (1, "equity:capital", "credit"),
    ]
    assert balance_by_currency(journal.lines) == {"USD": 0}


def test_one_line_is_rejected() -> None:
    """A journal with a single line is a VALIDATION_ERROR on `$.entries`."""
    error = _reject(JournalIn(entries=[_line("asset:cash", "debit", 1)]))
    assert error.code == ErrorCode.VALIDATION_ERROR
    assert error.details["field"] == "$.entries"


def test_no_lines_is_rejected() -> None:
    """An empty journal is rejected as a validation error, not as balanced."""
    assert _reject(JournalIn(entries=[])).code == ErrorCode.VALIDATION_ERROR


def test_256_lines_ok_and_257_rejected() -> None:
    """The upper bound on lines is 256 inclusive."""
    lines = [_line(f"asset:a{i}", "debit", 1) for i in range(128)]
    lines += [_line(f"revenue:r{i}", "credit", 1) for i in range(128)]
    assert len(validate_journal(JournalIn(entries=lines)).lines) == 256
    error = _reject(JournalIn(entries=[*lines, _line("asset:extra", "debit", 1)]))
    assert error.code == ErrorCode.VALIDATION_ERROR
    assert error.details["field"] == "$.entries"
    assert "257" in error.message


def test_amount_bounds_accepted() -> None:
    """Amounts 1 and 2**63-1 are valid minor-unit amounts."""
    for amount in (1, INT64_MAX):
        journal = validate_journal(JournalIn(entries=_pair(amount)))
        assert journal.lines[0].amount == amount


@pytest.mark.parametrize("amount", [0, -1, INT64_MAX + 1])
def test_amount_out_of_bounds_rejected_on_decode(amount: int) -> None:
    """0, negative and > int64 amounts are VALIDATION_ERRORs naming the line's amount field."""
    doc = {
        "entries": [
            {"account_id": "asset:cash", "side": "debit", "amount_cents": 5, "currency": "USD"},
            {"account_id": "equity:capital", "side": "credit", "amount_cents": amount, "currency": "USD"},
        ]
    }
    with pytest.raises(Rejection) as info:
        _decode(doc)
    assert info.value.code == ErrorCode.VALIDATION_ERROR
    assert info.value.details["field"] == "$.entries[1].amount_cents"


def test_float_amount_rejected_on_decode() -> None:
    """Money is never a float: 1.5 is a VALIDATION_ERROR."""
    doc = {
        "entries": [
            {"account_id": "asset:cash", "side": "debit", "amount_cents": 1.5, "currency": "USD"},
            {"account_id": "equity:capital", "side": "credit", "amount_cents": 1, "currency": "USD"},
        ]
    }
    with pytest.raises(Rejection) as info:
        _decode(doc)
    assert info.value.details["field"] == "$.entries[0].amount_cents"


def test_unknown_field_and_bad_side_rejected_on_decode() -> None:
    """Unknown fields and sides other than debit/credit name the offending field."""
    line = {"account_id": "asset:cash", "side": "debit", "amount_cents": 1, "currency": "USD"}
    with pytest.raises(Rejection) as info:
        _decode({"entries": [line, {**line, "side": "DEBIT"}]})
    assert info.value.details["field"] == "$.entries[1].side"
    with pytest.raises(Rejection) as info:
        _decode({"entries": [line, line], "colour": "red"})
    assert info.value.code == ErrorCode.VALIDATION_ERROR
    with pytest.raises(Rejection) as info:
        decode_journal(b"{not json")
    assert info.value.details["field"] == "$"


@pytest.mark.parametrize("currency", ["USD", "EUR", "JPY", "CHF", "BHD"])
def test_known_currencies_accepted(currency: str) -> None:
    """Active ISO 4217 codes validate."""
    assert validate_journal(JournalIn(entries=_pair(currency=currency))).lines[0].currency == currency


@pytest.mark.parametrize("currency", ["usd", "XYZ", "US", "USDD", "", "DEM"])
def test_unknown_currencies_rejected(currency: str) -> None:
    """Lower case, unknown, wrong-length and withdrawn codes are rejected naming the line's currency."""
    error = _reject(JournalIn(entries=_pair(currency=currency)))
    assert error.code == ErrorCode.VALIDATION_ERROR
    assert error.details["field"] == "$.entries[0].currency"


@pytest.mark.parametrize(
    "account",
    [
        "asset:cash",
        "liability:customer:42",
        "equity:capital",
        "revenue:sales.eu",
        "expense:fees_2024-Q1",
        "asset:" + "x" * 194,  # exactly 200 characters
    ],
)
def test_account_id_grammar_accepted(account: str) -> None:
    """`type:rest` with a known type and up to 200 characters of [A-Za-z0-9:._-] is an account id."""
    lines = [_line(account, "debit", 7), _line("equity:other", "credit", 7)]
    assert validate_journal(JournalIn(entries=lines)).lines[0].account_id == account


@pytest.mark.parametrize(
    "account",
    [
        "cash",
        "asset",
        "asset:",
        "Asset:cash",
        "assets:cash",
        "income:sales",
        "asset:ca sh",
        "asset:cash/1",
        "asset:caf\u00e9",
        "asset:" + "x" * 195,  # 201 characters
        "asset:cash\n",  # a trailing newline is not in the character set
    ],
)
def test_account_id_grammar_rejected(account: str) -> None:
    """Malformed account ids are VALIDATION_ERRORs naming the line's account_id."""
    lines = [_line("equity:other", "credit", 7), _line(account, "debit", 7)]
    error = _reject(JournalIn(entries=lines))
    assert error.code == ErrorCode.VALIDATION_ERROR
    assert error.details["field"] == "$.entries[1].account_id"


@pytest.mark.parametrize("journal_id", ["", "a b", "j/1", "x" * 201, "j1\n"])
def test_journal_id_grammar_rejected(journal_id: str) -> None:
    """A client journal_id is 1-200 characters of [A-Za-z0-9:._-]."""
    error = _reject(JournalIn(entries=_pair(), journal_id=journal_id))
    assert error.code == ErrorCode.VALIDATION_ERROR
    assert error.details["field"] == "$.journal_id"


def test_journal_id_of_200_characters_accepted() -> None:
    """The longest client journal id is accepted."""
    assert validate_journal(JournalIn(entries=_pair(), journal_id="j" * 200)).journal_id == "j" * 200


@pytest.mark.parametrize("ts", ["2024-05-01T12:00:00Z", "2024-05-01T12:00:00.123456+02:00"])
def test_ts_with_offset_accepted(ts: str) -> None:
    """An RFC 3339 timestamp with Z or an explicit offset is the effective time."""
    assert validate_journal(JournalIn(entries=_pair(), ts=ts)).effective_at == ts


@pytest.mark.parametrize("ts", ["2024-05-01T12:00:00", "2024-05-01", "yesterday", "2024-13-01T00:00:00Z"])
def test_ts_without_offset_or_malformed_rejected(ts: str) -> None:
    """A naive or malformed timestamp is a VALIDATION_ERROR on `$.ts`."""
    error = _reject(JournalIn(entries=_pair(), ts=ts))
    assert error.code == ErrorCode.VALIDATION_ERROR
    assert error.details["field"] == "$.ts"


def test_imbalance_reports_currency_and_totals() -> None:
    """Unequal debits and credits are LEDGER_IMBALANCE with the currency and both totals."""
    lines = [
        _line("asset:cash", "debit", 100),
        _line("equity:capital", "credit", 60),
        _line("revenue:sales", "credit", 30),
    ]
    error = _reject(JournalIn(entries=lines))
    assert error.code == ErrorCode.LEDGER_IMBALANCE
    assert error.details == {"currency": "USD", "debits": 100, "credits": 90}


def test_balance_is_per_currency() -> None:
    """Totals that match across currencies but not within one are still an imbalance."""
    lines = [_line("asset:cash", "debit", 100, "USD"), _line("equity:capital", "credit", 100, "EUR")]
    error = _reject(JournalIn(entries=lines))
    assert error.code == ErrorCode.LEDGER_IMBALANCE
    assert error.details == {"currency": "EUR", "debits": 0, "credits": 100}


def test_multi_currency_balanced_journal_ok() -> None:
    """Each currency balancing on its own is enough."""
    lines = [*_pair(5, "USD"), *_pair(7, "EUR")]
    journal = validate_journal(JournalIn(entries=lines))
    assert balance_by_currency(journal.lines) == {"USD": 0, "EUR": 0}


def test_validation_error_takes_precedence_over_imbalance() -> None:
    """An unbalanced journal with a bad field answers VALIDATION_ERROR, not LEDGER_IMBALANCE."""
    unbalanced = [_line("asset:cash", "debit", 100), _line("equity:capital", "credit", 1)]
    assert _reject(JournalIn(entries=unbalanced)).code == ErrorCode.LEDGER_IMBALANCE
    bad_currency = [unbalanced[0], _line("equity:capital", "credit", 1, "XXQ")]
    assert _reject(JournalIn(entries=bad_currency)).code == ErrorCode.VALIDATION_ERROR
    bad_account = [unbalanced[0], _line("nope:x", "credit", 1)]
    assert _reject(JournalIn(entries=bad_account)).code == ErrorCode.VALIDATION_ERROR
    assert _reject(JournalIn(entries=unbalanced, ts="2024-01-01T00:00:00")).code == ErrorCode.VALIDATION_ERROR
    assert _reject(JournalIn(entries=unbalanced, journal_id="bad id")).code == ErrorCode.VALIDATION_ERROR


def test_int64_overflow_of_a_side_total_is_a_validation_error() -> None:
    """Two debits of 2**63-1 overflow the per-side total: VALIDATION_ERROR, even though balanced."""
    lines = [
        _line("asset:a", "debit", INT64_MAX),
        _line("asset:b", "debit", INT64_MAX),
        _line("equity:c", "credit", INT64_MAX),
        _line("equity:d", "credit", INT64_MAX),
    ]
    error = _reject(JournalIn(entries=lines))
    assert error.code == ErrorCode.VALIDATION_ERROR
    assert error.details["currency"] == "USD"


def test_int64_overflow_beats_imbalance() -> None:
    """An overflowing side total is reported as VALIDATION_ERROR even when the journal is unbalanced."""
    lines = [
        _line("asset:a", "debit", INT64_MAX),
        _line("asset:b", "debit", 1),
        _line("equity:c", "credit", 5),
    ]
    assert _reject(JournalIn(entries=lines)).code == ErrorCode.VALIDATION_ERROR


def test_side_total_of_exactly_int64_max_is_fine() -> None:
    """Lines summing to exactly 2**63-1 on each side validate."""
    lines = [
        _line("asset:a", "debit", INT64_MAX - 1),
        _line("asset:b", "debit", 1),
        _line("equity:c", "credit", INT64_MAX),
    ]
    assert balance_by_currency(validate_journal(JournalIn(entries=lines)).lines) == {"USD": 0}
