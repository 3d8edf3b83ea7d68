"""Checkpoint signing keys: the backend protocol, the software backend, and pure verification.

Two algorithms exist:

* ``ecdsa-p256-sha256`` — ECDSA over NIST P-256 applied to the caller's 32-byte SHA-256 digest.
  The signature on the wire is the raw 64-byte ``r || s`` (what PKCS#11 ``CKM_ECDSA`` returns).
* ``ed25519`` — Ed25519 over the 32-byte digest taken as the message (software backend only).

A key's ``kid`` is the algorithm family and the first 16 hex characters of SHA-256 over the
public key's DER SubjectPublicKeyInfo, e.g. ``p256-1a2b3c4d5e6f7a8b``.

This module imports only ``cryptography``: the offline verifier uses `verify_signature` and must
not need ``pkcs11``. The PKCS#11 backend lives in `signer.pkcs11_backend` and is imported lazily
by `backend_from_env`.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, Protocol, TypeAlias

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import (
    Prehashed,
    decode_dss_signature,
    encode_dss_signature,
)

from ledger.timestamps import rfc3339

ECDSA_P256: Final = "ecdsa-p256-sha256"
ED25519: Final = "ed25519"
ALGORITHMS: Final = (ECDSA_P256, ED25519)
DIGEST_SIZE: Final = 32
P256_COORDINATE_SIZE: Final = 32
DEFAULT_KEY_LABEL: Final = "ledger-signer"

_FAMILY: Final = {ECDSA_P256: "p256", ED25519: "ed25519"}
_METADATA_FILE: Final = "keys.json"

PrivateKeyType: TypeAlias = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


class SigningError(Exception):
    """Any failure to sign (HSM down, wrong PIN, missing key): the node answers 500 SIGNING_FAILURE."""


@dataclass(frozen=True)
class PublicKey:
    """A verification key as published: PEM SubjectPublicKeyInfo plus its lifetime."""

    kid: str
    algorithm: str
    pem: str
    created_at: str
    retired_at: str | None


class KeyBackend(Protocol):
    """Where checkpoint signing keys live (``kind`` is ``"pkcs11"`` or ``"software"``)."""

    kind: str

    def active_kid(self) -> str:
        """The kid of the key that `sign_digest` uses now."""
        ...

    def sign_digest(self, digest: bytes) -> tuple[str, bytes]:
        """(kid, signature) over a 32-byte SHA-256 digest, with the active key."""
        ...

    def public_keys(self) -> list[PublicKey]:
        """Every key, rotated ones included, oldest first."""
        ...

    def rotate(self) -> PublicKey:
        """Make a new key active; the old one is kept with ``retired_at`` set."""
        ...

    def close(self) -> None:
        """Release the backend's resources (idempotent)."""
        ...


def utc_now() -> str:
    """The current time as RFC 3339 UTC text."""
    return rfc3339(datetime.now(UTC))


def kid_for_der(algorithm: str, spki_der: bytes) -> str:
    """The kid of a public key given as DER SubjectPublicKeyInfo."""
    family = _FAMILY.get(algorithm)
    if family is None:
        raise ValueError(f"unknown signing algorithm {algorithm!r}")
    return f"{family}-{hashlib.sha256(spki_der).hexdigest()[:16]}"


def pem_from_der(spki_der: bytes) -> str:
    """PEM text of a DER SubjectPublicKeyInfo (re-encoded by `cryptography`, so it is validated)."""
    key = serialization.load_der_public_key(spki_der)
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def raw_to_der_ecdsa(signature: bytes) -> bytes:
    """DER ECDSA-Sig-Value from a raw 64-byte P-256 ``r || s`` signature."""
    if len(signature) != 2 * P256_COORDINATE_SIZE:
        raise ValueError("a P-256 signature is 64 bytes r||s")
    r = int.from_bytes(signature[:P256_COORDINATE_SIZE], "big")
    s = int.from_bytes(signature[P256_COORDINATE_SIZE:], "big")
    return encode_dss_signature(r, s)


def der_to_raw_ecdsa(signature: bytes) -> bytes:
    """Raw 64-byte ``r || s`` from a DER ECDSA-Sig-Value of a P-256 signature."""
    r, s = decode_dss_signature(signature)
    return r.to_bytes(P256_COORDINATE_SIZE, "big") + s.to_bytes(P256_COORDINATE_SIZE, "big")


