"""The PKCS#11 signing backend against a real SoftHSM2 token (one token per test session)."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pkcs11 import Attribute
from pkcs11.exceptions import PKCS11Error

from signer.keys import ECDSA_P256, SigningError, backend_from_env, verify_signature
from signer.pkcs11_backend import Pkcs11KeyBackend, load_pin
from tests.support.softhsm import SoftHsmToken, session_token


@pytest.fixture(scope="session")
def hsm() -> SoftHsmToken:
    """The session's SoftHSM2 token."""
    return session_token()


def _open(hsm: SoftHsmToken, key_label: str) -> Pkcs11KeyBackend:
    """A backend on the session token."""
    return Pkcs11KeyBackend(hsm.module_path, hsm.token_label, hsm.pin, key_label)


@pytest.fixture
def key_label() -> str:
    """A key label no other test uses (tests share the token)."""
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def backend(hsm: SoftHsmToken, key_label: str) -> Iterator[Pkcs11KeyBackend]:
    """A backend with its own key label, closed afterwards (one login per token per process)."""
    b = _open(hsm, key_label)
    yield b
    b.close()


def _digest(i: int) -> bytes:
    """A distinct 32-byte digest."""
    return hashlib.sha256(f"checkpoint-{i}".encode()).digest()


def _pem_of(b: Pkcs11KeyBackend, kid: str) -> str:
    """The published PEM of `kid`."""
    return next(k.pem for k in b.public_keys() if k.kid == kid)


def test_sign_and_verify_with_exported_pem(backend: Pkcs11KeyBackend, hsm: SoftHsmToken) -> None:
    assert backend.kind == "pkcs11"
    assert backend.token_label == hsm.token_label
    kid, signature = backend.sign_digest(_digest(1))
    assert kid == backend.active_kid()
    assert kid.startswith("p256-") and len(kid) == len("p256-") + 16
    assert len(signature) == 64
    [key] = backend.public_keys()
    assert (key.kid, key.algorithm, key.retired_at) == (kid, ECDSA_P256, None)
    assert key.pem.startswith("-----BEGIN PUBLIC KEY-----")
    assert verify_signature(key.pem, ECDSA_P256, _digest(1), signature)
    assert not verify_signature(key.pem, ECDSA_P256, _digest(2), signature)


def test_concurrent_signing_from_eight_threads(backend: Pkcs11KeyBackend) -> None:
    def sign(i: int) -> tuple[int, str, bytes]:
        kid, sig = backend.sign_digest(_digest(i))
        return i, kid, sig

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(sign, range(200)))
    pem = backend.public_keys()[-1].pem
    assert len(results) == 200
    assert {kid for _, kid, _ in results} == {backend.active_kid()}
    assert all(verify_signature(pem, ECDSA_P256, _digest(i), sig) for i, _, sig in results)


def test_rotation_keeps_old_key_and_old_signatures_verify(backend: Pkcs11KeyBackend) -> None:
    old_kid, old_sig = backend.sign_digest(_digest(7))
    new = backend.rotate()
    assert new.kid != old_kid and new.retired_at is None
    assert backend.active_kid() == new.kid
    keys = backend.public_keys()
    assert [k.kid for k in keys] == [old_kid, new.kid]
    assert keys[0].retired_at == new.created_at
    assert verify_signature(keys[0].pem, ECDSA_P256, _digest(7), old_sig)
    kid, sig = backend.sign_digest(_digest(8))
    assert kid == new.kid
    assert verify_signature(new.pem, ECDSA_P256, _digest(8), sig)
    assert not verify_signature(keys[0].pem, ECDSA_P256, _digest(8), sig)


def test_restart_sees_both_keys_and_same_active_kid(hsm: SoftHsmToken, key_label: str) -> None:
    first = _open(hsm, key_label)
    try:
        first.rotate()
        before = first.public_keys()
        active = first.active_kid()
    finally:
        first.close()
    second = _open(hsm, key_label)
    try:
        assert second.public_keys() == before
        assert second.active_kid() == active
        kid, sig = second.sign_digest(_digest(3))
        assert kid == active and verify_signature(_pem_of(second, kid), ECDSA_P256, _digest(3), sig)
    finally:
        second.close()


