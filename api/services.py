"""What the routes need, wired by the composition root (`node`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

import asyncpg
from aiohttp import web

from actors.ports import CoordinatorPort, ShardPort
from api.auth import Authenticator
from api.metrics import Metrics
from api.posting import Poster
from sharding.slots import SlotMap


@dataclass(slots=True)
class Services:
    """The node's parts as the HTTP layer sees them."""

    pool: asyncpg.Pool
    slot_map: SlotMap
    shards: dict[int, ShardPort]
    coordinator: CoordinatorPort
    auth: Authenticator
    poster: Poster
    metrics: Metrics = field(default_factory=Metrics)
    signer: Any = None
    signer_kind: str = "none"
    mtls: bool = False
    hash_alg: str = "sha256"
    base_currency: str = "USD"

    @property
    def signing_configured(self) -> bool:
        """True when journals are signed (by an HSM or the labelled software key)."""
        return self.signer is not None


SERVICES: Final = web.AppKey("services", Services)
