"""Session-wide test infrastructure: one local Ray cluster for the whole session (never per test)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.support.node import NodeHarness

os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """Start Ray once for the session (2 CPUs, like the CI machine)."""
    from actors.runtime import start_ray, stop_ray

    start_ray(num_cpus=2)
    yield
    stop_ray()


@pytest.fixture(scope="module")
def node(ray_cluster: None) -> Iterator[NodeHarness]:
    """A running node with 4 shards and its own database, shared by the tests of one module."""
    harness = NodeHarness().start()
    yield harness
    harness.stop()


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[str]:
    """A Tansu broker (Kafka protocol, in-memory) on a free loopback port; yields `host:port`."""
    from tests.support.tansu import TansuBroker

    broker = TansuBroker().start()
    yield broker.bootstrap
    broker.stop()
