"""Outbound refunds through the official `stripe` SDK against the Stripe-compatible loopback server:
idempotency keys make retries safe, and errors are classified for the callers."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from finance.stripe_gateway import PermanentProviderError, RefundResult, StripeGateway, TransientProviderError
from tests.support.stripe_server import StripeServer


def _with_gateway(body: Callable[[StripeServer, StripeGateway], Awaitable[None]], retries: int = 0) -> None:
    async def main() -> None:
        server = await StripeServer().start()
        gateway = StripeGateway(server.api_key, server.base, network_retries=retries)
        try:
            await body(server, gateway)
        finally:
            await gateway.close()
            await server.stop()

    asyncio.run(main())


async def _intent(server: StripeServer, gateway: StripeGateway, amount: int) -> str:
    intent = await gateway.client.v1.payment_intents.create_async(
        params={"amount": amount, "currency": "eur"}
    )
    return str(intent.id)


def test_refund_and_its_retry_move_money_once() -> None:
    """Tried: refund 300 of a 1,000 payment intent, then the same call again with the same key ->
    the same refund id both times and 300 refunded in all; a second key refunds again."""

    async def body(server: StripeServer, gateway: StripeGateway) -> None:
        intent = await _intent(server, gateway, 1000)
        first = await gateway.refund(intent, 300, "inv-1.refund.1")
        again = await gateway.refund(intent, 300, "inv-1.refund.1")
        assert first == again and isinstance(first, RefundResult)
        assert (first.amount, first.currency, first.status) == (300, "EUR", "succeeded")
        assert server.state.intents[intent]["refunded"] == 300 and len(server.state.refunds) == 1
        await gateway.refund(intent, 200, "inv-1.refund.2")
        assert server.state.intents[intent]["refunded"] == 500

    _with_gateway(body)


def test_errors_are_classified() -> None:
    """Tried: a refund above what remains (400) and of an unknown intent (404) -> permanent; a 500 and a
    429 from the provider -> transient; then the same key succeeds once the provider recovers."""

    async def body(server: StripeServer, gateway: StripeGateway) -> None:
        intent = await _intent(server, gateway, 1000)
        with pytest.raises(PermanentProviderError, match="400"):
            await gateway.refund(intent, 5000, "k-too-much")
        with pytest.raises(PermanentProviderError, match="404"):
            await gateway.refund("pi_unknown", 10, "k-unknown")
        for status in (500, 429):
            server.fail_next(status)
            with pytest.raises(TransientProviderError):
                await gateway.refund(intent, 100, "k-retry")
        done = await gateway.refund(intent, 100, "k-retry")
        assert done.amount == 100 and server.state.intents[intent]["refunded"] == 100

    _with_gateway(body)


def test_sdk_network_retries_reuse_the_key() -> None:
    """Tried: with SDK retries on, the provider fails once with 500 -> the SDK retries with the same
    idempotency key and the refund happens once."""

    async def body(server: StripeServer, gateway: StripeGateway) -> None:
        intent = await _intent(server, gateway, 1000)
        server.fail_next(500)
        done = await gateway.refund(intent, 250, "k-sdk-retry")
        assert done.amount == 250 and server.state.intents[intent]["refunded"] == 250
        refund_calls = [params for path, params in server.state.calls if path == "/v1/refunds"]
        assert len(refund_calls) == 2

    _with_gateway(body, retries=2)