def test_key_labels_are_independent(hsm: SoftHsmToken, key_label: str) -> None:
    first = _open(hsm, key_label + "-a")
    first_kid = first.active_kid()
    first.close()
    second = _open(hsm, key_label + "-b")
    try:
        assert [k.kid for k in second.public_keys()] == [second.active_kid()]
        assert second.active_kid() != first_kid
    finally:
        second.close()


def test_private_key_is_sensitive_and_not_extractable(backend: Pkcs11KeyBackend) -> None:
    attrs = backend.private_key_attributes()
    assert attrs == {
        "sensitive": True,
        "extractable": False,
        "always_sensitive": True,
        "never_extractable": True,
        "token": True,
        "private": True,
    }
    private = backend._keys[-1].private
    with pytest.raises(PKCS11Error):
        private[Attribute.VALUE]


def test_wrong_pin_is_signing_error_without_the_pin(hsm: SoftHsmToken, key_label: str) -> None:
    wrong = "wrong-pin-98765"
    with pytest.raises(SigningError) as info:
        Pkcs11KeyBackend(hsm.module_path, hsm.token_label, wrong, key_label)
    message = str(info.value)
    assert hsm.token_label in message and "PinIncorrect" in message
    assert wrong not in message and hsm.pin not in message
    assert wrong not in repr(info.value.__cause__)


def test_unknown_token_label_is_signing_error(hsm: SoftHsmToken, key_label: str) -> None:
    with pytest.raises(SigningError, match="no-such-token"):
        Pkcs11KeyBackend(hsm.module_path, "no-such-token", hsm.pin, key_label)


def test_missing_module_is_signing_error(hsm: SoftHsmToken, key_label: str) -> None:
    with pytest.raises(SigningError):
        Pkcs11KeyBackend("/nonexistent/libpkcs11.so", hsm.token_label, hsm.pin, key_label)


def test_lost_session_is_reopened(backend: Pkcs11KeyBackend) -> None:
    kid = backend.active_kid()
    backend._session.close()  # simulate the HSM dropping the session
    got, sig = backend.sign_digest(_digest(5))
    assert got == kid
    assert verify_signature(_pem_of(backend, kid), ECDSA_P256, _digest(5), sig)


def test_closed_backend_and_bad_digest_raise_signing_error(hsm: SoftHsmToken, key_label: str) -> None:
    b = _open(hsm, key_label)
    with pytest.raises(SigningError):
        b.sign_digest(b"short")
    b.close()
    b.close()
    with pytest.raises(SigningError, match="closed"):
        b.sign_digest(_digest(1))


def test_backend_from_env_builds_pkcs11_backend(hsm: SoftHsmToken, key_label: str, tmp_path: Path) -> None:
    pin_file = tmp_path / "pin"
    pin_file.write_text(hsm.pin + "\n")
    env = {**hsm.env, "LEDGER_SIGNER_KEY_LABEL": key_label, "LEDGER_PKCS11_PIN_FILE": str(pin_file)}
    del env["LEDGER_PKCS11_PIN"]
    b = backend_from_env(env, tmp_path)
    try:
        assert b.kind == "pkcs11"
        kid, sig = b.sign_digest(_digest(9))
        assert kid == b.active_kid()
        assert verify_signature(b.public_keys()[-1].pem, ECDSA_P256, _digest(9), sig)
    finally:
        b.close()
    assert not (tmp_path / "signer").exists()


def test_backend_from_env_requires_token_label(hsm: SoftHsmToken) -> None:
    env = {k: v for k, v in hsm.env.items() if k != "LEDGER_PKCS11_TOKEN"}
    with pytest.raises(SigningError, match="LEDGER_PKCS11_TOKEN"):
        backend_from_env(env, None)


def test_load_pin(tmp_path: Path) -> None:
    pin_file = tmp_path / "pin"
    pin_file.write_text("  s3cret\n")
    assert load_pin("direct", None) == "direct"
    assert load_pin(None, str(pin_file)) == "s3cret"
    assert load_pin("", str(pin_file)) == "s3cret"
    for value, file in [(None, None), ("a", str(pin_file)), (None, str(tmp_path / "missing"))]:
        with pytest.raises(SigningError) as info:
            load_pin(value, file)
        assert "s3cret" not in str(info.value)
    pin_file.write_text("\n")
    with pytest.raises(SigningError, match="empty"):
        load_pin(None, str(pin_file))
