"""The offline verifier of proof packages: needs only the package bytes and trusted public keys.

`verify_package` runs every check of docs/proofs.md ("Verifying a package") in order and records each
outcome; it never raises on untrusted input and fails closed: the report is ok only if at least one
check ran and every check passed. Pure: no I/O, no clock; imports only `cryptography` and `msgspec`
through `signer.keys`, `signer.merkle`, `signer.canonical` and `signer.package`.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, NamedTuple

import msgspec
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from ledger.timestamps import parse_rfc3339
from signer.canonical import PostedJournal, journal_digest
from signer.keys import ECDSA_P256, ED25519, kid_for_der, verify_signature
from signer.merkle import leaf_hash, root_from_leaf_hashes, verify_inclusion
from signer.package import (
    SIGNER_KINDS,
    PackageBatch,
    PackageError,
    ProofPackage,
    decode_package,
    is_hash_hex,
    signature_bytes,
)
from signer.statements import BATCH_TYPE, CHECKPOINT_TYPE, ORIGIN, statement_digest

BATCH_FIELDS: Final = frozenset(
    {"type", "shard", "batch_seq", "first_seq", "last_seq", "size", "hash_alg", "root"}
    | {"signed_at", "signer_kid", "signer"}
)
CHECKPOINT_FIELDS: Final = frozenset(
    {"type", "origin", "tree_size", "root", "hash_alg", "timestamp", "signer_kid", "signer", "shards"}
)
INT64_MAX: Final = 2**63 - 1
SOFTWARE_WARNING: Final = (
    "SIGNER IS 'software': statements were signed with a development key held in process memory or a "
    "file, not in an HSM; anyone with access to that key could have forged them"
)


class Check(NamedTuple):
    """One verification step: its name, whether it passed, and what was found."""

    name: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class VerifyReport:
    """The verdict: ok only if every check passed; the first bad journal when one is to blame."""

    ok: bool
    checks: list[Check]
    first_bad_journal: str | None
    warnings: list[str]
    counts: dict[str, int]
    signer_kind: str | None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form of the report."""
        return {
            "ok": self.ok,
            "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in self.checks],
            "first_bad_journal": self.first_bad_journal,
            "warnings": list(self.warnings),
            "counts": dict(self.counts),
            "signer_kind": self.signer_kind,
        }


@dataclass(frozen=True)
class TrustedKey:
    """A public key the auditor trusts, with the kid and algorithm derived from it."""

    kid: str
    algorithm: str
    pem: str


@dataclass(frozen=True)
class BatchStatement:
    """A validated batch statement (the dict it came from is what the signature covers)."""

    shard: int
    batch_seq: int
    first_seq: int
    last_seq: int
    root: bytes
    signed_at: datetime
    signer_kid: str
    signer: str


@dataclass(frozen=True)
class CheckpointStatement:
    """A validated checkpoint statement; `shards` maps shard -> (last batch_seq, last seq)."""

    tree_size: int
    root: bytes
    signer_kid: str
    signer: str
    shards: dict[int, tuple[int, int]]


@dataclass(frozen=True)
class _Batch:
    """A package batch whose statement is well-formed."""

    raw: PackageBatch
    stmt: BatchStatement

    @property
    def name(self) -> str:
        """How the batch is named in findings."""
        return f"batch {self.stmt.shard}/{self.stmt.batch_seq} (log {self.raw.log_index}, {self.raw.role})"


@dataclass
class _Recorder:
    """Collects checks, warnings and the first journal to blame."""

    checks: list[Check] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    first_bad_journal: str | None = None
    counts: dict[str, int] = field(default_factory=lambda: {"journals": 0, "batches": 0, "shards": 0})
    signer_kind: str | None = None

    def passed(self, name: str, detail: str) -> None:
        """Record a passing check."""
        self.checks.append(Check(name, True, detail))

    def failed(self, name: str, detail: str, journal: str | None = None) -> None:
        """Record a failing check, blaming `journal` if it is the first journal blamed."""
        self.checks.append(Check(name, False, detail))
        if journal is not None and self.first_bad_journal is None:
            self.first_bad_journal = journal

    def record(self, name: str, problems: list[str], success: str) -> bool:
        """One failing check per problem, or one passing check when there is none."""
        for problem in problems:
            self.failed(name, problem)
        if not problems:
            self.passed(name, success)
        return not problems

    def report(self) -> VerifyReport:
        """The final report; fails closed when nothing was checked."""
        ok = bool(self.checks) and all(c.ok for c in self.checks)
        return VerifyReport(
            ok,
            list(self.checks),
            self.first_bad_journal,
            list(self.warnings),
            dict(self.counts),
            self.signer_kind,
        )


