//! Capabilities gate the admin API. The walk is driven by the service's own endpoint
//! table (`GET /api/v1/endpoints`), so an endpoint added later is walked too, and one
//! this test does not know how to call fails it.

use mcpguard_e2e::{Admin, Policy};
use reqwest::Method;
use serde_json::{Value, json};

/// Ids of one of each thing, for filling in paths.
pub(crate) struct Fixture {
    pub(crate) gateway: i64,
    pub(crate) server: i64,
    pub(crate) host: i64,
    pub(crate) token: i64,
    pub(crate) connection: i64,
    pub(crate) role: i64,
    pub(crate) user: i64,
    pub(crate) admin_token: i64,
    pub(crate) identity: i64,
    pub(crate) enrollment: i64,
    /// A team (not `everyone`) with `user` in it.
    pub(crate) team: i64,
}

pub(crate) async fn fixture(owner: &Admin) -> Fixture {
    let p = owner
        .provision("eng", "demo", "http://127.0.0.1:9/mcp")
        .await;
    let (_, role) = owner
        .post(
            "/api/v1/roles",
            json!({"name": "auditor", "capabilities": ["audit.read"]}),
        )
        .await;
    let role = role["id"].as_i64().unwrap();
    let (_, user) = owner
        .post("/api/v1/users", json!({"name": "alice", "role_id": role}))
        .await;
    let user = user["id"].as_i64().unwrap();
    let (_, at) = owner
        .post(&format!("/api/v1/users/{user}/admin-tokens"), json!({}))
        .await;
    let identity = owner.make_per_user(&p, "downstream").await;
    let (_, enrollment) = owner
        .post(
            &format!("/api/v1/hosts/{}/enrollments", p.host_id),
            json!({"gateway_id": p.gateway_id, "user_id": user}),
        )
        .await;
    let (_, team) = owner
        .post("/api/v1/teams", json!({"name": "fixture-team"}))
        .await;
    let team = team["id"].as_i64().unwrap();
    let (status, v) = owner
        .call(
            Method::PUT,
            &format!("/api/v1/teams/{team}/members/{user}"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{v}");
    Fixture {
        team,
        gateway: p.gateway_id,
        server: p.server_id,
        host: p.host_id,
        token: p.token_id,
        connection: p.connection_id,
        role,
        user,
        admin_token: at["id"].as_i64().unwrap(),
        identity,
        enrollment: enrollment["id"].as_i64().unwrap(),
    }
}

/// The concrete path for an endpoint template, naming existing things.
pub(crate) fn concrete(path: &str, f: &Fixture) -> String {
    let id = match path.split('/').nth(3) {
        Some("gateways") => f.gateway,
        Some("servers") => f.server,
        Some("hosts") => f.host,
        Some("tokens") => f.token,
        Some("connections") => f.connection,
        Some("roles") => f.role,
        Some("users") => f.user,
        Some("admin-tokens") => f.admin_token,
        Some("identities") => f.identity,
        Some("enrollments") => f.enrollment,
        Some("teams") => f.team,
        _ => 0,
    };
    path.replace("{id}", &id.to_string())
        .replace("{server_id}", &f.server.to_string())
        .replace("{user_id}", &f.user.to_string())
        .replace("{team_id}", &f.team.to_string())
        .replace("{kind}", "tools")
}

/// A body that would succeed, so a missing check would show as a change.
pub(crate) fn body(method: &str, path: &str, f: &Fixture) -> Option<Value> {
    let body = match (method, path) {
        ("GET" | "DELETE", _) => return None,
        ("POST", "/api/v1/gateways") => json!({"name": "New", "slug": "new-gateway"}),
        ("POST", "/api/v1/servers") => {
            json!({"name": "New", "slug": "new-server", "upstream_url": "http://127.0.0.1:9/x"})
        }
        ("PUT", "/api/v1/gateways/{id}/servers/{server_id}") => json!({"identity": "per_user"}),
        ("PUT", "/api/v1/gateways/{id}/servers/{server_id}/features/{kind}") => {
            json!({"mode": "block_all"})
        }
        ("POST", "/api/v1/gateways/{id}/servers/{server_id}/features/{kind}/approve") => {
            json!({"names": []})
        }
        ("POST", "/api/v1/gateways/{id}/servers/{server_id}/features/refresh") => json!({}),
        ("POST", "/api/v1/hosts") => json!({"name": "New bot"}),
        ("POST", "/api/v1/hosts/{id}/tokens") => json!({"gateway_id": f.gateway}),
        ("POST", "/api/v1/hosts/{id}/enrollments") => {
            json!({"gateway_id": f.gateway, "user_id": f.user})
        }
        ("POST", "/api/v1/roles") => json!({"name": "new-role", "capabilities": []}),
        ("PUT", "/api/v1/roles/{id}") => json!({"capabilities": ["audit.read", "users.manage"]}),
        ("POST", "/api/v1/users") => json!({"name": "new-user", "role_id": f.role}),
        ("PUT", "/api/v1/users/{id}/password") => json!({"password": "a new long password"}),
        ("POST", "/api/v1/teams") => json!({"name": "New team"}),
        ("PUT", "/api/v1/gateways/{id}/host-approval") => json!({"required": true}),
        // Discovery from the upstream's 401: a caller lacking the capability never
        // gets that far.
        ("PUT", "/api/v1/servers/{id}/oauth") => json!({}),
        // No body. The fixture's team is not granted the gateway yet; adding its member
        // again would still be audited, which the snapshot holds.
        (
            "PUT",
            "/api/v1/teams/{id}/members/{user_id}" | "/api/v1/gateways/{id}/teams/{team_id}",
        ) => {
            json!({})
        }
        ("POST", "/api/v1/oauth/signing-keys/rotate") => json!({}),
        ("PUT", "/api/v1/users/{id}/identities/{server_id}") => {
            json!({"credential": {"type": "bearer", "token": "replaced"}})
        }
        ("POST", p)
            if p.ends_with("/disable")
                || p.ends_with("/enable")
                || p.ends_with("/admin-tokens")
                || p.ends_with("/approve")
                || p.ends_with("/token") =>
        {
            json!({})
        }
        _ => panic!("{method} {path} is new: teach this test how to call it"),
    };
    Some(body)
}

/// Everything an admin call could change, read as the owner.
pub(crate) async fn snapshot(owner: &Admin, f: &Fixture) -> Value {
    let mut all = serde_json::Map::new();
    for path in [
        "/api/v1/gateways".to_owned(),
        "/api/v1/servers".to_owned(),
        "/api/v1/hosts".to_owned(),
        "/api/v1/roles".to_owned(),
        "/api/v1/users".to_owned(),
        "/api/v1/teams".to_owned(),
        format!("/api/v1/gateways/{}/teams", f.gateway),
        format!("/api/v1/gateways/{}/servers", f.gateway),
        format!(
            "/api/v1/gateways/{}/servers/{}/features",
            f.gateway, f.server
        ),
        format!("/api/v1/gateways/{}/connections", f.gateway),
        format!("/api/v1/hosts/{}/tokens", f.host),
        format!("/api/v1/hosts/{}/enrollments", f.host),
        format!("/api/v1/users/{}/admin-tokens", f.user),
        format!("/api/v1/users/{}/identities", f.user),
        "/api/v1/users/1/identities".to_owned(),
        "/api/v1/audit?kind=admin&limit=1000".to_owned(),
        "/api/v1/oauth/signing-keys".to_owned(),
    ] {
        let (status, v) = owner.get(&path).await;
        assert_eq!(status, 200, "{path}: {v}");
        all.insert(path, v);
    }
    Value::Object(all)
}

pub(crate) async fn caller_with(owner: &Admin, name: &str, capabilities: Vec<&str>) -> Admin {
    let (status, role) = owner
        .post(
            "/api/v1/roles",
            json!({"name": name, "capabilities": capabilities}),
        )
        .await;
    assert_eq!(status, 201, "{role}");
    let (_, user) = owner
        .post(
            "/api/v1/users",
            json!({"name": name, "role_id": role["id"]}),
        )
        .await;
    let (status, t) = owner
        .post(
            &format!("/api/v1/users/{}/admin-tokens", user["id"]),
            json!({}),
        )
        .await;
    assert_eq!(status, 201, "{t}");
    owner.with_token(t["token"].as_str().unwrap())
}

#[tokio::test]
async fn every_admin_endpoint_refuses_a_caller_lacking_its_capability_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let policy = Policy::start(&dir.path().join("data"), dir.path()).await;
    let owner = policy.admin();
    let f = fixture(&owner).await;
    let (_, all_caps) = owner.get("/api/v1/capabilities").await;
    let all_caps: Vec<String> = all_caps
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(all_caps.len(), 18, "{all_caps:?}");
    let (_, endpoints) = owner.get("/api/v1/endpoints").await;
    let endpoints = endpoints.as_array().unwrap().clone();
    assert!(endpoints.len() >= 30, "{endpoints:?}");

    // What each capability brings along (a role holds the reads its capabilities
    // cannot work without), as the service stores it.
    let implied = implications(&owner, &all_caps).await;

    // One caller per capability, holding every capability but that one and those that
    // bring it along.
    let mut lacking = std::collections::HashMap::new();
    for cap in &all_caps {
        let others: Vec<&str> = all_caps
            .iter()
            .filter(|c| !implied[*c].contains(cap))
            .map(String::as_str)
            .collect();
        assert!(!others.is_empty() || all_caps.len() == 1);
        lacking.insert(
            cap.clone(),
            caller_with(&owner, &format!("lacks-{}", cap.replace('.', "-")), others).await,
        );
    }
    let nobody = caller_with(&owner, "no-capabilities", vec![]).await;

    let mut walked = 0;
    for e in &endpoints {
        let (method, template) = (e["method"].as_str().unwrap(), e["path"].as_str().unwrap());
        let path = concrete(template, &f);
        let body = body(method, template, &f);
        let m = Method::from_bytes(method.as_bytes()).unwrap();

        // No token at all: 401 everywhere.
        let (status, v) = owner
            .with_token("")
            .call(m.clone(), &path, body.clone())
            .await;
        assert_eq!(
            (status, v["error"]["code"].as_str()),
            (401, Some("unauthenticated")),
            "{method} {path}"
        );

        match e["capability"].as_str() {
            Some(cap) => {
                let before = snapshot(&owner, &f).await;
                let (status, v) = lacking[cap].call(m, &path, body).await;
                assert_eq!(status, 403, "{method} {path} without {cap}: {v}");
                assert_eq!(v["error"]["code"], "missing_capability", "{method} {path}");
                assert_eq!(v["error"]["capability"], cap, "{method} {path}");
                assert_eq!(
                    snapshot(&owner, &f).await,
                    before,
                    "{method} {path} changed something although refused"
                );
            }
            None => {
                assert_eq!(
                    method, "GET",
                    "{method} {path} changes things: it must require a capability"
                );
                // Open to any admin: only the caller itself and static facts.
                assert_eq!(
                    e["scope"], "caller",
                    "{method} {path} needs no capability, so it must show only the caller"
                );
                let (status, v) = nobody.call(m, &path, None).await;
                assert_eq!(status, 200, "{method} {path} is open to any admin: {v}");
            }
        }
        walked += 1;
    }
    assert_eq!(walked, endpoints.len());

    // The caller with no capability sees itself, and only itself.
    let (status, me) = nobody.get("/api/v1/me").await;
    assert_eq!(status, 200, "{me}");
    assert_eq!(me["user"]["name"], "no-capabilities", "{me}");
    assert_eq!(me["capabilities"], json!([]), "{me}");
    assert_eq!(me["admin_token"]["host_id"], Value::Null, "{me}");
    assert!(!me.to_string().contains("alice"), "{me}");
}

/// For each capability, the capabilities a role given only it holds (itself included).
async fn implications(
    owner: &Admin,
    all_caps: &[String],
) -> std::collections::HashMap<String, Vec<String>> {
    let mut implied = std::collections::HashMap::new();
    for cap in all_caps {
        let (status, role) = owner
            .post(
                "/api/v1/roles",
                json!({"name": format!("only-{cap}"), "capabilities": [cap]}),
            )
            .await;
        assert_eq!(status, 201, "{role}");
        let held: Vec<String> = role["capabilities"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap().to_owned())
            .collect();
        assert!(held.contains(cap), "{role}");
        // Only reads are ever implied, and a read implies nothing.
        for other in held.iter().filter(|c| *c != cap) {
            assert!(other.ends_with(".read"), "{cap} implies {other}");
        }
        if cap.ends_with(".read") {
            assert_eq!(held, vec![cap.clone()], "{cap} implies nothing");
        }
        implied.insert(cap.clone(), held);
    }
    implied
}

#[tokio::test]
async fn roles_and_personal_admin_tokens_work_and_a_revoked_one_stops() {
    let dir = tempfile::tempdir().unwrap();
    let policy = Policy::start(&dir.path().join("data"), dir.path()).await;
    let owner = policy.admin();
    let operator = caller_with(&owner, "operator", vec!["gateways.manage"]).await;
    let (status, _) = operator
        .post("/api/v1/gateways", json!({"name": "Ops", "slug": "ops"}))
        .await;
    assert_eq!(status, 201);
    let (status, v) = operator
        .post(
            "/api/v1/servers",
            json!({"name": "S", "slug": "s", "upstream_url": "http://x:1/"}),
        )
        .await;
    assert_eq!(
        (status, v["error"]["capability"].as_str()),
        (403, Some("servers.manage"))
    );

    // Capabilities follow the role, whatever its name, on the next call.
    let (_, roles) = owner.get("/api/v1/roles").await;
    let role = roles
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "operator")
        .unwrap()
        .clone();
    let (status, updated) = owner
        .call(
            Method::PUT,
            &format!("/api/v1/roles/{}", role["id"]),
            Some(json!({"capabilities": ["servers.manage"]})),
        )
        .await;
    assert_eq!(status, 200, "{updated}");
    assert_eq!(
        updated["capabilities"],
        json!(["servers.manage", "servers.read"]),
        "a role holds the reads its capabilities need"
    );
    let (status, _) = operator
        .post(
            "/api/v1/servers",
            json!({"name": "S", "slug": "s", "upstream_url": "http://x:1/"}),
        )
        .await;
    assert_eq!(status, 201);
    let (status, _) = operator
        .post("/api/v1/gateways", json!({"name": "Dev", "slug": "dev"}))
        .await;
    assert_eq!(status, 403);

    // Unknown capabilities are refused.
    let (status, v) = owner
        .post(
            "/api/v1/roles",
            json!({"name": "typo", "capabilities": ["gateway.manage"]}),
        )
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (422, Some("unknown_capability"))
    );

    // Revoking the personal token, or disabling the user, stops it on the next call.
    let (_, users) = owner.get("/api/v1/users").await;
    let user = users
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["name"] == "operator")
        .unwrap()["id"]
        .as_i64()
        .unwrap();
    owner.set_enabled("users", user, false).await;
    assert_eq!(operator.get("/api/v1/servers").await.0, 401);
    owner.set_enabled("users", user, true).await;
    assert_eq!(operator.get("/api/v1/servers").await.0, 200);
    // Reads follow the role too: gateways.manage (and with it gateways.read) is gone.
    assert_eq!(operator.get("/api/v1/gateways").await.0, 403);
    let (_, tokens) = owner
        .get(&format!("/api/v1/users/{user}/admin-tokens"))
        .await;
    assert!(
        !tokens.to_string().contains("\"token\""),
        "listings never hold the secret: {tokens}"
    );
    let id = tokens[0]["id"].as_i64().unwrap();
    let (status, _) = owner
        .call(Method::DELETE, &format!("/api/v1/admin-tokens/{id}"), None)
        .await;
    assert_eq!(status, 204);
    assert_eq!(operator.get("/api/v1/servers").await.0, 401);
}
