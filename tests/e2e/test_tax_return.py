"""`GET /finance/tax/return/{period}` over real HTTP: the return reconciles to the ledger.

Invoices are issued, paid, partly refunded and voided through the finance endpoints; the return
for the current period must show each line's base and tax less the refund and the void, and its
tax due per jurisdiction must equal the balance of `liability:tax-payable:{jurisdiction}` that
the ledger itself reports (the module has its own node, so nothing else books those accounts).
"""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime
from typing import Any

from tests.e2e.test_errors import Client, expect_error, expect_ok, run
from tests.support.node import NodeHarness, auth, check_store


def _current_quarter() -> str:
    now = datetime.now(UTC)
    return f"{now.year}-Q{(now.month - 1) // 3 + 1}"


def _invoice(invoice_id: str, country: str) -> dict[str, Any]:
    return {
        "invoice_id": invoice_id,
        "buyer": {"buyer_id": f"{invoice_id}-buyer", "country": country},
        "line_items": [
            {"sku": f"{invoice_id}-a", "qty": 3, "unit_price": 1000, "tax_code": "standard"},
            {"sku": f"{invoice_id}-b", "qty": 1, "unit_price": 999, "tax_code": "ebook"},
        ],
        "currency": "EUR",
    }


def _money(invoice_id: str, amount: int, reference: str) -> dict[str, Any]:
    return {
        "invoice_id": invoice_id,
        "amount": amount,
        "currency": "EUR",
        "payment_provider": "bank",
        "provider_reference": reference,
    }


async def _tax_balance(c: Client, jurisdiction: str) -> int:
    reply = await c.balances(f"liability:tax-payable:{jurisdiction}")
    if reply.status == 404:
        return 0
    rows = [r for r in expect_ok(reply)["balances"] if r["currency"] == "EUR"]
    return int(rows[0]["balance"]) if rows else 0


async def _return(c: Client, period: str, role: str = "service", **params: str) -> dict[str, Any]:
    return expect_ok(await c.call("GET", f"/finance/tax/return/{period}", role=role, params=params))


def _rows(answer: dict[str, Any], jurisdiction: str) -> dict[int, dict[str, Any]]:
    return {r["rate_bp"]: r for r in answer["rows"] if r["jurisdiction"] == jurisdiction}


