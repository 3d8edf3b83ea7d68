"""The signer's periodic checkpoint finds new batches by the keys it signed, not by a scan.

A real PostgreSQL database and a `SignerEngine` with the software key; batch rows are inserted
as a shard's group commit writes them, after `sign_statements` signed their statements. What is
checked: the periodic checkpoint logs the batches it signed (and reads nothing when it signed
nothing), leaves alone a batch some other signer signed until a full scan (explicit
`checkpoint()`, or the periodic one every `full_scan_every_s`), keeps the key of a batch whose
commit has not happened yet, and builds the same log, in the same order, as a full scan does.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta

import asyncpg

from actors.signer_engine import SignerEngine
from ledger.timestamps import rfc3339
from signer.canonical import digest
from signer.keys import SoftwareKeyBackend
from signer.merkle import root as reference_root
from signer.statements import batch_statement
from tests.support.signer import started_signer

T0 = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


@contextlib.asynccontextmanager
async def signer(**options: float) -> AsyncIterator[tuple[SignerEngine, asyncpg.Connection]]:
    """A migrated database, a started engine (periodic checkpoints per `options`), a connection."""
    async with started_signer("ledger_ckpt", **options) as (_dsn, conn, engine):
        yield engine, conn


async def commit_batch(
    conn: asyncpg.Connection, engine: SignerEngine, shard: int, batch_seq: int, at: datetime
) -> None:
    """Sign a one-entry batch statement with `engine` and insert its row, as a shard commits one."""
    leaf = digest(f"{shard}/{batch_seq}".encode())
    statement = batch_statement(
        shard=shard, batch_seq=batch_seq, first_seq=batch_seq, last_seq=batch_seq, hash_alg="sha256",
        root=leaf, signed_at=rfc3339(at), signer_kid="", signer="",
    )  # fmt: skip
    ((body, kid, signature),) = engine.sign_statements([statement])
    await conn.execute(
        "INSERT INTO batches (shard_id, batch_seq, first_seq, last_seq, statement, root, signature, "
        "signer_kid, signed_at) VALUES ($1, $2, $2, $2, $3, $4, $5, $6, $7)",
        shard, batch_seq, body, leaf, signature, kid, at,
    )  # fmt: skip


async def logged(conn: asyncpg.Connection) -> list[tuple[int, int]]:
    """(shard, batch_seq) of the logged batches, in log order."""
    rows = await conn.fetch(
        "SELECT shard_id, batch_seq FROM batches WHERE log_index IS NOT NULL ORDER BY log_index"
    )
    return [(r[0], r[1]) for r in rows]


async def until(check: Callable[[], object], timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def _periodic_checkpoint_logs_what_it_signed_and_reads_nothing_when_idle() -> None:
    async with signer(checkpoint_every_s=0.02, full_scan_every_s=3600) as (engine, conn):
        await until(lambda: engine.scans == 1)  # the first periodic checkpoint scans
        await commit_batch(conn, engine, 0, 1, T0)
        await commit_batch(conn, engine, 1, 1, T0 + timedelta(seconds=1))
        await until(lambda: not engine.signed_keys)  # logged keys are forgotten
        assert await logged(conn) == [(0, 1), (1, 1)]
        counters = (engine.lookups, engine.scans, engine.checkpoints)
        await asyncio.sleep(0.3)  # ~15 periodic checkpoints with nothing signed
        assert (engine.lookups, engine.scans, engine.checkpoints) == counters
        assert engine.status()["signed_unlogged"] == 0


async def _a_batch_signed_elsewhere_waits_for_a_full_scan() -> None:
    async with signer(checkpoint_every_s=0.02, full_scan_every_s=3600) as (engine, conn):
        await until(lambda: engine.scans == 1)
        other = SignerEngine(engine.dsn, lambda: SoftwareKeyBackend(None))
        other.backend = SoftwareKeyBackend(None)  # signs only; never started, never checkpoints
        await commit_batch(conn, other, 2, 1, T0)  # e.g. signed by a previous signer incarnation
        await commit_batch(conn, engine, 0, 1, T0 + timedelta(seconds=1))
        await until(lambda: engine.checkpoints == 1)
        await asyncio.sleep(0.2)
        assert await logged(conn) == [(0, 1)]  # the periodic checkpoint looked up its own keys only
        assert await engine.checkpoint() == 1  # an explicit checkpoint scans
        assert await logged(conn) == [(0, 1), (2, 1)]


async def _the_periodic_full_scan_finds_it_too() -> None:
    async with signer(checkpoint_every_s=0.02, full_scan_every_s=0.2) as (engine, conn):
        await until(lambda: engine.scans == 1)
        other = SignerEngine(engine.dsn, lambda: SoftwareKeyBackend(None))
        other.backend = SoftwareKeyBackend(None)
        await commit_batch(conn, other, 3, 1, T0)
        await until(lambda: engine.checkpoints == 1, timeout_s=5)
        assert await logged(conn) == [(3, 1)]
        assert engine.scans >= 2


async def _a_signed_batch_not_committed_yet_keeps_its_key() -> None:
    async with signer(checkpoint_every_s=0.02, full_scan_every_s=3600) as (engine, conn):
        await until(lambda: engine.scans == 1)
        statement = batch_statement(
            shard=0, batch_seq=1, first_seq=1, last_seq=1, hash_alg="sha256", root=b"\0" * 32,
            signed_at=rfc3339(T0), signer_kid="", signer="",
        )  # fmt: skip
        engine.sign_statements([statement])  # signed; its commit fails (nothing is inserted)
        await until(lambda: engine.lookups >= 3)
        assert engine.signed_keys == {(0, 1)} and engine.checkpoints == 0
        await commit_batch(conn, engine, 0, 1, T0)  # the retry: signed again under the same key
        await until(lambda: engine.checkpoints == 1)
        assert await logged(conn) == [(0, 1)] and engine.signed_keys == set()


async def _the_log_is_the_one_a_full_scan_builds() -> None:
    """Batches of three streams (the audit stream's -2 among them) signed in an order that is not the
    log order: the periodic path logs them in (signed_at, shard, batch_seq) order, and the tree
    over them is the reference one."""
    async with signer(checkpoint_every_s=3600, full_scan_every_s=3600) as (engine, conn):
        plan = [(1, 1, 3), (0, 1, 1), (-2, 1, 1), (0, 2, 2), (1, 2, 4), (-2, 2, 0)]  # shard, seq, second
        for shard, seq, second in plan:
            await commit_batch(conn, engine, shard, seq, T0 + timedelta(seconds=second))
        engine.scan_due = False
        async with engine.checkpoint_lock:
            assert await engine._checkpoint(full=False) == len(plan)
        assert engine.lookups == 1 and engine.scans == 0  # no scan: the keys it signed
        expected = sorted(plan, key=lambda p: (p[2], p[0], p[1]))
        assert await logged(conn) == [(shard, seq) for shard, seq, _ in expected]
        statements = await conn.fetch("SELECT statement FROM batches ORDER BY log_index")
        assert engine.log.root() == reference_root([digest(bytes(r[0])) for r in statements], "sha256")
        tree_size, root = await conn.fetchrow("SELECT tree_size, root FROM checkpoints")
        assert tree_size == len(plan) and bytes(root) == engine.log.root()


def test_periodic_checkpoint_logs_what_it_signed_and_reads_nothing_when_idle() -> None:
    asyncio.run(_periodic_checkpoint_logs_what_it_signed_and_reads_nothing_when_idle())


def test_a_batch_signed_elsewhere_waits_for_a_full_scan() -> None:
    asyncio.run(_a_batch_signed_elsewhere_waits_for_a_full_scan())


def test_the_periodic_full_scan_finds_it_too() -> None:
    asyncio.run(_the_periodic_full_scan_finds_it_too())


def test_a_signed_batch_not_committed_yet_keeps_its_key() -> None:
    asyncio.run(_a_signed_batch_not_committed_yet_keeps_its_key())


def test_the_log_is_the_one_a_full_scan_builds() -> None:
    asyncio.run(_the_log_is_the_one_a_full_scan_builds())
