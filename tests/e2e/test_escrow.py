"""Escrow over real HTTP (REQUIREMENTS F7): allocate, release on a condition, cancel, gated releases.

Each test uses its own provider name, so its pool `liability:escrow:{provider}:USD` and the
provider's cash account start at zero, and ends with `ledger-node check` clean (the pool's pending
amounts equal the open escrow holds).
"""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519

from tests.e2e.test_errors import Client, expect_error, expect_ok, run
from tests.e2e.test_multisig import _approve, _pem, _signature
from tests.support.node import NodeHarness, check_store

CCY = "USD"
KEYS = ("debits_posted", "credits_posted", "debits_pending", "credits_pending")


def _tag() -> str:
    return f"es{secrets.token_hex(3)}"


async def _bal(c: Client, account: str) -> dict[str, int]:
    reply = await c.balances(account)
    rows = [r for r in expect_ok(reply)["balances"] if r["currency"] == CCY] if reply.status != 404 else []
    return {k: rows[0][k] for k in KEYS} if rows else dict.fromkeys(KEYS, 0)


async def _participant(c: Client, pid: str) -> None:
    body = {"participant_id": pid, "name": pid}
    expect_ok(await c.call("POST", "/finance/participants", body=body), 201)


def _allocation(tag: str, escrow_id: str, amount: int = 2500, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "escrow_id": escrow_id,
        "order_id": f"order-{escrow_id}",
        "amount": amount,
        "currency": CCY,
        "provider": f"p{tag}",
        "condition": {"type": "delivery"},
    }
    body.update(extra)
    return body


async def _allocate(c: Client, body: dict[str, Any], status: int = 200) -> dict[str, Any]:
    escrow: dict[str, Any] = expect_ok(await c.call("POST", "/finance/allocate_escrow", body=body), status)[
        "escrow"
    ]
    return escrow


async def _release(c: Client, body: dict[str, Any]) -> Any:
    return await c.call("POST", "/finance/release_escrow", body=body)


async def _cancel(c: Client, body: dict[str, Any]) -> Any:
    return await c.call("POST", "/finance/cancel_escrow", body=body)


async def _get(c: Client, escrow_id: str) -> dict[str, Any]:
    escrow: dict[str, Any] = expect_ok(await c.call("GET", f"/finance/escrow/{escrow_id}", role="auditor"))[
        "escrow"
    ]
    return escrow


async def _events(c: Client) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    cursor = None
    while True:
        params = {"limit": "1000", **({"cursor": cursor} if cursor else {})}
        page = expect_ok(await c.call("GET", "/audit/events", role="auditor", params=params))
        events.extend(page["events"])
        if not page["events"]:
            return events
        cursor = page["next_cursor"]


def _clean(node: NodeHarness) -> None:
    assert node.run(check_store(node.dsn)) == []


