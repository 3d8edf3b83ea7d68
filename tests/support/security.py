"""Test credentials made on the spot: a CA with server and client certificates, and an OIDC issuer
(keys, JWKS, signed JWTs). Nothing here is ever committed as a key file."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import ssl
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ISSUER = "https://idp.test.example"
AUDIENCE = "ledger-node"


def _pem_key(key: Any) -> bytes:
    return key.private_bytes(  # type: ignore[no-any-return]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@dataclass
class CertificateAuthority:
    """A throwaway CA that issues server and client certificates into `directory`."""

    directory: Path
    name: str = "Ledger Test CA"
    key: ec.EllipticCurvePrivateKey = field(default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))
    cert: x509.Certificate | None = None

    def __post_init__(self) -> None:
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.name)])
        now = dt.datetime.now(dt.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
            .sign(self.key, hashes.SHA256())
        )
        self.cert_path = self.directory / f"{uuid.uuid4().hex[:8]}-ca.pem"
        self.cert_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(
        self, common_name: str, *, server: bool = False, sans: list[x509.GeneralName] | None = None
    ) -> tuple[Path, Path]:
        """(certificate path, key path) of a new leaf certificate."""
        assert self.cert is not None
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        names = list(sans or [])
        if server:
            names += [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        stem = self.directory / f"{uuid.uuid4().hex[:8]}-{common_name}"
        cert_path, key_path = stem.with_suffix(".crt"), stem.with_suffix(".key")
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(_pem_key(key))
        return cert_path, key_path


def client_context(server_ca: Path, cert: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    """A client TLS context trusting `server_ca`, presenting `cert` when given."""
    context = ssl.create_default_context(cafile=str(server_ca))
    if cert is not None:
        context.load_cert_chain(str(cert[0]), str(cert[1]))
    return context


class Issuer:
    """An OIDC issuer with one RSA, one P-256 and one Ed25519 signing key."""

    def __init__(self, issuer: str = ISSUER, audience: str = AUDIENCE) -> None:
        self.issuer, self.audience = issuer, audience
        self.keys: dict[str, tuple[str, Any]] = {}
        self.add_key("rsa-1", "RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048))
        self.add_key("ec-1", "ES256", ec.generate_private_key(ec.SECP256R1()))
        self.add_key("ed-1", "EdDSA", ed25519.Ed25519PrivateKey.generate())

    def add_key(self, kid: str, alg: str, private: Any) -> None:
        """Publish one more signing key."""
        self.keys[kid] = (alg, private)

    def jwks(self) -> dict[str, Any]:
        """The public JWKS document."""
        entries = []
        for kid, (alg, private) in self.keys.items():
            algorithm = jwt.get_algorithm_by_name(alg)
            entry = json.loads(algorithm.to_jwk(private.public_key()))
            entry.update(kid=kid, use="sig", alg=alg)
            entries.append(entry)
        return {"keys": entries}

    def token(
        self, kid: str = "rsa-1", *, roles: Any = ("operator",), amr: Any = ("pwd", "mfa"), **claims: Any
    ) -> str:
        """A signed JWT; `claims` override the defaults (None removes a claim)."""
        alg, private = self.keys[kid]
        now = int(time.time())
        body: dict[str, Any] = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": "alice",
            "preferred_username": "alice",
            "iat": now,
            "nbf": now,
            "exp": now + 300,
            "roles": None if roles is None else list(roles),
            "amr": None if amr is None else list(amr),
        }
        body.update(claims)
        body = {k: v for k, v in body.items() if v is not None}
        return jwt.encode(body, private, algorithm=alg, headers={"kid": kid})
