-- 0003: per-ledger settings fixed at creation (e.g. hash_alg: the journal-hash / Merkle algorithm).
CREATE TABLE ledger_settings (name text PRIMARY KEY, value text NOT NULL);
