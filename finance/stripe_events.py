"""Stripe webhook events: signature verification with the official SDK, typed events, and the inbox.

`verify_event` checks the `Stripe-Signature` header with `stripe.Webhook.construct_event` (HMAC-SHA256
over ``"{t}.{body}"`` with the endpoint secret, 5-minute tolerance) and decodes the four event types
the ledger acts on into typed structs; anything else is `Ignored`. A missing, malformed, tampered or
stale signature is `WEBHOOK_SIGNATURE_INVALID` (400) with the reason in `details.reason`.

`WebhookInbox` decides what each verified event does to the ledger, exactly once:

* an event id seen before does nothing (Stripe retries deliveries);
* a payment intent pays once, whichever of its events arrives first or again;
* a refund or dispute (opened or closed) of a payment intent whose payment has not arrived yet is
  parked and released right after that payment (Stripe does not promise delivery order);
* a dispute opens once per dispute id and closes once (key `{dispute id}:closed`);
* a refund is applied once per Stripe refund id, so `charge.refunded` events that repeat earlier
  refunds of the same charge (each lists all refunds so far) apply only the new ones.

The inbox is in-memory state with a snapshot for the store: the HTTP layer persists what it returns
(the event ids and parked actions) in the same transaction as the postings they cause.
"""

from __future__ import annotations

from typing import Any, Final, Literal

import msgspec
import stripe

from ledger.errors import ErrorCode, LedgerError

TOLERANCE_S: Final = 300


class PaymentSucceeded(msgspec.Struct, frozen=True, tag=True):
    """`payment_intent.succeeded`: money received for an invoice (metadata.invoice_id)."""

    event_id: str
    payment_intent: str
    amount: int
    currency: str
    invoice_id: str | None


class Refunded(msgspec.Struct, frozen=True, tag=True):
    """One refund of a `charge.refunded` event (the event lists every refund of the charge so far)."""

    event_id: str
    payment_intent: str
    refund_id: str
    amount: int
    currency: str


class DisputeOpened(msgspec.Struct, frozen=True, tag=True):
    """`charge.dispute.created`: the buyer disputed a payment; the amount is at risk."""

    event_id: str
    payment_intent: str
    dispute_id: str
    amount: int
    currency: str
    reason: str


CLOSED_STATUSES: Final = {"won": "won", "warning_closed": "won", "lost": "lost"}
"""Stripe's statuses of a closed dispute -> what the ledger does: `won` (an inquiry closed without a
chargeback counts as won: the held money comes back) or `lost`."""


class DisputeClosed(msgspec.Struct, frozen=True, tag=True):
    """`charge.dispute.closed`: the dispute ended; `outcome` is `won` (money back) or `lost`."""

    event_id: str
    payment_intent: str
    dispute_id: str
    amount: int
    currency: str
    outcome: str
    status: str


class Ignored(msgspec.Struct, frozen=True, tag=True):
    """A verified event of a type the ledger does not act on."""

    event_id: str
    event_type: str


Event = PaymentSucceeded | Refunded | DisputeOpened | DisputeClosed | Ignored
Action = PaymentSucceeded | Refunded | DisputeOpened | DisputeClosed
Pending = Refunded | DisputeOpened | DisputeClosed
"""An action that needs its payment first (parked until it arrives)."""


def action_key(action: Pending) -> str:
    """What makes a pending action unique: the refund id, the dispute id, or `{dispute id}:closed`."""
    if isinstance(action, Refunded):
        return action.refund_id
    if isinstance(action, DisputeClosed):
        return f"{action.dispute_id}:closed"
    return action.dispute_id


def _invalid(reason: str, message: str) -> LedgerError:
    return LedgerError(ErrorCode.WEBHOOK_SIGNATURE_INVALID, message, {"reason": reason})


def verify_event(payload: bytes, signature_header: str | None, secret: str) -> list[Event]:
    """Verify and decode one webhook delivery; a `charge.refunded` may yield several refunds.

    Raises LedgerError WEBHOOK_SIGNATURE_INVALID (reason: missing | malformed | stale | mismatch)
    or VALIDATION_ERROR for a signed body that is not a Stripe event.
    """
    if not signature_header:
        raise _invalid("missing", "the Stripe-Signature header is missing")
    try:
        event = stripe.Webhook.construct_event(payload, signature_header, secret, tolerance=TOLERANCE_S)
    except stripe.SignatureVerificationError as exc:
        text = str(exc)
        reason = "stale" if "tolerance" in text else "malformed" if "header" in text.lower() else "mismatch"
        raise _invalid(reason, f"Stripe signature rejected: {text}") from None
    except ValueError as exc:  # the signature matched, the body is not JSON
        raise LedgerError(
            ErrorCode.VALIDATION_ERROR, f"webhook body is not JSON: {exc}", {"field": "$"}
        ) from None
    return decode_event(event.to_dict())


