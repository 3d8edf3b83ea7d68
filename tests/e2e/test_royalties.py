"""Royalty participants, versioned rules and royalty accrual over real HTTP, read back from the ledger.

Recognising revenue for a SKU with a royalty rule (on delivery, or each ratable installment) posts,
in the same journal, debit `expense:royalties:{sku}` and credit `liability:royalty:{participant}`
(the holdback part on `liability:royalty-holdback:{participant}`); participants' shares plus the
platform fee equal the recognised revenue exactly. A sale uses the rule version in force at its
invoice's issue time.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from tests.e2e.test_errors import Client, expect_error, expect_ok, run
from tests.support.node import NodeHarness, check_store

PAST = "2020-01-01T00:00:00Z"


async def _balance(c: Client, account_id: str) -> int:
    """The account's EUR balance on its normal side (0 for an account never booked)."""
    reply = await c.balances(account_id)
    if reply.status == 404:
        return 0
    rows = [r for r in expect_ok(reply)["balances"] if r["currency"] == "EUR"]
    return int(rows[0]["balance"]) if rows else 0


def _invoice(invoice_id: str, lines: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "invoice_id": invoice_id,
        "buyer": {"buyer_id": f"{invoice_id}-buyer", "country": "DE"},
        "line_items": [{"qty": 1, "tax_code": "standard", **line} for line in lines],
        "currency": "EUR",
    }


async def _issue(c: Client, invoice_id: str, lines: list[dict[str, Any]]) -> dict[str, Any]:
    return expect_ok(await c.call("POST", "/finance/invoice", body=_invoice(invoice_id, lines)), 201)


async def _pay(c: Client, invoice_id: str, total: int) -> None:
    body = {
        "invoice_id": invoice_id,
        "amount": total,
        "currency": "EUR",
        "payment_provider": "bank",
        "provider_reference": f"{invoice_id}-pay",
    }
    expect_ok(await c.call("POST", "/finance/payment", body=body))


async def _sold(c: Client, invoice_id: str, lines: list[dict[str, Any]]) -> dict[str, Any]:
    """Issued and paid."""
    view = await _issue(c, invoice_id, lines)
    await _pay(c, invoice_id, view["total"])
    return view


async def _fulfil(c: Client, invoice_id: str, recognition: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"invoiceId": invoice_id}
    if recognition is not None:
        body["recognition"] = recognition
    return expect_ok(await c.call("POST", "/finance/fulfill", body=body))


async def _entries(c: Client, journal_id: str) -> set[tuple[str, str, int]]:
    shown = expect_ok(await c.call("GET", f"/ledger/{journal_id}", role="auditor"))["journal"]
    return {(e["account_id"], e["side"], e["amount_cents"]) for e in shown["entries"]}


async def _participants(c: Client, *ids: str) -> None:
    for pid in ids:
        body = {"participant_id": pid, "name": pid.title(), "stripe_account": f"acct_{pid.replace('-', '')}"}
        expect_ok(await c.call("POST", "/finance/participants", body=body), 201)


def _rule(sku: str, splits: list[tuple[str, int]], fee: int, **extra: Any) -> dict[str, Any]:
    return {
        "sku": sku,
        "effective_from": PAST,
        "splits": [{"participant_id": p, "share_bp": bp} for p, bp in splits],
        "platform_fee_bp": fee,
        **extra,
    }


async def _add_rule(c: Client, body: dict[str, Any]) -> dict[str, Any]:
    rule: dict[str, Any] = expect_ok(await c.call("POST", "/finance/royalty_rules", body=body), 201)["rule"]
    return rule


