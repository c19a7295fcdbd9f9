//! `mcpguard-run` (what `make run` starts): a local mcpguard gateway from the debug
//! builds and the venv's Envoy, on the one process harness.
//!
//!   policy service  127.0.0.1:8080 (admin API), 127.0.0.1:8081 (checks); data in data/
//!   demo MCP server 127.0.0.1:9100/mcp
//!   Envoy           127.0.0.1:10000 (data plane), 127.0.0.1:9901 (admin)
//!   aggregator      127.0.0.1:8082 (the gateway URL /mcp/{gateway}, behind Envoy)
//!
//! Logs go to .run/*.log. Seeds (idempotently) gateway `demo` exposing server `demo`.
//! Ctrl-C or SIGTERM, or any of the four exiting, stops all of them. See [`USAGE`] for
//! the flags (other ports and directories, e.g. for a test).

mod seed;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Duration;

use mcpguard_harness::envoy::{self, EnvoyConfig};
use mcpguard_harness::ready::listening;
use mcpguard_harness::{Group, Proc, http, wait_ready, workspace_root};

const USAGE: &str = "\
usage: mcpguard-run [options]    (`make run` builds first, then runs this)
  --policy-port P       the policy service's public port: admin API, OAuth (8080)
  --check-port P        its check port, which Envoy calls (8081)
  --demo-port P         the demo MCP server (9100)
  --envoy-port P        Envoy's data plane (10000)
  --envoy-admin-port P  Envoy's admin (9901)
  --aggregator-port P   the gateway URL's aggregator, behind Envoy (8082)
  --data-dir DIR        the policy service's data: SQLite database, keys (data)
  --run-dir DIR         logs and the rendered Envoy config (.run)
  -h, --help            this text
Relative directories are under the repository root.";

/// For each of the four to become ready.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// For all of them to exit after SIGTERM, before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How often the running processes are looked at.
const SUPERVISE_POLL: Duration = Duration::from_millis(100);

struct Options {
    policy_port: u16,
    check_port: u16,
    demo_port: u16,
    envoy_port: u16,
    envoy_admin_port: u16,
    aggregator_port: u16,
    data_dir: PathBuf,
    run_dir: PathBuf,
}

/// Why the run ends.
enum Stop {
    /// SIGINT or SIGTERM: exit 130 or 143.
    Signal(u8),
    /// Something failed: the message, exit 1.
    Failed(String),
}

fn options(root: &Path, args: impl IntoIterator<Item = String>) -> Result<Options, String> {
    let mut o = Options {
        policy_port: 8080,
        check_port: 8081,
        demo_port: 9100,
        envoy_port: 10000,
        envoy_admin_port: 9901,
        aggregator_port: 8082,
        data_dir: root.join("data"),
        run_dir: root.join(".run"),
    };
    let mut args = args.into_iter();
    while let Some(flag) = args.next() {
        if flag == "-h" || flag == "--help" {
            return Err(USAGE.to_owned());
        }
        let value = args
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        let port = || {
            value
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("{flag}: not a port: {value:?}"))
        };
        match flag.as_str() {
            "--policy-port" => o.policy_port = port()?,
            "--check-port" => o.check_port = port()?,
            "--demo-port" => o.demo_port = port()?,
            "--envoy-port" => o.envoy_port = port()?,
            "--envoy-admin-port" => o.envoy_admin_port = port()?,
            "--aggregator-port" => o.aggregator_port = port()?,
            "--data-dir" => o.data_dir = root.join(&value),
            "--run-dir" => o.run_dir = root.join(&value),
            _ => return Err(format!("unknown option {flag}\n{USAGE}")),
        }
    }
    Ok(o)
}

