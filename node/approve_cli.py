"""`ledger-node approve ACTION_ID --key approver.pem`: sign a gated action and submit the approval.

The command reads the action from the node (`GET /finance/approvals/{id}`), shows what it is
about to approve (kind, amount, parameters, expiry), rebuilds the statement from the action's
parameters itself (so it signs what it was shown, not bytes it was handed), signs it with the
approver's private key (PEM, Ed25519 or P-256; `--password-env` names a variable holding the
key's passphrase) and posts `{approver_id, signature}`. `--dry-run` prints the signature
without posting; `--out FILE` writes an approval file instead of posting (JSON
`{format, action_id, approver_id, params_hash, signature}`), which the operator console uploads.
The node is `--url` (default `$LEDGER_URL`), the caller's token `$LEDGER_TOKEN` (an operator or
admin token).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from finance.multisig import PrivateKey, sign_statement, statement_for


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `approve`."""
    approve = subparsers.add_parser("approve", help="sign and submit an approval for a gated action")
    approve.add_argument("action_id")
    approve.add_argument("--key", type=Path, required=True, help="the approver's private key (PEM)")
    approve.add_argument("--approver-id", required=True, help="the approver id the key is registered under")
    approve.add_argument("--url", default=os.environ.get("LEDGER_URL"), help="the node (default $LEDGER_URL)")
    approve.add_argument(
        "--password-env", default=None, help="environment variable with the key's passphrase"
    )
    approve.add_argument("--dry-run", action="store_true", help="print the signature, do not submit it")
    approve.add_argument(
        "--out", type=Path, default=None, help="write an approval file (for the console), do not submit it"
    )


def _call(url: str, method: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    token = os.environ.get("LEDGER_TOKEN", "")
    request = urllib.request.Request(
        url,
        data=None if body is None else json.dumps(body).encode(),
        method=method,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        answer: dict[str, Any] = json.loads(response.read())
    return answer


def _load_key(path: Path, password_env: str | None) -> PrivateKey:
    password = None
    if password_env is not None:
        password = os.environ.get(password_env, "").encode() or None
    key = serialization.load_pem_private_key(path.read_bytes(), password=password)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
        return key
    raise ValueError("the key must be an Ed25519 or ECDSA P-256 private key")


APPROVAL_FILE_FORMAT = "ledger-node/approval/v1"


def _approval_file(action: dict[str, Any], approver_id: str, signature: str) -> dict[str, Any]:
    """What `--out` writes: the body of `POST /finance/approvals/{action_id}` plus what it is for."""
    return {
        "format": APPROVAL_FILE_FORMAT,
        "action_id": action["action_id"],
        "approver_id": approver_id,
        "params_hash": action["statement"]["params_hash"],
        "signature": signature,
    }


def run(args: argparse.Namespace) -> int:
    """Fetch, show, sign, submit; 0 on success, 1 with a message on any failure."""
    if not args.url:
        print("ledger-node approve: no node URL (--url or $LEDGER_URL)", file=sys.stderr)
        return 1
    base = f"{args.url.rstrip('/')}/finance/approvals/{args.action_id}"
    try:
        key = _load_key(args.key, args.password_env)
        action = _call(base, "GET")["action"]
        statement = statement_for(action["action_id"], action["kind"], action["params"], action["expires_at"])
        if statement.params_hash != action["statement"]["params_hash"]:
            print("ledger-node approve: the node's statement does not match its parameters", file=sys.stderr)
            return 1
        print(
            f"approving {action['action_id']}: {action['kind']} of {action['amount']} {action['currency']}"
            f" (status {action['status']}, expires {action['expires_at']})\n"
            f"params: {json.dumps(action['params'], sort_keys=True)}"
        )
        signature = sign_statement(key, statement)
        if args.out is not None:
            args.out.write_text(
                json.dumps(_approval_file(action, args.approver_id, signature), indent=2) + "\n"
            )
            print(f"wrote {args.out}: upload it in the operator console (Payouts and approvals)")
            return 0
        if args.dry_run:
            print(signature)
            return 0
        answer = _call(base, "POST", {"approver_id": args.approver_id, "signature": signature})["action"]
    except urllib.error.HTTPError as exc:
        print(f"ledger-node approve: HTTP {exc.code}: {exc.read().decode(errors='replace')}", file=sys.stderr)
        return 1
    except (OSError, ValueError, TypeError, KeyError) as exc:
        print(f"ledger-node approve: {exc}", file=sys.stderr)
        return 1
    print(
        f"approved: {answer['approvals_valid']} of {answer['approvals_required']} approvals,"
        f" action {answer['status']}"
    )
    return 0
