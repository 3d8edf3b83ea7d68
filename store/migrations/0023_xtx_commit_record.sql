-- 0023: the cross-shard log is written once per transaction (docs/ARCHITECTURE.md, "Cross-shard
-- journals"; docs/benchmarks.md, "Sixth session"). Before, the coordinator wrote each `xtx` row
-- three times: the intent INSERT, the decision UPDATE (state commit/abort) and the done UPDATE;
-- neither update could be HOT, because `state` was indexed, so each copied the whole row (the
-- request) and added index entries. Now:
--   * the commit record is the transaction's journal row in the coordinator stream (stream_id -1),
--     which the decision already wrote: a logged transaction with that row committed, one without
--     it is presumed aborted; the decision writes nothing to `xtx`;
--   * a finished transaction (every participant acknowledged) is deleted instead of marked done,
--     so `xtx` holds only unfinished transactions and stays small.
-- New rows keep `state = 'preparing'` for their whole life; `commit` and `abort` rows written before
-- this migration stay valid (their journal row says the same as their state), `done` rows go.
DELETE FROM xtx WHERE state = 'done';

-- Every row is open now; readers scan the (small) table or probe it by txid.
DROP INDEX xtx_open;

-- The participants are the keys of the request's parts: new rows no longer repeat them (an integer[]
-- per row cost the coordinator ~2 µs of encoding per journal); a restarted shard reads them from the
-- request. Rows written before keep theirs.
ALTER TABLE xtx ALTER COLUMN participants DROP NOT NULL;
