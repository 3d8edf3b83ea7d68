"""Payout batches (issue 6 item 2): plan, move to pending, transfer through Stripe, post or void.

- `POST /finance/payout/run` (service, operator, admin) `{payout_date, batch_id?, items?}`:
  `items` absent or `"all"` pays every participant due; a list `[{participant_id, currency?,
  amount?}]` pays those. The batch (default id `pb.{payout_date}`) is planned once
  (finance/payouts.py); the same request again resumes it and answers it (no payout is made twice),
  another request with that batch id is 409 IDEMPOTENCY_CONFLICT. A batch whose total in one
  currency reaches the `payout_batch` approval threshold, or with a payout reaching `payout`, answers
  `202 {action_id, status: "pending_approval", approvals_required, payoutBatchId}` and runs when the
  quorum approves. Otherwise 200 `{payoutBatchId, payout_batch_id, batch}`. Every run first
  releases the holdbacks due now (finance/holdbacks.py; listed in `holdbacks_released`), so a
  released holdback is paid by the same run. Scheduled runs (`LEDGER_PAYOUT_SCHEDULE`) and the
  start-up resume of open batches go through `run_payouts` / `run_batch` too (api/payout_tasks.py).
- `GET /payout/{payout_id}`, `GET /finance/payout/batches/{batch_id}`,
  `GET /finance/payout/batches/{batch_id}/file?format=csv|json` (the file for bank rails).

Each payout: planned -> a hold (id = payout id) debiting the payable and crediting the split
in-transit account (pending) -> the Connect transfer with idempotency key = payout id, retried on
transient errors with capped exponential backoff (`ATTEMPTS_MAX` calls per run) -> paid (the hold is
posted and `po-settle.{payout_id}` moves in transit to the provider's cash) or failed (permanent
error: the hold is voided, the reason recorded). A payout still pending after a run (retries
exhausted, or a crash) is resumed by running the batch again. The ledger calls of payouts are made
as principal `system:payouts` so a resume by another caller replays them.

Audit events: `payout.run`, `payout.paid`, `payout.failed`, `approval.request` for gated batches.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import os
from collections.abc import Awaitable, Callable
from datetime import date
from typing import Any, Final

import asyncpg
import msgspec
from aiohttp import web

from actors.messages import Result
from api import hold_calls
from api.approval_routes import GOVERNANCE
from api.audit_log import record_event
from api.auth import PRINCIPAL, READERS, WRITERS, Role
from api.envelope import ok
from api.finance_routes import release_holdbacks
from api.posting import Submission
from api.requests import json_body
from api.services import SERVICES, Services
from finance import payouts
from finance.stripe_gateway import PermanentProviderError, StripeGateway, TransientProviderError
from ledger.errors import ErrorCode, LedgerError, Rejection, validation_error
from ledger.journal import JOURNAL_ID_PATTERN, JournalIn, rejection_from_msgspec, validate_journal
from ledger.timestamps import rfc3339
from signer.canonical import canonical
from store import payout_repo

SYSTEM_PRINCIPAL: Final = "system:payouts"
BATCH_KIND: Final = "payout_batch"
PAYOUT_KIND: Final = "payout"
TIMEOUT_ENV: Final = "LEDGER_PAYOUT_TIMEOUT_S"
BACKOFF_ENV: Final = "LEDGER_PAYOUT_BACKOFF_S"
TIMEOUT_DEFAULT_S: Final = 30.0
_run_decoder: Final = msgspec.json.Decoder(payouts.RunRequest)


def _retryable(result: Result) -> Result:
    """A shard that could not be reached stops the run (a re-run resumes); other results return."""
    if result.code == ErrorCode.SERVICE_UNAVAILABLE:
        raise hold_calls.result_error(result)
    return result


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name) or default)
    except ValueError:
        return default


class PayoutRunner:
    """Runs batches: the ledger side through the shards' hold calls, the provider through Stripe."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.svc: Services = app[SERVICES]
        self._locks: dict[str, asyncio.Lock] = {}

    # -- audit ---------------------------------------------------------------------------------
    async def audit(self, actor: str, event_type: str, payload: dict[str, Any]) -> None:
        """Record an event (failures are logged, never raised: the money already moved)."""
        await record_event(self.app, actor, event_type, payload)

    # -- ledger calls --------------------------------------------------------------------------
    async def ensure_in_transit(self, currency: str) -> None:
        """Create the split in-transit account of a currency on first use."""
        await hold_calls.ensure_split_account(self.svc, payouts.in_transit_account(currency))

    async def create_hold(self, row: asyncpg.Record) -> Result:
        body = {"journal_id": row["payout_id"], "entries": payouts.hold_entries(_planned(row)),
                "memo": "payout pending", "source_ref": row["batch_id"],
                "context": {"payout_id": row["payout_id"]}}  # fmt: skip
        return _retryable(await hold_calls.create_hold(self.svc, SYSTEM_PRINCIPAL, body))

    async def resolve_hold(self, payout_id: str, post: bool) -> Result:
        return _retryable(await hold_calls.resolve_hold(self.svc, payout_id, SYSTEM_PRINCIPAL, post))

    async def settle(self, row: asyncpg.Record) -> Result:
        body = {"journal_id": payouts.settle_journal_id(row["payout_id"]),
                "entries": payouts.settle_entries(row["currency"], row["amount"]),
                "memo": "payout paid", "source_ref": row["payout_id"],
                "context": {"payout_id": row["payout_id"], "transfer_id": row["transfer_id"]}}  # fmt: skip
        journal = validate_journal(msgspec.convert(body, JournalIn))
        (result,) = await self.svc.poster.post([Submission(journal, SYSTEM_PRINCIPAL, None)])
        return result

    # -- the run -------------------------------------------------------------------------------
    async def run_batch(self, batch_id: str, actor: str) -> None:
        """Move every planned payout to pending, then transfer each pending one (resumable)."""
        gateway = StripeGateway.from_env(
            network_retries=0, timeout_s=_env_float(TIMEOUT_ENV, TIMEOUT_DEFAULT_S)
        )
        if gateway is None:
            raise LedgerError(
                ErrorCode.SERVICE_UNAVAILABLE, "payouts need STRIPE_API_KEY (and STRIPE_API_BASE)",
                {"env": "STRIPE_API_KEY"},
            )  # fmt: skip
        lock = self._locks.setdefault(batch_id, asyncio.Lock())
        try:
            async with lock:
                async with self.svc.pool.acquire() as conn:
                    rows = await payout_repo.batch_payouts(conn, batch_id)
                for row in rows:
                    if row["state"] in ("planned", "pending"):
                        await self._run_one(gateway, row, actor)
                async with self.svc.pool.acquire() as conn:
                    states = [r["state"] for r in await payout_repo.batch_payouts(conn, batch_id)]
                    await payout_repo.set_batch(conn, batch_id, payouts.batch_status(states))
        finally:
            await gateway.close()

    async def _run_one(self, gateway: StripeGateway, row: asyncpg.Record, actor: str) -> None:
        payout_id = row["payout_id"]
        if row["state"] == "planned":
            await self.ensure_in_transit(row["currency"])
            result = await self.create_hold(row)
            async with self.svc.pool.acquire() as conn:
                if not result.ok:
                    reason = f"{result.code}: {result.message}"
                    await payout_repo.set_state(conn, payout_id, "failed", reason=reason)
                    await self.audit(actor, "payout.failed", {"payout_id": payout_id, "reason": reason})
                    return
                await payout_repo.set_state(conn, payout_id, "pending", hold_id=payout_id)
        backoff_base = _env_float(BACKOFF_ENV, payouts.BACKOFF_BASE_S)
        for attempt in range(1, payouts.ATTEMPTS_MAX + 1):
            try:
                transfer = await gateway.transfer(
                    row["stripe_account"], row["amount"], row["currency"], payout_id,
                    {"payout_id": payout_id, "batch_id": row["batch_id"]},
                )  # fmt: skip
            except PermanentProviderError as exc:
                await self._record(payout_id, "permanent", str(exc))
                await self._fail(payout_id, str(exc), actor)
                return
            except TransientProviderError as exc:
                await self._record(payout_id, "transient", str(exc))
                if attempt == payouts.ATTEMPTS_MAX:
                    async with self.svc.pool.acquire() as conn:
                        reason = f"retries exhausted, run the batch again: {exc}"
                        await payout_repo.set_state(conn, payout_id, "pending", reason=reason)
                    return
                await asyncio.sleep(payouts.backoff_s(attempt, backoff_base))
                continue
            if transfer.amount != row["amount"] or transfer.currency != row["currency"]:
                reason = f"provider transfer {transfer.transfer_id} does not match the payout"
                await self._record(payout_id, "permanent", reason)
                raise LedgerError(ErrorCode.INTERNAL_ERROR, reason, {"payout_id": payout_id})
            await self._record(payout_id, "paid", transfer.transfer_id)
            await self._paid(row, transfer.transfer_id, actor)
            return

    async def _record(self, payout_id: str, outcome: str, detail: str) -> None:
        async with self.svc.pool.acquire() as conn:
            await payout_repo.record_attempt(conn, payout_id, outcome, detail[:500])

    async def _paid(self, row: asyncpg.Record, transfer_id: str, actor: str) -> None:
        payout_id = row["payout_id"]
        posted = await self.resolve_hold(payout_id, post=True)
        if not posted.ok:
            raise hold_calls.result_error(posted)  # stays pending: a re-run replays the transfer and posts it
        settled = await self.settle({**dict(row), "transfer_id": transfer_id})  # type: ignore[arg-type]
        if not settled.ok:
            raise hold_calls.result_error(settled)
        async with self.svc.pool.acquire() as conn:
            await payout_repo.set_state(conn, payout_id, "paid", transfer_id=transfer_id)
        await self.audit(
            actor, "payout.paid",
            {"payout_id": payout_id, "transfer_id": transfer_id, "amount": row["amount"],
             "currency": row["currency"], "participant_id": row["participant_id"]},
        )  # fmt: skip

    async def _fail(self, payout_id: str, reason: str, actor: str) -> None:
        voided = await self.resolve_hold(payout_id, post=False)
        if not voided.ok:
            raise hold_calls.result_error(voided)
        async with self.svc.pool.acquire() as conn:
            await payout_repo.set_state(conn, payout_id, "failed", reason=reason)
        await self.audit(actor, "payout.failed", {"payout_id": payout_id, "reason": reason})


