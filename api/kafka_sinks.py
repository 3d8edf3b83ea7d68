"""Where the Kafka consumer's events go: the node's finance service, or a node over HTTP.

`FinanceSink` (inside `ledger-node serve`) calls the same `FinanceService` methods as the HTTP
routes and records one `kafka.batch` audit event per batch (actor `kafka:{topic}`) listing what
the HTTP routes' per-call events carry for each payment and refund. `HttpSink` (`ledger-node consume`,
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

from api.audit_log import AUDIT_WRITER, audit_failures, journal_hashes
from api.finance_routes import FINANCE
from api.kafka_events import Outcome, PaymentEvent, Result, classify_answer, classify_error, payment_request
from api.services import SERVICES

log = logging.getLogger(__name__)
HTTP_TIMEOUT_S: Final = 30.0
AUDIT_KEYS: Final = ("invoice_id", "journal_id", "amount", "currency", "status")
BATCH_EVENT: Final = "kafka.batch"
"""The audit event type of the events a consumer batch posted (one per batch)."""


class FinanceSink:
    """Applies events through the application's finance service (in-process)."""

    def __init__(self, app: web.Application, topic: str) -> None:
        self.app = app
        self.principal = f"kafka:{topic}"

    async def apply(self, event: PaymentEvent) -> Result:
        """Post the event like the matching HTTP endpoint; its classified outcome (audited alone)."""
        result, answer = await self._apply(event)
        if answer is not None:
            await self._audit([(event, answer)])
        return result

    async def _apply(self, event: PaymentEvent) -> tuple[Result, dict[str, Any] | None]:
        """The event's outcome and, when it posted, its answer (not audited here)."""
        finance = self.app[FINANCE]
        request = payment_request(event)
        try:
            if event.type == "refund":
                answer, posted = await finance.refund(request, self.principal)
            else:
                answer, posted = await finance.pay(request, self.principal, event.settlement_id)
        except Exception as exc:
            return classify_error(exc), None
        if posted:
            return Result(Outcome.POSTED), answer
        return Result(Outcome.REPLAYED), None

    async def apply_many(self, events: list[PaymentEvent]) -> list[Result]:
        """The events' outcomes, as `apply` one by one in order would give them, in few ledger calls.

        Round by round: each invoice's payments (and settlements) up to its next refund go to
        `FinanceService.pay_many` together (one ledger call per step across invoices, one store
        transaction), then each invoice's refund through `refund`. After a RETRY the invoice's later
        events are not applied (RETRY `held`): the consumer retries them in order. The events that
        posted are recorded as one `kafka.batch` audit event (`_audit`).
        """
        finance = self.app[FINANCE]
        results: list[Result | None] = [None] * len(events)
        queues: dict[str, collections.deque[int]] = {}
        for index, event in enumerate(events):
            queues.setdefault(event.invoice_id, collections.deque()).append(index)
        answers: dict[int, dict[str, Any]] = {}

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
                    answers[index] = answer
                settle(index, Result(Outcome.POSTED if was_posted else Outcome.REPLAYED))
            refunds = [q.popleft() for q in queues.values() if q and events[q[0]].type == "refund"]
            for index, (result, refunded) in zip(
                refunds, await asyncio.gather(*(self._apply(events[i]) for i in refunds)), strict=True
            ):
                if refunded is not None:
                    answers[index] = refunded
                settle(index, result)
        await self._audit([(events[i], answers[i]) for i in sorted(answers)])
        return [r if r is not None else Result(Outcome.RETRY, "held") for r in results]

    async def _audit(self, posted: list[tuple[PaymentEvent, dict[str, Any]]]) -> None:
        """One `kafka.batch` audit event for the events that posted, queued (never raised; failures
        are logged and counted).

        DECISIONS: a batch call is one event listing its journal hashes. The payload lists, in the
        batch's order, per payment and per refund what the HTTP path's `payment.received` and
        `refund.issued` events carry, plus the Kafka `event_id` and the journal's `journal_hash`.
        """
        writer = self.app.get(AUDIT_WRITER)
        if writer is None or not posted:
            return
        metrics = self.app[SERVICES].metrics
        try:
            hashes = await journal_hashes(
                self.app[SERVICES].pool, [a["journal_id"] for _, a in posted if a["journal_id"]]
            )
        except Exception:  # the event is still worth recording: its ids name the journals
            log.exception("audit event %s: journal hashes not read; recorded without them", BATCH_EVENT)
            hashes = {}
        try:
            future = await writer.enqueue(self.principal, BATCH_EVENT, batch_payload(posted, hashes))
        except Exception:
            log.exception("audit event %s not recorded", BATCH_EVENT)
            audit_failures(metrics).labels(BATCH_EVENT).inc()
            return

        def settled(done: asyncio.Future[Any]) -> None:
            if not done.cancelled() and done.exception() is not None:
                log.error("audit event %s not recorded: %s", BATCH_EVENT, done.exception())
                audit_failures(metrics).labels(BATCH_EVENT).inc()

        future.add_done_callback(settled)
        if writer.answer_after_commit:
            await asyncio.wait([future])


def batch_payload(
    posted: list[tuple[PaymentEvent, dict[str, Any]]], hashes: dict[str, str]
) -> dict[str, Any]:
    """The `kafka.batch` payload: `{payments: [...], refunds: [...]}`, each entry the HTTP event's
    keys (`payment_id` or `refund_id`, invoice_id, journal_id, amount, currency, status,
    settlement_id) with `event_id` and `journal_hash` (hex; null without a journal, or when the
    hashes could not be read)."""
    payload: dict[str, list[dict[str, Any]]] = {"payments": [], "refunds": []}
    for event, answer in posted:
        kind = "refund" if event.type == "refund" else "payment"
        entry = {k: answer[k] for k in (f"{kind}_id", *AUDIT_KEYS)}
        entry.update(
            event_id=event.event_id,
            settlement_id=event.settlement_id,
            journal_hash=hashes.get(answer["journal_id"]) if answer["journal_id"] else None,
        )
        payload[f"{kind}s"].append(entry)
    return payload


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
