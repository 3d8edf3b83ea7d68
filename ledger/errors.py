"""Error codes and business rejections.

Exception tree (everything a caller may see):

    LedgerError                 base of every client-facing error; carries code, message, details
    └── Rejection               a business rejection of one request or one journal (a value
                                that batch answers carry per journal; raised for single calls)
    InvariantViolation          (ledger.invariants) our own bug: crash and restart

`ErrorCode` lists every code with its HTTP status. Precedence when several apply to one
request (DECISIONS D6): auth -> size/type -> VALIDATION_ERROR -> IDEMPOTENCY_CONFLICT ->
LEDGER_IMBALANCE -> INSUFFICIENT_FUNDS; `PRECEDENCE` keeps that order.
"""

from __future__ import annotations

import enum
from typing import Any


class ErrorCode(enum.StrEnum):
    """Every error code the node answers with."""

    NOT_AUTHORIZED = "NOT_AUTHORIZED"
    PAYLOAD_TOO_LARGE = "PAYLOAD_TOO_LARGE"
    UNSUPPORTED_MEDIA_TYPE = "UNSUPPORTED_MEDIA_TYPE"
    VALIDATION_ERROR = "VALIDATION_ERROR"
    BATCH_TOO_LARGE = "BATCH_TOO_LARGE"
    IDEMPOTENCY_CONFLICT = "IDEMPOTENCY_CONFLICT"
    LEDGER_IMBALANCE = "LEDGER_IMBALANCE"
    INSUFFICIENT_FUNDS = "INSUFFICIENT_FUNDS"
    INVALID_STATE = "INVALID_STATE"
    REFUND_EXCEEDS_PAID = "REFUND_EXCEEDS_PAID"
    WEBHOOK_SIGNATURE_INVALID = "WEBHOOK_SIGNATURE_INVALID"
    FX_RATE_MISSING = "FX_RATE_MISSING"
    ACCOUNT_UNMAPPED = "ACCOUNT_UNMAPPED"
    NOT_FOUND = "NOT_FOUND"
    PROOF_NOT_FOUND = "PROOF_NOT_FOUND"
    METHOD_NOT_ALLOWED = "METHOD_NOT_ALLOWED"
    RATE_LIMITED = "RATE_LIMITED"
    SHARD_MOVING = "SHARD_MOVING"
    SERVICE_UNAVAILABLE = "SERVICE_UNAVAILABLE"
    SIGNING_FAILURE = "SIGNING_FAILURE"
    RECONCILE_ERROR = "RECONCILE_ERROR"
    AUDIT_EXPORT_ERROR = "AUDIT_EXPORT_ERROR"
    INTERNAL_ERROR = "INTERNAL_ERROR"


HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.NOT_AUTHORIZED: 401,
    ErrorCode.PAYLOAD_TOO_LARGE: 413,
    ErrorCode.UNSUPPORTED_MEDIA_TYPE: 415,
    ErrorCode.VALIDATION_ERROR: 400,
    ErrorCode.BATCH_TOO_LARGE: 400,
    ErrorCode.IDEMPOTENCY_CONFLICT: 409,
    ErrorCode.LEDGER_IMBALANCE: 400,
    ErrorCode.INSUFFICIENT_FUNDS: 409,
    ErrorCode.INVALID_STATE: 409,
    ErrorCode.REFUND_EXCEEDS_PAID: 409,
    ErrorCode.WEBHOOK_SIGNATURE_INVALID: 400,
    ErrorCode.FX_RATE_MISSING: 422,
    ErrorCode.ACCOUNT_UNMAPPED: 422,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.PROOF_NOT_FOUND: 404,
    ErrorCode.METHOD_NOT_ALLOWED: 405,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.SHARD_MOVING: 503,
    ErrorCode.SERVICE_UNAVAILABLE: 503,
    ErrorCode.SIGNING_FAILURE: 500,
    ErrorCode.RECONCILE_ERROR: 500,
    ErrorCode.AUDIT_EXPORT_ERROR: 500,
    ErrorCode.INTERNAL_ERROR: 500,
}

PRECEDENCE: tuple[ErrorCode, ...] = (
    ErrorCode.NOT_AUTHORIZED,
    ErrorCode.PAYLOAD_TOO_LARGE,
    ErrorCode.UNSUPPORTED_MEDIA_TYPE,
    ErrorCode.VALIDATION_ERROR,
    ErrorCode.IDEMPOTENCY_CONFLICT,
    ErrorCode.LEDGER_IMBALANCE,
    ErrorCode.INSUFFICIENT_FUNDS,
)


class LedgerError(Exception):
    """Base of every client-facing error: a code, a human message and structured details."""

    def __init__(
        self, code: ErrorCode, message: str, details: dict[str, Any] | None = None, status: int | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details: dict[str, Any] = details or {}
        self.status = status

    @property
    def http_status(self) -> int:
        """The HTTP status this error is answered with (NOT_AUTHORIZED is 401 or 403)."""
        return self.status or HTTP_STATUS[self.code]

    def as_dict(self) -> dict[str, Any]:
        """The `error` member of the response envelope."""
        return {"code": str(self.code), "message": self.message, "details": self.details}


class Rejection(LedgerError):
    """A business rejection: the request was understood and refused; nothing was written."""


def validation_error(message: str, field: str | None = None, **details: Any) -> Rejection:
    """A VALIDATION_ERROR naming the offending field (a JSON path like `$.entries[0].side`)."""
    if field is not None:
        details["field"] = field
    return Rejection(ErrorCode.VALIDATION_ERROR, message, details)
