"""FX over real HTTP: rates posted and read back in time, and an invoice paid in another currency.

The node's base currency is USD (the default `LEDGER_BASE_CURRENCY`); a rate is units of the quote
currency per 1 USD. A cross-currency payment converts through USD at the rates in force when it is
paid, releases the receivable at the rate in force at issue and realises the difference on the
chart's FX gain/loss accounts, while every currency of the journal still nets to zero.
"""

from __future__ import annotations

from datetime import UTC, datetime
from fractions import Fraction
from typing import Any

from tests.e2e.test_errors import Client, expect_error, expect_ok, run
from tests.support.node import NodeHarness, check_store


def _rate(quote: str, rate: str, as_of: str, **extra: Any) -> dict[str, Any]:
    return {"quote": quote, "rate": rate, "source": "ecb", "as_of": as_of, **extra}


async def _rates(c: Client, **params: str) -> Any:
    return await c.call("GET", "/finance/fx/rates", role="auditor", params=params)


async def _balance(c: Client, account_id: str, currency: str) -> int:
    reply = await c.balances(account_id)
    if reply.status == 404:
        return 0
    for row in expect_ok(reply)["balances"]:
        if row["currency"] == currency:
            return int(row["balance"])
    return 0


def test_rates_are_stored_replayed_and_read_in_force_at_a_time(node: NodeHarness) -> None:
    """Tried: two GBP rates (single and batch form), read at times before, between and after;
    a replay (200), a different rate at the same as_of (409), an unknown quote (422
    FX_RATE_MISSING with details), bad input (400 naming the field; a bad batch stores nothing),
    an auditor posting (403)."""

    async def flow(c: Client) -> None:
        first = expect_ok(
            await c.call("POST", "/finance/fx/rates", body=_rate("GBP", "0.79", "2020-01-01T00:00:00Z")), 201
        )
        assert (first["base"], first["quote"], first["rate"]) == ("USD", "GBP", "0.79")
        assert first["as_of"] == "2020-01-01T00:00:00.000000Z"
        batch = expect_ok(
            await c.call(
                "POST",
                "/finance/fx/rates",
                body={"rates": [_rate("GBP", "0.81", "2021-01-01T00:00:00+00:00", base="USD")]},
            ),
            201,
        )
        assert [r["rate"] for r in batch["rates"]] == ["0.81"]
        replay = expect_ok(
            await c.call("POST", "/finance/fx/rates", body=_rate("GBP", "0.790", "2020-01-01T00:00:00Z"))
        )
        assert (replay["rate"], replay["created"]) == ("0.79", False)
        conflict = await c.call("POST", "/finance/fx/rates", body=_rate("GBP", "0.8", "2020-01-01T00:00:00Z"))
        assert expect_error(conflict, 409, "IDEMPOTENCY_CONFLICT")["rate"] == "0.79"

        between = expect_ok(await _rates(c, quote="GBP", at="2020-06-01T00:00:00Z"))
        assert [(r["quote"], r["rate"]) for r in between["rates"]] == [("GBP", "0.79")]
        after = expect_ok(await _rates(c, quote="GBP", at="2022-01-01T00:00:00Z"))
        assert [r["rate"] for r in after["rates"]] == ["0.81"]
        now = expect_ok(await _rates(c))
        assert ("GBP", "0.81") in [(r["quote"], r["rate"]) for r in now["rates"]]
        before = expect_error(await _rates(c, quote="GBP", at="2019-01-01T00:00:00Z"), 422, "FX_RATE_MISSING")
        assert (before["base"], before["quote"]) == ("USD", "GBP")
        missing = expect_error(await _rates(c, quote="CHF"), 422, "FX_RATE_MISSING")
        assert missing["quote"] == "CHF"

        bad = [
            (_rate("GBP", "1e5", "2023-01-01T00:00:00Z"), "$.rate"),
            ({**_rate("GBP", "1", "2023-01-01T00:00:00Z"), "rate": 1.1}, "$.rate"),
            (_rate("GBP", "0", "2023-01-01T00:00:00Z"), "$.rate"),
            (_rate("USD", "1", "2023-01-01T00:00:00Z"), "$.quote"),
            (_rate("GBP", "1", "yesterday"), "$.as_of"),
            ({"quote": "GBP", "rate": "1", "as_of": "2023-01-01T00:00:00Z"}, "$.source"),
            (
                {
                    "rates": [
                        _rate("GBP", "0.9", "2023-01-01T00:00:00Z"),
                        _rate("ZZZ", "1", "2023-01-01T00:00:00Z"),
                    ]
                },
                "$.rates[1].quote",
            ),
        ]
        for body, field in bad:
            expect_error(await c.call("POST", "/finance/fx/rates", body=body), 400, "VALIDATION_ERROR", field)
        latest = expect_ok(await _rates(c, quote="GBP", at="2024-01-01T00:00:00Z"))
        assert [r["rate"] for r in latest["rates"]] == ["0.81"]  # the bad batch stored nothing
        forbidden = await c.call(
            "POST", "/finance/fx/rates", role="auditor", body=_rate("GBP", "1", "2023-01-01T00:00:00Z")
        )
        assert forbidden.status == 403

    run(node, flow)


