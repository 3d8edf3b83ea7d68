"""Checkpoint signing keys kept inside an HSM, reached through PKCS#11 (python-pkcs11).

* The token is found by label; one logged-in R/W session is opened for the life of the backend.
* Keys are EC P-256 key pairs generated inside the HSM (``CKA_TOKEN``, ``CKA_PRIVATE``,
  ``CKA_SENSITIVE``, not ``CKA_EXTRACTABLE``, sign-only), labelled ``f"{key_label}:{n}"`` for
  n = 1, 2, ... with ``CKA_ID`` = the label's bytes. The active key is the highest n; rotation
  generates n + 1 and the older keys stay on the token so their signatures remain verifiable.
* Creation times live on the token too, in a public ``CKO_DATA`` object per key (same label,
  ``CKA_APPLICATION`` = ``ledger-node``, value = JSON ``{"created_at": ...}``). A key without one
  (made by another tool) reports the process start as ``created_at``. A key's ``retired_at`` is
  its successor's ``created_at``.
* Signing is ``CKM_ECDSA`` over the caller's 32-byte digest (SoftHSM has no hashed ECDSA
  mechanism for this); the result is the raw 64-byte ``r || s``.
* python-pkcs11 initialises the module without OS locking, and SoftHSM crashes when two threads
  call into it at once, so every call into any module goes through one process-wide lock.
  Signing is therefore serial (~3,000 signatures/s on SoftHSM).
* A lost session (HSM restart, network HSM reconnect) is reopened once before giving up.
* Every failure raises `SigningError` naming the token and key label, never the PIN.

PKCS#11 allows one login per token per process: close a backend before opening another on the
same token in the same process (a second login fails with ``UserAlreadyLoggedIn``).
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

import pkcs11
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11.exceptions import (
    DeviceRemoved,
    KeyHandleInvalid,
    ObjectHandleInvalid,
    PKCS11Error,
    SessionClosed,
    SessionHandleInvalid,
    TokenNotPresent,
    UserNotLoggedIn,
)
from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters

from signer.keys import (
    DIGEST_SIZE,
    ECDSA_P256,
    PublicKey,
    SigningError,
    kid_for_der,
    pem_from_der,
    utc_now,
)

T = TypeVar("T")

APPLICATION: Final = "ledger-node"
_P256_PARAMS: Final = encode_named_curve_parameters("secp256r1")
_RAW_SIGNATURE_SIZE: Final = 64
_RECONNECTABLE: Final = (
    SessionHandleInvalid,
    SessionClosed,
    DeviceRemoved,
    TokenNotPresent,
    UserNotLoggedIn,
    ObjectHandleInvalid,
    KeyHandleInvalid,
)
_PROCESS_START: Final = utc_now()

# python-pkcs11 calls C_Initialize(NULL): no OS locking, so callers must serialise every call.
_PKCS11_LOCK: Final = threading.Lock()


def load_pin(value: str | None, file: str | None) -> str:
    """The user PIN from ``LEDGER_PKCS11_PIN`` (`value`) or ``LEDGER_PKCS11_PIN_FILE`` (`file`, stripped).

    Exactly one must be set; errors name the file but never its contents.
    """
    if value and file:
        raise SigningError("set only one of LEDGER_PKCS11_PIN and LEDGER_PKCS11_PIN_FILE")
    if value:
        return value
    if not file:
        raise SigningError("no PKCS#11 PIN: set LEDGER_PKCS11_PIN or LEDGER_PKCS11_PIN_FILE")
    try:
        pin = Path(file).read_text("utf-8").strip()
    except (OSError, UnicodeError) as exc:
        raise SigningError(f"cannot read the PKCS#11 PIN file {file}: {type(exc).__name__}") from exc
    if not pin:
        raise SigningError(f"the PKCS#11 PIN file {file} is empty")
    return pin


@dataclass(frozen=True)
class _HsmKey:
    """One key pair on the token: the private key handle and its published half."""

    number: int
    private: Any  # pkcs11.PrivateKey, bound to the session that found it
    kid: str
    pem: str
    created_at: str


def _describe(exc: BaseException) -> str:
    """Exception type and message (python-pkcs11 messages are often empty)."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _key_number(label: str, key_label: str) -> int | None:
    """n for a label ``f"{key_label}:{n}"``, else None."""
    prefix, sep, suffix = label.rpartition(":")
    if prefix != key_label or not sep or not suffix.isdigit():
        return None
    return int(suffix)


