"""Ports between the front end, the coordinator and the shards (`typing.Protocol`s).

The Ray shells implement them over actor handles; tests may implement them with the
engines directly. Payloads are msgpack batches (see `actors.messages`).
"""

from __future__ import annotations

from typing import Any, Protocol


class ShardPort(Protocol):
    """What the front end and the coordinator call on a shard."""

    async def post(self, payload: bytes) -> bytes: ...
    async def prepare(self, payload: bytes) -> bytes: ...
    async def decide(self, payload: bytes) -> bytes: ...
    async def create_account(self, account_id: str, no_negative: bool, split: bool = False) -> bytes: ...
    async def hold(self, payload: bytes) -> bytes: ...
    async def status(self) -> dict[str, Any]: ...


class ShardMovesPort(Protocol):
    """A shard as the resharding orchestrator drives it (steps: actors/shard_moves.py)."""

    async def move(self, op: str, slots: list[int]) -> dict[str, Any]: ...
    async def status(self) -> dict[str, Any]: ...


class CoordinatorPort(Protocol):
    """What the front end calls on the coordinator."""

    async def submit(self, payload: bytes) -> bytes: ...
    async def status(self) -> dict[str, Any]: ...


class SignerPort(Protocol):
    """What a shard calls on the signer: sign batch statements (the signer fills in its key id)."""

    async def sign_statements(self, statements: list[dict[str, Any]]) -> list[tuple[bytes, str, bytes]]: ...
