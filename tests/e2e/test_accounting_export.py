"""Accounting exports over HTTP (issue 8 item 2): `GET /finance/exports/journal.csv` turns the
journals the node posted in a window into Xero, QuickBooks Online or generic CSV, mapping ledger
accounts to external codes through the `LEDGER_ACCOUNT_MAP` file; every exported journal balances
and matches what the ledger stored."""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from ledger.money import CURRENCY_MINOR_UNITS
from tests.e2e.test_errors import Client, expect_ok, run
from tests.e2e.test_reconcile import _next_second, _now
from tests.support.node import NodeHarness, auth

MAP_TOML = """
xero_tax_rate = "No VAT"
[accounts]
"asset:ax-cash:*" = { code = "090", name = "Bank" }
"revenue:ax-sales:*" = { code = "200", name = "Sales" }
"liability:ax-vat" = { code = "820", name = "VAT Payable" }
"expense:ax-fees" = "404"
"""

JOURNALS: dict[str, list[tuple[str, str, int, str]]] = {
    "ax-sale-eur": [
        ("asset:ax-cash:stripe", "debit", 11900, "EUR"),
        ("revenue:ax-sales:books", "credit", 10000, "EUR"),
        ("liability:ax-vat", "credit", 1900, "EUR"),
    ],
    "ax-sale-jpy": [
        ("asset:ax-cash:jp", "debit", 16500, "JPY"),
        ("revenue:ax-sales:books", "credit", 16500, "JPY"),
    ],
    "ax-fee-bhd": [
        ("expense:ax-fees", "debit", 1234, "BHD"),
        ("asset:ax-cash:bh", "credit", 1234, "BHD"),
    ],
    "ax-fx": [
        ("asset:ax-cash:stripe", "debit", 500, "EUR"),
        ("revenue:ax-sales:fx", "credit", 500, "EUR"),
        ("asset:ax-cash:jp", "debit", 800, "JPY"),
        ("revenue:ax-sales:fx", "credit", 800, "JPY"),
    ],
}


def _body(journal_id: str, lines: list[tuple[str, str, int, str]]) -> dict[str, Any]:
    entries = [{"account_id": a, "side": s, "amount_cents": n, "currency": c} for a, s, n, c in lines]
    return {"journal_id": journal_id, "entries": entries, "memo": f"memo of {journal_id}", "source_ref": "ax"}


async def _csv(c: Client, params: dict[str, str], role: str = "auditor") -> tuple[int, Any]:
    async with c.http.get(f"{c.url}/finance/exports/journal.csv", params=params, headers=auth(role)) as r:
        if r.content_type == "text/csv":
            return r.status, list(csv.DictReader(io.StringIO(await r.text())))
        return r.status, await r.json()


def _minor(text: str, currency: str) -> int:
    return int(Decimal(text) * 10 ** CURRENCY_MINOR_UNITS[currency]) if text else 0


