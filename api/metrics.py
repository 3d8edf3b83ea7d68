"""Prometheus metrics of the front end (a registry per app, so tests can run several nodes)."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from itertools import accumulate
from typing import Generic, TypeVar, cast

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import INF, floatToGoString

_go_float = cast(Callable[[float], str], floatToGoString)  # how prometheus_client writes `le` (untyped)


class _HistogramSeries:
    """One label set of a `LoopHistogram`: a count per bucket (the last one is +Inf) and the sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        """Count `amount` in the first bucket whose upper bound is >= it (Prometheus's `le`)."""
        self.sum += amount
        self.counts[bisect_left(self.bounds, amount)] += 1


S = TypeVar("S")


class _Labelled(Generic[S]):
    """The series of a loop-only metric, one per label-value tuple, created on first use."""

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], new_series: Callable[[], S]
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.series: dict[tuple[str, ...], S] = {}
        self._new_series = new_series

    def labels(self, *values: str) -> S:
        """The series of these label values (created on first use)."""
        series = self.series.get(values)
        if series is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {values}")
            series = self.series[values] = self._new_series()
        return series


class LoopHistogram(_Labelled[_HistogramSeries]):
    """A Prometheus histogram updated by the event loop's thread only, read at scrape time.

    prometheus_client's `Histogram` takes a lock for the sum and one for the bucket on every
    observation; on the one-journal-per-request path, its three metric updates per request cost
    ~5.8 µs of the front end's CPU, these ~1 (docs/benchmarks.md, "Twelfth session"). The front
    end runs one event loop and renders `/metrics` on it, so nothing else touches these counts.
    The exposition is prometheus_client's (`HistogramMetricFamily`): `_bucket{le}`, `_count`, `_sum`.
    """

    def __init__(
        self, name: str, documentation: str, buckets: Sequence[float], labelnames: Sequence[str] = ()
    ) -> None:
        bounds = tuple(sorted(float(b) for b in buckets if b != INF))
        super().__init__(name, documentation, labelnames, lambda: _HistogramSeries(bounds))
        self.bounds = bounds
        self._unlabelled = None if labelnames else self.labels()

    def observe(self, amount: float) -> None:
        """Observe into the histogram without labels."""
        if self._unlabelled is None:
            raise ValueError(f"{self.name} has labels {self.labelnames}: use labels(...).observe")
        self._unlabelled.observe(amount)

    def describe(self) -> Iterator[Metric]:
        yield HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        edges = [_go_float(b) for b in self.bounds] + ["+Inf"]
        for values, series in self.series.items():
            buckets = list(zip(edges, accumulate(series.counts), strict=True))
            family.add_metric(list(values), buckets, series.sum)
        yield family


class _CounterSeries:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        """Add `amount` (>= 0)."""
        if amount < 0:
            raise ValueError("a counter only goes up")
        self.value += amount


class LoopCounter(_Labelled[_CounterSeries]):
    """A labelled Prometheus counter updated by the event loop's thread only (see `LoopHistogram`).

    `name` is given without `_total`; the exposition adds it, as prometheus_client does.
    """

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str]) -> None:
        super().__init__(name, documentation, labelnames, _CounterSeries)

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, series in self.series.items():
            family.add_metric(list(values), series.value)
        yield family


