"""The response envelope: `{ok: true, ...}` or `{ok: false, error: {code, message, details}}`.

Every response of the node, including 404, 405, 413 and unexpected failures, goes through
`error_middleware`, so a client never sees a bare status page or a traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final

import msgspec
from aiohttp import web

from ledger.errors import ErrorCode, LedgerError
from store.repository import is_connection_failure

log = logging.getLogger(__name__)
_encoder: Final = msgspec.json.Encoder()

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def ok(status: int = 200, /, **body: Any) -> web.Response:
    """A success response (`status` is positional, so a body may carry a `status` key)."""
    return web.Response(body=ok_body(**body), status=status, content_type="application/json")


def ok_body(**body: Any) -> bytes:
    """The bytes of a success body, `{"ok": true, ...}`."""
    return _encoder.encode({"ok": True, **body})


def error_body(error: LedgerError) -> bytes:
    """The bytes of a failure body, `{"ok": false, "error": {code, message, details}}`."""
    return _encoder.encode({"ok": False, "error": error.as_dict()})


RETRYABLE_STATUSES: Final = frozenset({429, 503})


def error_response(error: LedgerError, headers: dict[str, str] | None = None) -> web.Response:
    """An error response with the error's HTTP status; a 429 or 503 always carries `Retry-After`."""
    if error.http_status in RETRYABLE_STATUSES and "Retry-After" not in (headers or {}):
        headers = {**(headers or {}), "Retry-After": "1"}
    return web.Response(
        body=error_body(error),
        status=error.http_status,
        content_type="application/json",
        headers=headers,
    )


_HTTP_CODES: Final = {
    401: ErrorCode.NOT_AUTHORIZED,
    403: ErrorCode.NOT_AUTHORIZED,
    404: ErrorCode.NOT_FOUND,
    405: ErrorCode.METHOD_NOT_ALLOWED,
    413: ErrorCode.PAYLOAD_TOO_LARGE,
    415: ErrorCode.UNSUPPORTED_MEDIA_TYPE,
    429: ErrorCode.RATE_LIMITED,
}


def _from_http(exc: web.HTTPException) -> LedgerError:
    code = _HTTP_CODES.get(exc.status)
    if code is ErrorCode.NOT_FOUND:
        return LedgerError(code, "no such endpoint", {"resource": "endpoint"})
    if code is ErrorCode.METHOD_NOT_ALLOWED:
        allowed = sorted(getattr(exc, "allowed_methods", ()) or ())
        return LedgerError(code, "method not allowed", {"allowed": allowed})
    if code is ErrorCode.PAYLOAD_TOO_LARGE:
        return LedgerError(code, "request body too large", {})
    if code is not None:
        return LedgerError(code, exc.reason or code.value, {})
    if exc.status >= 500:
        return LedgerError(ErrorCode.INTERNAL_ERROR, "internal error", {})
    return LedgerError(ErrorCode.VALIDATION_ERROR, exc.reason or "bad request", {})


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every failure into the envelope with a precise code (`api.app.front_middleware` does the
    same for the node, together with shedding and auth)."""
    try:
        return await handler(request)
    except Exception as exc:
        return error_answer(request, exc)


def error_answer(request: web.Request, exc: Exception) -> web.Response:
    """The envelope of a failure of `request`, with a precise code; an HTTPException below 400 (a
    redirect) is raised again. Call it from the `except` block that caught `exc`."""
    if isinstance(exc, web.HTTPException):
        if exc.status < 400:
            raise exc
        return error_response(_from_http(exc))
    return error_response(error_of(exc, request.method, request.path))


def error_of(exc: Exception, method: str, path: str) -> LedgerError:
    """The error a failure of `method path` answers (not an HTTPException): a LedgerError as it is,
    503 when PostgreSQL is unreachable (the client should retry), else a logged 500. Call it from
    the `except` block that caught `exc`."""
    if isinstance(exc, LedgerError):
        return exc
    if is_connection_failure(exc):
        log.warning("database unavailable on %s %s: %s", method, path, exc)
        return database_unavailable()
    log.exception("unhandled error on %s %s", method, path)
    return LedgerError(ErrorCode.INTERNAL_ERROR, "internal error", {})


def database_unavailable() -> LedgerError:
    """503 SERVICE_UNAVAILABLE, retryable: the database connection failed (outage, restart, reset)."""
    return LedgerError(ErrorCode.SERVICE_UNAVAILABLE, "database unavailable; retry", {"retryable": True})
