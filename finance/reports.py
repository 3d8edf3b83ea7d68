"""Finance reports (REQUIREMENTS F12): pure shaping of ledger figures into rows, totals and CSV.

Pure: no I/O and no clock. `store/report_repo.py` reads the figures (posted debits and credits
per account and currency, optionally per period or per invoice) as of an instant; this module
turns them into one `Report` per name. Every amount is an integer in minor units of the row's
currency and is an account balance on its normal side (`ledger.accounts.normal_balance`), or a sum
of such balances, so every figure reconciles to `GET /accounts/{id}/balances?as_of=` of the
accounts the report lists (docs/api.md "Reports"):

| report               | accounts (docs/accounting.md)                                                |
|----------------------|------------------------------------------------------------------------------|
| `ar_aging`           | `asset:ar:{buyer}`, split per invoice (journal `source_ref`) into age buckets |
| `outstanding_invoices` | `asset:ar:{buyer}`, one row per invoice with something outstanding         |
| `ap`                 | `liability:royalty:*`, `liability:royalty-holdback:*`, `liability:tax-payable:*` |
| `deferred_revenue`   | `liability:deferred-revenue:{sku}`                                           |
| `revenue`            | `revenue:sales:{sku}` less the contra `revenue:refunds:{sku}`, per period      |
| `payout_liabilities` | royalty payables, holdbacks, `liability:payouts-in-transit:{provider}:{CCY}`   |
| `vat_owed`           | `liability:tax-payable:{jurisdiction}`                                       |
| `cash_position`      | `asset:cash:{provider}:{CCY}`                                                |

Ageing: an invoice's outstanding receivable is aged by days past its due date (`due_date`,
`YYYY-MM-DD`, as given at creation), or past its issue date when it has no parseable due date,
counted in whole UTC days to `as_of`: `current` (not yet due), `1-30`, `31-60`, `61-90`, `90+`.
Receivable lines that belong to no known invoice of that buyer (a client journal on `asset:ar:*`)
are reported as `unallocated`, so the buckets always add up to the account balance.
"""

from __future__ import annotations

import contextlib
import csv
import io
from collections.abc import Callable, Iterable
from datetime import date, datetime
from typing import Any, Final

import msgspec

from ledger.accounts import account_type_of, normal_balance
from ledger.invariants import check

AR_PREFIX: Final = "asset:ar:"
ROYALTY_PREFIX: Final = "liability:royalty:"
HOLDBACK_PREFIX: Final = "liability:royalty-holdback:"
TAX_PREFIX: Final = "liability:tax-payable:"
IN_TRANSIT_PREFIX: Final = "liability:payouts-in-transit:"
DEFERRED_PREFIX: Final = "liability:deferred-revenue:"
SALES_PREFIX: Final = "revenue:sales:"
REFUNDS_PREFIX: Final = "revenue:refunds:"
CASH_PREFIX: Final = "asset:cash:"

ACCOUNT_REPORTS: Final[dict[str, tuple[str, ...]]] = {
    "ap": (ROYALTY_PREFIX, HOLDBACK_PREFIX, TAX_PREFIX),
    "deferred_revenue": (DEFERRED_PREFIX,),
    "payout_liabilities": (ROYALTY_PREFIX, HOLDBACK_PREFIX, IN_TRANSIT_PREFIX),
    "vat_owed": (TAX_PREFIX,),
    "cash_position": (CASH_PREFIX,),
}
"""Reports built from account balances alone -> the account id prefixes they read."""

PERIOD_REPORTS: Final[dict[str, tuple[str, ...]]] = {"revenue": (SALES_PREFIX, REFUNDS_PREFIX)}
"""Reports built from posted amounts per period -> the account id prefixes they read."""

INVOICE_REPORTS: Final = frozenset({"ar_aging", "outstanding_invoices"})
"""Reports built from receivable lines per invoice (`asset:ar:*`, journal `source_ref`)."""

REPORT_NAMES: Final = frozenset({*ACCOUNT_REPORTS, *PERIOD_REPORTS, *INVOICE_REPORTS})
PERIODS: Final = ("day", "month")
FORMATS: Final = ("json", "csv")
AGE_BUCKETS: Final = ("current", "1-30", "31-60", "61-90", "90+")


class AccountFigure(msgspec.Struct, frozen=True):
    """One account's posted debits and credits in one currency (as of the report's instant)."""

    account_id: str
    currency: str
    debits: int
    credits: int

    @property
    def balance(self) -> int:
        """The balance on the account's normal side."""
        account_type = account_type_of(self.account_id)
        check(account_type is not None, f"report read a malformed account id {self.account_id!r}")
        assert account_type is not None  # for mypy; checked above
        return normal_balance(account_type, self.debits, self.credits)