def test_three_way_split_accrues_on_fulfilment_with_holdback_and_statement(node: NodeHarness) -> None:
    """Tried: participants (created 201, replay 200, different payload 409, GET, unknown 404, bad
    fields 400, auditor 403); a 33.33/33.33/13.34 % split with a 20 % platform fee and a 10 %
    holdback on 1000 of revenue: the fulfil journal carries deferred -> revenue plus the accrual
    (carol gets the leftover unit: 333/333/134, platform 200), the payable and holdback balances,
    the statement (with from/to filters) and the audit trail; a clean store check."""

    async def flow(c: Client) -> None:
        await _participants(c, "ry-alice", "ry-bob", "ry-carol")
        again = {"participant_id": "ry-alice", "name": "Ry-Alice", "stripe_account": "acct_ryalice"}
        replay = expect_ok(await c.call("POST", "/finance/participants", body=again))
        assert replay["participant"]["stripe_account"] == "acct_ryalice"
        changed = {**again, "minimum_payout": {"currency": "EUR", "amount": 5000}}
        expect_error(await c.call("POST", "/finance/participants", body=changed), 409, "IDEMPOTENCY_CONFLICT")
        shown = expect_ok(await c.call("GET", "/finance/participants/ry-alice", role="auditor"))
        assert shown["participant"]["minimum_payout"] is None
        missing = expect_error(await c.call("GET", "/finance/participants/ry-nobody"), 404, "NOT_FOUND")
        assert missing["resource"] == "participant"
        bad = [
            ({"participant_id": "ry x"}, "$.participant_id"),
            ({"participant_id": "ry-d", "stripe_account": "acc_1"}, "$.stripe_account"),
            ({"participant_id": "ry-d", "minimum_payout": {"currency": "EURO", "amount": 1}}, None),
            ({"participant_id": "ry-d", "minimum_payout": {"currency": "EUR", "amount": -1}}, None),
        ]
        for body, field in bad:
            expect_error(
                await c.call("POST", "/finance/participants", body=body), 400, "VALIDATION_ERROR", field
            )
        forbidden = await c.call(
            "POST", "/finance/participants", body={"participant_id": "ry-d"}, role="auditor"
        )
        assert forbidden.status == 403
        minimum = {"participant_id": "ry-dave", "minimum_payout": {"currency": "EUR", "amount": 5000}}
        made = expect_ok(await c.call("POST", "/finance/participants", body=minimum), 201)
        assert made["participant"]["minimum_payout"] == {"currency": "EUR", "amount": 5000}

        rule = await _add_rule(
            c,
            _rule(
                "ry-a",
                [("ry-alice", 3333), ("ry-bob", 3333), ("ry-carol", 1334)],
                2000,
                holdback_bp=1000,
                holdback_days=30,
            ),
        )
        assert (rule["version"], rule["sku"], rule["holdback_days"]) == (1, "ry-a", 30)

        await _sold(c, "ry-1", [{"sku": "ry-a", "unit_price": 1000}])
        before = datetime.now(UTC)
        done = await _fulfil(c, "ry-1")
        assert done["journal_id"] == "ry-1.fulfil"
        assert await _entries(c, "ry-1.fulfil") == {
            ("liability:deferred-revenue:ry-a", "debit", 1000),
            ("revenue:sales:ry-a", "credit", 1000),
            ("expense:royalties:ry-a", "debit", 800),
            ("liability:royalty:ry-alice", "credit", 300),
            ("liability:royalty-holdback:ry-alice", "credit", 33),
            ("liability:royalty:ry-bob", "credit", 300),
            ("liability:royalty-holdback:ry-bob", "credit", 33),
            ("liability:royalty:ry-carol", "credit", 121),
            ("liability:royalty-holdback:ry-carol", "credit", 13),
        }
        assert await _balance(c, "liability:royalty:ry-alice") == 300
        assert await _balance(c, "liability:royalty-holdback:ry-alice") == 33
        assert await _balance(c, "liability:royalty:ry-carol") == 121
        assert await _balance(c, "expense:royalties:ry-a") == 800
        assert await _balance(c, "revenue:sales:ry-a") == 1000

        statement = expect_ok(
            await c.call("GET", "/finance/participants/ry-carol/statement", role="auditor")
        )["statement"]
        (row,) = statement["accruals"]
        assert {k: row[k] for k in ("invoice_id", "sku", "rule_id", "rule_version", "installment")} == {
            "invoice_id": "ry-1",
            "sku": "ry-a",
            "rule_id": rule["rule_id"],
            "rule_version": 1,
            "installment": None,
        }
        assert (row["revenue"], row["amount"], row["holdback"], row["payable"]) == (1000, 134, 13, 121)
        assert row["journal_id"] == "ry-1.fulfil"
        posted = datetime.fromisoformat(row["posted_at"])
        assert abs((posted - before).total_seconds()) < 30
        release = datetime.fromisoformat(row["holdback_release_at"])
        assert (release - posted).days == 30
        assert statement["totals"] == [{"currency": "EUR", "accrued": 134, "holdback": 13, "clawed_back": 0}]
        assert statement["balances"]["payable"] == {
            "account_id": "liability:royalty:ry-carol",
            "balances": [{"currency": "EUR", "balance": 121}],
        }
        assert statement["balances"]["holdback"]["balances"] == [{"currency": "EUR", "balance": 13}]
        later = expect_ok(
            await c.call(
                "GET",
                "/finance/participants/ry-carol/statement",
                params={"from": "2999-01-01T00:00:00Z"},
            )
        )["statement"]
        assert later["accruals"] == [] and later["totals"] == []
        assert later["balances"]["payable"]["balances"] == [{"currency": "EUR", "balance": 121}]
        earlier = await c.call(
            "GET", "/finance/participants/ry-carol/statement", params={"to": "2001-01-01T00:00:00Z"}
        )
        assert expect_ok(earlier)["statement"]["accruals"] == []
        bad_time = await c.call(
            "GET", "/finance/participants/ry-carol/statement", params={"from": "yesterday"}
        )
        expect_error(bad_time, 400, "VALIDATION_ERROR", "$.query.from")
        expect_error(await c.call("GET", "/finance/participants/ry-zz/statement"), 404, "NOT_FOUND")

        # an invoice for a SKU without a rule accrues nothing
        await _sold(c, "ry-1b", [{"sku": "ry-norule", "unit_price": 500}])
        await _fulfil(c, "ry-1b")
        assert await _entries(c, "ry-1b.fulfil") == {
            ("liability:deferred-revenue:ry-norule", "debit", 500),
            ("revenue:sales:ry-norule", "credit", 500),
        }

        await asyncio.sleep(0.5)
        events = expect_ok(await c.call("GET", "/audit/events", role="auditor", params={"limit": "1000"}))
        kinds = [e["event_type"] for e in events["events"]]
        assert kinds.count("royalty.participant_created") == 4
        assert kinds.count("royalty.rule_created") == 1

    run(node, flow)
    assert node.run(check_store(node.dsn)) == []


