"""Stripe disputes over real HTTP: signed `charge.dispute.created` / `charge.dispute.closed` events
move the disputed money through `asset:disputes-held:stripe:{CCY}` exactly once, and a lost dispute
refunds the invoice (tax and net reversed like `POST /finance/refund`) without counting twice.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from finance.service import dispute_journal_id, payment_id_of
from tests.e2e.test_errors import Client, expect_error, expect_ok, run
from tests.e2e.test_stripe_webhooks import _audit, _deliver, _invoice
from tests.support.node import NodeHarness, check_store
from tests.unit.test_stripe_events import SECRET, dispute_closed, disputed, event, paid, refunded

CASH, HELD, LOSSES = (
    "asset:cash:stripe:EUR",
    "asset:disputes-held:stripe:EUR",
    "expense:dispute-losses:stripe",
)


@pytest.fixture(autouse=True)
def webhook_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    """The endpoint's signing secret, as an operator would configure it."""
    monkeypatch.setenv("STRIPE_WEBHOOK_SECRET", SECRET)
    monkeypatch.delenv("STRIPE_API_KEY", raising=False)


def _now() -> str:
    return datetime.now(UTC).isoformat()


async def _balance(c: Client, account_id: str, currency: str = "EUR") -> int:
    reply = await c.balances(account_id)
    if reply.status == 404:
        return 0
    rows = [r for r in expect_ok(reply)["balances"] if r["currency"] == currency]
    return int(rows[0]["balance"]) if rows else 0


async def _balances(c: Client, *accounts: str) -> list[int]:
    return [await _balance(c, a) for a in accounts]


async def _view(c: Client, invoice_id: str) -> Any:
    return expect_ok(await c.call("GET", f"/finance/invoice/{invoice_id}", role="auditor"))


async def _lines(c: Client, journal_id: str) -> list[tuple[str, str, int, str]]:
    posted = expect_ok(await c.call("GET", f"/ledger/{journal_id}", role="auditor"))["journal"]
    return [(e["account_id"], e["side"], e["amount_cents"], e["currency"]) for e in posted["entries"]]


def test_a_dispute_holds_the_money_once_and_a_won_dispute_returns_it(node: NodeHarness) -> None:
    """Tried: an invoice paid via Stripe, then charge.dispute.created (2,000) -> one journal moving
    2,000 from Stripe's EUR cash to the held account, the invoice view lists the dispute open;
    the same delivery and a new event for the same dispute -> duplicate, nothing more posted;
    charge.dispute.closed (won) -> the held money back to cash, dispute won; repeated -> duplicate;
    one payment.disputed and one payment.dispute_closed audit event; the invoice itself untouched."""

    async def flow(c: Client) -> None:
        expect_ok(await c.call("POST", "/finance/invoice", body=_invoice("dp-won-1", "dp-buyer-1")), 201)
        expect_ok(await _deliver(c, paid("evt_dp_w1", "pi_dp_w1", amount=4639, invoice="dp-won-1")))
        cash0, held0 = await _balances(c, CASH, HELD)

        opened = disputed("evt_dp_w2", "pi_dp_w1", dispute="du_won_1", amount=2000)
        assert expect_ok(await _deliver(c, opened))["outcome"] == "applied"
        hold = dispute_journal_id("dp-won-1", "du_won_1")
        assert await _lines(c, hold) == [(HELD, "debit", 2000, "EUR"), (CASH, "credit", 2000, "EUR")]
        assert await _balances(c, CASH, HELD) == [cash0 - 2000, held0 + 2000]
        shown = await _view(c, "dp-won-1")
        assert [(d["dispute_id"], d["status"], d["amount"], d["journal_id"]) for d in shown["disputes"]] == [
            ("du_won_1", "open", 2000, hold)
        ]
        assert (shown["status"], shown["amount_paid"], shown["amount_refunded"]) == ("paid", 4639, 0)

        assert expect_ok(await _deliver(c, opened))["outcome"] == "duplicate"
        again = disputed("evt_dp_w3", "pi_dp_w1", dispute="du_won_1", amount=2000)
        assert expect_ok(await _deliver(c, again))["outcome"] == "duplicate"
        assert await _balances(c, CASH, HELD) == [cash0 - 2000, held0 + 2000]

        won = dispute_closed("evt_dp_w4", "pi_dp_w1", "won", dispute="du_won_1", amount=2000)
        assert expect_ok(await _deliver(c, won))["outcome"] == "applied"
        assert await _lines(c, f"{hold}.won") == [(CASH, "debit", 2000, "EUR"), (HELD, "credit", 2000, "EUR")]
        assert await _balances(c, CASH, HELD) == [cash0, held0]
        won_again = dispute_closed("evt_dp_w5", "pi_dp_w1", "won", dispute="du_won_1", amount=2000)
        assert expect_ok(await _deliver(c, won_again))["outcome"] == "duplicate"
        assert await _balances(c, CASH, HELD) == [cash0, held0]

        shown = await _view(c, "dp-won-1")
        (dispute,) = shown["disputes"]
        assert (dispute["status"], dispute["closed_journal_id"]) == ("won", f"{hold}.won")
        assert (shown["status"], shown["amount_refunded"], shown["refunds"]) == ("paid", 0, [])
        for kind in ("payment.disputed", "payment.dispute_closed"):
            events = [e for e in await _audit(c, kind) if e["payload"]["dispute_id"] == "du_won_1"]
            assert [e["actor_id"] for e in events] == ["stripe:webhook"], kind

    run(node, flow)
    assert node.run(check_store(node.dsn)) == []


