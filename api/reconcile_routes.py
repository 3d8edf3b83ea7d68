"""Reconciliation against the payment provider over HTTP (REQUIREMENTS F11, issue 7 item 4).

- `POST /reconcile` (operator, admin; D5) `{request_id, from_ts, to_ts, provider}`: runs the
  reconciliation of the window (finance/reconcile_service.py) and answers its report (200; a replay
  of the same request answers the same report, another request under that `request_id` is 409
  IDEMPOTENCY_CONFLICT).
- `GET /reconcile/{reconcile_id}?format=json|csv` (every reader role): the report; `csv` is one
  row per discrepancy (`finance.reconcile.CSV_COLUMNS`).
- `POST /reconcile/{reconcile_id}/resolve` (operator, admin) `{discrepancy_id, entries, reason,
  journal_id?, memo?}`: an adjusting journal for one discrepancy (the `POST /finance/journal` path,
  gated by the `journal` approval threshold); its context names the run and the discrepancy, its
  `source_ref` the provider reference. Once posted, the discrepancy is resolved and the resolution
  recorded with the ledger-side value it established, which later runs match (finance/reconcile.py).
- Scheduled runs every `LEDGER_RECONCILE_EVERY` (node/config.py), as `system:reconcile`.

Metrics: `ledger_reconciliation_lag_seconds`, `ledger_reconcile_runs_total{trigger,outcome}`,
`ledger_reconcile_discrepancies_total{reason}`. Audit events: `reconcile.run`, `reconcile.resolve`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any, Final

import msgspec
from aiohttp import web
from prometheus_client import Counter, Gauge

from api.approval_routes import APPROVING, GOVERNANCE, REASON_MAX, adjust, post_journal_body
from api.audit_log import audit_event
from api.auth import PRINCIPAL, READERS, Role
from api.envelope import ok
from api.finance_routes import audit_app
from api.requests import decode_json, json_body
from api.services import SERVICES
from finance import reconcile
from finance.reconcile_service import ReconcileService, RunRequest, as_discrepancy
from ledger.errors import ErrorCode, LedgerError, Rejection, validation_error
from ledger.journal import JournalIn, rejection_from_msgspec, validate_journal
from ledger.timestamps import rfc3339
from signer.canonical import canonical
from store import reconcile_repo

log = logging.getLogger(__name__)

SYSTEM_PRINCIPAL: Final = "system:reconcile"
RESOLUTION_KIND: Final = "reconcile_resolution"
SETTLE_MAX_S: Final = 60.0
"""A scheduled window ends this long (at most its period) before now, so postings can land."""
RECONCILE_EVERY_S: Final = web.AppKey("reconcile_every_s", float)
"""Seconds between scheduled runs (`LEDGER_RECONCILE_EVERY`); absent or <= 0: off."""


class ReconcileMetrics:
    """The reconciliation metrics on the node's registry; the lag is computed when scraped."""

    def __init__(self, registry: Any) -> None:
        self.newest_end: datetime | None = None
        self.lag = Gauge(
            "ledger_reconciliation_lag_seconds",
            "Seconds since the end of the newest fully reconciled window (NaN before the first run)",
            registry=registry,
        )
        self.lag.set_function(self._lag)
        self.runs = Counter(
            "ledger_reconcile_runs_total",
            "Reconciliation runs by trigger and outcome",
            ["trigger", "outcome"],
            registry=registry,
        )
        self.discrepancies = Counter(
            "ledger_reconcile_discrepancies_total",
            "Discrepancies found by reconciliation runs, by reason",
            ["reason"],
            registry=registry,
        )

    def _lag(self) -> float:
        if self.newest_end is None:
            return float("nan")
        return max(0.0, time.time() - self.newest_end.timestamp())

    def completed(self, trigger: str, report: dict[str, Any]) -> None:
        """Count a run that this node executed."""
        self.runs.labels(trigger, report["status"]).inc()
        for reason, count in report["counts"].items():
            if count:
                self.discrepancies.labels(reason).inc(count)
        if report["status"] == "completed":
            end = datetime.fromisoformat(report["to_ts"])
            if self.newest_end is None or end > self.newest_end:
                self.newest_end = end


SERVICE: Final = web.AppKey("reconcile_service", ReconcileService)
METRICS: Final = web.AppKey("reconcile_metrics", ReconcileMetrics)


class ResolveIn(msgspec.Struct, forbid_unknown_fields=True):
    """`POST /reconcile/{id}/resolve`."""

    discrepancy_id: str
    entries: list[dict[str, Any]]
    reason: str
    journal_id: str | None = None
    memo: str | None = None


