"""Proof packages: a self-contained, canonical JSON file proving a range of the ledger.

A package carries everything an offline verifier needs besides the auditor's trusted public keys:
a signed checkpoint, the signed statements of the batches in (and just around) the range with their
RFC 9162 inclusion proofs in the checkpoint's log, the entries of the in-range ("member") batches and
the canonical body of every journal those entries name. The format is documented in docs/proofs.md.

This module is pure: it encodes, decodes and builds packages from values the caller passes. Decoding
is strict (`forbid_unknown_fields`, exact types, lowercase hex, canonical base64, the whole file in
canonical form) and raises `PackageError` for anything malformed; it never checks signatures or
proofs, which is `signer.verify`'s job.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import msgspec

from ledger.timestamps import parse_rfc3339
from signer.canonical import HASH_ALG, canonical
from signer.keys import ALGORITHMS, PublicKey
from signer.merkle import HASHES

FORMAT: Final = "ledger-node/proof-package/v1"
ROLES: Final = ("member", "before", "after")
SIGNER_KINDS: Final = ("pkcs11", "software")
HASH_HEX_LEN: Final = 64

Role = Literal["member", "before", "after"]
EntryInput = tuple[int, str, bytes, bytes | None]

_HEX: Final = re.compile(r"[0-9a-f]{64}")


class PackageError(ValueError):
    """A package (or a builder input) is malformed; the message says what is wrong."""


class Range(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """The range a package proves: a time range (`from_ts`, `to_ts`) or a log-index range."""

    from_ts: str | None = None
    to_ts: str | None = None
    from_index: int | None = None
    to_index: int | None = None

    @property
    def is_time(self) -> bool:
        """True for a time range ({from_ts, to_ts}), False for an index range."""
        return self.from_ts is not None


class KeyInfo(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A signer key as listed in the package (informational: trust comes from the auditor's keys)."""

    kid: str
    algorithm: str
    pem: str
    created_at: str
    retired_at: str | None


