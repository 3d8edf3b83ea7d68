"""The front end alone over HTTP: CPU per ``POST /ledger/post`` request without actors.

Usage::

    python -m loadtests.frontend_http [--seconds 8] [--connections 256] [--noop | --aiohttp]

No Ray and no shard actors: the real application (``api.app.create_app``: its middleware, the
post handler, ``api.posting.Poster`` and its batchers, the metrics) and the real audit writer
(``store.audit.AuditWriter``, unsigned, answering before its commit as a node does by default) in
a fresh ``bench_*`` database, behind uvloop as ``ledger-node serve`` runs. Each shard port answers
every journal of a call ``ok`` after 2 ms, with msgpack bodies as the direct calls carry. ``wrk``
(``loadtests/single.lua``, one thread, ``--connections``) posts one journal per request for
``--seconds`` after a 2 s warm-up, and the script prints this process's CPU time per request
(user and system): the front end's share of a ``single`` run of ``loadtests.bench`` without the
direct-call sockets. ``--noop`` swaps the post handler for one that reads the body and answers
a constant journal id: what aiohttp, the middleware and the envelope cost by themselves.
The site is the node's default, the fast lane (`api/fast_lane.py`); ``--aiohttp`` serves every
request through aiohttp's full path instead (``LEDGER_FAST_LANE=0``); ``--noop`` implies it.

The machine may be shared: compare CPU per request, alternating runs of the trees compared.
Figures: docs/benchmarks.md, "Eighth session".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import time
from typing import Any

import asyncpg
import msgspec
import uvloop
from aiohttp import web

from actors.gc_policy import tune_gc
from actors.messages import ENCODER, Result
from api import ledger_routes
from api.app import create_app
from api.audit_log import AUDIT_WRITER
from api.auth import Authenticator, parse_tokens
from api.envelope import ok
from api.fast_lane import FastSite
from api.limits import LimitSettings
from api.posting import Poster
from api.services import Services
from loadtests.baseline import create_database, drop_database, new_database_name
from loadtests.bench import DEFAULT_ADMIN_DSN, LUA_SCRIPT, TOKEN, TOKEN_SPEC
from sharding.slots import SlotMap, even_slot_map
from store.audit import AuditWriter
from store.migrations import apply_migrations

POSTED_AT = "2026-11-22T00:41:01.123456Z"
SHARD_DELAY_S = 0.002


class _Item(msgspec.Struct, array_like=True):
    """What a shard reads of a `PostItem` to answer it (the journal stays raw)."""

    journal: msgspec.Raw
    journal_id: str


_items: msgspec.msgpack.Decoder[list[_Item]] = msgspec.msgpack.Decoder(list[_Item])


class InstantShard:
    """A shard (or coordinator) port that answers every journal of a call `ok` after 2 ms."""

    async def post(self, payload: bytes) -> bytes:
        """Answer one call: one ok result with a 32-byte hash per item."""
        await asyncio.sleep(SHARD_DELAY_S)
        digest = bytes(range(32))
        return ENCODER.encode(
            [Result(i.journal_id, True, POSTED_AT, hash=digest) for i in _items.decode(payload)]
        )

    submit = post


async def noop_post(request: web.Request) -> web.Response:
    """`--noop`: read the body, answer a constant journal id."""
    await request.read()
    return ok(journal_id="noop", posted_at=POSTED_AT)


async def serve(dsn: str, noop: bool, lane: bool = True) -> tuple[web.AppRunner, AuditWriter, int]:
    """The application on a free port with its audit writer started; (runner, writer, port). `lane`:
    behind the fast lane (`api.fast_lane.FastSite`) as `ledger-node serve` runs it by default."""
    slot_map = SlotMap(even_slot_map(4))
    shards: dict[int, Any] = {shard: InstantShard() for shard in range(4)}
    coordinator: Any = InstantShard()  # a shard port's `post` as its `submit`; nothing else is called
    services = Services(
        pool=None,  # type: ignore[arg-type]  # the post path reads no table
        slot_map=slot_map,
        shards=shards,
        coordinator=coordinator,
        auth=Authenticator(parse_tokens(TOKEN_SPEC)),
        poster=Poster(slot_map, shards, coordinator),
    )
    if noop:
        ledger_routes.ROUTES[:] = [
            (m, p, noop_post if p == "/ledger/post" else h, r) for m, p, h, r in ledger_routes.ROUTES
        ]
    # No per-token rate limit: on a fast host one wrk connection set outruns the default 20,000/s,
    # and 429s would be measured instead of the post path. The in-flight limits stay the node's.
    app = create_app(services, limits=LimitSettings(rate_per_s=0.0, burst=0))
    app.on_startup.clear()  # the finance and payout tasks need a pool
    app.on_cleanup.clear()
    app.cleanup_ctx.clear()
    writer = AuditWriter(dsn, None, answer_after_commit=False)
    await writer.start()
    app[AUDIT_WRITER] = writer
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site_class = FastSite if lane and not noop else web.TCPSite  # the lane would bypass the no-op handler
    site = site_class(runner, "127.0.0.1", 0, backlog=1024, reuse_address=True)
    await site.start()
    return runner, writer, runner.addresses[0][1]


async def wrk(port: int, seconds: int, connections: int) -> dict[str, Any]:
    """One `wrk` run of `single.lua`; its LEDGER_WRK summary."""
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-s", str(LUA_SCRIPT)]
    cmd += [f"http://127.0.0.1:{port}/ledger/post", "--", "10000", f"fe{time.time_ns()}", TOKEN]
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(), seconds + 30)
    line = next(x for x in out.decode().splitlines() if x.startswith("LEDGER_WRK "))
    return json.loads(line.split(" ", 1)[1])  # type: ignore[no-any-return]


async def measure(a: argparse.Namespace) -> None:
    """Database, application, warm-up, the timed run, the figures; everything torn down."""
    name = new_database_name()
    dsn = await create_database(a.admin_dsn, name)
    try:
        conn = await asyncpg.connect(dsn)
        try:
            await apply_migrations(conn)
        finally:
            await conn.close()
        runner, writer, port = await serve(dsn, a.noop, not a.aiohttp)
        try:
            tune_gc()
            await wrk(port, 2, a.connections)  # warm-up: caches filled, connections open
            before, events = resource.getrusage(resource.RUSAGE_SELF), writer.events
            summary = await wrk(port, a.seconds, a.connections)
            after = resource.getrusage(resource.RUSAGE_SELF)
        finally:
            await runner.cleanup()
            await writer.close()
    finally:
        await drop_database(a.admin_dsn, name)
    report(summary, before, after, writer.events - events)


def report(summary: dict[str, Any], before: Any, after: Any, events: int) -> None:
    """Requests per second and this process's CPU µs per request."""
    n = max(1, summary["requests"])
    user = (after.ru_utime - before.ru_utime) * 1e6 / n
    system = (after.ru_stime - before.ru_stime) * 1e6 / n
    print(
        f"requests {summary['requests']} ({summary['requests'] / (summary['duration_us'] / 1e6):,.0f}/s), "
        f"non-2xx {summary['non2xx']}, not ok {summary['notok']}, audit events {events}"
    )
    print(f"front end CPU per request: {user + system:.1f} us (user {user:.1f}, system {system:.1f})")


def main(argv: list[str] | None = None) -> None:
    """The command line."""
    p = argparse.ArgumentParser(
        prog="python -m loadtests.frontend_http", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--seconds", type=int, default=8, help="timed seconds of wrk (default 8)")
    p.add_argument("--connections", type=int, default=256, help="wrk connections (default 256)")
    p.add_argument(
        "--noop", action="store_true", help="a handler that only reads and answers (aiohttp's path)"
    )
    p.add_argument(
        "--aiohttp", action="store_true", help="no fast lane: aiohttp's full path (LEDGER_FAST_LANE=0)"
    )
    p.add_argument("--admin-dsn", default=DEFAULT_ADMIN_DSN)
    uvloop.run(measure(p.parse_args(argv)))


if __name__ == "__main__":
    main()
