"""An open-loop HTTP load generator for the overload test, run in its own process.

`python -m tests.support.overload URL OUT --mode measure|offer --rate R --seconds S ...`

- `measure`: closed loop, `--concurrency` clients post single journals as fast as answers come
  back; the answer is the single-request rate (200s per second).
- `offer`: open loop at `--rate` requests per second whatever the node answers (one in
  `--batch-every` is a `post_batch` of `--batch-size` journals), up to `--connections` requests
  outstanding (beyond it the send is counted as `client_saturated`, never queued client-side).

Tokens alternate between the given ones. OUT receives one JSON document: status counts, shed
reasons, the acknowledged journals (id -> body) and the ids answered 429/503 (not written).
Running in another process keeps the client's CPU and memory out of the node's.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

ACCOUNTS = [f"asset:overload:{n}" for n in range(16)] + [f"revenue:overload:{n}" for n in range(16)]


class Load:
    """Builds journals, sends them and records what came back."""

    def __init__(self, url: str, tokens: list[str], prefix: str) -> None:
        self.url = url
        self.tokens = itertools.cycle(tokens)
        self.prefix = prefix
        self.counter = itertools.count()
        self.random = random.Random(7)
        self.statuses: Counter[str] = Counter()
        self.reasons: Counter[str] = Counter()
        self.acked: dict[str, dict[str, Any]] = {}
        self.shed: list[str] = []
        self.outstanding = 0

    def journal(self) -> dict[str, Any]:
        debit, credit = self.random.sample(ACCOUNTS, 2)
        amount = self.random.randint(1, 10_000)
        return {
            "journal_id": f"{self.prefix}-{next(self.counter)}",
            "entries": [
                {"account_id": debit, "side": "debit", "amount_cents": amount, "currency": "USD"},
                {"account_id": credit, "side": "credit", "amount_cents": amount, "currency": "USD"},
            ],
        }

    def _record(self, status: int, body: dict[str, Any], sent: list[dict[str, Any]]) -> None:
        self.statuses[str(status)] += 1
        if status in {429, 503}:
            self.reasons[str(body.get("error", {}).get("details", {}).get("reason"))] += 1
            self.shed += [j["journal_id"] for j in sent]
        elif status == 200 and "results" in body:
            for journal, result in zip(sent, body["results"], strict=True):
                if result["ok"]:
                    self.acked[journal["journal_id"]] = journal
                elif result["error"]["code"] == "SERVICE_UNAVAILABLE":
                    self.reasons[str(result["error"]["details"].get("reason"))] += 1
                    self.shed.append(journal["journal_id"])
        elif status == 200:
            self.acked[sent[0]["journal_id"]] = sent[0]

    async def send(self, http: aiohttp.ClientSession, batch: int) -> None:
        self.outstanding += 1
        sent = [self.journal() for _ in range(batch)]
        path, payload = (
            ("/ledger/post", sent[0]) if batch == 1 else ("/ledger/post_batch", {"journals": sent})
        )
        headers = {"Authorization": f"Bearer {next(self.tokens)}"}
        try:
            async with http.post(self.url + path, json=payload, headers=headers) as resp:
                body = await resp.json(content_type=None)
                self._record(resp.status, body, sent)
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.statuses[f"client:{type(exc).__name__}"] += 1
        finally:
            self.outstanding -= 1


async def measure(load: Load, http: aiohttp.ClientSession, seconds: float, concurrency: int) -> float:
    """Closed loop: acknowledged single journals per second."""
    deadline = time.monotonic() + seconds

    async def client() -> None:
        while time.monotonic() < deadline:
            await load.send(http, 1)

    started = time.monotonic()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return len(load.acked) / (time.monotonic() - started)


async def offer(load: Load, http: aiohttp.ClientSession, args: argparse.Namespace) -> int:
    """Open loop at args.rate requests per second for args.seconds; returns requests sent."""
    tasks: set[asyncio.Task[None]] = set()
    started = time.monotonic()
    sent = 0
    while (elapsed := time.monotonic() - started) < args.seconds:
        due = int(elapsed * args.rate) - sent
        for _ in range(max(0, due)):
            sent += 1
            if load.outstanding >= args.connections:
                load.statuses["client_saturated"] += 1
                continue
            batch = args.batch_size if sent % args.batch_every == 0 else 1
            task = asyncio.create_task(load.send(http, batch))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.sleep(0.005)
    await asyncio.gather(*tasks)
    return sent


async def main(args: argparse.Namespace) -> dict[str, Any]:
    load = Load(args.url, args.tokens.split(","), args.prefix)
    connector = aiohttp.TCPConnector(limit=args.connections + 8)
    timeout = aiohttp.ClientTimeout(total=args.timeout_s)
    report: dict[str, Any] = {}
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        started = time.monotonic()
        if args.mode == "measure":
            report["rate"] = await measure(load, http, args.seconds, args.concurrency)
        else:
            report["sent"] = await offer(load, http, args)
        report["seconds"] = time.monotonic() - started
    return report | {
        "statuses": load.statuses,
        "reasons": load.reasons,
        "acked": load.acked,
        "shed": load.shed,
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("url")
    parser.add_argument("out")
    parser.add_argument("--mode", choices=["measure", "offer"], required=True)
    parser.add_argument("--tokens", required=True)
    parser.add_argument("--prefix", default="ovl")
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--connections", type=int, default=512)
    parser.add_argument("--batch-every", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--timeout-s", type=float, default=30.0)
    return parser


if __name__ == "__main__":
    arguments = _parser().parse_args()
    Path(arguments.out).write_text(json.dumps(asyncio.run(main(arguments))), encoding="utf-8")
