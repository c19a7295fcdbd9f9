//! Per-user servers: each request reaches the downstream with its own user's credential,
//! never the agent's token and never another user's; identities are sealed at rest.

use mcpguard_e2e::mcp::{self, call_text, initialize_with};
use mcpguard_e2e::oauth::{PASSWORD, RawClient};
use mcpguard_e2e::{Admin, Stack};
use reqwest::Method;
use serde_json::json;

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
    owner
        .expose_as(p.gateway_id, p.server_id, json!({"identity": "per_user"}))
        .await;
    let users = owner.end_users(&["alice", "bob"]).await;
    let (alice, bob) = (users[0], users[1]);
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
    let alice_token = owner.user_token(p.host_id, p.gateway_id, alice).await;
    let bob_token = owner.user_token(p.host_id, p.gateway_id, bob).await;
    let url = stack.envoy.mcp_url("eng", "demo");
    let a = mcp::connect(&url, Some(&alice_token))
        .await
        .expect("alice connects");
    let b = mcp::connect(&url, Some(&bob_token))
        .await
        .expect("bob connects");

    // Many interleaved concurrent calls: each sees its own user's credential.
    mcp::each_sees_its_own(
        &[
            (&a, "Bearer alice-downstream-secret"),
            (&b, "Bearer bob-downstream-secret"),
        ],
        20,
    )
    .await;

    // The agent's own user (the owner) has no identity for this server.
    let missing = initialize_with(&url, Some(&p.token)).await;
    assert_eq!(
        (missing.status, missing.code().as_str()),
        (403, "identity_missing")
    );
    // A new connection says which identities its user must still bring: the owner's
    // lacks one for `demo`, Alice's lacks none.
    let path = format!("/api/v1/hosts/{}/tokens", p.host_id);
    for (user, expected) in [
        (
            1,
            json!([{"server_id": p.server_id, "slug": "demo", "name": "Server demo"}]),
        ),
        (alice, json!([])),
    ] {
        let (status, issued) = owner
            .post(&path, json!({"gateway_id": p.gateway_id, "user_id": user}))
            .await;
        assert_eq!(status, 201, "{issued}");
        assert_eq!(issued["missing_identities"], expected, "user {user}");
    }

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

    // The credentials are nowhere in clear: database, logs, audit trail.
    let raw = stack.policy.stored_bytes();
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

    let raw = stack.policy.stored_bytes();
    assert!(!String::from_utf8_lossy(&raw).contains("shared-service-secret"));
    let (_, audit) = owner.get("/api/v1/audit?kind=admin").await;
    assert!(!audit.to_string().contains("shared-service-secret"));
}

/// `whoami` through Envoy on a fresh MCP session: the `Authorization` the upstream got.
async fn whoami(url: &str, token: &str) -> String {
    let client = mcp::connect(url, Some(token)).await.expect("connects");
    call_text(&client, "whoami", json!({})).await.unwrap()
}

