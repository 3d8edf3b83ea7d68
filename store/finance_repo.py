"""Invoices, payments and finance idempotency keys in PostgreSQL (migration 0006).

Rows only: no balances are written here (journals go through the ledger). Every invoice
UPDATE checks and bumps `version`; `update_invoice` answers False when the row changed since
it was read, and the caller reports a concurrent change.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import asyncpg


@dataclass(frozen=True, slots=True, kw_only=True)
class InvoiceRow:
    """Columns of a new or changed invoice row (JSON values already encoded as text)."""

    buyer: str
    currency: str
    status: str
    subtotal: int
    tax: int
    total: int
    body: str
    amount_paid: int = 0
    amount_refunded: int = 0
    customer_credit: int = 0


_INSERT_INVOICE = """
INSERT INTO invoices (invoice_id, kind, principal, buyer, currency, status, subtotal, tax, total,
                      body, document_hash, request_hash, journal_ref, due_date, terms, issued_at)
VALUES ($1, $2, $3, $4::jsonb, $5, $6, $7, $8, $9, $10::jsonb, $11, $12, $13, $14, $15,
        CASE WHEN $6 = 'issued' THEN now() END)
ON CONFLICT (invoice_id) DO NOTHING
"""


async def insert_invoice(
    conn: asyncpg.Connection,
    invoice_id: str,
    kind: str,
    principal: str,
    row: InvoiceRow,
    *,
    document_hash: str,
    request_hash: str,
    journal_ref: str | None = None,
    due_date: str | None = None,
    terms: str | None = None,
) -> bool:
    """Insert a new invoice; False when the id is taken (the caller compares `request_hash`)."""
    status = await conn.execute(
        _INSERT_INVOICE,
        invoice_id,
        kind,
        principal,
        row.buyer,
        row.currency,
        row.status,
        row.subtotal,
        row.tax,
        row.total,
        row.body,
        document_hash,
        request_hash,
        journal_ref,
        due_date,
        terms,
    )
    return bool(status == "INSERT 0 1")


async def invoice_row(conn: asyncpg.Connection, invoice_id: str) -> asyncpg.Record | None:
    """The invoice row, or None."""
    return await conn.fetchrow("SELECT * FROM invoices WHERE invoice_id = $1", invoice_id)


_UPDATE_INVOICE = """
UPDATE invoices SET
    status = $3, amount_paid = $4, amount_refunded = $5, customer_credit = $6, body = $7::jsonb,
    journal_ids = CASE WHEN $8::text IS NULL OR $8 = ANY(journal_ids) THEN journal_ids
                       ELSE array_append(journal_ids, $8) END,
    version = version + 1, updated_at = now(),
    issued_at = COALESCE(issued_at, CASE WHEN $3 = 'issued' THEN now() END),
    paid_at = COALESCE(paid_at, CASE WHEN $3 = 'paid' THEN now() END),
    fulfilled_at = COALESCE(fulfilled_at, CASE WHEN $3 = 'fulfilled' THEN now() END),
    closed_at = COALESCE(closed_at, CASE WHEN $3 = 'closed' THEN now() END),
    voided_at = COALESCE(voided_at, CASE WHEN $3 = 'voided' THEN now() END),
    refunded_at = COALESCE(refunded_at, CASE WHEN $3 = 'refunded' THEN now() END)
WHERE invoice_id = $1 AND version = $2
"""


async def update_invoice(
    conn: asyncpg.Connection, invoice_id: str, version: int, row: InvoiceRow, journal_id: str | None
) -> bool:
    """Apply a step's new state if the row is still at `version`; False when it moved on."""
    status = await conn.execute(
        _UPDATE_INVOICE,
        invoice_id,
        version,
        row.status,
        row.amount_paid,
        row.amount_refunded,
        row.customer_credit,
        row.body,
        journal_id,
    )
    return bool(status == "UPDATE 1")


MONEY_TABLES: Final = {"payment": ("payments", "payment_id"), "refund": ("refunds", "refund_id")}
"""Money movement kind -> (table, id column); both tables have the same shape (migration 0006)."""


