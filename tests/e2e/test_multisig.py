"""Multisig governance over HTTP: approvers, a gated adjusting journal, 3-of-5 approvals.

The node runs with the defaults: policy 3-of-5 and the `journal` threshold at 10,000,000 minor
units of the base currency (USD). One approval is given with `ledger-node approve` as an
approver would, the others over HTTP.
"""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from finance.multisig import PrivateKey, sign_statement, statement_for
from tests.e2e.test_errors import Client, expect_error, expect_ok, run
from tests.support.node import TOKENS, NodeHarness, check_store

CLI = Path(sys.executable).with_name("ledger-node")
BIG = 20_000_000  # above the default journal threshold (10,000,000)


def _pem(key: PrivateKey) -> str:
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return public.decode()


def _adjustment(journal_id: str, amount: int, reason: str | None = "year-end correction") -> dict[str, Any]:
    body: dict[str, Any] = {
        "journal_id": journal_id,
        "entries": [
            {"account_id": "asset:adj-cash", "side": "debit", "amount_cents": amount, "currency": "USD"},
            {"account_id": "equity:adj-capital", "side": "credit", "amount_cents": amount, "currency": "USD"},
        ],
    }
    if reason is not None:
        body["reason"] = reason
    return body


def _signature(key: PrivateKey, action: dict[str, Any]) -> str:
    statement = statement_for(action["action_id"], action["kind"], action["params"], action["expires_at"])
    assert base64.b64decode(action["statement_b64"]) == statement.encode()
    return sign_statement(key, statement)


async def _approve(c: Client, action_id: str, approver: str, signature: str, role: str = "operator") -> Any:
    return await c.call(
        "POST",
        f"/finance/approvals/{action_id}",
        role=role,
        body={"approver_id": approver, "signature": signature},
    )


async def _action(c: Client, action_id: str) -> dict[str, Any]:
    body = expect_ok(await c.call("GET", f"/finance/approvals/{action_id}", role="auditor"))
    action: dict[str, Any] = body["action"]
    return action