class SignerInfo(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Which kind of signer produced the checkpoint, and the keys it has used."""

    kind: str
    keys: list[KeyInfo]


class SignedCheckpoint(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A checkpoint statement and its base64 signature."""

    statement: dict[str, Any]
    signature: str


class PackageEntry(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One chain entry of a member batch: its seq, journal, journal hash and the previous entry's hash."""

    seq: int
    journal_id: str
    hash: str
    prev_hash: str | None


class PackageBatch(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A signed batch statement, its place in the log, its role and (members only) its entries."""

    statement: dict[str, Any]
    signature: str
    log_index: int
    log_proof: list[str]
    role: Role
    entries: list[PackageEntry]


class PackageJournal(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A journal's canonical JSON body, exactly the bytes its hash covers (as UTF-8 text)."""

    journal_id: str
    body: str


class ProofPackage(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The whole proof package (see docs/proofs.md, "The package")."""

    format: str
    proof_id: str
    generated_at: str
    hash_alg: str
    range: Range
    signer: SignerInfo
    checkpoint: SignedCheckpoint
    batches: list[PackageBatch]
    journals: list[PackageJournal]


@dataclass(frozen=True)
class BatchInput:
    """What the server passes to `build_package` for one batch (raw bytes, not yet encoded)."""

    statement: dict[str, Any]
    signature: bytes
    log_index: int
    log_proof: list[bytes]
    role: str
    entries: list[EntryInput] = field(default_factory=list)


def time_range(from_ts: str, to_ts: str) -> Range:
    """A time range [from_ts, to_ts] (RFC 3339, both ends included)."""
    return Range(from_ts=from_ts, to_ts=to_ts)


def index_range(from_index: int, to_index: int) -> Range:
    """A log-index range [from_index, to_index] (both ends included)."""
    return Range(from_index=from_index, to_index=to_index)


def b64(data: bytes) -> str:
    """Standard base64 with padding: how signatures travel in a package."""
    return base64.b64encode(data).decode("ascii")


def signature_bytes(text: str) -> bytes:
    """The bytes of a canonical base64 signature; `PackageError` for anything else."""
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeError, ValueError) as exc:
        raise PackageError(f"signature is not base64: {exc}") from exc
    if not raw or b64(raw) != text:
        raise PackageError("signature is not canonical (padded, standard alphabet) base64")
    return raw


def is_hash_hex(value: object) -> bool:
    """True for a 32-byte hash as 64 lowercase hex characters."""
    return isinstance(value, str) and _HEX.fullmatch(value) is not None


def encode_package(package: ProofPackage) -> bytes:
    """The canonical bytes of a package (sorted keys, compact)."""
    return canonical(package)


def decode_package(data: bytes) -> ProofPackage:
    """Decode and structurally validate a package; `PackageError` on anything malformed."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise PackageError("a package is bytes")
    raw = bytes(data)
    try:
        package = msgspec.json.decode(raw, type=ProofPackage)
    except (msgspec.DecodeError, RecursionError, ValueError, TypeError) as exc:
        raise PackageError(f"not a {FORMAT} document: {exc}") from exc
    _validate(package)
    try:
        again = encode_package(package)
    except (msgspec.EncodeError, OverflowError, ValueError, TypeError, RecursionError) as exc:
        raise PackageError(f"package cannot be re-encoded canonically: {exc}") from exc
    if again != raw:
        raise PackageError("package is not in canonical form (sorted keys, compact, minimal escapes)")
    return package


def _validate(package: ProofPackage) -> None:
    """Raise `PackageError` naming the first structural problem of a decoded package."""
    if package.format != FORMAT:
        raise PackageError(f"format is {package.format!r}, expected {FORMAT!r}")
    if package.hash_alg not in HASHES:
        raise PackageError(f"hash_alg {package.hash_alg!r} is not supported (only {sorted(HASHES)})")
    if not package.proof_id:
        raise PackageError("proof_id is empty")
    _require_time(package.generated_at, "generated_at")
    _validate_range(package.range)
    _validate_signer(package.signer)
    signature_bytes(package.checkpoint.signature)
    _validate_batches(package.batches)
    _validate_journals(package.journals)


def _require_time(value: object, what: str) -> None:
    """`PackageError` unless `value` is RFC 3339 text."""
    if not isinstance(value, str) or parse_rfc3339(value) is None:
        raise PackageError(f"{what} is not an RFC 3339 timestamp: {value!r:.80}")


def _validate_range(rng: Range) -> None:
    """Exactly one complete range kind, with its ends in order."""
    times = (rng.from_ts, rng.to_ts)
    indexes = (rng.from_index, rng.to_index)
    if all(t is not None for t in times) and all(i is None for i in indexes):
        _require_time(rng.from_ts, "range.from_ts")
        _require_time(rng.to_ts, "range.to_ts")
        start, end = parse_rfc3339(str(rng.from_ts)), parse_rfc3339(str(rng.to_ts))
        if start is None or end is None or start > end:
            raise PackageError("range.from_ts is after range.to_ts")
        return
    if all(i is not None for i in indexes) and all(t is None for t in times):
        lo, hi = rng.from_index, rng.to_index
        if lo is None or hi is None or not 0 <= lo <= hi:
            raise PackageError(f"index range [{lo}, {hi}] is not 0 <= from_index <= to_index")
        return
    raise PackageError("range must be exactly {from_ts, to_ts} or {from_index, to_index}")


def _validate_signer(signer: SignerInfo) -> None:
    """Known signer kind; every listed key names a known algorithm and has valid timestamps."""
    if signer.kind not in SIGNER_KINDS:
        raise PackageError(f"signer.kind {signer.kind!r} is not one of {SIGNER_KINDS}")
    for key in signer.keys:
        if key.algorithm not in ALGORITHMS:
            raise PackageError(f"signer key {key.kid!r}: unknown algorithm {key.algorithm!r}")
        _require_time(key.created_at, f"signer key {key.kid!r} created_at")
        if key.retired_at is not None:
            _require_time(key.retired_at, f"signer key {key.kid!r} retired_at")


def _validate_batches(batches: list[PackageBatch]) -> None:
    """Each batch well-formed; batches listed in strictly increasing log_index order."""
    previous = -1
    for batch in batches:
        where = f"batch at log index {batch.log_index}"
        if batch.log_index <= previous:
            raise PackageError(f"{where}: batches must be in strictly increasing log_index order")
        previous = batch.log_index
        signature_bytes(batch.signature)
        if not all(is_hash_hex(node) for node in batch.log_proof):
            raise PackageError(f"{where}: log_proof holds something other than 64-hex hashes")
        if batch.role == "member" and not batch.entries:
            raise PackageError(f"{where}: a member batch must list its entries")
        if batch.role != "member" and batch.entries:
            raise PackageError(f"{where}: a {batch.role!r} boundary batch must not list entries")
        for entry in batch.entries:
            _validate_entry(entry, where)


def _validate_entry(entry: PackageEntry, where: str) -> None:
    """A positive seq, a journal id and well-formed hashes."""
    if entry.seq < 1 or not entry.journal_id:
        raise PackageError(f"{where}: entry seq {entry.seq} / journal {entry.journal_id!r} is invalid")
    if not is_hash_hex(entry.hash):
        raise PackageError(f"{where}: entry seq {entry.seq} hash is not 64 lowercase hex")
    if entry.prev_hash is not None and not is_hash_hex(entry.prev_hash):
        raise PackageError(f"{where}: entry seq {entry.seq} prev_hash is not 64 lowercase hex")


def _validate_journals(journals: list[PackageJournal]) -> None:
    """Non-empty ids and bodies, listed in strictly increasing journal_id order (so no duplicates)."""
    previous: str | None = None
    for journal in journals:
        if not journal.journal_id or not journal.body:
            raise PackageError(f"journal {journal.journal_id!r}: empty journal_id or body")
        if previous is not None and journal.journal_id <= previous:
            raise PackageError(
                f"journal {journal.journal_id!r}: journals must be sorted by id, no duplicates"
            )
        previous = journal.journal_id


def build_package(
    *,
    proof_id: str,
    generated_at: str,
    range: Range | Mapping[str, Any],
    signer_kind: str,
    keys: Sequence[PublicKey | KeyInfo],
    checkpoint_statement: dict[str, Any],
    checkpoint_signature: bytes,
    batches: list[BatchInput],
    journals: Mapping[str, bytes],
    hash_alg: str = HASH_ALG,
) -> ProofPackage:
    """Assemble a package from server-side values; `PackageError` if the result would be malformed.

    `hash_alg` is the ledger's algorithm (journal hashes and Merkle trees): "sha256" or "blake3".

    Batches are ordered by log index and journals by id. Every journal named by a member entry must
    be in `journals` and nothing else may be. The result is round-tripped through `decode_package`,
    so a package this returns always decodes.
    """
    package = ProofPackage(
        format=FORMAT,
        proof_id=proof_id,
        generated_at=generated_at,
        hash_alg=hash_alg,
        range=_range_of(range),
        signer=SignerInfo(kind=signer_kind, keys=[_key_info(k) for k in keys]),
        checkpoint=SignedCheckpoint(
            statement=dict(checkpoint_statement), signature=b64(checkpoint_signature)
        ),
        batches=[_package_batch(b) for b in sorted(batches, key=lambda b: b.log_index)],
        journals=_package_journals(batches, journals),
    )
    return decode_package(encode_package(package))


def _range_of(value: Range | Mapping[str, Any]) -> Range:
    """A `Range` from a `Range` or a plain mapping with the same keys."""
    if isinstance(value, Range):
        return value
    try:
        return msgspec.convert(dict(value), type=Range)
    except (msgspec.ValidationError, TypeError, ValueError) as exc:
        raise PackageError(f"invalid range {value!r}: {exc}") from exc


def _key_info(key: PublicKey | KeyInfo) -> KeyInfo:
    """The package form of a published key."""
    if isinstance(key, KeyInfo):
        return key
    return KeyInfo(key.kid, key.algorithm, key.pem, key.created_at, key.retired_at)


def _package_batch(batch: BatchInput) -> PackageBatch:
    """The package form of one batch (hex hashes, base64 signature)."""
    if batch.role not in ROLES:
        raise PackageError(f"batch at log index {batch.log_index}: unknown role {batch.role!r}")
    role: Role = "member" if batch.role == "member" else "before" if batch.role == "before" else "after"
    return PackageBatch(
        statement=dict(batch.statement),
        signature=b64(batch.signature),
        log_index=batch.log_index,
        log_proof=[node.hex() for node in batch.log_proof],
        role=role,
        entries=[
            PackageEntry(seq, jid, h.hex(), None if prev is None else prev.hex())
            for seq, jid, h, prev in batch.entries
        ],
    )


def _package_journals(batches: list[BatchInput], journals: Mapping[str, bytes]) -> list[PackageJournal]:
    """One body per distinct journal of the member batches, sorted by id; exact match required."""
    wanted = {jid for b in batches if b.role == "member" for _, jid, _, _ in b.entries}
    missing, extra = sorted(wanted - set(journals)), sorted(set(journals) - wanted)
    if missing or extra:
        raise PackageError(f"journal bodies do not match member entries: missing {missing}, extra {extra}")
    out = []
    for jid in sorted(wanted):
        try:
            out.append(PackageJournal(journal_id=jid, body=journals[jid].decode("utf-8")))
        except UnicodeDecodeError as exc:
            raise PackageError(f"journal {jid!r}: body is not UTF-8") from exc
    return out
