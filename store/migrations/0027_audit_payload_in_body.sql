-- 0027: an audit event's payload is stored once, inside its hashed `body`.
--
-- Until now every event carried its payload twice: as `payload` (jsonb) and inside `body` (the
-- canonical JSON that `hash` covers). A batch call's event lists every journal of the batch (~940 KB
-- for 8,190 journals), so PostgreSQL parsed ~1 MB of JSON into jsonb and compressed and wrote it a
-- second time per batch (7.5 of the 11 ms of backend CPU the event cost; docs/benchmarks.md,
-- "Thirteenth session"). New events leave `payload` NULL; readers take the body's "payload" member
-- (`audit_payload`, below). Rows written before keep their column, which `verify_audit_chain` still
-- compares with the body, so an edit of either is caught.
ALTER TABLE audit_events ALTER COLUMN payload DROP NOT NULL;

-- The payload of an audit event row: its column where one was stored, else the body's member.
CREATE FUNCTION audit_payload(payload jsonb, body bytea) RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE
RETURN COALESCE(payload, convert_from(body, 'UTF8')::jsonb -> 'payload');
