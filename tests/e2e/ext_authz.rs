//! mcpguard behind Envoy's native ext_authz filter (`bench/envoy/ext-authz.yaml`, the
//! benchmark's setup (b)) instead of the wasm filter: the policy service's ext_authz
//! endpoint makes the same decisions, and Envoy relays them as the contract says.

use std::path::Path;
use std::process::Command;

use mcpguard_e2e::mcp::{self, call_text, challenge_and_metadata, expect_refusal, initialize_with};
use mcpguard_e2e::oauth::{PASSWORD, RawClient, sdk_connect};
use mcpguard_e2e::{Demo, Envoy, Policy, free_port, workspace_root};
use mcpguard_harness::envoy::EnvoyConfig;
use serde_json::json;

const CONFIG: &str = "bench/envoy/ext-authz.yaml";

/// Envoy with the ext_authz config, through the harness's renderer.
struct ExtAuthzEnvoy;

impl ExtAuthzEnvoy {
    /// The shipped file with this test's ports and upstream; nothing else changed.
    fn render(check_port: u16, demo_port: u16, port: u16, admin_port: u16) -> String {
        let mut cfg = EnvoyConfig::load(&workspace_root(), CONFIG).unwrap();
        let route = &cfg.value()["static_resources"]["listeners"][0]["filter_chains"][0]["filters"]
            [0]["typed_config"]["route_config"]["virtual_hosts"][0]["routes"][0];
        assert_eq!(route["match"]["prefix"], "/mcp/", "{CONFIG} changed shape");
        cfg.ports(port, admin_port)
            .host_rewrite(&format!("127.0.0.1:{demo_port}"))
            .cluster_ports("mcpguard_policy", &[check_port])
            .and_then(|cfg| cfg.cluster_ports("mcpguard_policy_metadata", &[check_port]))
            .unwrap();
        cfg.to_json()
    }

    /// On `port`, chosen beforehand so the policy service can be told the data plane's
    /// URL (the base of OAuth resources).
    async fn start(port: u16, check_port: u16, demo_port: u16, dir: &Path) -> Envoy {
        let admin_port = free_port();
        let config = Self::render(check_port, demo_port, port, admin_port);
        Envoy::start_config(&config, port, admin_port, dir).await
    }
}

#[test]
fn the_benchmark_envoy_configs_validate_as_shipped() {
    let dir = workspace_root().join("bench/envoy");
    let mut configs: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    configs.sort();
    assert_eq!(configs.len(), 3, "{configs:?}");
    for config in configs {
        // The dynamic module's setup names the release build `make bench` makes; `make
        // build` makes the debug one.
        let text = std::fs::read_to_string(&config).unwrap().replace(
            "target/release/libmcpguard_dynamic_module.so",
            &Envoy::dynamic_module().display().to_string(),
        );
        let rendered = tempfile::Builder::new().suffix(".yaml").tempfile().unwrap();
        std::fs::write(rendered.path(), text).unwrap();
        let out = Command::new(Envoy::executable())
            .args(["--mode", "validate", "--disable-hot-restart", "-c"])
            .arg(rendered.path())
            .current_dir(workspace_root())
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&out.stderr).to_string()
            + &String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && !log.contains("Deprecated"),
            "{} does not validate cleanly:\n{log}",
            config.display()
        );
    }
}

