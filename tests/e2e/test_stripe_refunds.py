"""`POST /finance/refund` of a Stripe payment creates the refund at Stripe first (the official SDK
pointed at `STRIPE_API_BASE`, here the Stripe-compatible loopback server), then posts the journal.

A retry of the same request reuses the same idempotency key, so Stripe refunds once; a provider
outage is a retryable 503 and a provider refusal a 409 INVALID_STATE, with nothing posted.
"""

from __future__ import annotations

import itertools
from typing import Any

import aiohttp
import pytest

from tests.e2e.test_errors import Client, expect_error, expect_ok, run
from tests.support.node import NodeHarness
from tests.support.stripe_server import StripeServer
from tests.unit.test_stripe_events import SECRET, refunded, sign


def _invoice(invoice_id: str) -> dict[str, Any]:
    return {
        "invoice_id": invoice_id,
        "buyer": {"buyer_id": "sr-buyer", "country": "DE"},
        "line_items": [
            {"sku": "sr-a", "qty": 3, "unit_price": 1000, "tax_code": "standard"},
            {"sku": "sr-b", "qty": 1, "unit_price": 999, "tax_code": "ebook"},
        ],
        "currency": "EUR",
        "tax": 640,
    }


def _money(invoice_id: str, amount: int, reference: str) -> dict[str, Any]:
    return {
        "invoiceId": invoice_id,
        "amount": amount,
        "currency": "EUR",
        "payment_provider": "stripe",
        "provider_reference": reference,
    }


async def _stripe_post(server: StripeServer, path: str, data: dict[str, Any]) -> dict[str, Any]:
    """A call to the fake provider from the test (setup and out-of-band refunds)."""
    headers = {"Authorization": f"Bearer {server.api_key}"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(server.base + path, data=data, headers=headers) as r,
    ):
        assert r.status == 200, await r.text()
        answer: dict[str, Any] = await r.json()
        return answer