fn main() -> ExitCode {
    let root = workspace_root();
    let opts = match options(&root, std::env::args().skip(1)) {
        Ok(o) => o,
        Err(text) if text == USAGE => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("run: {e}");
            return ExitCode::FAILURE;
        }
    };
    let signals = match mcpguard_harness::signals::exit_codes() {
        Ok(rx) => rx,
        Err(e) => {
            eprintln!("run: cannot handle signals: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut running = Running(Vec::new());
    let stop = match start(&root, &opts, &mut running, &signals) {
        Ok(()) => supervise(&mut running, &signals, &opts.run_dir),
        Err(stop) => stop,
    };
    match stop {
        Stop::Signal(code) => {
            println!("\nrun: stopping");
            running.stop_all();
            ExitCode::from(code)
        }
        Stop::Failed(why) => {
            eprintln!("run: {why}");
            running.stop_all();
            ExitCode::FAILURE
        }
    }
}

/// The started processes, in start order; stopped (SIGTERM, then SIGKILL) on drop too.
struct Running(Vec<Proc>);

impl Running {
    /// SIGTERM to all (Envoy's process group included), newest first; up to
    /// [`STOP_GRACE`] for all to exit; SIGKILL to those still running.
    fn stop_all(&mut self) {
        for p in self.0.iter_mut().rev() {
            p.terminate();
        }
        let start = std::time::Instant::now();
        while self.0.iter_mut().any(Proc::alive) && start.elapsed() < STOP_GRACE {
            std::thread::sleep(Duration::from_millis(100));
        }
        for p in &mut self.0 {
            if p.alive() {
                eprintln!("run: {} did not stop on SIGTERM; killing it", p.name());
                p.kill();
            }
        }
        self.0.clear();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop_all();
    }
}

fn failed(why: impl Into<String>) -> Stop {
    Stop::Failed(why.into())
}

/// The binaries `make build` makes: `target/debug`, or `$MCPGUARD_BIN_DIR`.
fn binary(root: &Path, name: &str) -> PathBuf {
    std::env::var_os("MCPGUARD_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/debug"))
        .join(name)
}

fn present(path: PathBuf) -> Result<PathBuf, Stop> {
    if path.exists() {
        Ok(path)
    } else {
        Err(failed(format!(
            "{} is missing: run `make run` (it builds and installs first)",
            path.display()
        )))
    }
}

/// Waits for `proc` to be ready, or for a signal (checked between probes).
fn wait(proc: &mut Proc, signals: &Receiver<u8>, probe: impl Fn() -> bool) -> Result<(), Stop> {
    let mut signal = None;
    let name = proc.name().to_owned();
    let outcome = wait_ready(proc, &name, STARTUP_TIMEOUT, || {
        signal = signal.or_else(|| signals.try_recv().ok());
        signal.is_some() || probe()
    });
    // A Ctrl-C reaches the policy service and the demo server too: a child that exited
    // because of it is a stop, not a failure.
    if let Some(code) = signal.or_else(|| signals.try_recv().ok()) {
        return Err(Stop::Signal(code));
    }
    outcome.map_err(|e| failed(e.to_string()))
}

fn start(
    root: &Path,
    o: &Options,
    running: &mut Running,
    signals: &Receiver<u8>,
) -> Result<(), Stop> {
    let policy_bin = present(binary(root, "mcpguard-policy"))?;
    let demo_bin = present(binary(root, "mcpguard-demo-mcp"))?;
    let aggregator_bin = present(binary(root, "mcpguard-aggregator"))?;
    let wasm = present(root.join("target/wasm32-wasip1/release/mcpguard_filter.wasm"))?;
    let envoy_bin =
        envoy::executable(root).map_err(|e| failed(format!("{e} (`make run` installs it)")))?;
    for port in [
        o.policy_port,
        o.check_port,
        o.demo_port,
        o.envoy_port,
        o.envoy_admin_port,
        o.aggregator_port,
    ] {
        if listening(port) {
            return Err(failed(format!(
                "port 127.0.0.1:{port} is already in use (an earlier `make run` still up?); \
                 find the owner with: ss -ltnp 'sport = :{port}'"
            )));
        }
    }
    // The logs hold what the services print, the bootstrap admin token among it: only
    // this user may read them (the harness makes each log 0600).
    std::fs::create_dir_all(&o.run_dir)
        .and_then(|()| std::fs::set_permissions(&o.run_dir, std::fs::Permissions::from_mode(0o700)))
        .map_err(|e| failed(format!("creating {}: {e}", o.run_dir.display())))?;
    let spawn = |name: &str, cmd: Command, group: Group| {
        Proc::spawn_in(name, cmd, &o.run_dir, group).map_err(|e| failed(e.to_string()))
    };

    let mut cmd = Command::new(policy_bin);
    cmd.env("NO_COLOR", "1")
        .arg("--public-listen")
        .arg(format!("127.0.0.1:{}", o.policy_port))
        .arg("--check-listen")
        .arg(format!("127.0.0.1:{}", o.check_port))
        .arg("--data-dir")
        .arg(&o.data_dir)
        .current_dir(root);
    // Where the data plane and Envoy's admin are (the defaults are the default ports):
    // unless the environment says otherwise already.
    for (var, value) in [
        (
            "MCPGUARD_RESOURCE_BASE_URLS",
            format!("http://127.0.0.1:{}", o.envoy_port),
        ),
        (
            "MCPGUARD_ENVOY_ADMIN_ADDR",
            format!("127.0.0.1:{}", o.envoy_admin_port),
        ),
    ] {
        if std::env::var_os(var).is_none() {
            cmd.env(var, value);
        }
    }
    running.0.push(spawn("policy", cmd, Group::Inherit)?);
    let mut cmd = Command::new(demo_bin);
    cmd.arg("--listen")
        .arg(format!("127.0.0.1:{}", o.demo_port));
    running.0.push(spawn("demo-mcp", cmd, Group::Inherit)?);
    let (public, check) = (o.policy_port, o.check_port);
    wait(&mut running.0[0], signals, || {
        http::http_ok(public, "/healthz") && http::http_ok(check, "/healthz")
    })?;

    // Envoy proves itself to the check port with the secret the policy service made on
    // its first start; in its environment, not on any command line.
    let secret_file = o.data_dir.join("check-secret");
    let secret = std::fs::read_to_string(&secret_file)
        .map(|s| s.split_whitespace().collect::<String>())
        .unwrap_or_default();
    if secret.is_empty() {
        return Err(failed(format!(
            "{} is missing after the policy service started",
            secret_file.display()
        )));
    }
    let mut config = EnvoyConfig::load(root, "envoy/mcpguard.yaml").map_err(|e| failed(e.0))?;
    config.ports(o.envoy_port, o.envoy_admin_port).wasm(&wasm);
    let issuer = format!("http://127.0.0.1:{}", o.policy_port);
    config
        .cluster_ports("mcpguard_policy", &[o.check_port])
        .and_then(|c| c.cluster_ports("mcpguard_aggregator", &[o.aggregator_port]))
        .and_then(|c| c.plugin(|p| p["issuer"] = issuer.into()))
        .map_err(|e| failed(e.0))?;
    let config_path = o.run_dir.join("envoy.json");
    std::fs::write(&config_path, config.to_json())
        .map_err(|e| failed(format!("writing {}: {e}", config_path.display())))?;
    // Envoy in a process group of its own, so a terminal's Ctrl-C does not reach it
    // unasked: it is stopped with the others, by SIGTERM to its group.
    let cmd = envoy::command(&envoy_bin, &config_path, "warn", &secret, root);
    running.0.push(spawn("envoy", cmd, Group::Own)?);

    let demo = o.demo_port;
    wait(&mut running.0[1], signals, || listening(demo))?;
    let admin = o.envoy_admin_port;
    wait(&mut running.0[2], signals, || {
        http::http_ok(admin, "/ready")
    })?;

    // The gateway URL's aggregator: checks each server on the check port, with the
    // same secret as Envoy (read from its file, not from a command line).
    let mut cmd = Command::new(aggregator_bin);
    cmd.env("NO_COLOR", "1")
        .arg("--listen")
        .arg(format!("127.0.0.1:{}", o.aggregator_port))
        .arg("--policy-check-url")
        .arg(format!("http://127.0.0.1:{}", o.check_port))
        .arg("--check-secret-file")
        .arg(&secret_file);
    running.0.push(spawn("aggregator", cmd, Group::Inherit)?);
    let aggregator = o.aggregator_port;
    wait(&mut running.0[3], signals, || {
        http::http_ok(aggregator, "/healthz")
    })?;

    let (token, token_source) = admin_token(&o.data_dir)?;
    let upstream = format!("http://127.0.0.1:{}/mcp", o.demo_port);
    let seeded = seed::seed(o.policy_port, &token, &upstream).map_err(failed)?;
    let link = console_link(root, o)?;
    print!("{}", banner(o, &seeded, &token_source, &link));
    Ok(())
}

/// A one-time way in for `owner`, so that a newcomer needs no curl: the link signs in
/// once, within 15 minutes (`mcpguard-policy console-link` makes another).
fn console_link(root: &Path, o: &Options) -> Result<String, Stop> {
    let policy_bin = present(binary(root, "mcpguard-policy"))?;
    let out = Command::new(policy_bin)
        .env("NO_COLOR", "1")
        .arg("--data-dir")
        .arg(&o.data_dir)
        .arg("--issuer")
        .arg(format!("http://127.0.0.1:{}", o.policy_port))
        .arg("console-link")
        .current_dir(root)
        .output()
        .map_err(|e| failed(format!("making a console sign-in link: {e}")))?;
    let link = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if !out.status.success() || link.is_empty() {
        return Err(failed(format!(
            "could not make a console sign-in link: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(link)
}

/// The admin token and where it came from: the file the policy service wrote on its
/// first start, else `$MCPGUARD_BOOTSTRAP_ADMIN_TOKEN`.
fn admin_token(data_dir: &Path) -> Result<(String, TokenSource), Stop> {
    let file = data_dir.join("bootstrap-admin-token");
    let from_file = std::fs::read_to_string(&file)
        .map(|s| s.split_whitespace().collect::<String>())
        .unwrap_or_default();
    if !from_file.is_empty() {
        return Ok((from_file, TokenSource::File(file)));
    }
    match std::env::var("MCPGUARD_BOOTSTRAP_ADMIN_TOKEN") {
        Ok(token) if !token.is_empty() => Ok((token, TokenSource::Env)),
        _ => Err(failed(format!(
            "no admin token: {} is missing and MCPGUARD_BOOTSTRAP_ADMIN_TOKEN is unset \
             (remove {}/ to start over)",
            file.display(),
            data_dir.display()
        ))),
    }
}

enum TokenSource {
    File(PathBuf),
    Env,
}

/// Until a signal or one of them exits.
fn supervise(running: &mut Running, signals: &Receiver<u8>, run_dir: &Path) -> Stop {
    loop {
        match signals.recv_timeout(SUPERVISE_POLL) {
            Ok(code) => return Stop::Signal(code),
            Err(RecvTimeoutError::Disconnected) => return failed("the signal thread ended"),
            Err(RecvTimeoutError::Timeout) => {}
        }
        for p in &mut running.0 {
            if p.alive() {
                continue;
            }
            // Exited because of a terminal's Ctrl-C, which reached it too?
            if let Ok(code) = signals.recv_timeout(SUPERVISE_POLL) {
                return Stop::Signal(code);
            }
            return failed(format!(
                "{} exited; stopping the rest (see {})",
                p.name(),
                run_dir.join(format!("{}.log", p.name())).display()
            ));
        }
    }
}

/// What is running and how to try it.
fn banner(o: &Options, seeded: &seed::Seeded, token: &TokenSource, link: &str) -> String {
    let admin_url = format!("http://127.0.0.1:{}", o.policy_port);
    let gateway_url = format!("http://127.0.0.1:{}/mcp/demo", o.envoy_port);
    let mcp_url = format!("http://127.0.0.1:{}/mcp/demo/demo", o.envoy_port);
    let (gateway_id, server_id) = (seeded.gateway_id, seeded.server_id);
    let data_dir = o.data_dir.display();
    let (token_source, token_line) = match token {
        TokenSource::File(path) => (
            path.display().to_string(),
            format!("export ADMIN_TOKEN=$(cat {})", path.display()),
        ),
        TokenSource::Env => (
            "$MCPGUARD_BOOTSTRAP_ADMIN_TOKEN".to_owned(),
            "export ADMIN_TOKEN=\"$MCPGUARD_BOOTSTRAP_ADMIN_TOKEN\"".to_owned(),
        ),
    };
    let logs = o
        .run_dir
        .join("{policy,demo-mcp,envoy,aggregator}.log")
        .display()
        .to_string();
    format!(
        r#"
mcpguard is running.
  gateway URL    {gateway_url}   (every server of gateway `demo`, as one MCP server)
  admin console  {admin_url}/console
                 sign in as owner with this one-time link (works once, for 15 minutes):
                 {link}
                 (another: target/debug/mcpguard-policy --data-dir {data_dir} --issuer {admin_url} console-link)
  MCP endpoint   {mcp_url}   (gateway `demo` id {gateway_id}, server `demo` id {server_id})
  admin API      {admin_url}/api/v1   (admin token: {token_source})
  logs           {logs}

In the console: Apps & Agents > create a host > generate a token for the demo gateway
(shown once, with Copy and Download) > use it as the MCP client's bearer token.

The same with the admin API, in another shell:

  {token_line}

  # 1. Create a token-based host:
  HOST_ID=$(curl -s -X POST {admin_url}/api/v1/hosts \
    -H "authorization: Bearer $ADMIN_TOKEN" -H 'content-type: application/json' \
    -d '{{"name":"Feedback bot"}}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')

  # 2. Give it a token on the demo gateway (the response is the only time it is shown):
  TOKEN=$(curl -s -X POST {admin_url}/api/v1/hosts/$HOST_ID/tokens \
    -H "authorization: Bearer $ADMIN_TOKEN" -H 'content-type: application/json' \
    -d '{{"gateway_id": {gateway_id}}}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')

  # 3. MCP initialize through Envoy, on the gateway URL (tools are `demo__echo`, ...):
  curl -s -X POST {gateway_url} -H 'content-type: application/json' -H 'accept: application/json, text/event-stream' -H "authorization: Bearer $TOKEN" -d '{{"jsonrpc":"2.0","id":1,"method":"initialize","params":{{"protocolVersion":"2025-11-25","capabilities":{{}},"clientInfo":{{"name":"curl","version":"0"}}}}}}'

A desktop MCP client (headed host, OAuth): give yourself a password, then point the
client at {mcp_url}; it registers itself, you sign in as `owner` and allow the gateway,
and the client appears in GET {admin_url}/api/v1/hosts (kind oauth):

  curl -s -X PUT {admin_url}/api/v1/users/1/password \
    -H "authorization: Bearer $ADMIN_TOKEN" -H 'content-type: application/json' \
    -d '{{"password":"a long passphrase of yours"}}'

Ctrl-C stops everything.
"#
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    fn parse(args: &[&str]) -> Result<Options, String> {
        options(Path::new("/repo"), args.iter().map(|s| (*s).to_owned()))
    }

    #[test]
    fn the_defaults_are_make_runs_ports_and_directories() {
        let o = parse(&[]).unwrap();
        let ports = [
            o.policy_port,
            o.check_port,
            o.demo_port,
            o.envoy_port,
            o.envoy_admin_port,
            o.aggregator_port,
        ];
        assert_eq!(ports, [8080, 8081, 9100, 10000, 9901, 8082]);
        assert_eq!(o.data_dir, Path::new("/repo/data"));
        assert_eq!(o.run_dir, Path::new("/repo/.run"));
    }

    #[test]
    fn flags_choose_ports_and_directories() {
        let o = parse(&[
            "--envoy-port",
            "20001",
            "--data-dir",
            "/tmp/d",
            "--run-dir",
            "r",
        ])
        .unwrap();
        assert_eq!(o.envoy_port, 20001);
        assert_eq!(o.data_dir, Path::new("/tmp/d"));
        assert_eq!(o.run_dir, Path::new("/repo/r"));
    }

    #[test]
    fn bad_flags_are_refused_with_the_usage() {
        for args in [
            &["--envoy-port"][..],
            &["--envoy-port", "0"],
            &["--envoy-port", "x"],
            &["--nope", "1"],
        ] {
            let e = parse(args).err().unwrap();
            assert!(
                e.contains("--envoy-port") || e.contains("unknown option"),
                "{e}"
            );
        }
        assert_eq!(parse(&["--help"]).err().unwrap(), USAGE);
    }
}
