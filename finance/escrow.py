"""Escrow (REQUIREMENTS F7): validation, the state machine, release conditions and the journals.

Pure: no I/O, no clock; the caller passes what it read (the stored escrow, whether an audit event
exists) and performs the ledger calls these functions describe.

An escrow locks `amount` of `currency` for an order until a condition is met:

- allocate: journal `escrow.{id}.fund` debits the funding account (default
  `asset:cash:{provider}:{CCY}`, the buyer's money received at the provider) and credits the
  escrow pool `liability:escrow:{provider}:{CCY}`; then hold `escrow.{id}` (pending) debits the
  pool and credits the payee (`liability:royalty:{participant}` for a registered participant, so
  payout runs pay it, or an explicit `payee_account`). The pool is a split account, so both
  journals are single-shard (holds must be). Status `locked`.
- release: the condition is checked, then the hold is posted in full: the payee is credited and
  the pool is back where it was before the escrow. Status `released`, `releasedAt` set.
- cancel: the hold is voided, then journal `escrow.{id}.refund` debits the pool and credits the
  funding account (the money goes back to the buyer). Status `cancelled`.

States: `locked -> released | cancelled`, nothing else (409 INVALID_STATE with `current` and
`requested`). Every id is derived from the escrow id, so a call retried after a crash replays its
ledger calls instead of repeating them. A release or cancel records its request (`action`,
`action_hash`) before its ledger calls, so a crash in between can only be finished by the same
request again, never turned into the other action.

Conditions: `{"type": "delivery"}` needs `evidence.delivery_ref` in the release request;
`{"type": "audit_event", "event_id": ...}` needs that audit event (its `seq`, or its hash in hex)
to exist; `{"type": "approval"}` is released only through multisig governance (kind
`escrow_release`), as is any release at or above that kind's threshold.
"""

from __future__ import annotations

import enum
import hashlib
import re
from typing import Any, Final

import msgspec

from finance import chart
from ledger.accounts import ACCOUNT_ID_LENGTH_MAX, account_type_of
from ledger.errors import ErrorCode, Rejection, validation_error
from ledger.invariants import check
from ledger.money import fits_int64, is_currency
from signer.canonical import canonical

KIND: Final = "escrow_release"
"""The governance kind (and threshold name) of gated escrow releases."""
PROVIDER_DEFAULT: Final = "stripe"
ESCROW_ID_PATTERN: Final = re.compile(r"^[A-Za-z0-9:._-]{1,120}$")
"""Escrow ids leave room in the 200-character journal id for the derived ids' affixes."""
TEXT_MAX: Final = 200
REASON_MAX: Final = 500


class Status(enum.StrEnum):
    """An escrow's state (the seeds' `status`)."""

    LOCKED = "locked"
    RELEASED = "released"
    CANCELLED = "cancelled"


class Action(enum.StrEnum):
    """What a release or cancel request asks for; the state it leads to is `Action.target`."""

    RELEASE = "release"
    CANCEL = "cancel"

    @property
    def target(self) -> Status:
        """The state the action ends in."""
        return Status.RELEASED if self is Action.RELEASE else Status.CANCELLED


class Step(enum.Enum):
    """What to do with a release or cancel request: run (or finish) it, or answer it as a replay."""

    RUN = "run"
    REPLAY = "replay"


class Delivery(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="type", tag="delivery"):
    """Released on evidence of delivery (`evidence.delivery_ref`)."""


class AuditEvent(
    msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="type", tag="audit_event"
):
    """Released once the audit event `event_id` (its seq, or its hash in hex) exists."""

    event_id: str


class Approval(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="type", tag="approval"):
    """Released only by multisig approval."""


Condition = Delivery | AuditEvent | Approval