def test_allocate_then_release_with_delivery_evidence(node: NodeHarness) -> None:
    """Tried: allocate 2,500 for a registered participant -> 200 locked; the provider's cash is
    debited, the pool credited with 2,500 pending debit, the participant's payable has 2,500
    credits pending; GET shows the seeds' fields; the same allocation again -> 200 unchanged, with
    another amount -> 409 IDEMPOTENCY_CONFLICT; release without evidence -> 409 INVALID_STATE
    condition_not_met (nothing moves); release with evidence.delivery_ref -> 200 released with
    releasedAt, payee credited posted, pool back to zero, the hold posted; the same release again ->
    200, with other evidence -> 409 IDEMPOTENCY_CONFLICT; cancel of it -> 409 INVALID_STATE
    (current released); unknown escrow -> 404; audit events escrow.allocate and escrow.release."""
    tag = _tag()
    pid, escrow_id = f"{tag}-seller", f"{tag}-1"
    pool, cash, payable = (
        f"liability:escrow:p{tag}:{CCY}",
        f"asset:cash:p{tag}:{CCY}",
        f"liability:royalty:{pid}",
    )

    async def flow(c: Client) -> None:
        await _participant(c, pid)
        body = _allocation(tag, escrow_id, payee=pid)
        locked = await _allocate(c, body)
        assert (locked["id"], locked["orderId"], locked["amount"], locked["currency"], locked["status"]) == (
            escrow_id, f"order-{escrow_id}", 2500, CCY, "locked",
        )  # fmt: skip
        assert locked["condition"] == {"type": "delivery"} and locked["releasedAt"] is None
        assert locked["createdAt"] and locked["payee_account"] == payable and locked["pool_account"] == pool
        assert await _bal(c, cash) == {**dict.fromkeys(KEYS, 0), "debits_posted": 2500}
        assert await _bal(c, pool) == {
            **dict.fromkeys(KEYS, 0),
            "credits_posted": 2500,
            "debits_pending": 2500,
        }
        assert await _bal(c, payable) == {**dict.fromkeys(KEYS, 0), "credits_pending": 2500}
        assert await _get(c, escrow_id) == locked
        assert await _allocate(c, body) == locked
        expect_error(
            await c.call("POST", "/finance/allocate_escrow", body={**body, "amount": 2600}), 409,
            "IDEMPOTENCY_CONFLICT",
        )  # fmt: skip
        assert await _bal(c, cash) == {**dict.fromkeys(KEYS, 0), "debits_posted": 2500}

        unmet = expect_error(await _release(c, {"escrow_id": escrow_id}), 409, "INVALID_STATE")
        assert (unmet["reason"], unmet["current"], unmet["requested"]) == (
            "condition_not_met",
            "locked",
            "released",
        )
        assert (await _get(c, escrow_id))["status"] == "locked"
        assert await _bal(c, payable) == {**dict.fromkeys(KEYS, 0), "credits_pending": 2500}

        release = {"escrow_id": escrow_id, "evidence": {"delivery_ref": "trk-123"}}
        answer = expect_ok(await _release(c, release))
        done = answer["escrow"]
        assert answer["escrowId"] == escrow_id and done["status"] == "released" and done["releasedAt"]
        assert done["evidence"]["delivery_ref"] == "trk-123"
        assert await _bal(c, payable) == {**dict.fromkeys(KEYS, 0), "credits_posted": 2500}
        assert await _bal(c, pool) == {
            **dict.fromkeys(KEYS, 0),
            "credits_posted": 2500,
            "debits_posted": 2500,
        }
        hold = expect_ok(await c.call("GET", f"/ledger/holds/escrow.{escrow_id}", role="auditor"))["hold"]
        assert hold["state"] == "posted"
        assert expect_ok(await _release(c, release))["escrow"] == done
        other = {"escrow_id": escrow_id, "evidence": {"delivery_ref": "trk-999"}}
        expect_error(await _release(c, other), 409, "IDEMPOTENCY_CONFLICT")
        refused = expect_error(await _cancel(c, {"escrow_id": escrow_id}), 409, "INVALID_STATE")
        assert (refused["current"], refused["requested"]) == ("released", "cancelled")
        assert await _bal(c, payable) == {**dict.fromkeys(KEYS, 0), "credits_posted": 2500}

        missing = expect_error(
            await c.call("GET", f"/finance/escrow/{tag}-nope", role="auditor"), 404, "NOT_FOUND"
        )
        assert missing["resource"] == "escrow"
        expect_error(await _release(c, {"escrow_id": f"{tag}-nope"}), 404, "NOT_FOUND")
        expect_error(await _cancel(c, {"escrow_id": f"{tag}-nope"}), 404, "NOT_FOUND")
        mine = [e for e in await _events(c) if e["payload"].get("escrow_id") == escrow_id]
        assert [e["event_type"] for e in mine] == ["escrow.allocate", "escrow.release"]

    run(node, flow)
    _clean(node)


