-- Issue 19: reading the admin API needs a capability too, and an agent's own admin
-- token can be bound to its host.

-- A host-bound admin token reaches only that host's tokens and enrollments.
ALTER TABLE admin_tokens ADD COLUMN host_id BIGINT REFERENCES hosts(id);

-- Every admin could read every listing before; now reads need gateways.read,
-- servers.read, hosts.read, connections.read or users.read. Existing roles get the
-- reads their other capabilities cannot work without: the rule of
-- Capability::implies (policy-svc/src/auth.rs), which every later role write applies
-- too. The owner (every capability) so gets every read; a role with none gets none.
WITH implied (capability, needs) AS (
    VALUES ('gateways.manage', 'gateways.read'),
           ('gateways.manage', 'servers.read'),
           ('gateways.toggle', 'gateways.read'),
           ('servers.manage', 'servers.read'),
           ('servers.toggle', 'servers.read'),
           ('hosts.toggle', 'hosts.read'),
           ('tokens.manage', 'hosts.read'),
           ('tokens.manage', 'gateways.read'),
           ('connections.toggle', 'connections.read'),
           ('connections.toggle', 'gateways.read'),
           ('identities.toggle', 'users.read'),
           ('users.manage', 'users.read'),
           ('users.manage', 'servers.read')
)
INSERT INTO role_capabilities (role_id, capability)
SELECT DISTINCT rc.role_id, i.needs
FROM role_capabilities rc JOIN implied i ON i.capability = rc.capability
WHERE NOT EXISTS (
    SELECT 1 FROM role_capabilities x WHERE x.role_id = rc.role_id AND x.capability = i.needs
);
