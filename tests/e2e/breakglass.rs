//! Break-glass: every layer's `enabled` flag, honoured on the very next request, scoped
//! to exactly what it names, and proven under concurrent load.

use std::time::Duration;

use mcpguard_e2e::Stack;
use mcpguard_e2e::mcp::{expect_refusal, initialize_with};
use mcpguard_e2e::toggles::{Plan, Report, Target, five_layers, prove};

use crate::check_stream::stream_envoy;

async fn assert_refused(url: &str, token: &str, code: &str) {
    expect_refusal(url, Some(token), (403, code)).await;
}

async fn assert_allowed(url: &str, token: &str) {
    let a = initialize_with(url, Some(token)).await;
    assert_eq!(a.status, 200, "{url}: {}", a.body);
}

#[tokio::test]
async fn disabling_a_host_stops_all_its_tokens_on_every_gateway_and_only_them() {
    let stack = Stack::start().await;
    let admin = stack.admin();
    let p = admin
        .provision("eng", "demo", &stack.demo.upstream_url())
        .await;
    let ops = admin.gateway("ops").await;
    admin.expose(ops, p.server_id).await;
    let on_ops = admin.token(p.host_id, ops).await["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let other_host = admin.host("Other bot").await;
    let other = admin.token(other_host, p.gateway_id).await["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let (eng_url, ops_url) = (
        stack.envoy.mcp_url("eng", "demo"),
        stack.envoy.mcp_url("ops", "demo"),
    );

    admin.set_enabled("hosts", p.host_id, false).await;
    assert_refused(&eng_url, &p.token, "host_disabled").await;
    assert_refused(&ops_url, &on_ops, "host_disabled").await;
    assert_allowed(&eng_url, &other).await;
    // Disabling deletes nothing: the host and its tokens are still listed.
    let (_, hosts) = admin.get("/api/v1/hosts").await;
    let host = hosts
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["id"] == p.host_id)
        .unwrap()
        .clone();
    assert_eq!(host["enabled"], false);
    let (_, tokens) = admin
        .get(&format!("/api/v1/hosts/{}/tokens", p.host_id))
        .await;
    assert_eq!(tokens.as_array().unwrap().len(), 2);

    admin.set_enabled("hosts", p.host_id, true).await;
    assert_allowed(&eng_url, &p.token).await;
    assert_allowed(&ops_url, &on_ops).await;
    assert!(
        stack
            .envoy
            .stat("wasmcustom.mcpguard.denied.host_disabled")
            .await
            >= 2
    );
}

#[tokio::test]
async fn disabling_a_connection_cuts_only_that_host_gateway_user_link() {
    let stack = Stack::start().await;
    let admin = stack.admin();
    let p = admin
        .provision("eng", "demo", &stack.demo.upstream_url())
        .await;
    let ops = admin.gateway("ops").await;
    admin.expose(ops, p.server_id).await;
    let on_ops = admin.token(p.host_id, ops).await["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let (eng_url, ops_url) = (
        stack.envoy.mcp_url("eng", "demo"),
        stack.envoy.mcp_url("ops", "demo"),
    );

    admin
        .set_enabled("connections", p.connection_id, false)
        .await;
    assert_refused(&eng_url, &p.token, "connection_disabled").await;
    assert_allowed(&ops_url, &on_ops).await;
    let (_, conns) = admin
        .get(&format!("/api/v1/gateways/{}/connections", p.gateway_id))
        .await;
    assert_eq!(conns[0]["enabled"], false);

    admin
        .set_enabled("connections", p.connection_id, true)
        .await;
    assert_allowed(&eng_url, &p.token).await;
}

