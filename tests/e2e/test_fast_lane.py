"""The fast lane (api/fast_lane.py) on a running node, over raw sockets.

A client cannot tell which path answered: the lane's answers (status, envelope, headers) match
aiohttp's for the same request, anything the lane does not take is answered by aiohttp on the
same connection, and responses always come back in request order. Each test says what it sends.
"""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any, Final
from urllib.parse import urlsplit

import aiohttp
import pytest

from api.fast_lane import FastSite
from tests.support.node import TOKENS, NodeHarness, auth, journal


class Answer:
    """One HTTP response read off the socket."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def json(self) -> Any:
        return json.loads(self.body)


def post_bytes(
    body: dict[str, Any] | bytes,
    *,
    token: str = TOKENS["service"],
    extra: str = "",
    content_type: str = "application/json",
    line: str = "POST /ledger/post HTTP/1.1",
) -> bytes:
    """A raw request as an ordinary HTTP/1.1 client sends it (`extra`: more header lines)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    head = (
        f"{line}\r\nHost: ledger\r\nAuthorization: Bearer {token}\r\nContent-Type: {content_type}\r\n"
        f"{extra}Content-Length: {len(data)}\r\n\r\n"
    )
    return head.encode() + data


HEALTH = b"GET /health HTTP/1.1\r\nHost: ledger\r\n\r\n"


async def read_answer(reader: asyncio.StreamReader) -> Answer:
    """One response: status line, headers, a Content-Length or chunked body."""
    status_line = await reader.readuntil(b"\r\n")
    status = int(status_line.split()[1])
    headers: dict[str, str] = {}
    while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    if status == 100:
        return await read_answer(reader)
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while (size := int((await reader.readuntil(b"\r\n")).strip(), 16)) > 0:
            body += await reader.readexactly(size + 2)
            body = body[:-2]
        await reader.readuntil(b"\r\n")
        return Answer(status, headers, body)
    return Answer(status, headers, await reader.readexactly(int(headers.get("content-length", "0"))))


