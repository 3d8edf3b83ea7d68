"""Holdback release planning (finance/holdbacks.py): what is due, the aggregated journal, stable ids."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from finance import holdbacks
from finance.holdbacks import HeldAccrual

T0 = datetime(2026, 6, 1, tzinfo=UTC)
LATER = T0 + timedelta(days=30)


def _row(
    journal: str, sku: str, pid: str, holdback: int, at: datetime, released: bool = False
) -> HeldAccrual:
    return HeldAccrual(journal, sku, pid, "EUR", holdback, at, released)


def test_due_rows_release_once_per_accrual_journal_aggregated_per_participant() -> None:
    """Tried: one journal accruing two SKUs to ann (10 + 5) and one to bob (7), all due -> one
    journal `{j}.holdback-release`: holdback -> payable, 15 for ann and 7 for bob, balanced; a
    journal not due yet -> nothing; the same rows released already -> nothing."""
    rows = [_row("inv1.fulfil", "a", "ann", 10, T0), _row("inv1.fulfil", "b", "ann", 5, T0),
            _row("inv1.fulfil", "a", "bob", 7, T0), _row("inv2.fulfil", "a", "ann", 3, LATER)]  # fmt: skip
    (release,) = holdbacks.plan_releases(rows, T0)
    assert release.journal_id == "inv1.fulfil.holdback-release"
    assert [(a.participant_id, a.amount) for a in release.amounts] == [("ann", 15), ("bob", 7)]
    assert release.total == 22
    entries = {(e["account_id"], e["side"], e["amount_cents"]) for e in holdbacks.release_entries(release)}
    assert entries == {
        ("liability:royalty-holdback:ann", "debit", 15), ("liability:royalty:ann", "credit", 15),
        ("liability:royalty-holdback:bob", "debit", 7), ("liability:royalty:bob", "credit", 7),
    }  # fmt: skip
    body = holdbacks.release_body(release)
    assert body == holdbacks.release_body(holdbacks.plan_releases(rows, T0)[0])  # deterministic replay
    assert holdbacks.plan_releases([_row("j", "a", "ann", 10, T0, released=True)], LATER) == []
    assert holdbacks.plan_releases(rows[3:], T0) == []


def test_a_journal_with_two_release_times_gets_one_stable_id_per_time() -> None:
    """Tried: one accrual journal whose SKUs have release times T0 and T0+30d: at T0 only the first
    is released under `.holdback-release.1`; at T0+30d (the first marked released) the second under
    `.holdback-release.2`, whichever order the rows come in."""
    rows = [_row("j", "a", "ann", 10, T0), _row("j", "b", "ann", 4, LATER)]
    (first,) = holdbacks.plan_releases(rows, T0)
    assert (first.journal_id, first.total) == ("j.holdback-release.1", 10)
    later = [_row("j", "b", "ann", 4, LATER), _row("j", "a", "ann", 10, T0, released=True)]
    (second,) = holdbacks.plan_releases(later, LATER)
    assert (second.journal_id, second.total) == ("j.holdback-release.2", 4)


def test_a_release_id_that_would_be_too_long_falls_back_to_a_hash() -> None:
    """Tried: an accrual journal id of 195 characters -> `hr.<sha256>`, the same every time."""
    long_id = "x" * 195
    first = holdbacks.release_journal_id(long_id, 1, 1)
    assert first.startswith("hr.") and len(first) == 67
    assert first == holdbacks.release_journal_id(long_id, 1, 1)
    assert holdbacks.release_journal_id("j", 1, 1) == "j.holdback-release"
