"""Plain-SQL baseline: the fastest obvious way to do double-entry transfers in PostgreSQL.

One transfer is one transaction: INSERT into ``transfers`` plus two ``UPDATE accounts`` statements,
issued in account-id order so that concurrent transfers lock rows in a global order and can never
deadlock. ``connections`` asyncpg connections run transfers back to back for ``seconds`` seconds in a
freshly created database (``bench_*``) that is dropped afterwards.

Usage::

    import asyncio
    from loadtests.baseline import run_baseline
    print(asyncio.run(run_baseline("postgresql://postgres@127.0.0.1:5432/test", 5)))
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import asyncpg

#: Hard cap on transfers per connection, so the loop is bounded in count as well as in time.
MAX_OPS_PER_CONNECTION = 50_000_000
#: A worker gives up after this many failed transactions (there should be none).
MAX_ERRORS_PER_CONNECTION = 100
#: Extra time allowed beyond ``seconds`` before the run is cancelled.
GRACE_SECONDS = 30.0

SCHEMA_SQL = """
CREATE TABLE accounts (id bigint PRIMARY KEY, balance bigint NOT NULL);
CREATE TABLE transfers (
    id bigserial PRIMARY KEY,
    debit bigint,
    credit bigint,
    amount bigint,
    created_at timestamptz DEFAULT now()
);
"""
SEED_SQL = "INSERT INTO accounts (id, balance) SELECT g, 0 FROM generate_series(1, $1::bigint) AS g"
INSERT_SQL = "INSERT INTO transfers (debit, credit, amount) VALUES ($1, $2, $3)"
UPDATE_SQL = "UPDATE accounts SET balance = balance + $2 WHERE id = $1"


@dataclass(slots=True)
class BenchResult:
    """Outcome of one benchmark scenario."""

    name: str
    ops: int
    seconds: float
    per_second: float
    p50_ms: float
    p99_ms: float
    errors: int = 0
    extra: dict[str, object] = field(default_factory=dict)


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of an ascending sequence (0.0 for an empty one)."""
    if not sorted_values:
        return 0.0
    rank = max(1, min(len(sorted_values), round(pct / 100.0 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


def make_result(
    name: str, ops: int, seconds: float, latencies_s: list[float], errors: int = 0, **extra: object
) -> BenchResult:
    """Build a :class:`BenchResult` from raw per-operation latencies in seconds."""
    lat = sorted(latencies_s)
    return BenchResult(
        name=name,
        ops=ops,
        seconds=round(seconds, 3),
        per_second=round(ops / seconds, 1) if seconds > 0 else 0.0,
        p50_ms=round(percentile(lat, 50) * 1000.0, 3),
        p99_ms=round(percentile(lat, 99) * 1000.0, 3),
        errors=errors,
        extra=dict(extra),
    )


def dsn_with_database(dsn: str, database: str) -> str:
    """Return ``dsn`` with its database (URL path) replaced by ``database``."""
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))


def new_database_name(prefix: str = "bench") -> str:
    """Return a fresh, valid, quote-safe database name, such as ``bench_3f2a9c1d0b7e``."""
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


async def create_database(admin_dsn: str, name: str) -> str:
    """Create database ``name`` (must start with ``bench_``) and return a DSN pointing at it."""
    if not name.startswith("bench_") or not name.replace("_", "").isalnum():
        raise ValueError(f"refusing to create non-benchmark database {name!r}")
    conn = await asyncpg.connect(admin_dsn, timeout=10)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return dsn_with_database(admin_dsn, name)


async def drop_database(admin_dsn: str, name: str) -> None:
    """Drop benchmark database ``name``, disconnecting any leftover sessions."""
    if not name.startswith("bench_"):
        raise ValueError(f"refusing to drop non-benchmark database {name!r}")
    conn = await asyncpg.connect(admin_dsn, timeout=10)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@asynccontextmanager
async def scratch_database(admin_dsn: str, prefix: str = "bench") -> AsyncIterator[str]:
    """Context manager yielding the DSN of a fresh ``bench_*`` database that is dropped on exit."""
    name = new_database_name(prefix)
    dsn = await create_database(admin_dsn, name)
    try:
        yield dsn
    finally:
        await drop_database(admin_dsn, name)


async def prepare_schema(dsn: str, accounts: int) -> None:
    """Create the baseline tables and seed ``accounts`` zero-balance accounts."""
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.execute(SCHEMA_SQL)
        await conn.execute(SEED_SQL, accounts)
        await conn.execute("ANALYZE accounts")
    finally:
        await conn.close()


def pick_pair(rng: random.Random, accounts: int, hot: bool) -> tuple[int, int]:
    """Choose (debit, credit) account ids; in hot mode the credit side is always account 1."""
    if hot:
        return rng.randint(2, accounts), 1
    debit = rng.randint(1, accounts)
    credit = rng.randint(1, accounts - 1)
    return debit, credit + 1 if credit >= debit else credit


async def transfer(conn: asyncpg.Connection, debit: int, credit: int, amount: int) -> None:
    """Run one transfer transaction, updating the two accounts in ascending id order."""
    first, second = sorted(((debit, -amount), (credit, amount)))
    async with conn.transaction():
        await conn.execute(INSERT_SQL, debit, credit, amount)
        await conn.execute(UPDATE_SQL, first[0], first[1])
        await conn.execute(UPDATE_SQL, second[0], second[1])


@dataclass(slots=True)
class WorkerStats:
    """Per-connection counters collected by :func:`worker`."""

    ops: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)


