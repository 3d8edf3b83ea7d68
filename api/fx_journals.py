"""Journals with FX fields on `POST /ledger/post` and `/ledger/post_batch`: the node's rates, then D2.

`finance.fx_journal` completes a journal whose foreign lines carry `fx_rate`/`rate_ts`
(DECISIONS D2); this module loads the rates it needs from PostgreSQL, one query per request
(all the FX journals of a batch together), and builds each journal's `Submission`, whose
idempotency hash is the client's payload (`request_digest`).

Replays. An exact replay (same id or key, same payload) answers the original result even when
rates added since would now complete the journal differently or refuse it: when completion
fails and a stored journal of the same principal carries the same request hash under that id or
key, the stored journal is submitted again, and the shard answers its original result.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

import msgspec

from api.posting import Submission
from api.services import Services
from finance import fx, fx_journal
from ledger.errors import Rejection
from ledger.journal import JournalIn, LineIn, validate_journal
from signer.canonical import PostedJournal
from store import fx_repo, repository


async def load_rates(svc: Services, journals: Iterable[JournalIn]) -> fx.RateTable:
    """The node's rates in force at every `rate_ts` of `journals`' foreign lines (one query, or none)."""
    base = svc.base_currency
    wants: set[tuple[str, datetime]] = set()
    for raw in journals:
        wants |= fx_journal.rate_wants(raw, base)
    if not wants:
        return fx.RateTable(base)
    async with svc.pool.acquire() as conn:
        rows = await fx_repo.rates_in_force(conn, base, wants)
    return fx_journal.rate_table(base, (fx.Rate(*row) for row in rows))


async def fx_submission(
    svc: Services, raw: JournalIn, table: fx.RateTable, who: str, key: str | None
) -> Submission:
    """The completed journal's submission; `Rejection` (fields under `$`) when it cannot be completed
    and is not an exact replay of a stored journal."""
    digest = fx_journal.request_digest(raw)
    try:
        journal = fx_journal.complete_client_journal(raw, table)
    except Rejection:
        stored = await _stored_replay(svc, raw, who, key, digest)
        if stored is None:
            raise
        return stored
    return Submission(journal, who, key, digest)


async def _stored_replay(
    svc: Services, raw: JournalIn, who: str, key: str | None, digest: bytes
) -> Submission | None:
    """The stored journal `raw` already posted (same id or key, same principal and payload), if any."""
    if raw.journal_id is None and key is None:
        return None
    async with svc.pool.acquire() as conn:
        found = await repository.find_existing(
            conn, [raw.journal_id] if raw.journal_id else [], [who] if key else [], [key] if key else []
        )
        match = next((e for e in found if e.request_hash == digest and e.principal == who), None)
        row = None if match is None else await repository.journal_row(conn, match.journal_id)
    if row is None:
        return None
    posted = msgspec.json.decode(bytes(row["body"]), type=PostedJournal)
    entries = [LineIn(e.account_id, e.side, e.amount_cents, e.currency, e.meta) for e in posted.entries]  # type: ignore[arg-type]
    journal = validate_journal(
        JournalIn(
            entries,
            raw.journal_id,
            posted.context,
            posted.ts,
            posted.reverses,
            posted.memo,
            posted.source_ref,
        )
    )
    return Submission(journal, who, key, digest)