RUNNER: Final = web.AppKey("payout_runner", PayoutRunner)


def _planned(row: asyncpg.Record) -> payouts.Planned:
    return payouts.Planned(
        row["payout_id"], row["participant_id"], row["stripe_account"], row["currency"],
        row["amount"], row["holdback"],
    )  # fmt: skip


def _time(value: Any) -> str | None:
    return rfc3339(value) if value is not None else None


def payout_view(row: asyncpg.Record) -> dict[str, Any]:
    """A payout as the API shows it."""
    return {
        "payout_id": row["payout_id"], "payoutId": row["payout_id"], "batch_id": row["batch_id"],
        "participant_id": row["participant_id"], "stripe_account": row["stripe_account"],
        "currency": row["currency"], "amount": row["amount"], "holdback": row["holdback"],
        "state": row["state"], "reason": row["reason"], "hold_id": row["hold_id"],
        "transfer_id": row["transfer_id"], "attempts": row["attempts"],
        "created_at": _time(row["created_at"]), "updated_at": _time(row["updated_at"]),
    }  # fmt: skip


async def batch_view(conn: asyncpg.Connection, batch_id: str) -> dict[str, Any]:
    """A batch with its payouts, the participants it skipped and totals per currency and state."""
    row = await payout_repo.batch(conn, batch_id)
    if row is None:
        raise LedgerError(ErrorCode.NOT_FOUND, f"no payout batch {batch_id}", {"resource": "payout_batch"})
    rows = await payout_repo.batch_payouts(conn, batch_id)
    totals: dict[str, dict[str, int]] = {}
    for r in rows:
        per = totals.setdefault(
            r["currency"], {"total": 0, "planned": 0, "pending": 0, "paid": 0, "failed": 0}
        )
        per["total"] += r["amount"]
        per[r["state"]] += r["amount"]
    return {
        "batch_id": batch_id, "payoutBatchId": batch_id, "payout_batch_id": batch_id,
        "payout_date": row["payout_date"].isoformat(), "status": row["status"],
        "action_id": row["action_id"], "totals": totals,
        "payouts": [payout_view(r) for r in rows],
        "skipped": msgspec.json.decode(row["skipped"]),
        "principal": row["principal"], "created_at": _time(row["created_at"]),
        "completed_at": _time(row["completed_at"]),
    }  # fmt: skip