def load_trusted_key(pem: str) -> TrustedKey:
    """A trusted key from PEM SubjectPublicKeyInfo text; `ValueError` if it is not P-256 or Ed25519."""
    try:
        key = serialization.load_pem_public_key(pem.encode("ascii"))
    except (ValueError, TypeError, UnsupportedAlgorithm, UnicodeError) as exc:
        raise ValueError(f"not a PEM public key: {exc}") from exc
    if isinstance(key, ed25519.Ed25519PublicKey):
        algorithm = ED25519
    elif isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        algorithm = ECDSA_P256
    else:
        raise ValueError("public key is neither EC P-256 nor Ed25519")
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return TrustedKey(kid_for_der(algorithm, der), algorithm, pem)


def verify_package(data: bytes, public_keys: list[str]) -> VerifyReport:
    """Verify a proof package against the PEM public keys the auditor trusts. Never raises."""
    rec = _Recorder()
    try:
        _verify(data, public_keys, rec)
    except Exception as exc:  # a verifier bug must still fail closed, never pass or crash
        rec.failed("internal error", f"verification aborted: {type(exc).__name__}: {exc}")
    return rec.report()


def _verify(data: bytes, public_keys: list[str], rec: _Recorder) -> None:
    """All checks, in the documented order."""
    trusted = _trusted_keys(public_keys, rec)
    try:
        package = decode_package(data)
    except PackageError as exc:
        rec.failed("decode", str(exc))
        return
    rec.passed("decode", _describe(package))
    checkpoint = _check_checkpoint(package, trusted, rec)
    _check_signer(package, checkpoint, rec)
    batches = _check_batches(package, trusted, checkpoint, rec)
    rec.counts = {
        "journals": len(package.journals),
        "batches": len(package.batches),
        "shards": len({b.stmt.shard for b in batches}),
    }
    _check_members(package, batches, rec)
    _check_range(package, batches, checkpoint, rec)


def _describe(package: ProofPackage) -> str:
    """One-line summary of a decoded package."""
    rng = package.range
    span = f"{rng.from_ts} .. {rng.to_ts}" if rng.is_time else f"log index {rng.from_index} .. {rng.to_index}"
    return (
        f"{package.format} {package.proof_id!r}: range {span}, {len(package.batches)} batches, "
        f"{len(package.journals)} journals"
    )


def _trusted_keys(public_keys: list[str], rec: _Recorder) -> dict[str, TrustedKey]:
    """Parse the trusted keys by kid; an unusable key is a failed check (fail closed)."""
    trusted: dict[str, TrustedKey] = {}
    problems = []
    for number, pem in enumerate(public_keys if isinstance(public_keys, list) else [], start=1):
        try:
            key = load_trusted_key(pem)
        except (ValueError, AttributeError) as exc:
            problems.append(f"public key #{number}: {exc}")
            continue
        trusted[key.kid] = key
    if not trusted and not problems:
        problems.append("no trusted public key given")
    rec.record("trusted keys", problems, f"{len(trusted)} key(s): {', '.join(sorted(trusted))}")
    return trusted


# --- statements ------------------------------------------------------------------------------------


def _int(value: object, low: int = 0) -> bool:
    """A plain int (not bool) in [low, INT64_MAX]."""
    return type(value) is int and low <= value <= INT64_MAX


