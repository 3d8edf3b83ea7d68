"""Proof packages of a ledger created with `hash_alg = blake3` (journal hashes and Merkle trees in BLAKE3)."""

from __future__ import annotations

import blake3
import pytest

from signer.canonical import journal_digest
from signer.package import PackageError, decode_package
from signer.verify import verify_package
from tests.support.proofs import SyntheticLedger, dict_bytes, make_ledger, package_bytes, package_dict


@pytest.fixture(scope="module")
def ledger() -> SyntheticLedger:
    """40 journals over 3 shards, hashed with BLAKE3."""
    return make_ledger(journals=40, shards=3, batch_size=3, alg="blake3")


def test_journal_digest_selects_the_algorithm() -> None:
    """sha256 and blake3 journal hashes are the plain 32-byte digests of the body."""
    assert journal_digest(b"abc", "blake3") == blake3.blake3(b"abc").digest()
    assert journal_digest(b"abc", "sha256").hex().startswith("ba7816bf")
    with pytest.raises(ValueError, match="unknown hash algorithm"):
        journal_digest(b"abc", "md5")


def test_blake3_time_and_index_packages_verify(ledger: SyntheticLedger) -> None:
    """A blake3 package says so, and verifies end to end (bodies, batch roots, log inclusion, range)."""
    for package in (
        ledger.package_for_time_range(*ledger.middle_time_range()),
        ledger.package_for_index_range(0, len(ledger.batches) - 1),
    ):
        data = package_bytes(package)
        assert decode_package(data).hash_alg == "blake3"
        report = verify_package(data, ledger.public_pems())
        assert report.ok, [c for c in report.checks if not c.ok]


def test_blake3_tampered_body_fails(ledger: SyntheticLedger) -> None:
    """Changing one journal body breaks its BLAKE3 entry hash; the journal is blamed."""
    doc = package_dict(ledger.package_for_time_range(*ledger.middle_time_range()))
    victim = doc["journals"][0]
    victim["body"] = victim["body"].replace('"USD"', '"EUR"', 1)
    report = verify_package(dict_bytes(doc), ledger.public_pems())
    assert not report.ok
    assert report.first_bad_journal == victim["journal_id"]
    assert any("blake3 of the body" in c.detail for c in report.checks if not c.ok)


def test_blake3_package_relabelled_sha256_fails(ledger: SyntheticLedger) -> None:
    """Claiming sha256 for a blake3 package fails: statements name blake3 and the hashes differ."""
    doc = package_dict(ledger.package_for_time_range(*ledger.middle_time_range()))
    doc["hash_alg"] = "sha256"
    report = verify_package(dict_bytes(doc), ledger.public_pems())
    assert not report.ok
    assert any("hash_alg" in c.detail for c in report.checks if not c.ok)


def test_unknown_hash_alg_is_refused(ledger: SyntheticLedger) -> None:
    """Only the registered algorithms decode."""
    doc = package_dict(ledger.package_for_index_range(0, 0))
    doc["hash_alg"] = "md5"
    with pytest.raises(PackageError, match="hash_alg"):
        decode_package(dict_bytes(doc))
