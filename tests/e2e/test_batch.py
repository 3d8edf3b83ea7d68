"""POST /ledger/post_batch over real HTTP: the size limit, per-journal failures, replays, integrity."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg

from store.check import run_check
from tests.e2e.test_errors import Client, expect_error, expect_ok, lines, on_shard, run
from tests.support.node import NodeHarness, journal

BATCH_LIMIT = 8190
CURRENCIES = ("USD", "EUR", "JPY")


async def post_batch(c: Client, journals: Any, **kw: Any) -> Any:
    return await c.call("POST", "/ledger/post_batch", body={"journals": journals}, **kw)


def _pool(prefix: str, per_shard: int) -> dict[int, list[str]]:
    return {s: [on_shard(f"{prefix}-{s}-{n}", s) for n in range(per_shard)] for s in range(4)}


def test_full_batch_of_8190_posts_every_journal(node: NodeHarness) -> None:
    """Tried: 8,190 valid journals in one request (every 10th cross-shard, three currencies, half
    without journal_id) -> 8,190 ok results in order with distinct ids; then per-currency zero
    sum over the balances table and `store.check.run_check` -> [] (via asyncpg on node.dsn)."""

    assets, revenues = _pool("asset:full", 4), _pool("revenue:full", 4)
    journals: list[dict[str, Any]] = []
    for i in range(BATCH_LIMIT):
        shard = i % 4
        other = (shard + 1) % 4 if i % 10 == 0 else shard
        debit, credit = assets[shard][i % 4], revenues[other][(i // 4) % 4]
        jid = f"full-{i:05d}" if i % 2 == 0 else None
        journals.append(journal(jid, debit, credit, i + 1, CURRENCIES[i % 3]))

    async def flow(c: Client) -> None:
        reply = await post_batch(c, journals)
        results = expect_ok(reply)["results"]
        assert len(results) == BATCH_LIMIT
        assert all(r["ok"] is True for r in results), [r for r in results if not r["ok"]][:3]
        for i, result in enumerate(results):
            if i % 2 == 0:
                assert result["journal_id"] == f"full-{i:05d}"
            assert result["posted_at"]
        ids = [r["journal_id"] for r in results]
        assert len(set(ids)) == BATCH_LIMIT
        read = expect_ok(await c.call("GET", f"/ledger/{ids[10]}", role="auditor"))
        assert read["audit"]["cross_shard"] is True
        assert read["journal"]["entries"][0]["amount_cents"] == 11
        expected: dict[tuple[str, str], int] = {}
        for body in journals:
            line = body["entries"][0]
            key = (line["account_id"], line["currency"])
            expected[key] = expected.get(key, 0) + line["amount_cents"]
        for (account, currency), amount in sorted(expected.items())[:6]:
            assert (await c.balance(account, currency))["debits_posted"] == amount

        conn = await asyncpg.connect(node.dsn)
        try:
            stored = await conn.fetchval(
                "SELECT count(*) FROM journals WHERE journal_id = ANY($1::text[])", ids
            )
            assert stored == BATCH_LIMIT
            sums = await conn.fetch(
                "SELECT currency, sum(debits_posted)::numeric - sum(credits_posted)::numeric AS net "
                "FROM balances GROUP BY currency"
            )
            assert {r["currency"] for r in sums} >= set(CURRENCIES)
            assert all(r["net"] == 0 for r in sums), sums
            assert await run_check(conn) == []
        finally:
            await conn.close()

    run(node, flow)


def test_8191_journals_is_batch_too_large(node: NodeHarness) -> None:
    """Tried: 8,191 valid journals -> 400 BATCH_TOO_LARGE (details.limit 8190); none written."""

    journals = [
        journal(f"over-{i}", "asset:over-batch", "revenue:over-batch") for i in range(BATCH_LIMIT + 1)
    ]

    async def flow(c: Client) -> None:
        details = expect_error(await post_batch(c, journals), 400, "BATCH_TOO_LARGE")
        assert details["limit"] == BATCH_LIMIT
        await c.absent_journal("over-0")
        await c.absent_journal(f"over-{BATCH_LIMIT}")
        await c.absent_account("asset:over-batch")

    run(node, flow)


def _mixed_batch(wallet: str, cash: str) -> list[dict[str, Any]]:
    """#0 ok, #1 bad currency, #2 overdraws the guarded wallet, #3 unbalanced, #4 ok cross-shard."""
    bad_currency = journal("mix-1", "asset:mix-b", "revenue:mix-b")
    bad_currency["entries"][0]["currency"] = "usd"
    unbalanced = {
        **lines(("asset:mix-d", "debit", 100, "USD"), ("revenue:mix-d", "credit", 99, "USD")),
        "journal_id": "mix-3",
    }
    return [
        journal("mix-0", "asset:mix-a", "revenue:mix-a", 10),
        bad_currency,
        journal("mix-2", wallet, cash, 1000),
        unbalanced,
        journal("mix-4", on_shard("asset:mix-e", 0), on_shard("revenue:mix-e", 3), 20),
    ]


