"""Holdback release, scheduled payout runs and the start-up resume of open batches, over real HTTP.

A royalty accrual's holdback stays on `liability:royalty-holdback:{participant}` (payout runs never
pay it) until its release time; then one journal per accrual journal moves it to the payable, and
the next payout run pays it. Releases run from the node's ticker, at the start of every payout run
and on demand (`POST /finance/holdbacks/release`); a release replays, never posts twice. A node with
`LEDGER_PAYOUT_SCHEDULE=every:1` pays what is due by itself, and a node restarted with a batch left
open finishes it.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest

from api import payout_routes
from api.finance_routes import FINANCE
from tests.e2e.test_errors import Client, expect_error, expect_ok, run
from tests.e2e.test_payouts import _accrue, _stripe
from tests.e2e.test_royalties import _add_rule, _entries, _fulfil, _rule, _sold
from tests.support.node import NodeHarness, check_store

FAR = "2099-01-01T00:00:00Z"
AFTER_FAR = datetime(2099, 1, 2, tzinfo=UTC)
PAST = "2020-01-01T00:00:00Z"


@pytest.fixture(scope="module")
def manual(ray_cluster: None) -> Iterator[NodeHarness]:
    """A node without the periodic ticker (its clock is moved by the test) and without a schedule."""
    harness = NodeHarness(shards=2, recognition_interval_s=0).start()
    yield harness
    harness.stop()


@pytest.fixture(scope="module")
def scheduled(ray_cluster: None) -> Iterator[NodeHarness]:
    """A node that ticks every second and runs "all due" payouts every second."""
    harness = NodeHarness(shards=2, recognition_interval_s=1, payout_schedule="every:1").start()
    yield harness
    harness.stop()


async def _participant(
    c: Client, pid: str, stripe: bool = True, minimum: dict[str, Any] | None = None
) -> None:
    body: dict[str, Any] = {"participant_id": pid, "name": pid}
    if stripe:
        body["stripe_account"] = f"acct_{pid.replace('-', '')}"
    if minimum is not None:
        body["minimum_payout"] = minimum
    expect_ok(await c.call("POST", "/finance/participants", body=body), 201)


async def _balance(c: Client, account: str, currency: str = "EUR") -> dict[str, int]:
    reply = await c.balances(account)
    rows = (
        [r for r in expect_ok(reply)["balances"] if r["currency"] == currency] if reply.status != 404 else []
    )
    keys = ("debits_posted", "credits_posted", "debits_pending")
    return {k: rows[0][k] for k in keys} if rows else dict.fromkeys(keys, 0)


async def _net(c: Client, account: str) -> int:
    b = await _balance(c, account)
    return b["credits_posted"] - b["debits_posted"] - b["debits_pending"]


def _paid(server: Any, pid: str) -> int:
    account = f"acct_{pid.replace('-', '')}"
    return sum(t["amount"] for t in server.state.transfers.values() if t["destination"] == account)


async def _eur_rate(c: Client) -> None:
    """A EUR rate, so multisig thresholds (in USD, the base currency) apply to EUR batches."""
    body = {"quote": "EUR", "rate": "0.9", "source": "ecb", "as_of": PAST}
    reply = await c.call("POST", "/finance/fx/rates", body=body)
    assert reply.status in (200, 201), reply


async def _release(c: Client, body: dict[str, Any] | None = None, role: str = "operator") -> dict[str, Any]:
    answer: dict[str, Any] = expect_ok(
        await c.call("POST", "/finance/holdbacks/release", role=role, body=body or {})
    )
    return answer


async def _events(c: Client, event_type: str) -> list[dict[str, Any]]:
    events = expect_ok(await c.call("GET", "/audit/events", role="auditor", params={"limit": "1000"}))
    return [e for e in events["events"] if e["event_type"] == event_type]


def test_holdback_is_held_then_released_once_then_paid(
    manual: NodeHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tried: a sale of 10,000 EUR split ann 50 % / bob 30 % with a 20 % holdback released on
    2099-01-01 -> the first payout run pays 4,000 / 2,400 and holds back 1,000 / 600 (nothing
    released); releasing now releases nothing; as_of after now -> 400 VALIDATION_ERROR on $.as_of;
    service and auditor -> 403. The clock moved past the release date -> one journal
    `{accrual}.holdback-release` moves 1,000 / 600 from holdback to payable and is listed; again ->
    nothing; the rows un-marked as by a crash before the marking -> the release is replayed (the
    holdback account debited once, the payable credited once); the statement shows the release;
    the next payout run pays 1,000 / 600 (5,000 / 3,000 at Stripe in all); audited; clean check."""
    server = _stripe(manual, monkeypatch)
    tag = f"hb{secrets.token_hex(3)}"
    ann, bob, sku, invoice = f"{tag}-ann", f"{tag}-bob", f"{tag}-sku", f"{tag}-inv"
    accrual = f"{invoice}.fulfil"
    release_id = f"{accrual}.holdback-release"

    async def flow(c: Client) -> None:
        await _eur_rate(c)
        await _participant(c, ann)
        await _participant(c, bob)
        await _add_rule(
            c, _rule(sku, [(ann, 5000), (bob, 3000)], 2000, holdback_bp=2000, holdback_release_at=FAR)
        )
        await _sold(c, invoice, [{"sku": sku, "unit_price": 10000}])
        await _fulfil(c, invoice)
        run_body = {"payout_date": "2026-11-20", "batch_id": f"{tag}-b1"}
        first = expect_ok(await c.call("POST", "/finance/payout/run", body=run_body))
        assert first["holdbacks_released"] == []
        paid = {p["participant_id"]: (p["amount"], p["holdback"]) for p in first["batch"]["payouts"]}
        assert paid == {ann: (4000, 1000), bob: (2400, 600)}
        assert (_paid(server, ann), _paid(server, bob)) == (4000, 2400)
        assert await _net(c, f"liability:royalty-holdback:{ann}") == 1000

        assert (await _release(c))["released"] == []
        reply = await c.call("POST", "/finance/holdbacks/release", role="operator", body={"as_of": FAR})
        future = expect_error(reply, 400, "VALIDATION_ERROR", "$.as_of")
        assert "now" in future
        for role in ("service", "auditor"):
            assert (await c.call("POST", "/finance/holdbacks/release", role=role, body={})).status == 403

        monkeypatch.setattr(manual.node.runner.app[FINANCE], "clock", lambda: AFTER_FAR)  # type: ignore[union-attr]
        done = await _release(c)
        (released,) = done["released"]
        assert (released["journal_id"], released["accrual_journal_id"]) == (release_id, accrual)
        assert released["amounts"] == [{"participant_id": ann, "currency": "EUR", "amount": 1000},
                                       {"participant_id": bob, "currency": "EUR", "amount": 600}]  # fmt: skip
        assert await _entries(c, release_id) == {
            (f"liability:royalty-holdback:{ann}", "debit", 1000),
            (f"liability:royalty:{ann}", "credit", 1000),
            (f"liability:royalty-holdback:{bob}", "debit", 600),
            (f"liability:royalty:{bob}", "credit", 600),
        }
        assert (await _release(c))["released"] == []

        conn = await asyncpg.connect(manual.dsn)
        try:
            await conn.execute("UPDATE royalty_accruals SET holdback_released_at = NULL,"
                               " holdback_release_journal = NULL WHERE journal_id = $1", accrual)  # fmt: skip
        finally:
            await conn.close()
        (replayed,) = (await _release(c))["released"]
        assert replayed["journal_id"] == release_id
        for pid, amount in ((ann, 1000), (bob, 600)):
            held = await _balance(c, f"liability:royalty-holdback:{pid}")
            assert (held["credits_posted"], held["debits_posted"]) == (amount, amount)
            assert await _net(c, f"liability:royalty:{pid}") == amount

        statement = expect_ok(await c.call("GET", f"/finance/participants/{ann}/statement", role="auditor"))
        (row,) = statement["statement"]["accruals"]
        assert row["holdback_release_journal_id"] == release_id and row["holdback_released_at"] is not None
        assert (row["holdback"], row["payable"], row["holdback_release_at"][:10]) == (
            1000,
            4000,
            "2099-01-01",
        )

        run_body = {"payout_date": "2026-11-21", "batch_id": f"{tag}-b2"}
        second = expect_ok(await c.call("POST", "/finance/payout/run", body=run_body))
        paid = {p["participant_id"]: (p["amount"], p["holdback"]) for p in second["batch"]["payouts"]}
        assert paid == {ann: (1000, 0), bob: (600, 0)}
        assert (_paid(server, ann), _paid(server, bob)) == (5000, 3000)
        assert await _net(c, f"liability:royalty:{ann}") == 0
        assert await _net(c, f"liability:royalty-holdback:{ann}") == 0
        audited = [
            e for e in await _events(c, "royalty.holdback_release") if e["payload"]["trigger"] == "api"
        ]
        assert [e["payload"]["released"][0]["journal_id"] for e in audited] == [release_id, release_id]
        assert all(e["actor_id"].startswith("operator:") for e in audited)

    run(manual, flow)
    manual.run(server.stop())
    assert manual.run(check_store(manual.dsn)) == []


