"""Online resharding under load (issue 9, item 1): add shards, move slots back and forth, remove a shard.

Clients post single- and cross-shard journals over HTTP the whole time, retrying a 503 with the
same journal id (the idempotent contract). Afterwards: every acknowledged journal is stored
exactly once and nothing else was stored, `ledger-node check` (balances, chains, signatures)
passes, holds that moved with their slots are posted by their new shard, and a restart comes
back with the same shards and slot map.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections import Counter
from collections.abc import Iterator
from typing import Any

import aiohttp
import asyncpg
import pytest

from node.cli import main as cli_main
from sharding.slots import slot_of
from store.check import run_check
from store.check_signatures import check_signatures
from tests.e2e.test_errors import Client, expect_ok
from tests.support.node import TOKENS, NodeHarness, journal

WORKERS = 6
ACCOUNTS = [f"asset:rs-{n}" for n in range(24)]


@pytest.fixture(scope="module")
def two_shards(ray_cluster: None) -> Iterator[NodeHarness]:
    """A node that starts with 2 shards and its own database."""
    harness = NodeHarness(shards=2).start()
    yield harness
    harness.stop()


def same_slot_pair(prefix: str) -> tuple[str, str]:
    """Two account ids in one slot: a hold on them stays single-shard whatever moves."""
    seen: dict[int, str] = {}
    for n in range(100_000):
        account = f"{prefix}-{n}"
        other = seen.setdefault(slot_of(account), account)
        if other != account:
            return other, account
    raise AssertionError("no slot collision found")


class Load:
    """Background clients; `acked` holds every journal id the node acknowledged."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.acked: set[str] = set()
        self.statuses: Counter[str] = Counter()
        self.failures: list[Any] = []
        self.stop = asyncio.Event()

    async def worker(self, index: int) -> None:
        rng = random.Random(index)
        n = 0
        while not self.stop.is_set():
            n += 1
            debit, credit = rng.sample(ACCOUNTS, 2)
            journal_id = f"rs-{index}-{n}"
            body = journal(journal_id, debit, credit, amount=rng.randint(1, 500))
            for _attempt in range(200):
                reply = await self.client.post(body)
                if reply.status == 200:
                    self.acked.add(journal_id)
                    break
                code = reply.body["error"]["code"] if "error" in reply.body else reply.body.get("code")
                self.statuses[str(code)] += 1
                if reply.status != 503:
                    self.failures.append((journal_id, reply))
                    break
                await asyncio.sleep(0.02)  # 503 SHARD_MOVING / SERVICE_UNAVAILABLE: retry, same id
            else:
                self.failures.append((journal_id, "never acknowledged"))


async def admin(c: Client, method: str, path: str, body: Any = None) -> dict[str, Any]:
    reply = await c.call(method, path, role="admin", body=body)
    return expect_ok(reply, 201 if method == "POST" and path == "/admin/shards" else 200)


def cli(*argv: str) -> int:
    return cli_main(list(argv))


