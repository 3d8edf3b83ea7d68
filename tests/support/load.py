"""Load generation and after-the-fact verification for the integration tests (real HTTP, real PostgreSQL).

`Accounts` picks account ids per shard (with the same slot map a fresh 4-shard node stores),
`Workload` builds single-shard and cross-shard journals on purpose, `Client` posts them over
HTTP (single or batched), retrying answers that are 503 SERVICE_UNAVAILABLE + retryable with
the same journal_id and body, and records every acknowledged journal. `verify_store` then
checks PostgreSQL against what was acknowledged.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from sharding.slots import SlotMap, even_slot_map
from store.check import run_check
from tests.support.node import auth

ROOT = Path(__file__).resolve().parents[2]
SHARDS = 4
SLOT_MAP = SlotMap(even_slot_map(SHARDS))


def shard_of(account_id: str) -> int:
    """The shard owning an account on a fresh 4-shard node."""
    return SLOT_MAP.shard_of(account_id)


def accounts_on(prefix: str, shard: int, count: int, start: int = 0) -> list[str]:
    """`count` distinct account ids `prefix...` that live on `shard`."""
    found: list[str] = []
    i = start
    while len(found) < count:
        candidate = f"{prefix}{i}"
        if shard_of(candidate) == shard:
            found.append(candidate)
        i += 1
    return found


class Accounts:
    """Asset and revenue accounts of one test, a few per shard."""

    def __init__(self, tag: str, per_shard: int = 6) -> None:
        self.assets = {s: accounts_on(f"asset:{tag}:a", s, per_shard) for s in range(SHARDS)}
        self.revenues = {s: accounts_on(f"revenue:{tag}:r", s, per_shard) for s in range(SHARDS)}

    def all(self) -> list[str]:
        """Every account id."""
        return [a for group in (*self.assets.values(), *self.revenues.values()) for a in group]


def entry(account_id: str, side: str, amount: int, currency: str) -> dict[str, Any]:
    """One journal line as a client sends it."""
    return {"account_id": account_id, "side": side, "amount_cents": amount, "currency": currency}


class Workload:
    """Deterministic journals: single-shard (both accounts on one shard) or cross-shard (2-3 shards)."""

    def __init__(self, tag: str, seed: int, cross_ratio: float = 0.3, accounts: Accounts | None = None):
        self.tag = tag
        self.rng = random.Random(seed)
        self.cross_ratio = cross_ratio
        self.accounts = accounts or Accounts(tag)
        self.count = 0

    def journal(self, kind: str | None = None, shard: int | None = None) -> dict[str, Any]:
        """A new journal; kind "single" or "cross" (random by `cross_ratio` when None)."""
        rng = self.rng
        self.count += 1
        if kind is None:
            kind = "cross" if rng.random() < self.cross_ratio else "single"
        currency = "EUR" if rng.random() < 0.2 else "USD"
        amount = rng.randint(1, 5_000)
        first = shard if shard is not None else rng.randrange(SHARDS)
        debit = rng.choice(self.accounts.assets[first])
        if kind == "single":
            entries = [
                entry(debit, "debit", amount, currency),
                entry(rng.choice(self.accounts.revenues[first]), "credit", amount, currency),
            ]
        else:
            others = [s for s in range(SHARDS) if s != first]
            if rng.random() < 0.25:  # three shards, three lines
                second, third = rng.sample(others, 2)
                part = rng.randint(1, amount) if amount > 1 else 1
                amount = max(amount, part + 1)
                entries = [
                    entry(debit, "debit", amount, currency),
                    entry(rng.choice(self.accounts.revenues[second]), "credit", part, currency),
                    entry(rng.choice(self.accounts.revenues[third]), "credit", amount - part, currency),
                ]
            else:
                entries = [
                    entry(debit, "debit", amount, currency),
                    entry(rng.choice(self.accounts.revenues[rng.choice(others)]), "credit", amount, currency),
                ]
        return {
            "journal_id": f"{self.tag}-{self.count:06d}",
            "entries": entries,
            "context": {"source": "load", "kind": kind},
        }


def is_cross(body: dict[str, Any]) -> bool:
    """True if the journal's accounts live on several shards."""
    return len({shard_of(e["account_id"]) for e in body["entries"]}) > 1


