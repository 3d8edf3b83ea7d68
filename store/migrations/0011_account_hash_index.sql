-- 0011: a cheaper per-account index on journal_lines.
--
-- Every line a shard writes adds one entry to the per-account lines index. Keyed by
-- (account_id, currency, posted_at), each insert compared text and char(3) keys on the way down the
-- btree and stored a ~40-byte entry; `python -m loadtests.pg_commit` measured that index at about
-- 5 us of PostgreSQL CPU per line, the largest single cost of a group commit. Keyed by the 32-bit
-- `hashtext(account_id)` and `posted_at` the entry is 16 bytes and compares as two integers.
--
-- Readers ask for `hashtext(account_id) = hashtext($1) AND account_id = $1`: the index finds the
-- account's lines (and those of any account whose id hashes alike, which the second condition
-- drops). The currency is filtered on the rows. `hashtext` is immutable and has been the same
-- function since PostgreSQL 8.4 (Citus distributes tables by it); an index built with it survives
-- pg_upgrade like any other.
DROP INDEX journal_lines_account;
CREATE INDEX journal_lines_account ON journal_lines (hashtext(account_id), posted_at);
