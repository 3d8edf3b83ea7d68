"""Invoices and payments over real HTTP: priced, stored, and posted through the ledger.

Issue accrues AR against deferred revenue and tax payable; payments debit cash and credit AR
(beyond the total: customer credit); fulfilment moves deferred revenue to revenue. Balances are
read back from the ledger, so each test checks what an accountant would see.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

from finance.service import FinanceService, Posted, payment_id_of
from ledger.errors import Rejection
from ledger.journal import Journal
from tests.e2e.test_errors import Client, expect_error, expect_ok, run
from tests.support.node import NodeHarness, check_store, journal


async def _balance(c: Client, account_id: str, currency: str = "EUR") -> int:
    """The account's normal balance in `currency` (0 for an account never booked)."""
    reply = await c.balances(account_id)
    if reply.status == 404:
        return 0
    for row in expect_ok(reply)["balances"]:
        if row["currency"] == currency:
            return int(row["balance"])
    return 0


def _invoice(buyer: str, country: str, skus: tuple[str, str], **extra: Any) -> dict[str, Any]:
    return {
        "buyer": {"buyer_id": buyer, "country": country},
        "line_items": [
            {"sku": skus[0], "qty": 3, "unit_price": 1000, "tax_code": "standard"},
            {"sku": skus[1], "qty": 1, "unit_price": 999, "tax_code": "ebook"},
        ],
        "currency": "EUR",
        "due_date": "2026-12-31",
        "terms": "net 30",
        **extra,
    }


def _pay(invoice_id: str, amount: int, reference: str) -> dict[str, Any]:
    return {
        "invoiceId": invoice_id,
        "amount": amount,
        "currency": "EUR",
        "payment_provider": "stripe",
        "provider_reference": reference,
    }


