"""The state of the signed layer for `GET /health/proofs`: per-stream latest signed batch, the latest
checkpoint with its age, and whether its signature verifies with the published key.

Cheap by construction: one indexed lookup per stream (primary key `(shard_id, batch_seq)`), the
partial index of unlogged batches, the newest checkpoint, and one signature verification. The full
recomputation (every root, every signature) stays in `ledger-node check`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Final

import asyncpg

from ledger.timestamps import rfc3339
from signer.canonical import digest
from signer.keys import verify_signature

AUDIT_STREAM: Final = -2

_LATEST_BATCHES: Final = """
SELECT s.id AS shard_id, b.batch_seq, b.last_seq, b.signer_kid, b.signed_at, b.log_index
  FROM unnest($1::int[]) AS s(id)
  LEFT JOIN LATERAL (
      SELECT batch_seq, last_seq, signer_kid, signed_at, log_index FROM batches
       WHERE shard_id = s.id ORDER BY batch_seq DESC LIMIT 1
  ) b ON true
 ORDER BY s.id < 0, s.id
"""


def _age_s(now: datetime, then: datetime) -> float:
    return round(max((now - then).total_seconds(), 0.0), 3)


async def latest_batches(
    conn: asyncpg.Connection, shard_ids: list[int], now: datetime
) -> list[dict[str, Any]]:
    """Per shard (and the audit stream, `shard: "audit"`): the newest signed batch, its age, and
    whether a checkpoint has taken it into the global log yet (`logged`); `latest_batch` is null for
    a stream that has signed nothing yet."""
    rows = await conn.fetch(_LATEST_BATCHES, [*shard_ids, AUDIT_STREAM])
    streams: list[dict[str, Any]] = []
    for row in rows:
        batch = None
        if row["batch_seq"] is not None:
            batch = {
                "batch_seq": row["batch_seq"],
                "last_seq": row["last_seq"],
                "signer_kid": row["signer_kid"],
                "signed_at": rfc3339(row["signed_at"]),
                "age_s": _age_s(now, row["signed_at"]),
                "logged": row["log_index"] is not None,
            }
        shard: int | str = "audit" if row["shard_id"] == AUDIT_STREAM else row["shard_id"]
        streams.append({"shard": shard, "latest_batch": batch})
    return streams


async def latest_checkpoint_health(conn: asyncpg.Connection, now: datetime) -> dict[str, Any] | None:
    """The newest checkpoint: size, time, age, signer and whether its signature verifies now."""
    row = await conn.fetchrow(
        "SELECT c.tree_size, c.root, c.statement, c.signature, c.signer_kid, c.signed_at, k.algorithm, "
        "k.pem, k.kind FROM checkpoints c LEFT JOIN signer_keys k ON k.kid = c.signer_kid "
        "ORDER BY c.tree_size DESC LIMIT 1"
    )
    if row is None:
        return None
    verified = row["pem"] is not None and verify_signature(
        row["pem"], row["algorithm"], digest(bytes(row["statement"])), bytes(row["signature"])
    )
    return {
        "tree_size": row["tree_size"],
        "root": bytes(row["root"]).hex(),
        "timestamp": rfc3339(row["signed_at"]),
        "age_s": _age_s(now, row["signed_at"]),
        "signer_kid": row["signer_kid"],
        "signer_kind": row["kind"],
        "signature_verified": verified,
    }


async def unlogged_batches(conn: asyncpg.Connection) -> int:
    """Signed batches no checkpoint covers yet."""
    return int(await conn.fetchval("SELECT count(*) FROM batches WHERE log_index IS NULL"))
