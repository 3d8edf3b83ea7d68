"""The operator console in headless Chromium (Debian's `chromium`, driven by Playwright's Python package).

Each test uses the console as an operator would: sign in with a token, read the dashboard (its totals
equal the API's reports), resolve a reconciliation discrepancy, approve a gated payout batch by
uploading three approval files written by `ledger-node approve --out`, verify a proof package in the
browser with WebCrypto (and see a tampered package fail). With `UPDATE_SCREENSHOTS=1` each page is
saved under docs/screenshots/ (README and docs/console.md show them).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from finance import stripe_gateway
from finance.multisig import PrivateKey
from tests.e2e.test_errors import Client, expect_error, expect_ok
from tests.e2e.test_multisig import _pem
from tests.e2e.test_payouts import _accrue, _participant
from tests.e2e.test_reconcile import _next_second, _now
from tests.e2e.test_stripe_refunds import _invoice, _money
from tests.support.node import TOKENS, NodeHarness, journal
from tests.support.stripe_server import StripeServer

CHROMIUM = os.environ.get("LEDGER_CHROMIUM", "/usr/bin/chromium")
SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
CLI = Path(sys.executable).with_name("ledger-node")
TIMEOUT_MS = 20_000
REPORTS = ("cash_position", "ar_aging", "payout_liabilities", "vat_owed", "revenue")

if not Path(CHROMIUM).exists():  # never skip: the browser tests are part of `make test`
    pytest.fail(
        f"Chromium is not installed at {CHROMIUM}: run `make system-deps` (apt-get install chromium "
        "chromium-driver) or set LEDGER_CHROMIUM to the browser binary",
        pytrace=False,
    )
try:
    from playwright.sync_api import Browser, Page, expect, sync_playwright
except ImportError:  # pragma: no cover - the test extra installs it
    pytest.fail("the `playwright` Python package is missing: pip install -e '.[test]'", pytrace=False)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--headless", "--disable-gpu"]
        )
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Browser, node: NodeHarness) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1366, "height": 900}, accept_downloads=True)
    context.set_default_timeout(TIMEOUT_MS)
    opened = context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda exc: errors.append(str(exc)))
    yield opened
    context.close()
    assert errors == [], errors


@pytest.fixture
def stripe(node: NodeHarness, monkeypatch: pytest.MonkeyPatch) -> Iterator[StripeServer]:
    server: StripeServer = node.run(StripeServer().start())
    monkeypatch.setenv("STRIPE_API_KEY", server.api_key)
    monkeypatch.setenv("STRIPE_API_BASE", server.base)
    monkeypatch.setenv("LEDGER_PAYOUT_BACKOFF_S", "0.01")
    monkeypatch.setattr(stripe_gateway, "LIST_PAGE_SIZE", 50)
    yield server
    node.run(server.stop())


def _shot(page: Page, name: str) -> None:
    if os.environ.get("UPDATE_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def _sign_in(page: Page, node: NodeHarness, screenshot: bool = False) -> None:
    page.goto(f"{node.url}/console/")
    page.get_by_label("Operator token").fill(TOKENS["operator"])
    if screenshot:
        _shot(page, "sign-in")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="Dashboard", level=1)).to_be_visible()


def _on_node(node: NodeHarness, flow: Callable[[Client], Awaitable[Any]]) -> Any:
    """Run an HTTP flow on the node's loop (Playwright's sync API owns this thread's event loop)."""

    async def main() -> Any:
        async with aiohttp.ClientSession() as http:
            return await flow(Client(http, node.url))

    return node.run(main())


def _api(node: NodeHarness, method: str, path: str, body: Any = None, role: str = "operator") -> Any:
    return _on_node(node, lambda c: c.call(method, path, body=body, role=role))