def _decode_run(body: bytes) -> payouts.RunRequest:
    try:
        return _run_decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise rejection_from_msgspec(exc) from None
    except msgspec.DecodeError as exc:
        raise validation_error(f"malformed JSON: {exc}", "$") from None


def _items(decoded: payouts.RunRequest) -> list[payouts.ItemIn] | None:
    if decoded.items is None or decoded.items == "all":
        return None
    if isinstance(decoded.items, str):
        raise validation_error('items is a list of payouts or "all"', "$.items")
    return list(decoded.items)


async def _plan(conn: asyncpg.Connection, batch_id: str, items: list[payouts.ItemIn] | None) -> Any:
    participants = {
        r["participant_id"]: payouts.Participant(
            r["participant_id"], r["stripe_account"], r["minimum_currency"], r["minimum_amount"]
        )
        for r in await payout_repo.participants(conn)
    }
    unheld = await payout_repo.planned_unheld(conn)
    merged: dict[tuple[str, str], list[int]] = {}
    for r in await payout_repo.payables(conn):
        entry = merged.setdefault((r["participant_id"], r["currency"]), [0, 0])
        entry[0] += r["due"]
        entry[1] += r["holdback"]
    dues = [
        payouts.Due(pid, ccy, due - unheld.get((pid, ccy), 0), holdback)
        for (pid, ccy), (due, holdback) in merged.items()
    ]
    return payouts.plan(batch_id, dues, participants, items)


