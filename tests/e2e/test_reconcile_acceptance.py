"""Reconciliation acceptance (issue 7, the deployment seed's criterion): the Stripe-compatible
loopback server holds a prepared dataset of more than 200 records (payment intents, refunds and
Connect transfers) made through the node's real flows, so the ledger side is what the node posted:
invoices paid with Stripe intents (`POST /finance/payment`), refunds created at Stripe by
`POST /finance/refund`, and payouts transferred by `POST /finance/payout/run`.

Exactly one discrepancy of each reason is then injected, spread over the three kinds; the report
must list exactly those five (reason, kind, provider reference), and after resolving each with an
adjusting journal a rerun over the same window reports zero mismatches.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Iterator
from typing import Any

import pytest

from finance import stripe_gateway
from tests.e2e.test_errors import Client, expect_ok, run
from tests.e2e.test_payouts import _accrue, _participant
from tests.e2e.test_reconcile import _next_second, _now, _pair, _reconcile
from tests.e2e.test_stripe_refunds import _money, _stripe_post
from tests.support.node import NodeHarness
from tests.support.stripe_server import StripeServer

PAYMENTS = 160
REFUNDS = 32
PAYEES = 12
CONCURRENCY = 16
USD = "USD"


@pytest.fixture
def stripe(node: NodeHarness, monkeypatch: pytest.MonkeyPatch) -> Iterator[StripeServer]:
    """The Stripe-compatible server the node's SDK talks to; lists paged by 50 (several pages)."""
    server: StripeServer = node.run(StripeServer().start())
    monkeypatch.setenv("STRIPE_API_KEY", server.api_key)
    monkeypatch.setenv("STRIPE_API_BASE", server.base)
    monkeypatch.setenv("LEDGER_PAYOUT_BACKOFF_S", "0.01")
    monkeypatch.setattr(stripe_gateway, "LIST_PAGE_SIZE", 50)
    yield server
    node.run(server.stop())


async def _bounded(calls: list[Awaitable[Any]], limit: int = CONCURRENCY) -> list[Any]:
    gate = asyncio.Semaphore(limit)

    async def one(call: Awaitable[Any]) -> Any:
        async with gate:
            return await call

    return await asyncio.gather(*(one(call) for call in calls))


def _invoice(invoice_id: str, n: int) -> dict[str, Any]:
    """An invoice whose total varies with `n` (the server computes the tax)."""
    return {
        "invoice_id": invoice_id,
        "buyer": {"buyer_id": f"ra-buyer-{n % 7}", "country": "DE"},
        "line_items": [
            {"sku": "ra-a", "qty": 1 + n % 4, "unit_price": 1000 + 37 * n, "tax_code": "standard"},
            {"sku": "ra-b", "qty": 1, "unit_price": 999, "tax_code": "ebook"},
        ],
        "currency": "EUR",
    }


async def _sale(c: Client, server: StripeServer, tag: str, n: int) -> dict[str, Any]:
    """One invoice paid by a Stripe intent; the first REFUNDS also partly refunded through Stripe."""
    invoice_id = f"{tag}-inv-{n}"
    total = expect_ok(await c.call("POST", "/finance/invoice", body=_invoice(invoice_id, n)), 201)["total"]
    intent = await _stripe_post(server, "/v1/payment_intents", {"amount": total, "currency": "eur"})
    paid = expect_ok(await c.call("POST", "/finance/payment", body=_money(invoice_id, total, intent["id"])))
    sale = {
        "invoice_id": invoice_id,
        "intent": intent["id"],
        "total": total,
        "journal_id": paid["journal_id"],
    }
    if n < REFUNDS:
        body = _money(invoice_id, 500 + n, f"{tag}-refund-{n}")
        sale["refund"] = expect_ok(await c.call("POST", "/finance/refund", body=body))["provider_refund_id"]
    return sale


async def _payouts(c: Client, tag: str) -> list[dict[str, Any]]:
    """PAYEES participants accrue royalties and one payout run pays each by a Stripe transfer."""
    payees = {f"{tag}-p{n}": (2000 + 111 * n, 0) for n in range(PAYEES)}
    await _bounded([_participant(c, pid, f"acct_{pid.replace('-', '')}", 1000) for pid in payees])
    await _accrue(c, tag, payees)
    body = {"payout_date": "2026-11-20", "batch_id": f"{tag}-batch", "items": "all"}
    batch = expect_ok(await c.call("POST", "/finance/payout/run", body=body))["batch"]
    paid = [p for p in batch["payouts"] if p["participant_id"] in payees]
    assert len(paid) == PAYEES and all(p["state"] == "paid" for p in paid), batch
    return paid


