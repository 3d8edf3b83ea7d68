"""Where the Kafka consumer's events go: the node's finance service, or a node over HTTP.

`FinanceSink` (inside `ledger-node serve`) calls the same `FinanceService` methods as the HTTP
routes and records the same audit events (actor `kafka:{topic}`). `HttpSink` (`ledger-node consume`,
a separate process) posts each event to the node's own endpoints (`/finance/payment`, `/settlement`,
`/finance/refund`) with a service token, so the shard actors stay the single writers of their
accounts whatever runs the consumer.
"""

from __future__ import annotations

import asyncio
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
