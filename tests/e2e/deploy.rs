//! The Kubernetes and Istio manifests of `deploy/`, rendered as a release renders them:
//! every object valid for its schema (Istio's CRDs, Kubernetes' own via PyPI
//! `kubernetes-validate`, both offline and strict), every WasmPlugin's `pluginConfig`
//! one the filter's own parser accepts and pointing at the policy Service of the
//! manifests, the `.wasm` checksum the built file's, and the Istio parts, turned into
//! the Envoy configuration istiod makes of them, run by real Envoy in front of the real
//! policy service and demo server.

use mcpguard_e2e::gateway::Aggregator;
use mcpguard_e2e::istio::{self, Manifests, Patches};
use mcpguard_e2e::mcp::{self, call_text, expect_refusal};
use mcpguard_e2e::raw::{self, Spy};
use mcpguard_e2e::{Demo, Envoy, Policy, free_port, workspace_root};
use mcpguard_filter::config::FilterConfig;
use serde_json::json;
use serde_yaml::Value;

#[test]
fn every_manifest_is_valid_for_its_schema() {
    let m = Manifests::render();
    let (ok, report) = istio::validate(&[m.dir.path()]);
    assert!(ok, "the manifests do not validate:\n{report}");
    let checked = report.lines().filter(|l| l.starts_with("ok ")).count();
    assert_eq!(checked, m.docs.len(), "one verdict per object:\n{report}");
    let mut kinds: Vec<_> = m
        .docs
        .iter()
        .map(|(_, d)| d["kind"].as_str().unwrap().to_owned())
        .collect();
    kinds.sort();
    assert_eq!(
        kinds,
        [
            "AuthorizationPolicy",
            "AuthorizationPolicy",
            "Deployment",
            "Deployment",
            "EnvoyFilter",
            "EnvoyFilter",
            "Gateway",
            "Namespace",
            "PeerAuthentication",
            "PeerAuthentication",
            "PodDisruptionBudget",
            "PodDisruptionBudget",
            "Service",
            "Service",
            "ServiceAccount",
            "VirtualService",
            "WasmPlugin",
            "WasmPlugin",
        ]
    );
}

#[test]
fn the_validator_refuses_what_a_strict_cluster_refuses() {
    let m = Manifests::render();
    let dir = tempfile::tempdir().unwrap();
    let broken = |file: &str, from: &str, to: &str| {
        let text = std::fs::read_to_string(m.dir.path().join(file)).unwrap();
        assert!(
            text.contains(from),
            "{file} changed shape: update this test"
        );
        let name = format!("{}.yaml", file.replace(['/', '.'], "-"));
        std::fs::write(dir.path().join(&name), text.replacen(from, to, 1)).unwrap();
        dir.path().join(name)
    };
    for (file, from, to, why) in [
        (
            "kubernetes/policy-deployment.yaml",
            "readOnlyRootFilesystem: true",
            "readOnlyRootFs: true",
            "'readOnlyRootFs' was unexpected",
        ),
        (
            "kubernetes/policy-deployment.yaml",
            "replicas: 2",
            "replicas: two",
            "'two' is not of type",
        ),
        (
            "istio/wasmplugin-sidecar.yaml",
            "failStrategy: FAIL_CLOSE",
            "failStrategy: FAIL_CLOSED",
            "'FAIL_CLOSED' is not one of",
        ),
        (
            "istio/wasmplugin-sidecar.yaml",
            "pluginName:",
            "plugin_name:",
            "'plugin_name' was unexpected",
        ),
        (
            "istio/sidecar-mcp-parser.yaml",
            "operation: MERGE",
            "operation: MERG",
            "'MERG' is not one of",
        ),
        (
            "istio/peer-authentication.yaml",
            "apiVersion: security.istio.io/v1",
            "apiVersion: security.istio.io/v9",
            "no schema for security.istio.io/v9 PeerAuthentication",
        ),
    ] {
        let path = broken(file, from, to);
        let (ok, report) = istio::validate(&[&path]);
        assert!(!ok, "{file} with {to:?} passed:\n{report}");
        assert!(report.contains(why), "{file}: {why:?} not in\n{report}");
    }
}

