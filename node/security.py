"""Transport security and identity wiring of `serve` (docs/security.md).

- `server_ssl_context`: HTTPS with `--tls-cert/--tls-key`, TLS 1.2 or newer; with `--client-ca`
  also mTLS: `ssl.CERT_REQUIRED`, so a client without a certificate chaining to that CA is refused
  in the handshake, before any HTTP is read.
- `authenticator`: static tokens plus the OIDC verifier and the client-certificate map, as the
  config asks.

Each problem is a `SecurityConfigError` naming the flag or variable, raised before anything starts.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

from api.auth import STATIC_OPERATOR_ROLES, Authenticator, Role
from api.client_certs import ClientCertMap, ClientMapError, parse_client_map
from api.oidc import OidcVerifier
from node.config import NodeConfig

log = logging.getLogger(__name__)


class SecurityConfigError(ValueError):
    """TLS or identity settings the node cannot use; the message names the flag."""


def server_ssl_context(config: NodeConfig) -> ssl.SSLContext | None:
    """The server's TLS context (None: plain HTTP)."""
    if config.tls_cert is None and config.tls_key is None:
        if config.client_ca is not None:
            raise SecurityConfigError("--client-ca (LEDGER_TLS_CLIENT_CA) needs --tls-cert and --tls-key")
        return None
    if config.tls_cert is None or config.tls_key is None:
        raise SecurityConfigError("--tls-cert and --tls-key (LEDGER_TLS_CERT, LEDGER_TLS_KEY) go together")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise SecurityConfigError(f"--tls-cert/--tls-key unusable: {exc}") from None
    if config.client_ca is not None:
        try:
            context.load_verify_locations(cafile=config.client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise SecurityConfigError(f"--client-ca {config.client_ca} unusable: {exc}") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _client_map(path: Path | None) -> ClientCertMap | None:
    if path is None:
        return None
    try:
        return ClientCertMap(parse_client_map(path.read_text(encoding="utf-8")))
    except OSError as exc:
        raise SecurityConfigError(f"--client-map {path}: {exc}") from None
    except ClientMapError as exc:
        raise SecurityConfigError(f"--client-map {path}: {exc}") from None


def authenticator(config: NodeConfig, tokens: dict[str, Role]) -> Authenticator:
    """Static tokens, OIDC and client certificates as configured; logs what is on."""
    if config.client_map is not None and config.client_ca is None:
        raise SecurityConfigError("--client-map (LEDGER_TLS_CLIENT_MAP) needs --client-ca (mTLS)")
    certs = _client_map(config.client_map)
    verifier = OidcVerifier(config.oidc) if config.oidc is not None else None
    auth = Authenticator(
        tokens,
        oidc=verifier.principal if verifier is not None else None,
        client_certs=certs.principal if certs is not None else None,
        allow_static_operator_tokens=config.allow_static_operator_tokens,
    )
    static_operators = any(role in STATIC_OPERATOR_ROLES for role in tokens.values())
    if verifier is None and static_operators:
        log.warning("operator/admin roles use static tokens (development): configure LEDGER_OIDC_ISSUER")
    elif static_operators and not auth.allow_static_operator_tokens:
        log.warning("static operator/admin tokens are refused: OIDC is on (D5)")
    return auth
