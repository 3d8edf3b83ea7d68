"""What the signer's periodic checkpoint costs PostgreSQL on an idle node with a long history.

Usage::

    python -m loadtests.checkpoint_poll [--batches 40000,200000] [--seconds 10] [--rounds 2]

For each history size N: a fresh database whose `batches` table holds N batch rows that went
through the log as a running node leaves them (inserted unlogged, then `log_index` set by the
checkpointer 40 at a time), with autovacuum off on that table: the state between two
autovacuums, when the dead index entries that setting `log_index` leaves behind have piled up
(autovacuum waits for dead rows of 20% of the table). Then a `SignerEngine` (software key, the
default `checkpoint_every_s` of 0.25 s) runs idle for `--seconds`, and the script prints the CPU
of the signer pool's PostgreSQL backends per second and per periodic checkpoint, two ways,
alternating round by round:

- ``scan``: every periodic checkpoint scans for unlogged batches (`full_scan_every_s=0`: what
  every checkpoint did before the twelfth session);
- ``keys``: the default: it looks up the keys it signed (none, idle) and scans every 60 s.

Run it from the repository root. Figures: docs/benchmarks.md, "Twelfth session".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time

import asyncpg
import psutil  # type: ignore[import-untyped]

from actors.signer_engine import FULL_SCAN_EVERY_S, SignerEngine
from loadtests.baseline import create_database, drop_database, new_database_name
from loadtests.bench import DEFAULT_ADMIN_DSN
from signer.keys import SoftwareKeyBackend
from store.migrations import apply_migrations

CHUNK = 40
"""Batches logged per checkpoint while the history is built (~4 shards x 10 commits per 250 ms)."""


async def build_history(dsn: str, batches: int) -> None:
    """`batches` rows, logged chunk by chunk as the checkpointer does; autovacuum off on the table."""
    conn = await asyncpg.connect(dsn)
    try:
        await apply_migrations(conn)
        await conn.execute("ALTER TABLE batches SET (autovacuum_enabled = false)")
        for start in range(0, batches, CHUNK):
            rows = [
                (i % 4, i // 4 + 1, 33 * i + 1, 33 * i + 33, b"{}", b"r", b"s", "k")
                for i in range(start, min(batches, start + CHUNK))
            ]
            await conn.executemany(
                "INSERT INTO batches (shard_id, batch_seq, first_seq, last_seq, statement, root, signature,"
                " signer_kid, signed_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, now())",
                rows,
            )
            await conn.execute(
                "UPDATE batches SET log_index = 4 * (batch_seq - 1) + shard_id WHERE log_index IS NULL"
            )
    finally:
        await conn.close()


async def signer_backends_cpu(conn: asyncpg.Connection) -> float:
    """CPU seconds so far of the PostgreSQL backends of the signer's pool."""
    pids = [
        r[0]
        for r in await conn.fetch("SELECT pid FROM pg_stat_activity WHERE application_name = 'ledger-signer'")
    ]
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):  # a pool connection closed since the query
            times = psutil.Process(pid).cpu_times()
            total += times.user + times.system
    return total


async def idle_cost(dsn: str, seconds: float, full_scan_every_s: float) -> tuple[float, float, int]:
    """(PostgreSQL CPU ms per second, per checkpoint poll, polls) of an idle signer."""
    engine = SignerEngine(dsn, lambda: SoftwareKeyBackend(None), full_scan_every_s=full_scan_every_s)
    await engine.start()
    probe = await asyncpg.connect(dsn)
    try:
        await asyncio.sleep(1.0)  # the first poll (a full scan either way) and the pool's warm-up
        before, started = await signer_backends_cpu(probe), time.monotonic()
        await asyncio.sleep(seconds)
        spent, elapsed = await signer_backends_cpu(probe) - before, time.monotonic() - started
    finally:
        await probe.close()
        await engine.close()
    polls = round(elapsed / engine.checkpoint_every_s)
    return 1000 * spent / elapsed, 1000 * spent / polls, polls


async def amain(opts: argparse.Namespace) -> None:
    ways = {"scan": 0.0, "keys": FULL_SCAN_EVERY_S}
    for batches in (int(n) for n in opts.batches.split(",")):
        name = new_database_name("bench_ckpt")
        dsn = await create_database(opts.admin_dsn, name)
        try:
            await build_history(dsn, batches)
            for round_no in range(1, opts.rounds + 1):
                for way, every in ways.items():
                    per_s, per_poll, polls = await idle_cost(dsn, opts.seconds, every)
                    print(
                        f"batches {batches:>9,}  round {round_no}  {way:<5}  PostgreSQL {per_s:7.2f} ms/s"
                        f"  {per_poll:6.3f} ms per checkpoint poll  ({polls} polls)",
                        flush=True,
                    )
        finally:
            await drop_database(opts.admin_dsn, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="40000,200000", help="history sizes, comma-separated")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--admin-dsn", default=DEFAULT_ADMIN_DSN)
    asyncio.run(amain(parser.parse_args()))


if __name__ == "__main__":
    main()
