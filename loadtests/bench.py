"""End-to-end throughput benchmark of a Ledger Node against the plain-SQL baseline.

Usage::

    python -m loadtests.bench [--quick] [--seconds S] [--shards 4] [--accounts 10000] [--json OUT]

Steps (every step bounded in time):

1. ``baseline``: :func:`loadtests.baseline.run_baseline` (uniform; ``--hot-baseline`` adds the hot
   variant) in its own scratch database, before the node is started so they do not compete for CPU.
2. Each node scenario below gets its own fresh ``bench_node_*`` database and its own
   ``ledger-node serve`` subprocess (``DATABASE_URL``,
   ``LEDGER_API_TOKENS=benchtoken=service,benchadmin=admin``; ``GET /ready`` must answer 200), so
   no scenario runs on the rows an earlier one wrote (``--shared-node`` runs them one after the
   other on one node and database instead, as the benchmark did until the eighth session).
3. ``batch``: ``--batch-clients`` aiohttp clients POST ``/ledger/post_batch`` with ``--batch-size``
   single-shard journals (both accounts on one shard) for S seconds; journals acknowledged
   ``ok: true`` are counted, and the rate of every 5 s is printed (does it hold as the database
   grows?). ``batch-cross`` does the same with every journal spanning two shards (two-phase commit
   through the coordinator).
4. ``single``: ``wrk`` with ``loadtests/single.lua`` POSTs one single-shard journal per request to
   ``/ledger/post`` (account pairs from a file the bench writes).
4a. ``batch-hot``: the same batches, but every journal credits one hot account
   (``revenue:platform-fee``, created first as a split account) from asset accounts on every shard.
4b. ``batch-unsigned``: a node with ``LEDGER_SIGNING=off`` runs ``batch`` again, so the
   cost of signing is a ratio measured in the same invocation.
5. Each node gets SIGTERM (SIGKILL after 20 s) after its scenario, its database is dropped, and one
   table is printed at the end.

After each node's scenarios it also prints the CPU microseconds each process group (front end,
Ray actors, Ray's own processes, PostgreSQL backends, the load generator) spent per acknowledged
journal (`loadtests.cpu_meter`): on a shared machine that comparison holds when throughput does not.

The load generators run on the same machine as the node and PostgreSQL, so they take CPU from them;
request bodies are pre-generated before the timed window to keep that cost small.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import aiohttp
import msgspec

from loadtests.baseline import (
    BenchResult,
    create_database,
    drop_database,
    make_result,
    new_database_name,
    run_baseline,
)
from loadtests.cpu_meter import CpuMeter
from sharding.slots import SlotMap, even_slot_map

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_NODE_BIN = REPO_ROOT / ".venv" / "bin" / "ledger-node"
DEFAULT_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/test"
LUA_SCRIPT = Path(__file__).resolve().parent / "single.lua"
Pair = tuple[str, str]
HOST = "127.0.0.1"
TOKEN = "benchtoken"
ADMIN_TOKEN = "benchadmin"
TOKEN_SPEC = f"{TOKEN}=service,{ADMIN_TOKEN}=admin"
AUTH_HEADERS = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}

READY_POLL_SECONDS = 0.5
STOP_GRACE_SECONDS = 20.0
BATCH_BODY_BUDGET_BYTES = 256 * 1024 * 1024
BATCH_TEMPLATES = 4
MAX_REQUESTS_PER_CLIENT = 1_000_000
MAX_CONSECUTIVE_FAILURES = 5
WRK_EXTRA_SECONDS = 60.0
ID_TOKEN = b"~~~~~~~~~~"  # replaced per request by a 10-digit request number; never occurs otherwise
CPU_NOTE = (
    "note: load generators (aiohttp clients, wrk) share the machine's {cpus} CPU core(s) with the node, "
    "its Ray workers and PostgreSQL; node figures are therefore a lower bound."
)


class BenchError(RuntimeError):
    """A benchmark step failed in a way that makes its numbers meaningless."""


# --------------------------------------------------------------------------------------------------
# journals and request bodies
# --------------------------------------------------------------------------------------------------


def make_journal(journal_id: str, debit: str, credit: str, amount: int) -> dict[str, Any]:
    """Build one two-line journal (integer minor units) in the node's request shape."""
    return {
        "journal_id": journal_id,
        "entries": [
            {"account_id": debit, "side": "debit", "amount_cents": amount, "currency": "USD"},
            {"account_id": credit, "side": "credit", "amount_cents": amount, "currency": "USD"},
        ],
        "context": {"source": "bench"},
    }


