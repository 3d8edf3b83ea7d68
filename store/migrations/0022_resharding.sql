-- 0022: online resharding (docs/ARCHITECTURE.md, "Resharding"). The shard set is the rows of
-- `shards` without `retired_at`: a restart spawns exactly those, with the slots `slot_map`
-- gives them (a shard added by `ledger-node shards add` may own none yet). A removed shard is
-- retired, never deleted: its stream, chain links and signed batches stay verifiable, and its
-- id is never reused (new ids come after every id ever used).
ALTER TABLE shards ADD COLUMN retired_at timestamptz;

-- One row per slot handoff, written in the transaction that switches the slot map.
CREATE TABLE slot_moves (
    move_id      bigserial PRIMARY KEY,
    slots        integer[] NOT NULL,
    source       integer NOT NULL REFERENCES shards (shard_id),
    target       integer NOT NULL REFERENCES shards (shard_id),
    holds_moved  integer NOT NULL DEFAULT 0,
    moved_at     timestamptz NOT NULL DEFAULT now(),
    CHECK (source <> target)
);
