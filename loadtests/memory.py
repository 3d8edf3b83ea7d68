"""Resident memory per account of a shard's book, and the time a shard takes to (re)start.

Usage::

    python -m loadtests.memory [--accounts 1000000] [--json OUT]

Steps (every step bounded in time):

1. A fresh ``bench_mem_*`` database gets the node's migrations (``store.migrations.apply_migrations``).
2. ``--accounts`` accounts are inserted by COPY, all owned by shard 0 (every slot): half
   ``asset:m-N``, half ``liability:m-N``, each with one USD balance (posted debits/credits > 256, so
   they are real int objects in the book, as after some traffic). ``VACUUM ANALYZE`` follows, as
   autovacuum would have done on a running node.
3. A child process (so its RSS holds nothing but the interpreter, the node's modules and the book)
   constructs ``ShardEngine(0, dsn, all slots)`` without Ray and measures VmRSS before and after
   ``start()`` (exactly what a restarted shard actor runs), the peak RSS, and the wall time of
   ``start()``. It then breaks the book's memory down with ``sys.getsizeof`` and times the two
   loading queries alone (warm cache) to split ``start()`` into PostgreSQL fetch and book building.
4. The database is dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import importlib
import json
import os
import resource
import subprocess
import sys
import time
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import asyncpg

from loadtests.baseline import create_database, drop_database, new_database_name

DEFAULT_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/test"
SLOT_COUNT = 16_384
SHARD = 0
TARGET_BYTES_PER_ACCOUNT = 300
TARGET_RESTART_SECONDS = 10.0
CHILD_TIMEOUT_SECONDS = 600.0
COPY_CHUNK = 200_000


def node_module(name: str) -> Any:
    """Import one of the node's modules (imported, not followed by ``mypy --strict loadtests/...``:
    the node's packages are checked by the project's own mypy configuration, whose relaxations
    ``--strict`` on the command line would undo)."""
    return importlib.import_module(name)


def vm_rss_bytes() -> int:
    """Current resident set size of this process (VmRSS of /proc/self/status)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS not found in /proc/self/status")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def account_id(n: int) -> str:
    """Account number ``n`` (0-based): even numbers are assets, odd ones liabilities."""
    kind = "asset" if n % 2 == 0 else "liability"
    return f"{kind}:m-{n // 2 + 1}"


def account_rows(first: int, last: int) -> Iterator[tuple[str, str, int]]:
    """``(account_id, account_type, slot)`` for accounts ``first..last-1``."""
    for n in range(first, last):
        acct = account_id(n)
        yield acct, acct.split(":", 1)[0], zlib.crc32(acct.encode()) % SLOT_COUNT


def balance_rows(accounts: Iterable[tuple[str, str, int]]) -> Iterator[tuple[str, str, int, int, int]]:
    """One USD balance per account: ``(account_id, currency, slot, debits_posted, credits_posted)``."""
    for i, (acct, _kind, slot) in enumerate(accounts):
        yield acct, "USD", slot, 1_000 + (i * 7_919) % 1_000_000, 500 + (i * 104_729) % 1_000_000


# --------------------------------------------------------------------------------------------------
# parent: database
# --------------------------------------------------------------------------------------------------


async def fill_database(dsn: str, accounts: int) -> float:
    """Apply migrations, insert the accounts and balances of shard 0; return seconds taken."""
    apply_migrations = node_module("store.migrations").apply_migrations
    started = time.monotonic()
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await apply_migrations(conn)
        await conn.execute("INSERT INTO shards (shard_id) VALUES (0)")
        await conn.execute(
            "INSERT INTO slot_map (slot, shard_id) SELECT g, 0 FROM generate_series(0, $1::integer - 1) g",
            SLOT_COUNT,
        )
        for first in range(0, accounts, COPY_CHUNK):
            rows = list(account_rows(first, min(accounts, first + COPY_CHUNK)))
            await conn.copy_records_to_table(
                "accounts", records=rows, columns=["account_id", "account_type", "slot"], timeout=300
            )
            await conn.copy_records_to_table(
                "balances",
                records=list(balance_rows(rows)),
                columns=["account_id", "currency", "slot", "debits_posted", "credits_posted"],
                timeout=300,
            )
        await conn.execute("VACUUM ANALYZE accounts", timeout=300)
        await conn.execute("VACUUM ANALYZE balances", timeout=300)
        count = await conn.fetchval("SELECT count(*) FROM balances")
        if count != accounts:
            raise RuntimeError(f"expected {accounts} balances, found {count}")
    finally:
        await conn.close()
    return time.monotonic() - started


# --------------------------------------------------------------------------------------------------
# child: the measurement
# --------------------------------------------------------------------------------------------------


def book_breakdown(book: Any) -> dict[str, int]:
    """Bytes of the book by structure (``Book.footprint()``: ``sys.getsizeof`` of its dict,
    id strings, row ints and array columns; shared objects such as small ints not counted)."""
    result: dict[str, int] = book.footprint()
    return result


