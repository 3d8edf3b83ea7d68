"""Replay after a restore: verify the restored ledger against its signed checkpoint, rebuild derived state.

Run by `ledger-node restore` on the database it has just loaded (`store.backup`), in this order:

1. **Journals -> lines.** Every journal's stored lines must be exactly the entries of its hashed
   body (line i = entry i: account, currency, side, amount), so the lines that balances are
   derived from are the ones the chain signs. A mismatch names the journal.
2. **The integrity check** of `ledger-node check` (`store.integrity.integrity_problems`): balances
   and pending amounts recomputed from lines and open holds, every journal balanced, every hash
   recomputed from its body, every chain link, every batch root and signature, the latest
   checkpoint's root over the log, and the audit chain.
3. **The checkpoint.** The restored latest checkpoint must be the one the archive carries; its
   signature must verify with the archive's public key for its kid; every key's kid must be the
   kid of its PEM; the restored `signer_keys` must be the archive's. With trusted keys given by the
   operator (`--public-key`, from outside the backup), every key that signed a batch or checkpoint
   must be one of them, so a backup re-signed wholesale with another key is refused.
4. **Rebuild** (only once 1-3 passed): balances' posted columns from the lines and pending columns
   from the open holds' lines (rows are upserted; a row with nothing behind it is zeroed, not
   dropped), then `ANALYZE` (planner statistics are not in a dump; indexes were built from the
   restored rows by the dump's post-data section).
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import asyncpg
import msgspec

from signer.canonical import PostedJournal, digest
from signer.keys import verify_signature
from signer.verify import load_trusted_key
from store.check import Problem
from store.integrity import integrity_problems

Progress = Callable[[str], None]
_PAGE: Final = 2000
_SIDES: Final = {"debit": "D", "credit": "C"}

_JOURNALS = 'SELECT journal_id, body FROM journals ORDER BY journal_id COLLATE "C"'
_LINES = (
    "SELECT journal_id, line_no, account_id, currency, side, amount FROM journal_lines "
    'ORDER BY journal_id COLLATE "C", line_no'
)
_OPEN_XTX = "SELECT txid FROM xtx WHERE state IN ('preparing', 'commit')"


@dataclass(slots=True)
class ReplayReport:
    """What the replay verified and rebuilt."""

    problems: list[Problem] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    balances_rebuilt: int = 0
    balances_changed: int = 0
    unchecked_batches: int = 0

    @property
    def ok(self) -> bool:
        """True when nothing is wrong."""
        return not self.problems


def _silent(_: str) -> None:
    """The default progress sink."""


def _line_problem(journal_id: str, body: bytes, lines: list[asyncpg.Record]) -> Problem | None:
    """Why `lines` are not exactly the entries of `body`, or None."""
    try:
        posted = msgspec.json.decode(body, type=PostedJournal)
    except msgspec.DecodeError as exc:
        return Problem("body_unreadable", journal_id, f"stored body is not a journal: {exc}")
    expected = [
        (i, e.account_id, e.currency, _SIDES.get(e.side, e.side), e.amount_cents)
        for i, e in enumerate(posted.entries)
    ]
    stored = [(r["line_no"], r["account_id"], r["currency"], r["side"], r["amount"]) for r in lines]
    if stored != expected:
        return Problem(
            "lines_differ_from_body", journal_id, f"{len(stored)} stored lines vs {len(expected)} in the body"
        )
    return None


async def lines_match_bodies(
    conn: asyncpg.Connection, progress: Progress = _silent
) -> tuple[list[Problem], int]:
    """Every journal whose lines are not its body's entries (open cross-shard ones skipped); and how many
    journals were compared. One merge of two sorted cursors, so memory stays flat."""
    open_tx = {r[0] for r in await conn.fetch(_OPEN_XTX)}
    problems: list[Problem] = []
    compared = 0
    async with conn.transaction():
        journals = await conn.cursor(_JOURNALS)
        lines = await conn.cursor(_LINES)
        pending_lines: deque[asyncpg.Record] = deque(await lines.fetch(_PAGE))
        while batch := await journals.fetch(_PAGE):
            for journal in batch:
                jid = journal["journal_id"]
                own: list[asyncpg.Record] = []
                while True:
                    if not pending_lines:
                        pending_lines = deque(await lines.fetch(_PAGE))
                        if not pending_lines:
                            break
                    head = pending_lines[0]["journal_id"]
                    if head.encode() > jid.encode():
                        break
                    row = pending_lines.popleft()
                    if row["journal_id"] == jid:
                        own.append(row)
                    # lines of no journal: reported by the integrity check (orphan_lines)
                compared += 1
                if jid in open_tx:
                    continue
                found = _line_problem(jid, bytes(journal["body"]), own)
                if found is not None:
                    problems.append(found)
            if compared % 100_000 < _PAGE:
                progress(f"replay: compared lines with bodies of {compared} journals")
    return problems, compared


def _key_problems(keys: list[dict[str, Any]], stored: dict[str, str], trusted: list[str]) -> list[Problem]:
    problems: list[Problem] = []
    for key in keys:
        try:
            derived = load_trusted_key(key["pem"]).kid
        except ValueError as exc:
            problems.append(Problem("bad_key", key["kid"], str(exc)))
            continue
        if derived != key["kid"]:
            problems.append(Problem("bad_key", key["kid"], f"PEM belongs to kid {derived}"))
    archived = {k["kid"]: k["pem"] for k in keys}
    if archived != stored:
        problems.append(
            Problem("keys_differ", "signer_keys", "restored keys are not the archive's keys.json")
        )
    for pem in trusted:
        load_trusted_key(pem)  # ValueError for the caller: an unusable --public-key
    return problems


async def checkpoint_problems(
    conn: asyncpg.Connection,
    checkpoint: dict[str, Any] | None,
    keys: list[dict[str, Any]],
    trusted: list[str],
) -> list[Problem]:
    """The restored checkpoint and keys against the archive's (and the operator's trusted keys)."""
    stored_keys = {r["kid"]: r["pem"] for r in await conn.fetch("SELECT kid, pem FROM signer_keys")}
    problems = _key_problems(keys, stored_keys, trusted)
    latest = await conn.fetchrow(
        "SELECT tree_size, root, statement, signature, signer_kid FROM checkpoints "
        "ORDER BY tree_size DESC LIMIT 1"
    )
    if checkpoint is None:
        if latest is not None:
            problems.append(Problem("checkpoint_differs", "checkpoint", "archive has none, the dump has one"))
        return problems
    subject = f"checkpoint {checkpoint['tree_size']}"
    restored = None if latest is None else {
        "tree_size": latest["tree_size"], "root": bytes(latest["root"]).hex(),
        "statement_bytes": bytes(latest["statement"]).hex(), "signature": bytes(latest["signature"]).hex(),
        "signer_kid": latest["signer_kid"],
    }  # fmt: skip
    if restored != {
        k: checkpoint.get(k) for k in ("tree_size", "root", "statement_bytes", "signature", "signer_kid")
    }:
        problems.append(
            Problem("checkpoint_differs", subject, "the restored latest checkpoint is not the archive's")
        )
    key = {k["kid"]: k for k in keys}.get(checkpoint["signer_kid"])
    statement = bytes.fromhex(checkpoint["statement_bytes"])
    if key is None or not verify_signature(
        key["pem"], key["algorithm"], digest(statement), bytes.fromhex(checkpoint["signature"])
    ):
        problems.append(
            Problem("bad_signature", subject, f"does not verify with key {checkpoint['signer_kid']}")
        )
    if json.loads(statement).get("root") not in (None, checkpoint["root"]):
        problems.append(
            Problem("checkpoint_differs", subject, "signed statement's root is not the checkpoint root")
        )
    if trusted:
        kids = {load_trusted_key(pem).kid for pem in trusted}
        used = await conn.fetch("SELECT signer_kid FROM batches UNION SELECT signer_kid FROM checkpoints")
        problems += [
            Problem("untrusted_key", r[0], "signed batches or checkpoints but is not a trusted --public-key")
            for r in used
            if r[0] not in kids
        ]
    return problems


_REBUILD = """
WITH posted AS (
    SELECT account_id, currency,
           COALESCE(sum(amount) FILTER (WHERE side = 'D'), 0)::bigint AS dp,
           COALESCE(sum(amount) FILTER (WHERE side = 'C'), 0)::bigint AS cp
      FROM journal_lines GROUP BY account_id, currency
), pending AS (
    SELECT l.account_id, l.currency,
           COALESCE(sum(l.amount) FILTER (WHERE l.side = 'D'), 0)::bigint AS dq,
           COALESCE(sum(l.amount) FILTER (WHERE l.side = 'C'), 0)::bigint AS cq
      FROM hold_lines l JOIN holds h ON h.hold_id = l.hold_id WHERE h.state = 'pending'
     GROUP BY l.account_id, l.currency
), derived AS (
    SELECT COALESCE(p.account_id, q.account_id) AS account_id, COALESCE(p.currency, q.currency) AS currency,
           COALESCE(p.dp, 0) AS dp, COALESCE(p.cp, 0) AS cp, COALESCE(q.dq, 0) AS dq, COALESCE(q.cq, 0) AS cq
      FROM posted p FULL JOIN pending q ON q.account_id = p.account_id AND q.currency = p.currency
), everything AS (
    SELECT COALESCE(d.account_id, b.account_id) AS account_id, COALESCE(d.currency, b.currency) AS currency,
           COALESCE(d.dp, 0) AS dp, COALESCE(d.cp, 0) AS cp, COALESCE(d.dq, 0) AS dq, COALESCE(d.cq, 0) AS cq
      FROM derived d FULL JOIN balances b ON b.account_id = d.account_id AND b.currency = d.currency
)
INSERT INTO balances AS b
       (account_id, currency, slot, debits_posted, credits_posted, debits_pending, credits_pending)
