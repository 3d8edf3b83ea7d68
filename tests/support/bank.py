"""The bank test (Jepsen's bank workload against a real node), shared by tests/fault and loadtests/bank.py.

Writers post random transfers between funded wallets (single-shard and cross-shard; half the
wallets are overdraft-guarded, so some transfers are refused with INSUFFICIENT_FUNDS), readers read
balances and page the journal stream, and a nemesis injects faults on a schedule drawn from the
seed: it kills shard actors, the coordinator and the signer (Ray restarts them), makes the signer
fail, restarts the whole node, resets / slows / blackholes the node's PostgreSQL connections through
a TCP fault proxy, and restarts the PostgreSQL server the test owns (`OwnedPostgres`).

An answer that is not definite (client timeout, connection error, 503, 5xx) leaves the journal
*indeterminate*; the writer resends it with the same journal id and body until the answer is
definite (posted, or refused), and whatever is still open when traffic stops is resent after the
faults are healed. `check_bank` then compares PostgreSQL, the stream and what every client saw:

- every acknowledged journal stored exactly once with exactly its lines; no refused or never-sent
  journal stored; every stored journal whole (a cross-shard one has all its lines or none);
- every balance a reader saw equals a prefix of that account's committed lines in its shard's commit
  order, and one reader's successive reads of an account never go back to a shorter prefix;
- no guarded wallet below zero at any prefix; per-currency sum of all balances zero;
- the stream read end to end holds every stored journal exactly once; readers following cursors never
  saw a journal twice nor one that is not stored;
- `ledger-node check` passes and a proof package over the whole run verifies and contains every
  acknowledged journal;
- no answer was 500 INTERNAL_ERROR (a database outage must be 503, retryable).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg

from actors import runtime as actor_runtime
from ledger.timestamps import rfc3339
from signer.package import decode_package
from signer.verify import verify_package
from store.repository import WRITER_LOCK_NAMESPACE
from tests.support.load import accounts_on, cli_check, entry, wait_xtx_done
from tests.support.node import NodeHarness, auth
from tests.support.owned_postgres import OwnedPostgres
from tests.support.tcp_proxy import ProxyThread

SHARDS: Final = 4
CURRENCIES: Final = ("USD", "EUR")
FAULT_KINDS: Final = (
    "kill_shard",
    "kill_coordinator",
    "kill_signer",
    "signer_failing",
    "restart_node",
    "db_reset",
    "db_latency",
    "db_blackhole",
    "restart_postgres",
)


@dataclass
class BankConfig:
    """One run: the seed decides the journals, the reads and the fault schedule."""

    seed: int
    duration_s: float = 20.0
    writers: int = 8
    readers: int = 2
    wallets_per_shard: int = 4
    funding: int = 10_000
    cross_ratio: float = 0.4
    fault_gap_s: tuple[float, float] = (0.3, 1.5)
    fault_hold_s: tuple[float, float] = (0.5, 2.0)
    request_timeout_s: float = 10.0
    retry_window_s: float = 20.0
    settle_timeout_s: float = 180.0
    every_kind: bool = True
    """Inject every fault kind at least once, even if that runs past `duration_s`."""


@dataclass
class Tracked:
    """One journal as the clients saw it."""

    body: dict[str, Any]
    state: str = "pending"  # ok | refused | rejected | pending (indeterminate, unresolved)
    attempts: int = 0
    indeterminate: int = 0
    code: str | None = None


@dataclass
class BankResult:
    """What a run did and what the checker found."""

    seed: int
    elapsed_s: float = 0.0
    acknowledged: int = 0
    refused: int = 0
    rejected: int = 0
    unresolved: int = 0
    indeterminate_journals: int = 0
    indeterminate_answers: Counter[str] = field(default_factory=Counter)
    internal_errors: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    fault_log: list[tuple[float, str, float]] = field(default_factory=list)
    balance_reads: int = 0
    stream_pages: int = 0
    stream_journals: int = 0
    proof_journals: int = 0
    anomalies: list[str] = field(default_factory=list)

    def summary(self) -> str:
        faults = ", ".join(f"{k}={self.faults[k]}" for k in FAULT_KINDS)
        return (
            f"bank seed={self.seed} ({self.elapsed_s:.0f}s): acknowledged={self.acknowledged} "
            f"refused={self.refused} rejected={self.rejected} indeterminate={self.indeterminate_journals} "
            f"(resolved by retry {self.indeterminate_journals - self.unresolved}, "
            f"unresolved {self.unresolved}; "
            f"answers {dict(self.indeterminate_answers)}) internal_errors={self.internal_errors} "
            f"reads: balances={self.balance_reads} stream_pages={self.stream_pages}; "
            f"faults: {sum(self.faults.values())} ({faults}); proof journals={self.proof_journals}; "
            f"anomalies={len(self.anomalies)}; replay: python -m loadtests.bank --seed {self.seed}"
        )


class BankEnvironment:
    """A PostgreSQL the run owns, a fault proxy in front of it, and nodes whose every connection
    (pool, shard, coordinator and signer actors, audit writer) goes through the proxy."""

    def __init__(self) -> None:
        self.pg = OwnedPostgres().start()
        self.proxy = ProxyThread("127.0.0.1", self.pg.port).start()

    def route(self, dsn: str) -> str:
        parts = urlsplit(dsn)
        netloc = parts.netloc.replace(f"127.0.0.1:{self.pg.port}", f"127.0.0.1:{self.proxy.port}")
        assert netloc != parts.netloc, f"the node's database is expected on port {self.pg.port}"
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))

    def node(self) -> NodeHarness:
        return NodeHarness(shards=SHARDS, route_database=self.route, admin_dsn=self.pg.admin_dsn).start()

    def close(self) -> None:
        self.proxy.restore()
        self.proxy.stop()
        self.pg.stop()


class Bank:
    """Writers, readers and the nemesis of one run against one node."""

    def __init__(self, env: BankEnvironment, harness: NodeHarness, config: BankConfig) -> None:
        self.env = env
        self.harness = harness
        self.config = config
        self.tag = f"bank{config.seed}"
        self.result = BankResult(config.seed)
        self.wallets = {
            s: accounts_on(f"liability:{self.tag}:w", s, config.wallets_per_shard) for s in range(SHARDS)
        }
        self.cash = {s: accounts_on(f"asset:{self.tag}:cash", s, 1)[0] for s in range(SHARDS)}
        self.guarded = {w for group in self.wallets.values() for w in group[::2]}
        self.journals: dict[str, Tracked] = {}
        self.observations: dict[int, list[tuple[str, str, int]]] = defaultdict(list)
        self.stream_seen: dict[int, list[str]] = defaultdict(list)
        self.stop = asyncio.Event()
        self.http: aiohttp.ClientSession | None = None

    # -- HTTP ------------------------------------------------------------------------------------
    async def _call(
        self, method: str, path: str, role: str = "service", body: Any = None
    ) -> tuple[int, dict[str, Any]] | str:
        """(status, JSON answer), or the name of the client-side failure."""
        assert self.http is not None
        timeout = aiohttp.ClientTimeout(total=self.config.request_timeout_s)
        try:
            url = self.harness.url
            async with self.http.request(
                method, url + path, json=body, headers=auth(role), timeout=timeout
            ) as resp:
                data: dict[str, Any] = await resp.json(content_type=None)
                status = resp.status
        except (TimeoutError, aiohttp.ClientError, ValueError, AssertionError) as exc:
            return f"client:{type(exc).__name__}"
        if status == 500 and (data.get("error") or {}).get("code") == "INTERNAL_ERROR":
            self.result.internal_errors += 1
        return status, data

    async def _attempt(self, tracked: Tracked) -> str:
        """Send a journal once; its state after the answer (pending when indeterminate)."""
        answer = await self._call("POST", "/ledger/post", body=tracked.body)
        tracked.attempts += 1
        if isinstance(answer, str):
            return self._indeterminate(tracked, answer)
        status, data = answer
        if data.get("ok"):
            return "ok"
        code = str((data.get("error") or {}).get("code"))
        tracked.code = code
        if status >= 500 or status == 429:
            return self._indeterminate(tracked, f"{status}:{code}")
        return "refused" if code == "INSUFFICIENT_FUNDS" else "rejected"

    def _indeterminate(self, tracked: Tracked, reason: str) -> str:
        tracked.indeterminate += 1
        self.result.indeterminate_answers[reason] += 1
        return "pending"

    async def settle(self, tracked: Tracked, window_s: float) -> None:
        """Send (and resend with the same id and body) until the answer is definite or the window ends."""
        deadline = time.monotonic() + window_s
        while True:
            tracked.state = await self._attempt(tracked)
            if tracked.state != "pending" or time.monotonic() > deadline:
                return
            await asyncio.sleep(0.2 + 0.3 * random.random())

    def _journal(self, rng: random.Random, number: int, writer: int) -> Tracked:
        first = rng.randrange(SHARDS)
        source = rng.choice(self.wallets[first])
        if rng.random() < self.config.cross_ratio:
            target = rng.choice(self.wallets[rng.choice([s for s in range(SHARDS) if s != first])])
        else:
            target = rng.choice([w for w in self.wallets[first] if w != source])
        amount, currency = rng.randint(1, self.config.funding // 3), rng.choice(CURRENCIES)
        body: dict[str, Any] = {
            "journal_id": f"{self.tag}-w{writer}-{number:06d}",
            "entries": [entry(source, "debit", amount, currency), entry(target, "credit", amount, currency)],
            "context": {"source": "bank"},
        }
        tracked = Tracked(body)
        self.journals[body["journal_id"]] = tracked
        return tracked

    # -- set-up ------------------------------------------------------------------------------------
    async def fund(self) -> None:
        """Create the guarded wallets, then fund every wallet in every currency from its shard's cash."""
        for wallet in sorted(self.guarded):
            answer = await self._call(
                "POST", "/accounts", "admin", {"account_id": wallet, "policy": {"no_negative": True}}
            )
            assert not isinstance(answer, str) and answer[1].get("ok"), answer
        funding = []
        for shard, wallets in self.wallets.items():
            for wallet in wallets:
                for currency in CURRENCIES:
                    body: dict[str, Any] = {
                        "journal_id": f"{self.tag}-fund-{wallet.rsplit(':', 1)[1]}-{currency}",
                        "entries": [
                            entry(self.cash[shard], "debit", self.config.funding, currency),
                            entry(wallet, "credit", self.config.funding, currency),
                        ],
                    }
                    funding.append(Tracked(body))
                    self.journals[body["journal_id"]] = funding[-1]
        await asyncio.gather(*(self.settle(t, 60) for t in funding))
        assert all(t.state == "ok" for t in funding), [
            (t.body["journal_id"], t.state, t.code) for t in funding
        ]

    # -- traffic -------------------------------------------------------------------------------------
    async def writer(self, index: int) -> None:
        rng = random.Random(self.config.seed * 1000 + index)
        number = 0
        while not self.stop.is_set():
            number += 1
            await self.settle(self._journal(rng, number, index), self.config.retry_window_s)

    async def reader(self, index: int) -> None:
        rng = random.Random(self.config.seed * 1000 + 500 + index)
        wallets = sorted(w for group in self.wallets.values() for w in group)
        cursor: str | None = None
        while not self.stop.is_set():
            if rng.random() < 0.6:
                account = rng.choice(wallets)
                answer = await self._call("GET", f"/accounts/{account}/balances", "auditor")
                if not isinstance(answer, str) and answer[1].get("ok"):
                    self.result.balance_reads += 1
                    for row in answer[1]["balances"]:
                        value = row["debits_posted"] - row["credits_posted"]
                        self.observations[index].append((account, row["currency"], value))
            else:
                query = "?limit=200" + (f"&cursor={cursor}" if cursor else "")
                answer = await self._call("GET", f"/finance/ledger/journal{query}", "auditor")
                if not isinstance(answer, str) and answer[1].get("ok"):
                    self.result.stream_pages += 1
                    self.stream_seen[index].extend(j["journal_id"] for j in answer[1]["journals"])
                    cursor = answer[1]["next_cursor"]
            await asyncio.sleep(rng.uniform(0.01, 0.05))

    # -- the nemesis -------------------------------------------------------------------------------
    async def nemesis(self, until: float, started: float) -> None:
        rng = random.Random(self.config.seed)
        kinds = list(FAULT_KINDS) if self.config.every_kind else []
        rng.shuffle(kinds)
        while kinds or time.monotonic() < until:
            kind = kinds.pop() if kinds else rng.choice(FAULT_KINDS)
            await asyncio.sleep(rng.uniform(*self.config.fault_gap_s))
            hold = rng.uniform(*self.config.fault_hold_s)
            self.result.fault_log.append((round(time.monotonic() - started, 2), kind, round(hold, 2)))
            await self.inject(kind, hold, rng)
            self.result.faults[kind] += 1

    async def inject(self, kind: str, hold_s: float, rng: random.Random) -> None:
        """One fault, held for `hold_s`, then healed (Ray restarts killed actors by itself)."""
        harness, proxy = self.harness, self.env.proxy
        assert harness.node is not None and harness.node.services is not None
        services = harness.node.services
        if kind == "kill_shard":
            actor_runtime.kill(services.shards[rng.randrange(SHARDS)])  # type: ignore[arg-type]
        elif kind == "kill_coordinator":
            actor_runtime.kill(services.coordinator)  # type: ignore[arg-type]
        elif kind == "kill_signer":
            actor_runtime.kill(services.signer)
        elif kind == "signer_failing":  # the signer's documented fault hook: every signature fails
            await asyncio.to_thread(harness.run, services.signer.set_failing(True), 60)
            await asyncio.sleep(hold_s)
            await asyncio.to_thread(harness.run, services.signer.set_failing(False), 60)
        elif kind == "restart_node":
            await asyncio.to_thread(harness.restart)
        elif kind == "restart_postgres":
            await asyncio.to_thread(self.env.pg.restart)
        elif kind in ("db_reset", "db_latency", "db_blackhole"):
            fault = {"db_reset": proxy.cut, "db_blackhole": proxy.blackhole}.get(kind)
            await asyncio.to_thread(fault or (lambda: proxy.latency(0.03)))
            await asyncio.sleep(hold_s * (2 if kind == "db_latency" else 1))
            await asyncio.to_thread(proxy.restore)
        else:
            raise ValueError(f"unknown fault {kind}")
        if kind.startswith("kill_"):
            await asyncio.sleep(hold_s)

    # -- the run -------------------------------------------------------------------------------------
    async def run(self) -> BankResult:
        started = time.monotonic()
        from_ts = rfc3339(datetime.now(UTC) - timedelta(seconds=2))
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as http:
            self.http = http
            await self.fund()
            tasks = [asyncio.create_task(self.writer(i)) for i in range(self.config.writers)]
            tasks += [asyncio.create_task(self.reader(i)) for i in range(self.config.readers)]
            try:
                await self.nemesis(started + self.config.duration_s, started)
            finally:
                self.env.proxy.restore()
                self.stop.set()
                await asyncio.gather(*tasks)
            pending = [t for t in self.journals.values() if t.state == "pending"]
            await asyncio.gather(*(self.settle(t, self.config.settle_timeout_s) for t in pending))
            await check_bank(self, from_ts)
        self.result.elapsed_s = time.monotonic() - started
        return self.result


