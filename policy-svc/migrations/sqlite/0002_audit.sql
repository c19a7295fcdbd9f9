-- Append-only audit log: every data-plane decision and every admin action.
-- Nothing in the service updates or deletes rows here except retention.
CREATE TABLE audit_events (
    id INTEGER PRIMARY KEY,
    at BIGINT NOT NULL,
    -- 'decision' or 'admin'
    kind TEXT NOT NULL,
    -- decision: 'allow' or 'deny'; admin: e.g. 'gateway.create', 'host.disable'
    action TEXT NOT NULL,
    -- decision: the refusal code
    code TEXT,
    -- admin: who, what, and the state around the change (JSON)
    actor_user_id BIGINT,
    target TEXT,
    before_state TEXT,
    after_state TEXT,
    -- decision: who reached what
    host_id BIGINT,
    user_id BIGINT,
    connection_id BIGINT,
    gateway TEXT,
    server TEXT,
    mcp_method TEXT,
    tool TEXT,
    latency_us BIGINT,
    request_id TEXT
);
CREATE INDEX audit_events_at ON audit_events (at);
