"""FX: exchange rates, conversion in minor units, and D2 base-currency balancing (pure, no I/O).

Rates (DECISIONS D2). A `Rate` says how many units of the quote (foreign) currency one unit of the
base (platform) currency buys: `Rate(base="USD", quote="EUR", rate="0.92")` is 0.92 EUR per 1 USD.
The rate is a plain decimal string (no sign, no exponent, at most `RATE_DIGITS_MAX` significant
digits), strictly positive. `as_of` is stored as canonical RFC 3339 (UTC, microseconds, `Z`).
`RateTable.at(quote, when)` answers the latest rate with `as_of <= when`, else `FX_RATE_MISSING`.

Conversion. Amounts are integer minor units; each currency's exponent comes from the ISO 4217
table shipped in `ledger/data/iso4217.txt` (`ledger.money.CURRENCY_MINOR_UNITS`: JPY 0, EUR 2,
KWD 3, ...). Arithmetic is exact (`fractions.Fraction`) and rounded once, half to even:

    to_base(a, C, r)   = round_half_even(a * 10**e(base) / (r * 10**e(C)))
    from_base(b, C, r) = round_half_even(b * r * 10**e(C) / 10**e(base))

D2 completion (`complete_journal`). Input: lines `(account_id, side, amount_cents, currency,
fx_rate?, rate_ts?)`; s(i) is +1 for a debit, -1 for a credit; B is the base currency.

 1. Validate every line in order (VALIDATION_ERROR naming `$.entries[i].<field>`): account id
    grammar, ISO 4217 currency, 1 <= amount <= 2^63-1; a base-currency line carries no
    `fx_rate`/`rate_ts`; `fx_rate` needs `rate_ts`; both parse strictly.
 2. If every currency (base included) already nets to zero, the journal balances per currency:
    no lines are added (rates present are still checked as in step 3).
 3. Otherwise every foreign line needs `rate_ts` (VALIDATION_ERROR). In line order, the node's
    rate R(i) = table.at(currency, rate_ts) (`FX_RATE_MISSING`, 422, naming the line's
    `rate_ts`); a client `fx_rate` whose value differs from R(i) is a VALIDATION_ERROR naming
    `$.entries[i].fx_rate` (value equality: "1.10" equals "1.1"). The node's rate is recorded
    on the line (`meta.fx_rate`, `meta.rate_ts` = the rate's `as_of`).
 4. Each foreign line is converted on its own: b(i) = to_base(amount(i), currency(i), R(i)),
    rounded half to even per line (never the sum).
 5. For each foreign currency C, in code order, with net(C) = sum s(i)*amount(i) and
    base(C) = sum s(i)*b(i) over the lines in C:
      - `equity:fx-position:C` in C, amount |net(C)|, side credit if net(C) > 0 else debit
        (omitted when net(C) = 0), which makes C net to zero;
      - `equity:fx-position:C` in B, amount |base(C)|, side debit if base(C) > 0 else credit
        (omitted when base(C) = 0): the base-currency counterpart (cost) of that position.
 6. The residual r = sum over base-currency lines of s(i)*amount(i) + sum over C of base(C) is
    what B still lacks. If |r| > number of foreign lines (1 base minor unit each) the journal is
    `LEDGER_IMBALANCE`; if r != 0 one line on `expense:fx-rounding` in B, amount |r|, side
    credit if r > 0 else debit. Every currency now nets to zero.

Added lines come in that order (per currency: foreign line, base line; then rounding), so the
result is deterministic. Realised gain/loss on settlement (`settlement_lines`) books the
invoice's receivable at its original rate r1 (base amount B1) and the cash at the payment rate
r2 (B2), adds B2 - B1 on `revenue:fx-gain` (credit) or `expense:fx-loss` (debit), and completes
the result by the same steps, so its residual is zero by construction.
"""

from __future__ import annotations

import bisect
import itertools
import re
from collections.abc import Sequence
from datetime import datetime
from fractions import Fraction
from typing import Any, Final

import msgspec

from finance import chart
from ledger.accounts import account_type_of
from ledger.errors import ErrorCode, Rejection, validation_error
from ledger.invariants import check
from ledger.journal import LineIn, Side
from ledger.money import CURRENCY_MINOR_UNITS, is_currency
from ledger.timestamps import parse_rfc3339, rfc3339

RATE_DIGITS_MAX: Final = 18
"""At most this many significant digits in a rate string."""
RATE_TEXT_LENGTH_MAX: Final = 40
SOURCE_LENGTH_MAX: Final = 100
_RATE_TEXT: Final = re.compile(r"^(0|[1-9][0-9]*)(\.[0-9]+)?$")
_SOURCE_TEXT: Final = re.compile(r"^[\x21-\x7e][\x20-\x7e]*$")