def test_invoice_lifecycle_posts_accruals_payments_and_revenue(node: NodeHarness) -> None:
    """Tried: a DE invoice issued at once (client tax matching) and an FR draft issued later ->
    AR / deferred revenue / tax payable equal the invoices; the issue journal carries the
    invoice hash; a partial payment, its duplicate (same answer, one journal), the same reference
    with another amount (409), the rest plus 500 over (customer credit); void after payment ->
    409 INVALID_STATE {current, requested}; fulfil -> revenue; close; void of the unpaid FR
    invoice reverses its accrual; Idempotency-Key replay and conflict; audit events; clean check."""

    async def flow(c: Client) -> None:
        de_tax_before = await _balance(c, "liability:tax-payable:DE")
        fr_tax_before = await _balance(c, "liability:tax-payable:FR")
        de = expect_ok(
            await c.call(
                "POST",
                "/finance/invoice",
                body=_invoice("lc-buyer-de", "DE", ("lc-de-a", "lc-de-b"), invoice_id="lc-de-1", tax=640),
            ),
            201,
        )
        assert (de["invoiceId"], de["invoice_id"], de["status"]) == ("lc-de-1", "lc-de-1", "issued")
        assert (de["subtotal"], de["tax"], de["total"], de["amount_due"]) == (3999, 640, 4639, 4639)
        assert de["journal_ids"] == ["lc-de-1.issue"]
        assert de["line_items"][0]["evidence"]["jurisdiction"] == "DE"
        fr = expect_ok(
            await c.call(
                "POST",
                "/finance/invoice",
                body=_invoice("lc-buyer-fr", "FR", ("lc-fr-a", "lc-fr-b"), invoiceId="lc-fr-1", draft=True),
            ),
            201,
        )
        assert (fr["status"], fr["journal_ids"], fr["total"]) == ("draft", [], 4654)
        assert await _balance(c, "asset:ar:lc-buyer-fr") == 0
        fr = expect_ok(await c.call("POST", "/finance/invoice/lc-fr-1/issue"))
        assert (fr["status"], fr["journal_id"]) == ("issued", "lc-fr-1.issue")

        assert await _balance(c, "asset:ar:lc-buyer-de") == 4639
        assert await _balance(c, "liability:deferred-revenue:lc-de-a") == 3000
        assert await _balance(c, "liability:deferred-revenue:lc-de-b") == 999
        assert await _balance(c, "liability:tax-payable:DE") - de_tax_before == 640
        assert await _balance(c, "asset:ar:lc-buyer-fr") == 4654
        assert await _balance(c, "liability:tax-payable:FR") - fr_tax_before == 655
        issued = expect_ok(await c.call("GET", "/ledger/lc-de-1.issue", role="auditor"))["journal"]
        assert issued["context"]["invoice_hash"] == de["document_hash"]

        # partial payment, its duplicate, a conflicting reuse of the reference
        first = expect_ok(await c.call("POST", "/finance/payment", body=_pay("lc-de-1", 2000, "pi_lc_1")))
        payment_id = payment_id_of("stripe", "pi_lc_1")
        assert (first["paymentId"], first["payment_id"]) == (payment_id, payment_id)
        assert (first["status"], first["amount_due"]) == ("issued", 2639)
        assert first["journal_id"] == f"lc-de-1.pay.{payment_id}"
        again = expect_ok(await c.call("POST", "/finance/payment", body=_pay("lc-de-1", 2000, "pi_lc_1")))
        assert again == first
        assert await _balance(c, "asset:ar:lc-buyer-de") == 2639
        assert await _balance(c, "asset:cash:stripe:EUR") == 2000
        conflict = await c.call("POST", "/finance/payment", body=_pay("lc-de-1", 2001, "pi_lc_1"))
        assert expect_error(conflict, 409, "IDEMPOTENCY_CONFLICT")["payment_id"] == payment_id

        # the rest plus an overpayment of 500
        rest = expect_ok(await c.call("POST", "/finance/payment", body=_pay("lc-de-1", 3139, "pi_lc_2")))
        assert (rest["status"], rest["amount_due"], rest["customer_credit"]) == ("paid", 0, 500)
        assert await _balance(c, "asset:ar:lc-buyer-de") == 0
        assert await _balance(c, "liability:customer-credit:lc-buyer-de") == 500
        assert await _balance(c, "asset:cash:stripe:EUR") == 5139

        details = expect_error(await c.call("POST", "/finance/invoice/lc-de-1/void"), 409, "INVALID_STATE")
        assert (details["current"], details["requested"]) == ("paid", "voided")

        done = expect_ok(await c.call("POST", "/finance/fulfill", body={"invoiceId": "lc-de-1"}))
        assert (done["status"], done["journal_id"]) == ("fulfilled", "lc-de-1.fulfil")
        assert await _balance(c, "liability:deferred-revenue:lc-de-a") == 0
        assert await _balance(c, "revenue:sales:lc-de-a") == 3000
        assert await _balance(c, "revenue:sales:lc-de-b") == 999
        closed = expect_ok(await c.call("POST", "/finance/invoice/lc-de-1/close", role="operator"))
        assert closed["status"] == "closed"
        shown = expect_ok(await c.call("GET", "/finance/invoice/lc-de-1", role="auditor"))
        assert shown["journal_ids"] == [
            "lc-de-1.issue",
            first["journal_id"],
            rest["journal_id"],
            "lc-de-1.fulfil",
        ]
        assert (shown["amount_paid"], shown["customer_credit"], shown["status"]) == (5139, 500, "closed")
        assert shown["issued_at"] and shown["paid_at"] and shown["closed_at"]

        voided = expect_ok(await c.call("POST", "/finance/invoice/lc-fr-1/void"))
        assert (voided["status"], voided["journal_id"]) == ("voided", "lc-fr-1.void")
        assert await _balance(c, "asset:ar:lc-buyer-fr") == 0
        assert await _balance(c, "liability:tax-payable:FR") == fr_tax_before

        # Idempotency-Key: a replay answers the original; another payload under the key -> 409
        body = _invoice("lc-buyer-key", "DE", ("lc-key-a", "lc-key-b"))
        keyed = {"Idempotency-Key": "lc-key-1"}
        made = expect_ok(await c.call("POST", "/finance/invoice", body=body, headers=keyed), 201)
        replay = expect_ok(await c.call("POST", "/finance/invoice", body=body, headers=keyed), 201)
        assert replay == made
        assert await _balance(c, "asset:ar:lc-buyer-key") == 4639
        other = await c.call("POST", "/finance/invoice", body={**body, "terms": "net 60"}, headers=keyed)
        expect_error(other, 409, "IDEMPOTENCY_CONFLICT")

        events = expect_ok(await c.call("GET", "/audit/events", role="auditor", params={"limit": "1000"}))
        types = {e["event_type"] for e in events["events"]}
        expected = {"invoice.created", "invoice.issued", "payment.received", "invoice.fulfilled"}
        assert expected | {"invoice.closed", "invoice.voided"} <= types

    run(node, flow)
    assert node.run(check_store(node.dsn)) == []


