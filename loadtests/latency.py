"""Light-load latency of single-shard journals: an open-loop client at a fixed rate.

Usage::

    python -m loadtests.latency [--rate 50] [--seconds 60] [--warmup 5] [--shards 4] [--json OUT]
                                [--probe-seconds 10] [--py-spy DIR]

Steps (every step bounded in time and count):

1. A fresh ``bench_lat_*`` database is created and ``ledger-node serve`` is started as a subprocess
   (signing and audit events on, as in :mod:`loadtests.bench`); ``GET /ready`` must answer 200.
2. ``post``: one single-shard journal (both accounts on one shard) is POSTed to ``/ledger/post``
   every ``1/rate`` seconds on a fixed schedule, over keep-alive connections, without waiting for
   earlier answers (open loop). A request's latency runs from its *scheduled* send time to its
   response, so a stalled client or server cannot hide queueing (no coordinated omission). Requests
   scheduled in the first ``--warmup`` seconds are not counted.
3. Probes at the same rate, for ``--probe-seconds`` each, to split the latency from outside:
   ``GET /health`` (HTTP and aiohttp only) and ``GET /ready`` (one PostgreSQL round trip plus one
   Ray call to every shard actor and the coordinator, concurrently).
4. The node's own ``ledger_post_latency_seconds{endpoint="post"}`` histogram (handler: decode,
   validate, Ray call, group commit; not the audit event, not HTTP) is scraped before and after
   the ``post`` window and its difference reported.
5. With ``--py-spy DIR``, ``py-spy record`` (raw collapsed stacks) samples the front end, one shard
   actor and the signer actor during the ``post`` window; the top frames are printed.
6. The node gets SIGTERM (SIGKILL after 20 s), the database is dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgspec

from loadtests.baseline import create_database, drop_database, new_database_name, percentile
from loadtests.bench import (
    AUTH_HEADERS,
    DEFAULT_ADMIN_DSN,
    DEFAULT_NODE_BIN,
    BenchError,
    NodeProcess,
    account_pairs,
    free_port,
    make_journal,
    print_node_tail,
    start_node,
    stop_node,
    wait_ready,
)

TARGET_P99_MS = 15.0
REQUEST_TIMEOUT_S = 10.0
DRAIN_GRACE_S = REQUEST_TIMEOUT_S + 5.0
MAX_REQUESTS = 1_000_000
OK_PATTERN = re.compile(rb'"ok"\s*:\s*true')
PY_SPY = Path(sys.executable).parent / "py-spy"
PY_SPY_RATE = 200
HISTOGRAM_LINE = re.compile(
    r'^ledger_post_latency_seconds_(bucket|sum|count)\{(?=[^}]*endpoint="post")(?:[^}]*le="([^"]+)")?[^}]*\}'
    r"\s+(\S+)$"
)


# --------------------------------------------------------------------------------------------------
# the open-loop client
# --------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Phase:
    """Outcome of one open-loop phase."""

    name: str
    rate: float
    seconds: float
    scheduled: int = 0
    count: int = 0
    errors: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    send_lag_ms: list[float] = field(default_factory=list)
    first_error: str = ""

    def summary(self) -> dict[str, Any]:
        """count, errors and p50/p90/p99/max latency; p99 of the client's own send lag."""
        lat = sorted(self.latencies_ms)
        lag = sorted(self.send_lag_ms)
        return {
            "name": self.name,
            "rate": self.rate,
            "seconds": self.seconds,
            "count": self.count,
            "errors": self.errors,
            "p50_ms": round(percentile(lat, 50), 2),
            "p90_ms": round(percentile(lat, 90), 2),
            "p99_ms": round(percentile(lat, 99), 2),
            "max_ms": round(lat[-1], 2) if lat else 0.0,
            "mean_ms": round(sum(lat) / len(lat), 2) if lat else 0.0,
            "send_lag_p99_ms": round(percentile(lag, 99), 2),
            "send_lag_max_ms": round(lag[-1], 2) if lag else 0.0,
            "first_error": self.first_error,
        }


async def one_request(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    body: bytes | None,
    scheduled: float,
    counted: bool,
    phase: Phase,
) -> None:
    """Send one request; if ``counted``, record latency from ``scheduled`` (perf_counter seconds)."""
    if counted:
        phase.send_lag_ms.append((time.perf_counter() - scheduled) * 1000.0)
    ok = False
    detail = ""
    try:
        async with session.request(
            method,
            url,
            data=body,
            headers=AUTH_HEADERS,
            timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S),
        ) as resp:
            payload = await resp.read()
            ok = resp.status == 200 and (body is None or OK_PATTERN.search(payload) is not None)
            detail = f"HTTP {resp.status}: {payload[:300]!r}"
    except (aiohttp.ClientError, TimeoutError) as exc:
        detail = repr(exc)
    done = time.perf_counter()
    if not counted:
        return
    phase.count += 1
    if ok:
        phase.latencies_ms.append((done - scheduled) * 1000.0)
    else:
        phase.errors += 1
        phase.first_error = phase.first_error or detail


