"""D2 completion of a client's journal posted with FX fields (`POST /ledger/post`, `/ledger/post_batch`).

Pure (no I/O): the caller loads the node's rates. A journal some of whose lines carry `fx_rate`
or `rate_ts` may balance in base currency only (REQUIREMENTS L1, DECISIONS D2):

 1. `validate_fields`: ids, line count, each line's account and currency, `ts`
    (VALIDATION_ERROR first, before any rate is looked at).
 2. `rate_wants` lists the (currency, time) pairs whose rates in force the caller loads, in one
    query for a whole request (a batch included), into a `RateTable`.
 3. `finance.fx.complete_journal` (its module doc has the exact steps): VALIDATION_ERROR naming
    `$.entries[i].fx_rate` for a client rate other than the node's (or for FX fields on a
    base-currency line), FX_RATE_MISSING (422) naming `$.entries[i].rate_ts`, LEDGER_IMBALANCE
    for a residual beyond 1 minor unit per foreign line.
 4. The completed journal: the input lines in order, each foreign line with a rate recording
    `fx_rate` (the node's), `rate_ts` (that rate's `as_of`), `base_currency` and
    `base_amount_cents` in its `meta` (these keys win over the client's own), then the
    `equity:fx-position:{CCY}` lines and the `expense:fx-rounding` line. `validate_journal`
    checks it like any journal (at most 256 lines, per-side totals within int64).

Idempotency compares the client's payload (`request_digest`), not the completed journal: an
exact replay answers the original result whatever rates were added since.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Final

import msgspec

from finance import fx
from ledger.errors import validation_error
from ledger.journal import (
    LINES_MAX,
    Journal,
    JournalIn,
    LineIn,
    validate_fields,
    validate_journal,
)
from ledger.money import is_currency
from ledger.timestamps import parse_rfc3339
from signer.canonical import canonical, digest

_DIGEST_DOMAIN: Final = b"ledger-node fx journal request\n"


def rate_wants(raw: JournalIn, base: str) -> set[tuple[str, datetime]]:
    """(currency, time) of each foreign line with a well-formed `rate_ts`: the rates it may need."""
    wants: set[tuple[str, datetime]] = set()
    for line in raw.entries:
        if line.rate_ts is None or line.currency == base or not is_currency(line.currency):
            continue
        moment = parse_rfc3339(line.rate_ts)
        if moment is not None:
            wants.add((line.currency, moment))
    return wants


def rate_table(base: str, rates: Iterable[fx.Rate]) -> fx.RateTable:
    """A `RateTable` of `base` holding `rates`."""
    table = fx.RateTable(base)
    for rate in rates:
        table.add(rate)
    return table


def complete_client_journal(raw: JournalIn, table: fx.RateTable) -> Journal:
    """The validated, completed journal of `raw` (module doc steps 1, 3, 4); `Rejection` otherwise."""
    validate_fields(raw)
    completion = fx.complete_journal(
        [
            fx.FxLine(e.account_id, e.side, e.amount_cents, e.currency, e.fx_rate, e.rate_ts)
            for e in raw.entries
        ],
        table,
    )
    entries = [
        LineIn(
            line.account_id,
            line.side,
            line.amount_cents,
            line.currency,
            {**line.meta, **recorded} if (recorded := fx.recorded_rate_meta(done, table.base)) else line.meta,
        )
        for line, done in zip(raw.entries, completion.lines, strict=True)
    ]
    entries += [LineIn(a.account_id, a.side, a.amount_cents, a.currency, {}) for a in completion.added]
    if len(entries) > LINES_MAX:
        raise validation_error(
            f"completed with {len(completion.added)} fx lines the journal has {len(entries)} lines, "
            f"more than {LINES_MAX}",
            "$.entries",
        )
    return validate_journal(msgspec.structs.replace(raw, entries=entries))


def request_digest(raw: JournalIn) -> bytes:
    """The idempotency hash of an FX journal request: SHA-256 of its canonical decoded payload."""
    return digest(_DIGEST_DOMAIN + canonical(raw))
