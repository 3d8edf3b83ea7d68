"""RFC 9162 Merkle trees: the module against an independent recursive implementation and golden vectors.

The reference functions below (`_ref_*`) are written straight from the RFC 9162 2.1 text and use
hashlib / blake3 directly; they deliberately import nothing from `signer.merkle`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import blake3
import pytest

from signer import merkle
from signer.merkle import (
    HASHES,
    MerkleLog,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
    root,
    root_from_leaf_hashes,
    verify_consistency,
    verify_inclusion,
)

VECTORS_PATH = Path(__file__).resolve().parents[1] / "vectors" / "merkle.json"
MAX_SIZE = 40

# ---------------------------------------------------------------- independent reference (RFC 9162 2.1)

_REF_HASH: dict[str, Callable[[bytes], bytes]] = {
    "sha256": lambda b: hashlib.sha256(b).digest(),
    "blake3": lambda b: blake3.blake3(b).digest(),
}


def _ref_k(n: int) -> int:
    """Largest power of two strictly smaller than n (n > 1), by counting up."""
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def _ref_leaf(data: bytes, alg: str = "sha256") -> bytes:
    return _REF_HASH[alg](b"\x00" + data)


def _ref_mth(hashes: tuple[bytes, ...], alg: str = "sha256") -> bytes:
    """MTH over leaf hashes: H("") / the leaf hash / H(0x01 || MTH(D[0:k]) || MTH(D[k:n]))."""
    n = len(hashes)
    if n == 0:
        return _REF_HASH[alg](b"")
    if n == 1:
        return hashes[0]
    k = _ref_k(n)
    return _REF_HASH[alg](b"\x01" + _ref_mth(hashes[:k], alg) + _ref_mth(hashes[k:], alg))


def _ref_path(m: int, hashes: tuple[bytes, ...], alg: str = "sha256") -> list[bytes]:
    """PATH(m, D[n]) of RFC 9162 2.1.3.1."""
    n = len(hashes)
    if n == 1:
        return []
    k = _ref_k(n)
    if m < k:
        return [*_ref_path(m, hashes[:k], alg), _ref_mth(hashes[k:], alg)]
    return [*_ref_path(m - k, hashes[k:], alg), _ref_mth(hashes[:k], alg)]


def _ref_subproof(m: int, hashes: tuple[bytes, ...], b: bool, alg: str = "sha256") -> list[bytes]:
    """SUBPROOF(m, D[n], b) of RFC 9162 2.1.4.1."""
    n = len(hashes)
    if m == n:
        return [] if b else [_ref_mth(hashes, alg)]
    k = _ref_k(n)
    if m <= k:
        return [*_ref_subproof(m, hashes[:k], b, alg), _ref_mth(hashes[k:], alg)]
    return [*_ref_subproof(m - k, hashes[k:], False, alg), _ref_mth(hashes[:k], alg)]


def _ref_proof(m: int, hashes: tuple[bytes, ...], alg: str = "sha256") -> list[bytes]:
    """PROOF(m, D[n]) = SUBPROOF(m, D[n], true) for 0 < m <= n; empty for m == 0 (our definition)."""
    return [] if m == 0 else _ref_subproof(m, hashes, True, alg)


@cache
def _hashes(n: int, alg: str = "sha256") -> tuple[bytes, ...]:
    """Leaf hashes of n distinct leaves (leaf i's data is i as 4 big-endian bytes)."""
    return tuple(_ref_leaf(i.to_bytes(4, "big"), alg) for i in range(n))


@cache
def _ref_root(n: int, alg: str = "sha256") -> bytes:
    return _ref_mth(_hashes(n, alg), alg)


def _ref_path_shape(m: int, n: int) -> str:
    """The PATH recursion's decisions: "L" when leaf m is in the left part, "R" when in the right one."""
    if n == 1:
        return ""
    k = _ref_k(n)
    return "L" + _ref_path_shape(m, k) if m < k else "R" + _ref_path_shape(m - k, n - k)


def _ref_proof_shape(m: int, n: int, b: bool = True) -> str:
    """The SUBPROOF recursion's decisions, ending in "T" (nothing appended) or "N" (MTH(D[m]) appended)."""
    if m == n:
        return "T" if b else "N"
    k = _ref_k(n)
    return "L" + _ref_proof_shape(m, k, b) if m <= k else "R" + _ref_proof_shape(m - k, n - k, False)


def _flip(value: bytes, bit: int = 0) -> bytes:
    """`value` with one bit flipped."""
    out = bytearray(value)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


# ---------------------------------------------------------------- hashing primitives


def test_leaf_and_node_hash_use_domain_prefixes() -> None:
    assert leaf_hash(b"abc") == hashlib.sha256(b"\x00abc").digest()
    left, right = b"\x11" * 32, b"\x22" * 32
    assert node_hash(left, right) == hashlib.sha256(b"\x01" + left + right).digest()
    assert leaf_hash(b"abc", "blake3") == blake3.blake3(b"\x00abc").digest()
    assert set(HASHES) >= {"sha256", "blake3"}


def test_empty_tree_root_is_hash_of_empty_string() -> None:
    assert root([]) == hashlib.sha256(b"").digest()
    assert root_from_leaf_hashes([]) == hashlib.sha256(b"").digest()
    assert root([], "blake3") == blake3.blake3(b"").digest()
    assert MerkleLog().root() == hashlib.sha256(b"").digest()


def test_unknown_algorithm_is_rejected_by_builders() -> None:
    with pytest.raises(ValueError):
        leaf_hash(b"", "md5")
    with pytest.raises(ValueError):
        MerkleLog("sha1")


# ---------------------------------------------------------------- exhaustive agreement, sizes 0..40


@pytest.mark.parametrize("n", range(MAX_SIZE + 1))
def test_roots_match_reference(n: int) -> None:
    leaves = [i.to_bytes(4, "big") for i in range(n)]
    expected = _ref_root(n)
    assert root(leaves) == expected
    assert root_from_leaf_hashes(_hashes(n)) == expected
    assert MerkleLog.from_leaf_hashes(_hashes(n)).root() == expected


@pytest.mark.parametrize("n", range(1, MAX_SIZE + 1))
def test_every_inclusion_proof_matches_reference_and_verifies(n: int) -> None:
    hashes, tree_root = _hashes(n), _ref_root(n)
    log = MerkleLog.from_leaf_hashes(hashes)
    for m in range(n):
        expected = _ref_path(m, hashes)
        assert inclusion_proof(m, hashes) == expected
        assert log.inclusion_proof(m) == expected
        assert verify_inclusion(hashes[m], m, n, expected, tree_root)


@pytest.mark.parametrize("n", range(MAX_SIZE + 1))
def test_every_consistency_proof_matches_reference_and_verifies(n: int) -> None:
    hashes, new_root = _hashes(n), _ref_root(n)
    log = MerkleLog.from_leaf_hashes(hashes)
    for m in range(n + 1):
        expected = _ref_proof(m, hashes)
        assert consistency_proof(m, hashes) == expected
        assert log.consistency_proof(m) == expected
        assert log.root_at(m) == _ref_root(m)
        assert verify_consistency(m, n, _ref_root(m), new_root, expected), (m, n)


def test_historical_proofs_from_a_larger_log_match_reference() -> None:
    log = MerkleLog.from_leaf_hashes(_hashes(MAX_SIZE))
    for n in range(1, MAX_SIZE + 1):
        for m in range(n):
            assert log.inclusion_proof(m, n) == _ref_path(m, _hashes(n))
        for m in range(n + 1):
            assert log.consistency_proof(m, n) == _ref_proof(m, _hashes(n))


# ---------------------------------------------------------------- tampering


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 8, 9, 16, 17, 31, 40])
def test_tampered_inclusion_proofs_are_rejected(n: int) -> None:
    hashes, tree_root = _hashes(n), _ref_root(n)
    for m in range(n):
        proof = _ref_path(m, hashes)
        leaf = hashes[m]
        for i in range(len(proof)):
            for bit in (0, 7, 255):
                bad = [*proof[:i], _flip(proof[i], bit), *proof[i + 1 :]]
                assert not verify_inclusion(leaf, m, n, bad, tree_root)
        assert not verify_inclusion(_flip(leaf), m, n, proof, tree_root)
        assert not verify_inclusion(leaf, m, n, proof, _flip(tree_root, 100))
        for other in range(n):
            if other != m:
                assert not verify_inclusion(leaf, other, n, proof, tree_root)
        for size in range(m + 1, 2 * n + 2):
            # A path does not bind the tree size beyond its shape (the signed tree head does that):
            # it must verify for another size exactly when the RFC recursion takes the same turns.
            same_shape = _ref_path_shape(m, size) == _ref_path_shape(m, n)
            assert verify_inclusion(leaf, m, size, proof, tree_root) == same_shape, (m, n, size)
        assert not verify_inclusion(leaf, m, m, proof, tree_root)
        if proof:
            assert not verify_inclusion(leaf, m, n, proof[:-1], tree_root)
        if len(proof) >= 2:
            assert not verify_inclusion(leaf, m, n, proof[::-1], tree_root)
        assert not verify_inclusion(leaf, m, n, [*proof, proof[0] if proof else leaf], tree_root)
        assert not verify_inclusion(leaf, m, n, [*proof, b"\x00" * 32], tree_root)