class Conn:
    """A raw keep-alive connection to the node."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def send(self, *requests: bytes) -> list[Answer]:
        """Write the requests in one go (pipelined) and read one answer each, in order."""
        self.writer.write(b"".join(requests))
        await self.writer.drain()
        return [await asyncio.wait_for(read_answer(self.reader), 30) for _ in requests]

    async def closed(self) -> bool:
        """True when the server closed the connection."""
        return await asyncio.wait_for(self.reader.read(1), 10) == b""

    def close(self) -> None:
        self.writer.close()


async def connect(node: NodeHarness) -> Conn:
    url = urlsplit(node.url)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    return Conn(reader, writer)


def lane_counts(node: NodeHarness) -> tuple[int, int]:
    """(requests the lane answered, connections it handed to aiohttp) so far."""
    assert node.node is not None and isinstance(node.node.site, FastSite) and node.node.site.lane is not None
    return node.node.site.lane.served, node.node.site.lane.handed_over


def test_lane_answers_a_post_exactly_as_aiohttp_does(node: NodeHarness) -> None:
    """Tried: the same kind of journal posted once on a fresh connection (the lane answers) and once
    on a connection that sent GET /health first (aiohttp answers): same status, envelope keys,
    content type and server header; both journals are stored with the right amounts."""

    async def scenario() -> tuple[Answer, Answer, tuple[int, int], tuple[int, int]]:
        fast = await connect(node)
        before = lane_counts(node)
        (lane_answer,) = await fast.send(
            post_bytes(journal("fl-same-1", "asset:fl-a", "liability:fl-b", 700))
        )
        after_lane = lane_counts(node)
        slow = await connect(node)
        second = post_bytes(journal("fl-same-2", "asset:fl-a", "liability:fl-b", 300))
        health, slow_answer = await slow.send(HEALTH, second)
        assert health.status == 200
        fast.close()
        slow.close()
        return (
            lane_answer,
            slow_answer,
            (after_lane[0] - before[0], after_lane[1] - before[1]),
            lane_counts(node),
        )

    lane_answer, slow_answer, delta, _ = asyncio.run(scenario())
    assert delta == (1, 0)  # the lane answered the first post itself
    for answer, journal_id in ((lane_answer, "fl-same-1"), (slow_answer, "fl-same-2")):
        assert answer.status == 200
        assert set(answer.json) == {"ok", "journal_id", "posted_at"}
        assert answer.json["ok"] is True and answer.json["journal_id"] == journal_id
    for name in ("content-type", "server"):
        assert lane_answer.headers[name] == slow_answer.headers[name]
    assert set(lane_answer.headers) >= {"content-type", "content-length", "date", "server"}

    async def stored() -> list[dict[str, Any]]:
        async with aiohttp.ClientSession() as http:
            found = []
            for journal_id in ("fl-same-1", "fl-same-2"):
                async with http.get(f"{node.url}/ledger/{journal_id}", headers=auth()) as resp:
                    assert resp.status == 200
                    found.append(await resp.json())
            return found

    first, second = asyncio.run(stored())
    assert first["journal"]["entries"][0]["amount_cents"] == 700
    assert second["journal"]["entries"][0]["amount_cents"] == 300


def test_pipelined_requests_are_answered_in_order_across_the_hand_over(node: NodeHarness) -> None:
    """Tried: four requests in one write on one connection: a post (lane), GET /health (hands the
    connection to aiohttp), a post and a post with an unknown token (aiohttp: 200, then 401)."""

    async def scenario() -> list[Answer]:
        conn = await connect(node)
        answers = await conn.send(
            post_bytes(journal("fl-pipe-1", "asset:fl-c", "liability:fl-d")),
            HEALTH,
            post_bytes(journal("fl-pipe-2", "asset:fl-c", "liability:fl-d")),
            post_bytes(journal("fl-pipe-3", "asset:fl-c", "liability:fl-d"), token="nope"),
        )
        conn.close()
        return answers

    first, health, second, refused = asyncio.run(scenario())
    assert (first.status, first.json["journal_id"]) == (200, "fl-pipe-1")
    assert health.status == 200 and "signingConfigured" in health.json
    assert (second.status, second.json["journal_id"]) == (200, "fl-pipe-2")
    assert refused.status == 401 and refused.json["error"]["code"] == "NOT_AUTHORIZED"


def test_many_posts_on_one_connection_stay_in_the_lane(node: NodeHarness) -> None:
    """Tried: 50 posts pipelined in one write: 50 answers in order, all from the lane, no hand-over."""

    async def scenario() -> tuple[list[Answer], tuple[int, int], tuple[int, int]]:
        conn = await connect(node)
        before = lane_counts(node)
        answers = await conn.send(
            *(post_bytes(journal(f"fl-many-{i}", "asset:fl-e", "liability:fl-f", 10 + i)) for i in range(50))
        )
        after = lane_counts(node)
        conn.close()
        return answers, before, after

    answers, before, after = asyncio.run(scenario())
    assert [a.json["journal_id"] for a in answers] == [f"fl-many-{i}" for i in range(50)]
    assert after[0] - before[0] == 50 and after[1] == before[1]


def _plain(journal_id: str | None = None) -> dict[str, Any]:
    return journal(journal_id, "asset:fl-g", "liability:fl-h")


_UNBALANCED: Final = {
    "entries": [
        {"account_id": "asset:fl-g", "side": "debit", "amount_cents": 5, "currency": "USD"},
        {"account_id": "liability:fl-h", "side": "credit", "amount_cents": 4, "currency": "USD"},
    ]
}
LEFT_TO_AIOHTTP: Final = {
    # another method, version or target: aiohttp's answer
    "http-1.0": (post_bytes(_plain("fl-h-10"), line="POST /ledger/post HTTP/1.0"), 200, None),
    "put": (post_bytes(_plain(), line="PUT /ledger/post HTTP/1.1"), 405, "METHOD_NOT_ALLOWED"),
    "query": (post_bytes(_plain(), line="POST /ledger/post?x=1 HTTP/1.1"), 200, None),
    # auth before validation (D6): an unknown token 401, a reader's token 403
    "bad-token": (post_bytes(_plain(), token="wrong"), 401, "NOT_AUTHORIZED"),
    "reader-token": (post_bytes(b"{", token=TOKENS["auditor"]), 403, "NOT_AUTHORIZED"),
    # media type and body
    "text-plain": (post_bytes(_plain(), content_type="text/plain"), 415, "UNSUPPORTED_MEDIA_TYPE"),
    "charset": (post_bytes(_plain("fl-h-11"), content_type="application/json; charset=utf-8"), 200, None),
    "not-json": (post_bytes(b"{not json"), 400, "VALIDATION_ERROR"),
    "unbalanced": (post_bytes(_UNBALANCED), 400, "LEDGER_IMBALANCE"),
    "too-large": (post_bytes(b"{" + b" " * (1024 * 1024 + 10) + b"}"), 413, "PAYLOAD_TOO_LARGE"),
    # headers the lane does not take
    "expect-continue": (post_bytes(_plain("fl-h-12"), extra="Expect: 100-continue\r\n"), 200, None),
    "empty-idempotency-key": (post_bytes(_plain(), extra="Idempotency-Key: \r\n"), 400, "VALIDATION_ERROR"),
}


@pytest.mark.parametrize(
    ("request_bytes", "status", "code"), LEFT_TO_AIOHTTP.values(), ids=LEFT_TO_AIOHTTP.keys()
)
def test_requests_the_lane_leaves_get_aiohttps_answer(
    node: NodeHarness, request_bytes: bytes, status: int, code: str | None
) -> None:
    """Tried: each request on a fresh connection; the answer is aiohttp's (status, envelope code),
    and the connection was handed over rather than answered by the lane."""

    async def scenario() -> tuple[Answer, tuple[int, int], tuple[int, int]]:
        conn = await connect(node)
        before = lane_counts(node)
        (answer,) = await conn.send(request_bytes)
        after = lane_counts(node)
        conn.close()
        return answer, before, after

    answer, before, after = asyncio.run(scenario())
    assert answer.status == status, answer.body[:300]
    if code is None:
        assert answer.json["ok"] is True
    else:
        assert answer.json["ok"] is False and answer.json["error"]["code"] == code
    assert after[0] == before[0] and after[1] == before[1] + 1


def test_chunked_body_goes_to_aiohttp_and_posts(node: NodeHarness) -> None:
    """Tried: a post with `Transfer-Encoding: chunked` (no Content-Length): aiohttp reads it; 200."""
    data = json.dumps(journal("fl-chunked", "asset:fl-i", "liability:fl-j")).encode()
    raw = (
        b"POST /ledger/post HTTP/1.1\r\nHost: ledger\r\nAuthorization: Bearer " + TOKENS["service"].encode()
        + b"\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data)
    )  # fmt: skip

    async def scenario() -> Answer:
        conn = await connect(node)
        (answer,) = await conn.send(raw)
        conn.close()
        return answer

    answer = asyncio.run(scenario())
    assert answer.status == 200 and answer.json["journal_id"] == "fl-chunked"


def test_connection_close_is_honoured(node: NodeHarness) -> None:
    """Tried: a post with `Connection: close`: answered (by aiohttp), then the server closes."""

    async def scenario() -> tuple[Answer, bool]:
        conn = await connect(node)
        request = post_bytes(
            journal("fl-close", "asset:fl-i", "liability:fl-j"), extra="Connection: close\r\n"
        )
        (answer,) = await conn.send(request)
        closed = await conn.closed()
        conn.close()
        return answer, closed

    answer, closed = asyncio.run(scenario())
    assert answer.status == 200 and closed


def test_ledger_rejections_on_the_lane_carry_the_envelope(node: NodeHarness) -> None:
    """Tried, all in the lane: a journal, its exact replay (200, same posted_at), the same id with
    another amount (409 IDEMPOTENCY_CONFLICT) and a debit beyond an overdraft-guarded account's
    balance (the shard's refusal): each answer is the envelope aiohttp would write."""
    guarded = "liability:fl-guarded"

    async def scenario() -> list[Answer]:
        async with aiohttp.ClientSession() as http:
            body = {"account_id": guarded, "policy": {"no_negative": True}}
            async with http.post(f"{node.url}/accounts", json=body, headers=auth("admin")) as resp:
                assert resp.status in (200, 201), await resp.text()
        conn = await connect(node)
        before = lane_counts(node)
        answers = await conn.send(
            post_bytes(journal("fl-rej-1", "asset:fl-k", "liability:fl-l", 500)),
            post_bytes(journal("fl-rej-1", "asset:fl-k", "liability:fl-l", 500)),
            post_bytes(journal("fl-rej-1", "asset:fl-k", "liability:fl-l", 501)),
            post_bytes(journal("fl-rej-2", guarded, "asset:fl-k", 900)),
        )
        assert lane_counts(node)[0] - before[0] == 4
        conn.close()
        return answers

    first, replay, conflict, overdraft = asyncio.run(scenario())
    assert first.status == replay.status == 200
    assert replay.json == first.json
    assert conflict.status == 409 and conflict.json["error"]["code"] == "IDEMPOTENCY_CONFLICT"
    assert conflict.json["ok"] is False and set(conflict.json["error"]) == {"code", "message", "details"}
    assert overdraft.status == 409 and overdraft.json["ok"] is False
    assert overdraft.json["error"]["code"] == "INSUFFICIENT_FUNDS"


async def audit_events_of(
    http: aiohttp.ClientSession, url: str, journal_ids: set[str]
) -> list[dict[str, Any]]:
    """The `ledger.post` audit events of these journals, in order."""
    found: list[dict[str, Any]] = []
    cursor = ""
    while True:
        async with http.get(f"{url}/audit/events?limit=1000{cursor}", headers=auth("auditor")) as resp:
            page = await resp.json()
        if not page["events"]:
            return found
        found += [
            e for e in page["events"]
            if e["event_type"] == "ledger.post" and e["payload"].get("journal_id") in journal_ids
        ]  # fmt: skip
        cursor = f"&cursor={page['next_cursor']}"


def test_lane_posts_are_audited_and_counted(node: NodeHarness) -> None:
    """Tried: one post through the lane and one through aiohttp (after GET /health): each has one
    `ledger.post` audit event with the same actor and the stored journal's hash, the post counter
    in /metrics grew by two, the lane's own request counter by one and its hand-overs too."""

    async def scenario() -> tuple[list[dict[str, Any]], list[dict[str, Any]], str, str]:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{node.url}/metrics") as resp:
                metrics_before = await resp.text()
            lane = await connect(node)
            (answer,) = await lane.send(post_bytes(journal("fl-audit-lane", "asset:fl-m", "liability:fl-n")))
            assert answer.status == 200
            slow = await connect(node)
            _, answer = await slow.send(
                HEALTH, post_bytes(journal("fl-audit-slow", "asset:fl-m", "liability:fl-n"))
            )
            assert answer.status == 200
            lane.close()
            slow.close()
            stored = []
            for journal_id in ("fl-audit-lane", "fl-audit-slow"):
                async with http.get(f"{node.url}/ledger/{journal_id}", headers=auth()) as resp:
                    stored.append(await resp.json())
            events = await audit_events_of(http, node.url, {"fl-audit-lane", "fl-audit-slow"})
            async with http.get(f"{node.url}/metrics") as resp:
                metrics_after = await resp.text()
        return stored, events, metrics_before, metrics_after

    stored, events, before, after = asyncio.run(scenario())
    assert [e["payload"]["journal_id"] for e in events] == ["fl-audit-lane", "fl-audit-slow"]
    assert events[0]["actor_id"] == events[1]["actor_id"] and events[0]["actor_id"].startswith("service")
    assert [e["payload"]["hash"] for e in events] == [s["audit"]["hash"] for s in stored]

    def posts(text: str) -> float:
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("ledger_post_latency_seconds_count") and 'endpoint="post"' in line
        )

    def series(text: str, name: str) -> float:
        (value,) = [float(line.split(" ")[1]) for line in text.splitlines() if line.startswith(name + " ")]
        return value

    assert posts(after) == posts(before) + 2
    lane_posts = series(after, "ledger_fast_lane_requests_total") - series(
        before, "ledger_fast_lane_requests_total"
    )
    assert lane_posts == 1  # the lane's own counter: only the first post was answered by the lane
    assert series(after, "ledger_fast_lane_handovers_total") > series(
        before, "ledger_fast_lane_handovers_total"
    )
    assert series(after, "ledger_fast_lane_connections") >= 0


def _read_one(sock: socket.socket) -> bytes:
    """One whole response off a blocking socket (headers, then Content-Length bytes)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(
        next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")).split(b":")[1]
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def test_stopping_the_node_closes_lane_connections_and_a_new_node_serves_them(node: NodeHarness) -> None:
    """Tried: a keep-alive connection posts through the lane, then the node restarts: the server
    closes that idle connection (no hang), and a new connection posts through the new node's lane.
    Runs last in the module: it restarts the module's node."""
    url = urlsplit(node.url)
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(post_bytes(journal("fl-restart-1", "asset:fl-o", "liability:fl-p")))
        assert _read_one(sock).startswith(b"HTTP/1.1 200 ")
        node.restart()
        assert sock.recv(1) == b""  # closed by the stopping node
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(post_bytes(journal("fl-restart-2", "asset:fl-o", "liability:fl-p")))
        assert _read_one(sock).startswith(b"HTTP/1.1 200 ")
    assert lane_counts(node)[0] >= 1
