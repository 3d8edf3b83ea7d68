"""OIDC verification (`api.oidc`) and the combined authenticator (`api.auth`), with keys made here."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from api.auth import Authenticator, Method, Role, parse_tokens
from api.client_certs import ClientCertMap, ClientMapError, parse_client_map
from api.oidc import OidcSettings, OidcVerifier
from ledger.errors import LedgerError
from tests.support.security import AUDIENCE, ISSUER, Issuer


def _verifier(tmp_path: Path, issuer: Issuer, **settings: Any) -> OidcVerifier:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(issuer.jwks()))
    return OidcVerifier(OidcSettings(ISSUER, AUDIENCE, jwks_file=path, **settings))


def _reason(call: Awaitable[Any]) -> tuple[int, str]:
    with pytest.raises(LedgerError) as info:
        asyncio.run(call)  # type: ignore[arg-type]
    return info.value.http_status, info.value.details["reason"]


@pytest.mark.parametrize("kid", ["rsa-1", "ec-1", "ed-1"])
def test_tokens_signed_with_each_key_type_verify(tmp_path: Path, kid: str) -> None:
    """Tried: RS256, ES256 and EdDSA tokens from a JWKS file -> an `oidc:<sub>` principal with the
    claim's roles and the second factor from `amr`."""
    issuer = Issuer()
    principal = asyncio.run(
        _verifier(tmp_path, issuer).principal(issuer.token(kid, roles=["admin", "auditor"]))
    )
    assert principal.method is Method.OIDC and principal.name == "oidc:alice"
    assert principal.role is Role.ADMIN and principal.roles == {Role.ADMIN, Role.AUDITOR}
    assert principal.mfa and "alice" in principal.identities


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"exp": int(time.time()) - 3600}, "token_expired"),
        ({"nbf": int(time.time()) + 3600}, "token_not_yet_valid"),
        ({"iss": "https://evil.example"}, "wrong_issuer"),
        ({"aud": "another-service"}, "wrong_audience"),
        ({"exp": None}, "missing_claim"),
        ({"sub": None}, "missing_claim"),
    ],
)
def test_claims_are_checked(tmp_path: Path, claims: dict[str, Any], reason: str) -> None:
    """Tried: expired, not-yet-valid, foreign issuer, foreign audience, no exp, no sub -> 401 with
    that precise reason."""
    issuer = Issuer()
    assert _reason(_verifier(tmp_path, issuer).principal(issuer.token(**claims))) == (401, reason)


