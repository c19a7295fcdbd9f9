//! Agents that pass each end user's identity: users enroll on the policy service's page
//! (sign in, bring identities), the agent claims each user's per-user token once, and
//! each call made with a user's token reaches the downstream as that user.

use std::collections::HashMap;

use mcpguard_e2e::Stack;
use mcpguard_e2e::mcp::{self, call_text, initialize_with};
use mcpguard_e2e::oauth::{Browser, PASSWORD, form_inputs};
use serde_json::{Value, json};

/// The enrollment form with these answers (and the page's CSRF value).
fn answers(
    page: &str,
    username: &str,
    password: &str,
    identities: &[(i64, &str)],
) -> HashMap<String, String> {
    let mut form = HashMap::new();
    form.insert("csrf".to_owned(), form_inputs(page)["csrf"].clone());
    form.insert("username".to_owned(), username.to_owned());
    form.insert("password".to_owned(), password.to_owned());
    for (server, token) in identities {
        form.insert(format!("identity_{server}"), (*token).to_owned());
    }
    form
}

#[tokio::test]
async fn users_enroll_on_the_page_and_the_agent_acts_for_each_with_their_own_identity() {
    let stack = Stack::start().await;
    let owner = stack.admin();
    let p = owner
        .provision("eng", "demo", &stack.demo.upstream_url())
        .await;
    owner
        .expose_as(p.gateway_id, p.server_id, json!({"identity": "per_user"}))
        .await;
    let alice = owner.person("alice", PASSWORD).await;
    let bob = owner.person("bob", PASSWORD).await;

    // The agent (through its admin) creates one enrollment per end user.
    let enroll = |user: i64| {
        let owner = owner.clone();
        async move {
            let (status, e) = owner
                .post(
                    &format!("/api/v1/hosts/{}/enrollments", p.host_id),
                    json!({"gateway_id": p.gateway_id, "user_id": user}),
                )
                .await;
            assert_eq!(status, 201, "{e}");
            e
        }
    };
    let (ea, eb) = (enroll(alice).await, enroll(bob).await);
    assert_eq!(ea["status"], "pending");
    assert_eq!(
        ea["missing_identities"],
        json!([{"server_id": p.server_id, "slug": "demo", "name": "Server demo"}])
    );
    let claim = |e: &Value| {
        let (owner, path) = (
            owner.clone(),
            format!("/api/v1/enrollments/{}/token", e["id"]),
        );
        async move { owner.post(&path, json!({})).await }
    };
    let (status, v) = claim(&ea).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (409, Some("enrollment_pending"))
    );

    // Alice opens her link.
    let url_a = ea["url"].as_str().unwrap().to_owned();
    let mut browser = Browser::default();
    let page = browser.get(&url_a).await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(
        page.body.contains("alice") && page.body.contains(&format!("identity_{}", p.server_id))
    );

    // Refused, and nothing changes: a wrong password, Bob's own sign-in on Alice's link,
    // no identity, a form from another site.
    let id = p.server_id;
    for (who, password, identity) in [
        ("alice", "wrong password", "alice-downstream-secret"),
        ("bob", PASSWORD, "bob-downstream-secret"),
        ("alice", PASSWORD, ""),
        ("alice", PASSWORD, "two words"),
    ] {
        let page = browser.get(&url_a).await;
        let refused = browser
            .post(
                &url_a,
                &answers(&page.body, who, password, &[(id, identity)]),
            )
            .await;
        assert!(
            refused.status == 401 || refused.status == 422,
            "{who}/{password}/{identity:?}: {} {}",
            refused.status,
            refused.body
        );
    }
    let page = browser.get(&url_a).await;
    let form = answers(
        &page.body,
        "alice",
        PASSWORD,
        &[(id, "alice-downstream-secret")],
    );
    let mut stranger = Browser::default();
    let forged = stranger.post(&url_a, &form).await;
    assert_eq!(forged.status, 403, "{}", forged.body);
    let (_, listed) = owner
        .get(&format!("/api/v1/users/{alice}/identities"))
        .await;
    assert_eq!(listed, json!([]), "a refused form saves nothing");
    let (_, state) = owner
        .get(&format!("/api/v1/enrollments/{}", ea["id"]))
        .await;
    assert_eq!(state["status"], "pending");

    // Alice completes it; the link is then spent.
    let done = browser.post(&url_a, &form).await;
    assert_eq!(done.status, 200, "{}", done.body);
    let (_, state) = owner
        .get(&format!("/api/v1/enrollments/{}", ea["id"]))
        .await;
    assert_eq!(state["status"], "completed");
    let page = browser.get(&url_a).await;
    assert_eq!(page.status, 404, "a used link opens nothing");
    // Bob completes his.
    let url_b = eb["url"].as_str().unwrap();
    let page = browser.get(url_b).await;
    let done = browser
        .post(
            url_b,
            &answers(
                &page.body,
                "bob",
                PASSWORD,
                &[(id, "bob-downstream-secret")],
            ),
        )
        .await;
    assert_eq!(done.status, 200, "{}", done.body);

    // The agent claims each user's token, once.
    let (status, ta) = claim(&ea).await;
    assert_eq!(status, 201, "{ta}");
    let (status, tb) = claim(&eb).await;
    assert_eq!(status, 201, "{tb}");
    let (alice_token, bob_token) = (ta["token"].as_str().unwrap(), tb["token"].as_str().unwrap());
    assert!(alice_token.starts_with("mcpgu_") && bob_token.starts_with("mcpgu_"));
    assert_eq!(ta["missing_identities"], json!([]));
    let (status, v) = claim(&ea).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (409, Some("enrollment_claimed"))
    );
    let (_, state) = owner
        .get(&format!("/api/v1/enrollments/{}", ea["id"]))
        .await;
    assert_eq!(
        (state["status"].as_str(), &state["token_id"]),
        (Some("claimed"), &ta["id"])
    );

    // Many interleaved concurrent calls: each reaches the downstream as its own user,
    // never as the agent, never as the other user.
    let url = stack.envoy.mcp_url("eng", "demo");
    let a = mcp::connect(&url, Some(alice_token))
        .await
        .expect("alice's token");
    let b = mcp::connect(&url, Some(bob_token))
        .await
        .expect("bob's token");
    mcp::each_sees_its_own(
        &[
            (&a, "Bearer alice-downstream-secret"),
            (&b, "Bearer bob-downstream-secret"),
        ],
        20,
    )
    .await;
    // The per-user token is an API token of the host like any other: break-glass and
    // revocation apply to it.
    owner.set_enabled("users", alice, false).await;
    let refused = initialize_with(&url, Some(alice_token)).await;
    assert_eq!(
        (refused.status, refused.code().as_str()),
        (403, "user_disabled")
    );
    assert_eq!(
        call_text(&b, "whoami", json!({})).await.unwrap(),
        "Bearer bob-downstream-secret"
    );
    owner.revoke(tb["id"].as_i64().unwrap()).await;
    let refused = initialize_with(&url, Some(bob_token)).await;
    assert_eq!(
        (refused.status, refused.code().as_str()),
        (401, "token_revoked")
    );

    // Nothing secret stored or logged in clear: links, tokens, credentials, passwords.
    let raw = stack.policy.stored_bytes();
    let raw = String::from_utf8_lossy(&raw);
    let (_, audit) = owner.get("/api/v1/audit?limit=1000").await;
    let link_secret = url_a.rsplit('/').next().unwrap();
    for secret in [
        link_secret,
        alice_token,
        bob_token,
        "alice-downstream-secret",
        PASSWORD,
    ] {
        assert!(!raw.contains(secret), "{secret} is in the database");
        assert!(
            !stack.policy.proc.log_text().contains(secret),
            "{secret} is in the log"
        );
        assert!(
            !audit.to_string().contains(secret),
            "{secret} is in the audit log"
        );
    }
    assert!(audit.to_string().contains("enrollment.complete"));
}

