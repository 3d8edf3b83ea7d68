"""The marketplace flow end to end over real HTTP, as the seed describes it for order `order-123`.

Invoice created and issued, paid by a signed Stripe `payment_intent.succeeded` webhook,
fulfilled, partly refunded; then the tax return of the current period shows the sale's tax less
the refunded tax and reconciles to the tax-payable balance, every journal balances, the store
check is clean, every step left an audit event, and a proof package over the flow's time range
verifies offline and contains each of the flow's journals.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from finance.service import payment_id_of
from ledger.timestamps import rfc3339
from signer.verify import verify_package
from tests.e2e.test_errors import Client, expect_ok, run
from tests.e2e.test_proofs import _assert_verifies, _checkpoint, _journal_ids, _proof
from tests.support.node import NodeHarness, check_store
from tests.unit.test_stripe_events import SECRET, paid, sign

ORDER = "order-123"
INVOICE = f"inv-{ORDER}"
STEP_EVENTS = ("invoice.created", "invoice.issued", "payment.received", "invoice.fulfilled", "refund.issued")


@pytest.fixture(autouse=True)
def webhook_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Stripe webhook signing secret, as an operator would configure it."""
    monkeypatch.setenv("STRIPE_WEBHOOK_SECRET", SECRET)


def _current_quarter() -> str:
    now = datetime.now(UTC)
    return f"{now.year}-Q{(now.month - 1) // 3 + 1}"


def _balanced(journal: dict[str, Any]) -> bool:
    sums: dict[str, int] = {}
    for entry in journal["entries"]:
        sign_of = 1 if entry["side"] == "debit" else -1
        sums[entry["currency"]] = sums.get(entry["currency"], 0) + sign_of * int(entry["amount_cents"])
    return bool(sums) and all(total == 0 for total in sums.values())


async def _flow(c: Client) -> dict[str, Any]:
    """Run the order's flow; answers the views and figures the checks need."""
    invoice = {
        "invoice_id": INVOICE,
        "buyer": {"buyer_id": "buyer-order-123", "country": "DE"},
        "line_items": [
            {"sku": "order-123-widget", "qty": 3, "unit_price": 1000, "tax_code": "standard"},
            {"sku": "order-123-ebook", "qty": 1, "unit_price": 999, "tax_code": "ebook"},
        ],
        "currency": "EUR",
        "related_manifest": {"order_id": ORDER},
    }
    issued = expect_ok(await c.call("POST", "/finance/invoice", body=invoice), 201)
    assert (issued["status"], issued["total"], issued["tax"]) == ("issued", 4639, 640)

    body = paid("evt_order_123", "pi_order_123", amount=issued["total"], invoice=INVOICE)
    headers = {"Content-Type": "application/json", "Stripe-Signature": sign(body)}
    delivered = expect_ok(await c.call("POST", "/webhooks/stripe", role=None, data=body, headers=headers))
    assert delivered["outcome"] == "applied"

    fulfil = {"invoice_id": INVOICE, "context": {"order_id": ORDER}}
    assert expect_ok(await c.call("POST", "/finance/fulfill", body=fulfil))["status"] == "fulfilled"
    refund_body = {
        "invoice_id": INVOICE,
        "amount": 1160,
        "currency": "EUR",
        "payment_provider": "stripe",
        "provider_reference": "re_order_123",
    }
    refund = expect_ok(await c.call("POST", "/finance/refund", body=refund_body))
    assert refund["status"] == "refunded" and refund["tax"] + refund["net"] == 1160
    view = expect_ok(await c.call("GET", f"/finance/invoice/{INVOICE}", role="auditor"))
    return {"issued": issued, "refund": refund, "view": view}


def test_order_123_from_invoice_to_verifiable_proof(node: NodeHarness, tmp_path: Path) -> None:
    """Tried: the seed's order-123 flow (issue, Stripe payment webhook, fulfil, partial refund) ->
    four journals that balance and name the invoice; the quarter's DE tax return is the sale's tax
    less the refunded tax and equals the tax-payable balance; audit events for every step; clean
    store check; a proof over the flow's time range verifies offline and holds all four journals."""
    start = rfc3339(datetime.now(UTC) - timedelta(seconds=1))
    found: dict[str, Any] = {}

    async def flow(c: Client) -> None:
        found.update(await _flow(c))
        view, refund = found["view"], found["refund"]
        payment_id = payment_id_of("stripe", "pi_order_123")
        journal_ids = view["journal_ids"]
        assert journal_ids[:3] == [f"{INVOICE}.issue", f"{INVOICE}.pay.{payment_id}", f"{INVOICE}.fulfil"]
        assert len(journal_ids) == 4 and journal_ids[3].startswith(f"{INVOICE}.refund.")
        for journal_id in journal_ids:
            journal = expect_ok(await c.call("GET", f"/ledger/{journal_id}", role="auditor"))["journal"]
            assert _balanced(journal), journal
            assert journal["context"]["invoice_id"] == INVOICE
            # the refund is a reversing journal naming the sale it reverses (L2); nothing else is
            assert journal["reverses"] == (f"{INVOICE}.issue" if journal_id == journal_ids[3] else None)

        tax_return = expect_ok(
            await c.call(
                "GET",
                f"/finance/tax/return/{_current_quarter()}",
                role="auditor",
                params={"jurisdiction": "DE"},
            )
        )
        net_tax = found["issued"]["tax"] - refund["tax"]
        assert tax_return["tax_due"] == {"EUR": net_tax}
        assert (
            sum(r["taxable_base"] for r in tax_return["rows"]) == found["issued"]["subtotal"] - refund["net"]
        )
        balance = expect_ok(await c.balances("liability:tax-payable:DE"))["balances"]
        assert [(b["currency"], int(b["balance"])) for b in balance] == [("EUR", net_tax)]

        events = expect_ok(await c.call("GET", "/audit/events", role="auditor", params={"limit": "1000"}))
        mine = [e for e in events["events"] if e["payload"].get("invoice_id") == INVOICE]
        assert [e["event_type"] for e in mine] == list(STEP_EVENTS)
        actors = {e["event_type"]: e["actor_id"] for e in mine}
        assert actors["payment.received"] == "stripe:webhook"
        found["journal_ids"] = journal_ids
        keys = expect_ok(await c.call("GET", "/keys", role="auditor"))
        found["pems"] = [k["pem"] for k in keys["keys"]]

    run(node, flow)
    assert node.run(check_store(node.dsn)) == []

    time.sleep(0.2)
    end = rfc3339(datetime.now(UTC))
    asyncio.run(_checkpoint(node))
    _, data = asyncio.run(_proof(node.url, {"from_ts": start, "to_ts": end}, role="auditor"))
    report = _assert_verifies(data, found["pems"], tmp_path)
    assert report.ok and verify_package(data, found["pems"]).ok
    assert set(found["journal_ids"]) <= _journal_ids(data)
