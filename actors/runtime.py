"""Ray runtime: start or join a cluster, spawn the shard actors and the coordinator.

This module and the actor shells are the only code that imports `ray` (STYLE.md).
Actors reserve no CPU (`num_cpus=0`): they are I/O-bound single writers, and the 2-core
machines we run on would otherwise refuse to schedule four shards plus a coordinator.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import ray

from actors.direct import Address, DirectClient
from actors.ports import CoordinatorPort, ShardPort
from actors.shard import CoordinatorActor, ShardActor, SignerActor

log = logging.getLogger(__name__)

# Keep batch arguments (several MiB for 8,190 journals) inline in the task spec rather
# than going through the object store, which costs 2-4x more per call.
INLINE_ARGS_MAX = 64 * 1024 * 1024

DIRECT_CALLS = os.environ.get("LEDGER_DIRECT_CALLS", "1") != "0"
"""Hot methods (shard post/prepare/decide/hold, coordinator submit, signer sign_statements) over
direct connections (actors/direct.py) instead of Ray calls; `LEDGER_DIRECT_CALLS=0` turns it off."""


def start_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Start a local Ray instance (or join `address`); a no-op if Ray is already up."""
    if ray.is_initialized():
        return
    options: dict[str, Any] = {
        "include_dashboard": False,
        "logging_level": logging.WARNING,
        "log_to_driver": True,
    }
    if address:
        _allow_cluster()
        ray.init(address=address, **options)
        return
    # Ray runs workers at nice 15 by default (it expects them to be batch jobs). Our shard
    # actors are latency-critical single writers: at nice 15 every other process on a 2-core
    # machine preempts them in the middle of a group commit, holding PostgreSQL transactions
    # open. Run them at normal priority.
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(
        address="local",
        num_cpus=num_cpus,
        _system_config={"max_direct_call_object_size": INLINE_ARGS_MAX},
        **options,
    )


def _allow_cluster() -> None:
    """Undo actors/__init__.py's loopback-only switch when joining a cluster by `--ray-address`.

    That switch is set at import unless `LEDGER_RAY_ADDRESS` is in the environment; with the flag
    alone the driver would register itself as 127.0.0.1, which nodes on other machines cannot reach.
    """
    from ray._private import ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "1"
    ray_constants.ENABLE_RAY_CLUSTER = True


def stop_ray() -> None:
    """Shut the local Ray instance down."""
    if ray.is_initialized():
        ray.shutdown()


class DirectPort:
    """A port over an actor handle whose hot methods go through a `DirectClient` when enabled."""

    def __init__(self, handle: Any, direct: bool | None = None) -> None:
        self.handle = handle
        enabled = DIRECT_CALLS if direct is None else direct
        self.direct = DirectClient(self._address, type(self).__name__) if enabled else None

    async def _address(self) -> Address:
        host, port, token = await self.handle.direct_address.remote()
        return str(host), int(port), bytes(token)

    async def _call(self, method: str, argument: Any) -> Any:
        if self.direct is not None:
            return await self.direct.call(method, argument)
        return await getattr(self.handle, method).remote(argument)


class RayShard(DirectPort):
    """`ShardPort` over a shard actor handle (post, prepare, decide and hold direct)."""

    async def post(self, payload: bytes) -> bytes:
        return await self._call("post", payload)  # type: ignore[no-any-return]

    async def prepare(self, payload: bytes) -> bytes:
        return await self._call("prepare", payload)  # type: ignore[no-any-return]

    async def decide(self, payload: bytes) -> bytes:
        return await self._call("decide", payload)  # type: ignore[no-any-return]

    async def create_account(self, account_id: str, no_negative: bool, split: bool = False) -> bytes:
        return await self.handle.create_account.remote(account_id, no_negative, split)  # type: ignore[no-any-return]

    async def hold(self, payload: bytes) -> bytes:
        return await self._call("hold", payload)  # type: ignore[no-any-return]

    async def move(self, op: str, slots: list[int]) -> dict[str, Any]:
        return await self.handle.move.remote(op, slots)  # type: ignore[no-any-return]

    async def status(self) -> dict[str, Any]:
        return await self.handle.status.remote()  # type: ignore[no-any-return]

    async def node_id(self) -> str:
        """The hex id of the Ray node the shard actor runs on (its placement, for `/health`)."""
        return await self.handle.node_id.remote()  # type: ignore[no-any-return]


class RayCoordinator(DirectPort):
    """`CoordinatorPort` over the coordinator actor handle (submit direct)."""

    async def submit(self, payload: bytes) -> bytes:
        return await self._call("submit", payload)  # type: ignore[no-any-return]

    async def status(self) -> dict[str, Any]:
        return await self.handle.status.remote()  # type: ignore[no-any-return]


