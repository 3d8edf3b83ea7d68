"""Direct calls: an actor's hot methods over one TCP connection per caller, beside Ray.

Ray places, supervises and restarts the actors, and every call that is rare (status, accounts,
moves, proofs) still goes through it. But a Ray actor call costs about a millisecond of CPU
between caller and actor on the 2-core machines we run on (serialisation, the core worker's
threads, gRPC; measured in docs/benchmarks.md "Seventh session"), whatever its size. On the
one-journal-per-request path every shard group commit makes two of them (front end -> shard,
shard -> signer), so they cost more than the journals. A direct call costs a msgpack frame on a
socket.

Protocol (msgpack via msgspec, each frame a 4-byte big-endian length then the body):

- The actor starts a `DirectServer` on first request (its Ray method `direct_address`), bound to
  its node's address on a free port, with a fresh 32-byte token; the Ray method answers
  `(host, port, token)`. Only a caller that may call the actor through Ray learns the token.
- The caller (`DirectClient`) connects and sends the token as its first frame; the server closes
  the connection on a wrong one.
- Then requests `[call_id, method, argument]` and answers `[call_id, error, result]`
  (`error` None, or `"ExceptionType: message"`), pipelined: many calls in flight, answered in
  any order, each handled as its own task on the actor's event loop (like Ray's concurrent async
  actor methods).

Failures mean what a Ray call failure means: the caller's call raises (`DirectCallError`) and the
front end answers the journals retryable 503. When the connection drops (the actor died), every
pending call fails, and the next call asks Ray for the address again, which waits for the
restarted actor. Nothing here imports Ray: the shells in `actors/shard.py` and `actors/runtime.py`
wire it in.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import logging
import secrets
import struct
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import msgspec

log = logging.getLogger(__name__)

FRAME = struct.Struct(">I")
FRAME_MAX = 1 << 30
"""Largest frame accepted (a batch of 8,190 journals is a few MiB)."""
READ_LIMIT = 1 << 20

Handler = Callable[[Any], Awaitable[Any]]
Address = tuple[str, int, bytes]

_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder()


class DirectCallError(ConnectionError):
    """A direct call did not complete: the connection failed, or the actor's method raised."""


def _frame(value: Any) -> list[bytes]:
    body = _ENCODER.encode(value)
    return [FRAME.pack(len(body)), body]


async def _read_frame(reader: asyncio.StreamReader) -> Any:
    (size,) = FRAME.unpack(await reader.readexactly(FRAME.size))
    if size > FRAME_MAX:
        raise DirectCallError(f"frame of {size} bytes exceeds {FRAME_MAX}")
    return _DECODER.decode(await reader.readexactly(size))


class DirectServer:
    """Serves `handlers` (method name -> async function of one msgpack value) to token holders."""

    def __init__(self, handlers: Mapping[str, Handler]) -> None:
        self.handlers = dict(handlers)
        self.token = secrets.token_bytes(32)
        self.server: asyncio.Server | None = None
        self.address: Address | None = None
        self.calls = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, host: str) -> Address:
        """Listen on `host` (a free port); the address callers connect to."""
        if self.address is None:
            self.server = await asyncio.start_server(self._serve, host, 0, limit=READ_LIMIT)
            port = self.server.sockets[0].getsockname()[1]
            self.address = (host, int(port), self.token)
        return self.address

    async def close(self) -> None:
        """Stop listening (open connections end with the process)."""
        if self.server is not None:
            self.server.close()
            self.server = None
            self.address = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            token = await _read_frame(reader)
            if not isinstance(token, bytes) or not hmac.compare_digest(token, self.token):
                log.warning("direct call connection with a wrong token refused")
                return
            while True:
                request = await _read_frame(reader)
                task = asyncio.get_running_loop().create_task(self._answer(writer, request))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        except (asyncio.IncompleteReadError, ConnectionError, msgspec.DecodeError, DirectCallError):
            return  # the caller went away (or sent garbage): its connection ends here
        finally:
            writer.close()

    async def _answer(self, writer: asyncio.StreamWriter, request: Any) -> None:
        call_id, method, argument = request
        self.calls += 1
        try:
            result = await self.handlers[method](argument)
            answer = [call_id, None, result]
        except Exception as exc:
            answer = [call_id, f"{type(exc).__name__}: {exc}", None]
        if not writer.is_closing():
            writer.writelines(_frame(answer))


class _Connection:
    """One open connection: its loop, the pending calls, the task reading answers."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.loop = asyncio.get_running_loop()
        self.reader, self.writer = reader, writer
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.ids = itertools.count()
        self.closed = False
        self.reading = self.loop.create_task(self._read())

    async def _read(self) -> None:
        reason = "connection closed"
        try:
            while True:
                call_id, error, result = await _read_frame(self.reader)
                future = self.pending.pop(call_id, None)
                if future is None or future.done():
                    continue
                if error is None:
                    future.set_result(result)
                else:
                    future.set_exception(DirectCallError(error))
        except (asyncio.IncompleteReadError, ConnectionError, msgspec.DecodeError, ValueError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
        finally:
            self.fail(reason)

    def fail(self, reason: str) -> None:
        """Close the connection and fail every pending call with `reason`."""
        self.closed = True
        self.writer.close()
        pending, self.pending = self.pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(DirectCallError(f"direct call lost: {reason}"))

    def send(self, method: str, argument: Any) -> asyncio.Future[Any]:
        if self.closed:
            raise DirectCallError("direct call lost: connection closed")
        call_id = next(self.ids)
        future = self.loop.create_future()
        self.pending[call_id] = future
        self.writer.writelines(_frame([call_id, method, argument]))
        return future


class DirectClient:
    """Calls an actor's direct methods; `resolve` asks Ray for `(host, port, token)`."""

    def __init__(self, resolve: Callable[[], Awaitable[Address]], name: str = "actor") -> None:
        self.resolve = resolve
        self.name = name
        self.connection: _Connection | None = None
        self.connects = 0
        self._connecting: asyncio.Future[_Connection] | None = None

    async def call(self, method: str, argument: Any) -> Any:
        """Call `method(argument)` on the actor; its result, or DirectCallError."""
        connection = self.connection
        if connection is None or connection.closed or connection.loop is not asyncio.get_running_loop():
            connection = await self._connect()
        return await connection.send(method, argument)

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        connecting = self._connecting
        if connecting is None or connecting.get_loop() is not loop:
            connecting = self._connecting = loop.create_task(self._open())
        try:
            return await asyncio.shield(connecting)
        finally:
            if self._connecting is connecting and connecting.done():
                self._connecting = None

    async def _open(self) -> _Connection:
        old = self.connection
        if old is not None and not old.closed and old.loop is asyncio.get_running_loop():
            return old
        host, port, token = await self.resolve()
        try:
            reader, writer = await asyncio.open_connection(host, port, limit=READ_LIMIT)
        except OSError as exc:
            raise DirectCallError(f"{self.name} at {host}:{port} unreachable: {exc}") from exc
        writer.writelines(_frame(token))
        self.connection = _Connection(reader, writer)
        self.connects += 1
        if self.connects > 1:
            log.info("direct connection to %s reopened (%d)", self.name, self.connects)
        return self.connection

    async def close(self) -> None:
        """Close the connection (pending calls fail)."""
        connection, self.connection = self.connection, None
        if connection is not None and connection.loop is asyncio.get_running_loop():
            connection.fail("client closed")
            with contextlib.suppress(BaseException):
                await connection.reading
