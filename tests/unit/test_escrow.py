"""Escrow's pure core (finance/escrow.py): decoding, validation, the state machine, conditions, journals."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from finance import escrow
from finance.escrow import Action, Status, Step
from ledger.errors import LedgerError
from ledger.journal import JournalIn, rejection_from_msgspec, validate_journal

BASE: dict[str, Any] = {
    "escrow_id": "e1",
    "order_id": "order-1",
    "amount": 2500,
    "currency": "USD",
    "payee": "ann",
    "condition": {"type": "delivery"},
}


def _decode(body: dict[str, Any]) -> escrow.AllocateRequest:
    try:
        return msgspec.json.decode(msgspec.json.encode(body), type=escrow.AllocateRequest)
    except msgspec.ValidationError as exc:
        raise rejection_from_msgspec(exc) from None


def _field(body: dict[str, Any]) -> str:
    with pytest.raises(LedgerError) as caught:
        escrow.terms_of(_decode(body))
    assert caught.value.code == "VALIDATION_ERROR"
    field: str = caught.value.details["field"]
    return field


def test_terms_resolve_the_accounts_and_the_journals_balance() -> None:
    """Tried: a participant payee with the defaults, then an explicit payee account, funding
    account and provider -> the pool is `liability:escrow:{provider}:{CCY}`, funding defaults to the
    provider's cash, the participant's payable is credited; fund, hold and refund journals are
    valid balanced two-line journals pairing the pool with one other account; ids are derived."""
    terms = escrow.terms_of(_decode(BASE))
    assert (terms.pool_account, terms.funding_account, terms.payee_account, terms.participant_id) == (
        "liability:escrow:stripe:USD",
        "asset:cash:stripe:USD",
        "liability:royalty:ann",
        "ann",
    )
    other = {**BASE, "payee": None, "payee_account": "liability:seller:7", "provider": "adyen",
             "funding_account": "liability:wallet:buyer-9", "currency": "EUR"}  # fmt: skip
    t2 = escrow.terms_of(_decode(other))
    assert (t2.pool_account, t2.funding_account, t2.payee_account, t2.participant_id) == (
        "liability:escrow:adyen:EUR",
        "liability:wallet:buyer-9",
        "liability:seller:7",
        None,
    )
    for build, journal_id in (
        (escrow.fund_entries, escrow.fund_journal_id("e1")),
        (escrow.hold_entries, escrow.hold_id("e1")),
        (escrow.refund_entries, escrow.refund_journal_id("e1")),
    ):
        journal = validate_journal(
            msgspec.convert({"journal_id": journal_id, "entries": build(terms)}, JournalIn)
        )
        accounts = [line.account_id for line in journal.lines]
        assert terms.pool_account in accounts and len(accounts) == 2
        assert all(line.amount == 2500 for line in journal.lines)
    assert (escrow.fund_journal_id("e1"), escrow.hold_id("e1"), escrow.refund_journal_id("e1")) == (
        "escrow.e1.fund",
        "escrow.e1",
        "escrow.e1.refund",
    )
    fund = escrow.fund_entries(terms)
    assert (fund[0]["account_id"], fund[0]["side"]) == ("asset:cash:stripe:USD", "debit")
    refund = escrow.refund_entries(terms)
    assert (refund[1]["account_id"], refund[1]["side"]) == ("asset:cash:stripe:USD", "credit")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"surprise": 1}, "$.surprise"),
        ({"amount": -5}, "$.amount"),
        ({"amount": 0}, "$.amount"),
        ({"amount": 2**63}, "$.amount"),
        ({"amount": 12.5}, "$.amount"),
        ({"currency": "XXY"}, "$.currency"),
        ({"escrow_id": "bad id!"}, "$.escrow_id"),
        ({"order_id": " "}, "$.order_id"),
        ({"condition": {"type": "telepathy"}}, "$.condition"),
        ({"condition": {"type": "audit_event"}}, "$.condition.event_id"),
        ({"condition": {"type": "delivery", "extra": 1}}, "$.condition.extra"),
        ({"payee": None}, "$.payee"),
        ({"payee_account": "liability:x"}, "$.payee"),
        ({"payee": "bad:colon"}, "$.payee"),
        ({"payee": None, "payee_account": "nope"}, "$.payee_account"),
        ({"payee": None, "payee_account": "liability:escrow:stripe:USD"}, "$.payee_account"),
        ({"funding_account": "liability:royalty:ann"}, "$.funding_account"),
        ({"provider": "a:b"}, "$.provider"),
    ],
)
def test_bad_allocations_name_the_field(change: dict[str, Any], field: str) -> None:
    """Tried: each malformed allocation (unknown member, non-positive, oversized or float amount,
    unknown currency, bad ids, unknown condition type, missing event id, no payee or both payees,
    the pool as payee, payee = funding) -> VALIDATION_ERROR naming that JSON path."""
    body = {**BASE, **change}
    body = {k: v for k, v in body.items() if v is not None}
    assert _field(body).startswith(field)


def test_state_machine_runs_replays_and_refuses() -> None:
    """Tried: every (state, recorded action, request) pair: a locked escrow runs either action; the
    same request resumes an unfinished one and replays a finished one; another payload for the same
    action is IDEMPOTENCY_CONFLICT; release after cancel, cancel after release and the other action
    while one is unfinished are INVALID_STATE with current and requested."""
    a, b = b"a" * 32, b"b" * 32
    assert escrow.next_step("e", Status.LOCKED, None, None, Action.RELEASE, a) is Step.RUN
    assert escrow.next_step("e", Status.LOCKED, None, None, Action.CANCEL, a) is Step.RUN
    assert escrow.next_step("e", Status.LOCKED, Action.RELEASE, a, Action.RELEASE, a) is Step.RUN
    assert escrow.next_step("e", Status.RELEASED, Action.RELEASE, a, Action.RELEASE, a) is Step.REPLAY
    assert escrow.next_step("e", Status.CANCELLED, Action.CANCEL, a, Action.CANCEL, a) is Step.REPLAY
    with pytest.raises(LedgerError) as conflict:
        escrow.next_step("e", Status.RELEASED, Action.RELEASE, a, Action.RELEASE, b)
    assert conflict.value.code == "IDEMPOTENCY_CONFLICT"
    cases = [
        (Status.RELEASED, Action.RELEASE, Action.CANCEL, "released", "cancelled"),
        (Status.CANCELLED, Action.CANCEL, Action.RELEASE, "cancelled", "released"),
        (Status.LOCKED, Action.CANCEL, Action.RELEASE, "locked", "released"),
    ]
    for current, recorded, requested, now, wanted in cases:
        with pytest.raises(LedgerError) as refused:
            escrow.next_step("e", current, recorded, a, requested, a)
        assert refused.value.code == "INVALID_STATE"
        assert (refused.value.details["current"], refused.value.details["requested"]) == (now, wanted)


def test_conditions() -> None:
    """Tried: delivery without evidence, with evidence lacking delivery_ref, and with it; an audit
    event condition with and without the event; approval -> only the unmet ones are 409
    INVALID_STATE with reason condition_not_met; approval always needs governance."""
    delivery, audit, approval = escrow.Delivery(), escrow.AuditEvent("42"), escrow.Approval()
    for condition, evidence, found in (
        (delivery, None, False),
        (delivery, escrow.Evidence(note="left at door"), False),
        (audit, None, False),
    ):
        with pytest.raises(LedgerError) as unmet:
            escrow.check_condition("e", condition, evidence, found)
        assert unmet.value.code == "INVALID_STATE"
        assert unmet.value.details["reason"] == "condition_not_met"
    escrow.check_condition("e", delivery, escrow.Evidence(delivery_ref="trk-1"), False)
    escrow.check_condition("e", audit, None, True)
    escrow.check_condition("e", approval, None, False)
    assert [escrow.needs_approval(c) for c in (delivery, audit, approval)] == [False, False, True]
    assert [escrow.condition_type(c) for c in (delivery, audit, approval)] == [
        "delivery",
        "audit_event",
        "approval",
    ]


def test_request_hashes_identify_requests() -> None:
    """Tried: the same allocation twice, one with another amount; release params with and without
    evidence; release vs cancel of the same params -> equal only for identical requests."""
    t1 = escrow.terms_of(_decode(BASE))
    assert escrow.allocate_hash(t1) == escrow.allocate_hash(escrow.terms_of(_decode(dict(BASE))))
    assert escrow.allocate_hash(t1) != escrow.allocate_hash(
        escrow.terms_of(_decode({**BASE, "amount": 2501}))
    )
    bare = escrow.release_params(escrow.ReleaseRequest(escrow_id="e1"))
    shown = escrow.release_params(escrow.ReleaseRequest(escrow_id="e1", evidence=escrow.Evidence("trk")))
    assert escrow.action_hash(Action.RELEASE, bare) != escrow.action_hash(Action.RELEASE, shown)
    assert escrow.action_hash(Action.RELEASE, bare) != escrow.action_hash(Action.CANCEL, bare)
    with pytest.raises(LedgerError) as blank:
        escrow.check_release(escrow.ReleaseRequest(escrow_id="e1", evidence=escrow.Evidence(" ")))
    assert blank.value.details["field"] == "$.evidence.delivery_ref"
