"""A node whose signer is a real HSM: SoftHSM2 through PKCS#11 (python-pkcs11), over real HTTP.

The token is created by the test setup (tests/support/softhsm.py); the signer actor opens it by
label, generates its key inside the token and signs batch statements and checkpoints with
`CKM_ECDSA` over our SHA-256 digests. An auditor checks everything with only the published key.
Then one byte of one stored journal is changed in PostgreSQL and `ledger-node check` names it.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import asyncpg
import msgspec
import pytest

from signer.package import ProofPackage, encode_package
from tests.integration.test_signing import _check_audit
from tests.support.node import NodeHarness, accounts_on_shard, auth, journal
from tests.support.softhsm import create_token

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def hsm_node(ray_cluster: None) -> Iterator[NodeHarness]:
    """A 4-shard node signing through its own SoftHSM2 token."""
    token = create_token("ledger-node-hsm")
    env = {**token.env, "LEDGER_SIGNER_KEY_LABEL": "hsm-node-test"}
    harness = NodeHarness(signer_env=env).start()
    yield harness
    harness.stop()


async def _post_and_audit(node: NodeHarness) -> list[str]:
    debit, other = accounts_on_shard(0, 2, "asset:hsm0")
    (credit,) = accounts_on_shard(3, 1, "liability:hsm3")
    async with aiohttp.ClientSession() as http:
        health = await (await http.get(f"{node.url}/health")).json()
        assert health["signer"] == "pkcs11" and "warning" not in health
        bodies = [journal(f"hsm-{i}", debit, credit if i % 2 else other, 10 + i) for i in range(12)]
        answer = await (
            await http.post(f"{node.url}/ledger/post_batch", json={"journals": bodies}, headers=auth())
        ).json()
        assert all(r["ok"] for r in answer["results"]), answer
        assert node.node is not None and node.node.services is not None
        await node.node.services.signer.checkpoint()
        keys_body = await (await http.get(f"{node.url}/keys", headers=auth("auditor"))).json()
        keys = {k["kid"]: k for k in keys_body["keys"]}
        assert {k["kind"] for k in keys.values()} == {"pkcs11"}
        assert all(k["algorithm"] == "ecdsa-p256-sha256" for k in keys.values())
        for body in bodies:
            read = await (
                await http.get(f"{node.url}/ledger/{body['journal_id']}", headers=auth("auditor"))
            ).json()
            _check_audit(read["audit"], keys)
            assert read["audit"]["signer"] == "pkcs11"
    return [b["journal_id"] for b in bodies]


async def _proof_file(node: NodeHarness, directory: Path, name: str) -> tuple[Path, Path]:
    """Generate a proof of everything so far (auditor token), download it and the public key(s)."""
    assert node.node is not None and node.node.services is not None
    await node.node.services.signer.checkpoint()
    body = {"range": {"from_ts": "2000-01-01T00:00:00Z", "to_ts": "2100-01-01T00:00:00Z"}}
    async with aiohttp.ClientSession() as http:
        started = await (
            await http.post(f"{node.url}/proofs/generate", json=body, headers=auth("auditor"))
        ).json()
        assert started["ok"], started
        proof_id = started["proof_id"]
        for _ in range(300):
            proof = (await (await http.get(f"{node.url}/proofs/{proof_id}", headers=auth("auditor"))).json())[
                "proof"
            ]
            if proof["status"] != "generating":
                break
            await asyncio.sleep(0.1)
        assert proof["status"] == "ready", proof
        assert proof["signer"] == "pkcs11"
        package = await (
            await http.get(f"{node.url}/proofs/{proof_id}/package", headers=auth("auditor"))
        ).read()
        keys = (await (await http.get(f"{node.url}/keys", headers=auth("auditor"))).json())["keys"]
    package_path = directory / f"{name}.json"
    package_path.write_bytes(package)
    key_path = directory / f"{name}.pem"
    key_path.write_text("".join(k["pem"] for k in keys[:1]))
    return package_path, key_path


def _verify_cli(package: Path, key: Path) -> subprocess.CompletedProcess[str]:
    """The auditor's command: nothing but the package and the public key (the node is not consulted)."""
    return subprocess.run(
        [str(REPO / ".venv/bin/ledger-node"), "verify", str(package), "--public-key", str(key)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def _check_cli(dsn: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": dsn}
    return subprocess.run(
        [str(REPO / ".venv/bin/ledger-node"), "check"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_hsm_signed_journals_verify_and_tampering_is_named(hsm_node: NodeHarness, tmp_path: Path) -> None:
    """HSM signatures verify; a proof verifies offline; a byte changed in PostgreSQL is named by both
    `ledger-node check` and the verification of a fresh proof; a journal deleted from a package fails."""
    journal_ids = hsm_node.run(_post_and_audit(hsm_node))
    clean = _check_cli(hsm_node.dsn)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "signatures consistent" in clean.stdout
    package, key = hsm_node.run(_proof_file(hsm_node, tmp_path, "before"))
    verified = _verify_cli(package, key)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    data = json.loads(package.read_bytes())
    data["journals"] = [j for j in data["journals"] if j["journal_id"] != journal_ids[5]]
    cut = tmp_path / "cut.json"
    cut.write_bytes(encode_package(msgspec.convert(data, ProofPackage)))
    incomplete = _verify_cli(cut, key)
    assert incomplete.returncode == 1 and journal_ids[5] in incomplete.stdout, incomplete.stdout

    async def tamper() -> None:
        conn = await asyncpg.connect(hsm_node.dsn)
        try:
            # "amount_cents":13 -> "amount_cents":93 in the stored canonical body of hsm-3
            updated = await conn.execute(
                "UPDATE journals SET body = convert_to(replace(convert_from(body, 'UTF8'), "
                "'\"amount_cents\":13', '\"amount_cents\":93'), 'UTF8') WHERE journal_id = $1",
                journal_ids[3],
            )
            assert updated == "UPDATE 1"
        finally:
            await conn.close()

    asyncio.run(tamper())
    broken = _check_cli(hsm_node.dsn)
    assert broken.returncode == 1, broken.stdout
    assert f"hash_mismatch: {journal_ids[3]}" in broken.stdout
    fresh, key = hsm_node.run(_proof_file(hsm_node, tmp_path, "after"))
    refused = _verify_cli(fresh, key)
    assert refused.returncode == 1 and journal_ids[3] in refused.stdout, refused.stdout


def test_key_rotation_keeps_old_signatures_verifiable(hsm_node: NodeHarness) -> None:
    """`ledger-node keys rotate --url` creates a new key in the HSM; old and new signatures both verify."""

    async def flow() -> None:
        async with aiohttp.ClientSession() as http:
            before = {
                k["kid"]
                for k in (await (await http.get(f"{hsm_node.url}/keys", headers=auth())).json())["keys"]
            }
        env = {**os.environ, "LEDGER_TOKEN": "adm-token"}
        rotated = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "node.cli", "keys", "rotate", "--url", hsm_node.url],
            env=env, cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert rotated.returncode == 0, rotated.stderr
        debit, other = accounts_on_shard(1, 2, "asset:rot1")
        async with aiohttp.ClientSession() as http:
            keys_body = await (await http.get(f"{hsm_node.url}/keys", headers=auth("auditor"))).json()
            keys = {k["kid"]: k for k in keys_body["keys"]}
            new = set(keys) - before
            assert len(new) == 1 and new.pop() in rotated.stdout
            assert all(keys[kid]["retired_at"] for kid in before)
            answer = await http.post(
                f"{hsm_node.url}/ledger/post", json=journal("rot-1", debit, other), headers=auth()
            )
            assert answer.status == 200
            assert hsm_node.node is not None and hsm_node.node.services is not None
            await hsm_node.node.services.signer.checkpoint()
            for journal_id in ("rot-1", "hsm-0"):
                read = await (
                    await http.get(f"{hsm_node.url}/ledger/{journal_id}", headers=auth("auditor"))
                ).json()
                _check_audit(read["audit"], keys)
            latest = (await (await http.get(f"{hsm_node.url}/ledger/rot-1", headers=auth("auditor"))).json())[
                "audit"
            ]
            assert latest["signer_kid"] not in before

    hsm_node.run(flow())
