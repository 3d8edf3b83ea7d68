"""Royalty clawbacks over real HTTP: the Finance II acceptance flow, end to end.

A sale with a 3-way split and a platform fee is fulfilled (royalties accrue with a holdback), a
payout run pays the two participants above their minimum through the Stripe-compatible server and
leaves the third below its minimum; a refund after the payout claws the participants' share of the
reversed revenue back from their payables (two go negative), the statement shows it, a payout run
pays nobody with a negative payable, and the next sale's accrual nets the clawback in the next run.
Every journal balances and the store check is clean; per participant, what is payable + paid equals
what accrued minus what was clawed back.
"""

from __future__ import annotations

import secrets
from typing import Any

import pytest

from finance.service import dispute_journal_id
from tests.e2e.test_errors import Client, expect_ok, run
from tests.e2e.test_payouts import _stripe
from tests.e2e.test_royalties import _add_rule, _entries, _fulfil, _rule
from tests.e2e.test_stripe_webhooks import _deliver
from tests.e2e.test_stripe_webhooks import _invoice as _stripe_invoice
from tests.support.node import NodeHarness, check_store
from tests.support.stripe_server import StripeServer
from tests.unit.test_stripe_events import SECRET, dispute_closed, disputed, paid

CCY = "USD"  # the node's base currency: payout thresholds need no FX rate


async def _sold(c: Client, invoice_id: str, lines: list[dict[str, Any]]) -> dict[str, Any]:
    """An invoice in USD to a buyer in DE (19 % VAT unless a line says otherwise), issued and paid."""
    items = [{"qty": 1, "tax_code": "standard", **line} for line in lines]
    buyer = {"buyer_id": f"{invoice_id}-buyer", "country": "DE"}
    body = {"invoice_id": invoice_id, "buyer": buyer, "line_items": items, "currency": CCY}
    view: dict[str, Any] = expect_ok(await c.call("POST", "/finance/invoice", body=body), 201)
    pay = {"invoice_id": invoice_id, "amount": view["total"], "currency": CCY, "payment_provider": "bank",
           "provider_reference": f"{invoice_id}-pay"}  # fmt: skip
    expect_ok(await c.call("POST", "/finance/payment", body=pay))
    return view


async def _participant(c: Client, pid: str, minimum: int) -> None:
    body = {"participant_id": pid, "name": pid, "stripe_account": f"acct_{pid.replace('-', '')}",
            "minimum_payout": {"currency": CCY, "amount": minimum}}  # fmt: skip
    expect_ok(await c.call("POST", "/finance/participants", body=body), 201)


async def _payable(c: Client, pid: str, currency: str = CCY) -> int:
    """Credits - debits (posted) of the participant's payable; negative: owed back by it."""
    reply = await c.balances(f"liability:royalty:{pid}")
    rows = [r for r in expect_ok(reply)["balances"] if r["currency"] == currency]
    assert rows[0]["debits_pending"] == 0
    return int(rows[0]["credits_posted"] - rows[0]["debits_posted"])


async def _payables(c: Client, *pids: str) -> list[int]:
    return [await _payable(c, pid) for pid in pids]


def _paid(server: StripeServer, pid: str) -> int:
    account = f"acct_{pid.replace('-', '')}"
    return sum(t["amount"] for t in server.state.transfers.values() if t["destination"] == account)


async def _payout(c: Client, batch_id: str, day: str) -> dict[str, Any]:
    body = {"payout_date": day, "batch_id": batch_id, "items": "all"}
    batch: dict[str, Any] = expect_ok(await c.call("POST", "/finance/payout/run", body=body))["batch"]
    assert batch["status"] == "done"
    return batch


async def _refund(c: Client, invoice_id: str, amount: int, n: int = 1) -> dict[str, Any]:
    body = {"invoice_id": invoice_id, "amount": amount, "currency": CCY, "payment_provider": "bank",
            "provider_reference": f"{invoice_id}-refund-{n}"}  # fmt: skip
    answer: dict[str, Any] = expect_ok(await c.call("POST", "/finance/refund", body=body))
    return answer


