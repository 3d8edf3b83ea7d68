"""Admin endpoints of online resharding (DECISIONS D5: admin only; docs/api.md, "Resharding").

    GET    /admin/shards            shards with their slots, queue depths and throughput
    POST   /admin/shards            {count, rebalance?}: add shards (and spread slots to them)
    DELETE /admin/shards/{id}       move a shard's slots away, stop it, retire it
    POST   /admin/slots/move        {slots: [n | "a-b", ...], to}: move slots to a shard

The work is done by `api.resharding.Resharder` (one operation at a time; a second call waits).
"""

from __future__ import annotations

from typing import Final

import msgspec
from aiohttp import web

from api.auth import ADMINS
from api.envelope import ok
from api.requests import decode_json, json_body
from api.resharding import Resharder
from ledger.errors import ErrorCode, LedgerError
from sharding.rebalance import PlanError, parse_slots

RESHARDER: Final = web.AppKey("resharder", Resharder)


class AddShards(msgspec.Struct, forbid_unknown_fields=True):
    """Body of POST /admin/shards."""

    count: int
    rebalance: bool = True


class MoveSlots(msgspec.Struct, forbid_unknown_fields=True):
    """Body of POST /admin/slots/move."""

    slots: list[int | str]
    to: int


def _resharder(request: web.Request) -> Resharder:
    resharder = request.app.get(RESHARDER)
    if resharder is None:
        raise LedgerError(ErrorCode.INVALID_STATE, "resharding is not available on this node", {})
    return resharder


async def list_shards(request: web.Request) -> web.Response:
    """GET /admin/shards."""
    return ok(**await _resharder(request).overview())


async def add_shards(request: web.Request) -> web.Response:
    """POST /admin/shards: 201 with the new ids and the moves that spread slots to them."""
    body = decode_json(await json_body(request), AddShards)
    return ok(201, **await _resharder(request).add_shards(body.count, body.rebalance))


async def remove_shard(request: web.Request) -> web.Response:
    """DELETE /admin/shards/{id}."""
    try:
        shard_id = int(request.match_info["id"])
    except ValueError:
        raise LedgerError(
            ErrorCode.VALIDATION_ERROR, "shard id must be an integer", {"field": "id"}
        ) from None
    return ok(**await _resharder(request).remove_shard(shard_id))


async def move_slots(request: web.Request) -> web.Response:
    """POST /admin/slots/move."""
    body = decode_json(await json_body(request), MoveSlots)
    try:
        slots = parse_slots(body.slots)
    except PlanError as exc:
        raise LedgerError(ErrorCode.VALIDATION_ERROR, str(exc), {"field": "slots"}) from None
    return ok(**await _resharder(request).move_slots(slots, body.to))


ROUTES: Final = [
    ("GET", "/admin/shards", list_shards, ADMINS),
    ("POST", "/admin/shards", add_shards, ADMINS),
    ("DELETE", "/admin/shards/{id}", remove_shard, ADMINS),
    ("POST", "/admin/slots/move", move_slots, ADMINS),
]
