-- Times are unix milliseconds (BIGINT), flags INTEGER 0/1: the portable subset that
-- sqlx's Any driver reads on both SQLite and PostgreSQL (migrations/postgres mirrors
-- this file with BOOLEAN flags and identity columns).

CREATE TABLE roles (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL
);

CREATE TABLE role_capabilities (
    role_id INTEGER NOT NULL REFERENCES roles(id) ON DELETE CASCADE,
    capability TEXT NOT NULL,
    PRIMARY KEY (role_id, capability)
);

CREATE TABLE users (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    role_id INTEGER NOT NULL REFERENCES roles(id),
    enabled INTEGER NOT NULL DEFAULT 1,
    created_at BIGINT NOT NULL
);

CREATE TABLE admin_tokens (
    id INTEGER PRIMARY KEY,
    user_id INTEGER NOT NULL REFERENCES users(id),
    token_hash TEXT NOT NULL UNIQUE,
    prefix TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT
);

CREATE TABLE gateways (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    slug TEXT NOT NULL UNIQUE,
    enabled INTEGER NOT NULL DEFAULT 1,
    created_at BIGINT NOT NULL
);

-- The upstream is stored split, as the check hands it to the filter.
CREATE TABLE servers (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    slug TEXT NOT NULL UNIQUE,
    upstream_scheme TEXT NOT NULL CHECK (upstream_scheme IN ('http', 'https')),
    upstream_authority TEXT NOT NULL,
    upstream_path TEXT NOT NULL,
    enabled INTEGER NOT NULL DEFAULT 1,
    created_at BIGINT NOT NULL
);

CREATE TABLE exposures (
    gateway_id INTEGER NOT NULL REFERENCES gateways(id),
    server_id INTEGER NOT NULL REFERENCES servers(id),
    identity TEXT NOT NULL CHECK (identity IN ('shared', 'per_user')),
    created_at BIGINT NOT NULL,
    PRIMARY KEY (gateway_id, server_id)
);

CREATE TABLE hosts (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('token', 'oauth')),
    enabled INTEGER NOT NULL DEFAULT 1,
    created_at BIGINT NOT NULL
);

CREATE TABLE connections (
    id INTEGER PRIMARY KEY,
    host_id INTEGER NOT NULL REFERENCES hosts(id),
    gateway_id INTEGER NOT NULL REFERENCES gateways(id),
    user_id INTEGER NOT NULL REFERENCES users(id),
    enabled INTEGER NOT NULL DEFAULT 1,
    created_at BIGINT NOT NULL,
    last_used_at BIGINT,
    UNIQUE (host_id, gateway_id, user_id)
);
CREATE INDEX connections_gateway ON connections (gateway_id);

-- Revocation keeps the row (revoked_at) so a revoked token is told apart from an
-- unknown one, in refusals and in the audit trail.
CREATE TABLE api_tokens (
    id INTEGER PRIMARY KEY,
    connection_id INTEGER NOT NULL REFERENCES connections(id),
    token_hash TEXT NOT NULL UNIQUE,
    prefix TEXT NOT NULL,
    created_by INTEGER NOT NULL REFERENCES users(id),
    created_at BIGINT NOT NULL,
    expires_at BIGINT,
    last_used_at BIGINT,
    revoked_at BIGINT
);
CREATE INDEX api_tokens_connection ON api_tokens (connection_id);
