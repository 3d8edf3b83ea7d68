"""Proof packages from the database: select the batches of a range and assemble a signed package.

The selection follows docs/proofs.md section 8 exactly (and mirrors the reference selection in
`tests/support/proofs.py`), always against one signed checkpoint (tree size `T`):

* time range `[from_ts, to_ts]` (compared with each batch statement's `signed_at`, which is the
  `batches.signed_at` column): every logged batch (`log_index < T`) signed within the range is a
  `member`; per shard, the last logged batch signed before `from_ts` is `before` and the first one
  signed after `to_ts` is `after`. This covers every shard of the checkpoint's `shards` map, including
  shards without a member batch, because the shards with a batch in the tree are exactly that map.
* index range `[from_index, to_index]` (the seed's `from_seq` / `to_seq`): the batches at those log
  indexes, all members; every index must be inside the checkpoint's tree.

Member batches carry their chain entries (from `journals` for single-shard journals and
`shard_links` for cross-shard ones) and the stored canonical body of every journal they name. The
bodies are sent exactly as stored, so a changed byte in the database shows up in verification.
"""

from __future__ import annotations

import asyncio
import bisect
from collections import defaultdict
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Final, Protocol

import asyncpg
import msgspec

from ledger.errors import ErrorCode, LedgerError
from ledger.timestamps import parse_rfc3339, rfc3339
from signer.package import (
    BatchInput,
    KeyInfo,
    b64,
    build_package,
    encode_package,
    index_range,
    time_range,
)
from store.settings import ledger_hash_alg

AUDIT_STREAM: Final = -2
LOG_PROOF_CONCURRENCY: Final = 16

Entry = tuple[int, str, bytes, bytes | None]

_BATCH_COLUMNS: Final = "shard_id, batch_seq, first_seq, last_seq, statement, signature, log_index"


class ProofSigner(Protocol):
    """The part of the signer (`actors.runtime.RaySigner`) that proofs use."""

    async def checkpoint(self) -> int: ...

    async def log_proof(self, index: int, tree_size: int) -> list[bytes]: ...

    async def consistency(self, old_size: int, new_size: int) -> list[bytes]: ...


def nothing_to_prove(details: dict[str, Any] | None = None) -> LedgerError:
    """The VALIDATION_ERROR for a range that selects no batch."""
    return LedgerError(ErrorCode.VALIDATION_ERROR, "nothing to prove in this range", details or {})


def parse_range(rng: Mapping[str, Any]) -> tuple[datetime, datetime] | tuple[int, int]:
    """(from, to) of a validated request range: datetimes for a time range, ints for an index range."""
    if "from_ts" in rng:
        start, end = parse_rfc3339(str(rng["from_ts"])), parse_rfc3339(str(rng["to_ts"]))
        if start is None or end is None:
            raise LedgerError(ErrorCode.VALIDATION_ERROR, "range timestamps must be RFC 3339", {})
        return start, end
    return int(rng["from_seq"]), int(rng["to_seq"])


# -- selection ------------------------------------------------------------------------------
async def _select_time(
    conn: asyncpg.Connection, tree_size: int, start: datetime, end: datetime
) -> list[tuple[asyncpg.Record, str]]:
    """(batch, role) for a time range against the tree of `tree_size` batches."""
    rows = await conn.fetch(
        f"""
        SELECT 'member' AS role, {_BATCH_COLUMNS} FROM batches
         WHERE log_index < $1 AND signed_at BETWEEN $2 AND $3
        UNION ALL
        SELECT * FROM (
            SELECT DISTINCT ON (shard_id) 'before' AS role, {_BATCH_COLUMNS} FROM batches
             WHERE log_index < $1 AND signed_at < $2 ORDER BY shard_id, batch_seq DESC
        ) before_range
        UNION ALL
        SELECT * FROM (
            SELECT DISTINCT ON (shard_id) 'after' AS role, {_BATCH_COLUMNS} FROM batches
             WHERE log_index < $1 AND signed_at > $3 ORDER BY shard_id, batch_seq
        ) after_range
        """,
        tree_size,
        start,
        end,
    )
    return [(row, row["role"]) for row in rows]


async def _select_index(conn: asyncpg.Connection, lo: int, hi: int) -> list[tuple[asyncpg.Record, str]]:
    rows = await conn.fetch(
        f"SELECT {_BATCH_COLUMNS} FROM batches WHERE log_index BETWEEN $1 AND $2 ORDER BY log_index",
        lo,
        hi,
    )
    return [(row, "member") for row in rows]


async def _unlogged_before(conn: asyncpg.Connection, tree_size: int, end: datetime) -> bool:
    """True when a committed batch signed at or before `end` is not in the tree of `tree_size`."""
    found: bool = await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM batches WHERE (log_index IS NULL OR log_index >= $1) "
        "AND signed_at <= $2)",
        tree_size,
        end,
    )
    return found