def _keys(report: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {(d["reason"], d["kind"], d["provider_reference"]) for d in report["discrepancies"]}


def test_two_hundred_records_one_of_each_discrepancy_then_parity(
    node: NodeHarness, stripe: StripeServer
) -> None:
    """Tried: 160 invoices paid with Stripe intents, 32 of them refunded through Stripe and 12
    participants paid by one payout run (204 provider records, all posted by the node) -> a run
    over the window matches all 204 with no discrepancy. Then at the provider: a refund made in the
    Stripe dashboard (ledger_missing, refund), a transfer whose amount differs (amount_mismatch,
    payout), an intent whose currency differs (currency_mismatch, payment), a refund listed twice
    (duplicate, refund); and in the ledger a payment whose intent Stripe never saw
    (provider_missing, payment) -> the report lists exactly those five (reason, kind, reference)
    with both sides' amounts, the other 201 keys matched; each resolved by an adjusting journal of the
    amount the discrepancy implies -> every discrepancy resolved, and a rerun over the same window
    reports zero mismatches, 205 keys matched (the
    reversed ghost payment is no movement on either side any more)."""
    server = stripe
    tag = f"ra{secrets.token_hex(3)}"
    from_ts = _next_second()

    async def flow(c: Client) -> None:
        sales = await _bounded([_sale(c, server, tag, n) for n in range(PAYMENTS)])
        paid = await _payouts(c, tag)
        state = server.state
        assert (len(state.intents), len(state.refunds), len(state.transfers)) == (PAYMENTS, REFUNDS, PAYEES)

        clean = await _reconcile(c, f"{tag}-clean", from_ts)
        assert (clean["status"], clean["discrepancies"]) == ("completed", []), clean["counts"]
        assert clean["matched"] == clean["provider_records"] == clean["ledger_records"] == 204

        # one of each reason, on each kind
        stray = await _stripe_post(
            server, "/v1/refunds", {"payment_intent": sales[100]["intent"], "amount": 700}
        )
        short = paid[3]["transfer_id"]
        state.transfers[short]["amount"] -= 25
        foreign = sales[50]["intent"]
        state.intents[foreign]["currency"] = "usd"
        doubled = sales[5]["refund"]
        state.listed_twice.add(doubled)
        ghost_invoice = f"{tag}-inv-ghost"
        ghost_total = expect_ok(
            await c.call("POST", "/finance/invoice", body=_invoice(ghost_invoice, 3)), 201
        )["total"]
        ghost_ref = f"pi_{tag}_never_at_stripe"
        ghost = expect_ok(
            await c.call("POST", "/finance/payment", body=_money(ghost_invoice, ghost_total, ghost_ref))
        )
        to_ts = _now()

        report = await _reconcile(c, f"{tag}-mixed", from_ts, to_ts)
        assert _keys(report) == {
            ("ledger_missing", "refund", stray["id"]),
            ("amount_mismatch", "payout", short),
            ("currency_mismatch", "payment", foreign),
            ("duplicate", "refund", doubled),
            ("provider_missing", "payment", ghost_ref),
        }, report["discrepancies"]
        assert report["counts"] == dict.fromkeys(report["counts"], 1)
        assert report["matched"] == 201 and report["discrepancy_count"] == 5
        found = {d["reason"]: d for d in report["discrepancies"]}
        assert (found["ledger_missing"]["provider_amount"], found["ledger_missing"]["journal_id"]) == (
            700,
            None,
        )
        payout = paid[3]
        assert (found["amount_mismatch"]["ledger_amount"], found["amount_mismatch"]["provider_amount"]) == (
            payout["amount"],
            payout["amount"] - 25,
        )
        assert found["amount_mismatch"]["journal_id"] is not None
        assert (
            found["currency_mismatch"]["ledger_currency"],
            found["currency_mismatch"]["provider_currency"],
            found["currency_mismatch"]["journal_id"],
        ) == ("EUR", "USD", sales[50]["journal_id"])
        assert found["duplicate"]["details"]["side"] == "provider"
        assert (found["provider_missing"]["ledger_amount"], found["provider_missing"]["journal_id"]) == (
            ghost_total,
            ghost["journal_id"],
        )

        rate = {"quote": "EUR", "rate": "0.9", "source": "ecb", "as_of": "2020-01-01T00:00:00Z"}
        assert (await c.call("POST", "/finance/fx/rates", body=rate)).status in (200, 201)
        eur = sales[50]["total"]
        bodies = {
            "ledger_missing": _pair("liability:ra-refunds-suspense", "asset:stripe-clearing", 700),
            "amount_mismatch": _pair("asset:stripe-clearing:usd", "expense:ra-provider-diff", 25, USD),
            "currency_mismatch": _pair("liability:ra-suspense", "asset:stripe-clearing", eur)
            + _pair("asset:stripe-clearing:usd", "liability:ra-suspense", eur, USD),
            "duplicate": _pair("expense:ra-note", "liability:ra-suspense", 1),
            "provider_missing": _pair("liability:ra-suspense", "asset:stripe-clearing", ghost_total),
        }
        path = f"/reconcile/{report['reconcile_id']}/resolve"
        for reason, entries in bodies.items():
            body = {
                "discrepancy_id": found[reason]["discrepancy_id"],
                "entries": entries,
                "reason": f"acceptance: {reason}",
            }
            reply = expect_ok(await c.call("POST", path, body=body, role="operator"))
            assert reply["status"] == "resolved" and reply["journal_id"], (reason, reply)
        after = expect_ok(await c.call("GET", f"/reconcile/{report['reconcile_id']}", role="auditor"))
        assert after["open"] == 0

        rerun = await _reconcile(c, f"{tag}-rerun", from_ts, to_ts)
        assert (rerun["discrepancies"], rerun["counts"]) == ([], dict.fromkeys(rerun["counts"], 0)), rerun
        assert rerun["matched"] == 205  # the reversed ghost payment is no movement any more

    run(node, flow)
