"""Hold calls made by the API room on behalf of a flow (payouts, escrow), and split accounts.

A flow that reserves money builds a two-line journal, sends it to the owning shard as a hold
(`create_hold`) under its own system principal, and later posts it in full or voids it
(`resolve_hold`). Every call is idempotent at the shard: the same hold id, principal and request
again is answered as a replay, which is what lets a flow resume after a crash. The HTTP hold
endpoints (`api/hold_routes.py`) use `send_hold`, `result_error`, `VOID_HASH` and `post_digest`
for the same calls made by clients.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, Final

import asyncpg
import msgspec

from actors.messages import ENCODER, JOURNAL, RESULTS, HoldItem, Result
from api.services import Services
from ledger.errors import ErrorCode, LedgerError
from ledger.journal import JournalIn, Line, validate_journal
from signer.canonical import canonical, request_hash
from store import holds_repo

VOID_HASH: Final = hashlib.sha256(b"void").digest()
"""The request hash of every void (a void has no parameters)."""


def result_error(result: Result) -> LedgerError:
    """The error a failed shard result stands for."""
    code = ErrorCode(result.code or ErrorCode.INTERNAL_ERROR)
    return LedgerError(code, result.message or code.value, dict(result.details or {}))


def post_digest(lines: Sequence[Line]) -> bytes:
    """The request hash of posting a hold with these (possibly smaller) amounts."""
    return hashlib.sha256(canonical(["post", [line.amount for line in lines]])).digest()


async def send_hold(svc: Services, shard: int, item: HoldItem) -> Result:
    """One hold call to a shard; an unreachable shard is a retryable SERVICE_UNAVAILABLE result."""
    try:
        (result,) = RESULTS.decode(await svc.shards[shard].hold(ENCODER.encode([item])))
    except Exception as exc:
        return Result(
            item.hold_id, False, code=ErrorCode.SERVICE_UNAVAILABLE,
            message=f"shard {shard} unavailable: {type(exc).__name__}", details={"retryable": True},
        )  # fmt: skip
    return result


async def ensure_split_account(svc: Services, account: str) -> None:
    """Create a split (hot) account on first use, so journals pairing it stay single-shard."""
    if account in svc.poster.split:
        return
    shard = svc.slot_map.shard_of(account)
    (result,) = RESULTS.decode(await svc.shards[shard].create_account(account, False, True))
    if not result.ok:
        raise result_error(result)
    svc.poster.add_split(account)


async def create_hold(svc: Services, principal: str, body: dict[str, Any]) -> Result:
    """Hold the journal `body` (its `journal_id` is the hold id) on the shard of its accounts."""
    journal = validate_journal(msgspec.convert(body, JournalIn))
    hold_id = body["journal_id"]
    shard = svc.poster.shard_of_lines(hold_id, journal.lines)
    if shard is None:
        raise LedgerError(ErrorCode.INTERNAL_ERROR, "a flow's hold spans shards", {"hold_id": hold_id})
    digest = hashlib.sha256(request_hash(journal) + canonical(None)).digest()
    return await send_hold(svc, shard, HoldItem("create", hold_id, principal, None, digest, journal))


async def resolve_hold(
    svc: Services, hold_id: str, principal: str, post: bool, conn: asyncpg.Connection | None = None
) -> Result:
    """Post a flow's hold in full (`post`) or void it, at the shard recorded with the hold.

    `conn`: a connection the caller already holds (else one is taken from the pool)."""
    if conn is None:
        async with svc.pool.acquire() as own:
            hold = await holds_repo.hold_row(own, hold_id)
    else:
        hold = await holds_repo.hold_row(conn, hold_id)
    if hold is None:
        raise LedgerError(ErrorCode.INTERNAL_ERROR, "a flow without its hold", {"hold_id": hold_id})
    if not post:
        return await send_hold(svc, hold["shard_id"], HoldItem("void", hold_id, principal, None, VOID_HASH))
    lines: tuple[Line, ...] = JOURNAL.decode(hold["journal"]).lines
    item = HoldItem("post", hold_id, principal, None, post_digest(lines), lines=lines)
    return await send_hold(svc, hold["shard_id"], item)
