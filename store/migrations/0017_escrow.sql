-- 0017: escrows (finance/escrow.py, api/escrow_routes.py, store/escrow_repo.py). One row per
-- escrow, written once its allocation is in the ledger: the funding journal
-- `escrow.{id}.fund` (funding account -> the split pool `liability:escrow:{provider}:{CCY}`) and
-- the hold `escrow.{id}` (pool -> payee, pending). An escrow moves locked -> released (the hold
-- posted) | cancelled (the hold voided, then `escrow.{id}.refund`: pool -> funding account).
-- A release or cancel records its request (`action`, `action_hash`) before its ledger calls, so
-- after a crash only that request can finish it; every ledger id is derived from the escrow id.
CREATE TABLE escrows (
    escrow_id        text PRIMARY KEY CHECK (escrow_id ~ '^[A-Za-z0-9:._-]{1,120}$'),
    order_id         text NOT NULL CHECK (length(order_id) BETWEEN 1 AND 200),
    amount           bigint NOT NULL CHECK (amount > 0),
    currency         char(3) NOT NULL,
    condition        jsonb NOT NULL CHECK (condition ->> 'type' IN ('delivery', 'audit_event', 'approval')),
    provider         text NOT NULL,
    funding_account  text NOT NULL,
    pool_account     text NOT NULL,
    payee_account    text NOT NULL,
    participant_id   text,
    hold_id          text NOT NULL,
    status           text NOT NULL CHECK (status IN ('locked', 'released', 'cancelled')),
    action           text CHECK (action IN ('release', 'cancel')),
    action_hash      bytea,
    evidence         jsonb,
    reason           text CHECK (length(reason) <= 500),
    action_id        text,
    request_hash     bytea NOT NULL,
    principal        text NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    released_at      timestamptz,
    cancelled_at     timestamptz,
    CHECK ((action IS NULL) = (action_hash IS NULL)),
    CHECK (status = 'locked' OR action IS NOT NULL),
    CHECK ((status = 'released') = (released_at IS NOT NULL)),
    CHECK ((status = 'cancelled') = (cancelled_at IS NOT NULL)),
    CHECK (status <> 'released' OR action = 'release'),
    CHECK (status <> 'cancelled' OR action = 'cancel'),
    CHECK (pool_account NOT IN (funding_account, payee_account) AND funding_account <> payee_account)
);
CREATE INDEX escrows_order ON escrows (order_id);
