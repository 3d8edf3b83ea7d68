"""The fast lane's request parser (api/fast_lane.py `parse`): what it takes, what it leaves to aiohttp.

Each case names the request tried. `HAND_OVER` means aiohttp's own parser decides; `None` means the
lane waits for more bytes; a `Head` means the lane answers it, with its body exactly where the
Content-Length puts it.
"""

from __future__ import annotations

import pytest

from api.fast_lane import HAND_OVER, HEAD_MAX, Head, parse, response

BODY = b'{"entries":[]}'


def request(*headers: bytes, line: bytes = b"POST /ledger/post HTTP/1.1", body: bytes = BODY) -> bytes:
    """A request with these header lines, plus a Content-Length unless one is given."""
    lines = [line, b"Host: x", *headers]
    if not any(h.lower().startswith(b"content-length") for h in headers):
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def test_a_plain_post_is_taken_with_its_headers_and_body() -> None:
    raw = request(b"Authorization: Bearer t", b"Content-Type: application/json")
    head = parse(raw)
    assert isinstance(head, Head)
    assert head.headers[b"authorization"] == b"Bearer t"
    assert head.headers[b"content-type"] == b"application/json"
    assert raw[head.body_start : head.end] == BODY and head.end == len(raw)


def test_pipelined_requests_are_taken_one_at_a_time() -> None:
    first, second = request(body=b"1"), request(body=b"22")
    head = parse(first + second)
    assert isinstance(head, Head) and head.end == len(first)
    rest = parse((first + second)[head.end :])
    assert isinstance(rest, Head) and (first + second)[head.end :][rest.body_start : rest.end] == b"22"


@pytest.mark.parametrize(
    "partial",
    [b"", b"PO", b"POST /ledger/po", request()[:40], request()[: len(request()) - 1]],
    ids=["nothing", "method-prefix", "target-prefix", "head-cut", "body-cut"],
)
def test_an_incomplete_request_waits_for_more(partial: bytes) -> None:
    assert parse(partial) is None


@pytest.mark.parametrize(
    "raw",
    [
        request(line=b"GET /health HTTP/1.1"),
        request(line=b"POST /ledger/post_batch HTTP/1.1"),
        request(line=b"POST /ledger/post HTTP/1.0"),
        request(line=b"POST /ledger/post?x=1 HTTP/1.1"),
        request(line=b"post /ledger/post HTTP/1.1"),
        request(b"Transfer-Encoding: chunked"),
        request(b"Expect: 100-continue"),
        request(b"Upgrade: h2c"),
        request(b"Content-Encoding: gzip"),
        request(b"Connection: close"),
        request(b"Connection: upgrade"),
        request(b"Content-Length: 14", b"Content-Length: 14"),
        request(b"Content-Length: +14"),
        request(b"Content-Length: 0x0e"),
        request(b"Content-Length: 1048577", body=b""),
        request(b"Authorization: a", b"authorization: b"),
        request(b"X-Folded: a", b" continued"),
        request(b"X-Bad\tName: a"),
        request(b"X-Space : a"),
        request(b"X-Bare-LF: a\nInjected: b"),
        request(b"X-Bare-CR: a\rb"),
        request(b"X-Null: a\x00b"),
        request(b"X-Latin: caf\xe9"),
        request(b"no colon here"),
        b"GET / HTTP/1.1\r\n",
        b"POST /ledger/post HTTP/1.1\r\nX: " + b"a" * HEAD_MAX,
    ],
    ids=[
        "other-route", "batch-route", "http-1.0", "query", "lower-case-method", "chunked", "expect",
        "upgrade",
        "content-encoding", "connection-close", "connection-upgrade", "two-lengths", "signed-length",
        "hex-length", "too-large", "repeated-header", "obs-fold", "tab-in-name", "space-before-colon",
        "bare-lf", "bare-cr", "nul", "non-ascii", "no-colon", "other-prefix", "endless-head",
    ],
)  # fmt: skip
def test_anything_else_goes_to_aiohttp(raw: bytes) -> None:
    assert parse(raw) == HAND_OVER


def test_a_post_without_content_length_goes_to_aiohttp() -> None:
    assert parse(b"POST /ledger/post HTTP/1.1\r\nHost: x\r\n\r\n") == HAND_OVER


def test_keep_alive_and_header_case_are_accepted() -> None:
    head = parse(request(b"CONNECTION: Keep-Alive", b"content-TYPE: application/json"))
    assert isinstance(head, Head) and head.headers[b"content-type"] == b"application/json"


def test_response_carries_length_type_and_retry_after_for_retryable_statuses() -> None:
    ok = response(200, b'{"ok":true}', b"Mon, 07 Dec 2026 19:00:00 GMT")
    assert ok.startswith(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n")
    assert ok.endswith(b'\r\n\r\n{"ok":true}') and b"Retry-After" not in ok
    busy = response(503, b"{}", b"d")
    assert busy.startswith(b"HTTP/1.1 503 Service Unavailable\r\n") and b"\r\nRetry-After: 1\r\n" in busy
    assert b"\r\nRetry-After: 1\r\n" in response(429, b"{}", b"d")
