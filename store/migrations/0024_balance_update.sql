-- 0024: a group commit adds its posted balance deltas with a plain UPDATE.
--
-- The writer used `INSERT ... ON CONFLICT (account_id, currency) DO UPDATE` for every delta. For a
-- row that exists (all but an account's first posting in a currency) that is a speculative probe of
-- balances_pkey, then a tuple lock that is WAL-logged on its own (a Heap/LOCK record, 61 of the
-- 157 WAL bytes per updated row), then the update. A plain UPDATE joined to the deltas skips the
-- probe and the lock record (110 WAL bytes per row; `docs/benchmarks.md`, "Eighth session").
--
-- The join must probe balances_pkey once per delta, in the order of the (sorted) delta arrays: a
-- hash or merge join would read the whole balances table on every commit (every shard's rows, not
-- only the committing shard's) and lock rows in table order. The planner picks a hash join as soon
-- as a batch touches a fair share of the table, so the function turns hash and merge joins off for
-- its own statement only. It returns how many rows it updated; the writer compares that with the
-- number of deltas and, when a row is missing, writes the batch again with the upsert (store/writer.py).
CREATE FUNCTION add_posted_deltas(account_ids text[], currencies char(3)[], debit_deltas bigint[],
                                  credit_deltas bigint[])
RETURNS bigint LANGUAGE plpgsql
SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    updated bigint;
BEGIN
    UPDATE balances AS b
       SET debits_posted = b.debits_posted + d.debits, credits_posted = b.credits_posted + d.credits
      FROM unnest(account_ids, currencies, debit_deltas, credit_deltas) AS d(account_id, currency, debits, credits)
     WHERE b.account_id = d.account_id AND b.currency = d.currency;
    GET DIAGNOSTICS updated = ROW_COUNT;
    RETURN updated;
END $$;