def test_settlement_and_recorded_invoices(node: NodeHarness) -> None:
    """Tried: POST /settlement paying an issued invoice in full (posted, journal id; a replay
    answers the same, the same reference under another settlement_id 409); POST /invoices against
    an existing journal (201, then 200 on replay, 409 with another amount) and against an unknown
    one (404 journal)."""

    async def flow(c: Client) -> None:
        made = expect_ok(
            await c.call(
                "POST",
                "/finance/invoice",
                body=_invoice("st-buyer", "FR", ("st-a", "st-b"), invoice_id="st-1"),
            ),
            201,
        )
        settlement = {
            "settlement_id": "sett-st-1",
            "invoice_id": "st-1",
            "payment": {
                "provider": "stripe",
                "reference": "pi_st_1",
                "amount_cents": made["total"],
                "currency": "EUR",
            },
            "context": {"order_id": "order-st-1"},
        }
        settled = expect_ok(await c.call("POST", "/settlement", body=settlement))
        assert (settled["settlement_id"], settled["status"]) == ("sett-st-1", "posted")
        assert settled["journal_id"] == f"st-1.pay.{payment_id_of('stripe', 'pi_st_1')}"
        assert settled["invoice_status"] == "paid"
        assert expect_ok(await c.call("POST", "/settlement", body=settlement)) == settled
        other = {**settlement, "settlement_id": "sett-st-2"}
        expect_error(await c.call("POST", "/settlement", body=other), 409, "IDEMPOTENCY_CONFLICT")
        assert await _balance(c, "asset:ar:st-buyer") == 0

        expect_ok(await c.post(journal("st-jrn-1", "asset:st-cash", "revenue:st-sales", 19999)))
        record = {
            "invoice_id": "st-ext-1",
            "journal_ref": "st-jrn-1",
            "amount_cents": 19999,
            "currency": "USD",
            "payer": {"id": "buyer:1", "name": "Acme"},
            "due_date": "2025-12-17",
        }
        assert expect_ok(await c.call("POST", "/invoices", body=record), 201)["invoice_id"] == "st-ext-1"
        expect_ok(await c.call("POST", "/invoices", body=record), 200)
        expect_error(
            await c.call("POST", "/invoices", body={**record, "amount_cents": 1}), 409, "IDEMPOTENCY_CONFLICT"
        )
        shown = expect_ok(await c.call("GET", "/finance/invoice/st-ext-1", role="auditor"))
        assert (shown["kind"], shown["status"], shown["ledger_entries"]) == (
            "external",
            "issued",
            ["st-jrn-1"],
        )
        missing = await c.call(
            "POST", "/invoices", body={**record, "invoice_id": "st-ext-2", "journal_ref": "nope"}
        )
        assert expect_error(missing, 404, "NOT_FOUND")["resource"] == "journal"
        details = expect_error(await c.call("POST", "/finance/invoice/st-ext-1/void"), 409, "INVALID_STATE")
        assert details["current"] == "issued"

    run(node, flow)
    assert node.run(check_store(node.dsn)) == []


