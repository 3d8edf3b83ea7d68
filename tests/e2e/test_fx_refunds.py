"""Refunds in another currency than the invoice's, over real HTTP (DECISIONS D2).

The node's base currency is USD; a rate is units of EUR per 1 USD. An EUR invoice issued at 0.90,
paid in USD at 0.80 and refunded in USD at 0.85: the refund converts at the rate in force now,
reverses tax and net at the issue rate, credits USD cash and realises the difference, while every
currency of the journal nets to zero. This module has its own node, so its rates are its own.
"""

from __future__ import annotations

from datetime import UTC, datetime
from fractions import Fraction
from typing import Any

import asyncpg
import pytest

from finance.service import FinanceService, PaymentRequest
from ledger.errors import Rejection
from tests.e2e.test_errors import Client, expect_error, expect_ok, run
from tests.support.node import NodeHarness, check_store


def _rate(quote: str, rate: str) -> dict[str, Any]:
    return {"quote": quote, "rate": rate, "source": "ecb", "as_of": datetime.now(UTC).isoformat()}


def _money(amount: int, currency: str, reference: str) -> dict[str, Any]:
    return {
        "invoiceId": "fxr-1",
        "amount": amount,
        "currency": currency,
        "payment_provider": "bank",
        "provider_reference": reference,
    }


async def _balance(c: Client, account_id: str, currency: str) -> int:
    reply = await c.balances(account_id)
    if reply.status == 404:
        return 0
    rows = [r for r in expect_ok(reply)["balances"] if r["currency"] == currency]
    return int(rows[0]["balance"]) if rows else 0


def _to_base(amount: int, rate: str) -> int:
    return round(Fraction(amount) / Fraction(rate))  # Fraction rounds half to even, like the node


