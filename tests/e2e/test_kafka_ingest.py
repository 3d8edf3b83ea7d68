"""Payment events over a real Kafka-protocol broker (Tansu) into a running node, as a producer would.

The node runs its consumer in-process (`KAFKA_BOOTSTRAP_SERVERS`, as `ledger-node serve` does);
a second test runs `ledger-node consume`'s sink (the node over HTTP) behind a TCP proxy that is cut
and restored, so the outage is a real one. Every check reads what a client would: invoice views over
HTTP, the dead-letter topic, `/metrics`, and the stored journals.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Iterator
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from api.kafka_consumer import KafkaSettings, PaymentConsumer
from api.kafka_sinks import HttpSink
from api.metrics import KafkaMetrics
from tests.e2e.test_errors import Client, expect_ok
from tests.support.node import TOKENS, NodeHarness
from tests.support.tansu import create_topics, producer, wait_for
from tests.support.tcp_proxy import TcpProxy

TOPIC = f"payments-e2e-{secrets.token_hex(3)}"
PARTITIONS = 3


@pytest.fixture(scope="module")
def kafka_node(ray_cluster: None, kafka_broker: str) -> Iterator[NodeHarness]:
    """A node consuming TOPIC (3 partitions) in-process with three consumers, batches of 50."""
    asyncio.run(create_topics(kafka_broker, {TOPIC: PARTITIONS, f"{TOPIC}.dlq": 1}))
    settings = KafkaSettings(kafka_broker, topic=TOPIC, group_id=f"g-{TOPIC}", batch_max=50, consumers=3)
    harness = NodeHarness(kafka=settings).start()
    yield harness
    harness.stop()


async def _invoices(c: Client, prefix: str, count: int) -> dict[str, int]:
    """Issue `count` invoices; their totals by id."""

    async def one(i: int) -> tuple[str, int]:
        body = {
            "invoice_id": f"{prefix}-{i}",
            "buyer": {"buyer_id": f"buyer-{prefix}-{i}", "country": "DE"},
            "line_items": [{"sku": "kafka-widget", "qty": 1, "unit_price": 1000 + i, "tax_code": "standard"}],
            "currency": "EUR",
        }
        answer = expect_ok(await c.call("POST", "/finance/invoice", body=body), 201)
        return answer["invoice_id"], answer["total"]

    return dict(await asyncio.gather(*(one(i) for i in range(count))))


def _event(invoice_id: str, amount: int, reference: str, **extra: Any) -> bytes:
    body = {
        "event_id": f"evt-{reference}",
        "type": "payment",
        "invoice_id": invoice_id,
        "amount": amount,
        "currency": "EUR",
        "provider": "stripe",
        "provider_reference": reference,
        **extra,
    }
    return json.dumps(body).encode()


async def _produce(bootstrap: str, records: list[tuple[str, bytes]], topic: str = TOPIC) -> None:
    sender = producer(bootstrap)
    await sender.start()
    try:
        for key, value in records:
            await sender.send_and_wait(topic, value, key=key.encode())
    finally:
        await sender.stop()


async def _dead_letters(bootstrap: str, topic: str, count: int) -> list[dict[str, Any]]:
    reader = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await reader.start()
    letters: list[dict[str, Any]] = []
    try:
        async with asyncio.timeout(20):
            while len(letters) < count:
                for part in (await reader.getmany(timeout_ms=500)).values():
                    letters.extend(json.loads(r.value) for r in part)
    finally:
        await reader.stop()
    return letters


async def _paid(c: Client, totals: dict[str, int]) -> bool:
    for invoice_id in totals:
        view = expect_ok(await c.call("GET", f"/finance/invoice/{invoice_id}", role="auditor"))
        if view["status"] != "paid":
            return False
    return True


async def _pay_journals(dsn: str, prefix: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(
            await conn.fetchval("SELECT count(*) FROM journals WHERE journal_id LIKE $1", f"{prefix}-%.pay.%")
        )
    finally:
        await conn.close()


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_events_post_once_and_poison_goes_to_the_dead_letter_topic(
    kafka_node: NodeHarness, kafka_broker: str
) -> None:
    """Tried: 12 invoices, each paid by two half events over 3 partitions, plus a duplicate event,
    bad JSON and a payment of an unknown invoice in the middle -> every invoice paid exactly (no
    customer credit), 24 payment journals (the duplicate posted nothing), both poison records in the
    dead-letter topic with reason, code and original offset, later events still posted,
    /metrics shows consumed, posted, dead letters by reason, batch latency and lag 0, and the audit
    stream holds `kafka.batch` events (one per consumer batch, actor `kafka:{topic}`) that list each
    posted payment exactly once with its event id and its stored journal's hash. The node's three
    consumers (one group) hold one partition each."""
    prefix = f"kin-{secrets.token_hex(3)}"
    assert kafka_node.node is not None
    consumers = kafka_node.node.consumers
    assert len(consumers) == 3 and len({c.settings.client_id for c in consumers}) == 3

    async def shared() -> bool:
        held = [sorted(tp.partition for tp in c.consumer.assignment()) for c in consumers]
        return sorted(p for ps in held for p in ps) == [0, 1, 2] and all(len(ps) == 1 for ps in held)

    kafka_node.run(wait_for(shared, 30, "the three consumers share the partitions"))

    async def flow() -> None:
        async with aiohttp.ClientSession() as http:
            c = Client(http, kafka_node.url)
            totals = await _invoices(c, prefix, 12)
            first = [(i, _event(i, t // 2, f"{i}-a")) for i, t in totals.items()]
            second = [(i, _event(i, t - t // 2, f"{i}-b")) for i, t in totals.items()]
            poison = [
                ("junk", b'{"event_id": "broken"'),
                ("ghost", _event(f"{prefix}-missing", 500, f"{prefix}-ghost")),
            ]
            duplicate = [(first[0][0], _event(first[0][0], totals[first[0][0]] // 2, f"{first[0][0]}-a"))]
            await _produce(kafka_broker, first + poison + duplicate + second)
            await wait_for(lambda: _paid(c, totals), 30, "every invoice paid")
            for invoice_id, total in totals.items():
                view = expect_ok(await c.call("GET", f"/finance/invoice/{invoice_id}", role="auditor"))
                assert (view["amount_paid"], view["customer_credit"], len(view["payments"])) == (total, 0, 2)
            assert await _pay_journals(kafka_node.dsn, prefix) == 24
            letters = await _dead_letters(kafka_broker, f"{TOPIC}.dlq", 2)
            by_key = {letter["key"]: letter for letter in letters}
            assert by_key["junk"]["reason"] == "undecodable" and by_key["junk"]["topic"] == TOPIC
            assert by_key["junk"]["value"] == '{"event_id": "broken"'
            assert (by_key["ghost"]["reason"], by_key["ghost"]["code"]) == ("rejected", "NOT_FOUND")
            assert all(isinstance(letter["offset"], int) and letter["partition"] >= 0 for letter in letters)

            async def drained() -> bool:
                text = (await c.call("GET", "/metrics", role=None)).body["text"]
                lag = _metric(text, "ledger_kafka_consumer_lag", topic=TOPIC)
                return _metric(text, "ledger_kafka_events_total", topic=TOPIC) >= 25 and lag == 0

            await wait_for(drained, 15, "all events acknowledged and lag 0")
            text = (await c.call("GET", "/metrics", role=None)).body["text"]
            assert _metric(text, "ledger_kafka_consumed_total", topic=TOPIC) >= 27
            assert _metric(text, "ledger_kafka_events_total", topic=TOPIC, outcome="posted") >= 24
            assert _metric(text, "ledger_kafka_events_total", topic=TOPIC, outcome="replayed") >= 1
            assert _metric(text, "ledger_kafka_dlq_total", reason="undecodable") >= 1
            assert _metric(text, "ledger_kafka_dlq_total", reason="rejected", code="NOT_FOUND") >= 1
            assert _metric(text, "ledger_kafka_batch_seconds_count") >= 1

            audited = await _kafka_audit_events(c)
            assert audited and {e["event_type"] for e in audited} == {"kafka.batch"}
            listed = [p for e in audited for p in e["payload"]["payments"]]
            assert all(e["payload"]["refunds"] == [] and e["payload"]["payments"] for e in audited)
            paid = {
                p: invoice_id
                for invoice_id in totals
                for p in expect_ok(await c.call("GET", f"/finance/invoice/{invoice_id}", role="auditor"))[
                    "payments"
                ]
            }
            assert sorted(p["payment_id"] for p in listed) == sorted(paid)  # each exactly once
            assert all(p["invoice_id"] == paid[p["payment_id"]] for p in listed)
            expected_ids = {f"evt-{i}-{half}" for i in totals for half in "ab"}
            assert {p["event_id"] for p in listed} == expected_ids
            hashes = await _journal_hashes(kafka_node.dsn, [p["journal_id"] for p in listed])
            assert [p["journal_hash"] for p in listed] == [hashes[p["journal_id"]] for p in listed]

    asyncio.run(flow())


async def _kafka_audit_events(c: Client) -> list[dict[str, Any]]:
    """The audit events recorded by the node's consumers of TOPIC, in order."""
    events: list[dict[str, Any]] = []
    cursor = ""
    while True:
        page = expect_ok(await c.call("GET", f"/audit/events?limit=1000{cursor}", role="auditor"))
        if not page["events"]:
            return [e for e in events if e["actor_id"] == f"kafka:{TOPIC}"]
        events += page["events"]
        cursor = f"&cursor={page['next_cursor']}"


