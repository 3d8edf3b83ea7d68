"""Prometheus metrics of the front end (a registry per app, so tests can run several nodes)."""

from __future__ import annotations

from typing import TypeVar, cast

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

M = TypeVar("M", bound=MetricWrapperBase)


class Metrics:
    """The node's metrics; `/metrics` renders `registry`."""

    def __init__(self) -> None:
        self._children: dict[tuple[MetricWrapperBase, tuple[str, ...]], MetricWrapperBase] = {}
        self.registry = CollectorRegistry()
        self.post_latency = Histogram(
            "ledger_post_latency_seconds",
            "Time from request decoded to answer, per posting endpoint",
            ["endpoint"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=self.registry,
        )
        self.request_journals = Histogram(
            "ledger_request_journals",
            "Journals per posting request",
            buckets=(1, 10, 100, 1000, 4096, 8190),
            registry=self.registry,
        )
        self.journal_results = Counter(
            "ledger_journal_results_total", "Journal outcomes by code", ["code"], registry=self.registry
        )
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

    def child(self, metric: M, *labels: str) -> M:
        """`metric.labels(*labels)`, remembered: the same child, without prometheus_client's lock and
        checks on every request (label values here come from small fixed sets: endpoints, codes)."""
        key = (metric, labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return cast(M, found)  # a child of `metric`: its own type


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