async def _checkpoint_for(
    conn: asyncpg.Connection, signer: ProofSigner, bounds: tuple[datetime, datetime] | tuple[int, int]
) -> asyncpg.Record | None:
    """The latest checkpoint, after forcing a new one when the range is not all in the latest yet."""
    checkpoint = await latest_checkpoint(conn)
    if checkpoint is not None:
        if isinstance(bounds[1], datetime):
            stale = await _unlogged_before(conn, checkpoint["tree_size"], bounds[1])
        else:
            stale = bounds[1] >= checkpoint["tree_size"]
        if not stale:
            return checkpoint
    await signer.checkpoint()
    return await latest_checkpoint(conn)


async def latest_checkpoint(conn: asyncpg.Connection) -> asyncpg.Record | None:
    """The newest signed checkpoint."""
    return await conn.fetchrow(
        "SELECT tree_size, root, statement, signature, signer_kid, signed_at FROM checkpoints "
        "ORDER BY tree_size DESC LIMIT 1"
    )


# -- entries and bodies ---------------------------------------------------------------------
async def _shard_entries(conn: asyncpg.Connection, shard: int, first: int, last: int) -> list[Entry]:
    """Chain entries (seq, journal_id, hash, prev_hash) of a shard's positions first..last."""
    if shard >= 0:
        rows = await conn.fetch(
            """
            SELECT seq, journal_id, hash, prev_hash FROM (
                SELECT stream_seq AS seq, journal_id, hash, prev_hash FROM journals
                 WHERE stream_id = $1 AND stream_seq BETWEEN $2 AND $3
                UNION ALL
                SELECT seq, journal_id, hash, prev_hash FROM shard_links
                 WHERE shard_id = $1 AND seq BETWEEN $2 AND $3
            ) chain ORDER BY seq
            """,
            shard,
            first,
            last,
        )
    elif shard == AUDIT_STREAM:
        rows = await conn.fetch(
            "SELECT seq, 'audit-event-' || seq AS journal_id, hash, prev_hash FROM audit_events "
            "WHERE seq BETWEEN $1 AND $2 ORDER BY seq",
            first,
            last,
        )
    else:
        raise LedgerError(ErrorCode.INTERNAL_ERROR, f"no entry source for internal stream {shard}", {})
    return [
        (
            r["seq"],
            r["journal_id"],
            bytes(r["hash"]),
            None if r["prev_hash"] is None else bytes(r["prev_hash"]),
        )
        for r in rows
    ]


async def _bodies(conn: asyncpg.Connection, names: dict[str, int]) -> dict[str, bytes]:
    """Stored bodies of the named journals (journal_id -> shard it was named in)."""
    ledger = [jid for jid, shard in names.items() if shard >= 0]
    audit = [int(jid.rsplit("-", 1)[1]) for jid, shard in names.items() if shard == AUDIT_STREAM]
    bodies: dict[str, bytes] = {}
    if ledger:
        rows = await conn.fetch(
            "SELECT journal_id, body FROM journals WHERE journal_id = ANY($1::text[])", ledger
        )
        bodies.update((r["journal_id"], bytes(r["body"])) for r in rows)
    if audit:
        rows = await conn.fetch("SELECT seq, body FROM audit_events WHERE seq = ANY($1::bigint[])", audit)
        bodies.update((f"audit-event-{r['seq']}", bytes(r["body"])) for r in rows)
    missing = sorted(set(names) - set(bodies))
    if missing:
        raise LedgerError(
            ErrorCode.INVALID_STATE,
            "the chain names journals whose bodies are not stored",
            {"journals": missing[:20], "count": len(missing)},
        )
    return bodies


async def _member_entries(
    conn: asyncpg.Connection, members: list[asyncpg.Record]
) -> dict[tuple[int, int], list[Entry]]:
    """Entries of every member batch, keyed by (shard, batch_seq); one query per shard."""
    spans: dict[int, list[asyncpg.Record]] = defaultdict(list)
    for row in members:
        spans[row["shard_id"]].append(row)
    out: dict[tuple[int, int], list[Entry]] = {}
    for shard, rows in spans.items():
        first = min(r["first_seq"] for r in rows)
        last = max(r["last_seq"] for r in rows)
        entries = await _shard_entries(conn, shard, first, last)
        seqs = [e[0] for e in entries]
        for row in rows:
            lo = bisect.bisect_left(seqs, row["first_seq"])
            hi = bisect.bisect_right(seqs, row["last_seq"])
            out[(shard, row["batch_seq"])] = entries[lo:hi]
    return out