@pytest.fixture
def account_map(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "accounts.toml"
    path.write_text(MAP_TOML)
    monkeypatch.setenv("LEDGER_ACCOUNT_MAP", str(path))
    return path


def test_exports_balance_per_journal_and_match_the_ledger(node: NodeHarness, account_map: Path) -> None:
    """Tried: a journal before the window, then an EUR sale with VAT, a JPY sale, a BHD fee and an
    EUR+JPY journal -> generic: exactly the four journals of the window, every line as the ledger
    stored it (account, side, minor units), amounts in major units by exponent (JPY none, BHD 3);
    QuickBooks: one JournalNo per journal and currency, each balancing, accounts named by the map;
    Xero with currency=EUR: rows grouped by narration summing to zero with the map's codes and tax
    rate; Xero over two currencies -> 400 on $.query.currency; an account the map lacks -> 422
    ACCOUNT_UNMAPPED listing it (generic still exports it with an empty code)."""

    async def flow(c: Client) -> None:
        before = _body("ax-before", JOURNALS["ax-fee-bhd"])
        expect_ok(await c.post(before))
        start = _next_second()
        for journal_id, lines in JOURNALS.items():
            expect_ok(await c.post(_body(journal_id, lines)))
        params = {"from": start, "to": _now()}

        status, rows = await _csv(c, {**params, "format": "generic"})
        assert status == 200, rows
        assert {r["journal_id"] for r in rows} == set(JOURNALS)
        for journal_id in JOURNALS:
            stored = expect_ok(await c.call("GET", f"/ledger/{journal_id}", role="auditor"))["journal"]
            ledger = sorted(
                (e["account_id"], e["side"][0].upper(), e["amount_cents"], e["currency"])
                for e in stored["entries"]
            )
            exported = sorted(
                (r["account_id"], r["side"], int(r["amount_minor"]), r["currency"])
                for r in rows
                if r["journal_id"] == journal_id
            )
            assert exported == ledger, journal_id
            assert all(r["memo"] == f"memo of {journal_id}" for r in rows if r["journal_id"] == journal_id)
        jpy = [r for r in rows if r["journal_id"] == "ax-sale-jpy" and r["side"] == "D"]
        assert jpy[0]["debit"] == "16500" and jpy[0]["account_code"] == "090"

        status, rows = await _csv(c, {**params, "format": "quickbooks"})
        assert status == 200, rows
        sums: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for r in rows:
            sums[r["JournalNo"]][0] += _minor(r["Debits"], r["Currency"])
            sums[r["JournalNo"]][1] += _minor(r["Credits"], r["Currency"])
        assert set(sums) == {"ax-sale-eur", "ax-sale-jpy", "ax-fee-bhd", "ax-fx/EUR", "ax-fx/JPY"}
        assert all(debits == credits > 0 for debits, credits in sums.values()), sums
        bhd = [r for r in rows if r["JournalNo"] == "ax-fee-bhd"]
        assert [(r["AccountName"], r["Debits"], r["Credits"]) for r in bhd] == [
            ("404", "1.234", ""),
            ("Bank", "", "1.234"),
        ]

        status, rows = await _csv(c, {**params, "format": "xero", "currency": "EUR"})
        assert status == 200, rows
        totals: dict[str, int] = defaultdict(int)
        for r in rows:
            totals[r["Narration"]] += _minor(r["Amount"], "EUR")
        assert set(totals) == {"ax-sale-eur: memo of ax-sale-eur", "ax-fx: memo of ax-fx"}
        assert all(v == 0 for v in totals.values())
        sale = [
            (r["AccountCode"], r["TaxRate"], r["Amount"])
            for r in rows
            if r["Narration"].startswith("ax-sale")
        ]
        assert sale == [
            ("090", "No VAT", "119.00"),
            ("200", "No VAT", "-100.00"),
            ("820", "No VAT", "-19.00"),
        ]

        status, body = await _csv(c, {**params, "format": "xero"})
        assert status == 400 and body["error"]["details"]["field"] == "$.query.currency", body
        assert body["error"]["details"]["currencies"] == ["BHD", "EUR", "JPY"]

        account_map.write_text(MAP_TOML.replace('"expense:ax-fees" = "404"\n', ""))
        status, body = await _csv(c, {**params, "format": "quickbooks"})
        assert (status, body["error"]["code"]) == (422, "ACCOUNT_UNMAPPED"), body
        assert body["error"]["details"]["accounts"] == ["expense:ax-fees"]
        status, rows = await _csv(c, {**params, "format": "generic"})
        assert status == 200 and {
            r["account_code"] for r in rows if r["account_id"] == "expense:ax-fees"
        } == {""}

    run(node, flow)


def test_bad_queries_roles_and_a_broken_map(node: NodeHarness, account_map: Path) -> None:
    """Tried: from missing, from unparseable, a 30th of February, to before from, a 400-day window,
    format=sage, currency=XYZ -> 400 VALIDATION_ERROR naming `$.query.x`; a service token -> 403,
    operator, auditor and admin -> 200 with dates as bounds; a map file that is not TOML -> 503
    naming LEDGER_ACCOUNT_MAP."""
    good = {"from": "2026-01-01", "to": "2026-01-02T00:00:00Z", "format": "generic"}

    async def flow(c: Client) -> None:
        cases = [
            ({"from": ""}, "$.query.from"),
            ({"from": "yesterday"}, "$.query.from"),
            ({"from": "2026-02-30"}, "$.query.from"),
            ({"to": "2025-12-31"}, "$.query.to"),
            ({"to": "2027-02-05"}, "$.query.to"),
            ({"format": "sage"}, "$.query.format"),
            ({"currency": "XYZ"}, "$.query.currency"),
        ]
        for change, field in cases:
            status, body = await _csv(c, {**good, **change})
            assert status == 400, (change, body)
            assert (body["error"]["code"], body["error"]["details"]["field"]) == ("VALIDATION_ERROR", field)
        status, body = await _csv(c, good, role="service")
        assert (status, body["error"]["code"]) == (403, "NOT_AUTHORIZED")
        for role in ("operator", "auditor", "admin"):
            status, rows = await _csv(c, good, role=role)
            assert (status, rows) == (200, []), role
        account_map.write_text("accounts = [")
        status, body = await _csv(c, {**good, "format": "xero"})
        assert (status, body["error"]["code"]) == (503, "SERVICE_UNAVAILABLE"), body
        assert body["error"]["details"]["env"] == "LEDGER_ACCOUNT_MAP"

    run(node, flow)
