-- 0013: royalties (finance/royalties.py, store/royalty_repo.py). Participants are the payees of
-- royalty splits (`stripe_account` and the minimum payout are used by payout runs). A royalty rule
-- is versioned per subject (`sku` or `contract`): a new version is a new row (`version` counts
-- from 1 per subject); rows are never updated. The version in force at a time t is the one with
-- the latest `effective_from <= t` (ties: the higher version); a sale uses the version in force at
-- its invoice's `issued_at`. One `royalty_accruals` row per (recognition journal, SKU,
-- participant) records what that journal accrued (total `amount`, of it `holdback`), the rule
-- version used and the recognised `revenue` of the SKU, so later clawbacks can reverse it; rows
-- are written in the same transaction as the invoice update that follows the journal's posting.
CREATE TABLE royalty_participants (
    participant_id   text PRIMARY KEY CHECK (participant_id ~ '^[A-Za-z0-9._-]{1,64}$'),
    name             text,
    stripe_account   text,
    minimum_currency char(3),
    minimum_amount   bigint CHECK (minimum_amount IS NULL OR minimum_amount >= 0),
    request_hash     text NOT NULL,
    principal        text NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    CHECK ((minimum_currency IS NULL) = (minimum_amount IS NULL))
);

CREATE TABLE royalty_rules (
    rule_id         text PRIMARY KEY CHECK (rule_id ~ '^[A-Za-z0-9._-]{1,64}$'),
    subject         text NOT NULL CHECK (subject IN ('sku', 'contract')),
    subject_key     text NOT NULL,
    version         integer NOT NULL CHECK (version >= 1),
    effective_from  timestamptz NOT NULL,
    body            jsonb NOT NULL,
    request_hash    text NOT NULL,
    principal       text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (subject, subject_key, version)
);
CREATE INDEX royalty_rules_in_force ON royalty_rules (subject, subject_key, effective_from DESC, version DESC);

CREATE TABLE royalty_accruals (
    journal_id          text NOT NULL,
    invoice_id          text NOT NULL REFERENCES invoices (invoice_id),
    sku                 text NOT NULL,
    participant_id      text NOT NULL REFERENCES royalty_participants (participant_id),
    rule_id             text NOT NULL REFERENCES royalty_rules (rule_id),
    rule_version        integer NOT NULL,
    installment         integer,
    currency            char(3) NOT NULL,
    revenue             bigint NOT NULL CHECK (revenue >= 0),
    amount              bigint NOT NULL CHECK (amount >= 0),
    holdback            bigint NOT NULL CHECK (holdback >= 0 AND holdback <= amount),
    holdback_release_at timestamptz,
    posted_at           timestamptz NOT NULL,
    PRIMARY KEY (journal_id, sku, participant_id)
);
CREATE INDEX royalty_accruals_participant ON royalty_accruals (participant_id, posted_at);
CREATE INDEX royalty_accruals_invoice ON royalty_accruals (invoice_id, sku);
