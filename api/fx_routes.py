"""FX rate endpoints: `POST /finance/fx/rates` (writers) and `GET /finance/fx/rates` (readers).

Rates are units of the quote currency per 1 unit of the node's base currency (`LEDGER_BASE_CURRENCY`,
DECISIONS D2), validated by `finance.fx.parse_rate` and stored by `store.fx_repo` as the exact
decimal string. A rate is a fact: posting the same (base, quote, as_of) again with the same rate
value answers 200 (a replay); with a different value 409 IDEMPOTENCY_CONFLICT. A batch (`rates`) is
stored in one transaction, all or nothing. Each newly stored rate records an `fx.rate` audit event.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Final

import msgspec
from aiohttp import web

from api.audit_log import audit_event
from api.auth import READERS, WRITERS, Role
from api.envelope import ok
from api.requests import decode_json, json_body, query_time
from api.services import SERVICES
from finance import fx
from ledger.errors import ErrorCode, Rejection, validation_error
from ledger.money import is_currency
from ledger.timestamps import rfc3339
from store import fx_repo

RATES_PER_REQUEST_MAX: Final = 1000
QUOTES_PER_QUERY_MAX: Final = 100
_FIELDS: Final = ("quote", "rate", "source", "as_of")


class RateIn(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One rate as a client sends it (`base` defaults to the node's base currency)."""

    quote: str
    rate: str
    source: str
    as_of: str
    base: str | None = None


class RatesIn(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """`POST /finance/fx/rates`: one rate at the top level, or a list under `rates`."""

    base: str | None = None
    quote: str | None = None
    rate: str | None = None
    source: str | None = None
    as_of: str | None = None
    rates: list[RateIn] | None = None


def _requested(decoded: RatesIn, base: str) -> list[fx.Rate]:
    """The validated rates of a request, with field paths naming the offending input."""
    single = [decoded.base, decoded.quote, decoded.rate, decoded.source, decoded.as_of]
    if decoded.rates is not None:
        if any(value is not None for value in single):
            raise validation_error("send either one rate or `rates`, not both", "$.rates")
        if not 1 <= len(decoded.rates) <= RATES_PER_REQUEST_MAX:
            raise validation_error(f"rates holds 1-{RATES_PER_REQUEST_MAX} rates", "$.rates")
        return [
            fx.parse_rate(r.base or base, r.quote, r.rate, r.source, r.as_of, f"$.rates[{i}]")
            for i, r in enumerate(decoded.rates)
        ]
    for name in _FIELDS:
        if getattr(decoded, name) is None:
            raise validation_error(f"{name} is required", f"$.{name}")
    return [
        fx.parse_rate(
            decoded.base or base,
            decoded.quote or "",
            decoded.rate or "",
            decoded.source or "",
            decoded.as_of or "",
        )
    ]


def _check_base(rate: fx.Rate, base: str, path: str) -> None:
    if rate.base != base:
        raise validation_error(f"rates are against the node's base currency {base}", f"{path}.base")


async def post_rates(request: web.Request) -> web.Response:
    """POST /finance/fx/rates: store one rate or a batch; 201 when any is new, 200 for a replay."""
    svc = request.app[SERVICES]
    decoded = decode_json(await json_body(request), RatesIn)
    rates = _requested(decoded, svc.base_currency)
    for index, rate in enumerate(rates):
        _check_base(rate, svc.base_currency, "$" if decoded.rates is None else f"$.rates[{index}]")
    stored: list[tuple[fx.Rate, bool]] = []
    async with svc.pool.acquire() as conn, conn.transaction():
        for rate in rates:
            row, created = await fx_repo.insert_rate(
                conn, fx_repo.RateRow(*msgspec.structs.astuple(rate)), rate.as_of_time
            )
            kept = fx.Rate(*row)
            if not created and kept.value != rate.value:
                raise Rejection(
                    ErrorCode.IDEMPOTENCY_CONFLICT,
                    f"a different {rate.base}/{rate.quote} rate is stored at {kept.as_of}",
                    {"base": kept.base, "quote": kept.quote, "as_of": kept.as_of, "rate": kept.rate},
                )
            stored.append((kept, created))
    for rate, created in stored:
        if created:
            await audit_event(request, "fx.rate", msgspec.to_builtins(rate))
    answers = [{**msgspec.to_builtins(rate), "created": created} for rate, created in stored]
    status = 201 if any(created for _, created in stored) else 200
    if decoded.rates is None:
        return ok(status, **answers[0], rates=answers)
    return ok(status, rates=answers)


def _quotes(request: web.Request) -> list[str] | None:
    text = request.query.get("quote")
    if text is None or text == "":
        return None
    quotes = text.split(",")
    if len(quotes) > QUOTES_PER_QUERY_MAX:
        raise validation_error(f"at most {QUOTES_PER_QUERY_MAX} quote currencies", "quote")
    for quote in quotes:
        if not is_currency(quote):
            raise validation_error(f"unknown currency code {quote!r} (ISO 4217)", "quote")
    return quotes


async def get_rates(request: web.Request) -> web.Response:
    """GET /finance/fx/rates?quote=EUR[,GBP]&at=: the rate in force at `at` (default now) per quote.

    Without `quote`, every quote currency that has a rate in force. FX_RATE_MISSING (422) when a
    requested quote has none (or, without `quote`, when no rate is in force at all).
    """
    svc = request.app[SERVICES]
    base = svc.base_currency
    at = query_time(request, "at") or datetime.now(UTC)
    quotes = _quotes(request)
    found: list[dict[str, Any]] = []
    async with svc.pool.acquire() as conn:
        for quote in quotes if quotes is not None else await fx_repo.quotes(conn, base):
            row = await fx_repo.rate_at(conn, base, quote, at)
            if row is None and quotes is not None:
                raise fx.fx_rate_missing(base, quote, at)
            if row is not None:
                found.append(msgspec.to_builtins(fx.Rate(*row)))
    if not found:
        raise Rejection(
            ErrorCode.FX_RATE_MISSING,
            f"no {base} rate at or before {rfc3339(at)}",
            {"base": base, "at": rfc3339(at)},
        )
    return ok(base=base, at=rfc3339(at), rates=found)


ROUTES: Final[
    list[tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]], frozenset[Role]]]
] = [
    ("POST", "/finance/fx/rates", post_rates, WRITERS),
    ("GET", "/finance/fx/rates", get_rates, READERS),
]
