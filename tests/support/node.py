"""A real node for tests: its own database on the shared PostgreSQL, real Ray actors, real HTTP.

The node runs in a background thread with its own event loop (as `ledger-node serve`
would run in its own process), so tests talk to it over loopback HTTP exactly like a
client. Ray itself is one local cluster per test session (see tests/conftest.py).
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from api.kafka_consumer import KafkaSettings
from api.limits import LimitSettings
from node.config import NodeConfig
from node.runtime import Node
from sharding.slots import SlotMap, even_slot_map
from tests.support.databases import SHARED_ADMIN_DSN, create_database, drop_database

TOKENS = {"service": "svc-token", "operator": "op-token", "auditor": "aud-token", "admin": "adm-token"}
TOKEN_SPEC = ",".join(f"{token}={role}" for role, token in TOKENS.items())


class NodeHarness:
    """Starts a node on a free port against a fresh database; `url`, `dsn`, `stop()`."""

    def __init__(
        self,
        shards: int = 4,
        batch_max: int = 8192,
        signing: bool = True,
        signer_env: dict[str, str] | None = None,
        hash_alg: str | None = None,
        recognition_interval_s: float | None = None,
        payout_schedule: str | None = None,
        kafka: KafkaSettings | None = None,
        route_database: Callable[[str], str] | None = None,
        config_overrides: dict[str, Any] | None = None,
        limits: LimitSettings | None = None,
        database_url: str | None = None,
        admin_dsn: str = SHARED_ADMIN_DSN,
    ) -> None:
        self.admin_dsn = admin_dsn
        """The server the node's database is made on (the shared one, or a PostgreSQL the test owns)."""
        self.kafka = kafka
        self.route_database = route_database
        """Maps the database's DSN to the one the node is given (e.g. through a fault proxy)."""
        self.config_overrides = config_overrides or {}
        self.limits = limits
        self.database_url = database_url  # an existing database to serve (dropped by stop() all the same)
        self.shards = shards
        self.recognition_interval_s = recognition_interval_s
        self.payout_schedule = payout_schedule
        self.hash_alg = hash_alg
        self.batch_max = batch_max
        self.signing = signing
        self.signer_env = signer_env or {}
        self.data_dir = Path()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="ledger-node", daemon=True)
        self.node: Node | None = None
        self.dsn = ""

    def run(self, coro: Coroutine[Any, Any, Any], timeout_s: float = 180.0) -> Any:
        """Run a coroutine on the node's loop and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def start(self) -> NodeHarness:
        """Create the database, start the node, return self."""
        self.thread.start()
        self.dsn = self.database_url or self.run(create_database("ledger_node", self.admin_dsn))
        self.data_dir = Path(tempfile.mkdtemp(prefix="ledger-node-test-"))
        config = NodeConfig(
            port=0,
            shards=self.shards,
            database_url=self.route_database(self.dsn) if self.route_database else self.dsn,
            api_tokens=TOKEN_SPEC,
            batch_max=self.batch_max,
            data_dir=self.data_dir,
            signing=self.signing,
            signer_env=self.signer_env,
            checkpoint_every_s=0.1,
            hash_alg=self.hash_alg,
            kafka=self.kafka,
        )
        if self.recognition_interval_s is not None:
            config.recognition_interval_s = self.recognition_interval_s
        if self.payout_schedule is not None:
            config.payout_schedule = self.payout_schedule
        for name, value in self.config_overrides.items():
            setattr(config, name, value)
        if self.limits is not None:
            config.limits = self.limits
        self.node = Node(config)
        self.run(self.node.start())
        return self

    def restart(self) -> None:
        """Stop the node (HTTP, actors, pool) and start it again on the same database and port."""
        assert self.node is not None
        config = self.node.config
        self.run(self.node.stop())
        self.node = Node(config)
        self.run(self.node.start())

    @property
    def url(self) -> str:
        """Base URL of the node."""
        assert self.node is not None
        return self.node.url

    def stop(self) -> None:
        """Stop the node and drop its database."""
        if self.node is not None:
            self.run(self.node.stop())
        if self.dsn:
            self.run(drop_database(self.dsn, self.admin_dsn))
        if self.data_dir != Path():
            shutil.rmtree(self.data_dir, ignore_errors=True)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def auth(role: str = "service") -> dict[str, str]:
    """Headers for a role's token."""
    return {"Authorization": f"Bearer {TOKENS[role]}"}


def journal(
    journal_id: str | None, debit: str, credit: str, amount: int = 100, currency: str = "USD"
) -> dict[str, Any]:
    """A two-line journal body."""
    body: dict[str, Any] = {
        "entries": [
            {"account_id": debit, "side": "debit", "amount_cents": amount, "currency": currency},
            {"account_id": credit, "side": "credit", "amount_cents": amount, "currency": currency},
        ],
        "context": {"source": "test"},
    }
    if journal_id is not None:
        body["journal_id"] = journal_id
    return body


def accounts_on_shard(shard: int, count: int, prefix: str, shards: int = 4) -> list[str]:
    """`count` account ids `prefix:N` that the initial slot map of a `shards`-shard node puts on `shard`."""
    slot_map = SlotMap(even_slot_map(shards))
    found: list[str] = []
    n = 0
    while len(found) < count:
        account = f"{prefix}:{n}"
        if slot_map.shard_of(account) == shard:
            found.append(account)
        n += 1
    return found


async def check_store(dsn: str) -> list[Any]:
    """`ledger-node check`'s findings on a node's database (an empty list when all is well)."""
    import asyncpg

    from store.check import run_check

    conn = await asyncpg.connect(dsn)
    try:
        return await run_check(conn)
    finally:
        await conn.close()