def test_bad_finance_requests_get_precise_errors(node: NodeHarness) -> None:
    """Tried: unknown tax_code, qty 0, a client tax differing from the computed one, an unknown
    field, an invoice id over 150 characters, an unknown invoice (GET, payment, issue, fulfil), a
    payment in another currency, the auditor writing -> 400 / 404 / 403 with the offending field;
    nothing is stored or posted."""

    async def flow(c: Client) -> None:
        body = _invoice("bad-buyer", "DE", ("bad-a", "bad-b"), invoice_id="bad-1")
        unknown_code = {**body, "line_items": [{**body["line_items"][0], "tax_code": "nope"}]}
        reply = await c.call("POST", "/finance/invoice", body=unknown_code)
        expect_error(reply, 400, "VALIDATION_ERROR", "$.line_items[0].tax_code")
        zero = {**body, "line_items": [{**body["line_items"][0], "qty": 0}]}
        expect_error(
            await c.call("POST", "/finance/invoice", body=zero),
            400,
            "VALIDATION_ERROR",
            "$.line_items[0].qty",
        )
        details = expect_error(
            await c.call("POST", "/finance/invoice", body={**body, "tax": 641}),
            400,
            "VALIDATION_ERROR",
            "$.tax",
        )
        assert details["computed"] == 640
        expect_error(
            await c.call("POST", "/finance/invoice", body={**body, "colour": "red"}), 400, "VALIDATION_ERROR"
        )
        expect_error(
            await c.call("POST", "/finance/invoice", body=body, role="auditor"), 403, "NOT_AUTHORIZED"
        )
        for reply in (
            await c.call("GET", "/finance/invoice/bad-1", role="auditor"),
            await c.call("POST", "/finance/payment", body=_pay("bad-1", 10, "pi_bad_1")),
            await c.call("POST", "/finance/invoice/bad-1/issue"),
        ):
            assert expect_error(reply, 404, "NOT_FOUND")["resource"] == "invoice"
        expect_error(await c.call("POST", "/finance/fulfill", body={"invoiceId": "bad-1"}), 404, "NOT_FOUND")
        long_id = await c.call("POST", "/finance/invoice", body={**body, "invoice_id": "x" * 151})
        expect_error(long_id, 400, "VALIDATION_ERROR", "$.invoiceId")
        await c.absent_account("asset:ar:bad-buyer")

        expect_ok(await c.call("POST", "/finance/invoice", body=body), 201)
        usd = {**_pay("bad-1", 10, "pi_bad_2"), "currency": "USD"}  # no USD/EUR rate on this node
        missing = expect_error(await c.call("POST", "/finance/payment", body=usd), 422, "FX_RATE_MISSING")
        assert missing["quote"] == "EUR"
        unknown = {**_pay("bad-1", 10, "pi_bad_2"), "currency": "ZZZ"}
        expect_error(
            await c.call("POST", "/finance/payment", body=unknown), 400, "VALIDATION_ERROR", "$.currency"
        )
        expect_error(
            await c.call("POST", "/finance/payment", body=_pay("bad-1", 0, "pi_bad_3")),
            400,
            "VALIDATION_ERROR",
        )
        details = expect_error(await c.call("POST", "/finance/invoice/bad-1/issue"), 409, "INVALID_STATE")
        assert (details["current"], details["requested"]) == ("issued", "issued")
        assert await _balance(c, "asset:ar:bad-buyer") == 4639

    run(node, flow)


