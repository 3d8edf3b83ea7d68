-- 0021: auditor exports (finance/audit_export.py pure parts, finance/export_service.py, api/export_routes.py,
-- store/export_repo.py). One row per export id (the request's `request_id`, global): the request as
-- decoded (`request`, compared on replay: the same parameters answer the original export, others are
-- 409 IDEMPOTENCY_CONFLICT), its status running -> completed | failed (a failed export is run again by
-- the same request; `attempt` counts the runs), the destination it was published to and, once
-- completed, the files with their SHA-256 and the signed manifest. Files themselves live only at the
-- destination (a local directory or S3 with Object Lock), written once.
CREATE TABLE exports (
    export_id          text PRIMARY KEY CHECK (export_id ~ '^[A-Za-z0-9:._-]{1,120}$'),
    principal          text NOT NULL,
    request            jsonb NOT NULL,
    from_ts            timestamptz NOT NULL,
    to_ts              timestamptz NOT NULL,
    pii_included       boolean NOT NULL,
    status             text NOT NULL CHECK (status IN ('running', 'completed', 'failed')),
    attempt            integer NOT NULL DEFAULT 1 CHECK (attempt >= 1),
    destination        text NOT NULL CHECK (destination IN ('local', 's3')),
    location           text,
    files              jsonb,
    manifest           jsonb,
    error              jsonb,
    created_at         timestamptz NOT NULL DEFAULT now(),
    completed_at       timestamptz,
    CHECK (from_ts < to_ts),
    CHECK (status <> 'completed' OR (location IS NOT NULL AND files IS NOT NULL AND manifest IS NOT NULL))
);
CREATE INDEX exports_status ON exports (status, created_at);
