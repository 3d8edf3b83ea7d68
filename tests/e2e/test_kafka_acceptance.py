"""Issue 7's Kafka acceptance run: 10,000 payment events, 3 partitions, 2 consumers, one killed and
restarted, poison records, and a PostgreSQL outage mid-stream, against a real node and broker.

The node reaches PostgreSQL through a TCP proxy (`tests/support/tcp_proxy.py`) for everything it
runs: its pool (the finance service), the shard, coordinator and signer actors and the audit writer.
Cutting the proxy is a real outage for all of them. The checks read PostgreSQL directly (not through
the proxy) and the broker: every invoice paid exactly by its own payments, one payment journal per
event, the offsets committed to the end of every partition, lag 0, the poison in the dead-letter topic.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from api.finance_routes import FINANCE
from api.kafka_consumer import KafkaSettings, PaymentConsumer
from api.kafka_sinks import FinanceSink
from api.metrics import KafkaMetrics
from finance.invoices import Buyer, LineItem
from finance.service import FinanceService, InvoiceRequest
from tests.e2e.test_kafka_ingest import _dead_letters, _event
from tests.support.node import NodeHarness
from tests.support.tansu import create_topics, producer, wait_for
from tests.support.tcp_proxy import ProxyThread

TOPIC = f"payments-accept-{secrets.token_hex(3)}"
PARTITIONS = 3
INVOICES = 1000
PARTS = 10
"""Each invoice is paid by PARTS events: INVOICES * PARTS = 10,000."""


@pytest.fixture(scope="module")
def proxied_node(ray_cluster: None, kafka_broker: str) -> Iterator[tuple[NodeHarness, ProxyThread]]:
    """A node consuming TOPIC in-process, whose every database connection goes through a proxy."""
    asyncio.run(create_topics(kafka_broker, {TOPIC: PARTITIONS, f"{TOPIC}.dlq": 1}))
    proxy = ProxyThread("127.0.0.1", 5432).start()

    def route(dsn: str) -> str:
        parts = urlsplit(dsn)
        netloc = parts.netloc.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
        assert netloc != parts.netloc, "the test database is expected on 127.0.0.1:5432"
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))

    harness = NodeHarness(kafka=_settings(kafka_broker), route_database=route).start()
    yield harness, proxy
    proxy.restore()
    harness.stop()
    proxy.stop()


def _settings(bootstrap: str) -> KafkaSettings:
    return KafkaSettings(
        bootstrap, topic=TOPIC, group_id=f"g-{TOPIC}", batch_max=500, retry_initial_s=0.1, retry_max_s=1.0
    )


async def _issue(finance: FinanceService, prefix: str) -> dict[str, int]:
    """INVOICES issued invoices; their totals by id."""
    gate = asyncio.Semaphore(32)

    async def one(i: int) -> tuple[str, int]:
        request = InvoiceRequest(
            buyer=Buyer(buyer_id=f"{prefix}-b{i}", country="DE"),
            line_items=[LineItem(sku="k", qty=1, unit_price=1000 + i, tax_code="standard")],
            currency="EUR",
            invoice_id=f"{prefix}-{i}",
        )
        async with gate:
            view, _ = await finance.create(request, request.invoice_id or "", "svc-token")
        return view["invoice_id"], view["total"]

    return dict(await asyncio.gather(*(one(i) for i in range(INVOICES))))


async def _produce(bootstrap: str, records: list[tuple[str, bytes]]) -> Counter[int]:
    """Send the records (key, value) in order; how many landed in each partition."""
    sender = producer(bootstrap)
    await sender.start()
    try:
        futures = [await sender.send(TOPIC, value, key=key.encode()) for key, value in records]
        sent = await asyncio.gather(*futures)
    finally:
        await sender.stop()
    return Counter(meta.partition for meta in sent)


async def _db(dsn: str, query: str, *args: Any) -> Any:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch(query, *args)
    finally:
        await conn.close()


async def _posted(dsn: str, prefix: str) -> int:
    rows = await _db(dsn, "SELECT count(*) FROM payments WHERE invoice_id LIKE $1", f"{prefix}-%")
    return int(rows[0][0])


async def _committed(bootstrap: str) -> dict[int, int]:
    reader = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=f"g-{TOPIC}", enable_auto_commit=False)
    await reader.start()
    try:
        return {p: (await reader.committed(TopicPartition(TOPIC, p))) or 0 for p in range(PARTITIONS)}
    finally:
        await reader.stop()


def test_ten_thousand_events_survive_a_killed_consumer_and_a_database_outage(
    proxied_node: tuple[NodeHarness, ProxyThread], kafka_broker: str
) -> None:
    """Tried: 1,000 invoices each paid by 10 events (10,000, keyed by invoice over 3 partitions) plus
    4 poison records and 3 exact duplicates; the node's consumer and a second one share the group;
    the second is killed mid-stream (task cancelled, no commit, no revoke) and later restarted; the
    node's PostgreSQL (pool and actors) is cut off mid-stream for 3 s with events waiting, then
    restored -> every invoice paid exactly (amount_paid = total, no customer credit, 10 payments),
    10,000 payment rows and 10,000 distinct payment journals, both consumers' committed offsets at the
    end of every partition and lag 0, the poison in the dead-letter topic with reason and code, and the
    outage seen as retries (not as dead letters)."""
    harness, proxy = proxied_node
    assert harness.node is not None and harness.node.app is not None and len(harness.node.consumers) == 1
    app, node_consumer = harness.node.app, harness.node.consumers[0]
    finance: FinanceService = app[FINANCE]
    prefix = f"ka{secrets.token_hex(3)}"
    direct = urlunsplit(urlsplit(harness.dsn))  # PostgreSQL itself, not through the proxy

    totals = harness.run(_issue(finance, prefix))
    events: list[tuple[str, bytes]] = []
    for part in range(PARTS):  # interleaved: every invoice's parts spread over the whole stream
        for invoice_id, total in totals.items():
            amount = total // PARTS if part < PARTS - 1 else total - (PARTS - 1) * (total // PARTS)
            events.append((invoice_id, _event(invoice_id, amount, f"{invoice_id}-p{part}")))
    first_half, second_half = events[:5000], events[5000:]
    poison = [
        ("junk", b'{"event_id": "torn'),
        ("invalid", b'{"event_id": "x", "type": "payment"}'),
        (f"{prefix}-ghost", _event(f"{prefix}-ghost", 100, f"{prefix}-ghost")),
        (f"{prefix}-0", _event(f"{prefix}-0", 1, f"{prefix}-0-p0")),  # same reference, other amount
    ]
    duplicates = [events[1], events[2], events[3]]

    async def start_second() -> PaymentConsumer:
        consumer = PaymentConsumer(_settings(kafka_broker), FinanceSink(app, TOPIC), KafkaMetrics())
        await consumer.start()
        return consumer

    async def kill(consumer: PaymentConsumer) -> None:
        assert consumer._task is not None
        consumer._task.cancel()  # a crash: nothing acknowledged is committed, no revoke runs
        await asyncio.wait([consumer._task])
        await consumer.consumer.stop()
        await consumer.producer.stop()

    started = time.monotonic()
    second = harness.run(start_second())
    sizes = Counter[int]()
    sizes += asyncio.run(_produce(kafka_broker, first_half[:2500] + poison[:3]))
    harness.run(wait_for(_async(lambda: bool(second.consumer.assignment())), 30, "second consumer assigned"))
    sizes += asyncio.run(_produce(kafka_broker, first_half[2500:]))
    asyncio.run(wait_for(lambda: _at_least(direct, prefix, 1000), 60, "1,000 posted"))
    harness.run(kill(second))
    killed_at = asyncio.run(_posted(direct, prefix))
    assert killed_at < 10_000

    asyncio.run(wait_for(lambda: _at_least(direct, prefix, 3000), 60, "3,000 posted"))
    proxy.cut()
    cut_at = asyncio.run(_posted(direct, prefix))
    sizes += asyncio.run(_produce(kafka_broker, second_half[:2500] + duplicates + poison[3:]))
    retried = _async(lambda: bool(node_consumer.metrics.retries._metrics))
    # Generous: with the writer locks gone, the actors restart (Ray) before a posting fails retryably.
    harness.run(wait_for(retried, 180, "the outage retried"))
    time.sleep(3)
    during = asyncio.run(_posted(direct, prefix))
    assert during < 10_000 and cut_at < 10_000
    proxy.restore()
    sizes += asyncio.run(_produce(kafka_broker, second_half[2500:]))
    second = harness.run(start_second())
    try:
        asyncio.run(wait_for(lambda: _at_least(direct, prefix, 10_000), 240, "all 10,000 posted"))

        async def drained() -> bool:
            lags = {**(await node_consumer.lag()), **(await second.lag())}
            return len(lags) == PARTITIONS and sum(lags.values()) == 0

        harness.run(wait_for(drained, 60, "lag 0 on both consumers"))
        committed = asyncio.run(_committed(kafka_broker))
    finally:
        harness.run(second.stop())
    elapsed = time.monotonic() - started

    assert committed == {p: sizes[p] for p in range(PARTITIONS)}
    assert sum(committed.values()) == 10_000 + len(poison) + len(duplicates)
    invoices = asyncio.run(
        _db(
            direct,
            "SELECT i.invoice_id, i.total, i.amount_paid, i.customer_credit, i.status,"
            " (SELECT count(*) FROM payments p WHERE p.invoice_id = i.invoice_id) AS payments"
            " FROM invoices i WHERE i.invoice_id LIKE $1",
            f"{prefix}-%",
        )
    )
    assert len(invoices) == INVOICES
    wrong = [
        dict(r)
        for r in invoices
        if (r["amount_paid"], r["customer_credit"], r["payments"]) != (r["total"], 0, PARTS)
    ]
    assert wrong == [] and {r["status"] for r in invoices} == {"paid"}
    journals = asyncio.run(
        _db(
            direct,
            "SELECT count(*), count(DISTINCT journal_id) FROM journals WHERE journal_id LIKE $1",
            f"{prefix}-%.pay.%",
        )
    )
    assert tuple(journals[0]) == (10_000, 10_000)
    letters = asyncio.run(_dead_letters(kafka_broker, f"{TOPIC}.dlq", len(poison)))
    by_key = {letter["key"]: (letter["reason"], letter["code"]) for letter in letters}
    assert by_key == {
        "junk": ("undecodable", None),
        "invalid": ("invalid", None),
        f"{prefix}-ghost": ("rejected", "NOT_FOUND"),
        f"{prefix}-0": ("rejected", "IDEMPOTENCY_CONFLICT"),
    }
    assert node_consumer.metrics.retries._metrics  # the outage was retried, never dead-lettered
    print(f"acceptance run: {elapsed:.0f}s")  # speed is a benchmark's job, not this test's


async def _at_least(dsn: str, prefix: str, count: int) -> bool:
    return await _posted(dsn, prefix) >= count


def _async(check: Any) -> Any:
    async def predicate() -> bool:
        return bool(check())

    return predicate
