"""Authentication and role checks (DECISIONS D5; docs/security.md).

Three ways to say who is calling, tried in this order:

1. `Authorization: Bearer <JWT>` when OIDC is configured (`api.oidc`): an operator's identity,
   roles from a claim, `amr` for the second factor. Principal name `oidc:<sub>`.
2. `Authorization: Bearer <static token>`: `LEDGER_API_TOKENS="tokenA=service,tokenB=operator,
   tokenC=auditor,tokenD=admin"`, compared in constant time against every configured token.
   Principal name `role:<fingerprint of the token>`, so two service tokens never share
   idempotency keys. With OIDC configured, static operator/admin tokens are refused unless
   `LEDGER_ALLOW_STATIC_OPERATOR_TOKENS=1` (D5; development only).
3. No bearer token: the TLS client certificate, when the node runs with mTLS and the
   certificate's identity is in the client map (`api.client_certs`). Principal name
   `mtls:<identity>`.

Second factor: a human (OIDC) principal calling an operator or admin endpoint (one the service
role may not call) must present `amr` containing `mfa` or `otp`; otherwise 401 NOT_AUTHORIZED
with reason `mfa_required` (RFC 9470 step-up: `WWW-Authenticate: Bearer
error="insufficient_user_authentication"`).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from aiohttp import web

from ledger.errors import ErrorCode, LedgerError


class Role(enum.StrEnum):
    """Roles of DECISIONS D5."""

    SERVICE = "service"
    OPERATOR = "operator"
    AUDITOR = "auditor"
    ADMIN = "admin"


WRITERS: Final = frozenset({Role.SERVICE, Role.OPERATOR, Role.ADMIN})
READERS: Final = frozenset(Role)
ADMINS: Final = frozenset({Role.ADMIN})
PUBLIC: Final = frozenset[Role]()


SECOND_FACTORS: Final = frozenset({"mfa", "otp"})
"""`amr` values that satisfy the second-factor rule."""


class Method(enum.StrEnum):
    """How a principal authenticated."""

    TOKEN = "token"
    OIDC = "oidc"
    MTLS = "mtls"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: role plus a fingerprint (static token), or a subject (OIDC, mTLS).

    `granted` holds every role the caller has (an OIDC token may carry several; empty means just
    `role`); `identities` every name the caller goes by (for the self-sign-off check).
    """

    role: Role
    fingerprint: str
    method: Method = Method.TOKEN
    subject: str | None = None
    mfa: bool = False
    granted: frozenset[Role] = frozenset()
    identities: frozenset[str] = field(default_factory=frozenset)
    name: str = field(init=False, repr=False, compare=False)
    """Recorded as `posted_by` and scoping idempotency keys: `role:fingerprint`, `oidc:sub`, `mtls:id`
    (derived once: every request reads it several times)."""

    def __post_init__(self) -> None:
        name = f"{self.role}:{self.fingerprint}" if self.subject is None else f"{self.method}:{self.subject}"
        object.__setattr__(self, "name", name)

    @property
    def roles(self) -> frozenset[Role]:
        """Every role of the caller."""
        return self.granted or frozenset({self.role})


class TokenError(ValueError):
    """LEDGER_API_TOKENS is malformed."""


def parse_tokens(spec: str) -> dict[str, Role]:
    """Parse `token=role,token=role`; raise TokenError naming the bad entry."""
    tokens: dict[str, Role] = {}
    for number, raw in enumerate(spec.split(","), start=1):
        entry = raw.strip()
        if not entry:
            continue
        token, sep, role = entry.rpartition("=")
        if not sep or not token:
            raise TokenError(f"entry {number} is not token=role")
        try:
            tokens[token] = Role(role.strip())
        except ValueError:
            raise TokenError(f"unknown role {role!r}; use one of {', '.join(Role)}") from None
    if not tokens:
        raise TokenError("no tokens configured")
    return tokens


def unauthorized(message: str, reason: str, **details: Any) -> LedgerError:
    """401 NOT_AUTHORIZED with `details.reason`."""
    return LedgerError(ErrorCode.NOT_AUTHORIZED, message, {"reason": reason, **details})


STATIC_OPERATOR_ROLES: Final = frozenset({Role.OPERATOR, Role.ADMIN})

TokenVerifier = Callable[[str], Awaitable[Principal]]
"""Verifies a JWT bearer token (`api.oidc.OidcVerifier.principal`)."""
CertMapper = Callable[[Mapping[str, Any]], Principal | None]
"""Maps a verified TLS peer certificate to a principal (`api.client_certs.ClientCertMap.principal`)."""


VERIFIED_MAX: Final = 256
"""Static-token headers whose principal `Authenticator` remembers (a bound: it starts over when full)."""


def looks_like_jwt(token: str) -> bool:
    """Three base64url segments (static tokens never contain dots)."""
    return token.count(".") == 2 and token.startswith("eyJ")


