"""Bearer-token authentication and role checks (DECISIONS D5).

`LEDGER_API_TOKENS="tokenA=service,tokenB=operator,tokenC=auditor,tokenD=admin"`. Tokens
are compared in constant time against every configured token. The principal recorded
with journals and idempotency keys is the role plus a short fingerprint of the token, so
two service tokens never share idempotency keys.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

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


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: role plus a token fingerprint."""

    role: Role
    fingerprint: str

    @property
    def name(self) -> str:
        """`role:fingerprint`, recorded as `posted_by`."""
        return f"{self.role}:{self.fingerprint}"


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


class Authenticator:
    """Resolves a bearer token to a principal in constant time."""

    def __init__(self, tokens: dict[str, Role]) -> None:
        self._tokens = [(token.encode(), role) for token, role in tokens.items()]

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
    if principal.role not in allowed_set:
        raise LedgerError(
            ErrorCode.NOT_AUTHORIZED,
            f"role {principal.role} may not call this endpoint",
            {"role": str(principal.role), "allowed": sorted(str(r) for r in allowed_set)},
            status=403,
        )


PRINCIPAL: Final = web.RequestKey("principal", Principal)
