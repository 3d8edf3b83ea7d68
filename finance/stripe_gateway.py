"""Outbound calls to Stripe through the official SDK (`stripe.StripeClient`, async over aiohttp).

`STRIPE_API_BASE` points the SDK at Stripe or, in tests, at the Stripe-compatible server on loopback
(`tests/support/stripe_server.py`). Every call carries an idempotency key derived from the ledger's
own ids, so a retry (the SDK's bounded network retries, or ours after a crash) never moves money
twice: Stripe answers a repeated key with the first result.

Errors are classified for the callers: `TransientProviderError` (network, 429, 5xx: retry later with
the same key) and `PermanentProviderError` (4xx: the request itself is wrong; record the reason).
"""

from __future__ import annotations

import os
from typing import Any, Final

import msgspec
import stripe

DEFAULT_API_BASE: Final = "https://api.stripe.com"
NETWORK_RETRIES: Final = 2
TIMEOUT_S: Final = 80.0


class ProviderError(Exception):
    """A call to the payment provider failed."""


class TransientProviderError(ProviderError):
    """Worth retrying later with the same idempotency key."""


class PermanentProviderError(ProviderError):
    """The provider refused the request; retrying it unchanged will not help."""


class ProviderDataError(PermanentProviderError):
    """The provider answered something that is not its API's JSON (a body that cannot be parsed)."""


LIST_PAGE_SIZE: Final = 100
LISTED: Final = {"payment": "payment_intents", "refund": "refunds", "payout": "transfers"}
"""What reconciliation lists, by record kind: the `StripeClient.v1` service of each."""


class RefundResult(msgspec.Struct, frozen=True):
    """A refund as the provider recorded it."""

    refund_id: str
    payment_intent: str
    amount: int
    currency: str
    status: str


class TransferResult(msgspec.Struct, frozen=True):
    """A Connect transfer to a connected account as the provider recorded it."""

    transfer_id: str
    destination: str
    amount: int
    currency: str


class ReversalResult(msgspec.Struct, frozen=True):
    """A reversal of (part of) a Connect transfer as the provider recorded it."""

    reversal_id: str
    transfer_id: str
    amount: int
    currency: str


def _classify(exc: Exception) -> ProviderError:
    """Transient (network, timeout, 429, 5xx), data (a 2xx body that is not JSON) or permanent
    (other 4xx) provider error."""
    if isinstance(exc, stripe.APIError) and 200 <= (exc.http_status or 0) < 300:
        return ProviderDataError(f"unreadable answer from the provider: {exc.user_message or exc}"[:500])
    if isinstance(exc, (stripe.APIConnectionError, stripe.RateLimitError)):
        return TransientProviderError(f"{type(exc).__name__}: {exc.user_message or exc}")
    if isinstance(exc, stripe.StripeError):
        status = exc.http_status or 0
        kind = TransientProviderError if status >= 500 else PermanentProviderError
        return kind(f"{type(exc).__name__} ({status}): {exc.user_message or exc}")
    return TransientProviderError(f"{type(exc).__name__}: {exc}")


