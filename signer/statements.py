"""The signed statements: what the signer signs for a shard batch and for a checkpoint.

Both are canonical JSON objects (see `signer.canonical`); a signature is made over the
SHA-256 digest of the statement's canonical bytes, by the key named in `signer_kid`:

* batch statement (one per shard group commit)::

    {"type": "ledger-node/batch/v1", "shard": 1, "batch_seq": 17, "first_seq": 1001,
     "last_seq": 1100, "size": 100, "hash_alg": "sha256", "root": "<hex>",
     "signed_at": "2026-11-22T01:02:03.456789Z", "signer_kid": "p256-...", "signer": "pkcs11"}

  `root` is the RFC 9162 Merkle tree hash over the batch's entries in `seq` order, each leaf's
  data being the 32-byte journal hash of that entry (a cross-shard journal is an entry in every
  participant shard's batch, with the same journal hash).

* checkpoint statement (periodic, over every shard)::

    {"type": "ledger-node/checkpoint/v1", "origin": "ledger-node", "tree_size": 42,
     "root": "<hex>", "hash_alg": "sha256", "timestamp": "...", "signer_kid": "...",
     "signer": "software", "shards": {"0": {"batch_seq": 9, "last_seq": 880}, ...}}

  `root` is the RFC 9162 Merkle tree hash over the log of batches in log order: leaf i's data
  is the SHA-256 digest of batch i's canonical statement bytes (so a leaf commits to the batch
  root and to its shard, range, time and key). `shards` gives every shard's last batch in the
  tree, which lets a verifier prove a range complete at its ends.
"""

from __future__ import annotations

from typing import Any, Final

from signer.canonical import canonical, digest

BATCH_TYPE: Final = "ledger-node/batch/v1"
CHECKPOINT_TYPE: Final = "ledger-node/checkpoint/v1"
ORIGIN: Final = "ledger-node"


def batch_statement(
    *,
    shard: int,
    batch_seq: int,
    first_seq: int,
    last_seq: int,
    hash_alg: str,
    root: bytes,
    signed_at: str,
    signer_kid: str,
    signer: str,
) -> dict[str, Any]:
    """The statement signed for one shard batch."""
    return {
        "type": BATCH_TYPE,
        "shard": shard,
        "batch_seq": batch_seq,
        "first_seq": first_seq,
        "last_seq": last_seq,
        "size": last_seq - first_seq + 1,
        "hash_alg": hash_alg,
        "root": root.hex(),
        "signed_at": signed_at,
        "signer_kid": signer_kid,
        "signer": signer,
    }


def checkpoint_statement(
    *,
    tree_size: int,
    root: bytes,
    hash_alg: str,
    timestamp: str,
    signer_kid: str,
    signer: str,
    shards: dict[int, tuple[int, int]],
) -> dict[str, Any]:
    """The statement signed for a checkpoint; `shards` maps shard -> (last batch_seq, last seq)."""
    return {
        "type": CHECKPOINT_TYPE,
        "origin": ORIGIN,
        "tree_size": tree_size,
        "root": root.hex(),
        "hash_alg": hash_alg,
        "timestamp": timestamp,
        "signer_kid": signer_kid,
        "signer": signer,
        "shards": {str(s): {"batch_seq": b, "last_seq": q} for s, (b, q) in sorted(shards.items())},
    }


def statement_bytes(statement: dict[str, Any]) -> bytes:
    """The canonical bytes of a statement (what its digest is computed over)."""
    return canonical(statement)


def statement_digest(statement: dict[str, Any]) -> bytes:
    """SHA-256 of the canonical bytes: what is signed, and a batch's leaf data in the log."""
    return digest(statement_bytes(statement))