def parse_batch_statement(stmt: dict[str, Any], hash_alg: str = "sha256") -> BatchStatement | str:
    """A validated batch statement (of a ledger hashing with `hash_alg`), or what is wrong with it."""
    if set(stmt) != BATCH_FIELDS:
        return f"fields {sorted(stmt)} differ from {sorted(BATCH_FIELDS)}"
    if stmt["type"] != BATCH_TYPE or stmt["hash_alg"] != hash_alg:
        return f"type {stmt['type']!r} / hash_alg {stmt['hash_alg']!r} is not {BATCH_TYPE} / {hash_alg}"
    shard, first, last = stmt["shard"], stmt["first_seq"], stmt["last_seq"]
    if not (type(shard) is int and -INT64_MAX <= shard <= INT64_MAX and _int(stmt["batch_seq"], 1)):
        return "shard / batch_seq is not an integer (batch_seq >= 1)"
    if not (_int(first, 1) and _int(last, 1) and first <= last):
        return "first_seq / last_seq are not integers with 1 <= first_seq <= last_seq"
    if stmt["size"] != last - first + 1 or type(stmt["size"]) is not int:
        return f"size {stmt['size']!r} != last_seq - first_seq + 1 = {last - first + 1}"
    signed_at = parse_rfc3339(stmt["signed_at"]) if isinstance(stmt["signed_at"], str) else None
    common = _common_fields(stmt["root"], stmt["signer_kid"], stmt["signer"])
    if common or signed_at is None:
        return common or f"signed_at {stmt['signed_at']!r} is not RFC 3339"
    return BatchStatement(
        shard,
        stmt["batch_seq"],
        first,
        last,
        bytes.fromhex(stmt["root"]),
        signed_at,
        stmt["signer_kid"],
        stmt["signer"],
    )


def _common_fields(root: object, kid: object, signer: object) -> str | None:
    """Problems with the root / signer_kid / signer fields shared by both statement types."""
    if not is_hash_hex(root):
        return f"root {root!r:.80} is not 64 lowercase hex"
    if not isinstance(kid, str) or not kid:
        return "signer_kid is not a non-empty string"
    if signer not in SIGNER_KINDS:
        return f"signer {signer!r:.40} is not one of {SIGNER_KINDS}"
    return None


def parse_checkpoint_statement(stmt: dict[str, Any], hash_alg: str = "sha256") -> CheckpointStatement | str:
    """A validated checkpoint statement (of a ledger hashing with `hash_alg`), or what is wrong with it."""
    if set(stmt) != CHECKPOINT_FIELDS:
        return f"fields {sorted(stmt)} differ from {sorted(CHECKPOINT_FIELDS)}"
    if (stmt["type"], stmt["origin"], stmt["hash_alg"]) != (CHECKPOINT_TYPE, ORIGIN, hash_alg):
        return f"type/origin/hash_alg are not {CHECKPOINT_TYPE} / {ORIGIN} / {hash_alg}"
    if not _int(stmt["tree_size"], 1):
        return f"tree_size {stmt['tree_size']!r:.40} is not a positive integer"
    if not isinstance(stmt["timestamp"], str) or parse_rfc3339(stmt["timestamp"]) is None:
        return f"timestamp {stmt['timestamp']!r:.80} is not RFC 3339"
    common = _common_fields(stmt["root"], stmt["signer_kid"], stmt["signer"])
    shards = _parse_shards(stmt["shards"])
    if common or isinstance(shards, str):
        return common or str(shards)
    return CheckpointStatement(
        stmt["tree_size"], bytes.fromhex(stmt["root"]), stmt["signer_kid"], stmt["signer"], shards
    )


def _parse_shards(value: object) -> dict[int, tuple[int, int]] | str:
    """The checkpoint's `shards` map ({"<shard>": {"batch_seq", "last_seq"}}), or a problem."""
    if not isinstance(value, dict):
        return "shards is not an object"
    out: dict[int, tuple[int, int]] = {}
    for key, item in value.items():
        try:
            shard = int(key)
        except ValueError:
            return f"shards key {key!r:.40} is not an integer"
        if str(shard) != key or not isinstance(item, dict) or set(item) != {"batch_seq", "last_seq"}:
            return f"shards[{key!r:.40}] is not {{batch_seq, last_seq}} under a canonical integer key"
        if not (_int(item["batch_seq"]) and _int(item["last_seq"])):
            return f"shards[{key!r}] holds non-integer or negative values"
        out[shard] = (item["batch_seq"], item["last_seq"])
    return out