@pytest.mark.parametrize("n", [2, 3, 4, 5, 7, 8, 9, 16, 17, 31, 40])
def test_tampered_consistency_proofs_are_rejected(n: int) -> None:
    hashes, new_root = _hashes(n), _ref_root(n)
    for m in range(1, n):
        old_root, proof = _ref_root(m), _ref_proof(m, hashes)
        for i in range(len(proof)):
            for bit in (0, 9, 255):
                bad = [*proof[:i], _flip(proof[i], bit), *proof[i + 1 :]]
                assert not verify_consistency(m, n, old_root, new_root, bad)
        assert not verify_consistency(m, n, _flip(old_root), new_root, proof)
        assert not verify_consistency(m, n, old_root, _flip(new_root), proof)
        assert not verify_consistency(m, n, new_root, old_root, proof)  # swapped roots
        assert not verify_consistency(n, m, new_root, old_root, proof)  # swapped sizes
        assert not verify_consistency(m, n, old_root, new_root, proof[:-1])
        assert not verify_consistency(m, n, old_root, new_root, [*proof, proof[-1]])
        assert not verify_consistency(m, n, old_root, new_root, [])
        shape = _ref_proof_shape(m, n)
        for other in range(1, n):
            if other != m:
                same = _ref_proof_shape(other, n) == shape
                assert verify_consistency(other, n, old_root, new_root, proof) == same, (m, n, other)
        for other in range(m + 1, 2 * n + 2):
            same = _ref_proof_shape(m, other) == shape
            assert verify_consistency(m, other, old_root, new_root, proof) == same, (m, n, other)


