"""Split (hot) accounts over real HTTP: booked by every shard, one exact balance, nothing cross-shard.

A split account (`POST /accounts` with `policy.split`) is booked by the shard of each journal's
other lines, so journals crediting one platform-fee account from wallets on all four shards stay
single-shard and spread over the shards instead of funnelling through the fee account's home.
"""

from __future__ import annotations

import secrets
from typing import Any

import asyncpg

from tests.e2e.test_errors import Client, expect_error, expect_ok, lines, on_shard, run
from tests.support.node import NodeHarness, check_store, journal

FEE = "revenue:split-fee"


async def _stats(c: Client) -> tuple[dict[str, float], dict[str, float]]:
    """(committed journals per shard, 2PC outcome counters) from /metrics."""
    text = (await c.call("GET", "/metrics", role=None)).body["text"]
    journals: dict[str, float] = {}
    outcomes: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("ledger_shard_committed_journals{"):
            journals[line.split('shard="')[1].split('"')[0]] = float(line.rsplit(" ", 1)[1])
        if line.startswith("ledger_twophase_outcomes{"):
            outcomes[line.split('outcome="')[1].split('"')[0]] = float(line.rsplit(" ", 1)[1])
    return journals, outcomes


def test_split_account_is_booked_by_every_shard(node: NodeHarness) -> None:
    """Tried: create FEE split; post 40 journals (10 per shard) debiting a wallet on each shard and
    crediting FEE -> every one committed by its wallet's shard (each shard's committed count grows
    by 10, no 2PC commit), FEE's balance is the exact sum (as of now and via as_of), the stream
    filtered by FEE lists all 40, and `run_check` is clean."""

    async def flow(c: Client) -> None:
        made = expect_ok(
            await c.call(
                "POST", "/accounts", role="admin", body={"account_id": FEE, "policy": {"split": True}}
            ),
            201,
        )
        assert made["policy"] == {"no_negative": False, "split": True}
        before, outcomes_before = await _stats(c)
        wallets = [on_shard(f"asset:split-wallet-{s}", s) for s in range(4)]
        total = 0
        for n in range(10):
            for s, wallet in enumerate(wallets):
                amount = 100 * (s + 1) + n
                total += amount
                expect_ok(await c.post(journal(f"split-{s}-{n}", wallet, FEE, amount)))
        after, outcomes_after = await _stats(c)
        assert {s: after[s] - before.get(s, 0) for s in after} == {str(s): 10 for s in range(4)}
        assert outcomes_after.get("commit", 0) == outcomes_before.get("commit", 0)
        balance = await c.balance(FEE)
        assert balance == {"debits_posted": 0, "credits_posted": total, "balance": total}
        body = expect_ok(await c.balances(FEE))
        assert body["policy"] == {"no_negative": False, "split": True}
        later = expect_ok(await c.balances(FEE, as_of="2999-01-01T00:00:00Z"))
        assert later["balances"][0]["credits_posted"] == total
        stream = expect_ok(
            await c.call("GET", "/finance/ledger/journal", params={"account_id": FEE, "limit": "100"})
        )
        assert sorted(j["journal_id"] for j in stream["journals"]) == sorted(
            f"split-{s}-{n}" for s in range(4) for n in range(10)
        )

    run(node, flow)
    assert node.run(check_store(node.dsn)) == []


def test_split_account_in_cross_shard_and_split_only_journals(node: NodeHarness) -> None:
    """Tried: a 3-line journal over wallets on shards 1 and 2 plus FEE2 (split) -> one 2PC commit,
    FEE2's line booked with the lowest participant; a journal of two split accounts only -> posted
    (anchored on one shard); balances exact and `run_check` clean."""
    fee2, pool = "revenue:split-fee2", "liability:split-pool"

    async def flow(c: Client) -> None:
        for account in (fee2, pool):
            body = {"account_id": account, "policy": {"split": True}}
            expect_ok(await c.call("POST", "/accounts", role="admin", body=body), 201)
        a1, a2 = on_shard("asset:split-x", 1), on_shard("asset:split-y", 2)
        _, outcomes_before = await _stats(c)
        three = lines((a1, "debit", 300, "USD"), (a2, "debit", 200, "USD"), (fee2, "credit", 500, "USD"))
        three["journal_id"] = "split-cross-1"
        expect_ok(await c.post(three))
        _, outcomes_after = await _stats(c)
        assert outcomes_after["commit"] == outcomes_before.get("commit", 0) + 1
        expect_ok(await c.post(journal("split-only-1", pool, fee2, 70)))
        assert (await c.balance(fee2))["credits_posted"] == 570
        assert (await c.balance(pool))["debits_posted"] == 70

    run(node, flow)
    assert node.run(check_store(node.dsn)) == []


