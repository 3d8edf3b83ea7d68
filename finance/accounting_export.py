"""Accounting exports (issue 8 item 2, DECISIONS D9): ledger journals as manual-journal CSV imports.

Pure: no I/O. The caller reads the posted journal lines of a window (store/journal_export_repo.py) and
the account map (`LEDGER_ACCOUNT_MAP`, a JSON or TOML file); this module maps ledger accounts to
the external chart of accounts and writes one of three layouts:

- `xero`: Xero's manual journal import (`XERO_COLUMNS`): debits positive, credits negative;
  the rows of one journal share Narration and Date, which is how Xero groups them.
- `quickbooks`: QuickBooks Online's journal entry import (`QUICKBOOKS_COLUMNS`): Debits and
  Credits columns, the rows of one journal share JournalNo.
- `generic`: every fact of the line (`GENERIC_COLUMNS`), the ledger account id beside its code.

One exported journal per ledger journal and currency (a journal balances per currency, D2, so each
part balances on its own); dates are the `posted_at` date in UTC (D3), `YYYY-MM-DD` (D9); amounts
are major units with the currency's ISO 4217 exponent (`major_units`), never a float.

The account map: `{"accounts": {"<account id or prefix*>": "<code>" | {"code", "name",
"tax_rate"}}, "fallback": <entry>?, "xero_tax_rate": "<name>"?}`. An exact account id wins over a
pattern; among patterns (a trailing `*`: `revenue:sales:*`) the longest prefix wins. Accounts
neither rule maps take the `fallback` entry when there is one; otherwise a Xero or QuickBooks
export lists them (`UnmappedAccounts`) and writes nothing. `generic` never needs the map.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final, Literal

import msgspec

from ledger.money import CURRENCY_MINOR_UNITS

Format = Literal["xero", "quickbooks", "generic"]
FORMATS: Final[tuple[Format, ...]] = ("xero", "quickbooks", "generic")
XERO_COLUMNS: Final = (
    "Narration",
    "Date",
    "Description",
    "AccountCode",
    "TaxRate",
    "Amount",
    "TrackingName1",
    "TrackingOption1",
    "TrackingName2",
    "TrackingOption2",
)
QUICKBOOKS_COLUMNS: Final = (
    "JournalNo",
    "JournalDate",
    "Currency",
    "AccountName",
    "Debits",
    "Credits",
    "Description",
    "Name",
    "Location",
    "Class",
)
GENERIC_COLUMNS: Final = (
    "journal_id",
    "date",
    "posted_at",
    "line_no",
    "account_id",
    "account_code",
    "account_name",
    "currency",
    "debit",
    "credit",
    "amount_minor",
    "side",
    "memo",
    "source_ref",
)
XERO_TAX_RATE_DEFAULT: Final = "Tax Exempt"
"""Xero's TaxRate is mandatory; the ledger already booked tax on its own accounts, so lines carry
a zero rate (the name differs by region: "No VAT", "BAS Excluded", ...; set `xero_tax_rate`)."""
JOURNAL_NO_MAX: Final = 21
"""QuickBooks Online's journal number (DocNumber) length limit."""
NARRATION_MAX: Final = 200


class AccountMapError(ValueError):
    """An account map file that cannot be read (its path and the reason are in the message)."""


class UnmappedAccounts(Exception):
    """Accounts of the export that the map does not map (sorted)."""

    def __init__(self, accounts: Sequence[str]) -> None:
        super().__init__(f"{len(accounts)} ledger accounts have no external account code")
        self.accounts = list(accounts)


class Target(msgspec.Struct, frozen=True):
    """An external account: the code (Xero), the name (QuickBooks; the code when absent)."""

    code: str
    name: str | None = None
    tax_rate: str | None = None

    @property
    def label(self) -> str:
        """What QuickBooks matches (account names; `Parent:Sub` for sub-accounts)."""
        return self.name or self.code


class AccountMap(msgspec.Struct, frozen=True):
    """Exact ledger account ids and prefixes (without the `*`) to external accounts."""

    exact: dict[str, Target] = {}
    prefixes: dict[str, Target] = {}
    fallback: Target | None = None
    xero_tax_rate: str = XERO_TAX_RATE_DEFAULT

    def target(self, account_id: str) -> Target | None:
        """The external account of `account_id` (exact, then the longest prefix, then fallback)."""
        found = self.exact.get(account_id)
        if found is not None:
            return found
        best = max((p for p in self.prefixes if account_id.startswith(p)), key=len, default=None)
        return self.prefixes[best] if best is not None else self.fallback