class PeriodFigure(msgspec.Struct, frozen=True):
    """Posted debits and credits of one account and currency within one period (`YYYY-MM[-DD]`)."""

    period: str
    account_id: str
    currency: str
    debits: int
    credits: int


class ReceivableFigure(msgspec.Struct, frozen=True):
    """Posted debits and credits on one receivable account, currency and journal `source_ref`."""

    account_id: str
    currency: str
    source_ref: str | None
    debits: int
    credits: int


class InvoiceFacts(msgspec.Struct, frozen=True):
    """What ageing needs of an invoice (from the invoices table)."""

    invoice_id: str
    buyer_id: str
    currency: str
    total: int
    issued_at: datetime | None
    due_date: str | None


class Report(msgspec.Struct, frozen=True):
    """A shaped report: `columns` orders the CSV; `totals` maps currency -> column -> sum."""

    name: str
    as_of: str
    currency: str | None
    columns: tuple[str, ...]
    rows: list[dict[str, Any]]
    totals: dict[str, dict[str, int]]
    notes: dict[str, str] = {}


def _party(account_id: str, prefix: str) -> str:
    """The variable part after a family prefix (`asset:cash:stripe:EUR` -> `stripe:EUR`)."""
    return account_id[len(prefix) :]


def _add(totals: dict[str, dict[str, int]], currency: str, values: dict[str, int]) -> None:
    into = totals.setdefault(currency, {})
    for key, value in values.items():
        into[key] = into.get(key, 0) + value


def _only(figures: Iterable[Any], currency: str | None) -> list[Any]:
    return [f for f in figures if currency is None or f.currency == currency]


def _balance_rows(
    figures: list[AccountFigure], label: Callable[[AccountFigure], dict[str, Any]]
) -> tuple[list[dict[str, Any]], dict[str, dict[str, int]]]:
    rows: list[dict[str, Any]] = []
    totals: dict[str, dict[str, int]] = {}
    for figure in sorted(figures, key=lambda f: (f.account_id, f.currency)):
        row = {"account_id": figure.account_id, **label(figure), "currency": figure.currency}
        row["amount"] = figure.balance
        rows.append(row)
        _add(totals, figure.currency, {"amount": figure.balance})
    return rows, totals


def _ap_category(figure: AccountFigure) -> dict[str, Any]:
    for prefix, category in (
        (ROYALTY_PREFIX, "royalty_payable"),
        (HOLDBACK_PREFIX, "royalty_holdback"),
        (TAX_PREFIX, "tax_payable"),
    ):
        if figure.account_id.startswith(prefix):
            return {"category": category, "party": _party(figure.account_id, prefix)}
    raise AssertionError(f"not a payable account: {figure.account_id}")


def account_report(name: str, as_of: str, currency: str | None, figures: list[AccountFigure]) -> Report:
    """`ap`, `deferred_revenue`, `vat_owed`, `cash_position` (one row per account and currency) and
    `payout_liabilities` (one row per participant or provider and currency)."""
    check(name in ACCOUNT_REPORTS, f"not an account report: {name}")
    figures = [
        f for f in _only(figures, currency) if any(f.account_id.startswith(p) for p in ACCOUNT_REPORTS[name])
    ]
    if name == "payout_liabilities":
        return _payout_liabilities(as_of, currency, figures)
    labels: dict[str, tuple[tuple[str, ...], Callable[[AccountFigure], dict[str, Any]]]] = {
        "ap": (("category", "party"), _ap_category),
        "deferred_revenue": (("sku",), lambda f: {"sku": _party(f.account_id, DEFERRED_PREFIX)}),
        "vat_owed": (("jurisdiction",), lambda f: {"jurisdiction": _party(f.account_id, TAX_PREFIX)}),
        "cash_position": (
            ("provider",),
            lambda f: {"provider": _party(f.account_id, CASH_PREFIX).rsplit(":", 1)[0]},
        ),
    }
    keys, label = labels[name]
    rows, totals = _balance_rows(figures, label)
    if name == "ap":
        for row in rows:
            _add(totals, row["currency"], {row["category"]: row["amount"]})
    return Report(name, as_of, currency, ("account_id", *keys, "currency", "amount"), rows, totals)


PAYOUT_COLUMNS: Final = ("party", "kind", "currency", "payable", "holdback", "in_transit", "total")