def account_pairs(
    rng: random.Random, accounts: int, shards: int, cross: bool, count: int = 4096
) -> list[Pair]:
    """(debit, credit) account pairs over `asset:acct-N` / `liability:acct-N`, N in 1..accounts.

    With `cross` False both accounts of a pair live on the same shard (a single-shard journal,
    committed by one shard's group commit); with `cross` True they live on two different shards
    (a cross-shard journal, through the coordinator's two-phase commit). The slot map is the
    node's initial even map for `shards` shards.
    """
    slot_map = SlotMap(even_slot_map(shards))
    by_shard: dict[int, list[str]] = {shard: [] for shard in range(shards)}
    for n in range(1, accounts + 1):
        for kind in ("asset", "liability"):
            account = f"{kind}:acct-{n}"
            by_shard[slot_map.shard_of(account)].append(account)
    pairs: list[Pair] = []
    for _ in range(count):
        shard = rng.randrange(shards)
        other = (shard + 1 + rng.randrange(shards - 1)) % shards if cross and shards > 1 else shard
        pairs.append((rng.choice(by_shard[shard]), rng.choice(by_shard[other])))
    return pairs


HOT_ACCOUNT = "revenue:platform-fee"


def hot_pairs(rng: random.Random, accounts: int, shards: int, count: int = 4096) -> list[Pair]:
    """Pairs whose credit side is always the one hot account (`revenue:platform-fee`).

    Debits are drawn from all `asset:acct-N` accounts, on every shard, as a marketplace's fee
    account sees them. The scenario creates the hot account as a split account first
    (`create_hot_account`), so each journal is single-shard on its debit account's shard;
    without the split every journal off the fee account's home shard would be cross-shard.
    """
    del shards  # every shard takes part
    return [(f"asset:acct-{rng.randint(1, accounts)}", HOT_ACCOUNT) for _ in range(count)]


async def create_hot_account(base_url: str) -> None:
    """`POST /accounts` the hot account as a split account (admin token); 201 or 200 if it exists."""
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"}
    body = json.dumps({"account_id": HOT_ACCOUNT, "policy": {"split": True}})
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{base_url}/accounts", data=body, headers=headers) as resp,
    ):
        if resp.status not in (200, 201):
            raise BenchError(f"creating the split hot account failed: {resp.status} {await resp.text()}")


def random_journal(rng: random.Random, journal_id: str, pairs: list[Pair]) -> dict[str, Any]:
    """Build a journal over a randomly chosen account pair."""
    debit, credit = rng.choice(pairs)
    return make_journal(journal_id, debit, credit, rng.randint(1, 10_000))


def batch_template(rng: random.Random, run_id: str, pairs: list[Pair], size: int) -> bytes:
    """Encode a ``post_batch`` body whose journal ids contain :data:`ID_TOKEN` as a placeholder."""
    token = ID_TOKEN.decode()
    journals = [random_journal(rng, f"b-{run_id}-{token}-{i}", pairs) for i in range(size)]
    body = msgspec.json.encode({"journals": journals})
    if body.count(ID_TOKEN) != size:
        raise BenchError("journal id placeholder collided with body content")
    return body


