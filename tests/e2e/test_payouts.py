"""Payout batches over real HTTP against the Stripe-compatible loopback server.

A run pays the participants above their minimum (holding back the holdback, leaving the one below
its minimum), moves each amount to pending (a hold), transfers it with the payout id as the
idempotency key and posts or voids the hold by outcome. Provider faults (500s, a timeout after
the provider applied the transfer, a permanent 400) and duplicate runs never pay anyone twice, and
money is conserved: per participant, what is still payable + pending + paid equals what accrued.
"""

from __future__ import annotations

import secrets
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from api import payout_routes
from tests.e2e.test_errors import Client, expect_error, expect_ok, run
from tests.e2e.test_multisig import _approve, _pem, _signature
from tests.support.node import NodeHarness, auth, check_store
from tests.support.stripe_server import StripeServer

CCY = "USD"


def _stripe(node: NodeHarness, monkeypatch: pytest.MonkeyPatch, **env: str) -> StripeServer:
    server: StripeServer = node.run(StripeServer().start())
    monkeypatch.setenv("STRIPE_API_KEY", server.api_key)
    monkeypatch.setenv("STRIPE_API_BASE", server.base)
    monkeypatch.setenv("LEDGER_PAYOUT_BACKOFF_S", "0.01")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return server


async def _participant(c: Client, pid: str, account: str, minimum: int) -> None:
    body = {"participant_id": pid, "name": pid, "stripe_account": account,
            "minimum_payout": {"currency": CCY, "amount": minimum}}  # fmt: skip
    expect_ok(await c.call("POST", "/finance/participants", body=body), 201)


async def _accrue(c: Client, tag: str, amounts: dict[str, tuple[int, int]]) -> None:
    """Credit each participant's payable and holdback (what royalty accruals do)."""
    entries: list[dict[str, Any]] = []
    total = 0
    for pid, (payable, holdback) in amounts.items():
        for account, amount in ((f"liability:royalty:{pid}", payable),
                                (f"liability:royalty-holdback:{pid}", holdback)):  # fmt: skip
            if amount:
                entries.append(
                    {"account_id": account, "side": "credit", "amount_cents": amount, "currency": CCY}
                )
                total += amount
    entries.append({"account_id": f"expense:royalties:{tag}", "side": "debit", "amount_cents": total,
                    "currency": CCY})  # fmt: skip
    expect_ok(await c.call("POST", "/ledger/post", body={"journal_id": f"{tag}-accrual", "entries": entries}))


async def _balance(c: Client, account: str) -> dict[str, int]:
    reply = await c.balances(account)
    rows = [r for r in expect_ok(reply)["balances"] if r["currency"] == CCY] if reply.status != 404 else []
    if not rows:
        return {"debits_posted": 0, "credits_posted": 0, "debits_pending": 0, "credits_pending": 0}
    keys = ("debits_posted", "credits_posted", "debits_pending", "credits_pending")
    return {k: rows[0][k] for k in keys}


async def _payable(c: Client, pid: str) -> tuple[int, int]:
    """(available on the payable, pending on it)."""
    b = await _balance(c, f"liability:royalty:{pid}")
    return b["credits_posted"] - b["debits_posted"] - b["debits_pending"], b["debits_pending"]


def _paid_at_stripe(server: StripeServer, account: str) -> int:
    return sum(t["amount"] for t in server.state.transfers.values() if t["destination"] == account)


async def _conserved(c: Client, server: StripeServer, pid: str, account: str, accrued: int) -> None:
    available, pending = await _payable(c, pid)
    assert available + pending + _paid_at_stripe(server, account) == accrued, (pid, available, pending)


async def _run(c: Client, body: dict[str, Any], status: int = 200) -> dict[str, Any]:
    return expect_ok(await c.call("POST", "/finance/payout/run", body=body), status)


