//! Per-user servers: each request reaches the downstream with its own user's credential,
//! never the agent's token and never another user's; identities are sealed at rest.

use mcpguard_e2e::mcp::{self, call_text, initialize_with};
use mcpguard_e2e::{Admin, Stack};
use reqwest::Method;
use serde_json::json;

async fn user(owner: &Admin, name: &str, role: i64) -> i64 {
    let (status, u) = owner
        .post("/api/v1/users", json!({"name": name, "role_id": role}))
        .await;
    assert_eq!(status, 201, "{u}");
    u["id"].as_i64().unwrap()
}

async fn set_identity(owner: &Admin, user: i64, server: i64, credential: serde_json::Value) -> i64 {
    let path = format!("/api/v1/users/{user}/identities/{server}");
    let (status, v) = owner
        .call(Method::PUT, &path, Some(json!({"credential": credential})))
        .await;
    assert_eq!(status, 200, "{v}");
    assert!(
        v.get("credential").is_none() && !v.to_string().contains("downstream"),
        "never returned: {v}"
    );
    v["id"].as_i64().unwrap()
}

#[tokio::test]
async fn each_users_token_reaches_the_downstream_as_that_user_and_only_that_user() {
    let stack = Stack::start().await;
    let owner = stack.admin();
    let p = owner
        .provision("eng", "demo", &stack.demo.upstream_url())
        .await;
    let path = format!("/api/v1/gateways/{}/servers/{}", p.gateway_id, p.server_id);
    let (status, _) = owner
        .call(Method::PUT, &path, Some(json!({"identity": "per_user"})))
        .await;
    assert_eq!(status, 200);
    let (_, role) = owner
        .post(
            "/api/v1/roles",
            json!({"name": "member", "capabilities": []}),
        )
        .await;
    let role = role["id"].as_i64().unwrap();
    let (alice, bob) = (
        user(&owner, "alice", role).await,
        user(&owner, "bob", role).await,
    );
    let alice_identity = set_identity(
        &owner,
        alice,
        p.server_id,
        json!({"type": "bearer", "token": "alice-downstream-secret"}),
    )
    .await;
    set_identity(
        &owner,
        bob,
        p.server_id,
        json!({"type": "header", "name": "Authorization", "value": "Bearer bob-downstream-secret"}),
    )
    .await;

    // One agent (host), one token per end user.
    let token_for = |user: i64| {
        let owner = owner.clone();
        async move {
            let (status, t) = owner
                .post(
                    &format!("/api/v1/hosts/{}/tokens", p.host_id),
                    json!({"gateway_id": p.gateway_id, "user_id": user}),
                )
                .await;
            assert_eq!(status, 201, "{t}");
            t["token"].as_str().unwrap().to_owned()
        }
    };
    let (alice_token, bob_token) = (token_for(alice).await, token_for(bob).await);
    let url = stack.envoy.mcp_url("eng", "demo");
    let a = mcp::connect(&url, Some(&alice_token))
        .await
        .expect("alice connects");
    let b = mcp::connect(&url, Some(&bob_token))
        .await
        .expect("bob connects");

    // Many interleaved concurrent calls: each sees its own user's credential.
    let calls = (0..40).map(|i| {
        let (client, expected) = if i % 2 == 0 {
            (&a, "Bearer alice-downstream-secret")
        } else {
            (&b, "Bearer bob-downstream-secret")
        };
        async move {
            (
                call_text(client, "whoami", json!({})).await.unwrap(),
                expected,
            )
        }
    });
    for (seen, expected) in futures::future::join_all(calls).await {
        assert_eq!(seen, expected);
    }

    // The agent's own user (the owner) has no identity for this server.
    let missing = initialize_with(&url, Some(&p.token)).await;
    assert_eq!(
        (missing.status, missing.code().as_str()),
        (403, "identity_missing")
    );

    // Disabling Alice's identity cuts Alice only.
    owner.set_enabled("identities", alice_identity, false).await;
    let refused = initialize_with(&url, Some(&alice_token)).await;
    assert_eq!(
        (refused.status, refused.code().as_str()),
        (403, "identity_disabled")
    );
    assert_eq!(
        call_text(&b, "whoami", json!({})).await.unwrap(),
        "Bearer bob-downstream-secret"
    );
    owner.set_enabled("identities", alice_identity, true).await;
    assert_eq!(
        call_text(&a, "whoami", json!({})).await.unwrap(),
        "Bearer alice-downstream-secret"
    );

    // Disabling Bob (the user) cuts Bob's access, not Alice's.
    owner.set_enabled("users", bob, false).await;
    let refused = initialize_with(&url, Some(&bob_token)).await;
    assert_eq!(
        (refused.status, refused.code().as_str()),
        (403, "user_disabled")
    );
    assert_eq!(initialize_with(&url, Some(&alice_token)).await.status, 200);

    // The credentials are nowhere in clear: database files, logs, audit trail.
    let mut raw = Vec::new();
    for entry in std::fs::read_dir(&stack.policy.data_dir).unwrap() {
        raw.extend(std::fs::read(entry.unwrap().path()).unwrap());
    }
    let raw = String::from_utf8_lossy(&raw);
    let (_, audit) = owner.get("/api/v1/audit?limit=1000").await;
    let (_, listed) = owner
        .get(&format!("/api/v1/users/{alice}/identities"))
        .await;
    assert_eq!(listed[0]["header_name"], "authorization");
    for secret in ["alice-downstream-secret", "bob-downstream-secret"] {
        assert!(
            !raw.contains(secret),
            "{secret} is in the database in clear"
        );
        assert!(
            !stack.policy.proc.log_text().contains(secret),
            "{secret} is in the policy log"
        );
        assert!(
            !stack.envoy.proc.log_text().contains(secret),
            "{secret} is in the Envoy log"
        );
        assert!(
            !audit.to_string().contains(secret),
            "{secret} is in the audit log"
        );
        assert!(!listed.to_string().contains(secret));
    }
}