class Authenticator:
    """Resolves a request's credentials to a principal (static tokens in constant time)."""

    def __init__(
        self,
        tokens: dict[str, Role],
        *,
        oidc: TokenVerifier | None = None,
        client_certs: CertMapper | None = None,
        allow_static_operator_tokens: bool = False,
    ) -> None:
        self._tokens = [(token.encode(), role) for token, role in tokens.items()]
        self.oidc = oidc
        self.client_certs = client_certs
        self.allow_static_operator_tokens = allow_static_operator_tokens or oidc is None
        self._verified: dict[str, Principal] = {}
        """Authorization header -> principal, for headers that `principal` accepted (static tokens)."""

    async def authenticate(self, header: str | None, peercert: Mapping[str, Any] | None) -> Principal:
        """The caller from its bearer token (JWT or static) or else its client certificate; 401 otherwise."""
        if header and header.startswith("Bearer "):
            presented = header[len("Bearer ") :].strip()
            if self.oidc is not None and looks_like_jwt(presented):
                return await self.oidc(presented)
            return self._static(header)
        if not header and peercert is not None and self.client_certs is not None:
            mapped = self.client_certs(peercert)
            if mapped is not None:
                return mapped
        return self.principal(header)

    def _static(self, header: str) -> Principal:
        found = self.principal(header)
        if len(self._verified) >= VERIFIED_MAX:
            self._verified.clear()
        self._verified[header] = found
        return self._static_allowed(found)

    def without_io(self, header: str | None) -> Principal | None:
        """What `authenticate` answers when a static bearer token settles it (no coroutine): the
        principal, or its 401; None when only `authenticate` can tell (no bearer token, or a JWT
        while OIDC is on)."""
        found = self.known(header)
        if found is not None or not header or not header.startswith("Bearer "):
            return found
        if self.oidc is not None and looks_like_jwt(header[len("Bearer ") :].strip()):
            return None
        return self._static(header)

    def known(self, header: str | None) -> Principal | None:
        """What `authenticate` answers for a static-token header it accepted before (None otherwise): a
        dict lookup instead of comparing against every token and hashing again on each request. Only
        accepted headers are remembered, so an unknown token always takes the constant-time path."""
        found = self._verified.get(header) if header else None
        return None if found is None else self._static_allowed(found)

    def _static_allowed(self, found: Principal) -> Principal:
        if found.role in STATIC_OPERATOR_ROLES and not self.allow_static_operator_tokens:
            raise unauthorized(
                "static operator/admin tokens are off while OIDC is configured: sign in with OIDC "
                "(LEDGER_ALLOW_STATIC_OPERATOR_TOKENS=1 allows them, development only)",
                "static_token_disabled",
            )
        return found

    def principal(self, header: str | None) -> Principal:
        """The caller, or 401 NOT_AUTHORIZED."""
        if not header or not header.startswith("Bearer "):
            raise LedgerError(ErrorCode.NOT_AUTHORIZED, "missing bearer token", {"reason": "missing"})
        presented = header[len("Bearer ") :].strip().encode()
        found: Role | None = None
        for token, role in self._tokens:
            if hmac.compare_digest(token, presented):
                found = role
        if found is None:
            raise LedgerError(ErrorCode.NOT_AUTHORIZED, "unknown token", {"reason": "unknown"})
        return Principal(found, hashlib.sha256(presented).hexdigest()[:12])


def require(principal: Principal, allowed: Iterable[Role]) -> None:
    """403 NOT_AUTHORIZED unless the principal's role is allowed."""
    allowed_set = frozenset(allowed)
    if not principal.roles & allowed_set:
        raise LedgerError(
            ErrorCode.NOT_AUTHORIZED,
            f"role {principal.role} may not call this endpoint",
            {"role": str(principal.role), "allowed": sorted(str(r) for r in allowed_set)},
            status=403,
        )


def require_second_factor(principal: Principal, allowed: Iterable[Role]) -> None:
    """401 `mfa_required` when a human (OIDC) principal without `mfa`/`otp` in `amr` calls an
    operator or admin endpoint (one the service role may not call)."""
    if principal.method is Method.OIDC and Role.SERVICE not in frozenset(allowed) and not principal.mfa:
        raise unauthorized(
            "this endpoint needs a second factor: sign in again with MFA (amr must contain mfa or otp)",
            "mfa_required",
            required_amr=sorted(SECOND_FACTORS),
        )


STEP_UP_CHALLENGE: Final = (
    'Bearer error="insufficient_user_authentication", '
    'error_description="a second factor (amr mfa or otp) is required"'
)
"""`WWW-Authenticate` of a `mfa_required` answer (RFC 9470)."""

PRINCIPAL: Final = web.RequestKey("principal", Principal)