def test_cancel_gives_the_money_back_to_the_funding_account(node: NodeHarness) -> None:
    """Tried: allocate from an explicit funding wallet to an explicit payee account, then cancel with
    a reason -> 200 cancelled; the hold voided, `escrow.{id}.refund` posted, the funding wallet and
    the pool net zero, the payee never credited; cancel again -> 200 unchanged, with another reason ->
    409 IDEMPOTENCY_CONFLICT; release -> 409 INVALID_STATE (current cancelled); audit escrow.cancel."""
    tag = _tag()
    escrow_id, wallet, payee = f"{tag}-c", f"liability:wallet:{tag}-buyer", f"liability:seller:{tag}"
    pool = f"liability:escrow:p{tag}:{CCY}"

    async def flow(c: Client) -> None:
        expect_ok(await c.post({"journal_id": f"{tag}-topup", "entries": [
            {"account_id": f"asset:bank:{tag}", "side": "debit", "amount_cents": 4000, "currency": CCY},
            {"account_id": wallet, "side": "credit", "amount_cents": 4000, "currency": CCY}]}))  # fmt: skip
        body = _allocation(tag, escrow_id, 1500, payee_account=payee, funding_account=wallet)
        await _allocate(c, body)
        assert await _bal(c, wallet) == {
            **dict.fromkeys(KEYS, 0),
            "credits_posted": 4000,
            "debits_posted": 1500,
        }
        assert await _bal(c, payee) == {**dict.fromkeys(KEYS, 0), "credits_pending": 1500}
        cancel = {"escrow_id": escrow_id, "reason": "buyer changed mind"}
        done = expect_ok(await _cancel(c, cancel))["escrow"]
        assert (done["status"], done["reason"], done["releasedAt"]) == (
            "cancelled",
            "buyer changed mind",
            None,
        )
        assert done["cancelledAt"] and done["journals"]["refund"] == f"escrow.{escrow_id}.refund"
        wallet_now = await _bal(c, wallet)
        assert wallet_now["credits_posted"] - wallet_now["debits_posted"] == 4000
        assert await _bal(c, payee) == dict.fromkeys(KEYS, 0)
        assert await _bal(c, pool) == {
            **dict.fromkeys(KEYS, 0),
            "credits_posted": 1500,
            "debits_posted": 1500,
        }
        hold = expect_ok(await c.call("GET", f"/ledger/holds/escrow.{escrow_id}", role="auditor"))["hold"]
        assert hold["state"] == "voided"
        expect_ok(await c.call("GET", f"/ledger/escrow.{escrow_id}.refund", role="auditor"))
        assert expect_ok(await _cancel(c, cancel))["escrow"] == done
        expect_error(
            await _cancel(c, {"escrow_id": escrow_id, "reason": "other"}), 409, "IDEMPOTENCY_CONFLICT"
        )
        refused = expect_error(
            await _release(c, {"escrow_id": escrow_id, "evidence": {"delivery_ref": "x"}}),
            409,
            "INVALID_STATE",
        )
        assert (refused["current"], refused["requested"]) == ("cancelled", "released")
        assert (await _bal(c, wallet))["debits_posted"] == 1500
        types = [e["event_type"] for e in await _events(c) if e["payload"].get("escrow_id") == escrow_id]
        assert types == ["escrow.allocate", "escrow.cancel"]

    run(node, flow)
    _clean(node)


