//! The filter in sidecar mode: `envoy/sidecar.yaml` (Envoy as an Istio sidecar is for
//! inbound traffic) rendered with a test's ports, in front of one app.

use std::path::Path;

use crate::{Demo, Envoy, Policy, Stack, free_port};

/// The clusters of `envoy/sidecar.yaml`, as Istio names them.
pub const APP_CLUSTER: &str = "inbound|9100||";
pub const POLICY_CLUSTER: &str = "outbound|8081||mcpguard-policy.mcpguard.svc.cluster.local";

/// `envoy/sidecar.yaml` listening on `port` (admin on `admin_port`), its app cluster
/// pointing at `app_port`, its policy cluster at `check_port`, the filter loaded from
/// the built `.wasm` with `check_timeout_ms` when given; as JSON.
pub fn render(
    port: u16,
    admin_port: u16,
    app_port: u16,
    check_port: u16,
    check_timeout_ms: Option<u64>,
) -> String {
    let mut cfg = crate::procs::shipped_config("envoy/sidecar.yaml", port, admin_port);
    assert_eq!(cfg.wasm(&Envoy::wasm()), 1, "the mcpguard wasm filter");
    if let Some(ms) = check_timeout_ms {
        cfg.plugin(|plugin| plugin["check_timeout_ms"] = ms.into())
            .expect("plugin config");
    }
    for cluster in cfg.cluster_names() {
        let port = match cluster.as_str() {
            APP_CLUSTER => app_port,
            POLICY_CLUSTER => check_port,
            other => panic!("unexpected cluster {other:?} in envoy/sidecar.yaml"),
        };
        cfg.cluster_ports(&cluster, &[port])
            .expect("a static cluster");
    }
    cfg.to_json()
}

/// A sidecar Envoy in front of the app on `app_port`, asking the policy service on
/// `check_port`.
pub async fn start_envoy(app_port: u16, check_port: u16, log_dir: &Path) -> Envoy {
    let (port, admin_port) = (free_port(), free_port());
    let timeout = crate::db::postgres_requested().then_some(crate::db::POSTGRES_CHECK_TIMEOUT_MS);
    let config = render(port, admin_port, app_port, check_port, timeout);
    Envoy::start_config(&config, port, admin_port, log_dir).await
}

/// The demo MCP server as the app of a pod, the policy service, and the sidecar in
/// front of the app: a [`Stack`] whose Envoy is the sidecar (so every helper that takes
/// a stack works on it, with the server registered as `demo`).
pub async fn stack() -> Stack {
    let dir = tempfile::tempdir().expect("temp dir");
    let policy = Policy::start(&dir.path().join("data"), dir.path()).await;
    let demo = Demo::start(dir.path()).await;
    let envoy = start_envoy(demo.port, policy.check_port, dir.path()).await;
    Stack {
        envoy,
        demo,
        policy,
        dir,
    }
}
