-- 0008: exchange rates (finance/fx.py's `Rate`, DECISIONS D2). One row per (base, quote, as_of):
-- `rate` is units of `quote` per 1 `base`, kept as the exact decimal string the client sent (never
-- a float); `as_of` is when the rate starts to apply. Rates are facts, never edited: the same key
-- with the same rate is a replay, a different rate is refused (409 IDEMPOTENCY_CONFLICT). The rate
-- in force at time t is the row with the latest `as_of <= t` (`store/fx_repo.py`).
CREATE TABLE fx_rates (
    base       char(3) NOT NULL,
    quote      char(3) NOT NULL,
    rate       text NOT NULL,
    source     text NOT NULL,
    as_of      timestamptz NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (base, quote, as_of),
    CHECK (base <> quote)
);

-- A payment in another currency than its invoice's (finance/service.py) also records what it
-- settled in the invoice's currency; NULL for a payment in the invoice's own currency.
ALTER TABLE payments ADD COLUMN applied_amount bigint CHECK (applied_amount >= 0);
ALTER TABLE payments ADD COLUMN applied_currency char(3);
