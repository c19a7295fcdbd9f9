//! The Kubernetes and Istio manifests of `deploy/`: rendered as a release renders them
//! (`scripts/render-deploy.sh`), validated offline (`tests/deploy/validate_manifests.py`:
//! Istio's CRD schemas, PyPI `kubernetes-validate`), and their Istio parts turned into
//! the Envoy configuration istiod makes of them, so that real Envoy runs it.
//!
//! The model of istiod is small on purpose and refuses what it does not know: a
//! skeleton of what Istio generates by itself (an inbound listener whose one route goes
//! to the app; a gateway listener with the VirtualService's routes), the WasmPlugin as
//! the wasm filter Istio makes of it, then each EnvoyFilter patch applied with Istio's
//! semantics (`INSERT_FIRST`, `ADD`, `MERGE`: protobuf merge, lists appended; a
//! cluster Istio generates from a Service is matched by `service` and `portNumber`). A
//! patch of another kind fails the test until it is modelled here.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use serde_yaml::{Mapping, Value};

use crate::{Envoy, workspace_root};

/// What the tests render the placeholders with.
pub const WASM_URL: &str = "https://downloads.example.com/mcpguard/0.1.0/mcpguard_filter.wasm";
pub const POLICY_IMAGE: &str = "registry.example.com/mcpguard/policy:0.1.0";

/// The Istio ports the manifests use: the app's in the sidecar example, the ingress
/// gateway's listener (`targetPort` of its Service's port 80) and server port.
pub const APP_PORT: u16 = 9100;
pub const GATEWAY_LISTENER_PORT: u16 = 8080;
pub const GATEWAY_SERVER_PORT: u16 = 80;

/// `deploy/` rendered into a temporary directory.
pub struct Manifests {
    pub dir: tempfile::TempDir,
    /// Every object, with the file it came from (relative to the rendered directory).
    pub docs: Vec<(String, Value)>,
    /// The sha256 of the `.wasm` it was rendered with.
    pub wasm_sha256: String,
}

/// `scripts/render-deploy.sh` with `args` (out dir, wasm, url, image); its output.
pub fn render_script(args: &[&str]) -> std::process::Output {
    Command::new(workspace_root().join("scripts/render-deploy.sh"))
        .args(args)
        .output()
        .expect("running scripts/render-deploy.sh")
}

impl Manifests {
    /// `deploy/` rendered with the built filter, [`WASM_URL`] and [`POLICY_IMAGE`].
    pub fn render() -> Manifests {
        let dir = tempfile::tempdir().expect("temp dir");
        let wasm = Envoy::wasm();
        let out = render_script(&[
            &dir.path().display().to_string(),
            &wasm.display().to_string(),
            WASM_URL,
            POLICY_IMAGE,
        ]);
        assert!(
            out.status.success(),
            "render-deploy.sh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let docs = read_docs(dir.path());
        let bytes = std::fs::read(&wasm).expect("the .wasm");
        let wasm_sha256 = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes));
        Manifests {
            dir,
            docs,
            wasm_sha256,
        }
    }

    pub fn of_kind(&self, kind: &str) -> Vec<&Value> {
        self.docs
            .iter()
            .map(|(_, d)| d)
            .filter(|d| d["kind"] == kind)
            .collect()
    }

    pub fn get(&self, kind: &str, name: &str) -> &Value {
        self.of_kind(kind)
            .into_iter()
            .find(|d| d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name} in deploy/"))
    }

    /// The EnvoyFilter in `plugin`'s namespace whose workload selector is the plugin's.
    pub fn envoy_filter_for(&self, plugin: &Value) -> &Value {
        self.of_kind("EnvoyFilter")
            .into_iter()
            .find(|f| {
                f["metadata"]["namespace"] == plugin["metadata"]["namespace"]
                    && f["spec"]["workloadSelector"]["labels"]
                        == plugin["spec"]["selector"]["matchLabels"]
            })
            .unwrap_or_else(|| {
                panic!(
                    "no EnvoyFilter goes with WasmPlugin {:?}",
                    plugin["metadata"]["name"]
                )
            })
    }
}

