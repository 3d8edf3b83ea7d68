"""Unit tests of proof packages and the offline verifier (`signer.package`, `signer.verify`, the CLI)."""

from __future__ import annotations

import argparse
import base64
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from signer.canonical import PostedJournal, canonical, digest
from signer.keys import ED25519, SoftwareKeyBackend, kid_for_der, verify_signature
from signer.merkle import leaf_hash, root_from_leaf_hashes, verify_inclusion
from signer.package import BatchInput, PackageError, build_package, decode_package, time_range
from signer.statements import statement_digest
from signer.verify import VerifyReport, load_trusted_key, verify_package
from tests.support.proofs import SyntheticLedger, dict_bytes, make_ledger, package_bytes, package_dict

ROOT = Path(__file__).resolve().parents[2]
VECTORS = json.loads((ROOT / "tests" / "vectors" / "canonical.json").read_text("utf-8"))

Tamper = Callable[[dict[str, Any]], None]


@pytest.fixture(scope="module")
def ledger() -> SyntheticLedger:
    """60 journals over 3 shards; shard 2 is quiet in the middle of the run."""
    return make_ledger(journals=60, shards=3, batch_size=3, quiet_shard=2)


@pytest.fixture(scope="module")
def time_package(ledger: SyntheticLedger) -> bytes:
    """A valid package for the middle third of the ledger (by signing time)."""
    return package_bytes(ledger.package_for_time_range(*ledger.middle_time_range()))


def _verify(ledger: SyntheticLedger, data: bytes) -> VerifyReport:
    return verify_package(data, ledger.public_pems())


def _tampered(data: bytes, change: Tamper) -> bytes:
    pkg = package_dict(data)
    change(pkg)
    return dict_bytes(pkg)


def _failed(report: VerifyReport) -> list[str]:
    return [f"{c.name}: {c.detail}" for c in report.checks if not c.ok]


def _members(pkg: dict[str, Any]) -> list[dict[str, Any]]:
    return [b for b in pkg["batches"] if b["role"] == "member"]


def _assert_fails(report: VerifyReport, *needles: str) -> None:
    assert not report.ok
    text = "\n".join(_failed(report))
    for needle in needles:
        assert needle in text, f"{needle!r} not in failures:\n{text}"


def _name(batch: dict[str, Any]) -> str:
    stmt = batch["statement"]
    return f"batch {stmt['shard']}/{stmt['batch_seq']} (log {batch['log_index']}, {batch['role']})"


