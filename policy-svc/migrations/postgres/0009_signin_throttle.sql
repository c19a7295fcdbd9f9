-- The sign-in throttle (policy-svc/src/signin.rs) replaces the lockout by name, which
-- let anyone keep a user out with five wrong passwords.
DROP TABLE oauth_login_failures;

-- One client's attempts under one user name (existing or not). client: the peer
-- address (IPv6 by its /64). failures: attempts counted before they were verified,
-- cleared by a success; next_at: no attempt before then (unix ms).
CREATE TABLE signin_sources (
    name TEXT NOT NULL,
    client TEXT NOT NULL,
    failures BIGINT NOT NULL,
    next_at BIGINT NOT NULL,
    last_at BIGINT NOT NULL,
    PRIMARY KEY (name, client)
);

-- A user name's budget for attempts from clients past their free failures, as GCRA's
-- theoretical arrival time (unix ms): the budget is full once it is in the past.
CREATE TABLE signin_accounts (
    name TEXT PRIMARY KEY,
    tat BIGINT NOT NULL
);
