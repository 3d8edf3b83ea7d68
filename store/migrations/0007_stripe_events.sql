-- 0007: the Stripe webhook inbox (finance/stripe_events.py's `WebhookInbox`, applied by
-- `FinanceService.apply_stripe`). `stripe_events` holds each delivered event id with what it did
-- (`outcome`); a row is written only after the event's ledger actions succeeded, so a crash
-- midway leaves no row and Stripe's retry applies the event again (payments and refunds are
-- unique per (provider, provider_reference), which makes the retry exactly once). Paid payment
-- intents and applied refunds are not stored twice: they are the `payments` / `refunds` rows with
-- provider 'stripe' (reference = payment intent id / refund id). `stripe_parked` holds refunds and
-- disputes that arrived before their payment (the action as the inbox's tagged JSON);
-- `stripe_disputes` records opened disputes (no posting yet).
CREATE TABLE stripe_events (
    event_id    text PRIMARY KEY,
    type        text NOT NULL,
    outcome     text NOT NULL CHECK (outcome IN ('applied', 'duplicate', 'parked', 'ignored')),
    received_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE stripe_parked (
    key            text PRIMARY KEY,
    payment_intent text NOT NULL,
    event_id       text NOT NULL,
    action         jsonb NOT NULL,
    parked_at      timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX stripe_parked_intent ON stripe_parked (payment_intent);

CREATE TABLE stripe_disputes (
    dispute_id     text PRIMARY KEY,
    payment_intent text NOT NULL,
    event_id       text NOT NULL,
    amount         bigint NOT NULL CHECK (amount >= 0),
    currency       text NOT NULL,
    reason         text NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now()
);