def test_static_files_headers_and_sign_in(page: Page, node: NodeHarness) -> None:
    """Tried: /console redirects to /console/; the page, scripts and styles have their content types,
    the CSP `default-src 'self'`, nosniff and cache headers; an unknown file is a JSON 404; a wrong
    token is refused in the page (with an alert) and nothing is kept; the operator token signs in."""

    async def fetch(c: Client) -> None:
        http = c.http
        async with http.get(f"{node.url}/console", allow_redirects=False) as r:
            assert r.status == 302 and r.headers["Location"] == "/console/"
        for path, kind, cache in (
            ("/console/", "text/html", "no-cache"),
            ("/console/app.mjs", "text/javascript", "public, max-age=3600"),
            ("/console/vendor/preact.mjs", "text/javascript", "public, max-age=3600"),
            ("/console/console.css", "text/css", "public, max-age=3600"),
        ):
            async with http.get(node.url + path) as r:
                assert r.status == 200 and r.content_type == kind, path
                assert r.headers["Content-Security-Policy"].startswith("default-src 'self'")
                assert r.headers["X-Content-Type-Options"] == "nosniff"
                assert r.headers["Cache-Control"] == cache
        async with http.get(f"{node.url}/console/../api/app.py") as r:
            assert r.status == 404 and (await r.json())["error"]["code"] == "NOT_FOUND"

    _on_node(node, fetch)
    page.goto(f"{node.url}/console/")
    page.get_by_label("Operator token").fill("not-a-token")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_contain_text("does not know this token")
    assert page.evaluate("sessionStorage.length") == 0
    _sign_in(page, node, screenshot=True)
    assert page.evaluate("Object.values(sessionStorage)") == [TOKENS["operator"]]


def test_dashboard_totals_match_the_api(page: Page, node: NodeHarness) -> None:
    """Tried: an invoice paid through Stripe, a royalty accrual -> every total on the dashboard (per
    report, currency and figure) equals the API's report totals, and each report draws its chart."""
    tag = f"cd{int(time.time() * 1000) % 10**8}"
    expect_ok(_api(node, "POST", "/finance/invoice", _invoice(f"{tag}-inv"), role="service"), 201)
    expect_ok(_api(node, "POST", "/finance/payment", _money(f"{tag}-inv", 4639, f"pi_{tag}"), role="service"))
    expect_ok(_api(node, "POST", "/finance/invoice", _invoice(f"{tag}-due"), role="service"), 201)
    _sign_in(page, node)
    for name in REPORTS:
        totals = expect_ok(_api(node, "GET", f"/finance/reports/{name}", role="auditor"))["report"]["totals"]
        card = page.locator(f"[data-report={name}]")
        expect(card).to_have_attribute("aria-busy", "false")
        shown = {
            cell.get_attribute("data-total"): int(cell.get_attribute("data-minor") or "")
            for cell in card.locator("[data-total]").all()
        }
        expected = {f"{name}:{c}:{k}": v for c, figures in totals.items() for k, v in figures.items()}
        assert shown == expected, name
        if totals:
            expect(card.locator("svg[role=img]").first).to_be_visible()
    assert expected_nonzero(page)
    _shot(page, "dashboard")
    page.get_by_role("link", name="Invoices").click()
    page.get_by_label("Invoice id").fill(f"{tag}-inv")
    page.get_by_role("button", name="Open").click()
    expect(page.locator(f"[data-invoice='{tag}-inv']")).to_contain_text("46.39 EUR")
    _shot(page, "invoice")


def expected_nonzero(page: Page) -> bool:
    """The dashboard shows at least one non-zero cash figure (the payment landed)."""
    values = page.locator("[data-report=cash_position] [data-total]").evaluate_all(
        "cells => cells.map(c => Number(c.dataset.minor))"
    )
    return any(v != 0 for v in values)


