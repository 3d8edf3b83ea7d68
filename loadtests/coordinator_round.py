"""In-process micro-benchmark of the cross-shard coordinator's rounds (no Ray, no HTTP, no signing).

Usage::

    python -m loadtests.coordinator_round [--rounds 6] [--size 8190] [--accounts 500]
                                          [--keyed 0.5] [--rounds-max 2] [--admin-dsn DSN]

Steps:

1. A fresh ``bench_coord_*`` database gets the node's migrations and a slot map of four shards
   (a quarter of the slots each).
2. Four real ``ShardEngine``s and one ``CoordinatorEngine`` start on it in this process, the
   coordinator calling the engines directly (as ``tests/integration/test_coordinator_pipeline.py``
   builds them). The collector is tuned as in the actors (``actors.gc_policy.tune_gc``).
3. ``--rounds`` + 1 calls of ``--size`` two-shard journals are built up front (debit a revenue
   account of one shard, credit an asset account of another, always fundable; a ``--keyed`` share
   carries an idempotency key). The first call is a warm-up (it creates the accounts); the others
   are submitted together, so the coordinator runs ``--rounds-max`` rounds in flight, as under load.
4. It prints, per measured round, the mean wall-clock milliseconds of each coordinator phase
   (``CoordinatorEngine.phase_s``; rounds overlap, so the phases of two rounds run at the same
   time and their sum exceeds the elapsed time), the journals/s from the first submit to the last
   answer, and the CPU milliseconds per round of this process (shards included), of the
   coordinator pool's PostgreSQL backends and of the other backends (shards, read from
   ``/proc``, so PostgreSQL must run on this machine); then it drops the database.

Run it before and after a change to ``actors/coordinator_engine.py``; the machine may be shared,
so compare medians of a few runs. Run it from the repository root.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import time
from typing import Any

import asyncpg

from actors.coordinator_engine import CoordinatorEngine
from actors.gc_policy import tune_gc
from actors.messages import ENCODER, RESULTS, CrossItem
from actors.shard_engine import ShardEngine
from ledger.journal import JournalIn, Line, LineIn, validate_journal
from loadtests.baseline import scratch_database
from sharding.slots import SLOT_COUNT, slot_of
from signer.canonical import request_hash
from store import repository
from store.migrations import apply_migrations

DEFAULT_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/test"
SHARDS = 4
PRINCIPAL = "service:bench"
PHASES = ("decode", "lookup", "intents", "prepare", "decide", "send", "done", "answer", "encode")


def _shard(account_id: str) -> int:
    return slot_of(account_id) * SHARDS // SLOT_COUNT


def _accounts(prefix: str, count: int) -> dict[int, list[str]]:
    """`count` account ids per shard, named `prefix` + a number."""
    found: dict[int, list[str]] = {s: [] for s in range(SHARDS)}
    i = 0
    while min(len(v) for v in found.values()) < count:
        candidate = f"{prefix}{i}"
        group = found[_shard(candidate)]
        if len(group) < count:
            group.append(candidate)
        i += 1
    return found


def _payloads(args: argparse.Namespace, rng: random.Random) -> list[bytes]:
    """One msgpack call of `--size` two-shard journals per round, the warm-up round first."""
    debits = _accounts("revenue:bench-r", args.accounts)
    credits = _accounts("asset:bench-a", args.accounts)
    calls: list[bytes] = []
    for r in range(args.rounds + 1):
        items: list[CrossItem] = []
        for n in range(args.size):
            first, second = rng.sample(range(SHARDS), 2)
            debit, credit = rng.choice(debits[first]), rng.choice(credits[second])
            journal_id = f"bench-{r}-{n}"
            amount = rng.randint(1, 10_000)
            journal = validate_journal(
                JournalIn(entries=_lines(debit, credit, amount), journal_id=journal_id)
            )
            parts: dict[int, tuple[Line, ...]] = {first: (journal.lines[0],), second: (journal.lines[1],)}
            key = f"key-{r}-{n}" if rng.random() < args.keyed else None
            items.append(CrossItem(journal, journal_id, PRINCIPAL, key, request_hash(journal), parts))
        calls.append(ENCODER.encode(items))
    return calls


_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a local process (0 if it is gone or not readable)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICKS_PER_S


async def _backends(dsn: str) -> dict[int, float]:
    """CPU seconds so far of every PostgreSQL backend connected to the benchmark database."""
    conn = await asyncpg.connect(dsn)
    try:
        pids = await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    finally:
        await conn.close()
    return {r[0]: _cpu_s(r[0]) for r in pids}


def _pool_pids(pool: asyncpg.Pool | None) -> set[int]:
    """Server pids of a pool's open connections (asyncpg internals: a benchmark-only peek)."""
    holders = getattr(pool, "_holders", [])
    return {h._con.get_server_pid() for h in holders if getattr(h, "_con", None) is not None}


