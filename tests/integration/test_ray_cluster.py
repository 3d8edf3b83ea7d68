"""`ledger-node serve --ray-address` on a Ray cluster: shards on two nodes, then one of them dies.

The cluster is three `ray start` on this machine (tests/support/ray_nodes.py): a head without
the `ledger_shard` resource (the node's driver and API run there) and two shard nodes offering
`ledger_shard: 4` each; the node runs as a subprocess (its own Ray driver, apart from the test
session's local Ray) against a fresh database on the shared PostgreSQL. Every Ray process the
test starts is killed at the end, whatever happens.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.support.databases import create_database, drop_database
from tests.support.node import TOKEN_SPEC, accounts_on_shard, auth, check_store, journal
from tests.support.ray_nodes import CLUSTER_ENV, REPO, RayNode, free_port, operator_env

pytestmark = pytest.mark.slow
CLI = Path(sys.executable).with_name("ledger-node")
SHARDS = 4
RECOVERY_TIMEOUT_S = 90


@pytest.fixture
def cluster() -> Iterator[tuple[RayNode, RayNode, RayNode]]:
    """A head without `ledger_shard` (where the node's API runs, like the Kubernetes head) and two
    shard nodes with `ledger_shard: 4` each; every process of all three killed after."""
    nodes: list[RayNode] = []
    try:
        head = RayNode({})
        nodes.append(head)
        head.start()
        for _ in range(2):
            nodes.append(RayNode({"ledger_shard": SHARDS}, head_address=head.address))
            nodes[-1].start()
        yield head, nodes[1], nodes[2]
    finally:
        for node in reversed(nodes):
            node.remove()


def _call(url: str, method: str = "GET", body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=auth())
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")
    except OSError:
        return 0, {}


def _placement(url: str) -> dict[int, str | None]:
    status, body = _call(f"{url}/health")
    assert status == 200, body
    return {entry["shard_id"]: entry["node_id"] for entry in body["shards"]}


def _post_until_acknowledged(url: str, body: dict[str, Any], timeout_s: float) -> None:
    """Post (the same journal id each time, so retries are idempotent) until it is acknowledged."""
    deadline = time.monotonic() + timeout_s
    while True:
        status, answer = _call(f"{url}/ledger/post", "POST", body)
        if status == 200:
            return
        assert status in (0, 500, 503), answer  # retryable while the shard restarts
        assert time.monotonic() < deadline, f"not acknowledged in {timeout_s}s: {status} {answer}"
        time.sleep(0.5)


def _journals(shard: int, count: int, tag: str) -> list[dict[str, Any]]:
    debit, credit = accounts_on_shard(shard, 2, f"asset:{tag}{shard}")
    return [journal(f"{tag}-{shard}-{n}", debit, credit, amount=100 + n) for n in range(count)]


def _cross_shard(count: int, tag: str) -> list[dict[str, Any]]:
    a = accounts_on_shard(0, 1, f"asset:{tag}x")[0]
    b = accounts_on_shard(SHARDS - 1, 1, f"asset:{tag}y")[0]
    return [journal(f"{tag}-cross-{n}", a, b, amount=7 + n) for n in range(count)]


async def _stored_ids(dsn: str) -> set[str]:
    conn = await asyncpg.connect(dsn)
    try:
        return {row["journal_id"] for row in await conn.fetch("SELECT journal_id FROM journals")}
    finally:
        await conn.close()


def _start_node(head: RayNode, dsn: str, data_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {
        **operator_env(),
        **CLUSTER_ENV,
        "DATABASE_URL": dsn,
        "LEDGER_API_TOKENS": TOKEN_SPEC,
    }
    command = [str(CLI), "serve", "--ray-address", head.address]
    command += ["--host", "127.0.0.1", "--port", str(port), "--shards", str(SHARDS)]
    command += ["--data-dir", str(data_dir)]
    log = (data_dir.parent / "node.log").open("wb")
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 150
    while _call(f"{url}/ready")[0] != 200:
        assert process.poll() is None, (data_dir.parent / "node.log").read_text()[-4000:]
        assert time.monotonic() < deadline, "node not ready in 150 s"
        time.sleep(0.5)
    return process, url


def test_shards_spread_over_two_ray_nodes_and_recover_on_the_survivor_with_nothing_lost(
    cluster: tuple[RayNode, RayNode, RayNode], tmp_path: Path
) -> None:
    """Tried: `serve --ray-address` on the head of a cluster whose two other nodes offer
    `ledger_shard: 4`; its four shard actors run only on those two (/health shows exactly two node
    ids, none of them the head's although the node's driver is there) and each answers postings.
    The second shard node is then killed like a lost machine (SIGKILL to its raylet, agents and
    workers): the shards it held are restarted by Ray on the other shard node, reload from
    PostgreSQL and accept postings again; every acknowledged journal (single- and cross-shard,
    before and after) is stored and `ledger-node check` finds nothing wrong.
    """
    head, _, second = cluster
    dsn = asyncio.run(create_database("ledger_raycluster"))
    process: subprocess.Popen[bytes] | None = None
    try:
        process, url = _start_node(head, dsn, tmp_path / "data")
        before = _placement(url)
        assert sorted(before) == list(range(SHARDS))
        assert None not in before.values(), before
        assert len(set(before.values())) == 2, f"shards not spread over both nodes: {before}"

        acknowledged: list[str] = []
        first_wave = [j for s in range(SHARDS) for j in _journals(s, 3, "a")] + _cross_shard(3, "a")
        for body in first_wave:
            _post_until_acknowledged(url, body, 30)
            acknowledged.append(body["journal_id"])

        assert second.kill() > 0
        second_wave = [j for s in range(SHARDS) for j in _journals(s, 3, "b")] + _cross_shard(3, "b")
        for body in second_wave:
            _post_until_acknowledged(url, body, RECOVERY_TIMEOUT_S)
            acknowledged.append(body["journal_id"])

        after = _placement(url)
        survivors = set(after.values())
        assert len(survivors) == 1 and survivors <= set(before.values()), (before, after)
        moved = [s for s in before if before[s] not in survivors]
        assert moved, f"no shard was on the killed node: {before}"

        stored = asyncio.run(_stored_ids(dsn))
        assert set(acknowledged) <= stored, sorted(set(acknowledged) - stored)
        assert asyncio.run(check_store(dsn)) == []
    finally:
        if process is not None:
            process.terminate()
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
        asyncio.run(drop_database(dsn))