def retryable(status: int, data: dict[str, Any]) -> bool:
    """A 503 SERVICE_UNAVAILABLE marked retryable."""
    error = data.get("error") or {}
    return (
        status == 503
        and error.get("code") == "SERVICE_UNAVAILABLE"
        and bool((error.get("details") or {}).get("retryable"))
    )


@dataclass
class Outcome:
    """What happened to one journal from the client's side."""

    journal_id: str
    attempts: int = 0
    ok: bool = False
    code: str | None = None
    status: int | None = None
    retried: int = 0
    messages: list[str] = field(default_factory=list)


class Client:
    """Posts journals over HTTP with bounded retries; records acknowledged journals and outcomes."""

    def __init__(self, url: str, tries: int = 60, pause_s: float = 0.2) -> None:
        self.url = url
        self.tries = tries
        self.pause_s = pause_s
        self.bodies: dict[str, dict[str, Any]] = {}
        self.acked: dict[str, dict[str, Any]] = {}
        self.outcomes: dict[str, Outcome] = {}
        self.http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Client:
        self.http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=256), timeout=aiohttp.ClientTimeout(total=120)
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.http is not None
        await self.http.close()

    def _outcome(self, body: dict[str, Any]) -> Outcome:
        journal_id = body["journal_id"]
        self.bodies[journal_id] = body
        return self.outcomes.setdefault(journal_id, Outcome(journal_id))

    def _record(self, outcome: Outcome, status: int, data: dict[str, Any]) -> bool:
        """Record one answer; True if the journal is finished (ok or a final error)."""
        outcome.attempts += 1
        outcome.status = status
        if data.get("ok"):
            outcome.ok, outcome.code = True, None
            self.acked[outcome.journal_id] = self.bodies[outcome.journal_id]
            return True
        error = data.get("error") or {}
        outcome.code = error.get("code")
        if len(outcome.messages) < 3 or outcome.messages[-1] != error.get("message"):
            outcome.messages.append(str(error.get("message")))
        if retryable(status, data):
            outcome.retried += 1
            return False
        return True

    async def post(self, body: dict[str, Any]) -> Outcome:
        """POST /ledger/post, retrying retryable answers and connection errors."""
        assert self.http is not None
        outcome = self._outcome(body)
        for _ in range(self.tries):
            try:
                async with self.http.post(f"{self.url}/ledger/post", json=body, headers=auth()) as resp:
                    status, data = resp.status, await resp.json()
            except (TimeoutError, aiohttp.ClientError) as exc:
                outcome.attempts += 1
                outcome.messages.append(f"client error {type(exc).__name__}")
                await asyncio.sleep(self.pause_s)
                continue
            if self._record(outcome, status, data):
                return outcome
            await asyncio.sleep(self.pause_s)
        return outcome

    async def post_batch(self, bodies: list[dict[str, Any]]) -> list[Outcome]:
        """POST /ledger/post_batch; the retryable items are resent (same ids, same bodies) in a new batch."""
        assert self.http is not None
        outcomes = [self._outcome(b) for b in bodies]
        pending = list(range(len(bodies)))
        for _ in range(self.tries):
            batch = {"journals": [bodies[i] for i in pending]}
            try:
                async with self.http.post(
                    f"{self.url}/ledger/post_batch", json=batch, headers=auth()
                ) as resp:
                    status, data = resp.status, await resp.json()
            except (TimeoutError, aiohttp.ClientError):
                await asyncio.sleep(self.pause_s)
                continue
            if not data.get("ok"):  # the whole request failed
                for i in pending:
                    self._record(outcomes[i], status, data)
                if not retryable(status, data):
                    return outcomes
                await asyncio.sleep(self.pause_s)
                continue
            results = data["results"]
            assert len(results) == len(pending), data
            still: list[int] = []
            for i, result in zip(pending, results, strict=True):
                item_status = 200 if result.get("ok") else _status_of(result)
                if not self._record(outcomes[i], item_status, result):
                    still.append(i)
            pending = still
            if not pending:
                break
            await asyncio.sleep(self.pause_s)
        return outcomes

    def failed(self) -> list[Outcome]:
        """Journals that were never acknowledged."""
        return [o for o in self.outcomes.values() if not o.ok]