def test_resolve_a_discrepancy(page: Page, node: NodeHarness, stripe: StripeServer) -> None:
    """Tried: a payment the provider never saw -> a run started in the console lists one open
    `provider_missing` discrepancy; resolving it with the suggested journal and a reason marks it
    resolved (in the page and in GET /reconcile/{id})."""
    rate = {"quote": "EUR", "rate": "0.9", "source": "ecb", "as_of": "2020-01-01T00:00:00Z"}
    assert _api(node, "POST", "/finance/fx/rates", rate, role="admin").status in (200, 201)
    from_ts = _next_second()
    tag = f"cr{int(time.time() * 1000) % 10**8}"
    expect_ok(_api(node, "POST", "/finance/invoice", _invoice(f"{tag}-inv"), role="service"), 201)
    expect_ok(
        _api(node, "POST", "/finance/payment", _money(f"{tag}-inv", 4639, f"pi_ghost_{tag}"), role="service")
    )
    to_ts = _now()
    _sign_in(page, node)
    page.get_by_role("link", name="Reconciliation").click()
    page.get_by_label("Request id").fill(tag)
    page.get_by_label("From (RFC 3339)").fill(from_ts)
    page.get_by_label("To (RFC 3339)").fill(to_ts)
    page.get_by_role("button", name="Run reconciliation").click()
    run_card = page.locator(f"[data-run='reconcile-{tag}']")
    expect(run_card).to_contain_text("provider missing")
    report = expect_ok(_api(node, "GET", f"/reconcile/reconcile-{tag}", role="auditor"))
    (found,) = report["discrepancies"]
    did = found["discrepancy_id"]
    _shot(page, "reconcile")
    run_card.get_by_role("button", name="Resolve…").click()
    page.locator(f"#{did}-reason-0").fill("payment recorded twice by the checkout; provider never saw it")
    page.get_by_role("button", name="Resolve", exact=True).click()
    expect(page.locator(f"[data-discrepancy-status='{did}']")).to_have_text("resolved")
    after = expect_ok(_api(node, "GET", f"/reconcile/reconcile-{tag}", role="auditor"))
    assert after["open"] == 0 and after["discrepancies"][0]["resolution_journal_id"]
    _shot(page, "reconcile-resolved")


def _approval_file(node: NodeHarness, action_id: str, approver: str, key: PrivateKey, tmp: Path) -> Path:
    """`ledger-node approve ACTION --out FILE`, as an approver would run it on their own machine."""
    key_file = tmp / f"{approver}.pem"
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    out = tmp / f"{approver}.approval.json"
    env = {**os.environ, "LEDGER_URL": node.url, "LEDGER_TOKEN": TOKENS["operator"]}
    argv = [
        str(CLI),
        "approve",
        action_id,
        "--key",
        str(key_file),
        "--approver-id",
        approver,
        "--out",
        str(out),
    ]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(out.read_text())["action_id"] == action_id
    return out


def test_approve_a_pending_payout_with_three_signatures(
    page: Page, node: NodeHarness, stripe: StripeServer, tmp_path: Path
) -> None:
    """Tried: a payout of 6,000,000 (above the `payout` threshold) -> pending; the console lists it
    under pending approvals; three approval files (Ed25519 and P-256) uploaded one by one count 1, 2,
    then execute the batch; the batch page shows it done and Stripe received one transfer."""
    tag = f"cp{int(time.time() * 1000) % 10**8}"
    keys: dict[str, PrivateKey] = {
        f"{tag}-a0": ed25519.Ed25519PrivateKey.generate(),
        f"{tag}-a1": ec.generate_private_key(ec.SECP256R1()),
        f"{tag}-a2": ed25519.Ed25519PrivateKey.generate(),
    }

    async def setup(c: Client) -> None:
        for name, key in keys.items():
            body = {"approver_id": name, "public_key": _pem(key)}
            expect_ok(await c.call("POST", "/admin/approvers", role="admin", body=body), 201)
        await _participant(c, f"{tag}-p", f"acct_{tag}", 100)
        await _accrue(c, tag, {f"{tag}-p": (6_000_000, 0)})

    _on_node(node, setup)
    body = {"payout_date": "2026-11-20", "batch_id": f"{tag}-b", "items": [{"participant_id": f"{tag}-p"}]}
    gated = expect_ok(_api(node, "POST", "/finance/payout/run", body), 202)
    action_id = gated["action_id"]
    listed = expect_ok(_api(node, "GET", "/finance/approvals?status=pending_approval", role="auditor"))
    assert action_id in [a["action_id"] for a in listed["actions"]] and listed["policy"] == "3-of-5"
    assert all(a["status"] == "pending_approval" for a in listed["actions"])
    expect_error(
        _api(node, "GET", "/finance/approvals?status=sleeping"), 400, "VALIDATION_ERROR", "$.query.status"
    )
    expect_error(_api(node, "GET", "/finance/approvals?limit=0"), 400, "VALIDATION_ERROR", "$.query.limit")
    files = [_approval_file(node, action_id, name, key, tmp_path) for name, key in keys.items()]
    _sign_in(page, node)
    page.get_by_role("link", name="Payouts and approvals").click()
    page.get_by_role("link", name=action_id).click()
    action = page.locator(f"[data-action='{action_id}']")
    expect(action.locator("[data-action-status]")).to_have_text("pending_approval")
    _shot(page, "approvals")
    for count, file in enumerate(files, start=1):
        page.set_input_files(f"#approval-file-{action_id}".replace(".", "\\."), str(file))
        page.get_by_role("button", name="Upload approval").click()
        if count < 3:
            expect(action.locator("[data-approvals]")).to_have_text(f"{count} of 3")
    expect(action.locator("[data-action-status]")).to_have_text("executed")
    page.get_by_role("link", name=f"Open payout batch {tag}-b").click()
    expect(page.locator(f"[data-batch='{tag}-b'] [data-batch-status]")).to_have_text("done")
    executed = expect_ok(_api(node, "GET", "/finance/approvals?status=executed", role="auditor"))["actions"]
    assert action_id in [a["action_id"] for a in executed]
    pending = expect_ok(_api(node, "GET", "/finance/approvals?status=pending_approval"))["actions"]
    assert action_id not in [a["action_id"] for a in pending]
    _shot(page, "payout-batch")
    assert sum(t["amount"] for t in stripe.state.transfers.values() if t["destination"] == f"acct_{tag}") == (
        6_000_000
    )