def test_refund_goes_to_stripe_once_then_posts(node: NodeHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tried: pay 4,639 with a Stripe intent, refund 1,000 -> one Stripe refund of 1,000, the journal
    posted, `provider_refund_id` answered; the same request again -> same answer, still one refund;
    Stripe's charge.refunded webhook for it -> duplicate (not posted again);
    three 500s from Stripe (the SDK retries twice) -> 503 SERVICE_UNAVAILABLE, nothing posted, the
    retry succeeds once; a refund above what remains at Stripe (400) -> 409 INVALID_STATE with the
    provider's reason, nothing posted."""
    server: StripeServer = node.run(StripeServer().start())
    monkeypatch.setenv("STRIPE_API_KEY", server.api_key)
    monkeypatch.setenv("STRIPE_API_BASE", server.base)
    monkeypatch.setenv("STRIPE_WEBHOOK_SECRET", SECRET)

    async def flow(c: Client) -> None:
        expect_ok(await c.call("POST", "/finance/invoice", body=_invoice("sr-1")), 201)
        intent = await _stripe_post(server, "/v1/payment_intents", {"amount": 4639, "currency": "eur"})
        expect_ok(await c.call("POST", "/finance/payment", body=_money("sr-1", 4639, intent["id"])))

        refund = _money("sr-1", 1000, "sr-refund-1")
        done = expect_ok(await c.call("POST", "/finance/refund", body=refund))
        refunds = server.state.refunds
        assert len(refunds) == 1 and done["provider_refund_id"] in refunds
        assert refunds[done["provider_refund_id"]]["amount"] == 1000
        assert refunds[done["provider_refund_id"]]["payment_intent"] == intent["id"]
        assert (done["status"], done["amount"], done["request_reference"]) == (
            "refunded",
            1000,
            "sr-refund-1",
        )
        posted = expect_ok(await c.call("GET", f"/ledger/{done['journal_id']}", role="auditor"))["journal"]
        assert posted["journal_id"] == done["journal_id"]
        assert expect_ok(await c.call("POST", "/finance/refund", body=refund)) == done
        assert len(server.state.refunds) == 1 and server.state.intents[intent["id"]]["refunded"] == 1000
        # Stripe's charge.refunded for that refund: already recorded under its id -> nothing posted twice
        event = refunded("evt_sr_1", intent["id"], [(done["provider_refund_id"], 1000)])
        headers = {"Content-Type": "application/json", "Stripe-Signature": sign(event)}
        delivered = await c.call("POST", "/webhooks/stripe", role=None, data=event, headers=headers)
        assert expect_ok(delivered)["outcome"] == "duplicate"
        shown = expect_ok(await c.call("GET", "/finance/invoice/sr-1", role="auditor"))
        assert (shown["amount_refunded"], shown["refunds"]) == (1000, [done["refund_id"]])

        server.fail_next(500, 500, 500)
        second = _money("sr-1", 500, "sr-refund-2")
        details = expect_error(
            await c.call("POST", "/finance/refund", body=second), 503, "SERVICE_UNAVAILABLE"
        )
        assert details["retryable"] is True and details["provider"] == "stripe"
        shown = expect_ok(await c.call("GET", "/finance/invoice/sr-1", role="auditor"))
        assert (shown["amount_refunded"], len(shown["refunds"])) == (1000, 1)
        again = expect_ok(await c.call("POST", "/finance/refund", body=second))
        assert again["provider_refund_id"] != done["provider_refund_id"]
        assert len(server.state.refunds) == 2 and server.state.intents[intent["id"]]["refunded"] == 1500
        assert expect_ok(await c.call("POST", "/finance/refund", body=second)) == again

        # refunded out of band at Stripe (not yet seen by the ledger): only 139 remains there
        await _stripe_post(server, "/v1/refunds", {"payment_intent": intent["id"], "amount": 3000})
        calls = len(server.state.calls)
        details = expect_error(
            await c.call("POST", "/finance/refund", body=_money("sr-1", 500, "sr-refund-3")),
            409,
            "INVALID_STATE",
        )
        assert details["provider"] == "stripe" and "400" in details["reason"]
        assert len(server.state.calls) == calls + 1
        shown = expect_ok(await c.call("GET", "/finance/invoice/sr-1", role="auditor"))
        assert (shown["amount_refunded"], len(shown["refunds"])) == (1500, 2)

    try:
        run(node, flow)
    finally:
        node.run(server.stop())


def test_without_gateway_a_stripe_refund_posts_only(
    node: NodeHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tried: no STRIPE_API_KEY -> a "stripe" refund posts its journal as before, no provider id."""
    monkeypatch.delenv("STRIPE_API_KEY", raising=False)

    async def flow(c: Client) -> None:
        expect_ok(await c.call("POST", "/finance/invoice", body=_invoice("sr-2")), 201)
        expect_ok(await c.call("POST", "/finance/payment", body=_money("sr-2", 4639, "pi_sr_2")))
        done = expect_ok(await c.call("POST", "/finance/refund", body=_money("sr-2", 700, "re_sr_2")))
        assert done["journal_id"] and "provider_refund_id" not in done

    run(node, flow)


def test_a_refund_goes_to_the_stripe_payment_that_can_take_it(
    node: NodeHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tried: an invoice paid by two Stripe intents (2,000 then 2,639 EUR); a 2,500 refund -> made
    against the second (the first cannot take it whole); 2,100 (the invoice has 2,139 left, no
    single payment has) -> 409 REFUND_EXCEEDS_PAID listing what is refundable per payment (2,000 and
    139), nothing sent to Stripe; 2,000 -> against the first; a USD refund (no USD payment) -> 400
    VALIDATION_ERROR on $.currency."""
    server: StripeServer = node.run(StripeServer().start())
    server.state.ids = itertools.count(1000)  # intent ids unlike the earlier tests' (same node)
    monkeypatch.setenv("STRIPE_API_KEY", server.api_key)
    monkeypatch.setenv("STRIPE_API_BASE", server.base)

    async def flow(c: Client) -> None:
        expect_ok(await c.call("POST", "/finance/invoice", body=_invoice("sr-3")), 201)
        first = await _stripe_post(server, "/v1/payment_intents", {"amount": 2000, "currency": "eur"})
        second = await _stripe_post(server, "/v1/payment_intents", {"amount": 2639, "currency": "eur"})
        expect_ok(await c.call("POST", "/finance/payment", body=_money("sr-3", 2000, first["id"])))
        expect_ok(await c.call("POST", "/finance/payment", body=_money("sr-3", 2639, second["id"])))

        big = expect_ok(await c.call("POST", "/finance/refund", body=_money("sr-3", 2500, "sr3-rf-1")))
        assert big["payment_intent"] == second["id"]
        assert server.state.refunds[big["provider_refund_id"]]["payment_intent"] == second["id"]
        calls = len(server.state.calls)
        details = expect_error(
            await c.call("POST", "/finance/refund", body=_money("sr-3", 2100, "sr3-rf-2")),
            409,
            "REFUND_EXCEEDS_PAID",
        )
        assert [(p["payment_intent"], p["refundable"]) for p in details["refundable"]] == [
            (first["id"], 2000),
            (second["id"], 139),
        ]
        assert len(server.state.calls) == calls  # refused before Stripe
        small = expect_ok(await c.call("POST", "/finance/refund", body=_money("sr-3", 2000, "sr3-rf-3")))
        assert small["payment_intent"] == first["id"]
        usd = {**_money("sr-3", 100, "sr3-rf-4"), "currency": "USD"}
        error = expect_error(
            await c.call("POST", "/finance/refund", body=usd), 400, "VALIDATION_ERROR", "$.currency"
        )
        assert error["payment_currencies"] == ["EUR"]
        shown = expect_ok(await c.call("GET", "/finance/invoice/sr-3", role="auditor"))
        assert (shown["amount_refunded"], len(shown["refunds"])) == (4500, 2)

    try:
        run(node, flow)
    finally:
        node.run(server.stop())


def test_a_refund_by_line_goes_to_stripe_with_the_line_amount(
    node: NodeHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tried: pay 4,639 with a Stripe intent; refund line 1 (the e-book, 999 + its tax) by line ->
    one Stripe refund of exactly that gross, the journal reverses only that line; the same line
    again -> 409 REFUND_EXCEEDS_PAID naming the line and no call reaches Stripe; a line refund
    whose amount is not the computed one -> 400 on $.amount, nothing at Stripe."""
    server: StripeServer = node.run(StripeServer().start())
    monkeypatch.setenv("STRIPE_API_KEY", server.api_key)
    monkeypatch.setenv("STRIPE_API_BASE", server.base)
    monkeypatch.setenv("STRIPE_WEBHOOK_SECRET", SECRET)

    async def flow(c: Client) -> None:
        view = expect_ok(await c.call("POST", "/finance/invoice", body=_invoice("sr-line-1")), 201)
        intent = await _stripe_post(server, "/v1/payment_intents", {"amount": 4639, "currency": "eur"})
        expect_ok(await c.call("POST", "/finance/payment", body=_money("sr-line-1", 4639, intent["id"])))
        ebook = view["line_items"][1]
        gross = ebook["net"] + ebook["tax"]
        wrong = {**_money("sr-line-1", gross + 1, "sr-line-r0"), "lines": [{"line": 1, "qty": 1}]}
        details = expect_error(
            await c.call("POST", "/finance/refund", body=wrong), 400, "VALIDATION_ERROR", "$.amount"
        )
        assert details["computed"] == gross and server.state.refunds == {}

        by_line = {**_money("sr-line-1", gross, "sr-line-r1"), "lines": [{"line": 1, "qty": 1}]}
        done = expect_ok(await c.call("POST", "/finance/refund", body=by_line))
        assert [r["amount"] for r in server.state.refunds.values()] == [gross]
        assert (done["tax"], done["net"]) == (ebook["tax"], ebook["net"])
        posted = expect_ok(await c.call("GET", f"/ledger/{done['journal_id']}", role="auditor"))["journal"]
        reversed_accounts = {e["account_id"] for e in posted["entries"] if e["side"] == "debit"}
        assert all("sr-a" not in account for account in reversed_accounts)
        calls = len(server.state.calls)
        again = {**_money("sr-line-1", gross, "sr-line-r2"), "lines": [{"line": 1, "qty": 1}]}
        over = expect_error(await c.call("POST", "/finance/refund", body=again), 409, "REFUND_EXCEEDS_PAID")
        assert over["line"] == 1 and len(server.state.calls) == calls

    try:
        run(node, flow)
    finally:
        node.run(server.stop())
