//! Routing: servers added at run time are reachable at once; nothing the filter did not
//! authorise reaches any upstream.

use mcpguard_e2e::mcp::{self, call_text, initialize_with, post_initialize};
use mcpguard_e2e::{Demo, Stack};
use serde_json::json;

#[tokio::test]
async fn a_server_registered_at_run_time_is_reachable_without_touching_envoy() {
    let stack = Stack::start().await;
    let admin = stack.admin();
    let p = admin
        .provision("eng", "demo", &stack.demo.upstream_url())
        .await;
    // A second MCP server on a port that appears nowhere in Envoy's config, started
    // after Envoy.
    let late = Demo::start(stack.dir.path()).await;
    let config = std::fs::read_to_string(
        stack
            .dir
            .path()
            .join(format!("envoy-{}.json", stack.envoy.port)),
    )
    .unwrap();
    assert!(
        !config.contains(&late.port.to_string()),
        "the new server's port must not be in Envoy's config"
    );
    let server_id = admin.server("late", &late.upstream_url()).await;
    admin.expose(p.gateway_id, server_id).await;

    let client = mcp::connect(&stack.envoy.mcp_url("eng", "late"), Some(&p.token))
        .await
        .expect("reachable at once");
    let host = call_text(&client, "header", json!({"name": "host"}))
        .await
        .unwrap();
    assert_eq!(
        host,
        format!("127.0.0.1:{}", late.port),
        "the request reached the new server"
    );
    client.cancel().await.unwrap();
}

#[tokio::test]
async fn forged_routing_headers_without_a_valid_token_reach_no_upstream() {
    let stack = Stack::start().await;
    let admin = stack.admin();
    let p = admin
        .provision("eng", "demo", &stack.demo.upstream_url())
        .await;
    let demo_authority = format!("127.0.0.1:{}", stack.demo.port);
    let forwarded_before = upstream_requests(&stack).await;

    let base = stack.envoy.base_url();
    let forged: Vec<(&str, &str)> = vec![
        ("x-mcpguard-route", "http"),
        ("host", &demo_authority),
        ("x-forwarded-host", &demo_authority),
        ("x-envoy-original-path", "/mcp"),
    ];
    // Paths outside /mcp/..., malformed MCP paths, and MCP paths with no, garbage or
    // revoked tokens: every one carries the forged routing headers.
    for (path, token) in [
        ("/mcp", None),
        ("/", None),
        ("/healthz", None),
        ("/mcp/eng", None),
        ("/mcp/eng/demo/../../x", Some(p.token.as_str())),
        ("/mcp/eng/demo", None),
        ("/mcp/eng/demo", Some("garbage")),
    ] {
        let mut headers = forged.clone();
        let bearer = token.map(|t| format!("Bearer {t}"));
        if let Some(b) = &bearer {
            headers.push(("authorization", b));
        }
        let a = post_initialize(&format!("{base}{path}"), &headers).await;
        assert!(
            (400..500).contains(&a.status),
            "{path}: {} {}",
            a.status,
            a.body
        );
        assert!(
            a.json()["error"]["code"].is_string(),
            "{path}: JSON error body expected, got {}",
            a.body
        );
    }
    admin.revoke(p.token_id).await;
    let mut headers = forged.clone();
    let bearer = format!("Bearer {}", p.token);
    headers.push(("authorization", &bearer));
    let a = post_initialize(&stack.envoy.mcp_url("eng", "demo"), &headers).await;
    assert_eq!(a.status, 401);

    assert_eq!(
        upstream_requests(&stack).await,
        forwarded_before,
        "a refused request reached an upstream"
    );
    // And a valid token still goes through (the counter does move when it should).
    let fresh = admin.token(p.host_id, p.gateway_id).await;
    let ok = initialize_with(&stack.envoy.mcp_url("eng", "demo"), fresh["token"].as_str()).await;
    assert_eq!(ok.status, 200);
    assert_eq!(upstream_requests(&stack).await, forwarded_before + 1);
}

async fn upstream_requests(stack: &Stack) -> u64 {
    stack
        .envoy
        .stat("cluster.mcpguard_upstream_http.upstream_rq_total")
        .await
        + stack
            .envoy
            .stat("cluster.mcpguard_upstream_https.upstream_rq_total")
            .await
}