# -- the checker ---------------------------------------------------------------------------------------
async def check_bank(bank: Bank, from_ts: str) -> None:
    """Fill `bank.result` (counts and anomalies) from PostgreSQL, the stream and a proof package."""
    result, anomalies = bank.result, bank.result.anomalies
    journals = bank.journals
    for tracked in journals.values():
        result.indeterminate_journals += tracked.indeterminate > 0
    states = Counter(t.state for t in journals.values())
    result.acknowledged, result.refused = states["ok"], states["refused"]
    result.rejected, result.unresolved = states["rejected"], states["pending"]
    if states["rejected"]:
        codes = Counter(t.code for t in journals.values() if t.state == "rejected")
        anomalies.append(f"journals rejected with other codes than INSUFFICIENT_FUNDS: {dict(codes)}")
    if result.internal_errors:
        anomalies.append(f"{result.internal_errors} answers were 500 INTERNAL_ERROR")
    open_xtx = await wait_xtx_done(bank.harness.dsn, 60)
    if open_xtx:
        anomalies.append(f"{open_xtx} cross-shard transactions still open after the run")
    await _probe(bank)
    conn = await asyncpg.connect(bank.harness.dsn)
    try:
        await _check_writer_locks(conn, anomalies)
        stored = await _check_store(conn, bank, anomalies)
        await _check_prefixes(conn, bank, anomalies)
    finally:
        await conn.close()
    await _check_stream(bank, stored, anomalies)
    done = await asyncio.to_thread(cli_check, bank.harness.dsn)
    if done.returncode != 0 or "check passed" not in done.stdout:
        anomalies.append(
            f"ledger-node check failed ({done.returncode}): {done.stdout[-2000:]} {done.stderr[-2000:]}"
        )
    await _check_proof(bank, from_ts, anomalies)