def decode_event(event: dict[str, Any]) -> list[Event]:
    """The typed form of a Stripe event dict (as `construct_event` returns it)."""
    try:
        event_id, kind = str(event["id"]), str(event["type"])
        obj = event["data"]["object"]
        if kind == "payment_intent.succeeded":
            metadata = obj.get("metadata") or {}
            return [
                PaymentSucceeded(
                    event_id,
                    str(obj["id"]),
                    int(obj.get("amount_received", obj["amount"])),
                    str(obj["currency"]).upper(),
                    metadata.get("invoice_id"),
                )
            ]
        if kind == "charge.refunded":
            refunds = (obj.get("refunds") or {}).get("data") or []
            return [
                Refunded(
                    event_id,
                    str(obj["payment_intent"]),
                    str(r["id"]),
                    int(r["amount"]),
                    str(r["currency"]).upper(),
                )
                for r in refunds
            ]
        if kind == "charge.dispute.created":
            return [
                DisputeOpened(
                    event_id,
                    str(obj["payment_intent"]),
                    str(obj["id"]),
                    int(obj["amount"]),
                    str(obj["currency"]).upper(),
                    str(obj.get("reason") or "unknown"),
                )
            ]
        if kind == "charge.dispute.closed":
            status = str(obj["status"])
            if status not in CLOSED_STATUSES:
                raise ValueError(f"status {status!r} is not a closed dispute's (won, lost, warning_closed)")
            return [
                DisputeClosed(
                    event_id,
                    str(obj["payment_intent"]),
                    str(obj["id"]),
                    int(obj["amount"]),
                    str(obj["currency"]).upper(),
                    CLOSED_STATUSES[status],
                    status,
                )
            ]
    except (KeyError, TypeError, ValueError) as exc:
        raise LedgerError(
            ErrorCode.VALIDATION_ERROR,
            f"Stripe event lacks a field the ledger needs: {exc}",
            {"field": "$.data.object"},
        ) from None
    return [Ignored(event_id, kind)]


class InboxState(msgspec.Struct):
    """What the inbox remembers (persisted by the caller): seen event ids, paid intents, applied
    refund and dispute ids, and actions parked until their payment arrives."""

    events: set[str] = msgspec.field(default_factory=set)
    paid: set[str] = msgspec.field(default_factory=set)
    applied: set[str] = msgspec.field(default_factory=set)
    parked: list[Pending] = msgspec.field(default_factory=list)


Outcome = Literal["applied", "duplicate", "parked", "ignored"]


class WebhookInbox:
    """Turns verified events into ledger actions, each exactly once, in a causal order."""

    def __init__(self, state: InboxState | None = None) -> None:
        self.state = state or InboxState()

    def accept(self, events: list[Event]) -> tuple[Outcome, list[Action]]:
        """The outcome of one delivery and the actions to post, in order (payments before their refunds)."""
        if not events:
            return "ignored", []
        event_id = events[0].event_id
        if event_id in self.state.events:
            return "duplicate", []
        self.state.events.add(event_id)
        actions: list[Action] = []
        parked = False
        for event in events:
            if isinstance(event, Ignored):
                continue
            if isinstance(event, PaymentSucceeded):
                if event.payment_intent in self.state.paid:
                    continue
                self.state.paid.add(event.payment_intent)
                actions.append(event)
                actions.extend(self._release(event.payment_intent))
                continue
            key = action_key(event)
            if key in self.state.applied or any(action_key(p) == key for p in self.state.parked):
                continue
            if event.payment_intent not in self.state.paid:
                self.state.parked.append(event)
                parked = True
                continue
            self.state.applied.add(key)
            actions.append(event)
        if actions:
            return "applied", actions
        if parked:
            return "parked", []
        return ("ignored" if all(isinstance(e, Ignored) for e in events) else "duplicate"), []

    def _release(self, payment_intent: str) -> list[Action]:
        ready = [p for p in self.state.parked if p.payment_intent == payment_intent]
        self.state.parked = [p for p in self.state.parked if p.payment_intent != payment_intent]
        for action in ready:
            self.state.applied.add(action_key(action))
        return list(ready)
