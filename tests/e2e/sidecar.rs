//! Sidecar mode: `envoy/sidecar.yaml` (Envoy configured as an Istio sidecar is for a
//! pod's inbound traffic, the filter's config passed as Istio passes a WasmPlugin's
//! `pluginConfig`) in front of one MCP server. It authorises exactly as the gateway
//! does and then goes to the route's own cluster, the app in the pod, whatever the
//! policy service names as the server's upstream.

use mcpguard_e2e::mcp::{self, call_text, expect_refusal, initialize_with};
use mcpguard_e2e::raw::{self, MCP_HEADERS, Spy};
use mcpguard_e2e::toggles::five_layers;
use mcpguard_e2e::{Policy, sidecar};
use reqwest::Method;
use serde_json::json;

#[tokio::test]
async fn an_allowed_call_reaches_the_app_in_the_pod_with_the_injected_credential() {
    let stack = sidecar::stack().await;
    let admin = stack.admin();
    // The server is registered at an upstream that is not the app: the sidecar must
    // not go there (the policy answer names it), only to its own cluster.
    let elsewhere = Spy::start().await;
    let p = admin.provision("eng", "demo", &elsewhere.url("/mcp")).await;
    let path = format!("/api/v1/gateways/{}/servers/{}", p.gateway_id, p.server_id);
    let credential = json!({"type": "header", "name": "X-Api-Key", "value": "shared-secret"});
    let (status, v) = admin
        .call(
            Method::PUT,
            &path,
            Some(json!({"identity": "shared", "credential": credential})),
        )
        .await;
    assert_eq!(status, 200, "{v}");

    let client = mcp::connect(&stack.envoy.mcp_url("eng", "demo"), Some(&p.token))
        .await
        .expect("an MCP session through the sidecar");
    let echoed = call_text(&client, "echo", json!({"text": "through the sidecar"}))
        .await
        .unwrap();
    assert_eq!(echoed, "through the sidecar");
    assert_eq!(
        call_text(&client, "header", json!({"name": "x-api-key"}))
            .await
            .unwrap(),
        "shared-secret",
        "the policy service's credential is injected"
    );
    assert_eq!(
        call_text(&client, "whoami", json!({})).await.unwrap(),
        "none",
        "the client's token never reaches the app"
    );
    assert!(
        elsewhere.paths().is_empty(),
        "the answer's upstream was connected to: {:?}",
        elsewhere.paths()
    );
    // Audited as in gateway mode: this server, this gateway, the tool by name.
    let entry = admin
        .allowed_decision(|e| e["tool"] == "echo" && e["server"] == "demo")
        .await;
    assert_eq!(entry["gateway"], "eng", "{entry}");
    assert!(stack.envoy.stat("wasmcustom.mcpguard.allowed").await >= 3);
}

#[tokio::test]
async fn each_refusal_is_the_gateways_own() {
    let stack = sidecar::stack().await;
    let admin = stack.admin();
    let p = admin
        .provision("eng", "demo", &stack.demo.upstream_url())
        .await;
    let url = stack.envoy.mcp_url("eng", "demo");
    let bad = mcpguard_core::token::format_token(
        mcpguard_core::token::TokenKind::HostApi,
        &"b".repeat(40),
    )
    .unwrap();
    let missing = expect_refusal(&url, None, (401, "token_missing")).await;
    assert!(
        missing
            .header("www-authenticate")
            .is_some_and(|c| c.contains("resource_metadata=")),
        "{missing:?}"
    );
    expect_refusal(&url, Some("garbage"), (401, "token_malformed")).await;
    expect_refusal(&url, Some(&bad), (401, "token_unknown")).await;

    // Another gateway's URL: this token's connection is to `eng` only.
    let ops = admin.gateway("ops").await;
    admin.expose(ops, p.server_id).await;
    expect_refusal(
        &stack.envoy.mcp_url("ops", "demo"),
        Some(&p.token),
        (401, "token_wrong_gateway"),
    )
    .await;
    // A gateway that does not expose the server.
    let bare = admin.gateway("bare").await;
    let on_bare = admin.token(p.host_id, bare).await["token"]
        .as_str()
        .unwrap()
        .to_owned();
    expect_refusal(
        &stack.envoy.mcp_url("bare", "demo"),
        Some(&on_bare),
        (403, "server_not_exposed"),
    )
    .await;
    // Another server's URL through this sidecar: refused here, whatever the token may
    // reach, so no other server's credential is ever injected into this app.
    let other = admin.server("other", &stack.demo.upstream_url()).await;
    admin.expose(p.gateway_id, other).await;
    expect_refusal(
        &stack.envoy.mcp_url("eng", "other"),
        Some(&p.token),
        (404, "unknown_route"),
    )
    .await;

    admin.revoke(p.token_id).await;
    expect_refusal(&url, Some(&p.token), (401, "token_revoked")).await;
}

