//! API access tokens on the data plane: what gets through and what is refused.

use mcpguard_e2e::Stack;
use mcpguard_e2e::mcp::{self, call_text, initialize_with};
use serde_json::json;

#[tokio::test]
async fn a_valid_token_initializes_lists_and_calls_tools_through_envoy() {
    let stack = Stack::start().await;
    let p = stack
        .admin()
        .provision("eng", "demo", &stack.demo.upstream_url())
        .await;
    let client = mcp::connect(&stack.envoy.mcp_url("eng", "demo"), Some(&p.token))
        .await
        .expect("connects");

    let info = client.peer_info().expect("server info after initialize");
    assert_eq!(
        info.server_info.as_ref().map(|s| s.name.as_str()),
        Some("mcpguard-demo")
    );
    let tools = client.list_tools(None).await.unwrap();
    let names: Vec<&str> = tools.tools.iter().map(|t| t.name.as_ref()).collect();
    for expected in ["echo", "whoami", "header"] {
        assert!(names.contains(&expected), "{names:?}");
    }
    let echoed = call_text(&client, "echo", json!({"text": "hello through mcpguard"}))
        .await
        .unwrap();
    assert_eq!(echoed, "hello through mcpguard");
    assert!(stack.envoy.stat("wasmcustom.mcpguard.allowed").await >= 3);
    client.cancel().await.unwrap();
}

#[tokio::test]
async fn the_upstream_never_sees_the_clients_token_or_the_route_header() {
    let stack = Stack::start().await;
    let p = stack
        .admin()
        .provision("eng", "demo", &stack.demo.upstream_url())
        .await;
    let client = mcp::connect(&stack.envoy.mcp_url("eng", "demo"), Some(&p.token))
        .await
        .unwrap();
    assert_eq!(
        call_text(&client, "whoami", json!({})).await.unwrap(),
        "none"
    );
    let route = call_text(&client, "header", json!({"name": "x-mcpguard-route"}))
        .await
        .unwrap();
    assert_eq!(route, "none");
    // The upstream is addressed by its own authority, not the gateway's.
    let host = call_text(&client, "header", json!({"name": "host"}))
        .await
        .unwrap();
    assert_eq!(host, format!("127.0.0.1:{}", stack.demo.port));
    client.cancel().await.unwrap();
}

