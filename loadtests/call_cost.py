"""CPU cost of one call into an actor: a Ray actor call against a direct call (actors/direct.py).

Usage::

    python -m loadtests.call_cost [--calls 3000] [--concurrency 8] [--payload 200]

Starts a local Ray instance and one async actor serving an echo method both ways, then makes
``--calls`` calls each way (``--concurrency`` in flight, a ``--payload``-byte argument) and prints
calls/s and the CPU microseconds per call spent by the caller, by the actor process and by Ray's
own daemons (raylet, GCS), read from `/proc` (psutil) around each run. This is the price every
group commit paid per hop before the hot calls went direct (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import psutil  # type: ignore[import-untyped]

from actors.call_probe import EchoPort
from actors.runtime import start_ray, stop_ray


def _cpu(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


def _daemons() -> float:
    total = 0.0
    for proc in psutil.process_iter(["cmdline"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
            if "raylet" in cmdline or "gcs_server" in cmdline:
                total += _cpu(proc)
        except psutil.Error:
            continue
    return total


async def _measure(label: str, call: Any, calls: int, concurrency: int, actor: psutil.Process) -> None:
    me = psutil.Process()
    gate = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with gate:
            await call()

    await asyncio.gather(*(one() for _ in range(min(calls, 200))))  # warm-up
    before = (_cpu(me), _cpu(actor), _daemons())
    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(calls)))
    elapsed = time.perf_counter() - started
    after = (_cpu(me), _cpu(actor), _daemons())
    caller, callee, daemons = ((a - b) * 1e6 / calls for a, b in zip(after, before, strict=True))
    print(
        f"{label:<12} {calls / elapsed:>9,.0f} calls/s   CPU us per call: caller {caller:>6.0f}"
        f"  actor {callee:>6.0f}  ray daemons {daemons:>5.0f}  all {caller + callee + daemons:>6.0f}",
        flush=True,
    )


async def amain(calls: int, concurrency: int, payload: bytes) -> None:
    port = EchoPort()
    proc = psutil.Process(await port.pid())
    await _measure("ray call", lambda: port.via_ray(payload), calls, concurrency, proc)
    await _measure("direct call", lambda: port.direct_call(payload), calls, concurrency, proc)


def main(argv: list[str] | None = None) -> None:
    """Parse the arguments, start Ray, measure both ways."""
    p = argparse.ArgumentParser(prog="python -m loadtests.call_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=3000)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--payload", type=int, default=200, help="argument size in bytes")
    a = p.parse_args(argv)
    start_ray()
    try:
        asyncio.run(amain(a.calls, a.concurrency, b"x" * a.payload))
    finally:
        stop_ray()


if __name__ == "__main__":
    main()
