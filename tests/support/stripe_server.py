"""A small Stripe-compatible HTTP server on loopback for the endpoints the node calls.

The real API is unreachable here, so tests point the official `stripe` SDK at this server
(`STRIPE_API_BASE`). It speaks what the SDK sends: form-encoded bodies, Bearer keys, the
`Idempotency-Key` header (a repeated key answers the first response, as Stripe does; the same key
with different parameters is a 400 `idempotency_error`), and Stripe's error envelope. Tests can
make the next calls fail (`fail_next`) with a status to exercise retries and error classes, or
answer late after applying them (`delay_next`: a client timeout that loses the answer).

Endpoints: `POST /v1/refunds` (refunds a known payment intent; more than remains -> 400
`charge_already_refunded`-style error), `POST /v1/payment_intents` (test setup), `POST /v1/transfers`,
and the lists `GET /v1/payment_intents`, `/v1/refunds`, `/v1/transfers` (newest first, `created[gte]`,
`created[lt]`, `limit` 1-100 default 10, `starting_after`, `has_more`). Every object has `created`
(Unix seconds; tests may rewrite it, or any field, in `state`). `listed_twice` ids are listed twice
(a provider-side duplicate); `garbage_next(n)`: the next n calls answer 200 with a body that is not JSON.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

Answer = tuple[int, dict[str, Any]]


def _error(status: int, code: str, message: str, kind: str = "invalid_request_error") -> Answer:
    return status, {"error": {"type": kind, "code": code, "message": message}}


@dataclass
class StripeState:
    """Everything the fake provider knows, inspectable by tests."""

    intents: dict[str, dict[str, Any]] = field(default_factory=dict)
    refunds: dict[str, dict[str, Any]] = field(default_factory=dict)
    transfers: dict[str, dict[str, Any]] = field(default_factory=dict)
    reversals: dict[str, dict[str, Any]] = field(default_factory=dict)
    seen_keys: dict[str, tuple[str, dict[str, str], Answer]] = field(default_factory=dict)
    calls: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    failures: list[int] = field(default_factory=list)
    delays: list[float] = field(default_factory=list)
    ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    listed_twice: set[str] = field(default_factory=set)
    garbage: int = 0


class StripeServer:
    """Start with `await server.start()`; `server.base` is the API base for the SDK."""

    def __init__(self, api_key: str = "sk_test_ledger") -> None:
        self.api_key = api_key
        self.tag = secrets.token_hex(4)  # ids unique across servers, as Stripe's are (a shared node)
        self.state = StripeState()
        self.runner: web.AppRunner | None = None
        self.base = ""

    def fail_next(self, *statuses: int) -> None:
        """The next calls answer these HTTP statuses (e.g. 500, 429), one each, before working again."""
        self.state.failures.extend(statuses)

    def delay_next(self, *seconds: float) -> None:
        """The next calls are processed, then answered only after these delays (a client that
        times out has lost the answer of a request the provider did apply)."""
        self.state.delays.extend(seconds)

    def garbage_next(self, calls: int = 1) -> None:
        """The next `calls` calls answer 200 with a body that is not JSON (unparseable provider data)."""
        self.state.garbage += calls

    async def start(self) -> StripeServer:
        app = web.Application()
        app.router.add_post("/v1/refunds", self._refund)
        app.router.add_post("/v1/payment_intents", self._intent)
        app.router.add_post("/v1/transfers", self._transfer)
        app.router.add_post("/v1/transfers/{transfer_id}/reversals", self._reversal)
        listed = {"/v1/refunds": self.state.refunds, "/v1/payment_intents": self.state.intents,
                  "/v1/transfers": self.state.transfers}  # fmt: skip
        for path, objects in listed.items():
            app.router.add_get(path, self._lister(objects))
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        await web.TCPSite(self.runner, "127.0.0.1", port).start()
        self.base = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    # -- handlers ------------------------------------------------------------------------------
    async def _guard(self, request: web.Request) -> tuple[dict[str, str], Answer | None]:
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return {}, _error(401, "api_key_invalid", "Invalid API Key provided", "invalid_request_error")
        params = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
        self.state.calls.append((request.path, params))
        if self.state.failures:
            status = self.state.failures.pop(0)
            return params, _error(status, "injected", f"injected failure {status}", "api_error")
        return params, None

    async def _serve(self, request: web.Request, make: Callable[[dict[str, str]], Answer]) -> web.Response:
        """Authenticate, apply injected failures, then answer once per idempotency key."""
        params, failed = await self._guard(request)
        answer = failed if failed is not None else self._idempotent(request, params, make)
        if failed is None and self.state.delays:
            await asyncio.sleep(self.state.delays.pop(0))
        return web.json_response(answer[1], status=answer[0])

    def _idempotent(
        self, request: web.Request, params: dict[str, str], make: Callable[[dict[str, str]], Answer]
    ) -> Answer:
        key = request.headers.get("Idempotency-Key")
        if key is not None and key in self.state.seen_keys:
            path, first_params, answer = self.state.seen_keys[key]
            if (path, first_params) != (request.path, params):
                return _error(400, "idempotency_error", "Keys can only be reused with the same parameters")
            return answer
        answer = make(params)
        if key is not None and answer[0] < 500:
            self.state.seen_keys[key] = (request.path, params, answer)
        return answer

    def _lister(self, objects: dict[str, dict[str, Any]]) -> Callable[[web.Request], Any]:
        async def handler(request: web.Request) -> web.Response:
            _, failed = await self._guard(request)
            if failed is None and self.state.garbage:
                self.state.garbage -= 1
                return web.Response(status=200, text="<html>upstream hiccup", content_type="text/html")
            answer = failed if failed is not None else self._page(request, objects)
            return web.json_response(answer[1], status=answer[0])

        return handler

    def _page(self, request: web.Request, objects: dict[str, dict[str, Any]]) -> Answer:
        """One page of a list, newest first (Stripe's order), filtered by `created[gte]`/`created[lt]`."""
        q = request.query
        try:
            gte, lt = int(q.get("created[gte]", 0)), int(q.get("created[lt]", 2**62))
            limit = int(q.get("limit", 10))
        except ValueError:
            return _error(400, "parameter_invalid_integer", "Invalid integer")
        if not 1 <= limit <= 100:
            return _error(400, "parameter_invalid_integer", "limit must be between 1 and 100")
        ordered = sorted(enumerate(objects.values()), key=lambda p: (-_created(p[1]), -p[0]))
        listed: list[dict[str, Any]] = []
        for _, obj in ordered:
            if gte <= _created(obj) < lt:
                listed.extend([obj, obj] if obj.get("id") in self.state.listed_twice else [obj])
        after = q.get("starting_after")
        if after is not None:
            ids = [o.get("id") for o in listed]
            if after not in ids:
                return _error(400, "resource_missing", f"No such object: {after}")
            listed = listed[ids.index(after) + 1 :]
        page = listed[:limit]
        return 200, {"object": "list", "url": request.path, "data": page, "has_more": len(listed) > limit}

    async def _intent(self, request: web.Request) -> web.Response:
        def make(p: dict[str, str]) -> Answer:
            intent_id = f"pi_{self.tag}{next(self.state.ids)}"
            intent = {"id": intent_id, "object": "payment_intent", "amount": int(p["amount"]),
                      "currency": p["currency"], "status": "succeeded", "refunded": 0,
                      "created": int(time.time())}  # fmt: skip
            self.state.intents[intent_id] = intent
            return 200, intent

        return await self._serve(request, make)

    async def _refund(self, request: web.Request) -> web.Response:
        def make(p: dict[str, str]) -> Answer:
            intent = self.state.intents.get(p.get("payment_intent", ""))
            if intent is None:
                return _error(404, "resource_missing", f"No such payment_intent: {p.get('payment_intent')}")
            amount = int(p.get("amount", intent["amount"] - intent["refunded"]))
            if amount <= 0 or intent["refunded"] + amount > intent["amount"]:
                return _error(400, "amount_too_large", "Refund amount exceeds what remains of the charge")
            intent["refunded"] += amount
            refund_id = f"re_{self.tag}{next(self.state.ids)}"
            refund = {"id": refund_id, "object": "refund", "amount": amount, "currency": intent["currency"],
                      "payment_intent": intent["id"], "status": "succeeded",
                      "created": int(time.time())}  # fmt: skip
            self.state.refunds[refund_id] = refund
            return 200, refund

        return await self._serve(request, make)

    async def _reversal(self, request: web.Request) -> web.Response:
        """A transfer reversal: at most what is left of the transfer (Stripe refuses more)."""
        transfer_id = request.match_info["transfer_id"]

        def make(p: dict[str, str]) -> Answer:
            transfer = self.state.transfers.get(transfer_id)
            if transfer is None:
                return _error(404, "resource_missing", f"No such transfer: {transfer_id}")
            amount = int(p.get("amount", transfer["amount"] - transfer.get("amount_reversed", 0)))
            if amount <= 0 or amount > transfer["amount"] - transfer.get("amount_reversed", 0):
                return _error(
                    400, "amount_too_large", "Reversal amount exceeds the transfer's unreversed amount"
                )
            transfer["amount_reversed"] = transfer.get("amount_reversed", 0) + amount
            reversal_id = f"trr_{self.tag}{next(self.state.ids)}"
            reversal = {"id": reversal_id, "object": "transfer_reversal", "amount": amount,
                        "currency": transfer["currency"], "transfer": transfer_id,
                        "created": int(time.time())}  # fmt: skip
            self.state.reversals[reversal_id] = reversal
            return 200, reversal

        return await self._serve(request, make)

    async def _transfer(self, request: web.Request) -> web.Response:
        def make(p: dict[str, str]) -> Answer:
            if not p.get("destination", "").startswith("acct_"):
                return _error(400, "resource_missing", f"No such destination: {p.get('destination')}")
            if p["destination"].startswith("acct_closed"):
                return _error(400, "account_closed", "The destination account cannot receive transfers")
            transfer_id = f"tr_{self.tag}{next(self.state.ids)}"
            transfer = {"id": transfer_id, "object": "transfer", "amount": int(p["amount"]),
                        "currency": p["currency"], "destination": p.get("destination"),
                        "created": int(time.time())}  # fmt: skip
            self.state.transfers[transfer_id] = transfer
            return 200, transfer

        return await self._serve(request, make)


def _created(obj: dict[str, Any]) -> int:
    created = obj.get("created", 0)
    return created if isinstance(created, int) else 0
