"""Service identities from TLS client certificates (mTLS; docs/security.md).

With `--client-ca` the node only completes TLS handshakes with clients whose certificate chains to
that CA (`ssl.CERT_REQUIRED`); the handshake is where unknown clients are refused. The client map
(`--client-map` / `LEDGER_TLS_CLIENT_MAP`) then says which certificate identities are which
principals, one rule a line:

    # identity                                  role
    cn:marketplace                              service
    dns:payments.internal.example.com           service
    uri:spiffe://example.com/ns/finance/sa/exports   auditor
    email:reports@example.com                   auditor

An identity is the subject's common name (`cn:`), or a subjectAltName entry: `dns:`, `uri:`,
`email:`, `ip:`. Rules are tried in file order against every identity of the certificate; the first
match gives the principal `mtls:<identity>` with the rule's role. A certificate that matches no
rule authenticates nothing by itself: its client must send a bearer token. A bearer token, when
sent, always wins over the certificate (an operator's OIDC token through an mTLS client).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from typing import Any, Final

from api.auth import Method, Principal, Role

PREFIXES: Final = {"DNS": "dns", "URI": "uri", "email": "email", "IP Address": "ip"}
KINDS: Final = frozenset({"cn", *PREFIXES.values()})


class ClientMapError(ValueError):
    """The client map is malformed; the message names the line."""


def parse_client_map(text: str) -> list[tuple[str, Role]]:
    """`identity role` rules in order; blank lines and `#` comments are skipped."""
    rules: list[tuple[str, Role]] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ClientMapError(f"line {number}: expected `kind:identity role`")
        identity, role = parts
        kind, sep, value = identity.partition(":")
        if not sep or kind not in KINDS or not value:
            raise ClientMapError(f"line {number}: identity must be one of {', '.join(sorted(KINDS))}:VALUE")
        try:
            rules.append((f"{kind}:{value}", Role(role)))
        except ValueError:
            raise ClientMapError(
                f"line {number}: unknown role {role!r}; use one of {', '.join(Role)}"
            ) from None
    return rules


def identities(peercert: Mapping[str, Any]) -> Iterator[str]:
    """`cn:...` for each subject common name, then `dns:`/`uri:`/`email:`/`ip:` for each SAN entry
    (the dict form of `ssl.SSLSocket.getpeercert()`)."""
    for rdn in peercert.get("subject", ()):
        for name, value in rdn:
            if name == "commonName":
                yield f"cn:{value}"
    for kind, value in peercert.get("subjectAltName", ()):
        prefix = PREFIXES.get(kind)
        if prefix is not None:
            yield f"{prefix}:{value}"


class ClientCertMap:
    """Maps a verified peer certificate to a principal (`Authenticator`'s `client_certs` hook)."""

    def __init__(self, rules: list[tuple[str, Role]]) -> None:
        self.rules = rules

    def principal(self, peercert: Mapping[str, Any]) -> Principal | None:
        """The first rule matching one of the certificate's identities, or None."""
        names = frozenset(identities(peercert))
        for identity, role in self.rules:
            if identity in names:
                return Principal(
                    role=role,
                    fingerprint=hashlib.sha256(identity.encode()).hexdigest()[:12],
                    method=Method.MTLS,
                    subject=identity,
                    identities=names,
                )
        return None
