"""Multisig rules: keys, the signed statement, approval checks and the tally (finance/multisig.py)."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from finance.multisig import (
    ActionStatus,
    ActionView,
    Approval,
    ApproverKey,
    KeyAlgorithm,
    Policy,
    PrivateKey,
    check_approval,
    params_hash,
    parse_approver_key,
    parse_policy,
    sign_statement,
    statement_for,
    tally,
)
from ledger.errors import ErrorCode, Rejection
from ledger.timestamps import rfc3339

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
EXPIRES = rfc3339(NOW + timedelta(hours=24))


def _pem(private: PrivateKey | rsa.RSAPrivateKey) -> str:
    return (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def _approvers(count: int = 5) -> tuple[dict[str, PrivateKey], dict[str, ApproverKey]]:
    """Half Ed25519, half P-256."""
    privates: dict[str, PrivateKey] = {}
    for i in range(count):
        privates[f"approver-{i}"] = (
            ed25519.Ed25519PrivateKey.generate() if i % 2 == 0 else ec.generate_private_key(ec.SECP256R1())
        )
    keys = {name: parse_approver_key(name, _pem(key)) for name, key in privates.items()}
    return privates, keys


def _action(params: dict[str, object] | None = None, action_id: str = "act-1") -> ActionView:
    return ActionView(
        action_id,
        "payout_batch",
        params if params is not None else {"batch_id": "b-1", "total": 250_000, "currency": "USD"},
        EXPIRES,
        ActionStatus.PENDING_APPROVAL,
    )


def _approve(
    action: ActionView, approvals: list[Approval], keys: dict[str, ApproverKey], who: str, signature: str
) -> None:
    statement = check_approval(action, approvals, keys, who, signature, NOW)
    approvals.append(Approval(who, signature, statement.params_hash, rfc3339(NOW)))


def _rejected(call: object) -> Rejection:
    with pytest.raises(Rejection) as caught:
        assert callable(call)
        call()
    return caught.value


def test_policy_parsing() -> None:
    """Tried: 3-of-5, 1-of-1, 16-of-16 parse; 0-of-5, 6-of-5, 17-of-17, '3 of 5', '' are refused."""
    assert parse_policy("3-of-5") == Policy(3, 5) and Policy().label == "3-of-5"
    assert parse_policy(" 1-of-1 ") == Policy(1, 1)
    assert parse_policy("16-of-16") == Policy(16, 16)
    for bad in ("0-of-5", "6-of-5", "17-of-17", "3 of 5", ""):
        with pytest.raises(ValueError, match="of"):
            parse_policy(bad)


def test_keys_ed25519_and_p256_only() -> None:
    """Tried: Ed25519 and P-256 keys register (normalised PEM, stable fingerprint); RSA, P-384,
    a private key, garbage and a bad approver id are VALIDATION_ERRORs naming the field."""
    ed = ed25519.Ed25519PrivateKey.generate()
    p256 = ec.generate_private_key(ec.SECP256R1())
    first = parse_approver_key("alice", _pem(ed))
    assert first.algorithm is KeyAlgorithm.ED25519 and len(first.fingerprint) == 32
    assert parse_approver_key("alice", first.public_key_pem) == first
    assert parse_approver_key("bob", _pem(p256)).algorithm is KeyAlgorithm.P256
    private_pem = ed.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    for pem in (
        _pem(rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        _pem(ec.generate_private_key(ec.SECP384R1())),
        private_pem,
        "-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n",
        "x" * 5000,
    ):
        error = _rejected(lambda pem=pem: parse_approver_key("carol", pem))
        assert error.code is ErrorCode.VALIDATION_ERROR and error.details["field"] == "$.public_key"
    error = _rejected(lambda: parse_approver_key("has space", _pem(ed)))
    assert error.details["field"] == "$.approver_id"


def test_statement_is_the_canonical_encoding_of_four_fields() -> None:
    """The signed bytes are exactly the sorted compact JSON of D7's four fields; the params hash
    ignores key order but not values."""
    statement = statement_for("act-9", "escrow_release", {"b": 2, "a": 1}, "2026-12-01T00:00:00.000000Z")
    expected_hash = params_hash({"a": 1, "b": 2})
    assert expected_hash != params_hash({"a": 1, "b": 3})
    assert statement.encode() == (
        b'{"action_id":"act-9","expires_at":"2026-12-01T00:00:00.000000Z","kind":"escrow_release",'
        b'"params_hash":"' + expected_hash.encode() + b'"}'
    )


def test_three_distinct_valid_approvals_reach_the_policy() -> None:
    """2 valid approvals are below 3-of-5; the third (a P-256 one sent as raw r||s) reaches it."""
    privates, keys = _approvers()
    action = _action()
    approvals: list[Approval] = []
    for who in ("approver-0", "approver-1"):
        _approve(action, approvals, keys, who, sign_statement(privates[who], action.statement()))
    assert tally(action, approvals, keys) == ["approver-0", "approver-1"]
    assert len(tally(action, approvals, keys)) < Policy().required
    p256 = privates["approver-3"]
    assert isinstance(p256, ec.EllipticCurvePrivateKey)
    der = p256.sign(action.statement().encode(), ec.ECDSA(hashes.SHA256()))
    r, s = decode_dss_signature(der)
    raw = base64.b64encode(r.to_bytes(32, "big") + s.to_bytes(32, "big")).decode()
    _approve(action, approvals, keys, "approver-3", raw)
    assert tally(action, approvals, keys) == ["approver-0", "approver-1", "approver-3"]


def test_bad_approvals_are_refused_with_clear_errors() -> None:
    """Tried: a duplicate approver (fresh signature), an unknown approver, a signature by another
    approver's key, one over another action, one over the same action with other params, a
    forged one, non-base64 -> each refused with its code, field or reason; an expired or
    executed action -> INVALID_STATE before anything else."""
    privates, keys = _approvers()
    action = _action()
    approvals: list[Approval] = []
    _approve(
        action, approvals, keys, "approver-0", sign_statement(privates["approver-0"], action.statement())
    )

    again = sign_statement(privates["approver-0"], action.statement())
    error = _rejected(lambda: check_approval(action, approvals, keys, "approver-0", again, NOW))
    assert error.code is ErrorCode.INVALID_STATE and error.details["reason"] == "duplicate_approver"

    error = _rejected(lambda: check_approval(action, approvals, keys, "mallory", again, NOW))
    assert error.code is ErrorCode.VALIDATION_ERROR and error.details["field"] == "$.approver_id"

    other_action = _action(action_id="act-2")
    changed = _action({"batch_id": "b-1", "total": 999_999, "currency": "USD"})
    bad_signatures = {
        "wrong key": sign_statement(privates["approver-2"], action.statement()),
        "other action": sign_statement(privates["approver-1"], other_action.statement()),
        "other params": sign_statement(privates["approver-1"], changed.statement()),
        "forged": base64.b64encode(b"\x01" * 64).decode(),
    }
    for label, signature in bad_signatures.items():
        error = _rejected(lambda s=signature: check_approval(action, approvals, keys, "approver-1", s, NOW))
        assert error.code is ErrorCode.VALIDATION_ERROR, label
        assert (error.details["field"], error.details["reason"]) == ("$.signature", "signature_mismatch")
    for malformed in ("not base64!", "", "A" * 300):
        error = _rejected(lambda s=malformed: check_approval(action, approvals, keys, "approver-1", s, NOW))
        assert error.details["field"] == "$.signature"

    good = sign_statement(privates["approver-1"], action.statement())
    late = NOW + timedelta(hours=24)
    error = _rejected(lambda: check_approval(action, approvals, keys, "approver-1", good, late))
    assert error.code is ErrorCode.INVALID_STATE and error.details["reason"] == "expired"
    done = ActionView(action.action_id, action.kind, action.params, action.expires_at, ActionStatus.EXECUTED)
    error = _rejected(lambda: check_approval(done, approvals, keys, "approver-1", good, NOW))
    assert (error.details["reason"], error.details["current"]) == ("not_pending", "executed")


def test_changed_params_or_revoked_keys_drop_approvals_from_the_tally() -> None:
    """3 approvals count; after the action's params change none of them does; a revoked
    approver's approval stops counting."""
    privates, keys = _approvers()
    action = _action()
    approvals: list[Approval] = []
    for who in ("approver-0", "approver-1", "approver-2"):
        _approve(action, approvals, keys, who, sign_statement(privates[who], action.statement()))
    assert len(tally(action, approvals, keys)) == 3
    changed = _action({"batch_id": "b-1", "total": 250_001, "currency": "USD"})
    assert tally(changed, approvals, keys) == []
    # approvals whose recorded params_hash is right but signature is over something else
    spoofed = [
        Approval(a.approver_id, a.signature, changed.statement().params_hash, a.approved_at)
        for a in approvals
    ]
    assert tally(changed, spoofed, keys) == []
    without = {k: v for k, v in keys.items() if k != "approver-1"}
    assert tally(action, approvals, without) == ["approver-0", "approver-2"]