#[tokio::test]
async fn rotating_the_secrets_key_keeps_every_credential_and_retires_the_old_key() {
    let mut stack = Stack::start().await;
    let owner = stack.admin();
    let p = owner
        .provision("eng", "demo", &stack.demo.upstream_url())
        .await;
    // `demo` per-user with Alice's identity; `svc` shared, with a service credential.
    owner
        .expose_as(p.gateway_id, p.server_id, json!({"identity": "per_user"}))
        .await;
    let svc = owner.server("svc", &stack.demo.upstream_url()).await;
    let shared = json!({"identity": "shared",
        "credential": {"type": "bearer", "token": "service-downstream-secret"}});
    owner.expose_as(p.gateway_id, svc, shared).await;
    let users = owner.end_users(&["alice", "bob"]).await;
    let (alice, bob) = (users[0], users[1]);
    set_identity(
        &owner,
        alice,
        p.server_id,
        json!({"type": "bearer", "token": "alice-downstream-secret"}),
    )
    .await;
    let alice_token = owner.user_token(p.host_id, p.gateway_id, alice).await;
    let (demo, svc) = (
        stack.envoy.mcp_url("eng", "demo"),
        stack.envoy.mcp_url("eng", "svc"),
    );
    let everything_injected = |bob_token: Option<String>| {
        let (demo, svc, alice_token) = (&demo, &svc, &alice_token);
        async move {
            assert_eq!(
                whoami(demo, alice_token).await,
                "Bearer alice-downstream-secret"
            );
            assert_eq!(
                whoami(svc, alice_token).await,
                "Bearer service-downstream-secret"
            );
            if let Some(bob_token) = bob_token {
                assert_eq!(
                    whoami(demo, &bob_token).await,
                    "Bearer bob-downstream-secret"
                );
            }
        }
    };
    everything_injected(None).await;

    // 1. A new key, written once.
    let old_key = stack.policy.data_dir.join("secrets.key");
    let new_key = stack.dir.path().join("new.key");
    let new_key_arg = new_key.display().to_string();
    let out = stack
        .policy
        .command(&["new-secrets-key", &new_key_arg], &[]);
    assert!(out.status.success(), "{out:?}");
    let written = std::fs::read_to_string(&new_key).unwrap();
    assert!(written.trim().len() == 64 && written.trim().chars().all(|c| c.is_ascii_hexdigit()));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&new_key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let again = stack
        .policy
        .command(&["new-secrets-key", &new_key_arg], &[]);
    assert!(!again.status.success(), "an existing key file is replaced");
    assert_eq!(std::fs::read_to_string(&new_key).unwrap(), written);

    // 2. Serve with the new key and the old one as previous: everything still opens, and
    // what is saved now is sealed under the new key.
    let (old_key, new_key) = (old_key.display().to_string(), new_key_arg);
    let rotating = [
        ("MCPGUARD_SECRETS_KEY_FILE", new_key.as_str()),
        ("MCPGUARD_PREVIOUS_SECRETS_KEY_FILE", old_key.as_str()),
    ];
    stack.policy.restart_with(stack.dir.path(), &rotating).await;
    set_identity(
        &owner,
        bob,
        p.server_id,
        json!({"type": "bearer", "token": "bob-downstream-secret"}),
    )
    .await;
    // Bob consents (enrolls) once he has his identity, sealed under the new key.
    let bob_token = owner.user_token(p.host_id, p.gateway_id, bob).await;
    everything_injected(Some(bob_token.clone())).await;

    // 3. Re-seal, first with the wrong previous key: refused, nothing changed.
    let other_key = stack.dir.path().join("other.key").display().to_string();
    assert!(
        stack
            .policy
            .command(&["new-secrets-key", &other_key], &[])
            .status
            .success()
    );
    let wrong = stack.policy.command(
        &["reseal"],
        &[
            ("MCPGUARD_SECRETS_KEY_FILE", new_key.as_str()),
            ("MCPGUARD_PREVIOUS_SECRETS_KEY_FILE", other_key.as_str()),
        ],
    );
    let said = String::from_utf8_lossy(&wrong.stdout);
    assert!(!wrong.status.success(), "{said}");
    assert!(said.contains("opens under neither"), "{said}");
    let resealed = stack.policy.command(&["reseal"], &rotating);
    let said = String::from_utf8_lossy(&resealed.stdout);
    assert!(resealed.status.success(), "{said}");
    assert!(
        said.contains("re-sealed 1 identities, 1 shared credentials and 2 signing keys under the current key; 1 already under it"),
        "{said}"
    );
    let twice = stack.policy.command(&["reseal"], &rotating);
    let said = String::from_utf8_lossy(&twice.stdout);
    assert!(
        said.contains("re-sealed 0 identities, 0 shared credentials and 0 signing keys under the current key; 5 already under it"),
        "{said}"
    );

    // 4. The old key retired: everything still injected under the new key alone ...
    stack
        .policy
        .restart_with(
            stack.dir.path(),
            &[
                ("MCPGUARD_SECRETS_KEY_FILE", &new_key),
                ("MCPGUARD_PREVIOUS_SECRETS_KEY_FILE", ""),
            ],
        )
        .await;
    everything_injected(Some(bob_token.clone())).await;
    // The OAuth signing keys were re-sealed too: a headed app still gets signed tokens.
    owner.person("carol", PASSWORD).await;
    let app = RawClient::register(&stack.policy.public_url(), "Desk app").await;
    let tokens = app.sign_in(&svc, "carol", PASSWORD).await;
    assert!(
        tokens["access_token"]
            .as_str()
            .is_some_and(|t| t.contains('.'))
    );
    // ... and nothing opens under the old key any more: refused, never sent without it.
    stack
        .policy
        .restart_with(
            stack.dir.path(),
            &[
                ("MCPGUARD_SECRETS_KEY_FILE", &old_key),
                ("MCPGUARD_PREVIOUS_SECRETS_KEY_FILE", ""),
            ],
        )
        .await;
    for url in [&demo, &svc] {
        let refused = initialize_with(url, Some(&alice_token)).await;
        assert_eq!(
            (refused.status, refused.code().as_str()),
            (503, "policy_unavailable")
        );
    }
}
