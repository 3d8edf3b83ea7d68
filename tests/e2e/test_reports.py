"""Finance reports and invoice PDFs over real HTTP, checked against the ledger's own balances.

A small marketplace history (invoices in EUR and USD, consumers taxed in DE and FR, a B2B EU
reverse-charge sale, full and partial payments, refunds before and after delivery, fulfilments
under a royalty rule with a holdback) is generated through the finance endpoints; every figure of
every report must equal the balance `GET /accounts/{id}/balances[?as_of=]` shows for the account
it stands for, totals must be the sums of the rows, CSV must carry the JSON rows, and a report as
of an earlier instant must leave out everything posted later.
"""

from __future__ import annotations

import asyncio
import csv
import io
from datetime import UTC, datetime
from typing import Any

from pypdf import PdfReader

from tests.e2e.test_errors import Client, expect_error, expect_ok, run
from tests.support.node import NodeHarness, auth

REPORTS = ("ar_aging", "ap", "deferred_revenue", "revenue", "outstanding_invoices", "payout_liabilities",
           "vat_owed", "cash_position")  # fmt: skip
AMOUNT_COLUMNS = {"ar_aging": "total", "ap": "amount", "deferred_revenue": "amount", "vat_owed": "amount",
                  "cash_position": "amount"}  # fmt: skip


def _invoice(invoice_id: str, currency: str, buyer: dict[str, Any], lines: list[tuple[str, int, int, str]],
             due: str | None = None) -> dict[str, Any]:  # fmt: skip
    body: dict[str, Any] = {
        "invoice_id": invoice_id,
        "buyer": buyer,
        "currency": currency,
        "line_items": [{"sku": s, "qty": q, "unit_price": p, "tax_code": t} for s, q, p, t in lines],
        "terms": "net 30",
    }
    if due is not None:
        body["due_date"] = due
    return body


def _money(invoice_id: str, amount: int, currency: str, reference: str) -> dict[str, Any]:
    return {"invoice_id": invoice_id, "amount": amount, "currency": currency, "payment_provider": "rptpay",
            "provider_reference": reference}  # fmt: skip


async def _create(c: Client, body: dict[str, Any]) -> dict[str, Any]:
    return expect_ok(await c.call("POST", "/finance/invoice", body=body), 201)


async def _pay(c: Client, invoice_id: str, amount: int, currency: str) -> None:
    expect_ok(
        await c.call("POST", "/finance/payment", body=_money(invoice_id, amount, currency, f"{invoice_id}-p"))
    )


async def _refund(c: Client, invoice_id: str, amount: int, currency: str) -> None:
    expect_ok(
        await c.call("POST", "/finance/refund", body=_money(invoice_id, amount, currency, f"{invoice_id}-r"))
    )


async def _fulfil(c: Client, invoice_id: str) -> None:
    expect_ok(await c.call("POST", "/finance/fulfill", body={"invoiceId": invoice_id}))


async def _history_before(c: Client) -> int:
    """Royalty rule, then A (EUR, DE, paid, fulfilled, partly refunded from revenue), B (EUR, FR,
    partly paid, long overdue), C (USD, DE, paid, partly refunded before delivery, fulfilled)."""
    for pid in ("rpt-alice", "rpt-bob"):
        body = {"participant_id": pid, "name": pid, "stripe_account": f"acct_{pid.replace('-', '')}"}
        expect_ok(await c.call("POST", "/finance/participants", body=body), 201)
    splits = [
        {"participant_id": "rpt-alice", "share_bp": 5000},
        {"participant_id": "rpt-bob", "share_bp": 3000},
    ]
    rule = {"sku": "rpt-course", "effective_from": "2020-01-01T00:00:00Z", "platform_fee_bp": 2000,
            "splits": splits, "holdback_bp": 1000, "holdback_days": 30}  # fmt: skip
    expect_ok(await c.call("POST", "/finance/royalty_rules", body=rule), 201)
    de, fr = {"buyer_id": "rpt-de", "country": "DE"}, {"buyer_id": "rpt-fr", "country": "FR"}
    a_lines = [("rpt-course", 2, 5000, "standard"), ("rpt-ebook", 1, 1000, "ebook")]
    a = await _create(c, _invoice("rpt-a", "EUR", de, a_lines, "2099-01-01"))
    await _pay(c, "rpt-a", a["total"], "EUR")
    await _fulfil(c, "rpt-a")
    await _refund(c, "rpt-a", 3000, "EUR")
    b = await _create(c, _invoice("rpt-b", "EUR", fr, [("rpt-course", 1, 4000, "standard")], "2020-01-01"))
    await _pay(c, "rpt-b", 1000, "EUR")
    assert b["total"] > 1000
    c_ = await _create(c, _invoice("rpt-c", "USD", de, [("rpt-course", 1, 7000, "standard")]))
    await _pay(c, "rpt-c", c_["total"], "USD")
    await _refund(c, "rpt-c", 2000, "USD")
    await _fulfil(c, "rpt-c")
    return int(a["total"]) + 1000 - 3000  # EUR cash at the provider