async def _gate(app: web.Application, planned: list[payouts.Planned]) -> tuple[int, str] | None:
    """(amount, currency) the batch is gated on, or None when it may run at once."""
    governance = app[GOVERNANCE]
    totals: dict[str, int] = {}
    for p in planned:
        totals[p.currency] = totals.get(p.currency, 0) + p.amount
    for currency, total in sorted(totals.items()):
        if await governance.requires_approval(BATCH_KIND, total, currency):
            return total, currency
    for p in planned:
        if await governance.requires_approval(PAYOUT_KIND, p.amount, p.currency):
            return totals[p.currency], p.currency
    return None


async def run(request: web.Request) -> web.Response:
    """POST /finance/payout/run."""
    decoded = _decode_run(await json_body(request))
    try:
        payout_date = date.fromisoformat(decoded.payout_date)
    except ValueError:
        raise validation_error("payout_date must be a date YYYY-MM-DD", "$.payout_date") from None
    batch_id = decoded.batch_id or payouts.batch_id_for(payout_date.isoformat())
    if not JOURNAL_ID_PATTERN.fullmatch(batch_id) or len(batch_id) > 120:
        raise validation_error("batch_id must be 1-120 characters of [A-Za-z0-9:._-]", "$.batch_id")
    outcome = await run_payouts(request.app, payout_date, batch_id, _items(decoded), request[PRINCIPAL].name)
    assert outcome is not None  # for mypy; only skip_empty runs answer None
    status, answer = outcome
    return ok(status, **answer)