def test_bad_input_is_a_validation_error_naming_the_field(node: NodeHarness) -> None:
    """Tried: an unknown member, a negative amount, a float amount, an unknown currency, an unknown
    participant, a bad condition type, both payees, malformed JSON, an unknown release member and a
    bad escrow id -> 400 VALIDATION_ERROR with the JSON path, and nothing was written (the escrow is
    404, the provider's cash untouched); an auditor may not allocate (403), nobody without a token."""
    tag = _tag()

    async def flow(c: Client) -> None:
        await _participant(c, f"{tag}-known")
        good = _allocation(tag, f"{tag}-bad", payee=f"{tag}-known")
        cases = [
            ({**good, "colour": "red"}, "$.colour"),
            ({**good, "amount": -1}, "$.amount"),
            ({**good, "amount": 1.5}, "$.amount"),
            ({**good, "currency": "ZZZ"}, "$.currency"),
            ({**good, "payee": f"{tag}-stranger"}, "$.payee"),
            ({**good, "condition": {"type": "moon_phase"}}, "$.condition"),
            ({**good, "payee_account": "liability:x"}, "$.payee"),
            ({**good, "escrow_id": "has space"}, "$.escrow_id"),
        ]
        for body, field in cases:
            details = expect_error(
                await c.call("POST", "/finance/allocate_escrow", body=body), 400, "VALIDATION_ERROR"
            )
            assert str(details["field"]).startswith(field), (body, details)
        raw = await c.call(
            "POST", "/finance/allocate_escrow", data=b"{nope", headers={"Content-Type": "application/json"}
        )
        expect_error(raw, 400, "VALIDATION_ERROR", "$")
        expect_error(
            await _release(c, {"escrow_id": f"{tag}-bad", "extra": 1}), 400, "VALIDATION_ERROR", "$.extra"
        )
        expect_error(await _cancel(c, {"escrow_id": "bad id"}), 400, "VALIDATION_ERROR", "$.escrow_id")
        expect_error(await c.call("GET", f"/finance/escrow/{tag}-bad", role="auditor"), 404, "NOT_FOUND")
        await c.absent_account(f"asset:cash:p{tag}:{CCY}")
        denied = await c.call("POST", "/finance/allocate_escrow", role="auditor", body=good)
        assert denied.status == 403 and denied.body["error"]["code"] == "NOT_AUTHORIZED"
        anonymous = await c.call("POST", "/finance/allocate_escrow", role=None, body=good)
        assert anonymous.status == 401

    run(node, flow)


def test_audit_event_condition(node: NodeHarness) -> None:
    """Tried: an escrow waiting on an audit event that does not exist -> release 409 INVALID_STATE
    condition_not_met; escrows waiting on an existing event, named by its seq and by its hash ->
    release 200 released, the payee credited."""
    tag = _tag()
    payee = f"liability:seller:{tag}"

    async def flow(c: Client) -> None:
        absent = _allocation(tag, f"{tag}-a0", payee_account=payee,
                             condition={"type": "audit_event", "event_id": "987654321"})  # fmt: skip
        await _allocate(c, absent)
        unmet = expect_error(await _release(c, {"escrow_id": f"{tag}-a0"}), 409, "INVALID_STATE")
        assert unmet["reason"] == "condition_not_met"
        event = next(e for e in await _events(c) if e["payload"].get("escrow_id") == f"{tag}-a0")
        for n, event_id in enumerate((str(event["seq"]), event["hash"]), start=1):
            body = _allocation(tag, f"{tag}-a{n}", 100, payee_account=payee,
                               condition={"type": "audit_event", "event_id": event_id})  # fmt: skip
            await _allocate(c, body)
            released = expect_ok(await _release(c, {"escrow_id": f"{tag}-a{n}"}))["escrow"]
            assert released["status"] == "released"
        assert await _bal(c, payee) == {
            **dict.fromkeys(KEYS, 0),
            "credits_posted": 200,
            "credits_pending": 2500,
        }

    run(node, flow)
    _clean(node)


