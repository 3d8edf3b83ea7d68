-- 0010: disputes reach the ledger (finance/service.py, docs/accounting.md "Disputes"). An opened
-- dispute posts `{invoice_id}.dispute.{dsp id}` (Stripe's cash -> `asset:disputes-held:stripe:{CCY}`)
-- and records its `journal_id`; the closing event posts `{...}.won` (held -> cash) or `{...}.lost`
-- (held -> the invoice's refund lines, like a refund) and records `status`, `closed_journal_id`,
-- `closed_event_id`, `closed_at` and the answer it gave (replayed for a repeat). Rows from before
-- this migration (opened, nothing posted) keep `journal_id` NULL: their close takes the money from
-- cash instead of the held account.
ALTER TABLE stripe_disputes
    ADD COLUMN invoice_id text REFERENCES invoices (invoice_id),
    ADD COLUMN status text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'won', 'lost')),
    ADD COLUMN journal_id text,
    ADD COLUMN closed_event_id text,
    ADD COLUMN closed_journal_id text,
    ADD COLUMN closed_at timestamptz,
    ADD COLUMN answer jsonb;

CREATE INDEX stripe_disputes_invoice ON stripe_disputes (invoice_id, created_at);
