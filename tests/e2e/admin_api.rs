//! The admin API of the real policy service binary: authentication, validation, tokens
//! shown once and stored only as hashes, connections, and the check endpoint's contract.

use mcpguard_core::check::{CHECK_PATH, CheckRequest, Credential};
use mcpguard_core::token::{TokenHash, TokenKind, parse_token};
use mcpguard_e2e::{Admin, Policy};
use reqwest::Method;
use serde_json::{Value, json};

async fn policy() -> (Policy, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let policy = Policy::start(&dir.path().join("data"), dir.path()).await;
    (policy, dir)
}

fn assert_error(status: u16, body: &Value, expected_status: u16, code: &str) {
    assert_eq!(status, expected_status, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

#[tokio::test]
async fn every_admin_call_needs_a_valid_admin_token() {
    let (policy, _dir) = policy().await;
    for admin in [
        policy.admin().with_token("mcpga_wrong"),
        policy.admin().with_token(""),
    ] {
        let (status, body) = admin.get("/api/v1/gateways").await;
        assert_error(status, &body, 401, "unauthenticated");
        let (status, body) = admin
            .post("/api/v1/gateways", json!({"name": "x", "slug": "x"}))
            .await;
        assert_error(status, &body, 401, "unauthenticated");
    }
    let (status, body) = policy.admin().get("/api/v1/gateways").await;
    assert_eq!(
        (status, body),
        (200, json!([])),
        "nothing was created by refused calls"
    );
}

#[tokio::test]
async fn a_generated_bootstrap_token_is_written_once_with_mode_0600_and_works() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut policy = Policy::start_generating_admin_token(&data, dir.path()).await;
    let file = data.join("bootstrap-admin-token");
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let token = std::fs::read_to_string(&file).unwrap().trim().to_owned();
    assert_eq!(parse_token(&token), Ok(TokenKind::Admin));
    assert!(
        policy.proc.log_text().contains(&token),
        "printed once at bootstrap"
    );
    let admin = Admin::new(format!("http://127.0.0.1:{}", policy.public_port), &token);
    assert_eq!(admin.get("/api/v1/hosts").await.0, 200);

    // A restart does not bootstrap again or print the token again.
    policy.restart(dir.path()).await;
    assert!(!policy.proc.log_text().contains(&token));
    let admin = Admin::new(format!("http://127.0.0.1:{}", policy.public_port), &token);
    assert_eq!(admin.get("/api/v1/hosts").await.0, 200);
}

#[tokio::test]
async fn bad_input_gets_a_clear_4xx_and_changes_nothing() {
    let (policy, _dir) = policy().await;
    let admin = policy.admin();
    let gw = admin.gateway("eng").await;

    let cases: Vec<(Method, &str, Option<Value>, u16, &str)> = vec![
        (
            Method::POST,
            "/api/v1/gateways",
            Some(json!({"name": "X", "slug": "Not A Slug"})),
            422,
            "invalid_slug",
        ),
        (
            Method::POST,
            "/api/v1/gateways",
            Some(json!({"name": "", "slug": "ok"})),
            422,
            "invalid_name",
        ),
        (
            Method::POST,
            "/api/v1/gateways",
            Some(json!({"name": "Dup", "slug": "eng"})),
            409,
            "slug_taken",
        ),
        (
            Method::POST,
            "/api/v1/gateways",
            Some(json!({"name": "X", "slug": "x", "extra": 1})),
            422,
            "invalid_body",
        ),
        (
            Method::POST,
            "/api/v1/gateways",
            Some(json!({"slug": "x"})),
            422,
            "invalid_body",
        ),
        (
            Method::POST,
            "/api/v1/servers",
            Some(json!({"name": "S", "slug": "s", "upstream_url": "ftp://x"})),
            422,
            "invalid_upstream_url",
        ),
        (
            Method::POST,
            "/api/v1/servers",
            Some(json!({"name": "S", "slug": "s", "upstream_url": "http://u:p@x/"})),
            422,
            "invalid_upstream_url",
        ),
        (
            Method::PUT,
            "/api/v1/gateways/999/servers/1",
            Some(json!({"identity": "shared"})),
            404,
            "gateway_not_found",
        ),
        (
            Method::PUT,
            "/api/v1/gateways/1/servers/1",
            Some(json!({"identity": "nobody"})),
            422,
            "invalid_body",
        ),
        (
            Method::POST,
            "/api/v1/hosts/999/tokens",
            Some(json!({"gateway_id": gw})),
            404,
            "host_not_found",
        ),
        (
            Method::DELETE,
            "/api/v1/tokens/999",
            None,
            404,
            "token_not_found",
        ),
        (
            Method::GET,
            "/api/v1/gateways/abc/connections",
            None,
            400,
            "invalid_path",
        ),
        (
            Method::POST,
            "/api/v1/widgets/1/disable",
            Some(json!({})),
            404,
            "route_not_found",
        ),
        (
            Method::POST,
            "/api/v1/hosts/999/disable",
            Some(json!({})),
            404,
            "host_not_found",
        ),
        (Method::GET, "/no/such/route", None, 404, "route_not_found"),
        (
            Method::DELETE,
            "/api/v1/gateways",
            None,
            405,
            "method_not_allowed",
        ),
    ];
    for (method, path, body, status, code) in cases {
        let (got, v) = admin.call(method.clone(), path, body).await;
        assert_eq!(got, status, "{method} {path}: {v}");
        assert_error(got, &v, status, code);
    }

    // Malformed JSON is answered in the same error format.
    let resp = reqwest::Client::new()
        .post(format!("{}/api/v1/gateways", admin.base))
        .bearer_auth(mcpguard_e2e::procs::ADMIN_TOKEN)
        .header("content-type", "application/json")
        .body("{\"name\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "invalid_json");

    let (_, gateways) = admin.get("/api/v1/gateways").await;
    assert_eq!(
        gateways.as_array().unwrap().len(),
        1,
        "only the one good gateway exists: {gateways}"
    );
    let (_, servers) = admin.get("/api/v1/servers").await;
    assert_eq!(servers, json!([]));
}

#[tokio::test]
async fn tokens_are_shown_once_and_stored_only_as_hashes() {
    let (policy, _dir) = policy().await;
    let admin = policy.admin();
    let gw = admin.gateway("eng").await;
    let host = admin.host("Feedback bot").await;
    let issued = admin.token(host, gw).await;
    let token = issued["token"].as_str().unwrap().to_owned();
    assert_eq!(parse_token(&token), Ok(TokenKind::HostApi));
    assert!(token.starts_with(issued["prefix"].as_str().unwrap()));

    let (status, listed) = admin.get(&format!("/api/v1/hosts/{host}/tokens")).await;
    assert_eq!(status, 200);
    let listed_text = listed.to_string();
    assert!(
        !listed_text.contains(&token),
        "a listing must never hold the secret"
    );
    assert!(listed[0].get("token").is_none());
    assert_eq!(listed[0]["prefix"], issued["prefix"]);
    assert_eq!(listed[0]["revoked_at"], Value::Null);

    // The database holds the hash and not the token (checked in the raw files, WAL too,
    // or in a dump of the PostgreSQL database).
    let raw = policy.stored_bytes();
    let raw = String::from_utf8_lossy(&raw);
    assert!(!raw.contains(&token), "the token is stored in clear");
    assert!(
        raw.contains(&TokenHash::of(&token).to_hex()),
        "the hash is what is stored"
    );

    admin.revoke(issued["id"].as_i64().unwrap()).await;
    let (_, listed) = admin.get(&format!("/api/v1/hosts/{host}/tokens")).await;
    assert!(listed[0]["revoked_at"].is_string(), "{listed}");
    // Revoking twice is harmless.
    admin.revoke(issued["id"].as_i64().unwrap()).await;
}

#[tokio::test]
async fn token_generation_creates_or_reuses_the_connection_and_connections_are_listed() {
    let (policy, _dir) = policy().await;
    let admin = policy.admin();
    let eng = admin.gateway("eng").await;
    let ops = admin.gateway("ops").await;
    let server = admin.server("demo", "http://127.0.0.1:9/mcp").await;
    admin.expose(eng, server).await;
    let host = admin.host("Feedback bot").await;

    let first = admin.token(host, eng).await;
    let second = admin.token(host, eng).await;
    let other = admin.token(host, ops).await;
    assert_eq!(first["connection_id"], second["connection_id"]);
    assert_ne!(first["connection_id"], other["connection_id"]);

    let (status, conns) = admin
        .get(&format!("/api/v1/gateways/{eng}/connections"))
        .await;
    assert_eq!(status, 200);
    let conns = conns.as_array().unwrap();
    assert_eq!(conns.len(), 1, "{conns:?}");
    let c = &conns[0];
    assert_eq!(c["host_name"], "Feedback bot");
    assert_eq!(c["host_kind"], "token");
    assert_eq!(c["user_name"], "owner");
    assert_eq!(c["enabled"], true);
    assert_eq!(c["live_tokens"], 2);
    assert_eq!(c["last_used_at"], Value::Null);

    // Use the token through the check endpoint (the filter's wire protocol); the
    // last-used time is written off the hot path, so poll for it.
    let check = CheckRequest {
        credential: Credential::ApiToken {
            hash: TokenHash::of(first["token"].as_str().unwrap()).to_hex(),
        },
        gateway: Some("eng".into()),
        server: "demo".into(),
        mcp_method: None,
        tool: None,
        request_id: None,
        item: None,
        each_server: None,
    };
    let url = format!("http://127.0.0.1:{}{CHECK_PATH}", policy.check_port);
    let answer: Value = reqwest::Client::new()
        .post(&url)
        .header(
            "x-mcpguard-check-secret",
            mcpguard_e2e::procs::check_secret(),
        )
        .json(&check)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["decision"], "allow", "{answer}");
    assert_eq!(answer["upstream"]["authority"], "127.0.0.1:9");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (_, conns) = admin
            .get(&format!("/api/v1/gateways/{eng}/connections"))
            .await;
        if conns[0]["last_used_at"].is_string() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "last_used_at never recorded"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    admin.revoke(first["id"].as_i64().unwrap()).await;
    let (_, conns) = admin
        .get(&format!("/api/v1/gateways/{eng}/connections"))
        .await;
    assert_eq!(conns[0]["live_tokens"], 1);
}
