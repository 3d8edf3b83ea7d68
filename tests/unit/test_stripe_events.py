"""Stripe webhook verification (official SDK) and the inbox: valid, tampered, stale, duplicate,
out-of-order deliveries, each with its ledger effect exactly once."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any

import msgspec
import pytest

from finance.stripe_events import (
    DisputeClosed,
    DisputeOpened,
    Ignored,
    InboxState,
    PaymentSucceeded,
    Refunded,
    WebhookInbox,
    verify_event,
)
from ledger.errors import ErrorCode, LedgerError

SECRET = "whsec_test_ledger"


def sign(payload: bytes, secret: str = SECRET, at: int | None = None) -> str:
    """A Stripe-Signature header as Stripe builds it: t=..,v1=HMAC-SHA256(secret, "t.body")."""
    stamp = int(time.time()) if at is None else at
    digest = hmac.new(secret.encode(), f"{stamp}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={stamp},v1={digest}"


def event(event_id: str, kind: str, obj: dict[str, Any]) -> bytes:
    return json.dumps({"id": event_id, "object": "event", "type": kind, "data": {"object": obj}}).encode()


def paid(event_id: str, intent: str, amount: int = 11900, invoice: str = "inv-001") -> bytes:
    obj = {"id": intent, "object": "payment_intent", "amount": amount, "amount_received": amount,
           "currency": "eur", "metadata": {"invoice_id": invoice}}  # fmt: skip
    return event(event_id, "payment_intent.succeeded", obj)


def refunded(event_id: str, intent: str, refunds: list[tuple[str, int]]) -> bytes:
    total = sum(a for _, a in refunds)
    obj = {"id": "ch_1", "object": "charge", "payment_intent": intent, "amount_refunded": total,
           "refunds": {"data": [{"id": r, "amount": a, "currency": "eur"} for r, a in refunds]}}  # fmt: skip
    return event(event_id, "charge.refunded", obj)


def disputed(
    event_id: str, intent: str, dispute: str = "dp_1", amount: int = 500, currency: str = "eur"
) -> bytes:
    obj = {"id": dispute, "object": "dispute", "charge": "ch_1", "payment_intent": intent, "amount": amount,
           "currency": currency, "reason": "fraudulent", "status": "needs_response"}  # fmt: skip
    return event(event_id, "charge.dispute.created", obj)


def dispute_closed(
    event_id: str, intent: str, status: str, dispute: str = "dp_1", amount: int = 500, currency: str = "eur"
) -> bytes:
    obj = {"id": dispute, "object": "dispute", "charge": "ch_1", "payment_intent": intent, "amount": amount,
           "currency": currency, "reason": "fraudulent", "status": status}  # fmt: skip
    return event(event_id, "charge.dispute.closed", obj)


def test_a_valid_delivery_decodes_into_typed_events() -> None:
    """Tried: a signed payment_intent.succeeded, charge.refunded (two refunds), charge.dispute.created
    and an unrelated type -> the typed events with amounts in minor units and upper-case currency."""
    body = paid("evt_1", "pi_1")
    assert verify_event(body, sign(body), SECRET) == [
        PaymentSucceeded("evt_1", "pi_1", 11900, "EUR", "inv-001")
    ]
    body = refunded("evt_2", "pi_1", [("re_1", 100), ("re_2", 250)])
    assert verify_event(body, sign(body), SECRET) == [
        Refunded("evt_2", "pi_1", "re_1", 100, "EUR"),
        Refunded("evt_2", "pi_1", "re_2", 250, "EUR"),
    ]
    body = disputed("evt_3", "pi_1")
    assert verify_event(body, sign(body), SECRET) == [
        DisputeOpened("evt_3", "pi_1", "dp_1", 500, "EUR", "fraudulent")
    ]
    body = event("evt_4", "customer.created", {"id": "cus_1"})
    assert verify_event(body, sign(body), SECRET) == [Ignored("evt_4", "customer.created")]


@pytest.mark.parametrize(
    ("why", "header", "body"),
    [
        ("missing", None, paid("evt_1", "pi_1")),
        ("malformed", "not-a-signature", paid("evt_1", "pi_1")),
        (
            "mismatch",
            sign(paid("evt_1", "pi_1", amount=1)),
            paid("evt_1", "pi_1"),
        ),  # body changed after signing
        ("mismatch", sign(paid("evt_1", "pi_1"), secret="whsec_other"), paid("evt_1", "pi_1")),
        ("stale", sign(paid("evt_1", "pi_1"), at=int(time.time()) - 301), paid("evt_1", "pi_1")),
    ],
)
def test_bad_signatures_are_rejected_with_the_reason(why: str, header: str | None, body: bytes) -> None:
    """Tried: no header, garbage header, a tampered body, the wrong secret, a signature 301 s old."""
    with pytest.raises(LedgerError) as caught:
        verify_event(body, header, SECRET)
    assert caught.value.code is ErrorCode.WEBHOOK_SIGNATURE_INVALID
    assert caught.value.details["reason"] == why


def test_a_signed_body_that_is_not_an_event_is_a_validation_error() -> None:
    """Tried: a correctly signed payment_intent.succeeded without its amount -> VALIDATION_ERROR."""
    body = event("evt_9", "payment_intent.succeeded", {"id": "pi_9", "currency": "eur"})
    with pytest.raises(LedgerError) as caught:
        verify_event(body, sign(body), SECRET)
    assert caught.value.code is ErrorCode.VALIDATION_ERROR


def _accept(inbox: WebhookInbox, body: bytes) -> tuple[str, list[Any]]:
    return inbox.accept(verify_event(body, sign(body), SECRET))


def test_duplicates_apply_nothing_twice() -> None:
    """Tried: the same event id twice; a second event for the same payment intent; a charge.refunded
    that repeats an earlier refund next to a new one -> each payment and refund applied once."""
    inbox = WebhookInbox()
    assert _accept(inbox, paid("evt_1", "pi_1")) == (
        "applied",
        [PaymentSucceeded("evt_1", "pi_1", 11900, "EUR", "inv-001")],
    )
    assert _accept(inbox, paid("evt_1", "pi_1")) == ("duplicate", [])
    assert _accept(inbox, paid("evt_1b", "pi_1")) == ("duplicate", [])
    outcome, actions = _accept(inbox, refunded("evt_2", "pi_1", [("re_1", 100)]))
    assert (outcome, [a.refund_id for a in actions]) == ("applied", ["re_1"])
    outcome, actions = _accept(inbox, refunded("evt_3", "pi_1", [("re_1", 100), ("re_2", 50)]))
    assert (outcome, [a.refund_id for a in actions]) == ("applied", ["re_2"])


def test_a_refund_before_its_payment_is_parked_then_applied_after_it() -> None:
    """Tried: charge.refunded and a dispute for pi_7 arrive before payment_intent.succeeded -> both
    parked (nothing posted), then the payment posts first and the parked ones right after it, once;
    the state survives a snapshot round trip (what the store keeps)."""
    inbox = WebhookInbox()
    assert _accept(inbox, refunded("evt_r", "pi_7", [("re_7", 300)])) == ("parked", [])
    assert _accept(inbox, disputed("evt_d", "pi_7")) == ("parked", [])
    assert _accept(inbox, refunded("evt_r2", "pi_7", [("re_7", 300)])) == (
        "duplicate",
        [],
    )  # same refund again
    restored = WebhookInbox(msgspec.json.decode(msgspec.json.encode(inbox.state), type=InboxState))
    outcome, actions = _accept(restored, paid("evt_p", "pi_7"))
    assert outcome == "applied"
    assert [type(a).__name__ for a in actions] == ["PaymentSucceeded", "Refunded", "DisputeOpened"]
    assert restored.state.parked == []
    assert _accept(restored, refunded("evt_r3", "pi_7", [("re_7", 300)])) == ("duplicate", [])


@pytest.mark.parametrize(("status", "outcome"), [("won", "won"), ("warning_closed", "won"), ("lost", "lost")])
def test_a_closed_dispute_decodes_with_what_the_ledger_does(status: str, outcome: str) -> None:
    """Tried: charge.dispute.closed with Stripe's three closed statuses -> DisputeClosed whose
    outcome is won (inquiry closed counts as won: the held money returns) or lost."""
    body = dispute_closed("evt_c", "pi_c", status, dispute="dp_c", amount=700, currency="usd")
    (closed,) = verify_event(body, sign(body), SECRET)
    assert closed == DisputeClosed("evt_c", "pi_c", "dp_c", 700, "USD", outcome, status)


def test_a_closed_dispute_with_an_open_status_is_a_validation_error() -> None:
    """Tried: charge.dispute.closed whose status is not a closed one -> VALIDATION_ERROR (Stripe retries)."""
    body = dispute_closed("evt_c2", "pi_c", "under_review")
    with pytest.raises(LedgerError) as caught:
        verify_event(body, sign(body), SECRET)
    assert caught.value.code is ErrorCode.VALIDATION_ERROR


def test_a_dispute_opens_once_and_closes_once_even_before_its_payment() -> None:
    """Tried: a dispute's close and its opening arrive before the payment -> both parked (distinct
    keys), released in arrival order after the payment; repeats of either (new event ids) -> duplicate."""
    inbox = WebhookInbox()
    assert _accept(inbox, dispute_closed("evt_x1", "pi_9", "lost")) == ("parked", [])
    assert _accept(inbox, disputed("evt_x2", "pi_9")) == ("parked", [])
    assert _accept(inbox, dispute_closed("evt_x3", "pi_9", "lost")) == ("duplicate", [])
    outcome, actions = _accept(inbox, paid("evt_x4", "pi_9"))
    assert outcome == "applied"
    assert [type(a).__name__ for a in actions] == ["PaymentSucceeded", "DisputeClosed", "DisputeOpened"]
    assert _accept(inbox, disputed("evt_x5", "pi_9")) == ("duplicate", [])
    assert _accept(inbox, dispute_closed("evt_x6", "pi_9", "lost")) == ("duplicate", [])
    assert inbox.state.applied >= {"dp_1", "dp_1:closed"}
