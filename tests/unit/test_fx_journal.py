"""D2 completion of a client journal with FX fields (finance/fx_journal.py), pure."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from finance import fx, fx_journal
from ledger.errors import ErrorCode, Rejection
from ledger.journal import JournalIn, LineIn, balance_by_currency

TABLE = fx_journal.rate_table("USD", [fx.parse_rate("USD", "EUR", "0.9", "ecb", "2024-01-01T00:00:00Z")])


def _journal(**eur: str) -> JournalIn:
    return JournalIn(
        [
            LineIn("asset:cash", "debit", 1000, "EUR", {"order": "o-1", "fx_rate": "client"}, **eur),
            LineIn("revenue:sales", "credit", 1112, "USD"),
        ],
        journal_id="j-1",
    )


def test_completion_records_the_node_rate_and_adds_the_lines_in_order() -> None:
    journal = fx_journal.complete_client_journal(
        _journal(fx_rate="0.90", rate_ts="2024-06-01T00:00:00Z"), TABLE
    )
    assert [(line.account_id, line.side, line.amount, line.currency) for line in journal.lines] == [
        ("asset:cash", "debit", 1000, "EUR"),
        ("revenue:sales", "credit", 1112, "USD"),
        ("equity:fx-position:EUR", "credit", 1000, "EUR"),
        ("equity:fx-position:EUR", "debit", 1111, "USD"),
        ("expense:fx-rounding", "debit", 1, "USD"),
    ]
    assert journal.lines[0].meta == {
        "order": "o-1",
        "fx_rate": "0.9",
        "rate_ts": "2024-01-01T00:00:00.000000Z",
        "base_currency": "USD",
        "base_amount_cents": 1111,
    }
    assert not any(balance_by_currency(journal.lines).values())


@pytest.mark.parametrize(
    ("eur", "code", "field"),
    [
        (
            {"fx_rate": "0.91", "rate_ts": "2024-06-01T00:00:00Z"},
            ErrorCode.VALIDATION_ERROR,
            "$.entries[0].fx_rate",
        ),
        ({"rate_ts": "2023-06-01T00:00:00Z"}, ErrorCode.FX_RATE_MISSING, "$.entries[0].rate_ts"),
        ({"fx_rate": "0.9"}, ErrorCode.VALIDATION_ERROR, "$.entries[0].rate_ts"),
    ],
)
def test_refusals_name_the_line(eur: dict[str, str], code: ErrorCode, field: str) -> None:
    with pytest.raises(Rejection) as caught:
        fx_journal.complete_client_journal(_journal(**eur), TABLE)
    assert (caught.value.code, caught.value.details.get("field")) == (code, field)


def test_request_digest_is_the_client_payload() -> None:
    one = _journal(rate_ts="2024-06-01T00:00:00Z")
    assert fx_journal.request_digest(one) == fx_journal.request_digest(
        _journal(rate_ts="2024-06-01T00:00:00Z")
    )
    assert fx_journal.request_digest(one) != fx_journal.request_digest(
        _journal(rate_ts="2024-06-02T00:00:00Z")
    )
    wants = fx_journal.rate_wants(one, "USD")
    assert wants == {("EUR", datetime(2024, 6, 1, tzinfo=UTC))}