def test_consistency_edge_cases() -> None:
    r5, r8 = _ref_root(5), _ref_root(8)
    empty = hashlib.sha256(b"").digest()
    assert verify_consistency(5, 5, r5, r5, [])
    assert not verify_consistency(5, 5, r5, r8, [])
    assert not verify_consistency(5, 5, r5, r5, [r5])
    assert verify_consistency(0, 8, empty, r8, [])
    assert verify_consistency(0, 0, empty, empty, [])
    assert not verify_consistency(0, 8, empty, r8, [r8])
    assert not verify_consistency(0, 8, r5, r8, [])
    assert not verify_consistency(8, 5, r8, r5, _ref_proof(5, _hashes(8)))
    assert consistency_proof(0, _hashes(8)) == []
    assert consistency_proof(8, _hashes(8)) == []


@pytest.mark.parametrize(
    "args",
    [
        (None, 0, 1, [], b"\x00" * 32),
        (b"\x00" * 31, 0, 1, [], b"\x00" * 31),
        (b"\x00" * 32, -1, 1, [], b"\x00" * 32),
        (b"\x00" * 32, 0, 0, [], b"\x00" * 32),
        (b"\x00" * 32, True, 2, [b"\x00" * 32], b"\x00" * 32),
        (b"\x00" * 32, 0, 2**64, [], b"\x00" * 32),
        (b"\x00" * 32, 0, 2, "not a list", b"\x00" * 32),
        (b"\x00" * 32, 0, 2, [None], b"\x00" * 32),
        (b"\x00" * 32, 0, 2, [bytearray(32)], b"\x00" * 32),
        (b"\x00" * 32, 0, 2, [b"\x00" * 32] * 100, b"\x00" * 32),
        (b"\x00" * 32, 1.0, 2, [b"\x00" * 32], b"\x00" * 32),
        ("00" * 32, 0, 1, [], "00" * 32),
    ],
)
def test_verify_inclusion_never_raises_on_malformed_input(args: tuple[Any, ...]) -> None:
    assert verify_inclusion(*args) is False