def test_verify_a_proof_in_the_browser(page: Page, node: NodeHarness) -> None:
    """Tried: journals posted, a proof generated from the console and verified in the browser with
    the node's published keys -> VERIFIED (the range-completeness caveat shown); one amount changed
    inside a journal body -> NOT VERIFIED, naming that journal; the health page shows the node ready."""
    start = _now()
    time.sleep(0.01)
    tag = f"cv{int(time.time() * 1000) % 10**8}"
    for n in range(4):
        expect_ok(
            _api(
                node,
                "POST",
                "/ledger/post",
                journal(f"{tag}-{n}", "asset:cv-cash", "revenue:cv", 100 + n),
                role="service",
            )
        )
    time.sleep(0.5)  # a checkpoint (every 0.1 s in tests) covers the journals
    end = _now()
    _sign_in(page, node)
    page.get_by_role("link", name="Proofs").click()
    page.get_by_label("From (RFC 3339)").fill(start)
    page.get_by_label("To (RFC 3339)").fill(end)
    page.get_by_role("button", name="Generate").click()
    expect(page.get_by_text("is ready")).to_be_visible()
    page.get_by_role("button", name="Load keys from /keys").click()
    expect(page.get_by_label("Trusted public keys (PEM)")).to_have_value(re.compile("BEGIN PUBLIC KEY"))
    page.get_by_role("button", name="Verify in browser").click()
    verdict = page.locator("[data-verdict]")
    expect(verdict).to_have_attribute("data-verdict", "verified")
    expect(verdict).to_contain_text("range completeness")
    _shot(page, "proof-verified")
    text = page.get_by_label("Package (exact bytes, canonical JSON)", exact=False).input_value()
    victim = f"{tag}-2"
    needle = '\\"amount_cents\\":102'
    assert needle in text
    page.get_by_label("Package (exact bytes, canonical JSON)", exact=False).fill(
        text.replace(needle, '\\"amount_cents\\":902')
    )
    page.get_by_role("button", name="Verify in browser").click()
    expect(verdict).to_have_attribute("data-verdict", "failed")
    expect(verdict).to_contain_text(victim)
    _shot(page, "proof-tampered")
    page.get_by_role("link", name="Health").click()
    expect(page.locator("[data-ready]")).to_have_attribute("data-ready", "true")
    expect(page.get_by_role("table", name="Shards")).to_contain_text("ok")
    _shot(page, "health")