async def _probe(bank: Bank) -> None:
    """After the faults: one journal on every shard and one cross-shard, so every writer writes again."""
    probes = []
    for shard in range(SHARDS):
        target = bank.wallets[shard][1] if shard == 0 else bank.wallets[0][1]  # shard 0: single-shard
        body: dict[str, Any] = {
            "journal_id": f"{bank.tag}-probe-{shard}",
            "entries": [entry(bank.cash[shard], "debit", 1, "USD"), entry(target, "credit", 1, "USD")],
        }
        probes.append(Tracked(body))
        bank.journals[body["journal_id"]] = probes[-1]
    await asyncio.gather(*(bank.settle(t, bank.config.settle_timeout_s) for t in probes))
    bank.result.acknowledged += sum(t.state == "ok" for t in probes)
    for t in probes:
        if t.state != "ok":
            bank.result.anomalies.append(f"probe {t.body['journal_id']} after the faults: {t.state} {t.code}")


WRITERS: Final = {"shard": list(range(SHARDS)), "coordinator": [-1], "audit writer": [-2], "signer": [-3]}


async def _check_writer_locks(conn: asyncpg.Connection, anomalies: list[str]) -> None:
    """Every single writer holds its advisory lock again (re-taken after the outages and restarts)."""
    rows = await conn.fetch(
        "SELECT objid::bigint FROM pg_locks WHERE locktype = 'advisory' AND granted"
        " AND classid = $1 AND objsubid = 2",
        WRITER_LOCK_NAMESPACE,
    )
    held = {int(r[0]) for r in rows}
    missing = [f"{name} {i}" for name, ids in WRITERS.items() for i in ids if i % 2**32 not in held]
    if missing:
        anomalies.append(f"writer locks not held after the faults: {missing}")


