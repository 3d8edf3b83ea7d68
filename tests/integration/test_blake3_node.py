"""A ledger created with `LEDGER_HASH_ALG=blake3`: journal hashes and every Merkle tree in BLAKE3.

Statement digests (what is signed, and the log's leaf data) stay SHA-256. Everything an auditor
gets (the audit block of GET /ledger/{id}, a proof package) verifies with BLAKE3 and the published
keys; `ledger-node check` passes; and the algorithm can never change once the ledger exists.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import blake3
import msgspec
import pytest

from ledger.timestamps import rfc3339
from node.config import NodeConfig
from node.runtime import Node, StartupError
from signer.canonical import canonical
from signer.merkle import leaf_hash, verify_inclusion
from signer.statements import statement_digest
from signer.verify import verify_package
from store.migrations import apply_migrations
from store.settings import SettingsError, ledger_hash_alg, resolve_hash_alg
from tests.support.databases import create_database, drop_database
from tests.support.node import TOKEN_SPEC, NodeHarness, accounts_on_shard, auth, journal

REPO = Path(__file__).resolve().parents[2]
CLI = Path(sys.executable).with_name("ledger-node")
READY_TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
def node(ray_cluster: None) -> Iterator[NodeHarness]:
    """A 4-shard node whose ledger is created with hash_alg blake3."""
    harness = NodeHarness(hash_alg="blake3").start()
    yield harness
    harness.stop()


def _b3(data: bytes) -> bytes:
    return blake3.blake3(data).digest()


async def _get(http: aiohttp.ClientSession, url: str, role: str = "auditor") -> dict[str, Any]:
    async with http.get(url, headers=auth(role)) as response:
        assert response.status == 200, await response.text()
        answer: dict[str, Any] = await response.json()
        return answer


async def _proof_package(http: aiohttp.ClientSession, url: str, rng: dict[str, Any]) -> bytes:
    async with http.post(f"{url}/proofs/generate", json={"range": rng}, headers=auth("auditor")) as response:
        answer = await response.json()
        assert response.status == 200 and answer["ok"], answer
    proof_id = answer["proof_id"]
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        proof = (await _get(http, f"{url}/proofs/{proof_id}"))["proof"]
        if proof["status"] != "generating":
            break
        assert time.monotonic() < deadline, "proof still generating"
        await asyncio.sleep(0.1)
    assert proof["status"] == "ready", proof
    async with http.get(f"{url}/proofs/{proof_id}/package", headers=auth("auditor")) as response:
        assert response.status == 200, await response.text()
        return await response.read()


async def _blake3_ledger(node: NodeHarness) -> None:
    a0 = accounts_on_shard(0, 2, "asset:b3s0")
    a1 = accounts_on_shard(1, 1, "liability:b3s1")
    start = rfc3339(datetime.now(UTC) - timedelta(seconds=1))
    async with aiohttp.ClientSession() as http:
        posted = []
        # single-shard, cross-shard, cross-shard
        for i, (debit, credit) in enumerate([(a0[0], a0[1]), (a0[0], a1[0]), (a0[1], a1[0])]):
            body = journal(f"b3-{i}", debit, credit, 100 + i)
            async with http.post(f"{node.url}/ledger/post", json=body, headers=auth()) as response:
                answer = await response.json()
            assert answer["ok"], answer
            posted.append(answer["journal_id"])
        assert node.node is not None and node.node.services is not None
        assert node.node.services.hash_alg == "blake3"
        await node.node.services.signer.checkpoint()
        keys = {k["kid"]: k for k in (await _get(http, f"{node.url}/keys"))["keys"]}
        for journal_id in posted:
            read = await _get(http, f"{node.url}/ledger/{journal_id}")
            audit = read["audit"]
            assert audit["hash_alg"] == "blake3"
            assert audit["hash"] == _b3(canonical(read["journal"])).hex()
            assert audit["batch"]["statement"]["hash_alg"] == "blake3"
            proof = audit["inclusion_proof"]
            assert verify_inclusion(
                leaf_hash(bytes.fromhex(audit["hash"]), "blake3"),
                proof["leaf_index"],
                proof["tree_size"],
                [bytes.fromhex(p) for p in proof["path"]],
                bytes.fromhex(audit["batch_root"]),
                "blake3",
            )
            checkpoint = audit["checkpoint"]
            assert checkpoint is not None and checkpoint["statement"]["hash_alg"] == "blake3"
            assert verify_inclusion(
                leaf_hash(statement_digest(audit["batch"]["statement"]), "blake3"),
                audit["batch"]["log_index"],
                checkpoint["statement"]["tree_size"],
                [bytes.fromhex(p) for p in checkpoint["log_proof"]],
                bytes.fromhex(checkpoint["statement"]["root"]),
                "blake3",
            )
            assert keys[checkpoint["signer_kid"]]
        await asyncio.sleep(0.05)
        end = rfc3339(datetime.now(UTC))
        data = await _proof_package(http, node.url, {"from_ts": start, "to_ts": end})
        assert msgspec.json.decode(data)["hash_alg"] == "blake3"
        pems = [k["pem"] for k in keys.values()]
        report = verify_package(data, pems)
        assert report.ok, [c for c in report.checks if not c.ok]
        assert report.counts["journals"] >= len(posted)


def test_blake3_ledger_is_hashed_signed_and_provable(node: NodeHarness) -> None:
    """Audit blocks and a proof package of a blake3 ledger verify with BLAKE3; `check` passes."""
    node.run(_blake3_ledger(node))
    base = {k: v for k, v in os.environ.items() if k != "DATABASE_URL" and not k.startswith("LEDGER_")}
    result = subprocess.run(
        [str(CLI), "check", "--data-dir", str(node.data_dir)],
        cwd=REPO,
        env={**base, "DATABASE_URL": node.dsn},
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


async def _settings_refuse_change() -> None:
    dsn = await create_database("ledger_hashalg")
    try:
        conn = await asyncpg.connect(dsn)
        try:
            await apply_migrations(conn)
            assert await ledger_hash_alg(conn) == "sha256"  # no row yet: the default
            assert await resolve_hash_alg(conn, "blake3") == "blake3"  # created with blake3
            assert await resolve_hash_alg(conn, None) == "blake3"  # the stored value wins
            assert await resolve_hash_alg(conn, "blake3") == "blake3"
            with pytest.raises(SettingsError, match="created with blake3; LEDGER_HASH_ALG=sha256 cannot"):
                await resolve_hash_alg(conn, "sha256")
            with pytest.raises(SettingsError, match="not one of"):
                await resolve_hash_alg(conn, "md5")
            assert await ledger_hash_alg(conn) == "blake3"
        finally:
            await conn.close()
        # the node refuses to start with a different explicit algorithm (before any actor is spawned)
        refused = Node(NodeConfig(port=0, database_url=dsn, api_tokens=TOKEN_SPEC, hash_alg="sha256"))
        try:
            with pytest.raises(StartupError, match="this ledger was created with blake3"):
                await refused.start()
        finally:
            await refused.stop()
    finally:
        await drop_database(dsn)


def test_hash_alg_is_fixed_at_creation() -> None:
    """A ledger created with blake3 keeps it; asking for sha256 later is a start-up error."""
    asyncio.run(_settings_refuse_change())


def test_hash_alg_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """LEDGER_HASH_ALG reaches NodeConfig; unset means "the ledger's own (sha256 when new)"."""
    monkeypatch.setenv("LEDGER_HASH_ALG", "blake3")
    assert NodeConfig.from_env().hash_alg == "blake3"
    monkeypatch.delenv("LEDGER_HASH_ALG")
    assert NodeConfig.from_env().hash_alg is None