def test_eur_invoice_paid_in_usd_realises_fx_gain(node: NodeHarness) -> None:
    """Tried: an EUR invoice issued while 1 USD = 0.90 EUR, then EUR strengthens to 0.80; paid in
    full in USD -> the invoice is paid, USD cash holds the payment, AR is released in EUR, the
    gain (payment in USD minus the receivable at the issue rate) is credited to
    `revenue:fx-gain:realised`, each currency of the journal nets to zero; a payment in a
    currency without a rate -> 422 FX_RATE_MISSING; the store check is clean."""

    async def flow(c: Client) -> None:
        expect_ok(
            await c.call("POST", "/finance/fx/rates", body=_rate("EUR", "0.90", "2020-01-01T00:00:00Z")), 201
        )
        invoice = expect_ok(
            await c.call(
                "POST",
                "/finance/invoice",
                body={
                    "buyer": {"buyer_id": "fx-buyer", "country": "DE"},
                    "line_items": [{"sku": "fx-sku", "qty": 2, "unit_price": 5000, "tax_code": "standard"}],
                    "currency": "EUR",
                    "invoice_id": "fx-inv-1",
                },
            ),
            201,
        )
        total = invoice["total"]
        missing = await c.call(
            "POST",
            "/finance/payment",
            body={
                "invoiceId": "fx-inv-1",
                "amount": 1000,
                "currency": "CHF",
                "payment_provider": "stripe",
                "provider_reference": "fx-chf-1",
            },
        )
        assert expect_error(missing, 422, "FX_RATE_MISSING")["quote"] == "CHF"
        as_of = datetime.now(UTC).isoformat()
        expect_ok(await c.call("POST", "/finance/fx/rates", body=_rate("EUR", "0.80", as_of)), 201)
        gain_before = await _balance(c, "revenue:fx-gain:realised", "USD")
        amount_usd = -(-total * 5 // 4)  # ceil(total / 0.8): covers the invoice
        paid = expect_ok(
            await c.call(
                "POST",
                "/finance/payment",
                body={
                    "invoiceId": "fx-inv-1",
                    "amount": amount_usd,
                    "currency": "USD",
                    "payment_provider": "stripe",
                    "provider_reference": "fx-usd-1",
                },
            )
        )
        converted = round(Fraction(amount_usd) * Fraction("0.8"))
        assert (paid["status"], paid["amount_due"]) == ("paid", 0)
        assert (paid["currency"], paid["applied_amount"], paid["applied_currency"]) == (
            "USD",
            converted,
            "EUR",
        )
        credit = converted - total
        released = round(Fraction(total) / Fraction("0.9")) + round(Fraction(credit) / Fraction("0.8"))
        gain = amount_usd - released
        assert gain > 0 and paid["fx"]["realised_minor"] == gain
        assert await _balance(c, "revenue:fx-gain:realised", "USD") - gain_before == gain
        assert await _balance(c, "asset:cash:stripe:USD", "USD") >= amount_usd

        posted = expect_ok(await c.call("GET", f"/ledger/{paid['journal_id']}", role="auditor"))
        net: dict[str, int] = {}
        for entry in posted["journal"]["entries"]:
            sign = 1 if entry["side"] == "debit" else -1
            net[entry["currency"]] = net.get(entry["currency"], 0) + sign * entry["amount_cents"]
        assert net == {"USD": 0, "EUR": 0}
        ar = [e for e in posted["journal"]["entries"] if e["account_id"] == "asset:ar:fx-buyer"]
        assert [(e["side"], e["amount_cents"], e["currency"]) for e in ar] == [("credit", total, "EUR")]
        # the foreign line records its conversion: the issue-time rate, its time and the base amount
        meta = ar[0]["meta"]
        assert (Fraction(meta["fx_rate"]), meta["base_currency"]) == (Fraction("0.9"), "USD")
        assert meta["base_amount_cents"] == round(Fraction(total) / Fraction("0.9")) and meta["rate_ts"]

        view = expect_ok(await c.call("GET", "/finance/invoice/fx-inv-1", role="auditor"))
        assert (view["status"], view["amount_paid"]) == ("paid", converted)
        replay = expect_ok(
            await c.call(
                "POST",
                "/finance/payment",
                body={
                    "invoiceId": "fx-inv-1",
                    "amount": amount_usd,
                    "currency": "USD",
                    "payment_provider": "stripe",
                    "provider_reference": "fx-usd-1",
                },
            )
        )
        assert replay["journal_id"] == paid["journal_id"]

    run(node, flow)
    assert node.run(check_store(node.dsn)) == []