def _flip_b64(text: str) -> str:
    raw = bytearray(base64.b64decode(text))
    raw[len(raw) // 2] ^= 0x01
    return base64.b64encode(bytes(raw)).decode()


# --- valid packages ----------------------------------------------------------------------------------


def test_time_range_package_verifies(ledger: SyntheticLedger, time_package: bytes) -> None:
    """A fresh time-range package passes every check, with counts and the software warning."""
    report = _verify(ledger, time_package)
    assert report.ok, _failed(report)
    assert report.first_bad_journal is None
    assert report.counts["shards"] == 3 and report.counts["journals"] > 10
    assert report.signer_kind == "software"
    assert any("software" in w and "HSM" in w for w in report.warnings)
    names = [c.name for c in report.checks]
    assert names[:4] == ["trusted keys", "decode", "checkpoint statement", "checkpoint signature"]
    assert "shard 2" in names  # the quiet shard is covered by its straddling batches


def test_quiet_shard_is_covered_by_straddling_batches(ledger: SyntheticLedger, time_package: bytes) -> None:
    """A shard without member batches contributes its 'before' and 'after' batches, and no member."""
    shard2 = {
        (b["statement"]["batch_seq"], b["role"])
        for b in package_dict(time_package)["batches"]
        if b["statement"]["shard"] == 2
    }
    assert {role for _, role in shard2} == {"before", "after"}
    assert _verify(ledger, time_package).ok


def test_index_range_package_verifies(ledger: SyntheticLedger) -> None:
    """An index-range package (all members) verifies."""
    report = _verify(ledger, package_bytes(ledger.package_for_index_range(3, 11)))
    assert report.ok, _failed(report)
    assert report.counts["batches"] == 9


def test_whole_ledger_time_range_needs_no_boundaries(ledger: SyntheticLedger) -> None:
    """A range covering everything has only members and verifies."""
    pkg = ledger.package_for_time_range("2024-05-01T00:00:00Z", "2024-05-02T00:00:00Z")
    assert {b.role for b in pkg.batches} == {"member"}
    assert _verify(ledger, package_bytes(pkg)).ok


def test_ed25519_ledger_verifies() -> None:
    """Ed25519 signatures verify the same way."""
    ed = make_ledger(journals=20, shards=2, algorithm=ED25519)
    report = _verify(ed, package_bytes(ed.package_for_time_range(*ed.middle_time_range())))
    assert report.ok, _failed(report)


def test_encode_decode_round_trip(time_package: bytes) -> None:
    """decode then encode gives back the canonical bytes."""
    from signer.package import encode_package

    assert encode_package(decode_package(time_package)) == time_package


# --- tampering ---------------------------------------------------------------------------------------


def test_changed_journal_body_names_the_journal(ledger: SyntheticLedger, time_package: bytes) -> None:
    """One byte of one body changed: fails, and the first bad journal is that journal."""
    pkg = package_dict(time_package)
    victim = pkg["journals"][3]
    body = victim["body"]
    victim["body"] = body.replace('"amount_cents":', '"amount_cents":9', 1)
    report = _verify(ledger, dict_bytes(pkg))
    _assert_fails(report, f"journal {victim['journal_id']}", "SHA-256 of the body")
    assert report.first_bad_journal == victim["journal_id"]


def test_removed_journal_body_is_named(ledger: SyntheticLedger, time_package: bytes) -> None:
    """A member entry whose body is missing fails, naming the journal."""
    pkg = package_dict(time_package)
    removed = pkg["journals"].pop(5)["journal_id"]
    report = _verify(ledger, dict_bytes(pkg))
    _assert_fails(report, f"the body of journal {removed} is missing")
    assert report.first_bad_journal == removed


def test_removed_entry_fails(ledger: SyntheticLedger, time_package: bytes) -> None:
    """Dropping an entry leaves a seq gap and a wrong Merkle root."""

    def drop(pkg: dict[str, Any]) -> None:
        del _members(pkg)[1]["entries"][1]

    _assert_fails(_verify(ledger, _tampered(time_package, drop)), "expected seq", "merkle root")


def test_swapped_entries_fail(ledger: SyntheticLedger, time_package: bytes) -> None:
    """Swapping two entries (their list positions) is caught."""

    def swap(pkg: dict[str, Any]) -> None:
        entries = _members(pkg)[0]["entries"]
        entries[0], entries[1] = entries[1], entries[0]

    _assert_fails(_verify(ledger, _tampered(time_package, swap)), "expected seq")


def test_swapped_entry_contents_fail(ledger: SyntheticLedger, time_package: bytes) -> None:
    """Swapping what two seqs point at (seq kept) breaks the chain and the Merkle root."""

    def swap(pkg: dict[str, Any]) -> None:
        a, b = _members(pkg)[0]["entries"][:2]
        for key in ("journal_id", "hash"):
            a[key], b[key] = b[key], a[key]

    report = _verify(ledger, _tampered(time_package, swap))
    _assert_fails(report, "chain", "merkle root")
    assert report.first_bad_journal is not None


def test_altered_prev_hash_names_the_journal(ledger: SyntheticLedger, time_package: bytes) -> None:
    """A prev_hash that does not link to the previous entry fails, naming that entry's journal."""
    pkg = package_dict(time_package)
    entry = _members(pkg)[0]["entries"][2]
    entry["prev_hash"] = "00" * 32
    report = _verify(ledger, dict_bytes(pkg))
    _assert_fails(report, "prev_hash")
    assert report.first_bad_journal == entry["journal_id"]


def test_prev_hash_across_member_batches_is_checked(ledger: SyntheticLedger, time_package: bytes) -> None:
    """The first entry of a member batch must link to the last entry of the previous member batch."""
    pkg = package_dict(time_package)
    second = [b for b in _members(pkg) if b["statement"]["shard"] == 0][1]
    second["entries"][0]["prev_hash"] = "11" * 32
    _assert_fails(_verify(ledger, dict_bytes(pkg)), "prev_hash")


def test_changed_batch_statement_fails(ledger: SyntheticLedger, time_package: bytes) -> None:
    """An inconsistent size is rejected; a consistent edit breaks the signature and the log proof."""

    def bad_size(pkg: dict[str, Any]) -> None:
        _members(pkg)[0]["statement"]["size"] += 1

    _assert_fails(_verify(ledger, _tampered(time_package, bad_size)), "size")

    def new_root(pkg: dict[str, Any]) -> None:
        _members(pkg)[0]["statement"]["root"] = "ab" * 32

    _assert_fails(
        _verify(ledger, _tampered(time_package, new_root)),
        "signature does not verify",
        "log inclusion",
        "merkle root",
    )


def test_flipped_batch_signature_fails(ledger: SyntheticLedger, time_package: bytes) -> None:
    """A flipped bit in a batch signature fails that batch's signature check."""

    def flip(pkg: dict[str, Any]) -> None:
        pkg["batches"][0]["signature"] = _flip_b64(pkg["batches"][0]["signature"])

    report = _verify(ledger, _tampered(time_package, flip))
    _assert_fails(report, "signature does not verify")
    assert [c.name for c in report.checks if not c.ok] == [
        f"{_name(package_dict(time_package)['batches'][0])} signature"
    ]


def test_flipped_checkpoint_signature_fails(ledger: SyntheticLedger, time_package: bytes) -> None:
    """A flipped bit in the checkpoint signature fails the checkpoint signature check."""

    def flip(pkg: dict[str, Any]) -> None:
        pkg["checkpoint"]["signature"] = _flip_b64(pkg["checkpoint"]["signature"])

    report = _verify(ledger, _tampered(time_package, flip))
    assert [c.name for c in report.checks if not c.ok] == ["checkpoint signature"]


def test_flipped_log_proof_node_fails(ledger: SyntheticLedger, time_package: bytes) -> None:
    """A changed node of a log inclusion proof fails that batch's inclusion."""

    def flip(pkg: dict[str, Any]) -> None:
        proof = pkg["batches"][2]["log_proof"]
        proof[0] = ("0" if proof[0][0] != "0" else "1") + proof[0][1:]

    _assert_fails(_verify(ledger, _tampered(time_package, flip)), "log inclusion", "proof does not place")


def test_wrong_public_key_fails(ledger: SyntheticLedger, time_package: bytes) -> None:
    """Keys the statements were not signed with are rejected by kid."""
    other = SoftwareKeyBackend(None).public_keys()[0].pem
    report = verify_package(time_package, [other])
    _assert_fails(report, "not among the trusted keys")


def test_no_public_key_fails_closed(time_package: bytes) -> None:
    """Without any trusted key nothing verifies."""
    _assert_fails(verify_package(time_package, []), "no trusted public key")


def test_missing_after_boundary_fails(ledger: SyntheticLedger, time_package: bytes) -> None:
    """Dropping the 'after' batch of a shard with members is caught at that end."""

    def drop(pkg: dict[str, Any]) -> None:
        pkg["batches"] = [
            b for b in pkg["batches"] if not (b["role"] == "after" and b["statement"]["shard"] == 0)
        ]

    _assert_fails(_verify(ledger, _tampered(time_package, drop)), "just after the range) is missing")


def test_missing_before_boundary_fails(ledger: SyntheticLedger, time_package: bytes) -> None:
    """Dropping the 'before' batch of a shard with members is caught at that end."""

    def drop(pkg: dict[str, Any]) -> None:
        pkg["batches"] = [
            b for b in pkg["batches"] if not (b["role"] == "before" and b["statement"]["shard"] == 1)
        ]

    _assert_fails(_verify(ledger, _tampered(time_package, drop)), "just before the range) is missing")


def test_dropped_shard_fails(ledger: SyntheticLedger, time_package: bytes) -> None:
    """Leaving out every batch of a shard the checkpoint lists is caught."""

    def drop(pkg: dict[str, Any]) -> None:
        pkg["batches"] = [b for b in pkg["batches"] if b["statement"]["shard"] != 2]

    _assert_fails(_verify(ledger, _tampered(time_package, drop)), "shard 2", "none in the package")


def test_dropped_member_batch_fails(ledger: SyntheticLedger, time_package: bytes) -> None:
    """Leaving out a member batch in the middle of a shard's run is a gap."""

    def drop(pkg: dict[str, Any]) -> None:
        victim = [b for b in _members(pkg) if b["statement"]["shard"] == 0][1]
        pkg["batches"].remove(victim)
        gone = {e["journal_id"] for e in victim["entries"]}
        kept = {e["journal_id"] for b in _members(pkg) for e in b["entries"]}
        pkg["journals"] = [j for j in pkg["journals"] if j["journal_id"] not in gone - kept]

    _assert_fails(_verify(ledger, _tampered(time_package, drop)), "does not follow")


def test_dropped_batch_of_index_range_fails(ledger: SyntheticLedger) -> None:
    """An index-range package missing one index fails the range check."""
    data = package_bytes(ledger.package_for_index_range(3, 11))

    def drop(pkg: dict[str, Any]) -> None:
        victim = pkg["batches"].pop(4)
        ids = {e["journal_id"] for e in victim["entries"]} - {
            e["journal_id"] for b in pkg["batches"] for e in b["entries"]
        }
        pkg["journals"] = [j for j in pkg["journals"] if j["journal_id"] not in ids]

    _assert_fails(_verify(ledger, _tampered(data, drop)), "range", "not all present")


def test_narrowed_time_range_fails(ledger: SyntheticLedger, time_package: bytes) -> None:
    """Claiming a narrower range than the members' signing times is caught."""

    def narrow(pkg: dict[str, Any]) -> None:
        pkg["range"]["to_ts"] = _members(pkg)[-1]["statement"]["signed_at"].replace("12:00", "11:59", 1)
        pkg["range"]["from_ts"] = "2024-05-01T11:00:00.000000Z"

    _assert_fails(_verify(ledger, _tampered(time_package, narrow)), "outside the range")


def test_unreferenced_journal_body_fails(ledger: SyntheticLedger, time_package: bytes) -> None:
    """A body no member entry names is rejected (named)."""

    def extra(pkg: dict[str, Any]) -> None:
        pkg["journals"].append({"journal_id": "zzz-extra", "body": '{"x":1}'})

    report = _verify(ledger, _tampered(time_package, extra))
    _assert_fails(report, "no member entry names it")
    assert report.first_bad_journal == "zzz-extra"


def test_signer_kind_must_match_checkpoint(ledger: SyntheticLedger, time_package: bytes) -> None:
    """Claiming an HSM in the package while the signed checkpoint says software fails."""

    def claim(pkg: dict[str, Any]) -> None:
        pkg["signer"]["kind"] = "pkcs11"

    _assert_fails(_verify(ledger, _tampered(time_package, claim)), "signed checkpoint says 'software'")


def test_rotation_needs_both_keys() -> None:
    """Batches signed by key 1 and the checkpoint by key 2 verify only with both PEMs."""
    rotated = make_ledger(journals=24, shards=2, rotate_before_checkpoint=True)
    key1, key2 = rotated.public_pems()
    data = package_bytes(rotated.package_for_time_range(*rotated.middle_time_range()))
    assert verify_package(data, [key1, key2]).ok
    only2 = verify_package(data, [key2])
    assert [c.name for c in only2.checks if not c.ok] and all(
        "signature" in c.name for c in only2.checks if not c.ok
    )
    assert not verify_package(data, [key1]).ok
    assert "checkpoint signature" in [c.name for c in verify_package(data, [key1]).checks if not c.ok]


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not json",
        b"[]",
        b'{"format":"ledger-node/proof-package/v1"}',
        b"\xff\xfe",
        b"[" * 5000,
    ],
)
def test_garbage_is_rejected_not_raised(ledger: SyntheticLedger, data: bytes) -> None:
    """Anything that is not a package fails the decode check."""
    report = _verify(ledger, data)
    assert not report.ok
    assert [c.name for c in report.checks if not c.ok] == ["decode"]


