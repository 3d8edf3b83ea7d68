-- 0009: revenue recognition schedules (finance/recognition.py, finance/service.py). A fulfilment
-- with a ratable policy stores one `revenue_schedules` row and one `revenue_installments` row per
-- installment `k` (1-based), due at `due_at`. The invoice body (migration 0006) holds the full
-- schedule (amounts per SKU); these rows are the index the recognition run reads
-- (`posted_at IS NULL AND due_at <= as_of`) and are updated in the same transaction as the invoice
-- body: `amount` when a refund shrinks the installment, `posted_at` and `journal_id` (NULL when the
-- installment had shrunk to nothing) once it is posted. The journal of installment k is posted
-- under the deterministic id `{invoice_id}.recognise.{k}`, so a retry after a crash replays it.
CREATE TABLE revenue_schedules (
    invoice_id  text PRIMARY KEY REFERENCES invoices (invoice_id),
    method      text NOT NULL CHECK (method IN ('ratable')),
    periods     integer NOT NULL CHECK (periods BETWEEN 1 AND 120),
    "interval"  text NOT NULL CHECK ("interval" IN ('day', 'week', 'month')),
    start_at    timestamptz NOT NULL,
    total       bigint NOT NULL CHECK (total >= 0),
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE revenue_installments (
    invoice_id  text NOT NULL REFERENCES revenue_schedules (invoice_id),
    k           integer NOT NULL CHECK (k BETWEEN 1 AND 120),
    due_at      timestamptz NOT NULL,
    amount      bigint NOT NULL CHECK (amount >= 0),
    journal_id  text,
    posted_at   timestamptz,
    PRIMARY KEY (invoice_id, k),
    CHECK (journal_id IS NULL OR posted_at IS NOT NULL)
);

CREATE INDEX revenue_installments_due ON revenue_installments (due_at, invoice_id, k)
    WHERE posted_at IS NULL;
