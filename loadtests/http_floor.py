"""What an HTTP server costs per request before any handler work: aiohttp against a bare protocol.

Usage::

    python -m loadtests.http_floor [--seconds 8] [--connections 256] [--rounds 2]

Each server answers every `POST /ledger/post` of `loadtests/single.lua` (driven by `wrk -t1`) with
the same constant JSON body, in this process behind uvloop, and the script prints the process's CPU
per request, the ways alternating round by round:

- `app`: an aiohttp `web.Application` with one route (no middleware), as the node's router would;
- `lowlevel`: aiohttp's low-level `web.Server` with the same handler (no router);
- `protocol`: a bare `asyncio.Protocol` that splits requests on the blank line and `Content-Length`
  and writes a fixed response: the floor of the kernel, uvloop and the sockets.

The difference between `app` and `protocol` is what aiohttp's per-request machinery costs whatever
the handler does; it is why `api/fast_lane.py` answers plain `POST /ledger/post` itself. Figures:
docs/benchmarks.md, "Tenth session".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import time
from typing import Any, Final

import uvloop
from aiohttp import web

from loadtests.bench import LUA_SCRIPT, TOKEN

BODY: Final = b'{"ok":true,"journal_id":"floor","posted_at":"2026-11-22T00:41:01.123456Z"}'
RESPONSE: Final = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
    len(BODY),
    BODY,
)
WAYS: Final = ("app", "lowlevel", "protocol")


async def handler(request: web.Request) -> web.Response:
    """Read the body, answer the constant envelope."""
    await request.read()
    return web.Response(body=BODY, content_type="application/json")


class Bare(asyncio.Protocol):
    """Requests split on the blank line and Content-Length; a fixed answer each. Not a server: a floor."""

    def __init__(self) -> None:
        self.transport: Any = None
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data
        while (end := buffer.find(b"\r\n\r\n")) >= 0:
            head = buffer[:end].lower()
            at = head.find(b"content-length:")
            length = int(head[at + 15 :].split(b"\r\n", 1)[0]) if at >= 0 else 0
            if len(buffer) < end + 4 + length:
                break
            buffer = buffer[end + 4 + length :]
            self.transport.write(RESPONSE)
        self.buffer = buffer


async def serve(way: str) -> tuple[Any, int]:
    """The server of `way` on a free port; (something to close, port)."""
    loop = asyncio.get_running_loop()
    if way == "app":
        app = web.Application()
        app.router.add_post("/ledger/post", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
        await site.start()
        return runner, runner.addresses[0][1]
    factory: Any = web.Server(handler, access_log=None) if way == "lowlevel" else Bare
    server = await loop.create_server(factory, "127.0.0.1", 0, backlog=1024)
    return server, server.sockets[0].getsockname()[1]


async def close(thing: Any) -> None:
    if isinstance(thing, web.AppRunner):
        await thing.cleanup()
    else:
        thing.close()


async def wrk(port: int, seconds: int, connections: int) -> int:
    """One `wrk` run of `single.lua`; the requests it completed."""
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-s", str(LUA_SCRIPT)]
    cmd += [f"http://127.0.0.1:{port}/ledger/post", "--", "10000", f"floor{time.time_ns()}", TOKEN]
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(), seconds + 30)
    line = next(x for x in out.decode().splitlines() if x.startswith("LEDGER_WRK "))
    return int(json.loads(line.split(" ", 1)[1])["requests"])


async def measure(way: str, seconds: int, connections: int) -> float:
    """CPU µs of this process per request while wrk drives the server of `way`."""
    thing, port = await serve(way)
    try:
        await wrk(port, 1, connections)  # warm-up
        before = resource.getrusage(resource.RUSAGE_SELF)
        requests = await wrk(port, seconds, connections)
        after = resource.getrusage(resource.RUSAGE_SELF)
    finally:
        await close(thing)
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return cpu_s * 1e6 / max(1, requests)


async def run(a: argparse.Namespace) -> None:
    """Every way, `rounds` times, alternating; one line per measurement."""
    for round_no in range(1, a.rounds + 1):
        for way in WAYS:
            cost = await measure(way, a.seconds, a.connections)
            print(f"round {round_no} {way:<9} {cost:6.1f} us of CPU per request", flush=True)


def main(argv: list[str] | None = None) -> None:
    """The command line."""
    p = argparse.ArgumentParser(prog="python -m loadtests.http_floor", description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=int, default=8, help="timed seconds of wrk per measurement (default 8)")
    p.add_argument("--connections", type=int, default=256, help="wrk connections (default 256)")
    p.add_argument("--rounds", type=int, default=2, help="rounds over the three ways (default 2)")
    uvloop.run(run(p.parse_args(argv)))


if __name__ == "__main__":
    main()