def _lines(debit: str, credit: str, amount: int) -> list[LineIn]:
    return [LineIn(debit, "debit", amount, "USD"), LineIn(credit, "credit", amount, "USD")]


async def _migrate(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await apply_migrations(conn)
        await repository.store_slot_map(conn, [(s, s * SHARDS // SLOT_COUNT) for s in range(SLOT_COUNT)])
    finally:
        await conn.close()


async def _run(dsn: str, args: argparse.Namespace, calls: list[bytes]) -> dict[str, Any]:
    await _migrate(dsn)
    quarter = SLOT_COUNT // SHARDS
    engines = [
        ShardEngine(s, dsn, list(range(s * quarter, (s + 1) * quarter)), batch_max=args.size)
        for s in range(SHARDS)
    ]
    for engine in engines:
        await engine.start()
    coordinator = CoordinatorEngine(
        dsn, {e.shard_id: e for e in engines}, batch_max=args.size, rounds_max=args.rounds_max
    )
    await coordinator.start()
    try:
        warm = RESULTS.decode(await coordinator.submit(calls[0]))
        assert all(r.ok for r in warm), next(r for r in warm if not r.ok)
        coordinator.phase_s.clear()
        tune_gc()
        backends = await _backends(dsn)
        cpu, started = time.process_time(), time.perf_counter()
        answers = await asyncio.gather(*(coordinator.submit(c) for c in calls[1:]))
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
        spent = {pid: s - backends.get(pid, 0.0) for pid, s in (await _backends(dsn)).items()}
        mine = _pool_pids(coordinator.pool)
        pg_coordinator = sum(v for pid, v in spent.items() if pid in mine)
        pg_shards = sum(v for pid, v in spent.items() if pid not in mine)
        results = [r for a in answers for r in RESULTS.decode(a)]
        failed = [r for r in results if not r.ok]
        assert not failed, (len(failed), failed[0])
        phases = {p: 1000 * coordinator.phase_s.get(p, 0.0) / args.rounds for p in PHASES}
        return {
            "elapsed_s": elapsed,
            "cpu_s": cpu,
            "pg_coordinator_s": pg_coordinator,
            "pg_shards_s": pg_shards,
            "journals": len(results),
            "phases_ms": phases,
        }
    finally:
        await coordinator.close()
        for engine in engines:
            await engine.close()


async def _main(args: argparse.Namespace) -> None:
    calls = _payloads(args, random.Random(args.seed))
    runs: list[dict[str, Any]] = []
    for _ in range(args.repeat):
        async with scratch_database(args.admin_dsn, "bench_coord") as dsn:
            runs.append(await _run(dsn, args, calls))
    print(f"{args.rounds} rounds of {args.size} two-shard journals, {args.rounds_max} in flight, "
          f"median of {args.repeat} run(s); ms per round:")  # fmt: skip
    for phase in PHASES:
        values = [r["phases_ms"][phase] for r in runs]
        print(f"  {phase:<8} {statistics.median(values):8.1f}   runs: {' '.join(f'{v:.0f}' for v in values)}")
    rates = [r["journals"] / r["elapsed_s"] for r in runs]
    cpus = [1000 * r["cpu_s"] / args.rounds for r in runs]
    print(f"  journals/s {statistics.median(rates):8.0f}   runs: {' '.join(f'{v:.0f}' for v in rates)}")
    print(f"  CPU ms per round: this process (shards included) {statistics.median(cpus):.0f}", end="")
    for key, name in (("pg_coordinator_s", "coordinator's backends"), ("pg_shards_s", "other backends")):
        print(f", {name} {statistics.median(1000 * r[key] / args.rounds for r in runs):.0f}", end="")
    print()


def main() -> None:
    """Parse the arguments and run the benchmark."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=6, help="measured rounds (after one warm-up round)")
    parser.add_argument("--size", type=int, default=8190, help="journals per round")
    parser.add_argument("--accounts", type=int, default=500, help="accounts per shard and side")
    parser.add_argument("--keyed", type=float, default=0.5, help="share of journals with an idempotency key")
    parser.add_argument("--rounds-max", type=int, default=2, help="coordinator rounds in flight")
    parser.add_argument("--repeat", type=int, default=1, help="runs (each on a fresh database)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--admin-dsn", default=DEFAULT_ADMIN_DSN)
    asyncio.run(_main(parser.parse_args()))


if __name__ == "__main__":
    main()
