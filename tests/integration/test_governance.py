"""Governance against real PostgreSQL: expiry, concurrent approvals, resume after a crash.

The executor here is the test's own (the `Executor` port: what runs once an action is approved);
the node's executors (the adjusting journal) are exercised over HTTP in tests/e2e/test_multisig.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from finance.governance import Governance, parse_thresholds
from finance.multisig import Policy, sign_statement, statement_for
from ledger.errors import ErrorCode, Rejection
from store.migrations import apply_migrations
from tests.support.databases import create_database, drop_database


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


def _pem(key: ed25519.Ed25519PrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def with_governance(
    body: Callable[[Governance, Clock, dict[str, ed25519.Ed25519PrivateKey]], Awaitable[None]],
) -> None:
    """A fresh database, a 2-of-3 governance over it with three registered approvers."""

    async def main() -> None:
        dsn = await create_database("ledger_gov")
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=4)
        try:
            async with pool.acquire() as conn:
                await apply_migrations(conn)
            clock = Clock()
            governance = Governance(
                pool,
                policy=Policy(2, 3),
                thresholds={"transfer": 1000},
                base_currency="USD",
                ttl=timedelta(hours=1),
                clock=clock,
            )
            keys = {f"a{i}": ed25519.Ed25519PrivateKey.generate() for i in range(3)}
            for name, key in keys.items():
                await governance.add_approver(name, _pem(key), "admin:test")
            await body(governance, clock, keys)
        finally:
            await pool.close()
            await drop_database(dsn)

    asyncio.run(main())


def _sign(key: ed25519.Ed25519PrivateKey, view: dict[str, Any]) -> str:
    return sign_statement(
        key, statement_for(view["action_id"], view["kind"], view["params"], view["expires_at"])
    )


def test_thresholds_parse_and_gate() -> None:
    """Tried: 'journal=10,payout=0' parses; 'journal', 'Bad=1', 'journal=-1' are refused."""
    assert parse_thresholds("journal=10, payout=0,") == {"journal": 10, "payout": 0}
    for bad in ("journal", "Bad=1", "journal=-1", "journal=1.5"):
        with pytest.raises(ValueError, match="threshold"):
            parse_thresholds(bad)


def test_expired_action_cannot_be_approved_and_shows_expired() -> None:
    """Tried: an action approved once, then the clock passes its expiry -> the next approval is
    409 INVALID_STATE (expired), the view says expired, rejecting it is 409 too; amounts below
    the threshold (999 USD) are not gated, 1000 is, and another currency without a rate is."""

    async def body(gov: Governance, clock: Clock, keys: dict[str, ed25519.Ed25519PrivateKey]) -> None:
        runs: list[dict[str, Any]] = []

        async def execute(params: dict[str, Any], principal: str) -> dict[str, Any]:
            runs.append(params)
            return {"done": True}

        gov.register("transfer", execute)
        assert not await gov.requires_approval("transfer", 999, "USD")
        assert await gov.requires_approval("transfer", 1000, "USD")
        assert await gov.requires_approval("transfer", 1, "EUR")  # no EUR rate: gated
        assert not await gov.requires_approval("other", 10**9, "USD")  # no threshold for the kind
        view, created = await gov.submit("transfer", "t-1", {"amount": 5000}, 5000, "USD", "operator:x")
        assert created and view["status"] == "pending_approval"
        await gov.approve("t-1", "a0", _sign(keys["a0"], view), "operator:x")
        clock.now += timedelta(hours=1)
        with pytest.raises(Rejection) as caught:
            await gov.approve("t-1", "a1", _sign(keys["a1"], view), "operator:x")
        assert caught.value.code is ErrorCode.INVALID_STATE and caught.value.details["reason"] == "expired"
        assert (await gov.view("t-1"))["status"] == "expired"
        with pytest.raises(Rejection) as rejected:
            await gov.reject("t-1", "operator:x", "late")
        assert rejected.value.details["current"] == "expired"
        assert runs == []

    with_governance(body)


def test_concurrent_final_approvals_execute_once_and_resume_after_a_crash() -> None:
    """Tried: the 2nd and 3rd approvals of a 2-of-3 action sent at once -> the executor runs once;
    a second action whose row is left `approved` (a crash before execution) is executed by
    `resume()` exactly once, and a second `resume()` finds nothing."""

    async def body(gov: Governance, clock: Clock, keys: dict[str, ed25519.Ed25519PrivateKey]) -> None:
        runs: list[str] = []

        async def execute(params: dict[str, Any], principal: str) -> dict[str, Any]:
            runs.append(params["id"])
            await asyncio.sleep(0.05)
            return {"id": params["id"]}

        gov.register("transfer", execute)
        view, _ = await gov.submit("transfer", "t-2", {"id": "t-2"}, 5000, "USD", "operator:x")
        results = await asyncio.gather(
            *(gov.approve("t-2", name, _sign(keys[name], view), "operator:x") for name in ("a0", "a1", "a2")),
            return_exceptions=True,
        )
        assert runs == ["t-2"]
        refused = [r for r in results if isinstance(r, Rejection)]
        assert all(r.code is ErrorCode.INVALID_STATE for r in refused)
        assert (await gov.view("t-2"))["status"] == "executed"

        view, _ = await gov.submit("transfer", "t-3", {"id": "t-3"}, 5000, "USD", "operator:x")
        async with gov.pool.acquire() as conn:
            await conn.execute("UPDATE gated_actions SET status = 'approved' WHERE action_id = 't-3'")
        assert await gov.resume() == 1
        assert runs == ["t-2", "t-3"] and (await gov.view("t-3"))["result"] == {"id": "t-3"}
        assert await gov.resume() == 0

    with_governance(body)