def _public_der(public_key: Any) -> bytes:
    """DER SubjectPublicKeyInfo of a P-256 public key object read from the token."""
    der = encode_ec_public_key(public_key)
    loaded = serialization.load_der_public_key(der)
    if not isinstance(loaded, ec.EllipticCurvePublicKey) or not isinstance(loaded.curve, ec.SECP256R1):
        raise SigningError("key on the token is not an EC P-256 key")
    return der


class Pkcs11KeyBackend:
    """Signing keys in an HSM token; see the module docstring for the layout on the token."""

    kind = "pkcs11"

    def __init__(self, module_path: str, token_label: str, pin: str, key_label: str) -> None:
        """Open the token `token_label` in `module_path`, log in, and load (or create) the keys."""
        self.module_path = module_path
        self.token_label = token_label
        self.key_label = key_label
        self._pin = pin
        self._where = f"PKCS#11 token {token_label!r}, key label {key_label!r}"
        self._session: Any = None
        self._keys: list[_HsmKey] = []
        self._closed = False
        try:
            self._call("open", self._connect_locked, reconnect=False)
            if not self._keys:
                self._call("generate the first key", self._generate_locked)
        except SigningError:
            self.close()
            raise

    def __repr__(self) -> str:
        """Identify the backend without its PIN."""
        return f"Pkcs11KeyBackend({self._where})"

    # -- every call into the module goes through here ------------------------------------------

    def _call(self, what: str, action: Callable[[], T], reconnect: bool = True) -> T:
        """Run `action` under the process-wide lock; reopen a lost session once; wrap failures."""
        with _PKCS11_LOCK:
            if self._closed:
                raise SigningError(f"cannot {what}: backend for {self._where} is closed")
            try:
                return self._attempt(action, reconnect)
            except SigningError:
                raise
            except (PKCS11Error, OSError, ValueError, TypeError, KeyError) as exc:
                raise SigningError(f"cannot {what} on {self._where}: {_describe(exc)}") from exc

    def _attempt(self, action: Callable[[], T], reconnect: bool) -> T:
        """`action`, retried once after reconnecting if the session was lost (lock held)."""
        try:
            return action()
        except _RECONNECTABLE:
            if not reconnect:
                raise
        self._disconnect_locked()
        self._connect_locked()
        return action()

    # -- session -------------------------------------------------------------------------------

    def _connect_locked(self) -> None:
        """Find the token by label, open one logged-in R/W session, and load the keys."""
        lib = pkcs11.lib(self.module_path)
        token = lib.get_token(token_label=self.token_label)
        self._session = token.open(rw=True, user_pin=self._pin)
        self._keys = self._load_keys_locked()

    def _disconnect_locked(self) -> None:
        """Close the session, ignoring errors from an HSM that is already gone."""
        session, self._session = self._session, None
        if session is None:
            return
        with contextlib.suppress(PKCS11Error):
            session.close()

    def close(self) -> None:
        """Log out and close the session (idempotent)."""
        with _PKCS11_LOCK:
            self._closed = True
            self._disconnect_locked()

    # -- keys ----------------------------------------------------------------------------------

    def _load_keys_locked(self) -> list[_HsmKey]:
        """Every ``{key_label}:{n}`` EC private key on the token with its public half, by n."""
        keys = []
        template = {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.KEY_TYPE: KeyType.EC}
        for private in list(self._session.get_objects(template)):
            number = _key_number(str(private[Attribute.LABEL]), self.key_label)
            if number is not None:
                keys.append(self._hsm_key_locked(number, private))
        keys.sort(key=lambda k: k.number)
        return keys

    def _hsm_key_locked(self, number: int, private: Any) -> _HsmKey:
        """Pair a private key with its public key and creation time."""
        label = f"{self.key_label}:{number}"
        public = self._session.get_key(object_class=ObjectClass.PUBLIC_KEY, key_type=KeyType.EC, label=label)
        der = _public_der(public)
        created_at = self._created_at_locked(label) or _PROCESS_START
        return _HsmKey(number, private, kid_for_der(ECDSA_P256, der), pem_from_der(der), created_at)

    def _created_at_locked(self, label: str) -> str | None:
        """The creation time stored in the key's metadata object, if there is one."""
        template = {
            Attribute.CLASS: ObjectClass.DATA,
            Attribute.APPLICATION: APPLICATION,
            Attribute.LABEL: label,
        }
        for obj in self._session.get_objects(template):
            try:
                value = json.loads(bytes(obj[Attribute.VALUE]).decode("utf-8"))
            except (ValueError, UnicodeError):
                continue
            if isinstance(value, dict) and isinstance(value.get("created_at"), str):
                return str(value["created_at"])
        return None

    def _generate_locked(self) -> _HsmKey:
        """Generate key n + 1 inside the HSM, record its creation time, and make it active."""
        number = self._keys[-1].number + 1 if self._keys else 1
        label = f"{self.key_label}:{number}"
        created_at = utc_now()
        public, private = self._session.generate_keypair(
            KeyType.EC,
            id=label.encode("utf-8"),
            label=label,
            store=True,
            capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
            public_template={Attribute.EC_PARAMS: _P256_PARAMS, Attribute.PRIVATE: False},
            private_template={
                Attribute.PRIVATE: True,
                Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: False,
            },
        )
        self._session.create_object(
            {
                Attribute.CLASS: ObjectClass.DATA,
                Attribute.TOKEN: True,
                Attribute.PRIVATE: False,
                Attribute.LABEL: label,
                Attribute.APPLICATION: APPLICATION,
                Attribute.VALUE: json.dumps({"created_at": created_at}).encode("utf-8"),
            }
        )
        der = _public_der(public)
        key = _HsmKey(number, private, kid_for_der(ECDSA_P256, der), pem_from_der(der), created_at)
        self._keys.append(key)
        return key

    def _active_locked(self) -> _HsmKey:
        """The active (highest-numbered) key."""
        if not self._keys:
            raise SigningError(f"no signing key on {self._where}")
        return self._keys[-1]

    # -- KeyBackend ----------------------------------------------------------------------------

    def active_kid(self) -> str:
        """The kid of the key that signs now."""
        return self._call("read the active key", lambda: self._active_locked().kid)

    def sign_digest(self, digest: bytes) -> tuple[str, bytes]:
        """(kid, raw 64-byte r||s) over a 32-byte digest, signed inside the HSM."""
        if len(digest) != DIGEST_SIZE:
            raise SigningError(f"expected a {DIGEST_SIZE}-byte digest, got {len(digest)} bytes")
        kid, signature = self._call("sign", lambda: self._sign_locked(digest))
        if len(signature) != _RAW_SIGNATURE_SIZE:
            raise SigningError(f"{self._where} returned a {len(signature)}-byte ECDSA signature")
        return kid, signature

    def _sign_locked(self, digest: bytes) -> tuple[str, bytes]:
        """Sign with the active key (lock held)."""
        key = self._active_locked()
        return key.kid, bytes(key.private.sign(digest, mechanism=Mechanism.ECDSA))

    def public_keys(self) -> list[PublicKey]:
        """Every key on the token under this label, oldest first."""
        keys = self._call("list keys", lambda: list(self._keys))
        retired = [k.created_at for k in keys[1:]] + [None]
        return [
            PublicKey(k.kid, ECDSA_P256, k.pem, k.created_at, r) for k, r in zip(keys, retired, strict=True)
        ]

    def rotate(self) -> PublicKey:
        """Generate a new key inside the HSM and make it active; older keys stay on the token."""
        key = self._call("rotate the signing key", self._generate_locked)
        return PublicKey(key.kid, ECDSA_P256, key.pem, key.created_at, None)

    def private_key_attributes(self, kid: str | None = None) -> dict[str, bool]:
        """Protection flags of a private key (the active one by default), for self-checks."""
        return self._call("read key attributes", lambda: self._attributes_locked(kid))

    def _attributes_locked(self, kid: str | None) -> dict[str, bool]:
        """CKA_SENSITIVE / EXTRACTABLE / ALWAYS_SENSITIVE / NEVER_EXTRACTABLE / TOKEN / PRIVATE."""
        matches = [k for k in self._keys if kid is None or k.kid == kid]
        if not matches:
            raise SigningError(f"no key {kid!r} on {self._where}")
        private = matches[-1].private
        names = ("SENSITIVE", "EXTRACTABLE", "ALWAYS_SENSITIVE", "NEVER_EXTRACTABLE", "TOKEN", "PRIVATE")
        return {name.lower(): bool(private[Attribute[name]]) for name in names}