async def worker(dsn: str, deadline: float, accounts: int, hot: bool, seed: int) -> WorkerStats:
    """Run transfers on one connection until ``deadline`` (``time.perf_counter`` based)."""
    stats = WorkerStats()
    rng = random.Random(seed)
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        for _ in range(MAX_OPS_PER_CONNECTION):
            if time.perf_counter() >= deadline or stats.errors >= MAX_ERRORS_PER_CONNECTION:
                break
            debit, credit = pick_pair(rng, accounts, hot)
            started = time.perf_counter()
            try:
                await transfer(conn, debit, credit, rng.randint(1, 10_000))
            except asyncpg.PostgresError:
                stats.errors += 1
                continue
            stats.latencies.append(time.perf_counter() - started)
            stats.ops += 1
    finally:
        await conn.close()
    return stats


async def check_balances(dsn: str) -> int:
    """Sum of all balances; double entry means it must be exactly zero."""
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        return int(await conn.fetchval("SELECT coalesce(sum(balance), 0) FROM accounts"))
    finally:
        await conn.close()


async def run_workers(dsn: str, seconds: float, connections: int, accounts: int, hot: bool) -> BenchResult:
    """Run ``connections`` workers against a prepared database and aggregate their results."""
    started = time.perf_counter()
    deadline = started + seconds
    tasks = [worker(dsn, deadline, accounts, hot, seed=1000 + i) for i in range(connections)]
    all_stats = await asyncio.wait_for(asyncio.gather(*tasks), timeout=seconds + GRACE_SECONDS)
    elapsed = time.perf_counter() - started
    latencies = [lat for s in all_stats for lat in s.latencies]
    name = "baseline-hot" if hot else "baseline"
    return make_result(
        name,
        ops=sum(s.ops for s in all_stats),
        seconds=elapsed,
        latencies_s=latencies,
        errors=sum(s.errors for s in all_stats),
        connections=connections,
        accounts=accounts,
        balance_sum=await check_balances(dsn),
    )


async def run_baseline(
    admin_dsn: str,
    seconds: float,
    connections: int = 8,
    accounts: int = 10_000,
    hot: bool = False,
) -> BenchResult:
    """Create a scratch database, run the plain-SQL transfer benchmark in it, and drop it."""
    if accounts < 2:
        raise ValueError("need at least 2 accounts")
    async with scratch_database(admin_dsn) as dsn:
        await prepare_schema(dsn, accounts)
        return await run_workers(dsn, seconds, connections, accounts, hot)


def main() -> None:
    """Tiny CLI: ``python -m loadtests.baseline [DSN] [SECONDS]`` runs uniform and hot baselines."""
    import sys

    dsn = sys.argv[1] if len(sys.argv) > 1 else "postgresql://postgres@127.0.0.1:5432/test"
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 5.0
    for hot in (False, True):
        print(asyncio.run(run_baseline(dsn, seconds, hot=hot)))


if __name__ == "__main__":
    main()
