"""The node's periodic recognition run: started with the app, run every interval, stopped at shutdown."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest
from aiohttp import web

from api.finance_routes import FINANCE, RECOGNITION_INTERVAL_S, recognition_task
from node.config import NodeConfig


class FakeFinance:
    def __init__(self) -> None:
        self.calls: list[tuple[datetime, str]] = []
        self.releases: list[tuple[datetime, str]] = []

    def clock(self) -> datetime:
        return datetime(2026, 5, 1, tzinfo=UTC)

    async def run_recognition(self, as_of: datetime, principal: str) -> dict[str, Any]:
        self.calls.append((as_of, principal))
        if len(self.calls) == 1:
            raise RuntimeError("database away")  # a failing run is logged; the loop goes on
        return {"as_of": "2026-05-01T00:00:00.000000Z", "posted": [], "failed": []}

    async def release_holdbacks(self, as_of: datetime, principal: str) -> dict[str, Any]:
        self.releases.append((as_of, principal))
        return {"as_of": "2026-05-01T00:00:00.000000Z", "released": [], "failed": []}


async def _lifecycle(interval_s: float | None) -> FakeFinance:
    app = web.Application()
    fake = FakeFinance()
    app[FINANCE] = fake  # type: ignore[assignment,misc]
    if interval_s is not None:
        app[RECOGNITION_INTERVAL_S] = interval_s
    context = recognition_task(app)
    await context.__anext__()
    await asyncio.sleep(0.1)
    with pytest.raises(StopAsyncIteration):
        await context.__anext__()
    stopped_at = len(fake.calls)
    await asyncio.sleep(0.05)
    assert len(fake.calls) == stopped_at  # shutdown stopped the loop
    return fake


def test_the_periodic_run_posts_at_the_clock_and_stops_at_shutdown() -> None:
    fake = asyncio.run(_lifecycle(0.01))
    assert len(fake.calls) >= 3
    assert all(call == (datetime(2026, 5, 1, tzinfo=UTC), "node:recognition") for call in fake.calls)


def test_the_same_ticker_releases_due_holdbacks_even_when_recognition_fails() -> None:
    """Tried: a ticker whose first recognition run raises -> every tick, that one included, still
    releases the holdbacks due at the clock as `node:holdbacks`."""
    fake = asyncio.run(_lifecycle(0.01))
    assert len(fake.releases) == len(fake.calls) >= 3
    assert all(call == (datetime(2026, 5, 1, tzinfo=UTC), "node:holdbacks") for call in fake.releases)


@pytest.mark.parametrize("interval_s", [None, 0.0])
def test_no_interval_no_task(interval_s: float | None) -> None:
    fake = asyncio.run(_lifecycle(interval_s))
    assert fake.calls == [] and fake.releases == []


def test_the_interval_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LEDGER_RECOGNITION_INTERVAL_S", raising=False)
    assert NodeConfig.from_env().recognition_interval_s == 60.0
    monkeypatch.setenv("LEDGER_RECOGNITION_INTERVAL_S", "5")
    assert NodeConfig.from_env().recognition_interval_s == 5.0
