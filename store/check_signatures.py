"""Integrity checks of the signed layer, part of `ledger-node check`.

Recomputes every journal hash from its stored canonical body with the ledger's `hash_alg`
(`ledger_settings`; SHA-256 in SQL, other algorithms in Python over a cursor), every batch root from the chain
hashes it covers, verifies every batch and checkpoint signature with the published keys, that
the batches of each shard are consecutive and cover every chain position, and that the latest
checkpoint's root is the Merkle root over the logged batch statements.
"""

from __future__ import annotations

import bisect

import asyncpg

from signer.canonical import digest, journal_digest
from signer.keys import verify_signature
from signer.merkle import leaf_hash, root, root_from_leaf_hashes
from store.check import Problem
from store.settings import DEFAULT_HASH_ALG, ledger_hash_alg

_HASHES = "SELECT journal_id FROM journals WHERE sha256(body) <> hash ORDER BY journal_id"
_BODIES = "SELECT journal_id, body, hash FROM journals ORDER BY journal_id"

_LINK_HASHES = """
SELECT l.journal_id, l.shard_id FROM shard_links l JOIN journals j USING (journal_id)
 WHERE l.hash <> j.hash ORDER BY 1, 2
"""

_CHAIN = """
SELECT shard, seq, hash, journal_id FROM (
    SELECT stream_id AS shard, stream_seq AS seq, hash, journal_id FROM journals WHERE stream_id >= 0
    UNION ALL
    SELECT shard_id, seq, hash, journal_id FROM shard_links
) chain ORDER BY shard, seq
"""


async def check_signatures(conn: asyncpg.Connection) -> list[Problem]:
    """Every problem in hashes, batches, signatures and checkpoints."""
    alg = await ledger_hash_alg(conn)
    problems = await _check_hashes(conn, alg)
    problems += [
        Problem("link_hash_mismatch", r[0], f"shard {r[1]} link hash differs from the journal hash")
        for r in await conn.fetch(_LINK_HASHES)
    ]
    if not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM batches)"):
        return problems  # signing off: nothing more to check
    keys = {
        r["kid"]: (r["algorithm"], r["pem"])
        for r in await conn.fetch("SELECT kid, algorithm, pem FROM signer_keys")
    }
    problems += await _check_batches(conn, keys, alg)
    problems += await _check_checkpoint(conn, keys, alg)
    return problems


async def _check_hashes(conn: asyncpg.Connection, alg: str) -> list[Problem]:
    """Journals whose stored hash is not the ledger's hash of their body."""
    if alg == DEFAULT_HASH_ALG:
        return [
            Problem("hash_mismatch", r[0], "stored hash is not SHA-256 of the body")
            for r in await conn.fetch(_HASHES)
        ]
    problems: list[Problem] = []
    async with conn.transaction():
        async for row in conn.cursor(_BODIES, prefetch=1000):
            if journal_digest(bytes(row["body"]), alg) != bytes(row["hash"]):
                problems.append(
                    Problem("hash_mismatch", row["journal_id"], f"stored hash is not {alg} of the body")
                )
    return problems


def _signature_ok(keys: dict[str, tuple[str, str]], kid: str, statement: bytes, signature: bytes) -> bool:
    key = keys.get(kid)
    return key is not None and verify_signature(key[1], key[0], digest(statement), signature)


async def _check_batches(
    conn: asyncpg.Connection, keys: dict[str, tuple[str, str]], alg: str = DEFAULT_HASH_ALG
) -> list[Problem]:
    problems: list[Problem] = []
    batches = await conn.fetch(
        "SELECT shard_id, batch_seq, first_seq, last_seq, statement, root, signature, signer_kid "
        "FROM batches WHERE shard_id >= 0 ORDER BY shard_id, batch_seq"
    )
    chain = await conn.fetch(_CHAIN)
    by_shard: dict[int, list[asyncpg.Record]] = {}
    for row in chain:
        by_shard.setdefault(row["shard"], []).append(row)
    seqs = {shard: [row["seq"] for row in rows] for shard, rows in by_shard.items()}
    covered: dict[int, int] = {}
    for batch in batches:
        shard = batch["shard_id"]
        subject = f"shard {shard} batch {batch['batch_seq']}"
        if batch["first_seq"] != covered.get(shard, 0) + 1:
            problems.append(Problem("batch_gap", subject, f"starts at seq {batch['first_seq']}"))
        covered[shard] = batch["last_seq"]
        entries = _window(by_shard.get(shard, []), seqs.get(shard, []), batch["first_seq"], batch["last_seq"])
        computed = root([bytes(r["hash"]) for r in entries], alg)
        if len(entries) != batch["last_seq"] - batch["first_seq"] + 1 or computed != bytes(batch["root"]):
            first = entries[0]["journal_id"] if entries else subject
            problems.append(
                Problem("batch_root_mismatch", subject, f"root over entries differs (from {first})")
            )
        if not _signature_ok(keys, batch["signer_kid"], bytes(batch["statement"]), bytes(batch["signature"])):
            problems.append(
                Problem("bad_signature", subject, f"signature by {batch['signer_kid']} does not verify")
            )
    for shard, rows in by_shard.items():
        if rows and rows[-1]["seq"] > covered.get(shard, 0):
            problems.append(
                Problem("unsigned_entries", f"shard {shard}", f"seq after {covered.get(shard, 0)}")
            )
    return problems


def _window(rows: list[asyncpg.Record], seqs: list[int], first: int, last: int) -> list[asyncpg.Record]:
    """The chain rows with first <= seq <= last (`seqs`: the rows' seqs, ascending). A bisection,
    not a scan: a long soak leaves ~10^5 batches over ~10^6 chain rows."""
    return rows[bisect.bisect_left(seqs, first) : bisect.bisect_right(seqs, last)]


async def _check_checkpoint(
    conn: asyncpg.Connection, keys: dict[str, tuple[str, str]], alg: str = DEFAULT_HASH_ALG
) -> list[Problem]:
    latest = await conn.fetchrow(
        "SELECT tree_size, root, statement, signature, signer_kid FROM checkpoints "
        "ORDER BY tree_size DESC LIMIT 1"
    )
    if latest is None:
        return []
    subject = f"checkpoint {latest['tree_size']}"
    problems: list[Problem] = []
    if not _signature_ok(keys, latest["signer_kid"], bytes(latest["statement"]), bytes(latest["signature"])):
        problems.append(
            Problem("bad_signature", subject, f"signature by {latest['signer_kid']} does not verify")
        )
    statements = await conn.fetch(
        "SELECT statement FROM batches WHERE log_index < $1 ORDER BY log_index", latest["tree_size"]
    )
    leaves = [leaf_hash(digest(bytes(r["statement"])), alg) for r in statements]
    if len(leaves) != latest["tree_size"] or root_from_leaf_hashes(leaves, alg) != bytes(latest["root"]):
        problems.append(Problem("checkpoint_root_mismatch", subject, "root over the logged batches differs"))
    return problems
