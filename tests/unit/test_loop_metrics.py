"""`LoopHistogram` and `LoopCounter` expose exactly what prometheus_client's own kinds expose.

The node's hot posting metrics use them (api/metrics.py); a scrape, a dashboard or
`loadtests.latency` must not see a difference. Each test feeds the same observations to both
kinds in two registries and compares the rendered `/metrics` text (prometheus_client's extra
`_created` series aside), including values on bucket bounds, above the last bound, and labels.
"""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from api.metrics import LoopCounter, LoopHistogram, Metrics

BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def rendered(registry: CollectorRegistry) -> list[str]:
    return [line for line in generate_latest(registry).decode().splitlines() if "_created" not in line]


def test_histogram_with_labels_renders_like_prometheus_client() -> None:
    reference, loop = CollectorRegistry(), CollectorRegistry()
    theirs = Histogram("h_seconds", "latency", ["endpoint"], buckets=BOUNDS, registry=reference)
    ours = LoopHistogram("h_seconds", "latency", BOUNDS, ["endpoint"])
    loop.register(ours)
    for endpoint, value in [("post", 0.0005), ("post", 0.001), ("post", 0.003), ("post_batch", 0.7),
                            ("post", 10.0), ("post", 20.0), ("post_batch", 0.0)]:  # fmt: skip
        theirs.labels(endpoint).observe(value)
        ours.labels(endpoint).observe(value)
    assert rendered(loop) == rendered(reference)


def test_histogram_without_labels_and_counter_render_like_prometheus_client() -> None:
    reference, loop = CollectorRegistry(), CollectorRegistry()
    sizes = (1, 10, 100, 1000, 4096, 8190)
    their_sizes = Histogram("journals", "per request", buckets=sizes, registry=reference)
    our_sizes = LoopHistogram("journals", "per request", sizes)
    their_codes = Counter("results_total", "by code", ["code"], registry=reference)
    our_codes = LoopCounter("results", "by code", ["code"])
    for collector in (our_sizes, our_codes):
        loop.register(collector)
    for size in (1, 1, 8190, 9000, 5):
        their_sizes.observe(size)
        our_sizes.observe(size)
    for code, count in [("OK", 1), ("LEDGER_IMBALANCE", 3), ("OK", 2)]:
        their_codes.labels(code).inc(count)
        our_codes.labels(code).inc(count)
    assert rendered(loop) == rendered(reference)


def test_misuse_is_refused() -> None:
    """Wrong label counts, an unlabelled observation of a labelled histogram, a counter going down."""
    histogram = LoopHistogram("h", "h", BOUNDS, ["endpoint"])
    counter = LoopCounter("c", "c", ["code"])
    with pytest.raises(ValueError):
        histogram.labels("a", "b")
    with pytest.raises(ValueError):
        histogram.observe(1.0)
    with pytest.raises(ValueError):
        counter.labels()
    with pytest.raises(ValueError):
        counter.labels("OK").inc(-1)


def test_the_node_registry_names_them_once() -> None:
    """The node's registry renders the three posting series under their documented names."""
    metrics = Metrics()
    metrics.post_latency.labels("post").observe(0.002)
    metrics.request_journals.observe(1)
    metrics.journal_results.labels("OK").inc()
    text = generate_latest(metrics.registry).decode()
    assert 'ledger_post_latency_seconds_count{endpoint="post"} 1.0' in text
    assert 'ledger_post_latency_seconds_bucket{endpoint="post",le="0.0025"} 1.0' in text
    assert "ledger_request_journals_sum 1.0" in text
    assert 'ledger_journal_results_total{code="OK"} 1.0' in text