class Line(msgspec.Struct, frozen=True):
    """One posted journal line (amount in minor units, side `D` or `C`)."""

    line_no: int
    account_id: str
    currency: str
    side: Literal["D", "C"]
    amount: int


class Journal(msgspec.Struct, frozen=True):
    """One posted journal: its id, commit time (UTC), memo, source reference and lines."""

    journal_id: str
    posted_at: datetime
    lines: tuple[Line, ...]
    memo: str | None = None
    source_ref: str | None = None


# -- the account map -------------------------------------------------------------------------------
def _target(where: str, value: Any) -> Target:
    if isinstance(value, str) and value.strip():
        return Target(value.strip())
    if isinstance(value, dict) and isinstance(value.get("code"), str) and value["code"].strip():
        unknown = sorted(set(value) - {"code", "name", "tax_rate"})
        if unknown:
            raise AccountMapError(f"{where}: unknown keys {unknown}")
        for key in ("name", "tax_rate"):
            if value.get(key) is not None and not isinstance(value[key], str):
                raise AccountMapError(f"{where}: {key} must be a string")
        return Target(value["code"].strip(), value.get("name"), value.get("tax_rate"))
    raise AccountMapError(f'{where}: expected a code string or {{"code": ..., "name": ...}}')


def account_map(document: Mapping[str, Any]) -> AccountMap:
    """The map from its decoded file (module docstring); `AccountMapError` naming what is wrong."""
    unknown = sorted(set(document) - {"accounts", "fallback", "xero_tax_rate"})
    if unknown:
        raise AccountMapError(f"unknown top-level keys {unknown}")
    accounts = document.get("accounts", {})
    if not isinstance(accounts, dict):
        raise AccountMapError("accounts must be a table of account id or pattern -> code")
    exact: dict[str, Target] = {}
    prefixes: dict[str, Target] = {}
    for pattern, value in accounts.items():
        target = _target(f"accounts[{pattern!r}]", value)
        if "*" in pattern[:-1] or pattern in ("", "*"):
            raise AccountMapError(f"accounts[{pattern!r}]: '*' may only end a prefix (revenue:sales:*)")
        if pattern.endswith("*"):
            prefixes[pattern[:-1]] = target
        else:
            exact[pattern] = target
    fallback = document.get("fallback")
    tax_rate = document.get("xero_tax_rate", XERO_TAX_RATE_DEFAULT)
    if not isinstance(tax_rate, str) or not tax_rate:
        raise AccountMapError("xero_tax_rate must be a tax rate name")
    return AccountMap(
        exact, prefixes, _target("fallback", fallback) if fallback is not None else None, tax_rate
    )


def parse_account_map(text: str, filename: str) -> AccountMap:
    """Parse a map file's text: TOML when `filename` ends in `.toml`, else JSON."""
    try:
        document = tomllib.loads(text) if filename.endswith(".toml") else json.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise AccountMapError(f"{filename}: {exc}") from None
    if not isinstance(document, dict):
        raise AccountMapError(f"{filename}: the top level must be an object")
    try:
        return account_map(document)
    except AccountMapError as exc:
        raise AccountMapError(f"{filename}: {exc}") from None


# -- money and grouping ----------------------------------------------------------------------------
def major_units(amount_minor: int, currency: str) -> str:
    """`amount_minor` as a decimal string in major units: 123456 EUR -> "1234.56", JPY -> "123456",
    BHD -> "123.456"; negative amounts keep their sign."""
    exponent = CURRENCY_MINOR_UNITS[currency]
    sign = "-" if amount_minor < 0 else ""
    whole, fraction = divmod(abs(amount_minor), 10**exponent)
    return f"{sign}{whole}.{fraction:0{exponent}d}" if exponent else f"{sign}{whole}"


