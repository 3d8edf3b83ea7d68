"""Proof packages over real HTTP, Ray and PostgreSQL, checked the way an auditor would.

The module posts 200 journals (single- and cross-shard) in five rounds of concurrent batch calls,
asks the node for proof packages over time and log-index ranges, downloads them and verifies them
offline, in process (`signer.verify.verify_package`) and with the `ledger-node verify` CLI, against
the public keys of `GET /keys`. Tampering is caught and names the journal: a journal removed from a
package, and (last, since it corrupts the ledger) a byte changed in a stored journal body.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import msgspec
import pytest

from ledger.timestamps import rfc3339
from signer.keys import verify_signature
from signer.merkle import verify_consistency
from signer.package import ProofPackage, decode_package, encode_package
from signer.statements import statement_digest
from signer.verify import VerifyReport, verify_package
from tests.support.node import NodeHarness, accounts_on_shard, auth, journal

ROUNDS = 5
CALLS_PER_ROUND = 2
JOURNALS_PER_CALL = 20
READY_TIMEOUT_S = 30.0
ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = ROOT / ".venv" / "bin" if (ROOT / ".venv" / "bin").is_dir() else Path(sys.executable).parent


@pytest.fixture(scope="module")
def node(ray_cluster: None) -> Iterator[NodeHarness]:
    """The module's own node (the tamper test corrupts its ledger)."""
    harness = NodeHarness().start()
    yield harness
    harness.stop()


ACCOUNTS = {shard: accounts_on_shard(shard, 2, f"asset:prf{shard}") for shard in range(4)}


def _journal(n: int) -> dict[str, Any]:
    """Journal `prf-NNNN`: every fourth one moves money between two shards; amounts are unique."""
    shard = n % 4
    if n % 4 == 3:
        debit, credit = ACCOUNTS[shard][0], ACCOUNTS[(shard + 1) % 4][1]
    else:
        debit, credit = ACCOUNTS[shard][0], ACCOUNTS[shard][1]
    return journal(f"prf-{n:04d}", debit, credit, 1000 + n)


@dataclass
class Ledger:
    """What the module posted and when (client clock, same host as the node)."""

    journal_ids: list[str]
    start: str
    end: str
    middle: tuple[str, str]
    middle_ids: set[str]
    pems: list[str] = field(default_factory=list)


async def _checkpoint(node: NodeHarness) -> int:
    """Force a checkpoint on the node's loop."""
    assert node.node is not None and node.node.services is not None
    signer = node.node.services.signer
    future = asyncio.run_coroutine_threadsafe(signer.checkpoint(), node.loop)
    appended: int = await asyncio.wrap_future(future)
    return appended


async def _post_round(http: aiohttp.ClientSession, url: str, first: int) -> list[str]:
    async def call(start: int) -> list[str]:
        body = {"journals": [_journal(n) for n in range(start, start + JOURNALS_PER_CALL)]}
        response = await http.post(f"{url}/ledger/post_batch", json=body, headers=auth())
        answer = await response.json()
        assert response.status == 200 and all(r["ok"] for r in answer["results"]), answer
        return [r["journal_id"] for r in answer["results"]]

    calls = [call(first + i * JOURNALS_PER_CALL) for i in range(CALLS_PER_ROUND)]
    return [jid for ids in await asyncio.gather(*calls) for jid in ids]


async def _post_ledger(node: NodeHarness) -> Ledger:
    posted: list[str] = []
    marks: dict[int, str] = {}
    async with aiohttp.ClientSession() as http:
        start = rfc3339(datetime.now(UTC) - timedelta(seconds=1))
        per_round = CALLS_PER_ROUND * JOURNALS_PER_CALL
        rounds: list[list[str]] = []
        for number in range(ROUNDS):
            await asyncio.sleep(0.2)
            marks[number] = rfc3339(datetime.now(UTC))
            rounds.append(await _post_round(http, node.url, number * per_round))
            posted += rounds[-1]
        await asyncio.sleep(0.2)
        end = rfc3339(datetime.now(UTC))
        await _checkpoint(node)
        keys = await (await http.get(f"{node.url}/keys", headers=auth("auditor"))).json()
    return Ledger(
        journal_ids=posted,
        start=start,
        end=end,
        middle=(marks[2], marks[4]),
        middle_ids={*rounds[2], *rounds[3]},
        pems=[k["pem"] for k in keys["keys"]],
    )


