//! Issue 19, the admin API as an attacker uses it (items 5, 6 and 7), through the real
//! policy service and Envoy: a lesser admin, an agent's own admin token, or a token with
//! no capability at all, trying to act as other users, reach other hosts, read
//! everything, or point a server at something inside the deployment.

use mcpguard_e2e::mcp::initialize_with;
use mcpguard_e2e::oauth::{Browser, PASSWORD, form_inputs};
use mcpguard_e2e::{Admin, Policy, Stack};
use reqwest::Method;
use serde_json::{Value, json};

use crate::capabilities::{body, caller_with, concrete, fixture, snapshot};

fn assert_error(status: u16, v: &Value, expected: (u16, &str)) {
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (expected.0, Some(expected.1)),
        "{v}"
    );
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{v}"
    );
}

/// An admin token for a new user holding `capabilities`, bound to `host_id` if given.
async fn admin_for(
    owner: &Admin,
    name: &str,
    capabilities: Vec<&str>,
    host_id: Option<i64>,
) -> (Admin, i64) {
    let (status, role) = owner
        .post(
            "/api/v1/roles",
            json!({"name": name, "capabilities": capabilities}),
        )
        .await;
    assert_eq!(status, 201, "{role}");
    let (status, user) = owner
        .post(
            "/api/v1/users",
            json!({"name": name, "role_id": role["id"]}),
        )
        .await;
    assert_eq!(status, 201, "{user}");
    let id = user["id"].as_i64().unwrap();
    let body = match host_id {
        Some(h) => json!({"host_id": h}),
        None => json!({}),
    };
    let (status, t) = owner
        .post(&format!("/api/v1/users/{id}/admin-tokens"), body)
        .await;
    assert_eq!(status, 201, "{t}");
    (owner.with_token(t["token"].as_str().unwrap()), id)
}

/// Completes an enrollment as the invited user (signs in on its page).
async fn complete_enrollment(enrollment: &Value, user: &str) {
    let url = enrollment["url"].as_str().unwrap();
    let mut browser = Browser::default();
    let page = browser.get(url).await;
    assert_eq!(page.status, 200, "{}", page.body);
    let mut form = std::collections::HashMap::new();
    form.insert("csrf".to_owned(), form_inputs(&page.body)["csrf"].clone());
    form.insert("username".to_owned(), user.to_owned());
    form.insert("password".to_owned(), PASSWORD.to_owned());
    let done = browser.post(url, &form).await;
    assert_eq!(done.status, 200, "{}", done.body);
}

// ---- 5. tokens.manage acting as other users ----