async def money_by_reference(
    conn: asyncpg.Connection, kind: str, provider: str, provider_reference: str
) -> asyncpg.Record | None:
    """The payment or refund recorded for a provider's reference (its id as `id`), or None."""
    table, id_column = MONEY_TABLES[kind]
    return await conn.fetchrow(
        f"SELECT {id_column} AS id, * FROM {table} WHERE provider = $1 AND provider_reference = $2",
        provider,
        provider_reference,
    )


async def insert_money(conn: asyncpg.Connection, kind: str, values: dict[str, Any]) -> None:
    """Record a payment or refund (inside the caller's transaction, with the invoice update)."""
    table, id_column = MONEY_TABLES[kind]
    settlement = ", settlement_id" if kind == "payment" else ""
    names = f"{id_column}, invoice_id, provider, provider_reference, amount, currency, journal_id"
    names += ", principal, answer"
    params = [
        values["id"],
        values["invoice_id"],
        values["provider"],
        values["provider_reference"],
        values["amount"],
        values["currency"],
        values["journal_id"],
        values["principal"],
        values["answer"],
    ]
    placeholders = "$1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb"
    if settlement:
        params.append(values.get("settlement_id"))
        placeholders += ", $10"
    await conn.execute(
        f"INSERT INTO {table} ({names}{settlement}) VALUES ({placeholders})",
        *params,
    )


async def payments_by_reference(
    conn: asyncpg.Connection, keys: list[tuple[str, str]]
) -> dict[tuple[str, str], asyncpg.Record]:
    """The payments recorded for many (provider, reference) keys, by key (`money_by_reference`'s rows)."""
    rows = await conn.fetch(
        "SELECT payment_id AS id, p.* FROM payments p"
        " JOIN unnest($1::text[], $2::text[]) AS k (provider, reference)"
        " ON p.provider = k.provider AND p.provider_reference = k.reference",
        [k[0] for k in keys],
        [k[1] for k in keys],
    )
    return {(r["provider"], r["provider_reference"]): r for r in rows}


PAYMENT_COLUMNS: Final = "invoice_id, kind, status, version, currency, issued_at, body"
"""The invoice columns a payment reads (`invoice_rows`): its state, version and body."""


async def invoice_rows(conn: asyncpg.Connection, invoice_ids: list[str]) -> dict[str, asyncpg.Record]:
    """Many invoices' `PAYMENT_COLUMNS` by id (missing ids are absent)."""
    rows = await conn.fetch(
        f"SELECT {PAYMENT_COLUMNS} FROM invoices WHERE invoice_id = ANY($1::text[])", invoice_ids
    )
    return {r["invoice_id"]: r for r in rows}


@dataclass(frozen=True, slots=True)
class InvoiceSteps:
    """An invoice's state after `steps` consecutive updates from `version` (one batch)."""

    invoice_id: str
    version: int
    steps: int
    row: InvoiceRow
    journal_ids: list[str]


# Rows as one array of `commit_invoice_step` / `commit_payment` (migration 0026): asyncpg checks every
# array element in Python, so one element per row costs less than one per column and row.
_UPDATE_INVOICES = """
UPDATE invoices AS i SET
    status = u.status, amount_paid = u.amount_paid, amount_refunded = u.amount_refunded,
    customer_credit = u.customer_credit, body = u.body::jsonb,
    journal_ids = CASE
        WHEN NOT i.journal_ids && string_to_array(u.journal_ids, ',')  -- the usual case: all new
        THEN i.journal_ids || string_to_array(u.journal_ids, ',')
        ELSE i.journal_ids || ARRAY(
            SELECT j FROM unnest(string_to_array(u.journal_ids, ',')) WITH ORDINALITY AS x (j, n)
            WHERE NOT j = ANY(i.journal_ids) ORDER BY n) END,
    version = i.version + u.steps, updated_at = now(),
    issued_at = COALESCE(i.issued_at, CASE WHEN u.status = 'issued' THEN now() END),
    paid_at = COALESCE(i.paid_at, CASE WHEN u.status = 'paid' THEN now() END)
FROM unnest($1::commit_invoice_step[]) AS u
WHERE i.invoice_id = u.invoice_id AND i.version = u.version
RETURNING i.invoice_id
"""


