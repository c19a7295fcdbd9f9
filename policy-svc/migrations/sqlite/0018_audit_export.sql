-- The OTLP export of the audit log (audit_export.rs): one row, the cursor (the highest
-- entry id the collector has acknowledged) and the lease that lets one replica at a
-- time export. Every replica tries to take or renew the lease before a batch; the one
-- that holds it moves the cursor, and only while it still holds it.
CREATE TABLE audit_export (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    cursor_id BIGINT NOT NULL,
    -- the replica holding the lease (a random id per process), and until when (unix ms)
    holder TEXT,
    lease_until BIGINT NOT NULL
);
INSERT INTO audit_export (id, cursor_id, holder, lease_until) VALUES (1, 0, NULL, 0);