class StripeGateway:
    """The provider calls the finance flows make: refunds, and Connect transfers for payouts."""

    def __init__(
        self,
        api_key: str,
        api_base: str = DEFAULT_API_BASE,
        network_retries: int = NETWORK_RETRIES,
        timeout_s: float = TIMEOUT_S,
    ):
        self.http = stripe.AIOHTTPClient(timeout=timeout_s)
        self.client = stripe.StripeClient(
            api_key,
            base_addresses={"api": api_base},
            http_client=self.http,
            max_network_retries=network_retries,
        )

    @classmethod
    def from_env(
        cls, network_retries: int = NETWORK_RETRIES, timeout_s: float = TIMEOUT_S
    ) -> StripeGateway | None:
        """From `STRIPE_API_KEY` and `STRIPE_API_BASE`; None without a key (no outbound calls configured)."""
        key = os.environ.get("STRIPE_API_KEY")
        if not key:
            return None
        base = os.environ.get("STRIPE_API_BASE") or DEFAULT_API_BASE
        return cls(key, base, network_retries=network_retries, timeout_s=timeout_s)

    async def refund(self, payment_intent: str, amount: int, idempotency_key: str) -> RefundResult:
        """Refund `amount` minor units of a payment intent; the same key always names the same refund."""
        try:
            refund = await self.client.v1.refunds.create_async(
                params={"payment_intent": payment_intent, "amount": amount},
                options={"idempotency_key": idempotency_key},
            )
        except (stripe.APIConnectionError, stripe.RateLimitError) as exc:
            raise TransientProviderError(f"{type(exc).__name__}: {exc.user_message or exc}") from exc
        except stripe.StripeError as exc:
            status = exc.http_status or 0
            kind = TransientProviderError if status >= 500 else PermanentProviderError
            raise kind(f"{type(exc).__name__} ({status}): {exc.user_message or exc}") from exc
        return RefundResult(
            str(refund.id),
            str(refund.payment_intent),
            int(refund.amount),
            str(refund.currency).upper(),
            str(refund.status),
        )

    async def transfer(
        self,
        destination: str,
        amount: int,
        currency: str,
        idempotency_key: str,
        metadata: dict[str, str] | None = None,
    ) -> TransferResult:
        """A Connect transfer of `amount` minor units to a connected account; the same key always
        names the same transfer (a retry after a timeout answers the first one)."""
        params: dict[str, Any] = {"destination": destination, "amount": amount, "currency": currency.lower()}
        if metadata:
            params["metadata"] = metadata
        try:
            transfer = await self.client.v1.transfers.create_async(
                params=params,  # type: ignore[arg-type]
                options={"idempotency_key": idempotency_key},
            )
        except Exception as exc:
            raise _classify(exc) from exc
        return TransferResult(
            str(transfer.id), str(transfer.destination), int(transfer.amount), str(transfer.currency).upper()
        )

    async def reverse_transfer(self, transfer_id: str, amount: int, idempotency_key: str) -> ReversalResult:
        """Take `amount` minor units of a Connect transfer back from the connected account; the same
        key always names the same reversal."""
        try:
            reversal = await self.client.v1.transfers.reversals.create_async(
                transfer_id, params={"amount": amount}, options={"idempotency_key": idempotency_key}
            )
        except Exception as exc:
            raise _classify(exc) from exc
        return ReversalResult(
            str(reversal.id), str(reversal.transfer), int(reversal.amount), str(reversal.currency).upper()
        )

    async def list_created(self, kind: str, created_gte: int, created_lt: int) -> list[dict[str, Any]]:
        """Every object of a kind (`LISTED`) created in `[created_gte, created_lt)` (Unix seconds),
        newest first, as plain JSON dicts; the SDK's auto-paging follows `has_more` with
        `starting_after`. Raises `ProviderError` (`ProviderDataError` for an unreadable body)."""
        service = getattr(self.client.v1, LISTED[kind])
        params = {"created": {"gte": created_gte, "lt": created_lt}, "limit": LIST_PAGE_SIZE}
        found: list[dict[str, Any]] = []
        try:
            page = await service.list_async(params=params)
            async for obj in page.auto_paging_iter():
                found.append(obj.to_dict() if isinstance(obj, stripe.StripeObject) else obj)
        except (ValueError, TypeError, AttributeError, KeyError) as exc:  # a page the SDK cannot walk
            raise ProviderDataError(f"unreadable {LISTED[kind]} page: {type(exc).__name__}: {exc}") from exc
        except Exception as exc:
            raise _classify(exc) from exc
        return found

    async def close(self) -> None:
        """Release the HTTP session."""
        await self.http.close_async()  # type: ignore[no-untyped-call]
