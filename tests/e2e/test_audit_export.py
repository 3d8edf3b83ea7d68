"""Auditor exports over real HTTP, Ray and PostgreSQL, checked offline the way an auditor would.

A small history (a royalty participant with a name, an invoice to a buyer with an address and a VAT
id, a payment, a refund) is exported to the node's local directory (over HTTP and with `ledger-node
export --out`) and to S3 with Object Lock (a moto server on loopback), then verified with `ledger-node
verify`; a tampered file is named by the verifier. Replays, conflicts, bad input, PII pseudonyms and
a failing destination are covered too.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
from pypdf import PdfReader

from api.export_routes import EXPORTER
from finance.audit_export import PII_POLICY_VERSION, read_jsonl_gz
from ledger.timestamps import rfc3339
from signer.export_verify import verify_export
from tests.e2e.test_errors import Client, expect_error, expect_ok, run
from tests.support.node import TOKENS, NodeHarness

ROOT = Path(__file__).resolve().parents[2]
BUYER_ADDRESS = "Exportstrasse 7, Berlin"
BUYER_VAT = "DE999888777"
PARTICIPANT_NAME = "Alice Exportwell"
BUCKET = "audit-archive"
RETENTION_DAYS = 3


@dataclasses.dataclass
class History:
    """The module's range and the trusted keys."""

    from_ts: str
    to_ts: str
    pems: list[str]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    """A moto S3 server on loopback with an Object Lock bucket; AWS credentials for the node's client."""
    from moto.server import ThreadedMotoServer

    saved = {
        k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    }
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1"
    )
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    _s3(url).create_bucket(Bucket=BUCKET, ObjectLockEnabledForBucket=True)
    yield url
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _s3(url: str) -> Any:
    return boto3.client("s3", endpoint_url=url, region_name="us-east-1")


async def _history(c: Client) -> None:
    body = {"participant_id": "exp-alice", "name": PARTICIPANT_NAME, "stripe_account": "acct_expalice"}
    expect_ok(await c.call("POST", "/finance/participants", body=body), 201)
    buyer = {"buyer_id": "exp-acme", "country": "DE", "vat_id": BUYER_VAT, "address": BUYER_ADDRESS}
    invoice = {
        "invoice_id": "exp-inv-1",
        "buyer": buyer,
        "currency": "EUR",
        "line_items": [{"sku": "exp-course", "qty": 1, "unit_price": 10000, "tax_code": "standard"}],
    }
    total = expect_ok(await c.call("POST", "/finance/invoice", body=invoice), 201)["total"]
    money = {"invoice_id": "exp-inv-1", "currency": "EUR", "payment_provider": "exppay"}
    pay = {**money, "amount": total, "provider_reference": "exp-p1"}
    expect_ok(await c.call("POST", "/finance/payment", body=pay))
    expect_ok(
        await c.call("POST", "/finance/refund", body={**money, "amount": 500, "provider_reference": "exp-r1"})
    )


@pytest.fixture(scope="module")
def history(node: NodeHarness) -> History:
    """Post the history once; the range covers it and ends in the past."""
    start = rfc3339(datetime.now(UTC) - timedelta(seconds=1))
    pems: list[str] = []

    async def flow(c: Client) -> None:
        await _history(c)
        keys = expect_ok(await c.call("GET", "/keys", role="auditor"))
        pems.extend(k["pem"] for k in keys["keys"])

    run(node, flow)
    time.sleep(0.3)  # the audit events of the history are committed and checkpointed
    return History(start, rfc3339(datetime.now(UTC)), pems)


def _exporter(node: NodeHarness) -> Any:
    assert node.node is not None and node.node.app is not None
    return node.node.app[EXPORTER]


def _export(node: NodeHarness, body: dict[str, Any], role: str = "auditor") -> Any:
    out: list[Any] = []

    async def flow(c: Client) -> None:
        out.append(await c.call("POST", "/exports/audit", body=body, role=role))
        if out[0].body["ok"]:
            out.append(
                expect_ok(await c.call("GET", f"/exports/{body['request_id']}", role="auditor"))["export"]
            )
        else:
            out.append(await c.call("GET", f"/exports/{body.get('request_id', 'none')}", role="auditor"))

    run(node, flow)
    return out