def _status_of(result: dict[str, Any]) -> int:
    code = (result.get("error") or {}).get("code")
    return 503 if code == "SERVICE_UNAVAILABLE" else 400


async def run_writers(
    client: Client,
    workload: Workload,
    total: int,
    writers: int,
    batch_every: int = 0,
    batch_size: int = 50,
    stop: asyncio.Event | None = None,
) -> None:
    """`writers` concurrent tasks post `total` journals; every `batch_every`-th unit is a batch."""
    queue: asyncio.Queue[list[dict[str, Any]]] = asyncio.Queue()
    made = 0
    unit = 0
    while made < total:
        unit += 1
        size = batch_size if batch_every and unit % batch_every == 0 else 1
        size = min(size, total - made)
        queue.put_nowait([workload.journal() for _ in range(size)])
        made += size

    async def writer() -> None:
        while not queue.empty():
            if stop is not None and stop.is_set():
                return
            work = queue.get_nowait()
            if len(work) == 1:
                await client.post(work[0])
            else:
                await client.post_batch(work)

    await asyncio.gather(*(writer() for _ in range(writers)))


# -- verification ----------------------------------------------------------------------------
def expected_balances(journals: Iterable[dict[str, Any]]) -> dict[tuple[str, str], int]:
    """Debits minus credits per (account, currency) over the given journal bodies."""
    net: dict[tuple[str, str], int] = defaultdict(int)
    for body in journals:
        for e in body["entries"]:
            sign = 1 if e["side"] == "debit" else -1
            net[(e["account_id"], e["currency"])] += sign * e["amount_cents"]
    return dict(net)


async def wait_xtx_done(dsn: str, timeout_s: float = 30.0) -> int:
    """Wait until every cross-shard transaction is DONE; returns how many are still open."""
    conn = await asyncpg.connect(dsn)
    try:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            open_count = int(await conn.fetchval("SELECT count(*) FROM xtx WHERE state <> 'done'"))
            if open_count == 0 or asyncio.get_running_loop().time() > deadline:
                return open_count
            await asyncio.sleep(0.5)
    finally:
        await conn.close()