async def _log_proofs(signer: ProofSigner, indexes: list[int], tree_size: int) -> dict[int, list[bytes]]:
    """Inclusion proofs of log leaves in the tree of `tree_size`, fetched with bounded concurrency."""
    gate = asyncio.Semaphore(LOG_PROOF_CONCURRENCY)

    async def one(index: int) -> tuple[int, list[bytes]]:
        async with gate:
            return index, [bytes(p) for p in await signer.log_proof(index, tree_size)]

    return dict(await asyncio.gather(*(one(i) for i in indexes)))


async def _keys(conn: asyncpg.Connection) -> list[KeyInfo]:
    rows = await conn.fetch(
        "SELECT kid, algorithm, pem, created_at, retired_at FROM signer_keys ORDER BY created_at, kid"
    )
    return [
        KeyInfo(
            kid=r["kid"],
            algorithm=r["algorithm"],
            pem=r["pem"],
            created_at=rfc3339(r["created_at"]),
            retired_at=None if r["retired_at"] is None else rfc3339(r["retired_at"]),
        )
        for r in rows
    ]


# -- the package ----------------------------------------------------------------------------
async def build_proof_package(
    conn: asyncpg.Connection,
    signer: ProofSigner,
    *,
    proof_id: str,
    generated_at: str,
    rng: dict[str, Any],
    signer_kind: str,
) -> bytes:
    """The canonical package bytes proving `rng` (`{from_ts, to_ts}` or `{from_seq, to_seq}`).

    `signer_kind` is only a fallback: the package's `signer.kind` must equal the checkpoint's
    `signer`, so the kind recorded in the signed checkpoint is used.
    """
    bounds = parse_range(rng)
    checkpoint = await _checkpoint_for(conn, signer, bounds)
    if checkpoint is None:
        raise nothing_to_prove({"reason": "no checkpoint has been signed yet"})
    tree_size: int = checkpoint["tree_size"]
    if isinstance(bounds[0], datetime) and isinstance(bounds[1], datetime):
        selection = await _select_time(conn, tree_size, bounds[0], bounds[1])
        package_range = time_range(str(rng["from_ts"]), str(rng["to_ts"]))
    else:
        lo, hi = int(bounds[0]), int(bounds[1])
        if lo >= tree_size:
            raise nothing_to_prove({"log_size": tree_size})
        if hi >= tree_size:
            raise LedgerError(
                ErrorCode.VALIDATION_ERROR,
                f"to_seq {hi} is beyond the signed log (log indexes 0..{tree_size - 1})",
                {"field": "$.range.to_seq", "log_size": tree_size},
            )
        selection = await _select_index(conn, lo, hi)
        package_range = index_range(lo, hi)
    if not selection:
        raise nothing_to_prove({"log_size": tree_size})
    members = [row for row, role in selection if role == "member"]
    entries = await _member_entries(conn, members)
    names = {
        jid: row["shard_id"]
        for row in members
        for _, jid, _, _ in entries[(row["shard_id"], row["batch_seq"])]
    }
    bodies = await _bodies(conn, names)
    proofs = await _log_proofs(signer, [row["log_index"] for row, _ in selection], tree_size)
    statement = msgspec.json.decode(bytes(checkpoint["statement"]))
    batches = [
        BatchInput(
            statement=msgspec.json.decode(bytes(row["statement"])),
            signature=bytes(row["signature"]),
            log_index=row["log_index"],
            log_proof=proofs[row["log_index"]],
            role=role,
            entries=entries[(row["shard_id"], row["batch_seq"])] if role == "member" else [],
        )
        for row, role in selection
    ]
    package = build_package(
        proof_id=proof_id,
        generated_at=generated_at,
        range=package_range,
        signer_kind=str(statement.get("signer") or signer_kind),
        keys=await _keys(conn),
        checkpoint_statement=statement,
        checkpoint_signature=bytes(checkpoint["signature"]),
        batches=batches,
        journals=bodies,
        hash_alg=await ledger_hash_alg(conn),
    )
    return encode_package(package)


# -- consistency ----------------------------------------------------------------------------
async def consistency(
    conn: asyncpg.Connection, signer: ProofSigner, old_size: int, new_size: int
) -> dict[str, Any]:
    """Both checkpoints (statement + base64 signature) and the RFC 9162 consistency proof between them."""
    found = {}
    for size in (old_size, new_size):
        row = await conn.fetchrow(
            "SELECT tree_size, statement, signature, signer_kid FROM checkpoints WHERE tree_size = $1", size
        )
        if row is None:
            raise LedgerError(
                ErrorCode.NOT_FOUND,
                f"no checkpoint of tree size {size}",
                {"resource": "checkpoint", "tree_size": size},
            )
        found[size] = {
            "tree_size": size,
            "statement": msgspec.json.decode(bytes(row["statement"])),
            "signature": b64(bytes(row["signature"])),
            "signer_kid": row["signer_kid"],
        }
    proof = await signer.consistency(old_size, new_size)
    return {"from": found[old_size], "to": found[new_size], "proof": [bytes(p).hex() for p in proof]}