def test_a_forged_signature_and_a_foreign_key_are_refused(tmp_path: Path) -> None:
    """Tried: a token re-signed by another key under a published kid, a token from an unpublished
    kid, an `alg: none` token and garbage -> 401 bad_signature / unknown_key / algorithm_not_allowed
    / malformed_token."""
    issuer = Issuer()
    verifier = _verifier(tmp_path, issuer)
    forger = Issuer()
    assert _reason(verifier.principal(forger.token("rsa-1"))) == (401, "bad_signature")
    forger.add_key("rsa-9", "RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048))
    assert _reason(verifier.principal(forger.token("rsa-9"))) == (401, "unknown_key")
    import jwt

    unsigned = jwt.encode({"sub": "x", "iss": ISSUER, "aud": AUDIENCE}, None, algorithm="none")
    assert _reason(verifier.principal(unsigned)) == (401, "algorithm_not_allowed")
    assert _reason(verifier.principal("eyJhbGciOi.not.a-jwt")) == (401, "malformed_token")


def test_roles_claim_is_configurable_and_a_token_without_roles_is_403(tmp_path: Path) -> None:
    """Tried: roles under `realm_access.roles` (Keycloak-style) and as a space-separated string; a
    token without a ledger role -> 403 no_role; unknown role names are ignored."""
    issuer = Issuer()
    nested = _verifier(tmp_path, issuer, roles_claim="realm_access.roles")
    token = issuer.token(realm_access={"roles": ["auditor", "superuser"]})
    assert asyncio.run(nested.principal(token)).roles == {Role.AUDITOR}
    plain = _verifier(tmp_path, issuer)
    assert _reason(plain.principal(issuer.token(roles=[]))) == (403, "no_role")
    assert _reason(plain.principal(issuer.token(roles=["root"]))) == (403, "no_role")
    spaced = issuer.token(roles=None, groups="service operator")
    assert (
        asyncio.run(_verifier(tmp_path, issuer, roles_claim="groups").principal(spaced)).role is Role.OPERATOR
    )


def _serve_jwks(issuer: Issuer) -> Callable[[], Awaitable[tuple[web.AppRunner, str, list[int]]]]:
    async def start() -> tuple[web.AppRunner, str, list[int]]:
        hits = [0]

        async def jwks(_: web.Request) -> web.Response:
            hits[0] += 1
            return web.json_response(issuer.jwks())

        app = web.Application()
        app.router.add_get("/jwks", jwks)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        return runner, f"http://127.0.0.1:{port}/jwks", hits

    return start


def test_jwks_url_is_cached_and_refreshed_on_an_unknown_kid() -> None:
    """Tried: a JWKS served over HTTP: two tokens cost one fetch; a token from a key the issuer
    published after the first fetch triggers one refresh and verifies; an unknown kid within the
    refresh interval is refused without hammering the IdP; a dead JWKS URL is 503."""
    issuer = Issuer()

    async def scenario() -> None:
        runner, url, hits = await _serve_jwks(issuer)()
        try:
            verifier = OidcVerifier(OidcSettings(ISSUER, AUDIENCE, jwks_url=url, jwks_refresh_min_s=0.0))
            await verifier.principal(issuer.token("rsa-1"))
            await verifier.principal(issuer.token("ec-1"))
            assert hits[0] == 1
            issuer.add_key(
                "ec-2", "ES256", ec.generate_private_key(ec.SECP256R1())
            )  # key rotation at the IdP
            assert (await verifier.principal(issuer.token("ec-2"))).name == "oidc:alice"
            assert hits[0] == 2
            slow = OidcVerifier(OidcSettings(ISSUER, AUDIENCE, jwks_url=url, jwks_refresh_min_s=3600.0))
            await slow.principal(issuer.token("rsa-1"))
            issuer.add_key("ec-3", "ES256", ec.generate_private_key(ec.SECP256R1()))
            before = hits[0]
            for _ in range(3):
                with pytest.raises(LedgerError) as info:
                    await slow.principal(issuer.token("ec-3"))
                assert info.value.details["reason"] == "unknown_key"
            assert hits[0] == before
        finally:
            await runner.cleanup()
        dead = OidcVerifier(OidcSettings(ISSUER, AUDIENCE, jwks_url=url))
        with pytest.raises(LedgerError) as info:
            await dead.principal(issuer.token())
        assert info.value.http_status == 503 and info.value.details["reason"] == "jwks_unavailable"

    asyncio.run(scenario())


def test_static_operator_tokens_are_off_while_oidc_is_on(tmp_path: Path) -> None:
    """Tried (D5): with OIDC configured a static admin/operator token -> 401 static_token_disabled, a
    static service token still works, and LEDGER_ALLOW_STATIC_OPERATOR_TOKENS=1 brings them back;
    without OIDC static operator tokens work as before."""
    issuer = Issuer()
    tokens = parse_tokens("svc=service,op=operator,adm=admin")
    verifier = _verifier(tmp_path, issuer)
    strict = Authenticator(tokens, oidc=verifier.principal)
    assert _reason(strict.authenticate("Bearer adm", None)) == (401, "static_token_disabled")
    assert _reason(strict.authenticate("Bearer op", None)) == (401, "static_token_disabled")
    assert asyncio.run(strict.authenticate("Bearer svc", None)).role is Role.SERVICE
    assert asyncio.run(strict.authenticate(f"Bearer {issuer.token()}", None)).method is Method.OIDC
    dev = Authenticator(tokens, oidc=verifier.principal, allow_static_operator_tokens=True)
    assert asyncio.run(dev.authenticate("Bearer adm", None)).role is Role.ADMIN
    assert asyncio.run(Authenticator(tokens).authenticate("Bearer adm", None)).role is Role.ADMIN


PEERCERT = {
    "subject": ((("commonName", "marketplace"),),),
    "subjectAltName": (("DNS", "market.internal"), ("URI", "spiffe://example/ns/finance/sa/exports")),
}


def test_client_certificates_map_to_principals() -> None:
    """Tried: a client map with cn/dns/uri rules: the first matching rule names the principal
    `mtls:<identity>` and its role; an unmapped certificate gives no principal (so a bearer token is
    needed); a bearer token wins over the certificate; a malformed map names its line."""
    rules = parse_client_map(
        "# services\nuri:spiffe://example/ns/finance/sa/exports auditor\ncn:marketplace service\n"
    )
    certs = ClientCertMap(rules)
    principal = certs.principal(PEERCERT)
    assert principal is not None and principal.name == "mtls:uri:spiffe://example/ns/finance/sa/exports"
    assert principal.role is Role.AUDITOR
    assert certs.principal({"subject": ((("commonName", "stranger"),),)}) is None
    auth = Authenticator(parse_tokens("svc=service"), client_certs=certs.principal)
    assert asyncio.run(auth.authenticate(None, PEERCERT)).method is Method.MTLS
    assert asyncio.run(auth.authenticate("Bearer svc", PEERCERT)).method is Method.TOKEN
    assert _reason(auth.authenticate(None, {"subject": ()})) == (401, "missing")
    for text in ("cn:x", "cn:x root", "name:x service", "cn: service"):
        with pytest.raises(ClientMapError, match="line 1"):
            parse_client_map(text)