async def verify_store(dsn: str, acked: dict[str, dict[str, Any]], attempted: Iterable[str] = ()) -> None:
    """Assert PostgreSQL holds exactly the acknowledged journals, whole, and the ledger is coherent."""
    conn = await asyncpg.connect(dsn)
    try:
        ids = list(acked)
        counts = Counter(
            r[0] for r in await conn.fetch("SELECT journal_id FROM journals WHERE journal_id = ANY($1)", ids)
        )
        missing = [i for i in ids if counts[i] == 0]
        assert not missing, f"{len(missing)} acknowledged journals not stored, e.g. {missing[:5]}"
        assert all(c == 1 for c in counts.values())
        lines: dict[str, dict[int, tuple[str, str, str, int]]] = defaultdict(dict)
        for r in await conn.fetch(
            "SELECT journal_id, line_no, account_id, currency, side, amount FROM journal_lines "
            "WHERE journal_id = ANY($1)",
            ids,
        ):
            lines[r[0]][r[1]] = (r[2], r[3].strip(), r[4], r[5])
        wrong: list[str] = []
        for journal_id, body in acked.items():
            want = {
                n: (e["account_id"], e["currency"], "D" if e["side"] == "debit" else "C", e["amount_cents"])
                for n, e in enumerate(body["entries"])
            }
            if lines.get(journal_id) != want:
                wrong.append(f"{journal_id}: stored {lines.get(journal_id)} want {want}")
        assert not wrong, f"{len(wrong)} acknowledged journals with wrong/missing lines: {wrong[:3]}"
        # Every stored journal (acknowledged or not) is whole: as many lines as its body has entries.
        partial = await conn.fetch(
            """
            SELECT j.journal_id, jsonb_array_length(convert_from(j.body, 'UTF8')::jsonb -> 'entries') AS want,
                   COALESCE(l.have, 0) AS have
              FROM journals j
              LEFT JOIN (SELECT journal_id, count(*) AS have FROM journal_lines GROUP BY journal_id) l
                     USING (journal_id)
             WHERE jsonb_array_length(convert_from(j.body, 'UTF8')::jsonb -> 'entries') <> COALESCE(l.have, 0)
            """
        )
        assert not partial, f"{len(partial)} partially applied journals: {[dict(r) for r in partial[:5]]}"
        stray = set(attempted)
        if stray:
            stored = {
                r[0]
                for r in await conn.fetch(
                    "SELECT journal_id FROM journals WHERE journal_id = ANY($1)", sorted(stray)
                )
            }
            unacked = stored - set(acked)
            assert not unacked, (
                f"{len(unacked)} journals stored but never acknowledged: {sorted(unacked)[:5]}"
            )
        orphans = await conn.fetchval(
            "SELECT count(DISTINCT l.journal_id) FROM journal_lines l "
            "WHERE NOT EXISTS (SELECT 1 FROM journals j WHERE j.journal_id = l.journal_id)"
        )
        assert orphans == 0, f"{orphans} journals have lines but no journals row"
        unbalanced = await conn.fetch(
            "SELECT journal_id, currency FROM journal_lines GROUP BY journal_id, currency "
            "HAVING sum(CASE side WHEN 'D' THEN amount ELSE -amount END) <> 0 LIMIT 5"
        )
        assert not unbalanced, f"unbalanced journals: {[tuple(r) for r in unbalanced]}"
        sums = await conn.fetch(
            "SELECT currency, sum(debits_posted - credits_posted) AS net FROM balances GROUP BY currency"
        )
        assert all(r["net"] == 0 for r in sums), [tuple(r) for r in sums]
        problems = await run_check(conn)
        assert problems == [], [str(p) for p in problems[:10]]
    finally:
        await conn.close()


async def stored_balances(dsn: str, accounts: list[str]) -> dict[tuple[str, str], int]:
    """Debits minus credits per (account, currency) from the balances table."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT account_id, currency, debits_posted - credits_posted FROM balances "
            "WHERE account_id = ANY($1)",
            accounts,
        )
    finally:
        await conn.close()
    return {(r[0], r[1].strip()): r[2] for r in rows}


def cli_check(dsn: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Run `ledger-node check` against the database (long soaks leave big databases: raise `timeout_s`)."""
    exe = Path(sys.executable).parent / "ledger-node"
    env = {**os.environ, "DATABASE_URL": dsn}
    return subprocess.run(
        [str(exe), "check"], env=env, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT, check=False
    )


def summary(client: Client) -> str:
    """A short description of the failures (for assertion messages)."""
    failed = client.failed()
    by_code = Counter((o.code, is_cross(client.bodies[o.journal_id])) for o in failed)
    sample = [(o.journal_id, o.attempts, o.code, o.messages[-2:]) for o in failed[:5]]
    return f"{len(failed)} never acknowledged: by (code, cross) {dict(by_code)}; e.g. {json.dumps(sample)}"


async def xtx_states(dsn: str, journal_ids: list[str]) -> dict[str, tuple[str | None, bool]]:
    """(xtx state or None, journal row exists) per journal id, for failure messages."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT i.id, x.state, EXISTS (SELECT 1 FROM journals j WHERE j.journal_id = i.id) "
            "FROM unnest($1::text[]) AS i(id) LEFT JOIN xtx x ON x.txid = i.id",
            journal_ids,
        )
    finally:
        await conn.close()
    return {r[0]: (r[1], r[2]) for r in rows}
