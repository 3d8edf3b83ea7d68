"""The Kafka payment consumer: batches of events posted through a sink, offsets committed after.

One loop per consumer (aiokafka, manual commits, group `KafkaSettings.group_id`):

1. `getmany(max_records=batch_max)` takes a batch from the assigned partitions.
2. Every record is decoded (`api.kafka_events.decode_event`); the events are applied through the
   sink: a `BatchSink` (the node's `FinanceSink`) takes the whole batch in one call, any other sink
   gets one event at a time, at most `concurrency` at once. Events of one invoice run one after
   another in offset order (a refund never overtakes its payment); different invoices run concurrently.
3. Poison records (undecodable, invalid, or rejected with a final code) are produced to the
   dead-letter topic with the reason and their topic, partition and offset; once the broker has
   acknowledged that, they count as handled, so a poison record never blocks its partition.
4. RETRY outcomes (node or database unavailable) pause the assigned partitions and apply those
   events again with exponential backoff (polling meanwhile, so the consumer stays in its group),
   until they are acknowledged. Nothing is skipped and nothing later is committed.
5. Only when every record of the batch is acknowledged (posted, replayed or dead-lettered) are the
   offsets committed. A crash before that re-delivers the batch; the idempotency key (provider,
   provider_reference) makes the replays post nothing.

Rebalances: when partitions are revoked the listener waits (bounded) for the batch in flight and
commits, per partition, the offset after the longest acknowledged prefix; records of a revoked
partition still unacknowledged are dropped from the batch (the new owner reads them from the
committed offset). So a rebalance loses nothing, and what it re-delivers is answered as a replay.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final, Protocol, runtime_checkable

import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition

from api.kafka_events import Outcome, PaymentEvent, Poison, Result, decode_event
from api.metrics import KafkaMetrics

log = logging.getLogger(__name__)

REVOKE_WAIT_S: Final = 10.0
"""How long a revocation waits for the batch in flight before committing what is acknowledged."""
STOP_WAIT_S: Final = 15.0
LAG_EVERY_S: Final = 1.0
BATCH_MAX_DEFAULT: Final = 2000
"""Records per batch (`getmany(max_records)`, `LEDGER_KAFKA_BATCH_MAX`): the per-batch costs (two
reads, one store transaction, one ledger call per round, one audit event, one offset commit) are
shared by more events; 2000 measured ~20% less CPU per event than 500 (docs/benchmarks.md)."""


class EventSink(Protocol):
    """Applies one event to the ledger (in-process finance service, or the node over HTTP)."""

    async def apply(self, event: PaymentEvent) -> Result:
        """The event's outcome; never raises for a ledger answer."""
        ...


@runtime_checkable
class BatchSink(EventSink, Protocol):
    """A sink that applies a whole batch at once (`FinanceSink`: one ledger call per round)."""

    async def apply_many(self, events: list[PaymentEvent]) -> list[Result]:
        """One result per event, in order. Events of one invoice apply in order; after an event's
        RETRY, the invoice's later events are not applied (answered RETRY too)."""
        ...


@dataclass(frozen=True, slots=True)
class KafkaSettings:
    """Where and how to consume (node/config.py reads them from the environment)."""

    bootstrap_servers: str
    topic: str = "payments"
    group_id: str = "ledger-node-payments"
    dlq_topic: str = ""
    """Empty: `{topic}.dlq`."""
    batch_max: int = BATCH_MAX_DEFAULT
    concurrency: int = 64
    consumers: int = 1
    """Consumers the node runs in one group (each takes a share of the partitions; their batches
    overlap, so one batch's ledger and database waits are another's Python work)."""
    retry_initial_s: float = 0.2
    retry_max_s: float = 10.0
    client_id: str = "ledger-node"

    @property
    def dead_letter_topic(self) -> str:
        """The dead-letter topic's name."""
        return self.dlq_topic or f"{self.topic}.dlq"


class DeadLetter(msgspec.Struct, frozen=True):
    """The value of a dead-letter record (JSON): why, where from, and the original bytes."""

    reason: str
    code: str | None
    message: str
    topic: str
    partition: int
    offset: int
    group_id: str
    key: str | None
    value_base64: str
    value: str | None
    """The original value as text when it is UTF-8 (for people; `value_base64` is exact)."""
    event_id: str | None = None


