"""Synthetic signed ledgers and proof packages for tests (no database, no Ray).

`make_ledger` posts N journals over S shards (some cross-shard: the same journal, with the same hash,
is an entry in two shards' chains), groups each shard's chain into batches, signs every batch
statement with a `SoftwareKeyBackend(None)`, appends the batches to a `MerkleLog` in signing order and
signs a checkpoint over the whole log. `SyntheticLedger.package_for_time_range` and
`package_for_index_range` select batches exactly as docs/proofs.md specifies and call
`signer.package.build_package`, so they double as a reference for the server's selection.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from ledger.timestamps import parse_rfc3339, rfc3339
from signer.canonical import HASH_ALG, PostedJournal, PostedLine, canonical, journal_digest
from signer.keys import ECDSA_P256, PublicKey, SoftwareKeyBackend
from signer.merkle import MerkleLog, leaf_hash, root_from_leaf_hashes
from signer.package import BatchInput, ProofPackage, encode_package, index_range, time_range
from signer.package import build_package as _build_package
from signer.statements import batch_statement, checkpoint_statement, statement_digest

BASE_TIME = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
GENERATED_AT = "2024-06-01T00:00:00.000000Z"

Entry = tuple[int, str, bytes, bytes | None]


@dataclass
class LedgerBatch:
    """One signed shard batch and its place in the log."""

    shard: int
    batch_seq: int
    entries: list[Entry]
    statement: dict[str, Any]
    signature: bytes
    log_index: int = -1

    @property
    def signed_at(self) -> datetime:
        """When the batch statement was signed."""
        moment = parse_rfc3339(self.statement["signed_at"])
        assert moment is not None
        return moment


@dataclass
class SyntheticLedger:
    """A signed ledger: journal bodies, batches in log order, the log and a signed checkpoint."""

    journals: dict[str, bytes]
    batches: list[LedgerBatch]
    log: MerkleLog
    checkpoint_statement: dict[str, Any]
    checkpoint_signature: bytes
    keys: list[PublicKey]
    signer_kind: str = "software"
    journal_times: dict[str, datetime] = field(default_factory=dict)
    hash_alg: str = HASH_ALG

    def public_pems(self) -> list[str]:
        """PEM of every signing key (rotated ones included)."""
        return [k.pem for k in self.keys]

    def shard_batches(self, shard: int) -> list[LedgerBatch]:
        """The batches of one shard in batch_seq order."""
        return sorted((b for b in self.batches if b.shard == shard), key=lambda b: b.batch_seq)

    def shards(self) -> list[int]:
        """Every shard that has a batch."""
        return sorted({b.shard for b in self.batches})

    def select_time_range(self, from_ts: str, to_ts: str) -> list[tuple[LedgerBatch, str]]:
        """(batch, role) for a time range, per docs/proofs.md "Range semantics"."""
        start, end = parse_rfc3339(from_ts), parse_rfc3339(to_ts)
        assert start is not None and end is not None
        chosen: list[tuple[LedgerBatch, str]] = []
        for shard in self.shards():
            run = self.shard_batches(shard)
            members = [b for b in run if start <= b.signed_at <= end]
            earlier = [b for b in run if b.signed_at < start]
            later = [b for b in run if b.signed_at > end]
            chosen += [(b, "member") for b in members]
            if earlier:
                chosen.append((earlier[-1], "before"))
            if later:
                chosen.append((later[0], "after"))
        return chosen

    def package(self, selection: list[tuple[LedgerBatch, str]], rng: Any, proof_id: str) -> ProofPackage:
        """Build a package from a (batch, role) selection."""
        size = self.log.size
        inputs = [
            BatchInput(
                statement=b.statement,
                signature=b.signature,
                log_index=b.log_index,
                log_proof=self.log.inclusion_proof(b.log_index, size),
                role=role,
                entries=list(b.entries) if role == "member" else [],
            )
            for b, role in selection
        ]
        wanted = {jid for b, role in selection if role == "member" for _, jid, _, _ in b.entries}
        return _build_package(
            proof_id=proof_id,
            generated_at=GENERATED_AT,
            range=rng,
            signer_kind=self.signer_kind,
            keys=self.keys,
            checkpoint_statement=self.checkpoint_statement,
            checkpoint_signature=self.checkpoint_signature,
            batches=inputs,
            journals={jid: self.journals[jid] for jid in wanted},
            hash_alg=self.hash_alg,
        )

    def package_for_time_range(self, from_ts: str, to_ts: str, proof_id: str = "prf-time") -> ProofPackage:
        """A package proving every batch signed within [from_ts, to_ts]."""
        return self.package(self.select_time_range(from_ts, to_ts), time_range(from_ts, to_ts), proof_id)

    def package_for_index_range(self, lo: int, hi: int, proof_id: str = "prf-index") -> ProofPackage:
        """A package proving the batches at log indexes lo..hi."""
        selection = [(b, "member") for b in self.batches if lo <= b.log_index <= hi]
        return self.package(selection, index_range(lo, hi), proof_id)

    def middle_time_range(self) -> tuple[str, str]:
        """A time range covering roughly the middle third of the batches (by signing time)."""
        times = sorted(b.signed_at for b in self.batches)
        third = len(times) // 3
        return rfc3339(times[third] - timedelta(milliseconds=1)), rfc3339(
            times[2 * third] + timedelta(milliseconds=1)
        )


def package_bytes(package: ProofPackage) -> bytes:
    """The canonical bytes of a package."""
    return encode_package(package)


def package_dict(package: ProofPackage | bytes) -> dict[str, Any]:
    """A mutable plain-JSON copy of a package (to tamper with in tests)."""
    data = package if isinstance(package, bytes) else encode_package(package)
    value: dict[str, Any] = json.loads(data)
    return value


def dict_bytes(value: dict[str, Any]) -> bytes:
    """Canonical bytes of a (tampered) package dict, as a server would emit them."""
    return canonical(value)


def journal_body(journal_id: str, number: int, posted_at: datetime, shards: list[int]) -> bytes:
    """The canonical body of a synthetic posted journal (unicode meta, nested context, cross-shard)."""
    amount = 100 + number * 7
    accounts = [f"asset:cash:s{shards[0]}", f"liability:customer:{number}"]
    if len(shards) > 1:
        accounts[1] = f"revenue:fees:s{shards[1]}"
    meta: dict[str, Any] = {"note": "caf\u00e9 \u2615 \U0001f4b6"} if number % 3 == 0 else {}
    context: dict[str, Any] = {
        "order": {"id": f"o-{number}", "lines": [1, 2, {"sku": "x\u00f1"}]},
        "n": number,
    }
    journal = PostedJournal(
        journal_id=journal_id,
        entries=[
            PostedLine(account_id=accounts[0], side="debit", amount_cents=amount, currency="USD", meta=meta),
            PostedLine(account_id=accounts[1], side="credit", amount_cents=amount, currency="USD", meta={}),
        ],
        context=context,
        ts=rfc3339(posted_at - timedelta(seconds=1)),
        reverses=None,
        memo=f"synthetic journal {number}" if number % 2 else None,
        source_ref=f"src-{number}",
        posted_by="service:0123456789ab",
        posted_at=rfc3339(posted_at),
    )
    return canonical(journal)


@dataclass
class _ShardState:
    """A shard's chain while the ledger is generated."""

    seq: int = 0
    last_hash: bytes | None = None
    pending: list[Entry] = field(default_factory=list)
    batch_seq: int = 0
    last_seq_signed: int = 0


