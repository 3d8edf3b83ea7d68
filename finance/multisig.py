"""Multisig governance: m-of-n approvals over an action's signed statement (pure, no I/O).

An action above a configured threshold (a payout batch, a single payout, an escrow release) is
not executed when it is requested: it is stored in `pending_approval` and executes once
`Policy.required` distinct registered approvers have signed its statement (DECISIONS D7).

The statement. An action has an id, a kind (`payout_batch`, `payout`, `escrow_release`, ...), its
parameters (a JSON object: what exactly will be executed) and an expiry. Approvers sign

    canonical({"action_id": ..., "kind": ..., "params_hash": ..., "expires_at": ...})

where `canonical` is the node's canonical JSON (sorted keys, compact, UTF-8; `signer.canonical`)
and `params_hash` is the lower-case hex SHA-256 of `canonical(params)`. The signed bytes therefore
pin the parameters: an action whose parameters change gets another `params_hash`, and every
approval given before the change stops verifying (`tally` re-verifies each one against the
action's current statement, so a stale approval is never counted).

Keys. An approver registers one public key as PEM (SubjectPublicKeyInfo): Ed25519, or ECDSA on
P-256. Ed25519 signatures are the 64-byte RFC 8032 form; P-256 signatures are ECDSA with SHA-256,
DER-encoded (the form OpenSSL and `cryptography` produce) or the 64-byte raw `r || s`. Signatures
travel base64-encoded (standard alphabet, padding required).

Rules (checked in this order by `check_approval`):
 1. the action is still `pending_approval` (else 409 INVALID_STATE naming its status) and not
    expired at the approval time (else 409 INVALID_STATE, reason `expired`);
 2. the approver is registered and not revoked (else 400 VALIDATION_ERROR on `$.approver_id`);
 3. the signature is well-formed base64 and verifies under that approver's key over the action's
    current statement (else 400 VALIDATION_ERROR on `$.signature`, reason `signature_mismatch`:
    a wrong key, a forged signature and a signature over another action's or an older statement
    all end here);
 4. the approver has not already approved this statement (else 409 INVALID_STATE, reason
    `duplicate_approver`; the exact same approval sent again is a replay, answered by the caller).
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import re
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any, Final

import msgspec
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from finance.chart import SEGMENT_PATTERN
from ledger.errors import ErrorCode, Rejection, validation_error
from ledger.invariants import check
from ledger.timestamps import parse_rfc3339
from signer.canonical import canonical

POLICY_MAX: Final = 16
"""At most this many approvers in one policy (`m-of-n`, n <= 16)."""
SIGNATURE_TEXT_MAX: Final = 256
PEM_TEXT_MAX: Final = 4096
_POLICY_TEXT: Final = re.compile(r"^([1-9][0-9]?)-of-([1-9][0-9]?)$")

KIND_PATTERN: Final = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


class KeyAlgorithm(enum.StrEnum):
    """The public-key algorithms an approver may register."""

    ED25519 = "ed25519"
    P256 = "p256"


class ActionStatus(enum.StrEnum):
    """Where a gated action is: waiting, approved (executing), executed or failed, rejected, expired."""

    PENDING_APPROVAL = "pending_approval"
    APPROVED = "approved"  # the quorum is reached; executing
    EXECUTED = "executed"
    FAILED = "failed"
    REJECTED = "rejected"
    EXPIRED = "expired"


class Policy(msgspec.Struct, frozen=True):
    """`required` distinct approvals out of `of` registered approvers (default 3-of-5)."""

    required: int = 3
    of: int = 5

    def __post_init__(self) -> None:
        check(1 <= self.required <= self.of <= POLICY_MAX, f"policy {self.required}-of-{self.of}")

    @property
    def label(self) -> str:
        """`m-of-n`."""
        return f"{self.required}-of-{self.of}"


def parse_policy(text: str) -> Policy:
    """`"3-of-5"` -> Policy(3, 5); anything else (or m > n, n > 16) raises ValueError."""
    match = _POLICY_TEXT.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"multisig policy must look like 3-of-5, got {text!r}")
    required, of = int(match.group(1)), int(match.group(2))
    if not 1 <= required <= of <= POLICY_MAX:
        raise ValueError(f"multisig policy needs 1 <= m <= n <= {POLICY_MAX}, got {text!r}")
    return Policy(required, of)


class ApproverKey(msgspec.Struct, frozen=True):
    """A registered approver: id, algorithm, public key (normalised PEM) and its fingerprint.

    `fingerprint` is the hex SHA-256 of the key's DER SubjectPublicKeyInfo (first 16 bytes).
    """

    approver_id: str
    algorithm: KeyAlgorithm
    public_key_pem: str
    fingerprint: str


PublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey
PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey


def _load_public(pem: str, field: str) -> PublicKey:
    if len(pem) > PEM_TEXT_MAX:
        raise validation_error(f"public key PEM is longer than {PEM_TEXT_MAX} characters", field)
    try:
        key = serialization.load_pem_public_key(pem.encode())
    except (ValueError, UnsupportedAlgorithm, TypeError):
        raise validation_error("public key must be a PEM SubjectPublicKeyInfo", field) from None
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return key
    raise validation_error("public key must be Ed25519 or ECDSA P-256", field)


def parse_approver_key(approver_id: str, public_key_pem: str) -> ApproverKey:
    """Validate an approver registration; VALIDATION_ERROR naming `$.approver_id` or `$.public_key`."""
    if not SEGMENT_PATTERN.fullmatch(approver_id):
        raise validation_error("approver_id must be 1-64 characters of [A-Za-z0-9._-]", "$.approver_id")
    key = _load_public(public_key_pem, "$.public_key")
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    algorithm = KeyAlgorithm.ED25519 if isinstance(key, ed25519.Ed25519PublicKey) else KeyAlgorithm.P256
    return ApproverKey(approver_id, algorithm, pem.decode(), hashlib.sha256(der).hexdigest()[:32])


class ActionStatement(msgspec.Struct, frozen=True):
    """What approvers sign (DECISIONS D7); `encode()` gives the exact bytes."""

    action_id: str
    kind: str
    params_hash: str
    expires_at: str

    def encode(self) -> bytes:
        """The canonical bytes an approval signs."""
        return canonical(self)


def params_hash(params: Mapping[str, Any]) -> str:
    """Lower-case hex SHA-256 of the parameters' canonical encoding."""
    return hashlib.sha256(canonical(params)).hexdigest()


