-- 0014: holds (pending two-phase amounts, REQUIREMENTS L6, DECISIONS D7). A hold is a journal
-- posted as pending: its lines reserve their amounts in the pending columns of `balances`
-- (written in the same transaction as the hold row), until the hold is posted (a normal journal,
-- id = hold id, possibly with smaller amounts), voided, or expired. The shard that owns the
-- hold's accounts is its single writer (`shard_id`); it reloads its open holds at start.
-- `ledger-node check` verifies that the pending columns equal the sum of open holds.
CREATE TABLE holds (
    hold_id            text PRIMARY KEY CHECK (length(hold_id) BETWEEN 1 AND 200),
    shard_id           integer NOT NULL,
    state              text NOT NULL CHECK (state IN ('pending', 'posted', 'voided', 'expired')),
    principal          text NOT NULL,
    idem_key           text,
    request_hash       bytea NOT NULL,
    journal            bytea NOT NULL,      -- the validated journal as held (msgpack `Journal`)
    expires_at         timestamptz,
    created_at         timestamptz NOT NULL,
    resolved_at        timestamptz,
    resolve_hash       bytea,               -- request hash of the post/void call that resolved it
    posted_journal_id  text,
    CHECK ((state = 'pending') = (resolved_at IS NULL)),
    CHECK ((state = 'posted') = (posted_journal_id IS NOT NULL))
);
CREATE UNIQUE INDEX holds_idem ON holds (principal, idem_key) WHERE idem_key IS NOT NULL;
CREATE INDEX holds_open ON holds (shard_id) WHERE state = 'pending';

CREATE TABLE hold_lines (
    hold_id     text NOT NULL REFERENCES holds (hold_id),
    line_no     smallint NOT NULL CHECK (line_no >= 0),
    account_id  text NOT NULL,
    currency    char(3) NOT NULL,
    side        char(1) NOT NULL CHECK (side IN ('D', 'C')),
    amount      bigint NOT NULL CHECK (amount > 0),
    PRIMARY KEY (hold_id, line_no)
);
CREATE INDEX hold_lines_account ON hold_lines (account_id, currency);