async def _run(app: web.Application, request: RunRequest, who: str, trigger: str) -> dict[str, Any]:
    """Run through the service, counting and auditing what this call executed."""
    try:
        report, ran = await app[SERVICE].run(request, who, trigger)
    except LedgerError as exc:
        if exc.code in (ErrorCode.SERVICE_UNAVAILABLE, ErrorCode.RECONCILE_ERROR):
            app[METRICS].runs.labels(trigger, "failed").inc()
        raise
    if ran:
        app[METRICS].completed(trigger, report)
        payload = {
            k: report[k]
            for k in ("reconcile_id", "provider", "from_ts", "to_ts", "status", "matched", "counts")
        }
        await audit_app(app, who, "reconcile.run", {**payload, "trigger": trigger})
    return report


async def start(request: web.Request) -> web.Response:
    """POST /reconcile."""
    decoded = decode_json(await json_body(request), RunRequest)
    report = await _run(request.app, decoded, request[PRINCIPAL].name, "api")
    return ok(200, **report)


async def get_report(request: web.Request) -> web.Response:
    """GET /reconcile/{reconcile_id}?format=json|csv."""
    fmt = request.query.get("format", "json")
    if fmt not in ("json", "csv"):
        raise validation_error("format is json or csv", "$.query.format")
    reconcile_id = request.match_info["reconcile_id"]
    report = await request.app[SERVICE].view(reconcile_id)
    if fmt == "json":
        return ok(200, **report)
    return web.Response(
        text=reconcile.report_csv(reconcile_id, report["discrepancies"]),
        content_type="text/csv",
        headers={"Content-Disposition": f'attachment; filename="{reconcile_id}.csv"'},
    )


def _debit_totals(body: dict[str, Any]) -> dict[str, int]:
    try:
        journal = validate_journal(msgspec.convert(body, JournalIn))
    except msgspec.ValidationError as exc:
        raise rejection_from_msgspec(exc) from None
    totals: dict[str, int] = {}
    for line in journal.lines:
        if line.is_debit:
            totals[line.currency] = totals.get(line.currency, 0) + line.amount
    return totals


async def _record(app: web.Application, params: dict[str, Any], posted: dict[str, Any], who: str) -> None:
    """Record the resolution of a posted adjusting journal and audit it."""
    values = {
        **params["resolution"],
        "journal_id": posted["journal_id"],
        "principal": who,
        "answer": msgspec.json.encode(posted).decode(),
    }
    async with app[SERVICES].pool.acquire() as conn:
        recorded = await reconcile_repo.record_resolution(conn, values)
    if recorded:
        event = {
            k: values[k]
            for k in ("reconcile_id", "discrepancy_id", "kind", "provider_reference", "journal_id", "reason")
        }
        await audit_app(app, who, "reconcile.resolve", event)


