"""The `audit` block of `GET /ledger/{journal_id}`: chain position, signed batch, proofs (DECISIONS D1).

`signature` signs the batch statement whose `root` is the Merkle root over the batch's journal
hashes; `inclusion_proof` links this journal's hash to that root; when the batch is already in
the global log, `checkpoint` carries the latest signed checkpoint and the log inclusion proof of
the batch statement in it. docs/proofs.md explains how to check each piece.
"""

from __future__ import annotations

import base64
from typing import Any

import asyncpg
import msgspec

from signer.canonical import HASH_ALG
from signer.merkle import inclusion_proof, leaf_hash
from store import repository


def hex_or_none(value: bytes | None) -> str | None:
    """Lower-case hex of bytes, or None."""
    return None if value is None else bytes(value).hex()


def b64(value: bytes) -> str:
    """Standard base64 text."""
    return base64.b64encode(bytes(value)).decode()


async def audit_block(
    conn: asyncpg.Connection, row: Any, signer: Any, hash_alg: str = HASH_ALG
) -> dict[str, Any]:
    """The audit metadata of a stored journal row (see repository.journal_row), in the ledger's `hash_alg`."""
    links = [
        {"shard": int(s), "seq": int(q), "prev_hash": hex_or_none(p)}
        for (s, q), p in zip(row["links"], row["link_prev"], strict=True)
    ]
    if row["stream_id"] >= 0:
        links = [
            {"shard": row["stream_id"], "seq": row["stream_seq"], "prev_hash": hex_or_none(row["prev_hash"])}
        ]
    first = links[0] if links else {"shard": None, "seq": None, "prev_hash": None}
    audit: dict[str, Any] = {
        "hash": hex_or_none(row["hash"]),
        "hash_alg": hash_alg,
        "shard": first["shard"],
        "seq": first["seq"],
        "prev_hash": first["prev_hash"],
        "chain": links,
        "cross_shard": row["stream_id"] < 0,
        "batch_root": None,
        "signature": None,
        "signer_kid": None,
        "inclusion_proof": None,
        "checkpoint": None,
    }
    shard, seq = first["shard"], first["seq"]
    if isinstance(shard, int) and isinstance(seq, int):
        await _add_batch(conn, audit, shard, seq, signer, hash_alg)
    return audit


async def _add_batch(
    conn: asyncpg.Connection, audit: dict[str, Any], shard: int, seq: int, signer: Any, alg: str
) -> None:
    batch = await repository.batch_of(conn, shard, seq)
    if batch is None:
        return
    hashes = await repository.chain_hashes(conn, shard, batch["first_seq"], batch["last_seq"])
    index = seq - batch["first_seq"]
    path = (
        inclusion_proof(index, [leaf_hash(h, alg) for h in hashes], alg) if 0 <= index < len(hashes) else []
    )
    statement = msgspec.json.decode(bytes(batch["statement"]))
    audit.update(
        batch_root=hex_or_none(batch["root"]),
        signature=b64(batch["signature"]),
        signer_kid=batch["signer_kid"],
        signer=statement.get("signer"),
        batch={"statement": statement, "log_index": batch["log_index"]},
        inclusion_proof={"leaf_index": index, "tree_size": len(hashes), "path": [p.hex() for p in path]},
    )
    if batch["log_index"] is None or signer is None:
        return
    checkpoint = await repository.latest_checkpoint(conn)
    if checkpoint is None or checkpoint["tree_size"] <= batch["log_index"]:
        return
    log_path = await signer.log_proof(batch["log_index"], checkpoint["tree_size"])
    audit["checkpoint"] = {
        "statement": msgspec.json.decode(bytes(checkpoint["statement"])),
        "signature": b64(checkpoint["signature"]),
        "signer_kid": checkpoint["signer_kid"],
        "log_proof": [p.hex() for p in log_path],
    }
