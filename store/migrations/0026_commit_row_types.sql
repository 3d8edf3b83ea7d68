-- 0026: row types for the group commit's one-statement path (store/writer.py).
--
-- A small group commit is written as one statement. It used to pass every column as its own array
-- parameter (36 arrays). asyncpg's array encoder checks every element against the
-- `collections.abc` iterable ABCs, one Python-level `isinstance` per element. At ~40 elements per
-- journal, that was about 40% of the writer's CPU for a 33-journal statement. An array of these
-- composite types costs one such check per row, and the row's fields go through the same binary
-- codecs as COPY's records. Measured at 33 journals per commit (docs/benchmarks.md, "Eleventh
-- session"), the writer's CPU per commit fell by about a quarter against the column arrays, and by
-- about half against the COPY transaction, which such commits took above 32 journals.
--
-- The types list the columns the writer fills, in the writer's order. They are not the tables'
-- row types, so a column later added to a table (with a default) does not break this path,
-- just as it does not break the COPY path's explicit column lists.
CREATE TYPE commit_journal AS (
    journal_id    text,
    stream_id     integer,
    stream_seq    bigint,
    posted_at     timestamptz,
    effective_at  timestamptz,
    principal     text,
    idem_key      text,
    request_hash  bytea,
    reverses      text,
    hash          bytea,
    prev_hash     bytea,
    body          bytea
);

CREATE TYPE commit_link AS (
    shard_id    integer,
    seq         bigint,
    journal_id  text,
    hash        bytea,
    prev_hash   bytea
);

CREATE TYPE commit_line AS (
    journal_id   text,
    line_no      smallint,
    shard_id     integer,
    account_id   text,
    currency     text,
    side         text,
    amount       bigint,
    posted_at    timestamptz,
    cross_shard  boolean
);

CREATE TYPE commit_delta AS (
    account_id  text,
    currency    char(3),
    slot        integer,
    debits      bigint,
    credits     bigint
);

-- The audit writer's group commit (store/audit.py) the same way; `created_at` is one per batch.
CREATE TYPE commit_audit_event AS (
    seq         bigint,
    actor_id    text,
    event_type  text,
    payload     text,
    body        bytea,
    hash        bytea,
    prev_hash   bytea
);

-- `add_posted_deltas` (migration 0024) taking the deltas as one array of rows, for the same reason:
-- the same statement and plan settings, restated here because a function's argument types cannot
-- be altered. The column-array version goes: a node migrates before it writes, so nothing calls it.
DROP FUNCTION add_posted_deltas(text[], char(3)[], bigint[], bigint[]);
CREATE FUNCTION add_posted_deltas(deltas commit_delta[])
RETURNS bigint LANGUAGE plpgsql
SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    updated bigint;
BEGIN
    UPDATE balances AS b
       SET debits_posted = b.debits_posted + d.debits, credits_posted = b.credits_posted + d.credits
      FROM unnest(deltas) AS d
     WHERE b.account_id = d.account_id AND b.currency = d.currency;
    GET DIAGNOSTICS updated = ROW_COUNT;
    RETURN updated;
END $$;

-- The Kafka consumer's batch of payments (store/finance_repo.py: `update_invoices`,
-- `insert_payments`) the same way.
CREATE TYPE commit_invoice_step AS (
    invoice_id       text,
    version          bigint,
    steps            integer,
    status           text,
    amount_paid      bigint,
    amount_refunded  bigint,
    customer_credit  bigint,
    body             text,
    journal_ids      text
);

CREATE TYPE commit_payment AS (
    payment_id          text,
    invoice_id          text,
    provider            text,
    provider_reference  text,
    amount              bigint,
    currency            text,
    journal_id          text,
    principal           text,
    answer              text,
    settlement_id       text
);