async def open_loop(
    session: aiohttp.ClientSession,
    name: str,
    method: str,
    url: str,
    bodies: list[bytes] | None,
    rate: float,
    seconds: float,
    warmup: float,
) -> Phase:
    """Send ``rate`` requests per second for ``warmup + seconds`` on a fixed schedule (open loop)."""
    phase = Phase(name=name, rate=rate, seconds=seconds)
    total = min(MAX_REQUESTS, round((warmup + seconds) * rate))
    if bodies is not None and len(bodies) < total:
        raise BenchError(f"{len(bodies)} bodies for {total} requests")
    interval = 1.0 / rate
    start = time.perf_counter() + 0.1
    tasks: set[asyncio.Task[None]] = set()
    for i in range(total):
        scheduled = start + i * interval
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        counted = i * interval >= warmup
        phase.scheduled += counted
        body = bodies[i] if bodies is not None else None
        task = asyncio.create_task(one_request(session, method, url, body, scheduled, counted, phase))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        _done, pending = await asyncio.wait(tasks, timeout=DRAIN_GRACE_S)
        for task in pending:
            task.cancel()
        phase.errors += len(pending)
    return phase


# --------------------------------------------------------------------------------------------------
# node-side histogram and py-spy
# --------------------------------------------------------------------------------------------------


async def scrape_post_histogram(session: aiohttp.ClientSession, base_url: str) -> dict[str, float]:
    """``ledger_post_latency_seconds{endpoint="post"}``: bucket upper bound (or sum/count) -> value."""
    async with session.get(f"{base_url}/metrics", timeout=aiohttp.ClientTimeout(total=10)) as resp:
        text = await resp.text()
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = HISTOGRAM_LINE.match(line)
        if m:
            kind, le, value = m.groups()
            out[le if kind == "bucket" else kind] = float(value)
    return out


def histogram_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """Cumulative bucket counts and mean of the window between two scrapes."""
    count = after.get("count", 0.0) - before.get("count", 0.0)
    total = after.get("sum", 0.0) - before.get("sum", 0.0)
    buckets = {le: after[le] - before.get(le, 0.0) for le in after if le not in {"count", "sum"}}
    share = {
        f"<= {float(le) * 1000:g} ms": round(n / count, 4)
        for le, n in buckets.items()
        if count and le != "+Inf"
    }
    return {"count": int(count), "mean_ms": round(total / count * 1000, 2) if count else 0.0, "share": share}


def descendants(root: int) -> list[tuple[int, str]]:
    """(pid, cmdline) of every process below ``root``."""
    children: dict[int, list[int]] = {}
    cmdlines: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
        cmdlines[int(entry.name)] = cmd
    out: list[tuple[int, str]] = []
    stack = [root]
    for _ in range(100_000):
        if not stack:
            break
        for child in children.get(stack.pop(), []):
            out.append((child, cmdlines.get(child, "")))
            stack.append(child)
    return out


def profile_targets(node: NodeProcess) -> dict[str, int]:
    """The front end, the first shard actor and the signer actor of ``node`` (by Ray process title)."""
    targets = {"frontend": node.proc.pid}
    for pid, cmd in sorted(descendants(node.proc.pid)):
        for label, title in (("shard", "ray::ShardActor"), ("signer", "ray::SignerActor")):
            if label not in targets and cmd.startswith(title):
                targets[label] = pid
    return targets


def start_py_spy(targets: dict[str, int], seconds: float, out_dir: Path) -> list[subprocess.Popen[bytes]]:
    """Start one ``py-spy record`` (raw collapsed stacks, non-blocking) per target."""
    procs = []
    for label, pid in targets.items():
        cmd = [str(PY_SPY), "record", "-p", str(pid), "-d", str(round(seconds)), "-r", str(PY_SPY_RATE)]
        cmd += ["--nonblocking", "-f", "raw", "-o", str(out_dir / f"{label}.txt")]
        log = (out_dir / f"{label}.py-spy.log").open("wb")
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
        log.close()
    return procs


