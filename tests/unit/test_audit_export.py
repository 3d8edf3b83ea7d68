"""The pure parts of auditor exports: request checks, pseudonyms, JSON Lines, manifest verification."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from finance import audit_export as pure
from ledger.errors import Rejection
from signer.canonical import canonical
from signer.export_verify import MANIFEST_FILE, verify_export
from signer.keys import ECDSA_P256, _sign_with, kid_for_der
from signer.package import b64
from signer.statements import statement_digest

NOW = datetime(2026, 12, 1, tzinfo=UTC)
KEY = b"k" * 32


def _request(**changes: object) -> pure.ExportRequest:
    base: dict[str, object] = {
        "request_id": "x-1",
        "from_ts": "2026-11-01T00:00:00Z",
        "to_ts": "2026-11-30T00:00:00Z",
    }
    return pure.ExportRequest(**{**base, **changes})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"from_ts": "2026-11-30T00:00:00Z"}, "$.to_ts"),
        ({"from_ts": "nope"}, "$.from_ts"),
        ({"to_ts": "2026-13-01T00:00:00Z"}, "$.to_ts"),
        ({"to_ts": "2027-01-01T00:00:00Z"}, "$.to_ts"),
        ({"request_id": "a b"}, "$.request_id"),
    ],
)
def test_bad_requests_name_the_field(changes: dict[str, object], field: str) -> None:
    """Tried: equal ends, bad timestamps, a future end, a bad id -> VALIDATION_ERROR naming the field."""
    with pytest.raises(Rejection) as caught:
        pure.check_request(_request(**changes), NOW)
    assert caught.value.details["field"] == field


def test_pseudonyms_are_stable_keyed_and_only_replace_pii() -> None:
    """Tried: the same value under two keys of one record, two node keys, nested lists, nulls."""
    record = {
        "buyer": {"buyer_id": "b1", "address": "Main St 1", "vat_id": None},
        "lines": [{"evidence": {"buyer_address": "Main St 1", "rate": "0.19"}}],
        "email": "a@example.com",
    }
    out = pure.redact(record, KEY)
    assert out["buyer"]["buyer_id"] == "b1" and out["buyer"]["vat_id"] is None
    assert out["buyer"]["address"] == out["lines"][0]["evidence"]["buyer_address"]
    assert out["buyer"]["address"].startswith("pii:") and "Main St" not in str(out)
    assert out["lines"][0]["evidence"]["rate"] == "0.19"
    assert pure.redact(record, KEY) == out and pure.redact(record, b"other")["email"] != out["email"]
    assert pure.policy(True, KEY)(record) is record


def test_jsonl_gz_is_canonical_and_deterministic(tmp_path: Path) -> None:
    """Tried: the same records written twice give identical bytes, sorted keys, one line each."""
    outputs = []
    for name in ("a", "b"):
        with (tmp_path / name).open("wb") as sink:
            writer = pure.JsonlGzWriter(sink)
            writer.write({"b": 1, "a": [2]})
            writer.write({"z": None})
            writer.close()
        outputs.append((tmp_path / name).read_bytes())
    assert outputs[0] == outputs[1]
    assert pure.read_jsonl_gz(outputs[0]) == [{"a": [2], "b": 1}, {"z": None}]
    assert pure.jsonl_line({"b": 1, "a": 2}) == b'{"a":2,"b":1}\n'


def _package(tmp_path: Path) -> tuple[Path, str]:
    """A signed package of two files, as the node writes it (P-256 key, statement digest)."""
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    root = tmp_path / "pkg"
    (root / "invoices").mkdir(parents=True)
    files = {"payments.jsonl.gz": b"payments", "invoices/i.pdf": b"%PDF"}
    for name, data in files.items():
        (root / name).write_bytes(data)
    statement = pure.manifest_statement(
        export_id="x-1",
        request=pure.check_request(_request(), NOW),
        service="ledger-node",
        env="test",
        ts="2026-12-01T00:00:00Z",
        files={n: pure.file_entry(d) for n, d in files.items()},
        checkpoint=None,
    )
    statement |= {"signer_kid": kid_for_der(ECDSA_P256, der), "signer": "software"}
    signature = _sign_with(key, statement_digest(statement))
    (root / MANIFEST_FILE).write_bytes(pure.manifest_document(statement, b64(signature)))
    return root, pem.decode()


def test_manifest_fields_and_verification(tmp_path: Path) -> None:
    """Tried: a good package verifies; the manifest carries the seed's metadata and every file's hash."""
    root, pem = _package(tmp_path)
    statement = pure.msgspec.json.decode((root / MANIFEST_FILE).read_bytes())["manifest"]
    for field in ("service", "env", "pii_included", "pii_policy_version", "ts"):
        assert field in statement
    assert statement["files"]["payments.jsonl.gz"]["sha256"] == hashlib.sha256(b"payments").hexdigest()
    report = verify_export(root, [pem])
    assert report.ok, report.checks


@pytest.mark.parametrize("damage", ["change", "remove", "extra", "resign"])
def test_tampering_is_named(tmp_path: Path, damage: str) -> None:
    """Tried: a changed file, a missing file, an unlisted file, a manifest edited after signing."""
    root, pem = _package(tmp_path)
    if damage == "change":
        (root / "payments.jsonl.gz").write_bytes(b"paymentz")
    elif damage == "remove":
        (root / "invoices/i.pdf").unlink()
    elif damage == "extra":
        (root / "notes.txt").write_bytes(b"hi")
    else:
        doc = pure.msgspec.json.decode((root / MANIFEST_FILE).read_bytes())
        doc["manifest"]["pii_included"] = True
        (root / MANIFEST_FILE).write_bytes(canonical(doc))
    report = verify_export(root, [pem])
    assert not report.ok
    bad = [c.name for c in report.checks if not c.ok]
    expected = {
        "change": ["file payments.jsonl.gz"],
        "remove": ["file invoices/i.pdf"],
        "extra": ["file notes.txt"],
        "resign": ["manifest signature"],
    }[damage]
    assert bad == expected