FX_POSITION_PREFIX: Final = "equity:fx-position:"
FX_ROUNDING_ACCOUNT: Final = "expense:fx-rounding"
FX_GAIN_ACCOUNT: Final = chart.fx_gain()  # one chart of accounts (docs/accounting.md)
FX_LOSS_ACCOUNT: Final = chart.fx_loss()


def minor_exponent(currency: str) -> int:
    """Decimal places of the currency's minor unit (JPY 0, EUR 2, KWD 3), from the ISO 4217 table."""
    check(is_currency(currency), f"minor_exponent of an unknown currency {currency!r}")
    return CURRENCY_MINOR_UNITS[currency]


def parse_rate_value(text: str, field: str) -> Fraction:
    """The exact value of a rate string; VALIDATION_ERROR at `field` unless it is a plain positive decimal."""
    if len(text) > RATE_TEXT_LENGTH_MAX or _RATE_TEXT.fullmatch(text) is None:
        raise validation_error(
            "a rate is a plain positive decimal string like 1.0842 (no sign, exponent or spaces)",
            field,
        )
    digits = text.replace(".", "").lstrip("0")
    if not digits:
        raise validation_error("a rate must be greater than zero", field)
    if len(digits) > RATE_DIGITS_MAX:
        raise validation_error(f"a rate has at most {RATE_DIGITS_MAX} significant digits", field)
    return Fraction(text)


