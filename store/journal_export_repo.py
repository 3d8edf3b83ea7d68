"""The posted journal lines of a window, for accounting exports (finance/accounting_export.py).

Rows only. A journal belongs to the window of its `posted_at` (D3, `[start, end)`); its lines carry
the same commit time (cross-shard parts included), so the lines are selected by that time too and
joined to their journal for its memo and source reference (read from the stored canonical body).
A cross-shard journal whose two-phase commit is not `done` yet is left out (its parts may be
missing), as the journal stream does. journal_lines has no index on journal_id or posted_at
(migration 0004 keeps writes lean), so one export is one pass over the lines: exports are rare
and bounded by `LINES_MAX`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Final

import asyncpg

LINES_MAX: Final = 200_000
"""The most lines one export reads (the caller asks for a narrower window beyond it)."""

_LINES: Final = """
SELECT l.journal_id, j.posted_at, l.line_no, l.account_id, l.currency::text AS currency,
       l.side::text AS side, l.amount,
       convert_from(j.body, 'UTF8')::jsonb ->> 'memo' AS memo,
       convert_from(j.body, 'UTF8')::jsonb ->> 'source_ref' AS source_ref
  FROM journal_lines l
  JOIN journals j ON j.journal_id = l.journal_id
 WHERE l.posted_at >= $1 AND l.posted_at < $2
   AND j.posted_at >= $1 AND j.posted_at < $2
   AND ($3::text IS NULL OR l.currency = $3)
   AND NOT EXISTS (SELECT 1 FROM xtx x WHERE x.txid = j.journal_id AND x.state <> 'done')
 ORDER BY j.posted_at, l.journal_id, l.line_no
 LIMIT $4
"""


async def journal_lines(
    conn: asyncpg.Connection, start: datetime, end: datetime, currency: str | None, limit: int = LINES_MAX
) -> list[asyncpg.Record]:
    """Up to `limit` lines posted in `[start, end)` (of `currency`, or all), in journal order:
    (journal_id, posted_at, line_no, account_id, currency, side, amount, memo, source_ref)."""
    return await conn.fetch(_LINES, start, end, currency, limit)
