"""Royalty endpoints: participants, versioned royalty rules, participant statements, holdback release.

Writes (service, operator, admin) are idempotent by id (an exact replay answers 200 with the
stored object, a different payload 409 IDEMPOTENCY_CONFLICT), also accept an `Idempotency-Key`,
and record an audit event when they create something. The work is done by
`finance.service.FinanceService` (finance/royalties.py for the rules and the split,
finance/holdbacks.py for the release of holdbacks).

`POST /finance/holdbacks/release` (operator, admin) `{as_of?}` releases every holdback due at
`as_of` (default now; a time after now is VALIDATION_ERROR: releasing before the release date would
change the rule's terms, which is a new rule version, not a release). The node also releases due
holdbacks from its periodic ticker and at the start of every payout run.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, Final

import msgspec
from aiohttp import web

from api.audit_log import audit_event
from api.auth import READERS, WRITERS, Role
from api.finance_routes import FINANCE, _answer, _idempotent, _who, holdback_release_payload
from api.requests import decode_json, json_body
from finance import chart, royalties
from ledger.errors import validation_error
from ledger.timestamps import parse_rfc3339, rfc3339


def _time(request: web.Request, name: str) -> datetime | None:
    text = request.query.get(name)
    if text is None:
        return None
    parsed = parse_rfc3339(text)
    if parsed is None:
        raise validation_error(f"{name} must be an RFC 3339 time with an offset", f"$.query.{name}")
    return parsed


async def create_participant(request: web.Request) -> web.Response:
    """POST /finance/participants: register a royalty participant (payee)."""
    decoded = decode_json(await json_body(request), royalties.ParticipantRequest)

    async def work() -> tuple[int, dict[str, Any]]:
        view, created = await request.app[FINANCE].create_participant(decoded, _who(request))
        if created:
            await audit_event(request, "royalty.participant_created", view)
        return (201 if created else 200), {"participant": view}

    return await _idempotent(request, "royalty.participant", decoded, work)


async def get_participant(request: web.Request) -> web.Response:
    """GET /finance/participants/{participant_id}."""
    view = await request.app[FINANCE].participant(request.match_info["participant_id"])
    return _answer(200, {"participant": view})


async def create_rule(request: web.Request) -> web.Response:
    """POST /finance/royalty_rules: a new version of a SKU's or contract's royalty rule."""
    decoded = decode_json(await json_body(request), royalties.RuleRequest)

    async def work() -> tuple[int, dict[str, Any]]:
        view, created = await request.app[FINANCE].create_rule(decoded, _who(request))
        if created:
            await audit_event(request, "royalty.rule_created", view)
        return (201 if created else 200), {"rule": view}

    return await _idempotent(request, "royalty.rule", decoded, work)


async def get_rule(request: web.Request) -> web.Response:
    """GET /finance/royalty_rules?sku=|contract=&at=: the version in force at `at` (default now)."""
    finance = request.app[FINANCE]
    sku, contract = request.query.get("sku"), request.query.get("contract")
    if (sku is None) == (contract is None):
        raise validation_error("give exactly one of sku or contract", "$.query.sku")
    subject, key = ("sku", sku) if sku is not None else ("contract", contract)
    assert key is not None  # for mypy; one of the two is set
    chart.check_segment(key, f"$.query.{subject}")
    at = _time(request, "at") or finance.clock()
    return _answer(200, {"rule": await finance.rule_in_force(subject, key, at)})


async def get_statement(request: web.Request) -> web.Response:
    """GET /finance/participants/{participant_id}/statement?from=&to=: accruals and balances."""
    start, end = _time(request, "from"), _time(request, "to")
    if start is not None and end is not None and end < start:
        raise validation_error("to must not be before from", "$.query.to")
    statement = await request.app[FINANCE].statement(request.match_info["participant_id"], start, end)
    return _answer(200, {"statement": statement})


RELEASERS: Final = frozenset({Role.OPERATOR, Role.ADMIN})
"""Who may release holdbacks on demand (an operator decision; runs and the ticker release as the node)."""


class HoldbackReleaseRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """`POST /finance/holdbacks/release`: release what is due at `as_of` (RFC 3339, <= now; default now)."""

    as_of: str | None = None


async def release_holdbacks(request: web.Request) -> web.Response:
    """POST /finance/holdbacks/release: release every holdback due at `as_of`; lists the releases."""
    decoded = (
        decode_json(await json_body(request), HoldbackReleaseRequest)
        if request.can_read_body
        else HoldbackReleaseRequest()
    )
    finance = request.app[FINANCE]
    now = finance.clock()
    as_of = now
    if decoded.as_of is not None:
        parsed = parse_rfc3339(decoded.as_of)
        if parsed is None:
            raise validation_error("as_of must be an RFC 3339 time with an offset", "$.as_of")
        if parsed > now:
            raise validation_error(
                "as_of must not be in the future (holdbacks are released on or after their release time)",
                "$.as_of", now=rfc3339(now),
            )  # fmt: skip
        as_of = parsed
    result = await finance.release_holdbacks(as_of, _who(request))
    if result["released"]:
        await audit_event(request, "royalty.holdback_release", holdback_release_payload(result, "api"))
    return _answer(200, result)


ROUTES: Final[
    list[tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]], frozenset[Role]]]
] = [
    ("POST", "/finance/participants", create_participant, WRITERS),
    ("GET", "/finance/participants/{participant_id}", get_participant, READERS),
    ("GET", "/finance/participants/{participant_id}/statement", get_statement, READERS),
    ("POST", "/finance/royalty_rules", create_rule, WRITERS),
    ("GET", "/finance/royalty_rules", get_rule, READERS),
    ("POST", "/finance/holdbacks/release", release_holdbacks, RELEASERS),
]