class Evidence(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What a release request shows for its condition."""

    delivery_ref: str | None = None
    note: str | None = None


class AllocateRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`POST /finance/allocate_escrow`: give `payee` (a participant) or `payee_account`."""

    escrow_id: str
    order_id: str
    amount: int
    currency: str
    condition: Condition
    payee: str | None = None
    payee_account: str | None = None
    provider: str = PROVIDER_DEFAULT
    funding_account: str | None = None


class ReleaseRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`POST /finance/release_escrow`."""

    escrow_id: str
    evidence: Evidence | None = None


class CancelRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`POST /finance/cancel_escrow`."""

    escrow_id: str
    reason: str | None = None


class Terms(msgspec.Struct, frozen=True):
    """A validated escrow before it is stored: every account resolved."""

    escrow_id: str
    order_id: str
    amount: int
    currency: str
    condition: Condition
    provider: str
    funding_account: str
    pool_account: str
    payee_account: str
    participant_id: str | None


def pool_account(provider: str, currency: str) -> str:
    """The split escrow pool of a provider and currency."""
    check(is_currency(currency), f"escrow pool for unknown currency {currency!r}")
    return f"liability:escrow:{chart.check_segment(provider, 'provider')}:{currency}"


def fund_journal_id(escrow_id: str) -> str:
    """The journal that moves the funding into the pool."""
    return f"escrow.{escrow_id}.fund"


def hold_id(escrow_id: str) -> str:
    """The hold that reserves the pool's money for the payee (also its posted journal's id)."""
    return f"escrow.{escrow_id}"


def refund_journal_id(escrow_id: str) -> str:
    """The journal that gives a cancelled escrow's money back to the funding account."""
    return f"escrow.{escrow_id}.refund"


def check_escrow_id(escrow_id: str) -> str:
    """`escrow_id` if well formed, else VALIDATION_ERROR on `$.escrow_id`."""
    if not ESCROW_ID_PATTERN.fullmatch(escrow_id):
        raise validation_error("escrow_id must be 1-120 characters of [A-Za-z0-9:._-]", "$.escrow_id")
    return escrow_id


def _account(value: str, field: str) -> str:
    if len(value) > ACCOUNT_ID_LENGTH_MAX or account_type_of(value) is None:
        raise validation_error("must be an account id type:rest (asset, liability, equity, ...)", field)
    return value


def _text(value: str, field: str, limit: int = TEXT_MAX) -> str:
    if not value.strip() or len(value) > limit:
        raise validation_error(f"must be 1-{limit} characters", field)
    return value


def _check_condition(condition: Condition) -> None:
    if isinstance(condition, AuditEvent):
        _text(condition.event_id, "$.condition.event_id")


def terms_of(request: AllocateRequest) -> Terms:
    """The validated terms of an allocation; VALIDATION_ERROR naming the bad field.

    Whether `payee` is a registered participant is the caller's check (it needs the store).
    """
    check_escrow_id(request.escrow_id)
    _text(request.order_id, "$.order_id")
    if request.amount <= 0 or not fits_int64(request.amount):
        raise validation_error("amount must be minor units > 0", "$.amount")
    if not is_currency(request.currency):
        raise validation_error(f"unknown currency {request.currency!r}", "$.currency")
    chart.check_segment(request.provider, "$.provider")
    _check_condition(request.condition)
    if (request.payee is None) == (request.payee_account is None):
        raise validation_error("give payee (a participant id) or payee_account, one of them", "$.payee")
    pool = pool_account(request.provider, request.currency)
    participant = None
    if request.payee is not None:
        participant = chart.check_segment(request.payee, "$.payee")
        payee = chart.royalty_payable(participant)
    else:
        payee = _account(request.payee_account or "", "$.payee_account")
    funding = chart.cash(request.provider, request.currency)
    if request.funding_account is not None:
        funding = _account(request.funding_account, "$.funding_account")
    for value, field in ((payee, "$.payee_account"), (funding, "$.funding_account")):
        if value == pool:
            raise validation_error("cannot be the escrow pool itself", field)
    if payee == funding:
        raise validation_error("the payee and the funding account must differ", "$.funding_account")
    return Terms(
        request.escrow_id, request.order_id, request.amount, request.currency, request.condition,
        request.provider, funding, pool, payee, participant,
    )  # fmt: skip


def allocate_hash(terms: Terms) -> bytes:
    """What identifies an allocation for replays: its validated terms, canonically encoded."""
    return hashlib.sha256(canonical(msgspec.to_builtins(terms))).digest()


def check_release(request: ReleaseRequest) -> None:
    """VALIDATION_ERROR naming a bad field of a release request."""
    check_escrow_id(request.escrow_id)
    evidence = request.evidence
    if evidence is not None:
        if evidence.delivery_ref is not None:
            _text(evidence.delivery_ref, "$.evidence.delivery_ref")
        if evidence.note is not None:
            _text(evidence.note, "$.evidence.note", REASON_MAX)


def check_cancel(request: CancelRequest) -> None:
    """VALIDATION_ERROR naming a bad field of a cancel request."""
    check_escrow_id(request.escrow_id)
    if request.reason is not None:
        _text(request.reason, "$.reason", REASON_MAX)


def release_params(request: ReleaseRequest) -> dict[str, Any]:
    """A release request as plain data (the governance action's params, the replay identity)."""
    evidence = None if request.evidence is None else msgspec.to_builtins(request.evidence)
    return {"escrow_id": request.escrow_id, "evidence": evidence}


def action_hash(action: Action, params: dict[str, Any]) -> bytes:
    """What identifies a release or cancel request for replays."""
    return hashlib.sha256(canonical({"action": str(action), "params": params})).digest()


def next_step(
    escrow_id: str,
    current: Status,
    recorded: Action | None,
    recorded_hash: bytes | None,
    requested: Action,
    digest: bytes,
) -> Step:
    """The state machine: run (or finish) `requested`, replay it, or refuse it.

    `recorded`/`recorded_hash` are the release or cancel already recorded on the escrow (None while
    it is plainly locked). The same request again -> RUN while unfinished, REPLAY once done; another
    payload for that action -> IDEMPOTENCY_CONFLICT; the other action -> INVALID_STATE.
    """
    check((recorded is None) == (recorded_hash is None), "an escrow's action and its hash go together")
    check(current is Status.LOCKED or recorded is not None, "a finished escrow records its action")
    details: dict[str, Any] = {"escrow_id": escrow_id, "current": str(current),
                               "requested": str(requested.target)}  # fmt: skip
    if recorded is not None and recorded is not requested:
        if current is Status.LOCKED:
            details["pending"] = str(recorded.target)
        raise Rejection(
            ErrorCode.INVALID_STATE, f"escrow is {current}; it cannot become {requested.target}", details
        )
    if recorded is None:
        return Step.RUN
    if recorded_hash != digest:
        raise Rejection(
            ErrorCode.IDEMPOTENCY_CONFLICT, f"escrow {escrow_id} was already {requested.target} by a "
            "different request", {"escrow_id": escrow_id},
        )  # fmt: skip
    return Step.REPLAY if current is requested.target else Step.RUN


def needs_approval(condition: Condition) -> bool:
    """True when only multisig governance may release (the `approval` condition)."""
    return isinstance(condition, Approval)


def check_condition(
    escrow_id: str, condition: Condition, evidence: Evidence | None, audit_event_found: bool
) -> None:
    """409 INVALID_STATE (`reason: condition_not_met`) unless the release condition holds.

    `approval` holds here: governance is the gate, and its executor releases.
    """
    if isinstance(condition, Delivery):
        met = evidence is not None and evidence.delivery_ref is not None
        wanted = "evidence.delivery_ref"
    elif isinstance(condition, AuditEvent):
        met, wanted = audit_event_found, f"audit event {condition.event_id}"
    else:
        met, wanted = True, ""
    if not met:
        raise Rejection(
            ErrorCode.INVALID_STATE, f"release condition not met: needs {wanted}",
            {"escrow_id": escrow_id, "current": str(Status.LOCKED), "requested": str(Status.RELEASED),
             "reason": "condition_not_met", "condition": condition_type(condition)},
        )  # fmt: skip


def condition_type(condition: Condition) -> str:
    """The condition's `type`."""
    tag = type(condition).__struct_config__.tag
    check(isinstance(tag, str), "escrow conditions are tagged")
    return str(tag)


def _line(account: str, side: str, amount: int, currency: str) -> dict[str, Any]:
    return {"account_id": account, "side": side, "amount_cents": amount, "currency": currency}


def fund_entries(terms: Terms) -> list[dict[str, Any]]:
    """Allocate, step 1: the funding account -> the escrow pool (posted)."""
    check(terms.amount > 0, "an escrow moves money")
    return [
        _line(terms.funding_account, "debit", terms.amount, terms.currency),
        _line(terms.pool_account, "credit", terms.amount, terms.currency),
    ]


def hold_entries(terms: Terms) -> list[dict[str, Any]]:
    """Allocate, step 2: the escrow pool -> the payee (held, pending until release or cancel)."""
    check(terms.amount > 0, "an escrow moves money")
    return [
        _line(terms.pool_account, "debit", terms.amount, terms.currency),
        _line(terms.payee_account, "credit", terms.amount, terms.currency),
    ]


def refund_entries(terms: Terms) -> list[dict[str, Any]]:
    """Cancel, after the hold is voided: the escrow pool -> back to the funding account."""
    check(terms.amount > 0, "an escrow moves money")
    return [
        _line(terms.pool_account, "debit", terms.amount, terms.currency),
        _line(terms.funding_account, "credit", terms.amount, terms.currency),
    ]
