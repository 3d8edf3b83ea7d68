"""Kafka load generator: payment events (docs/kafka.md) produced at a target rate.

Usage::

    python -m loadtests.kafka_load --bootstrap 127.0.0.1:9092 --rate 2000 --seconds 10 \
        --invoices invoices.json [--topic payments]

`--invoices` is a JSON object {invoice_id: amount}; each invoice gets one payment event of its
amount (keyed by invoice id, so an invoice's events stay in one partition). Without it, events
name invoices `loadgen-{n}` (useful only to exercise the dead-letter path). The producer does not
use idempotence (Tansu refuses it); the broker acknowledges every record (acks=all).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from pathlib import Path

from aiokafka import AIOKafkaProducer


def payment_event(invoice_id: str, amount: int, reference: str, currency: str = "EUR") -> bytes:
    """One payment event's JSON value."""
    body = {
        "event_id": f"evt-{reference}",
        "type": "payment",
        "invoice_id": invoice_id,
        "amount": amount,
        "currency": currency,
        "provider": "stripe",
        "provider_reference": reference,
    }
    return json.dumps(body, separators=(",", ":")).encode()


async def produce(
    bootstrap: str,
    topic: str,
    events: list[tuple[str, bytes]],
    rate: float,
    ends: dict[int, int] | None = None,
) -> float:
    """Send `events` (key, value) at about `rate` per second (0: as fast as possible); seconds taken.

    `ends`, when given, receives per partition the offset after the last record sent to it (what a
    consumer group has committed once it has taken everything).
    """
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, enable_idempotence=False, acks="all", linger_ms=5
    )
    await producer.start()
    started = time.monotonic()
    try:
        pending = []
        for n, (key, value) in enumerate(events):
            if rate > 0:
                due = started + n / rate
                if (wait := due - time.monotonic()) > 0:
                    await asyncio.sleep(wait)
            pending.append(await producer.send(topic, value, key=key.encode()))
        for sent in await asyncio.gather(*pending):
            if ends is not None:
                ends[sent.partition] = max(ends.get(sent.partition, 0), sent.offset + 1)
    finally:
        await producer.stop()
    return time.monotonic() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bootstrap", default="127.0.0.1:9092")
    parser.add_argument("--topic", default="payments")
    parser.add_argument("--rate", type=float, default=1000.0, help="events per second (0: unthrottled)")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--invoices", type=Path, default=None)
    args = parser.parse_args(argv)
    run = uuid.uuid4().hex[:8]
    if args.invoices is not None:
        invoices: dict[str, int] = json.loads(args.invoices.read_text())
        events = [(i, payment_event(i, a, f"{run}-{i}")) for i, a in invoices.items()]
    else:
        count = int(args.rate * args.seconds)
        events = [(f"loadgen-{n}", payment_event(f"loadgen-{n}", 100, f"{run}-{n}")) for n in range(count)]
    taken = asyncio.run(produce(args.bootstrap, args.topic, events, args.rate))
    print(f"produced {len(events)} events in {taken:.1f}s ({len(events) / taken:.0f}/s) to {args.topic}")


if __name__ == "__main__":
    main()
