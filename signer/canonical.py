"""Canonical encoding and hashing of journals.

The canonical byte form of an object is its JSON encoding by msgspec with every object's
keys sorted (recursively), no insignificant whitespace, UTF-8, integers as JSON integers.
A posted journal's hash is SHA-256 over the canonical encoding of `PostedJournal` (which
includes `posted_at` and the principal); the algorithm name travels with every hash
(`hash_alg`). A ledger's algorithm is fixed at creation (`LEDGER_HASH_ALG=sha256|blake3`):
`journal_digest` hashes journal bodies with it, while request hashes and statement digests are
always SHA-256.
"""

from __future__ import annotations

import hashlib
from typing import Any, Final

import msgspec

from ledger.journal import Journal
from signer.merkle import hash_function

HASH_ALG: Final = "sha256"

_encoder: Final = msgspec.json.Encoder(order="sorted")
_posted_encoder: Final = msgspec.json.Encoder(order="deterministic")
_sha256: Final = hashlib.sha256


# The two structs below declare their fields in name order, so the deterministic encoder (dict
# keys sorted, struct fields in declaration order) writes exactly the canonical form (`posted_body`)
# without sorting struct fields on every call; a property test pins `posted_body == canonical(...)`.
class PostedLine(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """A line as stored and returned: the client's fields, nothing derived."""

    account_id: str
    amount_cents: int
    currency: str
    meta: dict[str, Any]
    side: str


class PostedJournal(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """A journal as posted: what `GET /ledger/{id}` returns and what the hash covers."""

    context: dict[str, Any]
    entries: list[PostedLine]
    journal_id: str
    memo: str | None
    posted_at: str
    posted_by: str
    reverses: str | None
    source_ref: str | None
    ts: str | None


def canonical(value: Any) -> bytes:
    """The canonical JSON bytes of a value (sorted keys, compact)."""
    return _encoder.encode(value)


def digest(data: bytes) -> bytes:
    """SHA-256 of `data`."""
    return hashlib.sha256(data).digest()


def journal_digest(body: bytes, alg: str) -> bytes:
    """The journal hash of a canonical body under the ledger's algorithm (32 bytes; sha256 or blake3)."""
    if alg == HASH_ALG:
        return hashlib.sha256(body).digest()
    return hash_function(alg)(body)


def posted_journal(journal: Journal, journal_id: str, principal: str, posted_at: str) -> PostedJournal:
    """The stored form of a validated journal."""
    return PostedJournal(
        journal_id=journal_id,
        entries=[
            PostedLine(
                account_id=line.account_id,
                amount_cents=line.amount,
                currency=line.currency,
                meta=line.meta,
                side=line.side,
            )
            for line in journal.lines
        ],
        context=journal.context,
        ts=journal.effective_at,
        reverses=journal.reverses,
        memo=journal.memo,
        source_ref=journal.source_ref,
        posted_by=principal,
        posted_at=posted_at,
    )


def posted_body(journal: Journal, journal_id: str, principal: str, posted_at: str) -> bytes:
    """`canonical(posted_journal(...))`, the stored body of a posted journal, without sorting
    struct fields per call (see the field order of `PostedJournal`)."""
    return _posted_encoder.encode(posted_journal(journal, journal_id, principal, posted_at))


def request_hash(journal: Journal) -> bytes:
    """Hash of the decoded request, for idempotency comparisons (the client's id included).

    `digest(canonical(journal))`, inlined: the front end computes one per journal.
    """
    return _sha256(_encoder.encode(journal)).digest()