async def _history_after(c: Client) -> dict[str, Any]:
    """D (USD, FR, unpaid, due later) and E (EUR, B2B reverse charge to a DE company, paid)."""
    fr = {"buyer_id": "rpt-fr", "country": "FR"}
    await _create(c, _invoice("rpt-d", "USD", fr, [("rpt-ebook", 2, 1500, "ebook")], "2099-06-30"))
    company = {
        "buyer_id": "rpt-acme",
        "country": "DE",
        "vat_id": "DE123456789",
        "address": "Hauptstr. 1, Berlin",
    }
    e = await _create(c, _invoice("rpt-e", "EUR", company, [("rpt-course", 1, 10000, "standard"),
                                                            ("rpt-ebook", 3, 500, "ebook")]))  # fmt: skip
    assert e["reverse_charge"] is True and e["tax"] == 0
    await _pay(c, "rpt-e", e["total"], "EUR")
    return e


async def _raw(c: Client, path: str, params: dict[str, str] | None = None) -> tuple[int, str, bytes]:
    async with c.http.get(c.url + path, headers=auth("auditor"), params=params) as resp:
        return resp.status, resp.content_type, await resp.read()


async def _report(c: Client, name: str, **params: str) -> dict[str, Any]:
    reply = await c.call("GET", f"/finance/reports/{name}", role="auditor", params=params or None)
    report: dict[str, Any] = expect_ok(reply)["report"]
    assert report["name"] == name
    status, content_type, raw = await _raw(c, f"/finance/reports/{name}", {**params, "format": "csv"})
    assert (status, content_type) == (200, "text/csv"), raw[:300]
    parsed = list(csv.DictReader(io.StringIO(raw.decode())))
    assert next(csv.reader(io.StringIO(raw.decode()))) == report["columns"]
    assert parsed == [
        {k: "" if row[k] is None else str(row[k]) for k in report["columns"]} for row in report["rows"]
    ]
    return report


async def _balance(c: Client, account_id: str, currency: str, as_of: str | None) -> int:
    reply = await c.balances(account_id, **({"as_of": as_of} if as_of else {}))
    if reply.status == 404:
        return 0
    rows = [r for r in expect_ok(reply)["balances"] if r["currency"] == currency]
    return int(rows[0]["balance"]) if rows else 0


def _sums(rows: list[dict[str, Any]], columns: list[str]) -> dict[str, dict[str, int]]:
    sums: dict[str, dict[str, int]] = {}
    for row in rows:
        into = sums.setdefault(row["currency"], {})
        for column in columns:
            into[column] = into.get(column, 0) + row[column]
    return sums


