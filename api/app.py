"""The aiohttp application: its middleware (envelope, shedding, auth, limits) and the route table."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Final

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api import (
    accounting_export_routes,
    admin_routes,
    approval_routes,
    audit_log,
    console_routes,
    escrow_routes,
    export_routes,
    finance_routes,
    fx_routes,
    hold_routes,
    ledger_routes,
    openapi,
    payout_routes,
    payout_tasks,
    proof_routes,
    reconcile_routes,
    report_routes,
    royalty_routes,
    shard_routes,
    tax_routes,
)
from api.auth import PRINCIPAL, PUBLIC, STEP_UP_CHALLENGE, Role, require, require_second_factor
from api.envelope import Handler, error_answer, error_response, ok
from api.limits import LIMITER, UNSHED_PATHS, Limiter, LimitSettings, overloaded, token_refusal
from api.requests import BATCH_BODY_MAX
from api.services import SERVICES, Services
from ledger.errors import ErrorCode, LedgerError

ROLES: Final = web.AppKey("roles", dict[Any, frozenset[Role]])
READY_TIMEOUT_S: Final = 3.0
PLACEMENT_TIMEOUT_S: Final = 1.0  # /health asks each shard actor where it runs


@web.middleware
async def front_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The node's one middleware, in this order: the envelope (every failure answers `{ok: false,
    error}`, `api.envelope.error_answer`); load shedding (`api.limits`; not the system routes); auth:
    401 without a known credential, 403 for a role the route does not allow, 401 `mfa_required` for
    a human without a second factor on an operator/admin route (public routes pass); then the
    per-token limits (429). Auth always comes before size, type and validation checks (D6
    precedence). One coroutine per request, where four chained middlewares cost four."""
    try:
        app = request.app
        limiter = app[LIMITER]
        size = -1  # -1: a system route, not counted in flight
        if request.path not in UNSHED_PATHS:
            size = request.content_length or 0
            if not (limiter.try_enter(size) or await limiter.enter(size)):
                return overloaded(request, limiter)
        who = None
        try:
            allowed = app[ROLES].get(getattr(request.match_info, "handler", None))
            if allowed is not None and allowed != PUBLIC:
                auth, header = app[SERVICES].auth, request.headers.get("Authorization")
                principal = auth.known(header)  # a static token seen before: no coroutine, no hashing
                if principal is None:
                    principal = await auth.authenticate(header, _peercert(request))
                require(principal, allowed)
                try:
                    require_second_factor(principal, allowed)
                except LedgerError as exc:
                    return error_response(exc, {"WWW-Authenticate": STEP_UP_CHALLENGE})
                request[PRINCIPAL] = principal
                refused = token_refusal(request, limiter, principal.name)
                if refused is not None:
                    return refused
                who = principal.name
            return await handler(request)
        finally:
            if who is not None:
                limiter.token_leave(who)
            if size >= 0:
                limiter.leave(size)
    except Exception as exc:
        return error_answer(request, exc)


def _peercert(request: web.Request) -> Any:
    """The TLS client certificate of the request's connection (None without mTLS)."""
    return request.transport.get_extra_info("peercert") if request.transport is not None else None


async def health(request: web.Request) -> web.Response:
    """GET /health: liveness plus how signing and transport are configured."""
    svc = request.app[SERVICES]
    body: dict[str, Any] = {
        "signingConfigured": svc.signing_configured,
        "mTLS": svc.mtls,
        "oidc": svc.auth.oidc is not None,
        "signer": svc.signer_kind,
    }
    if svc.signer_kind == "software":
        body["warning"] = "signing with a software development key, not an HSM (set LEDGER_PKCS11_MODULE)"
    body["shards"] = await _shard_placement(svc)
    return ok(**body)


async def _shard_placement(svc: Services) -> list[dict[str, Any]]:
    """Each shard actor's Ray node id (null when it does not answer within a second, e.g. while
    Ray restarts it on another node); ports without a placement (test fakes) are left out."""

    async def one(shard_id: int, port: Any) -> dict[str, Any]:
        try:
            node_id = await asyncio.wait_for(port.node_id(), PLACEMENT_TIMEOUT_S)
        except Exception:
            node_id = None
        return {"shard_id": shard_id, "node_id": node_id}

    shards = sorted((s, p) for s, p in svc.shards.items() if hasattr(p, "node_id"))
    return list(await asyncio.gather(*(one(s, p) for s, p in shards)))


async def _shard_statuses(svc: Services) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    async def one(port: Any) -> dict[str, Any] | None:
        try:
            return await asyncio.wait_for(port.status(), READY_TIMEOUT_S)  # type: ignore[no-any-return]
        except Exception:
            return None

    shard_ids = sorted(svc.shards)
    answers = await asyncio.gather(*(one(svc.shards[s]) for s in shard_ids), one(svc.coordinator))
    shards = [
        {"shard_id": s, "ok": a is not None, **(a or {})} for s, a in zip(shard_ids, answers, strict=False)
    ]
    return shards, answers[-1]


