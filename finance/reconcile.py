"""Reconciliation against the payment provider (REQUIREMENTS F11, issue 7 item 4): pure matching.

No I/O here. Given the ledger's records and the provider's records of a window (each a `Record`:
kind, provider reference, amount in minor units, currency, time, ledger journal id), and the
operator resolutions recorded so far, `reconcile` answers how many matched and every discrepancy.

- Records are keyed by (kind, provider reference); kinds are `payment` (a payment intent),
  `refund` (a refund) and `payout` (a Connect transfer).
- A key belongs to the window of its provider record's time (of its ledger record's when the
  provider has none). Callers fetch both sides over the window widened by `MATCH_SLACK_S` on each
  side, so a payment created at the provider just before `to_ts` and posted just after it still
  matches, and each key is reported by exactly one of two adjacent windows.
- Per key, in this order: more than one record on one side -> `duplicate` (`details.side`);
  none in the ledger -> `ledger_missing`; none at the provider -> `provider_missing`; currencies
  differ -> `currency_mismatch`; amounts differ -> `amount_mismatch`; else matched.
- A `Resolution` (an operator's adjusting journal for a discrepancy) stands for the ledger side of
  its key from then on: its reconciled value (the provider's amount and currency) replaces the
  ledger records of the key, or removes them (`amount is None`: the ledger's record was reversed,
  for `provider_missing`). Identical copies of a resolved key at the provider count once. The
  newest resolution of a key wins.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal

import msgspec

Kind = Literal["payment", "refund", "payout"]
Reason = Literal["provider_missing", "ledger_missing", "amount_mismatch", "currency_mismatch", "duplicate"]

KINDS: Final[tuple[Kind, ...]] = ("payment", "refund", "payout")
REASONS: Final[tuple[Reason, ...]] = (
    "provider_missing",
    "ledger_missing",
    "amount_mismatch",
    "currency_mismatch",
    "duplicate",
)
MATCH_SLACK_S: Final = 3600
"""Both sides are fetched this much beyond the window so that boundary records still pair up."""
WINDOW_MAX: Final = timedelta(days=31)
"""The longest window one run may cover (a calendar month; longer: several runs)."""
PROVIDERS: Final = ("stripe",)


class ProviderDataError(ValueError):
    """A provider record that cannot be read (the caller answers RECONCILE_ERROR)."""


class Record(msgspec.Struct, frozen=True):
    """One money movement as one side recorded it (amount in minor units, ISO currency upper case)."""

    kind: Kind
    reference: str
    amount: int
    currency: str
    at: datetime
    journal_id: str | None = None


class Resolution(msgspec.Struct, frozen=True):
    """What an operator's adjusting journal made the ledger side of a key (None: no record)."""

    kind: Kind
    reference: str
    journal_id: str
    at: datetime
    amount: int | None
    currency: str | None


class Discrepancy(msgspec.Struct, frozen=True):
    """One key that does not reconcile (amounts and currencies None on the side that lacks it)."""

    discrepancy_id: str
    kind: Kind
    reason: Reason
    provider_reference: str
    journal_id: str | None
    ledger_amount: int | None
    provider_amount: int | None
    ledger_currency: str | None
    provider_currency: str | None
    details: dict[str, Any] = {}


class Outcome(msgspec.Struct, frozen=True):
    """A run's result: matched keys and the discrepancies, in key order."""

    matched: int
    discrepancies: list[Discrepancy]

    def counts(self) -> dict[str, int]:
        """Discrepancies per reason (every reason present, zero included)."""
        counts: dict[str, int] = dict.fromkeys(REASONS, 0)
        for d in self.discrepancies:
            counts[d.reason] += 1
        return counts


class Window(msgspec.Struct, frozen=True):
    """`[start, end)` in UTC."""

    start: datetime
    end: datetime

    def contains(self, moment: datetime) -> bool:
        """Whether `moment` falls in the window."""
        return self.start <= moment < self.end

    def widened(self) -> tuple[datetime, datetime]:
        """The range to fetch from both sides."""
        slack = timedelta(seconds=MATCH_SLACK_S)
        return self.start - slack, self.end + slack


def _group(records: Iterable[Record]) -> dict[tuple[str, str], list[Record]]:
    grouped: dict[tuple[str, str], list[Record]] = {}
    for record in records:
        grouped.setdefault((record.kind, record.reference), []).append(record)
    return grouped