async def _reconciles(c: Client, report: dict[str, Any], as_of: str | None) -> None:
    """Every figure equals the balance of the account(s) it stands for; totals are row sums."""
    name, rows, totals = report["name"], report["rows"], report["totals"]
    if name in AMOUNT_COLUMNS:
        column = AMOUNT_COLUMNS[name]
        for row in rows:
            assert row[column] == await _balance(c, row["account_id"], row["currency"], as_of), row
        assert {k: v[column] for k, v in _sums(rows, [column]).items()} == {
            k: v[column] for k, v in totals.items()
        }
    if name == "ar_aging":
        buckets = ["current", "1-30", "31-60", "61-90", "90+", "unallocated"]
        assert all(row["total"] == sum(row[b] for b in buckets) for row in rows)
        assert _sums(rows, [*buckets, "total"]) == totals
    if name == "payout_liabilities":
        for row in rows:
            if row["kind"] == "participant":
                pid, ccy = row["party"], row["currency"]
                assert row["payable"] == await _balance(c, f"liability:royalty:{pid}", ccy, as_of)
                assert row["holdback"] == await _balance(c, f"liability:royalty-holdback:{pid}", ccy, as_of)
            assert row["total"] == row["payable"] + row["holdback"] + row["in_transit"]
        assert _sums(rows, ["payable", "holdback", "in_transit", "total"]) == totals
    if name == "revenue":
        per_sku: dict[tuple[str, str], int] = {}
        for row in rows:
            assert row["net"] == row["sales"] - row["refunds"]
            per_sku[(row["sku"], row["currency"])] = (
                per_sku.get((row["sku"], row["currency"]), 0) + row["net"]
            )
        for (sku, ccy), net in per_sku.items():
            sales = await _balance(c, f"revenue:sales:{sku}", ccy, as_of)
            contra = await _balance(c, f"revenue:refunds:{sku}", ccy, as_of)  # credit-normal view: <= 0
            assert net == sales + contra, (sku, ccy)
        assert _sums(rows, ["sales", "refunds", "net"]) == totals
    if name == "outstanding_invoices":
        for ccy, values in totals.items():
            accounts = {r["account_id"] for r in rows if r["currency"] == ccy}
            ar = [await _balance(c, a, ccy, as_of) for a in accounts]
            assert values["receivables"] == sum(ar) == values["outstanding"] + values["unallocated"]
            assert values["outstanding"] == sum(r["outstanding"] for r in rows if r["currency"] == ccy)


def _cells(report: dict[str, Any], key: str, value: str) -> dict[tuple[str, str], int]:
    return {(r[key], r["currency"]): r[value] for r in report["rows"]}


async def _check_now(c: Client, e: dict[str, Any], eur_cash: int) -> None:
    """The figures of the whole history, and that they reconcile."""
    for name in REPORTS:
        report = await _report(c, name)
        assert report["rows"] and report["totals"], name
        await _reconciles(c, report, None)
    outstanding = await _report(c, "outstanding_invoices")
    assert {r["invoice_id"]: (r["outstanding"], r["bucket"]) for r in outstanding["rows"]} == {
        "rpt-b": (4800 - 1000, "90+"), "rpt-d": (3165, "current")}  # fmt: skip
    aging = await _report(c, "ar_aging")
    assert _cells(aging, "buyer_id", "90+") == {("rpt-fr", "EUR"): 3800, ("rpt-fr", "USD"): 0}
    vat = _cells(await _report(c, "vat_owed"), "jurisdiction", "amount")
    assert set(vat) == {("DE", "EUR"), ("DE", "USD"), ("FR", "EUR"), ("FR", "USD")}
    ap = await _report(c, "ap")
    assert {r["category"] for r in ap["rows"]} == {"royalty_payable", "royalty_holdback", "tax_payable"}
    payouts = await _report(c, "payout_liabilities", currency="EUR")
    assert {r["party"] for r in payouts["rows"]} == {"rpt-alice", "rpt-bob"} and set(payouts["totals"]) == {
        "EUR"
    }
    revenue = await _report(c, "revenue", period="day")
    assert {(r["sku"], r["currency"]) for r in revenue["rows"]} == {
        ("rpt-course", "EUR"), ("rpt-ebook", "EUR"), ("rpt-course", "USD")}  # fmt: skip
    assert any(r["refunds"] > 0 for r in revenue["rows"]) and revenue["period"] == "day"
    cash = _cells(await _report(c, "cash_position"), "provider", "amount")
    assert cash[("rptpay", "EUR")] == eur_cash + e["total"]


