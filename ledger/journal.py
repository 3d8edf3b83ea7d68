"""Journals: the wire shape, its validation, and the validated, balanced `Journal`.

A journal has 2..256 lines; each line debits or credits one account in one currency by a
positive integer number of minor units. It must balance per currency. The only way to
get a `Journal` is `validate_journal()`, which checks all of that, so a `Journal` value
is balanced by construction.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Final, Literal

import msgspec

from ledger.accounts import AccountType, account_type_of
from ledger.errors import ErrorCode, Rejection, validation_error
from ledger.invariants import check
from ledger.money import INT64_MAX, fits_int64, is_currency
from ledger.timestamps import parse_rfc3339

LINES_MIN: Final = 2
LINES_MAX: Final = 256
JOURNAL_ID_PATTERN: Final = re.compile(r"^[A-Za-z0-9:._-]{1,200}$")

Side = Literal["debit", "credit"]
Amount = Annotated[int, msgspec.Meta(gt=0, le=INT64_MAX)]


class LineIn(msgspec.Struct, forbid_unknown_fields=True):
    """One journal line as a client sends it."""

    account_id: str
    side: Side
    amount_cents: Amount
    currency: str
    meta: dict[str, Any] = {}


class JournalIn(msgspec.Struct, forbid_unknown_fields=True):
    """A journal as a client sends it (`POST /ledger/post`, one item of a batch)."""

    entries: list[LineIn]
    journal_id: str | None = None
    context: dict[str, Any] = {}
    ts: str | None = None
    reverses: str | None = None
    memo: str | None = None
    source_ref: str | None = None


class Line(msgspec.Struct, frozen=True, array_like=True):
    """A validated line. `line_no` is its position in the journal."""

    line_no: int
    account_id: str
    account_type: AccountType
    side: Side
    amount: int
    currency: str
    meta: dict[str, Any]

    @property
    def is_debit(self) -> bool:
        """True for a debit line."""
        return self.side == "debit"


class Journal(msgspec.Struct, frozen=True):
    """A validated journal: 2..256 lines that balance per currency. Build with `validate_journal`."""

    journal_id: str | None
    lines: tuple[Line, ...]
    context: dict[str, Any]
    effective_at: str | None
    reverses: str | None
    memo: str | None
    source_ref: str | None

    def with_id(self, journal_id: str) -> Journal:
        """The same journal under a (server-generated) id."""
        return msgspec.structs.replace(self, journal_id=journal_id)

    def accounts(self) -> list[str]:
        """Distinct account ids in line order."""
        return list(dict.fromkeys(line.account_id for line in self.lines))


def _validate_line(index: int, line: LineIn) -> Line:
    path = f"$.entries[{index}]"
    account_type = account_type_of(line.account_id)
    if account_type is None:
        raise validation_error(
            "account_id must be `type:rest` with type asset|liability|equity|revenue|expense and "
            "1-200 characters of [A-Za-z0-9:._-]",
            f"{path}.account_id",
        )
    if not is_currency(line.currency):
        raise validation_error(f"unknown currency code {line.currency!r} (ISO 4217)", f"{path}.currency")
    return Line(index, line.account_id, account_type, line.side, line.amount_cents, line.currency, line.meta)


def _validate_timestamp(value: str | None, field: str) -> str | None:
    if value is None:
        return None
    if parse_rfc3339(value) is None:
        raise validation_error("timestamp must be RFC 3339 with an offset, e.g. 2026-11-17T12:00:00Z", field)
    return value


def _check_balance(lines: tuple[Line, ...]) -> None:
    totals: dict[str, list[int]] = {}
    for line in lines:
        pair = totals.setdefault(line.currency, [0, 0])
        pair[0 if line.is_debit else 1] += line.amount
    for currency, (debits, credits) in totals.items():
        if not (fits_int64(debits) and fits_int64(credits)):
            raise validation_error(
                f"per-side total in {currency} exceeds 2^63-1", "$.entries", currency=currency
            )
    for currency, (debits, credits) in sorted(totals.items()):
        if debits != credits:
            raise Rejection(
                ErrorCode.LEDGER_IMBALANCE,
                f"debits ({debits}) != credits ({credits}) in {currency}",
                {"currency": currency, "debits": debits, "credits": credits},
            )


def validate_journal(raw: JournalIn) -> Journal:
    """Validate a decoded journal; raise `Rejection` (VALIDATION_ERROR before LEDGER_IMBALANCE)."""
    if raw.journal_id is not None and not JOURNAL_ID_PATTERN.fullmatch(raw.journal_id):
        raise validation_error("journal_id must be 1-200 characters of [A-Za-z0-9:._-]", "$.journal_id")
    if raw.reverses is not None and not JOURNAL_ID_PATTERN.fullmatch(raw.reverses):
        raise validation_error("reverses must be a journal id", "$.reverses")
    if not LINES_MIN <= len(raw.entries) <= LINES_MAX:
        raise validation_error(
            f"a journal has {LINES_MIN} to {LINES_MAX} lines, got {len(raw.entries)}", "$.entries"
        )
    lines = tuple(_validate_line(i, line) for i, line in enumerate(raw.entries))
    effective_at = _validate_timestamp(raw.ts, "$.ts")
    _check_balance(lines)
    journal = Journal(
        raw.journal_id, lines, raw.context, effective_at, raw.reverses, raw.memo, raw.source_ref
    )
    check(len(journal.lines) >= LINES_MIN, "validated journal has fewer than two lines")
    return journal


def balance_by_currency(lines: tuple[Line, ...]) -> dict[str, int]:
    """Debits minus credits per currency (zero everywhere for a balanced journal)."""
    net: dict[str, int] = {}
    for line in lines:
        net[line.currency] = net.get(line.currency, 0) + (line.amount if line.is_debit else -line.amount)
    return net


_decoder: Final = msgspec.json.Decoder(JournalIn)


def decode_journal(body: bytes) -> JournalIn:
    """Decode one journal from JSON; malformed input -> VALIDATION_ERROR naming the field."""
    try:
        return _decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise rejection_from_msgspec(exc) from None
    except msgspec.DecodeError as exc:
        raise validation_error(f"malformed JSON: {exc}", "$") from None


_AT_PATH: Final = re.compile(r" - at `(\$[^`]*)`$")
_MEMBER: Final = re.compile(r"^Object (?:missing required field|contains unknown field) `([^`]+)`")


def rejection_from_msgspec(exc: msgspec.ValidationError, prefix: str = "") -> Rejection:
    """Turn msgspec's message (`... - at `$.entries[0].side``) into a VALIDATION_ERROR with `field`.

    For a missing or unknown member the field is the member itself (`$.entries[0].amount_cents`).
    """
    text = str(exc)
    match = _AT_PATH.search(text)
    field = match.group(1) if match else "$"
    message = _AT_PATH.sub("", text)
    member = _MEMBER.match(message)
    if member is not None:
        field = f"{field}.{member.group(1)}"
    if prefix and field.startswith("$"):
        field = prefix + field[1:]
    return validation_error(message, field)
