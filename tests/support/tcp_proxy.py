"""A TCP fault proxy on loopback: forwards to a target until `cut()` (connections reset, new ones
refused by closing them at once), then `restore()`. Used to make a real outage between two parts."""

from __future__ import annotations

import asyncio
import contextlib
import socket


class TcpProxy:
    """`await TcpProxy(host, port).start()`; `url` for HTTP targets."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.server: asyncio.Server | None = None
        self.port = 0
        self.open = True
        self.writers: set[asyncio.StreamWriter] = set()

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

    def restore(self) -> None:
        self.open = True

    async def stop(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.open:
            writer.transport.abort()
            return
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
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self.writers.discard(writer)
            with contextlib.suppress(Exception):
                writer.close()