def test_return_shows_sales_less_refunds_and_voids_and_reconciles(node: NodeHarness) -> None:
    """Tried: DE and FR invoices issued and paid (FR 100 over, that credit refunded), 1000 of the
    DE one refunded, an NL one issued and voided -> the current quarter's DE rows are the lines
    less the refund's share (two entries each), FR rows the lines, NL rows zero; tax due per
    jurisdiction equals the tax-payable balance; the month gives the same; the CSV carries the
    same rows; 2020-Q1 is empty; an auditor may read; clean check."""

    async def flow(c: Client) -> None:
        views = {}
        for invoice_id, country in (("tr-de-1", "DE"), ("tr-fr-1", "FR"), ("tr-nl-1", "NL")):
            views[country] = expect_ok(
                await c.call("POST", "/finance/invoice", body=_invoice(invoice_id, country)), 201
            )
        for country in ("DE", "FR"):
            view = views[country]
            over = 100 if country == "FR" else 0
            paid = _money(view["invoice_id"], view["total"] + over, f"tr-pay-{country}")
            expect_ok(await c.call("POST", "/finance/payment", body=paid))
        # returning FR's overpaid credit reverses no sale: FR's rows keep one entry per line
        credit = expect_ok(await c.call("POST", "/finance/refund", body=_money("tr-fr-1", 100, "tr-re-fr")))
        assert (credit["credit"], credit["net"], credit["tax"]) == (100, 0, 0)
        refund = expect_ok(await c.call("POST", "/finance/refund", body=_money("tr-de-1", 1000, "tr-re-1")))
        assert refund["tax"] > 0 and refund["net"] + refund["tax"] == 1000
        expect_ok(await c.call("POST", "/finance/invoice/tr-nl-1/void"))

        quarter = _current_quarter()
        de = await _return(c, quarter, jurisdiction="DE")
        assert (de["period"], de["jurisdiction"]) == (quarter, "DE")
        lines = views["DE"]["line_items"]
        rows = _rows(de, "DE")
        assert set(rows) == {line["rate_bp"] for line in lines} and len(rows) == 2
        assert all(
            r["entries"] == 2 and r["currency"] == "EUR" and not r["reverse_charge"] for r in rows.values()
        )
        assert sum(r["taxable_base"] for r in rows.values()) == views["DE"]["subtotal"] - refund["net"]
        assert sum(r["tax"] for r in rows.values()) == views["DE"]["tax"] - refund["tax"]
        for line in lines:  # the refund reduces every line, never beyond it
            assert 0 < rows[line["rate_bp"]]["tax"] < line["tax"]
        assert de["tax_due"] == {"EUR": views["DE"]["tax"] - refund["tax"]}

        everything = await _return(c, quarter)
        assert everything["jurisdiction"] is None
        fr = _rows(everything, "FR")
        assert {bp: (r["taxable_base"], r["tax"], r["entries"]) for bp, r in fr.items()} == {
            line["rate_bp"]: (line["net"], line["tax"], 1) for line in views["FR"]["line_items"]
        }
        nl = _rows(everything, "NL")
        assert len(nl) == 2 and all(
            (r["taxable_base"], r["tax"], r["entries"]) == (0, 0, 2) for r in nl.values()
        )

        balances = {j: await _tax_balance(c, j) for j in ("DE", "FR", "NL")}
        assert balances["NL"] == 0
        for jurisdiction, balance in balances.items():
            assert sum(r["tax"] for r in everything["rows"] if r["jurisdiction"] == jurisdiction) == balance
        assert everything["tax_due"] == {"EUR": sum(balances.values())}

        month = datetime.now(UTC).strftime("%Y-%m")
        assert (await _return(c, month, role="auditor"))["rows"] == everything["rows"]
        assert await _return(c, "2020-Q1", role="auditor") == {
            "ok": True,
            "period": "2020-Q1",
            "jurisdiction": None,
            "rows": [],
            "tax_due": {},
        }

        headers = {**auth("auditor"), "Accept": "text/csv"}
        async with c.http.get(f"{c.url}/finance/tax/return/{quarter}", headers=headers) as resp:
            assert resp.status == 200 and resp.content_type == "text/csv"
            assert f"tax-return-{quarter}.csv" in resp.headers["Content-Disposition"]
            text = await resp.text()
        table = list(csv.DictReader(io.StringIO(text)))
        assert text.splitlines()[0] == "jurisdiction,currency,rate_bp,reverse_charge,taxable_base,tax,entries"
        assert [
            (r["jurisdiction"], int(r["rate_bp"]), r["reverse_charge"], int(r["taxable_base"]), int(r["tax"]))
            for r in table
        ] == [
            (r["jurisdiction"], r["rate_bp"], "false", r["taxable_base"], r["tax"])
            for r in everything["rows"]
        ]

    run(node, flow)
    assert node.run(check_store(node.dsn)) == []


def test_bad_period_and_jurisdiction_are_rejected(node: NodeHarness) -> None:
    """Tried: 2026-Q5, 2026-13, 'last-quarter', 1969-Q1 -> 400 VALIDATION_ERROR on `period`;
    jurisdiction 'de' and 'DEU' -> 400 on `jurisdiction`; no token -> 401."""

    async def flow(c: Client) -> None:
        for period in ("2026-Q5", "2026-13", "last-quarter", "1969-Q1"):
            reply = await c.call("GET", f"/finance/tax/return/{period}")
            expect_error(reply, 400, "VALIDATION_ERROR", "period")
        for jurisdiction in ("de", "DEU", "D"):
            reply = await c.call("GET", "/finance/tax/return/2026-Q1", params={"jurisdiction": jurisdiction})
            expect_error(reply, 400, "VALIDATION_ERROR", "jurisdiction")
        assert (await c.call("GET", "/finance/tax/return/2026-Q1", role=None)).status == 401

    run(node, flow)