def test_a_usd_refund_of_an_eur_invoice_paid_in_usd_realises_fx(node: NodeHarness) -> None:
    """Tried: EUR invoice of 11,900 (10,000 net + 1,900 tax) issued at 0.90, paid 14,875 USD at
    0.80 (exactly the total); at 0.85 a 5,000 USD refund -> 4,250 EUR refunded (679 tax, 3,571 net
    reversed at the issue rate), USD cash credited 5,000, the realised loss on
    `expense:fx-loss:realised`, each currency nets to zero, amount_refunded 4,250; a refund whose
    conversion exceeds what is left (9,001 USD -> 7,651 > 7,650 EUR) -> 409 REFUND_EXCEEDS_PAID
    naming the converted amount, while 9,000 USD (7,650 EUR) is accepted; a GBP refund (no GBP
    payment) -> 400 VALIDATION_ERROR on $.currency; the store check is clean."""

    async def flow(c: Client) -> None:
        expect_ok(await c.call("POST", "/finance/fx/rates", body=_rate("EUR", "0.90")), 201)
        invoice = {
            "invoice_id": "fxr-1",
            "buyer": {"buyer_id": "fxr-buyer", "country": "DE"},
            "line_items": [{"sku": "fxr-sku", "qty": 2, "unit_price": 5000, "tax_code": "standard"}],
            "currency": "EUR",
        }
        created = expect_ok(await c.call("POST", "/finance/invoice", body=invoice), 201)
        assert (created["total"], created["tax"]) == (11900, 1900)
        expect_ok(await c.call("POST", "/finance/fx/rates", body=_rate("EUR", "0.80")), 201)
        paid = expect_ok(await c.call("POST", "/finance/payment", body=_money(14875, "USD", "fxr-pay-1")))
        assert (paid["status"], paid["applied_amount"]) == ("paid", 11900)

        expect_ok(await c.call("POST", "/finance/fx/rates", body=_rate("EUR", "0.85")), 201)
        loss_before = await _balance(c, "expense:fx-loss:realised", "USD")
        other = await c.call("POST", "/finance/refund", body=_money(100, "GBP", "fxr-gbp"))
        assert expect_error(other, 400, "VALIDATION_ERROR", "$.currency")["invoice_currency"] == "EUR"

        done = expect_ok(await c.call("POST", "/finance/refund", body=_money(5000, "USD", "fxr-rf-1")))
        assert (done["applied_amount"], done["applied_currency"]) == (4250, "EUR")
        tax = round(Fraction(4250 * 1900, 11900))
        assert (done["tax"], done["net"], done["credit"]) == (tax, 4250 - tax, 0) == (679, 3571, 0)
        released = _to_base(tax, "0.90") + _to_base(4250 - tax, "0.90")
        realised = released - 5000
        assert realised < 0 and done["fx"]["realised_minor"] == realised
        assert (done["fx"]["refund_base"], done["fx"]["released_base"]) == (5000, released)
        assert (done["status"], done["amount_refunded"]) == ("refunded", 4250)
        assert await _balance(c, "expense:fx-loss:realised", "USD") - loss_before == -realised

        posted = expect_ok(await c.call("GET", f"/ledger/{done['journal_id']}", role="auditor"))
        entries = posted["journal"]["entries"]
        net: dict[str, int] = {}
        for entry in entries:
            sign = 1 if entry["side"] == "debit" else -1
            net[entry["currency"]] = net.get(entry["currency"], 0) + sign * entry["amount_cents"]
        assert net == {"USD": 0, "EUR": 0}
        lines = {(e["account_id"], e["side"], e["amount_cents"], e["currency"]) for e in entries}
        assert {
            ("asset:cash:bank:USD", "credit", 5000, "USD"),
            ("liability:deferred-revenue:fxr-sku", "debit", 4250 - tax, "EUR"),
            ("liability:tax-payable:DE", "debit", tax, "EUR"),
            ("expense:fx-loss:realised", "debit", -realised, "USD"),
        } <= lines
        assert not [e for e in entries if e["account_id"] == "asset:cash:bank:EUR"]

        too_much = await c.call("POST", "/finance/refund", body=_money(9001, "USD", "fxr-rf-2"))
        details = expect_error(too_much, 409, "REFUND_EXCEEDS_PAID")
        assert (details["requested"], details["paid"], details["refunded"]) == (7651, 11900, 4250)
        rest = expect_ok(await c.call("POST", "/finance/refund", body=_money(9000, "USD", "fxr-rf-3")))
        assert (rest["applied_amount"], rest["amount_refunded"]) == (7650, 11900)
        replay = expect_ok(await c.call("POST", "/finance/refund", body=_money(9000, "USD", "fxr-rf-3")))
        assert replay == rest
        shown = expect_ok(await c.call("GET", "/finance/invoice/fxr-1", role="auditor"))
        assert (shown["amount_refunded"], len(shown["refunds"])) == (11900, 2)

    run(node, flow)
    assert node.run(check_store(node.dsn)) == []


def test_a_cross_currency_refund_without_a_rate_is_fx_rate_missing(node: NodeHarness) -> None:
    """Tried: the same kind of refund asked of a service whose clock is before any EUR rate ->
    422 FX_RATE_MISSING naming USD/EUR, and nothing is posted (the poster is never called)."""

    class NoPoster:
        async def post_journals(self, journals: Any, principal: str) -> Any:
            raise AssertionError("nothing may be posted")

    async def flow(c: Client) -> None:
        pool = await asyncpg.create_pool(node.dsn, min_size=1, max_size=2)
        try:
            service = FinanceService(
                pool, NoPoster(), clock=lambda: datetime(2000, 1, 1, tzinfo=UTC), gateway_factory=lambda: None
            )
            request = PaymentRequest(
                amount=100,
                currency="USD",
                payment_provider="bank",
                provider_reference="fxr-missing",
                invoice_id="fxr-1",
            )
            with pytest.raises(Rejection) as caught:
                await service.refund(request, "test")
        finally:
            await pool.close()
        assert caught.value.code == "FX_RATE_MISSING"
        assert (caught.value.details["base"], caught.value.details["quote"]) == ("USD", "EUR")
        shown = expect_ok(await c.call("GET", "/finance/invoice/fxr-1", role="auditor"))
        assert len(shown["refunds"]) == 2

    run(node, flow)
