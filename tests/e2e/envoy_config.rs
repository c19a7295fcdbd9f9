//! Every shipped Envoy config loads: `envoy --mode validate` compiles the wasm and runs
//! the filter's `on_configure`, so a bad plugin config fails here.

use std::process::Command;

use mcpguard_e2e::{Envoy, workspace_root};

/// `envoy/*.yaml` and the examples in `envoy/examples/`.
fn shipped_configs() -> Vec<std::path::PathBuf> {
    let mut configs: Vec<_> = ["envoy", "envoy/examples"]
        .into_iter()
        .flat_map(|dir| std::fs::read_dir(workspace_root().join(dir)).unwrap())
        .map(|e| e.unwrap().path())
        .filter(|p| {
            // By file name: the checkout's own path may contain "istio" too.
            p.extension().is_some_and(|e| e == "yaml")
                && !p
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().contains("istio"))
        })
        .collect();
    configs.sort();
    assert!(
        configs
            .iter()
            .any(|p| p.ends_with("examples/ratelimit.yaml")),
        "{configs:?}"
    );
    configs
}

#[test]
fn every_shipped_envoy_config_validates_with_the_built_filter() {
    Envoy::wasm(); // asserts the .wasm exists, with a hint if not
    let configs = shipped_configs();
    assert!(!configs.is_empty());
    for config in configs {
        // As shipped, from the repository root: relative wasm path and all.
        let out = Command::new(Envoy::executable())
            .args(["--mode", "validate", "--disable-hot-restart", "-c"])
            .arg(&config)
            .current_dir(workspace_root())
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&out.stderr).to_string()
            + &String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{} does not validate:\n{log}",
            config.display()
        );
        assert!(
            log.contains("configured, policy cluster"),
            "the filter did not configure:\n{log}"
        );
    }
}

#[test]
fn a_bad_plugin_configuration_is_refused_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let shipped = std::fs::read_to_string(workspace_root().join("envoy/mcpguard.yaml")).unwrap();
    let broken = shipped.replace(
        "\"check_timeout_ms\": 300",
        "\"check_timeout_ms\": 300, \"typo\": 1",
    );
    assert_ne!(
        broken, shipped,
        "the shipped config changed shape; update this test"
    );
    let path = dir.path().join("broken.yaml");
    std::fs::write(&path, broken).unwrap();
    let out = Command::new(Envoy::executable())
        .args(["--mode", "validate", "--disable-hot-restart", "-c"])
        .arg(&path)
        .current_dir(workspace_root())
        .output()
        .unwrap();
    let log =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success(),
        "a config with an unknown field must not load:\n{log}"
    );
    assert!(log.contains("unknown field"), "{log}");
}
