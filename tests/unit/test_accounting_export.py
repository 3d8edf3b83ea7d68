"""Accounting export layouts (finance/accounting_export.py): Xero manual journals, QuickBooks Online
journal entries and the generic layout, the account map's rules and money in major units."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, timedelta, timezone

import pytest

from finance import accounting_export as ax
from finance.accounting_export import AccountMap, Journal, Line, Target

AT = datetime(2026, 3, 31, 23, 30, tzinfo=timezone(timedelta(hours=-2)))  # 2026-04-01 01:30 UTC
MAP = ax.parse_account_map(
    """
    xero_tax_rate = "No VAT"
    [accounts]
    "asset:cash:stripe:EUR" = { code = "090", name = "Stripe EUR" }
    "revenue:sales:*" = "200"
    "revenue:sales:ebooks:*" = { code = "210", name = "Sales:Ebooks" }
    "liability:tax:*" = { code = "820", name = "VAT", tax_rate = "Zero Rated" }
    "asset:ar:*" = "610"
    """,
    "map.toml",
)


def _sale(journal_id: str = "j-1", memo: str | None = "order 7") -> Journal:
    return Journal(
        journal_id,
        AT,
        (
            Line(0, "asset:cash:stripe:EUR", "EUR", "D", 11900),
            Line(1, "revenue:sales:books", "EUR", "C", 7000),
            Line(2, "revenue:sales:ebooks:pdf", "EUR", "C", 3000),
            Line(3, "liability:tax:DE", "EUR", "C", 1900),
        ),
        memo,
        "inv-7",
    )


def _read(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text)))


def test_major_units_use_the_currency_exponent() -> None:
    """Tried: EUR (2), JPY (0), BHD (3), KWD (3) and CLF (4) amounts, zero, one minor unit and a
    negative -> the ISO exponent's decimals, no float artefacts, sign kept."""
    assert ax.major_units(123456, "EUR") == "1234.56"
    assert ax.major_units(5, "EUR") == "0.05"
    assert ax.major_units(0, "EUR") == "0.00"
    assert ax.major_units(123456, "JPY") == "123456"
    assert ax.major_units(1, "BHD") == "0.001"
    assert ax.major_units(1234567, "KWD") == "1234.567"
    assert ax.major_units(12345, "CLF") == "1.2345"
    assert ax.major_units(-1999, "USD") == "-19.99"
    assert ax.major_units(2**63 - 1, "EUR") == "92233720368547758.07"


def test_xero_layout_header_rows_and_signs() -> None:
    """Tried: a four-line EUR sale posted 23:30 at UTC-2 -> Xero's manual journal header (D9),
    one row per line sharing Narration and the UTC date 2026-04-01, debits positive, credits
    negative summing to zero, codes by the map, the map's default tax rate unless the account
    sets its own."""
    rows = _read(ax.journal_csv([_sale()], "xero", MAP))
    assert rows[0] == list(ax.XERO_COLUMNS)
    assert rows[0] == [
        "Narration", "Date", "Description", "AccountCode", "TaxRate", "Amount",
        "TrackingName1", "TrackingOption1", "TrackingName2", "TrackingOption2",
    ]  # fmt: skip
    body = rows[1:]
    assert {r[0] for r in body} == {"j-1: order 7"} and {r[1] for r in body} == {"2026-04-01"}
    assert [(r[3], r[4], r[5]) for r in body] == [
        ("090", "No VAT", "119.00"),
        ("200", "No VAT", "-70.00"),
        ("210", "No VAT", "-30.00"),
        ("820", "Zero Rated", "-19.00"),
    ]
    assert body[1][2] == "revenue:sales:books: order 7" and body[0][6:] == ["", "", "", ""]
    assert sum(int(r[5].replace(".", "")) for r in body) == 0


def test_quickbooks_layout_header_rows_and_journal_numbers() -> None:
    """Tried: the same sale -> QuickBooks' journal entry header (D9), JournalNo = the journal id,
    Currency, account names from the map (the code when the map gives none), Debits or Credits
    filled, never both; a journal id longer than 21 characters -> a stable `J` + hash number,
    distinct for distinct ids."""
    rows = _read(ax.journal_csv([_sale()], "quickbooks", MAP))
    assert rows[0] == [
        "JournalNo", "JournalDate", "Currency", "AccountName", "Debits", "Credits",
        "Description", "Name", "Location", "Class",
    ]  # fmt: skip
    assert [r[:6] for r in rows[1:]] == [
        ["j-1", "2026-04-01", "EUR", "Stripe EUR", "119.00", ""],
        ["j-1", "2026-04-01", "EUR", "200", "", "70.00"],
        ["j-1", "2026-04-01", "EUR", "Sales:Ebooks", "", "30.00"],
        ["j-1", "2026-04-01", "EUR", "VAT", "", "19.00"],
    ]
    long_a, long_b = "payout.settle." + "a" * 40, "payout.settle." + "b" * 40
    numbers = {r[0] for r in _read(ax.journal_csv([_sale(long_a), _sale(long_b)], "quickbooks", MAP))[1:]}
    assert len(numbers) == 2 and all(len(n) == 21 and n.startswith("J") for n in numbers)
    again = {r[0] for r in _read(ax.journal_csv([_sale(long_a)], "quickbooks", MAP))[1:]}
    assert again <= numbers


