"""Governance: gate actions above a threshold behind m-of-n approvals, then execute them once.

A flow that moves a lot of money (an adjusting journal, a payout batch, a single payout, an escrow
release) asks `Governance.requires_approval(kind, amount, currency)`. Below the kind's threshold
(or for a kind without one) it executes at once. Above it, `submit` stores the action in
`pending_approval` and the caller answers `202 {action_id, status, approvals_required}`.

`approve` checks one approval (finance/multisig.py rules), stores it and tallies the valid ones
over the action's *current* statement; the approval that reaches `Policy.required` moves the action
to `approved` in the same transaction, after which the kind's executor runs and the action becomes
`executed` (its answer stored in `result`) or `failed` (the ledger's or provider's refusal in
`reason`). Executors are idempotent (they derive every id from the action id), so an action left
`approved` by a crash is executed again by `resume()` at start-up without doing anything twice.

Thresholds are in minor units of the node's base currency; an amount in another currency is
converted at the rate in force now, and when no rate is known the action is gated (the safe
side). An action expires `ttl` after it was requested: approving it afterwards is 409
INVALID_STATE (`expired`). An operator may reject a pending action.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import asyncpg
import msgspec

from finance import fx
from finance.multisig import (
    KIND_PATTERN,
    ActionStatus,
    ActionView,
    Approval,
    ApproverKey,
    KeyAlgorithm,
    Policy,
    check_approval,
    is_expired,
    params_hash,
    parse_approver_key,
    tally,
)
from ledger.errors import ErrorCode, Rejection, validation_error
from ledger.invariants import check
from ledger.journal import JOURNAL_ID_PATTERN
from ledger.timestamps import rfc3339
from signer.canonical import canonical
from store import fx_repo, governance_repo

Executor = Callable[[dict[str, Any], str], Awaitable[dict[str, Any]]]
"""Runs an approved action: (params, the requesting principal) -> its answer; raises Rejection."""

Clock = Callable[[], datetime]
TTL_DEFAULT: Final = timedelta(days=7)
REASON_MAX: Final = 500


def utc_now() -> datetime:
    """The real clock (UTC)."""
    return datetime.now(UTC)


def parse_thresholds(text: str) -> dict[str, int]:
    """`"journal=1000000,payout=500000"` -> {kind: minor units of the base currency}; ValueError."""
    thresholds: dict[str, int] = {}
    for raw in text.split(","):
        entry = raw.strip()
        if not entry:
            continue
        kind, sep, value = entry.partition("=")
        kind = kind.strip()
        if not sep or not KIND_PATTERN.fullmatch(kind) or not value.strip().isdigit():
            raise ValueError(f"approval threshold must look like kind=minor_units, got {entry!r}")
        thresholds[kind] = int(value)
    return thresholds


def not_found(action_id: str) -> Rejection:
    """404 for an unknown action."""
    return Rejection(
        ErrorCode.NOT_FOUND, f"no action {action_id}", {"resource": "action", "action_id": action_id}
    )


def _action_view(row: asyncpg.Record) -> ActionView:
    return ActionView(
        row["action_id"],
        row["kind"],
        msgspec.json.decode(row["params"]),
        rfc3339(row["expires_at"]),
        ActionStatus(row["status"]),
    )


def _approval(row: asyncpg.Record) -> Approval:
    return Approval(row["approver_id"], row["signature"], row["params_hash"], rfc3339(row["approved_at"]))


def _key(row: asyncpg.Record) -> ApproverKey:
    return ApproverKey(
        row["approver_id"], KeyAlgorithm(row["algorithm"]), row["public_key_pem"], row["fingerprint"]
    )


def approver_view(row: asyncpg.Record) -> dict[str, Any]:
    """An approver as the API shows it."""
    return {
        "approver_id": row["approver_id"],
        "algorithm": row["algorithm"],
        "public_key": row["public_key_pem"],
        "fingerprint": row["fingerprint"],
        "registered_at": rfc3339(row["registered_at"]),
        "revoked_at": None if row["revoked_at"] is None else rfc3339(row["revoked_at"]),
    }


class Governance:
    """Gated actions, approvers and approvals over one PostgreSQL pool."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        policy: Policy,
        thresholds: Mapping[str, int],
        base_currency: str,
        ttl: timedelta = TTL_DEFAULT,
        clock: Clock = utc_now,
    ) -> None:
        self.pool = pool
        self.policy = policy
        self.thresholds = dict(thresholds)
        self.base_currency = base_currency
        self.ttl = ttl
        self.clock = clock
        self.executors: dict[str, Executor] = {}
        self._running: dict[str, asyncio.Lock] = {}

    def register(self, kind: str, executor: Executor) -> None:
        """The executor of one kind of action (one per kind)."""
        check(KIND_PATTERN.fullmatch(kind) is not None, f"action kind {kind!r} is malformed")
        check(kind not in self.executors, f"two executors for {kind}")
        self.executors[kind] = executor

    # -- approvers ---------------------------------------------------------------------------
    async def add_approver(
        self, approver_id: str, public_key_pem: str, principal: str
    ) -> tuple[dict[str, Any], bool]:
        """Register an approver; a replay (same id and key) answers the stored one, created False.

        The same id with another key -> 409 IDEMPOTENCY_CONFLICT; more active approvers than the
        policy's n -> 409 INVALID_STATE (revoke one first).
        """
        key = parse_approver_key(approver_id, public_key_pem)
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("LOCK TABLE approvers IN SHARE ROW EXCLUSIVE MODE")
            existing = await conn.fetchrow("SELECT * FROM approvers WHERE approver_id = $1", approver_id)
            if existing is None:
                active = len(await governance_repo.approvers(conn, active_only=True))
                if active >= self.policy.of:
                    raise Rejection(
                        ErrorCode.INVALID_STATE,
                        f"the registry already holds {active} active approvers (policy {self.policy.label})",
                        {"active": active, "policy": self.policy.label, "reason": "registry_full"},
                    )
            row, created = await governance_repo.insert_approver(
                conn, key.approver_id, str(key.algorithm), key.public_key_pem, key.fingerprint, principal
            )
        if not created and (row["fingerprint"] != key.fingerprint or row["revoked_at"] is not None):
            raise Rejection(
                ErrorCode.IDEMPOTENCY_CONFLICT,
                "approver id already registered with another key (or revoked)",
                {"approver_id": approver_id},
            )
        return approver_view(row), created

    async def revoke_approver(self, approver_id: str, principal: str) -> dict[str, Any]:
        """Revoke an approver: its approvals stop counting, pending or not."""
        async with self.pool.acquire() as conn:
            row = await governance_repo.revoke_approver(conn, approver_id, principal)
        if row is None:
            raise Rejection(
                ErrorCode.NOT_FOUND,
                f"no approver {approver_id}",
                {"resource": "approver", "approver_id": approver_id},
            )
        return approver_view(row)

    async def list_approvers(self) -> list[dict[str, Any]]:
        """Every approver, revoked ones included."""
        async with self.pool.acquire() as conn:
            return [approver_view(r) for r in await governance_repo.approvers(conn, active_only=False)]

    async def _keys(self, conn: asyncpg.Connection) -> dict[str, ApproverKey]:
        return {r["approver_id"]: _key(r) for r in await governance_repo.approvers(conn, active_only=True)}

    # -- gating ------------------------------------------------------------------------------
    async def requires_approval(self, kind: str, amount_minor: int, currency: str) -> bool:
        """True when `amount_minor` of `currency` reaches the kind's threshold (in base currency)."""
        threshold = self.thresholds.get(kind)
        if threshold is None:
            return False
        if currency == self.base_currency:
            return amount_minor >= threshold
        async with self.pool.acquire() as conn:
            row = await fx_repo.rate_at(conn, self.base_currency, currency, self.clock())
        if row is None:
            return True  # no rate: gate it rather than guess
        return fx.to_base(amount_minor, currency, fx.Rate(*row)) >= threshold

    async def submit(
        self,
        kind: str,
        action_id: str,
        params: dict[str, Any],
        amount_minor: int,
        currency: str,
        principal: str,
    ) -> tuple[dict[str, Any], bool]:
        """Store a gated action (pending approval); (its view, created). A replay answers it."""
        check(kind in self.executors, f"no executor for gated kind {kind}")
        if not JOURNAL_ID_PATTERN.fullmatch(action_id):
            raise validation_error("action id must be 1-200 characters of [A-Za-z0-9:._-]", "$.action_id")
        text = canonical(params).decode()
        request_hash = hashlib.sha256(canonical({"kind": kind, "params": params})).digest()
        now = self.clock()
        async with self.pool.acquire() as conn:
            row, created = await governance_repo.insert_action(
                conn,
                action_id=action_id,
                kind=kind,
                params=text,
                params_hash=params_hash(params),
                amount_minor=amount_minor,
                currency=currency,
                requested_by=principal,
                request_hash=request_hash,
                created_at=now,
                expires_at=now + self.ttl,
            )
        if not created and bytes(row["request_hash"]) != request_hash:
            raise Rejection(
                ErrorCode.IDEMPOTENCY_CONFLICT,
                "action id already used with a different request",
                {"action_id": action_id},
            )
        return await self.view(action_id), created

    # -- approvals ---------------------------------------------------------------------------
    async def approve(
        self, action_id: str, approver_id: str, signature: str, principal: str
    ) -> tuple[dict[str, Any], bool]:
        """Record one approval; execute the action when it completes the quorum. (view, recorded).

        The same approval sent again (same approver, same signature, same statement) is a replay:
        the current view, recorded False.
        """
        now = self.clock()
        reached = False
        async with self.pool.acquire() as conn, conn.transaction():
            row = await governance_repo.action_row(conn, action_id, lock=True)
            if row is None:
                raise not_found(action_id)
            action = _action_view(row)
            approvals = [_approval(r) for r in await governance_repo.approvals(conn, action_id)]
            current_hash = params_hash(action.params)
            if any(
                a.approver_id == approver_id and a.signature == signature and a.params_hash == current_hash
                for a in approvals
            ):
                replay = True
            else:
                replay = False
                if action.status is ActionStatus.PENDING_APPROVAL and is_expired(action, now):
                    await governance_repo.set_status(conn, action_id, ActionStatus.EXPIRED, decided_at=now)
                keys = await self._keys(conn)
                try:
                    statement = check_approval(action, approvals, keys, approver_id, signature, now)
                except Rejection:
                    if action.status is ActionStatus.PENDING_APPROVAL and is_expired(action, now):
                        pass  # the EXPIRED status above is kept: commit, then raise
                    raise
                await governance_repo.insert_approval(
                    conn, action_id, approver_id, statement.params_hash, signature, principal, now
                )
                approvals.append(Approval(approver_id, signature, statement.params_hash, rfc3339(now)))
                if len(tally(action, approvals, keys)) >= self.policy.required:
                    await governance_repo.set_status(conn, action_id, ActionStatus.APPROVED, decided_at=now)
                    reached = True
        if reached:
            await self._execute(action_id)
        return await self.view(action_id), not replay

    async def reject(self, action_id: str, principal: str, reason: str | None) -> dict[str, Any]:
        """An operator rejects a pending action; anything else is 409 INVALID_STATE."""
        if reason is not None and len(reason) > REASON_MAX:
            raise validation_error(f"reason is at most {REASON_MAX} characters", "$.reason")
        now = self.clock()
        async with self.pool.acquire() as conn, conn.transaction():
            row = await governance_repo.action_row(conn, action_id, lock=True)
            if row is None:
                raise not_found(action_id)
            action = _action_view(row)
            if action.status is not ActionStatus.PENDING_APPROVAL or is_expired(action, now):
                status = (
                    ActionStatus.EXPIRED if action.status is ActionStatus.PENDING_APPROVAL else action.status
                )
                raise Rejection(
                    ErrorCode.INVALID_STATE,
                    f"action is {status}; only a pending action can be rejected",
                    {"action_id": action_id, "current": str(status), "requested": "rejected"},
                )
            await governance_repo.set_status(
                conn, action_id, ActionStatus.REJECTED, decided_at=now, decided_by=principal, reason=reason
            )
        return await self.view(action_id)

    async def _execute(self, action_id: str) -> None:
        """Run an approved action's executor once (per process; executors are idempotent)."""
        lock = self._running.setdefault(action_id, asyncio.Lock())
        async with lock:
            async with self.pool.acquire() as conn:
                row = await governance_repo.action_row(conn, action_id)
            if row is None or row["status"] != ActionStatus.APPROVED:
                return
            executor = self.executors.get(row["kind"])
            check(executor is not None, f"approved action of unknown kind {row['kind']}")
            assert executor is not None  # for mypy; checked above
            params = msgspec.json.decode(row["params"])
            reason: str | None
            result: dict[str, Any]
            try:
                answer = await executor(params, row["requested_by"])
            except Rejection as exc:
                status, reason, result = ActionStatus.FAILED, f"{exc.code}: {exc.message}", exc.as_dict()
            else:
                status, reason, result = ActionStatus.EXECUTED, None, answer
            async with self.pool.acquire() as conn:
                await governance_repo.set_status(
                    conn, action_id, status, reason=reason, result=msgspec.json.encode(result).decode()
                )
        self._running.pop(action_id, None)

    async def resume(self) -> int:
        """Execute the actions a crash left `approved`; how many were found."""
        async with self.pool.acquire() as conn:
            rows = await conn.fetch("SELECT action_id FROM gated_actions WHERE status = 'approved'")
        for row in rows:
            await self._execute(row["action_id"])
        return len(rows)

    async def list_actions(self, status: ActionStatus | None, limit: int) -> list[dict[str, Any]]:
        """Newest actions first (at most `limit`), in brief: what an operator's queue shows."""
        now = self.clock()
        async with self.pool.acquire() as conn:
            rows = await governance_repo.action_rows(
                conn, None if status is None else str(status), now, limit
            )
        brief = []
        for row in rows:
            action = _action_view(row)
            shown = action.status
            if shown is ActionStatus.PENDING_APPROVAL and is_expired(action, now):
                shown = ActionStatus.EXPIRED
            brief.append(
                {
                    "action_id": action.action_id,
                    "kind": action.kind,
                    "status": str(shown),
                    "amount": row["amount_minor"],
                    "currency": row["currency"],
                    "requested_by": row["requested_by"],
                    "created_at": rfc3339(row["created_at"]),
                    "expires_at": action.expires_at,
                }
            )
        return brief

    async def view(self, action_id: str) -> dict[str, Any]:
        """An action with its statement, approvals (and whether each counts) and result."""
        async with self.pool.acquire() as conn:
            row = await governance_repo.action_row(conn, action_id)
            if row is None:
                raise not_found(action_id)
            approval_rows = await governance_repo.approvals(conn, action_id)
            keys = await self._keys(conn)
        action = _action_view(row)
        approvals = [_approval(r) for r in approval_rows]
        counted = set(tally(action, approvals, keys))
        status = action.status
        if status is ActionStatus.PENDING_APPROVAL and is_expired(action, self.clock()):
            status = ActionStatus.EXPIRED
        statement = action.statement()
        return {
            "action_id": action.action_id,
            "kind": action.kind,
            "status": str(status),
            "params": action.params,
            "amount": row["amount_minor"],
            "currency": row["currency"],
            "statement": msgspec.to_builtins(statement),
            "statement_b64": base64.b64encode(statement.encode()).decode(),
            "policy": self.policy.label,
            "approvals_required": self.policy.required,
            "approvals_valid": len(counted),
            "approvals": [
                {
                    "approver_id": a.approver_id,
                    "approved_at": a.approved_at,
                    "params_hash": a.params_hash,
                    "counts": a.approver_id in counted and a.params_hash == statement.params_hash,
                }
                for a in approvals
            ],
            "requested_by": row["requested_by"],
            "created_at": rfc3339(row["created_at"]),
            "expires_at": action.expires_at,
            "decided_at": None if row["decided_at"] is None else rfc3339(row["decided_at"]),
            "decided_by": row["decided_by"],
            "reason": row["reason"],
            "result": None if row["result"] is None else msgspec.json.decode(row["result"]),
        }
