"""`ledger-node export-journal`: fetch an accounting export from a running node into a file.

    ledger-node export-journal [--url URL] [--from DATE] [--to DATE] [--format generic|xero|quickbooks]
                       [--currency CCY] --out PATH

Calls `GET /finance/exports/journal.csv` (api/accounting_export_routes.py) with the operator or
auditor token from `LEDGER_TOKEN`; `--url` defaults to `LEDGER_URL`. Without `--from`/`--to` it
exports yesterday (UTC), which is what the Kubernetes CronJob runs each night. `--out` may contain
`{from}`, replaced by the window's first day. The file is written only when the node answered 200.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

FORMATS = ("generic", "xero", "quickbooks")
TIMEOUT_S = 300


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `export-journal`."""
    export = subparsers.add_parser(
        "export-journal", help="fetch an accounting export (journal CSV) from a node"
    )
    export.add_argument("--url", default=os.environ.get("LEDGER_URL"), help="the node (default $LEDGER_URL)")
    export.add_argument("--from", dest="start", type=dt.date.fromisoformat, default=None)
    export.add_argument("--to", dest="end", type=dt.date.fromisoformat, default=None)
    export.add_argument("--format", choices=FORMATS, default="generic")
    export.add_argument("--currency", default=None)
    export.add_argument("--out", required=True, help="file to write; {from} is the window's first day")


def window(start: dt.date | None, end: dt.date | None, today: dt.date) -> tuple[dt.date, dt.date]:
    """The export window `[from, to)`: yesterday by default; `to` defaults to the day after `from`."""
    first = start or (end or today) - dt.timedelta(days=1)
    return first, end or first + dt.timedelta(days=1)


def run(args: argparse.Namespace) -> int:
    """Fetch the export and write it to `--out`; 0 on success, 1 on any failure."""
    if not args.url:
        print("ledger-node export-journal: --url or LEDGER_URL is required", file=sys.stderr)
        return 2
    first, end = window(args.start, args.end, dt.datetime.now(dt.UTC).date())
    query = {"from": first.isoformat(), "to": end.isoformat(), "format": args.format}
    if args.currency:
        query["currency"] = args.currency
    url = f"{args.url.rstrip('/')}/finance/exports/journal.csv?{urllib.parse.urlencode(query)}"
    token = os.environ.get("LEDGER_TOKEN", "")
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        print(f"ledger-node export-journal: HTTP {exc.code}: {detail}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"ledger-node export-journal: {url}: {exc}", file=sys.stderr)
        return 1
    out = Path(args.out.replace("{from}", first.isoformat()))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(body)
    print(f"exported {first}..{end} ({args.format}, {len(body)} bytes) to {out}")
    return 0