class Rate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Units of `quote` (the foreign currency) per 1 unit of `base`, from `source`, valid from `as_of`.

    Build with `parse_rate`, which checks every field; `as_of` is canonical RFC 3339.
    """

    base: str
    quote: str
    rate: str
    source: str
    as_of: str

    @property
    def value(self) -> Fraction:
        """The exact rate."""
        return Fraction(self.rate)

    @property
    def as_of_time(self) -> datetime:
        """`as_of` as an aware datetime."""
        moment = parse_rfc3339(self.as_of)
        check(moment is not None, "a Rate holds an unparsable as_of")
        assert moment is not None  # for mypy; checked above
        return moment


def parse_rate(base: str, quote: str, rate: str, source: str, as_of: str, path: str = "$") -> Rate:
    """A validated `Rate`; VALIDATION_ERROR naming `{path}.base|quote|rate|source|as_of` otherwise."""
    if not is_currency(base):
        raise validation_error(f"unknown currency code {base!r} (ISO 4217)", f"{path}.base")
    if not is_currency(quote):
        raise validation_error(f"unknown currency code {quote!r} (ISO 4217)", f"{path}.quote")
    if quote == base:
        raise validation_error("quote currency must differ from base currency", f"{path}.quote")
    parse_rate_value(rate, f"{path}.rate")
    if len(source) > SOURCE_LENGTH_MAX or _SOURCE_TEXT.fullmatch(source) is None:
        raise validation_error(
            f"source is 1-{SOURCE_LENGTH_MAX} printable ASCII characters, not starting with a space",
            f"{path}.source",
        )
    moment = parse_rfc3339(as_of)
    if moment is None:
        raise validation_error(
            "as_of must be RFC 3339 with an offset, e.g. 2026-11-17T12:00:00Z", f"{path}.as_of"
        )
    return Rate(base, quote, rate, source, rfc3339(moment))


def fx_rate_missing(base: str, quote: str, when: datetime) -> Rejection:
    """FX_RATE_MISSING (422): no rate for base/quote at or before `when`."""
    return Rejection(
        ErrorCode.FX_RATE_MISSING,
        f"no {base}/{quote} rate at or before {rfc3339(when)}",
        {"base": base, "quote": quote, "at": rfc3339(when)},
    )


class RateTable:
    """In-memory rates of one base currency, per quote currency ordered by `as_of`.

    Adding the same rate twice is a no-op; a different rate for the same quote and `as_of` is
    INVALID_STATE (rates are facts, never edited).
    """

    def __init__(self, base: str) -> None:
        check(is_currency(base), f"RateTable of an unknown base currency {base!r}")
        self.base = base
        self._rates: dict[str, list[tuple[datetime, Rate]]] = {}

    def __len__(self) -> int:
        return sum(len(rates) for rates in self._rates.values())

    def add(self, rate: Rate) -> None:
        """Record `rate` (a validated `Rate` of this table's base currency)."""
        if rate.base != self.base:
            raise validation_error(f"this table's base currency is {self.base}", "$.base", base=rate.base)
        moment = rate.as_of_time
        rates = self._rates.setdefault(rate.quote, [])
        index = bisect.bisect_left(rates, moment, key=lambda entry: entry[0])
        if index < len(rates) and rates[index][0] == moment:
            existing = rates[index][1]
            if existing.value != rate.value or existing.source != rate.source:
                raise Rejection(
                    ErrorCode.INVALID_STATE,
                    f"a different {rate.base}/{rate.quote} rate already exists at {rate.as_of}",
                    {"base": rate.base, "quote": rate.quote, "as_of": rate.as_of, "rate": existing.rate},
                )
            return
        rates.insert(index, (moment, rate))
        check(all(a[0] < b[0] for a, b in itertools.pairwise(rates)), "rates out of order")

    def at(self, quote: str, when: datetime) -> Rate:
        """The latest rate for `quote` with `as_of <= when`; FX_RATE_MISSING (422) if there is none."""
        check(when.tzinfo is not None, "RateTable.at needs an aware datetime")
        rates = self._rates.get(quote, [])
        index = bisect.bisect_right(rates, when, key=lambda entry: entry[0])
        if index == 0:
            raise fx_rate_missing(self.base, quote, when)
        return rates[index - 1][1]


def _round_half_even(value: Fraction) -> int:
    return round(value)  # Fraction.__round__ without digits rounds half to even, exactly


def to_base(amount_minor: int, currency: str, rate: Rate) -> int:
    """`amount_minor` of `currency` (the rate's quote) in base minor units, rounded half to even."""
    check(currency == rate.quote, f"to_base of {currency} with a {rate.base}/{rate.quote} rate")
    exact = Fraction(amount_minor * 10 ** minor_exponent(rate.base)) / (
        rate.value * 10 ** minor_exponent(currency)
    )
    return _round_half_even(exact)


def from_base(base_amount_minor: int, currency: str, rate: Rate) -> int:
    """`base_amount_minor` of the rate's base in `currency` (its quote) minor units, half to even."""
    check(currency == rate.quote, f"from_base to {currency} with a {rate.base}/{rate.quote} rate")
    exact = (
        Fraction(base_amount_minor * 10 ** minor_exponent(currency))
        * rate.value
        / 10 ** minor_exponent(rate.base)
    )
    return _round_half_even(exact)


class FxLine(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One journal line with its optional FX fields (`fx_rate`, `rate_ts`) for a foreign currency."""

    account_id: str
    side: Side
    amount_cents: int
    currency: str
    fx_rate: str | None = None
    rate_ts: str | None = None

    @property
    def signed(self) -> int:
        """+amount for a debit, -amount for a credit."""
        return self.amount_cents if self.side == "debit" else -self.amount_cents

    def line_in(self) -> LineIn:
        """The journal line (`ledger.journal.LineIn`), FX fields recorded in `meta`."""
        meta: dict[str, Any] = {}
        if self.fx_rate is not None:
            meta["fx_rate"] = self.fx_rate
        if self.rate_ts is not None:
            meta["rate_ts"] = self.rate_ts
        return LineIn(self.account_id, self.side, self.amount_cents, self.currency, meta)


def recorded_rate_meta(line: FxLine, base: str) -> dict[str, Any]:
    """What a foreign line of a completed journal records in `meta` about its conversion.

    `fx_rate` (the node's rate), `rate_ts` (that rate's `as_of`), `base_currency` and
    `base_amount_cents` (the line's amount in base, `to_base`, half to even); empty for a
    base-currency line or a line without a node rate (see `Completion.lines`).
    """
    if line.currency == base or line.fx_rate is None or line.rate_ts is None:
        return {}
    rate = Rate(base, line.currency, line.fx_rate, "node", line.rate_ts)
    return {
        "fx_rate": line.fx_rate,
        "rate_ts": line.rate_ts,
        "base_currency": base,
        "base_amount_cents": to_base(line.amount_cents, line.currency, rate),
    }


class Completion(msgspec.Struct, frozen=True):
    """The result of D2 completion.

    `lines`: the input lines with the node's rate recorded on each foreign line that has one;
    `added`: the fx-position and fx-rounding lines; `residual_minor`: what went to fx-rounding
    (signed, debits minus credits in base before rounding; 0 when nothing was added).
    """

    lines: tuple[FxLine, ...]
    added: tuple[FxLine, ...]
    residual_minor: int
    base: str = ""

    def journal_lines(self) -> list[LineIn]:
        """Every line of the completed journal, input lines first; each foreign line with a rate
        records its conversion in `meta` (`recorded_rate_meta`: rate, its time, base amount)."""
        out: list[LineIn] = []
        for line in (*self.lines, *self.added):
            entry = line.line_in()
            if self.base:
                entry.meta = {**entry.meta, **recorded_rate_meta(line, self.base)}
            out.append(entry)
        return out


def _signed_line(account_id: str, currency: str, signed: int) -> FxLine:
    side: Side = "debit" if signed > 0 else "credit"
    return FxLine(account_id, side, abs(signed), currency)


def _check_line(index: int, line: FxLine, base: str) -> None:
    path = f"$.entries[{index}]"
    if account_type_of(line.account_id) is None:
        raise validation_error("account_id must be `type:rest` (asset|liability|...)", f"{path}.account_id")
    if not 1 <= line.amount_cents <= 2**63 - 1:
        raise validation_error("amount_cents is an integer in 1..2^63-1", f"{path}.amount_cents")
    if not is_currency(line.currency):
        raise validation_error(f"unknown currency code {line.currency!r} (ISO 4217)", f"{path}.currency")
    if line.currency == base:
        for name, value in (("fx_rate", line.fx_rate), ("rate_ts", line.rate_ts)):
            if value is not None:
                raise validation_error(f"a base-currency ({base}) line takes no {name}", f"{path}.{name}")
        return
    if line.fx_rate is not None:
        parse_rate_value(line.fx_rate, f"{path}.fx_rate")
        if line.rate_ts is None:
            raise validation_error("fx_rate needs rate_ts (the time the rate applies)", f"{path}.rate_ts")
    if line.rate_ts is not None and parse_rfc3339(line.rate_ts) is None:
        raise validation_error("rate_ts must be RFC 3339 with an offset", f"{path}.rate_ts")


def _node_rate(index: int, line: FxLine, table: RateTable) -> Rate:
    path = f"$.entries[{index}]"
    check(line.rate_ts is not None, "node rate looked up without rate_ts")
    moment = parse_rfc3339(line.rate_ts or "")
    check(moment is not None, "rate_ts not checked before lookup")
    assert moment is not None  # for mypy; checked above
    try:
        rate = table.at(line.currency, moment)
    except Rejection as exc:
        exc.details["field"] = f"{path}.rate_ts"
        raise
    if line.fx_rate is not None and Fraction(line.fx_rate) != rate.value:
        raise validation_error(
            f"fx_rate {line.fx_rate} differs from the node's {rate.base}/{rate.quote} rate {rate.rate} "
            f"(as of {rate.as_of})",
            f"{path}.fx_rate",
            node_rate=rate.rate,
            rate_as_of=rate.as_of,
        )
    return rate


def complete_journal(lines: Sequence[FxLine], table: RateTable) -> Completion:
    """D2: the lines that make a journal balanced in `table.base` balance per currency (see module doc)."""
    base = table.base
    for index, line in enumerate(lines):
        _check_line(index, line, base)
    needs_completion = any(_net_by_currency(lines).values())
    rates: list[Rate | None] = []
    for index, line in enumerate(lines):
        if line.currency == base or (line.rate_ts is None and not needs_completion):
            rates.append(None)
        elif line.rate_ts is None:
            raise validation_error(
                "a foreign line needs rate_ts when the journal balances only in base currency",
                f"$.entries[{index}].rate_ts",
            )
        else:
            rates.append(_node_rate(index, line, table))
    if not needs_completion:
        return Completion(_with_rates(lines, rates), (), 0, base)
    return complete_with_rates(lines, rates, base)


def _with_rates(lines: Sequence[FxLine], rates: Sequence[Rate | None]) -> tuple[FxLine, ...]:
    return tuple(
        line if rate is None else msgspec.structs.replace(line, fx_rate=rate.rate, rate_ts=rate.as_of)
        for line, rate in zip(lines, rates, strict=True)
    )


def complete_with_rates(lines: Sequence[FxLine], rates: Sequence[Rate | None], base: str) -> Completion:
    """Steps 4-6 of the module doc for lines whose node rates are known (None for base lines)."""
    check(len(lines) == len(rates), "one rate (or None) per line")
    position: dict[str, list[int]] = {}  # currency -> [net in currency, net in base]
    base_net = 0
    for line, rate in zip(lines, rates, strict=True):
        if line.currency == base:
            base_net += line.signed
            continue
        check(rate is not None and rate.base == base, "a foreign line without a rate of the base currency")
        assert rate is not None  # for mypy; checked above
        pair = position.setdefault(line.currency, [0, 0])
        pair[0] += line.signed
        pair[1] += to_base(line.signed, line.currency, rate)
    added: list[FxLine] = []
    for currency, (foreign_net, base_amount) in sorted(position.items()):
        account = FX_POSITION_PREFIX + currency
        if foreign_net:
            added.append(_signed_line(account, currency, -foreign_net))
        if base_amount:
            added.append(_signed_line(account, base, base_amount))
        base_net += base_amount
    tolerance = sum(1 for line in lines if line.currency != base)
    if abs(base_net) > tolerance:
        raise Rejection(
            ErrorCode.LEDGER_IMBALANCE,
            f"the journal is off by {base_net} {base} minor units after conversion "
            f"(at most {tolerance}, 1 per foreign line, may go to {FX_ROUNDING_ACCOUNT})",
            {"currency": base, "residual_minor": base_net, "tolerance_minor": tolerance},
        )
    if base_net:
        added.append(_signed_line(FX_ROUNDING_ACCOUNT, base, -base_net))
    completed = _with_rates(lines, rates)
    check(not any(_net_by_currency((*completed, *added)).values()), "completed journal does not balance")
    return Completion(completed, tuple(added), base_net, base)


def _net_by_currency(lines: Sequence[FxLine]) -> dict[str, int]:
    net: dict[str, int] = {}
    for line in lines:
        net[line.currency] = net.get(line.currency, 0) + line.signed
    return net


def realised_fx_lines(invoice_base_minor: int, paid_base_minor: int, base: str) -> tuple[FxLine, ...]:
    """The realised gain (credit `revenue:fx-gain`) or loss (debit `expense:fx-loss`) of a settlement.

    `invoice_base_minor` (B1) is the receivable in base at the invoice's rate, `paid_base_minor`
    (B2) the payment in base at the payment's rate; the line is B2 - B1 in base (none when equal).
    """
    difference = paid_base_minor - invoice_base_minor
    if difference > 0:
        return (FxLine(FX_GAIN_ACCOUNT, "credit", difference, base),)
    if difference < 0:
        return (FxLine(FX_LOSS_ACCOUNT, "debit", -difference, base),)
    return ()


def _rate_for(currency: str, rate: Rate | None, base: str, field: str) -> Rate | None:
    if currency == base:
        if rate is not None:
            raise validation_error(f"a {base} (base currency) amount takes no rate", field)
        return None
    if rate is None or rate.base != base or rate.quote != currency:
        raise validation_error(f"a {currency} amount needs a {base}/{currency} rate", field)
    return rate


def settlement_lines(
    *,
    base: str,
    receivable_account: str,
    invoice_amount_minor: int,
    invoice_currency: str,
    invoice_rate: Rate | None,
    cash_account: str,
    paid_amount_minor: int,
    paid_currency: str,
    paid_rate: Rate | None,
) -> Completion:
    """The balanced journal lines settling `invoice_amount_minor` of an invoice with a payment.

    Debit `cash_account` with the payment in its currency (at `paid_rate`, r2: B2), credit
    `receivable_account` with the invoice amount in its currency (at the invoice's own
    `invoice_rate`, r1: B1), book B2 - B1 as realised gain/loss, then complete per D2 (fx-position
    lines per foreign currency) so the journal balances per currency. Rates are None for amounts
    in base. Paid in the invoice's own currency, the amounts must be equal.
    """
    check(is_currency(base), f"settlement in an unknown base currency {base!r}")
    r1 = _rate_for(invoice_currency, invoice_rate, base, "$.invoice_rate")
    r2 = _rate_for(paid_currency, paid_rate, base, "$.paid_rate")
    if paid_currency == invoice_currency and paid_amount_minor != invoice_amount_minor:
        raise validation_error(
            "paid in the invoice's currency, the paid amount must equal the settled amount",
            "$.paid_amount",
        )
    b1 = invoice_amount_minor if r1 is None else to_base(invoice_amount_minor, invoice_currency, r1)
    b2 = paid_amount_minor if r2 is None else to_base(paid_amount_minor, paid_currency, r2)
    cash = FxLine(cash_account, "debit", paid_amount_minor, paid_currency)
    receivable = FxLine(receivable_account, "credit", invoice_amount_minor, invoice_currency)
    for index, line in enumerate((cash, receivable)):
        _check_line(index, line, base)
    gain_or_loss = realised_fx_lines(b1, b2, base)
    completion = complete_with_rates(
        (cash, receivable, *gain_or_loss), (r2, r1, *(None for _ in gain_or_loss)), base
    )
    check(completion.residual_minor == 0, "a settlement has no rounding residual")
    return completion
