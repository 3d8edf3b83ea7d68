-- 0004: cheaper group commits. Each change below removes work PostgreSQL did on every journal a
-- shard writes; measured with `python -m loadtests.pg_commit` (one batch of 2,000 two-line journals).

-- journal_lines loses its primary key (journal_id, line_no). Maintaining that unique btree was
-- about a quarter of the lines COPY, and it guards nothing the writer does not already guard:
-- a single-shard journal's lines are written in the same transaction as its journals row, whose
-- primary key refuses a second copy; a cross-shard part's lines are written with its shard_links
-- row, whose UNIQUE (journal_id, shard_id) does the same. `ledger-node check` reports any
-- (journal_id, line_no) stored twice. The balancing trigger and journal_lines_account stay.
ALTER TABLE journal_lines DROP CONSTRAINT journal_lines_pkey;

-- posted_at follows insertion order (every stream stamps strictly increasing commit times and only
-- appends), so a BRIN index of the time ranges per block range serves range reads for a fraction of
-- a btree's cost per insert. autosummarize keeps freshly filled ranges summarised between vacuums.
DROP INDEX journals_posted_at;
CREATE INDEX journals_posted_at ON journals USING brin (posted_at) WITH (autosummarize = on);

-- Leave 30% of each balances page free so the per-batch balance upsert can be a HOT update (the new
-- row version on the same page, no new index entries). It applies to pages filled from now on; pages
-- already full stay so until the table is rewritten (VACUUM FULL, which locks it: not done here).
ALTER TABLE balances SET (fillfactor = 70);
