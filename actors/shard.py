"""Ray shells around the shard engine and the coordinator engine.

Each shell builds its engine in `__init__` (which Ray reruns on every restart) and starts
it on the first call, so a restarted actor rebuilds its state from PostgreSQL before it
answers anything. Calls that were in flight when an actor died fail in the caller with a
Ray error; the caller answers them as retryable and idempotent retries resolve them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import Any

import ray

from actors.coordinator_engine import CoordinatorEngine
from actors.direct import Address, DirectServer
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
    """Starts an engine once, on first use; concurrent first calls share the start.

    A start that fails (PostgreSQL unreachable while the actor (re)starts) is not remembered:
    the half-started engine is closed and replaced by a fresh one, and the next call tries again,
    so an actor restarted during an outage serves again once the database is back.
    """

    def __init__(self, shell: Any) -> None:
        self.shell = shell
        self._started: asyncio.Future[None] | None = None

    async def ready(self) -> None:
        if self._started is None:
            self._started = asyncio.ensure_future(self._start())
        await asyncio.shield(self._started)

    async def _start(self) -> None:
        try:
            await self.shell.engine.start()
        except BaseException:
            self._started = None
            with contextlib.suppress(Exception):
                await self.shell.engine.close()
            self.shell.engine = self.shell.make_engine()
            raise
        tune_gc()  # after the engine loaded its state: freeze it, collect rarely (gc_policy.py)


class DirectMethods:
    """Mixin: the actor serves `direct_methods` over a direct connection (actors/direct.py)."""

    direct_methods: tuple[str, ...] = ()
    _direct: DirectServer | None = None

    async def direct_address(self) -> Address:
        """Start the direct server if needed; `(host, port, token)` for `DirectClient`."""
        if self._direct is None:
            self._direct = DirectServer({name: getattr(self, name) for name in self.direct_methods})
        return await self._direct.start(str(ray.util.get_node_ip_address()))  # type: ignore[no-untyped-call]


def _restart_process(reason: str) -> None:
    """An engine's `on_state_lost`: end this worker so Ray restarts the actor from PostgreSQL."""
    logging.getLogger(__name__).critical("restarting the actor: %s", reason)
    logging.shutdown()
    os._exit(1)


@ray.remote(**ACTOR_OPTIONS)
class ShardActor(DirectMethods):
    """One shard: the single writer of the accounts in its slots."""

    direct_methods = ("post", "prepare", "decide", "hold")

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

        def make_engine() -> ShardEngine:
            engine = ShardEngine(shard_id, dsn, slots, batch_max=batch_max, signer=signer, hash_alg=hash_alg)
            engine.on_state_lost = _restart_process
            return engine

        self.make_engine = make_engine
        self.engine = make_engine()
        self.lazy = _Lazy(self)

    async def post(self, payload: bytes) -> bytes:
        await self.lazy.ready()
        return await self.engine.post(payload)

    async def prepare(self, payload: bytes) -> bytes:
        await self.lazy.ready()
        return await self.engine.prepare(payload)

    async def decide(self, payload: bytes) -> bytes:
        await self.lazy.ready()
        return await self.engine.decide(payload)

    async def create_account(self, account_id: str, no_negative: bool, split: bool = False) -> bytes:
        await self.lazy.ready()
        return await self.engine.create_account(account_id, no_negative, split)

    async def hold(self, payload: bytes) -> bytes:
        await self.lazy.ready()
        return await self.engine.hold(payload)

    async def move(self, op: str, slots: list[int]) -> dict[str, Any]:
        """A slot handoff step (actors/shard_moves.py)."""
        await self.lazy.ready()
        return await self.engine.move(op, slots)

    async def status(self) -> dict[str, Any]:
        await self.lazy.ready()
        return {**self.engine.status(), "direct_calls": self._direct.calls if self._direct else 0}

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
class CoordinatorActor(DirectMethods):
    """The cross-shard coordinator (two-phase commit with a durable decision log)."""

    direct_methods = ("submit",)

    def __init__(
        self, dsn: str, prefix: str, shard_ids: list[int], batch_max: int, hash_alg: str = "sha256"
    ) -> None:
        logging.basicConfig(level=logging.INFO)
        shards = _ShardsByName(prefix, shard_ids)

        def make_engine() -> CoordinatorEngine:
            engine = CoordinatorEngine(dsn, shards, batch_max=batch_max, hash_alg=hash_alg)
            engine.on_state_lost = _restart_process
            return engine

        self.make_engine = make_engine
        self.engine = make_engine()
        self.lazy = _Lazy(self)

    async def submit(self, payload: bytes) -> bytes:
        await self.lazy.ready()
        return await self.engine.submit(payload)

    async def status(self) -> dict[str, Any]:
        await self.lazy.ready()
        return self.engine.status()


@ray.remote(**ACTOR_OPTIONS)
class SignerActor(DirectMethods):
    """The signer: one key backend (HSM or software), the global log and its checkpoints."""

    direct_methods = ("sign_statements",)

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

        def make_engine() -> SignerEngine:
            return SignerEngine(
                dsn,
                lambda: backend_from_env(env, directory),
                hash_alg=hash_alg,
                checkpoint_every_s=checkpoint_every_s,
            )

        self.make_engine = make_engine
        self.engine = make_engine()
        self.lazy = _Lazy(self)

    async def sign_statements(self, statements: list[dict[str, Any]]) -> list[tuple[bytes, str, bytes]]:
        await self.lazy.ready()
        return self.engine.sign_statements(statements)

    async def checkpoint(self) -> int:
        await self.lazy.ready()
        return await self.engine.checkpoint()

    async def log_proof(self, index: int, tree_size: int) -> list[bytes]:
        await self.lazy.ready()
        return self.engine.log_proof(index, tree_size)

    async def consistency(self, old_size: int, new_size: int) -> list[bytes]:
        await self.lazy.ready()
        return self.engine.consistency(old_size, new_size)

    async def rotate(self) -> str:
        await self.lazy.ready()
        return await self.engine.rotate()

    async def set_failing(self, failing: bool) -> None:
        """Fault injection for tests and drills: make every signature fail until reset."""
        await self.lazy.ready()
        self.engine.failing = failing

    async def status(self) -> dict[str, Any]:
        await self.lazy.ready()
        return self.engine.status()
