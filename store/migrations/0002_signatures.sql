-- 0002: signed batches, the global log of batches with its signed checkpoints, published
-- signer keys, proof requests and the audit-event chain (see docs/proofs.md).

-- One row per shard group commit: the signed statement of its Merkle root.
CREATE TABLE batches (
    shard_id    integer NOT NULL,
    batch_seq   bigint NOT NULL CHECK (batch_seq > 0),
    first_seq   bigint NOT NULL,
    last_seq    bigint NOT NULL CHECK (last_seq >= first_seq),
    statement   bytea NOT NULL,          -- canonical JSON of the batch statement
    root        bytea NOT NULL,
    signature   bytea NOT NULL,
    signer_kid  text NOT NULL,
    signed_at   timestamptz NOT NULL,
    log_index   bigint UNIQUE,           -- position in the global log, set by the checkpointer
    PRIMARY KEY (shard_id, batch_seq),
    UNIQUE (shard_id, first_seq)
);
CREATE INDEX batches_unlogged ON batches (signed_at, shard_id, batch_seq) WHERE log_index IS NULL;
CREATE INDEX batches_last_seq ON batches (shard_id, last_seq);

CREATE TABLE checkpoints (
    tree_size   bigint PRIMARY KEY CHECK (tree_size > 0),
    root        bytea NOT NULL,
    statement   bytea NOT NULL,          -- canonical JSON of the checkpoint statement
    signature   bytea NOT NULL,
    signer_kid  text NOT NULL,
    signed_at   timestamptz NOT NULL
);

CREATE TABLE signer_keys (
    kid         text PRIMARY KEY,
    algorithm   text NOT NULL,
    kind        text NOT NULL CHECK (kind IN ('pkcs11', 'software')),
    pem         text NOT NULL,
    created_at  timestamptz NOT NULL,
    retired_at  timestamptz
);

CREATE TABLE proofs (
    proof_id     text PRIMARY KEY,
    request_id   text,
    principal    text NOT NULL,
    request      jsonb NOT NULL,
    status       text NOT NULL CHECK (status IN ('generating', 'ready', 'failed')),
    created_at   timestamptz NOT NULL DEFAULT now(),
    ready_at     timestamptz,
    package      bytea,
    package_hash bytea,
    error        text
);
CREATE UNIQUE INDEX proofs_request ON proofs (principal, request_id) WHERE request_id IS NOT NULL;

-- Audit events: their own chain; each event's hash is a leaf of the audit stream's batches,
-- which are signed and logged like shard batches (shard_id = -2 in `batches`).
CREATE TABLE audit_events (
    seq          bigint PRIMARY KEY CHECK (seq > 0),
    actor_id     text NOT NULL,
    event_type   text NOT NULL,
    payload      jsonb NOT NULL,
    body         bytea NOT NULL,         -- canonical JSON that `hash` covers
    hash         bytea NOT NULL,
    prev_hash    bytea,
    created_at   timestamptz NOT NULL
);