async def _journal_hashes(dsn: str, journal_ids: list[str]) -> dict[str, str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT journal_id, hash FROM journals WHERE journal_id = ANY($1::text[])", journal_ids
        )
    finally:
        await conn.close()
    return {r["journal_id"]: bytes(r["hash"]).hex() for r in rows}


def test_separate_consumer_pauses_while_the_node_is_unreachable_and_resumes(
    kafka_node: NodeHarness, kafka_broker: str
) -> None:
    """Tried: `ledger-node consume`'s HTTP sink reaching the node through a TCP proxy; the proxy is
    cut, 20 payment events are produced -> nothing is posted or dead-lettered, the consumer retries
    (paused) and commits nothing; the proxy is restored -> all 20 invoices are paid exactly once."""
    prefix = f"kout-{secrets.token_hex(3)}"
    topic = f"payments-out-{secrets.token_hex(3)}"
    host, port = kafka_node.url.removeprefix("http://").split(":")

    async def flow() -> None:
        await create_topics(kafka_broker, {topic: 2, f"{topic}.dlq": 1})
        proxy = await TcpProxy(host, int(port)).start()
        sink = HttpSink(proxy.url, TOKENS["service"])
        metrics = KafkaMetrics()
        settings = KafkaSettings(
            kafka_broker, topic=topic, group_id=f"g-{topic}", retry_initial_s=0.1, retry_max_s=0.5
        )
        consumer = PaymentConsumer(settings, sink, metrics)
        async with aiohttp.ClientSession() as http:
            c = Client(http, kafka_node.url)
            totals = await _invoices(c, prefix, 20)
            await consumer.start()
            try:
                proxy.cut()
                await _produce(kafka_broker, [(i, _event(i, t, f"{i}-x")) for i, t in totals.items()], topic)
                await wait_for(
                    _async(lambda: metrics.retries.labels("unavailable")._value.get() >= 3), 20, "retries"
                )
                assert await _pay_journals(kafka_node.dsn, prefix) == 0
                for p in range(2):
                    assert (await consumer.consumer.committed(TopicPartition(topic, p))) in (None, 0)
                proxy.restore()
                await wait_for(lambda: _paid(c, totals), 30, "every invoice paid after the outage")
                assert await _pay_journals(kafka_node.dsn, prefix) == 20
                await wait_for(_async(lambda: metrics.paused._value.get() == 0), 10, "resumed")
                assert metrics.dead_letters._metrics == {}
            finally:
                await consumer.stop()
                await sink.close()
                await proxy.stop()

    asyncio.run(flow())


def _async(check: Any) -> Any:
    async def predicate() -> bool:
        return bool(check())

    return predicate
