-- The shared service credential of an exposure (identity 'shared'), sealed like an
-- identity but bound to (gateway_id, server_id). NULL: the upstream gets no credential.
ALTER TABLE exposures ADD COLUMN credential_header TEXT;
ALTER TABLE exposures ADD COLUMN credential_sealed BLOB;