def _check_signature(
    name: str, stmt: dict[str, Any], signature: str, kid: str, trusted: dict[str, TrustedKey], rec: _Recorder
) -> bool:
    """Check a statement's signature by the trusted key whose kid is the statement's signer_kid."""
    key = trusted.get(kid)
    if key is None:
        rec.failed(name, f"signed by {kid!r}, which is not among the trusted keys {sorted(trusted)}")
        return False
    try:
        raw = signature_bytes(signature)
    except PackageError as exc:
        rec.failed(name, str(exc))
        return False
    if not verify_signature(key.pem, key.algorithm, statement_digest(stmt), raw):
        rec.failed(name, f"signature does not verify under {kid} ({key.algorithm})")
        return False
    rec.passed(name, f"valid {key.algorithm} signature by {kid}")
    return True


def _check_checkpoint(
    package: ProofPackage, trusted: dict[str, TrustedKey], rec: _Recorder
) -> CheckpointStatement | None:
    """The checkpoint statement's format and its signature; None if the statement is unusable."""
    stmt = package.checkpoint.statement
    parsed = parse_checkpoint_statement(stmt, package.hash_alg)
    if isinstance(parsed, str):
        rec.failed("checkpoint statement", parsed)
        return None
    detail = f"tree_size {parsed.tree_size}, root {parsed.root.hex()}, {len(parsed.shards)} shard(s)"
    rec.passed("checkpoint statement", detail)
    _check_signature(
        "checkpoint signature", stmt, package.checkpoint.signature, parsed.signer_kid, trusted, rec
    )
    return parsed


def _check_signer(package: ProofPackage, checkpoint: CheckpointStatement | None, rec: _Recorder) -> None:
    """signer.kind matches the signed checkpoint; listed keys are self-consistent; software warns."""
    kind = package.signer.kind
    rec.signer_kind = kind
    problems = (
        []
        if checkpoint is None or checkpoint.signer == kind
        else [f"package says signer {kind!r} but the signed checkpoint says {checkpoint.signer!r}"]
    )
    for key in package.signer.keys:
        try:
            derived = load_trusted_key(key.pem)
        except ValueError as exc:
            problems.append(f"listed key {key.kid!r}: {exc}")
            continue
        if (derived.kid, derived.algorithm) != (key.kid, key.algorithm):
            problems.append(
                f"listed key {key.kid!r} ({key.algorithm}) is really {derived.kid} ({derived.algorithm})"
            )
    used = {str(s["signer_kid"]) for s in _statements(package) if isinstance(s.get("signer_kid"), str)}
    listed = {k.kid for k in package.signer.keys}
    problems += [
        f"statements are signed by {kid!r}, not listed in signer.keys" for kid in sorted(used - listed)
    ]
    rec.record("signer", problems, f"kind {kind}, {len(listed)} listed key(s) consistent with their PEMs")
    if kind == "software" or any(s.get("signer") == "software" for s in _statements(package)):
        rec.warnings.append(SOFTWARE_WARNING)


def _statements(package: ProofPackage) -> list[dict[str, Any]]:
    """Every signed statement in the package, checkpoint first."""
    return [package.checkpoint.statement, *(b.statement for b in package.batches)]


def _check_batches(
    package: ProofPackage,
    trusted: dict[str, TrustedKey],
    checkpoint: CheckpointStatement | None,
    rec: _Recorder,
) -> list[_Batch]:
    """Each batch: statement format, signature, inclusion in the checkpoint's log. Returns the parsable."""
    parsed: list[_Batch] = []
    for raw in package.batches:
        stmt = parse_batch_statement(raw.statement, package.hash_alg)
        if isinstance(stmt, str):
            rec.failed(f"batch (log {raw.log_index}) statement", stmt)
            continue
        batch = _Batch(raw, stmt)
        parsed.append(batch)
        _check_signature(
            f"{batch.name} signature", raw.statement, raw.signature, stmt.signer_kid, trusted, rec
        )
    for batch in parsed:
        _check_inclusion(batch, checkpoint, package.hash_alg, rec)
    return parsed


