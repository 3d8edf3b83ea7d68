"""Payout planning (finance/payouts.py): who is due, minimums, holdbacks, deterministic ids."""

from __future__ import annotations

import pytest

from finance import payouts
from finance.payouts import Due, ItemIn, Participant
from ledger.errors import LedgerError

PEOPLE = {
    "ann": Participant("ann", "acct_ann", "USD", 1000),
    "bob": Participant("bob", "acct_bob", "USD", 1000),
    "cy": Participant("cy", "acct_cy", "USD", 5000),
    "dee": Participant("dee", None, None, None),
    "ed": Participant("ed", "acct_ed", None, None),
}
DUES = [
    Due("cy", "USD", 800),
    Due("ann", "USD", 3000, 500),
    Due("bob", "USD", 2000),
    Due("dee", "USD", 50),
    Due("ed", "USD", 0),
]


def test_all_due_pays_above_minimum_and_skips_the_rest() -> None:
    planned, skipped = payouts.plan("b1", DUES, PEOPLE)
    assert [(p.payout_id, p.amount, p.holdback) for p in planned] == [
        ("po.b1.ann.USD", 3000, 500),
        ("po.b1.bob.USD", 2000, 0),
    ]
    assert [(s.participant_id, s.reason) for s in skipped] == [
        ("cy", "below_minimum"),
        ("dee", "no_stripe_account"),
    ]
    assert payouts.plan("b1", list(reversed(DUES)), PEOPLE) == (planned, skipped)  # deterministic


def test_items_choose_participants_and_partial_amounts() -> None:
    planned, skipped = payouts.plan("b2", DUES, PEOPLE, [ItemIn("bob", amount=1500), ItemIn("ann")])
    assert [(p.participant_id, p.amount) for p in planned] == [("ann", 3000), ("bob", 1500)]
    assert skipped == []
    with pytest.raises(LedgerError) as over:
        payouts.plan("b2", DUES, PEOPLE, [ItemIn("bob", amount=2001)])
    assert over.value.details["field"] == "$.items[0].amount"
    with pytest.raises(LedgerError):
        payouts.plan("b2", DUES, PEOPLE, [ItemIn("zed")])
    _, nothing = payouts.plan("b2", [], PEOPLE, [ItemIn("ann")])
    assert [(s.participant_id, s.reason) for s in nothing] == [("ann", "nothing_due")]


def test_journals_balance_and_backoff_is_bounded() -> None:
    (first, *_), _ = payouts.plan("b3", DUES, PEOPLE)
    hold = payouts.hold_entries(first)
    assert [(e["account_id"], e["side"]) for e in hold] == [
        ("liability:royalty:ann", "debit"),
        ("liability:payouts-in-transit:stripe:USD", "credit"),
    ]
    settle = payouts.settle_entries("USD", 3000)
    assert [(e["account_id"], e["side"]) for e in settle] == [
        ("liability:payouts-in-transit:stripe:USD", "debit"),
        ("asset:cash:stripe:USD", "credit"),
    ]
    waits = [payouts.backoff_s(n) for n in range(1, 12)]
    assert (
        waits == sorted(waits) and waits[0] == payouts.BACKOFF_BASE_S and max(waits) == payouts.BACKOFF_CAP_S
    )
    assert (
        payouts.batch_status(["paid", "failed"]) == "done"
        and payouts.batch_status(["paid", "pending"]) == "open"
    )
