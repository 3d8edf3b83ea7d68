"""Payout planning: which participants are paid in a batch, how much, and the payout's journals.

Pure: no I/O, no clock; the caller passes balances, participants and the batch id.

A participant's *due* amount in a currency is what its payable `liability:royalty:{participant}`
owes now: credits posted minus debits posted minus debits pending (the pending debits are payouts
already in flight), less what other batches have planned but not yet moved to pending. The
holdback account `liability:royalty-holdback:{participant}` is never paid by a run (it is released
to the payable by the royalty flow), so a run "holds back the holdback" by construction; the plan
reports it per payout. A participant is skipped (with a reason) without a Stripe connected
account, with nothing due, or when the due amount is below its `minimum_payout` (same currency).

Ids are derived, never random: `payout_id = "po.{batch_id}.{participant_id}.{CCY}"` is also the
hold id and the idempotency key of the provider's transfer, so re-running a batch never pays twice.

Journals of one payout (amount `A`, provider `stripe`, currency `CCY`):
- pending (a hold): debit `liability:royalty:{participant}` A, credit
  `liability:payouts-in-transit:stripe:{CCY}` A (a split account, so the hold is single-shard);
- paid: the hold is posted, then journal `po-settle.{payout_id}` debits the in-transit account
  and credits `asset:cash:stripe:{CCY}`;
- failed permanently: the hold is voided (the money is back on the payable).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any, Final

import msgspec

from ledger.errors import validation_error
from ledger.invariants import check
from ledger.journal import JOURNAL_ID_PATTERN

PROVIDER: Final = "stripe"
ITEMS_MAX: Final = 1000
"""At most this many payouts per batch (bounds a run's work and its answer)."""
ATTEMPTS_MAX: Final = 4
"""Provider calls per payout per run (the first and three retries)."""
BACKOFF_BASE_S: Final = 0.05
BACKOFF_CAP_S: Final = 2.0


class ItemIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One requested payout of `POST /finance/payout/run`: a participant, optionally an amount."""

    participant_id: str
    currency: str | None = None
    amount: int | None = None


class RunRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`POST /finance/payout/run`: `items` absent (or `"all"`) pays everything due."""

    payout_date: str
    batch_id: str | None = None
    items: list[ItemIn] | str | None = None


class Participant(msgspec.Struct, frozen=True):
    """What planning needs of a participant."""

    participant_id: str
    stripe_account: str | None
    minimum_currency: str | None
    minimum_amount: int | None


class Due(msgspec.Struct, frozen=True):
    """A participant's payable in one currency: `amount` due now, `holdback` not payable yet."""

    participant_id: str
    currency: str
    amount: int
    holdback: int = 0


class Planned(msgspec.Struct, frozen=True):
    """One payout of a batch."""

    payout_id: str
    participant_id: str
    stripe_account: str
    currency: str
    amount: int
    holdback: int


class Skipped(msgspec.Struct, frozen=True):
    """A participant a run did not pay, and why (`below_minimum`, `nothing_due`, `no_stripe_account`)."""

    participant_id: str
    currency: str
    amount: int
    reason: str


def payable_account(participant_id: str) -> str:
    """The participant's payable (credited by royalty accruals)."""
    return f"liability:royalty:{participant_id}"


def holdback_account(participant_id: str) -> str:
    """The participant's holdback (not paid by runs)."""
    return f"liability:royalty-holdback:{participant_id}"


def in_transit_account(currency: str, provider: str = PROVIDER) -> str:
    """The split clearing account of money on its way to participants."""
    return f"liability:payouts-in-transit:{provider}:{currency}"


def cash_account(currency: str, provider: str = PROVIDER) -> str:
    """The platform's cash at the provider, which transfers draw on."""
    return f"asset:cash:{provider}:{currency}"


def batch_id_for(payout_date: str) -> str:
    """The default batch id of a run: one batch per payout date (a second run is a replay)."""
    return f"pb.{payout_date}"


def payout_id(batch_id: str, participant_id: str, currency: str) -> str:
    """The deterministic payout id (also hold id and provider idempotency key)."""
    value = f"po.{batch_id}.{participant_id}.{currency}"
    if not JOURNAL_ID_PATTERN.fullmatch(value):
        raise validation_error("batch_id too long or malformed for payout ids", "$.batch_id")
    return value


def settle_journal_id(payout: str) -> str:
    """The id of the journal that moves a paid payout from in transit to cash."""
    return f"po-settle.{payout}"


def _requested(items: Sequence[ItemIn]) -> dict[str, ItemIn]:
    if not 1 <= len(items) <= ITEMS_MAX:
        raise validation_error(f"items holds 1 to {ITEMS_MAX} payouts", "$.items")
    out: dict[str, ItemIn] = {}
    for i, item in enumerate(items):
        if item.participant_id in out:
            raise validation_error(f"participant {item.participant_id!r} appears twice", f"$.items[{i}]")
        if item.amount is not None and item.amount <= 0:
            raise validation_error("amount must be minor units > 0", f"$.items[{i}].amount")
        out[item.participant_id] = item
    return out


def plan(
    batch_id: str,
    dues: Sequence[Due],
    participants: Mapping[str, Participant],
    items: Sequence[ItemIn] | None = None,
) -> tuple[list[Planned], list[Skipped]]:
    """The payouts of a batch and the participants left out, both in (participant, currency) order.

    `items` None pays every due participant in full; otherwise only the listed participants (an
    `amount` pays part of what is due; more than due -> VALIDATION_ERROR naming the item).
    """
    requested = _requested(items) if items is not None else None
    if requested is not None:
        for i, pid in enumerate(requested):
            if pid not in participants:
                raise validation_error(f"unknown participant {pid!r}", f"$.items[{i}].participant_id")
    planned: list[Planned] = []
    skipped: list[Skipped] = []
    covered: set[str] = set()
    for due in sorted(dues, key=lambda d: (d.participant_id, d.currency)):
        who = participants.get(due.participant_id)
        if who is None:
            continue  # a payable without a registered participant is not paid by runs
        item = None
        if requested is not None:
            item = requested.get(due.participant_id)
            if item is None or (item.currency is not None and item.currency != due.currency):
                continue
        covered.add(due.participant_id)
        amount = due.amount
        if item is not None and item.amount is not None:
            index = list(requested or {}).index(due.participant_id)
            if item.amount > due.amount:
                raise validation_error(
                    f"amount exceeds what is due ({due.amount})", f"$.items[{index}].amount",
                    due=due.amount, requested=item.amount,
                )  # fmt: skip
            amount = item.amount
        reason = _skip_reason(who, due.currency, amount)
        if reason == "nothing_due" and requested is None:
            continue  # "all due" lists only participants something is owed to
        if reason is not None:
            skipped.append(Skipped(due.participant_id, due.currency, max(amount, 0), reason))
            continue
        assert who.stripe_account is not None  # for mypy; _skip_reason checked it
        pid = payout_id(batch_id, due.participant_id, due.currency)
        planned.append(
            Planned(pid, due.participant_id, who.stripe_account, due.currency, amount, due.holdback)
        )
    for pid in requested or {}:
        if pid not in covered:
            skipped.append(Skipped(pid, "", 0, "nothing_due"))
    check(all(p.amount > 0 for p in planned), "a planned payout must move money")
    check(len({p.payout_id for p in planned}) == len(planned), "payout ids must be unique in a batch")
    return planned, skipped


def _skip_reason(who: Participant, currency: str, amount: int) -> str | None:
    if amount <= 0:
        return "nothing_due"
    if who.stripe_account is None:
        return "no_stripe_account"
    if who.minimum_currency == currency and who.minimum_amount is not None and amount < who.minimum_amount:
        return "below_minimum"
    return None


def hold_entries(payout: Planned) -> list[dict[str, Any]]:
    """The pending journal of a payout: payable -> in transit."""
    return [
        {"account_id": payable_account(payout.participant_id), "side": "debit",
         "amount_cents": payout.amount, "currency": payout.currency},
        {"account_id": in_transit_account(payout.currency), "side": "credit",
         "amount_cents": payout.amount, "currency": payout.currency},
    ]  # fmt: skip


def settle_entries(currency: str, amount: int) -> list[dict[str, Any]]:
    """The journal of a paid payout: in transit -> out of the provider's cash."""
    check(amount > 0, "a settlement moves money")
    return [
        {"account_id": in_transit_account(currency), "side": "debit", "amount_cents": amount,
         "currency": currency},
        {"account_id": cash_account(currency), "side": "credit", "amount_cents": amount,
         "currency": currency},
    ]  # fmt: skip


def backoff_s(attempt: int, base_s: float = BACKOFF_BASE_S, cap_s: float = BACKOFF_CAP_S) -> float:
    """The wait before retry `attempt` (1-based): exponential, capped (no jitter: one caller per
    payout, and the run is sequential)."""
    check(attempt >= 1, "backoff: attempts count from 1")
    return float(min(cap_s, base_s * (2 ** (attempt - 1))))


def batch_status(states: Sequence[str]) -> str:
    """A batch's status from its payouts: `done` once every payout is paid or failed, else `open`."""
    return "done" if all(s in ("paid", "failed") for s in states) else "open"


# -- clawback transfer reversals (LEDGER_CLAWBACK_REVERSALS, migration 0020) ---------------------------
REVERSALS_ENV: Final = "LEDGER_CLAWBACK_REVERSALS"
_SWITCH: Final = {"on": True, "1": True, "true": True, "off": False, "0": False, "false": False, "": False}


def parse_reversals(text: str) -> bool:
    """`LEDGER_CLAWBACK_REVERSALS`: on|off (also 1/0, true/false; empty: off); ValueError otherwise."""
    value = _SWITCH.get(text.strip().lower())
    if value is None:
        raise ValueError(f"must be on or off, got {text!r}")
    return value


class Reversible(msgspec.Struct, frozen=True):
    """A paid payout's transfer and what can still be reversed from it."""

    payout_id: str
    transfer_id: str
    reversible: int


def reversal_plan(owed: int, transfers: Sequence[Reversible]) -> list[tuple[Reversible, int]]:
    """Take `owed` back from `transfers` in their order (the caller passes newest first), each at
    most what is still reversible on it; less than `owed` when the transfers do not cover it."""
    check(owed >= 0, "reversal: negative amount owed")
    plan: list[tuple[Reversible, int]] = []
    left = owed
    for transfer in transfers:
        if left == 0:
            break
        take = min(left, max(transfer.reversible, 0))
        if take > 0:
            plan.append((transfer, take))
            left -= take
    check(sum(amount for _, amount in plan) <= owed, "reversal plan exceeds what is owed")
    return plan


def reversal_id(clawback_journal: str, payout_id: str) -> str:
    """The reversal's id, provider idempotency key and journal id: derived from the clawback and the
    payout, so a retry names the same reversal (`rv.` + 40 hex of SHA-256)."""
    digest = hashlib.sha256(f"{clawback_journal}\x00{payout_id}".encode()).hexdigest()
    return f"rv.{digest[:40]}"


def reversal_entries(participant_id: str, currency: str, amount: int) -> list[dict[str, Any]]:
    """The journal of a reversed transfer: the money is back in the provider's cash, and the
    participant's (negative) payable is credited by it."""
    check(amount > 0, "a reversal moves money")
    return [
        {"account_id": cash_account(currency), "side": "debit", "amount_cents": amount, "currency": currency},
        {"account_id": payable_account(participant_id), "side": "credit", "amount_cents": amount,
         "currency": currency},
    ]  # fmt: skip
