-- 0012: multisig governance (finance/multisig.py, finance/governance.py; DECISIONS D7).
--
-- approvers: the registry of public keys that may approve gated actions; revoking keeps the row
-- (past approvals stay explainable) and stops the key from counting.
CREATE TABLE approvers (
    approver_id     text PRIMARY KEY CHECK (approver_id ~ '^[A-Za-z0-9._-]{1,64}$'),
    algorithm       text NOT NULL CHECK (algorithm IN ('ed25519', 'p256')),
    public_key_pem  text NOT NULL,
    fingerprint     text NOT NULL,
    registered_by   text NOT NULL,
    registered_at   timestamptz NOT NULL DEFAULT now(),
    revoked_at      timestamptz,
    revoked_by      text
);

-- gated_actions: an action above its threshold, waiting for approvals, then executed once.
-- `params` is the canonical JSON text of the parameters (re-hashed to params_hash on every tally).
-- `request_hash` (SHA-256 of the canonical request) answers replays of the call that created it.
CREATE TABLE gated_actions (
    action_id     text PRIMARY KEY CHECK (action_id ~ '^[A-Za-z0-9:._-]{1,200}$'),
    kind          text NOT NULL CHECK (kind ~ '^[a-z][a-z0-9_]{0,63}$'),
    params        text NOT NULL,
    params_hash   text NOT NULL CHECK (params_hash ~ '^[0-9a-f]{64}$'),
    amount_minor  bigint NOT NULL CHECK (amount_minor >= 0),
    currency      char(3) NOT NULL,
    status        text NOT NULL CHECK (status IN ('pending_approval', 'approved', 'executed', 'failed',
                                                  'rejected', 'expired')),
    requested_by  text NOT NULL,
    request_hash  bytea NOT NULL,
    created_at    timestamptz NOT NULL,
    expires_at    timestamptz NOT NULL CHECK (expires_at > created_at),
    decided_at    timestamptz,
    decided_by    text,
    reason        text,
    result        text
);
CREATE INDEX gated_actions_open ON gated_actions (expires_at) WHERE status = 'pending_approval';

-- approvals: one approver's signature over one statement of an action (its params_hash).
CREATE TABLE approvals (
    action_id    text NOT NULL REFERENCES gated_actions (action_id),
    approver_id  text NOT NULL REFERENCES approvers (approver_id),
    params_hash  text NOT NULL,
    signature    text NOT NULL,
    principal    text NOT NULL,
    approved_at  timestamptz NOT NULL,
    PRIMARY KEY (action_id, approver_id, params_hash)
);