@pytest.fixture(scope="module")
def ledger(node: NodeHarness) -> Ledger:
    """200 journals over 5 rounds of concurrent batch calls, in a signed checkpoint."""
    return asyncio.run(_post_ledger(node))


# -- helpers ------------------------------------------------------------------------------------
async def _request(
    http: aiohttp.ClientSession, method: str, url: str, role: str, body: Any = None
) -> tuple[int, dict[str, Any]]:
    async with http.request(method, url, json=body, headers=auth(role)) as response:
        return response.status, await response.json()


async def _start(
    http: aiohttp.ClientSession,
    url: str,
    rng: dict[str, Any],
    role: str = "operator",
    path: str = "/proofs/generate",
) -> str:
    status, answer = await _request(http, "POST", f"{url}{path}", role, {"range": rng})
    assert status == 200 and answer["ok"] and answer["status"] == "generating", answer
    assert answer["proof_id"].startswith("proof-")
    proof_id: str = answer["proof_id"]
    return proof_id


async def _settled(http: aiohttp.ClientSession, url: str, proof_id: str) -> dict[str, Any]:
    """Poll GET /proofs/{id} until it is no longer generating (bounded)."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        status, answer = await _request(http, "GET", f"{url}/proofs/{proof_id}", "auditor")
        assert status == 200, answer
        proof: dict[str, Any] = answer["proof"]
        if proof["status"] != "generating":
            return proof
        assert proof["hash"] is None and proof["signature"] is None
        assert time.monotonic() < deadline, f"proof {proof_id} still generating after {READY_TIMEOUT_S}s"
        await asyncio.sleep(0.1)


async def _download(http: aiohttp.ClientSession, url: str, proof_id: str) -> bytes:
    async with http.get(f"{url}/proofs/{proof_id}/package", headers=auth("auditor")) as response:
        assert response.status == 200, await response.text()
        assert response.content_type == "application/json"
        assert f"{proof_id}.json" in response.headers["Content-Disposition"]
        return await response.read()


async def _proof(
    url: str, rng: dict[str, Any], role: str = "operator", path: str = "/proofs/generate"
) -> tuple[dict[str, Any], bytes]:
    """Generate, wait until ready, download: (GET /proofs/{id} answer, package bytes)."""
    async with aiohttp.ClientSession() as http:
        proof_id = await _start(http, url, rng, role, path)
        proof = await _settled(http, url, proof_id)
        assert proof["status"] == "ready", proof
        data = await _download(http, url, proof_id)
    package = decode_package(data)
    assert proof["proof_id"] == proof_id == package.proof_id
    assert proof["hash"] == hashlib.sha256(data).hexdigest()
    assert proof["signature"] == package.checkpoint.signature
    assert proof["signer_kid"] == package.checkpoint.statement["signer_kid"]
    assert proof["ts"] == package.checkpoint.statement["timestamp"]
    assert proof["signer"] == "software" == package.signer.kind
    assert proof["checkpoint"] == {
        "tree_size": package.checkpoint.statement["tree_size"],
        "root": package.checkpoint.statement["root"],
    }
    assert proof["range"] == rng
    return proof, data


def _cli(data: bytes, pems: list[str], tmp: Path) -> subprocess.CompletedProcess[str]:
    """`ledger-node verify PKG --public-key PUB.pem ...`, as an auditor runs it."""
    package = tmp / "package.json"
    package.write_bytes(data)
    args = [str(package)]
    for number, pem in enumerate(pems):
        key = tmp / f"signer-{number}.pem"
        key.write_text(pem)
        args += ["--public-key", str(key)]
    return subprocess.run(
        [*_verify_command(), *args], check=False, capture_output=True, text=True, cwd=ROOT, timeout=60
    )


@functools.cache
def _verify_command() -> list[str]:
    """`ledger-node verify`, or its entry point called directly while the CLI does not wire it yet."""
    entry = VENV_BIN / "ledger-node"
    wired = subprocess.run(
        [str(entry), "verify", "--help"], check=False, capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    if wired.returncode == 0:
        return [str(entry), "verify"]
    code = "import sys; from node.verify_cli import main; sys.exit(main(sys.argv[1:]))"
    return [str(VENV_BIN / "python"), "-c", code]


def _assert_verifies(data: bytes, pems: list[str], tmp: Path) -> VerifyReport:
    report = verify_package(data, pems)
    assert report.ok, [c for c in report.checks if not c.ok]
    assert report.signer_kind == "software" and report.warnings
    done = _cli(data, pems, tmp)
    assert done.returncode == 0, done.stdout + done.stderr
    return report


def _journal_ids(data: bytes) -> set[str]:
    """Ledger journals in a package (audit events, stream -2, ride along as `audit-event-N`)."""
    return {
        j.journal_id for j in decode_package(data).journals if not j.journal_id.startswith("audit-event-")
    }


# -- tests --------------------------------------------------------------------------------------
def test_full_time_range_verifies_in_process_and_with_the_cli(
    node: NodeHarness, ledger: Ledger, tmp_path: Path
) -> None:
    rng = {"from_ts": ledger.start, "to_ts": ledger.end}
    _, data = asyncio.run(_proof(node.url, rng))
    report = _assert_verifies(data, ledger.pems, tmp_path)
    assert _journal_ids(data) == set(ledger.journal_ids)
    package = decode_package(data)
    assert all(b.role == "member" for b in package.batches)
    audit_events = len(decode_package(data).journals) - 200
    assert audit_events > 0  # the audit stream (shard -2) is covered by the same checkpoint
    assert report.counts["journals"] == 200 + audit_events and report.counts["shards"] == 5
    assert report.counts["batches"] >= ROUNDS * 4 // 2


def test_narrow_time_range_selects_some_batches_and_verifies(
    node: NodeHarness, ledger: Ledger, tmp_path: Path
) -> None:
    rng = {"from_ts": ledger.middle[0], "to_ts": ledger.middle[1]}
    _, data = asyncio.run(_proof(node.url, rng, role="auditor"))
    _assert_verifies(data, ledger.pems, tmp_path)
    assert _journal_ids(data) == ledger.middle_ids
    roles = {b.role for b in decode_package(data).batches}
    assert roles == {"before", "member", "after"}


def test_index_range_and_finance_verify(node: NodeHarness, ledger: Ledger, tmp_path: Path) -> None:
    rng = {"from_seq": 1, "to_seq": 3}
    _, data = asyncio.run(_proof(node.url, rng, role="auditor"))
    _assert_verifies(data, ledger.pems, tmp_path)
    package = decode_package(data)
    assert [b.log_index for b in package.batches] == [1, 2, 3]
    assert package.range.from_index == 1 and package.range.to_index == 3
    rng = {"from_ts": ledger.start, "to_ts": ledger.end}
    _, again = asyncio.run(_proof(node.url, rng, role="admin", path="/finance/verify"))
    _assert_verifies(again, ledger.pems, tmp_path)
    assert _journal_ids(again) == set(ledger.journal_ids)


def test_a_journal_removed_from_a_package_is_named(node: NodeHarness, ledger: Ledger, tmp_path: Path) -> None:
    _, data = asyncio.run(_proof(node.url, {"from_ts": ledger.start, "to_ts": ledger.end}))
    package = msgspec.json.decode(data, type=ProofPackage)
    victim = "prf-0007"  # a cross-shard journal: an entry in two shards
    journals = [j for j in package.journals if j.journal_id != victim]
    assert len(journals) == len(package.journals) - 1
    tampered = encode_package(msgspec.structs.replace(package, journals=journals))
    report = verify_package(tampered, ledger.pems)
    assert not report.ok and report.first_bad_journal == victim
    done = _cli(tampered, ledger.pems, tmp_path)
    assert done.returncode == 1 and victim in done.stdout, done.stdout + done.stderr


async def _api_rules(url: str, ledger: Ledger) -> None:
    rng = {"from_ts": ledger.start, "to_ts": ledger.end}
    async with aiohttp.ClientSession() as http:
        status, answer = await _request(http, "POST", f"{url}/proofs/generate", "service", {"range": rng})
        assert status == 403 and answer["error"]["code"] == "NOT_AUTHORIZED", answer
        status, answer = await _request(http, "GET", f"{url}/proofs/unknown", "service")
        assert status == 404 and answer["error"]["code"] == "PROOF_NOT_FOUND", answer
        status, answer = await _request(http, "GET", f"{url}/proofs/unknown/package", "auditor")
        assert status == 404 and answer["error"]["code"] == "PROOF_NOT_FOUND", answer
        # idempotent by (principal, request_id)
        body = {"request_id": "prf-req-1", "range": rng, "caller": {"service": "marketplace"}}
        first = await _request(http, "POST", f"{url}/proofs/generate", "operator", body)
        again = await _request(http, "POST", f"{url}/proofs/generate", "operator", body)
        assert first[0] == again[0] == 200 and again[1]["proof_id"] == first[1]["proof_id"], (first, again)
        other = {**body, "range": {"from_seq": 0, "to_seq": 1}}
        status, answer = await _request(http, "POST", f"{url}/proofs/generate", "operator", other)
        assert status == 409 and answer["error"]["code"] == "IDEMPOTENCY_CONFLICT", answer
        mine = await _request(http, "POST", f"{url}/proofs/generate", "admin", other)  # another principal
        assert mine[0] == 200 and mine[1]["proof_id"] != first[1]["proof_id"]
        assert (await _settled(http, url, first[1]["proof_id"]))["status"] == "ready"
        # validation
        bad: list[tuple[Any, str]] = [
            ({"range": {"from_ts": "yesterday", "to_ts": ledger.end}}, "$.range.from_ts"),
            ({"range": {"from_ts": ledger.end, "to_ts": ledger.start}}, "$.range.to_ts"),
            ({"range": {"from_seq": 0}}, "$.range.to_seq"),
            ({"range": {"from_seq": 0, "to_seq": 1, "from_ts": ledger.start}}, "$.range"),
            ({"range": {"from_seq": -1, "to_seq": 1}}, "$.range.from_seq"),
            ({"range": rng, "extra": 1}, "$.extra"),
            ({"request_id": "prf"}, "$.range"),
        ]
        for payload, where in bad:
            status, answer = await _request(http, "POST", f"{url}/proofs/generate", "operator", payload)
            assert status == 400 and answer["error"]["code"] == "VALIDATION_ERROR", (payload, answer)
            assert answer["error"]["details"]["field"] == where, (payload, answer)
        # a range beyond the log fails (asynchronously); its package cannot be downloaded
        proof_id = await _start(http, url, {"from_seq": 10**6, "to_seq": 10**6 + 5})
        failed = await _settled(http, url, proof_id)
        assert failed["status"] == "failed" and failed["error"]["code"] == "VALIDATION_ERROR", failed
        status, answer = await _request(http, "GET", f"{url}/proofs/{proof_id}/package", "auditor")
        assert status == 409 and answer["error"]["code"] == "INVALID_STATE", answer
        assert answer["error"]["details"]["status"] == "failed"
        # health
        status, answer = await _request(http, "GET", f"{url}/health/proofs", "auditor")
        assert status == 403, answer
        status, health = await _request(http, "GET", f"{url}/health/proofs", "operator")
        assert status == 200 and health["ok"], health
        assert health["failed_count"] >= 1 and health["last_proof_ts"] is not None
        assert isinstance(health["pending"], int) and health["last_checkpoint"]["tree_size"] >= 1


def test_roles_idempotency_validation_and_health(node: NodeHarness, ledger: Ledger) -> None:
    asyncio.run(_api_rules(node.url, ledger))


async def _consistency(node: NodeHarness, ledger: Ledger) -> None:
    url = node.url
    async with aiohttp.ClientSession() as http:
        await _checkpoint(node)
        _, health = await _request(http, "GET", f"{url}/health/proofs", "admin")
        old = health["last_checkpoint"]["tree_size"]
        await _post_round(http, url, 1000)
        await _checkpoint(node)
        _, health = await _request(http, "GET", f"{url}/health/proofs", "admin")
        new = health["last_checkpoint"]["tree_size"]
        assert new > old
        status, answer = await _request(
            http, "GET", f"{url}/proofs/consistency?from={old}&to={new}", "service"
        )
        assert status == 200, answer
        keys = await (await http.get(f"{url}/keys", headers=auth("auditor"))).json()
        by_kid = {k["kid"]: k for k in keys["keys"]}
        for side, size in (("from", old), ("to", new)):
            statement = answer[side]["statement"]
            assert statement["tree_size"] == size
            key = by_kid[statement["signer_kid"]]
            signature = base64.b64decode(answer[side]["signature"])
            assert verify_signature(key["pem"], key["algorithm"], statement_digest(statement), signature)
        proof = [bytes.fromhex(p) for p in answer["proof"]]
        old_root = bytes.fromhex(answer["from"]["statement"]["root"])
        new_root = bytes.fromhex(answer["to"]["statement"]["root"])
        assert verify_consistency(old, new, old_root, new_root, proof)
        assert not verify_consistency(old, new, new_root, new_root, proof)
        status, answer = await _request(
            http, "GET", f"{url}/proofs/consistency?from={old}&to={new + 10**6}", "auditor"
        )
        assert status == 404 and answer["error"]["code"] == "NOT_FOUND", answer
        for query in (f"from={new}&to={old}", "from=x&to=2", "to=2"):
            status, answer = await _request(http, "GET", f"{url}/proofs/consistency?{query}", "auditor")
            assert status == 400 and answer["error"]["code"] == "VALIDATION_ERROR", (query, answer)


def test_consistency_between_two_checkpoints(node: NodeHarness, ledger: Ledger) -> None:
    asyncio.run(_consistency(node, ledger))


async def _tamper(dsn: str, journal_id: str, amount: int) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        changed = await conn.execute(
            "UPDATE journals SET body = convert_to(replace(convert_from(body, 'UTF8'), $2, $3), 'UTF8') "
            "WHERE journal_id = $1",
            journal_id,
            f'"amount_cents":{amount}',
            f'"amount_cents":{amount + 1}',
        )
        assert changed == "UPDATE 1"
    finally:
        await conn.close()


def test_zz_a_byte_changed_in_the_database_is_named(
    node: NodeHarness, ledger: Ledger, tmp_path: Path
) -> None:
    """Last in the module: it corrupts the stored ledger."""
    victim, amount = "prf-0010", 1010  # a single-shard journal
    asyncio.run(_tamper(node.dsn, victim, amount))
    _, data = asyncio.run(_proof(node.url, {"from_ts": ledger.start, "to_ts": ledger.end}))
    report = verify_package(data, ledger.pems)
    assert not report.ok and report.first_bad_journal == victim, report.to_dict()
    done = _cli(data, ledger.pems, tmp_path)
    assert done.returncode == 1 and victim in done.stdout, done.stdout + done.stderr