def _keys(pems: list[str], tmp: Path) -> list[str]:
    args: list[str] = []
    for number, pem in enumerate(pems):
        path = tmp / f"signer-{number}.pem"
        path.write_text(pem)
        args += ["--public-key", str(path)]
    return args


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`ledger-node ...` from this worktree."""
    return subprocess.run(
        [sys.executable, "-m", "node.cli", *args],
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )


def _texts(package: Path) -> dict[str, str]:
    """Every file's content as text: JSON Lines decompressed, PDFs through their text layer."""
    texts: dict[str, str] = {}
    for path in sorted(p for p in package.rglob("*") if p.is_file()):
        data = path.read_bytes()
        name = path.relative_to(package).as_posix()
        if path.name.endswith(".gz"):
            texts[name] = gzip.decompress(data).decode()
        elif path.suffix == ".pdf":
            texts[name] = "\n".join(page.extract_text() for page in PdfReader(io.BytesIO(data)).pages)
        else:
            texts[name] = data.decode()
    return texts


def _files_with(package: Path, needle: str) -> list[str]:
    return [name for name, text in _texts(package).items() if needle in text]


def test_local_export_round_trip_verify_and_tamper(
    node: NodeHarness, history: History, tmp_path: Path
) -> None:
    """Tried: POST /exports/audit to the local directory, GET /exports/{id}, `ledger-node verify` on the
    package, `ledger-node export --out` (progress bar, download, verify), then one changed byte in a
    copied file -> verify fails naming that file."""
    body = {"request_id": "exp-local-1", "from_ts": history.from_ts, "to_ts": history.to_ts}
    reply, view = _export(node, body)
    answer = expect_ok(reply)
    assert answer["export_id"] == "exp-local-1" and answer["status"] == "completed"
    package = Path(answer["location"])
    assert package == _exporter(node).settings.root / "exp-local-1" and package.is_dir()
    assert answer["s3_path"] is None
    assert view["status"] == "completed" and view["location"] == str(package)
    files = view["files"]
    for name in ("journals", "invoices", "payments", "refunds", "payouts", "audit_events"):
        assert f"{name}.jsonl.gz" in files, files
    assert "invoices/exp-inv-1.pdf" in files and "proofs.json" in files
    manifest = view["manifest"]
    for field in ("service", "env", "pii_included", "pii_policy_version", "ts", "signer_kid", "signer"):
        assert field in manifest, field
    assert manifest["pii_included"] is False and manifest["pii_policy_version"] == PII_POLICY_VERSION
    assert manifest["files"] == files
    journals = read_jsonl_gz((package / "journals.jsonl.gz").read_bytes())
    assert "exp-inv-1.issue" in {j["journal_id"] for j in journals}
    assert files["journals.jsonl.gz"]["records"] == len(journals) > 0
    payments = read_jsonl_gz((package / "payments.jsonl.gz").read_bytes())
    assert [p["provider_reference"] for p in payments] == ["exp-p1"]
    assert any(
        e["event_type"] == "invoice.created"
        for e in read_jsonl_gz((package / "audit_events.jsonl.gz").read_bytes())
    )
    assert verify_export(package, history.pems).ok
    keys = _keys(history.pems, tmp_path)
    done = _cli("verify", str(package), *keys)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "VERIFIED" in done.stdout
    # the CLI export: progress bar on stderr, the downloaded package verifies
    out = tmp_path / "out"
    env = {"LEDGER_TOKEN": TOKENS["auditor"]}
    done = _cli("export", history.from_ts, history.to_ts, "--out", str(out), "--url", node.url,
                "--request-id", "exp-cli-1", env=env)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "] " in done.stderr and "manifest.json" in done.stderr
    assert _cli("verify", str(out / "exp-cli-1"), *keys).returncode == 0
    # tamper with one byte of one file in a copy
    copy = tmp_path / "tampered"
    shutil.copytree(package, copy)
    target = copy / "payments.jsonl.gz"
    target.chmod(0o644)
    data = bytearray(target.read_bytes())
    data[-5] ^= 0x01
    target.write_bytes(bytes(data))
    done = _cli("verify", str(copy), *keys)
    assert done.returncode == 1, done.stdout
    assert "payments.jsonl.gz" in done.stdout and "NOT VERIFIED" in done.stdout
    report = verify_export(copy, history.pems)
    assert not report.ok and report.first_bad_journal == "payments.jsonl.gz"