def test_unknown_field_and_non_canonical_are_rejected(ledger: SyntheticLedger, time_package: bytes) -> None:
    """Strict decoding: unknown fields and non-canonical encodings are malformed."""
    pkg = package_dict(time_package)
    pkg["extra"] = 1
    _assert_fails(_verify(ledger, dict_bytes(pkg)), "decode")
    pretty = json.dumps(package_dict(time_package), indent=1).encode()
    _assert_fails(_verify(ledger, pretty), "canonical form")
    with pytest.raises(PackageError):
        decode_package(pretty)


def test_body_for_another_journal_id_fails(ledger: SyntheticLedger) -> None:
    """A body whose journal_id differs from the entry's is named even if the hash matches."""
    pkg = ledger.package_for_index_range(0, 0)
    data = package_dict(pkg)
    member = data["batches"][0]
    body = data["journals"][0]["body"]
    entry = member["entries"][0]
    # rename the journal everywhere except inside the body: the hash still matches the body
    old = entry["journal_id"]
    for e in member["entries"]:
        if e["journal_id"] == old:
            e["journal_id"] = "aaa-renamed"
    data["journals"][0] = {"journal_id": "aaa-renamed", "body": body}
    data["journals"].sort(key=lambda j: j["journal_id"])
    report = _verify(ledger, dict_bytes(data))
    _assert_fails(report, "is journal")
    assert report.first_bad_journal == "aaa-renamed"


