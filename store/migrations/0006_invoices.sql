-- 0006: invoices and payments (finance/service.py). An invoice row holds the priced invoice
-- (`body`: lines, tax evidence, money state as finance/invoices.py's `Invoice`), its status and
-- amounts as columns for queries, the ids of the journals its steps posted, and `version`, which
-- every UPDATE checks and bumps (optimistic concurrency across nodes; within one node the
-- finance service also holds a lock per invoice). Balances are never written here: each step
-- posts its journal through the ledger under a deterministic id (`{invoice_id}.issue`,
-- `{invoice_id}.pay.{payment_id}`, ...) before the row is updated, so a retry after a crash in
-- between replays the stored journal instead of posting twice. `kind = 'external'` rows are
-- invoices recorded by `POST /invoices` against an existing journal (`journal_ref`); they post
-- nothing. A payment (and a refund) is unique per (provider, provider_reference); its `answer` is
-- what the first request was told, returned again to a duplicate. `finance_requests` remembers the
-- answer of each finance write sent with an Idempotency-Key (per principal).
CREATE TABLE invoices (
    invoice_id      text PRIMARY KEY,
    kind            text NOT NULL DEFAULT 'priced' CHECK (kind IN ('priced', 'external')),
    principal       text NOT NULL,
    buyer           jsonb NOT NULL,
    currency        text NOT NULL,
    status          text NOT NULL
        CHECK (status IN ('draft', 'issued', 'paid', 'fulfilled', 'closed', 'voided', 'refunded')),
    subtotal        bigint NOT NULL CHECK (subtotal >= 0),
    tax             bigint NOT NULL CHECK (tax >= 0),
    total           bigint NOT NULL CHECK (total = subtotal + tax),
    amount_paid     bigint NOT NULL DEFAULT 0 CHECK (amount_paid >= 0),
    amount_refunded bigint NOT NULL DEFAULT 0 CHECK (amount_refunded >= 0 AND amount_refunded <= amount_paid),
    customer_credit bigint NOT NULL DEFAULT 0 CHECK (customer_credit >= 0),
    body            jsonb NOT NULL,
    document_hash   text NOT NULL,
    request_hash    text NOT NULL,
    journal_ids     text[] NOT NULL DEFAULT '{}',
    journal_ref     text,
    due_date        text,
    terms           text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    issued_at       timestamptz,
    paid_at         timestamptz,
    fulfilled_at    timestamptz,
    closed_at       timestamptz,
    voided_at       timestamptz,
    refunded_at     timestamptz,
    version         integer NOT NULL DEFAULT 1 CHECK (version >= 1),
    CHECK ((kind = 'external') = (journal_ref IS NOT NULL))
);

CREATE INDEX invoices_status ON invoices (status, created_at);

CREATE TABLE payments (
    payment_id         text PRIMARY KEY,
    invoice_id         text NOT NULL REFERENCES invoices (invoice_id),
    provider           text NOT NULL,
    provider_reference text NOT NULL,
    amount             bigint NOT NULL CHECK (amount > 0),
    currency           text NOT NULL,
    journal_id         text NOT NULL,
    settlement_id      text,
    principal          text NOT NULL,
    answer             jsonb NOT NULL,
    created_at         timestamptz NOT NULL DEFAULT now(),
    UNIQUE (provider, provider_reference)
);

CREATE INDEX payments_invoice ON payments (invoice_id, created_at);

CREATE TABLE refunds (
    refund_id          text PRIMARY KEY,
    invoice_id         text NOT NULL REFERENCES invoices (invoice_id),
    provider           text NOT NULL,
    provider_reference text NOT NULL,
    amount             bigint NOT NULL CHECK (amount > 0),
    currency           text NOT NULL,
    journal_id         text NOT NULL,
    principal          text NOT NULL,
    answer             jsonb NOT NULL,
    created_at         timestamptz NOT NULL DEFAULT now(),
    UNIQUE (provider, provider_reference)
);

CREATE INDEX refunds_invoice ON refunds (invoice_id, created_at);

CREATE TABLE finance_requests (
    principal    text NOT NULL,
    idem_key     text NOT NULL,
    endpoint     text NOT NULL,
    request_hash text NOT NULL,
    answer       jsonb NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (principal, idem_key)
);