def test_generic_layout_keeps_every_fact_and_needs_no_map() -> None:
    """Tried: the sale with an empty map -> generic rows with the ledger account, empty codes,
    minor and major amounts, side, memo and source reference; with the map -> codes and names."""
    rows = _read(ax.journal_csv([_sale()], "generic", AccountMap()))
    assert rows[0] == list(ax.GENERIC_COLUMNS)
    first = dict(zip(rows[0], rows[1], strict=True))
    assert first == {
        "journal_id": "j-1", "date": "2026-04-01", "posted_at": "2026-04-01T01:30:00Z", "line_no": "0",
        "account_id": "asset:cash:stripe:EUR", "account_code": "", "account_name": "", "currency": "EUR",
        "debit": "119.00", "credit": "", "amount_minor": "11900", "side": "D", "memo": "order 7",
        "source_ref": "inv-7",
    }  # fmt: skip
    mapped = _read(ax.journal_csv([_sale()], "generic", MAP))
    assert [(r[5], r[6]) for r in mapped[1:3]] == [("090", "Stripe EUR"), ("200", "")]


def test_multi_currency_journal_exports_one_balanced_journal_per_currency() -> None:
    """Tried: an FX journal with EUR and JPY lines (balancing per currency, D2) -> QuickBooks gets
    two journals (`id/EUR`, `id/JPY`), each balancing, JPY amounts without decimals; a journal
    that does not balance in a currency -> refused (never exported)."""
    mapping = ax.account_map({"fallback": "999"})
    fx = Journal(
        "fx-1",
        datetime(2026, 1, 2, tzinfo=UTC),
        (
            Line(0, "asset:cash:EUR", "EUR", "D", 1000),
            Line(1, "equity:fx-position:EUR", "EUR", "C", 1000),
            Line(2, "equity:fx-position:JPY", "JPY", "D", 1650),
            Line(3, "asset:cash:JPY", "JPY", "C", 1650),
        ),
    )
    rows = _read(ax.journal_csv([fx], "quickbooks", mapping))[1:]
    assert [(r[0], r[2], r[4], r[5]) for r in rows] == [
        ("fx-1/EUR", "EUR", "10.00", ""),
        ("fx-1/EUR", "EUR", "", "10.00"),
        ("fx-1/JPY", "JPY", "1650", ""),
        ("fx-1/JPY", "JPY", "", "1650"),
    ]
    assert ax.currencies([fx]) == ["EUR", "JPY"]
    broken = Journal("bad", fx.posted_at, fx.lines[:3])
    with pytest.raises(ValueError, match="does not balance in JPY"):
        ax.journal_csv([broken], "generic", mapping)


def test_map_rules_exact_then_longest_prefix_then_fallback() -> None:
    """Tried: an exact id beside a matching prefix -> the exact one; nested prefixes -> the longest;
    no rule -> the fallback, or None without one; Xero/QuickBooks with unmapped accounts ->
    `UnmappedAccounts` listing each once, sorted."""
    rules = ax.account_map(
        {"accounts": {"revenue:*": "400", "revenue:sales:*": "200", "revenue:sales:vip": "201"}}
    )
    assert rules.target("revenue:sales:vip") == Target("201")
    assert rules.target("revenue:sales:vip2") == Target("200")
    assert rules.target("revenue:fees") == Target("400")
    assert rules.target("expense:fees") is None
    with_fallback = ax.account_map({"accounts": {"revenue:*": "400"}, "fallback": {"code": "999"}})
    assert with_fallback.target("expense:fees") == Target("999")
    sales = _sale()
    with pytest.raises(ax.UnmappedAccounts) as caught:
        ax.journal_csv([sales, _sale("j-2")], "xero", rules)
    assert caught.value.accounts == ["asset:cash:stripe:EUR", "liability:tax:DE"]


@pytest.mark.parametrize(
    ("text", "name", "reason"),
    [
        ('{"accounts": {"revenue:*:x": "1"}}', "m.json", "'*' may only end"),
        ('{"accounts": {"*": "1"}}', "m.json", "'*' may only end"),
        ('{"accounts": {"revenue:x": 7}}', "m.json", "expected a code string"),
        ('{"accounts": {"revenue:x": {"code": "1", "colour": "red"}}}', "m.json", "unknown keys"),
        ('{"acounts": {}}', "m.json", "unknown top-level keys"),
        ("[1, 2]", "m.json", "top level must be an object"),
        ("{not json", "m.json", "m.json"),
        ("accounts = [", "m.toml", "m.toml"),
        ('{"xero_tax_rate": ""}', "m.json", "xero_tax_rate"),
    ],
)
def test_bad_map_files_are_refused_with_the_reason(text: str, name: str, reason: str) -> None:
    """Tried: a `*` inside a pattern, a bare `*`, a number as code, an unknown key, a typo at the top
    level, a list, broken JSON and TOML, an empty tax rate -> AccountMapError naming the problem."""
    with pytest.raises(ax.AccountMapError, match=reason):
        ax.parse_account_map(text, name)