def _check_inclusion(batch: _Batch, checkpoint: CheckpointStatement | None, alg: str, rec: _Recorder) -> None:
    """RFC 9162 inclusion (tree hashed with `alg`) of leaf_hash(SHA-256 statement digest) at log_index."""
    name = f"{batch.name} log inclusion"
    if checkpoint is None:
        rec.failed(name, "no usable checkpoint to check against")
        return
    raw = batch.raw
    proof = [bytes.fromhex(node) for node in raw.log_proof]
    leaf = leaf_hash(statement_digest(raw.statement), alg)
    if verify_inclusion(leaf, raw.log_index, checkpoint.tree_size, proof, checkpoint.root, alg):
        rec.passed(name, f"leaf {raw.log_index} of {checkpoint.tree_size} ({len(proof)} proof hashes)")
    else:
        rec.failed(
            name, f"proof does not place this statement at index {raw.log_index} of {checkpoint.tree_size}"
        )


# --- member batches: entries and journals ----------------------------------------------------------


def _check_members(package: ProofPackage, batches: list[_Batch], rec: _Recorder) -> None:
    """Journal bodies against entry hashes, seq coverage, prev_hash links and batch Merkle roots."""
    bodies = {j.journal_id: j.body.encode("utf-8") for j in package.journals}
    alg = package.hash_alg
    body_hash = {jid: journal_digest(body, alg).hex() for jid, body in bodies.items()}
    members = sorted(
        (b for b in batches if b.raw.role == "member"), key=lambda b: (b.stmt.shard, b.stmt.batch_seq)
    )
    last_hash = {(b.stmt.shard, b.stmt.batch_seq): b.raw.entries[-1].hash for b in members}
    referenced: set[str] = set()
    for batch in members:
        referenced.update(e.journal_id for e in batch.raw.entries)
        _check_bodies(batch, bodies, body_hash, alg, rec)
        if _check_coverage(batch, rec):
            _check_links(batch, last_hash.get((batch.stmt.shard, batch.stmt.batch_seq - 1)), rec)
        _check_root(batch, alg, rec)
    for jid in sorted(set(bodies) - referenced):
        rec.failed(f"journal {jid}", "body is in the package but no member entry names it", jid)


def _check_bodies(
    batch: _Batch, bodies: dict[str, bytes], body_hash: dict[str, str], alg: str, rec: _Recorder
) -> None:
    """Every entry's journal body is present, hashes to the entry hash and is that journal."""
    bad = 0
    for entry in batch.raw.entries:
        jid = entry.journal_id
        where = f"entry {batch.stmt.shard}/{entry.seq}"
        problem: str | None
        if jid not in bodies:
            problem = f"{where}: the body of journal {jid} is missing from the package"
        elif body_hash[jid] != entry.hash:
            name = "SHA-256" if alg == "sha256" else alg
            problem = f"{where}: {name} of the body is {body_hash[jid]}, the entry says {entry.hash}"
        else:
            problem = _body_identity(bodies[jid], jid, batch.stmt.shard)
        if problem:
            bad += 1
            rec.failed(f"journal {jid}", problem, jid)
    if not bad:
        rec.passed(f"{batch.name} journals", f"{len(batch.raw.entries)} bodies hash to their entries")


def _body_identity(body: bytes, jid: str, shard: int) -> str | None:
    """For ledger shards (id >= 0): the body is a posted journal with this journal_id."""
    if shard < 0:
        return None
    try:
        journal = msgspec.json.decode(body, type=PostedJournal)
    except (msgspec.DecodeError, RecursionError) as exc:
        return f"body is not a posted journal: {exc}"
    if journal.journal_id != jid:
        return f"body is journal {journal.journal_id!r}, not {jid!r}"
    return None


def _check_coverage(batch: _Batch, rec: _Recorder) -> bool:
    """Entries are exactly seq first_seq..last_seq, in order, no gap or duplicate."""
    stmt, entries = batch.stmt, batch.raw.entries
    for position, entry in enumerate(entries):
        expected = stmt.first_seq + position
        if entry.seq != expected:
            rec.failed(
                f"{batch.name} entries", f"position {position}: expected seq {expected}, found {entry.seq}"
            )
            return False
    if len(entries) != stmt.last_seq - stmt.first_seq + 1:
        rec.failed(
            f"{batch.name} entries", f"{len(entries)} entries for seq {stmt.first_seq}..{stmt.last_seq}"
        )
        return False
    rec.passed(f"{batch.name} entries", f"seq {stmt.first_seq}..{stmt.last_seq} complete, in order")
    return True


