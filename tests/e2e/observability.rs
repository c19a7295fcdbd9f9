//! Observability with the real tools: a Prometheus (Debian's) running the shipped scrape
//! config against real Envoy and the policy service, the shipped Grafana dashboard's
//! queries run by that Prometheus, and the audit log's OTLP export decoded with the
//! official OpenTelemetry protocol definitions.

use std::time::{Duration, Instant};

use mcpguard_e2e::mcp::{self, call_text};
use mcpguard_e2e::observe::{EXAMPLE_CONFIG, Prometheus, example_config};
use mcpguard_e2e::{Stack, workspace_root};
use serde_json::{Value, json};

const DASHBOARD: &str = "docs/observability/grafana-dashboard.json";

/// Every PromQL expression of the shipped dashboard, with its panel's title.
fn dashboard_queries() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(workspace_root().join(DASHBOARD)).unwrap();
    let dashboard: Value = serde_json::from_str(&text).unwrap();
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            queries.push((
                panel["title"].as_str().unwrap().to_owned(),
                target["expr"].as_str().unwrap().to_owned(),
            ));
        }
    }
    queries
}

#[test]
fn the_example_scrape_config_passes_promtool() {
    let out = std::process::Command::new("promtool")
        .arg("check")
        .arg("config")
        .arg(workspace_root().join(EXAMPLE_CONFIG))
        .output()
        .expect("promtool (Debian's prometheus package; scripts/bootstrap.sh installs it)");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn prometheus_scrapes_envoy_and_the_policy_service_and_sees_checks_by_code() {
    let stack = Stack::start().await;
    let admin = stack.admin();
    let p = admin
        .provision("eng", "demo", &stack.demo.upstream_url())
        .await;
    let config = example_config(&[
        ("envoy", format!("127.0.0.1:{}", stack.envoy.admin_port)),
        (
            "mcpguard-policy",
            format!("127.0.0.1:{}", stack.policy.check_port),
        ),
    ]);
    let prom = Prometheus::start_config(&config, stack.dir.path()).await;
    prom.wait_for(r#"up{job="envoy"}"#, |v| v == 1.0).await;
    prom.wait_for(r#"up{job="mcpguard-policy"}"#, |v| v == 1.0)
        .await;

    // Allowed: the policy service's checks and the filter's count move together.
    let url = stack.envoy.mcp_url("eng", "demo");
    let client = mcp::connect(&url, Some(&p.token)).await.unwrap();
    for i in 0..5 {
        call_text(&client, "echo", json!({ "text": format!("seen {i}") }))
            .await
            .unwrap();
    }
    let allowed = prom
        .wait_for(
            r#"sum(mcpguard_checks_total{wire="check",decision="allow"})"#,
            |v| v >= 5.0,
        )
        .await;
    prom.wait_for("sum(mcpguard_filter_allowed_total)", |v| v == allowed)
        .await;

    // Refused by the policy service (the host's layer): 3 checks, 3 filter refusals.
    admin.set_enabled("hosts", p.host_id, false).await;
    for _ in 0..3 {
        mcp::expect_refusal(&url, Some(&p.token), (403, "host_disabled")).await;
    }
    prom.wait_for(
        r#"sum(mcpguard_checks_total{decision="deny",code="host_disabled"})"#,
        |v| v == 3.0,
    )
    .await;
    prom.wait_for(
        r#"sum(mcpguard_filter_refusals_total{code="host_disabled"})"#,
        |v| v == 3.0,
    )
    .await;
    // Refused by the filter alone (no credential): counted in Envoy, no check made.
    for _ in 0..2 {
        mcp::expect_refusal(&url, None, (401, "token_missing")).await;
    }
    prom.wait_for(
        r#"sum(mcpguard_filter_refusals_total{code="token_missing"})"#,
        |v| v == 2.0,
    )
    .await;
    assert_eq!(
        prom.value(r#"sum(mcpguard_checks_total{code="token_missing"})"#)
            .await,
        None,
        "the policy service never saw the requests without a token"
    );
    assert_eq!(
        prom.value(r#"sum(mcpguard_checks_total{decision="allow"})"#)
            .await,
        Some(allowed),
        "refused requests are not counted as allowed"
    );

    // Every query of the dashboard parses and, with traffic going (a rate needs two
    // scrapes that differ), has data: allowed from a second host, refused by the
    // policy service (the first host, disabled) and by the filter (no token).
    let other_host = admin.host("other").await;
    let other = admin.token(other_host, p.gateway_id).await;
    let other = other["token"].as_str().unwrap().to_owned();
    let queries = dashboard_queries();
    assert!(queries.len() >= 5, "{queries:?}");
    for (panel, expr) in &queries {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = mcp::initialize_with(&url, Some(&other)).await;
            assert_eq!(ok.status, 200, "{}", ok.body);
            mcp::expect_refusal(&url, Some(&p.token), (403, "host_disabled")).await;
            mcp::expect_refusal(&url, None, (401, "token_missing")).await;
            let samples = prom.query(expr).await;
            if !samples.is_empty() && samples.iter().all(|(_, v)| v.is_finite()) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{panel}: {expr} has no data after traffic: {samples:?}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    // And the incident view shows which layer refused.
    let by_code = |samples: Vec<(Value, f64)>, code: &str| {
        samples
            .iter()
            .find(|(labels, _)| labels["code"] == code)
            .map(|(_, v)| *v)
    };
    let panel = |title: &str| {
        let (_, expr) = queries.iter().find(|(t, _)| t == title).unwrap();
        expr.clone()
    };
    let policy_refusals = panel("Refusals by layer: policy service");
    assert!(
        by_code(prom.query(&policy_refusals).await, "host_disabled").is_some_and(|v| v > 0.0),
        "{policy_refusals}"
    );
    let filter = prom.query(&panel("Refusals by layer: Envoy filter")).await;
    assert!(
        by_code(filter.clone(), "token_missing").is_some_and(|v| v > 0.0),
        "{filter:?}"
    );
    assert_eq!(by_code(filter, "gateway_disabled"), Some(0.0));
}
