-- A user's own credential for one server, used where that server is exposed per-user.
-- `sealed` is nonce || XChaCha20-Poly1305 ciphertext of the header value, bound to
-- (user_id, server_id) as associated data; the key never enters the database.
CREATE TABLE identities (
    id INTEGER PRIMARY KEY,
    user_id INTEGER NOT NULL REFERENCES users(id),
    server_id INTEGER NOT NULL REFERENCES servers(id),
    header_name TEXT NOT NULL,
    sealed BLOB NOT NULL,
    enabled INTEGER NOT NULL DEFAULT 1,
    created_at BIGINT NOT NULL,
    UNIQUE (user_id, server_id)
);
