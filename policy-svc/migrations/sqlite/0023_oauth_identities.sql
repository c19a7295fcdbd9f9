-- Issue 24: identities by OAuth. A server can be OAuth-protected: mcpguard is an OAuth
-- client of its authorization server (found by discovery or set by an admin), and a
-- user connects their own account there; the tokens are kept as the user's identity.

-- One row per OAuth-protected server: the authorization server's endpoints and our
-- client there (registered dynamically, RFC 7591, or entered by an admin). The client
-- secret, if any, is sealed, bound to the server.
CREATE TABLE server_oauth (
    server_id INTEGER PRIMARY KEY REFERENCES servers(id) ON DELETE CASCADE,
    issuer TEXT NOT NULL,
    authorization_endpoint TEXT NOT NULL,
    token_endpoint TEXT NOT NULL,
    revocation_endpoint TEXT,
    -- RFC 8707: the upstream, as its protected-resource metadata names it.
    resource TEXT NOT NULL,
    scope TEXT,
    client_id TEXT NOT NULL,
    client_secret_sealed BLOB,
    -- 1 when the client was registered dynamically, 0 when an admin entered it.
    registered INTEGER NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL
);

-- An OAuth identity keeps its access token where every identity keeps its credential
-- (`sealed`, as `Bearer <token>`), and beside it the sealed refresh token, when the
-- access token expires and when to refresh it (before it expires), and its state:
-- NULL for a credential set by hand, `connected`, or `needs_reconnect` once the
-- authorization server refused a refresh. `refresh_lease_until` is the refresh lease:
-- one replica at a time takes it (a conditional UPDATE) before using the refresh token.
ALTER TABLE identities ADD COLUMN oauth_status TEXT;
ALTER TABLE identities ADD COLUMN oauth_refresh_sealed BLOB;
ALTER TABLE identities ADD COLUMN oauth_expires_at BIGINT;
ALTER TABLE identities ADD COLUMN oauth_refresh_at BIGINT;
ALTER TABLE identities ADD COLUMN oauth_refreshed_at BIGINT;
ALTER TABLE identities ADD COLUMN oauth_refreshes BIGINT NOT NULL DEFAULT 0;
ALTER TABLE identities ADD COLUMN refresh_lease_until BIGINT;

-- A "Connect" in flight: the `state` sent to the authorization server (as its hash),
-- bound to the browser session that started it (its hash) and used once. The PKCE
-- verifier is sealed, bound to the state.
CREATE TABLE oauth_connect_states (
    id INTEGER PRIMARY KEY,
    state_hash TEXT NOT NULL UNIQUE,
    session_hash TEXT NOT NULL,
    user_id INTEGER NOT NULL REFERENCES users(id),
    server_id INTEGER NOT NULL REFERENCES servers(id) ON DELETE CASCADE,
    verifier_sealed BLOB NOT NULL,
    return_to TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