def _parts(journal: Journal) -> list[tuple[str, list[Line]]]:
    """The journal's lines per currency (currency order), each part checked to balance."""
    parts: dict[str, list[Line]] = {}
    for line in sorted(journal.lines, key=lambda item: item.line_no):
        parts.setdefault(line.currency, []).append(line)
    for currency, lines in parts.items():
        debits = sum(x.amount for x in lines if x.side == "D")
        credits = sum(x.amount for x in lines if x.side == "C")
        if debits != credits:  # a stored journal balances per currency (D2): never export otherwise
            raise ValueError(f"journal {journal.journal_id} does not balance in {currency}")
    return sorted(parts.items())


def unmapped(journals: Iterable[Journal], mapping: AccountMap) -> list[str]:
    """The accounts of `journals` that `mapping` does not map, sorted."""
    return sorted({x.account_id for j in journals for x in j.lines if mapping.target(x.account_id) is None})


def currencies(journals: Iterable[Journal]) -> list[str]:
    """The currencies `journals` move, sorted."""
    return sorted({x.currency for j in journals for x in j.lines})


def _journal_no(journal_id: str, currency: str, multi: bool) -> str:
    """A QuickBooks journal number: the journal id (with `/CCY` for one part of a multi-currency
    journal) when it fits, else `J` + the first 20 hex digits of its SHA-256."""
    number = f"{journal_id}/{currency}" if multi else journal_id
    if len(number) <= JOURNAL_NO_MAX:
        return number
    return "J" + hashlib.sha256(number.encode()).hexdigest()[: JOURNAL_NO_MAX - 1]


def _narration(journal: Journal, currency: str, multi: bool) -> str:
    """Unique per exported journal (Xero groups rows by narration and date)."""
    head = f"{journal.journal_id} ({currency})" if multi else journal.journal_id
    return f"{head}: {journal.memo}"[:NARRATION_MAX] if journal.memo else head


# -- layouts ---------------------------------------------------------------------------------------
def _rows(journal: Journal, fmt: Format, mapping: AccountMap) -> Iterable[dict[str, str]]:
    parts = _parts(journal)
    multi = len(parts) > 1
    day = journal.posted_at.astimezone(UTC).strftime("%Y-%m-%d")
    for currency, lines in parts:
        for line in lines:
            target = mapping.target(line.account_id)
            amount = major_units(line.amount, currency)
            description = f"{line.account_id}: {journal.memo}" if journal.memo else line.account_id
            if fmt == "xero":
                assert target is not None  # callers check `unmapped` first
                yield {
                    "Narration": _narration(journal, currency, multi),
                    "Date": day,
                    "Description": description,
                    "AccountCode": target.code,
                    "TaxRate": target.tax_rate or mapping.xero_tax_rate,
                    "Amount": amount if line.side == "D" else f"-{amount}",
                }
            elif fmt == "quickbooks":
                assert target is not None
                yield {
                    "JournalNo": _journal_no(journal.journal_id, currency, multi),
                    "JournalDate": day,
                    "Currency": currency,
                    "AccountName": target.label,
                    "Debits": amount if line.side == "D" else "",
                    "Credits": amount if line.side == "C" else "",
                    "Description": f"{journal.journal_id} {description}",
                }
            else:
                yield {
                    "journal_id": journal.journal_id,
                    "date": day,
                    "posted_at": journal.posted_at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
                    "line_no": str(line.line_no),
                    "account_id": line.account_id,
                    "account_code": target.code if target else "",
                    "account_name": (target.name or "") if target else "",
                    "currency": currency,
                    "debit": amount if line.side == "D" else "",
                    "credit": amount if line.side == "C" else "",
                    "amount_minor": str(line.amount),
                    "side": line.side,
                    "memo": journal.memo or "",
                    "source_ref": journal.source_ref or "",
                }


COLUMNS: Final[dict[Format, tuple[str, ...]]] = {
    "xero": XERO_COLUMNS,
    "quickbooks": QUICKBOOKS_COLUMNS,
    "generic": GENERIC_COLUMNS,
}


def journal_csv(journals: Sequence[Journal], fmt: Format, mapping: AccountMap) -> str:
    """The CSV of `journals` (in the given order) in layout `fmt`, header first; raises
    `UnmappedAccounts` for a Xero or QuickBooks export with accounts the map does not map."""
    if fmt != "generic":
        missing = unmapped(journals, mapping)
        if missing:
            raise UnmappedAccounts(missing)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS[fmt], lineterminator="\r\n", restval="")
    writer.writeheader()
    for journal in journals:
        writer.writerows(_rows(journal, fmt, mapping))
    return out.getvalue()
