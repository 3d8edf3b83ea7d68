"""Royalty rules and royalty accrual: validation, the versioned rule in force, the exact split.

Pure: no I/O, no clock (the caller passes times and the set of known participants).

A rule splits the revenue recognised for one SKU (or one contract) among participants in basis
points, `sum(share_bp) + platform_fee_bp == 10,000`. Rules are versioned per subject (`sku` or
`contract`): the version in force at a time `t` is the one with the latest `effective_from <= t`
(equal `effective_from`: the higher version). A sale uses the version in force at its invoice's
issue time (the tax point, DECISIONS D3); once an invoice has accrued for a SKU, later accruals of
that invoice and SKU (ratable installments) reuse the same version.

Rounding (`split`): the revenue `R` is divided among the participants and the platform by the
largest-remainder method: each party gets `floor(R * bp / 10,000)`, and the minor units left over
go one each to the largest fractional parts `R * bp mod 10,000`, ties to participants before the
platform and among participants by ascending `participant_id`. The platform fee is then
`R - sum(participants)`, so the split always sums exactly to `R`, every party is within one minor
unit of its exact share, and the same input always gives the same split. A participant's holdback
is `floor(share * holdback_bp / 10,000)`; the rest of its share is payable at once.

Accrual lines (`accrual_entries`), per SKU: debit `expense:royalties:{sku}` with the participants'
total; credit `liability:royalty:{participant}` with each payable part and
`liability:royalty-holdback:{participant}` with each holdback. The platform fee stays on
`revenue:sales:{sku}` (gross model: revenue minus royalty expense is the platform's fee).

Clawbacks (`clawback`, `clawback_entries`): a refund or lost dispute that reverses recognised
revenue of a SKU (its `revenue:refunds:{sku}` debits) takes the participants' share of it back
from their payables `liability:royalty:{participant}` and reduces `expense:royalties:{sku}`, under
the rule version the invoice accrued with. Holdbacks are not touched: they are released on their
date as planned. A payable already paid out goes negative (a debit balance), and payout runs pay
nothing to a participant whose payable is not positive, so the next accruals net it.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, Final

import msgspec

from finance import chart
from ledger.errors import validation_error
from ledger.invariants import check
from ledger.money import fits_int64, is_currency
from ledger.timestamps import parse_rfc3339

BP_TOTAL: Final = 10_000
"""Shares plus the platform fee are exactly 10,000 bp (100 %)."""
SPLITS_MAX: Final = 20
"""At most this many participants per rule (keeps an accrual within a journal's 256 lines)."""
HOLDBACK_DAYS_MAX: Final = 3650
SUBJECTS: Final = ("sku", "contract")


STRIPE_ACCOUNT_PATTERN: Final = re.compile(r"^acct_[A-Za-z0-9]{1,64}$")
"""A Stripe connected-account id (DECISIONS D7)."""
NAME_MAX: Final = 200


class MinimumPayout(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A participant's minimum payout: below it, payout runs carry the balance forward."""

    currency: str
    amount: int


class ParticipantRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`POST /finance/participants`."""

    participant_id: str
    name: str | None = None
    stripe_account: str | None = None
    minimum_payout: MinimumPayout | None = None


def check_participant(request: ParticipantRequest) -> None:
    """VALIDATION_ERROR naming the field of a bad participant."""
    chart.check_segment(request.participant_id, "$.participant_id")
    if request.name is not None and not 1 <= len(request.name) <= NAME_MAX:
        raise validation_error(f"name must be 1 to {NAME_MAX} characters", "$.name")
    if request.stripe_account is not None and not STRIPE_ACCOUNT_PATTERN.fullmatch(request.stripe_account):
        raise validation_error("stripe_account must be a Stripe account id (acct_...)", "$.stripe_account")
    minimum = request.minimum_payout
    if minimum is not None:
        if not is_currency(minimum.currency):
            raise validation_error(f"unknown currency {minimum.currency!r}", "$.minimum_payout.currency")
        if minimum.amount < 0 or not fits_int64(minimum.amount):
            raise validation_error("amount must be minor units >= 0", "$.minimum_payout.amount")


class SplitIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One entry of a rule's `splits`."""

    participant_id: str
    share_bp: int


class RuleRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`POST /finance/royalty_rules`."""

    effective_from: str
    splits: list[SplitIn]
    platform_fee_bp: int
    rule_id: str | None = None
    sku: str | None = None
    contract: str | None = None
    holdback_bp: int = 0
    holdback_days: int | None = None
    holdback_release_at: str | None = None


class Split(msgspec.Struct, frozen=True):
    """A participant's share in basis points."""

    participant_id: str
    share_bp: int


class Terms(msgspec.Struct, frozen=True):
    """A validated rule before it is stored (no id or version yet)."""

    subject: str
    key: str
    effective_from: datetime
    splits: tuple[Split, ...]
    platform_fee_bp: int
    holdback_bp: int = 0
    holdback_days: int | None = None
    holdback_release_at: datetime | None = None


class Rule(msgspec.Struct, frozen=True):
    """A stored rule version."""

    rule_id: str
    version: int
    terms: Terms


class Accrual(msgspec.Struct, frozen=True):
    """One participant's accrual on one SKU: `amount` in total, `holdback` of it held back."""

    participant_id: str
    amount: int
    holdback: int

    @property
    def payable(self) -> int:
        """The part payable at once."""
        return self.amount - self.holdback


def _bp(value: int, field: str) -> int:
    if type(value) is not int or not 0 <= value <= BP_TOTAL:
        raise validation_error(f"must be an integer from 0 to {BP_TOTAL} (basis points)", field)
    return value


def _time(text: str, field: str) -> datetime:
    parsed = parse_rfc3339(text)
    if parsed is None:
        raise validation_error("must be an RFC 3339 time with an offset", field)
    return parsed


def subject_of(request: RuleRequest) -> tuple[str, str]:
    """(`sku` | `contract`, its value): exactly one of the two must be given."""
    if (request.sku is None) == (request.contract is None):
        raise validation_error("give exactly one of sku or contract", "$.sku")
    if request.sku is not None:
        return "sku", chart.check_segment(request.sku, "$.sku")
    assert request.contract is not None  # for mypy; one of the two is set
    return "contract", chart.check_segment(request.contract, "$.contract")


def _splits(request: RuleRequest, known: Collection[str]) -> tuple[Split, ...]:
    if not 1 <= len(request.splits) <= SPLITS_MAX:
        raise validation_error(f"a rule has 1 to {SPLITS_MAX} splits", "$.splits")
    seen: set[str] = set()
    for i, entry in enumerate(request.splits):
        field = f"$.splits[{i}].participant_id"
        chart.check_segment(entry.participant_id, field)
        if entry.participant_id in seen:
            raise validation_error(f"participant {entry.participant_id!r} appears twice", field)
        if entry.participant_id not in known:
            raise validation_error(f"unknown participant {entry.participant_id!r}", field)
        seen.add(entry.participant_id)
        _bp(entry.share_bp, f"$.splits[{i}].share_bp")
    return tuple(Split(s.participant_id, s.share_bp) for s in request.splits)


def validate(request: RuleRequest, known: Collection[str]) -> Terms:
    """The rule's terms; VALIDATION_ERROR naming the field. `known`: participants that exist."""
    subject, key = subject_of(request)
    effective_from = _time(request.effective_from, "$.effective_from")
    splits = _splits(request, known)
    fee = _bp(request.platform_fee_bp, "$.platform_fee_bp")
    total = sum(s.share_bp for s in splits) + fee
    if total != BP_TOTAL:
        raise validation_error(
            f"shares plus platform_fee_bp must be {BP_TOTAL}, got {total}", "$.splits", sum_bp=total
        )
    holdback = _bp(request.holdback_bp, "$.holdback_bp")
    days, release_at = request.holdback_days, request.holdback_release_at
    if days is not None and release_at is not None:
        raise validation_error("give holdback_days or holdback_release_at, not both", "$.holdback_release_at")
    if days is not None and (type(days) is not int or not 0 <= days <= HOLDBACK_DAYS_MAX):
        raise validation_error(f"must be an integer from 0 to {HOLDBACK_DAYS_MAX}", "$.holdback_days")
    release = None if release_at is None else _time(release_at, "$.holdback_release_at")
    if holdback > 0 and days is None and release is None:
        raise validation_error("a holdback needs holdback_days or holdback_release_at", "$.holdback_days")
    return Terms(subject, key, effective_from, splits, fee, holdback, days, release)


def in_force(versions: Sequence[Rule], at: datetime) -> Rule | None:
    """The version in force at `at`: latest `effective_from <= at`, ties to the higher version."""
    candidates = [r for r in versions if r.terms.effective_from <= at]
    if not candidates:
        return None
    return max(candidates, key=lambda r: (r.terms.effective_from, r.version))


def split(revenue: int, splits: Sequence[Split], platform_fee_bp: int) -> tuple[list[int], int]:
    """(each participant's share aligned with `splits`, the platform fee); sums exactly to `revenue`."""
    check(revenue >= 0, "split: negative revenue")
    weights = [s.share_bp for s in splits] + [platform_fee_bp]
    check(sum(weights) == BP_TOTAL and all(w >= 0 for w in weights), "split: weights are not 10,000 bp")
    shares = [revenue * w // BP_TOTAL for w in weights]
    fractions = [revenue * w % BP_TOTAL for w in weights]
    platform = len(splits)

    def order(i: int) -> tuple[int, bool, str]:
        return (-fractions[i], i == platform, splits[i].participant_id if i < platform else "")

    for i in sorted(range(len(weights)), key=order)[: revenue - sum(shares)]:
        shares[i] += 1
    participants = shares[:platform]
    fee = revenue - sum(participants)
    check(fee == shares[platform] and fee >= 0, "split: shares do not add up to the revenue")
    return participants, fee


def accrue(revenue: int, terms: Terms) -> tuple[list[Accrual], int]:
    """Per participant (in rule order) its accrual with holdback, and the platform fee."""
    shares, fee = split(revenue, terms.splits, terms.platform_fee_bp)
    accruals = [
        Accrual(s.participant_id, share, share * terms.holdback_bp // BP_TOTAL)
        for s, share in zip(terms.splits, shares, strict=True)
    ]
    return accruals, fee


def release_at(terms: Terms, posted_at: datetime) -> datetime | None:
    """When a holdback accrued at `posted_at` may be released (None: no holdback)."""
    if terms.holdback_bp == 0:
        return None
    if terms.holdback_release_at is not None:
        return terms.holdback_release_at
    return posted_at + timedelta(days=terms.holdback_days or 0)


def _balanced_lines(rows: list[tuple[str, str, int]], currency: str, what: str) -> list[dict[str, Any]]:
    """Journal lines from (account, side, amount) rows, zero amounts left out; checks they balance."""
    kept = [(account, side, amount) for account, side, amount in rows if amount > 0]
    debits = sum(amount for _, side, amount in kept if side == "debit")
    check(debits == sum(amount for _, side, amount in kept if side == "credit"), f"unbalanced {what}")
    return [
        {"account_id": account, "side": side, "amount_cents": amount, "currency": currency}
        for account, side, amount in kept
    ]


def accrual_entries(sku: str, accruals: Sequence[Accrual], currency: str) -> list[dict[str, Any]]:
    """Journal lines of one SKU's accrual (zero amounts left out); they balance by construction."""
    rows = [(chart.royalty_expense(sku), "debit", sum(a.amount for a in accruals))]
    for a in accruals:
        rows.append((chart.royalty_payable(a.participant_id), "credit", a.payable))
        rows.append((chart.royalty_holdback(a.participant_id), "credit", a.holdback))
    return _balanced_lines(rows, currency, "accrual")


def recognised_by_sku(body: dict[str, Any]) -> dict[str, int]:
    """Revenue a recognition journal body credits per SKU (`revenue:sales:{sku}` credit lines)."""
    prefix = chart.revenue("x")[: -len("x")]
    out: dict[str, int] = {}
    for entry in body.get("entries", []):
        account = str(entry["account_id"])
        if entry["side"] == "credit" and account.startswith(prefix):
            sku = account[len(prefix) :]
            out[sku] = out.get(sku, 0) + int(entry["amount_cents"])
    return out


def reversed_by_sku(body: dict[str, Any], currency: str) -> dict[str, int]:
    """Recognised revenue a refund (or lost dispute) journal body reverses per SKU: its debits of
    the contra revenue account `revenue:refunds:{sku}` in the invoice's currency (what was still
    deferred had accrued nothing, so it claws nothing back)."""
    prefix = chart.refunds_contra("x")[: -len("x")]
    out: dict[str, int] = {}
    for entry in body.get("entries", []):
        account = str(entry["account_id"])
        if entry["side"] == "debit" and entry.get("currency") == currency and account.startswith(prefix):
            sku = account[len(prefix) :]
            out[sku] = out.get(sku, 0) + int(entry["amount_cents"])
    return {sku: amount for sku, amount in out.items() if amount > 0}


class Clawed(msgspec.Struct, frozen=True):
    """What an invoice's SKU accrued and has had clawed back so far (royalty_accruals and
    royalty_clawbacks rows), the input of `clawback`."""

    accrued_revenue: int
    accrued: dict[str, int]
    reversed_revenue: int
    clawed: dict[str, int]


def clawback(reversed_now: int, so_far: Clawed, terms: Terms) -> dict[str, int]:
    """Per participant, what a reversal of `reversed_now` recognised revenue claws back.

    Cumulative, so rounding never drifts: after the reversal, the total clawed back from a
    participant is its share of the revenue reversed so far (`split` of the cumulative amount,
    capped at what it accrued); once the whole accrued revenue is reversed, it is exactly what it
    accrued. This reversal's clawback is that target minus what earlier ones took. It can be
    negative by a minor unit when the largest-remainder split of a larger amount gives a party one
    unit less (the Alabama paradox); the journal then credits that unit back.
    """
    check(reversed_now > 0, "clawback: nothing reversed")
    check(all(v >= 0 for v in so_far.accrued.values()), "clawback: negative accrual")
    cumulative = min(so_far.reversed_revenue + reversed_now, so_far.accrued_revenue)
    if cumulative >= so_far.accrued_revenue:
        target = dict(so_far.accrued)
    else:
        shares, _fee = split(cumulative, terms.splits, terms.platform_fee_bp)
        by_id = {s.participant_id: share for s, share in zip(terms.splits, shares, strict=True)}
        target = {p: min(by_id.get(p, 0), accrued) for p, accrued in so_far.accrued.items()}
    out = {p: target[p] - so_far.clawed.get(p, 0) for p in sorted(so_far.accrued)}
    check(
        all(0 <= so_far.clawed.get(p, 0) + d <= so_far.accrued[p] for p, d in out.items()),
        "clawback beyond what was accrued",
    )
    return out


def clawback_entries(sku: str, amounts: Mapping[str, int], currency: str) -> list[dict[str, Any]]:
    """Journal lines of one SKU's clawback: each participant's payable is debited (a negative amount:
    credited) and the royalty expense is reduced by the total; zero amounts are left out."""
    total = sum(amounts.values())
    rows = [(chart.royalty_expense(sku), "credit" if total > 0 else "debit", abs(total))]
    rows += [
        (chart.royalty_payable(p), "debit" if amount > 0 else "credit", abs(amount))
        for p, amount in sorted(amounts.items())
    ]
    return _balanced_lines(rows, currency, "clawback")


def contract_of(lines: Sequence[Any], sku: str) -> str | None:
    """The contract the invoice's lines of `sku` carry (one per SKU per invoice), or None."""
    contracts = {line.contract for line in lines if line.sku == sku}
    check(len(contracts) <= 1, f"invoice lines of {sku!r} carry different contracts")
    return next(iter(contracts), None)


def check_contracts(contracts: Sequence[tuple[str, str | None]]) -> None:
    """(sku, contract) per line item: a contract is one id segment, and all lines of one SKU carry
    the same contract (or none); VALIDATION_ERROR on `$.line_items[i].contract` otherwise."""
    first: dict[str, str | None] = {}
    for i, (sku, contract) in enumerate(contracts):
        field = f"$.line_items[{i}].contract"
        if contract is not None:
            chart.check_segment(contract, field)
        if first.setdefault(sku, contract) != contract:
            raise validation_error(f"all lines of sku {sku!r} must carry the same contract", field)