def test_ratable_schedule_accrues_per_installment(node: NodeHarness) -> None:
    """Tried: a 50/25 % split (25 % platform fee) on 3 x 1000 recognised over 3 months: each
    installment's journal accrues its own share (500 / 250), the statement lists one row per
    installment with the same rule version, and balances add up; a clean store check."""

    async def flow(c: Client) -> None:
        await _participants(c, "rr-ann", "rr-ben")
        rule = await _add_rule(c, _rule("rr-b", [("rr-ann", 5000), ("rr-ben", 2500)], 2500))
        await _sold(c, "rr-2", [{"sku": "rr-b", "qty": 3, "unit_price": 1000}])
        made = await _fulfil(c, "rr-2", {"method": "ratable", "periods": 3, "interval": "month"})
        assert made["journal_id"] is None
        assert await _balance(c, "liability:royalty:rr-ann") == 0
        dues = [i["due_at"] for i in made["recognition"]["installments"]]
        for k, due in enumerate(dues, start=1):
            answer = expect_ok(await c.call("POST", "/finance/recognition/run", body={"as_of": due}))
            assert [(p["invoice_id"], p["k"]) for p in answer["posted"]] == [("rr-2", k)]
            assert await _entries(c, f"rr-2.recognise.{k}") == {
                ("liability:deferred-revenue:rr-b", "debit", 1000),
                ("revenue:sales:rr-b", "credit", 1000),
                ("expense:royalties:rr-b", "debit", 750),
                ("liability:royalty:rr-ann", "credit", 500),
                ("liability:royalty:rr-ben", "credit", 250),
            }
            assert await _balance(c, "liability:royalty:rr-ann") == 500 * k
        statement = expect_ok(await c.call("GET", "/finance/participants/rr-ben/statement"))["statement"]
        assert [
            (r["installment"], r["amount"], r["holdback"], r["journal_id"]) for r in statement["accruals"]
        ] == [(k, 250, 0, f"rr-2.recognise.{k}") for k in (1, 2, 3)]
        assert {r["rule_id"] for r in statement["accruals"]} == {rule["rule_id"]}
        assert statement["balances"]["holdback"]["balances"] == []
        assert await _balance(c, "expense:royalties:rr-b") == 2250

    run(node, flow)
    assert node.run(check_store(node.dsn)) == []