#[test]
fn each_wasmplugin_is_the_built_filter_configured_for_the_manifests_policy_service() {
    let m = Manifests::render();
    let service = m.get("Service", "mcpguard-policy");
    let check_port = service["spec"]["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|p| p["targetPort"] == "check")
        .expect("the check port");
    assert_eq!(check_port["appProtocol"], "http2", "callouts are HTTP/2");
    let host = format!(
        "{}.{}.svc.cluster.local",
        service["metadata"]["name"].as_str().unwrap(),
        service["metadata"]["namespace"].as_str().unwrap()
    );
    let port = check_port["port"].as_u64().unwrap();
    let plugins = m.of_kind("WasmPlugin");
    assert_eq!(plugins.len(), 2);
    for plugin in plugins {
        let spec = &plugin["spec"];
        let name = plugin["metadata"]["name"].as_str().unwrap();
        assert_eq!(spec["url"], istio::WASM_URL, "{name}");
        assert_eq!(
            spec["sha256"].as_str(),
            Some(m.wasm_sha256.as_str()),
            "{name}"
        );
        assert_eq!(spec["failStrategy"], "FAIL_CLOSE", "{name}: fail closed");
        let config = FilterConfig::parse(istio::plugin_config(plugin).as_bytes())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            config.policy_cluster,
            format!("outbound|{port}||{host}"),
            "{name}"
        );
        assert_eq!(config.policy_authority, format!("{host}:{port}"), "{name}");
        // Each plugin goes with an EnvoyFilter for the same workloads.
        let envoy_filter = m.envoy_filter_for(plugin);
        match &config.sidecar {
            Some(sidecar) => {
                assert_eq!(
                    spec["selector"]["matchLabels"]["mcpguard.io/server"].as_str(),
                    Some(sidecar.server.as_str()),
                    "{name}: selected by the server's label"
                );
                assert_eq!(spec["match"][0]["mode"], "SERVER", "{name}: inbound");
                assert_eq!(
                    spec["match"][0]["ports"][0]["number"].as_u64(),
                    Some(istio::APP_PORT.into())
                );
            }
            None => {
                assert_eq!(spec["selector"]["matchLabels"]["istio"], "ingressgateway");
                assert!(config.issuer.is_some() && config.public_base_url.is_some());
                let added: Vec<_> = envoy_filter["spec"]["configPatches"]
                    .as_sequence()
                    .unwrap()
                    .iter()
                    .filter(|p| p["applyTo"] == "CLUSTER" && p["patch"]["operation"] == "ADD")
                    .map(|p| p["patch"]["value"]["name"].as_str().unwrap())
                    .collect();
                assert_eq!(added, ["mcpguard_upstream_http", "mcpguard_upstream_https"]);
            }
        }
    }
}

