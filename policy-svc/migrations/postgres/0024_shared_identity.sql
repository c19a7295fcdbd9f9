-- Issue 24: a shared (service) credential that is a user's identity. An exposure with
-- identity 'shared' may send, for every caller, the identity of one user (a service
-- account an admin connected once, by OAuth or by hand) instead of a sealed header:
-- it is read, refreshed, disabled and deleted as that identity. NULL: the sealed
-- header (credential_header, credential_sealed), if any.
ALTER TABLE exposures ADD COLUMN credential_user_id BIGINT REFERENCES users(id);

-- Who started a Connect: the user whose identity it makes, or an admin connecting it
-- for them (audited as the admin's). NULL: the user themself (flows before 0024).
ALTER TABLE oauth_connect_states ADD COLUMN started_by BIGINT;