def test_rule_versions_apply_by_invoice_issue_time_and_contracts(node: NodeHarness) -> None:
    """Tried: v1 in force; invoice A issued; v2 effective after A's issue; invoice B issued; a
    backdated v3 effective before A's issue: A accrues under v3, B under v2 (latest
    effective_from at each issue time); GET in force at three times; a contract rule beats the
    SKU rule for lines that name the contract; lines of one SKU with different contracts 400."""

    async def flow(c: Client) -> None:
        await _participants(c, "rv-a", "rv-b", "rv-c", "rv-d")
        v1 = await _add_rule(c, _rule("rv-s", [("rv-a", 8000)], 2000))
        await _sold(c, "rv-A", [{"sku": "rv-s", "unit_price": 1000}])
        await asyncio.sleep(0.05)
        v2 = await _add_rule(
            c, {**_rule("rv-s", [("rv-b", 8000)], 2000), "effective_from": datetime.now(UTC).isoformat()}
        )
        await asyncio.sleep(0.05)
        await _sold(c, "rv-B", [{"sku": "rv-s", "unit_price": 1000}])
        v3 = await _add_rule(
            c, {**_rule("rv-s", [("rv-c", 8000)], 2000), "effective_from": "2021-01-01T00:00:00Z"}
        )
        assert [v1["version"], v2["version"], v3["version"]] == [1, 2, 3]
        for at, expected in (("2020-06-01T00:00:00Z", v1), ("2021-06-01T00:00:00Z", v3), (None, v2)):
            params = {"sku": "rv-s", **({"at": at} if at else {})}
            shown = expect_ok(await c.call("GET", "/finance/royalty_rules", params=params, role="auditor"))
            assert shown["rule"] == expected
        none = await c.call(
            "GET", "/finance/royalty_rules", params={"sku": "rv-s", "at": "2019-01-01T00:00:00Z"}
        )
        expect_error(none, 404, "NOT_FOUND")
        expect_error(await c.call("GET", "/finance/royalty_rules"), 400, "VALIDATION_ERROR", "$.query.sku")

        await _fulfil(c, "rv-A")
        await _fulfil(c, "rv-B")
        assert ("liability:royalty:rv-c", "credit", 800) in await _entries(c, "rv-A.fulfil")
        assert ("liability:royalty:rv-b", "credit", 800) in await _entries(c, "rv-B.fulfil")
        assert await _balance(c, "liability:royalty:rv-a") == 0

        deal = {**_rule("unused", [("rv-d", 6000)], 4000), "contract": "rv-deal"}
        del deal["sku"]
        contract_rule = await _add_rule(c, deal)
        assert contract_rule["contract"] == "rv-deal" and "sku" not in contract_rule
        lines = [
            {"sku": "rv-s", "unit_price": 500, "contract": "rv-deal"},
            {"sku": "rv-t", "unit_price": 300, "contract": "rv-none"},  # no rule for it, nor for rv-t
        ]
        view = await _sold(c, "rv-C", lines)
        assert view["line_items"][0]["contract"] == "rv-deal"
        assert (
            "contract" not in (await _issue(c, "rv-E", [{"sku": "rv-s", "unit_price": 1}]))["line_items"][0]
        )
        await _fulfil(c, "rv-C")
        assert await _entries(c, "rv-C.fulfil") == {
            ("liability:deferred-revenue:rv-s", "debit", 500),
            ("revenue:sales:rv-s", "credit", 500),
            ("liability:deferred-revenue:rv-t", "debit", 300),
            ("revenue:sales:rv-t", "credit", 300),
            ("expense:royalties:rv-s", "debit", 300),
            ("liability:royalty:rv-d", "credit", 300),
        }
        mixed = _invoice(
            "rv-D",
            [
                {"sku": "rv-s", "unit_price": 1, "contract": "x1"},
                {"sku": "rv-s", "unit_price": 1, "contract": "x2"},
            ],
        )
        reply = await c.call("POST", "/finance/invoice", body=mixed)
        expect_error(reply, 400, "VALIDATION_ERROR", "$.line_items[1].contract")

    run(node, flow)
    assert node.run(check_store(node.dsn)) == []


