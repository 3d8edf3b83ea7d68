"""Locust scenario: marketplace settlement traffic against a Ledger Node.

Each simulated user is a marketplace back office that

* settles orders one at a time (``POST /ledger/post`` with an ``Idempotency-Key``): the buyer's
  payment is split between the seller's payable and the platform fee (a 3-line journal);
* now and then replays a settlement with the same ``Idempotency-Key`` (a client retry);
* occasionally pays sellers out in batches of 100 (``POST /ledger/post_batch``);
* reads balances (``GET /accounts/{id}/balances``);
* tails the journal stream (``GET /finance/ledger/journal?limit=100&cursor=...``), following
  ``next_cursor`` for a bounded number of pages.

Run (the node must listen on 127.0.0.1)::

    LEDGER_TOKEN=benchtoken .venv/bin/locust -f loadtests/locustfile.py --headless \\
        --host http://127.0.0.1:8080 -u 50 -r 10 -t 60s

Besides ``-t``, the whole test stops by itself after ``LEDGER_LOCUST_MAX_SECONDS`` (default 600).
"""

from __future__ import annotations

import itertools
import os
import random
import uuid
from typing import Any
from urllib.parse import quote

import gevent
from locust import HttpUser, between, events, task
from locust.env import Environment

TOKEN = os.environ.get("LEDGER_TOKEN", "")
ACCOUNTS = int(os.environ.get("LEDGER_ACCOUNTS", "10000"))
MAX_TEST_SECONDS = float(os.environ.get("LEDGER_LOCUST_MAX_SECONDS", "600"))
MAX_JOURNAL_PAGES = 5
PAYOUT_BATCH = 100
FEE_BPS = 1_000  # 10 % platform fee
RUN_ID = uuid.uuid4().hex[:8]
_user_ids = itertools.count(1)


def _limit_test_duration(environment: Environment, **_kwargs: Any) -> None:
    """Stop the whole test after ``MAX_TEST_SECONDS`` even if no ``-t`` was given."""
    if environment.runner is not None and environment.parsed_options is not None:
        gevent.spawn_later(MAX_TEST_SECONDS, environment.runner.quit)


events.init.add_listener(_limit_test_duration)  # type: ignore[no-untyped-call]


def line(account_id: str, side: str, amount: int) -> dict[str, Any]:
    """One journal line in integer minor units (USD)."""
    return {"account_id": account_id, "side": side, "amount_cents": amount, "currency": "USD"}


def settlement_journal(journal_id: str, buyer: int, seller: int, amount: int) -> dict[str, Any]:
    """Build a buyer-payment journal split into seller payable and platform fee."""
    fee = amount * FEE_BPS // 10_000
    return {
        "journal_id": journal_id,
        "entries": [
            line(f"asset:acct-{buyer}", "debit", amount),
            line(f"liability:acct-{seller}", "credit", amount - fee),
            line("revenue:platform-fees", "credit", fee),
        ],
        "context": {"source": "locust", "kind": "order_settlement"},
    }


def payout_journal(journal_id: str, seller: int, amount: int) -> dict[str, Any]:
    """Build a seller-payout journal: reduce the payable, reduce the payout bank account."""
    return {
        "journal_id": journal_id,
        "entries": [
            line(f"liability:acct-{seller}", "debit", amount),
            line("asset:bank-payouts", "credit", amount),
        ],
        "context": {"source": "locust", "kind": "seller_payout"},
    }


def json_object(resp: Any) -> dict[str, Any]:
    """Decode a response body as a JSON object, or ``{}`` if it is not one."""
    try:
        value = resp.json()
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


class MarketplaceSettlementUser(HttpUser):
    """A marketplace back office posting settlements and reading the ledger."""

    wait_time = between(0.05, 0.5)
    host = "http://127.0.0.1:8080"

    def on_start(self) -> None:
        """Set up auth, a unique id prefix and a private random generator."""
        self.user_no = next(_user_ids)
        self.rng = random.Random(self.user_no)
        self.seq = itertools.count(1)
        self.last_settlement: tuple[str, dict[str, Any]] | None = None
        self.client.headers.update({"Authorization": f"Bearer {TOKEN}"})

    def next_id(self, prefix: str) -> str:
        """Return a journal id unique across users and runs."""
        return f"{prefix}-{RUN_ID}-{self.user_no}-{next(self.seq)}"

    def account(self) -> int:
        """Pick a numeric account id."""
        return self.rng.randint(1, ACCOUNTS)

    def post_journal(self, journal: dict[str, Any], idempotency_key: str, name: str) -> None:
        """POST one journal and mark the request failed unless it answers ``ok: true``."""
        headers = {"Idempotency-Key": idempotency_key}
        with self.client.post(
            "/ledger/post", json=journal, headers=headers, name=name, catch_response=True
        ) as resp:
            if resp.status_code != 200 or not json_object(resp).get("ok"):
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")

    @task(10)
    def settle_order(self) -> None:
        """Settle one order with a fresh Idempotency-Key."""
        journal_id = self.next_id("m")
        journal = settlement_journal(
            journal_id, self.account(), self.account(), self.rng.randint(100, 50_000)
        )
        self.post_journal(journal, journal_id, "/ledger/post")
        self.last_settlement = (journal_id, journal)

    @task(1)
    def retry_settlement(self) -> None:
        """Replay the previous settlement with the same Idempotency-Key (must not double-post)."""
        if self.last_settlement is None:
            return
        key, journal = self.last_settlement
        self.post_journal(journal, key, "/ledger/post [idempotent replay]")

    @task(1)
    def payout_batch(self) -> None:
        """Pay out 100 sellers in one ``post_batch`` request."""
        journals = [
            payout_journal(self.next_id("p"), self.account(), self.rng.randint(100, 5_000))
            for _ in range(PAYOUT_BATCH)
        ]
        with self.client.post(
            "/ledger/post_batch", json={"journals": journals}, name="/ledger/post_batch", catch_response=True
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                return
            results = json_object(resp).get("results", [])
            failed = sum(1 for r in results if not (isinstance(r, dict) and r.get("ok")))
            if len(results) != PAYOUT_BATCH or failed:
                resp.failure(f"{failed} of {len(results)} journals not ok")

    @task(5)
    def read_balance(self) -> None:
        """Read the balances of one seller account (404 NOT_FOUND while nothing was posted to it yet)."""
        account_id = quote(f"liability:acct-{self.account()}", safe=":")
        path = f"/accounts/{account_id}/balances"
        with self.client.get(path, name="/accounts/[id]/balances", catch_response=True) as resp:
            if resp.status_code == 404 and json_object(resp).get("error", {}).get("code") == "NOT_FOUND":
                resp.success()  # a seller without postings yet: the node's correct answer
            elif resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")

    @task(2)
    def page_journal_stream(self) -> None:
        """Follow ``next_cursor`` through up to ``MAX_JOURNAL_PAGES`` pages of the journal stream."""
        cursor: str | None = None
        for _ in range(MAX_JOURNAL_PAGES):
            params = {"limit": "100"} if cursor is None else {"limit": "100", "cursor": cursor}
            with self.client.get(
                "/finance/ledger/journal", params=params, name="/finance/ledger/journal", catch_response=True
            ) as resp:
                if resp.status_code != 200:
                    resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                    return
                cursor = json_object(resp).get("next_cursor")
            if not cursor:
                return
