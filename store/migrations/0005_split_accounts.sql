-- 0005: split (hot) accounts. A split account is booked by every shard: a journal that touches
-- it goes to the shard of its other lines (single-shard when they share one), and that shard
-- adds its delta to the account's one balances row in its own group commit, so a platform-fee
-- or escrow-pool account that every journal credits does not funnel the whole node through its
-- home shard. The balances row stays the exact sum of the account's lines (`ledger-node check`
-- verifies it like any other); each shard's in-memory figure for a split account is only its
-- own share and is never used for a decision, which is why a split account cannot have the
-- overdraft guard (checked here and by the API).
ALTER TABLE accounts
    ADD COLUMN split boolean NOT NULL DEFAULT false,
    ADD CONSTRAINT accounts_split_unguarded CHECK (NOT (split AND no_negative));
