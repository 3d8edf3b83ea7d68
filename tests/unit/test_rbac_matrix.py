"""The RBAC matrix: every route of the app x every role -> allowed, 403 or 401 (DECISIONS D5).

Routes come from the app's router, so a new endpoint is covered the day it is added: it must fall
under a D5 group below (by rule or by an explicit entry), or this test fails and asks for one.
The app is the real one (`create_app`, real middlewares and route table) with a terminal middleware
standing in for the handlers: whatever reaches it passed authentication and authorisation, which
is exactly the order the node must keep (auth before size, type and validation; D6).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from api.app import ROLES, create_app
from api.auth import Authenticator, Role, parse_tokens
from api.oidc import OidcSettings, OidcVerifier
from api.services import Services
from sharding.slots import SlotMap, even_slot_map
from tests.support.security import AUDIENCE, ISSUER, Issuer

ALL: Final = frozenset(Role)
PUBLIC: Final = frozenset[Role]()
WRITE: Final = frozenset({Role.SERVICE, Role.OPERATOR, Role.ADMIN})
OPERATE: Final = frozenset({Role.OPERATOR, Role.ADMIN})
OPERATE_AUDIT: Final = frozenset({Role.OPERATOR, Role.AUDITOR, Role.ADMIN})
ADMIN: Final = frozenset({Role.ADMIN})

# D5 row 3 and D7 endpoints, and decisions recorded in docs/api.md, named route by route.
EXPLICIT: Final[dict[tuple[str, str], frozenset[Role]]] = {
    ("POST", "/proofs/generate"): OPERATE_AUDIT,  # proofs generate: auditor allowed
    ("POST", "/finance/verify"): OPERATE_AUDIT,  # D7: same as /proofs/generate
    ("GET", "/finance/exports/journal.csv"): OPERATE_AUDIT,  # exports: auditor allowed
    ("POST", "/exports/audit"): OPERATE_AUDIT,  # exports: auditor allowed
    ("GET", "/exports/{export_id}"): OPERATE_AUDIT,  # exports (the package's status and files)
    ("GET", "/exports/{export_id}/files/{name}"): OPERATE_AUDIT,  # exports (a package file)
    ("POST", "/reconcile"): OPERATE,  # reconcile runs
    ("POST", "/reconcile/{reconcile_id}/resolve"): OPERATE,  # reconcile resolve
    ("POST", "/finance/approvals/{action_id}"): OPERATE,  # approvals
    ("POST", "/finance/approvals/{action_id}/reject"): OPERATE,  # approvals
    ("POST", "/finance/journal"): OPERATE,  # D7: the operator's adjusting journal
    ("POST", "/finance/holdbacks/release"): OPERATE,  # docs/api.md: operator decision
    ("GET", "/health/proofs"): OPERATE,  # api seed: operator endpoint
    ("POST", "/accounts"): ADMIN,  # accounts policy
    ("POST", "/webhooks/stripe"): PUBLIC,  # Stripe signature, not a token
}
PUBLIC_PATHS: Final = frozenset({"/health", "/ready", "/metrics", "/openapi.json"})


def d5_roles(method: str, path: str) -> frozenset[Role] | None:
    """Who may call a route according to D5 (None: not classified yet)."""
    if (method, path) in EXPLICIT:
        return EXPLICIT[method, path]
    if path in PUBLIC_PATHS or path == "/console" or path.startswith("/console/"):
        return PUBLIC
    if path.startswith("/admin/"):
        return ADMIN
    if method in {"GET", "HEAD"}:
        return ALL  # reads
    if method == "POST" and path.startswith(("/ledger/", "/finance/", "/settlement", "/invoices")):
        return WRITE  # post journals, holds, finance writes
    return None


TOKENS: Final = {role: f"tok-{role}" for role in Role}


def _app(auth: Authenticator) -> web.Application:
    services = Services(
        pool=None,  # type: ignore[arg-type]
        slot_map=SlotMap(even_slot_map(2)),
        shards={},
        coordinator=None,  # type: ignore[arg-type]
        auth=auth,
        poster=None,  # type: ignore[arg-type]
    )
    app = create_app(services)
    app.on_startup.clear()
    app.on_cleanup.clear()
    app.cleanup_ctx.clear()

    @web.middleware
    async def reached(request: web.Request, handler: Any) -> web.StreamResponse:
        return web.json_response({"ok": True, "reached": request.path}, status=299)

    app.middlewares.append(reached)
    return app


def _routes(app: web.Application) -> Iterator[tuple[str, str, Any]]:
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter")
        yield route.method, path, route.handler


def _concrete(path: str) -> str:
    return (
        path.replace("{path:.*}", "app.js")
        .replace("{name}", "trial_balance")
        .replace("{", "x")
        .replace("}", "")
    )


async def _call(
    http: aiohttp.ClientSession, base: str, method: str, path: str, token: str | None
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    body = b"not json at all" if method == "POST" else None
    async with http.request(
        method, base + _concrete(path), headers=headers, data=body, allow_redirects=False
    ) as r:
        text = await r.text()
        return r.status, (json.loads(text) if text.startswith("{") else text)


def _expected(allowed: frozenset[Role], role: Role | None) -> int | str:
    if not allowed:
        return "reached"
    if role is None:
        return 401
    return "reached" if role in allowed else 403


async def _matrix(app: web.Application, credentials: dict[Role, str]) -> list[str]:
    """Every route x (every role + no credentials); the mismatches as text."""
    problems: list[str] = []
    server = TestServer(app)
    await server.start_server()
    try:
        base = str(server.make_url("")).rstrip("/")
        async with aiohttp.ClientSession() as http:
            for method, path, handler in _routes(app):
                allowed = d5_roles(method, path)
                if allowed is None:
                    problems.append(f"{method} {path}: not classified under a D5 group (add it to EXPLICIT)")
                    continue
                if app[ROLES].get(handler, PUBLIC) != allowed:
                    problems.append(
                        f"{method} {path}: ROLES say {sorted(app[ROLES][handler])}, D5 {sorted(allowed)}"
                    )
                for role in [*Role, None]:
                    status, answer = await _call(
                        http, base, method, path, credentials.get(role) if role else None
                    )
                    want = _expected(allowed, role)
                    got: int | str = "reached" if status == 299 else status
                    if want == "reached" and status in {401, 403}:
                        problems.append(f"{method} {path} as {role}: {status}, expected allowed")
                    elif want != "reached" and (got != want or answer["error"]["code"] != "NOT_AUTHORIZED"):
                        problems.append(f"{method} {path} as {role}: {status}, expected {want}")
    finally:
        await server.close()
    return problems


def test_every_route_times_every_static_token_role() -> None:
    """Tried: all routes of the app x service/operator/auditor/admin tokens and no token, with
    unparseable bodies: allowed roles get past auth (never 401/403), other roles get 403
    NOT_AUTHORIZED, no token gets 401, public routes need nothing; the ROLES table equals D5."""
    auth = Authenticator(parse_tokens(",".join(f"{t}={r}" for r, t in TOKENS.items())))
    app = _app(auth)
    assert sum(1 for _ in _routes(app)) >= 60
    assert asyncio.run(_matrix(app, dict(TOKENS))) == []


def test_every_route_times_every_oidc_role_with_and_without_a_second_factor(tmp_path: Path) -> None:
    """Tried: the same matrix with OIDC JWTs (roles from the claim, amr with mfa) for the four roles;
    then operator and admin JWTs without mfa: 401 `mfa_required` (WWW-Authenticate step-up) exactly
    on the operator/admin routes (those the service role may not call), allowed elsewhere."""
    issuer = Issuer()
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(issuer.jwks()))
    verifier = OidcVerifier(OidcSettings(ISSUER, AUDIENCE, jwks_file=jwks))
    auth = Authenticator(parse_tokens(f"{TOKENS[Role.SERVICE]}=service"), oidc=verifier.principal)
    app = _app(auth)
    with_mfa = {role: issuer.token(roles=[role.value], sub=f"user-{role}") for role in Role}
    assert asyncio.run(_matrix(app, with_mfa)) == []

    async def step_up() -> list[str]:
        problems = []
        server = TestServer(_app(auth))
        await server.start_server()
        base = str(server.make_url("")).rstrip("/")
        try:
            async with aiohttp.ClientSession() as http:
                for method, path, _ in _routes(app):
                    allowed = d5_roles(method, path) or PUBLIC
                    for role in (Role.OPERATOR, Role.ADMIN):
                        if role not in allowed:
                            continue
                        token = issuer.token(roles=[role.value], amr=["pwd"])
                        status, answer = await _call(http, base, method, path, token)
                        needs_mfa = Role.SERVICE not in allowed
                        if needs_mfa and (
                            status != 401 or answer["error"]["details"]["reason"] != "mfa_required"
                        ):
                            problems.append(f"{method} {path} as {role} without mfa: {status}, expected 401")
                        if not needs_mfa and status != 299:
                            problems.append(
                                f"{method} {path} as {role} without mfa: {status}, expected allowed"
                            )
        finally:
            await server.close()
        return problems

    assert asyncio.run(step_up()) == []


def test_the_step_up_answer_names_the_missing_factor(tmp_path: Path) -> None:
    """Tried: an admin JWT with amr [pwd] on POST /admin/keys/rotate -> 401 NOT_AUTHORIZED, reason
    mfa_required, required_amr [mfa, otp], `WWW-Authenticate: Bearer
    error="insufficient_user_authentication"`; with amr [otp] the same call gets through."""
    issuer = Issuer()
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(issuer.jwks()))
    auth = Authenticator({}, oidc=OidcVerifier(OidcSettings(ISSUER, AUDIENCE, jwks_file=jwks)).principal)

    async def scenario() -> None:
        server = TestServer(_app(auth))
        await server.start_server()
        try:
            async with aiohttp.ClientSession() as http:
                url = str(server.make_url("/admin/keys/rotate"))
                token = issuer.token(roles=["admin"], amr=["pwd"])
                async with http.post(url, headers={"Authorization": f"Bearer {token}"}) as r:
                    body = await r.json()
                    assert r.status == 401, body
                    assert 'error="insufficient_user_authentication"' in r.headers["WWW-Authenticate"]
                assert body["error"]["code"] == "NOT_AUTHORIZED"
                assert body["error"]["details"] == {"reason": "mfa_required", "required_amr": ["mfa", "otp"]}
                token = issuer.token(roles=["admin"], amr=["otp"])
                async with http.post(url, headers={"Authorization": f"Bearer {token}"}) as r:
                    assert r.status == 299
        finally:
            await server.close()

    asyncio.run(scenario())
