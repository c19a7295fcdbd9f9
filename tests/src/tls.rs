//! TLS for tests of https peers: a test CA with a server certificate it signed, and an
//! Envoy that terminates TLS in front of a plain HTTP server.

use std::process::Command;

use serde_json::json;

/// Runs openssl (from Debian's ca-certificates dependencies) and asserts it worked.
fn openssl(args: &[&dyn AsRef<std::ffi::OsStr>]) {
    let out = Command::new("openssl")
        .args(args.iter().map(|a| a.as_ref()))
        .output()
        .expect("openssl (from Debian's ca-certificates dependencies) must be installed");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A test CA and a server certificate it signed for `localhost` only: (the CA's
/// certificate, the server's certificate, its key). A real chain, as both Envoy
/// (BoringSSL) and the policy service (rustls, which refuses a CA certificate used as
/// a server's) verify it.
pub fn certificate(
    dir: &std::path::Path,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let path = |name: &str| dir.join(name);
    let (ca, ca_key, cert, key) = (
        path("ca.pem"),
        path("ca-key.pem"),
        path("cert.pem"),
        path("key.pem"),
    );
    let (csr, ext) = (path("cert.csr"), path("cert.ext"));
    let (ec, nodes) = ("ec_paramgen_curve:prime256v1", "-nodes");
    openssl(&[
        &"req",
        &"-x509",
        &"-newkey",
        &"ec",
        &"-pkeyopt",
        &ec,
        &nodes,
        &"-days",
        &"1",
        &"-subj",
        &"/CN=mcpguard test CA",
        &"-keyout",
        &ca_key,
        &"-out",
        &ca,
    ]);
    openssl(&[
        &"req",
        &"-newkey",
        &"ec",
        &"-pkeyopt",
        &ec,
        &nodes,
        &"-subj",
        &"/CN=localhost",
        &"-keyout",
        &key,
        &"-out",
        &csr,
    ]);
    std::fs::write(
        &ext,
        "subjectAltName=DNS:localhost\nbasicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(&[
        &"x509",
        &"-req",
        &"-days",
        &"1",
        &"-set_serial",
        &"1",
        &"-in",
        &csr,
        &"-CA",
        &ca,
        &"-CAkey",
        &ca_key,
        &"-extfile",
        &ext,
        &"-out",
        &cert,
    ]);
    (ca, cert, key)
}

/// An Envoy config that terminates TLS with `cert` on `port` and forwards to the plain
/// HTTP server on `backend_port` (the demo server, an OTLP receiver).
pub fn tls_front(
    port: u16,
    admin_port: u16,
    backend_port: u16,
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
                    {"socket_address": {"address": "127.0.0.1", "port_value": backend_port}}}}]}]}
            }]
        }
    })
    .to_string()
}
