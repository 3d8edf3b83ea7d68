"""`ledger-node shards ...` and `ledger-node slots move`: online resharding of a running node.

    ledger-node shards list                      shards, their slots, queue depths, throughput
    ledger-node shards add N [--no-rebalance]    start N new shards and spread slots to them
    ledger-node shards remove ID                 move a shard's slots away, stop and retire it
    ledger-node slots move SLOT.. --to SHARD     move slots (numbers or ranges like 100-199)

Each command calls the node's admin endpoint (`--url`, default `$LEDGER_URL`) with the admin
token from `$LEDGER_TOKEN` and prints the JSON answer; it exits 1 on an error answer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from typing import Any

TIMEOUT_S = 600.0


def add_parsers(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `shards` and `slots`."""
    shards = subparsers.add_parser("shards", help="list, add or remove shards of a running node")
    actions = shards.add_subparsers(dest="shards_command", required=True)
    listing = actions.add_parser("list", help="shards with slots, queue depths and throughput")
    add = actions.add_parser("add", help="start N new shards (and spread slots to them)")
    add.add_argument("count", type=int)
    add.add_argument("--no-rebalance", action="store_true", help="start them without slots")
    remove = actions.add_parser("remove", help="move a shard's slots away, stop and retire it")
    remove.add_argument("shard_id", type=int)
    slots = subparsers.add_parser("slots", help="move slots between shards of a running node")
    slot_actions = slots.add_subparsers(dest="slots_command", required=True)
    move = slot_actions.add_parser("move", help="move slots to a shard")
    move.add_argument("slots", nargs="+", help="slot numbers or inclusive ranges such as 100-199")
    move.add_argument("--to", type=int, required=True, dest="target", help="the shard receiving them")
    for command in (listing, add, remove, move):
        command.add_argument(
            "--url", default=os.environ.get("LEDGER_URL"), help="a running node (default $LEDGER_URL)"
        )


def run(args: argparse.Namespace) -> int:
    """Call the admin endpoint for the parsed command; print its answer."""
    if not args.url:
        print("ledger-node: give --url or set LEDGER_URL", file=sys.stderr)
        return 2
    if args.command == "slots":
        return _call(args.url, "POST", "/admin/slots/move", {"slots": args.slots, "to": args.target})
    if args.shards_command == "list":
        return _call(args.url, "GET", "/admin/shards", None)
    if args.shards_command == "add":
        return _call(
            args.url, "POST", "/admin/shards", {"count": args.count, "rebalance": not args.no_rebalance}
        )
    return _call(args.url, "DELETE", f"/admin/shards/{args.shard_id}", None)


def _call(url: str, method: str, path: str, body: dict[str, Any] | None) -> int:
    token = os.environ.get("LEDGER_TOKEN", "")
    headers = {"Authorization": f"Bearer {token}"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(f"{url.rstrip('/')}{path}", data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        print(f"ledger-node: HTTP {exc.code}: {exc.read().decode(errors='replace')}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"ledger-node: cannot reach {url}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(answer, indent=2, sort_keys=True))
    return 0