class BatchBodies:
    """Source of unique ``post_batch`` bodies: a pre-generated pool, then cheap on-the-fly copies.

    Body ``n`` is template ``n % K`` with :data:`ID_TOKEN` replaced by ``n`` as 10 digits, so every
    journal id in the run is unique. The pool is built before the timed window; if the node outruns
    it, further bodies cost one ``bytes.replace`` (about a millisecond for 8,190 journals).
    """

    def __init__(
        self, run_id: str, pairs: list[Pair], size: int, budget_bytes: int = BATCH_BODY_BUDGET_BYTES
    ) -> None:
        """Pre-generate templates and as many finished bodies as ``budget_bytes`` allows."""
        rng = random.Random(0xB47C)
        self.size = size
        self._templates = [batch_template(rng, run_id, pairs, size) for _ in range(BATCH_TEMPLATES)]
        self._counter = itertools.count()
        pool_len = max(1, budget_bytes // len(self._templates[0]))
        self._pool: deque[bytes] = deque(self._render(next(self._counter)) for _ in range(pool_len))
        self.prebuilt = pool_len
        self.generated_live = 0

    @property
    def body_bytes(self) -> int:
        """Size in bytes of one body."""
        return len(self._templates[0])

    def _render(self, n: int) -> bytes:
        """Materialise body number ``n``."""
        return self._templates[n % len(self._templates)].replace(ID_TOKEN, b"%010d" % n)

    def next(self) -> bytes:
        """Return the next unique body."""
        if self._pool:
            return self._pool.popleft()
        self.generated_live += 1
        return self._render(next(self._counter))


class _ItemResult(msgspec.Struct):
    """One entry of ``results`` in a ``post_batch`` response (other fields ignored)."""

    ok: bool = False


class _BatchResponse(msgspec.Struct):
    """The parts of a ``post_batch`` response the benchmark needs."""

    ok: bool = False
    results: list[_ItemResult] = msgspec.field(default_factory=list)


BATCH_DECODER = msgspec.json.Decoder(_BatchResponse)


def count_ok(body: bytes) -> int:
    """Count the journals with ``ok: true`` in a ``post_batch`` response body (0 if undecodable)."""
    try:
        decoded = BATCH_DECODER.decode(body)
    except msgspec.DecodeError:
        return 0
    return sum(1 for r in decoded.results if r.ok)


# --------------------------------------------------------------------------------------------------
# node process management
# --------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class NodeProcess:
    """A running ``ledger-node serve`` subprocess and where its output goes."""

    proc: subprocess.Popen[bytes]
    base_url: str
    log_dir: Path

    @property
    def stderr_path(self) -> Path:
        """File receiving the node's stderr."""
        return self.log_dir / "node.stderr"

    @property
    def stdout_path(self) -> Path:
        """File receiving the node's stdout."""
        return self.log_dir / "node.stdout"


def free_port() -> int:
    """Ask the kernel for a currently free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def tail(path: Path, lines: int = 40) -> str:
    """Last ``lines`` lines of a text file ('' if missing)."""
    try:
        with path.open("rb") as fh:
            return b"".join(deque(fh, maxlen=lines)).decode(errors="replace")
    except OSError:
        return ""


def start_node(
    node_bin: Path, port: int, shards: int, dsn: str, log_dir: Path, extra_env: dict[str, str] | None = None
) -> NodeProcess:
    """Start ``ledger-node serve`` in its own process group with output going to ``log_dir``."""
    if not node_bin.exists():
        raise BenchError(f"node executable not found: {node_bin}")
    env = dict(os.environ, DATABASE_URL=dsn, LEDGER_API_TOKENS=TOKEN_SPEC, **(extra_env or {}))
    data_dir = log_dir / "data"
    cmd = [str(node_bin), "serve", "--host", HOST, "--port", str(port), "--shards", str(shards)]
    cmd += ["--data-dir", str(data_dir)]
    print(f"starting node: {' '.join(cmd)}  (logs in {log_dir})", flush=True)
    with (log_dir / "node.stdout").open("wb") as out, (log_dir / "node.stderr").open("wb") as err:
        proc = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL, start_new_session=True
        )
    return NodeProcess(proc=proc, base_url=f"http://{HOST}:{port}", log_dir=log_dir)


async def probe_ready(session: aiohttp.ClientSession, url: str) -> int | None:
    """One ``GET /ready``; returns the status or ``None`` if the connection failed."""
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as resp:
            await resp.read()
            return resp.status
    except (aiohttp.ClientError, TimeoutError):
        return None


async def wait_ready(node: NodeProcess, limit_s: float) -> float:
    """Poll ``/ready`` until it answers 200; return seconds waited. Raises on timeout or node exit."""
    started = time.monotonic()
    url = f"{node.base_url}/ready"
    last: int | None = None
    async with aiohttp.ClientSession() as session:
        for _ in range(int(limit_s / READY_POLL_SECONDS) + 1):
            if node.proc.poll() is not None:
                raise BenchError(f"node exited with code {node.proc.returncode} before becoming ready")
            last = await probe_ready(session, url)
            if last == 200:
                return time.monotonic() - started
            if time.monotonic() - started > limit_s:
                break
            await asyncio.sleep(READY_POLL_SECONDS)
    raise BenchError(f"node not ready after {limit_s:.0f}s (last /ready status: {last})")


async def stop_node(node: NodeProcess) -> int | None:
    """SIGTERM the node, wait up to 20 s, then SIGKILL its process group; return its exit code."""
    proc = node.proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        for _ in range(int(STOP_GRACE_SECONDS / 0.2)):
            if proc.poll() is not None:
                break
            await asyncio.sleep(0.2)
    if proc.poll() is None:
        print("node ignored SIGTERM for 20 s; sending SIGKILL", file=sys.stderr)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await asyncio.to_thread(proc.wait, 10)
    return proc.returncode


def print_node_tail(node: NodeProcess, why: str) -> None:
    """Print the tail of the node's stderr (and stdout) to help diagnose ``why``."""
    print(f"\n--- {why}; node stderr tail ({node.stderr_path}) ---", file=sys.stderr)
    print(tail(node.stderr_path) or "(empty)", file=sys.stderr)
    out = tail(node.stdout_path, 15)
    if out:
        print(f"--- node stdout tail ({node.stdout_path}) ---\n{out}", file=sys.stderr)


# --------------------------------------------------------------------------------------------------
# smoke check
# --------------------------------------------------------------------------------------------------


async def post_json(
    session: aiohttp.ClientSession, url: str, body: bytes, limit_s: float
) -> tuple[int, bytes]:
    """POST a pre-encoded JSON body with the bench token; return (status, response body)."""
    async with session.post(
        url, data=body, headers=AUTH_HEADERS, timeout=aiohttp.ClientTimeout(total=limit_s)
    ) as resp:
        return resp.status, await resp.read()


async def smoke_single(base_url: str, run_id: str, pairs: list[Pair]) -> None:
    """Post one journal untimed (also a warm-up); raise with the response if it is not ok."""
    single = msgspec.json.encode(random_journal(random.Random(7), f"w-{run_id}-0", pairs))
    async with aiohttp.ClientSession() as session:
        status, body = await post_json(session, f"{base_url}/ledger/post", single, 30)
    if status != 200 or not re.search(rb'"ok"\s*:\s*true', body):
        raise BenchError(f"/ledger/post smoke check failed: HTTP {status} {body[:500]!r}")


async def smoke_batch(base_url: str, bodies: BatchBodies) -> None:
    """Post one full-size batch untimed (also a warm-up); raise with the response if not all ok."""
    async with aiohttp.ClientSession() as session:
        status, body = await post_json(session, f"{base_url}/ledger/post_batch", bodies.next(), 300)
        if status == 413:
            raise BenchError(
                f"/ledger/post_batch: 413 for a {bodies.body_bytes} byte body "
                "(aiohttp client_max_size too small on the node?)"
            )
        ok = count_ok(body)
        if status != 200 or ok != bodies.size:
            raise BenchError(
                f"/ledger/post_batch smoke check: HTTP {status}, {ok}/{bodies.size} ok; {body[:500]!r}"
            )


# --------------------------------------------------------------------------------------------------
# batch scenario
# --------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class BatchStats:
    """Counters shared by the batch clients (single event loop, so no locking needed)."""

    ok_journals: int = 0
    failed_journals: int = 0
    failed_requests: int = 0
    requests: int = 0
    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    first_error: str = ""


async def batch_request(
    session: aiohttp.ClientSession, url: str, body: bytes, size: int, stats: BatchStats
) -> bool:
    """Send one batch of ``size`` journals, record latency and outcome; True if all were ok."""
    started = time.perf_counter()
    try:
        status, payload = await post_json(session, url, body, limit_s=300)
    except (aiohttp.ClientError, TimeoutError) as exc:
        stats.failed_requests += 1
        stats.failed_journals += size
        stats.first_error = stats.first_error or repr(exc)
        return False
    stats.latencies.append(time.perf_counter() - started)
    stats.requests += 1
    stats.statuses[status] = stats.statuses.get(status, 0) + 1
    ok = count_ok(payload) if status == 200 else 0
    stats.ok_journals += ok
    stats.failed_journals += size - ok
    if ok != size:
        stats.first_error = stats.first_error or f"HTTP {status}: {payload[:300]!r}"
    return ok == size


async def batch_client(
    session: aiohttp.ClientSession, url: str, bodies: BatchBodies, deadline: float, stats: BatchStats
) -> None:
    """Post batches back to back until ``deadline``; stop early after repeated failures."""
    consecutive_failures = 0
    for _ in range(MAX_REQUESTS_PER_CLIENT):
        if time.perf_counter() >= deadline or consecutive_failures >= MAX_CONSECUTIVE_FAILURES:
            return
        ok = await batch_request(session, url, bodies.next(), bodies.size, stats)
        consecutive_failures = 0 if ok else consecutive_failures + 1


PROGRESS_EVERY_S = 5.0
"""Interval of the acknowledged-journals series a batch scenario records and prints."""


async def record_progress(stats: BatchStats, series: list[int], every_s: float = PROGRESS_EVERY_S) -> None:
    """Append the journals acknowledged in each ``every_s`` interval to ``series`` until cancelled,
    so a run shows whether its rate holds or drifts (for instance as the database grows)."""
    last = stats.ok_journals
    while True:
        await asyncio.sleep(every_s)
        series.append(stats.ok_journals - last)
        last = stats.ok_journals


async def run_batch(
    base_url: str, seconds: float, clients: int, bodies: BatchBodies, name: str = "batch"
) -> BenchResult:
    """Run the ``batch`` scenario; journals/s counts only journals acknowledged with ``ok: true``."""
    stats = BatchStats()
    series: list[int] = []
    url = f"{base_url}/ledger/post_batch"
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()
        deadline = started + seconds
        progress = asyncio.create_task(record_progress(stats, series))
        tasks = [batch_client(session, url, bodies, deadline, stats) for _ in range(clients)]
        try:
            await asyncio.wait_for(asyncio.gather(*tasks), timeout=seconds + 330)
        finally:
            progress.cancel()
        elapsed = time.perf_counter() - started
    rates = ", ".join(f"{n / PROGRESS_EVERY_S:,.0f}" for n in series)
    print(f"{name}: journals/s per {PROGRESS_EVERY_S:.0f} s: {rates}", flush=True)
    return make_result(
        name,
        ops=stats.ok_journals,
        seconds=elapsed,
        latencies_s=stats.latencies,
        errors=stats.failed_journals,
        unit="journals/s; latency per request",
        batch_size=bodies.size,
        clients=clients,
        requests=stats.requests,
        failed_requests=stats.failed_requests,
        statuses={str(k): v for k, v in stats.statuses.items()},
        first_error=stats.first_error,
        bodies_prebuilt=bodies.prebuilt,
        bodies_generated_live=bodies.generated_live,
        body_bytes=bodies.body_bytes,
        progress_per_s=[round(n / PROGRESS_EVERY_S, 1) for n in series],
    )


# --------------------------------------------------------------------------------------------------
# single scenario (wrk)
# --------------------------------------------------------------------------------------------------

_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


def parse_duration_ms(text: str) -> float:
    """Convert a wrk duration such as ``812.00us``, ``3.41ms`` or ``1.02s`` to milliseconds."""
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text.strip())
    if not match:
        raise ValueError(f"unrecognised wrk duration {text!r}")
    return float(match.group(1)) * _UNIT_MS[match.group(2)]


