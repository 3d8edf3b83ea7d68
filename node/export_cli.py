"""`ledger-node export FROM TO [--pii] [--out DIR]`: an auditor export through the running node.

The export needs the node's signer (the manifest is signed with the checkpoint key, which may live in
an HSM only the signer actor holds), so the command asks the node over HTTP, like `approve` and
`keys rotate`: `POST /exports/audit` (the node writes the package to its destination: a local
directory or S3 with Object Lock), then, with `--out DIR`, downloads every file the signed manifest
lists into `DIR/{export_id}/` (`GET /exports/{id}/files/{name}`) with a progress bar on stderr and
checks each file's SHA-256 against the manifest. Verify the copy with `ledger-node verify DIR/{id}`.
The node is `--url` (default `$LEDGER_URL`), the token `$LEDGER_TOKEN` (operator, auditor or admin).
Exit status: 0 exported, 1 failed (the node's error is printed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any, TextIO

BAR_WIDTH = 30
TIMEOUT_S = 600


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `export`."""
    export = subparsers.add_parser("export", help="export a range for auditors (signed package)")
    export.add_argument("from_ts", metavar="FROM", help="range start, RFC 3339 (e.g. 2026-11-01T00:00:00Z)")
    export.add_argument("to_ts", metavar="TO", help="range end, RFC 3339, not in the future")
    export.add_argument("--pii", action="store_true", help="include PII (default: stable pseudonyms)")
    export.add_argument("--out", type=Path, default=None, help="download the package into DIR/{export_id}/")
    export.add_argument(
        "--request-id", default=None, help="export id (default: a new one); replays answer it"
    )
    export.add_argument("--url", default=os.environ.get("LEDGER_URL"), help="the node (default $LEDGER_URL)")


def _request(url: str, method: str = "GET", body: dict[str, Any] | None = None) -> bytes:
    token = os.environ.get("LEDGER_TOKEN", "")
    request = urllib.request.Request(
        url,
        data=None if body is None else json.dumps(body).encode(),
        method=method,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
        data: bytes = response.read()
    return data


def progress_bar(done: int, total: int, label: str, stream: TextIO) -> None:
    """One redrawn line: `[#####.....] 3/10 label`."""
    filled = BAR_WIDTH * done // max(total, 1)
    stream.write(f"\r[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {done}/{total} {label[:40]:<40}")
    if done >= total:
        stream.write("\n")
    stream.flush()


def download(base: str, export_id: str, files: dict[str, Any], out: Path, stream: TextIO) -> Path:
    """Every listed file plus the manifest into `out/export_id/`, each checked against its SHA-256."""
    target = out / export_id
    names = [*sorted(files), "manifest.json"]
    for done, name in enumerate(names, start=1):
        quoted = urllib.parse.quote(name)
        data = _request(f"{base}/exports/{urllib.parse.quote(export_id)}/files/{quoted}")
        want = files.get(name, {}).get("sha256")
        if want is not None and hashlib.sha256(data).hexdigest() != want:
            raise ValueError(f"{name}: downloaded bytes do not match the manifest's SHA-256")
        path = target / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        progress_bar(done, len(names), name, stream)
    return target


def run(args: argparse.Namespace) -> int:
    """Export, optionally download; 0 on success, 1 with a message on failure."""
    if not args.url:
        print("ledger-node export: no node URL (--url or $LEDGER_URL)", file=sys.stderr)
        return 1
    base = args.url.rstrip("/")
    export_id = args.request_id or f"export-{uuid.uuid4().hex[:16]}"
    body = {"request_id": export_id, "from_ts": args.from_ts, "to_ts": args.to_ts, "pii_included": args.pii}
    try:
        print(f"exporting {args.from_ts} .. {args.to_ts} as {export_id} ...", file=sys.stderr, flush=True)
        answer = json.loads(_request(f"{base}/exports/audit", "POST", body))
        view = json.loads(_request(f"{base}/exports/{urllib.parse.quote(export_id)}"))["export"]
        print(f"exported {answer['files']} files to {answer['location']}")
        if args.out is not None:
            target = download(base, export_id, view["files"], args.out, sys.stderr)
            print(f"downloaded to {target} (check it with: ledger-node verify {target} --public-key PEM)")
    except urllib.error.HTTPError as exc:
        print(f"ledger-node export: HTTP {exc.code}: {exc.read().decode(errors='replace')}", file=sys.stderr)
        return 1
    except (OSError, ValueError, KeyError) as exc:
        print(f"ledger-node export: {exc}", file=sys.stderr)
        return 1
    return 0