def test_invalid_journals_fail_alone_and_replay_is_identical(node: NodeHarness) -> None:
    """Tried: a batch of 5 where #1 has currency "usd", #2 overdraws a guarded wallet holding 100,
    #3 is unbalanced; #0 and #4 are valid. Then the same batch again: identical results (same
    posted_at), nothing posted twice."""

    async def flow(c: Client) -> None:
        wallet, cash = "liability:wallet-mix", "asset:mix-cash"
        expect_ok(await c.create_account(wallet), 201)
        expect_ok(await c.post(journal("mix-fund", cash, wallet, 100)))
        batch = _mixed_batch(wallet, cash)
        results = expect_ok(await post_batch(c, batch))["results"]
        assert len(results) == 5
        assert [r["ok"] for r in results] == [True, False, False, False, True]
        assert results[0]["journal_id"] == "mix-0" and results[4]["journal_id"] == "mix-4"
        error = results[1]["error"]
        assert error["code"] == "VALIDATION_ERROR"
        assert error["details"]["field"] == "$.journals[1].entries[0].currency"
        error = results[2]["error"]
        assert error["code"] == "INSUFFICIENT_FUNDS"
        assert error["details"]["account_id"] == wallet
        assert (error["details"]["available"], error["details"]["requested"]) == (100, 1000)
        error = results[3]["error"]
        assert error["code"] == "LEDGER_IMBALANCE" and error["details"]["currency"] == "USD"
        for jid in ("mix-0", "mix-4"):
            expect_ok(await c.call("GET", f"/ledger/{jid}", role="auditor"))
        for jid in ("mix-1", "mix-2", "mix-3"):
            await c.absent_journal(jid)
        for account in ("asset:mix-b", "revenue:mix-b", "asset:mix-d", "revenue:mix-d"):
            await c.absent_account(account)
        assert await c.balance(wallet) == {"debits_posted": 0, "credits_posted": 100, "balance": 100}
        assert (await c.balance("asset:mix-a"))["debits_posted"] == 10

        # NODE BUG (reported): #2 is cross-shard; its replay answers 503 SERVICE_UNAVAILABLE "a previous
        # attempt is being resolved; retry" instead of INSUFFICIENT_FUNDS again.
        replay = expect_ok(await post_batch(c, batch))["results"]
        assert replay == results
        assert await c.balance(wallet) == {"debits_posted": 0, "credits_posted": 100, "balance": 100}
        assert (await c.balance("asset:mix-a"))["debits_posted"] == 10
        assert (await c.balance(on_shard("asset:mix-e", 0)))["debits_posted"] == 20

    run(node, flow)


def test_batch_idempotency_key_replays_server_ids(node: NodeHarness) -> None:
    """Tried: 4 journals without journal_id (2 single-shard, 2 cross-shard) under Idempotency-Key;
    the same key and body again -> same results and server ids; balances counted once; the same
    key with journal #1 changed -> #1 IDEMPOTENCY_CONFLICT, the others replay."""

    a0, r0 = on_shard("asset:bk", 0), on_shard("revenue:bk", 0)
    a1, r2 = on_shard("asset:bk", 1), on_shard("revenue:bk", 2)
    batch = [
        journal(None, a0, r0, 1),
        journal(None, a1, r2, 2),
        journal(None, a0, r0, 3),
        journal(None, a1, r2, 4),
    ]

    async def flow(c: Client) -> None:
        key = {"Idempotency-Key": "batch-key-1"}
        first = expect_ok(await post_batch(c, batch, headers=key))["results"]
        assert all(r["ok"] for r in first), first
        assert len({r["journal_id"] for r in first}) == 4
        again = expect_ok(await post_batch(c, batch, headers=key))["results"]
        assert again == first
        assert (await c.balance(a0))["debits_posted"] == 4
        assert (await c.balance(a1))["debits_posted"] == 6
        changed = [dict(j) for j in batch]
        changed[1] = journal(None, a1, r2, 5)
        third = expect_ok(await post_batch(c, changed, headers=key))["results"]
        assert third[1]["ok"] is False and third[1]["error"]["code"] == "IDEMPOTENCY_CONFLICT"
        assert [third[i] for i in (0, 2, 3)] == [first[i] for i in (0, 2, 3)]
        assert (await c.balance(a1))["debits_posted"] == 6
        # without a key, the same body is new work: new ids
        fresh = expect_ok(await post_batch(c, batch))["results"]
        assert {r["journal_id"] for r in fresh}.isdisjoint({r["journal_id"] for r in first})

    run(node, flow)


