"""CPU spent per item by each process group of a benchmark run, read from `/proc` (psutil).

On a 2-core machine that also runs the load generator (and, often, other work), wall-clock
throughput swings with whatever else runs; the CPU each process spent per journal does not (other
load slows the node but adds no CPU time to its processes). Every benchmark that compares two paths
or two commits therefore prints both.

Groups:

- ``front end``: the node's own process (`ledger-node serve`: aiohttp, the batcher, finance code).
- ``ray actors``: its descendants whose command line starts with ``ray::`` (shards, coordinator,
  signer, audit writer).
- ``ray system``: its other descendants (raylet, GCS, Ray's dashboard and log agents).
- ``postgres``: the backends connected to the node's database (`pg_stat_activity`), read at the
  start and the end of a phase, backend by backend (`spent_between`: one that a pool closed during
  the phase is left out, one it opened counts from zero).
  `postgres_table` splits it by the pools' `application_name` (`ledger-shard-N` -> ``shard``,
  ``api``, ``audit``, ``coordinator``, ``signer``; anything else ``other``).
- ``load generator``: this process and the children it has waited for (`wrk`).
- ``broker``: an optional extra process (the Kafka broker).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Awaitable
from typing import TypeVar

import asyncpg
import psutil  # type: ignore[import-untyped]

GROUPS = ("front end", "ray actors", "ray system", "postgres", "load generator", "broker")
T = TypeVar("T")
PG_PREFIX = "pg "
"""Keys of `spent_between`'s answer that split ``postgres`` by connection (``pg shard``, ``pg api``, ...)."""


def pg_group(application_name: str) -> str:
    """`PG_PREFIX` + the node part a backend serves, from its pool's `application_name`."""
    match = re.fullmatch(r"ledger-([a-z]+)(?:-\d+)?", application_name or "")
    return PG_PREFIX + (match.group(1) if match else "other")


def _seconds(proc: psutil.Process, children: bool = False) -> float:
    try:
        times = proc.cpu_times()
    except psutil.Error:
        return 0.0
    total = times.user + times.system
    if children:
        total += times.children_user + times.children_system
    return float(total)


Reading = dict[tuple[int, float], tuple[tuple[str, ...], float]]
"""CPU seconds so far per process, keyed by (pid, start time), with the group keys it counts in."""


def _reading(proc: psutil.Process, groups: tuple[str, ...], children: bool = False) -> Reading:
    try:
        return {(proc.pid, proc.create_time()): (groups, _seconds(proc, children))}
    except psutil.Error:
        return {}


async def cpu_readings(node_pid: int, dsn: str, broker_pid: int | None = None) -> Reading:
    """CPU seconds so far of every process the groups count (see the module docstring)."""
    reading: Reading = {}
    node = psutil.Process(node_pid)
    reading |= _reading(node, ("front end",))
    for child in node.children(recursive=True):
        try:
            name = " ".join(child.cmdline())
        except psutil.Error:
            continue
        reading |= _reading(child, ("ray actors" if name.startswith("ray::") else "ray system",))
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT pid, application_name FROM pg_stat_activity WHERE datname = current_database()"
        )
        own = conn.get_server_pid()
    finally:
        await conn.close()
    for pid, application_name in rows:
        if pid != own:
            with contextlib.suppress(psutil.Error):
                reading |= _reading(psutil.Process(pid), ("postgres", pg_group(application_name)))
    reading |= _reading(psutil.Process(), ("load generator",), children=True)
    if broker_pid is not None:
        with contextlib.suppress(psutil.Error):
            reading |= _reading(psutil.Process(broker_pid), ("broker",))
    return reading


def spent_between(before: Reading, after: Reading) -> dict[str, float]:
    """CPU seconds per group between two readings, process by process.

    A process that started in between counts from zero. One that ended in between is left out:
    what it spent after `before` cannot be read any more (a pool may close an idle connection
    during a phase). Subtracting totals instead would take its whole history off its group.
    """
    totals = dict.fromkeys(GROUPS, 0.0)
    for key, (groups, seconds) in after.items():
        spent = seconds - before[key][1] if key in before else seconds
        for group in groups:
            totals[group] = totals.get(group, 0.0) + spent
    return totals


class CpuMeter:
    """CPU µs per item of each measured phase, by group (`cpu_readings` before and after)."""

    def __init__(self, node_pid: int, dsn: str, broker_pid: int | None = None, unit: str = "journal") -> None:
        self.node_pid, self.dsn, self.broker_pid, self.unit = node_pid, dsn, broker_pid, unit
        self.phases: dict[str, dict[str, float]] = {}

    async def start(self) -> Reading:
        """A reading to pass to `stop` later."""
        return await cpu_readings(self.node_pid, self.dsn, self.broker_pid)

    async def stop(self, label: str, items: int, before: Reading) -> dict[str, float]:
        """Record the phase `label` that handled `items` items since `before`; its µs per item."""
        spent = spent_between(before, await cpu_readings(self.node_pid, self.dsn, self.broker_pid))
        per = {g: seconds * 1e6 / max(items, 1) for g, seconds in spent.items()}
        self.phases[label] = per
        return per

    async def measure(self, label: str, items: int, phase: Awaitable[T]) -> T:
        """Await `phase` and record its CPU per item (`items` known in advance)."""
        before = await self.start()
        result = await phase
        await self.stop(label, items, before)
        return result

    def table(self) -> str:
        """One row per phase: µs per item for each group that spent any, and the sum."""
        used = [g for g in GROUPS if any(per[g] >= 0.5 for per in self.phases.values())]
        head = f"CPU us per {self.unit}"
        lines = [f"{head:<22}" + "".join(f"{g:>15}" for g in used) + f"{'all':>10}"]
        for label, per in self.phases.items():
            cells = "".join(f"{per[g]:>15.1f}" for g in used)
            lines.append(f"{label:<22}{cells}{sum(per[g] for g in used):>10.1f}")
        return "\n".join(lines)

    def postgres_table(self) -> str:
        """The ``postgres`` column split by connection (`pg_group`): µs per item per phase."""
        used = sorted({k for per in self.phases.values() for k in per if k.startswith(PG_PREFIX)})
        head = f"PostgreSQL us per {self.unit}"
        lines = [f"{head:<26}" + "".join(f"{k.removeprefix(PG_PREFIX):>13}" for k in used)]
        for label, per in self.phases.items():
            lines.append(f"{label:<26}" + "".join(f"{per.get(k, 0.0):>13.1f}" for k in used))
        return "\n".join(lines)