def test_a_dispute_before_its_payment_is_parked_and_a_lost_one_refunds_the_invoice(
    node: NodeHarness,
) -> None:
    """Tried: charge.dispute.created (3,639) before the payment -> parked, nothing posted; the
    payment -> applied with the hold right after it; a 1,000 Stripe refund; then the dispute lost ->
    the invoice is refunded by 3,639 from the held account (no cash line), tax and net reversed so
    that with the refund exactly the invoice's tax is reversed, amount_refunded 4,639, status
    refunded; a further refund -> 409 REFUND_EXCEEDS_PAID; the lost close repeated -> duplicate."""

    async def flow(c: Client) -> None:
        body = _invoice("dp-lost-1", "dp-buyer-2")
        created = expect_ok(await c.call("POST", "/finance/invoice", body=body), 201)
        taxes = {f"liability:tax-payable:{r['jurisdiction']}" for r in created["tax_breakdown"]}
        tax0 = {a: await _balance(c, a) for a in taxes}
        opened = disputed("evt_dp_l1", "pi_dp_l1", dispute="du_lost_1", amount=3639)
        assert expect_ok(await _deliver(c, opened))["outcome"] == "parked"
        assert (await _view(c, "dp-lost-1"))["disputes"] == []
        cash0, held0 = await _balances(c, CASH, HELD)

        payment = paid("evt_dp_l2", "pi_dp_l1", amount=4639, invoice="dp-lost-1")
        assert expect_ok(await _deliver(c, payment))["outcome"] == "applied"
        assert await _balances(c, CASH, HELD) == [cash0 + 4639 - 3639, held0 + 3639]
        refund = refunded("evt_dp_l3", "pi_dp_l1", [("re_dp_l1", 1000)])
        assert expect_ok(await _deliver(c, refund))["outcome"] == "applied"

        lost = dispute_closed("evt_dp_l4", "pi_dp_l1", "lost", dispute="du_lost_1", amount=3639)
        assert expect_ok(await _deliver(c, lost))["outcome"] == "applied"
        assert await _balances(c, CASH, HELD) == [cash0 + 4639 - 3639 - 1000, held0]
        lines = await _lines(c, f"{dispute_journal_id('dp-lost-1', 'du_lost_1')}.lost")
        assert (HELD, "credit", 3639, "EUR") in lines
        assert not [line for line in lines if line[0] == CASH]
        assert sum(a for _, side, a, _ in lines if side == "debit") == 3639

        shown = await _view(c, "dp-lost-1")
        assert (shown["status"], shown["amount_refunded"]) == ("refunded", 4639)
        assert set(shown["refunds"]) == {
            payment_id_of("stripe", "re_dp_l1", "rfd"),
            payment_id_of("stripe", "du_lost_1", "rfd"),
        }
        assert [(d["dispute_id"], d["status"]) for d in shown["disputes"]] == [("du_lost_1", "lost")]
        reversed_tax = sum(tax0.values()) - sum([await _balance(c, a) for a in taxes])
        assert reversed_tax == created["tax"] == 640  # all tax reversed, none twice
        more = {
            "invoiceId": "dp-lost-1",
            "amount": 1,
            "currency": "EUR",
            "payment_provider": "stripe",
            "provider_reference": "re_dp_more",
        }
        expect_error(await c.call("POST", "/finance/refund", body=more), 409, "REFUND_EXCEEDS_PAID")
        again = dispute_closed("evt_dp_l5", "pi_dp_l1", "lost", dispute="du_lost_1", amount=3639)
        assert expect_ok(await _deliver(c, again))["outcome"] == "duplicate"
        assert (await _view(c, "dp-lost-1"))["amount_refunded"] == 4639
        closed = [
            e for e in await _audit(c, "payment.dispute_closed") if e["payload"]["dispute_id"] == "du_lost_1"
        ]
        assert [e["payload"]["status"] for e in closed] == ["lost"]

    run(node, flow)
    assert node.run(check_store(node.dsn)) == []


