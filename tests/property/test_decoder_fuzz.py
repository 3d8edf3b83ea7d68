"""Fuzzing the decoders in front of hashing and verification with malformed input (issue 10 item 2).

- `signer.package.decode_package` (the canonical decoder of proof packages) raises nothing but
  `PackageError` on flipped, inserted or deleted bytes and on structural mutations (removed fields,
  reordered items, wrong types), and accepts only canonical bytes.
- `verify_package` never verifies a package whose lists were reordered, or which was re-serialised
  non-canonically, unless nothing authenticated changed (the oracle of test_verify_fuzz.py).
- `ledger.journal.decode_journal` + `validate_journal` (the request decoder whose output is
  canonically encoded and hashed) raise nothing but `Rejection` on mutated journals.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from ledger.errors import Rejection
from ledger.journal import decode_journal, validate_journal
from signer.canonical import canonical
from signer.package import PackageError, decode_package
from tests.property.test_verify_fuzz import FUZZ, ORIGINAL, PATHS, REPLACEMENTS, _check, _paths, _verify


def _at(doc: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        doc = doc[key]
    return doc


ORIGINAL_DOC = json.loads(ORIGINAL)
LIST_PATHS = [
    p for p in [(), *PATHS] if isinstance(_at(ORIGINAL_DOC, p), list) and len(_at(ORIGINAL_DOC, p)) > 1
]
OBJECT_PATHS = [p for p in [(), *PATHS] if isinstance(_at(ORIGINAL_DOC, p), dict)]


def _edited(document: bytes, path: tuple[Any, ...], value: Any, delete: bool) -> Any:
    """The JSON document with the node at `path` deleted or replaced by `value`."""
    doc = json.loads(document)
    parent = _at(doc, path[:-1])
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return doc


def _decode_cleanly(data: bytes) -> bool:
    """True when decoded; False when rejected with PackageError; anything else fails the test."""
    try:
        decode_package(data)
    except PackageError:
        return False
    return True


def test_lists_to_reorder_exist() -> None:
    """The reordering fuzz has material: the package has several multi-item lists (batches, proofs)."""
    assert len(LIST_PATHS) >= 3 and len(OBJECT_PATHS) >= 5
    assert _decode_cleanly(ORIGINAL)


@FUZZ
@given(
    position=st.integers(0, len(ORIGINAL)), insert=st.binary(min_size=0, max_size=4), cut=st.integers(0, 4)
)
def test_decoder_rejects_byte_edits_cleanly(position: int, insert: bytes, cut: int) -> None:
    """Inserted and deleted bytes anywhere: PackageError (or the very same canonical package)."""
    mutated = ORIGINAL[:position] + insert + ORIGINAL[position + cut :]
    if _decode_cleanly(mutated):
        assert json.loads(mutated) is not None and canonical(json.loads(mutated)) == mutated


@FUZZ
@given(path=st.sampled_from(LIST_PATHS), data=st.data())
def test_reordered_items_never_verify(path: tuple[Any, ...], data: st.DataObject) -> None:
    """Any permutation of a list (batches, entries, journals, proof hashes, keys) is caught."""
    doc = json.loads(ORIGINAL)
    items = _at(doc, path)
    order = data.draw(st.permutations(range(len(items))))
    items[:] = [items[i] for i in order]
    mutated = canonical(doc)
    _decode_cleanly(mutated)
    _check(mutated)


@FUZZ
@given(path=st.sampled_from(OBJECT_PATHS), indent=st.sampled_from([None, 1]), reverse=st.booleans())
def test_non_canonical_serialisations_are_rejected(
    path: tuple[Any, ...], indent: int | None, reverse: bool
) -> None:
    """The same content with keys out of order or whitespace added is not a package."""
    doc = json.loads(ORIGINAL)
    target = _at(doc, path)
    if reverse:
        reordered = dict(reversed(list(target.items())))
        target.clear()
        target.update(reordered)
    text = json.dumps(doc, indent=indent, separators=None if indent else (", ", ": "))
    mutated = text.encode()
    assert mutated != ORIGINAL
    assert not _decode_cleanly(mutated)
    assert not _verify(mutated).ok


@FUZZ
@given(path=st.sampled_from(PATHS), replacement=st.sampled_from(REPLACEMENTS), delete=st.booleans())
def test_decoder_rejects_wrong_types_and_missing_fields(
    path: tuple[Any, ...], replacement: Any, delete: bool
) -> None:
    """A removed field or a value of another type: PackageError, never another exception."""
    _decode_cleanly(canonical(_edited(ORIGINAL, path, replacement, delete)))


JOURNAL = {
    "journal_id": "fuzz-1",
    "entries": [
        {"account_id": "asset:cash", "side": "debit", "amount_cents": 100, "currency": "USD", "meta": {}},
        {"account_id": "revenue:sales", "side": "credit", "amount_cents": 100, "currency": "USD"},
    ],
    "context": {"source": "fuzz"},
    "ts": "2026-01-01T00:00:00Z",
    "memo": "m",
}
JOURNAL_BYTES = json.dumps(JOURNAL).encode()
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def _decode_journal_cleanly(data: bytes) -> None:
    with contextlib.suppress(Rejection):
        validate_journal(decode_journal(data))


def test_unmutated_journal_is_valid() -> None:
    """The fuzzed journal is accepted as it is (so rejections below are the mutations' doing)."""
    assert validate_journal(decode_journal(JOURNAL_BYTES)).lines


@FUZZ
@given(position=st.integers(0, len(JOURNAL_BYTES) - 1), xor=st.integers(1, 255))
def test_journal_decoder_byte_flips(position: int, xor: int) -> None:
    """Flipped bytes of a journal request: a Rejection (VALIDATION_ERROR...) or a valid journal."""
    data = bytearray(JOURNAL_BYTES)
    data[position] ^= xor
    _decode_journal_cleanly(bytes(data))


@FUZZ
@given(path=st.sampled_from(_paths(JOURNAL)), value=JSON_VALUES, delete=st.booleans())
def test_journal_decoder_structural_mutations(path: tuple[Any, ...], value: Any, delete: bool) -> None:
    """Removed fields and values of any JSON type anywhere: only Rejection is raised."""
    _decode_journal_cleanly(json.dumps(_edited(JOURNAL_BYTES, path, value, delete)).encode())
