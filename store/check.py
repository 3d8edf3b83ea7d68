"""The integrity check behind `ledger-node check`.

Recomputes every balance from the stored journal lines and compares it with the stored
balances; checks that every journal balances per currency (cross-shard ones across all
their parts), that every journal has lines, that no line is stored twice, and that each
shard's chain links hash to hash, and that the pending columns of balances equal the sum
of the open holds' lines (a hold past its expiry stays pending until its shard voids it).
Returns the list of problems; empty means the ledger is
coherent.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg


@dataclass(frozen=True, slots=True)
class Problem:
    """One inconsistency found by the check."""

    kind: str
    subject: str
    detail: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.subject}: {self.detail}"


_BALANCE_DIFF = """
WITH recomputed AS (
    SELECT account_id, currency,
           COALESCE(sum(amount) FILTER (WHERE side = 'D'), 0)::bigint AS debits,
           COALESCE(sum(amount) FILTER (WHERE side = 'C'), 0)::bigint AS credits
      FROM journal_lines GROUP BY account_id, currency
)
SELECT COALESCE(r.account_id, b.account_id) AS account_id, COALESCE(r.currency, b.currency) AS currency,
       COALESCE(r.debits, 0) AS line_debits, COALESCE(r.credits, 0) AS line_credits,
       COALESCE(b.debits_posted, 0) AS stored_debits, COALESCE(b.credits_posted, 0) AS stored_credits
  FROM recomputed r FULL JOIN balances b ON b.account_id = r.account_id AND b.currency = r.currency
 WHERE COALESCE(r.debits, 0) <> COALESCE(b.debits_posted, 0)
    OR COALESCE(r.credits, 0) <> COALESCE(b.credits_posted, 0)
 ORDER BY 1, 2
"""

_UNBALANCED = """
SELECT journal_id, currency, sum(CASE side WHEN 'D' THEN amount ELSE -amount END) AS net
  FROM journal_lines GROUP BY journal_id, currency
HAVING sum(CASE side WHEN 'D' THEN amount ELSE -amount END) <> 0
 ORDER BY 1, 2
"""

_WITHOUT_LINES = """
SELECT j.journal_id FROM journals j
 WHERE NOT EXISTS (SELECT 1 FROM journal_lines l WHERE l.journal_id = j.journal_id)
   AND NOT EXISTS (SELECT 1 FROM xtx x WHERE x.txid = j.journal_id)  -- parts still being applied
 ORDER BY 1
"""

_ORPHAN_LINES = """
SELECT DISTINCT l.journal_id FROM journal_lines l
 WHERE NOT EXISTS (SELECT 1 FROM journals j WHERE j.journal_id = l.journal_id) ORDER BY 1
"""

# journal_lines has no unique key on (journal_id, line_no) (migration 0004): the writer stores each
# journal's lines once, in the transaction that claims its journals / shard_links row. One scan.
_DUPLICATE_LINES = """
SELECT journal_id, line_no, count(*) AS copies FROM journal_lines
 GROUP BY journal_id, line_no HAVING count(*) > 1
 ORDER BY 1, 2
"""

_CHAIN = """
SELECT shard, seq, hash, prev_hash, journal_id FROM (
    SELECT stream_id AS shard, stream_seq AS seq, hash, prev_hash, journal_id
      FROM journals WHERE stream_id >= 0
    UNION ALL
    SELECT shard_id, seq, hash, prev_hash, journal_id FROM shard_links
) chain ORDER BY shard, seq
"""

_SUM_ZERO = """
SELECT currency, sum(debits_posted) - sum(credits_posted) AS net FROM balances
 GROUP BY currency HAVING sum(debits_posted) <> sum(credits_posted)
"""

_SUM_ZERO_SETTLED = """
SELECT currency, sum(CASE side WHEN 'D' THEN amount ELSE -amount END) AS net FROM journal_lines
 WHERE journal_id <> ALL($1::text[])
 GROUP BY currency HAVING sum(CASE side WHEN 'D' THEN amount ELSE -amount END) <> 0