def _verify_ecdsa_p256(public_pem: str, digest: bytes, signature: bytes) -> None:
    """Raise if the raw r||s signature does not verify (or the key is not P-256)."""
    key = serialization.load_pem_public_key(public_pem.encode("ascii"))
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("not a P-256 public key")
    key.verify(raw_to_der_ecdsa(signature), digest, ec.ECDSA(Prehashed(hashes.SHA256())))


def _verify_ed25519(public_pem: str, digest: bytes, signature: bytes) -> None:
    """Raise if the Ed25519 signature over the digest does not verify."""
    key = serialization.load_pem_public_key(public_pem.encode("ascii"))
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise ValueError("not an Ed25519 public key")
    key.verify(signature, digest)


def verify_signature(public_pem: str, algorithm: str, digest: bytes, signature: bytes) -> bool:
    """True when `signature` is valid for `digest` under the key; False for anything else, never raises."""
    try:
        if len(digest) != DIGEST_SIZE:
            return False
        if algorithm == ECDSA_P256:
            _verify_ecdsa_p256(public_pem, digest, signature)
        elif algorithm == ED25519:
            _verify_ed25519(public_pem, digest, signature)
        else:
            return False
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm, UnicodeError):
        return False
    return True


def _generate_private_key(algorithm: str) -> PrivateKeyType:
    """A fresh private key for `algorithm`."""
    if algorithm == ECDSA_P256:
        return ec.generate_private_key(ec.SECP256R1())
    if algorithm == ED25519:
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"unknown signing algorithm {algorithm!r}")


def _algorithm_of(key: PrivateKeyType) -> str:
    """The algorithm name a loaded private key is used with."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return ED25519
    if isinstance(key.curve, ec.SECP256R1):
        return ECDSA_P256
    raise ValueError(f"unsupported curve {key.curve.name}")


def _spki_der(key: PrivateKeyType) -> bytes:
    """DER SubjectPublicKeyInfo of a private key's public half."""
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _sign_with(key: PrivateKeyType, digest: bytes) -> bytes:
    """Wire-format signature over a 32-byte digest (raw r||s for P-256)."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(digest)
    return der_to_raw_ecdsa(key.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256()))))


@dataclass
class _SoftwareKey:
    """One key of the software backend with its metadata."""

    number: int
    private: PrivateKeyType
    algorithm: str
    kid: str
    pem: str
    created_at: str


def _software_key(number: int, private: PrivateKeyType, created_at: str) -> _SoftwareKey:
    """Wrap a private key with its derived kid and public PEM."""
    algorithm = _algorithm_of(private)
    der = _spki_der(private)
    return _SoftwareKey(
        number, private, algorithm, kid_for_der(algorithm, der), pem_from_der(der), created_at
    )


def _write_private(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically, readable by the owner only (0600)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _key_file(directory: Path, number: int) -> Path:
    """Where key number `number` is stored."""
    return directory / f"key-{number:04d}.pem"


def _read_metadata(directory: Path) -> dict[int, str]:
    """``{number: created_at}`` from keys.json ({} when absent)."""
    meta_path = directory / _METADATA_FILE
    if not meta_path.exists():
        return {}
    data = json.loads(meta_path.read_text("utf-8"))
    if not isinstance(data, dict):
        raise ValueError("keys.json is not an object")
    return {int(k): str(v) for k, v in data.items()}


def _load_key(directory: Path, number: int, created_at: str) -> _SoftwareKey:
    """Load key number `number` from its PEM file."""
    private = serialization.load_pem_private_key(_key_file(directory, number).read_bytes(), password=None)
    if not isinstance(private, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey):
        raise ValueError(f"key {number} is neither EC nor Ed25519")
    return _software_key(number, private, created_at)


def _load_keys(directory: Path) -> list[_SoftwareKey]:
    """Every persisted key, oldest first."""
    return [_load_key(directory, n, created) for n, created in sorted(_read_metadata(directory).items())]


def _persist(directory: Path, keys: list[_SoftwareKey]) -> None:
    """Write the newest key's file, then the metadata naming every key (no dangling entry on a crash)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    newest = keys[-1]
    pem = newest.private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write_private(_key_file(directory, newest.number), pem)
    meta = {str(k.number): k.created_at for k in keys}
    _write_private(directory / _METADATA_FILE, json.dumps(meta, indent=1, sort_keys=True).encode())