def _check_links(batch: _Batch, previous_last: str | None, rec: _Recorder) -> None:
    """prev_hash of each entry is the previous entry's hash (null at seq 1)."""
    entries, bad = batch.raw.entries, 0
    for position, entry in enumerate(entries):
        if position > 0:
            expected: str | None = entries[position - 1].hash
        elif entry.seq == 1:
            expected = None
        elif previous_last is None:
            # the link into the first member batch of a shard points at an entry the package does not
            # carry; completeness there rests on the signed, adjacent "before" batch instead
            if entry.prev_hash is not None:
                continue
            expected = "<the previous entry's hash>"
        else:
            expected = previous_last
        if entry.prev_hash == expected:
            continue
        bad += 1
        want = "null" if expected is None else expected
        rec.failed(
            f"{batch.name} chain",
            f"seq {entry.seq} (journal {entry.journal_id}): prev_hash {entry.prev_hash}, expected {want}",
            entry.journal_id,
        )
    if not bad:
        rec.passed(f"{batch.name} chain", "prev_hash links hold")


def _check_root(batch: _Batch, alg: str, rec: _Recorder) -> None:
    """The RFC 9162 root (hashed with `alg`) over the entries' journal hashes equals the signed root."""
    leaves = [leaf_hash(bytes.fromhex(e.hash), alg) for e in batch.raw.entries]
    computed = root_from_leaf_hashes(leaves, alg)
    if computed == batch.stmt.root:
        rec.passed(f"{batch.name} merkle root", f"{len(leaves)} leaves -> {computed.hex()}")
    else:
        rec.failed(
            f"{batch.name} merkle root", f"computed {computed.hex()}, statement says {batch.stmt.root.hex()}"
        )


# --- completeness of the range ---------------------------------------------------------------------


def _check_range(
    package: ProofPackage, batches: list[_Batch], checkpoint: CheckpointStatement | None, rec: _Recorder
) -> None:
    """Per shard: consecutive members, adjacent boundaries, consistency with the checkpoint's shards."""
    if checkpoint is None:
        rec.failed("range", "no usable checkpoint: completeness cannot be shown")
        return
    if len(batches) != len(package.batches):
        rec.failed("range", "some batch statements are malformed: completeness cannot be shown")
        return
    by_shard: dict[int, list[_Batch]] = defaultdict(list)
    for batch in batches:
        by_shard[batch.stmt.shard].append(batch)
    if package.range.is_time:
        shards = sorted(set(by_shard) | {s for s, (last, _) in checkpoint.shards.items() if last > 0})
        for shard in shards:
            _check_time_shard(package, shard, by_shard.get(shard, []), checkpoint, rec)
    else:
        _check_index_range(package, batches, rec)
        for shard in sorted(by_shard):
            _check_index_shard(shard, by_shard[shard], checkpoint, rec)


def _check_index_range(package: ProofPackage, batches: list[_Batch], rec: _Recorder) -> None:
    """An index range holds exactly the member batches at from_index..to_index."""
    lo, hi = package.range.from_index or 0, package.range.to_index or 0
    problems = [
        f"{b.name}: an index range has member batches only" for b in batches if b.raw.role != "member"
    ]
    present = [b.raw.log_index for b in batches]
    if present != list(range(lo, hi + 1)):
        missing = sorted(set(range(lo, min(hi, lo + len(present) + 1) + 1)) - set(present))[:5]
        problems.append(f"log indexes {lo}..{hi} are not all present exactly once (e.g. missing {missing})")
    rec.record("range", problems, f"every batch at log index {lo}..{hi} is present")


def _check_index_shard(
    shard: int, batches: list[_Batch], checkpoint: CheckpointStatement, rec: _Recorder
) -> None:
    """Within an index range, a shard's batches are consecutive and within the checkpoint."""
    ordered = sorted(batches, key=lambda b: b.stmt.batch_seq)
    problems = _against_checkpoint(shard, ordered, checkpoint) + _consecutive(ordered)
    rec.record(f"shard {shard}", problems, f"batches {_span(ordered)} consecutive, within the checkpoint")


def _span(batches: list[_Batch]) -> str:
    """'a..b' of the batch_seqs of a non-empty sorted list, or 'none'."""
    return f"{batches[0].stmt.batch_seq}..{batches[-1].stmt.batch_seq}" if batches else "none"