async def run_payouts(
    app: web.Application,
    payout_date: date,
    batch_id: str,
    items: list[payouts.ItemIn] | None,
    who: str,
    *,
    skip_empty: bool = False,
) -> tuple[int, dict[str, Any]] | None:
    """A payout run (the endpoint's and the schedule's): release the holdbacks due now, plan the
    batch once (a replay resumes it), gate it on multisig or run it; (HTTP status, answer).
    `skip_empty` (scheduled runs): a new batch that would plan no payout is not created (None)."""
    svc, runner = app[SERVICES], app[RUNNER]
    digest = hashlib.sha256(canonical({"payout_date": payout_date.isoformat(), "batch_id": batch_id,
                                       "items": msgspec.to_builtins(items)})).hexdigest()  # fmt: skip
    if not os.environ.get("STRIPE_API_KEY"):
        raise LedgerError(
            ErrorCode.SERVICE_UNAVAILABLE, "payouts need STRIPE_API_KEY (and STRIPE_API_BASE)",
            {"env": "STRIPE_API_KEY"},
        )  # fmt: skip
    released = await release_holdbacks(app, who, "payout_run")
    gated: tuple[int, str] | None = None
    async with svc.pool.acquire() as conn, conn.transaction():
        await payout_repo.lock_planning(conn)
        existing = await payout_repo.batch(conn, batch_id)
        created = existing is None
        if existing is not None:
            if existing["request_hash"] != digest:
                raise Rejection(
                    ErrorCode.IDEMPOTENCY_CONFLICT, "batch id already used with a different request",
                    {"batch_id": batch_id},
                )  # fmt: skip
        else:
            planned, skipped = await _plan(conn, batch_id, items)
            if skip_empty and not planned:
                return None
            gated = await _gate(app, planned)
            await payout_repo.insert_batch(
                conn, batch_id=batch_id, payout_date=payout_date,
                status="pending_approval" if gated else "open",
                items=None if items is None else msgspec.json.encode(items).decode(),
                skipped=msgspec.json.encode(skipped).decode(), request_hash=digest, principal=who,
            )  # fmt: skip
            await payout_repo.insert_payouts(
                conn, batch_id,
                [(p.payout_id, p.participant_id, p.stripe_account, p.currency, p.amount, p.holdback)
                 for p in planned],
            )  # fmt: skip
    if created:
        async with svc.pool.acquire() as conn:
            view = await batch_view(conn, batch_id)
        await runner.audit(who, "payout.run", {"batch_id": batch_id, "payout_date": payout_date.isoformat(),
                                              "totals": view["totals"], "payouts": len(view["payouts"]),
                                              "gated": gated is not None})  # fmt: skip
    if gated is not None or (existing is not None and existing["status"] == "pending_approval"):
        status, answer = await _submit(app, who, batch_id, gated)
    else:
        await runner.run_batch(batch_id, who)
        async with svc.pool.acquire() as conn:
            view = await batch_view(conn, batch_id)
        status, answer = 200, {"payoutBatchId": batch_id, "payout_batch_id": batch_id, "batch": view}
    return status, {**answer, "holdbacks_released": released["released"]}


async def _submit(
    app: web.Application, who: str, batch_id: str, gated: tuple[int, str] | None
) -> tuple[int, dict[str, Any]]:
    governance = app[GOVERNANCE]
    svc = app[SERVICES]
    action_id = f"{BATCH_KIND}.{batch_id}"
    if gated is None:  # a replay of a gated run: the action exists
        view = await governance.view(action_id)
    else:
        amount, currency = gated
        view, created = await governance.submit(
            BATCH_KIND, action_id, {"batch_id": batch_id}, amount, currency, who
        )
        async with svc.pool.acquire() as conn:
            await payout_repo.set_batch(conn, batch_id, "pending_approval", action_id=action_id)
        if created:
            await app[RUNNER].audit(
                who, "approval.request",
                {"action_id": action_id, "kind": BATCH_KIND, "params_hash": view["statement"]["params_hash"]},
            )  # fmt: skip
    return 202, {
        "action_id": action_id, "status": view["status"], "approvals_required": view["approvals_required"],
        "payoutBatchId": batch_id, "payout_batch_id": batch_id, "action": view,
    }  # fmt: skip


