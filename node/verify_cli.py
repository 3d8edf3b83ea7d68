"""`ledger-node verify`: check a proof package or an auditor export offline, with only files and keys.

    ledger-node verify PROOF_FILE --public-key PUB.pem [--public-key OLD.pem ...] [--json]
    ledger-node verify EXPORT_DIR --public-key PUB.pem     (a directory with manifest.json, or the
                                                           manifest itself: signature, every file's
                                                           SHA-256, the included proofs)

Prints one line per check and a verdict (or the report as JSON with ``--json``). Exit status: 0 when
the package verifies, 1 when verification failed, 2 when an input cannot be read (missing file,
unreadable or invalid PEM). Imports nothing beyond `signer` (no database, Ray or PKCS#11).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TextIO

from signer.export_verify import is_export_package, verify_export
from signer.verify import VerifyReport, load_trusted_key, verify_package

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_UNREADABLE = 2


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the `verify` subcommand on an argparse subparsers object."""
    parser = subparsers.add_parser(
        "verify",
        help="verify a proof package or an auditor export offline",
        description="Verify a Ledger Node proof package against trusted public keys (see docs/proofs.md).",
    )
    _add_arguments(parser)


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `verify`."""
    parser.add_argument(
        "proof_file", type=Path, metavar="PROOF_FILE", help="the proof package (JSON) or an export directory"
    )
    parser.add_argument(
        "--public-key",
        dest="public_keys",
        action="append",
        type=Path,
        required=True,
        metavar="PUB.pem",
        help="a trusted signer public key (PEM); repeat for rotated keys",
    )
    parser.add_argument("--json", dest="as_json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    """Run `verify` with parsed arguments; returns the exit status (0 ok, 1 failed, 2 unreadable)."""
    path = Path(args.proof_file)
    try:
        pems = [_read_key(Path(p)) for p in args.public_keys]
        data = b"" if is_export_package(path) else path.read_bytes()
    except (OSError, ValueError) as exc:
        print(f"ledger-node verify: {exc}", file=sys.stderr)
        return EXIT_UNREADABLE
    report = verify_export(path, pems) if is_export_package(path) else verify_package(data, pems)
    if getattr(args, "as_json", False):
        print(json.dumps(report.to_dict(), indent=2, sort_keys=True))
    else:
        _print_report(report, sys.stdout)
    return EXIT_OK if report.ok else EXIT_FAILED


def _read_key(path: Path) -> str:
    """PEM text of a public key file; `ValueError` if it is not a usable public key."""
    try:
        pem = path.read_text("ascii")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not a PEM file") from exc
    try:
        load_trusted_key(pem)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    return pem


def _marks(stream: TextIO) -> tuple[str, str]:
    """Pass/fail marks the stream can encode (✓/✗, or OK/FAIL on ASCII terminals)."""
    try:
        "\u2713\u2717".encode(stream.encoding or "ascii")
    except (UnicodeEncodeError, LookupError):
        return "OK  ", "FAIL"
    return "\u2713", "\u2717"


def _print_report(report: VerifyReport, stream: TextIO) -> None:
    """Human-readable report: one line per check, warnings, then the verdict."""
    good, bad = _marks(stream)
    for check in report.checks:
        print(f"{good if check.ok else bad} {check.name}: {check.detail}", file=stream)
    for warning in report.warnings:
        print(f"WARNING: {warning}", file=stream)
    counts = ", ".join(f"{v} {k}" for k, v in report.counts.items())
    if report.ok:
        print(f"VERIFIED: {counts}; signer {report.signer_kind}", file=stream)
        return
    failed = sum(1 for c in report.checks if not c.ok)
    what = "file" if any(c.name.startswith("file ") for c in report.checks) else "journal"
    blame = f"; first bad {what}: {report.first_bad_journal}" if report.first_bad_journal else ""
    print(f"NOT VERIFIED: {failed} failed check(s){blame}", file=stream)


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point: ``python -m node.verify_cli PROOF_FILE --public-key PUB.pem``."""
    parser = argparse.ArgumentParser(prog="ledger-node verify")
    _add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