#[tokio::test]
async fn break_glass_holds_on_the_next_request_through_the_sidecar() {
    let stack = sidecar::stack().await;
    let target = five_layers(&stack).await;
    let admin = stack.admin();
    // Each layer in turn, one request each: refused by that layer, then allowed again.
    for layer in &target.layers {
        admin.set_enabled(layer.kind, layer.id, false).await;
        expect_refusal(&target.url, Some(&target.token), (403, layer.code)).await;
        admin.set_enabled(layer.kind, layer.id, true).await;
        let a = initialize_with(&target.url, Some(&target.token)).await;
        assert_eq!(a.status, 200, "{} re-enabled: {}", layer.kind, a.body);
    }
}

#[tokio::test]
async fn policy_service_down_means_503_and_back_means_allowed() {
    let mut stack = sidecar::stack().await;
    let p = stack
        .admin()
        .provision("eng", "demo", &stack.demo.upstream_url())
        .await;
    let url = stack.envoy.mcp_url("eng", "demo");
    assert_eq!(initialize_with(&url, Some(&p.token)).await.status, 200);
    stack.policy.proc.kill();
    expect_refusal(&url, Some(&p.token), (503, "policy_unavailable")).await;
    stack.policy.restart(stack.dir.path()).await;
    let a = initialize_with(&url, Some(&p.token)).await;
    assert_eq!(a.status, 200, "{}", a.body);
}

#[tokio::test]
async fn the_app_is_reachable_only_through_the_filter() {
    let dir = tempfile::tempdir().unwrap();
    let policy = Policy::start(&dir.path().join("data"), dir.path()).await;
    // The app: records every request that reaches it.
    let app = Spy::start().await;
    let envoy = sidecar::start_envoy(app.port, policy.check_port, dir.path()).await;
    let admin = policy.admin();
    let p = admin.provision("eng", "demo", &app.url("/mcp")).await;

    // Not through the filter's say-so: the app's own path without a token, other paths,
    // a forged route header (with and without a token), a forged upstream address.
    let auth = format!("authorization: Bearer {}\r\n", p.token);
    for (path, extra) in [
        ("/mcp", String::new()),
        ("/mcp", "x-mcpguard-route: sidecar\r\n".to_owned()),
        ("/mcp/", format!("x-mcpguard-route: sidecar\r\n{auth}")),
        ("/", "x-mcpguard-route: sidecar\r\n".to_owned()),
        ("/healthz", String::new()),
        ("/mcp/eng/demo", "x-mcpguard-route: sidecar\r\n".to_owned()),
        (
            "/mcp/eng/other",
            format!("x-mcpguard-route: sidecar\r\n{auth}"),
        ),
        (
            "/mcp/eng/demo/../../mcp",
            "x-mcpguard-route: sidecar\r\n".to_owned(),
        ),
        (
            "/mcp/eng/demo",
            "x-mcpguard-upstream-addr: 127.0.0.1:1\r\nx-mcpguard-route: http\r\n".to_owned(),
        ),
    ] {
        let head = format!("POST {path} HTTP/1.1\r\nhost: demo\r\n{MCP_HEADERS}{extra}");
        let (status, body) = raw::request(envoy.port, head.as_bytes(), raw::PING).await;
        assert!(
            matches!(status, 400 | 401 | 404),
            "{path} {extra:?}: {status} {body}"
        );
    }
    assert!(app.paths().is_empty(), "reached the app: {:?}", app.paths());

    // Authorised: reaches the app at its own path, rest and query kept.
    let head = format!("POST /mcp/eng/demo/sub?q=1 HTTP/1.1\r\nhost: demo\r\n{MCP_HEADERS}{auth}");
    let (status, body) = raw::request(envoy.port, head.as_bytes(), raw::PING).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(app.paths(), ["/mcp/sub?q=1"]);
    assert_eq!(app.hosts(), ["demo"], "the client's :authority stays");
    // The app's own path with a token (the token's gateway), a forged route header
    // dropped on the way: reaches the app as sent.
    let head = format!(
        "POST /mcp?s=1 HTTP/1.1\r\nhost: demo\r\n{MCP_HEADERS}x-mcpguard-route: sidecar\r\n{auth}"
    );
    let (status, body) = raw::request(envoy.port, head.as_bytes(), raw::PING).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(app.paths(), ["/mcp/sub?q=1", "/mcp?s=1"]);
}