async def resume_open_batches(app: web.Application, actor: str) -> list[str]:
    """Run again every batch left `open` (payouts planned or pending when the node stopped):
    re-running is idempotent (ids and provider keys derive from the payout). The batches resumed."""
    runner = app[RUNNER]
    async with runner.svc.pool.acquire() as conn:
        batch_ids = await payout_repo.open_batches(conn)
    for batch_id in batch_ids:
        await runner.run_batch(batch_id, actor)
    return batch_ids


async def get_payout(request: web.Request) -> web.Response:
    """GET /payout/{payout_id}: the payout with its provider attempts."""
    payout_id = request.match_info["payout_id"]
    async with request.app[SERVICES].pool.acquire() as conn:
        row = await payout_repo.payout(conn, payout_id)
        if row is None:
            raise LedgerError(ErrorCode.NOT_FOUND, f"no payout {payout_id}", {"resource": "payout"})
        tries = await payout_repo.attempts(conn, payout_id)
    view = payout_view(row)
    view["attempt_log"] = [
        {"attempt": t["attempt"], "at": _time(t["at"]), "outcome": t["outcome"], "detail": t["detail"]}
        for t in tries
    ]
    return ok(payout=view)


async def get_batch(request: web.Request) -> web.Response:
    """GET /finance/payout/batches/{batch_id}."""
    async with request.app[SERVICES].pool.acquire() as conn:
        return ok(batch=await batch_view(conn, request.match_info["batch_id"]))


FILE_COLUMNS: Final = ("payout_id", "batch_id", "participant_id", "stripe_account", "currency", "amount",
                       "state", "transfer_id", "reason")  # fmt: skip


async def get_file(request: web.Request) -> web.Response:
    """GET /finance/payout/batches/{batch_id}/file?format=csv|json: one row per payout."""
    fmt = request.query.get("format", "json")
    if fmt not in ("csv", "json"):
        raise validation_error("format is csv or json", "$.query.format")
    batch_id = request.match_info["batch_id"]
    async with request.app[SERVICES].pool.acquire() as conn:
        view = await batch_view(conn, batch_id)
    rows = [{k: p[k] for k in FILE_COLUMNS} for p in view["payouts"]]
    if fmt == "json":
        return ok(batch_id=batch_id, payout_date=view["payout_date"], format="json", payouts=rows)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=FILE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return web.Response(
        text=out.getvalue(), content_type="text/csv",
        headers={"Content-Disposition": f'attachment; filename="{batch_id}.csv"'},
    )  # fmt: skip


def install(app: web.Application) -> None:
    """The runner and the governance executor of gated batches (after `approval_routes.install`)."""
    runner = PayoutRunner(app)
    app[RUNNER] = runner

    async def execute(params: dict[str, Any], principal: str) -> dict[str, Any]:
        batch_id = str(params["batch_id"])
        async with runner.svc.pool.acquire() as conn:
            await payout_repo.set_batch(conn, batch_id, "open")
        try:
            await runner.run_batch(batch_id, principal)
        except LedgerError as exc:
            raise Rejection(exc.code, exc.message, exc.details) from exc
        async with runner.svc.pool.acquire() as conn:
            view = await batch_view(conn, batch_id)
        return {"batch_id": batch_id, "status": view["status"], "totals": view["totals"]}

    app[GOVERNANCE].register(BATCH_KIND, execute)


ROUTES: Final[
    list[tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]], frozenset[Role]]]
] = [
    ("POST", "/finance/payout/run", run, WRITERS),
    ("GET", "/payout/{payout_id}", get_payout, READERS),
    ("GET", "/finance/payout/batches/{batch_id}", get_batch, READERS),
    ("GET", "/finance/payout/batches/{batch_id}/file", get_file, READERS),
]