# --- builder -----------------------------------------------------------------------------------------


def test_build_package_requires_exact_journal_bodies(ledger: SyntheticLedger) -> None:
    """The builder refuses a member entry without its body, and a body no entry names."""
    batch = ledger.batches[0]
    common: dict[str, Any] = {
        "proof_id": "p",
        "generated_at": "2024-06-01T00:00:00Z",
        "range": time_range("2024-05-01T00:00:00Z", "2024-05-02T00:00:00Z"),
        "signer_kind": "software",
        "keys": ledger.keys,
        "checkpoint_statement": ledger.checkpoint_statement,
        "checkpoint_signature": ledger.checkpoint_signature,
        "batches": [
            BatchInput(
                batch.statement,
                batch.signature,
                batch.log_index,
                ledger.log.inclusion_proof(batch.log_index),
                "member",
                batch.entries,
            )
        ],
    }
    with pytest.raises(PackageError, match="missing"):
        build_package(**common, journals={})
    bodies = {jid: ledger.journals[jid] for _, jid, _, _ in batch.entries}
    with pytest.raises(PackageError, match="extra"):
        build_package(**common, journals={**bodies, "x": b"{}"})
    assert build_package(**common, journals=bodies).batches[0].role == "member"


# --- golden vectors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("vector", VECTORS["journals"], ids=lambda v: v["name"])
def test_canonical_vectors(vector: dict[str, Any]) -> None:
    """signer.canonical still produces the golden bytes and hashes."""
    journal = msgspec.convert(vector["journal"], PostedJournal)
    body = canonical(journal)
    assert body == vector["canonical"].encode("utf-8")
    assert canonical(vector["journal"]) == body
    assert digest(body).hex() == vector["sha256"]