def test_verify_functions_reject_unknown_or_bogus_algorithms() -> None:
    leaf = _hashes(1)[0]
    assert verify_inclusion(leaf, 0, 1, [], leaf)
    for alg in ("md5", "", None, 3, ["sha256"]):
        assert verify_inclusion(leaf, 0, 1, [], leaf, alg) is False  # type: ignore[arg-type]
        assert verify_consistency(1, 1, leaf, leaf, [], alg) is False  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "args",
    [
        (1, 2, None, b"\x00" * 32, [b"\x00" * 32]),
        (1, 2, b"\x00" * 32, b"\x00" * 33, [b"\x00" * 32]),
        (-1, 2, b"\x00" * 32, b"\x00" * 32, [b"\x00" * 32]),
        (1, -2, b"\x00" * 32, b"\x00" * 32, [b"\x00" * 32]),
        (1, 2**64, b"\x00" * 32, b"\x00" * 32, [b"\x00" * 32]),
        (False, 2, b"\x00" * 32, b"\x00" * 32, []),
        (1, 2, b"\x00" * 32, b"\x00" * 32, None),
        (1, 2, b"\x00" * 32, b"\x00" * 32, [1, 2]),
        (1, 2, b"\x00" * 32, b"\x00" * 32, [b"\x00" * 32] * 1000),
        (3, 2**63, b"\x00" * 32, b"\x00" * 32, [b"\x00" * 32] * 60),
    ],
)
def test_verify_consistency_never_raises_on_malformed_input(args: tuple[Any, ...]) -> None:
    assert verify_consistency(*args) is False


def test_builders_reject_bad_arguments() -> None:
    hashes = list(_hashes(4))
    with pytest.raises(ValueError):
        inclusion_proof(4, hashes)
    with pytest.raises(ValueError):
        inclusion_proof(0, [])
    with pytest.raises(ValueError):
        consistency_proof(5, hashes)
    with pytest.raises(ValueError):
        root_from_leaf_hashes([b"short"])
    log = MerkleLog()
    with pytest.raises(ValueError):
        log.append(b"\x00" * 31)
    assert log.size == 0


# ---------------------------------------------------------------- MerkleLog


def test_merkle_log_incremental_matches_reference() -> None:
    log = MerkleLog()
    for n in range(1, MAX_SIZE + 1):
        log.append(_hashes(n)[n - 1])
        assert log.size == n
        assert log.root() == _ref_root(n)
        assert log.leaf_hash(n - 1) == _hashes(n)[n - 1]
    mixed = MerkleLog()
    mixed.extend(_hashes(7))
    mixed.append(_hashes(8)[7])
    mixed.extend(_hashes(MAX_SIZE)[8:])
    assert mixed.root() == _ref_root(MAX_SIZE)


# ---------------------------------------------------------------- blake3


