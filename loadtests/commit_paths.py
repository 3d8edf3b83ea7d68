"""The two ways `store.writer.commit_batch` writes a group commit, compared by batch size.

Usage::

    python -m loadtests.commit_paths [--sizes 8,25,100] [--journals 8000] [--rounds 5] [--limit N]

For each size, alternating the two paths ``--rounds`` times, a fresh ``bench_pgc_*`` database (the
node's migrations, 2,500 asset accounts with a USD balance each) gets ``--journals`` two-line
journals in signed batches of that size, written one after the other on one connection:

- ``statement``: `commit_batch` as the shards call it (a batch of at most
  `store.writer.ONE_STATEMENT_MAX` journals on known accounts is one statement; ``--limit`` sets
  another limit for this path, to measure the statement above the default);
- ``transaction``: the same with that limit at 0 (BEGIN, COPY journals, COPY lines, the batch row,
  the balances upsert, COMMIT: the path of every larger batch).

It prints the median, over the rounds, of the writer's CPU (this process) and of the PostgreSQL
backend's CPU (from ``/proc``, so PostgreSQL must run on this machine) per commit and per journal.
CPU rather than time, so that a shared machine still gives comparable figures; the first 10
batches of each run are a warm-up and not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import time
from datetime import UTC, datetime

import asyncpg

import store.writer
from loadtests.baseline import scratch_database
from loadtests.pg_commit import DEFAULT_ADMIN_DSN, _batch, _seed
from store.migrations import apply_migrations
from store.repository import SERVER_SETTINGS

WARM_UP = 10
PATHS = ("statement", "transaction")


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run(admin_dsn: str, size: int, journals: int, path: str, limit: int) -> tuple[float, float]:
    """Write ``journals`` journals in batches of ``size`` by ``path`` (``statement`` up to ``limit``
    journals): (writer, backend) CPU seconds per commit."""
    rng = random.Random(1)
    accounts = [f"asset:acct-{i}" for i in range(2500)]
    batches = WARM_UP + max(1, journals // size)
    default = store.writer.ONE_STATEMENT_MAX
    store.writer.ONE_STATEMENT_MAX = limit if path == "statement" else 0
    try:
        async with scratch_database(admin_dsn, "bench_pgc") as dsn:
            conn = await asyncpg.connect(dsn, server_settings=SERVER_SETTINGS)
            try:
                await apply_migrations(conn)
                await _seed(conn, accounts)
                backend = await conn.fetchval("SELECT pg_backend_pid()")
                rows = [_batch(n, size, 1 + n * size, accounts, rng) for n in range(batches)]
                now = datetime.now(UTC)
                for number, batch in enumerate(rows, start=1):  # signed, as the shards' batches are
                    batch.batch = (
                        number,
                        batch.j_seq[0],
                        batch.j_seq[-1],
                        b"{}",
                        b"r" * 32,
                        b"s" * 64,
                        "k",
                        now,
                    )
                for batch in rows[:WARM_UP]:
                    await store.writer.commit_batch(conn, batch)
                pg, mine = _cpu_s(backend), time.process_time()
                for batch in rows[WARM_UP:]:
                    await store.writer.commit_batch(conn, batch)
                pg, mine = _cpu_s(backend) - pg, time.process_time() - mine
            finally:
                await conn.close()
    finally:
        store.writer.ONE_STATEMENT_MAX = default
    counted = batches - WARM_UP
    return mine / counted, pg / counted


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    p = argparse.ArgumentParser(prog="python -m loadtests.commit_paths", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--sizes", default="8,25,100", help="journals per batch, comma-separated (default 8,25,100)"
    )
    p.add_argument("--journals", type=int, default=8000, help="journals per run (default 8000)")
    p.add_argument(
        "--rounds", type=int, default=5, help="runs of each path per size, alternating (default 5)"
    )
    p.add_argument(
        "--limit",
        type=int,
        default=store.writer.ONE_STATEMENT_MAX,
        help=f"one-statement limit of the statement path (default {store.writer.ONE_STATEMENT_MAX})",
    )
    p.add_argument("--admin-dsn", default=os.environ.get("BENCH_ADMIN_DSN", DEFAULT_ADMIN_DSN))
    a = p.parse_args(argv)
    sizes = [int(s) for s in a.sizes.split(",")]
    if any(s < 1 for s in sizes) or a.journals < 1 or a.rounds < 1:
        p.error("sizes, --journals and --rounds must be positive")
    print(f"one-statement limit: {a.limit} journals; CPU us, median of {a.rounds} runs")
    for size in sizes:
        runs: dict[str, list[tuple[float, float]]] = {path: [] for path in PATHS}
        for _ in range(a.rounds):
            for path in PATHS:
                runs[path].append(asyncio.run(run(a.admin_dsn, size, a.journals, path, a.limit)))
        for path in PATHS:
            writer = 1e6 * statistics.median(r[0] for r in runs[path])
            backend = 1e6 * statistics.median(r[1] for r in runs[path])
            print(
                f"size {size:>4} {path:<11} writer {writer:7.0f} per commit ({writer / size:5.1f}/journal)"
                f"   PostgreSQL {backend:7.0f} per commit ({backend / size:5.1f}/journal)",
                flush=True,
            )


if __name__ == "__main__":
    main()
