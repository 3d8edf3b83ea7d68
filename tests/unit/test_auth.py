"""Unit tests of bearer-token authentication (`api.auth`)."""

from __future__ import annotations

import asyncio

import pytest

from api.auth import VERIFIED_MAX, Authenticator, Principal, Role, TokenError, parse_tokens
from ledger.errors import ErrorCode, LedgerError


def test_parse_tokens_accepts_token_role_pairs() -> None:
    """`a=service,b=admin` configures two tokens with their roles (spaces tolerated)."""
    assert parse_tokens("a=service,b=admin") == {"a": Role.SERVICE, "b": Role.ADMIN}
    assert parse_tokens(" a=service , b=auditor ,") == {"a": Role.SERVICE, "b": Role.AUDITOR}


def test_parse_tokens_keeps_equals_signs_in_tokens() -> None:
    """Base64-padded tokens (ending in `=`) split at the last `=`."""
    assert parse_tokens("dG9rZW4==operator") == {"dG9rZW4=": Role.OPERATOR}


@pytest.mark.parametrize("spec", ["a=root", "a=service,b=superuser", "a=SERVICE"])
def test_parse_tokens_rejects_unknown_roles(spec: str) -> None:
    """A role outside service/operator/auditor/admin stops start-up."""
    with pytest.raises(TokenError, match="unknown role"):
        parse_tokens(spec)


@pytest.mark.parametrize("spec", ["", " ", ",", " , ,"])
def test_parse_tokens_rejects_empty_specs(spec: str) -> None:
    """No configured token is an error, not an open node."""
    with pytest.raises(TokenError):
        parse_tokens(spec)


@pytest.mark.parametrize("spec", ["justatoken", "=service", "a=service,b"])
def test_parse_tokens_rejects_entries_without_token_or_role(spec: str) -> None:
    """Every entry must be `token=role`."""
    with pytest.raises(TokenError):
        parse_tokens(spec)


def test_token_error_does_not_echo_the_whole_token() -> None:
    """A malformed entry is named by a short prefix only (tokens are secrets)."""
    with pytest.raises(TokenError) as info:
        parse_tokens("supersecretvalue")
    assert "supersecretvalue" not in str(info.value)


def _auth() -> Authenticator:
    return Authenticator(parse_tokens("tok-svc=service,tok-svc2=service,tok-adm=admin,tok-aud=auditor"))


def test_authenticator_maps_tokens_to_roles() -> None:
    """Each configured token resolves to its role."""
    auth = _auth()
    assert auth.principal("Bearer tok-svc").role is Role.SERVICE
    assert auth.principal("Bearer tok-adm").role is Role.ADMIN
    assert auth.principal("Bearer tok-aud").role is Role.AUDITOR


def test_principal_is_stable_and_names_the_role() -> None:
    """The same token always yields the same `role:fingerprint`, without the token itself."""
    auth = _auth()
    first, second = auth.principal("Bearer tok-svc"), auth.principal("Bearer tok-svc")
    assert first == second
    assert first.name.startswith("service:")
    assert "tok-svc" not in first.name


def test_principals_of_two_tokens_with_the_same_role_differ() -> None:
    """Two service tokens never share a principal (so never share idempotency keys)."""
    auth = _auth()
    one, two = auth.principal("Bearer tok-svc"), auth.principal("Bearer tok-svc2")
    assert one.role == two.role == Role.SERVICE
    assert one.name != two.name


@pytest.mark.parametrize("header", ["Bearer nope", "Bearer tok-sv", "Bearer tok-svcx", "Bearer  "])
def test_unknown_token_is_401(header: str) -> None:
    """An unknown token is NOT_AUTHORIZED (401) with reason `unknown`."""
    with pytest.raises(LedgerError) as info:
        _auth().principal(header)
    assert info.value.code == ErrorCode.NOT_AUTHORIZED
    assert info.value.http_status == 401
    assert info.value.details == {"reason": "unknown"}


@pytest.mark.parametrize("header", [None, "", "tok-svc", "Basic tok-svc", "bearer tok-svc"])
def test_missing_bearer_token_is_401(header: str | None) -> None:
    """No header or another scheme is NOT_AUTHORIZED (401) with reason `missing`."""
    with pytest.raises(LedgerError) as info:
        _auth().principal(header)
    assert info.value.code == ErrorCode.NOT_AUTHORIZED
    assert info.value.http_status == 401
    assert info.value.details == {"reason": "missing"}


def test_known_answers_only_headers_authenticate_accepted() -> None:
    """Tried: `known` (the front end's per-request shortcut) knows nothing before `authenticate`
    accepted a header, then answers the same principal; an unknown token is never remembered; a
    static operator token stays refused once OIDC is configured; the memory is bounded."""
    tokens = parse_tokens("svc-token=service,op-token=operator")
    auth = Authenticator(tokens)
    header = "Bearer svc-token"
    assert auth.known(header) is None and auth.known(None) is None
    accepted = asyncio.run(auth.authenticate(header, None))
    known = auth.known(header)
    assert known == accepted == auth.principal(header)
    assert known is not None and known.name == accepted.name == f"service:{accepted.fingerprint}"
    with pytest.raises(LedgerError):
        asyncio.run(auth.authenticate("Bearer nope", None))
    assert auth.known("Bearer nope") is None

    async def no_oidc(token: str) -> Principal:
        raise AssertionError("a static token is not a JWT")

    strict = Authenticator(tokens, oidc=no_oidc)
    for _ in range(2):  # refused by `authenticate`, then by `known` with the same answer
        with pytest.raises(LedgerError, match="static operator/admin tokens are off"):
            asyncio.run(strict.authenticate("Bearer op-token", None))
    with pytest.raises(LedgerError, match="static operator/admin tokens are off"):
        strict.known("Bearer op-token")

    for n in range(VERIFIED_MAX + 5):  # whitespace variants of one token: still bounded
        asyncio.run(auth.authenticate("Bearer svc-token" + " " * n, None))
    assert len(auth._verified) <= VERIFIED_MAX