def parse_wrk_output(text: str) -> dict[str, Any]:
    """Extract requests/s, p50/p99 (ms), non-2xx and socket errors from wrk's output.

    The ``LEDGER_WRK`` line printed by ``single.lua`` is preferred (exact, in microseconds); wrk's
    human-readable ``--latency`` report is the fallback.
    """
    out: dict[str, Any] = {}
    if m := re.search(r"Requests/sec:\s+([\d.]+)", text):
        out["requests_per_sec"] = float(m.group(1))
    if m := re.search(r"(\d+) requests in ([\d.]+\w+)", text):
        out["requests"], out["duration_ms"] = int(m.group(1)), parse_duration_ms(m.group(2))
    for pct in (50, 90, 99):
        if m := re.search(rf"^\s+{pct}%\s+([\d.]+\w+)\s*$", text, re.MULTILINE):
            out[f"p{pct}_ms"] = parse_duration_ms(m.group(1))
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    out["non2xx"] = int(m.group(1)) if m else 0
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text):
        out["socket_errors"] = dict(
            zip(("connect", "read", "write", "timeout"), map(int, m.groups()), strict=True)
        )
    if m := re.search(r"^LEDGER_WRK (\{.*\})\s*$", text, re.MULTILINE):
        out.update(lua_summary(json.loads(m.group(1))))
    return out


