-- 0016: royalty clawbacks (finance/royalties.py `clawback`, finance/service.py `_claw_back`).
-- A refund or lost dispute that reverses recognised revenue of an invoice's SKU takes the
-- participants' share back from their payables. One row per (source journal: the refund or
-- lost-dispute journal, SKU, participant that accrued on the invoice's SKU): `revenue` is the
-- recognised revenue the source journal reversed for the SKU, `amount` what this participant
-- gave back (signed: a largest-remainder rounding correction can be -1), `journal_id` the
-- clawback journal (NULL when every amount was zero, so nothing was posted). Rows are written in
-- the same transaction as the refund's invoice update; the cumulative sums drive later clawbacks.
CREATE TABLE royalty_clawbacks (
    source_journal  text NOT NULL,
    invoice_id      text NOT NULL REFERENCES invoices (invoice_id),
    sku             text NOT NULL,
    participant_id  text NOT NULL REFERENCES royalty_participants (participant_id),
    journal_id      text,
    rule_id         text NOT NULL REFERENCES royalty_rules (rule_id),
    rule_version    integer NOT NULL,
    currency        char(3) NOT NULL,
    revenue         bigint NOT NULL CHECK (revenue > 0),
    amount          bigint NOT NULL,
    posted_at       timestamptz NOT NULL,
    PRIMARY KEY (source_journal, sku, participant_id)
);
CREATE INDEX royalty_clawbacks_participant ON royalty_clawbacks (participant_id, posted_at);
CREATE INDEX royalty_clawbacks_invoice ON royalty_clawbacks (invoice_id, sku);