"""

_PENDING_DIFF = """
WITH held AS (
    SELECT l.account_id, l.currency,
           COALESCE(sum(l.amount) FILTER (WHERE l.side = 'D'), 0)::bigint AS debits,
           COALESCE(sum(l.amount) FILTER (WHERE l.side = 'C'), 0)::bigint AS credits
      FROM hold_lines l JOIN holds h ON h.hold_id = l.hold_id
     WHERE h.state = 'pending'
     GROUP BY l.account_id, l.currency
)
SELECT COALESCE(h.account_id, b.account_id) AS account_id, COALESCE(h.currency, b.currency) AS currency,
       COALESCE(h.debits, 0) AS held_debits, COALESCE(h.credits, 0) AS held_credits,
       COALESCE(b.debits_pending, 0) AS stored_debits, COALESCE(b.credits_pending, 0) AS stored_credits
  FROM held h FULL JOIN balances b ON b.account_id = h.account_id AND b.currency = h.currency
 WHERE COALESCE(h.debits, 0) <> COALESCE(b.debits_pending, 0)
    OR COALESCE(h.credits, 0) <> COALESCE(b.credits_pending, 0)
 ORDER BY 1, 2
"""


async def run_check(conn: asyncpg.Connection, *, include_open: bool = False) -> list[Problem]:
    """Every inconsistency in the stored ledger. Open cross-shard transactions are skipped unless asked."""
    problems: list[Problem] = []
    open_tx = {r[0] for r in await conn.fetch("SELECT txid FROM xtx WHERE state IN ('preparing', 'commit')")}
    for r in await conn.fetch(_BALANCE_DIFF):
        problems.append(
            Problem(
                "balance_mismatch",
                f"{r['account_id']} {r['currency']}",
                f"lines debits/credits {r['line_debits']}/{r['line_credits']} vs stored "
                f"{r['stored_debits']}/{r['stored_credits']}",
            )
        )
    holds = await conn.fetchval("SELECT to_regclass('holds') IS NOT NULL")  # before migration 0014: none
    for r in await conn.fetch(_PENDING_DIFF) if holds else []:
        problems.append(
            Problem(
                "pending_mismatch",
                f"{r['account_id']} {r['currency']}",
                f"open holds debits/credits {r['held_debits']}/{r['held_credits']} vs stored pending "
                f"{r['stored_debits']}/{r['stored_credits']}",
            )
        )
    for r in await conn.fetch(_UNBALANCED):
        if include_open or r["journal_id"] not in open_tx:
            problems.append(Problem("unbalanced_journal", r["journal_id"], f"{r['currency']} net {r['net']}"))
    for r in await conn.fetch(_WITHOUT_LINES):
        problems.append(Problem("journal_without_lines", r["journal_id"], "no lines stored"))
    for r in await conn.fetch(_ORPHAN_LINES):
        problems.append(Problem("orphan_lines", r["journal_id"], "lines without a journal"))
    for r in await conn.fetch(_DUPLICATE_LINES):
        problems.append(
            Problem("duplicate_line", r["journal_id"], f"line {r['line_no']} stored {r['copies']} times")
        )
    # With cross-shard journals in flight (a live database, or a backup taken under traffic) some
    # parts' lines are applied and others not yet: the zero sum then holds over the other lines.
    sum_zero = (_SUM_ZERO, ()) if include_open or not open_tx else (_SUM_ZERO_SETTLED, (list(open_tx),))
    for r in await conn.fetch(sum_zero[0], *sum_zero[1]):
        problems.append(Problem("currency_not_zero_sum", r["currency"], f"debits - credits = {r['net']}"))
    problems.extend(await _check_chains(conn))
    return problems


async def _check_chains(conn: asyncpg.Connection) -> list[Problem]:
    problems: list[Problem] = []
    previous: dict[int, tuple[int, bytes]] = {}
    async with conn.transaction():
        async for r in conn.cursor(_CHAIN, prefetch=5000):
            shard = r["shard"]
            last = previous.get(shard)
            expected_prev = None if last is None else last[1]
            if last is not None and r["seq"] != last[0] + 1:
                problems.append(Problem("chain_gap", f"shard {shard}", f"seq {last[0]} -> {r['seq']}"))
            prev = None if r["prev_hash"] is None else bytes(r["prev_hash"])
            if prev != expected_prev:
                problems.append(Problem("chain_break", r["journal_id"], f"shard {shard} seq {r['seq']}"))
            previous[shard] = (r["seq"], bytes(r["hash"]))
    return problems