async def _check_store(conn: asyncpg.Connection, bank: Bank, anomalies: list[str]) -> set[str]:
    """Acknowledged -> stored once, whole; refused/never-sent -> absent; per-currency zero sum."""
    journals = bank.journals
    stored = {r[0] for r in await conn.fetch("SELECT journal_id FROM journals")}
    lines: dict[str, dict[int, tuple[str, str, str, int]]] = defaultdict(dict)
    counts: Counter[tuple[str, int]] = Counter()
    for r in await conn.fetch(
        "SELECT journal_id, line_no, account_id, currency, side, amount FROM journal_lines"
    ):
        lines[r[0]][r[1]] = (r[2], r[3].strip(), r[4], r[5])
        counts[(r[0], r[1])] += 1
    lost = [j for j, t in journals.items() if t.state == "ok" and j not in stored]
    ghosts = [j for j, t in journals.items() if t.state in ("refused", "rejected") and j in stored]
    strangers = sorted(stored - set(journals))
    doubled = [key for key, n in counts.items() if n > 1]
    wrong = []
    for journal_id in stored & set(journals):
        body = journals[journal_id].body
        want = {
            n: (e["account_id"], e["currency"], "D" if e["side"] == "debit" else "C", e["amount_cents"])
            for n, e in enumerate(body["entries"])
        }
        if lines.get(journal_id) != want:
            wrong.append((journal_id, lines.get(journal_id), want))
    orphans = sorted(set(lines) - stored)
    for label, found in (
        ("acknowledged journals not stored", lost),
        ("refused journals stored", ghosts),
        ("stored journals nobody sent", strangers),
        ("lines stored twice", doubled),
        ("journals stored partially or wrongly", wrong),
        ("lines without a journal", orphans),
    ):
        if found:
            anomalies.append(f"{len(found)} {label}, e.g. {found[:3]}")
    sums = await conn.fetch(
        "SELECT currency, sum(debits_posted - credits_posted) FROM balances GROUP BY currency"
    )
    if any(r[1] != 0 for r in sums):
        anomalies.append(f"per-currency sums are not zero: {[tuple(r) for r in sums]}")
    return stored


