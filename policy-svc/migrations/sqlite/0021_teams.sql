-- Issue 22: who may connect. Users belong to teams; a gateway is granted to teams; a
-- user connects (OAuth consent, an enrollment, a token made for them) only to a
-- gateway one of their teams is granted, and the check refuses a connection whose
-- user no team grants its gateway any more (gateway_not_granted).

-- `everyone`: the one built-in team, whose members are all users, present and future
-- (no rows in team_members). It keeps an upgraded store, and every gateway created
-- without a choice of teams, working as before: an admin restricts a gateway by
-- taking its grant from `everyone` and granting it to teams of their own.
CREATE TABLE teams (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    everyone INTEGER NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL
);

CREATE TABLE team_members (
    team_id INTEGER NOT NULL REFERENCES teams(id) ON DELETE CASCADE,
    user_id INTEGER NOT NULL REFERENCES users(id),
    created_at BIGINT NOT NULL,
    PRIMARY KEY (team_id, user_id)
);
CREATE INDEX team_members_user ON team_members (user_id);

CREATE TABLE gateway_grants (
    gateway_id INTEGER NOT NULL REFERENCES gateways(id),
    team_id INTEGER NOT NULL REFERENCES teams(id) ON DELETE CASCADE,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (gateway_id, team_id)
);
CREATE INDEX gateway_grants_team ON gateway_grants (team_id);

-- The upgrade: every existing gateway stays open to every user.
INSERT INTO teams (name, everyone, created_at)
VALUES ('everyone', 1, CAST(strftime('%s', 'now') AS INTEGER) * 1000);
INSERT INTO gateway_grants (gateway_id, team_id, created_at)
SELECT g.id, t.id, t.created_at FROM gateways g, teams t WHERE t.everyone = 1;

-- Connecting by OAuth needs oauth.connect now; every existing role may still do it
-- (before, every user with a password could). Roles created later choose.
INSERT INTO role_capabilities (role_id, capability)
SELECT r.id, 'oauth.connect' FROM roles r
WHERE NOT EXISTS (
    SELECT 1 FROM role_capabilities x WHERE x.role_id = r.id AND x.capability = 'oauth.connect'
);

-- Teams are people: roles that manage users (users.manage, which already grants
-- every capability through roles) manage teams too, so the owner keeps doing all.
INSERT INTO role_capabilities (role_id, capability)
SELECT rc.role_id, 'teams.manage' FROM role_capabilities rc
WHERE rc.capability = 'users.manage' AND NOT EXISTS (
    SELECT 1 FROM role_capabilities x WHERE x.role_id = rc.role_id AND x.capability = 'teams.manage'
);

-- Host approval: on a gateway with approve_hosts, a headed host that appears on its
-- first authorization there starts pending (refused host_pending) until an admin
-- approves it. Off everywhere, as before.
ALTER TABLE gateways ADD COLUMN approve_hosts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE hosts ADD COLUMN pending INTEGER NOT NULL DEFAULT 0;
