"""Operator identity: OIDC JWT bearer tokens verified against the issuer's JWKS (docs/security.md).

A token is accepted when its signature verifies with a key of the JWKS (RS256 for RSA keys, ES256
for P-256 keys, EdDSA for Ed25519 keys; the header's `alg` must be the key's, so no algorithm
confusion), `iss` equals `LEDGER_OIDC_ISSUER`, `aud` contains `LEDGER_OIDC_AUDIENCE`, `exp` is in
the future and `nbf`/`iat` not in the future (both with `leeway_s`), and `sub` is present. Roles
come from the claim `LEDGER_OIDC_ROLES_CLAIM` (default `roles`; a dotted path such as
`realm_access.roles` reaches into nested objects; a list or a space-separated string; unknown
role names are ignored). `amr` containing `mfa` or `otp` marks the second factor.

The JWKS comes from `LEDGER_OIDC_JWKS_URL` (fetched on first use, cached for `jwks_ttl_s`, and
fetched again at once when a token names an unknown `kid`, at most once per
`jwks_refresh_min_s`) or from `LEDGER_OIDC_JWKS_FILE` (re-read when the file changes).

Every refusal is 401 NOT_AUTHORIZED with a precise `details.reason`: `malformed_token`,
`unknown_key`, `bad_signature`, `token_expired`, `token_not_yet_valid`, `wrong_issuer`,
`wrong_audience`, `missing_claim`, `algorithm_not_allowed`; a token without any ledger role is
403 (`no_role`); an unreachable JWKS URL is 503 SERVICE_UNAVAILABLE (`jwks_unavailable`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import aiohttp
import jwt

from api.auth import SECOND_FACTORS, Method, Principal, Role, unauthorized
from ledger.errors import ErrorCode, LedgerError

log = logging.getLogger(__name__)

ALGORITHMS: Final = frozenset({"RS256", "ES256", "EdDSA"})
ROLE_ORDER: Final = (Role.ADMIN, Role.OPERATOR, Role.AUDITOR, Role.SERVICE)
"""The principal's primary role is the first of these it holds (the others stay in `granted`)."""
JWKS_TIMEOUT_S: Final = 5.0
JWKS_BYTES_MAX: Final = 1 << 20


@dataclass(frozen=True, slots=True)
class OidcSettings:
    """`LEDGER_OIDC_*` (node.config.oidc_from_env checks them)."""

    issuer: str
    audience: str
    jwks_url: str | None = None
    jwks_file: Path | None = None
    roles_claim: str = "roles"
    leeway_s: float = 30.0
    jwks_ttl_s: float = 3600.0
    jwks_refresh_min_s: float = 30.0


class JwksUnavailable(Exception):
    """The JWKS could not be fetched or parsed."""


def _parse_jwks(raw: bytes) -> dict[str | None, jwt.PyJWK]:
    """Usable keys by kid (keys of other types or uses are skipped)."""
    try:
        data = json.loads(raw)
        keys = data["keys"]
    except (ValueError, KeyError, TypeError) as exc:
        raise JwksUnavailable(f"not a JWKS document: {exc}") from None
    found: dict[str | None, jwt.PyJWK] = {}
    for entry in keys if isinstance(keys, list) else []:
        if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
            continue
        try:
            key = jwt.PyJWK(entry)
        except (jwt.PyJWKError, jwt.InvalidKeyError):
            log.warning("JWKS key %s skipped (unsupported type or algorithm)", entry.get("kid"))
            continue
        if key.algorithm_name in ALGORITHMS:
            found[entry.get("kid")] = key
    return found


def _claim(claims: dict[str, Any], path: str) -> Any:
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


_ROLE_NAMES: Final = frozenset(r.value for r in Role)


def roles_from(claims: dict[str, Any], path: str) -> frozenset[Role]:
    """The ledger roles named by the claim at `path` (a list or a space-separated string)."""
    value = _claim(claims, path)
    names = value.split() if isinstance(value, str) else value if isinstance(value, list) else []
    return frozenset(Role(n) for n in names if isinstance(n, str) and n in _ROLE_NAMES)


_ERRORS: Final[tuple[tuple[type[Exception], str, str], ...]] = (
    (jwt.ExpiredSignatureError, "token_expired", "the token has expired"),
    (jwt.ImmatureSignatureError, "token_not_yet_valid", "the token is not valid yet (nbf/iat)"),
    (jwt.InvalidIssuerError, "wrong_issuer", "the token's issuer is not the configured issuer"),
    (jwt.InvalidAudienceError, "wrong_audience", "the token is not for this audience"),
    (jwt.MissingRequiredClaimError, "missing_claim", "the token lacks a required claim"),
    (jwt.InvalidSignatureError, "bad_signature", "the token's signature does not verify"),
)