def shard_placement(resource: str, amount: float) -> dict[str, Any]:
    """Ray options that put shard actors only on nodes offering `amount` of the custom `resource`.

    Operators start the nodes that may hold shards with `ray start --resources='{"ledger_shard": N}'`
    (N shard actors at amount 1). `SPREAD` spreads the shards over those nodes instead of packing
    them on the first. When a node dies, Ray restarts its shards (`max_restarts=-1`) on any
    surviving node with the resource free; each rebuilds its state from PostgreSQL. An empty
    `resource` means no constraint (the local single-node cluster of `ledger-node serve`).
    """
    if not resource:
        return {}
    return {"resources": {resource: amount}, "scheduling_strategy": "SPREAD"}


def spawn_shards(
    prefix: str,
    dsn: str,
    slots_of: dict[int, list[int]],
    batch_max: int,
    signing: bool = True,
    hash_alg: str = "sha256",
    placement: dict[str, Any] | None = None,
) -> dict[int, RayShard]:
    """One restartable actor per shard, named `{prefix}-shard-{id}` (the signer must exist first);
    `placement` are extra actor options (see `shard_placement`)."""
    return {
        shard_id: RayShard(
            ShardActor.options(name=f"{prefix}-shard-{shard_id}", **(placement or {})).remote(  # type: ignore[attr-defined]
                shard_id, dsn, slots, batch_max, prefix, signing, hash_alg
            )
        )
        for shard_id, slots in sorted(slots_of.items())
    }


class RaySigner(DirectPort):
    """`SignerPort` (and admin calls) over the signer actor handle (sign_statements direct)."""

    async def sign_statements(self, statements: list[dict[str, Any]]) -> list[tuple[bytes, str, bytes]]:
        signed = await self._call("sign_statements", statements)
        return [(bytes(body), str(kid), bytes(signature)) for body, kid, signature in signed]

    async def checkpoint(self) -> int:
        return await self.handle.checkpoint.remote()  # type: ignore[no-any-return]

    async def log_proof(self, index: int, tree_size: int) -> list[bytes]:
        return await self.handle.log_proof.remote(index, tree_size)  # type: ignore[no-any-return]

    async def consistency(self, old_size: int, new_size: int) -> list[bytes]:
        return await self.handle.consistency.remote(old_size, new_size)  # type: ignore[no-any-return]

    async def rotate(self) -> str:
        return await self.handle.rotate.remote()  # type: ignore[no-any-return]

    async def set_failing(self, failing: bool) -> None:
        await self.handle.set_failing.remote(failing)

    async def status(self) -> dict[str, Any]:
        return await self.handle.status.remote()  # type: ignore[no-any-return]


SIGNER_ENV_KEYS = (
    "LEDGER_PKCS11_MODULE",
    "LEDGER_PKCS11_TOKEN",
    "LEDGER_PKCS11_PIN",
    "LEDGER_PKCS11_PIN_FILE",
    "LEDGER_SIGNER_KEY_LABEL",
    "SOFTHSM2_CONF",
)


def spawn_signer(
    prefix: str,
    dsn: str,
    env: dict[str, str],
    data_dir: str | None,
    checkpoint_every_s: float,
    hash_alg: str = "sha256",
) -> RaySigner:
    """The restartable signer actor, named `{prefix}-signer`; it gets only the signer's settings."""
    settings = {key: env[key] for key in SIGNER_ENV_KEYS if key in env}
    return RaySigner(
        SignerActor.options(name=f"{prefix}-signer").remote(  # type: ignore[attr-defined]
            dsn, settings, data_dir, checkpoint_every_s, hash_alg
        )
    )


def spawn_coordinator(
    prefix: str, dsn: str, shards: dict[int, RayShard], batch_max: int, hash_alg: str = "sha256"
) -> RayCoordinator:
    """The restartable coordinator actor, named `{prefix}-coordinator`."""
    return RayCoordinator(
        CoordinatorActor.options(name=f"{prefix}-coordinator").remote(  # type: ignore[attr-defined]
            dsn, prefix, sorted(shards), batch_max, hash_alg
        )
    )


async def wait_ready(ports: list[ShardPort | CoordinatorPort], timeout_s: float = 120.0) -> None:
    """Wait until every actor has loaded its state and answers."""
    await asyncio.wait_for(asyncio.gather(*(port.status() for port in ports)), timeout_s)


def kill(port: RayShard | RayCoordinator | RaySigner, restart: bool = True) -> None:
    """Kill an actor (Ray restarts it unless `restart` is False). Used by fault tests and shutdown."""
    ray.kill(port.handle, no_restart=not restart)