async def _check_prefixes(conn: asyncpg.Connection, bank: Bank, anomalies: list[str]) -> None:
    """Every observed balance is a prefix (in shard commit order) of its account's lines, monotonically
    per reader; guarded wallets never below zero at any prefix."""
    wallets = sorted(w for group in bank.wallets.values() for w in group)
    rows = await conn.fetch(
        "SELECT l.account_id, l.currency, sum(CASE l.side WHEN 'D' THEN l.amount ELSE -l.amount END),"
        "       COALESCE(s.seq, j.stream_seq) AS position"
        "  FROM journal_lines l JOIN journals j USING (journal_id)"
        "  LEFT JOIN shard_links s ON s.journal_id = l.journal_id AND s.shard_id = l.shard_id"
        " WHERE l.account_id = ANY($1) GROUP BY 1, 2, 4 ORDER BY 1, 2, 4",
        wallets,
    )
    prefixes: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0])
    for account, currency, delta, _position in rows:
        series = prefixes[(account, currency.strip())]
        series.append(series[-1] + delta)
    negative = [(k, -max(v)) for k, v in prefixes.items() if k[0] in bank.guarded and max(v) > 0]
    if negative:
        anomalies.append(f"guarded wallets went below zero: {negative[:3]}")
    for reader, seen in bank.observations.items():
        last: dict[tuple[str, str], int] = {}
        for account, currency, value in seen:
            series = prefixes.get((account, currency), [0])
            start = last.get((account, currency), 0)
            index = next((i for i in range(start, len(series)) if series[i] == value), None)
            if index is None:
                earlier = value in series[:start]
                anomalies.append(
                    f"reader {reader} saw {account} {currency} = {value}: "
                    + (
                        "an older prefix after a newer one"
                        if earlier
                        else "not a prefix of its committed lines"
                    )
                )
                continue
            last[(account, currency)] = index


