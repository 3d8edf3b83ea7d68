"""Unit tests of the front end's limits (api/limits.py): token bucket, settings, in-flight bound."""

from __future__ import annotations

import asyncio

import pytest

from api.limits import (
    LimitConfigError,
    Limiter,
    LimitSettings,
    TokenBucket,
    limit_settings_from_env,
    parse_rate_limit,
)


def test_token_bucket_allows_burst_then_the_rate() -> None:
    """Tried: a bucket of 10/s with burst 5 admits 5 at once, refuses the 6th with the wait until a
    token is back (0.1 s), and admits one more after that time."""
    bucket = TokenBucket(10.0, 5, now=0.0)
    assert [bucket.take(0.0) for _ in range(5)] == [0.0] * 5
    assert bucket.take(0.0) == pytest.approx(0.1)
    assert bucket.take(0.1) == 0.0
    assert bucket.take(0.1) > 0
    assert bucket.take(100.0) == 0.0 and bucket.tokens == pytest.approx(4.0)  # refilled to burst, not beyond


def test_rate_limit_settings_parse() -> None:
    """Tried: LEDGER_RATE_LIMIT forms R, R/s, R:B, R/s:B and off; malformed values name the variable."""
    assert parse_rate_limit("100") == (100.0, 200)
    assert parse_rate_limit("100/s:150") == (100.0, 150)
    assert parse_rate_limit("2.5:3") == (2.5, 3)
    assert parse_rate_limit("off") == (0.0, 0)
    for bad in ("fast", "-1", "10:0", "inf"):
        with pytest.raises(LimitConfigError, match="LEDGER_RATE_LIMIT"):
            parse_rate_limit(bad)
    settings = limit_settings_from_env({"LEDGER_RATE_LIMIT": "50:60", "LEDGER_IN_FLIGHT_MAX": "7"})
    assert (settings.rate_per_s, settings.burst, settings.in_flight_max) == (50.0, 60, 7)
    assert limit_settings_from_env({}) == LimitSettings()
    with pytest.raises(LimitConfigError, match="LEDGER_IN_FLIGHT_MAX"):
        limit_settings_from_env({"LEDGER_IN_FLIGHT_MAX": "0"})


def test_rate_limit_is_per_token() -> None:
    """Tried: one token exhausting its bucket does not limit another; `off` never limits."""
    now = [0.0]
    limiter = Limiter(LimitSettings(rate_per_s=1.0, burst=2), clock=lambda: now[0])
    assert [limiter.rate_wait("a") for _ in range(3)][2] > 0
    assert limiter.rate_wait("b") == 0.0
    now[0] = 1.0
    assert limiter.rate_wait("a") == 0.0
    unlimited = Limiter(LimitSettings(rate_per_s=0.0, burst=0))
    assert all(unlimited.rate_wait("a") == 0.0 for _ in range(1000))


def test_in_flight_bound_holds_under_contention() -> None:
    """Tried: 200 concurrent requests through a limit of 8 with a short wait: never more than 8 at
    once, the ones that found no place in time are refused, the others all ran."""
    limiter = Limiter(LimitSettings(in_flight_max=8, in_flight_wait_s=0.02))
    ran: list[int] = []

    async def request(n: int) -> bool:
        if not await limiter.enter(10):
            return False
        try:
            await asyncio.sleep(0.005)
            ran.append(n)
            return True
        finally:
            limiter.leave(10)

    async def scenario() -> list[bool]:
        return await asyncio.gather(*(request(n) for n in range(200)))

    admitted = asyncio.run(scenario())
    assert limiter.in_flight_peak == 8 and limiter.in_flight == 0 and limiter.in_flight_bytes == 0
    assert 8 < sum(admitted) < 200 and len(ran) == sum(admitted)


def test_in_flight_bytes_budget() -> None:
    """Tried: the declared body bytes in flight stay within the budget; a body over the whole
    budget still runs when nothing else does."""
    limiter = Limiter(LimitSettings(in_flight_bytes_max=100, in_flight_wait_s=0.001))

    async def scenario() -> None:
        assert await limiter.enter(60)
        assert not await limiter.enter(60)
        limiter.leave(60)
        assert await limiter.enter(500)
        assert not await limiter.enter(1)
        limiter.leave(500)

    asyncio.run(scenario())


def test_try_enter_takes_a_free_place_without_waiting() -> None:
    """Tried: `try_enter` (the front end's no-wait path before `enter`) takes places while they are
    free, refuses at the bound without queueing, and a place given back is free again."""
    limiter = Limiter(LimitSettings(in_flight_max=2))
    assert limiter.try_enter(10) and limiter.try_enter(20)
    assert not limiter.try_enter(1) and limiter.waiting == 0
    assert (limiter.in_flight, limiter.in_flight_bytes, limiter.in_flight_peak) == (2, 30, 2)
    limiter.leave(10)
    assert limiter.try_enter(5) and limiter.in_flight_bytes == 25