def test_bad_rules_are_rejected_naming_the_field_and_replays(node: NodeHarness) -> None:
    """Tried: every invalid rule shape -> 400 naming its field (nothing stored); a rule with an id
    replayed (200, same version), changed (409), and an Idempotency-Key replay; auditor 403."""

    async def flow(c: Client) -> None:
        await _participants(c, "rb-a", "rb-b")
        good = _rule("rb-s", [("rb-a", 5000), ("rb-b", 3000)], 2000)

        def splits(*pairs: tuple[str, Any]) -> list[dict[str, Any]]:
            return [{"participant_id": p, "share_bp": bp} for p, bp in pairs]

        bad = [
            ({**good, "platform_fee_bp": 1000}, "$.splits"),
            ({**good, "splits": splits(("rb-a", -1), ("rb-b", 8001))}, "$.splits[0].share_bp"),
            ({**good, "splits": splits(("rb-a", 5000), ("rb-nobody", 3000))}, "$.splits[1].participant_id"),
            ({**good, "splits": splits(("rb-a", 5000), ("rb-a", 3000))}, "$.splits[1].participant_id"),
            ({**good, "splits": []}, "$.splits"),
            ({**good, "platform_fee_bp": -1}, "$.platform_fee_bp"),
            ({**good, "holdback_bp": 10001, "holdback_days": 1}, "$.holdback_bp"),
            ({**good, "holdback_bp": 500}, "$.holdback_days"),
            (
                {**good, "holdback_bp": 500, "holdback_days": 1, "holdback_release_at": PAST},
                "$.holdback_release_at",
            ),
            ({**good, "holdback_bp": 500, "holdback_release_at": "soon"}, "$.holdback_release_at"),
            ({**good, "contract": "rb-c"}, "$.sku"),
            ({**good, "sku": "bad sku"}, "$.sku"),
            ({**good, "effective_from": "2020-01-01"}, "$.effective_from"),
            ({**good, "rule_id": "bad id"}, "$.rule_id"),
        ]
        for body, field in bad:
            reply = await c.call("POST", "/finance/royalty_rules", body=body)
            expect_error(reply, 400, "VALIDATION_ERROR", field)
        none = await c.call("GET", "/finance/royalty_rules", params={"sku": "rb-s"})
        expect_error(none, 404, "NOT_FOUND")

        named = {**good, "rule_id": "rb-rule-1"}
        first = await _add_rule(c, named)
        again = expect_ok(await c.call("POST", "/finance/royalty_rules", body=named))
        assert again["rule"] == first
        changed = {**named, "platform_fee_bp": 3000, "splits": splits(("rb-a", 4000), ("rb-b", 3000))}
        expect_error(
            await c.call("POST", "/finance/royalty_rules", body=changed), 409, "IDEMPOTENCY_CONFLICT"
        )
        unnamed = await _add_rule(c, {**good, "effective_from": "2022-01-01T00:00:00Z"})
        assert unnamed["version"] == 2 and unnamed["rule_id"].startswith("rr-")
        resent = expect_ok(
            await c.call(
                "POST", "/finance/royalty_rules", body={**good, "effective_from": "2022-01-01T00:00:00Z"}
            )
        )
        assert resent["rule"] == unnamed
        key = {"Idempotency-Key": "rb-key-1"}
        keyed = {**good, "effective_from": "2023-01-01T00:00:00Z"}
        made = expect_ok(await c.call("POST", "/finance/royalty_rules", body=keyed, headers=key), 201)
        replay = await c.call("POST", "/finance/royalty_rules", body=keyed, headers=key)
        assert expect_ok(replay, 201)["rule"] == made["rule"]
        other = {**keyed, "effective_from": "2024-01-01T00:00:00Z"}
        reply = await c.call("POST", "/finance/royalty_rules", body=other, headers=key)
        expect_error(reply, 409, "IDEMPOTENCY_CONFLICT")
        forbidden = await c.call("POST", "/finance/royalty_rules", body=good, role="auditor")
        assert forbidden.status == 403

    run(node, flow)
    assert node.run(check_store(node.dsn)) == []
