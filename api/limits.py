"""Limits and back-pressure: the node pushes back (429 / 503) instead of buffering without bound.

Two steps of the node's middleware (`api.app.front_middleware`):

- shedding (before auth): at most `in_flight_max` requests are handled at once and their
  declared bodies hold at most `in_flight_bytes_max` bytes. A request over either bound waits up
  to `in_flight_wait_s` for room, then is answered 503 `SERVICE_UNAVAILABLE` (`retryable: true`,
  `Retry-After`). The public system routes (`/health`, `/ready`, `/metrics`, `/openapi.json`) are
  never shed, so an overloaded node stays observable.
- per-token limits (after auth): per principal (token fingerprint) a token bucket of
  `rate_per_s` requests per second with `burst` capacity, and at most `token_in_flight_max`
  requests in flight. Over either: 429 `RATE_LIMITED` with `Retry-After` (whole seconds).

Per connection, aiohttp serves HTTP/1.1 requests one at a time and pauses reading a connection
whose pipelined requests queue up, so a connection has one request in flight. The journal queue
per shard is bounded in `api.posting.Batcher` (`LEDGER_SHARD_QUEUE_MAX`). docs/api.md "Limits"
lists every limit and its setting.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

from aiohttp import web

from api.envelope import error_response
from api.services import SERVICES
from ledger.errors import ErrorCode, LedgerError

UNSHED_PATHS: Final = frozenset({"/health", "/ready", "/metrics", "/openapi.json"})
BUCKETS_MAX: Final = 10_000
"""Principals whose buckets are remembered; beyond it the least recently used one is forgotten
(a forgotten bucket starts full again, so this only bounds memory, never tightens a limit)."""


class LimitConfigError(ValueError):
    """A limit setting (LEDGER_RATE_LIMIT, LEDGER_IN_FLIGHT_MAX, ...) is malformed; names it."""


@dataclass(frozen=True, slots=True)
class LimitSettings:
    """The node's front-end limits; the defaults are generous (benchmarks are not throttled)."""

    rate_per_s: float = 20_000.0
    """LEDGER_RATE_LIMIT `R[/s][:B]`: requests per second per token (0 / `off`: no rate limit)."""
    burst: int = 40_000
    """The bucket's capacity (default 2 x R)."""
    token_in_flight_max: int = 512
    """LEDGER_TOKEN_IN_FLIGHT_MAX: requests of one token being handled at once."""
    in_flight_max: int = 1024
    """LEDGER_IN_FLIGHT_MAX: requests being handled at once, over all callers."""
    in_flight_bytes_max: int = 512 * 1024 * 1024
    """LEDGER_IN_FLIGHT_BYTES_MAX: declared body bytes (Content-Length) of those requests."""
    in_flight_wait_s: float = 0.05
    """LEDGER_IN_FLIGHT_WAIT_MS: how long a request may wait for room before it is shed."""
    retry_after_s: int = 1
    """Retry-After of a shed (503) answer."""


def parse_rate_limit(text: str) -> tuple[float, int]:
    """`R`, `R/s`, `R:B` or `R/s:B` -> (rate per second, burst); `off` or `0` -> (0, 0) (no limit)."""
    spec = text.strip().lower()
    if spec in {"", "off", "0"}:
        return 0.0, 0
    rate_text, _, burst_text = spec.partition(":")
    rate_text = rate_text.removesuffix("/s")
    try:
        rate = float(rate_text)
        burst = int(burst_text) if burst_text else 1
    except ValueError:
        raise LimitConfigError(f"LEDGER_RATE_LIMIT must be R[/s][:BURST], got {text!r}") from None
    if not (0 < rate < math.inf):
        raise LimitConfigError(f"LEDGER_RATE_LIMIT needs a finite rate > 0, got {text!r}")
    if not burst_text:
        burst = max(1, math.ceil(2 * rate))
    if burst < 1:
        raise LimitConfigError(f"LEDGER_RATE_LIMIT needs a rate > 0 and a burst >= 1, got {text!r}")
    return rate, burst