#[test]
fn the_policy_deployment_is_replicated_locked_down_and_fed_from_secrets() {
    let m = Manifests::render();
    let d = &m.get("Deployment", "mcpguard-policy")["spec"];
    assert_eq!(d["replicas"], 2);
    // No two versions on one database at once (docs/operations.md, Upgrading).
    assert_eq!(d["strategy"]["type"], "Recreate");
    let pod = &d["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let policy = &pod["containers"][0];
    assert_eq!(policy["image"], istio::POLICY_IMAGE);
    assert_eq!(policy["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(policy["securityContext"]["allowPrivilegeEscalation"], false);
    assert!(policy["resources"]["requests"]["cpu"].is_string());
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        assert_eq!(policy[probe]["httpGet"]["path"], "/healthz", "{probe}");
    }
    let env = |name: &str| -> Value {
        policy["env"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .unwrap_or_else(|| panic!("no {name}"))
            .clone()
    };
    assert_eq!(env("MCPGUARD_CHECK_AUTH")["value"], "mesh");
    assert_eq!(
        env("DATABASE_URL")["valueFrom"]["secretKeyRef"]["name"],
        "mcpguard-policy"
    );
    assert_eq!(
        env("MCPGUARD_BOOTSTRAP_ADMIN_TOKEN")["valueFrom"]["secretKeyRef"]["key"],
        "bootstrap-admin-token"
    );
    // The key comes from the Secret, copied to a memory volume with mode 0400 (the
    // service refuses a key its group may read).
    let key_file = env("MCPGUARD_SECRETS_KEY_FILE")["value"]
        .as_str()
        .unwrap()
        .to_owned();
    let init = &pod["initContainers"][0];
    let copy = init["command"].as_sequence().unwrap();
    assert_eq!(copy[..3], ["install", "-m", "0400"]);
    let mount = |c: &Value, volume: &str| -> String {
        let m = c["volumeMounts"].as_sequence().unwrap();
        let m = m.iter().find(|m| m["name"] == volume).unwrap();
        m["mountPath"].as_str().unwrap().to_owned()
    };
    assert_eq!(
        copy[4].as_str(),
        Some(&*format!("{}/secrets.key", mount(init, "keys")))
    );
    assert_eq!(key_file, format!("{}/secrets.key", mount(policy, "keys")));
    let secret = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "secret")
        .unwrap();
    assert_eq!(secret["secret"]["secretName"], "mcpguard-policy");

    let peer = m.get("PeerAuthentication", "mcpguard-policy");
    assert_eq!(peer["spec"]["mtls"]["mode"], "STRICT");
    let authz = &m.get("AuthorizationPolicy", "mcpguard-policy")["spec"];
    assert_eq!(authz["action"], "ALLOW");
    let check_rule = authz["rules"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|r| r["to"][0]["operation"]["ports"][0] == "8081")
        .expect("a rule for the check port");
    // Only the proxies that run the filter, by mesh identity: the ingress gateway's
    // service account and the sidecar WasmPlugins' namespaces; never any peer ("*").
    let sources = check_rule["from"].as_sequence().unwrap();
    let named = |field: &str| -> Vec<String> {
        sources
            .iter()
            .flat_map(|s| {
                s["source"][field]
                    .as_sequence()
                    .cloned()
                    .unwrap_or_default()
            })
            .map(|v| v.as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        named("principals"),
        [
            "cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account",
            "cluster.local/ns/mcpguard/sa/mcpguard-aggregator",
        ]
    );
    for plugin in m.of_kind("WasmPlugin") {
        let ns = plugin["metadata"]["namespace"].as_str().unwrap();
        if plugin["spec"]["pluginConfig"]["sidecar"].is_mapping() {
            assert!(named("namespaces").iter().any(|n| n == ns), "{ns}");
        }
    }
}

/// The gateway URL's aggregator: the policy image's other binary, locked down like the
/// policy service, checking on the policy Service's check port with its own mesh
/// identity (admitted there), and reachable only from the ingress gateway.
#[test]
fn the_aggregator_is_locked_down_and_reachable_only_from_the_ingress_gateway() {
    let m = Manifests::render();
    let d = &m.get("Deployment", "mcpguard-aggregator")["spec"];
    let pod = &d["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["serviceAccountName"], "mcpguard-aggregator");
    m.get("ServiceAccount", "mcpguard-aggregator");
    let c = &pod["containers"][0];
    assert_eq!(c["image"], istio::POLICY_IMAGE);
    assert_eq!(c["command"][0], "/usr/local/bin/mcpguard-aggregator");
    let containerfile = std::fs::read_to_string(workspace_root().join("Containerfile")).unwrap();
    assert!(
        containerfile.contains("COPY mcpguard-aggregator /usr/local/bin/mcpguard-aggregator"),
        "the image holds the aggregator"
    );
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert!(c["resources"]["requests"]["cpu"].is_string());
    assert!(c["resources"]["limits"]["memory"].is_string());
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        assert_eq!(c[probe]["httpGet"]["path"], "/healthz", "{probe}");
    }
    let env = |name: &str| -> String {
        c["env"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .unwrap_or_else(|| panic!("no {name}"))["value"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(env("MCPGUARD_AGGREGATOR_LISTEN"), "0.0.0.0:8082");
    // Not one thread per node CPU in a pod without a CPU limit.
    assert_eq!(env("MCPGUARD_AGGREGATOR_WORKER_THREADS"), "2");
    assert_eq!(c["ports"][0]["containerPort"], 8082);
    assert_eq!(
        env("MCPGUARD_POLICY_CHECK_URL"),
        "http://mcpguard-policy.mcpguard.svc.cluster.local:8081",
        "the policy Service's check port"
    );
    let service = &m.get("Service", "mcpguard-aggregator")["spec"];
    assert_eq!(service["ports"][0]["port"], 8082);
    assert_eq!(
        service["selector"],
        d["template"]["metadata"]["labels"]["app.kubernetes.io/name"]
            .as_str()
            .map(|n| serde_yaml::to_value(json!({"app.kubernetes.io/name": n})).unwrap())
            .unwrap()
    );

    let peer = m.get("PeerAuthentication", "mcpguard-aggregator");
    assert_eq!(peer["spec"]["mtls"]["mode"], "STRICT");
    let authz = &m.get("AuthorizationPolicy", "mcpguard-aggregator")["spec"];
    assert_eq!(authz["action"], "ALLOW");
    assert_eq!(
        authz["selector"]["matchLabels"]["app.kubernetes.io/name"],
        "mcpguard-aggregator"
    );
    let rules = authz["rules"].as_sequence().unwrap();
    assert_eq!(rules.len(), 1, "one rule: the gateway's");
    assert_eq!(
        rules[0]["from"],
        serde_yaml::to_value(json!([{"source": {"principals": [
            "cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account"
        ]}}]))
        .unwrap()
    );
    assert_eq!(rules[0]["to"][0]["operation"]["ports"][0], "8082");
}

#[test]
fn unrendered_manifests_hold_placeholders_and_rendering_checks_its_inputs() {
    let root = workspace_root().join("deploy");
    let sidecar = std::fs::read_to_string(root.join("istio/wasmplugin-sidecar.yaml")).unwrap();
    assert!(sidecar.contains("sha256: \"@WASM_SHA256@\""));
    let m = Manifests::render();
    for (file, doc) in &m.docs {
        let text = serde_yaml::to_string(doc).unwrap();
        for placeholder in ["@WASM_URL@", "@WASM_SHA256@", "@POLICY_IMAGE@"] {
            assert!(!text.contains(placeholder), "{file}: {placeholder}");
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().display().to_string();
    let wasm = Envoy::wasm().display().to_string();
    for (url, image) in [
        ("ftp://example.com/f.wasm", istio::POLICY_IMAGE),
        ("https://example.com/a|b", istio::POLICY_IMAGE),
        (istio::WASM_URL, "Image With Spaces"),
    ] {
        let out = istio::render_script(&[&out_dir, &wasm, url, image]);
        assert!(!out.status.success(), "{url} {image} was rendered");
    }
    let out = istio::render_script(&[&out_dir, "/nonexistent.wasm", istio::WASM_URL, "x/y:1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no .wasm"));
}

/// The sidecar WasmPlugin and its EnvoyFilter as istiod applies them, in front of the
/// demo server: the filter checks, the app is reached only through it.
#[tokio::test]
async fn the_sidecar_manifests_as_istio_applies_them_guard_the_app() {
    let m = Manifests::render();
    let plugin = m.get("WasmPlugin", "mcpguard-sidecar-demo");
    let dir = tempfile::tempdir().unwrap();
    let policy = Policy::start(&dir.path().join("data"), dir.path()).await;
    let demo = Demo::start(dir.path()).await;
    let log_dir = dir.path();
    let start = |patches, app_port| {
        let ports = (free_port(), free_port());
        let config = istio::sidecar_envoy(&m, plugin, patches, ports, app_port, policy.check_port);
        async move { Envoy::start_config(&config, ports.0, ports.1, log_dir).await }
    };
    let envoy = start(Patches::All, demo.port).await;
    let admin = policy.admin();
    let p = admin.provision("eng", "demo", &demo.upstream_url()).await;
    // Both URLs: with the gateway, and the app's own (the token's gateway).
    let app_url = format!("{}/mcp", envoy.base_url());
    for url in [envoy.mcp_url("eng", "demo"), app_url] {
        let client = mcp::connect(&url, Some(&p.token))
            .await
            .expect("an MCP session through the sidecar");
        let echoed = call_text(&client, "echo", json!({"text": "via the manifests"}))
            .await
            .unwrap();
        assert_eq!(echoed, "via the manifests");
        expect_refusal(&url, None, (401, "token_missing")).await;
    }
    // The MCP parser the EnvoyFilter puts first names the tool in the audit.
    let entry = admin.allowed_decision(|e| e["tool"] == "echo").await;
    assert_eq!(entry["gateway"], "eng", "{entry}");

    // A path that is no MCP endpoint passes the filter untouched, to Envoy's routes:
    // Istio's default route would forward it to the app, token-less; with the route
    // patches it meets the 404. An app that records what reaches it shows both.
    let app = Spy::start().await;
    let guarded = start(Patches::All, app.port).await;
    let unguarded = start(Patches::NoRoutes, app.port).await;
    let get = |port: u16| format!("GET /admin/secrets HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n");
    let (status, body) = raw::request(guarded.port, get(guarded.port).as_bytes(), b"").await;
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("unknown_route"), "{body}");
    assert!(app.paths().is_empty(), "reached the app: {:?}", app.paths());
    let (status, _) = raw::request(unguarded.port, get(unguarded.port).as_bytes(), b"").await;
    assert_eq!(status, 200);
    assert_eq!(
        app.paths(),
        ["/admin/secrets"],
        "without the patches it reaches the app"
    );
}

/// The gateway WasmPlugin, its EnvoyFilter and the Gateway's VirtualService as istiod
/// applies them on the ingress gateway: MCP requests are checked and routed to the
/// upstream the policy service judged, the gateway URL to the aggregators' Service
/// (a session staying on one of two); other paths reach the policy service's public
/// port.
#[tokio::test]
async fn the_gateway_manifests_as_istio_applies_them_check_and_route() {
    let m = Manifests::render();
    let dir = tempfile::tempdir().unwrap();
    let policy = Policy::start(&dir.path().join("data"), dir.path()).await;
    let demo = Demo::start(dir.path()).await;
    let aggregators = [
        Aggregator::start(policy.check_port, dir.path()).await,
        Aggregator::start(policy.check_port, dir.path()).await,
    ];
    let ports = (free_port(), free_port());
    let config = istio::gateway_envoy(
        &m,
        ports,
        policy.check_port,
        policy.public_port,
        &[aggregators[0].port, aggregators[1].port],
    );
    let envoy = Envoy::start_config(&config, ports.0, ports.1, dir.path()).await;
    let admin = policy.admin();
    let p = admin.provision("eng", "demo", &demo.upstream_url()).await;
    let url = envoy.mcp_url("eng", "demo");
    let client = mcp::connect(&url, Some(&p.token))
        .await
        .expect("an MCP session through the ingress gateway");
    let echoed = call_text(&client, "echo", json!({"text": "gateway mode"}))
        .await
        .unwrap();
    assert_eq!(echoed, "gateway mode");
    let entry = admin.allowed_decision(|e| e["tool"] == "echo").await;
    assert_eq!(entry["server"], "demo", "{entry}");
    let missing = expect_refusal(&url, None, (401, "token_missing")).await;
    let challenge = missing.header("www-authenticate").unwrap_or_default();
    assert!(
        challenge.contains("https://mcp.example.com/"),
        "metadata named at the public base URL: {challenge}"
    );
    expect_refusal(
        &envoy.mcp_url("eng", "nope"),
        Some(&p.token),
        (403, "server_not_exposed"),
    )
    .await;
    // The gateway URL reaches an aggregator, and every request of a session the one
    // that opened it (the route's hash on the caller, the cluster's ring hash): with
    // Istio's default balancing half of them would be 404.
    let gateway_url = format!("{}/mcp/eng", envoy.base_url());
    let client = mcp::connect(&gateway_url, Some(&p.token))
        .await
        .expect("an MCP session on the gateway URL");
    for n in 0..6 {
        let text = format!("gateway url {n}");
        assert_eq!(
            call_text(&client, "demo__echo", json!({"text": text}))
                .await
                .unwrap(),
            text
        );
    }
    client.cancel().await.unwrap();
    expect_refusal(&gateway_url, None, (401, "token_missing")).await;

    // Everything that is no MCP path goes to the public port.
    let healthz = reqwest::get(format!("{}/healthz", envoy.base_url()))
        .await
        .unwrap();
    assert_eq!(healthz.status(), 200);
    assert_eq!(
        healthz.json::<serde_json::Value>().await.unwrap()["status"],
        "ok"
    );
}