def summarise_profile(path: Path, requests: int, top: int = 15) -> dict[str, Any]:
    """Self and inclusive sample counts per function of a raw py-spy file, and CPU ms per request."""
    self_counts: Counter[str] = Counter()
    incl_counts: Counter[str] = Counter()
    samples = 0
    try:
        text = path.read_text()
    except OSError:
        return {"error": f"no profile at {path}"}
    for line in text.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        frames = [
            f.split(" (")[0] + " (" + f.rsplit("/", 1)[-1] if " (" in f else f for f in stack.split(";")
        ]
        samples += count
        self_counts[frames[-1]] += count
        for frame in set(frames):
            incl_counts[frame] += count
    cpu_ms = samples * 1000.0 / PY_SPY_RATE
    return {
        "samples": samples,
        "active_ms_per_request": round(cpu_ms / requests, 3) if requests else 0.0,
        "self": [(f, round(c / samples, 3)) for f, c in self_counts.most_common(top)] if samples else [],
        "inclusive": [(f, round(c / samples, 3)) for f, c in incl_counts.most_common(top)] if samples else [],
    }


# --------------------------------------------------------------------------------------------------
# run
# --------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Options:
    """Parsed command-line options."""

    rate: float
    seconds: float
    warmup: float
    shards: int
    accounts: int
    probe_seconds: float
    py_spy: Path | None
    json_out: Path | None
    admin_dsn: str
    node_bin: Path
    port: int
    ready_timeout: float


def parse_args(argv: list[str] | None = None) -> Options:
    """Parse the command line into :class:`Options`."""
    p = argparse.ArgumentParser(prog="python -m loadtests.latency", description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", type=float, default=50.0, help="journals per second")
    p.add_argument("--seconds", type=float, default=60.0, help="measured seconds (after the warm-up)")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds sent but not counted")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--accounts", type=int, default=10_000)
    p.add_argument("--probe-seconds", type=float, default=10.0, help="seconds per /health, /ready probe")
    p.add_argument("--py-spy", type=Path, help="record py-spy profiles into this directory")
    p.add_argument("--json", dest="json_out", type=Path, help="also write results as JSON here")
    p.add_argument("--admin-dsn", default=os.environ.get("BENCH_ADMIN_DSN", DEFAULT_ADMIN_DSN))
    p.add_argument("--node-bin", type=Path, default=DEFAULT_NODE_BIN)
    p.add_argument("--port", type=int, default=0, help="node port (default: a free one)")
    p.add_argument("--ready-timeout", type=float, default=120.0)
    a = p.parse_args(argv)
    if not 0 < a.rate <= 10_000 or not 0 < a.seconds <= 3_600 or not 0 <= a.warmup <= 600:
        p.error("need 0 < --rate <= 10000, 0 < --seconds <= 3600, 0 <= --warmup <= 600")
    if a.accounts < 2 or a.probe_seconds < 0 or a.probe_seconds > 600:
        p.error("need --accounts >= 2 and 0 <= --probe-seconds <= 600")
    return Options(
        rate=a.rate, seconds=a.seconds, warmup=a.warmup, shards=a.shards, accounts=a.accounts,
        probe_seconds=a.probe_seconds, py_spy=a.py_spy, json_out=a.json_out, admin_dsn=a.admin_dsn,
        node_bin=a.node_bin, port=a.port or free_port(), ready_timeout=a.ready_timeout,
    )  # fmt: skip


def journal_bodies(opts: Options, run_id: str) -> list[bytes]:
    """One unique single-shard journal body per scheduled request."""
    rng = random.Random(0x1A7E)
    pairs = account_pairs(rng, opts.accounts, opts.shards, cross=False)
    total = min(MAX_REQUESTS, round((opts.warmup + opts.seconds) * opts.rate))
    out = []
    for i in range(total):
        debit, credit = rng.choice(pairs)
        out.append(
            msgspec.json.encode(make_journal(f"lat-{run_id}-{i}", debit, credit, rng.randint(1, 10_000)))
        )
    return out


