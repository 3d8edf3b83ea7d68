"""The fast lane: `POST /ledger/post` served without aiohttp's per-request machinery.

aiohttp stays the node's HTTP server. `FastSite` listens in place of `web.TCPSite`, and every new
connection starts in a small protocol, `_Connection`. While a connection sends plain keep-alive
`POST /ledger/post` requests that a static token authorises and that the wire fast path vouches
for, the lane answers them itself with the same answers, metrics and audit events as the aiohttp
handler (`ledger_routes.post_one` is shared). On the first request that is anything else (another
route, another method or version, a header the lane does not handle, a refused token, a body the
detailed path must judge), the lane hands the connection, with every byte not yet
answered, to aiohttp's own `RequestHandler` and steps aside for good. aiohttp then answers that
request and the rest, errors included, exactly as without the lane.

What it saves, per request: building `web.Request` and `web.Response`, the router, the middleware
chain and aiohttp's response preparation (`docs/benchmarks.md`, "Tenth session"). The lane's parser
accepts a strict subset of HTTP/1.1 (one request line, CRLF-terminated `token: value` header lines
of visible ASCII, exactly one decimal `Content-Length`, no `Transfer-Encoding`, `Expect`, `Upgrade`,
`Content-Encoding` or non-keep-alive `Connection`, no repeated header); whatever falls outside is
left for aiohttp's parser, so the lane never disagrees with it about where a request ends.

Off with TLS (`ssl_context`): an mTLS principal comes from the certificate, which the middleware
reads. `LEDGER_FAST_LANE=0` turns it off (see node/config.py).

`FastSite` uses `web.TCPSite`'s attributes and hands connections over through `web.Server()` and
`RequestHandler.connection_made` / `data_received`: aiohttp is pinned in requirements.lock, and
tests/e2e/test_fast_lane.py fails if an upgrade changes any of that.
"""

from __future__ import annotations

import asyncio
import email.utils
import http
import logging
import re
import time
from collections.abc import Iterator
from typing import Any, Final

from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from api import ledger_routes
from api.app import ROLES
from api.auth import Principal, require, require_second_factor
from api.envelope import RETRYABLE_STATUSES, error_body, error_of, ok_body
from api.limits import LIMITER, Refusal, overload_refusal, retry_after, token_refused
from api.posting import Submission
from api.requests import IDEMPOTENCY_KEY_PATTERN, SINGLE_BODY_MAX
from api.services import SERVICES
from ledger.errors import LedgerError

log = logging.getLogger(__name__)

REQUEST_LINE: Final = b"POST /ledger/post HTTP/1.1"
PATH: Final = "/ledger/post"
HEAD_MAX: Final = 8 * 1024
"""A head longer than this goes to aiohttp (which answers it within its own limits)."""
HEADERS_MAX: Final = 32
BUFFER_MAX: Final = 1024 * 1024 + HEAD_MAX
"""Bytes a connection may queue while one of its requests is in flight before reading pauses."""
KEEPALIVE_S: Final = 3630.0
"""An idle connection is closed after this long (aiohttp's own keep-alive default)."""
SWEEP_S: Final = 60.0
DRAIN_S: Final = 10.0
"""How long `FastSite.stop` waits for requests in flight."""

_TOKEN: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VISIBLE: Final = re.compile(rb"[\x20-\x7e\t]*")
_REFUSED: Final = frozenset({b"transfer-encoding", b"expect", b"upgrade", b"content-encoding"})
_SERVER: Final = SERVER_SOFTWARE.encode()
_RESPONSE: Final = (
    b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s"
    b"Date: %s\r\nServer: " + _SERVER.replace(b"%", b"%%") + b"\r\n\r\n%s"
)
_PHRASES: Final = {status.value: status.phrase.encode() for status in http.HTTPStatus}
HAND_OVER: Final = "hand over"
"""What `parse` answers for a request the lane leaves to aiohttp."""


class Head:
    """A request the lane may answer: its headers (lower-case names) and where its body lies."""

    __slots__ = ("body_start", "end", "headers")

    def __init__(self, headers: dict[bytes, bytes], body_start: int, end: int) -> None:
        self.headers = headers
        self.body_start = body_start
        self.end = end


def parse(buffer: bytes, body_max: int = SINGLE_BODY_MAX) -> Head | str | None:
    """The first request in `buffer`: a `Head` when the lane may answer it and all of it is here,
    None when more bytes are needed to tell, `HAND_OVER` otherwise. Pure."""
    end = buffer.find(b"\r\n\r\n", 0, HEAD_MAX + 4)
    if end < 0:
        if len(buffer) > HEAD_MAX or not buffer.startswith(REQUEST_LINE[: len(buffer)]):
            return HAND_OVER
        return None
    lines = buffer[:end].split(b"\r\n")
    if lines[0] != REQUEST_LINE or len(lines) > HEADERS_MAX + 1:
        return HAND_OVER
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name) or not _VISIBLE.fullmatch(value):
            return HAND_OVER  # also: obs-fold, a stray CR or LF, control or non-ASCII bytes
        key = name.lower()
        if key in headers or key in _REFUSED:
            return HAND_OVER
        headers[key] = value.strip(b" \t")
    connection = headers.get(b"connection")
    if connection is not None and connection.lower() != b"keep-alive":
        return HAND_OVER
    length = headers.get(b"content-length")
    if length is None or not length.isdigit() or len(length) > 9 or int(length) > body_max:
        return HAND_OVER
    body_start = end + 4
    stop = body_start + int(length)
    return Head(headers, body_start, stop) if len(buffer) >= stop else None