def test_refunds_concurrent_payments_and_crash_replay(node: NodeHarness) -> None:
    """Tried: pay 500 over, refund 700 (500 of customer credit, 200 against the invoice with tax in
    proportion), its duplicate, a refund beyond what is left (409 REFUND_EXCEEDS_PAID); five
    payments at once on one invoice (serialised, amounts add up); an issue whose row update was
    lost (crash after posting) -> the retry replays the journal, nothing is posted twice."""

    async def flow(c: Client) -> None:
        body = _invoice("rf-buyer", "DE", ("rf-a", "rf-b"), invoice_id="rf-1")
        expect_ok(await c.call("POST", "/finance/invoice", body=body), 201)
        pay = {**_pay("rf-1", 5139, "pi_rf_1"), "payment_provider": "rfpay"}
        expect_ok(await c.call("POST", "/finance/payment", body=pay))
        refund = {**_pay("rf-1", 700, "re_rf_1"), "payment_provider": "rfpay"}
        done = expect_ok(await c.call("POST", "/finance/refund", body=refund))
        assert (done["status"], done["credit"], done["net"] + done["tax"]) == ("refunded", 500, 200)
        assert done["tax"] == 28  # round_half_even(200 * 640 / 4639)
        assert expect_ok(await c.call("POST", "/finance/refund", body=refund)) == done
        assert await _balance(c, "asset:cash:rfpay:EUR") == 5139 - 700
        assert await _balance(c, "liability:customer-credit:rf-buyer") == 0
        deferred = await _balance(c, "liability:deferred-revenue:rf-a") + await _balance(
            c, "liability:deferred-revenue:rf-b"
        )
        assert deferred == 3999 - done["net"]
        too_much = {**refund, "provider_reference": "re_rf_2", "amount": 5000}
        expect_error(await c.call("POST", "/finance/refund", body=too_much), 409, "REFUND_EXCEEDS_PAID")
        shown = expect_ok(await c.call("GET", "/finance/invoice/rf-1", role="auditor"))
        assert (shown["amount_refunded"], len(shown["refunds"])) == (700, 1)

        expect_ok(
            await c.call("POST", "/finance/invoice", body={**body, "invoice_id": "rf-2", "draft": True}), 201
        )
        expect_ok(await c.call("POST", "/finance/invoice/rf-2/issue"))
        parts = [c.call("POST", "/finance/payment", body=_pay("rf-2", 1000, f"pi_rf2_{n}")) for n in range(5)]
        for reply in await asyncio.gather(*parts):
            expect_ok(reply)
        shown = expect_ok(await c.call("GET", "/finance/invoice/rf-2", role="auditor"))
        assert (shown["amount_paid"], shown["status"], len(shown["payments"])) == (5000, "paid", 5)
        assert shown["customer_credit"] == 5000 - 4639

        # the crash: the issue journal was posted but the row update was lost
        expect_ok(
            await c.call("POST", "/finance/invoice", body={**body, "invoice_id": "rf-3", "draft": True}), 201
        )
        conn = await asyncpg.connect(node.dsn)
        try:
            draft = await conn.fetchrow("SELECT body, version FROM invoices WHERE invoice_id = 'rf-3'")
            expect_ok(await c.call("POST", "/finance/invoice/rf-3/issue"))
            await conn.execute(
                "UPDATE invoices SET status = 'draft', body = $1::jsonb, journal_ids = '{}', version = $2"
                " WHERE invoice_id = 'rf-3'",
                draft["body"],
                draft["version"],
            )
            again = expect_ok(await c.call("POST", "/finance/invoice/rf-3/issue"))
            assert (again["status"], again["journal_id"]) == ("issued", "rf-3.issue")
            posted = await conn.fetchval("SELECT count(*) FROM journals WHERE journal_id LIKE 'rf-3.%'")
            assert posted == 1
        finally:
            await conn.close()
        assert await _balance(c, "asset:ar:rf-buyer") == 4639  # rf-1 and rf-2 paid, rf-3 issued once

    run(node, flow)
    assert node.run(check_store(node.dsn)) == []


class _BumpingPoster:
    """A poster that lets another writer change the invoice row while the journal is 'posted'."""

    def __init__(self, dsn: str, invoice_id: str) -> None:
        self.dsn = dsn
        self.invoice_id = invoice_id

    async def post_journals(self, journals: list[Journal], principal: str) -> list[Posted]:
        conn = await asyncpg.connect(self.dsn)
        try:
            await conn.execute(
                "UPDATE invoices SET version = version + 1 WHERE invoice_id = $1", self.invoice_id
            )
        finally:
            await conn.close()
        return [Posted(j.journal_id or "", True) for j in journals]


def test_a_concurrent_change_from_elsewhere_is_409(node: NodeHarness) -> None:
    """Tried: a draft invoice whose row another node changes between our read and our update ->
    the step answers 409 INVALID_STATE {current, requested, reason: "concurrent change"}, and
    the invoice is left as the other writer left it."""

    async def flow(c: Client) -> None:
        body = _invoice("cc-buyer", "DE", ("cc-a", "cc-b"), invoice_id="cc-1", draft=True)
        expect_ok(await c.call("POST", "/finance/invoice", body=body), 201)
        pool = await asyncpg.create_pool(node.dsn, min_size=1, max_size=2)
        try:
            service = FinanceService(pool, _BumpingPoster(node.dsn, "cc-1"))
            with pytest.raises(Rejection) as caught:
                await service.step("cc-1", "issue", "test")
        finally:
            await pool.close()
        assert caught.value.code == "INVALID_STATE"
        assert caught.value.details["reason"] == "concurrent change"
        assert (caught.value.details["current"], caught.value.details["requested"]) == ("draft", "issued")
        shown = expect_ok(await c.call("GET", "/finance/invoice/cc-1", role="auditor"))
        assert (shown["status"], shown["version"]) == ("draft", 2)

    run(node, flow)
