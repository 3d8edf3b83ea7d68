"""The software signing backend and pure signature verification (no HSM, no pkcs11)."""

from __future__ import annotations

import hashlib
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from signer.keys import (
    ALGORITHMS,
    ECDSA_P256,
    ED25519,
    SigningError,
    SoftwareKeyBackend,
    backend_from_env,
    der_to_raw_ecdsa,
    kid_for_der,
    verify_signature,
)

DIGEST = hashlib.sha256(b"checkpoint").digest()


def _mode(path: Path) -> int:
    """Permission bits of `path`."""
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize(
    ("algorithm", "family", "size"), [(ECDSA_P256, "p256-", 64), (ED25519, "ed25519-", 64)]
)
def test_sign_and_verify(algorithm: str, family: str, size: int) -> None:
    backend = SoftwareKeyBackend(None, algorithm)
    assert backend.kind == "software"
    kid, sig = backend.sign_digest(DIGEST)
    assert kid == backend.active_kid() and kid.startswith(family)
    assert len(kid) == len(family) + 16 and len(sig) == size
    [key] = backend.public_keys()
    assert (key.kid, key.algorithm, key.retired_at) == (kid, algorithm, None)
    assert verify_signature(key.pem, algorithm, DIGEST, sig)
    der = serialization.load_pem_public_key(key.pem.encode()).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert kid == kid_for_der(algorithm, der)
    assert kid == f"{family}{hashlib.sha256(der).hexdigest()[:16]}"


def test_persistence_across_instances_with_private_modes(tmp_path: Path) -> None:
    path = tmp_path / "signer"
    first = SoftwareKeyBackend(path)
    assert not path.exists()  # nothing is generated until first use
    kid, sig = first.sign_digest(DIGEST)
    assert _mode(path) == 0o700
    files = sorted(path.iterdir())
    assert [f.name for f in files] == ["key-0001.pem", "keys.json"]
    assert all(_mode(f) == 0o600 for f in files)
    second = SoftwareKeyBackend(path)
    assert second.active_kid() == kid
    assert second.public_keys() == first.public_keys()
    assert verify_signature(second.public_keys()[0].pem, ECDSA_P256, DIGEST, sig)


def test_rotation_keeps_old_keys(tmp_path: Path) -> None:
    backend = SoftwareKeyBackend(tmp_path / "k", ED25519)
    old_kid, old_sig = backend.sign_digest(DIGEST)
    new = backend.rotate()
    assert backend.active_kid() == new.kid != old_kid
    old, current = backend.public_keys()
    assert old.kid == old_kid and old.retired_at == new.created_at and current == new
    assert verify_signature(old.pem, ED25519, DIGEST, old_sig)
    kid, sig = backend.sign_digest(DIGEST)
    assert kid == new.kid and verify_signature(new.pem, ED25519, DIGEST, sig)
    reloaded = SoftwareKeyBackend(tmp_path / "k", ED25519)
    assert reloaded.public_keys() == [old, current]
    assert all(_mode(f) == 0o600 for f in (tmp_path / "k").iterdir())


def test_rotation_before_first_use_makes_two_keys() -> None:
    backend = SoftwareKeyBackend(None)
    new = backend.rotate()
    assert [k.kid for k in backend.public_keys()][-1] == new.kid
    assert len(backend.public_keys()) == 2


def test_wrong_digest_length_is_signing_error() -> None:
    with pytest.raises(SigningError):
        SoftwareKeyBackend(None).sign_digest(b"\x00" * 31)


def test_unreadable_key_directory_is_signing_error(tmp_path: Path) -> None:
    (tmp_path / "keys.json").write_text('{"1": "2026-01-01T00:00:00.000000Z"}')
    (tmp_path / "key-0001.pem").write_text("not a pem")
    with pytest.raises(SigningError):
        SoftwareKeyBackend(tmp_path)


def test_unknown_algorithm_rejected() -> None:
    with pytest.raises(ValueError):
        SoftwareKeyBackend(None, "rsa")


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_verify_rejects_tampering(algorithm: str) -> None:
    backend = SoftwareKeyBackend(None, algorithm)
    _, sig = backend.sign_digest(DIGEST)
    pem = backend.public_keys()[0].pem
    other_pem = SoftwareKeyBackend(None, algorithm).public_keys()[0].pem
    flipped = bytes([sig[0] ^ 0x01]) + sig[1:]
    wrong_digest = hashlib.sha256(b"other").digest()
    assert verify_signature(pem, algorithm, DIGEST, sig)
    assert not verify_signature(pem, algorithm, DIGEST, flipped)
    assert not verify_signature(pem, algorithm, wrong_digest, sig)
    assert not verify_signature(other_pem, algorithm, DIGEST, sig)
    assert not verify_signature(
        "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", algorithm, DIGEST, sig
    )
    assert not verify_signature("garbage", algorithm, DIGEST, sig)
    assert not verify_signature("caf\u00e9", algorithm, DIGEST, sig)
    assert not verify_signature(pem, algorithm, DIGEST, sig[:-1])
    assert not verify_signature(pem, algorithm, DIGEST, b"")
    assert not verify_signature(pem, algorithm, DIGEST, b"\x00" * 64)
    assert not verify_signature(pem, algorithm, DIGEST[:31], sig)
    assert not verify_signature(pem, "rsa-pss", DIGEST, sig)


def test_verify_rejects_key_of_the_other_algorithm() -> None:
    p256 = SoftwareKeyBackend(None, ECDSA_P256)
    ed = SoftwareKeyBackend(None, ED25519)
    _, sig = p256.sign_digest(DIGEST)
    assert not verify_signature(ed.public_keys()[0].pem, ECDSA_P256, DIGEST, sig)
    assert not verify_signature(p256.public_keys()[0].pem, ED25519, DIGEST, sig)


def test_verify_rejects_other_curve() -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    der_sig = key.sign(DIGEST, ec.ECDSA(Prehashed(hashes.SHA256())))
    assert not verify_signature(pem.decode(), ECDSA_P256, DIGEST, der_sig)


def test_raw_signature_roundtrip_matches_cryptography() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    raw = der_to_raw_ecdsa(key.sign(DIGEST, ec.ECDSA(Prehashed(hashes.SHA256()))))
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert len(raw) == 64 and verify_signature(pem.decode(), ECDSA_P256, DIGEST, raw)


def test_backend_from_env_defaults_to_software(tmp_path: Path) -> None:
    backend = backend_from_env({}, tmp_path)
    assert backend.kind == "software"
    kid, _ = backend.sign_digest(DIGEST)
    assert backend_from_env({"LEDGER_PKCS11_MODULE": ""}, tmp_path).active_kid() == kid
    assert (tmp_path / "signer" / "key-0001.pem").exists()
    assert backend_from_env({}, None).kind == "software"


def test_keys_module_does_not_import_pkcs11() -> None:
    code = "import sys, signer.keys; sys.exit(1 if 'pkcs11' in sys.modules else 0)"
    root = Path(__file__).resolve().parents[2]
    assert subprocess.run([sys.executable, "-c", code], cwd=root, check=False).returncode == 0