def _close_batch(
    shard: int, state: _ShardState, signed_at: datetime, backend: SoftwareKeyBackend, alg: str = HASH_ALG
) -> LedgerBatch:
    """Sign the shard's pending entries as its next batch."""
    entries, state.pending = state.pending, []
    state.batch_seq += 1
    root = root_from_leaf_hashes([leaf_hash(h, alg) for _, _, h, _ in entries], alg)
    statement = batch_statement(
        shard=shard,
        batch_seq=state.batch_seq,
        first_seq=entries[0][0],
        last_seq=entries[-1][0],
        hash_alg=alg,
        root=root,
        signed_at=rfc3339(signed_at),
        signer_kid=backend.active_kid(),
        signer=backend.kind,
    )
    kid, signature = backend.sign_digest(statement_digest(statement))
    assert kid == statement["signer_kid"]
    state.last_seq_signed = entries[-1][0]
    return LedgerBatch(shard, state.batch_seq, entries, statement, signature)


def _shards_for(number: int, shards: int, rng: random.Random, quiet: int | None, total: int) -> list[int]:
    """The shard(s) journal `number` posts to; a quiet shard gets every journal of the first and last
    tenth of the run and nothing in between (so a middle time range has no batch of it)."""
    choices = list(range(shards))
    edge = not total // 10 <= number < total - total // 10
    if quiet is not None:
        choices.remove(quiet)
    first = quiet if quiet is not None and edge else rng.choice(choices)
    if number % 5 == 4 and len(choices) > 1:
        return [first, rng.choice([s for s in choices if s != first])]
    return [first]