async def update_invoices(conn: asyncpg.Connection, updates: list[InvoiceSteps]) -> set[str]:
    """`update_invoice` for many invoices at once, each by its consecutive payment steps (status
    `issued`/`paid` only: the timestamps of other states are not set here); the ids updated (an
    invoice that moved past `version` meanwhile is left out, like `update_invoice`'s False)."""
    rows = await conn.fetch(
        _UPDATE_INVOICES,
        [
            (u.invoice_id, u.version, u.steps, u.row.status, u.row.amount_paid, u.row.amount_refunded,
             u.row.customer_credit, u.row.body, ",".join(u.journal_ids))
            for u in updates
        ],
    )  # fmt: skip
    return {r["invoice_id"] for r in rows}


_INSERT_PAYMENTS = """
INSERT INTO payments (payment_id, invoice_id, provider, provider_reference, amount, currency, journal_id,
                      principal, answer, settlement_id, created_at)
SELECT p.payment_id, p.invoice_id, p.provider, p.provider_reference, p.amount, p.currency, p.journal_id,
       p.principal, p.answer::jsonb, p.settlement_id, now() + (p.n - 1) * interval '1 microsecond'
FROM unnest($1::commit_payment[]) WITH ORDINALITY
     AS p (payment_id, invoice_id, provider, provider_reference, amount, currency, journal_id, principal,
           answer, settlement_id, n)
"""


async def insert_payments(conn: asyncpg.Connection, values: list[dict[str, Any]]) -> None:
    """`insert_money("payment", ...)` for many payments in one statement; `created_at` keeps their
    order (a microsecond apart), so `money_ids` lists them as if recorded one by one."""
    await conn.execute(
        _INSERT_PAYMENTS,
        [
            (v["id"], v["invoice_id"], v["provider"], v["provider_reference"], v["amount"], v["currency"],
             v["journal_id"], v["principal"], v["answer"], v.get("settlement_id"))
            for v in values
        ],
    )  # fmt: skip


async def money_ids(conn: asyncpg.Connection, kind: str, invoice_id: str) -> list[str]:
    """The invoice's payment (or refund) ids, oldest first."""
    table, id_column = MONEY_TABLES[kind]
    rows = await conn.fetch(
        f"SELECT {id_column} FROM {table} WHERE invoice_id = $1 ORDER BY created_at, {id_column}",
        invoice_id,
    )
    return [r[id_column] for r in rows]


async def finance_request(conn: asyncpg.Connection, principal: str, idem_key: str) -> asyncpg.Record | None:
    """A remembered finance write for (principal, Idempotency-Key), or None."""
    return await conn.fetchrow(
        "SELECT endpoint, request_hash, answer FROM finance_requests WHERE principal = $1 AND idem_key = $2",
        principal,
        idem_key,
    )


async def remember_request(
    conn: asyncpg.Connection, principal: str, idem_key: str, endpoint: str, request_hash: str, answer: str
) -> None:
    """Remember a finance write's answer under its key (the first one wins)."""
    await conn.execute(
        "INSERT INTO finance_requests (principal, idem_key, endpoint, request_hash, answer)"
        " VALUES ($1, $2, $3, $4, $5::jsonb) ON CONFLICT DO NOTHING",
        principal,
        idem_key,
        endpoint,
        request_hash,
        answer,
    )


# -- Stripe webhook inbox (migration 0007) ---------------------------------------------------------
STRIPE: Final = "stripe"
"""The provider name of payments and refunds that came through the Stripe webhook."""


async def stripe_event_seen(conn: asyncpg.Connection, event_id: str) -> bool:
    """Whether a Stripe event id was recorded (its actions were applied)."""
    return bool(await conn.fetchval("SELECT 1 FROM stripe_events WHERE event_id = $1", event_id))


async def stripe_paid_intents(conn: asyncpg.Connection, intents: list[str]) -> dict[str, str]:
    """Payment intent -> invoice id, for the intents among `intents` that were paid via Stripe."""
    rows = await conn.fetch(
        "SELECT provider_reference, invoice_id FROM payments"
        " WHERE provider = $1 AND provider_reference = ANY($2::text[])",
        STRIPE,
        intents,
    )
    return {r["provider_reference"]: r["invoice_id"] for r in rows}