async def child_measure(dsn: str, accounts: int) -> dict[str, Any]:
    """Start a ShardEngine for shard 0 over every slot; measure RSS and the time of ``start()``."""
    ShardEngine = node_module("actors.shard_engine").ShardEngine
    repository = node_module("store.repository")

    slots = list(range(SLOT_COUNT))
    engine = ShardEngine(SHARD, dsn, slots)
    gc.collect()
    rss_before = vm_rss_bytes()
    started = time.perf_counter()
    await engine.start()
    start_s = time.perf_counter() - started
    peak = peak_rss_bytes()
    gc.collect()
    rss_after = vm_rss_bytes()
    # Free heap memory glibc keeps after the loading (asyncpg records are freed when start() returns).
    trimmed = ctypes.CDLL("libc.so.6").malloc_trim(0) if sys.platform == "linux" else 0
    rss_trimmed = vm_rss_bytes()
    loaded = len(engine.book.accounts)
    balances = len(engine.book.balances)
    await engine.close()
    breakdown = book_breakdown(engine.book)
    # The two loading queries alone (warm cache), to split start() into fetch and book building.
    conn = await asyncpg.connect(dsn, server_settings=repository.SERVER_SETTINGS)
    try:
        t0 = time.perf_counter()
        account_records = await repository.load_accounts(conn, slots)
        t1 = time.perf_counter()
        balance_records = await repository.load_balances(conn, slots)
        t2 = time.perf_counter()
        del account_records, balance_records
    finally:
        await conn.close()
    return {
        "accounts": accounts,
        "loaded_accounts": loaded,
        "loaded_balances": balances,
        "rss_before_bytes": rss_before,
        "rss_after_bytes": rss_after,
        "rss_peak_bytes": peak,
        "rss_after_malloc_trim_bytes": rss_trimmed,
        "malloc_trim_released": bool(trimmed),
        "bytes_per_account_after_malloc_trim": (rss_trimmed - rss_before) / accounts if accounts else 0.0,
        "bytes_per_account": (rss_after - rss_before) / accounts if accounts else 0.0,
        "peak_bytes_per_account": (peak - rss_before) / accounts if accounts else 0.0,
        "start_seconds": start_s,
        "fetch_accounts_seconds": t1 - t0,
        "fetch_balances_seconds": t2 - t1,
        "breakdown_bytes": breakdown,
        "breakdown_bytes_per_account": {k: v / accounts for k, v in breakdown.items()} if accounts else {},
    }


def run_child(dsn: str, accounts: int) -> dict[str, Any]:
    """Run :func:`child_measure` in a fresh interpreter and return its JSON result."""
    cmd = [sys.executable, "-m", "loadtests.memory", "--child-dsn", dsn, "--accounts", str(accounts)]
    repo_root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        cmd, cwd=repo_root, capture_output=True, text=True, timeout=CHILD_TIMEOUT_SECONDS, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"child failed ({done.returncode}):\n{done.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


# --------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------


def report(result: dict[str, Any]) -> str:
    """Human-readable summary of one measurement."""
    n = result["accounts"]
    mib = 1024 * 1024
    lines = [
        f"accounts: {n:,} (loaded {result['loaded_accounts']:,} accounts, "
        f"{result['loaded_balances']:,} balances)",
        f"RSS before start(): {result['rss_before_bytes'] / mib:,.1f} MiB, after: "
        f"{result['rss_after_bytes'] / mib:,.1f} MiB, peak: {result['rss_peak_bytes'] / mib:,.1f} MiB",
        f"bytes per account: {result['bytes_per_account']:,.0f} resident after start "
        f"(target <= {TARGET_BYTES_PER_ACCOUNT}), {result['peak_bytes_per_account']:,.0f} at peak, "
        f"{result['bytes_per_account_after_malloc_trim']:,.0f} after malloc_trim(0)",
        f"start(): {result['start_seconds']:.2f} s (target <= {TARGET_RESTART_SECONDS:.0f} s at 1,000,000); "
        f"queries alone (warm): accounts {result['fetch_accounts_seconds']:.2f} s, "
        f"balances {result['fetch_balances_seconds']:.2f} s",
        "book breakdown (sys.getsizeof, bytes per account):",
    ]
    for key, value in result["breakdown_bytes_per_account"].items():
        lines.append(f"  {key:<68} {value:>8.1f}")
    return "\n".join(lines)


async def parent(admin_dsn: str, accounts: int) -> dict[str, Any]:
    """Fresh database, fill it, measure in a child, drop the database."""
    name = new_database_name("bench_mem")
    dsn = await create_database(admin_dsn, name)
    try:
        print(f"filling {name} with {accounts:,} accounts ...", flush=True)
        filled = await fill_database(dsn, accounts)
        print(f"filled in {filled:.1f} s; measuring in a child process ...", flush=True)
        result = await asyncio.to_thread(run_child, dsn, accounts)
        result["fill_seconds"] = filled
        return result
    finally:
        await drop_database(admin_dsn, name)


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    p = argparse.ArgumentParser(prog="python -m loadtests.memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--accounts", type=int, default=1_000_000)
    p.add_argument("--admin-dsn", default=os.environ.get("BENCH_ADMIN_DSN", DEFAULT_ADMIN_DSN))
    p.add_argument("--json", dest="json_out", type=Path, help="also write the result as JSON here")
    p.add_argument("--child-dsn", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.accounts < 1 or a.accounts > 20_000_000:
        p.error("--accounts must be in 1..20,000,000")
    if a.child_dsn:
        print(json.dumps(asyncio.run(child_measure(a.child_dsn, a.accounts))))
        return
    result = asyncio.run(parent(a.admin_dsn, a.accounts))
    print(report(result))
    if a.json_out:
        a.json_out.parent.mkdir(parents=True, exist_ok=True)
        a.json_out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
