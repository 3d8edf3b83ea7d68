"""Journals: the wire shape, its validation, and the validated, balanced `Journal`.

A journal has 2..256 lines; each line debits or credits one account in one currency by a
positive integer number of minor units. It must balance per currency. The only ways to
get a `Journal` are `validate_journal()`, which checks all of that, and `validate_wire()`,
its faster twin for a journal decoded as `JournalWire` (same journal, same rejection), so a
`Journal` value is balanced by construction.

Two decode shapes exist for the same JSON. `JournalIn` is the detailed one: msgspec checks
types only and `validate_journal` names the first offending field in a fixed order
(journal_id, reverses, line count, lines in order, ts, balance). `JournalWire` lets msgspec
check, in C while decoding, the line count and the currency code too (amounts are checked by
both); it accepts a strict subset of what `JournalIn` accepts. A batch decodes as
`JournalWire` first and `journal_from_wire` checks the rest without a call per line; only a
journal that fails anything goes through `JournalIn` and `validate_journal`, so errors are
exactly the detailed path's.

FX fields. A line may carry `fx_rate` and `rate_ts` (DECISIONS D2): its journal may balance in
base currency only. Completing it needs the node's rates, so this pure module never accepts
such a journal as is: `journal_from_wire` hands it to the detailed path and `validate_journal`
refuses it; the API completes it (`finance.fx_journal`) and validates the completed journal,
which carries the rates in each foreign line's `meta`.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Final, Literal

import msgspec

from ledger.accounts import KNOWN_ACCOUNT_TYPES, AccountType, account_type_of
from ledger.errors import ErrorCode, Rejection, validation_error
from ledger.invariants import check
from ledger.money import INT64_MAX, CurrencyCode, fits_int64, is_currency
from ledger.timestamps import parse_rfc3339

LINES_MIN: Final = 2
LINES_MAX: Final = 256
JOURNAL_ID_PATTERN: Final = re.compile(r"^[A-Za-z0-9:._-]{1,200}$")
_is_journal_id: Final = JOURNAL_ID_PATTERN.fullmatch

Side = Literal["debit", "credit"]
Amount = Annotated[int, msgspec.Meta(gt=0, le=INT64_MAX)]


class LineIn(msgspec.Struct, forbid_unknown_fields=True):
    """One journal line as a client sends it.

    `fx_rate` (units of the line's currency per 1 base unit, a decimal string) and `rate_ts`
    (RFC 3339) mark a foreign line of a journal that may balance in base currency only
    (DECISIONS D2); `validate_journal` refuses them: a journal carrying them is completed by
    `finance.fx_journal` first, which needs the node's rates.
    """

    account_id: str
    side: Side
    amount_cents: Amount
    currency: str
    meta: dict[str, Any] = {}
    fx_rate: str | None = None
    rate_ts: str | None = None


class JournalIn(msgspec.Struct, forbid_unknown_fields=True):
    """A journal as a client sends it (`POST /ledger/post`, one item of a batch)."""

    entries: list[LineIn]
    journal_id: str | None = None
    context: dict[str, Any] = {}
    ts: str | None = None
    reverses: str | None = None
    memo: str | None = None
    source_ref: str | None = None


# gc=False on the structs below (and on the message structs built from them): they hold decoded
# JSON values and each other, never a reference cycle, and a batch allocates ~10 of them per
# journal; untracked, they do not trigger or lengthen cyclic-collector passes.
class LineWire(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """`LineIn` with the currency checked while decoding (the account id is checked after)."""

    account_id: str
    side: Side
    amount_cents: Amount
    currency: CurrencyCode
    meta: dict[str, Any] = {}
    fx_rate: str | None = None
    rate_ts: str | None = None


class JournalWire(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """`JournalIn` with the line count checked while decoding; see `journal_from_wire`."""

    entries: Annotated[list[LineWire], msgspec.Meta(min_length=LINES_MIN, max_length=LINES_MAX)]
    journal_id: str | None = None
    context: dict[str, Any] = {}
    ts: str | None = None
    reverses: str | None = None
    memo: str | None = None
    source_ref: str | None = None


class Line(msgspec.Struct, frozen=True, array_like=True, gc=False):
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


class Journal(msgspec.Struct, frozen=True, gc=False):
    """A validated journal: 2..256 lines that balance per currency.

    Build with `validate_journal` (or, for a `JournalWire`, `validate_wire` / `journal_from_wire`).
    """

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


def validate_fields(raw: JournalIn) -> tuple[tuple[Line, ...], str | None]:
    """Every check of `validate_journal` but the balance, FX fields left alone: (lines, effective_at).

    VALIDATION_ERROR naming the first offending field (journal_id, reverses, line count, lines in
    order, ts). A journal with FX fields passes this before its D2 completion.
    """
    if raw.journal_id is not None and not JOURNAL_ID_PATTERN.fullmatch(raw.journal_id):
        raise validation_error("journal_id must be 1-200 characters of [A-Za-z0-9:._-]", "$.journal_id")
    if raw.reverses is not None and not JOURNAL_ID_PATTERN.fullmatch(raw.reverses):
        raise validation_error("reverses must be a journal id", "$.reverses")
    if not LINES_MIN <= len(raw.entries) <= LINES_MAX:
        raise validation_error(
            f"a journal has {LINES_MIN} to {LINES_MAX} lines, got {len(raw.entries)}", "$.entries"
        )
    lines = tuple(_validate_line(i, line) for i, line in enumerate(raw.entries))
    return lines, _validate_timestamp(raw.ts, "$.ts")


def has_fx_fields(entries: list[LineIn]) -> bool:
    """True when some line carries `fx_rate` or `rate_ts` (the journal needs D2 completion)."""
    return any(line.fx_rate is not None or line.rate_ts is not None for line in entries)


def _refuse_fx_fields(entries: list[LineIn]) -> None:
    for index, line in enumerate(entries):
        for name, value in (("fx_rate", line.fx_rate), ("rate_ts", line.rate_ts)):
            if value is not None:
                raise validation_error(
                    f"{name} is only taken by POST /ledger/post and /ledger/post_batch, which complete "
                    "the journal with the node's rates",
                    f"$.entries[{index}].{name}",
                )


def validate_journal(raw: JournalIn) -> Journal:
    """Validate a decoded journal; raise `Rejection` (VALIDATION_ERROR before LEDGER_IMBALANCE).

    A line carrying `fx_rate`/`rate_ts` is a VALIDATION_ERROR here: such a journal is completed
    first (`finance.fx_journal`), and the completed journal carries its rates in `meta`.
    """
    lines, effective_at = validate_fields(raw)
    _refuse_fx_fields(raw.entries)
    _check_balance(lines)
    journal = Journal(
        raw.journal_id, lines, raw.context, effective_at, raw.reverses, raw.memo, raw.source_ref
    )
    check(len(journal.lines) >= LINES_MIN, "validated journal has fewer than two lines")
    return journal


def _balanced(entries: list[LineWire]) -> bool:
    """True when every currency nets to zero and the sum of all amounts fits int64 (so each side does).

    False does not mean unbalanced: `validate_journal` then decides, with the exact error.
    """
    total = 0
    net: dict[str, int] = {}
    for entry in entries:
        amount = entry.amount_cents
        total += amount
        net[entry.currency] = net.get(entry.currency, 0) + (amount if entry.side == "debit" else -amount)
    return total <= INT64_MAX and not any(net.values())


def journal_from_wire(wire: JournalWire) -> Journal | None:
    """The validated journal when every rule visibly holds, else None (ask `validate_journal`).

    Decoding as `JournalWire` already checked the line count, amounts and currencies; this
    checks the ids, `ts`, the account ids (a dict lookup for ids seen before) and the balance.
    Whenever it answers a journal, `validate_journal` would answer an equal one. A line with
    `fx_rate` or `rate_ts` always answers None (such a journal needs D2 completion).
    """
    if (  # validate_journal's own checks (as a msgspec pattern, the id check costs 3x as much)
        (wire.journal_id is not None and _is_journal_id(wire.journal_id) is None)
        or (wire.reverses is not None and _is_journal_id(wire.reverses) is None)
        or (wire.ts is not None and parse_rfc3339(wire.ts) is None)
    ):
        return None
    entries = wire.entries
    if len(entries) != 2:
        return _journal_from_lines(wire)
    # The common journal: one debit and one credit of one currency, known accounts. Inline.
    first, second = entries
    first_type = KNOWN_ACCOUNT_TYPES.get(first.account_id)
    second_type = KNOWN_ACCOUNT_TYPES.get(second.account_id)
    if (
        first_type is None
        or second_type is None
        or first.amount_cents != second.amount_cents
        or first.side == second.side
        or first.currency != second.currency
        or not (first.fx_rate is first.rate_ts is second.fx_rate is second.rate_ts is None)
    ):
        return _journal_from_lines(wire)
    lines = (
        Line(0, first.account_id, first_type, first.side, first.amount_cents, first.currency, first.meta),
        Line(
            1, second.account_id, second_type, second.side, second.amount_cents, second.currency, second.meta
        ),
    )
    return Journal(wire.journal_id, lines, wire.context, wire.ts, wire.reverses, wire.memo, wire.source_ref)


def _journal_from_lines(wire: JournalWire) -> Journal | None:
    """`journal_from_wire` for any number of lines (ids and `ts` already checked)."""
    lines: list[Line] = []
    for line_no, entry in enumerate(wire.entries):
        account_type = account_type_of(entry.account_id)
        if account_type is None or entry.fx_rate is not None or entry.rate_ts is not None:
            return None
        lines.append(
            Line(
                line_no,
                entry.account_id,
                account_type,
                entry.side,
                entry.amount_cents,
                entry.currency,
                entry.meta,
            )
        )
    if not _balanced(wire.entries):
        return None
    check(LINES_MIN <= len(lines) <= LINES_MAX, "decoded journal has a line count outside 2..256")
    return Journal(
        wire.journal_id, tuple(lines), wire.context, wire.ts, wire.reverses, wire.memo, wire.source_ref
    )


def journal_in_of(wire: JournalWire) -> JournalIn:
    """The detailed shape of a decoded wire journal (what decoding its JSON as `JournalIn` gives)."""
    return JournalIn(
        [
            LineIn(e.account_id, e.side, e.amount_cents, e.currency, e.meta, e.fx_rate, e.rate_ts)
            for e in wire.entries
        ],
        wire.journal_id,
        wire.context,
        wire.ts,
        wire.reverses,
        wire.memo,
        wire.source_ref,
    )


def validate_wire(wire: JournalWire) -> Journal:
    """`validate_journal` for a journal decoded as `JournalWire`: the same journal or the same Rejection."""
    journal = journal_from_wire(wire)
    return journal if journal is not None else validate_journal(journal_in_of(wire))


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