def test_worked_example_vectors() -> None:
    """The docs' worked example: leaf hashes, batch root, statement digest, signatures, log root."""
    ex = VECTORS["example"]
    hashes = [bytes.fromhex(v["sha256"]) for v in VECTORS["journals"]]
    leaves = [leaf_hash(h) for h in hashes]
    assert [lf.hex() for lf in leaves] == ex["leaf_hashes"]
    assert root_from_leaf_hashes(leaves[:2]).hex() == ex["node_01"]
    assert root_from_leaf_hashes(leaves).hex() == ex["batch_root"] == ex["batch_statement"]["root"]
    assert canonical(ex["batch_statement"]).decode() == ex["batch_statement_canonical"]
    assert statement_digest(ex["batch_statement"]).hex() == ex["batch_statement_digest"]
    key = load_trusted_key(ex["public_pem"])
    assert key.kid == ex["kid"] == kid_for_der(ED25519, _der(ex["public_pem"]))
    sig = base64.b64decode(ex["batch_signature_b64"])
    assert verify_signature(ex["public_pem"], ED25519, bytes.fromhex(ex["batch_statement_digest"]), sig)
    log_leaf = leaf_hash(bytes.fromhex(ex["batch_statement_digest"]))
    assert log_leaf.hex() == ex["log_leaf_hash"] == ex["checkpoint_statement"]["root"]
    assert verify_inclusion(log_leaf, 0, 1, [], log_leaf)
    csig = base64.b64decode(ex["checkpoint_signature_b64"])
    assert statement_digest(ex["checkpoint_statement"]).hex() == ex["checkpoint_digest"]
    assert verify_signature(ex["public_pem"], ED25519, bytes.fromhex(ex["checkpoint_digest"]), csig)


