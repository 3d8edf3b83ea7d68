-- 0020: clawback transfer reversals (finance/payouts.py `reversal_plan`, finance/service.py
-- `_reverse_transfers`). With LEDGER_CLAWBACK_REVERSALS=on, a clawback that leaves a participant's
-- payable negative takes the money back from its paid Stripe transfers (newest first) instead of
-- only carrying the negative payable. One row per (clawback journal, participant, payout): written
-- `requested` before the provider call (idempotency key = `reversal_id`), then `reversed` with the
-- provider's reversal id and the journal that books the money back, or `failed` with the reason
-- (the negative payable is then netted by later accruals as without reversals). A `requested` row
-- left by a crash is finished by the next reversal run for the participant, with the same key.
CREATE TABLE clawback_reversals (
    reversal_id          text PRIMARY KEY,
    clawback_journal     text NOT NULL,
    participant_id       text NOT NULL,
    payout_id            text NOT NULL REFERENCES payouts (payout_id),
    transfer_id          text NOT NULL,
    currency             char(3) NOT NULL,
    amount               bigint NOT NULL CHECK (amount > 0),
    state                text NOT NULL CHECK (state IN ('requested', 'reversed', 'failed')),
    provider_reversal_id text,
    journal_id           text,
    reason               text,
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now(),
    CHECK (state <> 'reversed' OR (provider_reversal_id IS NOT NULL AND journal_id IS NOT NULL)),
    CHECK (state <> 'failed' OR reason IS NOT NULL)
);
CREATE INDEX clawback_reversals_payout ON clawback_reversals (payout_id);
CREATE INDEX clawback_reversals_participant ON clawback_reversals (participant_id, currency, state);
