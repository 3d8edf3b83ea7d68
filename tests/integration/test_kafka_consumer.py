"""The consumer's batching, commits, retries and rebalances over a real Tansu broker.

The sink here is a model of the ledger's idempotency (a dict keyed by provider reference: a second
apply of a reference is a replay), so each test can count exactly what was posted; the node itself is
exercised in tests/e2e/test_kafka_ingest.py.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections import Counter

from aiokafka import AIOKafkaConsumer, TopicPartition

from api.kafka_consumer import KafkaSettings, PaymentConsumer
from api.kafka_events import Outcome, PaymentEvent, Result
from tests.support.tansu import create_topics, producer, wait_for


class ModelSink:
    """Posts each provider reference once; `gate` (when set) holds events of a reference until released."""

    def __init__(self) -> None:
        self.posted: Counter[str] = Counter()
        self.applies: Counter[str] = Counter()
        self.hold: str | None = None
        self.gate = asyncio.Event()

    async def apply(self, event: PaymentEvent) -> Result:
        self.applies[event.provider_reference] += 1
        if event.provider_reference == self.hold:
            await self.gate.wait()
        if self.posted[event.provider_reference]:
            return Result(Outcome.REPLAYED)
        self.posted[event.provider_reference] = 1
        return Result(Outcome.POSTED)


def _event(n: int) -> bytes:
    body = {
        "event_id": f"e{n}",
        "type": "payment",
        "invoice_id": f"inv-{n % 37}",
        "amount": 100 + n,
        "currency": "EUR",
        "provider": "stripe",
        "provider_reference": f"ref-{n}",
    }
    return json.dumps(body).encode()


async def _produce(bootstrap: str, topic: str, numbers: range) -> None:
    sender = producer(bootstrap)
    await sender.start()
    try:
        futures = [await sender.send(topic, _event(n), key=f"inv-{n % 37}".encode()) for n in numbers]
        await asyncio.gather(*futures)
    finally:
        await sender.stop()


async def _committed(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int]:
    reader = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await reader.start()
    try:
        return {p: (await reader.committed(TopicPartition(topic, p))) or 0 for p in range(partitions)}
    finally:
        await reader.stop()


def _settings(bootstrap: str, topic: str, **extra: object) -> KafkaSettings:
    return KafkaSettings(bootstrap, topic=topic, group_id=f"g-{topic}", batch_max=40, **extra)  # type: ignore[arg-type]


def test_retryable_outcome_pauses_and_never_skips(kafka_broker: str) -> None:
    """Tried: a hook answers RETRY for event 7 on its first 4 attempts (as a 503 would) -> the
    consumer pauses, commits nothing past event 7's offset meanwhile, and once it is accepted every
    one of the 60 events is posted exactly once and the offsets reach the end."""
    topic = f"retry-{secrets.token_hex(3)}"

    async def flow() -> None:
        await create_topics(kafka_broker, {topic: 1})
        sink = ModelSink()
        refusals = {"left": 4}
        seen_paused = []

        async def hook(event: PaymentEvent, result: Result) -> Result:
            if event.event_id == "e7" and refusals["left"] > 0:
                refusals["left"] -= 1
                return Result(Outcome.RETRY, "service_unavailable", "SERVICE_UNAVAILABLE", "down")
            return result

        consumer = PaymentConsumer(_settings(kafka_broker, topic, retry_initial_s=0.2), sink, hook=hook)
        await _produce(kafka_broker, topic, range(60))
        await consumer.start()
        try:

            async def paused() -> bool:
                if consumer.metrics.paused._value.get() == 1:
                    seen_paused.append((await _committed(kafka_broker, f"g-{topic}", topic, 1))[0])
                    return True
                return False

            await wait_for(paused, 20, "paused")
            await wait_for(_async(lambda: len(sink.posted) == 60), 20, "all 60 posted")
            await wait_for(
                lambda: _equals(_committed(kafka_broker, f"g-{topic}", topic, 1), {0: 60}), 10, "committed"
            )
        finally:
            await consumer.stop()
        assert seen_paused and seen_paused[0] <= 7
        assert refusals["left"] == 0 and set(sink.posted.values()) == {1}
        assert consumer.metrics.retries.labels("service_unavailable")._value.get() == 4

    asyncio.run(flow())


def test_crash_mid_batch_commits_only_acknowledged_and_restart_loses_nothing(kafka_broker: str) -> None:
    """Tried: the sink holds event 50 (of 120) unanswered; the committed offset stays at or before
    it; the consumer is killed without a graceful commit and a new one starts -> all 120 events are
    posted exactly once (the re-delivered ones answered as replays) and the offsets reach the end."""
    topic = f"crash-{secrets.token_hex(3)}"

    async def flow() -> None:
        await create_topics(kafka_broker, {topic: 1})
        sink = ModelSink()
        sink.hold = "ref-50"
        first = PaymentConsumer(_settings(kafka_broker, topic), sink)
        await _produce(kafka_broker, topic, range(120))
        await first.start()
        await wait_for(_async(lambda: sink.applies["ref-50"] == 1), 20, "event 50 in flight")
        await asyncio.sleep(0.5)
        assert (await _committed(kafka_broker, f"g-{topic}", topic, 1))[0] <= 50
        assert first._task is not None
        first._task.cancel()  # a crash: no commit of what the batch acknowledged
        await first.consumer.stop()
        await first.producer.stop()
        sink.gate.set()
        second = PaymentConsumer(_settings(kafka_broker, topic), sink)
        await second.start()
        try:
            await wait_for(_async(lambda: len(sink.posted) == 120), 20, "all posted")
            await wait_for(
                lambda: _equals(_committed(kafka_broker, f"g-{topic}", topic, 1), {0: 120}), 10, "committed"
            )
        finally:
            await second.stop()
        assert set(sink.posted.values()) == {1}
        assert second.metrics.events.labels(topic, "replayed")._value.get() >= 1

    asyncio.run(flow())


def test_second_consumer_joining_and_first_leaving_lose_nothing(kafka_broker: str) -> None:
    """Tried: 900 events on 3 partitions; a second consumer joins the group mid-stream (rebalance),
    then the first leaves (rebalance again) -> every event posted exactly once, every partition's
    committed offset at its end, lag 0 on the survivor."""
    topic = f"rebal-{secrets.token_hex(3)}"

    async def flow() -> None:
        await create_topics(kafka_broker, {topic: 3})
        sink = ModelSink()
        first = PaymentConsumer(_settings(kafka_broker, topic), sink)
        second = PaymentConsumer(_settings(kafka_broker, topic), sink)
        await _produce(kafka_broker, topic, range(300))
        await first.start()
        try:
            await wait_for(_async(lambda: len(sink.posted) >= 100), 20, "first consumer started")
            await second.start()
            await _produce(kafka_broker, topic, range(300, 600))
            await wait_for(_async(lambda: bool(second.consumer.assignment())), 20, "second assigned")
            await first.stop()
            await _produce(kafka_broker, topic, range(600, 900))
            await wait_for(_async(lambda: len(sink.posted) == 900), 30, "all 900 posted")

            async def settled() -> bool:
                return sum((await second.lag()).values()) == 0 and len(second.consumer.assignment()) == 3

            await wait_for(settled, 20, "lag 0 on the survivor")
        finally:
            await first.stop()
            await second.stop()
        assert set(sink.posted.values()) == {1}
        committed = await _committed(kafka_broker, f"g-{topic}", topic, 3)
        assert sum(committed.values()) == 900

    asyncio.run(flow())


def _async(check: object) -> object:
    async def predicate() -> bool:
        return bool(check())  # type: ignore[operator]

    return predicate


async def _equals(value: object, expected: object) -> bool:
    return await value == expected  # type: ignore[misc]
