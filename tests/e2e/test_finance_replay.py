"""A finance write retried by another principal after a crash between posting and storing.

The payment's journal id is derived from the request (`{invoice}.pay.{payment id}`), so the
journal stored before the crash is this request's; the ledger replays a journal id only for its
first principal, and the finance service recognises the same journal (same request hash) posted by
someone else as the replay. A different payload under the same reference still conflicts.
"""

from __future__ import annotations

from typing import Any

import asyncpg

from tests.e2e.test_errors import Client, expect_error, expect_ok, run
from tests.support.node import NodeHarness, check_store


def _pay(amount: int) -> dict[str, Any]:
    return {
        "invoiceId": "rp-1",
        "amount": amount,
        "currency": "EUR",
        "payment_provider": "bank",
        "provider_reference": "rp-bank-1",
    }


async def _crash(dsn: str, before: asyncpg.Record) -> None:
    """Undo what the payment stored after its journal was posted: the row and the invoice update."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("DELETE FROM payments WHERE invoice_id = 'rp-1'")
        await conn.execute(
            "UPDATE invoices SET status = $1, amount_paid = 0, body = $2::jsonb, journal_ids = $3,"
            " paid_at = NULL, version = version + 1 WHERE invoice_id = 'rp-1'",
            before["status"],
            before["body"],
            before["journal_ids"],
        )
    finally:
        await conn.close()


def test_a_retry_by_another_principal_after_a_crash_replays_the_payment(node: NodeHarness) -> None:
    """Tried: a payment by the operator whose row is lost after its journal was posted (the crash),
    retried by the service principal -> the original answer (same payment id and journal id, the
    invoice paid once, one journal); the same crash retried by the service with another amount ->
    409 IDEMPOTENCY_CONFLICT and nothing posted; the exact retry then completes; clean check."""

    async def flow(c: Client) -> None:
        invoice = {
            "invoice_id": "rp-1",
            "buyer": {"buyer_id": "rp-buyer", "country": "DE"},
            "line_items": [{"sku": "rp-sku", "qty": 1, "unit_price": 1000, "tax_code": "standard"}],
            "currency": "EUR",
        }
        total = expect_ok(await c.call("POST", "/finance/invoice", body=invoice), 201)["total"]
        conn = await asyncpg.connect(node.dsn)
        try:
            before = await conn.fetchrow(
                "SELECT status, body::text AS body, journal_ids FROM invoices WHERE invoice_id = 'rp-1'"
            )
        finally:
            await conn.close()
        first = expect_ok(await c.call("POST", "/finance/payment", role="operator", body=_pay(total)))
        assert first["status"] == "paid"

        await _crash(node.dsn, before)
        retry = expect_ok(await c.call("POST", "/finance/payment", role="service", body=_pay(total)))
        assert retry == first
        shown = expect_ok(await c.call("GET", "/finance/invoice/rp-1", role="auditor"))
        assert (shown["status"], shown["amount_paid"], shown["journal_ids"]) == (
            "paid",
            total,
            ["rp-1.issue", first["journal_id"]],
        )

        await _crash(node.dsn, before)
        other = await c.call("POST", "/finance/payment", role="service", body=_pay(total - 1))
        assert expect_error(other, 409, "IDEMPOTENCY_CONFLICT")["journal_id"] == first["journal_id"]
        conn = await asyncpg.connect(node.dsn)
        try:
            posted = await conn.fetchval("SELECT count(*) FROM journals WHERE journal_id LIKE 'rp-1.%'")
        finally:
            await conn.close()
        assert posted == 2  # the issue and the one payment journal
        again = expect_ok(await c.call("POST", "/finance/payment", role="admin", body=_pay(total)))
        assert again == first

    run(node, flow)
    assert node.run(check_store(node.dsn)) == []