#[tokio::test]
async fn missing_garbage_and_unknown_tokens_get_401_with_the_documented_challenge() {
    let stack = Stack::start().await;
    let p = stack
        .admin()
        .provision("eng", "demo", &stack.demo.upstream_url())
        .await;
    let url = stack.envoy.mcp_url("eng", "demo");

    let none = initialize_with(&url, None).await;
    assert_eq!((none.status, none.code().as_str()), (401, "token_missing"));
    let expected_metadata = format!(
        "Bearer resource_metadata=\"{}/.well-known/oauth-protected-resource/mcp/eng/demo\"",
        stack.envoy.base_url()
    );
    assert_eq!(
        none.header("www-authenticate"),
        Some(expected_metadata.as_str())
    );
    assert_eq!(none.header("content-type"), Some("application/json"));

    let garbage = initialize_with(&url, Some("not-a-token")).await;
    assert_eq!(
        (garbage.status, garbage.code().as_str()),
        (401, "token_malformed")
    );
    assert!(
        garbage
            .header("www-authenticate")
            .unwrap()
            .contains(r#"error="invalid_token""#)
    );

    // Well-formed (the checksum holds) but never issued: only the policy service knows.
    let forged = mcpguard_core::token::format_token(
        mcpguard_core::token::TokenKind::HostApi,
        &"Z".repeat(40),
    )
    .unwrap();
    let unknown = initialize_with(&url, Some(&forged)).await;
    assert_eq!(
        (unknown.status, unknown.code().as_str()),
        (401, "token_unknown")
    );
    assert!(
        unknown
            .header("www-authenticate")
            .unwrap()
            .contains(r#"error="invalid_token""#)
    );

    // The SDK client sees the same refusals.
    assert_eq!(mcp::connect(&url, None).await.err(), Some(Some(401)));
    assert_eq!(
        mcp::connect(&url, Some(&forged)).await.err(),
        Some(Some(401))
    );
    assert!(mcp::connect(&url, Some(&p.token)).await.is_ok());

    // Only the unknown token needed a callout; garbage was refused in the filter.
    assert_eq!(
        stack
            .envoy
            .stat("wasmcustom.mcpguard.denied.token_malformed")
            .await,
        1
    );
    assert_eq!(
        stack
            .envoy
            .stat("wasmcustom.mcpguard.denied.token_unknown")
            .await,
        2
    );
}

#[tokio::test]
async fn a_token_for_gateway_a_cannot_reach_gateway_b() {
    let stack = Stack::start().await;
    let admin = stack.admin();
    let a = admin
        .provision("team-a", "demo", &stack.demo.upstream_url())
        .await;
    let b = admin.gateway("team-b").await;
    admin.expose(b, a.server_id).await;

    let through_b = initialize_with(&stack.envoy.mcp_url("team-b", "demo"), Some(&a.token)).await;
    assert_eq!(
        (through_b.status, through_b.code().as_str()),
        (401, "token_wrong_gateway")
    );
    let through_a = initialize_with(&stack.envoy.mcp_url("team-a", "demo"), Some(&a.token)).await;
    assert_eq!(through_a.status, 200, "{}", through_a.body);
}

#[tokio::test]
async fn a_server_the_gateway_does_not_expose_is_refused() {
    let stack = Stack::start().await;
    let admin = stack.admin();
    let p = admin
        .provision("eng", "demo", &stack.demo.upstream_url())
        .await;
    admin.server("hidden", &stack.demo.upstream_url()).await;

    for server in ["hidden", "no-such-server"] {
        let a = initialize_with(&stack.envoy.mcp_url("eng", server), Some(&p.token)).await;
        assert_eq!(
            (a.status, a.code().as_str()),
            (403, "server_not_exposed"),
            "{server}"
        );
    }
    // Hiding an exposed server takes effect on the next request.
    let path = format!("/api/v1/gateways/{}/servers/{}", p.gateway_id, p.server_id);
    let (status, _) = admin.call(reqwest::Method::DELETE, &path, None).await;
    assert_eq!(status, 204);
    let a = initialize_with(&stack.envoy.mcp_url("eng", "demo"), Some(&p.token)).await;
    assert_eq!((a.status, a.code().as_str()), (403, "server_not_exposed"));
}

#[tokio::test]
async fn a_deleted_token_is_refused_on_the_very_next_request_and_rotation_works() {
    let stack = Stack::start().await;
    let admin = stack.admin();
    let old = admin
        .provision("eng", "demo", &stack.demo.upstream_url())
        .await;
    let url = stack.envoy.mcp_url("eng", "demo");

    // Rotation: a second token for the same host; both work in between.
    let new = admin.token(old.host_id, old.gateway_id).await;
    let new_token = new["token"].as_str().unwrap();
    assert_eq!(
        new["connection_id"].as_i64(),
        Some(old.connection_id),
        "same host x gateway x user"
    );

    let session = mcp::connect(&url, Some(&old.token))
        .await
        .expect("old token works");
    assert_eq!(initialize_with(&url, Some(new_token)).await.status, 200);

    admin.revoke(old.token_id).await;
    // Right after the DELETE returned: a new request, and a call on the open session.
    let refused = initialize_with(&url, Some(&old.token)).await;
    assert_eq!(
        (refused.status, refused.code().as_str()),
        (401, "token_revoked")
    );
    let err = call_text(&session, "echo", json!({"text": "x"}))
        .await
        .expect_err("open session refused too");
    assert_eq!(mcp::status_of_service_error(&err), Some(401), "{err}");

    // The new token is untouched.
    let client = mcp::connect(&url, Some(new_token))
        .await
        .expect("new token still works");
    assert_eq!(
        call_text(&client, "echo", json!({"text": "ok"}))
            .await
            .unwrap(),
        "ok"
    );
}

#[tokio::test]
async fn an_expired_token_is_refused() {
    let stack = Stack::start().await;
    let admin = stack.admin();
    let p = admin
        .provision("eng", "demo", &stack.demo.upstream_url())
        .await;
    let soon = time::OffsetDateTime::now_utc() + std::time::Duration::from_millis(1500);
    let expires = soon
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let (status, t) = admin
        .post(
            &format!("/api/v1/hosts/{}/tokens", p.host_id),
            json!({"gateway_id": p.gateway_id, "expires_at": expires}),
        )
        .await;
    assert_eq!(status, 201, "{t}");
    let token = t["token"].as_str().unwrap();
    let url = stack.envoy.mcp_url("eng", "demo");
    assert_eq!(initialize_with(&url, Some(token)).await.status, 200);
    // Poll until the expiry passes (bounded); never a fixed sleep.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let a = initialize_with(&url, Some(token)).await;
        if a.status == 401 {
            assert_eq!(a.code(), "token_expired");
            assert!(time::OffsetDateTime::now_utc() >= soon);
            break;
        }
        assert!(std::time::Instant::now() < deadline, "token never expired");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