#[tokio::test]
async fn identities_refuse_headers_that_would_reroute_or_reframe_the_request() {
    let stack = Stack::start().await;
    let owner = stack.admin();
    let server = owner.server("demo", &stack.demo.upstream_url()).await;
    for (credential, why) in [
        (
            json!({"type": "header", "name": "host", "value": "evil"}),
            "host",
        ),
        (
            json!({"type": "header", "name": "x-mcpguard-route", "value": "http"}),
            "route header",
        ),
        (
            json!({"type": "header", "name": "x-api-key", "value": "a\r\nb"}),
            "CRLF",
        ),
        (json!({"type": "bearer", "token": ""}), "empty"),
        (json!({"type": "bearer", "token": "  "}), "blank"),
        (json!({"type": "password", "value": "x"}), "unknown type"),
    ] {
        let (status, v) = owner
            .call(
                Method::PUT,
                &format!("/api/v1/users/1/identities/{server}"),
                Some(json!({"credential": credential})),
            )
            .await;
        assert!(status == 422, "{why}: {status} {v}");
    }
    let (_, listed) = owner.get("/api/v1/users/1/identities").await;
    assert_eq!(listed, json!([]));
}

#[tokio::test]
async fn a_shared_exposure_sends_its_service_credential_for_every_caller() {
    let stack = Stack::start().await;
    let owner = stack.admin();
    let p = owner
        .provision("eng", "demo", &stack.demo.upstream_url())
        .await;
    let path = format!("/api/v1/gateways/{}/servers/{}", p.gateway_id, p.server_id);
    let credential =
        json!({"type": "header", "name": "X-Api-Key", "value": "shared-service-secret"});
    let (status, v) = owner
        .call(
            Method::PUT,
            &path,
            Some(json!({"identity": "shared", "credential": credential})),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["credential_header"], "x-api-key");
    assert!(!v.to_string().contains("shared-service-secret"));

    let client = mcp::connect(&stack.envoy.mcp_url("eng", "demo"), Some(&p.token))
        .await
        .unwrap();
    let seen = call_text(&client, "header", json!({"name": "x-api-key"}))
        .await
        .unwrap();
    assert_eq!(seen, "shared-service-secret");
    assert_eq!(
        call_text(&client, "whoami", json!({})).await.unwrap(),
        "none",
        "the client's token never passes"
    );

    // A per-user exposure takes no shared credential; replacing the exposure without
    // one removes it.
    let (status, v) = owner
        .call(
            Method::PUT,
            &path,
            Some(json!({"identity": "per_user", "credential": credential})),
        )
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (422, Some("invalid_credential"))
    );
    let (status, _) = owner
        .call(Method::PUT, &path, Some(json!({"identity": "shared"})))
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        call_text(&client, "header", json!({"name": "x-api-key"}))
            .await
            .unwrap(),
        "none"
    );

    let mut raw = Vec::new();
    for entry in std::fs::read_dir(&stack.policy.data_dir).unwrap() {
        raw.extend(std::fs::read(entry.unwrap().path()).unwrap());
    }
    assert!(!String::from_utf8_lossy(&raw).contains("shared-service-secret"));
    let (_, audit) = owner.get("/api/v1/audit?kind=admin").await;
    assert!(!audit.to_string().contains("shared-service-secret"));
}
