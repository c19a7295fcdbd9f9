-- Feature provisioning: per exposure, separately for tools, prompts and resources, a
-- mode (allow_all: today's behaviour and the default, so an upgrade changes nothing),
-- and the exposure's live lists as last fetched from the upstream.
ALTER TABLE exposures ADD COLUMN tools_mode TEXT NOT NULL DEFAULT 'allow_all'
    CHECK (tools_mode IN ('allow_all', 'allow_selected', 'block_all'));
ALTER TABLE exposures ADD COLUMN prompts_mode TEXT NOT NULL DEFAULT 'allow_all'
    CHECK (prompts_mode IN ('allow_all', 'allow_selected', 'block_all'));
ALTER TABLE exposures ADD COLUMN resources_mode TEXT NOT NULL DEFAULT 'allow_all'
    CHECK (resources_mode IN ('allow_all', 'allow_selected', 'block_all'));
-- Whose identity the lists of a per-user exposure are fetched with (the last user an
-- admin chose); when and how the last refresh ended.
ALTER TABLE exposures ADD COLUMN features_user_id BIGINT;
ALTER TABLE exposures ADD COLUMN features_refreshed_at BIGINT;
ALTER TABLE exposures ADD COLUMN features_error TEXT;

-- One item of an exposure's live list (a resource by its URI). Under allow_selected an
-- item is offered only while approved_hash, the definition an admin allowed, equals
-- definition_hash, the one last fetched, and it was in the last fetch (removed_at
-- NULL): a new item has no approval, a changed one a stale approval (rug-pull safety).
CREATE TABLE exposure_features (
    gateway_id BIGINT NOT NULL,
    server_id BIGINT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('tools', 'prompts', 'resources')),
    name TEXT NOT NULL,
    definition TEXT NOT NULL,
    definition_hash TEXT NOT NULL,
    first_seen BIGINT NOT NULL,
    last_seen BIGINT NOT NULL,
    -- when the definition last changed (NULL: as first seen)
    changed_at BIGINT,
    removed_at BIGINT,
    approved_hash TEXT,
    approved_at BIGINT,
    approved_by BIGINT,
    PRIMARY KEY (gateway_id, server_id, kind, name),
    FOREIGN KEY (gateway_id, server_id) REFERENCES exposures (gateway_id, server_id) ON DELETE CASCADE
);

-- Who managed gateways may provision their features: existing roles keep what they
-- could do (exposing a server offered all of it).
INSERT INTO role_capabilities (role_id, capability)
    SELECT role_id, 'features.manage' FROM role_capabilities WHERE capability = 'gateways.manage';
