"""Unit tests of the canonical encoding and hashes (`signer.canonical`)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest

from ledger.journal import Journal, JournalIn, LineIn, validate_journal
from signer.canonical import HASH_ALG, canonical, digest, posted_body, posted_journal, request_hash

GOLDEN_BYTES = (
    b'{"context":{"batch":3,"order":"o-9"},"entries":[{"account_id":"asset:cash","amount_cents":12345,'
    b'"currency":"USD","meta":{"a":"\xc3\xa9","z":1},"side":"debit"},{"account_id":"liability:customer:42",'
    b'"amount_cents":12345,"currency":"USD","meta":{},"side":"credit"}],"journal_id":"jrn-golden-1",'
    b'"memo":"golden","posted_at":"2024-05-01T12:00:01.000001Z","posted_by":"service:0123456789ab",'
    b'"reverses":null,"source_ref":"src-1","ts":"2024-05-01T12:00:00Z"}'
)
GOLDEN_SHA256 = "b1394c1296a8d51818612d941a6950b854401d9c3bea06d17a1bcba1a6c8a716"


def _journal(
    amount: int = 12345,
    account: str = "asset:cash",
    currency: str = "USD",
    meta: dict[str, Any] | None = None,
    context: dict[str, Any] | None = None,
    journal_id: str | None = "jrn-golden-1",
) -> Journal:
    return validate_journal(
        JournalIn(
            entries=[
                LineIn(account, "debit", amount, currency, {"z": 1, "a": "\u00e9"} if meta is None else meta),
                LineIn("liability:customer:42", "credit", amount, currency),
            ],
            journal_id=journal_id,
            context={"order": "o-9", "batch": 3} if context is None else context,
            ts="2024-05-01T12:00:00Z",
            memo="golden",
            source_ref="src-1",
        )
    )


def test_canonical_sorts_keys_recursively_and_is_compact() -> None:
    """Keys are sorted at every depth, there is no whitespace, and non-ASCII stays UTF-8."""
    value = {"b": {"z": 1, "a": [{"y": 2, "x": 3}]}, "a": "\u00e9", "c": [3, 1, 2]}
    encoded = canonical(value)
    assert encoded == b'{"a":"\xc3\xa9","b":{"a":[{"x":3,"y":2}],"z":1},"c":[3,1,2]}'
    assert json.loads(encoded) == value


def test_canonical_does_not_depend_on_insertion_order() -> None:
    """Equal dicts built in different orders encode to identical bytes."""
    one = {"x": 1, "y": {"p": True, "q": None}}
    two = {"y": {"q": None, "p": True}, "x": 1}
    assert canonical(one) == canonical(two)


def test_canonical_encodes_big_integers_exactly() -> None:
    """int64 amounts are JSON integers, never floats."""
    assert canonical({"amount": 2**63 - 1}) == b'{"amount":9223372036854775807}'


def test_golden_posted_journal_bytes_and_hash() -> None:
    """The stored form and hash of a fixed journal never change (hash chains depend on it)."""
    posted = posted_journal(_journal(), "jrn-golden-1", "service:0123456789ab", "2024-05-01T12:00:01.000001Z")
    body = canonical(posted)
    assert body == GOLDEN_BYTES
    assert (
        posted_body(_journal(), "jrn-golden-1", "service:0123456789ab", "2024-05-01T12:00:01.000001Z") == body
    )
    assert HASH_ALG == "sha256"
    assert digest(body).hex() == GOLDEN_SHA256
    assert hashlib.sha256(GOLDEN_BYTES).hexdigest() == GOLDEN_SHA256


def test_request_hash_ignores_key_order_of_meta_and_context() -> None:
    """Clients may send meta/context keys in any order; it is the same request."""
    base = request_hash(_journal(meta={"a": 1, "b": {"c": 2, "d": 3}}, context={"k": 1, "j": [1, 2]}))
    reordered = request_hash(_journal(meta={"b": {"d": 3, "c": 2}, "a": 1}, context={"j": [1, 2], "k": 1}))
    assert base == reordered
    assert len(base) == 32


@pytest.mark.parametrize(
    "changed",
    [
        {"amount": 12346},
        {"account": "asset:bank"},
        {"currency": "EUR"},
        {"meta": {"z": 2, "a": "\u00e9"}},
        {"context": {"order": "o-10", "batch": 3}},
        {"journal_id": "jrn-golden-2"},
        {"journal_id": None},
    ],
)
def test_request_hash_changes_with_any_field(changed: dict[str, Any]) -> None:
    """A different amount, account, currency, meta, context or id is a different request."""
    assert request_hash(_journal(**changed)) != request_hash(_journal())


def test_request_hash_is_deterministic() -> None:
    """Hashing the same journal twice gives the same bytes."""
    assert request_hash(_journal()) == request_hash(_journal())