def test_blake3_trees_differ_from_sha256_and_verify() -> None:
    n = 13
    hashes = _hashes(n, "blake3")
    tree_root = root_from_leaf_hashes(hashes, "blake3")
    assert tree_root == _ref_root(n, "blake3")
    assert tree_root != _ref_root(n, "sha256")
    assert root([i.to_bytes(4, "big") for i in range(n)], "blake3") == tree_root
    log = MerkleLog.from_leaf_hashes(hashes, "blake3")
    assert log.alg == "blake3"
    for m in range(n):
        proof = inclusion_proof(m, hashes, "blake3")
        assert proof == _ref_path(m, hashes, "blake3")
        assert verify_inclusion(hashes[m], m, n, proof, tree_root, "blake3")
        assert not verify_inclusion(hashes[m], m, n, proof, tree_root, "sha256")
    for m in range(n + 1):
        proof = log.consistency_proof(m)
        assert proof == _ref_proof(m, hashes, "blake3")
        assert verify_consistency(m, n, _ref_root(m, "blake3"), tree_root, proof, "blake3")


# ---------------------------------------------------------------- golden vectors

CT_LEAVES_HEX = [
    "",
    "00",
    "10",
    "2021",
    "3031",
    "40414243",
    "5051525354555657",
    "606162636465666768696a6b6c6d6e6f",
]


def _vectors() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(VECTORS_PATH.read_text())
    return data


def test_golden_vectors_agree_with_the_reference_implementation() -> None:
    vectors = _vectors()
    sha = vectors["sha256"]
    assert vectors["leaves_hex"] == CT_LEAVES_HEX
    leaf_hashes = tuple(_ref_leaf(bytes.fromhex(x)) for x in CT_LEAVES_HEX)
    for size_str, expected in sha["roots"].items():
        assert _ref_mth(leaf_hashes[: int(size_str)]).hex() == expected
    for case in sha["inclusion"]:
        path = _ref_path(case["index"], leaf_hashes[: case["tree_size"]])
        assert [p.hex() for p in path] == case["proof"]
    for case in sha["consistency"]:
        proof = _ref_proof(case["old_size"], leaf_hashes[: case["new_size"]])
        assert [p.hex() for p in proof] == case["proof"]


@pytest.mark.parametrize("alg", ["sha256", "blake3"])
def test_module_matches_golden_vectors(alg: str) -> None:
    vectors = _vectors()
    section = vectors[alg]
    leaves = [bytes.fromhex(x) for x in vectors["leaves_hex"]]
    hashes = [leaf_hash(leaf, alg) for leaf in leaves]
    assert [h.hex() for h in hashes] == section["leaf_hashes"]
    for size_str, expected in section["roots"].items():
        size = int(size_str)
        assert root(leaves[:size], alg).hex() == expected
        assert MerkleLog.from_leaf_hashes(hashes, alg).root_at(size).hex() == expected
    for case in section["inclusion"]:
        idx, size = case["index"], case["tree_size"]
        proof = inclusion_proof(idx, hashes[:size], alg)
        assert [p.hex() for p in proof] == case["proof"]
        tree_root = bytes.fromhex(section["roots"][str(size)])
        assert verify_inclusion(hashes[idx], idx, size, proof, tree_root, alg)
    for case in section["consistency"]:
        old, new = case["old_size"], case["new_size"]
        proof = consistency_proof(old, hashes[:new], alg)
        assert [p.hex() for p in proof] == case["proof"]
        old_root = bytes.fromhex(section["roots"][str(old)])
        new_root = bytes.fromhex(section["roots"][str(new)])
        assert verify_consistency(old, new, old_root, new_root, proof, alg)


def test_ct_reference_roots_are_pinned_in_the_vector_file() -> None:
    """The CT project's published SHA-256 roots for sizes 1..8 (checked against `_ref_mth` above)."""
    roots = _vectors()["sha256"]["roots"]
    assert roots["0"] == hashlib.sha256(b"").hexdigest()
    assert roots["1"] == "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"
    assert roots["8"] == "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328"
    assert merkle.digest_size("sha256") == 32


def test_ct_reference_proofs_are_pinned_in_the_vector_file() -> None:
    """Two audit/consistency paths as published by the CT project's tests."""
    sha = _vectors()["sha256"]
    inclusion = {(c["index"], c["tree_size"]): c["proof"] for c in sha["inclusion"]}
    consistency = {(c["old_size"], c["new_size"]): c["proof"] for c in sha["consistency"]}
    assert inclusion[0, 8] == [
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ]
    assert consistency[6, 8] == [
        "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    ]