class OidcVerifier:
    """Verifies OIDC JWTs and turns them into principals; `principal` is the Authenticator's hook."""

    def __init__(self, settings: OidcSettings) -> None:
        self.settings = settings
        self._keys: dict[str | None, jwt.PyJWK] = {}
        self._loaded_at = float("-inf")
        self._file_stamp: tuple[int, int] | None = None
        self._lock = asyncio.Lock()
        self.fetches = 0

    async def _fetch(self) -> dict[str | None, jwt.PyJWK]:
        assert self.settings.jwks_url is not None
        self.fetches += 1
        timeout = aiohttp.ClientTimeout(total=JWKS_TIMEOUT_S)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.get(self.settings.jwks_url) as response,
            ):
                if response.status != 200:
                    raise JwksUnavailable(f"HTTP {response.status}")
                raw = await response.content.read(JWKS_BYTES_MAX + 1)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise JwksUnavailable(f"{type(exc).__name__}: {exc}") from None
        if len(raw) > JWKS_BYTES_MAX:
            raise JwksUnavailable("JWKS larger than 1 MiB")
        return _parse_jwks(raw)

    def _read_file(self) -> None:
        path = self.settings.jwks_file
        assert path is not None
        try:
            info = path.stat()
            stamp = (info.st_mtime_ns, info.st_size)
            if stamp != self._file_stamp:
                self._keys = _parse_jwks(path.read_bytes())
                self._file_stamp = stamp
        except OSError as exc:
            raise JwksUnavailable(f"{path}: {exc}") from None

    async def _key(self, kid: str | None) -> jwt.PyJWK | None:
        """The key for `kid`, refreshing the JWKS when stale or when the kid is unknown."""
        if self.settings.jwks_file is not None:
            self._read_file()
            return self._lookup(kid)
        now = time.monotonic()
        stale = now - self._loaded_at > self.settings.jwks_ttl_s
        unknown = self._lookup(kid) is None and now - self._loaded_at >= self.settings.jwks_refresh_min_s
        if stale or unknown:
            async with self._lock:
                if self._loaded_at < now:  # nobody refreshed while we waited
                    self._keys = await self._fetch()
                    self._loaded_at = time.monotonic()
        return self._lookup(kid)

    def _lookup(self, kid: str | None) -> jwt.PyJWK | None:
        if kid is None and len(self._keys) == 1:
            return next(iter(self._keys.values()))
        return self._keys.get(kid)

    async def claims(self, token: str) -> dict[str, Any]:
        """The verified claims; 401 with a precise reason otherwise."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError:
            raise unauthorized("the bearer token is not a well-formed JWT", "malformed_token") from None
        alg = header.get("alg")
        if alg not in ALGORITHMS:
            raise unauthorized(
                f"JWT algorithm {alg!r} is not accepted", "algorithm_not_allowed", allowed=sorted(ALGORITHMS)
            )
        try:
            key = await self._key(header.get("kid"))
        except JwksUnavailable as exc:
            log.error("OIDC JWKS unavailable: %s", exc)
            raise LedgerError(
                ErrorCode.SERVICE_UNAVAILABLE, "the identity provider's keys are unavailable",
                {"reason": "jwks_unavailable"},
            ) from None  # fmt: skip
        if key is None:
            raise unauthorized("the token is signed by a key the issuer does not publish", "unknown_key")
        if key.algorithm_name != alg:
            raise unauthorized(f"JWT alg {alg} does not match the key's", "algorithm_not_allowed")
        return self._decode(token, key, alg)

    def _decode(self, token: str, key: jwt.PyJWK, alg: str) -> dict[str, Any]:
        settings = self.settings
        try:
            return jwt.decode(
                token,
                key=key.key,
                algorithms=[alg],
                audience=settings.audience,
                issuer=settings.issuer,
                leeway=settings.leeway_s,
                options={"require": ["exp", "iss", "aud", "sub"], "verify_iat": True},
            )
        except jwt.PyJWTError as exc:
            for kind, reason, message in _ERRORS:
                if isinstance(exc, kind):
                    raise unauthorized(message, reason) from None
            raise unauthorized("the bearer token is not a valid JWT", "malformed_token") from None

    async def principal(self, token: str) -> Principal:
        """The verified caller: `oidc:<sub>`, roles from the roles claim, `mfa` from `amr`."""
        claims = await self.claims(token)
        subject = claims["sub"]
        if not isinstance(subject, str) or not subject:
            raise unauthorized("the token's sub is not a string", "missing_claim")
        roles = roles_from(claims, self.settings.roles_claim)
        if not roles:
            raise LedgerError(
                ErrorCode.NOT_AUTHORIZED,
                f"the token carries no ledger role in claim {self.settings.roles_claim!r}",
                {"reason": "no_role", "claim": self.settings.roles_claim, "roles": sorted(Role)},
                status=403,
            )
        amr = claims.get("amr")
        methods = {m for m in amr if isinstance(m, str)} if isinstance(amr, list) else set()
        names = {subject, *(claims.get(k) for k in ("preferred_username", "email"))}
        return Principal(
            role=next(r for r in ROLE_ORDER if r in roles),
            fingerprint=hashlib.sha256(subject.encode()).hexdigest()[:12],
            method=Method.OIDC,
            subject=subject,
            mfa=bool(methods & SECOND_FACTORS),
            granted=roles,
            identities=frozenset(n for n in names if isinstance(n, str) and n),
        )
