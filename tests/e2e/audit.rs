//! The audit log: every decision (through real Envoy, naming the MCP method and tool)
//! and every admin action, readable with filters and cursor pagination.

use std::time::{Duration, Instant};

use mcpguard_e2e::mcp::{self, call_text};
use mcpguard_e2e::{Admin, Policy, Stack};
use serde_json::{Value, json};

/// Polls the audit log until `pred` holds for some entry matching `query` (decisions are
/// written by a batching writer, a moment after the request).
async fn wait_for_entry(admin: &Admin, query: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, page) = admin.get(&format!("/api/v1/audit?{query}")).await;
        assert_eq!(status, 200, "{page}");
        if let Some(e) = page["entries"].as_array().unwrap().iter().find(|e| pred(e)) {
            return e.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no audit entry for {query} matched; last page: {page}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn decisions_through_envoy_are_audited_with_method_tool_and_refusing_layer() {
    let stack = Stack::start().await;
    let admin = stack.admin();
    let p = admin
        .provision("eng", "demo", &stack.demo.upstream_url())
        .await;
    let url = stack.envoy.mcp_url("eng", "demo");
    let client = mcp::connect(&url, Some(&p.token)).await.unwrap();
    call_text(&client, "echo", json!({"text": "audited"}))
        .await
        .unwrap();

    let allowed = wait_for_entry(&admin, "kind=decision&decision=allow", |e| {
        e["tool"] == "echo"
    })
    .await;
    assert_eq!(allowed["mcp_method"], "tools/call");
    assert_eq!(allowed["host_id"], p.host_id);
    assert_eq!(allowed["user_id"], 1);
    assert_eq!(allowed["connection_id"], p.connection_id);
    assert_eq!(
        (allowed["gateway"].as_str(), allowed["server"].as_str()),
        (Some("eng"), Some("demo"))
    );
    assert!(
        allowed["latency_us"].as_i64().is_some_and(|l| l > 0),
        "{allowed}"
    );
    assert!(allowed["at"].is_string());
    assert!(
        allowed["request_id"].is_string(),
        "Envoy's x-request-id joins the logs: {allowed}"
    );
    wait_for_entry(&admin, "kind=decision", |e| e["mcp_method"] == "initialize").await;

    // A request with no JSON-RPC body (the GET stream) is checked and logged, just
    // without a method; a POST whose body is not JSON-RPC is refused before any check.
    let stream = reqwest::Client::new()
        .get(&url)
        .bearer_auth(&p.token)
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_ne!(stream.status().as_u16(), 503);
    drop(stream);
    wait_for_entry(&admin, "kind=decision&decision=allow", |e| {
        e["mcp_method"].is_null()
    })
    .await;
    let post = mcp::post(
        &url,
        &[("authorization", &format!("Bearer {}", p.token))],
        "this is not json-rpc".into(),
    )
    .await;
    assert_eq!(
        (post.status, post.code()),
        (400, "request_unreadable".into())
    );

    admin.set_enabled("hosts", p.host_id, false).await;
    let err = call_text(&client, "echo", json!({"text": "refused"}))
        .await
        .unwrap_err();
    assert_eq!(mcp::status_of_service_error(&err), Some(403));
    let denied = wait_for_entry(&admin, "decision=deny", |e| e["code"] == "host_disabled").await;
    assert_eq!(denied["action"], "deny");
    assert_eq!(denied["tool"], "echo");
    assert_eq!(denied["host_id"], p.host_id);

    // Filters narrow the log.
    let (_, by_host) = admin
        .get(&format!(
            "/api/v1/audit?host_id={}&kind=decision",
            p.host_id
        ))
        .await;
    assert!(
        by_host["entries"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["host_id"] == p.host_id)
    );
    let (_, other_gw) = admin.get("/api/v1/audit?gateway=ops").await;
    assert_eq!(other_gw["entries"], json!([]));
}

#[tokio::test]
async fn admin_actions_are_audited_with_actor_target_before_and_after() {
    let dir = tempfile::tempdir().unwrap();
    let policy = Policy::start(&dir.path().join("data"), dir.path()).await;
    let admin = policy.admin();
    let p = admin
        .provision("eng", "demo", "http://127.0.0.1:9/mcp")
        .await;
    admin.set_enabled("gateways", p.gateway_id, false).await;
    admin.revoke(p.token_id).await;

    let (_, page) = admin.get("/api/v1/audit?kind=admin").await;
    let entries = page["entries"].as_array().unwrap();
    let actions: Vec<&str> = entries
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    // Newest first.
    assert_eq!(
        actions,
        [
            "token.revoke",
            "gateway.disable",
            "token.create",
            "host.create",
            "gateway.expose",
            "server.create",
            "gateway.create"
        ]
    );
    assert!(
        entries
            .iter()
            .all(|e| e["actor_user_id"] == 1 && e["at"].is_string())
    );
    let toggle = &entries[1];
    assert_eq!(toggle["target"], format!("gateways/{}", p.gateway_id));
    assert_eq!(
        (
            toggle["before_state"].clone(),
            toggle["after_state"].clone()
        ),
        (json!({"enabled": true}), json!({"enabled": false}))
    );
    let created = &entries[6];
    assert_eq!(created["before_state"], Value::Null);
    assert_eq!(created["after_state"]["slug"], "eng");
    let revoked = &entries[0];
    assert_eq!(revoked["before_state"]["revoked_at"], Value::Null);
    assert!(revoked["after_state"]["revoked_at"].is_string());
    // The token's secret appears nowhere in the audit trail.
    assert!(!page.to_string().contains(&p.token));
}

#[tokio::test]
async fn pagination_returns_every_entry_exactly_once_even_while_entries_arrive() {
    let dir = tempfile::tempdir().unwrap();
    let policy = Policy::start(&dir.path().join("data"), dir.path()).await;
    let admin = policy.admin();
    for i in 0..23 {
        admin.gateway(&format!("g{i}")).await;
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let query = match &cursor {
            Some(c) => format!("/api/v1/audit?kind=admin&limit=5&cursor={c}"),
            None => "/api/v1/audit?kind=admin&limit=5".to_owned(),
        };
        let (status, page) = admin.get(&query).await;
        assert_eq!(status, 200, "{page}");
        seen.extend(
            page["entries"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["id"].as_i64().unwrap()),
        );
        pages += 1;
        if pages == 2 {
            // New entries arrive mid-walk; they are newer than the cursor, so they do
            // not shift what the next pages return.
            admin.gateway("late-1").await;
            admin.gateway("late-2").await;
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
        assert!(pages < 20, "pagination does not end");
    }
    assert_eq!(seen.len(), 23, "{seen:?}");
    let mut unique = seen.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), seen.len(), "an entry came twice: {seen:?}");
    assert!(
        seen.windows(2).all(|w| w[0] > w[1]),
        "newest first: {seen:?}"
    );

    for bad in [
        "limit=0",
        "limit=5000",
        "cursor=abc",
        "decision=maybe",
        "since=yesterday",
        "nope=1",
    ] {
        let (status, v) = admin.get(&format!("/api/v1/audit?{bad}")).await;
        assert_eq!(
            (status, v["error"]["code"].as_str()),
            (400, Some("invalid_query")),
            "{bad}: {v}"
        );
    }
    let (status, s) = admin.get("/api/v1/audit/status").await;
    assert_eq!(status, 200);
    assert_eq!(s["dropped"], 0);
    assert_eq!(s["retention_days"], 90);
}