def test_split_sale_payout_refund_clawback_then_netted(
    node: NodeHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tried: participants alice/bob (minimum 100) and carol (minimum 5,000); rule 50/25/5 % with a
    20 % platform fee and a 10 % holdback; a 10,000 net sale fulfilled -> accrual 5,000/2,500/500
    (holdbacks 500/250/50); payout run 1 pays alice 4,500 and bob 2,250, skips carol (below_minimum),
    holdbacks untouched; half the invoice refunded -> clawback journal takes 2,500/1,250/250 from the
    payables (alice -2,500, bob -1,250, carol 200), the refund answer and the statements show it;
    payout run 2 pays nobody; a second 10,000 sale -> payables 2,000/1,000/650; payout run 3 pays
    alice 2,000 and bob 1,000 (netted) and skips carol; the refund replayed claws nothing twice;
    money conserved per participant; every journal balances (store check clean)."""
    server = _stripe(node, monkeypatch)
    tag = f"cb{secrets.token_hex(3)}"
    alice, bob, carol, sku = f"{tag}-alice", f"{tag}-bob", f"{tag}-carol", f"{tag}-sku"

    async def flow(c: Client) -> None:
        await _participant(c, alice, 100)
        await _participant(c, bob, 100)
        await _participant(c, carol, 5000)
        splits = [(alice, 5000), (bob, 2500), (carol, 500)]
        await _add_rule(c, _rule(sku, splits, 2000, holdback_bp=1000, holdback_days=30))

        sale = await _sold(c, f"{tag}-1", [{"sku": sku, "unit_price": 10000}])
        await _fulfil(c, f"{tag}-1")
        assert await _payables(c, alice, bob, carol) == [4500, 2250, 450]

        first = await _payout(c, f"{tag}-b1", "2026-12-01")
        paid = {p["participant_id"]: p for p in first["payouts"]}
        assert {pid: p["amount"] for pid, p in paid.items()} == {alice: 4500, bob: 2250}
        assert paid[alice]["holdback"] == 500 and paid[bob]["holdback"] == 250
        assert [(s["participant_id"], s["reason"]) for s in first["skipped"]] == [(carol, "below_minimum")]

        refund = await _refund(c, f"{tag}-1", sale["total"] // 2)
        assert refund["net"] == 5000
        claw = refund["royalty_clawback"]
        assert claw["participants"] == {alice: 2500, bob: 1250, carol: 250}
        assert await _entries(c, claw["journal_id"]) == {
            (f"expense:royalties:{sku}", "credit", 4000),
            (f"liability:royalty:{alice}", "debit", 2500),
            (f"liability:royalty:{bob}", "debit", 1250),
            (f"liability:royalty:{carol}", "debit", 250),
        }
        assert await _payables(c, alice, bob, carol) == [-2500, -1250, 200]
        replay = await _refund(c, f"{tag}-1", sale["total"] // 2)
        assert replay["royalty_clawback"] == claw and await _payable(c, alice) == -2500
        events = expect_ok(await c.call("GET", "/audit/events", role="auditor", params={"limit": "1000"}))
        (issued,) = [
            e["payload"] for e in events["events"]
            if e["event_type"] == "refund.issued" and e["payload"]["invoice_id"] == f"{tag}-1"
        ]  # fmt: skip
        assert issued["royalty_clawback"] == claw

        statement = expect_ok(
            await c.call("GET", f"/finance/participants/{alice}/statement", role="auditor")
        )["statement"]
        (row,) = statement["clawbacks"]
        assert (row["invoice_id"], row["sku"], row["revenue_reversed"], row["amount"]) == (
            f"{tag}-1",
            sku,
            5000,
            2500,
        )
        assert row["journal_id"] == claw["journal_id"] and row["source_journal_id"] == refund["journal_id"]
        assert statement["totals"] == [
            {"currency": CCY, "accrued": 5000, "holdback": 500, "clawed_back": 2500}
        ]
        (payable,) = statement["balances"]["payable"]["balances"]
        assert payable == {"currency": CCY, "balance": -2500}

        second = await _payout(c, f"{tag}-b2", "2026-12-02")
        assert second["payouts"] == [] and len(server.state.transfers) == 2

        await _sold(c, f"{tag}-2", [{"sku": sku, "unit_price": 10000}])
        await _fulfil(c, f"{tag}-2")
        assert await _payables(c, alice, bob, carol) == [2000, 1000, 650]
        third = await _payout(c, f"{tag}-b3", "2026-12-03")
        assert {p["participant_id"]: p["amount"] for p in third["payouts"]} == {alice: 2000, bob: 1000}
        assert [(s["participant_id"], s["reason"]) for s in third["skipped"]] == [(carol, "below_minimum")]

        for pid, accrued_payable, clawed in ((alice, 9000, 2500), (bob, 4500, 1250), (carol, 900, 250)):
            assert await _payable(c, pid) + _paid(server, pid) == accrued_payable - clawed, pid

    run(node, flow)
    node.run(server.stop())
    assert node.run(check_store(node.dsn)) == []


def test_full_refund_claws_back_exactly_what_accrued(
    node: NodeHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tried: a 1/3-1/3-1/3 split (no fee) of 1,000 accrues 334/333/333; three refunds of a third of
    the invoice each claw back per the cumulative split and, after the last, exactly what accrued
    (payables back to 0, royalty expense back to 0); a refund of an invoice whose SKU has no rule
    claws nothing back (no `royalty_clawback` in the answer)."""
    tag = f"cf{secrets.token_hex(3)}"
    ids, sku = [f"{tag}-a", f"{tag}-b", f"{tag}-c"], f"{tag}-sku"

    async def flow(c: Client) -> None:
        for pid in ids:
            await _participant(c, pid, 0)
        await _add_rule(c, _rule(sku, [(ids[0], 3334), (ids[1], 3333), (ids[2], 3333)], 0))
        sale = await _sold(c, f"{tag}-1", [{"sku": sku, "unit_price": 1000, "tax_code": "exempt"}])
        await _fulfil(c, f"{tag}-1")
        assert await _payables(c, *ids) == [334, 333, 333]
        total, clawed = sale["total"], dict.fromkeys(ids, 0)
        for n, part in enumerate((total // 3, total // 3, total - 2 * (total // 3))):
            answer = await _refund(c, f"{tag}-1", part, n)
            for pid, amount in answer["royalty_clawback"]["participants"].items():
                clawed[pid] += amount
        assert clawed == {ids[0]: 334, ids[1]: 333, ids[2]: 333}
        assert await _payables(c, *ids) == [0, 0, 0]
        expense = expect_ok(await c.balances(f"expense:royalties:{sku}"))["balances"][0]
        assert expense["debits_posted"] == expense["credits_posted"] == 1000

        other = await _sold(c, f"{tag}-2", [{"sku": f"{tag}-norule", "unit_price": 500}])
        await _fulfil(c, f"{tag}-2")
        assert "royalty_clawback" not in await _refund(c, f"{tag}-2", other["total"])

    run(node, flow)
    assert node.run(check_store(node.dsn)) == []


def test_a_lost_dispute_claws_back_like_a_refund(node: NodeHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tried: an invoice paid through a signed Stripe webhook, SKU `-a` (3,000 net) under a 50 %
    rule, fulfilled -> the participant accrues 1,500; a dispute over the whole payment opened and
    lost -> the lost-dispute journal reverses the revenue and a clawback journal takes the 1,500
    back (payable 0, statement row naming the lost-dispute journal); the lost close redelivered
    -> duplicate, nothing clawed twice; clean store check."""
    monkeypatch.setenv("STRIPE_WEBHOOK_SECRET", SECRET)
    monkeypatch.delenv("STRIPE_API_KEY", raising=False)
    tag = f"cd{secrets.token_hex(3)}"
    pid, invoice_id = f"{tag}-p", f"{tag}-1"

    async def flow(c: Client) -> None:
        await _participant(c, pid, 0)
        await _add_rule(c, _rule(f"{invoice_id}-a", [(pid, 5000)], 5000))
        expect_ok(await c.call("POST", "/finance/invoice", body=_stripe_invoice(invoice_id, f"{tag}-b")), 201)
        expect_ok(await _deliver(c, paid(f"evt_{tag}1", f"pi_{tag}", amount=4639, invoice=invoice_id)))
        await _fulfil(c, invoice_id)
        assert await _payable(c, pid, "EUR") == 1500
        opened = disputed(f"evt_{tag}2", f"pi_{tag}", dispute=f"du_{tag}", amount=4639)
        assert expect_ok(await _deliver(c, opened))["outcome"] == "applied"
        lost = dispute_closed(f"evt_{tag}3", f"pi_{tag}", "lost", dispute=f"du_{tag}", amount=4639)
        assert expect_ok(await _deliver(c, lost))["outcome"] == "applied"
        assert await _payable(c, pid, "EUR") == 0
        statement = expect_ok(await c.call("GET", f"/finance/participants/{pid}/statement", role="auditor"))
        (row,) = statement["statement"]["clawbacks"]
        assert row["source_journal_id"] == f"{dispute_journal_id(invoice_id, f'du_{tag}')}.lost"
        assert (row["revenue_reversed"], row["amount"]) == (3000, 1500)
        again = dispute_closed(f"evt_{tag}4", f"pi_{tag}", "lost", dispute=f"du_{tag}", amount=4639)
        assert expect_ok(await _deliver(c, again))["outcome"] == "duplicate"
        assert await _payable(c, pid, "EUR") == 0

    run(node, flow)
    assert node.run(check_store(node.dsn)) == []


def test_clawback_reverses_paid_transfers_when_configured(
    node: NodeHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tried: LEDGER_CLAWBACK_REVERSALS=on; alice (50 %) is paid 5,000 through Stripe, carol (5 %,
    minimum 5,000) is not; half the sale refunded -> clawback 2,500 / 250: alice's transfer is
    reversed by 2,500 at Stripe (idempotency key = the reversal id), journal {reversal id} debits
    Stripe cash and credits her payable (back to 0), carol's positive payable needs no reversal;
    the refund replayed reverses nothing more; the other half refunded while Stripe refuses the
    reversal (400) -> the reversal is `failed` with the reason and her payable carries -2,500;
    the statement lists both; money conserved (paid - reversed + payable = accrued - clawed)."""
    server = _stripe(node, monkeypatch, LEDGER_CLAWBACK_REVERSALS="on")
    tag = f"cr{secrets.token_hex(3)}"
    alice, carol, sku = f"{tag}-alice", f"{tag}-carol", f"{tag}-sku"

    async def flow(c: Client) -> None:
        await _participant(c, alice, 100)
        await _participant(c, carol, 5000)
        await _add_rule(c, _rule(sku, [(alice, 5000), (carol, 500)], 4500))
        sale = await _sold(c, f"{tag}-1", [{"sku": sku, "unit_price": 10000}])
        await _fulfil(c, f"{tag}-1")
        batch = await _payout(c, f"{tag}-b1", "2026-12-04")
        assert [(p["participant_id"], p["amount"]) for p in batch["payouts"]] == [(alice, 5000)]
        (transfer_id,) = [
            t for t, x in server.state.transfers.items() if x["destination"] == f"acct_{tag}alice"
        ]
        cash0 = expect_ok(await c.balances(f"asset:cash:stripe:{CCY}"))["balances"][0]

        first = await _refund(c, f"{tag}-1", sale["total"] // 2, 1)
        assert first["royalty_clawback"]["participants"] == {alice: 2500, carol: 250}
        (reversal,) = server.state.reversals.values()
        assert (reversal["transfer"], reversal["amount"]) == (transfer_id, 2500)
        assert await _payables(c, alice, carol) == [0, 250]
        cash1 = expect_ok(await c.balances(f"asset:cash:stripe:{CCY}"))["balances"][0]
        assert cash1["debits_posted"] - cash0["debits_posted"] == 2500
        await _refund(c, f"{tag}-1", sale["total"] // 2, 1)  # a replay
        assert len(server.state.reversals) == 1 and await _payables(c, alice) == [0]

        server.fail_next(400)
        await _refund(c, f"{tag}-1", sale["total"] - sale["total"] // 2, 2)
        assert len(server.state.reversals) == 1 and await _payables(c, alice, carol) == [-2500, 0]
        statement = expect_ok(await c.call("GET", f"/finance/participants/{alice}/statement", role="auditor"))
        rows = statement["statement"]["reversals"]
        assert [(r["state"], r["amount"], r["transfer_id"]) for r in rows] == [
            ("reversed", 2500, transfer_id), ("failed", 2500, transfer_id)
        ]  # fmt: skip
        assert rows[0]["journal_id"] == rows[0]["reversal_id"] and "injected" in rows[1]["reason"]
        reversed_total = sum(r["amount"] for r in server.state.reversals.values())
        assert _paid(server, alice) - reversed_total + await _payable(c, alice) == 5000 - 5000

    run(node, flow)
    node.run(server.stop())
    assert node.run(check_store(node.dsn)) == []