def dead_letter(record: Any, result: Result, group_id: str, event_id: str | None) -> bytes:
    """The dead-letter record's value for `record` (an aiokafka ConsumerRecord)."""
    raw: bytes = record.value or b""
    try:
        text: str | None = raw.decode()
    except UnicodeDecodeError:
        text = None
    key = record.key.decode(errors="replace") if record.key is not None else None
    letter = DeadLetter(
        reason=str(result.reason),
        code=result.code,
        message=result.message,
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        group_id=group_id,
        key=key,
        value_base64=base64.b64encode(raw).decode(),
        value=text,
        event_id=event_id,
    )
    return msgspec.json.encode(letter)


class _Acks:
    """Per partition: the offsets of the batch in flight, which are acknowledged, what to commit."""

    def __init__(self) -> None:
        self.open: dict[TopicPartition, dict[int, bool]] = {}

    def begin(self, records: Iterable[Any]) -> None:
        self.open = {}
        for record in records:
            self.open.setdefault(TopicPartition(record.topic, record.partition), {})[record.offset] = False

    def ack(self, record: Any) -> None:
        offsets = self.open.get(TopicPartition(record.topic, record.partition))
        if offsets is not None and record.offset in offsets:
            offsets[record.offset] = True

    def commit_point(self, tp: TopicPartition) -> int | None:
        """The offset after the longest acknowledged prefix of `tp`'s records (None: nothing new)."""
        done = None
        for offset in sorted(self.open.get(tp, {})):
            if not self.open[tp][offset]:
                break
            done = offset + 1
        return done

    def drop(self, tps: Iterable[TopicPartition]) -> None:
        for tp in tps:
            self.open.pop(tp, None)


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, owner: PaymentConsumer) -> None:
        self.owner = owner

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self.owner.on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        log.info("kafka partitions assigned: %s", sorted((tp.topic, tp.partition) for tp in assigned))


Hook = Callable[[PaymentEvent, Result], Awaitable[Result]]


