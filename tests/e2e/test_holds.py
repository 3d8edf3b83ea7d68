"""Holds (pending two-phase amounts) over real HTTP: create, balances, overdraft, post, void, expiry.

Each test drives a node as a client would, checks every error with its code, status and field,
and ends with `ledger-node check` clean (pending columns equal the open holds' lines).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from actors import runtime as actor_runtime
from node.config import NodeConfig
from node.runtime import Node
from tests.e2e.test_errors import Client, Reply, expect_error, expect_ok, lines, on_shard, run
from tests.support.node import TOKEN_SPEC, NodeHarness, check_store, journal

SHARD = 1


def _accounts(tag: str) -> tuple[str, str, str]:
    """(guarded wallet, cash, merchant): three accounts on SHARD."""
    return (
        on_shard(f"liability:{tag}-wallet", SHARD),
        on_shard(f"asset:{tag}-cash", SHARD),
        on_shard(f"liability:{tag}-merchant", SHARD),
    )


async def _funded_wallet(c: Client, tag: str, amount: int) -> tuple[str, str, str]:
    wallet, cash, merchant = _accounts(tag)
    expect_ok(await c.create_account(wallet, no_negative=True), 201)
    expect_ok(await c.post(journal(f"{tag}-fund", cash, wallet, amount)))
    return wallet, cash, merchant


async def _hold(c: Client, body: dict[str, Any], **kw: Any) -> Any:
    return await c.call("POST", "/ledger/holds", body=body, **kw)


async def _pending(c: Client, account_id: str) -> dict[str, int]:
    body = expect_ok(await c.balances(account_id))
    (row,) = [r for r in body["balances"] if r["currency"] == "USD"]
    keys = ("debits_posted", "credits_posted", "debits_pending", "credits_pending", "balance")
    return {k: row[k] for k in keys}


async def _get(c: Client, hold_id: str) -> dict[str, Any]:
    hold: dict[str, Any] = expect_ok(await c.call("GET", f"/ledger/holds/{hold_id}", role="auditor"))["hold"]
    return hold


async def until_served(call: Callable[[], Awaitable[Reply]]) -> Reply:
    """While Ray restarts a shard actor, calls answer 503 SERVICE_UNAVAILABLE (retryable), and Ray
    may report the actor unavailable once more right after its first answers: retry those."""
    for _ in range(120):
        reply = await call()
        if reply.status != 503:
            return reply
        await asyncio.sleep(0.5)
    return reply


def _clean(node: NodeHarness) -> None:
    assert node.run(check_store(node.dsn)) == []


def test_hold_reserves_and_posts_in_full(node: NodeHarness) -> None:
    """Tried: fund a guarded wallet with 1000; hold 700 wallet -> merchant -> pending columns show
    700 on both, posted unchanged; spending 400 (journal or second hold) -> 409 INSUFFICIENT_FUNDS;
    post the hold -> a normal signed journal with the hold's id; replay -> same answer; void after
    post -> 409 INVALID_STATE; the audit stream holds one event per call."""

    async def flow(c: Client) -> None:
        wallet, cash, merchant = await _funded_wallet(c, "hfull", 1000)
        made = expect_ok(await _hold(c, journal("hfull-1", wallet, merchant, 700)))
        assert made["hold_id"] == "hfull-1" and made["state"] == "pending" and made["created_at"]
        again = expect_ok(await _hold(c, journal("hfull-1", wallet, merchant, 700)))
        assert again == made
        assert await _pending(c, wallet) == {
            "debits_posted": 0, "credits_posted": 1000, "debits_pending": 700, "credits_pending": 0,
            "balance": 1000,
        }  # fmt: skip
        assert (await _pending(c, merchant))["credits_pending"] == 700
        refused = expect_error(
            await c.post(journal("hfull-spend", wallet, cash, 400)), 409, "INSUFFICIENT_FUNDS"
        )
        assert refused["available"] == 300
        expect_error(await _hold(c, journal("hfull-2", wallet, merchant, 400)), 409, "INSUFFICIENT_FUNDS")
        expect_error(await c.call("GET", "/ledger/holds/hfull-2", role="auditor"), 404, "NOT_FOUND")
        expect_ok(await c.post(journal("hfull-small", wallet, cash, 300)))

        posted = expect_ok(await c.call("POST", "/ledger/holds/hfull-1/post"))
        assert posted["state"] == "posted" and posted["posted_journal_id"] == "hfull-1"
        replay = expect_ok(await c.call("POST", "/ledger/holds/hfull-1/post", body={}))
        assert replay == posted
        stored = expect_ok(await c.call("GET", "/ledger/hfull-1", role="auditor"))
        assert [e["amount_cents"] for e in stored["journal"]["entries"]] == [700, 700]
        assert stored["audit"]["signature"] and stored["audit"]["shard"] == SHARD
        assert await _pending(c, wallet) == {
            "debits_posted": 1000, "credits_posted": 1000, "debits_pending": 0, "credits_pending": 0,
            "balance": 0,
        }  # fmt: skip
        assert (await _pending(c, merchant))["credits_posted"] == 700
        details = expect_error(await c.call("POST", "/ledger/holds/hfull-1/void"), 409, "INVALID_STATE")
        assert details["current_state"] == "posted" and details["requested_state"] == "voided"
        different = await c.call("POST", "/ledger/holds/hfull-1/post", body={"amount_cents": 5})
        assert expect_error(different, 409, "INVALID_STATE")["current_state"] == "posted"
        hold = await _get(c, "hfull-1")
        assert hold["state"] == "posted" and hold["posted_journal_id"] == "hfull-1"
        assert [(x["account_id"], x["side"], x["amount_cents"]) for x in hold["lines"]] == [
            (wallet, "debit", 700), (merchant, "credit", 700),
        ]  # fmt: skip
        events = expect_ok(await c.call("GET", "/audit/events", role="auditor", params={"limit": "1000"}))
        kinds = [e["event_type"] for e in events["events"] if e["payload"].get("hold_id") == "hfull-1"]
        assert kinds.count("ledger.hold") == 2 and kinds.count("ledger.hold_post") == 2, kinds

    run(node, flow)
    _clean(node)


def test_partial_post_releases_the_rest(node: NodeHarness) -> None:
    """Tried: hold 500; post amount_cents 600 -> 400 VALIDATION_ERROR $.amount_cents; post 0 -> same;
    post 200 -> 200 posted, 300 released; a 3-line hold posted with `entries`: bad line_no ->
    $.entries[0].line_no, too much -> $.entries[0].amount_cents, unbalanced -> LEDGER_IMBALANCE,
    then a balanced partial post."""

    async def flow(c: Client) -> None:
        wallet, _cash, merchant = await _funded_wallet(c, "hpart", 1000)
        expect_ok(await _hold(c, journal("hpart-1", wallet, merchant, 500)))
        path = "/ledger/holds/hpart-1/post"
        over = expect_error(await c.call("POST", path, body={"amount_cents": 600}), 400, "VALIDATION_ERROR")
        assert over["field"] == "$.amount_cents" and over["held"] == 500
        expect_error(
            await c.call("POST", path, body={"amount_cents": 0}), 400, "VALIDATION_ERROR", "$.amount_cents"
        )
        expect_error(await c.call("POST", path, body={"amount": 1}), 400, "VALIDATION_ERROR")
        posted = expect_ok(await c.call("POST", path, body={"amount_cents": 200}))
        assert posted["state"] == "posted"
        assert await _pending(c, wallet) == {
            "debits_posted": 200, "credits_posted": 1000, "debits_pending": 0, "credits_pending": 0,
            "balance": 800,
        }  # fmt: skip
        stored = expect_ok(await c.call("GET", "/ledger/hpart-1", role="auditor"))
        assert [e["amount_cents"] for e in stored["journal"]["entries"]] == [200, 200]

        fee = on_shard("revenue:hpart-fee", SHARD)
        three = lines(
            (wallet, "debit", 300, "USD"), (merchant, "credit", 270, "USD"), (fee, "credit", 30, "USD")
        )
        expect_ok(await _hold(c, {**three, "journal_id": "hpart-3"}))
        path = "/ledger/holds/hpart-3/post"
        expect_error(
            await c.call("POST", path, body={"amount_cents": 10}), 400, "VALIDATION_ERROR", "$.amount_cents"
        )
        bad_line = {"entries": [{"line_no": 7, "amount_cents": 1}]}
        expect_error(
            await c.call("POST", path, body=bad_line), 400, "VALIDATION_ERROR", "$.entries[0].line_no"
        )
        too_much = {"entries": [{"line_no": 2, "amount_cents": 31}]}
        expect_error(
            await c.call("POST", path, body=too_much), 400, "VALIDATION_ERROR", "$.entries[0].amount_cents"
        )
        unbalanced = {"entries": [{"line_no": 2, "amount_cents": 10}]}
        expect_error(await c.call("POST", path, body=unbalanced), 400, "LEDGER_IMBALANCE")
        assert (await _get(c, "hpart-3"))["state"] == "pending"
        part = {"entries": [{"line_no": 0, "amount_cents": 280}, {"line_no": 2, "amount_cents": 10}]}
        expect_ok(await c.call("POST", path, body=part))
        assert (await _pending(c, wallet))["debits_posted"] == 480
        assert (await _pending(c, fee))["credits_posted"] == 10
        assert (await _pending(c, merchant))["credits_pending"] == 0

    run(node, flow)
    _clean(node)


def test_void_releases_and_is_final(node: NodeHarness) -> None:
    """Tried: hold 900 of 1000; void -> pending released, the money spendable; void replay -> the
    original answer; post after void -> 409 INVALID_STATE (voided, posted)."""

    async def flow(c: Client) -> None:
        wallet, cash, merchant = await _funded_wallet(c, "hvoid", 1000)
        expect_ok(await _hold(c, journal("hvoid-1", wallet, merchant, 900)))
        voided = expect_ok(await c.call("POST", "/ledger/holds/hvoid-1/void"))
        assert voided["state"] == "voided"
        assert expect_ok(await c.call("POST", "/ledger/holds/hvoid-1/void")) == voided
        assert (await _pending(c, wallet))["debits_pending"] == 0
        assert (await _pending(c, merchant))["credits_pending"] == 0
        details = expect_error(await c.call("POST", "/ledger/holds/hvoid-1/post"), 409, "INVALID_STATE")
        assert details["current_state"] == "voided" and details["requested_state"] == "posted"
        expect_ok(await c.post(journal("hvoid-spend", wallet, cash, 1000)))
        assert (await _get(c, "hvoid-1"))["state"] == "voided"
        await c.absent_journal("hvoid-1")

    run(node, flow)
    _clean(node)


def test_expired_hold_is_released_at_once(node: NodeHarness) -> None:
    """Tried: hold 800 of 1000 expiring in 1.5 s; before expiry spending 300 -> INSUFFICIENT_FUNDS;
    after it, GET -> expired, pending 0, spending 1000 works, post -> 409 INVALID_STATE (expired),
    void -> 409 INVALID_STATE (expired)."""

    async def flow(c: Client) -> None:
        wallet, cash, merchant = await _funded_wallet(c, "hexp", 1000)
        expires = datetime.now(UTC) + timedelta(seconds=1.5)
        body = {**journal("hexp-1", wallet, merchant, 800), "expires_at": expires.isoformat()}
        expect_ok(await _hold(c, body))
        assert (await _get(c, "hexp-1"))["expires_at"].startswith(expires.strftime("%Y-%m-%dT%H:%M:%S"))
        expect_error(await c.post(journal("hexp-early", wallet, cash, 300)), 409, "INSUFFICIENT_FUNDS")
        await asyncio.sleep(max(0.0, (expires - datetime.now(UTC)).total_seconds()) + 0.05)
        hold = await _get(c, "hexp-1")
        assert hold["state"] == "expired" and hold["posted_journal_id"] is None
        assert (await _pending(c, wallet))["debits_pending"] == 0
        assert (await _pending(c, merchant))["credits_pending"] == 0
        expect_ok(await c.post(journal("hexp-spend", wallet, cash, 1000)))
        details = expect_error(await c.call("POST", "/ledger/holds/hexp-1/post"), 409, "INVALID_STATE")
        assert details["current_state"] == "expired" and details["requested_state"] == "posted"
        details = expect_error(await c.call("POST", "/ledger/holds/hexp-1/void"), 409, "INVALID_STATE")
        assert details["current_state"] == "expired"

    run(node, flow)
    _clean(node)


def test_hold_errors(node: NodeHarness) -> None:
    """Tried: auditor creating/posting/voiding -> 403; unknown hold -> 404 on get/post/void; bad
    expires_at -> $.expires_at; unbalanced -> LEDGER_IMBALANCE; accounts on two shards ->
    $.entries; a hold id used with another payload -> IDEMPOTENCY_CONFLICT; an Idempotency-Key
    replay without an id -> the same generated hold id; a hold id that is a posted journal's id
    -> IDEMPOTENCY_CONFLICT."""

    async def flow(c: Client) -> None:
        wallet, cash, merchant = await _funded_wallet(c, "herr", 1000)
        body = journal("herr-1", wallet, merchant, 10)
        expect_error(await _hold(c, body, role="auditor"), 403, "NOT_AUTHORIZED")
        expect_error(await c.call("POST", "/ledger/holds/x/post", role="auditor"), 403, "NOT_AUTHORIZED")
        expect_error(await c.call("POST", "/ledger/holds/x/void", role="auditor"), 403, "NOT_AUTHORIZED")
        for method, path in (("GET", ""), ("POST", "/post"), ("POST", "/void")):
            details = expect_error(await c.call(method, f"/ledger/holds/herr-none{path}"), 404, "NOT_FOUND")
            assert details["resource"] == "hold"
        bad_time = {**body, "expires_at": "tomorrow"}
        expect_error(await _hold(c, bad_time), 400, "VALIDATION_ERROR", "$.expires_at")
        unbalanced = lines((wallet, "debit", 10, "USD"), (merchant, "credit", 9, "USD"))
        expect_error(await _hold(c, unbalanced), 400, "LEDGER_IMBALANCE")
        far = on_shard("liability:herr-far", (SHARD + 1) % 4)
        expect_error(await _hold(c, journal("herr-x", wallet, far, 10)), 400, "VALIDATION_ERROR", "$.entries")
        expect_ok(await _hold(c, body))
        expect_error(await _hold(c, journal("herr-1", wallet, merchant, 11)), 409, "IDEMPOTENCY_CONFLICT")
        lopsided = {
            **lines((wallet, "debit", 10, "USD"), (merchant, "credit", 9, "USD")),
            "journal_id": "herr-1",
        }
        expect_error(await _hold(c, lopsided), 409, "IDEMPOTENCY_CONFLICT")  # D6: conflict before imbalance
        keyed = journal(None, wallet, merchant, 20)
        first = expect_ok(await _hold(c, keyed, headers={"Idempotency-Key": "herr-key"}))
        second = expect_ok(await _hold(c, keyed, headers={"Idempotency-Key": "herr-key"}))
        assert first == second and first["hold_id"].startswith("hold-")
        other = journal(None, wallet, merchant, 21)
        expect_error(
            await _hold(c, other, headers={"Idempotency-Key": "herr-key"}), 409, "IDEMPOTENCY_CONFLICT"
        )
        expect_ok(await c.post(journal("herr-posted", cash, merchant, 5)))
        taken = journal("herr-posted", wallet, merchant, 5)
        expect_error(await _hold(c, taken), 409, "IDEMPOTENCY_CONFLICT")
        assert (await _pending(c, wallet))["debits_pending"] == 30
        for hold_id in ("herr-1", first["hold_id"]):
            expect_ok(await c.call("POST", f"/ledger/holds/{hold_id}/void"))

    run(node, flow)
    _clean(node)


def test_open_hold_survives_a_shard_restart(node: NodeHarness) -> None:
    """Tried: hold 600 of 1000, kill the shard actor (Ray restarts it, rebuilding from PostgreSQL)
    -> the pending amounts are still reserved (spending 500 -> INSUFFICIENT_FUNDS), the hold can
    still be posted, and an expiring hold made before the kill still expires."""
    assert node.node is not None and node.node.services is not None
    port = node.node.services.shards[SHARD]

    async def before(c: Client) -> None:
        wallet, _cash, merchant = await _funded_wallet(c, "hrst", 1000)
        expect_ok(await _hold(c, journal("hrst-1", wallet, merchant, 600)))
        soon = (datetime.now(UTC) + timedelta(seconds=4)).isoformat()
        expect_ok(await _hold(c, {**journal("hrst-2", wallet, merchant, 100), "expires_at": soon}))

    async def after(c: Client) -> None:
        wallet, cash, _merchant = _accounts("hrst")
        reply = await until_served(lambda: c.post(journal("hrst-spend", wallet, cash, 500)))
        expect_error(reply, 409, "INSUFFICIENT_FUNDS")
        assert (await _pending(c, wallet))["debits_pending"] == 700
        expect_ok(await until_served(lambda: c.call("POST", "/ledger/holds/hrst-1/post")))
        await asyncio.sleep(4.5)
        assert (await _get(c, "hrst-2"))["state"] == "expired"
        for _ in range(20):  # the shard's sweeper writes the expiry shortly after
            if node.run(port.status())["holds"] == 0:
                break
            await asyncio.sleep(0.25)
        assert node.run(port.status())["holds"] == 0
        expect_ok(await c.post(journal("hrst-spend-2", wallet, cash, 400)))

    run(node, before)
    actor_runtime.kill(port)  # type: ignore[arg-type]
    run(node, after)
    _clean(node)


def test_holds_on_a_split_account_homed_elsewhere_survive_a_shard_restart(node: NodeHarness) -> None:
    """Tried: a split account whose home slot is on another shard; two holds wallet -> that account,
    booked by the wallet's shard; kill that shard's actor (Ray restarts it from PostgreSQL) -> one
    hold posts in full and the other voids (the restarted shard must know its own holds' pending
    amounts on the split account, whose balances row another shard loads); exact balances; clean
    check."""
    assert node.node is not None and node.node.services is not None
    port = node.node.services.shards[SHARD]
    pool = on_shard("liability:hsplit-pool", (SHARD + 1) % 4)

    async def before(c: Client) -> None:
        body = {"account_id": pool, "policy": {"split": True}}
        expect_ok(await c.call("POST", "/accounts", role="admin", body=body), 201)
        wallet, _cash, _merchant = await _funded_wallet(c, "hsplit", 1000)
        expect_ok(await _hold(c, journal("hsplit-1", wallet, pool, 300)))
        expect_ok(await _hold(c, journal("hsplit-2", wallet, pool, 200)))
        assert (await _pending(c, pool))["credits_pending"] == 500

    async def after(c: Client) -> None:
        wallet, _cash, _merchant = _accounts("hsplit")
        expect_ok(await until_served(lambda: c.call("POST", "/ledger/holds/hsplit-1/post")))
        expect_ok(await until_served(lambda: c.call("POST", "/ledger/holds/hsplit-2/void")))
        assert await _pending(c, pool) == {
            "debits_posted": 0, "credits_posted": 300, "debits_pending": 0, "credits_pending": 0,
            "balance": 300,
        }  # fmt: skip
        assert (await _pending(c, wallet))["balance"] == 700

    run(node, before)
    actor_runtime.kill(port)  # type: ignore[arg-type]
    run(node, after)
    _clean(node)


def test_open_hold_survives_a_node_restart(node: NodeHarness) -> None:
    """Tried: hold 250 of 300, stop the whole node and start a new one on the same database ->
    GET answers pending with its lines, balances show 250 pending, spending 100 -> INSUFFICIENT_FUNDS,
    a partial post of 200 then works and the wallet keeps 100. (Runs last: it replaces the node.)"""

    async def before(c: Client) -> None:
        wallet, _cash, merchant = await _funded_wallet(c, "hnode", 300)
        expect_ok(await _hold(c, journal("hnode-1", wallet, merchant, 250)))

    run(node, before)
    assert node.node is not None
    node.run(node.node.stop())
    node.node = Node(
        NodeConfig(port=0, shards=4, database_url=node.dsn, api_tokens=TOKEN_SPEC, data_dir=node.data_dir)
    )
    node.run(node.node.start())

    async def after(c: Client) -> None:
        wallet, cash, merchant = _accounts("hnode")
        hold = await _get(c, "hnode-1")
        assert hold["state"] == "pending" and [x["amount_cents"] for x in hold["lines"]] == [250, 250]
        assert (await _pending(c, wallet))["debits_pending"] == 250
        expect_error(await c.post(journal("hnode-spend", wallet, cash, 100)), 409, "INSUFFICIENT_FUNDS")
        expect_ok(await c.call("POST", "/ledger/holds/hnode-1/post", body={"amount_cents": 200}))
        assert await _pending(c, wallet) == {
            "debits_posted": 200, "credits_posted": 300, "debits_pending": 0, "credits_pending": 0,
            "balance": 100,
        }  # fmt: skip
        assert (await _pending(c, merchant))["credits_posted"] == 200

    run(node, after)
    _clean(node)
