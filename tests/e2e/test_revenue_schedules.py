"""Ratable revenue recognition and refunds by line over real HTTP, read back from the ledger.

A ratable fulfilment posts nothing at once and attaches a schedule; `POST /finance/recognition/run`
posts each installment when due (deferred revenue -> revenue) exactly once; a refund takes its net
from what is still deferred first and shrinks the rest of the schedule. A refund by line reverses
that line's net and its own tax, which the tax return shows against the line's rate.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

from api.finance_routes import FINANCE
from finance import invoices, recognition
from finance.invoices import InvoiceStatus
from tests.e2e.test_errors import Client, expect_error, expect_ok, run
from tests.support.node import NodeHarness, check_store


async def _balance(c: Client, account_id: str) -> int:
    """The account's normal balance in EUR (0 for an account never booked)."""
    reply = await c.balances(account_id)
    if reply.status == 404:
        return 0
    rows = [r for r in expect_ok(reply)["balances"] if r["currency"] == "EUR"]
    return int(rows[0]["balance"]) if rows else 0


def _invoice(invoice_id: str, lines: list[tuple[str, int, int, str]]) -> dict[str, Any]:
    return {
        "invoice_id": invoice_id,
        "buyer": {"buyer_id": f"{invoice_id}-buyer", "country": "DE"},
        "line_items": [
            {"sku": sku, "qty": qty, "unit_price": price, "tax_code": code} for sku, qty, price, code in lines
        ],
        "currency": "EUR",
    }


def _money(invoice_id: str, amount: int, reference: str, **extra: Any) -> dict[str, Any]:
    return {
        "invoice_id": invoice_id,
        "amount": amount,
        "currency": "EUR",
        "payment_provider": "bank",
        "provider_reference": reference,
        **extra,
    }


async def _paid_invoice(c: Client, invoice_id: str, lines: list[tuple[str, int, int, str]]) -> dict[str, Any]:
    view = expect_ok(await c.call("POST", "/finance/invoice", body=_invoice(invoice_id, lines)), 201)
    expect_ok(
        await c.call("POST", "/finance/payment", body=_money(invoice_id, view["total"], f"{invoice_id}-pay"))
    )
    return view


async def _run(c: Client, as_of: str | None = None, role: str = "service") -> list[dict[str, Any]]:
    body = {} if as_of is None else {"as_of": as_of}
    answer = expect_ok(await c.call("POST", "/finance/recognition/run", body=body, role=role))
    assert answer["failed"] == []
    return list(answer["posted"])


async def _entries(c: Client, journal_id: str) -> set[tuple[str, str, int]]:
    shown = expect_ok(await c.call("GET", f"/ledger/{journal_id}", role="auditor"))["journal"]
    return {(e["account_id"], e["side"], e["amount_cents"]) for e in shown["entries"]}