class PaymentConsumer:
    """Consumes `settings.topic` and applies each event through `sink`; `start()` / `stop()`."""

    def __init__(
        self,
        settings: KafkaSettings,
        sink: EventSink,
        metrics: KafkaMetrics | None = None,
        hook: Hook | None = None,
    ) -> None:
        self.settings = settings
        self.sink = sink
        self.metrics = metrics or KafkaMetrics()
        self.hook = hook
        """Tests only: sees (and may replace) each sink result."""
        self.consumer: Any = None
        self.producer: Any = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._commit_lock = asyncio.Lock()
        self._acks = _Acks()
        self._committed: dict[TopicPartition, int] = {}
        self._done: dict[TopicPartition, int] = {}
        """Per partition: the offset after everything acknowledged (committed, or to commit)."""
        self._lag_at = 0.0

    async def start(self) -> None:
        """Connect, join the group and start consuming in the background."""
        s = self.settings
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=s.bootstrap_servers,
            group_id=s.group_id,
            client_id=s.client_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        self.consumer.subscribe([s.topic], listener=_Listener(self))
        # No idempotent producer: every dead letter is awaited before its record counts as handled.
        self.producer = AIOKafkaProducer(
            bootstrap_servers=s.bootstrap_servers, client_id=f"{s.client_id}-dlq", acks="all"
        )
        await self.producer.start()
        try:
            await self.consumer.start()
        except BaseException:
            await self.producer.stop()
            raise
        self._task = asyncio.create_task(self._run(), name=f"kafka-consumer-{s.topic}")
        log.info("consuming %s as group %s (dead letters to %s)", s.topic, s.group_id, s.dead_letter_topic)

    async def stop(self) -> None:
        """Finish (bounded) the batch in flight, commit what is acknowledged, leave the group."""
        self._stopping.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._task), STOP_WAIT_S)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        if self.consumer is not None:
            with contextlib.suppress(Exception):
                await self._commit(self.consumer.assignment())
            await self.consumer.stop()
            self.consumer = None
        if self.producer is not None:
            await self.producer.stop()
            self.producer = None

    @property
    def running(self) -> bool:
        """True while the loop runs (False after `stop()` or a crash)."""
        return self._task is not None and not self._task.done()

    # -- the loop ----------------------------------------------------------------------------------
    async def _run(self) -> None:
        delay = self.settings.retry_initial_s
        while not self._stopping.is_set():
            try:
                batch = await self.consumer.getmany(timeout_ms=200, max_records=self.settings.batch_max)
                records = [r for part in batch.values() for r in part]
                if records:
                    self._idle.clear()
                    try:
                        await self._batch(records)
                    finally:
                        self._idle.set()
                await self._update_lag()
                delay = self.settings.retry_initial_s
            except Exception:
                # Never skip: read again from the first record not acknowledged, after a pause.
                log.exception("kafka batch failed; rewinding to the first unacknowledged record")
                self._rewind()
                self.metrics.retries.labels("consumer_error").inc()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)
                delay = min(delay * 2, self.settings.retry_max_s)

    def _rewind(self) -> None:
        """Seek every partition of the batch in flight back to its first unacknowledged record."""
        assigned = self.consumer.assignment()
        for tp, offsets in self._acks.open.items():
            waiting = [offset for offset, acked in offsets.items() if not acked]
            if waiting and tp in assigned:
                self.consumer.seek(tp, min(waiting))
        self._acks.open = {}

    async def _batch(self, records: list[Any]) -> None:
        started = time.monotonic()
        self.metrics.consumed.labels(self.settings.topic).inc(len(records))
        self._acks.begin(records)
        pending = records
        delay = self.settings.retry_initial_s
        while pending:
            retry = await self._apply_all(pending)
            pending = [r for r in retry if TopicPartition(r.topic, r.partition) in self._acks.open]
            if pending:
                if self._stopping.is_set():
                    return  # not acknowledged, not committed: re-delivered after restart
                await self._pause(delay)
                delay = min(delay * 2, self.settings.retry_max_s)
        await self._commit(self.consumer.assignment())
        self.metrics.batch_seconds.observe(time.monotonic() - started)

    async def _apply_all(self, records: list[Any]) -> list[Any]:
        """Apply every record (invoices concurrently, each invoice in order); the records to retry."""
        groups: dict[str, list[tuple[Any, PaymentEvent]]] = {}
        poison: list[tuple[Any, Result, str | None]] = []
        for record in records:
            try:
                event = decode_event(record.value)
            except Poison as exc:
                poison.append((record, Result(Outcome.POISON, exc.reason, None, exc.message), None))
                continue
            groups.setdefault(event.invoice_id, []).append((record, event))
        gate = asyncio.Semaphore(self.settings.concurrency)
        retry: list[Any] = []
        known: dict[int, Result] = {}
        if isinstance(self.sink, BatchSink):
            flat = [pair for group in groups.values() for pair in group]
            answers = await self._apply_many([event for _, event in flat])
            known = {id(record): result for (record, _), result in zip(flat, answers, strict=True)}

        async def run(group: list[tuple[Any, PaymentEvent]]) -> None:
            for index, (record, event) in enumerate(group):
                result = known.get(id(record))
                if result is None:
                    async with gate:
                        result = await self._apply(event)
                if result.outcome == Outcome.RETRY:
                    self.metrics.retries.labels(str(result.reason)).inc()
                    log.warning("event %s retried: %s %s", event.event_id, result.reason, result.message)
                    retry.extend(r for r, _ in group[index:])  # keep the invoice's order
                    return
                if result.outcome == Outcome.POISON:
                    poison.append((record, result, event.event_id))
                else:
                    acknowledged[result.outcome] = acknowledged.get(result.outcome, 0) + 1
                    self._acks.ack(record)

        acknowledged: dict[Outcome, int] = {}
        try:
            await asyncio.gather(*(run(group) for group in groups.values()))
        finally:
            for outcome, count in acknowledged.items():  # one labels() lookup per outcome, not per event
                self.metrics.events.labels(self.settings.topic, str(outcome)).inc(count)
        retry.extend(await self._dead_letter(poison))
        return retry

    async def _apply_many(self, events: list[PaymentEvent]) -> list[Result]:
        """A batch sink's results (each seen by the hook); all RETRY if the sink raised."""
        assert isinstance(self.sink, BatchSink)
        try:
            results = await self.sink.apply_many(events)
        except Exception as exc:  # a sink never should; an unknown failure is retried, never skipped
            log.exception("batch of %s events: sink failed", len(events))
            results = [Result(Outcome.RETRY, "sink_error", None, repr(exc))] * len(events)
        if self.hook is not None:
            results = [await self.hook(event, result) for event, result in zip(events, results, strict=True)]
        return results

    async def _apply(self, event: PaymentEvent) -> Result:
        try:
            result = await self.sink.apply(event)
        except Exception as exc:  # a sink never should; an unknown failure is retried, never skipped
            log.exception("event %s: sink failed", event.event_id)
            result = Result(Outcome.RETRY, "sink_error", None, repr(exc))
        if self.hook is not None:
            result = await self.hook(event, result)
        return result

    async def _dead_letter(self, poison: list[tuple[Any, Result, str | None]]) -> list[Any]:
        """Produce each poison record to the dead-letter topic; the records whose send failed."""
        if not poison:
            return []
        topic = self.settings.dead_letter_topic
        sends = []
        for record, result, event_id in poison:
            value = dead_letter(record, result, self.settings.group_id, event_id)
            sends.append(self._send(topic, value, record.key))
        outcomes = await asyncio.gather(*sends, return_exceptions=True)
        failed = []
        for (record, result, event_id), sent in zip(poison, outcomes, strict=True):
            if isinstance(sent, BaseException):
                log.warning("dead letter for %s:%s@%s not sent: %r", *_where(record), sent)
                self.metrics.retries.labels("dead_letter_send").inc()
                failed.append(record)
                continue
            log.warning(
                "event %s at %s:%s@%s dead-lettered: %s %s %s",
                event_id,
                *_where(record),
                result.reason,
                result.code,
                result.message,
            )
            self.metrics.dead_letters.labels(str(result.reason), result.code or "").inc()
            self._acks.ack(record)
        return failed

    async def _send(self, topic: str, value: bytes, key: bytes | None) -> Any:
        """Produce one record and wait for the broker's acknowledgement."""
        delivery = await self.producer.send(topic, value, key=key)
        return await delivery

    async def _pause(self, delay_s: float) -> None:
        """Back off with the partitions paused, polling (nothing is returned) to stay in the group."""
        assigned = list(self.consumer.assignment())
        self.metrics.paused.inc()
        self.consumer.pause(*assigned)
        try:
            deadline = time.monotonic() + delay_s
            while (left := deadline - time.monotonic()) > 0 and not self._stopping.is_set():
                extra = await self.consumer.getmany(timeout_ms=max(1, int(min(left, 0.5) * 1000)))
                if any(extra.values()):  # a partition assigned meanwhile is not paused: drop, unread
                    for tp, part in extra.items():
                        self.consumer.seek(tp, part[0].offset)
        finally:
            with contextlib.suppress(Exception):
                self.consumer.resume(*[tp for tp in assigned if tp in self.consumer.assignment()])
            self.metrics.paused.dec()

    # -- offsets -----------------------------------------------------------------------------------
    async def _commit(self, tps: Iterable[TopicPartition]) -> None:
        """Commit, per partition, the offset after its acknowledged prefix (if it moved)."""
        async with self._commit_lock:
            offsets = {}
            for tp in tps:
                point = self._acks.commit_point(tp)
                if point is not None:
                    self._done[tp] = max(point, self._done.get(tp, 0))
                if tp in self._done and self._done[tp] > self._committed.get(tp, -1):
                    offsets[tp] = self._done[tp]
            if offsets:
                await self.consumer.commit(offsets)
                self._committed.update(offsets)

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        """Rebalance: wait (bounded) for the batch in flight, commit what is acknowledged, forget."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), REVOKE_WAIT_S)
        try:
            await self._commit(revoked)
        except Exception:
            log.warning(
                "commit on revoke failed; the new owner re-reads (replays are harmless)", exc_info=True
            )
        self._acks.drop(revoked)
        for tp in revoked:
            self._committed.pop(tp, None)
            self._done.pop(tp, None)
            with contextlib.suppress(KeyError):
                self.metrics.lag.remove(tp.topic, str(tp.partition))
        log.info("kafka partitions revoked: %s", sorted((tp.topic, tp.partition) for tp in revoked))

    async def _update_lag(self, force: bool = False) -> None:
        """Lag per partition = high watermark - committed offset, clamped at 0; skipped when unknown."""
        now = time.monotonic()
        if not force and now - self._lag_at < LAG_EVERY_S:
            return
        self._lag_at = now
        for tp in self.consumer.assignment():
            if tp not in self._committed:
                try:
                    committed = await self.consumer.committed(tp)
                except Exception:
                    continue
                self._committed[tp] = committed if committed is not None and committed >= 0 else 0
            high = self.consumer.highwater(tp)
            if high is None:
                continue
            self.metrics.lag.labels(tp.topic, str(tp.partition)).set(max(0, high - self._committed[tp]))

    async def lag(self) -> dict[TopicPartition, int]:
        """The lag per assigned partition now (tests and the CLI)."""
        await self._update_lag(force=True)
        return {
            tp: max(0, (self.consumer.highwater(tp) or 0) - self._committed.get(tp, 0))
            for tp in self.consumer.assignment()
        }


def _where(record: Any) -> tuple[str, int, int]:
    return record.topic, record.partition, record.offset
