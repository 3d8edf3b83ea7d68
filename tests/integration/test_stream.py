"""The journal stream (`GET /finance/ledger/journal`) on a real node, read while writers post.

A reader following `next_cursor` during concurrent single-shard, cross-shard and batched
posting must see every committed journal exactly once; the filters return exactly the
matching journals; a cursor is a stable position (reusing it returns the same page).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import aiohttp
import asyncpg
import pytest

from ledger.timestamps import rfc3339
from tests.support.load import Client, Workload, run_writers, summary, wait_xtx_done
from tests.support.node import NodeHarness, auth

STREAM = "/finance/ledger/journal"


async def _page(http: aiohttp.ClientSession, url: str, **params: Any) -> dict[str, Any]:
    query = {k: str(v) for k, v in params.items() if v is not None}
    async with http.get(f"{url}{STREAM}", params=query, headers=auth("auditor")) as resp:
        data: dict[str, Any] = await resp.json()
        assert resp.status == 200 and data["ok"], data
    assert data["next_cursor"], data
    return data


async def _read_all(http: aiohttp.ClientSession, url: str, **params: Any) -> list[dict[str, Any]]:
    """Every journal the stream returns for these filters, following the cursor to the end."""
    journals: list[dict[str, Any]] = []
    cursor = None
    while True:
        page = await _page(http, url, limit=50, cursor=cursor, **params)
        journals.extend(page["journals"])
        cursor = page["next_cursor"]
        if not page["journals"]:
            return journals


@pytest.fixture(scope="module")
def streamed(node: NodeHarness) -> tuple[Client, list[str]]:
    """8 writers post ~2,000 journals while a reader pages the stream; (writers' client, ids read)."""
    workload = Workload("str", seed=7, cross_ratio=0.3)

    async def scenario() -> tuple[Client, list[str]]:
        async with Client(node.url, tries=60) as client, aiohttp.ClientSession() as http:
            writers = asyncio.create_task(
                run_writers(client, workload, 2000, writers=8, batch_every=60, batch_size=40)
            )
            seen: list[str] = []
            cursor = None
            empty_after_done = 0
            pages = 0
            while empty_after_done < 2:
                done = writers.done()
                page = await _page(http, node.url, limit=50, cursor=cursor)
                pages += 1
                seen.extend(j["journal_id"] for j in page["journals"])
                cursor = page["next_cursor"]
                if page["journals"]:
                    empty_after_done = 0
                elif done:
                    empty_after_done += 1
                else:
                    await asyncio.sleep(0.02)
            await writers
            assert pages > 20, f"the reader read only {pages} pages"
            return client, seen

    return asyncio.run(scenario())


def test_reader_sees_every_committed_journal_exactly_once(
    node: NodeHarness, streamed: tuple[Client, list[str]]
) -> None:
    client, seen = streamed
    assert not client.failed(), summary(client)
    assert len(client.acked) == 2000
    duplicates = [i for i, n in Counter(seen).items() if n > 1]
    assert not duplicates, f"{len(duplicates)} journals seen twice, e.g. {duplicates[:5]}"
    acked = set(client.acked)
    missing = acked - set(seen)
    assert not missing, f"{len(missing)} acknowledged journals never seen, e.g. {sorted(missing)[:5]}"
    assert set(seen) == acked

    async def stored() -> set[str]:
        conn = await asyncpg.connect(node.dsn)
        try:
            return {r[0] for r in await conn.fetch("SELECT journal_id FROM journals")}
        finally:
            await conn.close()

    assert asyncio.run(stored()) == set(seen)


def test_account_filter(node: NodeHarness, streamed: tuple[Client, list[str]]) -> None:
    client, _ = streamed
    touching: Counter[str] = Counter(e["account_id"] for b in client.acked.values() for e in b["entries"])
    account, _count = touching.most_common(1)[0]
    quiet = touching.most_common()[-1][0]

    async def scenario() -> None:
        async with aiohttp.ClientSession() as http:
            for account_id in (account, quiet):
                journals = await _read_all(http, node.url, account_id=account_id)
                ids = [j["journal_id"] for j in journals]
                assert len(ids) == len(set(ids))
                for j in journals:
                    assert account_id in {e["account_id"] for e in j["entries"]}, j
                want = {
                    jid
                    for jid, b in client.acked.items()
                    if account_id in {e["account_id"] for e in b["entries"]}
                }
                assert set(ids) == want, (account_id, len(ids), len(want))
            nobody = await _page(http, node.url, limit=50, account_id="asset:nobody-posts-here")
            assert nobody["journals"] == []

    asyncio.run(scenario())


def test_time_window_filter(node: NodeHarness, streamed: tuple[Client, list[str]]) -> None:
    streamed_ids = set(streamed[1])

    async def scenario() -> None:
        conn = await asyncpg.connect(node.dsn)
        try:
            rows = await conn.fetch("SELECT journal_id, posted_at FROM journals ORDER BY posted_at")
        finally:
            await conn.close()
        assert len(rows) >= 2000
        low, high = rows[len(rows) // 3]["posted_at"], rows[2 * len(rows) // 3]["posted_at"]
        want = {r["journal_id"] for r in rows if low <= r["posted_at"] <= high}
        assert want <= streamed_ids and len(want) > 100
        async with aiohttp.ClientSession() as http:
            journals = await _read_all(http, node.url, from_ts=rfc3339(low), to_ts=rfc3339(high))
            ids = [j["journal_id"] for j in journals]
            assert len(ids) == len(set(ids))
            for j in journals:
                posted = datetime.fromisoformat(j["posted_at"])
                assert low <= posted <= high, (j["journal_id"], j["posted_at"])
            assert set(ids) == want
            later = await _page(
                http, node.url, limit=50, from_ts=rfc3339(datetime.now(UTC).replace(year=2999))
            )
            assert later["journals"] == []

    asyncio.run(scenario())


def test_cursor_is_a_stable_position(node: NodeHarness, streamed: tuple[Client, list[str]]) -> None:
    async def scenario() -> None:
        async with aiohttp.ClientSession() as http:
            first = await _page(http, node.url, limit=50)
            second = await _page(http, node.url, limit=50, cursor=first["next_cursor"])
            assert len(first["journals"]) == 50 and len(second["journals"]) == 50
            assert not {j["journal_id"] for j in first["journals"]} & {
                j["journal_id"] for j in second["journals"]
            }
            async with Client(node.url, tries=60) as client:
                await run_writers(client, Workload("str-late", seed=8), 100, writers=4)
                assert not client.failed(), summary(client)
            again = await _page(http, node.url, limit=50, cursor=first["next_cursor"])
            assert again == second
            assert (await _page(http, node.url, limit=50)) == first

    asyncio.run(scenario())
    assert asyncio.run(wait_xtx_done(node.dsn)) == 0
