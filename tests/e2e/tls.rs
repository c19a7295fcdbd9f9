//! An https upstream: reached over TLS that Envoy verifies (SNI and the certificate's
//! name), with nothing about it in Envoy's config.

use mcpguard_e2e::mcp::{self, call_text};
use mcpguard_e2e::tls::{certificate, tls_front};
use mcpguard_e2e::{Demo, Envoy, EnvoyOptions, Policy, free_port};
use serde_json::json;

#[tokio::test]
async fn an_https_upstream_is_reached_over_verified_tls() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = certificate(dir.path());
    let policy = Policy::start(&dir.path().join("data"), dir.path()).await;
    let demo = Demo::start(dir.path()).await;
    let (front_port, front_admin) = (free_port(), free_port());
    let _front = Envoy::start_config(
        &tls_front(front_port, front_admin, demo.port, &cert, &key),
        front_port,
        front_admin,
        dir.path(),
    )
    .await;
    let opts = EnvoyOptions {
        config: "envoy/mcpguard.yaml",
        check_port: policy.check_port,
        check_timeout_ms: None,
        trusted_ca: Some(ca.clone()),
        issuer: None,
        jwks_refresh_s: None,
    };
    let gateway = Envoy::start(&opts, dir.path()).await;

    let admin = policy.admin();
    let p = admin
        .provision(
            "eng",
            "secure",
            &format!("https://localhost:{front_port}/mcp"),
        )
        .await;
    let client = mcp::connect(&gateway.mcp_url("eng", "secure"), Some(&p.token))
        .await
        .expect("reachable over https");
    assert_eq!(
        call_text(&client, "echo", json!({"text": "over tls"}))
            .await
            .unwrap(),
        "over tls"
    );
    assert_eq!(
        call_text(&client, "whoami", json!({})).await.unwrap(),
        "none"
    );
    assert!(
        gateway
            .stat("cluster.mcpguard_upstream_https.ssl.handshake")
            .await
            >= 1
    );

    // The certificate names `localhost` only: the same server under another name fails
    // verification and nothing is served.
    let other = admin
        .server("mismatch", &format!("https://127.0.0.1:{front_port}/mcp"))
        .await;
    admin.expose(p.gateway_id, other).await;
    let a = mcp::initialize_with(&gateway.mcp_url("eng", "mismatch"), Some(&p.token)).await;
    assert_eq!(a.status, 503, "{}", a.body);
    assert!(
        gateway
            .stat("cluster.mcpguard_upstream_https.ssl.fail_verify_san")
            .await
            >= 1
    );
}

/// Feature provisioning's live lists over https: the policy service verifies the
/// upstream's certificate against the system's roots and `--trusted-ca-file`, with the
/// name checked. Without the CA the refresh fails as `upstream_failed`, not silently.
#[tokio::test]
async fn live_lists_are_fetched_from_an_https_upstream_over_verified_tls() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = certificate(dir.path());
    let demo = Demo::start(dir.path()).await;
    let (front_port, front_admin) = (free_port(), free_port());
    let _front = Envoy::start_config(
        &tls_front(front_port, front_admin, demo.port, &cert, &key),
        front_port,
        front_admin,
        dir.path(),
    )
    .await;
    let refresh = |admin: mcpguard_e2e::Admin, upstream: String| async move {
        let p = admin.provision("eng", "secure", &upstream).await;
        let path = format!(
            "/api/v1/gateways/{}/servers/{}/features/refresh",
            p.gateway_id, p.server_id
        );
        admin.post(&path, json!({})).await
    };
    let upstream = format!("https://localhost:{front_port}/mcp");

    let untrusting = Policy::start(&dir.path().join("plain"), dir.path()).await;
    let (status, v) = refresh(untrusting.admin(), upstream.clone()).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (502, Some("upstream_failed")),
        "{v}"
    );

    let ca = ca.display().to_string();
    let trusting = Policy::start_with(
        &dir.path().join("trusting"),
        dir.path(),
        &[("MCPGUARD_TRUSTED_CA_FILE", &ca)],
    )
    .await;
    let admin = trusting.admin();
    let (status, v) = refresh(admin.clone(), upstream).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        v["counts"],
        json!({"prompts": 2, "resources": 2, "tools": 3}),
        "{v}"
    );

    // The certificate names `localhost` only: by address, the name check fails.
    let other = admin
        .server("by-address", &format!("https://127.0.0.1:{front_port}/mcp"))
        .await;
    let gateway = admin.get("/api/v1/gateways").await.1[0]["id"]
        .as_i64()
        .unwrap();
    admin.expose(gateway, other).await;
    let (status, v) = admin
        .post(
            &format!("/api/v1/gateways/{gateway}/servers/{other}/features/refresh"),
            json!({}),
        )
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (502, Some("upstream_failed")),
        "{v}"
    );
}
