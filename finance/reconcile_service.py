"""Reconciliation runs (issue 7 item 4): fetch both sides of a window, match, store the report.

`ReconcileService.run` validates a request (`RunRequest`), creates the run once per `request_id`
(a replay of the same request answers the stored report; another request under that id is 409
IDEMPOTENCY_CONFLICT), reads the ledger's provider-referenced movements (store/reconcile_repo.py),
lists the provider's payment intents, refunds and transfers through the `stripe` SDK
(finance/stripe_gateway.py, auto-paging), matches them (finance/reconcile.py) and stores the
discrepancies. The run is synchronous: it answers `status: completed` with the report. The
provider unreachable -> 503 SERVICE_UNAVAILABLE (retryable; the run is `failed` and the same
request runs it again); provider data that cannot be read -> 500 RECONCILE_ERROR.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import asyncpg
import msgspec

from finance import payouts, reconcile
from finance.reconcile import Record, Resolution, Window
from finance.stripe_gateway import (
    LISTED,
    PermanentProviderError,
    ProviderDataError,
    StripeGateway,
    TransientProviderError,
)
from ledger.errors import ErrorCode, LedgerError, Rejection, validation_error
from ledger.journal import JOURNAL_ID_PATTERN
from ledger.timestamps import parse_rfc3339, rfc3339
from signer.canonical import canonical
from store import reconcile_repo

REQUEST_ID_MAX: Final = 120
FUTURE_TOLERANCE: Final = timedelta(seconds=5)
"""How far past the server's clock `to_ts` may reach (client clock skew)."""


class RunRequest(msgspec.Struct, forbid_unknown_fields=True):
    """`POST /reconcile`."""

    request_id: str
    from_ts: str
    to_ts: str
    provider: str


class ValidRun(msgspec.Struct, frozen=True):
    """A validated run request."""

    request_id: str
    provider: str
    window: Window

    @property
    def reconcile_id(self) -> str:
        """The run's id (the seed's `reconcile-...` form)."""
        return f"reconcile-{self.request_id}"

    def request_hash(self) -> str:
        """Hash of the canonical request (what a replay must repeat)."""
        body = {
            "request_id": self.request_id,
            "provider": self.provider,
            "from_ts": rfc3339(self.window.start),
            "to_ts": rfc3339(self.window.end),
        }
        return hashlib.sha256(canonical(body)).hexdigest()


def utc_now() -> datetime:
    """The server's clock (UTC)."""
    return datetime.now(UTC)


def validate(request: RunRequest, now: datetime) -> ValidRun:
    """Check a request; VALIDATION_ERROR naming the field."""
    if not JOURNAL_ID_PATTERN.fullmatch(request.request_id) or len(request.request_id) > REQUEST_ID_MAX:
        raise validation_error(
            f"request_id must be 1-{REQUEST_ID_MAX} characters of [A-Za-z0-9:._-]", "$.request_id"
        )
    if request.provider not in reconcile.PROVIDERS:
        raise validation_error(f"provider must be one of {list(reconcile.PROVIDERS)}", "$.provider")
    times: list[datetime] = []
    for name in ("from_ts", "to_ts"):
        moment = parse_rfc3339(getattr(request, name))
        if moment is None:
            raise validation_error(f"{name} must be an RFC 3339 timestamp", f"$.{name}")
        times.append(moment)
    start, end = times
    if start >= end:
        raise validation_error("from_ts must be before to_ts", "$.to_ts")
    if end - start > reconcile.WINDOW_MAX:
        raise validation_error(
            f"the window may span at most {reconcile.WINDOW_MAX.days} days; split it into several runs",
            "$.to_ts",
            max_days=reconcile.WINDOW_MAX.days,
        )
    if end > now + FUTURE_TOLERANCE:
        raise validation_error("to_ts is in the future; a window must have ended", "$.to_ts")
    return ValidRun(request.request_id, request.provider, Window(start.astimezone(UTC), end.astimezone(UTC)))


