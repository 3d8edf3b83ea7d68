"""A client's first steps over real HTTP: post, replay, read back, balances, stream."""

from __future__ import annotations

import asyncio

import aiohttp

from tests.support.node import NodeHarness, auth, journal


async def _flow(url: str) -> None:
    async with aiohttp.ClientSession() as http:
        body = journal("smoke-1", "asset:cash:smoke", "revenue:smoke")
        first = await (await http.post(f"{url}/ledger/post", json=body, headers=auth())).json()
        assert first["ok"] and first["journal_id"] == "smoke-1"
        replay = await (await http.post(f"{url}/ledger/post", json=body, headers=auth())).json()
        assert replay == first
        read = await (await http.get(f"{url}/ledger/smoke-1", headers=auth("auditor"))).json()
        assert read["journal"]["entries"][0]["amount_cents"] == 100
        assert len(read["audit"]["hash"]) == 64
        balances = await (
            await http.get(f"{url}/accounts/revenue:smoke/balances", headers=auth("auditor"))
        ).json()
        assert balances["balances"][0]["balance"] == 100
        page = await (
            await http.get(f"{url}/finance/ledger/journal?limit=10", headers=auth("auditor"))
        ).json()
        assert [j["journal_id"] for j in page["journals"]] == ["smoke-1"]


def test_post_replay_read_balance_stream(node: NodeHarness) -> None:
    asyncio.run(_flow(node.url))