def lua_summary(raw: dict[str, Any]) -> dict[str, Any]:
    """Normalise the ``LEDGER_WRK`` JSON emitted by ``single.lua`` to the parse_wrk_output keys."""
    return {
        "requests": raw["requests"],
        "duration_ms": raw["duration_us"] / 1000.0,
        "p50_ms": raw["p50_us"] / 1000.0,
        "p90_ms": raw["p90_us"] / 1000.0,
        "p99_ms": raw["p99_us"] / 1000.0,
        "max_ms": raw["max_us"] / 1000.0,
        "non2xx": raw["non2xx"],
        "notok": raw["notok"],
        "responses": raw["responses"],
        "socket_errors": {k: raw[f"err_{k}"] for k in ("connect", "read", "write", "timeout")},
    }


def wrk_command(
    url: str, seconds: float, *, connections: int, threads: int, accounts: int, run_id: str, pairs_file: Path
) -> list[str]:
    """Build the wrk command line for the ``single`` scenario."""
    wrk = shutil.which("wrk") or "/usr/bin/wrk"
    duration = f"{max(1, round(seconds))}s"
    return [
        wrk, f"-t{threads}", f"-c{connections}", f"-d{duration}", "--latency", "--timeout", "10s",
        "-s", str(LUA_SCRIPT), url, "--", str(accounts), run_id, TOKEN, str(pairs_file),
    ]  # fmt: skip


async def run_wrk(cmd: list[str], limit_s: float) -> str:
    """Run wrk, returning its stdout; raise :class:`BenchError` on failure or overrun."""
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL
    )
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout=limit_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise BenchError(f"wrk did not finish within {limit_s:.0f}s") from None
    if proc.returncode != 0:
        raise BenchError(f"wrk exited {proc.returncode}: {stderr.decode(errors='replace')[-500:]}")
    return stdout.decode(errors="replace")


