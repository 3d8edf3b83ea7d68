"""`FinanceService.pay_many` (the Kafka consumer's batched payment path) against `pay` one by one.

Two identical sets of invoices on one real node; the same random stream of payment events (partial
payments, overpayments, settlements, duplicates, conflicting duplicates, unknown invoices, invalid
requests, replays of earlier calls) goes through `pay` one at a time, in order, on one set and through
`pay_many` in a few batches on the other. Everything a client or an auditor can see must be the same
once the set's name is swapped: answers and errors, stored payment rows, invoice rows and journal lines.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import secrets
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest

from api.finance_routes import FINANCE
from finance.service import FinanceService, PaymentRequest, payment_id_of
from ledger.errors import LedgerError
from tests.support.node import NodeHarness

INVOICES = 8
PRINCIPAL = "svc-token"


@pytest.fixture(scope="module")
def pay_node(ray_cluster: None) -> Iterator[NodeHarness]:
    """A node of its own (the default 4 shards)."""
    harness = NodeHarness().start()
    yield harness
    harness.stop()


def _requests(rng: random.Random, tag: str, prefix: str) -> list[tuple[PaymentRequest, str | None]]:
    """A random stream of payment calls on `{prefix}-{0..INVOICES-1}` (references carry `tag`)."""
    out: list[tuple[PaymentRequest, str | None]] = []
    for n in range(60):
        invoice = f"{prefix}-{rng.randrange(INVOICES)}"
        amount = rng.choice([1, 300, 595, 1190, 2000])
        reference, currency, provider = f"{tag}-r{n}", "EUR", "stripe"
        roll = rng.random()
        if roll < 0.12 and out:  # the same reference again: a replay, or a conflict
            earlier, _ = rng.choice(out)
            reference, amount = earlier.provider_reference, rng.choice([earlier.amount, amount])
            invoice = rng.choice([earlier.invoice_id or invoice, invoice])
        elif roll < 0.16:
            invoice = f"{prefix}-missing"  # NOT_FOUND
        elif roll < 0.19:
            provider = "bad provider!"  # VALIDATION_ERROR from the pure step
        elif roll < 0.22:
            currency = "JPY"  # another currency without a rate: FX_RATE_MISSING
        settlement = f"{tag}-s{n}" if rng.random() < 0.2 else None
        request = PaymentRequest(
            amount=amount,
            currency=currency,
            payment_provider=provider,
            provider_reference=reference,
            invoice_id=invoice,
        )
        out.append((request, settlement))
    return out


def _outcome(outcome: Any) -> Any:
    if isinstance(outcome, LedgerError):
        return {"error": str(outcome.code), "message": outcome.message, "details": outcome.details}
    if isinstance(outcome, BaseException):
        return {"unexpected": repr(outcome)}
    return outcome


async def _issue(finance: FinanceService, prefix: str) -> None:
    from finance.invoices import Buyer, LineItem
    from finance.service import InvoiceRequest

    for i in range(INVOICES):
        request = InvoiceRequest(
            buyer=Buyer(buyer_id=f"{prefix}-buyer-{i}", country="DE"),
            line_items=[LineItem(sku="w", qty=1, unit_price=1000 + 100 * i, tax_code="standard")],
            currency="EUR",
            invoice_id=f"{prefix}-{i}",
        )
        await finance.create(request, f"{prefix}-{i}", PRINCIPAL)


async def _state(dsn: str, prefix: str) -> dict[str, Any]:
    conn = await asyncpg.connect(dsn)
    try:
        invoices = await conn.fetch(
            "SELECT invoice_id, status, amount_paid, customer_credit, version, journal_ids, body::text,"
            " paid_at IS NOT NULL AS paid FROM invoices WHERE invoice_id LIKE $1 ORDER BY invoice_id",
            f"{prefix}-%",
        )
        payments = await conn.fetch(
            "SELECT payment_id, invoice_id, provider, provider_reference, amount, currency, journal_id,"
            " settlement_id, answer::text FROM payments WHERE invoice_id LIKE $1"
            " ORDER BY invoice_id, created_at",
            f"{prefix}-%",
        )
        lines = await conn.fetch(
            "SELECT journal_id, line_no, account_id, side, amount, currency FROM journal_lines"
            " WHERE journal_id LIKE $1 ORDER BY journal_id, line_no",
            f"{prefix}-%.pay.%",
        )
    finally:
        await conn.close()
    return {
        "invoices": [dict(r) for r in invoices],
        "payments": [dict(r) for r in payments],
        "lines": [list(r) for r in lines],
    }


def _swap(value: Any, names: dict[str, str]) -> Any:
    text = re.sub(r"\d{4}-\d\d-\d\dT[\d:.]+Z", "<now>", json.dumps(value, sort_keys=True, default=str))
    for old, new in names.items():
        text = text.replace(old, new)
    return json.loads(text)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_pay_many_answers_and_stores_exactly_what_pay_one_by_one_does(
    pay_node: NodeHarness, seed: int
) -> None:
    """Tried: 60 random payment calls (partial, over-, duplicate, conflicting, settlement, unknown
    invoice, bad provider, other currency without a rate) through `pay` one by one on invoice set A
    and through `pay_many` in batches of 1-25 on an identical set B, then the first 10 again (replays
    of stored payments) -> identical answers and errors, payment rows (in order), invoice rows
    (status, amounts, version, journal ids, paid_at) and journal lines, once A's names are B's."""
    run = secrets.token_hex(3)
    single, batched = f"pmA{run}{seed}", f"pmB{run}{seed}"
    finance: FinanceService = pay_node.node.app[FINANCE]  # type: ignore[union-attr,index]
    rng = random.Random(seed)
    plan_a = _requests(random.Random(seed), f"{single}x", single)
    plan_b = _requests(rng, f"{batched}x", batched)
    plan_a += plan_a[:10]
    plan_b += plan_b[:10]

    async def flow() -> tuple[list[Any], list[Any]]:
        await _issue(finance, single)
        await _issue(finance, batched)
        one_by_one: list[Any] = []
        for request, settlement in plan_a:
            try:
                one_by_one.append(await finance.pay(request, PRINCIPAL, settlement))
            except LedgerError as exc:
                one_by_one.append(exc)
        together: list[Any] = []
        start, sizes = 0, random.Random(seed + 100)
        while start < len(plan_b):
            size = sizes.randint(1, 25)
            together += await finance.pay_many(plan_b[start : start + size], PRINCIPAL)
            start += size
        return one_by_one, together

    one_by_one, together = pay_node.run(flow())
    names = {single: batched}
    for request, _ in plan_a:
        a_id = payment_id_of(request.payment_provider, request.provider_reference)
        b_ref = request.provider_reference.replace(single, batched)
        names[a_id] = payment_id_of(request.payment_provider, b_ref)
    assert all(o is not None for o in together)
    assert [_swap(_outcome(o), names) for o in one_by_one] == [_swap(_outcome(o), {}) for o in together]
    assert sum(1 for o in together if isinstance(o, tuple) and o[1]) > 10  # payments were posted
    assert any(isinstance(o, tuple) and not o[1] for o in together)  # and replayed
    assert any(isinstance(o, LedgerError) for o in together)  # and refused
    state_a = asyncio.run(_state(pay_node.dsn, single))
    state_b = asyncio.run(_state(pay_node.dsn, batched))
    swapped_a, swapped_b = _swap(state_a, names), _swap(state_b, {})
    for state in (swapped_a, swapped_b):  # journal ids embed payment ids: order after the swap
        state["lines"].sort()
    assert swapped_a["payments"] and swapped_a["lines"]
    assert swapped_a == swapped_b
