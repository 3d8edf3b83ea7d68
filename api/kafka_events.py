"""Payment events on Kafka: the wire schema, decoding, and how an outcome is classified.

An event is one JSON object (UTF-8), decoded by msgspec into `PaymentEvent` (unknown fields,
wrong types, floats for amounts and non-positive amounts are refused, as over HTTP). Each type
maps onto the finance service call the HTTP path makes:

    payment     -> POST /finance/payment   (FinanceService.pay)
    settlement  -> POST /settlement        (FinanceService.pay with the settlement id)
    refund      -> POST /finance/refund    (FinanceService.refund)

The idempotency key is the HTTP path's: (provider, provider_reference) names the payment or refund,
so a re-delivered event (or the same payment also posted over HTTP) answers the original answer and
posts nothing. `event_id` is carried for tracing and the dead-letter record only.

Outcomes: `POSTED`, `REPLAYED` (already recorded), `POISON` (undecodable, invalid, or rejected by
the ledger with a non-retryable code: goes to the dead-letter topic) and `RETRY` (the node or its
database is unavailable: the batch is retried, the partition never advances past it).
"""

from __future__ import annotations

import enum
from typing import Annotated, Any, Final, Literal

import msgspec

from finance.service import PaymentRequest, RefundRequest
from ledger.errors import ErrorCode, LedgerError

ID_MAX: Final = 200
EventId = Annotated[str, msgspec.Meta(min_length=1, max_length=ID_MAX)]
Amount = Annotated[int, msgspec.Meta(gt=0, le=2**63 - 1)]

RETRYABLE_CODES: Final = frozenset(
    {
        ErrorCode.SERVICE_UNAVAILABLE,
        ErrorCode.SHARD_MOVING,
        ErrorCode.RATE_LIMITED,
        ErrorCode.SIGNING_FAILURE,  # nothing was written; the signer comes back
    }
)
"""Ledger codes that mean "try again later" (nothing was written); every other code is final."""


class PaymentEvent(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """One payment event (docs/kafka.md)."""

    event_id: EventId
    type: Literal["payment", "settlement", "refund"]
    invoice_id: EventId
    amount: Amount
    currency: str
    provider: EventId
    provider_reference: EventId
    settlement_id: EventId | None = None
    occurred_at: str | None = None
    """The provider's time (RFC 3339), informational: the ledger's time is its commit time (D3)."""
    context: dict[str, Any] = {}
    """Free-form, informational (not part of the idempotency comparison)."""


class Outcome(enum.StrEnum):
    """What became of one event."""

    POSTED = "posted"
    REPLAYED = "replayed"
    POISON = "poison"
    RETRY = "retry"


class Reason(enum.StrEnum):
    """Why an event went to the dead-letter topic."""

    UNDECODABLE = "undecodable"
    """Not a UTF-8 JSON object."""
    INVALID = "invalid"
    """JSON, but not a valid event (missing or unknown field, wrong type, settlement without id)."""
    REJECTED = "rejected"
    """The ledger refused it with a final code (NOT_FOUND, INVALID_STATE, IDEMPOTENCY_CONFLICT, ...)."""


class Result(msgspec.Struct, frozen=True):
    """The outcome of one event; for POISON and RETRY, a reason and the ledger's code when there is one."""

    outcome: Outcome
    reason: str | None = None
    code: str | None = None
    message: str = ""


class Poison(Exception):
    """An event that can never be posted (raised by `decode_event`)."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


_decoder: Final = msgspec.json.Decoder(PaymentEvent)


def decode_event(value: bytes | None) -> PaymentEvent:
    """The event in a record's value; `Poison` (UNDECODABLE or INVALID) when it is not one."""
    if value is None:
        raise Poison(Reason.UNDECODABLE, "empty record value (tombstone)")
    try:
        event = _decoder.decode(value)
    except msgspec.ValidationError as exc:
        raise Poison(Reason.INVALID, str(exc)) from None
    except msgspec.DecodeError as exc:
        raise Poison(Reason.UNDECODABLE, f"malformed JSON: {exc}") from None
    if event.type == "settlement" and event.settlement_id is None:
        raise Poison(Reason.INVALID, "settlement_id is required for a settlement - at `$.settlement_id`")
    return event


def payment_request(event: PaymentEvent) -> PaymentRequest:
    """The finance request the HTTP path would build for this event."""
    kind = RefundRequest if event.type == "refund" else PaymentRequest
    return kind(
        amount=event.amount,
        currency=event.currency,
        payment_provider=event.provider,
        provider_reference=event.provider_reference,
        invoice_id=event.invoice_id,
    )


def classify_error(exc: BaseException) -> Result:
    """RETRY for an unavailable node (a retryable code, INTERNAL_ERROR, or any other exception: an
    outage or a bug must never skip an event); POISON (REJECTED, with the code) for a final answer."""
    if isinstance(exc, LedgerError):
        if exc.code in RETRYABLE_CODES or exc.code == ErrorCode.INTERNAL_ERROR:
            return Result(Outcome.RETRY, exc.code.lower(), str(exc.code), exc.message)
        return Result(Outcome.POISON, Reason.REJECTED, str(exc.code), exc.message)
    return Result(Outcome.RETRY, "unavailable", None, f"{type(exc).__name__}: {exc}")


def classify_answer(status: int, body: dict[str, Any]) -> Result:
    """An HTTP answer of the node (`ledger-node consume` posts over HTTP) classified like `classify_error`."""
    if status < 300 and body.get("ok") is True:
        return Result(Outcome.POSTED)  # the answer does not say whether it was a replay
    found = body.get("error")
    error: dict[str, Any] = found if isinstance(found, dict) else {}
    code_text = str(error.get("code", ""))
    message = str(error.get("message", f"HTTP {status}"))
    try:
        code = ErrorCode(code_text)
    except ValueError:
        code = None
    if code in RETRYABLE_CODES or (code is None and (status >= 500 or status == 429)):
        return Result(Outcome.RETRY, (code_text or f"http_{status}").lower(), code_text or None, message)
    if code in (ErrorCode.NOT_AUTHORIZED, ErrorCode.INTERNAL_ERROR):
        # a wrong token or a node bug is the operator's to fix, not the event's fault: keep it
        return Result(Outcome.RETRY, code_text.lower(), code_text, message)
    return Result(Outcome.POISON, Reason.REJECTED, code_text or None, message)