async def scenario(node: NodeHarness, c: Client) -> None:
    hold_accounts = same_slot_pair("asset:rs-hold")
    expect_ok(await c.post(journal("rs-fund", hold_accounts[0], "equity:rs-fund", amount=10_000)))
    hold_body = journal("rs-hold-1", "equity:rs-fund", hold_accounts[0], amount=300)
    hold_body["entries"] = [
        {"account_id": hold_accounts[1], "side": "debit", "amount_cents": 300, "currency": "USD"},
        {"account_id": hold_accounts[0], "side": "credit", "amount_cents": 300, "currency": "USD"},
    ]
    expect_ok(await c.call("POST", "/ledger/holds", body=hold_body))
    load = Load(c)
    workers = [asyncio.create_task(load.worker(i)) for i in range(WORKERS)]
    await asyncio.sleep(1.5)

    added = await admin(c, "POST", "/admin/shards", {"count": 2})
    assert added["added"] == [2, 3] and added["slots_moved"] > 0, added
    overview = await admin(c, "GET", "/admin/shards")
    assert [s["shard_id"] for s in overview["shards"]] == [0, 1, 2, 3]
    assert max(s["slots"] for s in overview["shards"]) - min(s["slots"] for s in overview["shards"]) <= 1

    hot = sorted({slot_of(a) for a in ACCOUNTS[:6]} | {slot_of(hold_accounts[0])})
    for target in (3, 0, 2):  # back and forth, also through the CLI
        if target == 0:
            os.environ.update(LEDGER_TOKEN=TOKENS["admin"])
            code = await asyncio.to_thread(
                cli, "slots", "move", *map(str, hot), "--to", "0", "--url", node.url
            )
            assert code == 0
        else:
            moved = await admin(c, "POST", "/admin/slots/move", {"slots": hot, "to": target})
            assert moved["slots_moved"] > 0, moved
        await asyncio.sleep(0.3)

    removed = await admin(c, "DELETE", "/admin/shards/1")
    assert removed["removed"] == 1 and removed["slots_moved"] > 0, removed
    await asyncio.sleep(1.0)
    load.stop.set()
    await asyncio.gather(*workers)

    assert not load.failures, load.failures[:5]
    assert len(load.acked) > 100, len(load.acked)
    assert set(load.statuses) <= {"SHARD_MOVING", "SERVICE_UNAVAILABLE"}, load.statuses
    posted = expect_ok(await c.call("POST", "/ledger/holds/rs-hold-1/post", body={}))
    assert posted["state"] == "posted", posted

    overview = await admin(c, "GET", "/admin/shards")
    assert [s["shard_id"] for s in overview["shards"]] == [0, 2, 3] and overview["retired"] == [1]
    assert sum(s["slots"] for s in overview["shards"]) == 16384 and all(s["ok"] for s in overview["shards"])
    assert overview["frozen_slots"] == [] and overview["moves_done"] >= 6, overview
    node.acked = load.acked  # type: ignore[attr-defined]


async def verify_store(dsn: str, acked: set[str]) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT journal_id FROM journals WHERE journal_id LIKE 'rs-%-%'")
        stored = Counter(r[0] for r in rows)
        assert set(stored) - {"rs-hold-1"} == acked  # every acknowledged journal, nothing else
        assert max(stored.values()) == 1
        problems = await run_check(conn) + await check_signatures(conn)
        assert problems == [], problems[:10]
        streams = {r[0] for r in await conn.fetch("SELECT DISTINCT stream_id FROM journals")}
        assert {0, 1} <= streams  # the retired shard's chain is still there (and verified above)
    finally:
        await conn.close()


def test_resharding_under_load_loses_and_duplicates_nothing(two_shards: NodeHarness) -> None:
    node = two_shards

    async def main() -> None:
        async with aiohttp.ClientSession() as http:
            await scenario(node, Client(http, node.url))

    asyncio.run(main())
    node.run(asyncio.sleep(0.5))
    acked: set[str] = node.acked  # type: ignore[attr-defined]
    asyncio.run(verify_store(node.dsn, acked))

    before = node.run(_slot_map(node.dsn))
    node.restart()  # the same shards and slot map come back from PostgreSQL

    async def after_restart() -> None:
        async with aiohttp.ClientSession() as http:
            c = Client(http, node.url)
            overview = await admin(c, "GET", "/admin/shards")
            assert [s["shard_id"] for s in overview["shards"]] == [0, 2, 3]
            assert {s["shard_id"]: s["slots"] for s in overview["shards"]} == dict(Counter(before.values()))
            expect_ok(await c.post(journal("rs-after-restart", ACCOUNTS[0], ACCOUNTS[1])))

    asyncio.run(after_restart())
    assert node.run(_slot_map(node.dsn)) == before


async def _slot_map(dsn: str) -> dict[int, int]:
    conn = await asyncpg.connect(dsn)
    try:
        return {r[0]: r[1] for r in await conn.fetch("SELECT slot, shard_id FROM slot_map")}
    finally:
        await conn.close()