async def _check_stream(bank: Bank, stored: set[str], anomalies: list[str]) -> None:
    """The whole stream, paged with cursors, holds every stored journal once; readers saw no duplicate."""
    ids: list[str] = []
    cursor: str | None = None
    while True:
        query = "?limit=1000" + (f"&cursor={cursor}" if cursor else "")
        answer = await bank._call("GET", f"/finance/ledger/journal{query}", "auditor")
        assert not isinstance(answer, str) and answer[1].get("ok"), answer
        page = answer[1]["journals"]
        ids.extend(j["journal_id"] for j in page)
        cursor = answer[1]["next_cursor"]
        if not page:
            break
    bank.result.stream_journals = len(ids)
    if len(ids) != len(set(ids)) or set(ids) != stored:
        dupes = [j for j, n in Counter(ids).items() if n > 1]
        anomalies.append(
            f"stream: {len(dupes)} duplicates {dupes[:3]}, missing {sorted(stored - set(ids))[:3]}, "
            f"extra {sorted(set(ids) - stored)[:3]}"
        )
    for reader, seen in bank.stream_seen.items():
        dupes = [j for j, n in Counter(seen).items() if n > 1]
        phantoms = sorted(set(seen) - stored)
        if dupes or phantoms:
            anomalies.append(f"reader {reader} stream: duplicates {dupes[:3]}, not stored {phantoms[:3]}")