def _against_checkpoint(shard: int, batches: list[_Batch], checkpoint: CheckpointStatement) -> list[str]:
    """The shard is in the checkpoint and no batch goes beyond its last batch there."""
    if shard not in checkpoint.shards:
        return [f"shard {shard} is not in the checkpoint's shards"]
    last_batch, last_seq = checkpoint.shards[shard]
    problems = []
    for b in batches:
        if b.stmt.batch_seq > last_batch:
            problems.append(f"{b.name} is beyond the checkpoint's last batch {last_batch} for the shard")
        elif b.stmt.batch_seq == last_batch and b.stmt.last_seq != last_seq:
            problems.append(f"{b.name} ends at seq {b.stmt.last_seq}, the checkpoint says {last_seq}")
    return problems


def _consecutive(ordered: list[_Batch]) -> list[str]:
    """Neighbours in the list are batch_seq n, n+1 with adjacent seq ranges and increasing signed_at."""
    problems = []
    for prev, nxt in itertools.pairwise(ordered):
        p, n = prev.stmt, nxt.stmt
        if n.batch_seq != p.batch_seq + 1 or n.first_seq != p.last_seq + 1:
            problems.append(f"{nxt.name} does not follow {prev.name} (gap or overlap in batch_seq / seq)")
        elif n.signed_at <= p.signed_at:
            problems.append(f"{nxt.name} is not signed after {prev.name}")
    return problems


def _check_time_shard(
    package: ProofPackage, shard: int, batches: list[_Batch], checkpoint: CheckpointStatement, rec: _Recorder
) -> None:
    """A time range: members inside, boundaries outside and adjacent, nothing missing at either end."""
    start = parse_rfc3339(package.range.from_ts or "")
    end = parse_rfc3339(package.range.to_ts or "")
    if start is None or end is None:
        rec.failed(f"shard {shard}", "time range is unreadable")
        return
    roles = {
        role: sorted((b for b in batches if b.raw.role == role), key=lambda b: b.stmt.batch_seq)
        for role in ("before", "member", "after")
    }
    problems = _against_checkpoint(shard, batches, checkpoint)
    problems += [
        f"shard {shard} has {len(roles[r])} {r!r} batches (at most one)"
        for r in ("before", "after")
        if len(roles[r]) > 1
    ]
    problems += _outside(roles, start, end)
    if not problems:
        last_batch = checkpoint.shards[shard][0]
        before = roles["before"][0] if roles["before"] else None
        after = roles["after"][0] if roles["after"] else None
        problems = _ends(shard, before, roles["member"], after, last_batch)
    summary = (
        f"members {_span(roles['member'])}; before {_span(roles['before'])}; after {_span(roles['after'])}"
    )
    rec.record(f"shard {shard}", problems, f"complete for the range: {summary}")


def _outside(roles: dict[str, list[_Batch]], start: datetime, end: datetime) -> list[str]:
    """Members are signed within [start, end], 'before' batches earlier and 'after' batches later."""
    problems = [
        f"{b.name} signed at {b.stmt.signed_at.isoformat()} is outside the range"
        for b in roles["member"]
        if not start <= b.stmt.signed_at <= end
    ]
    problems += [
        f"{b.name} is not signed before the range" for b in roles["before"] if not b.stmt.signed_at < start
    ]
    problems += [
        f"{b.name} is not signed after the range" for b in roles["after"] if not b.stmt.signed_at > end
    ]
    return problems


def _ends(
    shard: int, before: _Batch | None, members: list[_Batch], after: _Batch | None, last_batch: int
) -> list[str]:
    """The shard's batches form one consecutive run: [before] members [after], ending where required."""
    run = [b for b in (before, *members, after) if b is not None]
    problems = _consecutive(run)
    if not run:
        return [f"shard {shard} has {last_batch} batch(es) in the checkpoint but none in the package"]
    first, last = run[0].stmt.batch_seq, run[-1].stmt.batch_seq
    if before is None and first != 1:
        problems.append(f"shard {shard}: batch {first - 1} (just before the range) is missing")
    if after is None and last != last_batch:
        problems.append(f"shard {shard}: batch {last + 1} (just after the range) is missing")
    return problems