/// Every YAML document under `dir`, files in name order.
pub fn read_docs(dir: &Path) -> Vec<(String, Value)> {
    let mut files = Vec::new();
    for sub in ["kubernetes", "istio"] {
        for entry in std::fs::read_dir(dir.join(sub)).expect("rendered dir") {
            files.push(entry.expect("dir entry").path());
        }
    }
    files.sort();
    let mut docs = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("manifest");
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value = Value::deserialize(doc).expect("manifest is YAML");
            if !value.is_null() {
                let name = file
                    .strip_prefix(dir)
                    .expect("under dir")
                    .display()
                    .to_string();
                docs.push((name, value));
            }
        }
    }
    docs
}

/// The venv's Python, where `make test` installs kubernetes-validate.
pub fn python() -> PathBuf {
    let venv = std::env::var_os("MCPGUARD_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(".venv"));
    let python = venv.join("bin/python");
    let has_validator = Command::new(&python)
        .args(["-c", "import kubernetes_validate"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        has_validator,
        "{} cannot import kubernetes_validate: run `make test` (or `make deploy-tools`)",
        python.display()
    );
    python
}

/// `tests/deploy/validate_manifests.py` over `paths`: whether every object passed, and
/// its report (one line per object).
pub fn validate(paths: &[&Path]) -> (bool, String) {
    let out = Command::new(python())
        .arg(workspace_root().join("tests/deploy/validate_manifests.py"))
        .arg(workspace_root().join("deploy/schemas/istio"))
        .args(paths)
        .output()
        .expect("running the validator");
    let report =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), report)
}

/// A WasmPlugin's `pluginConfig` as Istio hands it to the filter: JSON text.
pub fn plugin_config(plugin: &Value) -> String {
    let config: serde_json::Value =
        serde_yaml::from_value(plugin["spec"]["pluginConfig"].clone()).expect("pluginConfig");
    config.to_string()
}

/// The wasm HTTP filter Istio makes of a WasmPlugin (the module from the built file,
/// where Istio fetches `url` and checks `sha256`).
fn wasm_filter(plugin: &Value) -> Value {
    let spec = &plugin["spec"];
    let failure_policy = match spec["failStrategy"].as_str() {
        None | Some("FAIL_CLOSE") => "FAIL_CLOSED",
        Some("FAIL_OPEN") => "FAIL_OPEN",
        Some("FAIL_RELOAD") => "FAIL_RELOAD",
        Some(other) => panic!("failStrategy {other}"),
    };
    let name = format!(
        "{}.{}",
        plugin["metadata"]["namespace"].as_str().expect("namespace"),
        plugin["metadata"]["name"].as_str().expect("name")
    );
    yaml(serde_json::json!({
        "name": name,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {
                "name": name,
                "root_id": spec["pluginName"].as_str().expect("pluginName"),
                "failure_policy": failure_policy,
                "configuration": {
                    "@type": "type.googleapis.com/google.protobuf.StringValue",
                    "value": plugin_config(plugin),
                },
                "vm_config": {
                    "vm_id": name,
                    "runtime": "envoy.wasm.runtime.v8",
                    "code": {"local": {"filename": Envoy::wasm().display().to_string()}},
                },
            },
        },
    }))
}

fn yaml(json: serde_json::Value) -> Value {
    serde_yaml::to_value(json).expect("JSON as YAML")
}

fn router() -> Value {
    yaml(serde_json::json!({
        "name": "envoy.filters.http.router",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
    }))
}