def statement_for(action_id: str, kind: str, params: Mapping[str, Any], expires_at: str) -> ActionStatement:
    """The statement of an action with these parameters."""
    check(KIND_PATTERN.fullmatch(kind) is not None, f"action kind {kind!r} is malformed")
    check(parse_rfc3339(expires_at) is not None, "action expiry is not RFC 3339")
    return ActionStatement(action_id, kind, params_hash(params), expires_at)


def decode_signature(signature_b64: str) -> bytes:
    """Strict base64 (standard alphabet, padded); VALIDATION_ERROR on `$.signature`."""
    if not signature_b64 or len(signature_b64) > SIGNATURE_TEXT_MAX:
        raise validation_error(
            f"signature must be base64, at most {SIGNATURE_TEXT_MAX} characters", "$.signature"
        )
    try:
        return base64.b64decode(signature_b64, validate=True)
    except (binascii.Error, ValueError):
        raise validation_error(
            "signature must be base64 (standard alphabet, padded)", "$.signature"
        ) from None


def verifies(key: ApproverKey, message: bytes, signature: bytes) -> bool:
    """True when `signature` is the approver's signature over `message`."""
    public = _load_public(key.public_key_pem, "$.public_key")
    try:
        if isinstance(public, ed25519.Ed25519PublicKey):
            public.verify(signature, message)
            return True
        if len(signature) == 64:  # raw r || s
            r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
            signature = encode_dss_signature(r, s)
        public.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        return True
    except (InvalidSignature, ValueError):
        return False


def sign_statement(private_key: PrivateKey, statement: ActionStatement) -> str:
    """An approval signature (base64) over the statement: what `ledger-node approve` sends."""
    message = statement.encode()
    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        raw = private_key.sign(message)
    else:
        raw = private_key.sign(message, ec.ECDSA(hashes.SHA256()))
    return base64.b64encode(raw).decode()


class Approval(msgspec.Struct, frozen=True):
    """One approver's signature over one statement, as stored."""

    approver_id: str
    signature: str
    params_hash: str
    approved_at: str


class ActionView(msgspec.Struct, frozen=True):
    """What the approval rules need to know of an action."""

    action_id: str
    kind: str
    params: dict[str, Any]
    expires_at: str
    status: ActionStatus

    def statement(self) -> ActionStatement:
        """The action's current statement."""
        return statement_for(self.action_id, self.kind, self.params, self.expires_at)


def _state_error(action: ActionView, reason: str, message: str) -> Rejection:
    return Rejection(
        ErrorCode.INVALID_STATE,
        message,
        {"action_id": action.action_id, "current": str(action.status), "reason": reason},
    )


def is_expired(action: ActionView, now: datetime) -> bool:
    """True once `now` has reached the action's expiry."""
    expiry = parse_rfc3339(action.expires_at)
    check(expiry is not None, "stored action expiry is not RFC 3339")
    assert expiry is not None  # for mypy; checked above
    return now >= expiry


def check_approval(
    action: ActionView,
    approvals: Iterable[Approval],
    keys: Mapping[str, ApproverKey],
    approver_id: str,
    signature_b64: str,
    now: datetime,
) -> ActionStatement:
    """Apply rules 1-4 of the module doc; the statement the new approval verified against."""
    if action.status is not ActionStatus.PENDING_APPROVAL:
        raise _state_error(action, "not_pending", f"action is {action.status}, not pending_approval")
    if is_expired(action, now):
        raise _state_error(action, "expired", f"action expired at {action.expires_at}")
    key = keys.get(approver_id)
    if key is None:
        raise validation_error(
            "not a registered approver (or revoked)", "$.approver_id", approver_id=approver_id
        )
    signature = decode_signature(signature_b64)
    statement = action.statement()
    if not verifies(key, statement.encode(), signature):
        raise validation_error(
            "signature does not verify under the approver's key over this action's statement",
            "$.signature",
            reason="signature_mismatch",
            params_hash=statement.params_hash,
        )
    if any(a.approver_id == approver_id and a.params_hash == statement.params_hash for a in approvals):
        raise _state_error(action, "duplicate_approver", f"{approver_id} has already approved this action")
    return statement


def tally(action: ActionView, approvals: Iterable[Approval], keys: Mapping[str, ApproverKey]) -> list[str]:
    """The distinct approvers whose approval verifies over the action's current statement, sorted.

    An approval counts only if its approver is still registered and its signature verifies now:
    approvals of an older statement (the parameters changed) or of a revoked approver do not.
    """
    statement = action.statement()
    message = statement.encode()
    valid: set[str] = set()
    for approval in approvals:
        key = keys.get(approval.approver_id)
        if key is None or approval.params_hash != statement.params_hash:
            continue
        try:
            signature = decode_signature(approval.signature)
        except Rejection:
            continue
        if verifies(key, message, signature):
            valid.add(approval.approver_id)
    return sorted(valid)
