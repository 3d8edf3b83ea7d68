-- 0015: payout batches (finance/payouts.py, api/payout_routes.py, store/payout_repo.py). A batch
-- is planned once per `batch_id` (a replay answers it); its payouts have deterministic ids
-- (`po.{batch_id}.{participant}.{CCY}`), which are also the ids of their holds and the provider
-- idempotency keys. A payout moves planned -> pending (its hold is open) -> paid | failed; a
-- pending payout without an outcome (a crash, or retries exhausted) is resumed by running the
-- batch again. Every provider call is one `payout_attempts` row.
CREATE TABLE payout_batches (
    batch_id      text PRIMARY KEY CHECK (batch_id ~ '^[A-Za-z0-9:._-]{1,120}$'),
    payout_date   date NOT NULL,
    status        text NOT NULL CHECK (status IN ('pending_approval', 'open', 'done')),
    items         jsonb,
    skipped       jsonb NOT NULL DEFAULT '[]',
    action_id     text,
    request_hash  text NOT NULL,
    principal     text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    completed_at  timestamptz
);

CREATE TABLE payouts (
    payout_id       text PRIMARY KEY,
    batch_id        text NOT NULL REFERENCES payout_batches (batch_id),
    participant_id  text NOT NULL,
    stripe_account  text NOT NULL,
    currency        char(3) NOT NULL,
    amount          bigint NOT NULL CHECK (amount > 0),
    holdback        bigint NOT NULL DEFAULT 0 CHECK (holdback >= 0),
    state           text NOT NULL CHECK (state IN ('planned', 'pending', 'paid', 'failed')),
    reason          text,
    hold_id         text,
    transfer_id     text,
    attempts        integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CHECK (state <> 'paid' OR transfer_id IS NOT NULL),
    CHECK (state <> 'failed' OR reason IS NOT NULL)
);
CREATE INDEX payouts_batch ON payouts (batch_id, payout_id);
CREATE INDEX payouts_open ON payouts (participant_id, currency) WHERE state IN ('planned', 'pending');

CREATE TABLE payout_attempts (
    payout_id   text NOT NULL REFERENCES payouts (payout_id),
    attempt     integer NOT NULL CHECK (attempt >= 1),
    at          timestamptz NOT NULL DEFAULT now(),
    outcome     text NOT NULL CHECK (outcome IN ('paid', 'transient', 'permanent')),
    detail      text,
    PRIMARY KEY (payout_id, attempt)
);
