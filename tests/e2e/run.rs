//! `make run`'s `mcpguard-run` on free ports: it starts the four processes, seeds
//! gateway `demo` exposing server `demo`, prints a working MCP URL, and a signal stops
//! every child it started; a port in use is refused before anything starts.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use mcpguard_e2e::mcp::{self, call_text};
use mcpguard_e2e::procs::binary;
use mcpguard_e2e::{Admin, free_port};
use mcpguard_harness::{Proc, wait_ready_async};
use serde_json::json;

struct Ports {
    policy: u16,
    check: u16,
    demo: u16,
    envoy: u16,
    envoy_admin: u16,
    aggregator: u16,
}

impl Ports {
    fn free() -> Ports {
        Ports {
            policy: free_port(),
            check: free_port(),
            demo: free_port(),
            envoy: free_port(),
            envoy_admin: free_port(),
            aggregator: free_port(),
        }
    }

    fn all(&self) -> [u16; 6] {
        [
            self.policy,
            self.check,
            self.demo,
            self.envoy,
            self.envoy_admin,
            self.aggregator,
        ]
    }
}

/// `mcpguard-run` on `ports` with its data and logs under `dir`, on SQLite as `make run`
/// (whatever database the suite runs on), its own output in `<dir>/<name>.log`.
fn start(name: &str, ports: &Ports, dir: &Path) -> Proc {
    let mut cmd = Command::new(binary("mcpguard-run"));
    for (flag, port) in [
        "--policy-port",
        "--check-port",
        "--demo-port",
        "--envoy-port",
        "--envoy-admin-port",
        "--aggregator-port",
    ]
    .into_iter()
    .zip(ports.all())
    {
        cmd.arg(flag).arg(port.to_string());
    }
    cmd.arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--run-dir")
        .arg(dir.join("run"))
        .env_remove("DATABASE_URL")
        .env_remove("MCPGUARD_BOOTSTRAP_ADMIN_TOKEN")
        .env("MCPGUARD_ENVOY", mcpguard_e2e::Envoy::executable());
    Proc::spawn(name, cmd, dir).unwrap()
}

/// Waits for the banner; returns the printed gateway URL, MCP URL and admin token file.
async fn running(run: &mut Proc) -> (String, String, String) {
    let log = run.log_path().to_path_buf();
    let printed = move || {
        let log = log.clone();
        async move { std::fs::read_to_string(log).is_ok_and(|t| t.contains("Ctrl-C stops everything.")) }
    };
    wait_ready_async(run, "mcpguard-run", Duration::from_secs(60), printed)
        .await
        .unwrap();
    let text = run.log_text();
    let field = |label: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(label))
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("no {label:?} line in:\n{text}"))
            .to_owned()
    };
    let token_file = text
        .split("(admin token: ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .unwrap_or_else(|| panic!("no admin token line in:\n{text}"))
        .to_owned();
    (field("gateway URL"), field("MCP endpoint"), token_file)
}

/// The pids of `parent`'s children, from `/proc/*/stat`.
fn children_of(parent: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    let (_, rest) = s.rsplit_once(") ")?;
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(parent)
        })
        .collect()
}

/// Until `run` exits (it must within 30 s: its own grace is 10 s).
async fn exit_of(run: &mut Proc) -> ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = run.exited() {
            return status;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "mcpguard-run did not exit; its output:\n{}",
            run.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn listening(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

#[tokio::test]
async fn make_run_serves_mcp_with_its_seed_and_a_signal_stops_every_child() {
    let dir = tempfile::tempdir().unwrap();
    let ports = Ports::free();
    let mut run = start("mcpguard-run", &ports, dir.path());
    let (gateway_url, mcp_url, token_file) = running(&mut run).await;
    assert_eq!(
        gateway_url,
        format!("http://127.0.0.1:{}/mcp/demo", ports.envoy)
    );
    assert_eq!(
        mcp_url,
        format!("http://127.0.0.1:{}/mcp/demo/demo", ports.envoy)
    );
    let banner = run.log_text();
    assert!(
        banner.find("gateway URL") < banner.find("MCP endpoint"),
        "the gateway URL is printed first:\n{banner}"
    );
    let children = children_of(run.pid());
    assert_eq!(
        children.len(),
        4,
        "policy, demo server, Envoy, aggregator: {children:?}"
    );

    // The printed admin token and seed work: a host token reaches the demo server.
    let admin_token = std::fs::read_to_string(&token_file).unwrap();
    let admin = Admin::new(
        format!("http://127.0.0.1:{}", ports.policy),
        admin_token.trim(),
    );
    let host = admin.host("run test").await;
    let token = admin.token(host, 1).await["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let client = mcp::connect(&mcp_url, Some(&token)).await.unwrap();
    let echoed = call_text(&client, "echo", json!({"text": "through make run"}))
        .await
        .unwrap();
    assert!(echoed.contains("through make run"), "{echoed}");
    drop(client);
    // The gateway URL, as the banner says: the demo server's tools, renamed.
    let client = mcp::connect(&gateway_url, Some(&token)).await.unwrap();
    let echoed = call_text(
        &client,
        "demo__echo",
        json!({"text": "through the gateway URL"}),
    )
    .await
    .unwrap();
    assert_eq!(echoed, "through the gateway URL");
    drop(client);
    // And through the filter: no token, no service.
    mcp::expect_refusal(&mcp_url, None, (401, "token_missing")).await;
    mcp::expect_refusal(&gateway_url, None, (401, "token_missing")).await;

    // The printed one-time console link opens the owner's sign-in page.
    let text = run.log_text();
    let link = text
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with(&format!("http://127.0.0.1:{}/console/link/", ports.policy)))
        .unwrap_or_else(|| panic!("no console link in:\n{text}"))
        .to_owned();
    let page = reqwest::get(&link).await.unwrap();
    assert_eq!(page.status(), 200, "{link}");
    assert!(page.text().await.unwrap().contains("/console/link/"));

    run.terminate();
    let status = exit_of(&mut run).await;
    assert_eq!(status.code(), Some(143), "{}", run.log_text());
    for pid in children {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "child {pid} outlived mcpguard-run"
        );
    }
    for port in ports.all() {
        assert!(!listening(port), "port {port} still served");
    }

    // Again on the same data: the seed is found, not duplicated; Ctrl-C (SIGINT) stops.
    let mut again = start("mcpguard-run-again", &ports, dir.path());
    running(&mut again).await;
    assert!(
        again
            .log_text()
            .contains("(gateway `demo` id 1, server `demo` id 1)"),
        "{}",
        again.log_text()
    );
    let children = children_of(again.pid());
    assert_eq!(children.len(), 4, "{children:?}");
    let kill = Command::new("kill")
        .args(["-INT", &again.pid().to_string()])
        .status()
        .unwrap();
    assert!(kill.success(), "kill -INT");
    assert_eq!(exit_of(&mut again).await.code(), Some(130));
    for pid in children {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "child {pid} outlived it"
        );
    }
}

#[tokio::test]
async fn make_run_refuses_a_port_in_use_before_starting_anything() {
    let dir = tempfile::tempdir().unwrap();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut ports = Ports::free();
    ports.envoy = taken.local_addr().unwrap().port();
    let mut run = start("mcpguard-run", &ports, dir.path());
    let status = exit_of(&mut run).await;
    assert_eq!(status.code(), Some(1));
    let text = run.log_text();
    assert!(
        text.contains(&format!("port 127.0.0.1:{} is already in use", ports.envoy)),
        "{text}"
    );
    assert!(
        !dir.path().join("run/policy.log").exists(),
        "nothing started"
    );
}