def _payout_liabilities(as_of: str, currency: str | None, figures: list[AccountFigure]) -> Report:
    """Per participant and currency: payable (`liability:royalty:*`) and holdback; per provider and
    currency: money in transit to participants (`liability:payouts-in-transit:*`)."""
    by_party: dict[tuple[str, str, str], dict[str, int]] = {}
    for figure in figures:
        if figure.account_id.startswith(IN_TRANSIT_PREFIX):
            key = (_party(figure.account_id, IN_TRANSIT_PREFIX).rsplit(":", 1)[0], "provider", "in_transit")
        elif figure.account_id.startswith(HOLDBACK_PREFIX):
            key = (_party(figure.account_id, HOLDBACK_PREFIX), "participant", "holdback")
        else:
            key = (_party(figure.account_id, ROYALTY_PREFIX), "participant", "payable")
        amounts = by_party.setdefault((key[0], key[1], figure.currency), {})
        amounts[key[2]] = amounts.get(key[2], 0) + figure.balance
    rows: list[dict[str, Any]] = []
    totals: dict[str, dict[str, int]] = {}
    for (party, kind, ccy), amounts in sorted(by_party.items(), key=lambda item: (item[0][1], *item[0])):
        values = {k: amounts.get(k, 0) for k in ("payable", "holdback", "in_transit")}
        values["total"] = sum(values.values())
        rows.append({"party": party, "kind": kind, "currency": ccy, **values})
        _add(totals, ccy, values)
    return Report("payout_liabilities", as_of, currency, PAYOUT_COLUMNS, rows, totals)


def revenue_report(as_of: str, currency: str | None, period: str, figures: list[PeriodFigure]) -> Report:
    """Realised revenue per period, SKU and currency: `sales` (`revenue:sales:{sku}`), `refunds`
    (the contra `revenue:refunds:{sku}`, debit-normal, shown positive) and `net = sales - refunds`.
    Summed over all periods, `net` equals the sales balance plus the (negative) refunds balance."""
    check(period in PERIODS, f"bad period {period!r}")
    cells: dict[tuple[str, str, str], dict[str, int]] = {}
    for figure in _only(figures, currency):
        if figure.account_id.startswith(SALES_PREFIX):
            sku, column, amount = (
                _party(figure.account_id, SALES_PREFIX), "sales", figure.credits - figure.debits
            )  # fmt: skip
        elif figure.account_id.startswith(REFUNDS_PREFIX):
            sku, column = _party(figure.account_id, REFUNDS_PREFIX), "refunds"
            amount = figure.debits - figure.credits
        else:
            continue
        cell = cells.setdefault((figure.period, sku, figure.currency), {"sales": 0, "refunds": 0})
        cell[column] += amount
    rows: list[dict[str, Any]] = []
    totals: dict[str, dict[str, int]] = {}
    for (when, sku, ccy), cell in sorted(cells.items()):
        values = {**cell, "net": cell["sales"] - cell["refunds"]}
        rows.append({"period": when, "sku": sku, "currency": ccy, **values})
        _add(totals, ccy, values)
    columns = ("period", "sku", "currency", "sales", "refunds", "net")
    return Report("revenue", as_of, currency, columns, rows, totals, {"period": period})


def _due_day(facts: InvoiceFacts) -> date | None:
    """The due date; the issue date when the invoice has no due date or one that does not parse."""
    with contextlib.suppress(ValueError):
        if facts.due_date:
            return date.fromisoformat(facts.due_date[:10])
    return facts.issued_at.date() if facts.issued_at is not None else None


def age_bucket(days_overdue: int) -> str:
    """`current` when not yet due (0 or fewer days past due), else the bucket of days past due."""
    if days_overdue <= 0:
        return "current"
    if days_overdue <= 30:
        return "1-30"
    if days_overdue <= 60:
        return "31-60"
    if days_overdue <= 90:
        return "61-90"
    return "90+"


class _Outstanding(msgspec.Struct, frozen=True):
    facts: InvoiceFacts
    account_id: str
    amount: int
    days_overdue: int


def _attribute(
    figures: list[ReceivableFigure], invoices: dict[str, InvoiceFacts], as_of_day: date
) -> tuple[list[_Outstanding], dict[tuple[str, str], int]]:
    """Receivable lines per invoice (those whose `source_ref` is an invoice of that buyer and
    currency) and the rest per (account, currency) as unallocated."""
    per_invoice: dict[tuple[str, str], int] = {}
    unallocated: dict[tuple[str, str], int] = {}
    for figure in figures:
        amount = figure.debits - figure.credits
        facts = invoices.get(figure.source_ref or "")
        if (
            facts is not None
            and figure.account_id == AR_PREFIX + facts.buyer_id
            and figure.currency == facts.currency
        ):
            key = (facts.invoice_id, figure.account_id)
            per_invoice[key] = per_invoice.get(key, 0) + amount
        else:
            key = (figure.account_id, figure.currency)
            unallocated[key] = unallocated.get(key, 0) + amount
    outstanding = []
    for (invoice_id, account_id), amount in sorted(per_invoice.items()):
        if amount:
            facts = invoices[invoice_id]
            due = _due_day(facts)
            days = (as_of_day - due).days if due is not None else 0
            outstanding.append(_Outstanding(facts, account_id, amount, days))
    return outstanding, {k: v for k, v in unallocated.items() if v}