class Metrics:
    """The node's metrics; `/metrics` renders `registry`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # Updated on every posting request: the loop-only kind (see `LoopHistogram`).
        self.post_latency = LoopHistogram(
            "ledger_post_latency_seconds",
            "Time from request decoded to answer, per posting endpoint",
            (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            ["endpoint"],
        )
        self.request_journals = LoopHistogram(
            "ledger_request_journals", "Journals per posting request", (1, 10, 100, 1000, 4096, 8190)
        )
        self.journal_results = LoopCounter("ledger_journal_results", "Journal outcomes by code", ["code"])
        for collector in (self.post_latency, self.request_journals, self.journal_results):
            self.registry.register(collector)
        self.shard_queue_depth = Gauge(
            "ledger_shard_queue_depth",
            "Journals waiting, per destination (front-end batcher and actor queue)",
            ["destination", "where"],
            registry=self.registry,
        )
        self.call_batch_size = Gauge(
            "ledger_actor_call_journals_avg",
            "Average journals per Ray call",
            ["destination"],
            registry=self.registry,
        )
        self.shard_commits = Gauge(
            "ledger_shard_group_commits",
            "Group commits (PostgreSQL transactions with their batch signature) since the shard started",
            ["shard"],
            registry=self.registry,
        )
        self.shard_journals = Gauge(
            "ledger_shard_committed_journals",
            "Journals and cross-shard parts committed since the shard started",
            ["shard"],
            registry=self.registry,
        )
        self.shed_requests = Counter(
            "ledger_shed_requests_total",
            "Requests refused to shed load (api/limits.py), by reason: rate_limited, token_in_flight (429); "
            "overloaded (503)",
            ["reason"],
            registry=self.registry,
        )
        self.shed_journals = Gauge(
            "ledger_queue_shed_journals",
            "Journals answered 503 since the node started because their destination's front-end queue "
            "was full (LEDGER_SHARD_QUEUE_MAX)",
            ["destination"],
            registry=self.registry,
        )
        self.in_flight_requests = Gauge(
            "ledger_in_flight_requests", "Requests being handled (bounded by LEDGER_IN_FLIGHT_MAX)",
            registry=self.registry,
        )  # fmt: skip
        self.payout_schedule_last_run = Gauge(
            "ledger_payout_schedule_last_run_timestamp_seconds",
            "Unix time at which the last scheduled payout run started (LEDGER_PAYOUT_SCHEDULE)",
            registry=self.registry,
        )
        self.payout_schedule_runs = Counter(
            "ledger_payout_schedule_runs_total", "Scheduled payout runs started", registry=self.registry
        )
        self.payout_schedule_failures = Counter(
            "ledger_payout_schedule_failures_total",
            "Scheduled payout runs that raised (retried at the next scheduled time)",
            registry=self.registry,
        )
        self.twophase_outcomes = Gauge(
            "ledger_twophase_outcomes", "Cross-shard outcomes since the coordinator started", ["outcome"],
            registry=self.registry,
        )  # fmt: skip
        self.twophase_log_vacuums = Gauge(
            "ledger_twophase_log_vacuums",
            "VACUUMs of the coordinator's xtx log since it started, by result (ok, failed)",
            ["result"],
            registry=self.registry,
        )


class KafkaMetrics:
    """The Kafka consumer's metrics (api/kafka_consumer.py), in the node's registry or their own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.consumed = Counter(
            "ledger_kafka_consumed_total", "Records taken from the topic", ["topic"], registry=self.registry
        )
        self.events = Counter(
            "ledger_kafka_events_total",
            "Events acknowledged by the ledger, by outcome (posted, replayed)",
            ["topic", "outcome"],
            registry=self.registry,
        )
        self.dead_letters = Counter(
            "ledger_kafka_dlq_total",
            "Records sent to the dead-letter topic, by reason (undecodable, invalid, rejected) and code",
            ["reason", "code"],
            registry=self.registry,
        )
        self.retries = Counter(
            "ledger_kafka_retries_total",
            "Events (or batches) retried after a retryable failure, by reason",
            ["reason"],
            registry=self.registry,
        )
        self.lag = Gauge(
            "ledger_kafka_consumer_lag",
            "High watermark minus committed offset, per assigned partition",
            ["topic", "partition"],
            registry=self.registry,
        )
        self.batch_seconds = Histogram(
            "ledger_kafka_batch_seconds",
            "Time from a batch taken to its offsets committed",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
            registry=self.registry,
        )
        self.paused = Gauge(
            "ledger_kafka_paused", "Consumers paused for a retry (0 when none)", registry=self.registry
        )
