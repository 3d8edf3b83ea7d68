-- 0025: audit events compress their payload and body with lz4 instead of pglz.
--
-- A batch call's audit event lists every journal of the batch (a Kafka consumer batch: up to 2,000
-- payments, ~700 KB of JSON in `payload` and again inside the canonical `body`), so PostgreSQL
-- TOAST-compresses both on insert. pglz spent ~13-17 us of backend CPU per listed payment, lz4
-- ~8, for the same stored size (`docs/benchmarks.md`, "Kafka ingestion", ninth session). Readers
-- see no difference: PostgreSQL decompresses either transparently; rows written before keep pglz.
-- A server built without lz4 (`default_toast_compression` cannot be lz4) keeps pglz.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_settings
               WHERE name = 'default_toast_compression' AND 'lz4' = ANY (enumvals)) THEN
        ALTER TABLE audit_events ALTER COLUMN payload SET COMPRESSION lz4,
                                 ALTER COLUMN body SET COMPRESSION lz4;
    END IF;
END
$$;