#[tokio::test]
async fn disabling_a_server_stops_it_on_every_gateway_and_nothing_else() {
    let stack = Stack::start().await;
    let admin = stack.admin();
    let p = admin
        .provision("eng", "demo", &stack.demo.upstream_url())
        .await;
    let ops = admin.gateway("ops").await;
    admin.expose(ops, p.server_id).await;
    let on_ops = admin.token(p.host_id, ops).await["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let second = admin.server("second", &stack.demo.upstream_url()).await;
    admin.expose(p.gateway_id, second).await;

    admin.set_enabled("servers", p.server_id, false).await;
    assert_refused(
        &stack.envoy.mcp_url("eng", "demo"),
        &p.token,
        "server_disabled",
    )
    .await;
    assert_refused(
        &stack.envoy.mcp_url("ops", "demo"),
        &on_ops,
        "server_disabled",
    )
    .await;
    assert_allowed(&stack.envoy.mcp_url("eng", "second"), &p.token).await;

    admin.set_enabled("servers", p.server_id, true).await;
    assert_allowed(&stack.envoy.mcp_url("eng", "demo"), &p.token).await;
}

#[tokio::test]
async fn disabling_a_gateway_stops_all_traffic_through_it_and_only_it() {
    let stack = Stack::start().await;
    let admin = stack.admin();
    let p = admin
        .provision("eng", "demo", &stack.demo.upstream_url())
        .await;
    let other_host = admin.host("Other bot").await;
    let other = admin.token(other_host, p.gateway_id).await["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let ops = admin.gateway("ops").await;
    admin.expose(ops, p.server_id).await;
    let on_ops = admin.token(p.host_id, ops).await["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let eng_url = stack.envoy.mcp_url("eng", "demo");

    admin.set_enabled("gateways", p.gateway_id, false).await;
    assert_refused(&eng_url, &p.token, "gateway_disabled").await;
    assert_refused(&eng_url, &other, "gateway_disabled").await;
    assert_allowed(&stack.envoy.mcp_url("ops", "demo"), &on_ops).await;

    admin.set_enabled("gateways", p.gateway_id, true).await;
    assert_allowed(&eng_url, &p.token).await;
    assert_allowed(&eng_url, &other).await;
}

#[tokio::test]
async fn toggles_hold_on_the_very_next_request_under_concurrent_load() {
    let stack = Stack::start_stateless().await;
    let target = five_layers(&stack).await;
    prove_clean(&stack, &target, "checks over HTTP callouts").await;
}

/// The same proof with the checks on the experimental check stream (issue 27): one
/// long-lived stream per worker instead of one HTTP callout per check, so nothing the
/// stream does (reusing a connection, answering out of order) may let a stale allow
/// through.
#[tokio::test]
async fn toggles_hold_on_the_very_next_request_under_concurrent_load_over_the_check_stream() {
    let stack = Stack::start_stateless().await;
    let mut target = five_layers(&stack).await;
    let envoy = stream_envoy(stack.policy.check_port, None, stack.dir.path()).await;
    target.url = envoy.mcp_url("eng", "demo");
    let report = prove_clean(&stack, &target, "checks over the stream").await;
    // The checks went over the stream: a callout per check would have made at least
    // one request to the policy cluster per request proven.
    let to_policy = envoy
        .stat("cluster.mcpguard_policy.upstream_rq_total")
        .await;
    println!("{to_policy} requests to the policy cluster");
    assert!(
        to_policy * 10 < report.requests as u64,
        "{to_policy} requests to the policy cluster for {} checks",
        report.requests
    );
}

/// Runs the proof against `target` and asserts it clean: every toggle made, zero stale
/// allows, wrong codes or failures, and both answers seen.
async fn prove_clean(stack: &Stack, target: &Target, what: &str) -> Report {
    let plan = Plan {
        clients: 4,
        cycles: 3,
        requests_per_phase: 8,
        time_limit: Duration::from_secs(60),
    };
    let report = prove(target, &stack.admin(), &plan).await;
    println!("{what}:\n{report}");
    assert_eq!(
        report.toggles,
        2 * target.layers.len() * plan.cycles,
        "the run ended early:\n{report}"
    );
    assert!(report.is_clean(), "{report}");
    assert!(report.allowed > 0 && report.refused > 0, "{report}");
    report
}