def test_a_lost_dispute_over_money_already_refunded_is_a_loss_not_a_second_refund(
    node: NodeHarness,
) -> None:
    """Tried: paid 4,639, refunded 3,000, then a 2,000 dispute lost -> only the 1,639 still
    refundable counts as refunded (amount_refunded 4,639, never above paid), the other 361 is debited
    to `expense:dispute-losses:stripe`; a lost dispute closed before it was ever opened -> opened and
    closed in one go (the hold and the loss journals both posted)."""

    async def flow(c: Client) -> None:
        expect_ok(await c.call("POST", "/finance/invoice", body=_invoice("dp-twice-1", "dp-buyer-3")), 201)
        expect_ok(await _deliver(c, paid("evt_dp_t1", "pi_dp_t1", amount=4639, invoice="dp-twice-1")))
        expect_ok(await _deliver(c, refunded("evt_dp_t2", "pi_dp_t1", [("re_dp_t1", 3000)])))
        losses0, held0 = await _balances(c, LOSSES, HELD)
        lost = dispute_closed("evt_dp_t3", "pi_dp_t1", "lost", dispute="du_twice_1", amount=2000)
        assert expect_ok(await _deliver(c, lost))["outcome"] == "applied"
        hold = dispute_journal_id("dp-twice-1", "du_twice_1")
        assert await _lines(c, hold) == [(HELD, "debit", 2000, "EUR"), (CASH, "credit", 2000, "EUR")]
        lines = await _lines(c, f"{hold}.lost")
        assert (LOSSES, "debit", 361, "EUR") in lines and (HELD, "credit", 2000, "EUR") in lines
        assert await _balances(c, LOSSES, HELD) == [losses0 + 361, held0]
        shown = await _view(c, "dp-twice-1")
        assert (shown["amount_paid"], shown["amount_refunded"], shown["status"]) == (4639, 4639, "refunded")
        assert [(d["status"], d["amount"]) for d in shown["disputes"]] == [("lost", 2000)]

    run(node, flow)
    assert node.run(check_store(node.dsn)) == []


