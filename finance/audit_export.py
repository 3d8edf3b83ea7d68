"""Auditor exports, the pure part: request checks, PII pseudonyms, canonical JSON Lines, the manifest.

An export package (docs/api.md "Auditor exports") is a set of files plus a signed manifest:

* `journals.jsonl.gz`, `invoices.jsonl.gz`, `payments.jsonl.gz`, `refunds.jsonl.gz`,
  `payouts.jsonl.gz`, `audit_events.jsonl.gz`: one canonical JSON object per line (sorted keys,
  compact, `signer.canonical`), gzip with mtime 0 so the same records give the same bytes;
* `invoices/{invoice_id}.pdf`: each exported invoice rendered by `finance/invoice_pdf.py`;
* `proofs.json`: the proof package of the range (`POST /proofs/generate`'s format) with the signed
  checkpoint it rests on;
* `manifest.json`: `{"manifest": statement, "signature": base64}` where the statement
  (`signer.export_verify.MANIFEST_TYPE`) carries `service, env, pii_included, pii_policy_version, ts`,
  the range, the checkpoint and the SHA-256 and size of every other file, and is signed by the
  node's signer key exactly like a checkpoint (over the SHA-256 of its canonical bytes).

PII policy `pii-v1` (`PII_POLICY_VERSION`): unless the request sets `pii_included`, every value under
a key in `PII_KEYS` anywhere in an invoice, payment, refund, payout or audit-event record (and in the
invoice shown on a PDF) is replaced by `pii:` + the first 24 hex digits of HMAC-SHA256(node PII key,
canonical JSON of the value). The same value gives the same pseudonym in every export of the node, so
an auditor can still join records. Journal bodies and the bodies inside `proofs.json` are exported
verbatim: they are signed, and the ledger names buyers and participants by id only.
"""

from __future__ import annotations

import gzip
import hashlib
import hmac
import io
import re
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import Any, Final

import msgspec

from ledger.errors import validation_error
from ledger.timestamps import parse_rfc3339
from signer.canonical import canonical
from signer.export_verify import MANIFEST_FILE, MANIFEST_TYPE

PII_POLICY_VERSION: Final = "pii-v1"
PII_KEYS: Final = frozenset(
    {
        "name",
        "email",
        "address",
        "phone",
        "vat_id",
        "tax_id",
        "buyer_name",
        "buyer_email",
        "buyer_address",
        "buyer_vat_id",
        "billing_address",
        "shipping_address",
        "ip_address",
    }
)
PSEUDONYM_PREFIX: Final = "pii:"
PSEUDONYM_HEX_CHARS: Final = 24
EXPORT_ID_PATTERN: Final = re.compile(r"^[A-Za-z0-9:._-]{1,120}$")
DATA_FILES: Final = ("journals", "invoices", "payments", "refunds", "payouts", "audit_events")
PROOFS_FILE: Final = "proofs.json"
PDF_DIR: Final = "invoices"


class ExportRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`POST /exports/audit` body (the seed's names)."""

    request_id: str
    from_ts: str
    to_ts: str
    pii_included: bool = False


class CheckedRequest(msgspec.Struct, frozen=True):
    """A request that passed `check_request`, with its parsed range."""

    export_id: str
    from_ts: str
    to_ts: str
    start: datetime
    end: datetime
    pii_included: bool

    def parameters(self) -> dict[str, Any]:
        """What identifies the export's content: compared when the same id comes again."""
        return {"from_ts": self.from_ts, "to_ts": self.to_ts, "pii_included": self.pii_included}


def check_request(request: ExportRequest, now: datetime) -> CheckedRequest:
    """VALIDATION_ERROR naming the field: id grammar, RFC 3339 times, from < to, to not in the future."""
    if not EXPORT_ID_PATTERN.fullmatch(request.request_id):
        raise validation_error("request_id must be 1-120 characters of [A-Za-z0-9:._-]", "$.request_id")
    start = parse_rfc3339(request.from_ts)
    if start is None:
        raise validation_error("from_ts must be an RFC 3339 timestamp", "$.from_ts")
    end = parse_rfc3339(request.to_ts)
    if end is None:
        raise validation_error("to_ts must be an RFC 3339 timestamp", "$.to_ts")
    if start >= end:
        raise validation_error("from_ts must be before to_ts", "$.to_ts")
    if end > now:
        raise validation_error("to_ts must not be in the future (an export is of a closed range)", "$.to_ts")
    return CheckedRequest(
        request.request_id, request.from_ts, request.to_ts, start, end, request.pii_included
    )


# -- pseudonyms -----------------------------------------------------------------------------------
def pseudonym(key: bytes, value: Any) -> str:
    """The stable pseudonym of a PII value under the node's key."""
    mac = hmac.new(key, canonical(value), hashlib.sha256).hexdigest()
    return PSEUDONYM_PREFIX + mac[:PSEUDONYM_HEX_CHARS]


def redact(value: Any, key: bytes) -> Any:
    """A copy of a JSON-like value with every non-null value under a PII key pseudonymised."""
    if isinstance(value, dict):
        return {
            k: (pseudonym(key, v) if k in PII_KEYS and v is not None else redact(v, key))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [redact(v, key) for v in value]
    return value


def policy(pii_included: bool, key: bytes) -> Callable[[Any], Any]:
    """The record transformation an export applies: identity with PII, `redact` without."""
    if pii_included:
        return lambda record: record
    return lambda record: redact(record, key)


# -- files ----------------------------------------------------------------------------------------
def jsonl_line(record: Mapping[str, Any]) -> bytes:
    """One canonical JSON Lines record."""
    return canonical(record) + b"\n"


class JsonlGzWriter:
    """Writes canonical records into a deterministic gzip stream (mtime 0, no file name)."""

    def __init__(self, sink: io.BufferedIOBase) -> None:
        self.gzip = gzip.GzipFile(filename="", mode="wb", fileobj=sink, mtime=0)
        self.records = 0

    def write(self, record: Mapping[str, Any]) -> None:
        """Append one record."""
        self.gzip.write(jsonl_line(record))
        self.records += 1

    def close(self) -> None:
        """Finish the gzip member (the sink stays open)."""
        self.gzip.close()


def read_jsonl_gz(data: bytes) -> list[Any]:
    """The records of a `.jsonl.gz` file (for tests and tools)."""
    text = gzip.decompress(data)
    return [msgspec.json.decode(line) for line in text.splitlines() if line]


def pdf_name(invoice_id: str) -> str:
    """The package path of an invoice's PDF (invoice ids are `[A-Za-z0-9:._-]`; `:` becomes `_`)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", invoice_id)
    return f"{PDF_DIR}/{safe}.pdf"


def file_entry(data: bytes, records: int | None = None) -> dict[str, Any]:
    """A manifest file entry: SHA-256, size and (for JSON Lines) the record count."""
    entry: dict[str, Any] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    if records is not None:
        entry["records"] = records
    return entry


def manifest_statement(
    *,
    export_id: str,
    request: CheckedRequest,
    service: str,
    env: str,
    ts: str,
    files: Mapping[str, Mapping[str, Any]],
    checkpoint: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The statement the signer signs for an export (it adds `signer_kid` and `signer`)."""
    if MANIFEST_FILE in files:
        raise ValueError("the manifest cannot list itself")
    return {
        "type": MANIFEST_TYPE,
        "export_id": export_id,
        "service": service,
        "env": env,
        "pii_included": request.pii_included,
        "pii_policy_version": PII_POLICY_VERSION,
        "ts": ts,
        "range": {"from_ts": request.from_ts, "to_ts": request.to_ts},
        "hash_alg": "sha256",
        "checkpoint": dict(checkpoint) if checkpoint is not None else None,
        "files": {name: dict(files[name]) for name in sorted(files)},
    }


def manifest_document(statement: Mapping[str, Any], signature_b64: str) -> bytes:
    """The bytes of `manifest.json`: the signed statement and its signature, canonical JSON."""
    return canonical({"manifest": dict(statement), "signature": signature_b64})


def ordered_files(names: Iterable[str]) -> list[str]:
    """Publication order: data files first, the manifest strictly last."""
    return [*sorted(n for n in names if n != MANIFEST_FILE), MANIFEST_FILE]