async def run_single(
    base_url: str,
    seconds: float,
    *,
    accounts: int,
    run_id: str,
    pairs_file: Path,
    connections: int = 256,
    threads: int = 2,
) -> BenchResult:
    """Run the ``single`` scenario with wrk and turn its report into a :class:`BenchResult`."""
    cmd = wrk_command(
        f"{base_url}/ledger/post",
        seconds,
        connections=connections,
        threads=threads,
        accounts=accounts,
        run_id=run_id,
        pairs_file=pairs_file,
    )
    text = await run_wrk(cmd, limit_s=seconds + WRK_EXTRA_SECONDS)
    print(text.rstrip(), flush=True)
    parsed = parse_wrk_output(text)
    if "requests" not in parsed or "p50_ms" not in parsed:
        raise BenchError(f"could not parse wrk output:\n{text}")
    socket_errors = sum(parsed.get("socket_errors", {}).values())
    bad = parsed["non2xx"] + parsed.get("notok", 0)
    seconds_run = parsed["duration_ms"] / 1000.0
    ok = parsed.get("responses", parsed["requests"]) - bad
    return BenchResult(
        name="single",
        ops=ok,
        seconds=round(seconds_run, 3),
        per_second=round(ok / seconds_run, 1) if seconds_run > 0 else 0.0,
        p50_ms=round(parsed["p50_ms"], 3),
        p99_ms=round(parsed["p99_ms"], 3),
        errors=bad + socket_errors,
        extra={
            "unit": "journals/s (= ok requests/s); latency per request",
            "wrk_requests_per_sec": parsed.get("requests_per_sec"),
            "non2xx": parsed["non2xx"],
            "not_ok_2xx": parsed.get("notok", 0),
            "socket_errors": parsed.get("socket_errors", {}),
            "connections": connections,
            "threads": threads,
            "valid": bad == 0,
            "wrk_output": text,
        },
    )


# --------------------------------------------------------------------------------------------------
# orchestration and reporting
# --------------------------------------------------------------------------------------------------


def format_table(results: list[BenchResult], baseline: BenchResult | None) -> str:
    """Render ``scenario | journals/s | p50 ms | p99 ms | ratio to baseline`` as a text table."""
    header = (
        f"{'scenario':<14} | {'journals/s':>11} | {'p50 ms':>9} | {'p99 ms':>9} | {'ratio to baseline':>17}"
        f" | {'vs batch':>8} | {'journals/commit':>15}"
    )
    rows = [header, "-" * len(header)]
    uniform = next((r for r in results if r.name == "batch"), None)
    for r in results:
        ratio = f"{r.per_second / baseline.per_second:.2f}x" if baseline and baseline.per_second else "n/a"
        versus = (
            f"{r.per_second / uniform.per_second:.2f}x"
            if uniform and uniform.per_second and r.name in ("batch-hot", "batch-cross")
            else ""
        )
        per_commit = r.extra.get("journals_per_commit")
        size = f"{per_commit:.1f}" if isinstance(per_commit, float) else ""
        flag = "" if r.errors == 0 else f"  ({r.errors} errors)"
        rows.append(
            f"{r.name:<14} | {r.per_second:>11,.1f} | {r.p50_ms:>9.2f} | {r.p99_ms:>9.2f} | {ratio:>17}"
            f" | {versus:>8} | {size:>15}{flag}"
        )
    return "\n".join(rows)


NODE_SCENARIOS = ("batch", "batch-cross", "batch-hot", "single")
"""The scenarios run against the signed node, in this order."""


@dataclass(slots=True)
class Options:
    """Parsed command-line options."""

    seconds: float
    shards: int
    accounts: int
    json_out: Path | None
    admin_dsn: str
    node_bin: Path
    port: int
    only: set[str]
    hot_baseline: bool
    shared_node: bool
    batch_size: int
    batch_clients: int
    wrk_connections: int
    wrk_threads: int
    ready_timeout: float