async def drive(opts: Options, node: NodeProcess, run_id: str) -> dict[str, Any]:
    """Wait for readiness, run the post phase (optionally profiled), then the probes."""
    waited = await wait_ready(node, opts.ready_timeout)
    print(f"node ready after {waited:.1f}s at {node.base_url}", flush=True)
    bodies = journal_bodies(opts, run_id)
    connector = aiohttp.TCPConnector(limit=256, keepalive_timeout=60)
    out: dict[str, Any] = {}
    async with aiohttp.ClientSession(connector=connector) as session:
        before = await scrape_post_histogram(session, node.base_url)
        spies: list[subprocess.Popen[bytes]] = []
        if opts.py_spy is not None:
            opts.py_spy.mkdir(parents=True, exist_ok=True)
            targets = profile_targets(node)
            print(f"py-spy targets: {targets}", flush=True)
            out["py_spy_targets"] = targets
        print(f"post: {opts.rate:g}/s for {opts.warmup:g}+{opts.seconds:g} s (open loop) ...", flush=True)
        post_task = asyncio.create_task(
            open_loop(
                session, "post", "POST", f"{node.base_url}/ledger/post", bodies,
                opts.rate, opts.seconds, opts.warmup,
            )
        )  # fmt: skip
        if opts.py_spy is not None:
            await asyncio.sleep(opts.warmup + 0.1)
            spies = start_py_spy(out["py_spy_targets"], opts.seconds, opts.py_spy)
        post = await post_task
        after = await scrape_post_histogram(session, node.base_url)
        for spy in spies:
            try:
                await asyncio.to_thread(spy.wait, 60)
            except subprocess.TimeoutExpired:
                spy.kill()
        phases = [post]
        for name, path in (("health", "/health"), ("ready", "/ready")):
            if opts.probe_seconds > 0:
                print(f"{name}: GET {path} {opts.rate:g}/s for {opts.probe_seconds:g} s ...", flush=True)
                phases.append(
                    await open_loop(
                        session, name, "GET", f"{node.base_url}{path}", None,
                        opts.rate, opts.probe_seconds, min(opts.warmup, 2.0),
                    )
                )  # fmt: skip
    out["phases"] = [p.summary() for p in phases]
    out["server_post_histogram"] = histogram_delta(before, after)
    if opts.py_spy is not None:
        out["profiles"] = {
            label: summarise_profile(opts.py_spy / f"{label}.txt", post.count)
            for label in out["py_spy_targets"]
        }
    return out


async def amain(opts: Options) -> int:
    """Fresh database, node, measurement, clean-up; print the table and return the exit code."""
    run_id = uuid.uuid4().hex[:8]
    db_name = new_database_name("bench_lat")
    dsn = await create_database(opts.admin_dsn, db_name)
    try:
        with tempfile.TemporaryDirectory(prefix="ledger-latency-") as tmp:
            node = start_node(opts.node_bin, opts.port, opts.shards, dsn, Path(tmp))
            try:
                result = await drive(opts, node, run_id)
            except BaseException as exc:
                print_node_tail(node, f"latency run failed: {exc!r}")
                raise
            finally:
                code = await stop_node(node)
                print(f"node stopped (exit code {code})", flush=True)
    finally:
        await drop_database(opts.admin_dsn, db_name)
    print(report(result, opts))
    if opts.json_out:
        meta = {**{k: str(v) for k, v in asdict(opts).items()}, "cpus": os.cpu_count(), "time": time.ctime()}
        opts.json_out.parent.mkdir(parents=True, exist_ok=True)
        opts.json_out.write_text(json.dumps({"meta": meta, **result}, indent=2))
    post = result["phases"][0]
    return 1 if post["errors"] else 0


def report(result: dict[str, Any], opts: Options) -> str:
    """Text table of the phases, the node histogram and the profiles."""
    header = f"{'phase':<8} | {'count':>6} | {'errors':>6} | {'p50 ms':>7} | {'p90 ms':>7} | {'p99 ms':>7} | "
    header += f"{'max ms':>8} | {'client lag p99':>14}"
    rows = [header, "-" * len(header)]
    for p in result["phases"]:
        rows.append(
            f"{p['name']:<8} | {p['count']:>6} | {p['errors']:>6} | {p['p50_ms']:>7.2f} | "
            f"{p['p90_ms']:>7.2f} | {p['p99_ms']:>7.2f} | {p['max_ms']:>8.2f} | {p['send_lag_p99_ms']:>14.2f}"
        )
    post = result["phases"][0]
    rows.append(
        f"\ntarget: p99 <= {TARGET_P99_MS:g} ms at {opts.rate:g} journals/s; "
        f"measured p99 {post['p99_ms']:.2f} ms "
        f"({post['p99_ms'] / TARGET_P99_MS:.2f}x the target)"
    )
    if post["first_error"]:
        rows.append(f"first error: {post['first_error']}")
    hist = result["server_post_histogram"]
    rows.append(
        f"node histogram (handler: decode..Ray call..group commit, no audit/HTTP): {hist['count']} requests, "
        f"mean {hist['mean_ms']} ms, cumulative {hist['share']}"
    )
    for label, prof in result.get("profiles", {}).items():
        if "error" in prof:
            rows.append(f"\nprofile {label}: {prof['error']}")
            continue
        rows.append(
            f"\nprofile {label}: {prof['samples']} active samples at {PY_SPY_RATE} Hz, "
            f"{prof['active_ms_per_request']} ms active per post request"
        )
        rows.append("  self:      " + "; ".join(f"{f} {s:.1%}" for f, s in prof["self"][:10]))
        rows.append("  inclusive: " + "; ".join(f"{f} {s:.1%}" for f, s in prof["inclusive"][:15]))
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    opts = parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(asyncio.run(amain(opts)))


if __name__ == "__main__":
    main()
