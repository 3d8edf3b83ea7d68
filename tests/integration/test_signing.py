"""Signed batches over real HTTP, Ray and PostgreSQL: every acknowledged journal is already signed.

What a client or auditor would notice: the audit block of GET /ledger/{id} carries a signature
by a published key over a batch statement whose Merkle root includes the journal, plus a signed
checkpoint that includes the batch; and when the signer fails, nothing is written (500
SIGNING_FAILURE) and a retry after recovery posts the journal once.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import aiohttp
import asyncpg

from signer.keys import verify_signature
from signer.merkle import leaf_hash, verify_inclusion
from signer.statements import statement_digest
from tests.support.node import NodeHarness, accounts_on_shard, auth, journal


def _check_audit(audit: dict[str, Any], keys: dict[str, dict[str, Any]]) -> None:
    """Everything in the audit block verifies with nothing but the published public keys."""
    statement = audit["batch"]["statement"]
    key = keys[audit["signer_kid"]]
    assert statement["root"] == audit["batch_root"]
    assert verify_signature(
        key["pem"], key["algorithm"], statement_digest(statement), base64.b64decode(audit["signature"])
    )
    proof = audit["inclusion_proof"]
    assert verify_inclusion(
        leaf_hash(bytes.fromhex(audit["hash"])),
        proof["leaf_index"],
        proof["tree_size"],
        [bytes.fromhex(p) for p in proof["path"]],
        bytes.fromhex(audit["batch_root"]),
    )
    checkpoint = audit["checkpoint"]
    assert checkpoint is not None, "batch not yet in a checkpoint"
    ckey = keys[checkpoint["signer_kid"]]
    cstatement = checkpoint["statement"]
    assert verify_signature(
        ckey["pem"],
        ckey["algorithm"],
        statement_digest(cstatement),
        base64.b64decode(checkpoint["signature"]),
    )
    assert verify_inclusion(
        leaf_hash(statement_digest(statement)),
        audit["batch"]["log_index"],
        cstatement["tree_size"],
        [bytes.fromhex(p) for p in checkpoint["log_proof"]],
        bytes.fromhex(cstatement["root"]),
    )


async def _signed_reads(node: NodeHarness) -> None:
    a0 = accounts_on_shard(0, 2, "asset:sig0")
    a1 = accounts_on_shard(1, 1, "liability:sig1")
    async with aiohttp.ClientSession() as http:
        health = await (await http.get(f"{node.url}/health")).json()
        assert health["signingConfigured"] is True and health["signer"] == "software"
        assert "software" in health["warning"]
        posted = []
        for i, (debit, credit) in enumerate([(a0[0], a0[1]), (a0[0], a1[0]), (a0[1], a1[0])]):
            body = journal(f"sig-{i}", debit, credit, 100 + i)
            answer = await (await http.post(f"{node.url}/ledger/post", json=body, headers=auth())).json()
            assert answer["ok"], answer
            posted.append(answer["journal_id"])
        assert node.node is not None and node.node.services is not None
        await node.node.services.signer.checkpoint()
        keys_body = await (await http.get(f"{node.url}/keys", headers=auth("auditor"))).json()
        keys = {k["kid"]: k for k in keys_body["keys"]}
        assert keys and all(k["kind"] == "software" for k in keys.values())
        for journal_id in posted:
            read = await (await http.get(f"{node.url}/ledger/{journal_id}", headers=auth("auditor"))).json()
            _check_audit(read["audit"], keys)


def test_every_acknowledged_journal_is_signed_and_provable(node: NodeHarness) -> None:
    """Single- and cross-shard journals: signature, inclusion in the batch root, batch in a checkpoint."""
    node.run(_signed_reads(node))


async def _signing_failure(node: NodeHarness) -> None:
    assert node.node is not None and node.node.services is not None
    signer = node.node.services.signer
    a0 = accounts_on_shard(2, 2, "asset:fail")
    body = journal("sig-fail-1", a0[0], a0[1], 500)
    async with aiohttp.ClientSession() as http:
        await signer.set_failing(True)
        try:
            response = await http.post(f"{node.url}/ledger/post", json=body, headers=auth())
            answer = await response.json()
            assert response.status == 500 and answer["error"]["code"] == "SIGNING_FAILURE", answer
            missing = await http.get(f"{node.url}/ledger/sig-fail-1", headers=auth("auditor"))
            assert missing.status == 404  # nothing half-written
        finally:
            await signer.set_failing(False)
        response = await http.post(f"{node.url}/ledger/post", json=body, headers=auth())
        assert response.status == 200, await response.text()
    conn = await asyncpg.connect(node.dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM journal_lines WHERE journal_id = 'sig-fail-1'") == 2
        unsigned = await conn.fetchval(
            "SELECT count(*) FROM journals j WHERE j.stream_id >= 0 AND NOT EXISTS (SELECT 1 FROM batches b "
            "WHERE b.shard_id = j.stream_id AND j.stream_seq BETWEEN b.first_seq AND b.last_seq)"
        )
        assert unsigned == 0
    finally:
        await conn.close()


def test_signing_failure_writes_nothing_and_retry_posts_once(node: NodeHarness) -> None:
    """The signer fails: 500 SIGNING_FAILURE, nothing written; after recovery the same journal posts."""
    node.run(_signing_failure(node))


def test_signed_batches_cover_every_chain_position(node: NodeHarness) -> None:
    """Batches of each shard are consecutive and cover the whole chain with no gap (what proofs rely on)."""

    async def check() -> None:
        conn = await asyncpg.connect(node.dsn)
        try:
            rows = await conn.fetch(
                "SELECT shard_id, batch_seq, first_seq, last_seq FROM batches "
                "WHERE shard_id >= 0 ORDER BY 1, 2"
            )
            heads = await conn.fetch(
                "SELECT shard, max(seq) AS seq FROM (SELECT stream_id AS shard, stream_seq AS seq "
                "FROM journals WHERE stream_id >= 0 UNION ALL SELECT shard_id, seq FROM shard_links) c "
                "GROUP BY shard"
            )
        finally:
            await conn.close()
        expected = {r["shard"]: r["seq"] for r in heads}
        last: dict[int, tuple[int, int]] = {}
        for r in rows:
            prev_batch, prev_seq = last.get(r["shard_id"], (0, 0))
            assert r["batch_seq"] == prev_batch + 1 and r["first_seq"] == prev_seq + 1, dict(r)
            last[r["shard_id"]] = (r["batch_seq"], r["last_seq"])
        assert {shard: seq for shard, (_, seq) in last.items()} == expected

    asyncio.run(check())