def test_ratable_schedule_posts_each_installment_once_and_refunds_shrink_it(node: NodeHarness) -> None:
    """Tried: bad policies (method, periods 0 and 121, interval, unknown key) -> 400 naming the
    field; a 3-month ratable fulfilment (fulfilled, no journal, 3 x 1000 due a month apart);
    runs before, at and again at the first due time (1000 posted once under rs-1.recognise.1);
    two racing runs at the second due time after a one-unit line refund that shrank installments
    2 and 3 to 500 each (posted once between them); the last installment; revenue, deferred and
    the invoice's schedule agree; close; the audit trail; auditor 403; bad as_of 400; clean check."""

    async def flow(c: Client) -> None:
        await _paid_invoice(c, "rs-1", [("rs-a", 3, 1000, "standard")])  # net 3000, tax 570
        bad = [
            ({"method": "monthly"}, "$.recognition.method"),
            ({"method": "ratable", "periods": 0, "interval": "month"}, "$.recognition.periods"),
            ({"method": "ratable", "periods": 121, "interval": "month"}, "$.recognition.periods"),
            ({"method": "ratable", "periods": 3, "interval": "fortnight"}, "$.recognition.interval"),
            ({"method": "ratable", "periods": 3, "interval": "month", "from": "x"}, "$.recognition.from"),
        ]
        for policy, field in bad:
            reply = await c.call(
                "POST", "/finance/fulfill", body={"invoiceId": "rs-1", "recognition": policy}
            )
            expect_error(reply, 400, "VALIDATION_ERROR", field)
        assert expect_ok(await c.call("GET", "/finance/invoice/rs-1"))["status"] == "paid"

        policy = {"method": "ratable", "periods": 3, "interval": "month"}
        before = datetime.now(UTC)
        made = expect_ok(
            await c.call("POST", "/finance/fulfill", body={"invoiceId": "rs-1", "recognition": policy})
        )
        assert (made["status"], made["journal_id"]) == ("fulfilled", None)
        schedule = made["recognition"]
        assert (schedule["method"], schedule["periods"], schedule["interval"]) == ("ratable", 3, "month")
        assert (schedule["recognised"], schedule["deferred"]) == (0, 3000)
        start = datetime.fromisoformat(schedule["start_at"])
        assert before - timedelta(seconds=5) <= start <= datetime.now(UTC) + timedelta(seconds=5)
        dues = [i["due_at"] for i in schedule["installments"]]
        assert dues == [
            recognition.due_at(start, "month", k).strftime("%Y-%m-%dT%H:%M:%S.%fZ") for k in (1, 2, 3)
        ]
        assert [(i["amount"], i["posted"], i["journal_id"]) for i in schedule["installments"]] == [
            (1000, False, None)
        ] * 3
        assert await _balance(c, "revenue:sales:rs-a") == 0
        assert await _balance(c, "liability:deferred-revenue:rs-a") == 3000

        assert await _run(c) == []  # nothing due yet
        first = await _run(c, dues[0])
        assert [(p["invoice_id"], p["k"], p["journal_id"], p["amount"]) for p in first] == [
            ("rs-1", 1, "rs-1.recognise.1", 1000)
        ]
        assert await _entries(c, "rs-1.recognise.1") == {
            ("liability:deferred-revenue:rs-a", "debit", 1000),
            ("revenue:sales:rs-a", "credit", 1000),
        }
        assert await _run(c, dues[0]) == []  # a second run posts nothing
        assert await _balance(c, "revenue:sales:rs-a") == 1000
        assert await _balance(c, "liability:deferred-revenue:rs-a") == 2000

        # a refund midway: its net comes out of what is still deferred; installments 2, 3 shrink
        line = {"line": 0, "qty": 1}
        refund = expect_ok(
            await c.call("POST", "/finance/refund", body=_money("rs-1", 1190, "rs-1-re", lines=[line]))
        )
        assert (refund["net"], refund["tax"], refund["net_from_deferred"], refund["net_from_contra"]) == (
            1000,
            190,
            1000,
            0,
        )
        shown = expect_ok(await c.call("GET", "/finance/invoice/rs-1"))
        assert [i["amount"] for i in shown["recognition"]["installments"]] == [1000, 500, 500]
        assert await _balance(c, "liability:deferred-revenue:rs-a") == 1000

        racing = await asyncio.gather(_run(c, dues[1]), _run(c, dues[1]))
        posted = [p for run_posted in racing for p in run_posted]
        assert [(p["k"], p["journal_id"], p["amount"]) for p in posted] == [(2, "rs-1.recognise.2", 500)]
        expect_error(await c.call("POST", "/finance/invoice/rs-1/close"), 409, "INVALID_STATE")
        last = await _run(c, dues[2])
        assert [(p["k"], p["amount"]) for p in last] == [(3, 500)]
        assert await _balance(c, "revenue:sales:rs-a") == 2000
        assert await _balance(c, "liability:deferred-revenue:rs-a") == 0
        assert await _balance(c, "revenue:refunds:rs-a") == 0

        shown = expect_ok(await c.call("GET", "/finance/invoice/rs-1", role="auditor"))
        assert (shown["recognition"]["recognised"], shown["recognition"]["deferred"]) == (2000, 0)
        assert [i["journal_id"] for i in shown["recognition"]["installments"]] == [
            f"rs-1.recognise.{k}" for k in (1, 2, 3)
        ]
        assert all(i["posted"] and i["posted_at"] for i in shown["recognition"]["installments"])
        assert {f"rs-1.recognise.{k}" for k in (1, 2, 3)} <= set(shown["journal_ids"])
        assert shown["line_refunds"][0] == {
            "line": 0,
            "sku": "rs-a",
            "refunded_net": 1000,
            "refunded_tax": 190,
            "remaining_net": 2000,
            "remaining_tax": 380,
        }
        # a refund of what was recognised now goes through contra revenue
        rest = expect_ok(await c.call("POST", "/finance/refund", body=_money("rs-1", 1190, "rs-1-re-2")))
        assert (rest["net_from_deferred"], rest["net_from_contra"]) == (0, 1000)
        assert await _balance(c, "revenue:refunds:rs-a") == -1000  # a debit on a revenue account
        assert expect_ok(await c.call("POST", "/finance/invoice/rs-1/close"))["status"] == "closed"

        expect_error(
            await c.call("POST", "/finance/recognition/run", body={}, role="auditor"), 403, "NOT_AUTHORIZED"
        )
        bad_as_of = await c.call("POST", "/finance/recognition/run", body={"as_of": "tomorrow"})
        expect_error(bad_as_of, 400, "VALIDATION_ERROR", "$.as_of")

        await asyncio.sleep(0.5)  # audit events are committed right after the answer
        events = expect_ok(await c.call("GET", "/audit/events", role="auditor", params={"limit": "1000"}))
        runs = [e["payload"] for e in events["events"] if e["event_type"] == "revenue.recognition_run"]
        posted_ids = [p["journal_id"] for run_payload in runs for p in run_payload["posted"]]
        assert posted_ids == [f"rs-1.recognise.{k}" for k in (1, 2, 3)]
        assert all(r["trigger"] == "api" for r in runs) and len(runs) >= 6
        fulfilled = [e["payload"] for e in events["events"] if e["event_type"] == "invoice.fulfilled"]
        assert any(p.get("recognition") == policy and len(p["installments"]) == 3 for p in fulfilled)

    run(node, flow)
    assert node.run(check_store(node.dsn)) == []