async def stripe_applied_keys(conn: asyncpg.Connection, keys: list[str]) -> set[str]:
    """The refund and dispute keys among `keys` already applied (a refunds row, a dispute row, or
    `{dispute id}:closed` for a dispute no longer open)."""
    rows = await conn.fetch(
        "SELECT provider_reference AS key FROM refunds WHERE provider = $1"
        " AND provider_reference = ANY($2::text[])"
        " UNION SELECT dispute_id FROM stripe_disputes WHERE dispute_id = ANY($2::text[])"
        " UNION SELECT dispute_id || ':closed' FROM stripe_disputes WHERE status <> 'open'"
        " AND dispute_id || ':closed' = ANY($2::text[])",
        STRIPE,
        keys,
    )
    return {r["key"] for r in rows}


async def stripe_parked(conn: asyncpg.Connection, intents: list[str], keys: list[str]) -> list[str]:
    """Parked actions (JSON text, oldest first) of the given payment intents or with the given keys."""
    rows = await conn.fetch(
        "SELECT action::text AS action FROM stripe_parked"
        " WHERE payment_intent = ANY($1::text[]) OR key = ANY($2::text[]) ORDER BY parked_at, key",
        intents,
        keys,
    )
    return [r["action"] for r in rows]


async def insert_stripe_dispute(conn: asyncpg.Connection, values: dict[str, Any]) -> None:
    """Record an opened dispute and its hold journal once (a repeat is ignored; migration 0010)."""
    await conn.execute(
        "INSERT INTO stripe_disputes (dispute_id, payment_intent, event_id, amount, currency, reason,"
        " invoice_id, journal_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING",
        values["dispute_id"],
        values["payment_intent"],
        values["event_id"],
        values["amount"],
        values["currency"],
        values["reason"],
        values["invoice_id"],
        values["journal_id"],
    )


async def stripe_dispute(conn: asyncpg.Connection, dispute_id: str) -> asyncpg.Record | None:
    """One dispute's row (`answer` as JSON text), or None."""
    return await conn.fetchrow(
        "SELECT *, answer::text AS answer_text FROM stripe_disputes WHERE dispute_id = $1", dispute_id
    )


async def close_stripe_dispute(
    conn: asyncpg.Connection, dispute_id: str, status: str, event_id: str, journal_id: str | None, answer: str
) -> bool:
    """Mark an open dispute won or lost with its closing journal and answer; False if not open."""
    done = await conn.execute(
        "UPDATE stripe_disputes SET status = $2, closed_event_id = $3, closed_journal_id = $4,"
        " closed_at = now(), answer = $5::jsonb WHERE dispute_id = $1 AND status = 'open'",
        dispute_id,
        status,
        event_id,
        journal_id,
        answer,
    )
    return bool(done == "UPDATE 1")


async def invoice_disputes(conn: asyncpg.Connection, invoice_id: str) -> list[asyncpg.Record]:
    """The invoice's disputes, oldest first."""
    return await conn.fetch(
        "SELECT dispute_id, payment_intent, amount, currency, reason, status, journal_id,"
        " closed_journal_id, created_at, closed_at FROM stripe_disputes WHERE invoice_id = $1"
        " ORDER BY created_at, dispute_id",
        invoice_id,
    )


async def stripe_payments_refundable(conn: asyncpg.Connection, invoice_id: str) -> list[asyncpg.Record]:
    """The invoice's Stripe payments, oldest first, with what is left to refund at Stripe on each:
    the amount less refunds recorded against the intent (`answer.payment_intent`) and less its
    disputes that are open or lost (Stripe withholds or took that money)."""
    return await conn.fetch(
        "SELECT p.payment_id, p.provider_reference AS payment_intent, p.currency, p.amount,"
        " (p.amount"
        "  - COALESCE((SELECT sum(r.amount) FROM refunds r WHERE r.provider = $2"
        "     AND r.answer->>'payment_intent' = p.provider_reference"
        "     AND r.answer->>'dispute_id' IS NULL), 0)"
        "  - COALESCE((SELECT sum(d.amount) FROM stripe_disputes d"
        "     WHERE d.payment_intent = p.provider_reference AND d.status <> 'won'), 0))::bigint AS refundable"
        " FROM payments p WHERE p.invoice_id = $1 AND p.provider = $2"
        " ORDER BY p.created_at, p.payment_id",
        invoice_id,
        STRIPE,
    )