def _env_int(environ: Mapping[str, str], name: str, default: int) -> int:
    text = (environ.get(name) or "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        raise LimitConfigError(f"{name} must be an integer, got {text!r}") from None
    if value < 1:
        raise LimitConfigError(f"{name} must be >= 1, got {text!r}")
    return value


def limit_settings_from_env(environ: Mapping[str, str] | None = None) -> LimitSettings:
    """LEDGER_RATE_LIMIT, LEDGER_TOKEN_IN_FLIGHT_MAX, LEDGER_IN_FLIGHT_MAX, LEDGER_IN_FLIGHT_BYTES_MAX,
    LEDGER_IN_FLIGHT_WAIT_MS over the defaults."""
    env = os.environ if environ is None else environ
    default = LimitSettings()
    rate, burst = default.rate_per_s, default.burst
    if env.get("LEDGER_RATE_LIMIT") is not None:
        rate, burst = parse_rate_limit(env["LEDGER_RATE_LIMIT"])
    return LimitSettings(
        rate_per_s=rate,
        burst=burst,
        token_in_flight_max=_env_int(env, "LEDGER_TOKEN_IN_FLIGHT_MAX", default.token_in_flight_max),
        in_flight_max=_env_int(env, "LEDGER_IN_FLIGHT_MAX", default.in_flight_max),
        in_flight_bytes_max=_env_int(env, "LEDGER_IN_FLIGHT_BYTES_MAX", default.in_flight_bytes_max),
        in_flight_wait_s=_env_int(env, "LEDGER_IN_FLIGHT_WAIT_MS", 50) / 1000,
    )


class TokenBucket:
    """`rate` tokens per second up to `burst`; pure (the caller passes the time)."""

    __slots__ = ("burst", "rate", "tokens", "updated")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.updated = now

    def take(self, now: float) -> float:
        """Take one token: 0.0 when admitted, else the seconds until one is available."""
        elapsed = max(0.0, now - self.updated)
        self.tokens = min(float(self.burst), self.tokens + elapsed * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class Limiter:
    """The state behind both middlewares: buckets, per-token and overall in-flight counts."""

    def __init__(self, settings: LimitSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.clock = clock
        self.buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self.token_in_flight: dict[str, int] = {}
        self.in_flight = 0
        self.in_flight_bytes = 0
        self.in_flight_peak = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    def rate_wait(self, who: str) -> float:
        """0.0 when `who` may send a request now, else seconds to wait (the request is refused)."""
        if self.settings.rate_per_s <= 0:
            return 0.0
        now = self.clock()
        bucket = self.buckets.get(who)
        if bucket is None:
            bucket = self.buckets[who] = TokenBucket(self.settings.rate_per_s, self.settings.burst, now)
            if len(self.buckets) > BUCKETS_MAX:
                self.buckets.popitem(last=False)
        else:
            self.buckets.move_to_end(who)
        return bucket.take(now)

    def _fits(self, size: int) -> bool:
        s = self.settings
        if self.in_flight >= s.in_flight_max:
            return False
        # A body larger than the whole budget may still run alone.
        return self.in_flight_bytes == 0 or self.in_flight_bytes + size <= s.in_flight_bytes_max

    def try_enter(self, size: int) -> bool:
        """Take a place at once if there is one (what `enter` does without waiting); False otherwise."""
        if not self._fits(size):
            return False
        self._take(size)
        return True

    async def enter(self, size: int) -> bool:
        """Take a place for a request with `size` declared body bytes; False when none freed in time.

        The check and the take happen in one step of the event loop, so the bounds always hold; a
        woken waiter that finds its place taken by a newcomer waits again until its deadline.
        """
        if not self._fits(size):
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.settings.in_flight_wait_s
            while not self._fits(size):
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return False
                waiter: asyncio.Future[None] = loop.create_future()
                self._waiters.append(waiter)
                try:
                    await asyncio.wait_for(waiter, remaining)
                except TimeoutError:
                    return False
                finally:
                    if not waiter.done():
                        waiter.cancel()
        self._take(size)
        return True

    def _take(self, size: int) -> None:
        self.in_flight += 1
        self.in_flight_bytes += size
        self.in_flight_peak = max(self.in_flight_peak, self.in_flight)

    def leave(self, size: int) -> None:
        """Give the place back and wake the longest waiting request."""
        self.in_flight -= 1
        self.in_flight_bytes -= size
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                break

    def token_leave(self, who: str) -> None:
        """Give back the in-flight place `token_refusal` took for `who`."""
        left = self.token_in_flight[who] - 1
        if left:
            self.token_in_flight[who] = left
        else:
            del self.token_in_flight[who]

    @property
    def waiting(self) -> int:
        """Requests waiting for a place (cancelled waiters are dropped lazily)."""
        return sum(1 for waiter in self._waiters if not waiter.done())


LIMITER: Final = web.AppKey("limiter", Limiter)


Refusal = tuple[str, LedgerError, float]
"""Why a request is shed: (reason label of `ledger_shed_requests_total`, the error, Retry-After seconds)."""


def _shed(request: web.Request, refusal: Refusal) -> web.Response:
    reason, error, wait_s = refusal
    request.app[SERVICES].metrics.shed_requests.labels(reason).inc()
    return error_response(error, {"Retry-After": retry_after(wait_s)})


def retry_after(seconds: float) -> str:
    """The Retry-After header value for a wait of `seconds` (whole seconds, at least 1)."""
    return str(max(1, math.ceil(seconds)))


def overload_refusal(limiter: Limiter) -> Refusal:
    """The refusal of a request that found no place (`Limiter.enter` answered False): 503."""
    settings = limiter.settings
    error = LedgerError(
        ErrorCode.SERVICE_UNAVAILABLE,
        "node overloaded: too many requests in flight, retry later",
        {"retryable": True, "reason": "overloaded", "in_flight_max": settings.in_flight_max},
    )
    return "overloaded", error, settings.retry_after_s


def overloaded(request: web.Request, limiter: Limiter) -> web.Response:
    """503 for a request that found no place (`Limiter.enter` answered False)."""
    return _shed(request, overload_refusal(limiter))


def token_refused(limiter: Limiter, who: str) -> Refusal | None:
    """429 RATE_LIMITED when principal `who` is over its token bucket or its in-flight bound; None when
    admitted, and then `who` holds one more in-flight place until `Limiter.token_leave`."""
    wait_s = limiter.rate_wait(who)
    if wait_s > 0:
        error = LedgerError(
            ErrorCode.RATE_LIMITED,
            "rate limit exceeded for this token, retry later",
            {"reason": "rate", "rate_per_s": limiter.settings.rate_per_s, "burst": limiter.settings.burst},
        )
        return "rate_limited", error, wait_s
    count = limiter.token_in_flight.get(who, 0)
    if count >= limiter.settings.token_in_flight_max:
        error = LedgerError(
            ErrorCode.RATE_LIMITED,
            "too many requests in flight for this token, retry later",
            {"reason": "in_flight", "in_flight_max": limiter.settings.token_in_flight_max},
        )
        return "token_in_flight", error, limiter.settings.retry_after_s
    limiter.token_in_flight[who] = count + 1
    return None


def token_refusal(request: web.Request, limiter: Limiter, who: str) -> web.Response | None:
    """`token_refused` as the 429 response (None when admitted)."""
    refused = token_refused(limiter, who)
    return None if refused is None else _shed(request, refused)
