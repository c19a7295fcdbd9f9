-- Headed hosts: OAuth 2.1 authorization server state. Secrets (codes, refresh tokens,
-- session tokens) are stored only as SHA-256 hex; signing keys' private halves are
-- sealed with the secrets key.

-- argon2id PHC string; NULL: the user cannot sign in with a password.
ALTER TABLE users ADD COLUMN password_hash TEXT;

-- Ed25519 keys. 'next' is published in the JWKS before it signs anything, so every
-- verifier knows it by the time a rotation makes it 'active'; a 'retired' key stays
-- published until the last token it signed has expired.
CREATE TABLE oauth_signing_keys (
    id INTEGER PRIMARY KEY,
    kid TEXT NOT NULL UNIQUE,
    public_x TEXT NOT NULL,
    sealed_private BLOB NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('next', 'active', 'retired')),
    created_at BIGINT NOT NULL,
    activated_at BIGINT,
    retired_at BIGINT
);

-- Dynamically registered public clients (RFC 7591). host_id: the headed host created
-- on the client's first successful authorization.
CREATE TABLE oauth_clients (
    id INTEGER PRIMARY KEY,
    client_id TEXT NOT NULL UNIQUE,
    client_name TEXT NOT NULL,
    redirect_uris TEXT NOT NULL,
    host_id INTEGER REFERENCES hosts(id),
    created_at BIGINT NOT NULL
);

-- A signed-in browser; its CSRF token is derived from the session token, so only the
-- hash is stored. How the user proved who they are (a local password today, an
-- upstream OIDC provider later) ends here: a session names a user.
CREATE TABLE oauth_sessions (
    id INTEGER PRIMARY KEY,
    token_hash TEXT NOT NULL UNIQUE,
    user_id INTEGER NOT NULL REFERENCES users(id),
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);

-- One authorization: a client acting for a user through one connection on one
-- resource. It is the refresh-token family: revoking it stops every refresh token and,
-- through the check, every access token issued under it.
CREATE TABLE oauth_grants (
    id INTEGER PRIMARY KEY,
    client_id INTEGER NOT NULL REFERENCES oauth_clients(id),
    user_id INTEGER NOT NULL REFERENCES users(id),
    connection_id INTEGER NOT NULL REFERENCES connections(id),
    resource TEXT NOT NULL,
    scope TEXT,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT
);

CREATE TABLE oauth_codes (
    id INTEGER PRIMARY KEY,
    code_hash TEXT NOT NULL UNIQUE,
    client_id INTEGER NOT NULL REFERENCES oauth_clients(id),
    user_id INTEGER NOT NULL REFERENCES users(id),
    connection_id INTEGER NOT NULL REFERENCES connections(id),
    redirect_uri TEXT NOT NULL,
    code_challenge TEXT NOT NULL,
    resource TEXT NOT NULL,
    scope TEXT,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    used_at BIGINT,
    -- set when the code was exchanged: a second use revokes this grant
    grant_id INTEGER REFERENCES oauth_grants(id)
);

CREATE TABLE oauth_refresh_tokens (
    id INTEGER PRIMARY KEY,
    grant_id INTEGER NOT NULL REFERENCES oauth_grants(id),
    token_hash TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    -- set when rotated: presenting it again is reuse, and revokes the family
    used_at BIGINT
);
CREATE INDEX oauth_refresh_tokens_grant ON oauth_refresh_tokens (grant_id);