/// Protobuf merge of YAML: maps merge key by key, lists are appended, anything else
/// is replaced (Istio's `MERGE`).
fn merge(into: &mut Value, patch: &Value) {
    match (into, patch) {
        (Value::Mapping(a), Value::Mapping(b)) => {
            for (k, v) in b {
                match a.get_mut(k) {
                    Some(existing) => merge(existing, v),
                    None => {
                        a.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (Value::Sequence(a), Value::Sequence(b)) => a.extend(b.iter().cloned()),
        (a, b) => *a = b.clone(),
    }
}

/// What an Envoy config exposes to patches, in Istio's terms.
struct Target<'a> {
    context: &'a str,
    /// The port Istio matches `listener.portNumber` on.
    listener_port: u16,
    /// The port Istio matches `routeConfiguration.portNumber` on.
    route_port: u16,
}

/// Applies every patch of `envoy_filter` to `cfg` (one listener, one HTTP connection
/// manager, one virtual host) the way istiod does for `target`.
fn apply_patches(cfg: &mut Value, envoy_filter: &Value, target: &Target<'_>) {
    let patches = envoy_filter["spec"]["configPatches"]
        .as_sequence()
        .expect("configPatches");
    for p in patches {
        let (apply_to, m, op) = (
            p["applyTo"].as_str().expect("applyTo"),
            &p["match"],
            p["patch"]["operation"].as_str().expect("operation"),
        );
        assert_eq!(m["context"].as_str(), Some(target.context), "{p:?}");
        let value = p["patch"]["value"].clone();
        let hcm = &mut cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"];
        match (apply_to, op) {
            ("HTTP_FILTER", "INSERT_FIRST") => {
                let port = m["listener"]["portNumber"].as_u64();
                assert_eq!(port, Some(target.listener_port.into()), "{p:?}");
                assert_eq!(
                    m["listener"]["filterChain"]["filter"]["name"],
                    "envoy.filters.network.http_connection_manager"
                );
                hcm["http_filters"]
                    .as_sequence_mut()
                    .expect("http_filters")
                    .insert(0, value);
            }
            ("HTTP_ROUTE", op) => {
                let rc = &m["routeConfiguration"];
                assert_eq!(
                    rc["portNumber"].as_u64(),
                    Some(target.route_port.into()),
                    "{p:?}"
                );
                let vhost = &mut hcm["route_config"]["virtual_hosts"][0];
                if let Some(name) = rc["vhost"]["name"].as_str() {
                    assert_eq!(vhost["name"].as_str(), Some(name), "{p:?}");
                }
                let routes = vhost["routes"].as_sequence_mut().expect("routes");
                match op {
                    "INSERT_FIRST" => routes.insert(0, value),
                    "ADD" => routes.push(value),
                    "MERGE" => {
                        let name = rc["vhost"]["route"]["name"].as_str().expect("route name");
                        let route = routes
                            .iter_mut()
                            .find(|r| r["name"] == name)
                            .unwrap_or_else(|| panic!("no route {name} to merge into"));
                        merge(route, &value);
                    }
                    other => panic!("HTTP_ROUTE {other} is not modelled"),
                }
            }
            ("CLUSTER", "ADD") => cfg["static_resources"]["clusters"]
                .as_sequence_mut()
                .expect("clusters")
                .push(value),
            ("CLUSTER", "MERGE") => {
                // Istio's name for a Service's port: outbound|PORT||HOST.
                let name = format!(
                    "outbound|{}||{}",
                    m["cluster"]["portNumber"]
                        .as_u64()
                        .expect("cluster.portNumber"),
                    m["cluster"]["service"].as_str().expect("cluster.service")
                );
                let cluster = cfg["static_resources"]["clusters"]
                    .as_sequence_mut()
                    .expect("clusters")
                    .iter_mut()
                    .find(|c| c["name"].as_str() == Some(&name))
                    .unwrap_or_else(|| panic!("no cluster {name} to merge into"));
                merge(cluster, &value);
            }
            (apply_to, op) => panic!("{apply_to} {op} is not modelled"),
        }
    }
}

fn set_port(cluster: &mut Value, port: u16) {
    cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
        ["port_value"] = port.into();
}

/// The policy service's check port as the cluster Istio makes of the Service (HTTP/2),
/// named as the WasmPlugins' `policy_cluster`; with the check secret on it (outside a
/// mesh, as `envoy/sidecar.yaml`), pointing at `check_port`.
fn policy_cluster(check_port: u16) -> Value {
    let sidecar = crate::procs::shipped_config("envoy/sidecar.yaml", 0, 0)
        .value()
        .clone();
    let mut cluster = sidecar["static_resources"]["clusters"]
        .as_sequence()
        .expect("clusters")
        .iter()
        .find(|c| c["name"] == crate::sidecar::POLICY_CLUSTER)
        .expect("the policy cluster of envoy/sidecar.yaml")
        .clone();
    set_port(&mut cluster, check_port);
    cluster
}

/// Which patches a test leaves out, to show what they are for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Patches {
    All,
    /// Only the HTTP_FILTER patches.
    NoRoutes,
}

fn only(envoy_filter: &Value, patches: Patches) -> Value {
    let mut f = envoy_filter.clone();
    if let (Patches::NoRoutes, Some(list)) = (patches, f["spec"]["configPatches"].as_sequence_mut())
    {
        list.retain(|p| p["applyTo"] != "HTTP_ROUTE");
    }
    f
}

/// The sidecar of a pod that WasmPlugin `plugin` selects, as istiod configures it:
/// Istio's inbound listener for [`APP_PORT`] (one route, `default`, to the app's
/// cluster `inbound|9100||`), the plugin's wasm filter, then the EnvoyFilter that goes
/// with the plugin. Listens on `port` (admin `admin_port`); the app is on `app_port`.
pub fn sidecar_envoy(
    m: &Manifests,
    plugin: &Value,
    patches: Patches,
    ports: (u16, u16),
    app_port: u16,
    check_port: u16,
) -> String {
    let (port, admin_port) = ports;
    // envoy/sidecar.yaml has Istio's names and shapes; reset its chain and routes to
    // what Istio generates without mcpguard's EnvoyFilter.
    let mut cfg = crate::procs::shipped_config("envoy/sidecar.yaml", port, admin_port)
        .value()
        .clone();
    {
        let hcm = &mut cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"];
        // Istio's default path normalization (BASE): no slash merging.
        if let Some(map) = hcm.as_mapping_mut() {
            map.remove("merge_slashes");
            map.remove("path_with_escaped_slashes_action");
        }
        hcm["http_filters"] = Value::Sequence(vec![wasm_filter(plugin), router()]);
        let vhost = &mut hcm["route_config"]["virtual_hosts"][0];
        assert_eq!(vhost["name"], "inbound|http|9100");
        vhost["routes"] = yaml(serde_json::json!([{
            "name": "default",
            "match": {"prefix": "/"},
            "route": {"cluster": crate::sidecar::APP_CLUSTER, "timeout": "0s"},
        }]));
    }
    let mut clusters = Vec::new();
    for c in cfg["static_resources"]["clusters"]
        .as_sequence()
        .expect("clusters")
    {
        let mut c = c.clone();
        if c["name"] == crate::sidecar::APP_CLUSTER {
            set_port(&mut c, app_port);
            clusters.push(c);
        }
    }
    clusters.push(policy_cluster(check_port));
    cfg["static_resources"]["clusters"] = Value::Sequence(clusters);
    let target = Target {
        context: "SIDECAR_INBOUND",
        listener_port: APP_PORT,
        route_port: APP_PORT,
    };
    apply_patches(
        &mut cfg,
        &only(m.envoy_filter_for(plugin), patches),
        &target,
    );
    serde_json::to_string_pretty(&cfg).expect("config as JSON")
}

/// Istio's routes for a VirtualService's `http` list (the parts deploy/ uses).
fn virtual_service_routes(vs: &Value, public_port_cluster: &str) -> Vec<Value> {
    let mut routes = Vec::new();
    for r in vs["spec"]["http"].as_sequence().expect("http routes") {
        let mut action = Mapping::new();
        if let Some(direct) = r.get("directResponse") {
            action.insert(
                "direct_response".into(),
                yaml(serde_json::json!({
                    "status": direct["status"].as_u64().expect("status"),
                    "body": {"inline_string": direct["body"]["string"].as_str().expect("body")},
                })),
            );
        } else {
            let dests = r["route"].as_sequence().expect("route");
            assert_eq!(dests.len(), 1, "one destination");
            let d = &dests[0]["destination"];
            let cluster = format!(
                "outbound|{}||{}",
                d["port"]["number"].as_u64().expect("port"),
                d["host"].as_str().expect("host")
            );
            assert_eq!(
                cluster, public_port_cluster,
                "the only destination modelled"
            );
            action.insert(
                "route".into(),
                yaml(serde_json::json!({"cluster": cluster, "timeout": "0s"})),
            );
        }
        if let Some(set) = r["headers"]["response"]["set"].as_mapping() {
            let headers: Vec<_> = set
                .iter()
                .map(|(k, v)| {
                    serde_json::json!({
                        "header": {"key": k.as_str(), "value": v.as_str()},
                        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                    })
                })
                .collect();
            action.insert("response_headers_to_add".into(), yaml(headers.into()));
        }
        let matches = r["match"]
            .as_sequence()
            .cloned()
            .unwrap_or_else(|| vec![yaml(serde_json::json!({"uri": {"prefix": "/"}}))]);
        for m in matches {
            let envoy_match = match (m["uri"]["prefix"].as_str(), m["uri"]["exact"].as_str()) {
                (Some(prefix), None) => serde_json::json!({"prefix": prefix}),
                (None, Some(exact)) => serde_json::json!({"path": exact}),
                _ => panic!("uri match {m:?} is not modelled"),
            };
            let mut route = action.clone();
            route.insert(
                "name".into(),
                r["name"].as_str().expect("route name").into(),
            );
            route.insert("match".into(), yaml(envoy_match));
            routes.push(Value::Mapping(route));
        }
    }
    routes
}

/// The cluster Istio makes of a Service's port, `outbound|PORT||NAME.NS.svc.cluster.local`
/// (Istio's default load balancer, plain HTTP/1.1 here where the mesh adds mTLS), its
/// endpoints on loopback `ports`.
fn service_cluster(m: &Manifests, service: &str, port_name: &str, ports: &[u16]) -> Value {
    let svc = m.get("Service", service);
    let port = svc["spec"]["ports"]
        .as_sequence()
        .expect("ports")
        .iter()
        .find(|p| p["name"] == port_name)
        .unwrap_or_else(|| panic!("Service {service} has no port {port_name}"))["port"]
        .as_u64()
        .expect("port");
    let name = format!(
        "outbound|{port}||{service}.{}.svc.cluster.local",
        svc["metadata"]["namespace"].as_str().expect("namespace")
    );
    let endpoints: Vec<_> = ports
        .iter()
        .map(|p| serde_json::json!({"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}}))
        .collect();
    yaml(serde_json::json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "lb_policy": "LEAST_REQUEST",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": endpoints}]},
    }))
}

/// The ingress gateway as istiod configures it from the manifests: a listener for
/// gateway port 80 (Istio's listener port 8080) with the VirtualService's routes,
/// the gateway WasmPlugin's filter, then the gateway EnvoyFilter. Listens on `port`
/// (admin `admin_port`); the policy service's ports are `check_port` and
/// `public_port`, the aggregators' (Service `mcpguard-aggregator`) `aggregator_ports`.
pub fn gateway_envoy(
    m: &Manifests,
    ports: (u16, u16),
    check_port: u16,
    public_port: u16,
    aggregator_ports: &[u16],
) -> String {
    let (port, admin_port) = ports;
    let plugin = m.get("WasmPlugin", "mcpguard-gateway");
    let vs = m.get("VirtualService", "mcpguard");
    let service = m.get("Service", "mcpguard-policy");
    let public_cluster = format!(
        "outbound|8080||{}.{}.svc.cluster.local",
        service["metadata"]["name"].as_str().expect("name"),
        service["metadata"]["namespace"]
            .as_str()
            .expect("namespace")
    );
    let mut public = policy_cluster(public_port);
    public["name"] = public_cluster.clone().into();
    public["load_assignment"]["cluster_name"] = public_cluster.clone().into();
    if let Some(map) = public.as_mapping_mut() {
        map.remove("typed_extension_protocol_options"); // HTTP/1.1, no check secret
    }
    let listener = format!("0.0.0.0_{GATEWAY_LISTENER_PORT}");
    let mut cfg = yaml(serde_json::json!({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {
            "listeners": [{
                "name": listener,
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": format!("outbound_{listener}"),
                        "normalize_path": true,
                        "route_config": {
                            "name": format!("http.{GATEWAY_LISTENER_PORT}"),
                            "validate_clusters": false,
                            "virtual_hosts": [{
                                "name": format!("*:{GATEWAY_SERVER_PORT}"),
                                "domains": ["*"],
                                "routes": virtual_service_routes(vs, &public_cluster)
                                    .into_iter()
                                    .map(|v| serde_json::to_value(v).expect("route"))
                                    .collect::<Vec<_>>(),
                            }],
                        },
                        "http_filters": [],
                    },
                }]}],
            }],
            "clusters": [],
        },
    }));
    {
        let hcm = &mut cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"];
        hcm["http_filters"] = Value::Sequence(vec![wasm_filter(plugin), router()]);
    }
    let aggregator = service_cluster(
        m,
        "mcpguard-aggregator",
        "http-aggregator",
        aggregator_ports,
    );
    cfg["static_resources"]["clusters"] =
        Value::Sequence(vec![policy_cluster(check_port), public, aggregator]);
    let target = Target {
        context: "GATEWAY",
        listener_port: GATEWAY_LISTENER_PORT,
        route_port: GATEWAY_SERVER_PORT,
    };
    apply_patches(&mut cfg, m.envoy_filter_for(plugin), &target);
    serde_json::to_string_pretty(&cfg).expect("config as JSON")
}
