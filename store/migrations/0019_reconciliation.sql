-- 0019: reconciliation against the payment provider (finance/reconcile.py, finance/reconcile_service.py,
-- api/reconcile_routes.py, store/reconcile_repo.py). A run is created once per `request_id` (a replay
-- with the same request answers its report; `request_hash` tells a different request apart); it
-- moves running -> completed | failed (a failed run, e.g. the provider unreachable, is run again by
-- the same request). Its discrepancies are rows keyed by (run, `dNNNN`); an operator resolves one by
-- posting an adjusting journal, recorded in `reconcile_resolutions` with the ledger-side value it
-- established for the provider reference (NULL amount: the ledger record was reversed). Later runs
-- read the resolutions to match that reference.
CREATE TABLE reconcile_runs (
    reconcile_id       text PRIMARY KEY,
    request_id         text NOT NULL UNIQUE CHECK (request_id ~ '^[A-Za-z0-9:._-]{1,120}$'),
    provider           text NOT NULL,
    from_ts            timestamptz NOT NULL,
    to_ts              timestamptz NOT NULL,
    trigger            text NOT NULL CHECK (trigger IN ('api', 'schedule')),
    status             text NOT NULL CHECK (status IN ('running', 'completed', 'failed')),
    request_hash       text NOT NULL,
    principal          text NOT NULL,
    matched            integer NOT NULL DEFAULT 0 CHECK (matched >= 0),
    provider_records   integer NOT NULL DEFAULT 0 CHECK (provider_records >= 0),
    ledger_records     integer NOT NULL DEFAULT 0 CHECK (ledger_records >= 0),
    error              jsonb,
    created_at         timestamptz NOT NULL DEFAULT now(),
    completed_at       timestamptz,
    CHECK (from_ts < to_ts)
);
CREATE INDEX reconcile_runs_window ON reconcile_runs (provider, status, to_ts);

CREATE TABLE reconcile_discrepancies (
    reconcile_id           text NOT NULL REFERENCES reconcile_runs (reconcile_id),
    discrepancy_id         text NOT NULL,
    kind                   text NOT NULL CHECK (kind IN ('payment', 'refund', 'payout')),
    reason                 text NOT NULL CHECK (reason IN ('provider_missing', 'ledger_missing',
                               'amount_mismatch', 'currency_mismatch', 'duplicate')),
    provider_reference     text NOT NULL,
    journal_id             text,
    ledger_amount          bigint,
    provider_amount        bigint,
    ledger_currency        char(3),
    provider_currency      char(3),
    details                jsonb NOT NULL DEFAULT '{}',
    status                 text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'resolved')),
    resolution_journal_id  text,
    PRIMARY KEY (reconcile_id, discrepancy_id),
    CHECK ((status = 'resolved') = (resolution_journal_id IS NOT NULL))
);

CREATE TABLE reconcile_resolutions (
    reconcile_id        text NOT NULL,
    discrepancy_id      text NOT NULL,
    provider            text NOT NULL,
    kind                text NOT NULL,
    provider_reference  text NOT NULL,
    journal_id          text NOT NULL,
    amount              bigint CHECK (amount IS NULL OR amount >= 0),
    currency            char(3),
    reason              text NOT NULL,
    principal           text NOT NULL,
    request_hash        text NOT NULL,
    answer              jsonb NOT NULL,
    created_at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (reconcile_id, discrepancy_id),
    FOREIGN KEY (reconcile_id, discrepancy_id) REFERENCES reconcile_discrepancies (reconcile_id, discrepancy_id),
    CHECK ((amount IS NULL) = (currency IS NULL))
);
CREATE INDEX reconcile_resolutions_reference ON reconcile_resolutions (provider, kind, provider_reference);
