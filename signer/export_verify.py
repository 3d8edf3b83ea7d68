"""Offline verification of an auditor export package (a directory with `manifest.json`).

Checks, in order: the manifest decodes and is an export manifest; its signature verifies under a
trusted key whose kid is the manifest's `signer_kid` (over the SHA-256 of the statement's canonical
bytes, exactly as checkpoints are signed); every listed file exists with the listed size and SHA-256;
no file is in the directory that the manifest does not list; and the proof package (`proofs.json`,
when listed) verifies with `signer.verify.verify_package` and rests on the checkpoint the manifest
names. A failed check names the file. Imports nothing of the server.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Final

import msgspec

from signer.keys import verify_signature
from signer.package import signature_bytes
from signer.statements import statement_digest
from signer.verify import SOFTWARE_WARNING, Check, VerifyReport, load_trusted_key, verify_package

MANIFEST_TYPE: Final = "ledger-node/export-manifest/v1"
MANIFEST_FILE: Final = "manifest.json"
PROOFS_FILE: Final = "proofs.json"


class _Manifest(msgspec.Struct, forbid_unknown_fields=True):
    manifest: dict[str, Any]
    signature: str


def is_export_package(path: Path) -> bool:
    """True for a directory holding a manifest, or a manifest file itself."""
    return (path.is_dir() and (path / MANIFEST_FILE).is_file()) or path.name == MANIFEST_FILE


def _listed_files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def _check_signature(statement: dict[str, Any], signature: str, public_keys: list[str]) -> Check:
    kid = statement.get("signer_kid")
    for pem in public_keys:
        key = load_trusted_key(pem)
        if key.kid != kid:
            continue
        try:
            raw = signature_bytes(signature)
        except ValueError as exc:
            return Check("manifest signature", False, f"signature is not base64: {exc}")
        good = verify_signature(key.pem, key.algorithm, statement_digest(statement), raw)
        detail = f"signed by {kid}" if good else f"signature does not verify under {kid}"
        return Check("manifest signature", good, detail)
    return Check("manifest signature", False, f"signer_kid {kid!r} is not among the trusted keys")


def _check_files(root: Path, files: dict[str, Any]) -> list[Check]:
    checks: list[Check] = []
    for name in sorted(files):
        entry = files[name]
        path = root / name
        if ".." in Path(name).parts or not path.is_file():
            checks.append(Check(f"file {name}", False, "listed in the manifest but missing"))
            continue
        data = path.read_bytes()
        found = hashlib.sha256(data).hexdigest()
        if found != entry.get("sha256") or len(data) != entry.get("size"):
            checks.append(
                Check(f"file {name}", False, f"SHA-256 is {found}, the manifest says {entry.get('sha256')}")
            )
        else:
            checks.append(Check(f"file {name}", True, f"SHA-256 {found[:16]}... matches"))
    for extra in sorted(_listed_files(root) - set(files) - {MANIFEST_FILE}):
        checks.append(Check(f"file {extra}", False, "in the package but not listed in the manifest"))
    return checks


def _check_proofs(root: Path, statement: dict[str, Any], public_keys: list[str]) -> tuple[list[Check], Any]:
    if PROOFS_FILE not in statement.get("files", {}) or not (root / PROOFS_FILE).is_file():
        return [], None
    report = verify_package((root / PROOFS_FILE).read_bytes(), public_keys)
    checks = [Check(f"proofs: {c.name}", c.ok, c.detail) for c in report.checks]
    head = msgspec.json.decode((root / PROOFS_FILE).read_bytes()).get("checkpoint", {}).get("statement", {})
    want = statement.get("checkpoint") or {}
    same = head.get("tree_size") == want.get("tree_size") and head.get("root") == want.get("root")
    checks.append(
        Check(
            "proofs checkpoint",
            same,
            f"tree size {head.get('tree_size')}" if same else "proofs.json rests on another checkpoint",
        )
    )
    return checks, report


def verify_export(path: Path, public_keys: list[str]) -> VerifyReport:
    """Verify the export package at `path` (its directory or its manifest). Never raises."""
    root = path if path.is_dir() else path.parent
    checks: list[Check] = []
    warnings: list[str] = []
    counts: dict[str, int] = {}
    signer_kind: str | None = None
    try:
        doc = msgspec.json.decode((root / MANIFEST_FILE).read_bytes(), type=_Manifest)
        statement = doc.manifest
        if statement.get("type") != MANIFEST_TYPE or not isinstance(statement.get("files"), dict):
            checks.append(Check("manifest", False, f"not an export manifest ({MANIFEST_TYPE})"))
        else:
            checks.append(Check("manifest", True, f"export {statement.get('export_id')}"))
            signer_kind = statement.get("signer")
            checks.append(_check_signature(statement, doc.signature, public_keys))
            checks.extend(_check_files(root, statement["files"]))
            proof_checks, report = _check_proofs(root, statement, public_keys)
            checks.extend(proof_checks)
            if report is not None:
                counts.update(report.counts)
            counts["files"] = len(statement["files"])
            if signer_kind == "software":
                warnings.append(SOFTWARE_WARNING)
    except (OSError, ValueError, msgspec.DecodeError) as exc:
        checks.append(Check("manifest", False, f"cannot read {MANIFEST_FILE}: {exc}"))
    except Exception as exc:  # a verifier bug must fail closed
        checks.append(Check("internal error", False, f"verification aborted: {type(exc).__name__}: {exc}"))
    ok = bool(checks) and all(c.ok for c in checks)
    bad = next(
        (c.name.removeprefix("file ") for c in checks if not c.ok and c.name.startswith("file ")), None
    )
    return VerifyReport(ok, checks, bad, warnings, counts, signer_kind)
