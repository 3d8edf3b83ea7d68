"""`POST /webhooks/stripe` over real HTTP: signed Stripe events move the ledger exactly once.

Payloads are signed as Stripe signs them (tests/unit/test_stripe_events.py); the node reads
`STRIPE_WEBHOOK_SECRET` per request, so the tests set it with monkeypatch.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from finance.service import payment_id_of
from tests.e2e.test_errors import Client, expect_error, expect_ok, run
from tests.support.node import NodeHarness, check_store
from tests.unit.test_stripe_events import SECRET, paid, refunded, sign


@pytest.fixture(autouse=True)
def webhook_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    """The endpoint's signing secret, as an operator would configure it."""
    monkeypatch.setenv("STRIPE_WEBHOOK_SECRET", SECRET)


def _invoice(invoice_id: str, buyer: str) -> dict[str, Any]:
    """A DE invoice of 4639 EUR (3999 net + 640 VAT)."""
    return {
        "invoice_id": invoice_id,
        "buyer": {"buyer_id": buyer, "country": "DE"},
        "line_items": [
            {"sku": f"{invoice_id}-a", "qty": 3, "unit_price": 1000, "tax_code": "standard"},
            {"sku": f"{invoice_id}-b", "qty": 1, "unit_price": 999, "tax_code": "ebook"},
        ],
        "currency": "EUR",
    }


async def _deliver(c: Client, body: bytes, signature: str | None = None) -> Any:
    headers = {"Content-Type": "application/json", "Stripe-Signature": signature or sign(body)}
    return await c.call("POST", "/webhooks/stripe", role=None, data=body, headers=headers)


async def _audit(c: Client, event_type: str) -> list[dict[str, Any]]:
    events = expect_ok(await c.call("GET", "/audit/events", role="auditor", params={"limit": "1000"}))
    return [e for e in events["events"] if e["event_type"] == event_type]


def test_a_signed_payment_pays_the_invoice_once(node: NodeHarness) -> None:
    """Tried: payment_intent.succeeded for an issued invoice, then the same delivery again ->
    applied (invoice paid, amount_due 0, one payment journal), then duplicate (no second journal);
    payment.received audited as stripe:webhook; an unknown invoice -> 404; clean check."""

    async def flow(c: Client) -> None:
        expect_ok(await c.call("POST", "/finance/invoice", body=_invoice("wh-pay-1", "wh-buyer-1")), 201)
        body = paid("evt_wh_pay_1", "pi_wh_1", amount=4639, invoice="wh-pay-1")
        first = expect_ok(await _deliver(c, body))
        assert (first["event_id"], first["outcome"]) == ("evt_wh_pay_1", "applied")
        again = expect_ok(await _deliver(c, body))
        assert (again["event_id"], again["outcome"]) == ("evt_wh_pay_1", "duplicate")

        shown = expect_ok(await c.call("GET", "/finance/invoice/wh-pay-1", role="auditor"))
        payment_id = payment_id_of("stripe", "pi_wh_1")
        assert (shown["status"], shown["amount_due"], shown["amount_paid"]) == ("paid", 0, 4639)
        assert shown["payments"] == [payment_id]
        assert shown["journal_ids"] == ["wh-pay-1.issue", f"wh-pay-1.pay.{payment_id}"]
        received = [
            e for e in await _audit(c, "payment.received") if e["payload"]["invoice_id"] == "wh-pay-1"
        ]
        assert [e["actor_id"] for e in received] == ["stripe:webhook"]

        unknown = paid("evt_wh_pay_2", "pi_wh_2", amount=100, invoice="wh-nobody")
        expect_error(await _deliver(c, unknown), 404, "NOT_FOUND")

    run(node, flow)
    assert node.run(check_store(node.dsn)) == []


