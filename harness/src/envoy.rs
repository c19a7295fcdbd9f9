//! The one renderer of the repository's Envoy configs (`envoy/*.yaml`, `bench/envoy/`):
//! load a shipped file, set this run's ports and absolute paths, write JSON. Each
//! method changes only what it names, so a rendered config is the shipped one with
//! ports and paths substituted (the tests below check exactly that).
//!
//! Also where Envoy is found and how it is started (the same flags everywhere).

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_yaml::Value;

/// The `@type` of Envoy's wasm filter, and of its dynamic-module filter.
const WASM_FILTER: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";
const DYNAMIC_MODULE_FILTER: &str =
    "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter";

/// Which kind of mcpguard filter a config loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterKind {
    Wasm,
    DynamicModule,
}

/// A config that does not have the shape a renderer step expects, or cannot be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderError(pub String);

impl fmt::Display for RenderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RenderError {}

type Result<T> = std::result::Result<T, RenderError>;

/// A shipped Envoy config being rendered.
#[derive(Debug, Clone)]
pub struct EnvoyConfig {
    /// Where it came from, for error messages.
    source: String,
    cfg: Value,
}

impl EnvoyConfig {
    /// Reads `relative` (e.g. `envoy/mcpguard.yaml`) under `root`.
    pub fn load(root: &Path, relative: &str) -> Result<EnvoyConfig> {
        let path = root.join(relative);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| RenderError(format!("reading {}: {e}", path.display())))?;
        Self::parse(relative, &text)
    }

    pub fn parse(source: &str, text: &str) -> Result<EnvoyConfig> {
        let cfg = serde_yaml::from_str(text)
            .map_err(|e| RenderError(format!("{source} is not YAML: {e}")))?;
        Ok(EnvoyConfig {
            source: source.to_owned(),
            cfg,
        })
    }

    /// The config tree, for a caller's own changes.
    pub fn value_mut(&mut self) -> &mut Value {
        &mut self.cfg
    }

    pub fn value(&self) -> &Value {
        &self.cfg
    }

    /// The first listener's port and the admin port.
    pub fn ports(&mut self, listen: u16, admin: u16) -> &mut Self {
        self.cfg["admin"]["address"]["socket_address"]["port_value"] = admin.into();
        self.cfg["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"] =
            listen.into();
        self
    }

    /// The first listener's HTTP filters.
    fn http_filters(&mut self) -> impl Iterator<Item = &mut Value> {
        seq(
            &mut self.cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
                ["http_filters"],
        )
    }

    fn filters_of_type(&mut self, type_url: &'static str) -> impl Iterator<Item = &mut Value> {
        self.http_filters()
            .filter(move |f| f["typed_config"]["@type"].as_str() == Some(type_url))
    }

    /// The mcpguard filter's kind: that of the first wasm or dynamic-module filter.
    pub fn filter_kind(&self) -> Option<FilterKind> {
        let filters = &self.cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"]
            [0]["typed_config"]["http_filters"];
        filters
            .as_sequence()?
            .iter()
            .find_map(|f| match f["typed_config"]["@type"].as_str() {
                Some(WASM_FILTER) => Some(FilterKind::Wasm),
                Some(DYNAMIC_MODULE_FILTER) => Some(FilterKind::DynamicModule),
                _ => None,
            })
    }

    /// The `.wasm` every wasm filter loads. Returns how many filters it set.
    pub fn wasm(&mut self, wasm: &Path) -> usize {
        let path: Value = wasm.display().to_string().into();
        let mut n = 0;
        for f in self.filters_of_type(WASM_FILTER) {
            f["typed_config"]["config"]["vm_config"]["code"]["local"]["filename"] = path.clone();
            n += 1;
        }
        n
    }

    /// The shared object every dynamic-module filter loads. Returns how many it set.
    pub fn dynamic_module(&mut self, module: &Path) -> usize {
        let path: Value = module.display().to_string().into();
        let mut n = 0;
        for f in self.filters_of_type(DYNAMIC_MODULE_FILTER) {
            f["typed_config"]["dynamic_module_config"]["module"]["local"]["filename"] =
                path.clone();
            n += 1;
        }
        n
    }

    /// Changes the mcpguard filter's JSON configuration (the first wasm or dynamic-module
    /// filter's string value) with `edit`.
    pub fn plugin(&mut self, edit: impl FnOnce(&mut serde_json::Value)) -> Result<&mut Self> {
        let source = self.source.clone();
        let filter = self
            .http_filters()
            .find(|f| {
                let t = f["typed_config"]["@type"].as_str();
                t == Some(WASM_FILTER) || t == Some(DYNAMIC_MODULE_FILTER)
            })
            .ok_or_else(|| RenderError(format!("{source} has no mcpguard filter")))?;
        let value = if filter["typed_config"]["@type"].as_str() == Some(WASM_FILTER) {
            &mut filter["typed_config"]["config"]["configuration"]["value"]
        } else {
            &mut filter["typed_config"]["filter_config"]["value"]
        };
        let mut plugin: serde_json::Value = value
            .as_str()
            .and_then(|text| serde_json::from_str(text).ok())
            .ok_or_else(|| RenderError(format!("{source}: the filter's config is not JSON")))?;
        edit(&mut plugin);
        *value = plugin.to_string().into();
        Ok(self)
    }

    /// Every cluster's name, in order.
    pub fn cluster_names(&self) -> Vec<String> {
        self.cfg["static_resources"]["clusters"]
            .as_sequence()
            .into_iter()
            .flatten()
            .filter_map(|c| c["name"].as_str().map(str::to_owned))
            .collect()
    }

    fn cluster(&mut self, name: &str) -> Result<&mut Value> {
        let source = self.source.clone();
        seq(&mut self.cfg["static_resources"]["clusters"])
            .find(|c| c["name"].as_str() == Some(name))
            .ok_or_else(|| RenderError(format!("{source} has no cluster {name}")))
    }

    /// The loopback ports of a static cluster: one endpoint per port, each a copy of
    /// the cluster's first (health checks and all).
    pub fn cluster_ports(&mut self, name: &str, ports: &[u16]) -> Result<&mut Self> {
        let source = self.source.clone();
        let cluster = self.cluster(name)?;
        let lb_endpoints = &mut cluster["load_assignment"]["endpoints"][0]["lb_endpoints"];
        let template = lb_endpoints
            .get(0)
            .cloned()
            .ok_or_else(|| RenderError(format!("{source}: cluster {name} has no endpoint")))?;
        *lb_endpoints = ports
            .iter()
            .map(|&port| {
                let mut e = template.clone();
                e["endpoint"]["address"]["socket_address"]["port_value"] = port.into();
                e
            })
            .collect::<Vec<_>>()
            .into();
        Ok(self)
    }

    /// The CA bundle a cluster's TLS transport socket trusts.
    pub fn trusted_ca(&mut self, cluster: &str, ca: &Path) -> Result<&mut Self> {
        self.cluster(cluster)?["transport_socket"]["typed_config"]["common_tls_context"]["validation_context"]
            ["trusted_ca"]["filename"] = ca.display().to_string().into();
        Ok(self)
    }

    /// The URI of every ext_authz filter's HTTP service.
    pub fn ext_authz_uri(&mut self, uri: &str) -> &mut Self {
        for f in self.http_filters() {
            if f["name"] == "envoy.filters.http.ext_authz" {
                f["typed_config"]["http_service"]["server_uri"]["uri"] = uri.into();
            }
        }
        self
    }

    /// Every route's dynamic-forward-proxy `host_rewrite_literal` that the config sets
    /// (the bench setups send all requests to one upstream).
    pub fn host_rewrite(&mut self, host: &str) -> &mut Self {
        let hcm = &mut self.cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"]
            [0]["typed_config"];
        for vhost in seq(&mut hcm["route_config"]["virtual_hosts"]) {
            for route in seq(&mut vhost["routes"]) {
                // `get_mut`, not indexing: indexing a missing key would insert it.
                let literal = route
                    .get_mut("typed_per_filter_config")
                    .and_then(|p| p.get_mut("envoy.filters.http.dynamic_forward_proxy"))
                    .and_then(|dfp| dfp.get_mut("host_rewrite_literal"));
                if let Some(literal) = literal {
                    *literal = host.into();
                }
            }
        }
        self
    }

    /// The config as JSON (Envoy reads it by the file's extension).
    pub fn to_json(&self) -> String {
        // A YAML tree with string keys always serialises to JSON.
        serde_json::to_string_pretty(&self.cfg).unwrap_or_default()
    }
}