async def _check_proof(bank: Bank, from_ts: str, anomalies: list[str]) -> None:
    """A proof package over the whole run verifies and holds every acknowledged journal."""
    harness = bank.harness
    assert harness.node is not None and harness.node.services is not None
    await asyncio.to_thread(harness.run, harness.node.services.signer.checkpoint(), 60)
    body = {"range": {"from_ts": from_ts, "to_ts": rfc3339(datetime.now(UTC) + timedelta(seconds=1))}}
    answer = await bank._call("POST", "/proofs/generate", "operator", body)
    assert not isinstance(answer, str) and answer[1].get("ok"), answer
    proof_id = answer[1]["proof_id"]
    deadline = time.monotonic() + 120
    while True:
        answer = await bank._call("GET", f"/proofs/{proof_id}", "auditor")
        assert not isinstance(answer, str) and answer[1].get("ok"), answer
        if answer[1]["proof"]["status"] != "generating" or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    if answer[1]["proof"]["status"] != "ready":
        anomalies.append(f"proof not ready: {answer[1]['proof']}")
        return
    assert bank.http is not None
    async with bank.http.get(f"{harness.url}/proofs/{proof_id}/package", headers=auth("auditor")) as resp:
        data = await resp.read()
    keys = await bank._call("GET", "/keys", "auditor")
    assert not isinstance(keys, str) and keys[1].get("ok"), keys
    report = verify_package(data, [k["pem"] for k in keys[1]["keys"]])
    if not report.ok:
        anomalies.append(f"proof package does not verify: {[c for c in report.checks if not c.ok][:3]}")
    in_package = {j.journal_id for j in decode_package(data).journals}
    bank.result.proof_journals = len(in_package)
    missing = sorted(j for j, t in bank.journals.items() if t.state == "ok" and j not in in_package)
    if missing:
        anomalies.append(f"{len(missing)} acknowledged journals missing from the proof, e.g. {missing[:3]}")


def run_bank(env: BankEnvironment, config: BankConfig) -> BankResult:
    """A fresh node (own database on the owned server), one run, the node stopped; the result."""
    harness = env.node()
    try:
        return asyncio.run(Bank(env, harness, config).run())
    finally:
        env.proxy.restore()
        harness.stop()


def run_outage_probe(env: BankEnvironment) -> dict[str, Any]:
    """A fresh node; a balance read while the proxy refuses PostgreSQL (status, answer), then the
    probes and the writer-lock check after it is restored."""
    harness = env.node()

    async def scenario() -> dict[str, Any]:
        bank = Bank(env, harness, BankConfig(seed=0, wallets_per_shard=2))
        async with aiohttp.ClientSession() as http:
            bank.http = http
            await bank.fund()
            env.proxy.cut()
            await asyncio.sleep(0.5)
            during = await bank._call("GET", f"/accounts/{bank.wallets[0][0]}/balances", "auditor")
            await asyncio.sleep(1.5)
            env.proxy.restore()
            await _probe(bank)
        conn = await asyncpg.connect(harness.dsn)
        try:
            await _check_writer_locks(conn, bank.result.anomalies)
        finally:
            await conn.close()
        if bank.result.internal_errors:
            bank.result.anomalies.append(f"{bank.result.internal_errors} answers were 500 INTERNAL_ERROR")
        return {"during": during, "anomalies": bank.result.anomalies}

    try:
        return asyncio.run(scenario())
    finally:
        env.proxy.restore()
        harness.stop()