def _approve_with_cli(url: str, action_id: str, approver: str, key: PrivateKey, tmp: Path) -> str:
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    key_file = tmp / f"{approver}.pem"
    key_file.write_bytes(pem)
    env = {**os.environ, "LEDGER_URL": url, "LEDGER_TOKEN": TOKENS["operator"]}
    done = subprocess.run(
        [str(CLI), "approve", action_id, "--key", str(key_file), "--approver-id", approver],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_gated_journal_needs_three_distinct_valid_approvals(node: NodeHarness, tmp_path: Path) -> None:
    """Tried: register 5 approvers (a 6th is refused, a replay answers 200, another key under a
    known id is 409, a service token 401/403); an adjusting journal below the threshold posts at
    once, one without a reason is 400; one above it answers 202 pending_approval and moves no
    money; two approvals (one by `ledger-node approve`) leave it pending; a duplicate approver,
    a forged signature, a signature over another action, an unknown approver and an auditor
    token are refused; an exact replay of an approval answers 200 without counting twice; the
    third approval executes it (balances move once, the journal carries the reason); approving
    afterwards is 409; a second action is rejected by an operator and cannot be approved; a
    revoked approver's approval stops counting; audit events record every step; clean check."""
    keys: dict[str, PrivateKey] = {
        f"approver-{i}": ed25519.Ed25519PrivateKey.generate()
        if i < 3
        else ec.generate_private_key(ec.SECP256R1())
        for i in range(5)
    }

    async def flow(c: Client) -> None:
        for name, key in keys.items():
            made = expect_ok(
                await c.call(
                    "POST",
                    "/admin/approvers",
                    role="admin",
                    body={"approver_id": name, "public_key": _pem(key)},
                ),
                201,
            )
            assert made["approver"]["algorithm"] == ("ed25519" if name < "approver-3" else "p256")
        replay = await c.call(
            "POST",
            "/admin/approvers",
            role="admin",
            body={"approver_id": "approver-0", "public_key": _pem(keys["approver-0"])},
        )
        assert expect_ok(replay)["approver"]["approver_id"] == "approver-0"
        other = ed25519.Ed25519PrivateKey.generate()
        expect_error(
            await c.call(
                "POST",
                "/admin/approvers",
                role="admin",
                body={"approver_id": "approver-0", "public_key": _pem(other)},
            ),
            409,
            "IDEMPOTENCY_CONFLICT",
        )
        full = expect_error(
            await c.call(
                "POST",
                "/admin/approvers",
                role="admin",
                body={"approver_id": "approver-5", "public_key": _pem(other)},
            ),
            409,
            "INVALID_STATE",
        )
        assert full["reason"] == "registry_full"
        denied = await c.call(
            "POST", "/admin/approvers", role="service", body={"approver_id": "x", "public_key": _pem(other)}
        )
        assert denied.status in (401, 403) and denied.body["error"]["code"] == "NOT_AUTHORIZED"
        listed = expect_ok(await c.call("GET", "/admin/approvers", role="admin"))
        assert [a["approver_id"] for a in listed["approvers"]] == sorted(keys) and listed[
            "policy"
        ] == "3-of-5"

        small = expect_ok(
            await c.call("POST", "/finance/journal", role="operator", body=_adjustment("adj-small", 500))
        )
        assert small["journal_id"] == "adj-small"
        expect_error(
            await c.call(
                "POST", "/finance/journal", role="operator", body=_adjustment("adj-x", 500, reason=None)
            ),
            400,
            "VALIDATION_ERROR",
        )
        expect_error(
            await c.call(
                "POST", "/finance/journal", role="operator", body=_adjustment("adj-x", 500, reason="  ")
            ),
            400,
            "VALIDATION_ERROR",
            "$.reason",
        )
        before = await c.balance("asset:adj-cash")
        gated = expect_ok(
            await c.call("POST", "/finance/journal", role="operator", body=_adjustment("adj-big", BIG)), 202
        )
        assert (gated["status"], gated["approvals_required"], gated["action_id"]) == (
            "pending_approval",
            3,
            "journal.adj-big",
        )
        again = expect_ok(
            await c.call("POST", "/finance/journal", role="operator", body=_adjustment("adj-big", BIG)), 202
        )
        assert again["action_id"] == gated["action_id"]
        action_id = gated["action_id"]
        action = await _action(c, action_id)
        assert (action["amount"], action["currency"], action["approvals_valid"]) == (BIG, "USD", 0)
        assert await c.balance("asset:adj-cash") == before
        expect_error(await c.call("GET", "/ledger/adj-big", role="auditor"), 404, "NOT_FOUND")

        first = _signature(keys["approver-0"], action)
        one = expect_ok(await _approve(c, action_id, "approver-0", first))["action"]
        assert (one["status"], one["approvals_valid"]) == ("pending_approval", 1)
        out = await asyncio.to_thread(
            _approve_with_cli, c.url, action_id, "approver-3", keys["approver-3"], tmp_path
        )
        assert "2 of 3 approvals" in out and "pending_approval" in out
        assert await c.balance("asset:adj-cash") == before

        # ECDSA signatures are randomised: approver-3 signing again gives a new, valid signature
        duplicate = expect_error(
            await _approve(c, action_id, "approver-3", _signature(keys["approver-3"], action)),
            409,
            "INVALID_STATE",
        )
        assert duplicate["reason"] == "duplicate_approver"
        forged = base64.b64encode(b"\x02" * 64).decode()
        assert (
            expect_error(
                await _approve(c, action_id, "approver-1", forged), 400, "VALIDATION_ERROR", "$.signature"
            )["reason"]
            == "signature_mismatch"
        )
        wrong_key = _signature(keys["approver-2"], action)
        expect_error(
            await _approve(c, action_id, "approver-1", wrong_key), 400, "VALIDATION_ERROR", "$.signature"
        )
        second = expect_ok(
            await c.call("POST", "/finance/journal", role="operator", body=_adjustment("adj-big-2", BIG)), 202
        )
        other_action = await _action(c, second["action_id"])
        cross = _signature(keys["approver-1"], other_action)
        expect_error(
            await _approve(c, action_id, "approver-1", cross), 400, "VALIDATION_ERROR", "$.signature"
        )
        expect_error(await _approve(c, action_id, "mallory", first), 400, "VALIDATION_ERROR", "$.approver_id")
        auditor = await _approve(
            c, action_id, "approver-1", _signature(keys["approver-1"], action), role="auditor"
        )
        assert auditor.status in (401, 403)
        replayed = expect_ok(await _approve(c, action_id, "approver-0", first))["action"]
        assert replayed["approvals_valid"] == 2 and len(replayed["approvals"]) == 2

        third = expect_ok(await _approve(c, action_id, "approver-1", _signature(keys["approver-1"], action)))[
            "action"
        ]
        assert (third["status"], third["approvals_valid"]) == ("executed", 3)
        assert third["result"]["journal_id"] == "adj-big"
        after = await c.balance("asset:adj-cash")
        assert after["debits_posted"] == before["debits_posted"] + BIG
        posted = expect_ok(await c.call("GET", "/ledger/adj-big", role="auditor"))
        assert posted["journal"]["context"]["adjustment"]["reason"] == "year-end correction"
        late = expect_error(
            await _approve(c, action_id, "approver-2", _signature(keys["approver-2"], action)),
            409,
            "INVALID_STATE",
        )
        assert (late["reason"], late["current"]) == ("not_pending", "executed")
        assert (await c.balance("asset:adj-cash")) == after

        # the second action: one approval, the approver revoked, then rejected by an operator
        expect_ok(
            await _approve(c, second["action_id"], "approver-2", _signature(keys["approver-2"], other_action))
        )
        assert (await _action(c, second["action_id"]))["approvals_valid"] == 1
        expect_ok(await c.call("POST", "/admin/approvers/approver-2/revoke", role="admin"))
        assert (await _action(c, second["action_id"]))["approvals_valid"] == 0
        rejected = expect_ok(
            await c.call(
                "POST",
                f"/finance/approvals/{second['action_id']}/reject",
                role="operator",
                body={"reason": "dup"},
            )
        )["action"]
        assert (rejected["status"], rejected["reason"]) == ("rejected", "dup")
        refused = expect_error(
            await _approve(
                c, second["action_id"], "approver-4", _signature(keys["approver-4"], other_action)
            ),
            409,
            "INVALID_STATE",
        )
        assert refused["current"] == "rejected"
        expect_error(await c.call("GET", "/finance/approvals/nope", role="auditor"), 404, "NOT_FOUND")

        events = expect_ok(await c.call("GET", "/audit/events", role="auditor", params={"limit": "1000"}))[
            "events"
        ]
        mine = [e for e in events if e["payload"].get("action_id") == action_id]
        assert [e["event_type"] for e in mine] == [
            "approval.request",
            "approval.approve",
            "approval.approve",
            "approval.approve",
            "approval.execute",
        ]
        assert {e["event_type"] for e in events} >= {
            "approver.register",
            "approver.revoke",
            "approval.reject",
            "finance.journal",
        }

    run(node, flow)
    assert node.run(check_store(node.dsn)) == []