class _Date:
    """The `Date` header, formatted once per second."""

    __slots__ = ("second", "value")

    def __init__(self) -> None:
        self.second = -1
        self.value = b""

    def now(self) -> bytes:
        second = int(time.time())
        if second != self.second:
            self.second = second
            self.value = email.utils.formatdate(second, usegmt=True).encode()
        return self.value


def response(status: int, body: bytes, date: bytes, retry_after_s: str = "1") -> bytes:
    """An HTTP/1.1 keep-alive response with a JSON body, as aiohttp writes one for the envelope (a 429
    or 503 with `Retry-After`, as `api.envelope.error_response` adds it)."""
    retry = b"Retry-After: %s\r\n" % retry_after_s.encode() if status in RETRYABLE_STATUSES else b""
    return _RESPONSE % (status, _PHRASES[status], len(body), retry, date, body)


class FastLane:
    """The lane's shared state for one site: the app, aiohttp's server, the open connections."""

    def __init__(self, app: web.Application, server: web.Server) -> None:
        self.app = app
        self.server = server
        self.svc = app[SERVICES]
        self.limiter = app[LIMITER]
        self.allowed = app[ROLES][ledger_routes.post_journal]
        self.connections: set[_Connection] = set()
        self.date = _Date()
        self.served = 0
        self.handed_over = 0
        self._sweeper: asyncio.TimerHandle | None = None

    def collect(self) -> Iterator[Metric]:
        """The lane's series for /metrics (a prometheus_client collector)."""
        yield CounterMetricFamily(
            "ledger_fast_lane_requests",
            "POST /ledger/post requests answered by the fast lane",
            value=self.served,
        )
        yield CounterMetricFamily(
            "ledger_fast_lane_handovers",
            "Connections the fast lane handed to aiohttp (their first request was not one it answers)",
            value=self.handed_over,
        )
        yield GaugeMetricFamily(
            "ledger_fast_lane_connections",
            "Connections the fast lane serves now",
            value=len(self.connections),
        )

    def __call__(self) -> asyncio.Protocol:
        """A protocol for a new connection (the `create_server` factory)."""
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(SWEEP_S, self._sweep)
        return _Connection(self)

    def admit(self, head: Head, body: bytes) -> Submission | None:
        """The checks of `api.app.front_middleware` and `post_journal` that need no waiting, for a
        request they would let through: its submission; None for any other, which aiohttp answers."""
        headers = head.headers
        if headers.get(b"content-type") != b"application/json":
            return None
        principal = self._principal(headers.get(b"authorization"))
        if principal is None:
            return None
        raw_key = headers.get(b"idempotency-key")
        key = None if raw_key is None else raw_key.decode("ascii")
        if key is not None and not IDEMPOTENCY_KEY_PATTERN.fullmatch(key):
            return None
        submission = ledger_routes.vouched_submission(body, principal.name, key)
        if submission is None or submission.journal.reverses is not None:
            return None
        return submission

    def _principal(self, header: bytes | None) -> Principal | None:
        if header is None:
            return None
        try:
            principal = self.svc.auth.without_io(header.decode("latin-1"))
            if principal is not None:
                require(principal, self.allowed)
                require_second_factor(principal, self.allowed)
        except LedgerError:
            return None
        return principal

    async def answer(self, submission: Submission, size: int, started: float) -> bytes:
        """Shed (as the middleware does: a place in flight, then the token's limits) or post an
        admitted journal; the response bytes, as `post_journal` and the envelope write them."""
        limiter = self.limiter
        if not (limiter.try_enter(size) or await limiter.enter(size)):
            return self._shed(overload_refusal(limiter))
        try:
            who = submission.principal
            refused = token_refused(limiter, who)
            if refused is not None:
                return self._shed(refused)
            try:
                return await self._post(submission, started)
            finally:
                limiter.token_leave(who)
        finally:
            limiter.leave(size)

    async def _post(self, submission: Submission, started: float) -> bytes:
        try:
            result = await ledger_routes.post_one(self.app, submission, started)
            if result.ok:
                body = ok_body(journal_id=result.journal_id, posted_at=result.posted_at)
                return response(200, body, self.date.now())
            error = ledger_routes.result_error(result)
        except Exception as exc:
            error = error_of(exc, "POST", PATH)
        return response(error.http_status, error_body(error), self.date.now())

    def _shed(self, refusal: Refusal) -> bytes:
        reason, error, wait_s = refusal
        self.svc.metrics.shed_requests.labels(reason).inc()
        return response(error.http_status, error_body(error), self.date.now(), retry_after(wait_s))

    def _sweep(self) -> None:
        now = time.monotonic()
        for connection in list(self.connections):
            if not connection.busy and now - connection.last > KEEPALIVE_S:
                connection.close()
        self._sweeper = asyncio.get_running_loop().call_later(SWEEP_S, self._sweep)

    async def drain(self, timeout_s: float) -> None:
        """Close idle connections now, and the others once their request is answered (or at the end)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        self.svc.metrics.registry.unregister(self)
        deadline = time.monotonic() + timeout_s
        while True:
            for connection in list(self.connections):
                if not connection.busy:
                    connection.close()
            if not self.connections or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.05)
        for connection in list(self.connections):
            connection.close()


class _Connection(asyncio.Protocol):
    """One client connection while the lane serves it: one request at a time, in order."""

    __slots__ = ("buffer", "busy", "closed", "lane", "last", "paused", "transport", "writes_paused")

    def __init__(self, lane: FastLane) -> None:
        self.lane = lane
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.busy = False  # a request of this connection is being answered
        self.closed = False
        self.paused = False  # reading paused: too much queued while blocked
        self.writes_paused = False  # the client does not read its answers: answer nothing more
        self.last = time.monotonic()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are not asyncio.Transport
        self.lane.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.lane.connections.discard(self)

    def pause_writing(self) -> None:
        self.writes_paused = True

    def resume_writing(self) -> None:
        self.writes_paused = False
        self._continue()

    def data_received(self, data: bytes) -> None:
        self.buffer = self.buffer + data if self.buffer else data
        if self.busy or self.writes_paused:
            if len(self.buffer) > BUFFER_MAX and not self.paused:
                self.paused = True
                assert self.transport is not None
                self.transport.pause_reading()
            return
        self._next()

    def _continue(self) -> None:
        """Go on with the bytes queued, unless a request is in flight or the client is not reading."""
        if self.closed or self.busy or self.writes_paused:
            return
        if self.paused and len(self.buffer) <= BUFFER_MAX:
            self.paused = False
            assert self.transport is not None
            self.transport.resume_reading()
        if self.buffer:
            self._next()

    def _next(self) -> None:
        """Answer the next complete request, or hand the connection over, or wait for more bytes."""
        buffer = self.buffer
        head = parse(buffer)
        if head is None:
            return
        if isinstance(head, str):
            self._hand_over()
            return
        body = buffer[head.body_start : head.end]
        try:
            submission = self.lane.admit(head, body)
        except Exception:  # never lose a request to a lane bug: aiohttp answers it
            log.exception("fast lane: admitting a request failed; handing the connection to aiohttp")
            submission = None
        if submission is None:
            self._hand_over()
            return
        self.buffer = buffer[head.end :]
        self.busy = True
        asyncio.get_running_loop().create_task(self._serve(submission, len(body), time.perf_counter()))

    async def _serve(self, submission: Submission, size: int, started: float) -> None:
        lane = self.lane
        data = await lane.answer(submission, size, started)
        lane.served += 1
        self.busy = False
        self.last = time.monotonic()
        if self.closed:
            return
        assert self.transport is not None
        self.transport.write(data)  # may call pause_writing: then nothing more until resume_writing
        self._continue()

    def _hand_over(self) -> None:
        """From now on aiohttp serves this connection, starting with the bytes not yet answered."""
        transport = self.transport
        assert transport is not None and not self.busy and not self.writes_paused
        self.lane.connections.discard(self)
        self.lane.handed_over += 1
        handler: Any = self.lane.server()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if self.paused:
            self.paused = False
            transport.resume_reading()
        buffer, self.buffer = self.buffer, b""
        if buffer:
            handler.data_received(buffer)

    def close(self) -> None:
        """Close the connection (idle or shutting down)."""
        if self.transport is not None and not self.closed:
            self.transport.close()


class FastSite(web.TCPSite):
    """`web.TCPSite` whose connections start in the fast lane (`FastLane`); plain TCP only."""

    def __init__(self, runner: web.AppRunner, *args: Any, **kwargs: Any) -> None:
        super().__init__(runner, *args, **kwargs)
        self.lane: FastLane | None = None

    async def start(self) -> None:
        if self._ssl_context is not None:  # an mTLS principal needs the middleware: no lane
            await super().start()
            return
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None and isinstance(self._runner, web.AppRunner)
        self.lane = FastLane(self._runner.app, server)
        self._server = await asyncio.get_running_loop().create_server(
            self.lane, self._host, self._port, backlog=self._backlog,
            reuse_address=self._reuse_address, reuse_port=self._reuse_port,
        )  # fmt: skip
        sockets = self._server.sockets
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port
        self.lane.svc.metrics.registry.register(self.lane)  # its `collect`: read at scrape time only

    async def stop(self) -> None:
        await super().stop()
        if self.lane is not None:
            await self.lane.drain(DRAIN_S)