def test_an_installment_posted_before_a_crash_is_not_posted_twice(node: NodeHarness) -> None:
    """Tried: installment 1's journal posted under its id but the invoice not updated (a crash
    between the two), for two invoices -> for rs-2 the next run replays the stored journal
    (revenue moves once); for rs-3 a refund comes first: it stores the crashed installment as
    posted, then takes its net from what is really still deferred (installment 2 shrinks to 0,
    posted later without a journal); clean check."""

    async def setup(c: Client) -> None:
        for invoice_id in ("rs-2", "rs-3"):
            await _paid_invoice(c, invoice_id, [(f"{invoice_id}-sku", 2, 1500, "standard")])
            policy = {"method": "ratable", "periods": 2, "interval": "week"}
            body = {"invoice_id": invoice_id, "recognition": policy}
            expect_ok(await c.call("POST", "/finance/fulfill", body=body))

    run(node, setup)
    assert node.node is not None and node.node.runner is not None
    finance = node.node.runner.app[FINANCE]

    async def crash_after_posting(invoice_id: str) -> str:
        invoice, _ = await finance._load(invoice_id, InvoiceStatus.FULFILLED)
        step = invoices.recognise(invoice, 1, datetime.now(UTC))
        assert step.journal is not None
        return await finance._post(step.journal, recognition.journal_id(invoice_id, 1), "service")

    for invoice_id in ("rs-2", "rs-3"):
        assert node.run(crash_after_posting(invoice_id)) == f"{invoice_id}.recognise.1"

    async def resume(c: Client) -> None:
        assert await _balance(c, "revenue:sales:rs-2-sku") == 1500
        shown = expect_ok(await c.call("GET", "/finance/invoice/rs-2"))
        dues = [i["due_at"] for i in shown["recognition"]["installments"]]
        refund = _money("rs-3", 1785, "rs-3-re", lines=[{"line": 0, "qty": 1}])
        answer = expect_ok(await c.call("POST", "/finance/refund", body=refund))
        assert (answer["net_from_deferred"], answer["net_from_contra"]) == (1500, 0)
        rs3 = expect_ok(await c.call("GET", "/finance/invoice/rs-3"))["recognition"]["installments"]
        assert [(i["posted"], i["amount"], i["journal_id"]) for i in rs3] == [
            (True, 1500, "rs-3.recognise.1"),
            (False, 0, None),
        ]
        posted = await _run(c, dues[0])
        assert [(p["invoice_id"], p["k"], p["journal_id"], p["amount"]) for p in posted] == [
            ("rs-2", 1, "rs-2.recognise.1", 1500)
        ]
        assert await _balance(c, "revenue:sales:rs-2-sku") == 1500
        assert await _balance(c, "liability:deferred-revenue:rs-2-sku") == 1500
        assert await _run(c, dues[0]) == []
        later = datetime.fromisoformat(dues[1]) + timedelta(seconds=1)
        posted = await _run(c, later.isoformat())
        assert sorted((p["invoice_id"], p["k"], p["journal_id"], p["amount"]) for p in posted) == [
            ("rs-2", 2, "rs-2.recognise.2", 1500),
            ("rs-3", 2, None, 0),
        ]
        for sku, revenue in (("rs-2-sku", 3000), ("rs-3-sku", 1500)):
            assert await _balance(c, f"revenue:sales:{sku}") == revenue
            assert await _balance(c, f"liability:deferred-revenue:{sku}") == 0

    run(node, resume)
    assert node.run(check_store(node.dsn)) == []