def _der(pem: str) -> bytes:
    lines = [line for line in pem.strip().splitlines() if not line.startswith("-----")]
    return base64.b64decode("".join(lines))


# --- CLI ---------------------------------------------------------------------------------------------


def _cli_args(proof: Path, keys: list[Path], as_json: bool = False) -> argparse.Namespace:
    from node.verify_cli import add_parser

    parser = argparse.ArgumentParser(prog="ledger-node")
    add_parser(parser.add_subparsers(dest="command", required=True))
    argv = ["verify", str(proof)] + [a for k in keys for a in ("--public-key", str(k))]
    return parser.parse_args([*argv, "--json"] if as_json else argv)


@pytest.fixture()
def files(tmp_path: Path, ledger: SyntheticLedger, time_package: bytes) -> dict[str, Path]:
    """A good package, a tampered one, the signer's key, a bad PEM."""
    good = tmp_path / "good.json"
    good.write_bytes(time_package)
    bad = tmp_path / "bad.json"
    pkg = package_dict(time_package)
    pkg["journals"][0]["body"] = pkg["journals"][0]["body"].replace("USD", "EUR", 1)
    bad.write_bytes(dict_bytes(pkg))
    key = tmp_path / "pub.pem"
    key.write_text(ledger.public_pems()[0])
    junk = tmp_path / "junk.pem"
    junk.write_text("-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n")
    return {"good": good, "bad": bad, "key": key, "junk": junk, "missing": tmp_path / "missing.json"}


def test_cli_exit_codes(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """0 verified, 1 failed, 2 unreadable file or key."""
    from node.verify_cli import run

    assert run(_cli_args(files["good"], [files["key"]])) == 0
    out = capsys.readouterr().out
    assert "VERIFIED" in out and "WARNING" in out
    assert run(_cli_args(files["bad"], [files["key"]])) == 1
    out = capsys.readouterr().out
    assert "NOT VERIFIED" in out and "first bad journal: jrn-" in out
    assert run(_cli_args(files["missing"], [files["key"]])) == 2
    assert run(_cli_args(files["good"], [files["junk"]])) == 2
    assert run(_cli_args(files["good"], [files["missing"]])) == 2


def test_cli_json(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """--json prints the whole report as JSON."""
    from node.verify_cli import run

    assert run(_cli_args(files["bad"], [files["key"]], as_json=True)) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and report["first_bad_journal"].startswith("jrn-")
    assert {"name", "ok", "detail"} <= set(report["checks"][0])


def test_cli_subprocess_runs_without_server_dependencies(files: dict[str, Path]) -> None:
    """The verifier runs standalone and never imports asyncpg, ray or pkcs11."""
    code = (
        "import sys; from node.verify_cli import main; rc = main(sys.argv[1:]); "
        "bad = [m for m in ('asyncpg', 'ray', 'pkcs11') if m in sys.modules]; "
        "print('IMPORTED', bad); sys.exit(rc)"
    )
    argv = [sys.executable, "-c", code, str(files["good"]), "--public-key", str(files["key"])]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "IMPORTED []" in done.stdout