def test_a_batch_left_open_is_resumed_when_the_node_starts(
    manual: NodeHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tried: a run whose node "crashes" after planning, before the payout's hold (the step that
    creates it raises) leaves the payout planned and the batch open, nothing transferred; the node
    restarted -> without any request the batch is resumed in the background: the payout held,
    transferred once and paid, the batch done. (A crash after the hold is not used here: posting,
    after a restart, a hold whose other side is the split in-transit account trips the shard's
    pending invariant, a holds issue reported separately.)"""
    server = _stripe(manual, monkeypatch)
    tag = f"hr{secrets.token_hex(3)}"
    pid = f"{tag}-eve"
    real = payout_routes.PayoutRunner.create_hold

    async def crash(*args: Any) -> None:
        raise RuntimeError("simulated crash between planning and the hold")

    async def before(c: Client) -> None:
        await _participant(c, pid, minimum={"currency": "USD", "amount": 1})
        await _accrue(c, tag, {pid: (2500, 0)})
        body = {"payout_date": "2026-11-20", "batch_id": f"{tag}-b", "items": [{"participant_id": pid}]}
        monkeypatch.setattr(payout_routes.PayoutRunner, "create_hold", crash)
        expect_error(await c.call("POST", "/finance/payout/run", body=body), 500, "INTERNAL_ERROR")
        monkeypatch.setattr(payout_routes.PayoutRunner, "create_hold", real)
        batch = expect_ok(await c.call("GET", f"/finance/payout/batches/{tag}-b", role="auditor"))["batch"]
        assert batch["status"] == "open" and batch["payouts"][0]["state"] == "planned"
        assert _paid(server, pid) == 0

    async def after(c: Client) -> None:
        deadline = time.monotonic() + 60
        while True:
            batch = expect_ok(await c.call("GET", f"/finance/payout/batches/{tag}-b", role="auditor"))[
                "batch"
            ]
            if batch["status"] == "done" or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        assert batch["status"] == "done" and batch["payouts"][0]["state"] == "paid"
        assert len([t for t in server.state.transfers.values() if t["destination"] == f"acct_{tag}eve"]) == 1

    run(manual, before)
    manual.restart()
    run(manual, after)
    manual.run(server.stop())
    assert manual.run(check_store(manual.dsn)) == []


def test_scheduled_runs_pay_due_royalties_and_the_ticker_releases_holdbacks(
    scheduled: NodeHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tried: a node with LEDGER_PAYOUT_SCHEDULE=every:1; a sale whose 20 % holdback was due in 2020,
    cat (minimum 5,000, so the payable alone never qualifies) and dan (no Stripe account) -> with no
    request, the ticker (or the run's own release) releases the holdback in one journal, and the
    scheduled run creates today's batch `pb.{today}` paying cat 5,000 once (payable + released
    holdback); dan's 3,000 stays payable; later ticks resume the same batch (no second transfer);
    the schedule metrics count the runs; clean check."""
    server = _stripe(scheduled, monkeypatch)
    tag = f"hs{secrets.token_hex(3)}"
    cat, dan, sku, invoice = f"{tag}-cat", f"{tag}-dan", f"{tag}-sku", f"{tag}-inv"
    batch_id = f"pb.{datetime.now(UTC).date().isoformat()}"

    async def flow(c: Client) -> None:
        await _eur_rate(c)
        await _participant(c, cat, minimum={"currency": "EUR", "amount": 5000})
        await _participant(c, dan, stripe=False)
        await _add_rule(
            c, _rule(sku, [(cat, 5000), (dan, 3000)], 2000, holdback_bp=2000, holdback_release_at=PAST)
        )
        await _sold(c, invoice, [{"sku": sku, "unit_price": 10000}])
        await _fulfil(c, invoice)
        deadline = time.monotonic() + 60
        batch: dict[str, Any] = {}
        while time.monotonic() < deadline:
            reply = await c.call("GET", f"/finance/payout/batches/{batch_id}", role="auditor")
            if reply.status == 200 and expect_ok(reply)["batch"]["status"] == "done":
                batch = expect_ok(reply)["batch"]
                break
            await asyncio.sleep(0.25)
        assert batch, "the scheduled run did not pay"
        assert batch["principal"] == "node:payout-schedule" and batch["payout_date"] == batch_id[len("pb.") :]
        (payout,) = [p for p in batch["payouts"] if p["participant_id"] == cat]
        assert (payout["amount"], payout["state"]) == (5000, "paid")
        assert _paid(server, cat) == 5000
        assert await _net(c, f"liability:royalty:{dan}") == 3000
        assert await _net(c, f"liability:royalty-holdback:{dan}") == 0
        await asyncio.sleep(2.5)  # more scheduled runs: they resume the same batch
        assert _paid(server, cat) == 5000
        accrual = f"{invoice}.fulfil"
        events = await _events(c, "royalty.holdback_release")
        (released,) = [e for e in events if e["payload"]["released"][0]["accrual_journal_id"] == accrual]
        assert released["actor_id"] in ("node:holdbacks", "node:payout-schedule")
        async with c.http.get(f"{c.url}/metrics") as resp:
            text = await resp.text()
        runs = [float(line.split()[-1]) for line in text.splitlines()
                if line.startswith("ledger_payout_schedule_runs_total ")]  # fmt: skip
        last = [float(line.split()[-1]) for line in text.splitlines()
                if line.startswith("ledger_payout_schedule_last_run_timestamp_seconds ")]  # fmt: skip
        assert runs and runs[0] >= 3 and last and abs(last[0] - time.time()) < 30

    run(scheduled, flow)
    scheduled.run(server.stop())
    assert scheduled.run(check_store(scheduled.dsn)) == []