def test_bad_signatures_are_rejected_and_audited(node: NodeHarness) -> None:
    """Tried: a tampered body, a stale timestamp, no signature, and no secret configured ->
    400 WEBHOOK_SIGNATURE_INVALID (reason mismatch / stale / missing) with a webhook.rejected
    audit event each, 503 SERVICE_UNAVAILABLE without a secret; nothing is paid."""

    async def flow(c: Client) -> None:
        expect_ok(await c.call("POST", "/finance/invoice", body=_invoice("wh-bad-1", "wh-buyer-2")), 201)
        body = paid("evt_wh_bad_1", "pi_wh_bad_1", amount=4639, invoice="wh-bad-1")
        tampered = body.replace(b"4639", b"9999")
        error = expect_error(await _deliver(c, tampered, sign(body)), 400, "WEBHOOK_SIGNATURE_INVALID")
        assert error["reason"] == "mismatch"
        stale = sign(body, at=int(time.time()) - 600)
        error = expect_error(await _deliver(c, body, stale), 400, "WEBHOOK_SIGNATURE_INVALID")
        assert error["reason"] == "stale"
        headers = {"Content-Type": "application/json"}
        missing = await c.call("POST", "/webhooks/stripe", role=None, data=body, headers=headers)
        assert expect_error(missing, 400, "WEBHOOK_SIGNATURE_INVALID")["reason"] == "missing"

        rejected = await _audit(c, "webhook.rejected")
        assert [e["payload"]["reason"] for e in rejected][-3:] == ["mismatch", "stale", "missing"]
        assert {e["actor_id"] for e in rejected} == {"stripe:webhook"}
        shown = expect_ok(await c.call("GET", "/finance/invoice/wh-bad-1", role="auditor"))
        assert (shown["status"], shown["amount_due"], shown["payments"]) == ("issued", 4639, [])

    run(node, flow)
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("STRIPE_WEBHOOK_SECRET")

        async def unconfigured(c: Client) -> None:
            body = paid("evt_wh_bad_2", "pi_wh_bad_2", amount=1, invoice="wh-bad-1")
            error = expect_error(await _deliver(c, body), 503, "SERVICE_UNAVAILABLE")
            assert error["env"] == "STRIPE_WEBHOOK_SECRET"

        run(node, unconfigured)


def test_a_refund_before_its_payment_is_parked_then_applied_once(node: NodeHarness) -> None:
    """Tried: charge.refunded (1000) before payment_intent.succeeded -> parked, invoice untouched;
    the payment -> applied with the parked refund right after it (amount_refunded 1000, one
    refund); both deliveries again -> duplicate; a later charge.refunded listing the old refund and
    a new one applies only the new one; the ledger check is clean."""

    async def flow(c: Client) -> None:
        expect_ok(await c.call("POST", "/finance/invoice", body=_invoice("wh-rf-1", "wh-buyer-3")), 201)
        refund = refunded("evt_wh_rf_1", "pi_wh_rf_1", [("re_wh_1", 1000)])
        assert expect_ok(await _deliver(c, refund))["outcome"] == "parked"
        shown = expect_ok(await c.call("GET", "/finance/invoice/wh-rf-1", role="auditor"))
        assert (shown["amount_paid"], shown["amount_refunded"], shown["refunds"]) == (0, 0, [])

        payment = paid("evt_wh_rf_2", "pi_wh_rf_1", amount=4639, invoice="wh-rf-1")
        assert expect_ok(await _deliver(c, payment))["outcome"] == "applied"
        assert expect_ok(await _deliver(c, payment))["outcome"] == "duplicate"
        assert expect_ok(await _deliver(c, refund))["outcome"] == "duplicate"
        shown = expect_ok(await c.call("GET", "/finance/invoice/wh-rf-1", role="auditor"))
        assert (shown["amount_paid"], shown["amount_refunded"]) == (4639, 1000)
        assert shown["refunds"] == [payment_id_of("stripe", "re_wh_1", "rfd")]

        later = refunded("evt_wh_rf_3", "pi_wh_rf_1", [("re_wh_1", 1000), ("re_wh_2", 500)])
        assert expect_ok(await _deliver(c, later))["outcome"] == "applied"
        shown = expect_ok(await c.call("GET", "/finance/invoice/wh-rf-1", role="auditor"))
        assert shown["amount_refunded"] == 1500
        assert len(shown["refunds"]) == 2
        issued = [e for e in await _audit(c, "refund.issued") if e["payload"]["invoice_id"] == "wh-rf-1"]
        assert len(issued) == 2

    run(node, flow)
    assert node.run(check_store(node.dsn)) == []