fn seq(v: &mut Value) -> impl Iterator<Item = &mut Value> {
    v.as_sequence_mut().into_iter().flatten()
}

/// Envoy: `$MCPGUARD_ENVOY`, else the venv's `make envoy` installs under `root`.
pub fn executable(root: &Path) -> std::result::Result<PathBuf, String> {
    let path = std::env::var_os("MCPGUARD_ENVOY")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(".venv/bin/envoy"));
    if path.exists() {
        Ok(path)
    } else {
        Err(format!("{} is missing: run `make envoy`", path.display()))
    }
}

/// Envoy on `config` as every harness starts it: one worker thread, no hot restart, the
/// check secret in its environment (the shipped configs read `MCPGUARD_CHECK_SECRET`),
/// from `root` (relative paths in a config are the repository's).
pub fn command(
    envoy: &Path,
    config: &Path,
    log_level: &str,
    check_secret: &str,
    root: &Path,
) -> Command {
    command_with_workers(envoy, config, log_level, check_secret, root, 1)
}

/// Like [`command`], with `workers` worker threads (`--concurrency`): for what is per
/// worker, such as the filter's experimental check stream.
pub fn command_with_workers(
    envoy: &Path,
    config: &Path,
    log_level: &str,
    check_secret: &str,
    root: &Path,
    workers: u32,
) -> Command {
    let workers = workers.max(1).to_string();
    let mut cmd = Command::new(envoy);
    cmd.env("MCPGUARD_CHECK_SECRET", check_secret)
        .arg("-c")
        .arg(config)
        .args([
            "--concurrency",
            &workers,
            "--disable-hot-restart",
            "--log-level",
            log_level,
        ])
        .current_dir(root);
    cmd
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use std::collections::BTreeSet;

    fn root() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
    }

    fn shipped(relative: &str) -> serde_json::Value {
        let text = std::fs::read_to_string(root().join(relative)).unwrap();
        let yaml: Value = serde_yaml::from_str(&text).unwrap();
        serde_json::to_value(yaml).unwrap()
    }

    /// The paths of the leaves in which `a` and `b` differ.
    fn differences(
        a: &serde_json::Value,
        b: &serde_json::Value,
        at: String,
        out: &mut BTreeSet<String>,
    ) {
        use serde_json::Value::{Array, Object};
        match (a, b) {
            (Object(x), Object(y)) => {
                for k in x.keys().chain(y.keys()).collect::<BTreeSet<_>>() {
                    let null = serde_json::Value::Null;
                    let (l, r) = (x.get(k).unwrap_or(&null), y.get(k).unwrap_or(&null));
                    differences(l, r, format!("{at}/{k}"), out);
                }
            }
            (Array(x), Array(y)) if x.len() == y.len() => {
                for (i, (l, r)) in x.iter().zip(y).enumerate() {
                    differences(l, r, format!("{at}/{i}"), out);
                }
            }
            _ if a != b => {
                out.insert(at);
            }
            _ => {}
        }
    }

    fn changed(relative: &str, rendered: &str) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        let rendered: serde_json::Value = serde_json::from_str(rendered).unwrap();
        differences(&shipped(relative), &rendered, String::new(), &mut out);
        out
    }

    const HCM: &str = "/static_resources/listeners/0/filter_chains/0/filters/0/typed_config";

    #[test]
    fn the_gateway_config_changes_only_ports_paths_and_plugin() {
        let mut c = EnvoyConfig::load(&root(), "envoy/mcpguard.yaml").unwrap();
        assert_eq!(c.filter_kind(), Some(FilterKind::Wasm));
        assert_eq!(c.wasm(Path::new("/abs/filter.wasm")), 1);
        assert_eq!(c.dynamic_module(Path::new("/abs/m.so")), 0);
        c.ports(20001, 20002)
            .cluster_ports("mcpguard_policy", &[20003])
            .unwrap()
            .plugin(|p| p["check_timeout_ms"] = 900.into())
            .unwrap();
        let json = c.to_json();
        let filter = format!("{HCM}/http_filters/1/typed_config/config");
        let expected: BTreeSet<String> = [
            "/admin/address/socket_address/port_value".to_owned(),
            "/static_resources/listeners/0/address/socket_address/port_value".to_owned(),
            format!("{filter}/vm_config/code/local/filename"),
            format!("{filter}/configuration/value"),
            "/static_resources/clusters/0/load_assignment/endpoints/0/lb_endpoints/0/endpoint/address/socket_address/port_value".to_owned(),
        ]
        .into();
        assert_eq!(changed("envoy/mcpguard.yaml", &json), expected);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["admin"]["address"]["socket_address"]["port_value"], 20002);
        let plugin = v.pointer(&format!("{filter}/configuration/value")).unwrap();
        let plugin: serde_json::Value = serde_json::from_str(plugin.as_str().unwrap()).unwrap();
        assert_eq!(plugin["check_timeout_ms"], 900);
        assert_eq!(
            plugin["policy_cluster"], "mcpguard_policy",
            "the rest is kept"
        );
    }

    #[test]
    fn a_cluster_gets_one_endpoint_per_port() {
        let mut c = EnvoyConfig::load(&root(), "envoy/mcpguard.yaml").unwrap();
        c.cluster_ports("mcpguard_policy", &[1, 2, 3]).unwrap();
        let v: serde_json::Value = serde_json::from_str(&c.to_json()).unwrap();
        let eps = &v["static_resources"]["clusters"][0]["load_assignment"]["endpoints"][0]["lb_endpoints"];
        let ports: Vec<_> = eps
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                e["endpoint"]["address"]["socket_address"]["port_value"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(ports, [1, 2, 3]);
        assert!(c.cluster_ports("no_such_cluster", &[1]).is_err());
    }

    #[test]
    fn the_ext_authz_setup_changes_only_ports_and_upstream() {
        let mut c = EnvoyConfig::load(&root(), "bench/envoy/ext-authz.yaml").unwrap();
        c.ports(1, 2)
            .host_rewrite("127.0.0.1:3")
            .ext_authz_uri("http://127.0.0.1:4")
            .cluster_ports("mcpguard_policy", &[4])
            .unwrap()
            .cluster_ports("mcpguard_policy_metadata", &[4])
            .unwrap();
        let changed = changed("bench/envoy/ext-authz.yaml", &c.to_json());
        assert_eq!(changed.len(), 6, "{changed:#?}");
        assert!(
            changed.iter().any(|p| p.ends_with("/host_rewrite_literal")),
            "{changed:#?}"
        );
        assert!(
            changed.iter().any(|p| p.ends_with("/server_uri/uri")),
            "{changed:#?}"
        );
    }

    #[test]
    fn the_dynamic_module_setup_loads_the_given_module() {
        let mut c = EnvoyConfig::load(&root(), "bench/envoy/dynamic-module.yaml").unwrap();
        assert_eq!(c.filter_kind(), Some(FilterKind::DynamicModule));
        assert_eq!(c.wasm(Path::new("/abs/filter.wasm")), 0);
        assert_eq!(c.dynamic_module(Path::new("/abs/m.so")), 1);
        c.plugin(|p| p["issuer"] = "http://127.0.0.1:5".into())
            .unwrap();
        let changed = changed("bench/envoy/dynamic-module.yaml", &c.to_json());
        let ends: Vec<_> = changed
            .iter()
            .map(|p| p.rsplit('/').next().unwrap())
            .collect();
        assert_eq!(ends, ["filename", "value"], "{changed:#?}");
    }

    #[test]
    fn a_config_without_the_filter_says_so() {
        let mut c = EnvoyConfig::load(&root(), "bench/envoy/noauth.yaml").unwrap();
        assert_eq!(c.filter_kind(), None);
        let e = c.plugin(|_| {}).unwrap_err();
        assert!(e.0.contains("no mcpguard filter"), "{e}");
        assert!(EnvoyConfig::load(&root(), "envoy/nonexistent.yaml").is_err());
        assert!(EnvoyConfig::parse("x", "a: [").is_err());
    }
}
