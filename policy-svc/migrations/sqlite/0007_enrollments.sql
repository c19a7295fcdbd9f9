-- An enrollment invites one end user of a token-based host: the user opens its link,
-- signs in and brings identities; then the agent claims, once, a per-user token
-- (mcpgu_) for the (host, gateway, user) connection. Only the link secret's SHA-256 is
-- stored.
CREATE TABLE enrollments (
    id INTEGER PRIMARY KEY,
    host_id INTEGER NOT NULL REFERENCES hosts(id),
    gateway_id INTEGER NOT NULL REFERENCES gateways(id),
    user_id INTEGER NOT NULL REFERENCES users(id),
    code_hash TEXT NOT NULL UNIQUE,
    created_by INTEGER NOT NULL REFERENCES users(id),
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    completed_at BIGINT,
    token_id INTEGER REFERENCES api_tokens(id)
);
CREATE INDEX enrollments_host ON enrollments (host_id);
