"""Property tests for RFC 9162 Merkle proofs: soundness under random sizes, mutations and append orders."""

from __future__ import annotations

from functools import cache

from hypothesis import given, settings
from hypothesis import strategies as st

from signer.merkle import (
    MerkleLog,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    root_from_leaf_hashes,
    verify_consistency,
    verify_inclusion,
)

MAX_SIZE = 300
SETTINGS = settings(max_examples=150, deadline=None)


@cache
def _log(alg: str = "sha256") -> MerkleLog:
    """One shared log of MAX_SIZE leaves; proofs for smaller trees come from its history."""
    return MerkleLog.from_leaf_hashes([leaf_hash(i.to_bytes(4, "big"), alg) for i in range(MAX_SIZE)], alg)


def _mutate(value: bytes, position: int, delta: int) -> bytes:
    """`value` with the byte at `position % len` changed by a non-zero xor `delta`."""
    out = bytearray(value)
    out[position % len(out)] ^= delta
    return bytes(out)


@st.composite
def _index_and_size(draw: st.DrawFn) -> tuple[int, int]:
    size = draw(st.integers(min_value=1, max_value=MAX_SIZE))
    return draw(st.integers(min_value=0, max_value=size - 1)), size


@st.composite
def _size_pair(draw: st.DrawFn) -> tuple[int, int]:
    new = draw(st.integers(min_value=1, max_value=MAX_SIZE))
    return draw(st.integers(min_value=1, max_value=new)), new


@SETTINGS
@given(case=_index_and_size(), alg=st.sampled_from(["sha256", "blake3"]))
def test_inclusion_proofs_verify(case: tuple[int, int], alg: str) -> None:
    index, size = case
    log = _log(alg)
    proof = log.inclusion_proof(index, size)
    assert verify_inclusion(log.leaf_hash(index), index, size, proof, log.root_at(size), alg)


@SETTINGS
@given(pair=_size_pair(), alg=st.sampled_from(["sha256", "blake3"]))
def test_consistency_proofs_verify(pair: tuple[int, int], alg: str) -> None:
    old, new = pair
    log = _log(alg)
    proof = log.consistency_proof(old, new)
    assert verify_consistency(old, new, log.root_at(old), log.root_at(new), proof, alg)


@SETTINGS
@given(
    case=_index_and_size(), which=st.integers(0, 10_000), pos=st.integers(0, 31), delta=st.integers(1, 255)
)
def test_any_single_byte_mutation_breaks_inclusion(
    case: tuple[int, int], which: int, pos: int, delta: int
) -> None:
    index, size = case
    log = _log()
    leaf, proof, tree_root = log.leaf_hash(index), log.inclusion_proof(index, size), log.root_at(size)
    slot = which % (len(proof) + 2)  # a proof node, the leaf hash or the root
    if slot < len(proof):
        proof[slot] = _mutate(proof[slot], pos, delta)
    elif slot == len(proof):
        leaf = _mutate(leaf, pos, delta)
    else:
        tree_root = _mutate(tree_root, pos, delta)
    assert not verify_inclusion(leaf, index, size, proof, tree_root)


@SETTINGS
@given(pair=_size_pair(), which=st.integers(0, 10_000), pos=st.integers(0, 31), delta=st.integers(1, 255))
def test_any_single_byte_mutation_breaks_consistency(
    pair: tuple[int, int], which: int, pos: int, delta: int
) -> None:
    old, new = pair
    log = _log()
    old_root, new_root, proof = log.root_at(old), log.root_at(new), log.consistency_proof(old, new)
    slot = which % (len(proof) + 2)  # a proof node, the old root or the new root
    if slot < len(proof):
        proof[slot] = _mutate(proof[slot], pos, delta)
    elif slot == len(proof):
        old_root = _mutate(old_root, pos, delta)
    else:
        new_root = _mutate(new_root, pos, delta)
    assert not verify_consistency(old, new, old_root, new_root, proof)


@SETTINGS
@given(case=_index_and_size())
def test_stateless_builders_match_the_log(case: tuple[int, int]) -> None:
    index, size = case
    log = _log()
    hashes = [log.leaf_hash(i) for i in range(size)]
    assert inclusion_proof(index, hashes) == log.inclusion_proof(index, size)
    assert consistency_proof(index + 1, hashes) == log.consistency_proof(index + 1, size)
    assert root_from_leaf_hashes(hashes) == log.root_at(size)


@settings(max_examples=60, deadline=None)
@given(
    chunks=st.lists(st.integers(min_value=0, max_value=40), max_size=20),
    checkpoints=st.sets(st.integers(min_value=0, max_value=MAX_SIZE), max_size=6),
)
def test_incremental_appends_match_batch_roots(chunks: list[int], checkpoints: set[int]) -> None:
    source = _log()
    all_hashes = [source.leaf_hash(i) for i in range(MAX_SIZE)]
    log = MerkleLog()
    for chunk in chunks:
        start = log.size
        batch = all_hashes[start : min(start + chunk, MAX_SIZE)]
        if chunk % 2:  # odd chunk sizes are appended one at a time, even ones through extend()
            for h in batch:
                log.append(h)
                if log.size in checkpoints:
                    assert log.root() == root_from_leaf_hashes(all_hashes[: log.size])
        else:
            log.extend(batch)
        assert log.root() == root_from_leaf_hashes(all_hashes[: log.size])
    for size in checkpoints:
        if size <= log.size:
            assert log.root_at(size) == root_from_leaf_hashes(all_hashes[:size])
