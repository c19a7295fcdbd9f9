//! When the policy service cannot answer, the filter fails closed with 503.

use std::time::{Duration, Instant};

use mcpguard_e2e::mcp::{self, call_text, initialize_with};
use mcpguard_e2e::{Envoy, EnvoyOptions, Stack};
use serde_json::json;

#[tokio::test]
async fn policy_service_stopped_means_503_never_a_pass() {
    let mut stack = Stack::start().await;
    let p = stack
        .admin()
        .provision("eng", "demo", &stack.demo.upstream_url())
        .await;
    let url = stack.envoy.mcp_url("eng", "demo");
    let session = mcp::connect(&url, Some(&p.token)).await.unwrap();

    stack.policy.proc.kill();
    let a = initialize_with(&url, Some(&p.token)).await;
    assert_eq!((a.status, a.code().as_str()), (503, "policy_unavailable"));
    let err = call_text(&session, "echo", json!({"text": "x"}))
        .await
        .expect_err("refused");
    assert_eq!(mcp::status_of_service_error(&err), Some(503), "{err}");
    assert!(
        stack
            .envoy
            .stat("wasmcustom.mcpguard.denied.policy_unavailable")
            .await
            >= 2
    );
}

/// A check port that accepts connections and never answers: its port, and the task
/// that holds the connections open until it is aborted.
pub(crate) async fn silent_check_port() -> (u16, tokio::task::JoinHandle<()>) {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = silent.local_addr().unwrap().port();
    let hold = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            open.push(socket);
        }
    });
    (port, hold)
}

/// Through `envoy`, whose checks go to a [`silent_check_port`] with a 200 ms
/// `check_timeout_ms`: a request is refused 503 `policy_unavailable` at the deadline,
/// not before it and not long after.
pub(crate) async fn assert_refused_at_the_deadline(envoy: &Envoy) {
    let token = mcpguard_core::token::format_token(
        mcpguard_core::token::TokenKind::HostApi,
        &"a".repeat(40),
    )
    .unwrap();
    let started = Instant::now();
    let a = initialize_with(&envoy.mcp_url("eng", "demo"), Some(&token)).await;
    let took = started.elapsed();
    assert_eq!((a.status, a.code().as_str()), (503, "policy_unavailable"));
    assert!(
        took >= Duration::from_millis(190),
        "answered before the deadline: {took:?}"
    );
    // The deadline plus slack for a shared machine (and a stream's sweep tick).
    assert!(
        took < Duration::from_secs(2),
        "the deadline was not enforced: {took:?}"
    );
}

#[tokio::test]
async fn a_policy_service_too_slow_to_answer_means_503_within_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let (silent_port, hold) = silent_check_port().await;
    let opts = EnvoyOptions {
        config: "envoy/mcpguard.yaml",
        check_port: silent_port,
        check_timeout_ms: Some(200),
        trusted_ca: None,
        issuer: None,
        jwks_refresh_s: None,
    };
    let envoy = Envoy::start(&opts, dir.path()).await;
    assert_refused_at_the_deadline(&envoy).await;
    hold.abort();
}

#[tokio::test]
async fn a_policy_service_that_comes_back_is_used_again() {
    let mut stack = Stack::start().await;
    let p = stack
        .admin()
        .provision("eng", "demo", &stack.demo.upstream_url())
        .await;
    let url = stack.envoy.mcp_url("eng", "demo");
    stack.policy.proc.kill();
    assert_eq!(initialize_with(&url, Some(&p.token)).await.status, 503);

    // Back on the same data and the same check port Envoy points at.
    stack.policy.restart(stack.dir.path()).await;
    assert_eq!(initialize_with(&url, Some(&p.token)).await.status, 200);
}

/// A policy cluster with no healthy host: Envoy answers the callout itself, at once
/// (inside the call that starts it), with a 503 of its own. Both builds of the filter
/// refuse once, with the contract's body, and Envoy keeps serving.
#[tokio::test]
async fn a_policy_cluster_with_no_healthy_host_means_503_in_either_build_of_the_filter() {
    let dir = tempfile::tempdir().unwrap();
    let token = mcpguard_core::token::format_token(
        mcpguard_core::token::TokenKind::HostApi,
        &"a".repeat(40),
    )
    .unwrap();
    for config in ["envoy/mcpguard.yaml", "bench/envoy/dynamic-module.yaml"] {
        let opts = EnvoyOptions {
            config,
            check_port: mcpguard_e2e::free_port(),
            check_timeout_ms: None,
            trusted_ca: None,
            issuer: None,
            jwks_refresh_s: None,
        };
        let (port, admin_port) = (mcpguard_e2e::free_port(), mcpguard_e2e::free_port());
        let mut rendered: serde_json::Value =
            serde_json::from_str(&Envoy::render(&opts, port, admin_port)).unwrap();
        for cluster in rendered["static_resources"]["clusters"]
            .as_array_mut()
            .unwrap()
        {
            if cluster["name"] == "mcpguard_policy" {
                cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["health_status"] =
                    "UNHEALTHY".into();
            }
        }
        let envoy = Envoy::start_config(&rendered.to_string(), port, admin_port, dir.path()).await;
        for _ in 0..3 {
            let a = initialize_with(&envoy.mcp_url("eng", "demo"), Some(&token)).await;
            assert_eq!(
                (a.status, a.code().as_str()),
                (503, "policy_unavailable"),
                "{config}: {}",
                a.body
            );
        }
        assert!(
            reqwest::get(format!("http://127.0.0.1:{admin_port}/ready"))
                .await
                .unwrap()
                .status()
                .is_success(),
            "{config}: Envoy still up"
        );
    }
}