#[tokio::test]
async fn tokens_manage_cannot_mint_a_token_that_acts_as_another_user_without_their_consent() {
    let stack = Stack::start().await;
    let owner = stack.admin();
    let p = owner
        .provision("eng", "demo", &stack.demo.upstream_url())
        .await;
    owner
        .expose_as(p.gateway_id, p.server_id, json!({"identity": "per_user"}))
        .await;
    // A gateway with shared servers only: a token there carries no identity, but it
    // still acts as its user (connections, audit, teams).
    let ops = owner.gateway("ops").await;
    let svc = owner.server("svc", &stack.demo.upstream_url()).await;
    owner.expose(ops, svc).await;
    let alice = owner.person("alice", PASSWORD).await;
    let path = format!("/api/v1/users/{alice}/identities/{}", p.server_id);
    let (status, v) = owner
        .call(
            Method::PUT,
            &path,
            Some(json!({"credential": {"type": "bearer", "token": "alice-downstream-secret"}})),
        )
        .await;
    assert_eq!(status, 200, "{v}");

    // A lesser admin with tokens.manage, and the owner too (consent is not a
    // capability), mint for Alice: refused on both gateways, nothing created.
    let (agent_admin, _) = admin_for(&owner, "agent-admin", vec!["tokens.manage"], None).await;
    let tokens_path = format!("/api/v1/hosts/{}/tokens", p.host_id);
    let before = owner.get(&tokens_path).await.1;
    let connections = |g: i64| {
        let owner = owner.clone();
        async move {
            owner
                .get(&format!("/api/v1/gateways/{g}/connections"))
                .await
                .1
        }
    };
    let (eng_before, ops_before) = (connections(p.gateway_id).await, connections(ops).await);
    for caller in [&agent_admin, &owner] {
        for gateway in [p.gateway_id, ops] {
            let (status, v) = caller
                .post(
                    &tokens_path,
                    json!({"gateway_id": gateway, "user_id": alice}),
                )
                .await;
            assert_error(status, &v, (403, "consent_required"));
            assert!(
                v["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("enrollment"),
                "the message says what to do instead: {v}"
            );
            assert!(v.get("token").is_none(), "{v}");
        }
    }
    assert_eq!(owner.get(&tokens_path).await.1, before, "no token was made");
    assert_eq!(connections(p.gateway_id).await, eng_before);
    assert_eq!(connections(ops).await, ops_before, "no connection was made");

    // Making one for oneself still works (the caller is the token's user).
    let (status, own) = agent_admin
        .post(&tokens_path, json!({"gateway_id": ops}))
        .await;
    assert_eq!(status, 201, "{own}");

    // Alice consents: she completes an enrollment for this host on `eng`. From then on
    // a token for her there works and carries her identity through Envoy; her consent
    // for `eng` is not consent for `ops`.
    let (status, e) = agent_admin
        .post(
            &format!("/api/v1/hosts/{}/enrollments", p.host_id),
            json!({"gateway_id": p.gateway_id, "user_id": alice}),
        )
        .await;
    assert_eq!(status, 201, "{e}");
    complete_enrollment(&e, "alice").await;
    let (status, t) = agent_admin
        .post(
            &tokens_path,
            json!({"gateway_id": p.gateway_id, "user_id": alice}),
        )
        .await;
    assert_eq!(status, 201, "{t}");
    let client =
        mcpguard_e2e::mcp::connect(&stack.envoy.mcp_url("eng", "demo"), t["token"].as_str())
            .await
            .expect("alice's token connects");
    assert_eq!(
        mcpguard_e2e::mcp::call_text(&client, "whoami", json!({}))
            .await
            .unwrap(),
        "Bearer alice-downstream-secret"
    );
    let (status, v) = agent_admin
        .post(&tokens_path, json!({"gateway_id": ops, "user_id": alice}))
        .await;
    assert_error(status, &v, (403, "consent_required"));
}

// ---- 5. an agent's own admin token: its host only ----

#[tokio::test]
async fn a_host_bound_admin_token_reaches_only_its_own_hosts_tokens_and_enrollments() {
    let stack = Stack::start().await;
    let owner = stack.admin();
    // Another agent's host (the fixture's, with a token and an enrollment) ...
    let other = fixture(&owner).await;
    let live = owner.server("live", &stack.demo.upstream_url()).await;
    owner.expose(other.gateway, live).await;
    let (_, other_token) = owner
        .post(
            &format!("/api/v1/hosts/{}/tokens", other.host),
            json!({"gateway_id": other.gateway}),
        )
        .await;
    let other_token = other_token["token"].as_str().unwrap().to_owned();
    // (Not used before the walk: its last-used time, written in the background, would
    // change the snapshots.)
    let url = stack.envoy.mcp_url("eng", "live");

    // ... and this agent's own host, whose admin token holds every capability but is
    // bound to its host.
    let mine = owner.host("My agent").await;
    let (_, all_caps) = owner.get("/api/v1/capabilities").await;
    let all_caps: Vec<&str> = all_caps
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    let (agent, agent_user) = admin_for(&owner, "my-agent", all_caps, Some(mine)).await;

    // Every endpoint of the table: global ones refused (403 host_bound_token),
    // host-scoped ones on the other host's things 404, as if they did not exist; and
    // nothing changes.
    let (_, endpoints) = owner.get("/api/v1/endpoints").await;
    let mut refused = 0;
    for e in endpoints.as_array().unwrap() {
        let (method, template) = (e["method"].as_str().unwrap(), e["path"].as_str().unwrap());
        let path = concrete(template, &other);
        let m = Method::from_bytes(method.as_bytes()).unwrap();
        let before = snapshot(&owner, &other).await;
        let (status, v) = agent.call(m, &path, body(method, template, &other)).await;
        match e["scope"].as_str().unwrap() {
            "caller" => {
                assert_eq!(status, 200, "{method} {path}: {v}");
                continue;
            }
            "global" => assert_error(status, &v, (403, "host_bound_token")),
            "host" => {
                assert_eq!(status, 404, "{method} {path}: {v}");
                assert!(
                    v["error"]["code"]
                        .as_str()
                        .is_some_and(|c| c.ends_with("_not_found")),
                    "{method} {path}: {v}"
                );
            }
            other => panic!("{method} {path}: unknown scope {other}"),
        }
        assert_eq!(
            snapshot(&owner, &other).await,
            before,
            "{method} {path} changed something although refused"
        );
        refused += 1;
    }
    assert!(refused >= 30, "{refused}");
    // The other agent's token was not revoked: it still works through Envoy.
    assert_eq!(initialize_with(&url, Some(&other_token)).await.status, 200);

    let (status, me) = agent.get("/api/v1/me").await;
    assert_eq!(status, 200, "{me}");
    assert_eq!(me["admin_token"]["host_id"], mine, "{me}");
    let (_, tokens) = owner
        .get(&format!("/api/v1/users/{agent_user}/admin-tokens"))
        .await;
    assert_eq!(tokens[0]["host_id"], mine, "listed with its host: {tokens}");

    // On its own host it does its job: tokens (for its own user), enrollments, revoking.
    let (status, t) = agent
        .post(
            &format!("/api/v1/hosts/{mine}/tokens"),
            json!({"gateway_id": other.gateway}),
        )
        .await;
    assert_eq!(status, 201, "{t}");
    assert_eq!(t["user_id"], agent_user);
    let (status, listed) = agent.get(&format!("/api/v1/hosts/{mine}/tokens")).await;
    assert_eq!((status, listed.as_array().unwrap().len()), (200, 1));
    let (status, e) = agent
        .post(
            &format!("/api/v1/hosts/{mine}/enrollments"),
            json!({"gateway_id": other.gateway, "user_id": other.user}),
        )
        .await;
    assert_eq!(status, 201, "{e}");
    let (status, _) = agent.get(&format!("/api/v1/enrollments/{}", e["id"])).await;
    assert_eq!(status, 200);
    // Still no acting for another user without their consent.
    let (status, v) = agent
        .post(
            &format!("/api/v1/hosts/{mine}/tokens"),
            json!({"gateway_id": other.gateway, "user_id": other.user}),
        )
        .await;
    assert_error(status, &v, (403, "consent_required"));
    let (status, _) = agent
        .call(Method::DELETE, &format!("/api/v1/tokens/{}", t["id"]), None)
        .await;
    assert_eq!(status, 204);

    // Only token-based hosts that exist can be bound to.
    let (status, v) = owner
        .post(
            &format!("/api/v1/users/{agent_user}/admin-tokens"),
            json!({"host_id": 999}),
        )
        .await;
    assert_error(status, &v, (422, "unknown_host"));
    let (status, v) = owner
        .post(
            &format!("/api/v1/users/{agent_user}/admin-tokens"),
            json!({"host": 1}),
        )
        .await;
    assert_error(status, &v, (422, "invalid_body"));
}

// ---- 6. reading needs a capability ----

#[tokio::test]
async fn an_admin_token_with_no_capability_reads_nothing_but_itself() {
    let stack = Stack::start().await;
    let owner = stack.admin();
    let f = fixture(&owner).await;
    let nobody = caller_with(&owner, "nobody", vec![]).await;
    for path in [
        "/api/v1/users".to_owned(),
        "/api/v1/roles".to_owned(),
        "/api/v1/hosts".to_owned(),
        "/api/v1/gateways".to_owned(),
        "/api/v1/servers".to_owned(),
        format!("/api/v1/gateways/{}/servers", f.gateway),
        format!("/api/v1/gateways/{}/connections", f.gateway),
        format!("/api/v1/users/{}/identities", f.user),
        "/api/v1/oauth/signing-keys".to_owned(),
    ] {
        let (status, v) = nobody.get(&path).await;
        assert_error(status, &v, (403, "missing_capability"));
        let text = v.to_string();
        for secret in ["alice", "127.0.0.1", "Agent for eng", "eng"] {
            assert!(!text.contains(secret), "{path} leaks {secret}: {v}");
        }
    }
    let (status, me) = nobody.get("/api/v1/me").await;
    assert_eq!(status, 200, "{me}");
    assert_eq!(
        (me["user"]["name"].as_str(), me["role"]["name"].as_str()),
        (Some("nobody"), Some("nobody"))
    );
    assert_eq!(me["capabilities"], json!([]));
    assert!(me.get("token").is_none() && !me.to_string().contains("mcpga_e2e"));

    // Each read is its own: gateways.read shows gateways, not the servers' upstream
    // URLs or who is connected.
    let reader = caller_with(&owner, "gateway-reader", vec!["gateways.read"]).await;
    let (status, gateways) = reader.get("/api/v1/gateways").await;
    assert_eq!(status, 200, "{gateways}");
    assert_eq!(gateways[0]["slug"], "eng");
    for path in [
        "/api/v1/servers".to_owned(),
        format!("/api/v1/gateways/{}/connections", f.gateway),
        "/api/v1/users".to_owned(),
    ] {
        let (status, v) = reader.get(&path).await;
        assert_error(status, &v, (403, "missing_capability"));
    }
    // A toggle capability brings the read it needs to find ids.
    let toggler = caller_with(&owner, "toggler", vec!["connections.toggle"]).await;
    let (status, conns) = toggler
        .get(&format!("/api/v1/gateways/{}/connections", f.gateway))
        .await;
    assert_eq!(status, 200, "{conns}");
    let (_, me) = toggler.get("/api/v1/me").await;
    assert_eq!(
        me["capabilities"],
        json!(["connections.read", "connections.toggle", "gateways.read"])
    );
}

// ---- 7. upstreams that point inside ----

#[tokio::test]
async fn servers_inside_the_deployment_cannot_be_registered_and_so_cannot_be_reached() {
    let stack = Stack::start().await;
    let owner = stack.admin();
    let p = owner
        .provision("eng", "demo", &stack.demo.upstream_url())
        .await;
    let (envoy_admin, public, check) = (
        stack.envoy.admin_port,
        stack.policy.public_port,
        stack.policy.check_port,
    );
    let (operator, _) = admin_for(&owner, "operator", vec!["servers.manage"], None).await;
    for (i, (url, rule)) in [
        (format!("http://127.0.0.1:{envoy_admin}/"), "Envoy's admin"),
        (format!("http://localhost:{envoy_admin}/"), "Envoy's admin"),
        (format!("http://[::1]:{envoy_admin}/"), "Envoy's admin"),
        (
            format!("http://[::ffff:127.0.0.1]:{envoy_admin}/"),
            "Envoy's admin",
        ),
        // 2130706433 is 127.0.0.1 written as one number.
        (format!("http://2130706433:{envoy_admin}/"), "Envoy's admin"),
        (format!("http://127.0.0.2:{envoy_admin}/"), "Envoy's admin"),
        (
            format!("http://127.0.0.1:{public}/api/v1"),
            "the policy service's public port",
        ),
        (
            format!("http://127.0.0.1:{check}/v1"),
            "the policy service's check port",
        ),
        (
            format!("http://127.0.0.1:{}/mcp/eng/demo", stack.envoy.port),
            "Envoy's data plane",
        ),
        (
            format!("http://0.0.0.0:{}/mcp", stack.demo.port),
            "0.0.0.0/8",
        ),
        (
            "http://169.254.169.254/latest/meta-data".to_owned(),
            "169.254.0.0/16",
        ),
        ("http://[fd00:ec2::254]/".to_owned(), "fd00:ec2::254/128"),
        ("http://[fe80::1]:8000/".to_owned(), "fe80::/10"),
    ]
    .into_iter()
    .enumerate()
    {
        let (status, v) = operator
            .post(
                "/api/v1/servers",
                json!({"name": "inside", "slug": format!("inside-{i}"), "upstream_url": url}),
            )
            .await;
        assert_error(status, &v, (422, "upstream_denied"));
        assert!(
            v["error"]["message"].as_str().unwrap().contains(rule),
            "{url}: the message names the rule ({rule}): {v}"
        );
    }
    let (_, servers) = owner.get("/api/v1/servers").await;
    assert_eq!(
        servers.as_array().unwrap().len(),
        1,
        "only the demo server exists: {servers}"
    );
    // Through Envoy, a token holder on the gateway finds nothing there to reach.
    let refused = initialize_with(&stack.envoy.mcp_url("eng", "inside-0"), Some(&p.token)).await;
    assert_eq!(
        (refused.status, refused.code().as_str()),
        (403, "server_not_exposed")
    );
    // The demo server on another loopback port is registered and served as before.
    let (status, v) = operator
        .post(
            "/api/v1/servers",
            json!({"name": "Demo again", "slug": "demo-again", "upstream_url": format!("http://localhost:{}/mcp", stack.demo.port)}),
        )
        .await;
    assert_eq!(status, 201, "{v}");
    assert_eq!(
        initialize_with(&stack.envoy.mcp_url("eng", "demo"), Some(&p.token))
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn operators_deny_and_allow_networks_for_upstreams() {
    let dir = tempfile::tempdir().unwrap();
    let mut denying = Policy::start(&dir.path().join("deny"), dir.path()).await;
    let (status, v) = denying
        .admin()
        .post(
            "/api/v1/servers",
            json!({"name": "before", "slug": "before", "upstream_url": "http://127.0.0.1:9100/mcp"}),
        )
        .await;
    assert_eq!(status, 201, "{v}");
    denying
        .restart_with(
            dir.path(),
            &[("MCPGUARD_UPSTREAM_DENY_NETWORKS", "127.0.0.0/8,::1/128")],
        )
        .await;
    // A server registered before the rule is named in the log at start.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !denying
        .proc
        .log_text()
        .contains("a registered server's upstream is refused by the upstream policy")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no warning about the server registered before the rule"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    for url in ["http://127.0.0.1:9101/mcp", "http://localhost:9101/mcp"] {
        let (status, v) = denying
            .admin()
            .post(
                "/api/v1/servers",
                json!({"name": "local", "slug": "local", "upstream_url": url}),
            )
            .await;
        assert_error(status, &v, (422, "upstream_denied"));
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("is in --upstream-deny-networks"),
            "{v}"
        );
    }
    let allowing = Policy::start_with(
        &dir.path().join("allow"),
        dir.path(),
        &[("MCPGUARD_UPSTREAM_ALLOW_NETWORKS", "192.0.2.0/24")],
    )
    .await;
    let admin = allowing.admin();
    let (status, v) = admin
        .post(
            "/api/v1/servers",
            json!({"name": "local", "slug": "local", "upstream_url": "http://127.0.0.1:9100/mcp"}),
        )
        .await;
    assert_error(status, &v, (422, "upstream_denied"));
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--upstream-allow-networks"),
        "{v}"
    );
    let (status, v) = admin
        .post(
            "/api/v1/servers",
            json!({"name": "allowed", "slug": "allowed", "upstream_url": "http://192.0.2.10:8000/mcp"}),
        )
        .await;
    assert_eq!(status, 201, "{v}");
}