def parse_args(argv: list[str] | None = None) -> Options:
    """Parse the command line into :class:`Options`."""
    p = argparse.ArgumentParser(prog="python -m loadtests.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="10 s per scenario instead of 30 s")
    p.add_argument("--seconds", type=float, help="seconds per scenario (overrides --quick)")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--accounts", type=int, default=10_000)
    p.add_argument("--json", dest="json_out", type=Path, help="also write results as JSON here")
    p.add_argument("--admin-dsn", default=os.environ.get("BENCH_ADMIN_DSN", DEFAULT_ADMIN_DSN))
    p.add_argument("--node-bin", type=Path, default=DEFAULT_NODE_BIN)
    p.add_argument("--port", type=int, default=0, help="node port (default: a free one)")
    p.add_argument(
        "--only",
        action="append",
        choices=("baseline", "batch", "batch-cross", "batch-hot", "single", "batch-unsigned"),
        help="repeatable",
    )
    p.add_argument("--hot-baseline", action="store_true", help="also run the hot-account baseline")
    p.add_argument(
        "--shared-node",
        action="store_true",
        help="run batch, batch-cross, batch-hot and single one after the other on one node and database"
        " (default: each on its own fresh node and database, so none runs on what an earlier one wrote)",
    )
    p.add_argument("--batch-size", type=int, default=8190)
    p.add_argument("--batch-clients", type=int, default=4)
    p.add_argument("--wrk-connections", type=int, default=256)
    p.add_argument("--wrk-threads", type=int, default=2)
    p.add_argument("--ready-timeout", type=float, default=120.0)
    a = p.parse_args(argv)
    seconds = a.seconds if a.seconds is not None else (10.0 if a.quick else 30.0)
    if seconds <= 0 or a.accounts < 2:
        p.error("--seconds must be > 0 and --accounts >= 2")
    return Options(
        seconds=seconds, shards=a.shards, accounts=a.accounts, json_out=a.json_out,
        admin_dsn=a.admin_dsn, node_bin=a.node_bin, port=a.port or free_port(),
        only=set(a.only or ("baseline", "batch", "batch-cross", "batch-hot", "single", "batch-unsigned")),
        hot_baseline=a.hot_baseline, shared_node=a.shared_node,
        batch_size=a.batch_size, batch_clients=a.batch_clients, wrk_connections=a.wrk_connections,
        wrk_threads=a.wrk_threads, ready_timeout=a.ready_timeout,
    )  # fmt: skip


async def run_baselines(opts: Options) -> list[BenchResult]:
    """Run the uniform (and optionally hot) plain-SQL baseline."""
    results = []
    for hot in (False, True) if opts.hot_baseline else (False,):
        label = "hot" if hot else "uniform"
        print(f"running baseline ({label}) for {opts.seconds:.0f}s ...", flush=True)
        results.append(await run_baseline(opts.admin_dsn, opts.seconds, accounts=opts.accounts, hot=hot))
    return results


async def run_node_scenarios(opts: Options, run_id: str, log_dir: Path) -> list[BenchResult]:
    """Create the node database, start the node, run the scenarios, then stop it and drop the database."""
    rng = random.Random(0x5EED)
    same = account_pairs(rng, opts.accounts, opts.shards, cross=False)
    cross = account_pairs(rng, opts.accounts, opts.shards, cross=True)
    hot = hot_pairs(rng, opts.accounts, opts.shards)
    pairs_file = log_dir / "pairs-single-shard.txt"
    pairs_file.write_text("".join(f"{d} {c}\n" for d, c in same))
    budget = BATCH_BODY_BUDGET_BYTES // 2
    bodies = {
        name: BatchBodies(f"{run_id}{suffix}", pairs, opts.batch_size, budget)
        for name, suffix, pairs in (("batch", "", same), ("batch-cross", "x", cross), ("batch-hot", "h", hot))
        if name in opts.only
    }
    for name, batch in bodies.items():
        print(f"{name}: pre-generated {batch.prebuilt} bodies of {batch.body_bytes / 1e6:.1f} MB", flush=True)
    on_node = [n for n in NODE_SCENARIOS if n in opts.only]
    groups = ([on_node] if on_node else []) if opts.shared_node else [[n] for n in on_node]
    results: list[BenchResult] = []
    for group in groups:
        node_dir = log_dir if opts.shared_node else log_dir / group[0]
        node_dir.mkdir(exist_ok=True)
        scenario_bodies = {n: bodies[n] for n in group if n in bodies}
        results += await _one_node(opts, run_id, node_dir, scenario_bodies, set(group), same, pairs_file)
    if "batch-unsigned" in opts.only:
        unsigned = {"batch-unsigned": BatchBodies(f"{run_id}u", same, opts.batch_size, budget)}
        unsigned_dir = log_dir / "unsigned"
        unsigned_dir.mkdir()
        print("starting a node with LEDGER_SIGNING=off for the signing-cost comparison", flush=True)
        results += await _one_node(
            opts, f"{run_id}u", unsigned_dir, unsigned, {"batch-unsigned"}, same, pairs_file,
            {"LEDGER_SIGNING": "off"},
        )  # fmt: skip
    return results


async def _one_node(
    opts: Options,
    run_id: str,
    log_dir: Path,
    bodies: dict[str, BatchBodies],
    scenarios: set[str],
    same: list[Pair],
    pairs_file: Path,
    extra_env: dict[str, str] | None = None,
) -> list[BenchResult]:
    """Start one node on a fresh database, run ``scenarios`` (batch ones with ``bodies``), stop it,
    drop the database."""
    db_name = new_database_name("bench_node")
    dsn = await create_database(opts.admin_dsn, db_name)
    try:
        node = start_node(opts.node_bin, opts.port, opts.shards, dsn, log_dir, extra_env)
        try:
            meter = CpuMeter(node.proc.pid, dsn)
            results = await drive_node(opts, node, run_id, bodies, scenarios, same, pairs_file, meter)
            print("\n" + meter.table() + "\n" + meter.postgres_table(), flush=True)
            return results
        except BaseException as exc:
            print_node_tail(node, f"scenario failed: {exc!r}")
            raise
        finally:
            code = await stop_node(node)
            print(f"node stopped (exit code {code})", flush=True)
    finally:
        await drop_database(opts.admin_dsn, db_name)


async def drive_node(
    opts: Options,
    node: NodeProcess,
    run_id: str,
    bodies: dict[str, BatchBodies],
    scenarios: set[str],
    pairs: list[Pair],
    pairs_file: Path,
    meter: CpuMeter,
) -> list[BenchResult]:
    """Wait for readiness, smoke-check, then run the node scenarios in order, with the CPU per
    acknowledged journal of each (recorded in ``meter`` and in the result's ``cpu_us`` extra)."""
    waited = await wait_ready(node, opts.ready_timeout)
    print(f"node ready after {waited:.1f}s at {node.base_url}", flush=True)
    results = []
    await smoke_single(node.base_url, run_id, pairs)
    for name, batch in bodies.items():
        if name == "batch-hot":
            await create_hot_account(node.base_url)
        await smoke_batch(node.base_url, batch)
        print(f"running {name} ({opts.batch_clients} clients x {opts.batch_size} journals) ...", flush=True)
        before = await commit_counters(node.base_url)
        cpu = await meter.start()
        result = await run_batch(node.base_url, opts.seconds, opts.batch_clients, batch, name)
        result.extra["cpu_us"] = await meter.stop(name, result.ops, cpu)
        results.append(with_commit_size(result, before, await commit_counters(node.base_url)))
    if "single" in scenarios:
        print(f"running single (wrk -t{opts.wrk_threads} -c{opts.wrk_connections}) ...", flush=True)
        before = await commit_counters(node.base_url)
        cpu = await meter.start()
        result = await run_single(
            node.base_url,
            opts.seconds,
            accounts=opts.accounts,
            run_id=run_id,
            pairs_file=pairs_file,
            connections=opts.wrk_connections,
            threads=opts.wrk_threads,
        )
        result.extra["cpu_us"] = await meter.stop("single", result.ops, cpu)
        results.append(with_commit_size(result, before, await commit_counters(node.base_url)))
        lane = result.extra["fast_lane_requests"]
        print(f"single: {lane:,.0f} of {result.ops:,} requests answered by the fast lane")
    return results


Counters = tuple[float, float, float]
_COUNTED: Final = (
    "ledger_shard_group_commits",
    "ledger_shard_committed_journals",
    "ledger_fast_lane_requests_total",
)


async def commit_counters(base_url: str) -> Counters:
    """(group commits, committed journals) summed over the node's shards, and the requests the front
    end's fast lane answered (api/fast_lane.py), from /metrics."""
    async with aiohttp.ClientSession() as session, session.get(f"{base_url}/metrics") as resp:
        text = await resp.text()
    totals = dict.fromkeys(_COUNTED, 0.0)
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in totals:
            totals[name] += float(line.rsplit(" ", 1)[1])
    commits, journals, lane = (totals[name] for name in _COUNTED)
    return commits, journals, lane


def with_commit_size(result: BenchResult, before: Counters, after: Counters) -> BenchResult:
    """Record the scenario's shard group commits, journals (or parts) per commit and fast-lane requests."""
    commits, journals = after[0] - before[0], after[1] - before[1]
    result.extra["group_commits"] = commits
    result.extra["journals_per_commit"] = journals / commits if commits else 0.0
    result.extra["fast_lane_requests"] = after[2] - before[2]
    return result


def write_json(path: Path, opts: Options, results: list[BenchResult], note: str) -> None:
    """Write all results plus run metadata as JSON."""
    meta = {
        "seconds_per_scenario": opts.seconds,
        "shards": opts.shards,
        "accounts": opts.accounts,
        "cpus": os.cpu_count(),
        "note": note,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "results": [asdict(r) for r in results]}, indent=2))


