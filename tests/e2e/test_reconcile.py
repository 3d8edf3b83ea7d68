"""Reconciliation against Stripe over HTTP (issue 7 item 4): the node lists the Stripe-compatible
loopback server's payment intents, refunds and transfers through the `stripe` SDK (paginated) and
matches them to its payments, refunds and payouts by provider reference.

One flow per scenario group: parity, one discrepancy of each reason, the exports, replay and
conflict, resolution by adjusting journals and the rerun at parity, provider faults, scheduled runs.
"""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime
from typing import Any

import pytest

from api import reconcile_routes
from finance import stripe_gateway
from ledger.timestamps import rfc3339
from tests.e2e.test_errors import Client, expect_error, expect_ok, run
from tests.e2e.test_stripe_refunds import _invoice, _money, _stripe_post
from tests.support.node import NodeHarness, auth
from tests.support.stripe_server import StripeServer

PAYMENTS = 6


def _now() -> str:
    return rfc3339(datetime.now(UTC))


def _next_second() -> str:
    """Wait for the next whole second (Stripe's `created` has seconds) and name it."""
    start = math.ceil(time.time())
    time.sleep(max(0.0, start - time.time()))
    return rfc3339(datetime.fromtimestamp(start, UTC))


def _pair(debit: str, credit: str, amount: int, currency: str = "EUR") -> list[dict[str, Any]]:
    return [
        {"account_id": debit, "side": "debit", "amount_cents": amount, "currency": currency},
        {"account_id": credit, "side": "credit", "amount_cents": amount, "currency": currency},
    ]


async def _reconcile(c: Client, request_id: str, from_ts: str, to_ts: str | None = None) -> dict[str, Any]:
    body = {"request_id": request_id, "from_ts": from_ts, "to_ts": to_ts or _now(), "provider": "stripe"}
    return expect_ok(await c.call("POST", "/reconcile", body=body, role="operator"))