def test_replay_returns_original_and_other_parameters_conflict(node: NodeHarness, history: History) -> None:
    """Tried: the same request_id twice (same answer, files untouched, one export.audit audit event),
    then with pii_included true and with another range -> 409 IDEMPOTENCY_CONFLICT."""
    body = {"request_id": "exp-replay-1", "from_ts": history.from_ts, "to_ts": history.to_ts}
    first, view = _export(node, body)
    first_answer = expect_ok(first)
    manifest_bytes = (Path(first_answer["location"]) / "manifest.json").read_bytes()
    again, view_again = _export(node, body)
    assert expect_ok(again) == first_answer and view_again["manifest"] == view["manifest"]
    assert (Path(first_answer["location"]) / "manifest.json").read_bytes() == manifest_bytes
    earlier = rfc3339(datetime.fromisoformat(history.from_ts) - timedelta(seconds=1))
    for changed in ({**body, "pii_included": True}, {**body, "from_ts": earlier}):
        expect_error(_export(node, changed)[0], 409, "IDEMPOTENCY_CONFLICT")
    time.sleep(0.3)  # the audit writer commits the event right after the answer
    events: list[Any] = []

    async def flow(c: Client) -> None:
        reply = await c.call("GET", "/audit/events", role="auditor", params={"limit": "1000"})
        events.extend(expect_ok(reply)["events"])

    run(node, flow)
    mine = [
        e for e in events if e["event_type"] == "export.audit" and e["payload"]["export_id"] == "exp-replay-1"
    ]
    assert len(mine) == 1, mine


def test_bad_input_names_the_field(node: NodeHarness, history: History) -> None:
    """Tried: from_ts == to_ts, from_ts after to_ts, a malformed timestamp, to_ts in the future, an
    unknown field, a missing request_id -> 400 VALIDATION_ERROR naming the field; a service token -> 403."""
    base = {"request_id": "exp-bad", "from_ts": history.from_ts, "to_ts": history.to_ts}
    future = rfc3339(datetime.now(UTC) + timedelta(days=1))
    cases = [
        ({**base, "to_ts": history.from_ts}, "$.to_ts"),
        ({**base, "from_ts": history.to_ts, "to_ts": history.from_ts}, "$.to_ts"),
        ({**base, "from_ts": "yesterday"}, "$.from_ts"),
        ({**base, "to_ts": future}, "$.to_ts"),
        ({**base, "destination": "ftp"}, "$.destination"),
        ({k: v for k, v in base.items() if k != "request_id"}, "$.request_id"),
        ({**base, "request_id": "bad id/with slash"}, "$.request_id"),
    ]
    for body, field in cases:
        expect_error(_export(node, body)[0], 400, "VALIDATION_ERROR", field)
    expect_error(_export(node, base, role="service")[0], 403, "NOT_AUTHORIZED")

    async def flow(c: Client) -> None:
        expect_error(await c.call("GET", "/exports/exp-bad", role="auditor"), 404, "NOT_FOUND")

    run(node, flow)


def test_pii_pseudonymised_by_default_and_included_when_asked(node: NodeHarness, history: History) -> None:
    """Tried: an export without pii_included (no buyer address or VAT id in any file, PDFs included;
    no participant name in the data files; the same pseudonym in two exports) and one with it."""
    plain, _ = _export(
        node, {"request_id": "exp-pii-off", "from_ts": history.from_ts, "to_ts": history.to_ts}
    )
    second, _ = _export(
        node, {"request_id": "exp-pii-off-2", "from_ts": history.from_ts, "to_ts": history.to_ts}
    )
    package = Path(expect_ok(plain)["location"])
    assert _files_with(package, BUYER_ADDRESS) == [] and _files_with(package, BUYER_VAT) == []
    assert [n for n in _files_with(package, PARTICIPANT_NAME) if n.endswith(".jsonl.gz")] == []
    invoice = read_jsonl_gz((package / "invoices.jsonl.gz").read_bytes())[0]
    assert invoice["buyer"]["buyer_id"] == "exp-acme" and invoice["buyer"]["address"].startswith("pii:")
    other = read_jsonl_gz((Path(expect_ok(second)["location"]) / "invoices.jsonl.gz").read_bytes())[0]
    assert other["buyer"]["address"] == invoice["buyer"]["address"]
    assert verify_export(package, history.pems).ok
    with_pii, view = _export(
        node,
        {
            "request_id": "exp-pii-on",
            "from_ts": history.from_ts,
            "to_ts": history.to_ts,
            "pii_included": True,
        },
    )
    package = Path(expect_ok(with_pii)["location"])
    assert view["manifest"]["pii_included"] is True
    assert {"invoices.jsonl.gz", "invoices/exp-inv-1.pdf"} <= set(_files_with(package, BUYER_ADDRESS))
    assert {"invoices.jsonl.gz", "invoices/exp-inv-1.pdf"} <= set(_files_with(package, BUYER_VAT))
    assert "audit_events.jsonl.gz" in _files_with(package, PARTICIPANT_NAME)