async def payment_currencies(conn: asyncpg.Connection, invoice_id: str) -> set[str]:
    """The currencies of the invoice's payments."""
    rows = await conn.fetch("SELECT DISTINCT currency FROM payments WHERE invoice_id = $1", invoice_id)
    return {r["currency"] for r in rows}


async def last_payment_at(conn: asyncpg.Connection, invoice_id: str) -> datetime | None:
    """When the invoice's latest payment was recorded (None without payments)."""
    value: datetime | None = await conn.fetchval(
        "SELECT max(created_at) FROM payments WHERE invoice_id = $1", invoice_id
    )
    return value


async def record_stripe_delivery(
    conn: asyncpg.Connection,
    event: tuple[str, str, str] | None,
    parked: list[tuple[str, str, str, str]],
    released: list[str],
) -> None:
    """After a delivery's actions succeeded, in one transaction: drop the released parked keys,
    park the new actions `(key, payment_intent, event_id, action_json)` and record the event
    `(event_id, type, outcome)` (when it has an id)."""
    async with conn.transaction():
        if released:
            await conn.execute("DELETE FROM stripe_parked WHERE key = ANY($1::text[])", released)
        if parked:
            await conn.executemany(
                "INSERT INTO stripe_parked (key, payment_intent, event_id, action)"
                " VALUES ($1, $2, $3, $4::jsonb) ON CONFLICT DO NOTHING",
                parked,
            )
        if event is not None:
            await conn.execute(
                "INSERT INTO stripe_events (event_id, type, outcome) VALUES ($1, $2, $3)"
                " ON CONFLICT DO NOTHING",
                *event,
            )


# -- tax return (GET /finance/tax/return/{period}) -------------------------------------------------
TAX_PAYABLE_PREFIX: Final = "liability:tax-payable:"
"""Account ids of tax collected and owed, one per jurisdiction (`finance.chart.tax_payable`)."""


async def tax_invoices(conn: asyncpg.Connection, start: datetime, end: datetime) -> list[asyncpg.Record]:
    """Priced invoices issued, or voided after issue, in `[start, end)`: id, currency, body (JSON
    text), issued_at, voided_at (None unless voided)."""
    return await conn.fetch(
        "SELECT invoice_id, currency, body::text AS body, issued_at, voided_at FROM invoices"
        " WHERE kind = 'priced' AND issued_at IS NOT NULL"
        " AND ((issued_at >= $1 AND issued_at < $2) OR (voided_at >= $1 AND voided_at < $2))"
        " ORDER BY issued_at, invoice_id",
        start,
        end,
    )


async def tax_refunds(conn: asyncpg.Connection, start: datetime, end: datetime) -> list[asyncpg.Record]:
    """Refunds posted in `[start, end)` (the refund journal's `posted_at`, else the row's time):
    refund id, invoice id, currency, answer and invoice body (JSON text), posted_at, and
    `tax_lines`: the refund journal's debits per tax-payable account as `{account_id: amount}`
    JSON text (the ledger's own figures, read from the stored journal body: journal_lines has no
    index by journal id)."""
    return await conn.fetch(
        "SELECT r.refund_id, r.invoice_id, r.currency, r.answer::text AS answer, i.body::text AS body,"
        " COALESCE(j.posted_at, r.created_at) AS posted_at,"
        " (SELECT COALESCE(jsonb_object_agg(t.account_id, t.amount), '{}'::jsonb)::text FROM"
        "   (SELECT e->>'account_id' AS account_id, sum((e->>'amount_cents')::bigint)::bigint AS amount"
        "      FROM jsonb_array_elements(convert_from(j.body, 'UTF8')::jsonb -> 'entries') e"
        "     WHERE e->>'side' = 'debit' AND starts_with(e->>'account_id', $3)"
        "     GROUP BY 1) t) AS tax_lines"
        " FROM refunds r JOIN invoices i ON i.invoice_id = r.invoice_id AND i.kind = 'priced'"
        " LEFT JOIN journals j ON j.journal_id = r.journal_id"
        " WHERE COALESCE(j.posted_at, r.created_at) >= $1 AND COALESCE(j.posted_at, r.created_at) < $2"
        " ORDER BY posted_at, r.refund_id",
        start,
        end,
        TAX_PAYABLE_PREFIX,
    )