/// Clients may use the app's own URL (`/mcp`, as the server serves it): the path then
/// names no gateway, and the policy service decides on the token's own. Everything
/// else is as on `/mcp/{gateway}/demo`.
#[tokio::test]
async fn on_the_apps_own_path_the_gateway_is_the_tokens() {
    let stack = sidecar::stack().await;
    let admin = stack.admin();
    let eng = admin
        .provision("eng", "demo", &stack.demo.upstream_url())
        .await;
    // A second gateway exposing the same server, with a token of its own.
    let ops_id = admin.gateway("ops").await;
    admin.expose(ops_id, eng.server_id).await;
    let ops_host = admin.host("Agent for ops").await;
    let ops_token = admin.token(ops_host, ops_id).await["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let app_url = format!("{}/mcp", stack.envoy.base_url());

    for (token, gateway, text) in [(&eng.token, "eng", "as eng"), (&ops_token, "ops", "as ops")] {
        let client = mcp::connect(&app_url, Some(token))
            .await
            .expect("an MCP session on the app's own URL");
        let echoed = call_text(&client, "echo", json!({ "text": text }))
            .await
            .unwrap();
        assert_eq!(echoed, text);
        let entry = admin
            .allowed_decision(|e| e["tool"] == "echo" && e["gateway"] == gateway)
            .await;
        assert_eq!(entry["server"], "demo", "{entry}");
    }
    // The URL with a gateway still holds a token to it.
    expect_refusal(
        &stack.envoy.mcp_url("eng", "demo"),
        Some(&ops_token),
        (401, "token_wrong_gateway"),
    )
    .await;
    // Refusals on the app's URL are the gateway's own: no token, the token's gateway
    // switched off (the next request), a gateway that does not expose the server.
    expect_refusal(&app_url, None, (401, "token_missing")).await;
    admin.set_enabled("gateways", ops_id, false).await;
    expect_refusal(&app_url, Some(&ops_token), (403, "gateway_disabled")).await;
    admin.set_enabled("gateways", ops_id, true).await;
    let dev_id = admin.gateway("dev").await;
    let dev_host = admin.host("Agent for dev").await;
    let dev_token = admin.token(dev_host, dev_id).await["token"]
        .as_str()
        .unwrap()
        .to_owned();
    expect_refusal(&app_url, Some(&dev_token), (403, "server_not_exposed")).await;
    // And the switched-on gateway serves again.
    let client = mcp::connect(&app_url, Some(&ops_token))
        .await
        .expect("ops is on again");
    assert_eq!(
        call_text(&client, "echo", json!({"text": "again"}))
            .await
            .unwrap(),
        "again"
    );
}
