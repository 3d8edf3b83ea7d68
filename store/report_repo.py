"""The ledger figures behind the finance reports (`finance/reports.py`), as of an instant.

Posted amounts only (pending holds are not balances yet). Two sources, giving the same figures:
- now: the `balances` table (one row per account and currency), filtered by account id prefix;
- a past instant (`as_of`, the commit time `posted_at`, DECISIONS D3): the `journal_lines` of
  the accounts with that prefix, found through the per-account index `(hashtext(account_id),
  posted_at)` (migration 0011) for the account ids the `accounts` table lists under the prefix.
Per-period and per-invoice figures always come from `journal_lines` (up to `as_of`, which the
caller sets to the current time for a report "now").
"""

from __future__ import annotations

from datetime import datetime
from typing import Final

import asyncpg


def like_patterns(prefixes: tuple[str, ...]) -> list[str]:
    """`LIKE` patterns matching ids that start with each prefix (`\\`, `%`, `_` escaped)."""
    escaped = (p.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") for p in prefixes)
    return [f"{p}%" for p in escaped]


async def account_ids(conn: asyncpg.Connection, prefixes: tuple[str, ...]) -> list[str]:
    """Ids of the accounts whose id starts with one of `prefixes`."""
    rows = await conn.fetch(
        "SELECT account_id FROM accounts WHERE account_id LIKE ANY($1::text[]) ORDER BY account_id",
        like_patterns(prefixes),
    )
    return [r[0] for r in rows]


async def balances_now(conn: asyncpg.Connection, prefixes: tuple[str, ...]) -> list[asyncpg.Record]:
    """(account_id, currency, debits, credits) posted, per account under `prefixes` and currency."""
    return await conn.fetch(
        "SELECT account_id, currency, debits_posted AS debits, credits_posted AS credits FROM balances"
        " WHERE account_id LIKE ANY($1::text[]) ORDER BY account_id, currency",
        like_patterns(prefixes),
    )


_WHERE: Final = (
    "WHERE hashtext(l.account_id) = ANY(ARRAY(SELECT hashtext(a) FROM unnest($1::text[]) a))"
    " AND l.account_id = ANY($1::text[]) AND l.posted_at <= $2"
)
_LINES_OF: Final = f"FROM journal_lines l {_WHERE}"
_SUMS: Final = (
    "COALESCE(sum(l.amount) FILTER (WHERE l.side = 'D'), 0)::bigint AS debits,"
    " COALESCE(sum(l.amount) FILTER (WHERE l.side = 'C'), 0)::bigint AS credits"
)


async def balances_as_of(
    conn: asyncpg.Connection, prefixes: tuple[str, ...], as_of: datetime
) -> list[asyncpg.Record]:
    """(account_id, currency, debits, credits) of lines posted at or before `as_of`."""
    ids = await account_ids(conn, prefixes)
    if not ids:
        return []
    return await conn.fetch(
        f"SELECT l.account_id, l.currency, {_SUMS} {_LINES_OF} GROUP BY 1, 2 ORDER BY 1, 2", ids, as_of
    )


async def sums_by_period(
    conn: asyncpg.Connection, prefixes: tuple[str, ...], as_of: datetime, period: str
) -> list[asyncpg.Record]:
    """(period, account_id, currency, debits, credits) per UTC `day` or `month` of `posted_at`
    (`period` as `YYYY-MM-DD` or `YYYY-MM`), lines posted at or before `as_of`."""
    ids = await account_ids(conn, prefixes)
    if not ids:
        return []
    shape = {"day": "YYYY-MM-DD", "month": "YYYY-MM"}[period]
    return await conn.fetch(
        f"SELECT to_char(l.posted_at AT TIME ZONE 'UTC', '{shape}') AS period, l.account_id, l.currency,"
        f" {_SUMS} {_LINES_OF} GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
        ids,
        as_of,
    )


async def sums_by_source(
    conn: asyncpg.Connection, prefixes: tuple[str, ...], as_of: datetime
) -> list[asyncpg.Record]:
    """(account_id, currency, source_ref, debits, credits) per journal `source_ref` (the invoice id
    of finance journals, read from the stored journal body), lines posted at or before `as_of`."""
    ids = await account_ids(conn, prefixes)
    if not ids:
        return []
    return await conn.fetch(
        "SELECT l.account_id, l.currency,"
        " convert_from(j.body, 'UTF8')::jsonb ->> 'source_ref' AS source_ref,"
        f" {_SUMS} FROM journal_lines l JOIN journals j ON j.journal_id = l.journal_id {_WHERE}"
        " GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
        ids,
        as_of,
    )


async def invoice_facts(conn: asyncpg.Connection, invoice_ids: list[str]) -> list[asyncpg.Record]:
    """(invoice_id, buyer_id, currency, total, issued_at, due_date) of the given invoices."""
    return await conn.fetch(
        "SELECT invoice_id, buyer ->> 'buyer_id' AS buyer_id, currency, total, issued_at, due_date"
        " FROM invoices WHERE invoice_id = ANY($1::text[])",
        invoice_ids,
    )