AGING_COLUMNS: Final = ("account_id", "buyer_id", "currency", *AGE_BUCKETS, "unallocated", "total")


def ar_aging(
    as_of: datetime,
    as_of_text: str,
    currency: str | None,
    figures: list[ReceivableFigure],
    invoices: dict[str, InvoiceFacts],
) -> Report:
    """Per buyer and currency, the receivable split into age buckets (module docstring); `total`
    is the balance of `asset:ar:{buyer}` in that currency."""
    outstanding, unallocated = _attribute(_only(figures, currency), invoices, as_of.date())
    cells: dict[tuple[str, str], dict[str, int]] = {}
    empty = dict.fromkeys((*AGE_BUCKETS, "unallocated"), 0)
    for item in outstanding:
        cell = cells.setdefault((item.account_id, item.facts.currency), dict(empty))
        cell[age_bucket(item.days_overdue)] += item.amount
    for key, amount in unallocated.items():
        cells.setdefault(key, dict(empty))["unallocated"] += amount
    rows: list[dict[str, Any]] = []
    totals: dict[str, dict[str, int]] = {}
    for (account_id, ccy), cell in sorted(cells.items()):
        values = {**cell, "total": sum(cell.values())}
        rows.append({"account_id": account_id, "buyer_id": _party(account_id, AR_PREFIX), "currency": ccy,
                     **values})  # fmt: skip
        _add(totals, ccy, values)
    notes = {"basis": "days past due_date (issue date when none), whole UTC days to as_of"}
    return Report("ar_aging", as_of_text, currency, AGING_COLUMNS, rows, totals, notes)


OUTSTANDING_COLUMNS: Final = ("invoice_id", "account_id", "buyer_id", "currency", "issued_at", "due_date",
                              "total", "outstanding", "days_overdue", "bucket")  # fmt: skip


def outstanding_invoices(
    as_of: datetime,
    as_of_text: str,
    currency: str | None,
    figures: list[ReceivableFigure],
    invoices: dict[str, InvoiceFacts],
    time_text: Callable[[datetime], str],
) -> Report:
    """One row per invoice with a receivable outstanding as of `as_of`; per currency the totals of
    `outstanding`, `unallocated` and `receivables` (their sum: the `asset:ar:*` balances)."""
    outstanding, unallocated = _attribute(_only(figures, currency), invoices, as_of.date())
    rows: list[dict[str, Any]] = []
    totals: dict[str, dict[str, int]] = {}
    for item in outstanding:
        facts = item.facts
        issued = time_text(facts.issued_at) if facts.issued_at is not None else None
        rows.append({
            "invoice_id": facts.invoice_id, "account_id": item.account_id, "buyer_id": facts.buyer_id,
            "currency": facts.currency, "issued_at": issued, "due_date": facts.due_date,
            "total": facts.total, "outstanding": item.amount, "days_overdue": max(0, item.days_overdue),
            "bucket": age_bucket(item.days_overdue),
        })  # fmt: skip
        _add(totals, facts.currency, {"outstanding": item.amount, "receivables": item.amount})
    for (_account, ccy), amount in sorted(unallocated.items()):
        _add(totals, ccy, {"unallocated": amount, "receivables": amount})
    for values in totals.values():
        for key in ("outstanding", "unallocated", "receivables"):
            values.setdefault(key, 0)
    return Report("outstanding_invoices", as_of_text, currency, OUTSTANDING_COLUMNS, rows, totals)


def report_body(report: Report) -> dict[str, Any]:
    """The `report` object of the JSON answer."""
    return {
        "name": report.name,
        "as_of": report.as_of,
        "currency": report.currency,
        **report.notes,
        "columns": list(report.columns),
        "rows": report.rows,
        "totals": report.totals,
    }


def report_csv(report: Report) -> str:
    """The rows as CSV: a header row of `columns`, then one line per row (empty for None)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(report.columns)
    for row in report.rows:
        writer.writerow(["" if row[c] is None else row[c] for c in report.columns])
    return out.getvalue()