def _time(value: datetime | None) -> str | None:
    return rfc3339(value) if value is not None else None


def discrepancy_view(row: asyncpg.Record | dict[str, Any]) -> dict[str, Any]:
    """A discrepancy as the API shows it (an absent side's amount is 0, as in the seed)."""
    details = row["details"]
    return {
        "discrepancy_id": row["discrepancy_id"],
        "kind": row["kind"],
        "reason": row["reason"],
        "provider_reference": row["provider_reference"],
        "journal_id": row["journal_id"],
        "ledger_amount": row["ledger_amount"] or 0,
        "provider_amount": row["provider_amount"] or 0,
        "ledger_currency": row["ledger_currency"],
        "provider_currency": row["provider_currency"],
        "details": msgspec.json.decode(details) if isinstance(details, str) else details,
        "status": row["status"],
        "resolution_journal_id": row["resolution_journal_id"],
    }


def as_discrepancy(row: asyncpg.Record) -> reconcile.Discrepancy:
    """A stored discrepancy back as the pure value."""
    details = row["details"]
    return reconcile.Discrepancy(
        row["discrepancy_id"],
        row["kind"],
        row["reason"],
        row["provider_reference"],
        row["journal_id"],
        row["ledger_amount"],
        row["provider_amount"],
        row["ledger_currency"],
        row["provider_currency"],
        msgspec.json.decode(details) if isinstance(details, str) else dict(details),
    )