async def amain(opts: Options) -> int:
    """Run the selected scenarios, print the table, and return the process exit code."""
    run_id = uuid.uuid4().hex[:8]
    results: list[BenchResult] = []
    failed = False
    if "baseline" in opts.only:
        results.extend(await run_baselines(opts))
    if opts.only - {"baseline"}:
        with tempfile.TemporaryDirectory(prefix="ledger-bench-") as tmp:
            try:
                results.extend(await run_node_scenarios(opts, run_id, Path(tmp)))
            except (BenchError, TimeoutError, aiohttp.ClientError) as exc:
                print(f"node scenarios failed: {exc!r}", file=sys.stderr)
                failed = True
    note = CPU_NOTE.format(cpus=os.cpu_count())
    baseline = next((r for r in results if r.name == "baseline"), None)
    print("\n" + format_table(results, baseline) + "\n\n" + note)
    invalid = [r.name for r in results if r.errors]
    if invalid:
        print(f"WARNING: runs with errors (not valid): {', '.join(invalid)}")
    if opts.json_out:
        write_json(opts.json_out, opts, results, note)
    return 1 if failed or invalid else 0


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    opts = parse_args(argv)
    try:
        import uvloop
    except ImportError:
        raise SystemExit(asyncio.run(amain(opts))) from None
    raise SystemExit(uvloop.run(amain(opts)))


if __name__ == "__main__":
    main()
