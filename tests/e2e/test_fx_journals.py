"""Journals balanced only in base currency, over real HTTP (REQUIREMENTS L1, DECISIONS D2).

The node's base currency is USD; a rate is units of the foreign currency per 1 USD. A journal
whose foreign lines carry `rate_ts` (and optionally the client's `fx_rate`) is completed by the
node with `equity:fx-position:{CCY}` lines (per currency) and, for a residual of at most one
minor unit per foreign line, an `expense:fx-rounding` line, so every stored journal still nets
to zero per currency. Each refused journal is followed by reads proving nothing was written.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from typing import Any

import aiohttp

from ledger.timestamps import rfc3339
from signer.verify import verify_package
from tests.e2e.test_errors import Client, expect_error, expect_ok, run
from tests.e2e.test_proofs import _checkpoint, _journal_ids, _proof
from tests.support.node import NodeHarness, auth, check_store

EUR_2024 = "2024-01-01T00:00:00Z"
EUR_2025 = "2025-01-01T00:00:00Z"
IN_2024 = "2024-06-01T12:00:00Z"


def _line(account_id: str, side: str, amount: int, currency: str, **fx: str) -> dict[str, Any]:
    return {"account_id": account_id, "side": side, "amount_cents": amount, "currency": currency, **fx}


def _net(entries: list[dict[str, Any]]) -> dict[str, int]:
    net: dict[str, int] = {}
    for entry in entries:
        sign = 1 if entry["side"] == "debit" else -1
        net[entry["currency"]] = net.get(entry["currency"], 0) + sign * entry["amount_cents"]
    return net


async def _rates(c: Client) -> None:
    """EUR: 0.9 per USD from 2024, 0.8 from 2025 (posted once per module; a replay answers 200)."""
    for rate, as_of in (("0.9", EUR_2024), ("0.8", EUR_2025)):
        reply = await c.call(
            "POST", "/finance/fx/rates", body={"quote": "EUR", "rate": rate, "source": "ecb", "as_of": as_of}
        )
        assert reply.status in (200, 201), reply


async def _balance(c: Client, account_id: str, currency: str) -> int:
    reply = await c.balances(account_id)
    if reply.status == 404:
        return 0
    for row in expect_ok(reply)["balances"]:
        if row["currency"] == currency:
            return int(row["balance"])
    return 0


def _eur_journal(journal_id: str, revenue_usd: int = 1112, **fx: str) -> dict[str, Any]:
    """1000.00 EUR of cash against `revenue_usd` USD of revenue: 1000 / 0.9 = 1111.11 -> 1111 USD."""
    return {
        "journal_id": journal_id,
        "entries": [
            _line("asset:fxj:cash-eur", "debit", 1000, "EUR", rate_ts=IN_2024, **fx),
            _line("revenue:fxj:sales", "credit", revenue_usd, "USD"),
        ],
        "memo": "EUR sale booked in USD",
    }


def test_journal_balanced_in_base_is_completed_stored_and_proven(node: NodeHarness) -> None:
    """Tried: 1000 EUR (rate 0.90 == the node's 0.9 in force at rate_ts) against 1112 USD -> 201
    with the completion lines in order (fx-position in EUR and in USD, 1 USD to fx-rounding),
    each foreign line recording the node's rate, its as_of, the base currency and amount; every
    currency nets to zero; balances moved by exactly those lines; the store check is clean and a
    proof of the range verifies and covers the journal."""
    started = rfc3339(datetime.now(UTC) - timedelta(seconds=1))
    accounts = [
        ("asset:fxj:cash-eur", "EUR"),
        ("revenue:fxj:sales", "USD"),
        ("equity:fx-position:EUR", "EUR"),
        ("equity:fx-position:EUR", "USD"),
        ("expense:fx-rounding", "USD"),
    ]
    pems: list[str] = []

    async def flow(c: Client) -> None:
        await _rates(c)
        before = {pair: await _balance(c, *pair) for pair in accounts}
        posted = expect_ok(await c.post(_eur_journal("fxj-1", fx_rate="0.90")))
        assert posted["journal_id"] == "fxj-1"
        stored = expect_ok(await c.call("GET", "/ledger/fxj-1", role="auditor"))["journal"]
        entries = stored["entries"]
        assert [(e["account_id"], e["side"], e["amount_cents"], e["currency"]) for e in entries] == [
            ("asset:fxj:cash-eur", "debit", 1000, "EUR"),
            ("revenue:fxj:sales", "credit", 1112, "USD"),
            ("equity:fx-position:EUR", "credit", 1000, "EUR"),
            ("equity:fx-position:EUR", "debit", 1111, "USD"),
            ("expense:fx-rounding", "debit", 1, "USD"),
        ]
        assert entries[0]["meta"] == {
            "fx_rate": "0.9",
            "rate_ts": "2024-01-01T00:00:00.000000Z",
            "base_currency": "USD",
            "base_amount_cents": round(Fraction(1000) / Fraction("0.9")),
        }
        assert all(e["meta"] == {} for e in entries[1:])
        assert _net(entries) == {"EUR": 0, "USD": 0}
        assert stored["memo"] == "EUR sale booked in USD"
        after = {pair: await _balance(c, *pair) for pair in accounts}
        moved = {pair: after[pair] - before[pair] for pair in accounts}
        assert moved == {
            ("asset:fxj:cash-eur", "EUR"): 1000,
            ("revenue:fxj:sales", "USD"): 1112,
            ("equity:fx-position:EUR", "EUR"): 1000,
            ("equity:fx-position:EUR", "USD"): -1111,
            ("expense:fx-rounding", "USD"): 1,
        }
        keys = expect_ok(await c.call("GET", "/keys", role="auditor"))["keys"]
        pems.extend(k["pem"] for k in keys)

    run(node, flow)
    assert node.run(check_store(node.dsn)) == []
    asyncio.run(_checkpoint(node))
    ended = rfc3339(datetime.now(UTC) + timedelta(seconds=1))
    _, data = asyncio.run(_proof(node.url, {"from_ts": started, "to_ts": ended}))
    assert "fxj-1" in _journal_ids(data)
    report = verify_package(data, pems)
    assert report.ok, [check for check in report.checks if not check.ok]


def test_refused_fx_journals_name_the_field_and_write_nothing(node: NodeHarness) -> None:
    """Tried: a client rate other than the node's (400 naming `$.entries[0].fx_rate`), a rate_ts
    before any EUR rate and a currency without rates (422 FX_RATE_MISSING naming the line's
    rate_ts), a 2-unit residual on one foreign line (400 LEDGER_IMBALANCE), FX fields on a USD
    line (400 naming `$.entries[1].fx_rate` / `rate_ts`), fx_rate without rate_ts, a malformed
    rate; each time the journal and its fresh accounts stay unknown."""

    def journal(n: int, first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
        return {"journal_id": f"fxj-bad-{n}", "entries": [first, second]}

    eur_ok = {"rate_ts": IN_2024}
    cases: list[tuple[dict[str, Any], int, str, str]] = [
        (
            journal(1, _line("asset:fxj:b1", "debit", 1000, "EUR", fx_rate="0.85", **eur_ok),
                    _line("revenue:fxj:b1", "credit", 1111, "USD")),
            400, "VALIDATION_ERROR", "$.entries[0].fx_rate",
        ),
        (
            journal(2, _line("asset:fxj:b2", "debit", 1000, "EUR", rate_ts="2019-01-01T00:00:00Z"),
                    _line("revenue:fxj:b2", "credit", 1111, "USD")),
            422, "FX_RATE_MISSING", "$.entries[0].rate_ts",
        ),
        (
            journal(3, _line("revenue:fxj:b3", "credit", 1000, "USD"),
                    _line("asset:fxj:b3", "debit", 900, "CHF", rate_ts=IN_2024)),
            422, "FX_RATE_MISSING", "$.entries[1].rate_ts",
        ),
        (
            journal(4, _line("asset:fxj:b4", "debit", 1000, "EUR", **eur_ok),
                    _line("revenue:fxj:b4", "credit", 1113, "USD")),
            400, "LEDGER_IMBALANCE", "",
        ),
        (
            journal(5, _line("asset:fxj:b5", "debit", 1000, "EUR", **eur_ok),
                    _line("revenue:fxj:b5", "credit", 1111, "USD", fx_rate="1")),
            400, "VALIDATION_ERROR", "$.entries[1].fx_rate",
        ),
        (
            journal(6, _line("asset:fxj:b6", "debit", 1000, "EUR", **eur_ok),
                    _line("revenue:fxj:b6", "credit", 1111, "USD", rate_ts=IN_2024)),
            400, "VALIDATION_ERROR", "$.entries[1].rate_ts",
        ),
        (
            journal(7, _line("asset:fxj:b7", "debit", 1000, "EUR", fx_rate="0.9"),
                    _line("revenue:fxj:b7", "credit", 1111, "USD")),
            400, "VALIDATION_ERROR", "$.entries[0].rate_ts",
        ),
        (
            journal(8, _line("asset:fxj:b8", "debit", 1000, "EUR", fx_rate="9e-1", **eur_ok),
                    _line("revenue:fxj:b8", "credit", 1111, "USD")),
            400, "VALIDATION_ERROR", "$.entries[0].fx_rate",
        ),
    ]  # fmt: skip

    async def flow(c: Client) -> None:
        await _rates(c)
        for n, (body, status, code, field) in enumerate(cases, start=1):
            details = expect_error(await c.post(body), status, code, field or None)
            if code == "LEDGER_IMBALANCE":
                assert (details["currency"], details["residual_minor"], details["tolerance_minor"]) == (
                    "USD",
                    -2,
                    1,
                )
            if code == "FX_RATE_MISSING":
                assert details["base"] == "USD" and details["quote"] in ("EUR", "CHF")
            await c.absent_journal(f"fxj-bad-{n}")
            for entry in body["entries"]:
                await c.absent_account(entry["account_id"])

    run(node, flow)
    assert node.run(check_store(node.dsn)) == []


def test_replays_answer_the_original_result(node: NodeHarness) -> None:
    """Tried: the same FX journal again under its journal_id, and under an Idempotency-Key with
    no journal_id (the original id and posted_at, balances moved once); the same id with another
    payload (409); a GBP journal replayed after a rate was added before its rate_ts (the original
    answer, the stored journal unchanged: replays compare the client's payload)."""

    async def flow(c: Client) -> None:
        await _rates(c)
        first = expect_ok(await c.post(_eur_journal("fxj-replay-1")))
        balance = await _balance(c, "asset:fxj:cash-eur", "EUR")
        again = expect_ok(await c.post(_eur_journal("fxj-replay-1")))
        assert (again["journal_id"], again["posted_at"]) == (first["journal_id"], first["posted_at"])
        assert await _balance(c, "asset:fxj:cash-eur", "EUR") == balance
        other = await c.post(_eur_journal("fxj-replay-1", revenue_usd=1111))
        expect_error(other, 409, "IDEMPOTENCY_CONFLICT")

        keyed = {k: v for k, v in _eur_journal("unused").items() if k != "journal_id"}
        headers = {"Idempotency-Key": "fxj-key-1"}
        by_key = expect_ok(await c.post(keyed, headers=headers))
        replay = expect_ok(await c.post(keyed, headers=headers))
        assert (replay["journal_id"], replay["posted_at"]) == (by_key["journal_id"], by_key["posted_at"])
        assert await _balance(c, "asset:fxj:cash-eur", "EUR") == balance + 1000

        rate = {"quote": "GBP", "rate": "0.8", "source": "boe", "as_of": "2024-01-01T00:00:00Z"}
        expect_ok(await c.call("POST", "/finance/fx/rates", body=rate), 201)
        gbp = {
            "journal_id": "fxj-replay-gbp",
            "entries": [
                _line("asset:fxj:cash-gbp", "debit", 800, "GBP", rate_ts=IN_2024),
                _line("revenue:fxj:sales", "credit", 1000, "USD"),
            ],
        }
        original = expect_ok(await c.post(gbp))
        body = expect_ok(await c.call("GET", "/ledger/fxj-replay-gbp", role="auditor"))["journal"]
        later = {**rate, "rate": "0.79", "as_of": "2024-03-01T00:00:00Z"}
        expect_ok(await c.call("POST", "/finance/fx/rates", body=later), 201)
        replayed = expect_ok(await c.post(gbp))
        assert (replayed["journal_id"], replayed["posted_at"]) == ("fxj-replay-gbp", original["posted_at"])
        assert expect_ok(await c.call("GET", "/ledger/fxj-replay-gbp", role="auditor"))["journal"] == body
        assert body["entries"][0]["meta"]["fx_rate"] == "0.8"

    run(node, flow)
    assert node.run(check_store(node.dsn)) == []


def test_batch_mixes_plain_fx_and_refused_fx_journals(node: NodeHarness) -> None:
    """Tried: one batch of a plain journal, an FX journal, an FX journal with a wrong client rate,
    an FX journal without a rate in force, an unbalanced plain journal and an FX journal with a
    too-large residual: the good ones post (the FX one completed), each bad one fails alone with
    its code and its field under `$.journals[i]`; the same batch under the same key replays."""

    def plain(journal_id: str, credit: int = 50) -> dict[str, Any]:
        return {
            "journal_id": journal_id,
            "entries": [
                _line("asset:fxj:batch-usd", "debit", 50, "USD"),
                _line("revenue:fxj:batch", "credit", credit, "USD"),
            ],
        }

    journals = [
        plain("fxj-b-plain"),
        _eur_journal("fxj-b-fx"),
        _eur_journal("fxj-b-rate", fx_rate="0.91"),
        {
            "journal_id": "fxj-b-missing",
            "entries": [
                _line("asset:fxj:batch-chf", "debit", 900, "CHF", rate_ts=IN_2024),
                _line("revenue:fxj:batch", "credit", 1000, "USD"),
            ],
        },
        plain("fxj-b-unbalanced", credit=49),
        _eur_journal("fxj-b-residual", revenue_usd=1109),
    ]

    async def post(http: aiohttp.ClientSession) -> list[dict[str, Any]]:
        headers = {**auth(), "Idempotency-Key": "fxj-batch-1"}
        async with http.post(
            f"{node.url}/ledger/post_batch", json={"journals": journals}, headers=headers
        ) as r:
            answer = await r.json()
            assert r.status == 200, answer
        results: list[dict[str, Any]] = answer["results"]
        return results

    async def flow(c: Client) -> None:
        await _rates(c)
        results = await post(c.http)
        assert [r["ok"] for r in results] == [True, True, False, False, False, False]
        assert [r["journal_id"] for r in results[:2]] == ["fxj-b-plain", "fxj-b-fx"]
        errors = [(r["error"]["code"], r["error"]["details"].get("field")) for r in results[2:]]
        assert errors == [
            ("VALIDATION_ERROR", "$.journals[2].entries[0].fx_rate"),
            ("FX_RATE_MISSING", "$.journals[3].entries[0].rate_ts"),
            ("LEDGER_IMBALANCE", None),
            ("LEDGER_IMBALANCE", None),
        ]
        assert results[5]["error"]["details"]["residual_minor"] == 2
        stored = expect_ok(await c.call("GET", "/ledger/fxj-b-fx", role="auditor"))["journal"]
        assert [e["account_id"] for e in stored["entries"]] == [
            "asset:fxj:cash-eur",
            "revenue:fxj:sales",
            "equity:fx-position:EUR",
            "equity:fx-position:EUR",
            "expense:fx-rounding",
        ]
        assert _net(stored["entries"]) == {"EUR": 0, "USD": 0}
        for journal_id in ("fxj-b-rate", "fxj-b-missing", "fxj-b-unbalanced", "fxj-b-residual"):
            await c.absent_journal(journal_id)
        await c.absent_account("asset:fxj:batch-chf")
        replay = await post(c.http)
        assert [(r["ok"], r["journal_id"]) for r in replay[:2]] == [(True, "fxj-b-plain"), (True, "fxj-b-fx")]
        assert [r["posted_at"] for r in replay[:2]] == [r["posted_at"] for r in results[:2]]
        assert [r["error"]["code"] for r in replay[2:]] == [r["error"]["code"] for r in results[2:]]

    run(node, flow)
    assert node.run(check_store(node.dsn)) == []
