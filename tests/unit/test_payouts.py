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


def test_reversal_plan_takes_newest_transfers_first_and_never_more_than_owed() -> None:
    """Tried: 700 owed over transfers with 500, 0 and 400 reversible -> 500 then 200; 2,000 owed
    -> everything reversible (900), no more; nothing owed -> no reversal; ids derived and stable."""
    transfers = [payouts.Reversible("po.b2.p.USD", "tr_2", 500), payouts.Reversible("po.bx.p.USD", "tr_x", 0),
                 payouts.Reversible("po.b1.p.USD", "tr_1", 400)]  # fmt: skip
    assert [(t.transfer_id, a) for t, a in payouts.reversal_plan(700, transfers)] == [
        ("tr_2", 500),
        ("tr_1", 200),
    ]
    assert sum(a for _, a in payouts.reversal_plan(2000, transfers)) == 900
    assert payouts.reversal_plan(0, transfers) == []
    rid = payouts.reversal_id("inv.clawback.rfd-1", "po.b2.p.USD")
    assert (
        rid == payouts.reversal_id("inv.clawback.rfd-1", "po.b2.p.USD")
        and rid.startswith("rv.")
        and len(rid) == 43
    )
    entries = payouts.reversal_entries("p", "USD", 250)
    assert {(e["account_id"], e["side"], e["amount_cents"]) for e in entries} == {
        ("asset:cash:stripe:USD", "debit", 250),
        ("liability:royalty:p", "credit", 250),
    }
