"""Where the Kafka consumer's events go: the node's finance service, or a node over HTTP.

`FinanceSink` (inside `ledger-node serve`) calls the same `FinanceService` methods as the HTTP
routes and records the same audit events (actor `kafka:{topic}`). `HttpSink` (`ledger-node consume`,
a separate process) posts each event to the node's own endpoints (`/finance/payment`, `/settlement`,
`/finance/refund`) with a service token, so the shard actors stay the single writers of their
accounts whatever runs the consumer.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Any, Final

import aiohttp
from aiohttp import web

from api.audit_log import AUDIT_WRITER
from api.finance_routes import FINANCE
from api.kafka_events import Outcome, PaymentEvent, Result, classify_answer, classify_error, payment_request

log = logging.getLogger(__name__)
HTTP_TIMEOUT_S: Final = 30.0
AUDIT_KEYS: Final = ("invoice_id", "journal_id", "amount", "currency", "status")


class FinanceSink:
    """Applies events through the application's finance service (in-process)."""

    def __init__(self, app: web.Application, topic: str) -> None:
        self.app = app
        self.principal = f"kafka:{topic}"

    async def apply(self, event: PaymentEvent) -> Result:
        """Post the event like the matching HTTP endpoint; its classified outcome."""
        finance = self.app[FINANCE]
        request = payment_request(event)
        try:
            if event.type == "refund":
                answer, posted = await finance.refund(request, self.principal)
            else:
                answer, posted = await finance.pay(request, self.principal, event.settlement_id)
        except Exception as exc:
            return classify_error(exc)
        if posted:
            await self._audit(event, answer)
        return Result(Outcome.POSTED if posted else Outcome.REPLAYED)

    async def apply_many(self, events: list[PaymentEvent]) -> list[Result]:
        """The events' outcomes, as `apply` one by one in order would give them, in few ledger calls.

        Round by round: each invoice's payments (and settlements) up to its next refund go to
        `FinanceService.pay_many` together (one ledger call per step across invoices, one store
        transaction), then each invoice's refund through `refund`. After a RETRY the invoice's later
        events are not applied (RETRY `held`): the consumer retries them in order.
        """
        finance = self.app[FINANCE]
        results: list[Result | None] = [None] * len(events)
        queues: dict[str, collections.deque[int]] = {}
        for index, event in enumerate(events):
            queues.setdefault(event.invoice_id, collections.deque()).append(index)
        posted: list[tuple[PaymentEvent, dict[str, Any]]] = []

        def settle(index: int, result: Result) -> None:
            results[index] = result
            if result.outcome == Outcome.RETRY:
                queue = queues[events[index].invoice_id]
                for later in queue:
                    results[later] = Result(
                        Outcome.RETRY, "held", None, "an earlier event of the invoice is retried"
                    )
                queue.clear()

        while any(queues.values()):
            run = [q.popleft() for q in queues.values() for _ in range(_payments_ahead(q, events))]
            items = [(payment_request(events[i]), events[i].settlement_id) for i in run]
            outcomes = await finance.pay_many(items, self.principal, _halts) if items else []
            for index, outcome in zip(run, outcomes, strict=True):
                if outcome is None:
                    settle(
                        index, Result(Outcome.RETRY, "held", None, "an earlier event of the invoice failed")
                    )
                    continue
                if isinstance(outcome, BaseException):
                    settle(index, classify_error(outcome))
                    continue
                answer, was_posted = outcome
                if was_posted:
                    posted.append((events[index], answer))
                settle(index, Result(Outcome.POSTED if was_posted else Outcome.REPLAYED))
            refunds = [q.popleft() for q in queues.values() if q and events[q[0]].type == "refund"]
            for index, result in zip(
                refunds, await asyncio.gather(*(self.apply(events[i]) for i in refunds)), strict=True
            ):
                settle(index, result)
        await asyncio.gather(*(self._audit(event, answer) for event, answer in posted))
        return [r if r is not None else Result(Outcome.RETRY, "held") for r in results]

    async def _audit(self, event: PaymentEvent, answer: dict[str, Any]) -> None:
        """The HTTP path's audit event, queued (never raised; failures are logged)."""
        writer = self.app.get(AUDIT_WRITER)
        if writer is None:
            return
        kind = "refund" if event.type == "refund" else "payment"
        payload = {k: answer[k] for k in (f"{kind}_id", *AUDIT_KEYS)}
        payload.update(event_id=event.event_id, settlement_id=event.settlement_id)
        event_type = "refund.issued" if kind == "refund" else "payment.received"
        try:
            future = await writer.enqueue(self.principal, event_type, payload)
        except Exception:
            log.exception("audit event %s not recorded", event_type)
            return
        if writer.answer_after_commit:
            await asyncio.wait([future])


def _payments_ahead(queue: collections.deque[int], events: list[PaymentEvent]) -> int:
    """How many of the queue's first events are payments or settlements (before a refund)."""
    count = 0
    for index in queue:
        if events[index].type == "refund":
            break
        count += 1
    return count


def _halts(exc: BaseException) -> bool:
    """An invoice's later events wait when one is retried (classified like `apply`)."""
    return classify_error(exc).outcome == Outcome.RETRY


def http_request(event: PaymentEvent) -> tuple[str, dict[str, Any]]:
    """The endpoint and body the HTTP path takes for this event."""
    if event.type == "settlement":
        payment = {
            "provider": event.provider,
            "reference": event.provider_reference,
            "amount_cents": event.amount,
            "currency": event.currency,
        }
        settlement: dict[str, Any] = {
            "settlement_id": event.settlement_id,
            "invoice_id": event.invoice_id,
            "payment": payment,
        }
        return "/settlement", settlement
    body: dict[str, Any] = {
        "amount": event.amount,
        "currency": event.currency,
        "payment_provider": event.provider,
        "provider_reference": event.provider_reference,
        "invoice_id": event.invoice_id,
    }
    return ("/finance/refund" if event.type == "refund" else "/finance/payment"), body


class HttpSink:
    """Applies events by posting them to a node (`ledger-node consume --url`)."""

    def __init__(self, base_url: str, token: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"}
        self.session: aiohttp.ClientSession | None = None

    async def apply(self, event: PaymentEvent) -> Result:
        """POST the event; connection failures and 5xx are RETRY, final rejections POISON."""
        if self.session is None:
            timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)
            self.session = aiohttp.ClientSession(timeout=timeout, headers=self.headers)
        path, body = http_request(event)
        try:
            async with self.session.post(self.base_url + path, json=body) as resp:
                status = resp.status
                answer = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            return Result(Outcome.RETRY, "unavailable", None, f"{type(exc).__name__}: {exc}")
        if not isinstance(answer, dict):
            return Result(Outcome.RETRY, "unavailable", None, f"HTTP {status}: not an envelope")
        return classify_answer(status, answer)

    async def close(self) -> None:
        """Close the HTTP session."""
        if self.session is not None:
            await self.session.close()
            self.session = None