async def _check_earlier(c: Client, mid: str, eur_cash: int) -> None:
    """As of the instant between the two halves: D and E (posted later) are left out."""
    for name in REPORTS:
        await _reconciles(c, await _report(c, name, as_of=mid), mid)
    outstanding = await _report(c, "outstanding_invoices", as_of=mid)
    assert [r["invoice_id"] for r in outstanding["rows"]] == ["rpt-b"] and outstanding["as_of"] == mid
    vat = _cells(await _report(c, "vat_owed", as_of=mid), "jurisdiction", "amount")
    assert ("FR", "USD") not in vat
    cash = _cells(await _report(c, "cash_position", as_of=mid), "provider", "amount")
    assert cash[("rptpay", "EUR")] == eur_cash
    before = await _report(c, "ar_aging", as_of="2000-01-01T00:00:00Z")
    assert before["rows"] == [] and before["totals"] == {}


async def _check_errors(c: Client) -> None:
    path = "/finance/reports"
    expect_error(await c.call("GET", f"{path}/balance_sheet", role="auditor"), 404, "NOT_FOUND")
    bad = (({"as_of": "yesterday"}, "$.query.as_of"), ({"currency": "EURO"}, "$.query.currency"),
           ({"format": "xml"}, "$.query.format"), ({"period": "week"}, "$.query.period"))  # fmt: skip
    for params, field in bad:
        expect_error(await c.call("GET", f"{path}/revenue", role="auditor", params=params), 400,
                     "VALIDATION_ERROR", field)  # fmt: skip
    expect_error(await c.call("GET", f"{path}/ap", role="auditor", params={"period": "day"}), 400,
                 "VALIDATION_ERROR", "$.query.period")  # fmt: skip
    expect_error(await c.call("GET", f"{path}/ap", role=None), 401, "NOT_AUTHORIZED")
    for role in ("service", "operator", "admin"):
        expect_ok(await c.call("GET", f"{path}/cash_position", role=role))


async def _check_pdf(c: Client, e: dict[str, Any]) -> None:
    status, content_type, raw = await _raw(c, "/finance/invoice/rpt-e.pdf")
    assert (status, content_type) == (200, "application/pdf")
    assert raw == (await _raw(c, "/finance/invoice/rpt-e.pdf"))[2]  # same state, same bytes
    text = "\n".join(page.extract_text() for page in PdfReader(io.BytesIO(raw)).pages)
    for expected in ("Ledger Node marketplace", "Seller", "rpt-acme", "DE123456789", "Hauptstr. 1",
                     "rpt-course", "rpt-ebook", "reverse charge", "0%", "EUR 100.00", "EUR 15.00",
                     f"EUR {e['total'] // 100}.{e['total'] % 100:02d}",
                     "Article 196, Council Directive 2006/112/EC", "Paid in full"):  # fmt: skip
        assert expected in text, (expected, text)
    status, _, raw = await _raw(c, "/finance/invoice/rpt-b.pdf")
    b_text = "\n".join(p.extract_text() for p in PdfReader(io.BytesIO(raw)).pages)
    assert status == 200 and "19%" not in b_text and "20%" in b_text and "Amount due: EUR 38.00" in b_text
    assert "Article 196" not in b_text
    expect_error(await c.call("GET", "/finance/invoice/rpt-nope.pdf", role="auditor"), 404, "NOT_FOUND")
    assert expect_ok(await c.call("GET", "/finance/invoice/rpt-e", role="auditor"))["invoice_id"] == "rpt-e"


def test_reports_reconcile_to_balances_now_and_as_of_and_the_invoice_pdf(node: NodeHarness) -> None:
    """Tried: a generated marketplace history in two halves (EUR and USD invoices, DE/FR tax, a
    reverse-charge B2B sale, full and partial payments, refunds before and after delivery,
    fulfilments under a royalty rule with holdback) -> every report's figures equal the account
    balances now and as of the instant between the halves (which leaves the second half out),
    totals equal row sums, CSV equals JSON; bad query fields are 400 naming `$.query.*`, an unknown
    report 404; the reverse-charge invoice's PDF shows seller, buyer, VAT id, lines, rates, totals,
    the Article 196 wording and its payment status, deterministically; an unknown invoice 404."""

    async def flow(c: Client) -> None:
        eur_cash = await _history_before(c)
        await asyncio.sleep(0.05)
        mid = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        await asyncio.sleep(0.05)
        e = await _history_after(c)
        await _check_now(c, e, eur_cash)
        await _check_earlier(c, mid, eur_cash)
        await _check_errors(c)
        await _check_pdf(c, e)

    run(node, flow)