def make_ledger(
    *,
    journals: int = 40,
    shards: int = 3,
    batch_size: int = 4,
    seed: int = 7,
    rotate_before_checkpoint: bool = False,
    quiet_shard: int | None = None,
    algorithm: str = ECDSA_P256,
    alg: str = HASH_ALG,
) -> SyntheticLedger:
    """Generate, sign and log a synthetic ledger (deterministic except for the keys); `alg` hashes."""
    rng = random.Random(seed)
    backend = SoftwareKeyBackend(None, algorithm)
    states = {s: _ShardState() for s in range(shards)}
    bodies: dict[str, bytes] = {}
    times: dict[str, datetime] = {}
    batches: list[LedgerBatch] = []
    posted = BASE_TIME
    for number in range(journals):
        posted = BASE_TIME + timedelta(seconds=number)
        jid = f"jrn-{number:04d}"
        targets = _shards_for(number, shards, rng, quiet_shard, journals)
        body = journal_body(jid, number, posted, targets)
        bodies[jid], times[jid] = body, posted
        for shard in targets:
            state = states[shard]
            state.seq += 1
            state.pending.append((state.seq, jid, journal_digest(body, alg), state.last_hash))
            state.last_hash = journal_digest(body, alg)
            if len(state.pending) >= batch_size:
                signed_at = posted + timedelta(milliseconds=500 + shard)
                batches.append(_close_batch(shard, state, signed_at, backend, alg))
    for shard, state in states.items():
        if state.pending:
            batches.append(
                _close_batch(shard, state, posted + timedelta(seconds=1, milliseconds=shard), backend, alg)
            )
    return _log_and_checkpoint(batches, states, bodies, times, backend, rotate_before_checkpoint, posted, alg)


def _log_and_checkpoint(
    batches: list[LedgerBatch],
    states: dict[int, _ShardState],
    bodies: dict[str, bytes],
    times: dict[str, datetime],
    backend: SoftwareKeyBackend,
    rotate: bool,
    last: datetime,
    alg: str = HASH_ALG,
) -> SyntheticLedger:
    """Log the batches in signing order and sign a checkpoint over the log (a tree hashed with `alg`)."""
    batches.sort(key=lambda b: (b.signed_at, b.shard, b.batch_seq))
    log = MerkleLog(alg)
    for index, batch in enumerate(batches):
        batch.log_index = index
        log.append(leaf_hash(statement_digest(batch.statement), alg))
    if rotate:
        backend.rotate()
    statement = checkpoint_statement(
        tree_size=log.size,
        root=log.root(),
        hash_alg=alg,
        timestamp=rfc3339(last + timedelta(seconds=5)),
        signer_kid=backend.active_kid(),
        signer=backend.kind,
        shards={s: (st.batch_seq, st.last_seq_signed) for s, st in states.items() if st.batch_seq},
    )
    _, signature = backend.sign_digest(statement_digest(statement))
    return SyntheticLedger(
        bodies, batches, log, statement, signature, backend.public_keys(), backend.kind, times, alg
    )