def _by_reason(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {d["reason"]: d for d in report["discrepancies"]}


@pytest.fixture
def server(node: NodeHarness, monkeypatch: pytest.MonkeyPatch) -> Any:
    stripe_server: StripeServer = node.run(StripeServer().start())
    monkeypatch.setenv("STRIPE_API_KEY", stripe_server.api_key)
    monkeypatch.setenv("STRIPE_API_BASE", stripe_server.base)
    monkeypatch.setattr(stripe_gateway, "LIST_PAGE_SIZE", 4)  # several pages per kind
    yield stripe_server
    node.run(stripe_server.stop())


async def _pay(c: Client, server: StripeServer, tag: str) -> list[str]:
    """PAYMENTS invoices paid through Stripe intents, two of them refunded through Stripe: the intent ids."""
    intents: list[str] = []
    for n in range(PAYMENTS):
        invoice_id = f"{tag}-{n}"
        expect_ok(await c.call("POST", "/finance/invoice", body=_invoice(invoice_id)), 201)
        intent = await _stripe_post(server, "/v1/payment_intents", {"amount": 4639, "currency": "eur"})
        expect_ok(await c.call("POST", "/finance/payment", body=_money(invoice_id, 4639, intent["id"])))
        intents.append(intent["id"])
    for n in (0, 1):
        expect_ok(await c.call("POST", "/finance/refund", body=_money(f"{tag}-{n}", 1000, f"{tag}-re-{n}")))
    return intents


def test_parity_discrepancies_exports_resolution_and_rerun(node: NodeHarness, server: StripeServer) -> None:
    """Tried: 6 Stripe payments and 2 Stripe refunds -> parity, 8 matched over pages of 4; then an
    intent only at Stripe, an amount changed at Stripe, an intent listed twice, a currency changed at
    Stripe and a Stripe payment the provider never saw -> exactly one discrepancy of each reason with
    the right references, amounts and journal ids; JSON view = POST answer, CSV one row each;
    the same request -> same report, another window under that id -> 409 IDEMPOTENCY_CONFLICT;
    a journal of the wrong amount -> 400 on $.entries; resolving all five (journals carry the
    run and discrepancy in context) -> resolved, audited, a replay answers the same, a different
    body 409; the rerun -> zero discrepancies."""
    from_ts = _next_second()

    async def flow(c: Client) -> None:
        intents = await _pay(c, server, "rc1")
        first = await _reconcile(c, "rc1-parity", from_ts)
        assert (first["status"], first["matched"], first["discrepancies"]) == ("completed", 8, [])
        assert first["provider_records"] == 8 and first["ledger_records"] == 8

        extra = await _stripe_post(server, "/v1/payment_intents", {"amount": 2500, "currency": "eur"})
        server.state.intents[intents[2]]["amount"] = 4000
        server.state.listed_twice.add(intents[3])
        server.state.intents[intents[4]]["currency"] = "usd"
        expect_ok(await c.call("POST", "/finance/invoice", body=_invoice("rc1-ghost")), 201)
        ghost = expect_ok(
            await c.call("POST", "/finance/payment", body=_money("rc1-ghost", 4639, "pi_ghost_rc1"))
        )
        to_ts = _now()
        report = await _reconcile(c, "rc1-mixed", from_ts, to_ts)
        found = _by_reason(report)
        assert report["discrepancy_count"] == 5 and report["matched"] == 5, report
        assert (
            found["ledger_missing"]["provider_reference"],
            found["ledger_missing"]["provider_amount"],
            found["ledger_missing"]["journal_id"],
        ) == (extra["id"], 2500, None)
        assert (
            found["provider_missing"]["provider_reference"],
            found["provider_missing"]["journal_id"],
            found["provider_missing"]["ledger_amount"],
            found["provider_missing"]["provider_amount"],
        ) == ("pi_ghost_rc1", ghost["journal_id"], 4639, 0)
        assert (
            found["amount_mismatch"]["provider_reference"],
            found["amount_mismatch"]["ledger_amount"],
            found["amount_mismatch"]["provider_amount"],
        ) == (intents[2], 4639, 4000)
        assert found["duplicate"]["provider_reference"] == intents[3]
        assert (
            found["duplicate"]["details"]["side"] == "provider"
            and found["duplicate"]["details"]["count"] >= 2
        )
        assert (
            found["currency_mismatch"]["ledger_currency"],
            found["currency_mismatch"]["provider_currency"],
        ) == ("EUR", "USD")
        assert all(d["kind"] == "payment" and d["status"] == "open" for d in report["discrepancies"])

        rid = report["reconcile_id"]
        shown = expect_ok(await c.call("GET", f"/reconcile/{rid}", role="auditor"))
        assert shown == report
        async with c.http.get(
            f"{c.url}/reconcile/{rid}", params={"format": "csv"}, headers=auth("auditor")
        ) as r:
            assert r.status == 200 and r.content_type == "text/csv"
            lines = (await r.text()).splitlines()
        assert lines[0].startswith("reconcile_id,discrepancy_id,kind,reason,provider_reference")
        assert len(lines) == 6 and any(f",ledger_missing,{extra['id']}," in line for line in lines)

        again = {"request_id": "rc1-mixed", "from_ts": from_ts, "to_ts": to_ts, "provider": "stripe"}
        assert expect_ok(await c.call("POST", "/reconcile", body=again, role="operator")) == report
        other = {**again, "to_ts": _now()}
        expect_error(
            await c.call("POST", "/reconcile", body=other, role="operator"), 409, "IDEMPOTENCY_CONFLICT"
        )

        path = f"/reconcile/{rid}/resolve"
        rate = {"quote": "EUR", "rate": "0.9", "source": "ecb", "as_of": "2020-01-01T00:00:00Z"}
        assert (await c.call("POST", "/finance/fx/rates", body=rate)).status in (
            200,
            201,
        )  # EUR below the gate
        missing = found["ledger_missing"]["discrepancy_id"]
        wrong = {
            "discrepancy_id": missing,
            "entries": _pair("asset:stripe-clearing", "liability:rc-suspense", 2000),
            "reason": "intent captured outside the checkout",
        }
        expect_error(
            await c.call("POST", path, body=wrong, role="operator"), 400, "VALIDATION_ERROR", "$.entries"
        )
        expect_error(
            await c.call("POST", path, body={**wrong, "entries": _pair("a:b", "c:d", 2500)}, role="service"),
            403,
            "NOT_AUTHORIZED",
        )
        bodies = {
            "ledger_missing": _pair("asset:stripe-clearing", "liability:rc-suspense", 2500),
            "provider_missing": _pair("liability:rc-suspense", "asset:stripe-clearing", 4639),
            "amount_mismatch": _pair("expense:rc-provider-diff", "asset:stripe-clearing", 639),
            "currency_mismatch": _pair("liability:rc-suspense", "asset:stripe-clearing", 4639)
            + _pair("asset:stripe-clearing", "liability:rc-suspense", 4639, "USD"),
            "duplicate": _pair("expense:rc-note", "liability:rc-suspense", 1),
        }
        answers = {}
        for reason, entries in bodies.items():
            body = {
                "discrepancy_id": found[reason]["discrepancy_id"],
                "entries": entries,
                "reason": f"reconciled {reason}",
            }
            reply = await c.call("POST", path, body=body, role="operator")
            assert reply.status == 200, (reason, reply)
            answers[reason] = expect_ok(reply)
            assert answers[reason]["status"] == "resolved"
            assert expect_ok(await c.call("POST", path, body=body, role="operator")) == answers[reason]
        changed = {"discrepancy_id": missing, "entries": bodies["ledger_missing"], "reason": "another reason"}
        expect_error(await c.call("POST", path, body=changed, role="operator"), 409, "IDEMPOTENCY_CONFLICT")
        posted = expect_ok(
            await c.call("GET", f"/ledger/{answers['ledger_missing']['journal_id']}", role="auditor")
        )
        context = posted["journal"]["context"]
        assert (
            context["reconcile"]["reconcile_id"] == rid and context["reconcile"]["discrepancy_id"] == missing
        )
        assert context["reconcile"]["provider_reference"] == extra["id"]
        after = expect_ok(await c.call("GET", f"/reconcile/{rid}", role="auditor"))
        assert after["open"] == 0 and all(d["resolution_journal_id"] for d in after["discrepancies"])
        events = expect_ok(await c.call("GET", "/audit/events", role="auditor", params={"limit": "1000"}))[
            "events"
        ]
        resolved = [e for e in events if e["event_type"] == "reconcile.resolve"]
        assert sorted(e["payload"]["discrepancy_id"] for e in resolved) == sorted(
            d["discrepancy_id"] for d in report["discrepancies"]
        )

        rerun = await _reconcile(c, "rc1-rerun", from_ts)
        assert (rerun["discrepancies"], rerun["matched"]) == ([], 9), rerun

    run(node, flow)


def test_provider_faults_metrics_and_schedule(node: NodeHarness, server: StripeServer) -> None:
    """Tried: a Stripe record with a string amount -> 500 RECONCILE_ERROR, the run shown failed; a
    body that is not JSON -> RECONCILE_ERROR; Stripe answering 500s -> 503 SERVICE_UNAVAILABLE
    retryable, the same request then completes; /metrics shows the lag and run counts; a
    scheduled run -> a completed run triggered by the schedule."""
    from_ts = _next_second()

    async def flow(c: Client) -> None:
        intents = await _pay(c, server, "rc2")
        server.state.intents[intents[0]]["amount"] = "lots"
        body = {"request_id": "rc2-bad", "from_ts": from_ts, "to_ts": _now(), "provider": "stripe"}
        details = expect_error(
            await c.call("POST", "/reconcile", body=body, role="operator"), 500, "RECONCILE_ERROR"
        )
        assert details["provider"] == "stripe" and "amount" in details["reason"]
        failed = expect_ok(await c.call("GET", "/reconcile/reconcile-rc2-bad", role="auditor"))
        assert failed["status"] == "failed" and failed["error"]["code"] == "RECONCILE_ERROR"
        server.state.intents[intents[0]]["amount"] = 4639
        server.garbage_next(1)
        body = {**body, "request_id": "rc2-garbage"}
        expect_error(await c.call("POST", "/reconcile", body=body, role="operator"), 500, "RECONCILE_ERROR")

        server.fail_next(500, 500, 500)
        body = {**body, "request_id": "rc2-down"}
        details = expect_error(
            await c.call("POST", "/reconcile", body=body, role="operator"), 503, "SERVICE_UNAVAILABLE"
        )
        assert details["retryable"] is True
        done = expect_ok(await c.call("POST", "/reconcile", body=body, role="operator"))
        assert (done["status"], done["matched"], done["discrepancies"]) == ("completed", 8, [])

        text = (await c.call("GET", "/metrics", role=None)).body["text"]
        lag = [line for line in text.splitlines() if line.startswith("ledger_reconciliation_lag_seconds ")]
        assert lag and 0 <= float(lag[0].split()[1]) < 120
        assert 'ledger_reconcile_runs_total{outcome="completed",trigger="api"}' in text
        assert 'ledger_reconcile_runs_total{outcome="failed",trigger="api"}' in text

    run(node, flow)
    assert node.node is not None and node.node.runner is not None
    app = node.node.runner.app
    report = node.run(reconcile_routes.scheduled_run(app, 5.0))
    assert report is not None and (report["trigger"], report["status"]) == ("schedule", "completed")
    assert report["request_id"].startswith("sched.")


def test_bad_requests(node: NodeHarness, server: StripeServer) -> None:
    """Tried: from_ts after to_ts, an unparseable timestamp, an unknown field, a 40-day window, a
    provider other than stripe, a bad request_id, a window ending in the future -> 400
    VALIDATION_ERROR naming the field; an auditor starting a run -> 403; an unknown run -> 404."""
    good = {
        "request_id": "rc3",
        "from_ts": "2026-01-01T00:00:00Z",
        "to_ts": "2026-01-02T00:00:00Z",
        "provider": "stripe",
    }

    async def flow(c: Client) -> None:
        cases = [
            ({"from_ts": "2026-01-03T00:00:00Z"}, "$.to_ts"),
            ({"from_ts": "yesterday"}, "$.from_ts"),
            ({"extra": 1}, "$.extra"),
            ({"to_ts": "2026-02-10T00:00:00Z"}, "$.to_ts"),
            ({"provider": "paypal"}, "$.provider"),
            ({"request_id": "no spaces"}, "$.request_id"),
            ({"to_ts": "2999-01-01T00:00:00Z"}, "$.to_ts"),
        ]
        for change, field in cases:
            reply = await c.call("POST", "/reconcile", body={**good, **change}, role="operator")
            expect_error(reply, 400, "VALIDATION_ERROR", field)
        expect_error(await c.call("POST", "/reconcile", body=good, role="auditor"), 403, "NOT_AUTHORIZED")
        expect_error(await c.call("GET", "/reconcile/reconcile-nope", role="auditor"), 404, "NOT_FOUND")

    run(node, flow)