def _apply_resolutions(
    ledger: dict[tuple[str, str], list[Record]], resolutions: Iterable[Resolution]
) -> set[tuple[str, str]]:
    """Replace the ledger side of every resolved key by its newest resolution; the resolved keys."""
    newest: dict[tuple[str, str], Resolution] = {}
    for r in resolutions:
        key: tuple[str, str] = (r.kind, r.reference)
        if key not in newest or r.at >= newest[key].at:
            newest[key] = r
    for resolved_key, r in newest.items():
        key = resolved_key
        before = ledger.get(key, [])
        if r.amount is None or r.currency is None:
            ledger.pop(key, None)
            continue
        at = before[0].at if before else r.at
        ledger[key] = [Record(r.kind, r.reference, r.amount, r.currency, at, r.journal_id)]
    return set(newest)


def _collapse(records: list[Record]) -> list[Record]:
    """Identical copies of one provider record count once (for keys an operator resolved)."""
    unique: list[Record] = []
    for record in records:
        if all((u.amount, u.currency) != (record.amount, record.currency) for u in unique):
            unique.append(record)
    return unique


def _compare(ledger: list[Record], provider: list[Record]) -> tuple[Reason, dict[str, Any]] | None:
    if len(provider) > 1:
        return "duplicate", {"side": "provider", "count": len(provider)}
    if len(ledger) > 1:
        return "duplicate", {
            "side": "ledger",
            "count": len(ledger),
            "journal_ids": [r.journal_id for r in ledger],
        }
    if not ledger:
        return "ledger_missing", {}
    if not provider:
        return "provider_missing", {}
    if ledger[0].currency != provider[0].currency:
        return "currency_mismatch", {}
    if ledger[0].amount != provider[0].amount:
        return "amount_mismatch", {"difference": provider[0].amount - ledger[0].amount}
    return None


def reconcile(
    window: Window,
    ledger: Iterable[Record],
    provider: Iterable[Record],
    resolutions: Iterable[Resolution] = (),
) -> Outcome:
    """Match both sides of `window` by (kind, provider reference); see the module docstring."""
    ledger_by = _group(ledger)
    provider_by = _group(provider)
    resolved = _apply_resolutions(ledger_by, resolutions)
    matched = 0
    found: list[Discrepancy] = []
    for key in sorted(ledger_by.keys() | provider_by.keys()):
        on_ledger, at_provider = ledger_by.get(key, []), provider_by.get(key, [])
        if key in resolved:
            at_provider = _collapse(at_provider)
        anchor = at_provider[0] if at_provider else on_ledger[0]
        if not window.contains(anchor.at):
            continue
        compared = _compare(on_ledger, at_provider)
        if compared is None:
            matched += 1
            continue
        reason, details = compared
        first_ledger = on_ledger[0] if on_ledger else None
        first_provider = at_provider[0] if at_provider else None
        if reason == "duplicate":
            side = on_ledger if details["side"] == "ledger" else at_provider
            details["amounts"] = [r.amount for r in side]
        found.append(
            Discrepancy(
                discrepancy_id=f"d{len(found) + 1:04d}",
                kind=anchor.kind,
                reason=reason,
                provider_reference=anchor.reference,
                journal_id=first_ledger.journal_id if first_ledger else None,
                ledger_amount=first_ledger.amount if first_ledger else None,
                provider_amount=first_provider.amount if first_provider else None,
                ledger_currency=first_ledger.currency if first_ledger else None,
                provider_currency=first_provider.currency if first_provider else None,
                details=details,
            )
        )
    return Outcome(matched, found)