def _by_participant(batch: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {p["participant_id"]: p for p in batch["payouts"]}


def _clean(node: NodeHarness) -> None:
    assert node.run(check_store(node.dsn)) == []


def test_run_pays_above_minimum_holds_back_and_skips_below(
    node: NodeHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tried: three participants (minimum 1,000 / 1,000 / 5,000) accrue 3,000 (+500 holdback),
    2,000 and 800; a run of "all due" -> the first two paid once each at Stripe (transfer to their
    connected account, idempotency key = payout id), the holdback and the third's 800 untouched
    (skipped: below_minimum); payables drained, in-transit nets to zero, cash at Stripe credited
    5,000; GET /payout/{id} and the batch answer the same; the CSV and JSON files list both payouts;
    the same run again -> same batch, no new transfer; the batch id with another request -> 409;
    audit events payout.run and payout.paid are recorded."""
    server = _stripe(node, monkeypatch)
    tag = f"pa{secrets.token_hex(3)}"
    p1, p2, p3 = f"{tag}-one", f"{tag}-two", f"{tag}-three"

    async def flow(c: Client) -> None:
        await _participant(c, p1, f"acct_{tag}one", 1000)
        await _participant(c, p2, f"acct_{tag}two", 1000)
        await _participant(c, p3, f"acct_{tag}three", 5000)
        await _accrue(c, tag, {p1: (3000, 500), p2: (2000, 0), p3: (800, 0)})
        cash_before = await _balance(c, f"asset:cash:stripe:{CCY}")
        body = {"payout_date": "2026-11-20", "batch_id": f"{tag}-b1", "items": "all"}
        answer = await _run(c, body)
        assert answer["payoutBatchId"] == answer["payout_batch_id"] == f"{tag}-b1"
        batch = answer["batch"]
        assert batch["status"] == "done"
        paid = _by_participant(batch)
        assert paid[p1]["state"] == paid[p2]["state"] == "paid"
        assert (paid[p1]["amount"], paid[p1]["holdback"], paid[p2]["amount"]) == (3000, 500, 2000)
        assert p3 not in paid
        (skip,) = [s for s in batch["skipped"] if s["participant_id"] == p3]
        assert (skip["reason"], skip["amount"]) == ("below_minimum", 800)
        assert len(server.state.transfers) == 2
        assert _paid_at_stripe(server, f"acct_{tag}one") == 3000
        assert _paid_at_stripe(server, f"acct_{tag}two") == 2000
        keys = {k for k in server.state.seen_keys}
        assert {paid[p1]["payout_id"], paid[p2]["payout_id"]} <= keys
        assert await _payable(c, p1) == (0, 0) and await _payable(c, p2) == (0, 0)
        assert await _payable(c, p3) == (800, 0)
        held = await _balance(c, f"liability:royalty-holdback:{p1}")
        assert held["credits_posted"] - held["debits_posted"] == 500
        transit = await _balance(c, f"liability:payouts-in-transit:stripe:{CCY}")
        assert transit["debits_posted"] == transit["credits_posted"] and transit["debits_pending"] == 0
        cash = await _balance(c, f"asset:cash:stripe:{CCY}")
        assert cash["credits_posted"] - cash_before["credits_posted"] == 5000

        one = expect_ok(await c.call("GET", f"/payout/{paid[p1]['payout_id']}", role="auditor"))["payout"]
        assert one["state"] == "paid" and one["transfer_id"] in server.state.transfers
        assert [a["outcome"] for a in one["attempt_log"]] == ["paid"]
        hold = expect_ok(await c.call("GET", f"/ledger/holds/{one['hold_id']}", role="auditor"))["hold"]
        assert hold["state"] == "posted"
        got = expect_ok(await c.call("GET", f"/finance/payout/batches/{tag}-b1", role="auditor"))["batch"]
        assert got["totals"][CCY]["paid"] == 5000 and got["status"] == "done"

        as_json = expect_ok(await c.call("GET", f"/finance/payout/batches/{tag}-b1/file",
                                         role="auditor", params={"format": "json"}))  # fmt: skip
        assert sorted(r["amount"] for r in as_json["payouts"]) == [2000, 3000]
        async with c.http.get(f"{c.url}/finance/payout/batches/{tag}-b1/file", params={"format": "csv"},
                              headers=auth("auditor")) as resp:  # fmt: skip
            assert resp.status == 200 and resp.content_type == "text/csv"
            text = await resp.text()
        header, *rows = text.strip().splitlines()
        assert header.startswith("payout_id,batch_id,participant_id,stripe_account,currency,amount")
        assert len(rows) == 2 and all(",paid," in r for r in rows)
        expect_error(
            await c.call("GET", f"/finance/payout/batches/{tag}-b1/file", role="auditor",
                         params={"format": "xml"}), 400, "VALIDATION_ERROR",
        )  # fmt: skip

        again = await _run(c, body)
        assert _by_participant(again["batch"]) == paid and len(server.state.transfers) == 2
        expect_error(
            await _c_run(c, {**body, "items": [{"participant_id": p3}]}), 409, "IDEMPOTENCY_CONFLICT"
        )
        second = await _run(c, {"payout_date": "2026-11-21", "batch_id": f"{tag}-b2",
                                "items": [{"participant_id": p1}, {"participant_id": p2}]})  # fmt: skip
        assert second["batch"]["payouts"] == [] and len(server.state.transfers) == 2
        expect_error(await c.call("GET", "/payout/po.nope", role="auditor"), 404, "NOT_FOUND")

        events = expect_ok(await c.call("GET", "/audit/events", role="auditor", params={"limit": "1000"}))
        kinds = [(e["event_type"], e["payload"]) for e in events["events"]]
        assert any(k == "payout.run" and p["batch_id"] == f"{tag}-b1" for k, p in kinds)
        assert sum(1 for k, p in kinds if k == "payout.paid" and tag in p["payout_id"]) == 2
        for pid, acct, accrued in ((p1, "one", 3000), (p2, "two", 2000), (p3, "three", 800)):
            await _conserved(c, server, pid, f"acct_{tag}{acct}", accrued)

    run(node, flow)
    node.run(server.stop())
    _clean(node)


async def _c_run(c: Client, body: dict[str, Any]) -> Any:
    return await c.call("POST", "/finance/payout/run", body=body)


def test_provider_faults_never_pay_twice_and_conserve_money(
    node: NodeHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tried: two 500s then success -> paid once after three attempts; a timeout after Stripe applied
    the transfer -> the retry with the same key answers the same transfer (one transfer, paid);
    a permanent 400 (closed account) -> failed with the reason, the hold voided, the money back on
    the payable; 500s past the retry budget -> stays pending with its hold, then a re-run pays it
    once; a duplicate run pays nobody again; payable + pending + paid is conserved throughout."""
    server = _stripe(node, monkeypatch, LEDGER_PAYOUT_TIMEOUT_S="0.5")
    tag = f"pf{secrets.token_hex(3)}"
    names = {"flaky": f"acct_{tag}flaky", "slow": f"acct_{tag}slow", "closed": f"acct_closed{tag}",
             "down": f"acct_{tag}down"}  # fmt: skip
    pids = {k: f"{tag}-{k}" for k in names}
    accrued = {"flaky": 1500, "slow": 1600, "closed": 1700, "down": 1800}

    async def conserved(c: Client) -> None:
        for k, pid in pids.items():
            await _conserved(c, server, pid, names[k], accrued[k])

    async def flow(c: Client) -> None:
        for k, pid in pids.items():
            await _participant(c, pid, names[k], 100)
        await _accrue(c, tag, {pids[k]: (accrued[k], 0) for k in pids})
        items = [{"participant_id": pids["flaky"]}]

        server.fail_next(500, 500)
        flaky = await _run(c, {"payout_date": "2026-11-20", "batch_id": f"{tag}-flaky", "items": items})
        (payout,) = flaky["batch"]["payouts"]
        assert payout["state"] == "paid" and payout["attempts"] == 3
        assert _paid_at_stripe(server, names["flaky"]) == 1500

        server.delay_next(1.5)
        slow = await _run(c, {"payout_date": "2026-11-20", "batch_id": f"{tag}-slow",
                              "items": [{"participant_id": pids["slow"]}]})  # fmt: skip
        (payout,) = slow["batch"]["payouts"]
        assert payout["state"] == "paid" and payout["attempts"] >= 2
        assert [t for t in server.state.transfers.values() if t["destination"] == names["slow"]] != []
        assert len([t for t in server.state.transfers.values() if t["destination"] == names["slow"]]) == 1

        closed = await _run(c, {"payout_date": "2026-11-20", "batch_id": f"{tag}-closed",
                                "items": [{"participant_id": pids["closed"]}]})  # fmt: skip
        (payout,) = closed["batch"]["payouts"]
        assert payout["state"] == "failed" and "400" in payout["reason"]
        assert await _payable(c, pids["closed"]) == (1700, 0)
        hold = expect_ok(await c.call("GET", f"/ledger/holds/{payout['hold_id']}", role="auditor"))["hold"]
        assert hold["state"] == "voided"

        server.fail_next(500, 500, 500, 500)
        down_body = {"payout_date": "2026-11-20", "batch_id": f"{tag}-down",
                     "items": [{"participant_id": pids["down"]}]}  # fmt: skip
        down = await _run(c, down_body)
        (payout,) = down["batch"]["payouts"]
        assert payout["state"] == "pending" and down["batch"]["status"] == "open"
        assert "retries exhausted" in payout["reason"]
        assert await _payable(c, pids["down"]) == (0, 1800)
        await conserved(c)
        resumed = await _run(c, down_body)
        (payout,) = resumed["batch"]["payouts"]
        assert payout["state"] == "paid" and payout["attempts"] == 5
        assert resumed["batch"]["status"] == "done"
        assert _paid_at_stripe(server, names["down"]) == 1800

        transfers = len(server.state.transfers)
        for body in (down_body, {"payout_date": "2026-11-20", "batch_id": f"{tag}-flaky", "items": items}):
            await _run(c, body)
        again = await _run(c, {"payout_date": "2026-11-22", "batch_id": f"{tag}-again",
                               "items": [{"participant_id": p} for p in pids.values()]})  # fmt: skip
        assert [p["participant_id"] for p in again["batch"]["payouts"]] == [pids["closed"]]
        assert again["batch"]["payouts"][0]["state"] == "failed"
        assert len(server.state.transfers) == transfers
        await conserved(c)
        transit = await _balance(c, f"liability:payouts-in-transit:stripe:{CCY}")
        assert transit["debits_posted"] == transit["credits_posted"] and transit["debits_pending"] == 0

    run(node, flow)
    node.run(server.stop())
    _clean(node)


def test_run_errors(node: NodeHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tried: a bad date, items neither a list nor "all", an amount above what is due, an auditor
    -> 400/400/400/403; without STRIPE_API_KEY -> 503."""
    server = _stripe(node, monkeypatch)
    tag = f"pe{secrets.token_hex(3)}"

    async def flow(c: Client) -> None:
        await _participant(c, f"{tag}-a", f"acct_{tag}a", 0)
        await _accrue(c, tag, {f"{tag}-a": (100, 0)})
        expect_error(await _c_run(c, {"payout_date": "20-11-2026"}), 400, "VALIDATION_ERROR", "$.payout_date")
        expect_error(await _c_run(c, {"payout_date": "2026-11-20", "items": "some"}), 400, "VALIDATION_ERROR")
        over = {"payout_date": "2026-11-20", "batch_id": f"{tag}-over",
                "items": [{"participant_id": f"{tag}-a", "amount": 101}]}  # fmt: skip
        expect_error(await _c_run(c, over), 400, "VALIDATION_ERROR", "$.items[0].amount")
        reply = await c.call(
            "POST", "/finance/payout/run", role="auditor", body={"payout_date": "2026-11-20"}
        )
        assert reply.status == 403
        monkeypatch.delenv("STRIPE_API_KEY")
        expect_error(await _c_run(c, {"payout_date": "2026-11-20"}), 503, "SERVICE_UNAVAILABLE")

    run(node, flow)
    node.run(server.stop())
    _clean(node)


def test_large_batch_waits_for_approvals_then_runs(
    node: NodeHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tried: a payout of 6,000,000 (above the `payout` threshold, 5,000,000) -> 202
    pending_approval, nothing held or transferred, the batch `pending_approval`; the same run again
    -> 202 with the same action; two approvals -> still pending; the third executes the batch: one
    transfer, the payout paid, the action `executed`; money conserved."""
    server = _stripe(node, monkeypatch)
    tag = f"pg{secrets.token_hex(3)}"
    pid, acct = f"{tag}-big", f"acct_{tag}big"
    keys = {f"{tag}-approver-{i}": ed25519.Ed25519PrivateKey.generate() for i in range(3)}

    async def flow(c: Client) -> None:
        for name, key in keys.items():
            body = {"approver_id": name, "public_key": _pem(key)}
            expect_ok(await c.call("POST", "/admin/approvers", role="admin", body=body), 201)
        await _participant(c, pid, acct, 100)
        await _accrue(c, tag, {pid: (6_000_000, 0)})
        run_body = {"payout_date": "2026-11-20", "batch_id": f"{tag}-b", "items": [{"participant_id": pid}]}
        gated = await _run(c, run_body, 202)
        assert gated["status"] == "pending_approval" and gated["payoutBatchId"] == f"{tag}-b"
        action_id = gated["action_id"]
        assert (await _run(c, run_body, 202))["action_id"] == action_id
        batch = expect_ok(await c.call("GET", f"/finance/payout/batches/{tag}-b", role="auditor"))["batch"]
        assert batch["status"] == "pending_approval" and batch["payouts"][0]["state"] == "planned"
        assert await _payable(c, pid) == (6_000_000, 0) and server.state.transfers == {}
        for i, (name, key) in enumerate(keys.items()):
            action = expect_ok(await c.call("GET", f"/finance/approvals/{action_id}", role="auditor"))[
                "action"
            ]
            reply = await _approve(c, action_id, name, _signature(key, action))
            view = expect_ok(reply)["action"]
            assert view["status"] == ("executed" if i == 2 else "pending_approval"), view
        batch = expect_ok(await c.call("GET", f"/finance/payout/batches/{tag}-b", role="auditor"))["batch"]
        assert batch["status"] == "done" and batch["payouts"][0]["state"] == "paid"
        assert _paid_at_stripe(server, acct) == 6_000_000 and len(server.state.transfers) == 1
        await _conserved(c, server, pid, acct, 6_000_000)

    run(node, flow)
    node.run(server.stop())
    _clean(node)


def test_crash_after_the_transfer_is_resumed_by_a_rerun(
    node: NodeHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tried: the node "crashes" after Stripe made the transfer but before the ledger recorded it
    (the step that posts the hold raises) -> 500, the payout left pending with its hold, one transfer
    at Stripe; the batch run again -> Stripe answers the same transfer for the same key (still one),
    the hold posted, the payout paid; money conserved; clean check."""
    server = _stripe(node, monkeypatch)
    tag = f"pc{secrets.token_hex(3)}"
    pid, acct = f"{tag}-crash", f"acct_{tag}crash"
    real = payout_routes.PayoutRunner._paid

    async def crash(*args: Any) -> None:
        raise RuntimeError("simulated crash between the transfer and the ledger")

    async def flow(c: Client) -> None:
        await _participant(c, pid, acct, 100)
        await _accrue(c, tag, {pid: (2500, 0)})
        body = {"payout_date": "2026-11-20", "batch_id": f"{tag}-b", "items": [{"participant_id": pid}]}
        monkeypatch.setattr(payout_routes.PayoutRunner, "_paid", crash)
        expect_error(await _c_run(c, body), 500, "INTERNAL_ERROR")
        monkeypatch.setattr(payout_routes.PayoutRunner, "_paid", real)
        batch = expect_ok(await c.call("GET", f"/finance/payout/batches/{tag}-b", role="auditor"))["batch"]
        (payout,) = batch["payouts"]
        assert payout["state"] == "pending" and payout["transfer_id"] is None
        assert await _payable(c, pid) == (0, 2500) and len(server.state.transfers) == 1
        (payout,) = (await _run(c, body))["batch"]["payouts"]
        assert payout["state"] == "paid" and payout["transfer_id"] in server.state.transfers
        assert len(server.state.transfers) == 1 and _paid_at_stripe(server, acct) == 2500
        await _conserved(c, server, pid, acct, 2500)

    run(node, flow)
    node.run(server.stop())
    _clean(node)
