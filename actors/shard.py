"""Ray shells around the shard engine and the coordinator engine.

Each shell builds its engine in `__init__` (which Ray reruns on every restart) and starts
it on the first call, so a restarted actor rebuilds its state from PostgreSQL before it
answers anything. Calls that were in flight when an actor died fail in the caller with a
Ray error; the caller answers them as retryable and idempotent retries resolve them.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import ray

from actors.coordinator_engine import CoordinatorEngine
from actors.gc_policy import tune_gc
from actors.shard_engine import ShardEngine
from actors.signer_engine import SignerEngine

ACTOR_OPTIONS: dict[str, Any] = {
    "max_restarts": -1,
    "max_task_retries": 0,
    "num_cpus": 0,
    "max_concurrency": 4096,
}


class _Lazy:
    """Starts an engine once, on first use; concurrent first calls share the start."""

    def __init__(self) -> None:
        self._started: asyncio.Future[None] | None = None

    async def ready(self, start: Any) -> None:
        if self._started is None:
            self._started = asyncio.ensure_future(self._start(start))
        await asyncio.shield(self._started)

    @staticmethod
    async def _start(start: Any) -> None:
        await start()
        tune_gc()  # after the engine loaded its state: freeze it, collect rarely (gc_policy.py)


@ray.remote(**ACTOR_OPTIONS)
class ShardActor:
    """One shard: the single writer of the accounts in its slots."""

    def __init__(
        self,
        shard_id: int,
        dsn: str,
        slots: list[int],
        batch_max: int,
        prefix: str,
        signing: bool,
        hash_alg: str = "sha256",
    ) -> None:
        from actors.runtime import RaySigner

        logging.basicConfig(level=logging.INFO)
        signer = RaySigner(ray.get_actor(f"{prefix}-signer")) if signing else None
        self.engine = ShardEngine(shard_id, dsn, slots, batch_max=batch_max, signer=signer, hash_alg=hash_alg)
        self.lazy = _Lazy()

    async def post(self, payload: bytes) -> bytes:
        await self.lazy.ready(self.engine.start)
        return await self.engine.post(payload)

    async def prepare(self, payload: bytes) -> bytes:
        await self.lazy.ready(self.engine.start)
        return await self.engine.prepare(payload)

    async def decide(self, payload: bytes) -> bytes:
        await self.lazy.ready(self.engine.start)
        return await self.engine.decide(payload)

    async def create_account(self, account_id: str, no_negative: bool, split: bool = False) -> bytes:
        await self.lazy.ready(self.engine.start)
        return await self.engine.create_account(account_id, no_negative, split)

    async def hold(self, payload: bytes) -> bytes:
        await self.lazy.ready(self.engine.start)
        return await self.engine.hold(payload)

    async def move(self, op: str, slots: list[int]) -> dict[str, Any]:
        """A slot handoff step (actors/shard_moves.py)."""
        await self.lazy.ready(self.engine.start)
        return await self.engine.move(op, slots)

    async def status(self) -> dict[str, Any]:
        await self.lazy.ready(self.engine.start)
        return self.engine.status()

    async def node_id(self) -> str:
        """The Ray node this incarnation runs on (answers before the engine has loaded its state)."""
        return str(ray.get_runtime_context().get_node_id())


class _ShardsByName(dict[int, Any]):
    """Shard ports by id; a shard added by resharding after this actor started (or restarted with
    the ids it was created with) is looked up by its actor name on first use."""

    def __init__(self, prefix: str, shard_ids: list[int]) -> None:
        super().__init__()
        self.prefix = prefix
        for shard_id in shard_ids:
            self[shard_id]

    def __missing__(self, shard_id: int) -> Any:
        from actors.runtime import RayShard

        port = self[shard_id] = RayShard(ray.get_actor(f"{self.prefix}-shard-{shard_id}"))
        return port


@ray.remote(**ACTOR_OPTIONS)
class CoordinatorActor:
    """The cross-shard coordinator (two-phase commit with a durable decision log)."""

    def __init__(
        self, dsn: str, prefix: str, shard_ids: list[int], batch_max: int, hash_alg: str = "sha256"
    ) -> None:
        logging.basicConfig(level=logging.INFO)
        self.engine = CoordinatorEngine(dsn, _ShardsByName(prefix, shard_ids), batch_max=batch_max,
                                        hash_alg=hash_alg)  # fmt: skip
        self.lazy = _Lazy()

    async def submit(self, payload: bytes) -> bytes:
        await self.lazy.ready(self.engine.start)
        return await self.engine.submit(payload)

    async def status(self) -> dict[str, Any]:
        await self.lazy.ready(self.engine.start)
        return self.engine.status()


@ray.remote(**ACTOR_OPTIONS)
class SignerActor:
    """The signer: one key backend (HSM or software), the global log and its checkpoints."""

    def __init__(
        self,
        dsn: str,
        env: dict[str, str],
        data_dir: str | None,
        checkpoint_every_s: float,
        hash_alg: str = "sha256",
    ) -> None:
        import os
        from pathlib import Path

        from signer.keys import backend_from_env

        logging.basicConfig(level=logging.INFO)
        if "SOFTHSM2_CONF" in env:  # SoftHSM reads its configuration from the process environment
            os.environ["SOFTHSM2_CONF"] = env["SOFTHSM2_CONF"]
        directory = Path(data_dir) if data_dir else None
        self.engine = SignerEngine(
            dsn,
            lambda: backend_from_env(env, directory),
            hash_alg=hash_alg,
            checkpoint_every_s=checkpoint_every_s,
        )
        self.lazy = _Lazy()

    async def sign_statements(self, statements: list[dict[str, Any]]) -> list[tuple[bytes, str, bytes]]:
        await self.lazy.ready(self.engine.start)
        return self.engine.sign_statements(statements)

    async def checkpoint(self) -> int:
        await self.lazy.ready(self.engine.start)
        return await self.engine.checkpoint()

    async def log_proof(self, index: int, tree_size: int) -> list[bytes]:
        await self.lazy.ready(self.engine.start)
        return self.engine.log_proof(index, tree_size)

    async def consistency(self, old_size: int, new_size: int) -> list[bytes]:
        await self.lazy.ready(self.engine.start)
        return self.engine.consistency(old_size, new_size)

    async def rotate(self) -> str:
        await self.lazy.ready(self.engine.start)
        return await self.engine.rotate()

    async def set_failing(self, failing: bool) -> None:
        """Fault injection for tests and drills: make every signature fail until reset."""
        await self.lazy.ready(self.engine.start)
        self.engine.failing = failing

    async def status(self) -> dict[str, Any]:
        await self.lazy.ready(self.engine.start)
        return self.engine.status()