# -- resolution ------------------------------------------------------------------------------------
def expected_adjustment(d: Discrepancy) -> dict[str, int]:
    """Per currency, the debit total an adjusting journal for `d` must move ({}: any amount).

    `ledger_missing`: the provider's amount; `provider_missing`: the ledger's; `amount_mismatch`:
    the difference; `currency_mismatch`: the ledger's amount in its currency and the provider's in
    its (reverse one, book the other); `duplicate`: the extra copies on the ledger side, nothing
    fixed for a duplicate at the provider (the operator confirms it is one movement).
    """
    if d.reason == "ledger_missing" and d.provider_amount is not None and d.provider_currency:
        return {d.provider_currency: d.provider_amount}
    if d.reason == "provider_missing" and d.ledger_amount is not None and d.ledger_currency:
        return {d.ledger_currency: d.ledger_amount}
    if d.reason == "amount_mismatch" and d.ledger_amount is not None and d.provider_amount is not None:
        assert d.ledger_currency is not None
        return {d.ledger_currency: abs(d.provider_amount - d.ledger_amount)}
    if d.reason == "currency_mismatch" and d.ledger_currency and d.provider_currency:
        assert d.ledger_amount is not None and d.provider_amount is not None
        return {d.ledger_currency: d.ledger_amount, d.provider_currency: d.provider_amount}
    if d.reason == "duplicate" and d.details.get("side") == "ledger":
        amounts: list[int] = list(d.details.get("amounts", []))
        if d.ledger_currency and len(amounts) > 1:
            return {d.ledger_currency: sum(amounts) - (d.provider_amount or amounts[0])}
    return {}


def adjustment_problem(d: Discrepancy, debit_totals: Mapping[str, int]) -> str | None:
    """Why a journal with these per-currency debit totals cannot resolve `d` (None: it can)."""
    expected = expected_adjustment(d)
    for currency, amount in sorted(expected.items()):
        moved = debit_totals.get(currency, 0)
        if moved != amount:
            return f"the adjusting journal must move {amount} {currency} (debits), not {moved}"
    return None


def resolved_value(d: Discrepancy) -> tuple[int | None, str | None]:
    """The ledger side of `d`'s key once its adjusting journal is posted (None, None: no record)."""
    if d.reason == "provider_missing":
        return None, None
    if d.provider_amount is None:  # a ledger duplicate without a provider record: one copy stays
        return d.ledger_amount, d.ledger_currency
    return d.provider_amount, d.provider_currency


# -- provider records ------------------------------------------------------------------------------
_PROVIDER_SKIP: Final = {
    "payment": {
        "requires_payment_method",
        "requires_confirmation",
        "requires_action",
        "processing",
        "requires_capture",
        "canceled",
    },
    "refund": {"failed", "canceled"},
    "payout": set[str](),
}


def provider_record(kind: Kind, obj: Mapping[str, Any]) -> Record | None:
    """A provider object (a payment intent, refund or transfer as JSON) as a `Record`; None for
    objects that moved no money (an intent not succeeded, a failed refund). Raises
    `ProviderDataError` for anything it cannot read."""
    try:
        status = obj.get("status")
        if status is not None and status in _PROVIDER_SKIP[kind]:
            return None
        reference, amount, currency, created = obj["id"], obj["amount"], obj["currency"], obj["created"]
        if kind == "payment" and obj.get("amount_received") is not None:
            amount = obj["amount_received"]
    except (KeyError, AttributeError, TypeError) as exc:
        raise ProviderDataError(f"{kind} record without {exc}") from None
    if not isinstance(reference, str) or not reference:
        raise ProviderDataError(f"{kind} record with id {reference!r}")
    if not isinstance(amount, int) or isinstance(amount, bool) or amount < 0:
        raise ProviderDataError(f"{kind} {reference}: amount {amount!r} is not minor units")
    if not isinstance(currency, str) or len(currency) != 3 or not currency.isalpha():
        raise ProviderDataError(f"{kind} {reference}: currency {currency!r}")
    if not isinstance(created, int) or isinstance(created, bool) or created < 0:
        raise ProviderDataError(f"{kind} {reference}: created {created!r} is not a Unix time")
    return Record(kind, reference, amount, currency.upper(), datetime.fromtimestamp(created, UTC))


# -- report ----------------------------------------------------------------------------------------
CSV_COLUMNS: Final = (
    "reconcile_id",
    "discrepancy_id",
    "kind",
    "reason",
    "provider_reference",
    "journal_id",
    "ledger_amount",
    "provider_amount",
    "ledger_currency",
    "provider_currency",
    "status",
    "resolution_journal_id",
)


def report_csv(reconcile_id: str, rows: Sequence[Mapping[str, Any]]) -> str:
    """The discrepancies as CSV (`CSV_COLUMNS`, a header line, empty cells for absent values)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow(
            {"reconcile_id": reconcile_id, **{k: ("" if v is None else v) for k, v in row.items()}}
        )
    return out.getvalue()