async def ready(request: web.Request) -> web.Response:
    """GET /ready: the database and every actor answer, and the export destination is writable (D7)."""
    svc = request.app[SERVICES]
    try:
        async with svc.pool.acquire(timeout=READY_TIMEOUT_S) as conn:
            database = await conn.fetchval("SELECT 1") == 1
    except Exception:
        database = False
    shards, coordinator = await _shard_statuses(svc)
    exports = await export_routes.ready_check(request.app)
    everything = database and coordinator is not None and all(s["ok"] for s in shards)
    everything = everything and (exports is None or bool(exports["ok"]))
    details = {"database": database, "shards": shards, "coordinator": coordinator is not None}
    if exports is not None:
        details["exports"] = exports
    if not everything:
        raise LedgerError(ErrorCode.SERVICE_UNAVAILABLE, "not ready", details)
    return ok(**details)


_LOG_VACUUMS: Final = {"xtx_vacuums": "ok", "xtx_vacuum_failures": "failed"}
"""Coordinator status counters of its log's VACUUMs, by the `result` label of their metric."""


async def metrics(request: web.Request) -> web.Response:
    """GET /metrics: Prometheus text format."""
    svc = request.app[SERVICES]
    for name, depth in svc.poster.queue_depths().items():
        svc.metrics.shard_queue_depth.labels(name, "front_end").set(depth)
    for name, shed in svc.poster.shed_counts().items():
        svc.metrics.shed_journals.labels(name).set(shed)
    svc.metrics.in_flight_requests.set(request.app[LIMITER].in_flight)
    for shard_id, batcher in svc.poster.shards.items():
        if batcher.calls:
            svc.metrics.call_batch_size.labels(str(shard_id)).set(batcher.items_sent / batcher.calls)
    shards, coordinator = await _shard_statuses(svc)
    for shard in shards:
        if shard["ok"]:
            label = str(shard["shard_id"])
            svc.metrics.shard_queue_depth.labels(label, "actor").set(shard["queue_depth"])
            svc.metrics.shard_commits.labels(label).set(shard["batches"])
            svc.metrics.shard_journals.labels(label).set(shard["journals"])
    for outcome, count in (coordinator or {}).items():
        if outcome in _LOG_VACUUMS:
            svc.metrics.twophase_log_vacuums.labels(_LOG_VACUUMS[outcome]).set(count)
        elif outcome not in {"queue_depth", "in_flight"}:
            svc.metrics.twophase_outcomes.labels(outcome).set(count)
    body = generate_latest(svc.metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


SYSTEM_ROUTES: Final[
    list[tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]], frozenset[Role]]]
] = [
    ("GET", "/health", health, PUBLIC),
    ("GET", "/ready", ready, PUBLIC),
    ("GET", "/metrics", metrics, PUBLIC),
    ("GET", "/openapi.json", openapi.openapi_json, PUBLIC),
]


def create_app(
    svc: Services,
    governance: approval_routes.GovernanceConfig | None = None,
    limits: LimitSettings | None = None,
) -> web.Application:
    """The application with every route, the envelope, load shedding and auth (`governance`: multisig
    settings; `limits`: api/limits.py, defaults when None)."""
    app = web.Application(middlewares=[front_middleware], client_max_size=BATCH_BODY_MAX + 1)
    app[SERVICES] = svc
    app[LIMITER] = Limiter(limits or LimitSettings())
    roles: dict[Any, frozenset[Role]] = {}
    routes = [
        *SYSTEM_ROUTES,
        *hold_routes.ROUTES,
        *ledger_routes.ROUTES,
        *proof_routes.ROUTES,
        *audit_log.ROUTES,
        *admin_routes.ROUTES,
        *shard_routes.ROUTES,
        *report_routes.ROUTES,  # before finance_routes: `/finance/invoice/{id}.pdf`
        *finance_routes.ROUTES,
        *fx_routes.ROUTES,
        *approval_routes.ROUTES,
        *tax_routes.ROUTES,
        *royalty_routes.ROUTES,
        *payout_routes.ROUTES,
        *escrow_routes.ROUTES,
        *reconcile_routes.ROUTES,
        *accounting_export_routes.ROUTES,
        *console_routes.ROUTES,
        *export_routes.ROUTES,
    ]
    for method, path, handler, allowed in routes:
        app.router.add_route(method, path, handler)
        roles[handler] = frozenset(allowed)
    app[ROLES] = roles
    finance_routes.install(app)
    approval_routes.install(app, governance or approval_routes.GovernanceConfig())
    payout_routes.install(app)
    escrow_routes.install(app)
    app.cleanup_ctx.append(payout_tasks.payout_tasks)
    reconcile_routes.install(app)
    console_routes.install(app)
    export_routes.install(app)
    app.on_cleanup.append(proof_routes.shutdown)
    openapi.install(app, roles)
    return app