#[tokio::test]
async fn enrollments_refuse_what_cannot_be_enrolled_and_change_nothing() {
    let stack = Stack::start().await;
    let owner = stack.admin();
    let p = owner
        .provision("eng", "demo", &stack.demo.upstream_url())
        .await;
    let path = format!("/api/v1/hosts/{}/enrollments", p.host_id);
    for (body, status, code) in [
        (
            json!({"gateway_id": 999, "user_id": 1}),
            422,
            "unknown_gateway",
        ),
        (
            json!({"gateway_id": p.gateway_id, "user_id": 999}),
            422,
            "unknown_user",
        ),
        (
            json!({"gateway_id": p.gateway_id, "user_id": 1, "expires_in_minutes": 0}),
            422,
            "invalid_expires_in",
        ),
        (
            json!({"gateway_id": p.gateway_id, "user_id": 1, "expires_in_minutes": 20_000}),
            422,
            "invalid_expires_in",
        ),
    ] {
        let (s, v) = owner.post(&path, body.clone()).await;
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (status, Some(code)),
            "{body}"
        );
    }
    let (s, v) = owner
        .post(
            "/api/v1/hosts/999/enrollments",
            json!({"gateway_id": p.gateway_id, "user_id": 1}),
        )
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (404, Some("host_not_found"))
    );
    let (s, _) = owner.get("/api/v1/enrollments/1").await;
    assert_eq!(s, 404, "nothing was created");
    // A link that was never issued opens nothing.
    let page = Browser::default()
        .get(&format!("{}/enroll/not-a-link", stack.policy.public_url()))
        .await;
    assert_eq!(page.status, 404);
}
