"""The signer: signs shard batch statements and keeps the global log with its checkpoints.

One signer per node (a Ray actor). It owns the key backend (a PKCS#11 HSM, or the loudly
labelled software development key) and is the single writer of the global log: every
`checkpoint_every_s` it appends the batches committed since the last checkpoint (in
(signed_at, shard, batch_seq) order), assigns their `log_index`, signs a checkpoint over the
whole log (RFC 9162 tree over the digests of the batch statements) and stores both in one
transaction. All calls into the backend happen on the actor's event-loop thread, one at a
time (python-pkcs11 must never sign from two threads at once).

Finding the new batches costs what is new, not what is old. Every batch statement passes
through `sign_statements` before its batch commits, so the signer remembers the
`(shard, batch_seq)` keys it signed and the periodic checkpoint looks up only those, by primary
key (and, when nothing was signed since, reads nothing at all). Setting `log_index` leaves a
dead entry in the partial index of unlogged batches until the table is vacuumed; a query on
that index reads all of them (~4 ms per poll after 40,000 batches, 4 polls a second;
docs/benchmarks.md, "Twelfth session"). The full scan of that index still runs at start, on
every explicit `checkpoint()` (proof generation), after a failure, and every
`full_scan_every_s` (60 s): it finds any batch that a previous signer (a restart) or another
process signed, and commits that came in an order the keys did not foresee.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, Final

import asyncpg

from actors.shard_engine import Clock, utc_now
from ledger.timestamps import rfc3339
from signer.canonical import digest
from signer.keys import KeyBackend, SigningError
from signer.merkle import MerkleLog, leaf_hash
from signer.statements import BATCH_TYPE, checkpoint_statement, statement_bytes, statement_digest
from store import repository

log = logging.getLogger(__name__)

SIGNER_WRITER_ID = -3

FULL_SCAN_EVERY_S: Final = 60.0
"""How often the periodic checkpoint also scans for every unlogged batch (see the module docstring)."""
SIGNED_KEYS_MAX: Final = 100_000
"""Signed, not yet logged batch keys kept; beyond it they are dropped and the next checkpoint scans."""

# Every batch not in the log yet (the partial index `batches_unlogged`): the full scan.
_UNLOGGED = (
    "SELECT shard_id, batch_seq, last_seq, statement FROM batches WHERE log_index IS NULL "
    "ORDER BY signed_at, shard_id, batch_seq"
)
# The same, among the batches this signer signed since they were last looked for (primary key).
_UNLOGGED_SIGNED = """
SELECT b.shard_id, b.batch_seq, b.last_seq, b.statement
  FROM unnest($1::integer[], $2::bigint[]) AS k(shard_id, batch_seq)
  JOIN batches b ON b.shard_id = k.shard_id AND b.batch_seq = k.batch_seq
 WHERE b.log_index IS NULL
 ORDER BY b.signed_at, b.shard_id, b.batch_seq