async def resolve(request: web.Request) -> web.Response:
    """POST /reconcile/{reconcile_id}/resolve."""
    decoded = decode_json(await json_body(request), ResolveIn)
    reason = decoded.reason.strip()
    if not 1 <= len(reason) <= REASON_MAX:
        raise validation_error(f"reason is required, 1-{REASON_MAX} characters", "$.reason")
    reconcile_id, who = request.match_info["reconcile_id"], request[PRINCIPAL].name
    report = await request.app[SERVICE].view(reconcile_id)  # 404 for an unknown run
    async with request.app[SERVICES].pool.acquire() as conn:
        row = await reconcile_repo.discrepancy_row(conn, reconcile_id, decoded.discrepancy_id)
        if row is None:
            raise LedgerError(
                ErrorCode.NOT_FOUND,
                f"no discrepancy {decoded.discrepancy_id} in {reconcile_id}",
                {"resource": "discrepancy"},
            )
        done = await reconcile_repo.resolution_row(conn, reconcile_id, decoded.discrepancy_id)
    digest = hashlib.sha256(canonical(msgspec.to_builtins(decoded))).hexdigest()
    if done is not None:
        if done["request_hash"] != digest:
            raise Rejection(
                ErrorCode.IDEMPOTENCY_CONFLICT,
                "discrepancy already resolved by another request",
                {"discrepancy_id": decoded.discrepancy_id, "journal_id": done["journal_id"]},
            )
        answer = msgspec.json.decode(done["answer"])
        return ok(
            200, reconcile_id=reconcile_id, discrepancy_id=decoded.discrepancy_id, status="resolved", **answer
        )
    found = as_discrepancy(row)
    body = {
        "entries": decoded.entries,
        "journal_id": decoded.journal_id or f"{reconcile_id}.{found.discrepancy_id}",
        "memo": decoded.memo,
        "source_ref": found.provider_reference,
        "context": {
            "reconcile": {
                "reconcile_id": reconcile_id,
                "discrepancy_id": found.discrepancy_id,
                "kind": found.kind,
                "provider_reference": found.provider_reference,
                "reason": found.reason,
            },
            "adjustment": {"reason": reason, "requested_by": who},
        },
    }
    problem = reconcile.adjustment_problem(found, _debit_totals(body))
    if problem is not None:
        raise validation_error(problem, "$.entries", expected=reconcile.expected_adjustment(found))
    amount, currency = reconcile.resolved_value(found)
    params = {
        "journal": body,
        "resolution": {
            "reconcile_id": reconcile_id,
            "discrepancy_id": found.discrepancy_id,
            "provider": report["provider"],
            "kind": found.kind,
            "provider_reference": found.provider_reference,
            "amount": amount,
            "currency": currency,
            "reason": reason,
            "request_hash": digest,
        },
    }
    status, answer = await adjust(request, body, RESOLUTION_KIND, params)
    if status == 200:
        await _record(request.app, params, answer, who)
        await audit_event(request, "finance.journal", {"journal_id": answer["journal_id"], "reason": reason})
    return ok(
        status,
        reconcile_id=reconcile_id,
        discrepancy_id=found.discrepancy_id,
        status="resolved" if status == 200 else answer["status"],
        **{k: v for k, v in answer.items() if k != "status"},
    )


# -- scheduled runs --------------------------------------------------------------------------------
async def scheduled_run(
    app: web.Application, every_s: float, now: datetime | None = None
) -> dict[str, Any] | None:
    """One scheduled run: from the end of the newest scheduled window (or one period back, at most
    `WINDOW_MAX`) to `now` less min(period, `SETTLE_MAX_S`); None when there is nothing to cover."""
    svc = app[SERVICE]
    now = now or svc.clock()
    end = now - timedelta(seconds=min(every_s, SETTLE_MAX_S))
    async with app[SERVICES].pool.acquire() as conn:
        previous = await reconcile_repo.newest_scheduled_end(conn, "stripe")
    begin = max(previous or end - timedelta(seconds=every_s), end - reconcile.WINDOW_MAX)
    if begin >= end:
        return None
    request = RunRequest(f"sched.{end:%Y%m%dT%H%M%S.%f}Z", rfc3339(begin), rfc3339(end), "stripe")
    return await _run(app, request, SYSTEM_PRINCIPAL, "schedule")


async def _schedule_loop(app: web.Application, every_s: float) -> None:
    while True:
        await asyncio.sleep(every_s)
        try:
            await scheduled_run(app, every_s)
        except Exception:
            log.exception("scheduled reconciliation failed; retrying in %ss", every_s)


async def schedule_task(app: web.Application) -> AsyncIterator[None]:
    """`cleanup_ctx`: load the newest reconciled end for the lag, run on schedule while serving."""
    async with app[SERVICES].pool.acquire() as conn:
        app[METRICS].newest_end = await reconcile_repo.newest_reconciled_end(conn)
    every_s = app.get(RECONCILE_EVERY_S, 0.0)
    task = asyncio.create_task(_schedule_loop(app, every_s)) if every_s > 0 else None
    yield
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def install(app: web.Application) -> None:
    """The service, metrics, the governance executor of gated resolutions and the schedule
    (after `approval_routes.install`)."""
    svc = app[SERVICES]
    app[SERVICE] = ReconcileService(svc.pool)
    app[METRICS] = ReconcileMetrics(svc.metrics.registry)

    async def execute(params: dict[str, Any], principal: str) -> dict[str, Any]:
        posted = await post_journal_body(svc, params["journal"], principal)
        await _record(app, params, posted, principal)
        return posted

    app[GOVERNANCE].register(RESOLUTION_KIND, execute)
    app.cleanup_ctx.append(schedule_task)


ROUTES: Final[
    list[tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]], frozenset[Role]]]
] = [
    ("POST", "/reconcile", start, APPROVING),
    ("GET", "/reconcile/{reconcile_id}", get_report, READERS),
    ("POST", "/reconcile/{reconcile_id}/resolve", resolve, APPROVING),
]