def test_duplicate_journal_inside_one_batch(node: NodeHarness) -> None:
    """Tried: one batch holding the same journal twice (same id, same payload) single-shard and
    cross-shard -> both entries ok with the same posted_at, posted once; the same id with another
    payload in the same batch -> IDEMPOTENCY_CONFLICT for the second."""

    single = journal("dup-s", on_shard("asset:dup", 0), on_shard("revenue:dup", 0), 7)
    cross = journal("dup-x", on_shard("asset:dupx", 1), on_shard("revenue:dupx", 2), 9)
    other = journal("dup-s", on_shard("asset:dup", 0), on_shard("revenue:dup", 0), 8)

    async def flow(c: Client) -> None:
        results = expect_ok(await post_batch(c, [single, cross, single, cross, other]))["results"]
        assert results[0]["ok"] and results[1]["ok"], results
        assert results[2] == results[0], results
        # NODE BUG (reported): the cross-shard duplicate answers SERVICE_UNAVAILABLE "the same journal
        # is being posted; retry"; the single-shard duplicate replays as expected.
        assert results[3] == results[1], results
        assert results[4]["ok"] is False and results[4]["error"]["code"] == "IDEMPOTENCY_CONFLICT"
        assert (await c.balance(on_shard("asset:dup", 0)))["debits_posted"] == 7
        assert (await c.balance(on_shard("asset:dupx", 1)))["debits_posted"] == 9

    run(node, flow)


def test_malformed_batches(node: NodeHarness) -> None:
    """Tried: empty journals list; `{"journals": 5}`; no `journals`; an unknown top-level field;
    a JSON array; malformed JSON; items that are not objects or have a string amount (per-item
    VALIDATION_ERROR with the batch path); a bad Idempotency-Key."""

    async def flow(c: Client) -> None:
        for body, field in (
            ({"journals": []}, "$.journals"),
            ({"journals": 5}, "$.journals"),
            ([], "$"),
        ):
            reply = await c.call("POST", "/ledger/post_batch", body=body)
            expect_error(reply, 400, "VALIDATION_ERROR", field)
        reply = await c.call(
            "POST", "/ledger/post_batch", data=b'{"journals": [', headers={"Content-Type": "application/json"}
        )
        expect_error(reply, 400, "VALIDATION_ERROR", "$")
        good = journal("bm-ok", "asset:bm", "revenue:bm")
        bad_amount = journal("bm-bad", "asset:bm-bad", "revenue:bm-bad")
        bad_amount["entries"][1]["amount_cents"] = "100"
        results = expect_ok(await post_batch(c, [5, bad_amount, good]))["results"]
        assert results[0]["error"]["code"] == "VALIDATION_ERROR"
        assert results[0]["error"]["details"]["field"] == "$.journals[0]"
        assert results[1]["error"]["code"] == "VALIDATION_ERROR"
        assert results[1]["error"]["details"]["field"] == "$.journals[1].entries[1].amount_cents"
        assert results[2]["ok"] is True and results[2]["journal_id"] == "bm-ok"
        await c.absent_account("asset:bm-bad")
        reply = await post_batch(c, [journal("bm-key", "asset:bm-key", "revenue:bm-key")],
                                 headers={"Idempotency-Key": "k" * 300})  # fmt: skip
        expect_error(reply, 400, "VALIDATION_ERROR", "Idempotency-Key")
        await c.absent_journal("bm-key")
        # NODE BUG (reported): a missing / unknown member is reported as field "$", not its own path.
        for body, field in (({}, "$.journals"), ({"journals": [], "extra": 1}, "$.extra")):
            reply = await c.call("POST", "/ledger/post_batch", body=body)
            expect_error(reply, 400, "VALIDATION_ERROR", field)

    run(node, flow)


def test_batches_in_parallel(node: NodeHarness) -> None:
    """Tried: 8 concurrent batches of 200 journals each on shared accounts -> all ok, totals exact."""

    async def flow(c: Client) -> None:
        a, r = on_shard("asset:par", 0), on_shard("revenue:par", 1)
        batches = [[journal(f"par-{b}-{i}", a, r, 1) for i in range(200)] for b in range(8)]
        replies = await asyncio.gather(*(post_batch(c, batch) for batch in batches))
        for reply in replies:
            assert all(x["ok"] for x in expect_ok(reply)["results"])
        assert await c.balance(a) == {"debits_posted": 1600, "credits_posted": 0, "balance": 1600}

    run(node, flow)