SELECT e.account_id, e.currency, a.slot, e.dp, e.cp, e.dq, e.cq
  FROM everything e JOIN accounts a USING (account_id)
ON CONFLICT (account_id, currency) DO UPDATE SET
    debits_posted = EXCLUDED.debits_posted, credits_posted = EXCLUDED.credits_posted,
    debits_pending = EXCLUDED.debits_pending, credits_pending = EXCLUDED.credits_pending
 WHERE (b.debits_posted, b.credits_posted, b.debits_pending, b.credits_pending)
       IS DISTINCT FROM (EXCLUDED.debits_posted, EXCLUDED.credits_posted,
                         EXCLUDED.debits_pending, EXCLUDED.credits_pending)
"""


async def rebuild_balances(conn: asyncpg.Connection) -> tuple[int, int]:
    """Recompute every balance row from the lines and open holds; (rows now, rows that changed)."""
    async with conn.transaction():
        status = await conn.execute(_REBUILD)
        rows = int(await conn.fetchval("SELECT count(*) FROM balances"))
    return rows, int(status.rsplit(" ", 1)[-1])


async def replay_and_verify(
    conn: asyncpg.Connection,
    *,
    checkpoint: dict[str, Any] | None,
    keys: list[dict[str, Any]],
    trusted_pems: list[str] | None = None,
    progress: Progress = _silent,
) -> ReplayReport:
    """Verify a restored ledger (steps 1-3 of the module docstring) and, when it verifies, rebuild (4)."""
    report = ReplayReport()
    progress("replay: comparing every journal's lines with its signed body")
    found, report.counts["journals_replayed"] = await lines_match_bodies(conn, progress)
    report.problems += found
    progress("replay: recomputing balances, hashes, chains, batch roots, signatures, checkpoint, audit chain")
    report.problems += await integrity_problems(conn)
    progress("replay: checking the checkpoint and keys against the archive")
    report.problems += await checkpoint_problems(conn, checkpoint, keys, trusted_pems or [])
    tree_size = 0 if checkpoint is None else int(checkpoint["tree_size"])
    report.unchecked_batches = int(
        await conn.fetchval(
            "SELECT count(*) FROM batches WHERE log_index IS NULL OR log_index >= $1", tree_size
        )
    )
    if report.problems:
        return report
    progress("replay: rebuilding balances and pending amounts from the lines and open holds")
    report.balances_rebuilt, report.balances_changed = await rebuild_balances(conn)
    await conn.execute("ANALYZE")
    for table in ("journals", "journal_lines", "accounts", "batches", "checkpoints", "audit_events"):
        report.counts[table] = int(await conn.fetchval(f"SELECT count(*) FROM {table}"))
    report.counts["chains"] = int(
        await conn.fetchval(
            "SELECT count(*) FROM (SELECT stream_id FROM journals WHERE stream_id >= 0 "
            "UNION SELECT shard_id FROM shard_links) s"
        )
    )
    report.counts["cross_shard_in_flight"] = len(await conn.fetch(_OPEN_XTX))  # finished by the coordinator
    report.counts["open_holds"] = int(
        await conn.fetchval("SELECT count(*) FROM holds WHERE state = 'pending'")
    )
    return report