class SoftwareKeyBackend:
    """Keys held in process memory: the explicit development default when no PKCS#11 module is set.

    With a `path`, keys persist there as unencrypted PKCS#8 PEM (``key-0001.pem`` ..., file mode
    0600, directory 0700) next to ``keys.json`` (creation times, nothing secret), so a restart keeps
    the same kid. Keys are generated on first use. The active key is the newest one; its algorithm
    is the one the key was made with (`algorithm` applies to keys generated from now on).
    """

    kind = "software"

    def __init__(self, path: Path | None, algorithm: str = ECDSA_P256) -> None:
        """Load the keys under `path` (if any); nothing is generated until first use."""
        if algorithm not in ALGORITHMS:
            raise ValueError(f"unknown signing algorithm {algorithm!r}")
        self.algorithm = algorithm
        self.path = path
        self._lock = threading.Lock()
        self._keys: list[_SoftwareKey] = self._load() if path is not None else []

    def _load(self) -> list[_SoftwareKey]:
        """Read persisted keys (oldest first), failing with SigningError on unreadable files."""
        if self.path is None or not self.path.exists():
            return []
        try:
            return _load_keys(self.path)
        except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise SigningError(f"cannot load software signing keys from {self.path}: {exc}") from exc

    def _new_key_locked(self) -> _SoftwareKey:
        """Generate, persist and append a key (caller holds the lock)."""
        number = self._keys[-1].number + 1 if self._keys else 1
        key = _software_key(number, _generate_private_key(self.algorithm), utc_now())
        if self.path is not None:
            try:
                _persist(self.path, [*self._keys, key])
            except OSError as exc:
                raise SigningError(f"cannot store software signing key under {self.path}: {exc}") from exc
        self._keys.append(key)
        return key

    def _active(self) -> _SoftwareKey:
        """The newest key, generated on first use."""
        with self._lock:
            return self._keys[-1] if self._keys else self._new_key_locked()

    def active_kid(self) -> str:
        """The kid of the key that signs now."""
        return self._active().kid

    def sign_digest(self, digest: bytes) -> tuple[str, bytes]:
        """(kid, signature) over a 32-byte digest with the active key."""
        if len(digest) != DIGEST_SIZE:
            raise SigningError(f"expected a {DIGEST_SIZE}-byte digest, got {len(digest)} bytes")
        key = self._active()
        return key.kid, _sign_with(key.private, digest)

    def public_keys(self) -> list[PublicKey]:
        """Every key, oldest first; a key retires when its successor is created."""
        self._active()
        with self._lock:
            keys = list(self._keys)
        retired = [k.created_at for k in keys[1:]] + [None]
        return [
            PublicKey(k.kid, k.algorithm, k.pem, k.created_at, r) for k, r in zip(keys, retired, strict=True)
        ]

    def rotate(self) -> PublicKey:
        """Generate a new active key; the previous one stays listed as retired."""
        self._active()
        with self._lock:
            key = self._new_key_locked()
        return PublicKey(key.kid, key.algorithm, key.pem, key.created_at, None)

    def close(self) -> None:
        """Nothing to release: keys are plain objects."""


def backend_from_env(env: Mapping[str, str], data_dir: Path | None) -> KeyBackend:
    """The configured backend: PKCS#11 when ``LEDGER_PKCS11_MODULE`` is set, else the software one.

    PKCS#11 settings: ``LEDGER_PKCS11_MODULE``, ``LEDGER_PKCS11_TOKEN`` (token label),
    ``LEDGER_PKCS11_PIN`` or ``LEDGER_PKCS11_PIN_FILE``, ``LEDGER_SIGNER_KEY_LABEL`` (default
    ``ledger-signer``). The software backend persists under ``data_dir / "signer"`` when given.
    """
    module = env.get("LEDGER_PKCS11_MODULE", "").strip()
    if not module:
        return SoftwareKeyBackend(data_dir / "signer" if data_dir is not None else None)
    from signer.pkcs11_backend import Pkcs11KeyBackend, load_pin

    token = env.get("LEDGER_PKCS11_TOKEN", "").strip()
    if not token:
        raise SigningError("LEDGER_PKCS11_MODULE is set but LEDGER_PKCS11_TOKEN (the token label) is not")
    pin = load_pin(env.get("LEDGER_PKCS11_PIN"), env.get("LEDGER_PKCS11_PIN_FILE"))
    label = env.get("LEDGER_SIGNER_KEY_LABEL", "").strip() or DEFAULT_KEY_LABEL
    return Pkcs11KeyBackend(module, token, pin, label)
