"""Holdback release: which held-back royalty accruals are due, and the journal that releases them.

Pure: no I/O, no clock; the caller passes the accrual rows and `as_of`.

A royalty accrual credits the held-back part of a participant's share to
`liability:royalty-holdback:{participant}` with a release time (finance/royalties.py `release_at`).
Once that time has passed, the holdback is released: one journal per accrual journal debits each
participant's holdback account and credits its payable `liability:royalty:{participant}`
(aggregated per participant and currency), after which payout runs pay it like any payable.

Ids are derived, never random, so a retry after a crash replays the posting instead of making a
second one: `{accrual_journal_id}.holdback-release`. An accrual journal whose SKUs carry rules with
different release times is released once per release time; its k-th release time (ascending,
1-based) then gets `{accrual_journal_id}.holdback-release.{k}` (the rows of a journal never change
after it is recorded, so k is stable). An id that would not fit the journal id grammar falls back
to `hr.{sha256 of the long id}`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Final

import msgspec

from finance import chart
from ledger.invariants import check
from ledger.journal import JOURNAL_ID_PATTERN

JOURNALS_MAX: Final = 500
"""At most this many accrual journals are released per run (the rest by the next run)."""
SUFFIX: Final = "holdback-release"


class HeldAccrual(msgspec.Struct, frozen=True):
    """One accrual row with a holdback (`released`: already released by an earlier run)."""

    journal_id: str
    sku: str
    participant_id: str
    currency: str
    holdback: int
    release_at: datetime
    released: bool = False


class Released(msgspec.Struct, frozen=True):
    """What a release moves for one participant in one currency."""

    participant_id: str
    currency: str
    amount: int


class Release(msgspec.Struct, frozen=True):
    """The release of one accrual journal's holdbacks due at `release_at`."""

    journal_id: str
    accrual_journal_id: str
    release_at: datetime
    amounts: tuple[Released, ...]

    @property
    def total(self) -> int:
        """Everything this release moves (all currencies together: one currency per accrual journal)."""
        return sum(a.amount for a in self.amounts)


def release_journal_id(accrual_journal_id: str, k: int, count: int) -> str:
    """The release journal id of the k-th (1-based) of `count` release times of an accrual journal."""
    check(1 <= k <= count, "release index out of range")
    value = f"{accrual_journal_id}.{SUFFIX}" if count == 1 else f"{accrual_journal_id}.{SUFFIX}.{k}"
    if JOURNAL_ID_PATTERN.fullmatch(value):
        return value
    return f"hr.{hashlib.sha256(value.encode()).hexdigest()}"


def plan_releases(held: Sequence[HeldAccrual], as_of: datetime) -> list[Release]:
    """The releases due at `as_of` and not made yet, oldest release time first.

    `held` must hold every row with a holdback of each accrual journal it mentions (released rows
    and rows due later too): the k of a release id counts all of the journal's release times.
    """
    by_journal: dict[str, list[HeldAccrual]] = {}
    for row in held:
        check(row.holdback > 0, "a held accrual has a holdback")
        by_journal.setdefault(row.journal_id, []).append(row)
    releases: list[Release] = []
    for accrual_journal_id, rows in by_journal.items():
        times = sorted({r.release_at for r in rows})
        for k, at in enumerate(times, start=1):
            group = [r for r in rows if r.release_at == at]
            done = {r.released for r in group}
            check(len(done) == 1, "a release group is released whole or not at all")
            if at > as_of or done == {True}:
                continue
            amounts: dict[tuple[str, str], int] = {}
            for r in group:
                key = (r.participant_id, r.currency)
                amounts[key] = amounts.get(key, 0) + r.holdback
            releases.append(
                Release(
                    release_journal_id(accrual_journal_id, k, len(times)),
                    accrual_journal_id,
                    at,
                    tuple(Released(p, c, a) for (p, c), a in sorted(amounts.items())),
                )
            )
    releases.sort(key=lambda r: (r.release_at, r.journal_id))
    check(len({r.journal_id for r in releases}) == len(releases), "release ids are unique")
    return releases


def release_entries(release: Release) -> list[dict[str, Any]]:
    """The release journal's lines: per participant and currency, holdback -> payable."""
    entries: list[dict[str, Any]] = []
    for a in release.amounts:
        check(a.amount > 0, "a release moves money")
        entries.append({"account_id": chart.royalty_holdback(a.participant_id), "side": "debit",
                        "amount_cents": a.amount, "currency": a.currency})  # fmt: skip
        entries.append({"account_id": chart.royalty_payable(a.participant_id), "side": "credit",
                        "amount_cents": a.amount, "currency": a.currency})  # fmt: skip
    return entries


def release_body(release: Release) -> dict[str, Any]:
    """The release journal (without its id): deterministic, so a retry is an exact replay."""
    return {
        "entries": release_entries(release),
        "memo": "royalty holdback release",
        "source_ref": release.accrual_journal_id,
        "context": {"accrual_journal_id": release.accrual_journal_id, "kind": "holdback_release"},
    }
