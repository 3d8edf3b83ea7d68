"""Exchange rates in PostgreSQL (`fx_rates`, migration 0008).

Rows come back as `RateRow` (plain values; `finance.fx.Rate` is built from them by finance, since
`store` does not import `finance`). `as_of` is canonical RFC 3339 (UTC, microseconds, `Z`).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any, NamedTuple

import asyncpg

from ledger.timestamps import rfc3339


class RateRow(NamedTuple):
    """One stored rate: units of `quote` per 1 `base` from `as_of` on."""

    base: str
    quote: str
    rate: str
    source: str
    as_of: str


def _rate_of(row: Any) -> RateRow:
    return RateRow(row["base"], row["quote"], row["rate"], row["source"], rfc3339(row["as_of"]))


async def insert_rate(conn: asyncpg.Connection, rate: RateRow, as_of: datetime) -> tuple[RateRow, bool]:
    """Store `rate` (valid from `as_of`, its parsed time) unless its (base, quote, as_of) exists;
    (the stored rate, inserted)."""
    row = await conn.fetchrow(
        """
        INSERT INTO fx_rates (base, quote, rate, source, as_of) VALUES ($1, $2, $3, $4, $5)
        ON CONFLICT (base, quote, as_of) DO NOTHING
        RETURNING base, quote, rate, source, as_of
        """,
        rate.base,
        rate.quote,
        rate.rate,
        rate.source,
        as_of,
    )
    if row is not None:
        return _rate_of(row), True
    existing = await conn.fetchrow(
        "SELECT base, quote, rate, source, as_of FROM fx_rates WHERE base = $1 AND quote = $2 AND as_of = $3",
        rate.base,
        rate.quote,
        as_of,
    )
    assert existing is not None  # the conflicting row; rates are never deleted
    return _rate_of(existing), False


async def rate_at(conn: asyncpg.Connection, base: str, quote: str, when: datetime) -> RateRow | None:
    """The rate in force at `when`: the latest with `as_of <= when`, or None."""
    row = await conn.fetchrow(
        """
        SELECT base, quote, rate, source, as_of FROM fx_rates
        WHERE base = $1 AND quote = $2 AND as_of <= $3
        ORDER BY as_of DESC LIMIT 1
        """,
        base,
        quote,
        when,
    )
    return None if row is None else _rate_of(row)


async def quotes(conn: asyncpg.Connection, base: str) -> list[str]:
    """Every quote currency with at least one rate against `base`, in code order."""
    rows = await conn.fetch("SELECT DISTINCT quote FROM fx_rates WHERE base = $1 ORDER BY quote", base)
    return [str(row["quote"]) for row in rows]


async def record_applied(conn: asyncpg.Connection, payment_id: str, amount: int, currency: str) -> None:
    """Record what a cross-currency payment settled in its invoice's currency (same transaction)."""
    await conn.execute(
        "UPDATE payments SET applied_amount = $2, applied_currency = $3 WHERE payment_id = $1",
        payment_id,
        amount,
        currency,
    )


async def rates_in_force(
    conn: asyncpg.Connection, base: str, wanted: Iterable[tuple[str, datetime]]
) -> list[RateRow]:
    """For each (quote, time) of `wanted`, the rate in force then (if any), in one query; no duplicates."""
    pairs = sorted(set(wanted))
    if not pairs:
        return []
    rows = await conn.fetch(
        """
        SELECT DISTINCT r.base, r.quote, r.rate, r.source, r.as_of
        FROM unnest($2::text[], $3::timestamptz[]) AS w(quote, at)
        CROSS JOIN LATERAL (
            SELECT base, quote, rate, source, as_of FROM fx_rates
            WHERE base = $1 AND quote = w.quote AND as_of <= w.at
            ORDER BY as_of DESC LIMIT 1
        ) AS r
        ORDER BY r.quote, r.as_of
        """,
        base,
        [quote for quote, _ in pairs],
        [at for _, at in pairs],
    )
    return [_rate_of(row) for row in rows]
