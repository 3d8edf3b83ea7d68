"""PostgreSQL cost of one shard group commit, measured through the real ``store.writer.commit_batch``.

Usage::

    python -m loadtests.pg_commit [--batches 30] [--size 2000] [--accounts 2500] [--alter SQL ...]

Steps:

1. A fresh ``bench_pgc_*`` database gets the node's migrations (``store.migrations.apply_migrations``),
   one shard, ``--accounts`` asset accounts with a USD balance row each.
2. ``--batches`` batches of ``--size`` two-line single-shard journals (random distinct accounts, a
   32-byte request hash / hash / prev hash, a 200-byte body, no idempotency key) are built the way
   the shard builds them (``BatchRows``, one summed balance delta per account) and written one after
   the other on one connection with ``commit_batch``; only the ``commit_batch`` calls are timed
   (from the first statement to COMMIT returning).
3. It prints the mean cost in microseconds per journal: the wall time of the calls, the CPU the
   connection's PostgreSQL backend spent on them (``utime + stime`` of ``/proc/<pg_backend_pid()>/stat``,
   so the server must run on this host) and the WAL they wrote (``pg_current_wal_lsn()`` before and
   after: cluster-wide, so other writers on the server add to it). Then it drops the database.

``--alter SQL`` (repeatable) runs SQL after the migrations, before the seed: dropping one index or
trigger at a time this way measures what each costs per journal (``docs/benchmarks.md``, "Eighth
session").

No Ray, no HTTP, no signing: this isolates what the database and asyncpg cost per journal, which is
what the schema (indexes, fillfactor) and the writer's statements decide. Run it before and after a
change to the writer or the schema. On the 2-core benchmark machine (PostgreSQL 15, fsync on, see
``docs/benchmarks.md``), ``--batches 50``, median of 5 runs: 28.3 us/journal with migrations 0001-0003
and journals by INSERT ... ON CONFLICT; 19.4 us/journal with 0004 and journals by COPY.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import asyncpg

from loadtests.baseline import scratch_database
from store.migrations import apply_migrations
from store.repository import SERVER_SETTINGS
from store.writer import BatchRows, commit_batch

DEFAULT_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/test"
_BODY = (
    b'{"journal_id":"x","entries":[{"account_id":"asset:acct-1","side":"debit","amount":100,'
    b'"currency":"USD"},{"account_id":"asset:acct-2","side":"credit","amount":100,"currency":"USD"}]}'
)


@dataclass(frozen=True)
class Cost:
    """What the timed ``commit_batch`` calls cost, per journal."""

    wall_us: float
    backend_cpu_us: float | None  # None when the backend's /proc entry is not readable (remote server)
    wal_bytes: float


def _backend_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` so far, or None if /proc does not show it."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14, 15)


async def _seed(conn: asyncpg.Connection, accounts: list[str]) -> None:
    """Shard 0, the accounts and their (zero) USD balances."""
    await conn.execute("INSERT INTO shards (shard_id) VALUES (0)")
    await conn.execute(
        "INSERT INTO accounts (account_id, account_type, slot)"
        " SELECT a, 'asset', 0 FROM unnest($1::text[]) a",
        accounts,
    )
    await conn.execute(
        "INSERT INTO balances (account_id, currency, slot) SELECT a, 'USD', 0 FROM unnest($1::text[]) a",
        accounts,
    )


def _batch(number: int, size: int, first_seq: int, accounts: list[str], rng: random.Random) -> BatchRows:
    """One batch of ``size`` two-line journals, chain positions from ``first_seq``."""
    rows = BatchRows(0)
    now = datetime.now(UTC)
    deltas: dict[str, list[int]] = {}
    for i in range(size):
        journal_id = f"j-{number}-{i}"
        rows.j_id.append(journal_id)
        rows.j_seq.append(first_seq + i)
        rows.j_posted_at.append(now)
        rows.j_effective_at.append(None)
        rows.j_principal.append("service:bench")
        rows.j_idem_key.append(None)
        rows.j_request_hash.append(os.urandom(32))
        rows.j_reverses.append(None)
        rows.j_hash.append(os.urandom(32))
        rows.j_prev_hash.append(os.urandom(32))
        rows.j_body.append(_BODY)
        debit, credit = rng.sample(accounts, 2)
        rows.lines.append((journal_id, 0, 0, debit, "USD", "D", 100, now, False))
        rows.lines.append((journal_id, 1, 0, credit, "USD", "C", 100, now, False))
        deltas.setdefault(debit, [0, 0])[0] += 100
        deltas.setdefault(credit, [0, 0])[1] += 100
    rows.deltas = [(a, "USD", 0, d, c) for a, (d, c) in deltas.items()]
    return rows


async def run(
    admin_dsn: str, batches: int, size: int, accounts_count: int, seed: int, alter: list[str] | None = None
) -> Cost:
    """Write ``batches`` batches of ``size`` journals; return their mean cost per journal."""
    rng = random.Random(seed)
    accounts = [f"asset:acct-{i}" for i in range(accounts_count)]
    async with scratch_database(admin_dsn, "bench_pgc") as dsn:
        conn = await asyncpg.connect(dsn, server_settings=SERVER_SETTINGS)
        try:
            await apply_migrations(conn)
            for sql in alter or []:
                await conn.execute(sql)
            await _seed(conn, accounts)
            pid = await conn.fetchval("SELECT pg_backend_pid()")
            cpu_before, lsn_before = _backend_cpu_s(pid), await conn.fetchval("SELECT pg_current_wal_lsn()")
            spent_s = 0.0
            for number in range(batches):
                rows = _batch(number, size, 1 + number * size, accounts, rng)
                started = time.perf_counter()
                await commit_batch(conn, rows)
                spent_s += time.perf_counter() - started
            cpu_after = _backend_cpu_s(pid)
            wal = await conn.fetchval("SELECT pg_current_wal_lsn() - $1::pg_lsn", lsn_before)
        finally:
            await conn.close()
    journals = batches * size
    cpu_us = None if cpu_before is None or cpu_after is None else 1e6 * (cpu_after - cpu_before) / journals
    return Cost(1e6 * spent_s / journals, cpu_us, float(wal) / journals)


def main(argv: list[str] | None = None) -> None:
    """Parse the arguments, run, print the cost per journal."""
    p = argparse.ArgumentParser(prog="python -m loadtests.pg_commit", description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, default=30, help="group commits to write (default 30)")
    p.add_argument("--size", type=int, default=2000, help="journals per group commit (default 2000)")
    p.add_argument("--accounts", type=int, default=2500, help="accounts the journals touch (default 2500)")
    p.add_argument("--seed", type=int, default=1, help="seed of the account choice (default 1)")
    p.add_argument("--alter", action="append", metavar="SQL", help="SQL to run after the migrations")
    p.add_argument("--admin-dsn", default=os.environ.get("BENCH_ADMIN_DSN", DEFAULT_ADMIN_DSN))
    a = p.parse_args(argv)
    if a.batches < 1 or a.size < 1 or a.accounts < 2:
        p.error("--batches and --size must be >= 1, --accounts >= 2")
    cost = asyncio.run(run(a.admin_dsn, a.batches, a.size, a.accounts, a.seed, a.alter))
    backend = "n/a" if cost.backend_cpu_us is None else f"{cost.backend_cpu_us:.1f}"
    print(
        f"commit_batch: {a.batches} batches x {a.size} journals: {cost.wall_us:.1f} us/journal "
        f"({1e6 / cost.wall_us:,.0f} journals/s on one connection); PostgreSQL backend CPU "
        f"{backend} us/journal; WAL {cost.wal_bytes:.0f} bytes/journal"
    )


if __name__ == "__main__":
    main()
