-- Failed sign-ins by user name, whether or not such a user exists (so a lockout tells
-- nothing): after five in a row, signing in under that name waits, longer each time.
CREATE TABLE oauth_login_failures (
    name TEXT PRIMARY KEY,
    failures INTEGER NOT NULL,
    locked_until BIGINT NOT NULL
);
