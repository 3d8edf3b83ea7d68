-- 0001: ledger core. Slot map, accounts, balances, journals, lines, the per-shard chain links of
-- cross-shard journals, and the coordinator's two-phase-commit decision log.
-- Balances are written only by the shard that owns the account (group commit), never by hand.

CREATE TABLE shards (
    shard_id    integer PRIMARY KEY CHECK (shard_id >= 0),
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- 16,384 hash slots; slot = crc32(account_id) % 16384 (see sharding/slots.py).
CREATE TABLE slot_map (
    slot      integer PRIMARY KEY CHECK (slot >= 0 AND slot < 16384),
    shard_id  integer NOT NULL REFERENCES shards (shard_id)
);

CREATE TABLE accounts (
    account_id    text PRIMARY KEY
                  CHECK (length(account_id) BETWEEN 1 AND 200
                         AND account_id ~ '^(asset|liability|equity|revenue|expense):[A-Za-z0-9:._-]+$'),
    account_type  text NOT NULL CHECK (account_type IN ('asset', 'liability', 'equity', 'revenue', 'expense')),
    slot          integer NOT NULL CHECK (slot >= 0 AND slot < 16384),
    no_negative   boolean NOT NULL DEFAULT false,
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX accounts_slot ON accounts (slot);

CREATE TABLE balances (
    account_id       text NOT NULL REFERENCES accounts (account_id),
    currency         char(3) NOT NULL,
    slot             integer NOT NULL,
    debits_posted    bigint NOT NULL DEFAULT 0 CHECK (debits_posted >= 0),
    credits_posted   bigint NOT NULL DEFAULT 0 CHECK (credits_posted >= 0),
    debits_pending   bigint NOT NULL DEFAULT 0 CHECK (debits_pending >= 0),
    credits_pending  bigint NOT NULL DEFAULT 0 CHECK (credits_pending >= 0),
    PRIMARY KEY (account_id, currency)
);
CREATE INDEX balances_slot ON balances (slot);

-- One row per journal. (stream_id, stream_seq) is its place in the journal stream:
-- stream_id >= 0 is the shard that committed a single-shard journal (and stream_seq its
-- position in that shard's hash chain); stream_id = -1 is the coordinator, whose decision
-- transaction inserts the row of a cross-shard journal (its chain positions are in shard_links).
CREATE TABLE journals (
    journal_id    text PRIMARY KEY CHECK (length(journal_id) BETWEEN 1 AND 200),
    stream_id     integer NOT NULL,
    stream_seq    bigint NOT NULL CHECK (stream_seq > 0),
    posted_at     timestamptz NOT NULL,
    effective_at  timestamptz,
    principal     text NOT NULL,
    idem_key      text,
    request_hash  bytea NOT NULL,
    reverses      text,
    hash          bytea NOT NULL,
    prev_hash     bytea,
    body          bytea NOT NULL,
    UNIQUE (stream_id, stream_seq)
);
CREATE UNIQUE INDEX journals_idem ON journals (principal, idem_key) WHERE idem_key IS NOT NULL;
CREATE INDEX journals_posted_at ON journals (posted_at);

CREATE TABLE journal_lines (
    journal_id   text NOT NULL,
    line_no      smallint NOT NULL CHECK (line_no >= 0),
    shard_id     integer NOT NULL,
    account_id   text NOT NULL,
    currency     char(3) NOT NULL,
    side         char(1) NOT NULL CHECK (side IN ('D', 'C')),
    amount       bigint NOT NULL CHECK (amount > 0),
    posted_at    timestamptz NOT NULL,
    cross_shard  boolean NOT NULL DEFAULT false,
    PRIMARY KEY (journal_id, line_no)
);
CREATE INDEX journal_lines_account ON journal_lines (account_id, currency, posted_at);

-- The same balancing invariant the shard checks before apply, enforced once more by the
-- database for every statement that adds lines of single-shard journals (cross-shard
-- journals arrive in parts from several shards; `ledger-node check` verifies them whole).
CREATE FUNCTION journal_lines_balanced() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    bad text;
BEGIN
    SELECT journal_id INTO bad
      FROM new_lines
     WHERE NOT cross_shard
     GROUP BY journal_id, currency
    HAVING sum(CASE side WHEN 'D' THEN amount ELSE -amount END) <> 0
     LIMIT 1;
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'journal % does not balance', bad USING ERRCODE = '23514';
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER journal_lines_balanced AFTER INSERT ON journal_lines
    REFERENCING NEW TABLE AS new_lines FOR EACH STATEMENT EXECUTE FUNCTION journal_lines_balanced();

-- Chain positions of cross-shard journals, one row per participant shard (written by that
-- shard when it applies its part; the unique (journal_id, shard_id) makes applying idempotent).
CREATE TABLE shard_links (
    shard_id    integer NOT NULL,
    seq         bigint NOT NULL CHECK (seq > 0),
    journal_id  text NOT NULL,
    hash        bytea NOT NULL,
    prev_hash   bytea,
    PRIMARY KEY (shard_id, seq),
    UNIQUE (journal_id, shard_id)
);

-- Two-phase-commit decision log of the coordinator (presumed abort).
CREATE TABLE xtx (
    txid          text PRIMARY KEY,
    state         text NOT NULL CHECK (state IN ('preparing', 'commit', 'abort', 'done')),
    participants  integer[] NOT NULL,
    request       bytea NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    decided_at    timestamptz
);
CREATE INDEX xtx_open ON xtx (state) WHERE state <> 'done';
