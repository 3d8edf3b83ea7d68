"""Reading requests: media type, size limits, query parameters, the Idempotency-Key header."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Final, TypeVar

import msgspec
from aiohttp import web

from ledger.errors import ErrorCode, LedgerError, validation_error
from ledger.journal import rejection_from_msgspec
from ledger.timestamps import parse_rfc3339

SINGLE_BODY_MAX: Final = 1024 * 1024
BATCH_BODY_MAX: Final = 32 * 1024 * 1024
IDEMPOTENCY_KEY_PATTERN: Final = re.compile(r"^[\x21-\x7e]{1,200}$")

T = TypeVar("T")


def decode_json(body: bytes, kind: type[T]) -> T:
    """Decode a JSON body into `kind` (strict msgspec types); VALIDATION_ERROR naming the bad field."""
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        raise rejection_from_msgspec(exc) from None
    except msgspec.DecodeError as exc:
        raise validation_error(f"malformed JSON: {exc}", "$") from None


def _too_large(limit: int) -> LedgerError:
    return LedgerError(ErrorCode.PAYLOAD_TOO_LARGE, f"body over {limit} bytes", {"limit_bytes": limit})


async def json_body(request: web.Request, limit: int = SINGLE_BODY_MAX) -> bytes:
    """The raw JSON body: 415 unless `application/json`, 413 above `limit` bytes."""
    if (
        request.headers.get("Content-Type") != "application/json"
        and request.content_type != "application/json"
    ):
        raise LedgerError(
            ErrorCode.UNSUPPORTED_MEDIA_TYPE,
            "Content-Type must be application/json",
            {"content_type": request.content_type},
        )
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(limit)
    if request.content.is_eof():  # the whole body came with the headers (a small one): take it at once
        body = request.content.read_nowait()
        if len(body) > limit:
            raise _too_large(limit)
        return body
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(256 * 1024):
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def idempotency_key(request: web.Request) -> str | None:
    """The Idempotency-Key header (1-200 printable ASCII characters), if given."""
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not IDEMPOTENCY_KEY_PATTERN.fullmatch(key):
        raise validation_error("Idempotency-Key must be 1-200 printable ASCII characters", "Idempotency-Key")
    return key


def query_time(request: web.Request, name: str) -> datetime | None:
    """An RFC 3339 query parameter."""
    value = request.query.get(name)
    if value is None or value == "":
        return None
    moment = parse_rfc3339(value)
    if moment is None:
        raise validation_error(f"{name} must be an RFC 3339 timestamp with offset", name)
    return moment


def query_int(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    """A bounded integer query parameter."""
    value = request.query.get(name)
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        raise validation_error(f"{name} must be an integer", name) from None
    if not low <= number <= high:
        raise validation_error(f"{name} must be between {low} and {high}", name)
    return number