#[tokio::test]
async fn native_ext_authz_allows_live_tokens_and_refuses_unknown_and_revoked_ones() {
    let dir = tempfile::tempdir().unwrap();
    let mut policy = Policy::start(&dir.path().join("data"), dir.path()).await;
    let demo = Demo::start(dir.path()).await;
    let envoy = ExtAuthzEnvoy::start(free_port(), policy.check_port, demo.port, dir.path()).await;
    let admin = policy.admin();
    let p = admin.provision("eng", "demo", &demo.upstream_url()).await;
    let url = envoy.mcp_url("eng", "demo");

    // A live token: a whole MCP session, and the upstream never sees the token.
    let client = mcp::connect(&url, Some(&p.token))
        .await
        .expect("a live token connects through ext_authz");
    assert_eq!(
        call_text(&client, "echo", json!({"text": "via ext_authz"}))
            .await
            .unwrap(),
        "via ext_authz"
    );
    assert_eq!(
        call_text(&client, "whoami", json!({})).await.unwrap(),
        "none"
    );
    // Audited like the wasm filter's checks: Envoy's MCP filter names method and tool,
    // Envoy's x-request-id joins the logs (the writer batches: poll, bounded).
    let entry = admin.allowed_decision(|e| e["tool"] == "whoami").await;
    assert_eq!(entry["mcp_method"], "tools/call", "{entry}");
    assert_eq!(entry["connection_id"], p.connection_id, "{entry}");
    assert!(entry["request_id"].is_string(), "{entry}");

    // No token: the challenge that points at the resource metadata.
    let none = expect_refusal(&url, None, (401, "token_missing")).await;
    assert_eq!(none.header("content-type"), Some("application/json"));
    assert!(
        none.header("www-authenticate")
            .unwrap()
            .contains("resource_metadata=\"http://127.0.0.1:"),
        "{:?}",
        none.headers
    );

    // Well-formed but never issued.
    let forged = mcpguard_core::token::format_token(
        mcpguard_core::token::TokenKind::HostApi,
        &"Z".repeat(40),
    )
    .unwrap();
    let unknown = expect_refusal(&url, Some(&forged), (401, "token_unknown")).await;
    assert!(
        unknown
            .header("www-authenticate")
            .unwrap()
            .contains(r#"error="invalid_token""#)
    );

    // A batch: Envoy's MCP filter reads no method from it, so nothing can be decided
    // on it (a blocked tool could hide inside): refused, as by the wasm filter.
    let call = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                      "params": {"name": "whoami", "arguments": {}}});
    let bearer = format!("Bearer {}", p.token);
    let batch = mcp::post(
        &url,
        &[("authorization", &bearer)],
        json!([call]).to_string(),
    )
    .await;
    assert_eq!(
        (batch.status, batch.code()),
        (400, "request_unreadable".into()),
        "{}",
        batch.body
    );

    // Revoked: refused on the very next request, open session included.
    admin.revoke(p.token_id).await;
    expect_refusal(&url, Some(&p.token), (401, "token_revoked")).await;
    let err = call_text(&client, "echo", json!({"text": "x"}))
        .await
        .expect_err("the open session is refused too");
    assert_eq!(mcp::status_of_service_error(&err), Some(401), "{err}");

    // A disabled layer is a 403 naming it.
    let fresh = admin.token(p.host_id, p.gateway_id).await;
    let fresh = fresh["token"].as_str().unwrap();
    assert_eq!(initialize_with(&url, Some(fresh)).await.status, 200);
    admin.set_enabled("gateways", p.gateway_id, false).await;
    expect_refusal(&url, Some(fresh), (403, "gateway_disabled")).await;

    // The policy service gone: refused with 503 and the contract's body, never passed.
    policy.proc.kill();
    expect_refusal(&url, Some(fresh), (503, "policy_unavailable")).await;
}

#[tokio::test]
async fn a_headed_app_connects_through_native_ext_authz_with_the_official_sdk() {
    let dir = tempfile::tempdir().unwrap();
    // The policy service issues tokens for this Envoy's URL: it is chosen first.
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let policy = Policy::start_with(
        &dir.path().join("data"),
        dir.path(),
        &[("MCPGUARD_RESOURCE_BASE_URLS", &base)],
    )
    .await;
    let demo = Demo::start(dir.path()).await;
    let envoy = ExtAuthzEnvoy::start(port, policy.check_port, demo.port, dir.path()).await;
    let admin = policy.admin();
    let gateway = admin.gateway("eng").await;
    for slug in ["demo", "other"] {
        let server = admin.server(slug, &demo.upstream_url()).await;
        admin.expose(gateway, server).await;
    }
    admin.person("alice", PASSWORD).await;
    let url = envoy.mcp_url("eng", "demo");
    let issuer = policy.public_url();

    // The 401 points at the metadata, which Envoy routes to the policy service with no
    // token; it names this URL as the resource and the policy service as its issuer.
    let (challenge, prm) = challenge_and_metadata(&url).await;
    assert_eq!(prm["authorization_servers"], json!([issuer]));

    // The official SDK finds its way from the challenge, signs in, and calls tools
    // through Envoy's ext_authz; the upstream never sees the access token.
    let (auth, client) = sdk_connect(&url, &challenge, &issuer, "Headed app").await;
    assert_eq!(
        call_text(&client, "echo", json!({"text": "headed"}))
            .await
            .unwrap(),
        "headed"
    );
    assert_eq!(
        call_text(&client, "whoami", json!({})).await.unwrap(),
        "none"
    );
    let access = auth.get_access_token().await.unwrap();
    // Its audience is this MCP URL: not another server's on the same gateway.
    let elsewhere = initialize_with(&envoy.mcp_url("eng", "other"), Some(&access)).await;
    assert_eq!(
        (elsewhere.status, elsewhere.code().as_str()),
        (401, "token_wrong_gateway")
    );

    // Revoking the grant (its refresh token) refuses its access token on the next
    // request: verified here, checked uncached like an API token.
    let raw = RawClient::register(&issuer, "Raw client").await;
    let tokens = raw.sign_in(&url, "alice", PASSWORD).await;
    let access = tokens["access_token"].as_str().unwrap();
    assert_eq!(initialize_with(&url, Some(access)).await.status, 200);
    assert_eq!(
        raw.revoke(tokens["refresh_token"].as_str().unwrap()).await,
        200
    );
    let revoked = initialize_with(&url, Some(access)).await;
    assert_eq!(
        (revoked.status, revoked.code().as_str()),
        (401, "token_revoked"),
        "{}",
        revoked.body
    );
    // The SDK's own grant is untouched.
    assert_eq!(
        call_text(&client, "echo", json!({"text": "still"}))
            .await
            .unwrap(),
        "still"
    );
}
