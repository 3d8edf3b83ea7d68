"""The fast lane's per-connection flow (api/fast_lane.py `_Connection`) with a stand-in lane and
transport: answers in request order, one request at a time, and back-pressure both ways (no answer
while the client does not read; no reading while too much is queued)."""

from __future__ import annotations

import asyncio
from typing import Any

from api.fast_lane import BUFFER_MAX, Head, _Connection


def post(body: bytes) -> bytes:
    return b"POST /ledger/post HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


class Lane:
    """Admits every request (its body is its "submission") and answers it after a loop turn."""

    def __init__(self) -> None:
        self.connections: set[Any] = set()
        self.served = 0
        self.handed_over = 0

    def admit(self, head: Head, body: bytes) -> bytes:
        return body

    async def answer(self, submission: bytes, size: int, started: float) -> bytes:
        await asyncio.sleep(0)
        return b"<" + submission + b">"


class Transport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.reading = True

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def connection() -> tuple[_Connection, Transport]:
    conn = _Connection(Lane())  # type: ignore[arg-type]
    transport = Transport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    return conn, transport


def test_pipelined_requests_are_answered_one_at_a_time_in_order() -> None:
    """Tried: five requests in one segment, then a sixth split across two segments."""

    async def scenario() -> list[bytes]:
        conn, transport = connection()
        conn.data_received(b"".join(post(b"%d" % i) for i in range(5)))
        await settle()
        sixth = post(b"5")
        conn.data_received(sixth[:7])
        await settle()
        conn.data_received(sixth[7:])
        await settle()
        return transport.written

    assert asyncio.run(scenario()) == [b"<%d>" % i for i in range(6)]


def test_no_answer_while_the_client_does_not_read() -> None:
    """Tried: the transport signals pause_writing after two answers; the rest waits until
    resume_writing, then all come in order."""

    async def scenario() -> tuple[list[bytes], list[bytes]]:
        conn, transport = connection()
        original = transport.write

        def write(data: bytes) -> None:
            original(data)
            if len(transport.written) == 2:
                conn.pause_writing()

        transport.write = write  # type: ignore[method-assign]
        conn.data_received(b"".join(post(b"%d" % i) for i in range(5)))
        await settle()
        conn.data_received(post(b"5"))
        await settle()
        while_paused = list(transport.written)
        conn.resume_writing()
        await settle()
        return while_paused, transport.written

    while_paused, after = asyncio.run(scenario())
    assert while_paused == [b"<0>", b"<1>"]
    assert after == [b"<%d>" % i for i in range(6)]


def test_reading_pauses_while_too_much_is_queued_and_resumes_after() -> None:
    """Tried: while writes are paused, more than BUFFER_MAX bytes of requests arrive: reading pauses;
    once the client reads again and the queue drains, reading resumes."""

    async def scenario() -> tuple[bool, bool, int]:
        conn, transport = connection()
        conn.pause_writing()
        body = b"x" * 1000
        count = BUFFER_MAX // len(post(body)) + 2
        for _ in range(count):
            conn.data_received(post(body))
        reading_while_full = transport.reading
        conn.resume_writing()
        await settle()
        for _ in range(count):
            if not conn.buffer:
                break
            await settle()
        return reading_while_full, transport.reading, len(transport.written) - count

    reading_while_full, reading_after, missing = asyncio.run(scenario())
    assert reading_while_full is False and reading_after is True and missing == 0
