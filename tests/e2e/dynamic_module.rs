//! The mcpguard filter as an Envoy dynamic module (`dynamic-module/`, the benchmark's
//! setup (d), an experiment) through real Envoy: the wasm filter's decisions, carried
//! out by native glue instead of proxy-wasm.

use mcpguard_e2e::Stack;
use mcpguard_e2e::mcp::{
    self, call_text, challenge_and_metadata, expect_refusal, initialize_with, post_initialize,
};
use serde_json::json;

const CONFIG: &str = "bench/envoy/dynamic-module.yaml";

#[tokio::test]
async fn the_dynamic_module_allows_live_tokens_and_refuses_the_rest() {
    let mut stack = Stack::start_config(CONFIG).await;
    let admin = stack.admin();
    let p = admin
        .provision("eng", "demo", &stack.demo.upstream_url())
        .await;
    let url = stack.envoy.mcp_url("eng", "demo");

    // A live token: a whole MCP session, routed to the server the check named; the
    // upstream sees neither the token nor the route header.
    let client = mcp::connect(&url, Some(&p.token))
        .await
        .expect("a live token connects through the dynamic module");
    assert_eq!(
        call_text(&client, "echo", json!({"text": "native"}))
            .await
            .unwrap(),
        "native"
    );
    for (header, seen) in [
        ("authorization", "none".to_owned()),
        ("x-mcpguard-route", "none".to_owned()),
        ("host", format!("127.0.0.1:{}", stack.demo.port)),
    ] {
        assert_eq!(
            call_text(&client, "header", json!({"name": header}))
                .await
                .unwrap(),
            seen,
            "{header}"
        );
    }
    assert!(
        stack
            .envoy
            .stat("dynamicmodulescustom.mcpguard.allowed")
            .await
            >= 4
    );
    // The check names the MCP method, read from Envoy's MCP filter.
    admin
        .allowed_decision(|e| {
            e["mcp_method"] == "tools/call" && e["connection_id"] == p.connection_id
        })
        .await;

    // No token: the challenge, and the metadata it points at, answered by the module.
    challenge_and_metadata(&url).await;

    // A forged route header does not stand in for a token.
    let forged = post_initialize(&url, &[("x-mcpguard-route", "http")]).await;
    assert_eq!(
        (forged.status, forged.code().as_str()),
        (401, "token_missing")
    );

    // Revoked: refused on the very next request.
    admin.revoke(p.token_id).await;
    expect_refusal(&url, Some(&p.token), (401, "token_revoked")).await;

    // A disabled layer is a 403 naming it.
    let fresh = admin.token(p.host_id, p.gateway_id).await;
    let fresh = fresh["token"].as_str().unwrap();
    assert_eq!(initialize_with(&url, Some(fresh)).await.status, 200);
    admin.set_enabled("gateways", p.gateway_id, false).await;
    expect_refusal(&url, Some(fresh), (403, "gateway_disabled")).await;
    assert!(
        stack
            .envoy
            .stat("dynamicmodulescustom.mcpguard.denied.gateway_disabled")
            .await
            >= 1
    );

    // The policy service gone: refused with 503 and the contract's body, never passed.
    stack.policy.proc.kill();
    expect_refusal(&url, Some(fresh), (503, "policy_unavailable")).await;
}