def test_gated_releases_need_three_approvals(node: NodeHarness) -> None:
    """Tried: an `approval` escrow -> release answers 202 pending_approval (again: same action),
    nothing moves; two approvals -> still locked; the third releases it (action executed, payee
    credited, escrow released, a release replay 200). A delivery escrow of 6,000,000 (above the
    `escrow_release` threshold, 5,000,000) with evidence -> 202 too, released by three approvals."""
    tag = _tag()
    payee = f"liability:seller:{tag}"
    keys = {f"{tag}-approver-{i}": ed25519.Ed25519PrivateKey.generate() for i in range(3)}

    async def approve_all(c: Client, action_id: str) -> None:
        for i, (name, key) in enumerate(keys.items()):
            action = expect_ok(await c.call("GET", f"/finance/approvals/{action_id}", role="auditor"))[
                "action"
            ]
            view = expect_ok(await _approve(c, action_id, name, _signature(key, action)))["action"]
            assert view["status"] == ("executed" if i == 2 else "pending_approval"), view
            if i < 2:
                assert (await _get(c, action["params"]["escrow_id"]))["status"] == "locked"

    async def flow(c: Client) -> None:
        for name, key in keys.items():
            expect_ok(await c.call("POST", "/admin/approvers", role="admin",
                                   body={"approver_id": name, "public_key": _pem(key)}), 201)  # fmt: skip
        await _allocate(c, _allocation(tag, f"{tag}-g1", payee_account=payee, condition={"type": "approval"}))
        gated = expect_ok(await _release(c, {"escrow_id": f"{tag}-g1"}), 202)
        assert (gated["status"], gated["approvals_required"]) == ("pending_approval", 3)
        assert (
            expect_ok(await _release(c, {"escrow_id": f"{tag}-g1"}), 202)["action_id"] == gated["action_id"]
        )
        assert (await _get(c, f"{tag}-g1"))["action_id"] == gated["action_id"]
        assert await _bal(c, payee) == {**dict.fromkeys(KEYS, 0), "credits_pending": 2500}
        await approve_all(c, gated["action_id"])
        released = await _get(c, f"{tag}-g1")
        assert released["status"] == "released" and released["releasedAt"]
        assert await _bal(c, payee) == {**dict.fromkeys(KEYS, 0), "credits_posted": 2500}
        assert expect_ok(await _release(c, {"escrow_id": f"{tag}-g1"}))["escrow"]["status"] == "released"

        big = _allocation(tag, f"{tag}-g2", 6_000_000, payee_account=payee)
        await _allocate(c, big)
        release = {"escrow_id": f"{tag}-g2", "evidence": {"delivery_ref": "crate-7"}}
        expect_error(await _release(c, {"escrow_id": f"{tag}-g2"}), 409, "INVALID_STATE")
        gated = expect_ok(await _release(c, release), 202)
        await approve_all(c, gated["action_id"])
        assert (await _get(c, f"{tag}-g2"))["status"] == "released"
        assert (await _bal(c, payee))["credits_posted"] == 6_002_500

    run(node, flow)
    _clean(node)


def test_concurrent_release_and_cancel_only_one_wins(node: NodeHarness) -> None:
    """Tried: a release and a cancel of the same escrow sent at once, five times -> each time one
    answers 200 and the other 409 INVALID_STATE, and the ledger moved the money once (payee
    credited, or funding restored, never both); clean check."""
    tag = _tag()
    payee = f"liability:seller:{tag}"
    cash = f"asset:cash:p{tag}:{CCY}"

    async def flow(c: Client) -> None:
        for n in range(5):
            escrow_id = f"{tag}-r{n}"
            await _allocate(c, _allocation(tag, escrow_id, 100, payee_account=payee))
            replies = await asyncio.gather(
                _release(c, {"escrow_id": escrow_id, "evidence": {"delivery_ref": "d"}}),
                _cancel(c, {"escrow_id": escrow_id}),
            )
            assert sorted(r.status for r in replies) == [200, 409], replies
            loser = next(r for r in replies if r.status == 409)
            assert loser.body["error"]["code"] == "INVALID_STATE"
        escrows = [await _get(c, f"{tag}-r{n}") for n in range(5)]
        released = sum(e["status"] == "released" for e in escrows)
        assert (await _bal(c, payee))["credits_posted"] == 100 * released
        money = await _bal(c, cash)
        assert money["debits_posted"] - money["credits_posted"] == 100 * released

    run(node, flow)
    _clean(node)