def test_a_lost_dispute_in_another_currency_converts_and_realises_fx(node: NodeHarness) -> None:
    """Tried: an EUR invoice of 11,900 issued at 0.90 EUR/USD, paid via Stripe in USD (14,875 at
    0.80); a 10,000 USD Stripe refund at 0.85 (8,500 EUR); a 5,000 USD dispute held in USD, then
    lost -> 4,250 EUR converted but only 3,400 still refundable: that is refunded (amount_refunded
    11,900), the rest (1,000 USD at 0.85) on `expense:dispute-losses:stripe`, the held USD account
    credited 5,000, FX gain/loss realised and every currency of the journal nets to zero."""

    def usd_event(event_id: str, kind: str, obj: dict[str, Any]) -> bytes:
        return event(event_id, kind, {**obj, "currency": "usd"})

    async def flow(c: Client) -> None:
        rate = {"quote": "EUR", "source": "ecb"}
        expect_ok(
            await c.call("POST", "/finance/fx/rates", body={**rate, "rate": "0.90", "as_of": _now()}), 201
        )
        invoice = {
            "invoice_id": "dp-fx-1",
            "buyer": {"buyer_id": "dp-buyer-4", "country": "DE"},
            "line_items": [{"sku": "dp-fx-sku", "qty": 2, "unit_price": 5000, "tax_code": "standard"}],
            "currency": "EUR",
        }
        assert expect_ok(await c.call("POST", "/finance/invoice", body=invoice), 201)["total"] == 11900
        expect_ok(
            await c.call("POST", "/finance/fx/rates", body={**rate, "rate": "0.80", "as_of": _now()}), 201
        )
        intent = {"id": "pi_dp_fx", "object": "payment_intent", "amount": 14875, "amount_received": 14875,
                  "metadata": {"invoice_id": "dp-fx-1"}}  # fmt: skip
        expect_ok(await _deliver(c, usd_event("evt_dp_fx1", "payment_intent.succeeded", intent)))
        expect_ok(
            await c.call("POST", "/finance/fx/rates", body={**rate, "rate": "0.85", "as_of": _now()}), 201
        )
        charge = {"id": "ch_fx", "object": "charge", "payment_intent": "pi_dp_fx", "amount_refunded": 10000,
                  "refunds": {"data": [{"id": "re_dp_fx", "amount": 10000, "currency": "usd"}]}}  # fmt: skip
        expect_ok(await _deliver(c, usd_event("evt_dp_fx2", "charge.refunded", charge)))
        assert (await _view(c, "dp-fx-1"))["amount_refunded"] == 8500

        losses0 = await _balance(c, LOSSES, "USD")
        held_usd = "asset:disputes-held:stripe:USD"
        opened = disputed("evt_dp_fx3", "pi_dp_fx", dispute="du_fx_1", amount=5000, currency="usd")
        assert expect_ok(await _deliver(c, opened))["outcome"] == "applied"
        lost = dispute_closed(
            "evt_dp_fx4", "pi_dp_fx", "lost", dispute="du_fx_1", amount=5000, currency="usd"
        )
        assert expect_ok(await _deliver(c, lost))["outcome"] == "applied"

        journal_id = f"{dispute_journal_id('dp-fx-1', 'du_fx_1')}.lost"
        posted = expect_ok(await c.call("GET", f"/ledger/{journal_id}", role="auditor"))["journal"]
        net: dict[str, int] = {}
        for entry in posted["entries"]:
            sign = 1 if entry["side"] == "debit" else -1
            net[entry["currency"]] = net.get(entry["currency"], 0) + sign * entry["amount_cents"]
        assert net == {"USD": 0, "EUR": 0}
        lines = await _lines(c, journal_id)
        assert (held_usd, "credit", 5000, "USD") in lines and (LOSSES, "debit", 1000, "USD") in lines
        reversed_eur = sum(a for acct, side, a, ccy in lines if side == "debit" and ccy == "EUR")
        assert reversed_eur == 3400
        assert await _balance(c, LOSSES, "USD") - losses0 == 1000
        assert await _balance(c, held_usd, "USD") == 0
        shown = await _view(c, "dp-fx-1")
        assert (shown["amount_refunded"], shown["status"]) == (11900, "refunded")
        assert [(d["status"], d["currency"]) for d in shown["disputes"]] == [("lost", "USD")]

    run(node, flow)
    assert node.run(check_store(node.dsn)) == []
