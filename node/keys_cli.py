"""`ledger-node keys rotate`: switch the signer to a new key.

With `--url` (or `LEDGER_URL`) it asks a running node (`POST /admin/keys/rotate`, admin token
from `LEDGER_TOKEN`), which creates the key in the HSM and signs with it from then on. Without
a URL it rotates offline with the node stopped, using the same configuration as `serve`
(`LEDGER_PKCS11_*`, or the software development key in the data directory).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

from signer.keys import SigningError, backend_from_env


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `keys rotate`."""
    keys = subparsers.add_parser("keys", help="manage signing keys")
    actions = keys.add_subparsers(dest="keys_command", required=True)
    rotate = actions.add_parser("rotate", help="create a new signing key and sign with it from now on")
    rotate.add_argument(
        "--url", default=os.environ.get("LEDGER_URL"), help="a running node (default $LEDGER_URL)"
    )
    rotate.add_argument("--data-dir", type=Path, default=Path(".ledger-data"))


def run(args: argparse.Namespace) -> int:
    """Rotate online (through the node) or offline; print the new key id."""
    if args.url:
        return _rotate_online(args.url.rstrip("/"))
    try:
        backend = backend_from_env(os.environ, (args.data_dir / "signer").resolve())
        key = backend.rotate()
        backend.close()
    except SigningError as exc:
        print(f"ledger-node keys rotate: {exc}", file=sys.stderr)
        return 1
    print(f"new signing key {key.kid} ({key.algorithm}); restart the node to publish it")
    return 0


def _rotate_online(url: str) -> int:
    token = os.environ.get("LEDGER_TOKEN", "")
    request = urllib.request.Request(
        f"{url}/admin/keys/rotate", data=b"{}", method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        print(
            f"ledger-node keys rotate: HTTP {exc.code}: {exc.read().decode(errors='replace')}",
            file=sys.stderr,
        )
        return 1
    except OSError as exc:
        print(f"ledger-node keys rotate: cannot reach {url}: {exc}", file=sys.stderr)
        return 1
    print(f"signing with new key {body['signer_kid']} ({body['signer']})")
    return 0
