//! An https upstream: reached over TLS that Envoy verifies (SNI and the certificate's
//! name), with nothing about it in Envoy's config.

use std::process::Command;

use mcpguard_e2e::mcp::{self, call_text};
use mcpguard_e2e::{Demo, Envoy, EnvoyOptions, Policy, free_port};
use serde_json::json;

/// A self-signed certificate for `localhost` only.
fn certificate(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
        ])
        .args([
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl (from Debian's ca-certificates dependencies) must be installed");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cert, key)
}

/// An Envoy that terminates TLS with `cert` and forwards to the demo server.
fn tls_front(
    port: u16,
    admin_port: u16,
    demo_port: u16,
    cert: &std::path::Path,
    key: &std::path::Path,
) -> String {
    json!({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {
            "listeners": [{
                "name": "tls",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                "filter_chains": [{
                    "transport_socket": {
                        "name": "envoy.transport_sockets.tls",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                            "common_tls_context": {"tls_certificates": [{
                                "certificate_chain": {"filename": cert},
                                "private_key": {"filename": key}
                            }]}
                        }
                    },
                    "filters": [{
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                            "stat_prefix": "tls",
                            "route_config": {"virtual_hosts": [{
                                "name": "demo", "domains": ["*"],
                                "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "demo", "timeout": "0s"}}]
                            }]},
                            "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]
                        }
                    }]
                }]
            }],
            "clusters": [{
                "name": "demo", "type": "STATIC", "connect_timeout": "1s",
                "load_assignment": {"cluster_name": "demo", "endpoints": [{"lb_endpoints": [{"endpoint": {"address":
                    {"socket_address": {"address": "127.0.0.1", "port_value": demo_port}}}}]}]}
            }]
        }
    })
    .to_string()
}

#[tokio::test]
async fn an_https_upstream_is_reached_over_verified_tls() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = certificate(dir.path());
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
        trusted_ca: Some(cert.clone()),
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