def test_split_policy_errors(node: NodeHarness) -> None:
    """Tried: split together with no_negative -> 400 VALIDATION_ERROR on $.policy.split, nothing
    created; re-creating FEE3 split -> 200 created false; creating it again unsplit, or an existing
    unsplit account as split -> 409 IDEMPOTENCY_CONFLICT naming the stored policy."""
    fee3, plain = "revenue:split-fee3", "revenue:split-plain"

    async def create(c: Client, account: str, policy: dict[str, Any]) -> Any:
        return await c.call("POST", "/accounts", role="admin", body={"account_id": account, "policy": policy})

    async def flow(c: Client) -> None:
        bad = await create(c, "revenue:split-guarded", {"split": True, "no_negative": True})
        expect_error(bad, 400, "VALIDATION_ERROR", "$.policy.split")
        await c.absent_account("revenue:split-guarded")
        expect_ok(await create(c, fee3, {"split": True}), 201)
        again = expect_ok(await create(c, fee3, {"split": True}), 200)
        assert again["created"] is False
        details = expect_error(await create(c, fee3, {}), 409, "IDEMPOTENCY_CONFLICT")
        assert details == {"account_id": fee3, "no_negative": False, "split": True}
        expect_ok(await create(c, plain, {}), 201)
        details = expect_error(await create(c, plain, {"split": True}), 409, "IDEMPOTENCY_CONFLICT")
        assert details == {"account_id": plain, "no_negative": False, "split": False}

    run(node, flow)


def test_finance_books_platform_wide_accounts_split_so_payments_stay_single_shard(node: NodeHarness) -> None:
    """Tried: 8 invoices for buyers on all four shards (a fresh SKU, DE tax) issued and paid over
    HTTP with a fresh provider -> the provider's cash account and the SKU's deferred revenue are
    split accounts (policy), no two-phase commit ran for any of the 16 journals (the coordinator's
    commit counter is unchanged; each shard committed its buyers' journals), none of their lines is
    marked cross-shard, the cash balance is the exact sum of the payments, and `run_check` is clean.
    (Before, every payment whose buyer lived off the cash account's shard was a 2PC journal.)"""
    tag = secrets.token_hex(3)
    provider, sku = f"sp{tag}", f"split-sku-{tag}"
    buyers = [on_shard(f"asset:ar:sp{k}{tag}", s).removeprefix("asset:ar:") for s in range(4) for k in "bc"]
    cash = f"asset:cash:{provider}:EUR"

    async def flow(c: Client) -> None:
        journals_before, outcomes_before = await _stats(c)
        paid = 0
        for n, buyer in enumerate(buyers):
            body = {
                "invoice_id": f"split-inv-{tag}-{n}",
                "buyer": {"buyer_id": buyer, "country": "DE"},
                "line_items": [{"sku": sku, "qty": 1, "unit_price": 1000 + n, "tax_code": "standard"}],
                "currency": "EUR",
            }
            invoice = expect_ok(await c.call("POST", "/finance/invoice", body=body), 201)
            payment = {
                "invoice_id": invoice["invoice_id"],
                "amount": invoice["total"],
                "currency": "EUR",
                "payment_provider": provider,
                "provider_reference": f"split-pay-{tag}-{n}",
            }
            expect_ok(await c.call("POST", "/finance/payment", body=payment))
            paid += invoice["total"]
        journals_after, outcomes_after = await _stats(c)
        assert outcomes_after.get("commit", 0) == outcomes_before.get("commit", 0)
        grown = {s: journals_after[s] - journals_before.get(s, 0) for s in journals_after}
        assert all(grown[str(s)] >= 4 for s in range(4)), grown  # 2 buyers x (issue + payment) each
        for account in (cash, f"liability:deferred-revenue:{sku}"):
            assert expect_ok(await c.balances(account))["policy"] == {"no_negative": False, "split": True}
        assert await c.balance(cash, "EUR") == {"debits_posted": paid, "credits_posted": 0, "balance": paid}

    run(node, flow)
    crossed = node.run(
        _fetch(
            node.dsn,
            "SELECT count(*) FROM journal_lines WHERE cross_shard AND journal_id LIKE $1",
            f"split-inv-{tag}-%",
        )
    )
    assert crossed == 0
    assert node.run(check_store(node.dsn)) == []


async def _fetch(dsn: str, query: str, *args: Any) -> Any:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(query, *args)
    finally:
        await conn.close()