"""


class SignerEngine:
    """Signs batch statements; appends committed batches to the log and signs checkpoints."""

    def __init__(
        self,
        dsn: str,
        backend_factory: Callable[[], KeyBackend],
        *,
        hash_alg: str = "sha256",
        checkpoint_every_s: float = 0.25,
        clock: Clock = utc_now,
        full_scan_every_s: float = FULL_SCAN_EVERY_S,
    ) -> None:
        self.dsn = dsn
        self.backend_factory = backend_factory
        self.hash_alg = hash_alg
        self.checkpoint_every_s = checkpoint_every_s
        self.clock = clock
        self.backend: KeyBackend | None = None
        self.log = MerkleLog(hash_alg)
        self.heads: dict[int, tuple[int, int]] = {}
        self.pool: asyncpg.Pool | None = None
        self.lock_conn: asyncpg.Connection | None = None
        self.task: asyncio.Task[None] | None = None
        self.failing = False
        self.log_stale = False
        self.checkpoint_lock = asyncio.Lock()
        self.signatures = 0
        self.checkpoints = 0
        self.last_checkpoint: dict[str, Any] | None = None
        self.full_scan_every_s = full_scan_every_s
        self.signed_keys: set[tuple[int, int]] = set()  # batches signed, not yet seen in the log
        self.scan_due = True  # the next periodic checkpoint scans for every unlogged batch
        self.last_scan = 0.0  # time.monotonic() of the last full scan
        self.scans = 0
        self.lookups = 0  # periodic checkpoints that looked up signed keys (not a full scan)

    # -- life cycle ------------------------------------------------------------------------
    async def start(self) -> None:
        """Open the key backend, publish its keys, rebuild the log, start checkpointing."""
        self.lock_conn = await repository.hold_writer_lock(self.dsn, SIGNER_WRITER_ID)
        self.pool = await repository.create_pool(self.dsn, 1, 3, name="ledger-signer")
        self.backend = self.backend_factory()
        await self.publish_keys()
        async with self.pool.acquire() as conn:
            await self._reload_log(conn)
        self.task = asyncio.create_task(self._checkpoint_loop(), name="signer-checkpoints")
        log.info(
            "signer started: %s key %s, log size %s",
            self.backend.kind,
            self.backend.active_kid(),
            self.log.size,
        )

    async def close(self) -> None:
        """Stop checkpointing and release the backend."""
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        if self.pool is not None:
            await self.pool.close()
        if self.lock_conn is not None:
            await self.lock_conn.close()
        if self.backend is not None:
            self.backend.close()

    # -- signing ---------------------------------------------------------------------------
    def _backend(self) -> KeyBackend:
        if self.backend is None:
            raise SigningError("signer not started")
        return self.backend

    def sign_statements(self, statements: list[dict[str, Any]]) -> list[tuple[bytes, str, bytes]]:
        """Fill in signer_kid/signer, sign each statement; (canonical bytes, kid, signature) each."""
        if self.failing:
            raise SigningError("signer is failing (fault injection)")
        backend = self._backend()
        signed = []
        for statement in statements:
            complete = {**statement, "signer_kid": backend.active_kid(), "signer": backend.kind}
            kid, signature = backend.sign_digest(statement_digest(complete))
            if kid != complete["signer_kid"]:  # rotated between the two calls: sign again
                complete["signer_kid"] = kid
                kid, signature = backend.sign_digest(statement_digest(complete))
            signed.append((statement_bytes(complete), kid, signature))
            self.signatures += 1
            if statement.get("type") == BATCH_TYPE:
                self._remember(statement["shard"], statement["batch_seq"])
        return signed

    def _remember(self, shard: int, batch_seq: int) -> None:
        """Note a signed batch key for the next checkpoint (bounded: past the cap, scan instead)."""
        if len(self.signed_keys) >= SIGNED_KEYS_MAX:
            self.signed_keys.clear()
            self.scan_due = True
        self.signed_keys.add((shard, batch_seq))

    async def publish_keys(self) -> None:
        """Write every public key (rotated ones included) to `signer_keys`."""
        backend = self._backend()
        assert self.pool is not None
        async with self.pool.acquire() as conn:
            for key in backend.public_keys():
                await conn.execute(
                    "INSERT INTO signer_keys (kid, algorithm, kind, pem, created_at, retired_at) "
                    "VALUES ($1, $2, $3, $4, $5::text::timestamptz, $6::text::timestamptz) "
                    "ON CONFLICT (kid) DO UPDATE SET retired_at = EXCLUDED.retired_at",
                    key.kid,
                    key.algorithm,
                    backend.kind,
                    key.pem,
                    key.created_at,
                    key.retired_at,
                )

    async def rotate(self) -> str:
        """Create a new key (in the HSM for PKCS#11) and sign with it from now on; its kid."""
        key = self._backend().rotate()
        await self.publish_keys()
        return key.kid

    # -- the log and checkpoints ---------------------------------------------------------
    async def _checkpoint_loop(self) -> None:
        while True:
            await asyncio.sleep(self.checkpoint_every_s)
            full = self.scan_due or time.monotonic() - self.last_scan >= self.full_scan_every_s
            try:
                async with self.checkpoint_lock:
                    await self._checkpoint(full=full)
            except Exception:
                self.scan_due = True
                log.exception("checkpoint failed; will retry")

    async def checkpoint(self) -> int:
        """Append every committed batch not in the log yet and sign a checkpoint; returns how many
        were appended (a full scan: see the module docstring).

        Serialized: the periodic loop and on-demand calls (proof generation) never interleave.
        """
        async with self.checkpoint_lock:
            return await self._checkpoint(full=True)

    async def _checkpoint(self, *, full: bool) -> int:
        assert self.pool is not None
        if repository.writer_lock_lost(self.lock_conn):
            # The server released the global log's writer lock with its connection (an outage):
            # take it again and reload the log, which another writer may have extended meanwhile.
            log.warning("signer: the writer lock's connection is gone; taking the lock again")
            self.lock_conn = await repository.hold_writer_lock(self.dsn, SIGNER_WRITER_ID)
            self.log_stale = True
        full = full or self.log_stale
        if not full and not self.signed_keys:
            return 0  # nothing signed since the last look: nothing to read
        async with self.pool.acquire() as conn:
            if self.log_stale:  # a failed checkpoint may have left the log in memory ahead of the store
                await self._reload_log(conn)
            if full:
                started = time.monotonic()
                rows = await conn.fetch(_UNLOGGED)
                self.scan_due, self.last_scan = False, started
                self.scans += 1
            else:
                shards, seqs = zip(*self.signed_keys, strict=True)
                rows = await conn.fetch(_UNLOGGED_SIGNED, list(shards), list(seqs))
                self.lookups += 1
            if not rows:
                self._forget_logged()
                return 0
            start = self.log.size
            heads = dict(self.heads)
            for row in rows:
                heads[row["shard_id"]] = (row["batch_seq"], row["last_seq"])
            self.log.extend([leaf_hash(digest(bytes(r["statement"])), self.hash_alg) for r in rows])
            try:
                await self._store_checkpoint(conn, rows, start, heads)
            except BaseException:
                self.log_stale = True  # the log in memory must equal the stored one: reload it next time
                with contextlib.suppress(Exception):  # the connection may be gone (an outage)
                    await self._reload_log(conn)
                raise
        self.heads = heads
        self.checkpoints += 1
        self._forget_logged()
        return len(rows)

    def _forget_logged(self) -> None:
        """Drop the signed keys at or below their stream's logged head: logged now, or never to be.

        A stream commits its batches one after another, so a key at or below the last batch logged
        for its stream either is in the log or was signed for a commit that failed (its retry is
        signed again under the same key, above the head until it commits).
        """
        heads = self.heads
        self.signed_keys = {k for k in self.signed_keys if k[1] > heads.get(k[0], (0, 0))[0]}

    async def _store_checkpoint(
        self, conn: asyncpg.Connection, rows: list[Any], start: int, heads: dict[int, tuple[int, int]]
    ) -> None:
        backend = self._backend()
        now = rfc3339(self.clock())
        root = self.log.root()
        statement = checkpoint_statement(
            tree_size=self.log.size, root=root, hash_alg=self.hash_alg, timestamp=now,
            signer_kid=backend.active_kid(), signer=backend.kind, shards=heads,
        )  # fmt: skip
        ((body, kid, signature),) = self.sign_statements([statement])
        async with conn.transaction():
            await conn.execute(
                "UPDATE batches b SET log_index = u.idx "
                "FROM unnest($1::integer[], $2::bigint[], $3::bigint[]) AS u(shard_id, batch_seq, idx) "
                "WHERE b.shard_id = u.shard_id AND b.batch_seq = u.batch_seq",
                [r["shard_id"] for r in rows],
                [r["batch_seq"] for r in rows],
                list(range(start, start + len(rows))),
            )
            await conn.execute(
                "INSERT INTO checkpoints (tree_size, root, statement, signature, signer_kid, signed_at) "
                "VALUES ($1, $2, $3, $4, $5, $6::text::timestamptz)",
                self.log.size, root, body, signature, kid, now,
            )  # fmt: skip
        self.last_checkpoint = {"tree_size": self.log.size, "root": root.hex(), "timestamp": now, "kid": kid}

    async def _reload_log(self, conn: asyncpg.Connection) -> None:
        rows = await conn.fetch(
            "SELECT shard_id, batch_seq, last_seq, statement FROM batches "
            "WHERE log_index IS NOT NULL ORDER BY log_index"
        )
        self.log = MerkleLog.from_leaf_hashes(
            [leaf_hash(digest(bytes(r["statement"])), self.hash_alg) for r in rows], self.hash_alg
        )
        self.heads = {r["shard_id"]: (r["batch_seq"], r["last_seq"]) for r in rows}
        self.log_stale = False

    def log_proof(self, index: int, tree_size: int) -> list[bytes]:
        """Inclusion proof of log leaf `index` in the tree of `tree_size` leaves."""
        return self.log.inclusion_proof(index, tree_size)

    def consistency(self, old_size: int, new_size: int) -> list[bytes]:
        """Consistency proof between two tree sizes of the log."""
        return self.log.consistency_proof(old_size, new_size)

    def status(self) -> dict[str, Any]:
        """Kind, active key, counters, last checkpoint."""
        backend = self.backend
        return {
            "signer": backend.kind if backend else None,
            "signer_kid": backend.active_kid() if backend else None,
            "log_size": self.log.size,
            "signatures": self.signatures,
            "checkpoints": self.checkpoints,
            "full_scans": self.scans,
            "signed_lookups": self.lookups,
            "signed_unlogged": len(self.signed_keys),
            "last_checkpoint": self.last_checkpoint,
            "failing": self.failing,
        }
