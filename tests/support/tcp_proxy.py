"""A TCP fault proxy on loopback: forwards to a target until `cut()` (connections reset, new ones
refused by closing them at once), then `restore()`. Used to make a real outage between two parts.

Other faults, each undone by `restore()`: `reset()` resets the open connections once (new ones are
served), `latency(s)` delays every chunk in both directions, `blackhole()` keeps every connection
open but forwards nothing (bytes wait in the proxy, as in a partition that heals, and new
connections hang before reaching the target)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Callable


class TcpProxy:
    """`await TcpProxy(host, port).start()`; `url` for HTTP targets."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.server: asyncio.Server | None = None
        self.port = 0
        self.open = True
        self.writers: set[asyncio.StreamWriter] = set()
        self.delay_s = 0.0
        self.flowing = asyncio.Event()
        self.flowing.set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> TcpProxy:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        sock: socket.socket = self.server.sockets[0]
        self.port = sock.getsockname()[1]
        return self

    def cut(self) -> None:
        """Reset every connection and refuse new ones until `restore()`."""
        self.open = False
        for writer in list(self.writers):
            writer.transport.abort()
        self.writers.clear()

    def reset(self) -> None:
        """Reset every open connection (RST); new connections are served as before."""
        for writer in list(self.writers):
            writer.transport.abort()
        self.writers.clear()

    def latency(self, delay_s: float) -> None:
        """Delay every chunk forwarded, in both directions, by `delay_s`."""
        self.delay_s = delay_s

    def blackhole(self) -> None:
        """Forward nothing (connections stay open, new ones hang) until `restore()`."""
        self.flowing.clear()

    def restore(self) -> None:
        self.open = True
        self.delay_s = 0.0
        self.flowing.set()

    async def stop(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.open:
            writer.transport.abort()
            return
        await self.flowing.wait()
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self.writers.update((writer, up_writer))
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while self.open and (data := await reader.read(65536)):
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                await self.flowing.wait()
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            return  # one side closed or reset: this direction of the connection is over
        finally:
            self.writers.discard(writer)
            with contextlib.suppress(Exception):
                writer.close()


class ProxyThread:
    """A `TcpProxy` on its own event loop in a daemon thread (so heavy traffic through it, e.g. a
    node's database connections, neither slows nor depends on the caller's loop); `cut()` and
    `restore()` are safe to call from any thread."""

    def __init__(self, host: str, port: int) -> None:
        self.proxy = TcpProxy(host, port)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="tcp-proxy", daemon=True)

    def start(self) -> ProxyThread:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.proxy.start(), self.loop).result(10)
        return self

    @property
    def port(self) -> int:
        return self.proxy.port

    def _call(self, action: Callable[[], None]) -> None:
        async def run() -> None:
            action()

        asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)

    def cut(self) -> None:
        self._call(self.proxy.cut)

    def restore(self) -> None:
        self._call(self.proxy.restore)

    def reset(self) -> None:
        self._call(self.proxy.reset)

    def latency(self, delay_s: float) -> None:
        self._call(lambda: self.proxy.latency(delay_s))

    def blackhole(self) -> None:
        self._call(self.proxy.blackhole)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.proxy.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
