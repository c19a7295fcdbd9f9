-- The admin console (routes/console): browser sessions, and one-time sign-in links
-- (`mcpguard-policy console-link`). Session tokens and link codes are stored only as
-- SHA-256 hex. A session ends after its idle timeout (last_seen_at) or at expires_at,
-- whichever comes first; a link works once, before expires_at.
CREATE TABLE console_sessions (
    id INTEGER PRIMARY KEY,
    token_hash TEXT NOT NULL UNIQUE,
    user_id BIGINT NOT NULL REFERENCES users(id),
    created_at BIGINT NOT NULL,
    last_seen_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX console_sessions_user ON console_sessions (user_id);

CREATE TABLE console_links (
    id INTEGER PRIMARY KEY,
    code_hash TEXT NOT NULL UNIQUE,
    user_id BIGINT NOT NULL REFERENCES users(id),
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    used_at BIGINT
);