class ReconcileService:
    """Runs and reads reconciliations; `gateway_factory` gives the provider client (None: not set up)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        gateway_factory: Callable[[], StripeGateway | None] = StripeGateway.from_env,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.pool = pool
        self.gateway_factory = gateway_factory
        self.clock = clock
        self._locks: dict[str, asyncio.Lock] = {}

    async def view(self, reconcile_id: str) -> dict[str, Any]:
        """The run and its discrepancies; 404 NOT_FOUND."""
        async with self.pool.acquire() as conn:
            run = await reconcile_repo.run_row(conn, reconcile_id)
            if run is None:
                raise LedgerError(
                    ErrorCode.NOT_FOUND, f"no reconciliation {reconcile_id}", {"resource": "reconcile"}
                )
            rows = await reconcile_repo.discrepancy_rows(conn, reconcile_id)
        found = [discrepancy_view(r) for r in rows]
        counts = dict.fromkeys(reconcile.REASONS, 0)
        for d in found:
            counts[d["reason"]] += 1
        view: dict[str, Any] = {
            "reconcile_id": reconcile_id,
            "request_id": run["request_id"],
            "provider": run["provider"],
            "from_ts": rfc3339(run["from_ts"]),
            "to_ts": rfc3339(run["to_ts"]),
            "status": run["status"],
            "trigger": run["trigger"],
            "matched": run["matched"],
            "discrepancy_count": len(found),
            "counts": counts,
            "open": sum(d["status"] == "open" for d in found),
            "provider_records": run["provider_records"],
            "ledger_records": run["ledger_records"],
            "discrepancies": found,
            "principal": run["principal"],
            "created_at": _time(run["created_at"]),
            "completed_at": _time(run["completed_at"]),
        }
        if run["error"] is not None:
            view["error"] = msgspec.json.decode(run["error"])
        return view

    async def run(
        self, request: RunRequest, principal: str, trigger: str = "api"
    ) -> tuple[dict[str, Any], bool]:
        """Run (or replay) a reconciliation; (the report, whether this call ran it)."""
        valid = validate(request, self.clock())
        digest = valid.request_hash()
        reconcile_id = valid.reconcile_id
        async with self._locks.setdefault(reconcile_id, asyncio.Lock()):
            async with self.pool.acquire() as conn:
                created = await reconcile_repo.insert_run(
                    conn,
                    {
                        "reconcile_id": reconcile_id,
                        "request_id": valid.request_id,
                        "provider": valid.provider,
                        "from_ts": valid.window.start,
                        "to_ts": valid.window.end,
                        "trigger": trigger,
                        "request_hash": digest,
                        "principal": principal,
                    },
                )
                if not created:
                    existing = await reconcile_repo.run_row(conn, reconcile_id)
                    assert existing is not None
                    if existing["request_hash"] != digest:
                        raise Rejection(
                            ErrorCode.IDEMPOTENCY_CONFLICT,
                            "request_id already used with a different request",
                            {"request_id": valid.request_id},
                        )
                    if not await reconcile_repo.restart_run(conn, reconcile_id):
                        return await self.view(reconcile_id), False
            await self._execute(reconcile_id, valid)
        return await self.view(reconcile_id), True

    async def _execute(self, reconcile_id: str, valid: ValidRun) -> None:
        try:
            provider_side = await self._provider_records(valid)
            async with self.pool.acquire() as conn:
                ledger_side = await self._ledger_records(conn, valid)
                keys = sorted({r.reference for r in (*provider_side, *ledger_side)})
                resolved = [
                    Resolution(
                        r["kind"],
                        r["provider_reference"],
                        r["journal_id"],
                        r["created_at"],
                        r["amount"],
                        r["currency"],
                    )
                    for r in await reconcile_repo.resolutions(conn, valid.provider, keys)
                ]
            outcome = reconcile.reconcile(valid.window, ledger_side, provider_side, resolved)
        except LedgerError as exc:
            async with self.pool.acquire() as conn:
                await reconcile_repo.fail_run(conn, reconcile_id, msgspec.json.encode(exc.as_dict()).decode())
            raise
        rows = [
            {**msgspec.to_builtins(d), "details": msgspec.json.encode(d.details).decode()}
            for d in outcome.discrepancies
        ]
        in_window = (
            sum(valid.window.contains(r.at) for r in provider_side),
            sum(valid.window.contains(r.at) for r in ledger_side),
        )
        async with self.pool.acquire() as conn:
            await reconcile_repo.complete_run(conn, reconcile_id, (outcome.matched, *in_window), rows)

    async def _ledger_records(self, conn: asyncpg.Connection, valid: ValidRun) -> list[Record]:
        start, end = valid.window.widened()
        return [
            Record(
                r["kind"],
                r["reference"],
                r["amount"],
                r["currency"],
                r["at"],
                payouts.settle_journal_id(r["journal_id"]) if r["kind"] == "payout" else r["journal_id"],
            )
            for r in await reconcile_repo.ledger_records(conn, valid.provider, start, end)
        ]

    async def _provider_records(self, valid: ValidRun) -> list[Record]:
        gateway = self.gateway_factory()
        if gateway is None:
            raise LedgerError(
                ErrorCode.SERVICE_UNAVAILABLE,
                "reconciliation needs STRIPE_API_KEY (and STRIPE_API_BASE)",
                {"env": "STRIPE_API_KEY", "retryable": False},
            )
        start, end = valid.window.widened()
        found: list[Record] = []
        try:
            for kind in LISTED:
                objects = await gateway.list_created(
                    kind, math.floor(start.timestamp()), math.ceil(end.timestamp())
                )
                for obj in objects:
                    record = reconcile.provider_record(kind, obj)  # type: ignore[arg-type]
                    if record is not None:
                        found.append(record)
        except TransientProviderError as exc:
            raise LedgerError(
                ErrorCode.SERVICE_UNAVAILABLE,
                "payment provider unavailable; retry the same request",
                {"provider": valid.provider, "reason": str(exc), "retryable": True},
            ) from exc
        except (ProviderDataError, reconcile.ProviderDataError, PermanentProviderError) as exc:
            raise LedgerError(
                ErrorCode.RECONCILE_ERROR,
                "the provider's records could not be read",
                {"provider": valid.provider, "reason": str(exc)[:500]},
            ) from exc
        finally:
            await gateway.close()
        return found