def _month() -> str:
    now = datetime.now(UTC)
    return f"{now.year}-{now.month:02d}"


def _rows(answer: dict[str, Any]) -> dict[int, tuple[int, int, int]]:
    return {r["rate_bp"]: (r["taxable_base"], r["tax"], r["entries"]) for r in answer["rows"]}


def test_refunds_by_line_reverse_the_lines_own_tax(node: NodeHarness) -> None:
    """Tried: a DE invoice with a 19 % line (3 x 1000) and a 7 % line (999), paid; a line refund
    with the wrong amount (400 with the computed 1069), of an unknown line (400 $.lines[0].line),
    the 7 % line whole (journal: its deferred net, 70 on DE tax, cash), that line again (409 naming
    it), a duplicate reference with other lines (409); the month's tax return shows the refund
    only on the 7 % row and reconciles to the tax-payable balance; a proportional refund after
    it takes only from the 19 % line; the invoice's per-line figures; clean check."""

    async def flow(c: Client) -> None:
        month = _month()
        base = _rows(
            expect_ok(await c.call("GET", f"/finance/tax/return/{month}", params={"jurisdiction": "DE"}))
        )
        tax_before = await _balance(c, "liability:tax-payable:DE")
        await _paid_invoice(c, "lr-1", [("lr-a", 3, 1000, "standard"), ("lr-b", 1, 999, "ebook")])

        wrong = await c.call(
            "POST", "/finance/refund", body=_money("lr-1", 1000, "lr-re-1", lines=[{"line": 1, "qty": 1}])
        )
        assert expect_error(wrong, 400, "VALIDATION_ERROR", "$.amount")["computed"] == 1069
        unknown = await c.call(
            "POST", "/finance/refund", body=_money("lr-1", 1069, "lr-re-1", lines=[{"line": 5, "qty": 1}])
        )
        expect_error(unknown, 400, "VALIDATION_ERROR", "$.lines[0].line")
        done = expect_ok(
            await c.call(
                "POST", "/finance/refund", body=_money("lr-1", 1069, "lr-re-1", lines=[{"line": 1, "qty": 1}])
            )
        )
        assert (done["status"], done["net"], done["tax"], done["credit"]) == ("refunded", 999, 70, 0)
        assert done["refund_lines"] == [
            {"line": 1, "sku": "lr-b", "jurisdiction": "DE", "rate_bp": 700, "net": 999, "tax": 70}
        ]
        assert await _entries(c, done["journal_id"]) == {
            ("liability:deferred-revenue:lr-b", "debit", 999),
            ("liability:tax-payable:DE", "debit", 70),
            ("asset:cash:bank:EUR", "credit", 1069),
        }
        again = await c.call(
            "POST",
            "/finance/refund",
            body=_money("lr-1", 1069, "lr-re-2", lines=[{"line": 1, "amount": 1069}]),
        )
        assert expect_error(again, 409, "REFUND_EXCEEDS_PAID")["line"] == 1
        other = await c.call(
            "POST",
            "/finance/refund",
            body=_money("lr-1", 1069, "lr-re-1", lines=[{"line": 1, "amount": 1069}]),
        )
        expect_error(other, 409, "IDEMPOTENCY_CONFLICT")
        replay = await c.call(
            "POST", "/finance/refund", body=_money("lr-1", 1069, "lr-re-1", lines=[{"line": 1, "qty": 1}])
        )
        assert expect_ok(replay) == done

        de = expect_ok(await c.call("GET", f"/finance/tax/return/{month}", params={"jurisdiction": "DE"}))
        rows = _rows(de)
        b19, b7 = base.get(1900, (0, 0, 0)), base.get(700, (0, 0, 0))
        assert rows[1900] == (b19[0] + 3000, b19[1] + 570, b19[2] + 1)  # untouched by the line refund
        assert rows[700] == (b7[0] + 999 - 999, b7[1] + 70 - 70, b7[2] + 2)
        assert de["tax_due"]["EUR"] - sum(r[1] for r in base.values()) == 570
        assert await _balance(c, "liability:tax-payable:DE") - tax_before == 570

        # a proportional refund now takes from what remains: the 19 % line only
        rest = expect_ok(await c.call("POST", "/finance/refund", body=_money("lr-1", 1190, "lr-re-3")))
        assert (rest["net"], rest["tax"]) == (1000, 190)
        assert [(r["line"], r["net"], r["tax"]) for r in rest["refund_lines"]] == [(0, 1000, 190)]
        rows = _rows(
            expect_ok(await c.call("GET", f"/finance/tax/return/{month}", params={"jurisdiction": "DE"}))
        )
        assert rows[1900] == (b19[0] + 2000, b19[1] + 380, b19[2] + 2)
        shown = expect_ok(await c.call("GET", "/finance/invoice/lr-1", role="auditor"))
        assert [(r["refunded_net"], r["refunded_tax"]) for r in shown["line_refunds"]] == [
            (1000, 190),
            (999, 70),
        ]
        assert shown["recognition"] == {"method": "on_delivery", "deferred": 2000}
        assert shown["amount_refunded"] == 1069 + 1190

        await asyncio.sleep(0.5)
        events = expect_ok(await c.call("GET", "/audit/events", role="auditor", params={"limit": "1000"}))
        issued = [e["payload"] for e in events["events"] if e["event_type"] == "refund.issued"]
        assert any(p.get("lines") == done["refund_lines"] for p in issued)

    run(node, flow)
    assert node.run(check_store(node.dsn)) == []