def _use_s3(node: NodeHarness, url: str, bucket: str) -> Any:
    exporter = _exporter(node)
    before = exporter.settings
    exporter.settings = dataclasses.replace(
        before, s3_bucket=bucket, s3_endpoint_url=url, retention_days=RETENTION_DAYS, s3_prefix="prod"
    )
    return before


def test_s3_object_lock_and_verify_after_download(
    node: NodeHarness, history: History, moto_url: str, tmp_path: Path
) -> None:
    """Tried: an export to S3 (moto): every object has COMPLIANCE retention until about now + the
    configured days (head_object and get_object), GET /ready checks the bucket, and the downloaded
    package verifies with `ledger-node verify`."""
    before = _use_s3(node, moto_url, BUCKET)
    try:
        started = datetime.now(UTC)
        reply, view = _export(
            node, {"request_id": "exp-s3-1", "from_ts": history.from_ts, "to_ts": history.to_ts}
        )
        answer = expect_ok(reply)
        assert answer["s3_path"] == f"s3://{BUCKET}/prod/exp-s3-1/" == answer["location"]

        async def ready(c: Client) -> None:
            body = expect_ok(await c.call("GET", "/ready", role=None))
            assert body["exports"]["ok"] is True and body["exports"]["kind"] == "s3"

        run(node, ready)
    finally:
        _exporter(node).settings = before
    s3 = _s3(moto_url)
    listed = s3.list_objects_v2(Bucket=BUCKET, Prefix="prod/exp-s3-1/")["Contents"]
    names = {o["Key"].removeprefix("prod/exp-s3-1/") for o in listed}
    assert names == {*view["files"], "manifest.json"}
    low, high = started + timedelta(days=RETENTION_DAYS - 1), started + timedelta(days=RETENTION_DAYS + 1)
    target = tmp_path / "exp-s3-1"
    for obj in listed:
        head = s3.head_object(Bucket=BUCKET, Key=obj["Key"])
        assert head["ObjectLockMode"] == "COMPLIANCE", obj["Key"]
        assert low < head["ObjectLockRetainUntilDate"] < high, head["ObjectLockRetainUntilDate"]
        got = s3.get_object(Bucket=BUCKET, Key=obj["Key"])  # moto 5.2 lacks GetObjectRetention
        assert got["ObjectLockMode"] == "COMPLIANCE" and low < got["ObjectLockRetainUntilDate"] < high
        path = target / obj["Key"].removeprefix("prod/exp-s3-1/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(got["Body"].read())
    done = _cli("verify", str(target), *_keys(history.pems, tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr


def test_s3_failure_is_audit_export_error_with_nothing_reported(
    node: NodeHarness, history: History, moto_url: str
) -> None:
    """Tried: an export to a bucket that does not exist -> 500 AUDIT_EXPORT_ERROR, GET /exports/{id}
    shows it failed with no location, files or manifest, and GET /ready answers 503 naming exports."""
    before = _use_s3(node, moto_url, "no-such-bucket")
    try:
        body = {"request_id": "exp-s3-fail", "from_ts": history.from_ts, "to_ts": history.to_ts}
        reply, shown = _export(node, body)
        expect_error(reply, 500, "AUDIT_EXPORT_ERROR")
        export = expect_ok(shown)["export"]
        assert export["status"] == "failed" and export["error"]["code"] == "AUDIT_EXPORT_ERROR"
        assert export["location"] is None and export["files"] is None and export["manifest"] is None

        async def ready(c: Client) -> None:
            details = expect_error(await c.call("GET", "/ready", role=None), 503, "SERVICE_UNAVAILABLE")
            assert details["exports"]["ok"] is False

        run(node, ready)
    finally:
        _exporter(node).settings = before
    assert not (_exporter(node).settings.root / "exp-s3-fail").exists()
    leftovers = list((_exporter(node).settings.root / ".staging").iterdir())
    assert leftovers == []
