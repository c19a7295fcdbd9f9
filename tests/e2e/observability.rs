//! Observability with the real tools: a Prometheus (Debian's) running the shipped scrape
//! config against real Envoy and the policy service, the shipped Grafana dashboard's
//! queries run by that Prometheus, and the audit log's OTLP export decoded with the
//! official OpenTelemetry protocol definitions.

use std::time::{Duration, Instant};

use mcpguard_e2e::mcp::{self, call_text};
use mcpguard_e2e::observe::{EXAMPLE_CONFIG, OtlpReceiver, Prometheus, example_config};
use mcpguard_e2e::procs::ADMIN_TOKEN;
use mcpguard_e2e::tls::{certificate, tls_front};
use mcpguard_e2e::{Admin, Envoy, Policy, Stack, free_port, workspace_root};
use opentelemetry_proto::tonic::common::v1::any_value::Value as Otlp;
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
    // Every call has been answered: the service's own count is final; Prometheus
    // must come to it (not to a scrape taken halfway through the calls).
    let allowed = metric(
        &stack.policy,
        r#"mcpguard_checks_total{wire="check",decision="allow",code=""}"#,
    )
    .await;
    assert!(allowed >= 5.0, "{allowed}");
    prom.wait_for(
        r#"sum(mcpguard_checks_total{wire="check",decision="allow"})"#,
        |v| v == allowed,
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

/// Polls `ready` every 100 ms until it gives `Some`, for `secs` at most; `what` says
/// what was waited for, with the last state `ready` described.
async fn poll<T, F, Fut>(secs: u64, what: &str, mut ready: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        match ready().await {
            Ok(v) => return v,
            Err(state) => assert!(
                Instant::now() < deadline,
                "{what}: not after {secs} s; last: {state}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `GET /api/v1/audit/export` with `query`: the status and, on 200, the lines parsed.
async fn export_lines(base: &str, token: &str, query: &str) -> (u16, String, Vec<Value>) {
    let resp = reqwest::Client::new()
        .get(format!("{base}/api/v1/audit/export{query}"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let content_type = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let text = resp.text().await.unwrap();
    if status != 200 {
        return (status, text, Vec::new());
    }
    assert_eq!(content_type, "application/jsonl");
    assert!(text.is_empty() || text.ends_with('\n'), "{text}");
    let lines = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    (status, content_type, lines)
}

/// Every audit entry's id, oldest first, as the JSON Lines export gives them.
async fn all_ids(policy: &Policy) -> Vec<i64> {
    let (status, text, lines) = export_lines(&policy.public_url(), ADMIN_TOKEN, "").await;
    assert_eq!(status, 200, "{text}");
    lines.iter().map(|e| e["id"].as_i64().unwrap()).collect()
}

/// The export's part of `GET /api/v1/audit/status`.
async fn export_status(admin: &Admin) -> Value {
    let (status, s) = admin.get("/api/v1/audit/status").await;
    assert_eq!(status, 200, "{s}");
    s["export"].clone()
}

/// One sample of the policy service's `/metrics`: `name` with its labels as printed.
async fn metric(policy: &Policy, name: &str) -> f64 {
    let url = format!("http://127.0.0.1:{}/metrics", policy.check_port);
    let text = reqwest::get(&url).await.unwrap().text().await.unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
}

/// Waits until the receiver holds every entry the export endpoint lists, then checks
/// the delivery: each id at least once and, repeats dropped, in id order, none missing.
async fn wait_for_every_entry(policy: &Policy, receiver: &OtlpReceiver) -> Vec<i64> {
    let admin = policy.admin();
    poll(60, "the export catching up", || async {
        let s = export_status(&admin).await;
        if s["lag_entries"] == 0 && s["cursor"].as_i64() == all_ids(policy).await.last().copied() {
            Ok(())
        } else {
            Err(s.to_string())
        }
    })
    .await;
    let all = all_ids(policy).await;
    assert_eq!(
        receiver.received.unique_ids(),
        all,
        "every entry once in id order after de-duplication; arrived: {:?}",
        receiver.received.ids()
    );
    all
}

/// Export settings for a test: quick ticks and retries, small batches so a burst is
/// many requests.
fn export_env(receiver: &OtlpReceiver, encoding: &'static str) -> Vec<(&'static str, String)> {
    vec![
        ("MCPGUARD_AUDIT_OTLP_ENDPOINT", receiver.endpoint()),
        ("MCPGUARD_AUDIT_OTLP_ENCODING", encoding.to_owned()),
        ("MCPGUARD_AUDIT_OTLP_BATCH", "25".to_owned()),
        ("MCPGUARD_AUDIT_OTLP_INTERVAL_MS", "100".to_owned()),
        ("MCPGUARD_AUDIT_OTLP_MAX_BACKOFF_MS", "400".to_owned()),
    ]
}

/// Sends `n` MCP `initialize` requests through Envoy with `token`, one after another:
/// each is a check, so an audited decision.
async fn burst(url: String, token: String, n: usize) {
    for _ in 0..n {
        let answer = mcp::initialize_with(&url, Some(&token)).await;
        assert_eq!(answer.status, 200, "{}", answer.body);
    }
}

#[tokio::test]
async fn the_otlp_export_delivers_every_entry_across_a_collector_outage_and_a_restart() {
    let mut receiver = OtlpReceiver::new().await;
    let env = export_env(&receiver, "protobuf");
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut stack = Stack::start_with(false, &env, None).await;
    let admin = stack.admin();
    let p = admin
        .provision("eng", "demo", &stack.demo.upstream_url())
        .await;
    let url = stack.envoy.mcp_url("eng", "demo");

    // The collector goes away in the middle of a burst of decisions.
    let sending = tokio::spawn(burst(url.clone(), p.token.clone(), 300));
    let before_stop = poll(30, "the first records arriving", || async {
        let n = receiver.received.len();
        if n >= 30 {
            Ok(n)
        } else {
            Err(format!("{n} records"))
        }
    })
    .await;
    receiver.stop().await;
    assert!(
        !sending.is_finished(),
        "the collector stopped after the burst, not in it ({before_stop} records)"
    );
    sending.await.unwrap();
    // The outage shows: in the status and in the metrics, as entries not acknowledged.
    let during = poll(30, "the outage showing in the status", || async {
        let s = export_status(&admin).await;
        let behind = s["lag_entries"].as_u64().unwrap_or(0) > 0;
        if behind && s["failures"].as_u64() > Some(0) && s["last_error"].is_string() {
            Ok(s)
        } else {
            Err(s.to_string())
        }
    })
    .await;
    assert_eq!(during["enabled"], true);
    assert_eq!(during["leader"], true);
    assert_eq!(during["encoding"], "protobuf");
    assert!(metric(&stack.policy, "mcpguard_audit_export_lag_entries").await > 0.0);
    assert!(metric(&stack.policy, "mcpguard_audit_export_failures_total").await > 0.0);
    assert!(metric(&stack.policy, "mcpguard_audit_export_lag_seconds").await >= 0.0);

    // The collector is back: every entry arrives, none missing, in order.
    receiver.start().await;
    let first_round = wait_for_every_entry(&stack.policy, &receiver).await;
    assert!(first_round.len() >= 300, "{}", first_round.len());
    assert_eq!(
        metric(&stack.policy, "mcpguard_audit_export_lag_entries").await,
        0.0
    );
    assert!(
        receiver.received.requests().len() >= 300 / 25,
        "batched by --audit-otlp-batch"
    );
    assert!(
        receiver
            .received
            .requests()
            .iter()
            .all(|r| r.records <= 25 && r.content_type == "application/x-protobuf")
    );

    // The records say what the entries say.
    let records = receiver.received.records();
    let decision = records
        .iter()
        .find(|r| r.event_name == "mcpguard.audit.decision")
        .unwrap();
    let attr = |r: &opentelemetry_proto::tonic::logs::v1::LogRecord, key: &str| {
        r.attributes
            .iter()
            .find(|a| a.key == key)
            .and_then(|a| a.value.clone()?.value)
    };
    let id = mcpguard_e2e::observe::audit_id(decision);
    assert_eq!(
        attr(decision, "log.record.uid"),
        Some(Otlp::StringValue(id.to_string()))
    );
    assert_eq!(
        attr(decision, "mcp.method.name"),
        Some(Otlp::StringValue("initialize".into()))
    );
    assert_eq!(
        attr(decision, "mcpguard.gateway"),
        Some(Otlp::StringValue("eng".into()))
    );
    assert_eq!(decision.severity_text, "INFO");
    assert!(decision.time_unix_nano > 0);
    assert!(
        records
            .iter()
            .any(|r| r.event_name == "mcpguard.audit.admin"
                && attr(r, "mcpguard.audit.action")
                    == Some(Otlp::StringValue("gateway.create".into()))),
        "admin actions are exported too"
    );

    // The policy service restarts while entries wait: the export resumes from the
    // cursor kept in the database, neither from the start nor past the waiting ones.
    receiver.stop().await;
    burst(url.clone(), p.token.clone(), 50).await;
    // Waits for all 50 to be written (the kill below would lose the writer's queue).
    let stuck = poll(30, "the export failing on the 50 new entries", || async {
        let s = export_status(&admin).await;
        let failing = s["last_error"].is_string() && s["lag_entries"].as_u64() == Some(50);
        if failing { Ok(s) } else { Err(s.to_string()) }
    })
    .await;
    let cursor = stuck["cursor"].as_i64().unwrap();
    assert_eq!(cursor, *first_round.last().unwrap());
    stack.policy.restart(stack.dir.path()).await;
    let after_restart = receiver.received.len();
    receiver.start().await;
    let all = wait_for_every_entry(&stack.policy, &receiver).await;
    assert_eq!(all.len(), first_round.len() + 50);
    let resent = &receiver.received.ids()[after_restart..];
    assert_eq!(
        resent.first(),
        Some(&(cursor + 1)),
        "resumed right after the durable cursor {cursor}: {resent:?}"
    );
    assert!(resent.iter().all(|&id| id > cursor), "{resent:?}");
    eprintln!(
        "otlp export: {} entries, {} records in {} requests ({} repeats)",
        all.len(),
        receiver.received.len(),
        receiver.received.requests().len(),
        receiver.received.len() - all.len()
    );
    let restarted = export_status(&stack.policy.admin()).await;
    assert_eq!(restarted["cursor"], *all.last().unwrap());
    assert_eq!(restarted["failures"], 0, "a new process, counted from 0");
}

#[tokio::test]
async fn the_otlp_export_speaks_otlp_json_when_asked() {
    let receiver = OtlpReceiver::new().await;
    let env = export_env(&receiver, "json");
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let dir = tempfile::tempdir().unwrap();
    let policy = Policy::start_with(&dir.path().join("data"), dir.path(), &env).await;
    // Admin actions are audit entries too: enough of them for several requests.
    let admin = policy.admin();
    for i in 0..30 {
        admin.gateway(&format!("gw{i}")).await;
    }
    let all = wait_for_every_entry(&policy, &receiver).await;
    assert!(all.len() >= 30, "{all:?}");
    assert_eq!(export_status(&admin).await["encoding"], "json");

    // The bodies follow OTLP/JSON's rules: lowerCamelCase names, 64-bit integers as
    // decimal strings, enums as numbers.
    let requests = receiver.received.requests();
    assert!(requests.len() >= 2, "batched: {}", requests.len());
    let mut seen = Vec::new();
    for r in &requests {
        assert_eq!(r.content_type, "application/json");
        let body = r.json.as_ref().unwrap();
        let resource = &body["resourceLogs"][0]["resource"]["attributes"];
        assert!(
            resource
                .as_array()
                .unwrap()
                .iter()
                .any(|a| a["key"] == "service.name"
                    && a["value"]["stringValue"] == "mcpguard-policy"),
            "{body}"
        );
        let scope = &body["resourceLogs"][0]["scopeLogs"][0];
        assert_eq!(scope["scope"]["name"], "mcpguard.audit", "{body}");
        for rec in scope["logRecords"].as_array().unwrap() {
            let nanos = rec["timeUnixNano"].as_str().unwrap();
            assert!(nanos.parse::<u64>().unwrap() > 0, "{rec}");
            assert_eq!(rec["severityNumber"], 9, "INFO: {rec}");
            assert_eq!(rec["eventName"], "mcpguard.audit.admin");
            let id = rec["attributes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|a| a["key"] == "mcpguard.audit.id")
                .unwrap();
            let id: i64 = id["value"]["intValue"].as_str().unwrap().parse().unwrap();
            seen.push(id);
        }
    }
    // The JSON and what the definitions decoded from it agree.
    assert_eq!(seen, receiver.received.ids());
}

/// A collector behind https: the export verifies its certificate against
/// `--trusted-ca-file` (and the system's roots) and delivers every entry.
#[tokio::test]
async fn the_otlp_export_delivers_to_an_https_collector_it_verifies() {
    let receiver = OtlpReceiver::new().await;
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = certificate(dir.path());
    let (front_port, front_admin) = (free_port(), free_port());
    let _front = Envoy::start_config(
        &tls_front(front_port, front_admin, receiver.port, &cert, &key),
        front_port,
        front_admin,
        dir.path(),
    )
    .await;
    let mut env = export_env(&receiver, "protobuf");
    env[0].1 = format!("https://localhost:{front_port}/v1/logs");
    env.push(("MCPGUARD_TRUSTED_CA_FILE", ca.display().to_string()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let policy = Policy::start_with(&dir.path().join("data"), dir.path(), &env).await;
    let admin = policy.admin();
    for i in 0..30 {
        admin.gateway(&format!("gw{i}")).await;
    }
    let all = wait_for_every_entry(&policy, &receiver).await;
    assert!(all.len() >= 30, "{all:?}");
}

/// The `at` of the newest audit entry, and its id.
async fn newest(admin: &Admin) -> (String, i64) {
    let (_, page) = admin.get("/api/v1/audit?limit=1").await;
    let e = &page["entries"][0];
    (
        e["at"].as_str().unwrap().to_owned(),
        e["id"].as_i64().unwrap(),
    )
}

/// Returns once this machine's clock (the service's too) is past `at` (RFC 3339, ms),
/// so the next entry has a later time.
async fn clock_past(at: &str) {
    let at =
        time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339).unwrap();
    let ms = |t: time::OffsetDateTime| t.unix_timestamp_nanos() / 1_000_000;
    while ms(time::OffsetDateTime::now_utc()) <= ms(at) {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test]
async fn the_json_lines_export_gives_a_time_range_oldest_first_to_audit_readers_only() {
    let dir = tempfile::tempdir().unwrap();
    let policy = Policy::start(&dir.path().join("data"), dir.path()).await;
    let owner = policy.admin();
    // Three rounds of admin actions, each at a later millisecond than the one before.
    owner.gateway("before").await;
    let (before_at, before_id) = newest(&owner).await;
    clock_past(&before_at).await;
    let gw = owner.gateway("inside").await;
    owner.server("inside", "http://127.0.0.1:9/mcp").await;
    owner.set_enabled("gateways", gw, false).await;
    let (inside_at, inside_id) = newest(&owner).await;
    clock_past(&inside_at).await;
    owner.gateway("after").await;
    let (_, after_id) = newest(&owner).await;

    // The range from the first entry inside to the first one after (exclusive).
    let (_, page) = owner.get("/api/v1/audit?limit=100").await;
    let mut listed: Vec<Value> = page["entries"].as_array().unwrap().clone();
    listed.reverse();
    let at_of = |id: i64| {
        listed.iter().find(|e| e["id"] == id).unwrap()["at"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let (since, until) = (at_of(before_id + 1), at_of(inside_id + 1));
    let enc = |t: &str| t.replace('+', "%2B");
    let query = format!("?since={}&until={}", enc(&since), enc(&until));
    let inside: Vec<Value> = listed
        .iter()
        .filter(|e| (before_id + 1..=inside_id).contains(&e["id"].as_i64().unwrap()))
        .cloned()
        .collect();
    assert!(inside.len() >= 3, "{inside:?}");

    // A role holding only audit.read exports it: the same entries the list shows,
    // oldest first.
    let (_, role) = owner
        .post(
            "/api/v1/roles",
            json!({"name": "auditor", "capabilities": ["audit.read"]}),
        )
        .await;
    let (_, reader_role) = owner
        .post(
            "/api/v1/roles",
            json!({"name": "viewer", "capabilities": ["gateways.read", "users.read"]}),
        )
        .await;
    let token_for = |name: &'static str, role: Value| {
        let owner = owner.clone();
        async move {
            let (status, user) = owner
                .post(
                    "/api/v1/users",
                    json!({"name": name, "role_id": role["id"]}),
                )
                .await;
            assert_eq!(status, 201, "{user}");
            let id = user["id"].as_i64().unwrap();
            let (status, t) = owner
                .post(&format!("/api/v1/users/{id}/admin-tokens"), json!({}))
                .await;
            assert_eq!(status, 201, "{t}");
            t["token"].as_str().unwrap().to_owned()
        }
    };
    let auditor = token_for("auditor", role).await;
    let viewer = token_for("viewer", reader_role).await;
    let base = policy.public_url();
    let (status, _, lines) = export_lines(&base, &auditor, &query).await;
    assert_eq!(status, 200);
    assert_eq!(lines, inside, "{query}");
    // Open ends: since alone runs to the newest entry, until alone from the oldest.
    let (_, _, from) = export_lines(&base, &auditor, &format!("?since={}", enc(&since))).await;
    assert_eq!(from.first(), inside.first());
    assert!(from.iter().any(|e| e["id"] == after_id));
    let (_, _, to) = export_lines(&base, &auditor, &format!("?until={}", enc(&until))).await;
    assert_eq!(to.last(), inside.last());
    assert_eq!(to.first().unwrap()["id"], 1);
    let (_, _, none) = export_lines(&base, &auditor, "?since=2999-01-01T00:00:00Z").await;
    assert_eq!(none, Vec::<Value>::new());

    // Without audit.read: 403 naming the capability; without a token: 401.
    let (status, body, _) = export_lines(&base, &viewer, &query).await;
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (status, &body["error"]["code"], &body["error"]["capability"]),
        (403, &json!("missing_capability"), &json!("audit.read")),
        "{body}"
    );
    let resp = reqwest::get(format!("{base}/api/v1/audit/export"))
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    // Bad input: a clear 400.
    for bad in [
        "?since=yesterday",
        "?until=2024-13-01T00:00:00Z",
        "?limit=5",
    ] {
        let (status, body, _) = export_lines(&base, &auditor, bad).await;
        let body: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (400, Some("invalid_query")),
            "{bad}: {body}"
        );
    }
}
