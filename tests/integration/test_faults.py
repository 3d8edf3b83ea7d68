"""Faults under load on a real node (real PostgreSQL, real Ray actors, real HTTP).

Concurrent single- and cross-shard posting, a shard actor killed mid-load, the coordinator
killed mid-load, the overdraft guard under concurrency, and a node restart. After each, the
store must hold exactly the acknowledged journals, whole, with balances that add up, and
`ledger-node check` must pass. Tests share one node (module fixture) and use their own
accounts, so later tests also check that earlier faults left nothing behind.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import asyncpg

from actors import runtime as actor_runtime
from node.config import NodeConfig
from node.runtime import Node
from tests.support.load import (
    Accounts,
    Client,
    Workload,
    accounts_on,
    cli_check,
    entry,
    expected_balances,
    is_cross,
    run_writers,
    shard_of,
    summary,
    verify_store,
    wait_xtx_done,
    xtx_states,
)
from tests.support.node import TOKEN_SPEC, NodeHarness, auth

KILLED_SHARD = 1


def _assert_all_acknowledged(node: NodeHarness, client: Client) -> None:
    """Every journal answered 503 retryable eventually succeeded when retried with the same id and body."""
    failed = [o.journal_id for o in client.failed()]
    if failed:
        states = asyncio.run(xtx_states(node.dsn, failed[:20]))
        raise AssertionError(f"{summary(client)}; (xtx state, journal row) of the first: {states}")


def _assert_cli_check(dsn: str) -> None:
    done = cli_check(dsn)
    assert done.returncode == 0, f"ledger-node check exit {done.returncode}:\n{done.stdout}\n{done.stderr}"
    assert "check passed" in done.stdout, done.stdout


async def _balance(http: aiohttp.ClientSession, url: str, account_id: str) -> dict[str, Any]:
    async with http.get(f"{url}/accounts/{account_id}/balances", headers=auth("auditor")) as resp:
        data: dict[str, Any] = await resp.json()
    assert data["ok"], data
    return data


async def _check_balances_read_back(url: str, client: Client, accounts: list[str]) -> None:
    """Balances read over HTTP equal the sums of the acknowledged journals (each counted once)."""
    expected = expected_balances(client.acked.values())
    async with aiohttp.ClientSession() as http:
        for account_id in accounts:
            data = await _balance(http, url, account_id)
            got = {b["currency"]: b["debits_posted"] - b["credits_posted"] for b in data["balances"]}
            want = {cur: net for (acc, cur), net in expected.items() if acc == account_id}
            assert {c: v for c, v in got.items() if v or c in want} == want, (account_id, got, want)


async def _load_with_fault(
    url: str, workload: Workload, total: int, fault: Any, kill_after: int, writers: int = 32
) -> tuple[Client, float]:
    """Post `total` journals; call `fault()` once `kill_after` journals are acknowledged."""
    async with Client(url, tries=60, pause_s=0.2) as client:
        writing = asyncio.create_task(
            run_writers(client, workload, total, writers, batch_every=25, batch_size=50)
        )
        killed_at = 0.0
        while not writing.done():
            if len(client.acked) >= kill_after:
                fault()
                killed_at = time.monotonic()
                break
            await asyncio.sleep(0.02)
        await writing
        assert killed_at, f"load finished ({len(client.acked)} acked) before the fault was injected"
        return client, killed_at


# -- 1. concurrent posting ----------------------------------------------------------------------
def test_concurrent_single_and_cross_shard_posting(node: NodeHarness) -> None:
    workload = Workload("conc", seed=1, cross_ratio=0.3)

    async def scenario() -> Client:
        async with Client(node.url, tries=60) as client:
            await run_writers(client, workload, 3000, writers=32, batch_every=40, batch_size=50)
            return client

    client = asyncio.run(scenario())
    _assert_all_acknowledged(node, client)
    assert len(client.acked) == 3000
    cross = sum(is_cross(b) for b in client.acked.values())
    assert 600 < cross < 1200, cross
    assert asyncio.run(wait_xtx_done(node.dsn)) == 0
    asyncio.run(verify_store(node.dsn, client.acked, client.bodies))
    _assert_cli_check(node.dsn)
    asyncio.run(_check_balances_read_back(node.url, client, workload.accounts.all()[::5]))
    services = node.node.services if node.node is not None else None
    assert services is not None
    if actor_runtime.DIRECT_CALLS:  # the hot calls took the direct channel, not Ray (actors/direct.py)
        ports = [*services.shards.values(), services.coordinator]
        assert all(p.direct is not None and p.direct.connects >= 1 for p in ports)
        assert node.run(services.shards[0].status())["direct_calls"] > 0


# -- 2. a shard actor dies mid-load ---------------------------------------------------------------
def _kill_under_load(node: NodeHarness, workload: Workload, count: int, kill: Any, kill_after: int) -> Client:
    """Post `count` journals, run `kill` after `kill_after` acks; then every ack is stored exactly once,
    whole, no transaction is left open and `ledger-node check` passes."""
    client, _ = asyncio.run(_load_with_fault(node.url, workload, count, kill, kill_after=kill_after))
    assert any(o.retried for o in client.outcomes.values()), "the kill did not disturb any posting"
    _assert_all_acknowledged(node, client)
    assert asyncio.run(wait_xtx_done(node.dsn)) == 0
    asyncio.run(verify_store(node.dsn, client.acked, client.bodies))
    _assert_cli_check(node.dsn)
    return client


def test_shard_killed_mid_load(node: NodeHarness) -> None:
    assert node.node is not None and node.node.services is not None
    shard_port = node.node.services.shards[KILLED_SHARD]
    workload = Workload("shk", seed=2, cross_ratio=0.35)
    client = _kill_under_load(node, workload, 2500, lambda: actor_runtime.kill(shard_port), kill_after=600)

    async def after() -> None:
        async with Client(node.url, tries=60) as again:
            touching = {
                "journal_id": "shk-after-kill",
                "entries": [
                    entry(workload.accounts.assets[KILLED_SHARD][0], "debit", 777, "USD"),
                    entry(workload.accounts.revenues[KILLED_SHARD][0], "credit", 777, "USD"),
                ],
            }
            outcome = await again.post(touching)
            assert outcome.ok and outcome.attempts == 1, outcome
            client.acked[touching["journal_id"]] = touching
        await _check_balances_read_back(node.url, client, workload.accounts.all())

    asyncio.run(after())
    assert node.run(shard_port.status())["reservations"] == 0
    if actor_runtime.DIRECT_CALLS:  # the front end reopened its direct connection to the new incarnation
        assert shard_port.direct is not None and shard_port.direct.connects >= 2, shard_port.direct.connects


# -- 3. the coordinator dies mid-load -------------------------------------------------------------
def test_coordinator_killed_mid_load(node: NodeHarness) -> None:
    assert node.node is not None and node.node.services is not None
    services = node.node.services
    coordinator = services.coordinator
    workload = Workload("cok", seed=3, cross_ratio=0.7)
    client = _kill_under_load(node, workload, 2000, lambda: actor_runtime.kill(coordinator), kill_after=400)
    asyncio.run(_check_balances_read_back(node.url, client, workload.accounts.all()))

    # No reservation survives on any shard (the sweep runs every 30 s).
    deadline = time.monotonic() + 45.0
    while True:
        held = {s: node.run(port.status())["reservations"] for s, port in services.shards.items()}
        if not any(held.values()) or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    assert not any(held.values()), f"reservations left 45 s after the kill: {held}"
    status = node.run(coordinator.status())
    assert status["in_flight"] == 0, status


# -- 4. the overdraft guard under concurrency -----------------------------------------------------
WALLET = "liability:wallet-race"


def test_overdraft_guard_under_concurrency(node: NodeHarness) -> None:
    wallet_shard = shard_of(WALLET)
    same = accounts_on("asset:race:same", wallet_shard, 5)
    other = [a for s in range(4) if s != wallet_shard for a in accounts_on(f"asset:race:s{s}-", s, 2)]

    async def scenario() -> None:
        async with aiohttp.ClientSession() as http, Client(node.url) as client:
            async with http.post(
                f"{node.url}/accounts",
                json={"account_id": WALLET, "policy": {"no_negative": True}},
                headers=auth("admin"),
            ) as resp:
                created = await resp.json()
            assert resp.status == 201 and created["created"], created
            fund = {
                "journal_id": "race-fund",
                "entries": [entry(same[0], "debit", 1000, "USD"), entry(WALLET, "credit", 1000, "USD")],
            }
            assert (await client.post(fund)).ok

            def debit(i: int) -> dict[str, Any]:
                counter = same[i % len(same)] if i % 2 == 0 else other[i % len(other)]
                return {
                    "journal_id": f"race-debit-{i:02d}",
                    "entries": [entry(WALLET, "debit", 100, "USD"), entry(counter, "credit", 100, "USD")],
                }

            bodies = [debit(i) for i in range(50)]
            assert sum(is_cross(b) for b in bodies) == 25
            answers: list[tuple[int, dict[str, Any]]] = []
            low = [0]

            async def one(body: dict[str, Any]) -> None:
                async with http.post(f"{node.url}/ledger/post", json=body, headers=auth()) as resp:
                    answers.append((resp.status, await resp.json()))

            async def watch() -> None:
                while len(answers) < 50:
                    bal = (await _balance(http, node.url, WALLET))["balances"][0]["balance"]
                    low[0] = min(low[0], bal)
                    await asyncio.sleep(0.005)

            await asyncio.gather(watch(), *(one(b) for b in bodies))
            ok = [a for s, a in answers if s == 200 and a["ok"]]
            refused = [a for s, a in answers if s == 409 and a["error"]["code"] == "INSUFFICIENT_FUNDS"]
            assert len(ok) == 10 and len(refused) == 40, [(s, a.get("error")) for s, a in answers]
            assert low[0] >= 0
            final = await _balance(http, node.url, WALLET)
            assert final["balances"][0]["balance"] == 0, final
            assert final["policy"] == {"no_negative": True, "split": False}

    asyncio.run(scenario())
    assert asyncio.run(wait_xtx_done(node.dsn)) == 0
    _assert_cli_check(node.dsn)


# -- 5. a node restart keeps state ------------------------------------------------------------
def test_restart_keeps_state(node: NodeHarness) -> None:
    probe = Accounts("rst", per_shard=2)

    async def snapshot() -> dict[tuple[str, str], tuple[int, int]]:
        conn = await asyncpg.connect(node.dsn)
        try:
            rows = await conn.fetch(
                "SELECT account_id, currency, debits_posted, credits_posted FROM balances"
            )
        finally:
            await conn.close()
        return {(r[0], r[1]): (r[2], r[3]) for r in rows}

    async def heads() -> dict[int, tuple[int, str]]:
        conn = await asyncpg.connect(node.dsn)
        try:
            rows = await conn.fetch(
                """
                SELECT DISTINCT ON (shard) shard, seq, hash FROM (
                    SELECT stream_id AS shard, stream_seq AS seq, hash FROM journals WHERE stream_id >= 0
                    UNION ALL SELECT shard_id, seq, hash FROM shard_links) c
                 ORDER BY shard, seq DESC
                """
            )
        finally:
            await conn.close()
        return {r[0]: (r[1], bytes(r[2]).hex()) for r in rows}

    before = asyncio.run(snapshot())
    chain_before = asyncio.run(heads())
    assert set(chain_before) == {0, 1, 2, 3}
    assert node.node is not None
    node.run(node.node.stop())
    node.node = Node(NodeConfig(port=0, shards=4, database_url=node.dsn, api_tokens=TOKEN_SPEC))
    node.run(node.node.start())
    assert asyncio.run(snapshot()) == before

    async def after_restart() -> None:
        async with aiohttp.ClientSession() as http, Client(node.url, tries=1) as client:
            wallet = await _balance(http, node.url, WALLET)
            assert wallet["balances"][0]["balance"] == 0 and wallet["policy"] == {
                "no_negative": True,
                "split": False,
            }
            over = {
                "journal_id": "rst-overdraft",
                "entries": [entry(WALLET, "debit", 1, "USD"), entry(probe.assets[0][0], "credit", 1, "USD")],
            }
            refused = await client.post(over)
            assert not refused.ok and refused.status == 409 and refused.code == "INSUFFICIENT_FUNDS"
            for s in range(4):
                body = {
                    "journal_id": f"rst-chain-{s}",
                    "entries": [
                        entry(probe.assets[s][0], "debit", 5, "USD"),
                        entry(probe.revenues[s][0], "credit", 5, "USD"),
                    ],
                }
                assert (await client.post(body)).ok
                async with http.get(f"{node.url}/ledger/rst-chain-{s}", headers=auth("auditor")) as resp:
                    audit = (await resp.json())["audit"]
                seq, head = chain_before[s]
                assert audit["shard"] == s and not audit["cross_shard"], audit
                assert audit["seq"] == seq + 1 and audit["prev_hash"] == head, (s, audit, chain_before[s])
            cross = {
                "journal_id": "rst-cross",
                "entries": [
                    entry(probe.assets[0][1], "debit", 9, "USD"),
                    entry(probe.revenues[2][1], "credit", 9, "USD"),
                ],
            }
            assert (await client.post(cross)).ok

    asyncio.run(after_restart())
    _assert_cli_check(node.dsn)


# -- 6. a refused cross-shard journal id stays usable ------------------------------------------
def test_refused_cross_shard_journal_can_be_posted_later(node: NodeHarness) -> None:
    """A cross-shard journal refused (aborted) must not block its journal_id: a retry is decided anew.

    Single-shard journals behave that way (a refused journal is not stored, the same id may be
    posted later); a cross-shard one must too, and it must never be answered 503 "retryable" forever.
    """
    wallet_shard = shard_of(WALLET)
    other = accounts_on("asset:late:o", (wallet_shard + 1) % 4, 1)[0]
    same = accounts_on("asset:late:s", wallet_shard, 1)[0]
    cross = {
        "journal_id": "late-cross",
        "entries": [entry(WALLET, "debit", 100, "USD"), entry(other, "credit", 100, "USD")],
    }

    async def scenario() -> None:
        async with Client(node.url, tries=1) as client:
            refused = await client.post(cross)
            assert refused.status == 409 and refused.code == "INSUFFICIENT_FUNDS", refused
            again = await client.post(cross)
            assert again.status == 409 and again.code == "INSUFFICIENT_FUNDS", again
            fund = {
                "journal_id": "late-fund",
                "entries": [entry(same, "debit", 100, "USD"), entry(WALLET, "credit", 100, "USD")],
            }
            assert (await client.post(fund)).ok
        async with Client(node.url, tries=25, pause_s=0.2) as client:
            posted = await client.post(cross)
            assert posted.ok, posted
        async with aiohttp.ClientSession() as http:
            assert (await _balance(http, node.url, WALLET))["balances"][0]["balance"] == 0

    asyncio.run(scenario())
    assert asyncio.run(wait_xtx_done(node.dsn)) == 0
    _assert_cli_check(node.dsn)
