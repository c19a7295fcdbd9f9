//! Scale-out: two policy-svc replicas on one PostgreSQL database, behind Envoy with the
//! shipped `envoy/mcpguard-replicas.yaml` (round robin, health checks, outlier
//! detection). Each test has a throwaway PostgreSQL of its own, so stopping it touches
//! no other test.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mcpguard_core::token::{TokenHash, TokenKind, format_token};
use mcpguard_e2e::admin::Provisioned;
use mcpguard_e2e::db::Postgres;
use mcpguard_e2e::mcp::initialize_body;
use mcpguard_e2e::{Demo, Envoy, EnvoyOptions, Policy};
use reqwest::Method;
use serde_json::json;

/// Checks Envoy sent while too few replicas were healthy, to any replica at all.
const PANIC_STAT: &str = "cluster.mcpguard_policy.lb_healthy_panic";

/// Envoy in front of replicas `a` and `b`, which share one database. Fields drop in
/// order: Envoy and the services stop before the database does.
struct Replicas {
    envoy: Envoy,
    demo: Demo,
    a: Policy,
    b: Policy,
    pg: Postgres,
    _dir: tempfile::TempDir,
}

/// Two replicas `a` and `b` on one throwaway PostgreSQL database, and a stateless demo
/// server; no Envoy. Fields drop in order: the services stop before the database does.
pub(crate) struct SharedStore {
    pub demo: Demo,
    pub a: Policy,
    pub b: Policy,
    pub pg: Postgres,
    pub dir: tempfile::TempDir,
}

impl SharedStore {
    /// Both replicas with `env` besides the database's URL and the sealing key.
    pub(crate) async fn start(env: &[(&str, &str)]) -> SharedStore {
        let dir = tempfile::tempdir().unwrap();
        let pg = Postgres::start();
        let url = pg.create_database();
        // Replicas share the key that seals identities, as they must in production.
        let key = dir.path().join("secrets.key");
        std::fs::write(&key, "5e".repeat(32)).unwrap();
        // Readable by its owner only, or the service refuses it.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let key = key.display().to_string();
        let mut env = env.to_vec();
        env.push(("DATABASE_URL", &url));
        env.push(("MCPGUARD_SECRETS_KEY_FILE", &key));
        // Both at once on the empty database: they race to migrate it and to create
        // the owner, as replicas rolled out together do.
        let (data_a, data_b) = (dir.path().join("a"), dir.path().join("b"));
        let (a, b) = tokio::join!(
            Policy::start_with(&data_a, dir.path(), &env),
            Policy::start_with(&data_b, dir.path(), &env),
        );
        let demo = Demo::start_stateless(dir.path()).await;
        SharedStore {
            demo,
            a,
            b,
            pg,
            dir,
        }
    }
}

impl Replicas {
    async fn start(env: &[(&str, &str)]) -> Replicas {
        let SharedStore {
            demo,
            a,
            b,
            pg,
            dir,
        } = SharedStore::start(env).await;
        let opts = EnvoyOptions {
            config: "envoy/mcpguard-replicas.yaml",
            check_port: a.check_port,
            check_timeout_ms: None,
            trusted_ca: None,
            issuer: None,
            jwks_refresh_s: None,
        };
        let envoy =
            Envoy::start_with_checks(&opts, &[a.check_port, b.check_port], dir.path()).await;
        let r = Replicas {
            envoy,
            demo,
            a,
            b,
            pg,
            _dir: dir,
        };
        r.wait_in_rotation().await;
        r
    }

    fn url(&self) -> String {
        self.envoy.mcp_url("eng", "demo")
    }

    /// Checks Envoy has sent to the replica with this check port (`rq_total` in
    /// `/clusters`; health checks are not counted there).
    async fn checks_sent_to(&self, check_port: u16) -> u64 {
        self.host_stat(check_port, "rq_total").await
    }

    /// One per-host counter of the policy cluster from `/clusters`.
    async fn host_stat(&self, check_port: u16, name: &str) -> u64 {
        let key = format!("mcpguard_policy::127.0.0.1:{check_port}::{name}::");
        self.clusters()
            .await
            .lines()
            .find_map(|l| l.strip_prefix(&key)?.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Every attempt Envoy made to reach the replica with this check port: checks
    /// sent, connections refused.
    async fn attempts_on(&self, check_port: u16) -> u64 {
        self.host_stat(check_port, "rq_total").await
            + self.host_stat(check_port, "cx_connect_fail").await
    }

    /// The health flags Envoy holds for one replica, e.g. `healthy` or
    /// `/failed_active_hc/failed_outlier_check`.
    async fn health_flags(&self, check_port: u16) -> String {
        let key = format!("mcpguard_policy::127.0.0.1:{check_port}::health_flags::");
        self.clusters()
            .await
            .lines()
            .find_map(|l| l.strip_prefix(&key).map(str::to_owned))
            .unwrap_or_default()
    }

    /// Waits until Envoy balances checks over both replicas as healthy hosts: their
    /// health flags are clear, and a few checks (for an unknown token) reach each of
    /// them with the cluster out of panic mode. Envoy's first health checks may time out
    /// while it compiles the wasm at startup, and its worker threads learn of health
    /// changes a moment after `/clusters` shows them.
    async fn wait_in_rotation(&self) {
        let unknown = format_token(TokenKind::HostApi, &"u".repeat(40)).unwrap();
        let (url, http) = (self.url(), reqwest::Client::new());
        let started = Instant::now();
        loop {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "Envoy does not balance over both healthy replicas:\n{}",
                self.clusters().await
            );
            if self.health_flags(self.a.check_port).await != "healthy"
                || self.health_flags(self.b.check_port).await != "healthy"
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            let panics = self.envoy.stat(PANIC_STAT).await;
            let before = self.checks_sent_to_each().await;
            for _ in 0..4 {
                let (status, code) = send(&http, &url, &unknown).await;
                assert_eq!((status, code.as_str()), (401, "token_unknown"));
            }
            let after = self.checks_sent_to_each().await;
            if self.envoy.stat(PANIC_STAT).await == panics
                && after[0] > before[0]
                && after[1] > before[1]
            {
                return;
            }
        }
    }

    async fn checks_sent_to_each(&self) -> [u64; 2] {
        [
            self.checks_sent_to(self.a.check_port).await,
            self.checks_sent_to(self.b.check_port).await,
        ]
    }

    /// `initialize` requests in a row until each replica has checked at least two of
    /// them (at most 60): every one must get `expected`.
    async fn expect_on_both(&self, url: &str, token: &str, expected: (u16, &str)) {
        self.expect_on_both_for(url, token, &initialize_body(), expected)
            .await;
    }

    /// Like [`Replicas::expect_on_both`], with any JSON-RPC request.
    async fn expect_on_both_for(
        &self,
        url: &str,
        token: &str,
        body: &serde_json::Value,
        expected: (u16, &str),
    ) {
        let http = reqwest::Client::new();
        let before = self.checks_sent_to_each().await;
        for i in 0..60 {
            let (status, code) = send_body(&http, url, token, body).await;
            assert_eq!((status, code.as_str()), expected, "request {i} in a row");
            let now = self.checks_sent_to_each().await;
            if now[0] >= before[0] + 2 && now[1] >= before[1] + 2 {
                return;
            }
        }
        panic!(
            "60 requests did not reach both replicas:\n{}",
            self.clusters().await
        );
    }

    async fn clusters(&self) -> String {
        reqwest::get(format!(
            "http://127.0.0.1:{}/clusters",
            self.envoy.admin_port
        ))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
    }
}

/// One MCP `initialize` through Envoy: status and `error.code` (empty when allowed),
/// status 0 for a transport error.
async fn send(http: &reqwest::Client, url: &str, token: &str) -> (u16, String) {
    send_body(http, url, token, &initialize_body()).await
}

/// One JSON-RPC request through Envoy (the demo server is stateless: no session): the
/// status and `error.code` of a refusal, or the text a tool returned (empty when none),
/// status 0 for a transport error.
async fn send_body(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    body: &serde_json::Value,
) -> (u16, String) {
    let sent = http
        .post(url)
        .bearer_auth(token)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .timeout(Duration::from_secs(10))
        .body(body.to_string())
        .send()
        .await;
    match sent {
        Ok(resp) => {
            let status = resp.status().as_u16();
            let body = resp.text().await.unwrap_or_default();
            let v = serde_json::from_str::<serde_json::Value>(&body).unwrap_or_default();
            let said = v["error"]["code"]
                .as_str()
                .or(v["result"]["content"][0]["text"].as_str())
                .unwrap_or_default();
            (status, said.to_owned())
        }
        Err(e) => (0, e.to_string()),
    }
}

/// `n` requests in a row; every one must get `expected`.
async fn expect_n(url: &str, token: &str, n: usize, expected: (u16, &str)) {
    let http = reqwest::Client::new();
    for i in 0..n {
        let (status, code) = send(&http, url, token).await;
        assert_eq!(
            (status, code.as_str()),
            expected,
            "request {i} of {n} in a row"
        );
    }
}

/// The check endpoint of one replica, called directly.
async fn direct_check(policy: &Policy, token: &str) -> (u16, serde_json::Value) {
    let resp = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{}/v1/check", policy.check_port))
        .header(
            "x-mcpguard-check-secret",
            mcpguard_e2e::procs::check_secret(),
        )
        .timeout(Duration::from_secs(30))
        .json(&json!({
            "credential": {"kind": "api_token", "hash": TokenHash::of(token).to_hex()},
            "gateway": "eng",
            "server": "demo",
        }))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or_default())
}

/// Provisions `eng`/`demo` through replica A, plus a second token of the same host
/// that is then revoked.
async fn provision(r: &Replicas) -> (Provisioned, String) {
    let admin = r.a.admin();
    let p = admin.provision("eng", "demo", &r.demo.upstream_url()).await;
    let revoked = admin.token(p.host_id, p.gateway_id).await;
    admin.revoke(revoked["id"].as_i64().unwrap()).await;
    (p, revoked["token"].as_str().unwrap().to_owned())
}

#[tokio::test]
async fn a_revocation_or_toggle_made_on_one_replica_holds_on_every_replica() {
    let r = Replicas::start(&[]).await;
    let (p, _) = provision(&r).await;
    let (admin_a, admin_b) = (r.a.admin(), r.b.admin());
    let url = r.url();
    // A second host on the same gateway, which nothing below touches.
    let other_host = admin_b.host("Other bot").await;
    let other = admin_b.token(other_host, p.gateway_id).await["token"]
        .as_str()
        .unwrap()
        .to_owned();

    // Round robin: both replicas answer checks.
    r.expect_on_both(&url, &p.token, (200, "")).await;

    // Disabled through B: refused on the next requests, whichever replica answers, and
    // by A asked directly.
    admin_b.set_enabled("hosts", p.host_id, false).await;
    r.expect_on_both(&url, &p.token, (403, "host_disabled"))
        .await;
    let (status, answer) = direct_check(&r.a, &p.token).await;
    assert_eq!(
        (status, answer["code"].as_str()),
        (200, Some("host_disabled")),
        "{answer}"
    );
    expect_n(&url, &other, 2, (200, "")).await;
    // Enabled through A: served again everywhere.
    admin_a.set_enabled("hosts", p.host_id, true).await;
    r.expect_on_both(&url, &p.token, (200, "")).await;

    // Revoked through A: refused from the next request on, also by B asked directly.
    admin_a.revoke(p.token_id).await;
    r.expect_on_both(&url, &p.token, (401, "token_revoked"))
        .await;
    let (status, answer) = direct_check(&r.b, &p.token).await;
    assert_eq!(
        (status, answer["code"].as_str()),
        (200, Some("token_revoked")),
        "{answer}"
    );
    // Revoking one agent's token affects no other agent.
    expect_n(&url, &other, 4, (200, "")).await;

    // B lists what A did.
    let (status, tokens) = admin_b
        .get(&format!("/api/v1/hosts/{}/tokens", p.host_id))
        .await;
    assert_eq!(status, 200);
    let listed = tokens
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == p.token_id)
        .unwrap();
    assert!(listed["revoked_at"].is_string(), "{tokens}");

    // An identity stored through A is injected by both replicas: they share the key
    // that seals it. Alice's token is issued through B.
    admin_b
        .expose_as(p.gateway_id, p.server_id, json!({"identity": "per_user"}))
        .await;
    let alice = admin_a.end_users(&["alice"]).await[0];
    let (status, v) = admin_a
        .call(
            Method::PUT,
            &format!("/api/v1/users/{alice}/identities/{}", p.server_id),
            Some(json!({"credential": {"type": "bearer", "token": "alice-downstream-secret"}})),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    let alice_token = admin_b.user_token(p.host_id, p.gateway_id, alice).await;
    let whoami = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {"name": "whoami", "arguments": {}}});
    r.expect_on_both_for(
        &url,
        &alice_token,
        &whoami,
        (200, "Bearer alice-downstream-secret"),
    )
    .await;
}

/// What one request under load got.
#[derive(Debug, Clone)]
struct Outcome {
    start: Instant,
    revoked_token: bool,
    status: u16,
    code: String,
}

#[tokio::test]
async fn killing_one_replica_under_load_lets_nothing_through_and_the_other_takes_over() {
    let mut r = Replicas::start(&[]).await;
    let (p, revoked) = provision(&r).await;
    let url = r.url();

    // Four clients, one of them with the revoked token, until told to stop (or 60 s).
    let log: Arc<Mutex<Vec<Outcome>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut clients = Vec::new();
    for i in 0..4 {
        let revoked_token = i == 0;
        let token = if revoked_token {
            revoked.clone()
        } else {
            p.token.clone()
        };
        let (log, stop, url) = (log.clone(), stop.clone(), url.clone());
        clients.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline {
                let start = Instant::now();
                let (status, code) = send(&http, &url, &token).await;
                log.lock().unwrap().push(Outcome {
                    start,
                    revoked_token,
                    status,
                    code,
                });
                // Steady load rather than all the CPU: other tests run alongside.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    let served_since = |since: Instant| {
        let log = log.clone();
        move || {
            let log = log.lock().unwrap();
            let after: Vec<&Outcome> = log
                .iter()
                .filter(|o| o.start > since && !o.revoked_token)
                .collect();
            (after.len(), after.iter().all(|o| o.status == 200))
        }
    };

    // Load on both replicas, then B dies.
    let began = Instant::now();
    while served_since(began)().0 < 40 {
        assert!(Instant::now() < deadline, "no load");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let b_port = r.b.check_port;
    assert!(r.checks_sent_to(b_port).await > 0, "B took no checks");
    r.b.proc.kill();
    let killed = Instant::now();

    // Envoy notices (a refused connection twice in a row ejects B; health checks mark
    // it down): within a bounded time every request is served again. "Served again"
    // means the last second's requests, at least 20 of them, were all allowed.
    let notice_bound = Duration::from_secs(10);
    let recovered = loop {
        let now = Instant::now();
        let window = now - Duration::from_secs(1);
        if window > killed {
            let (n, all_ok) = served_since(window)();
            if n >= 20 && all_ok {
                break window;
            }
        }
        assert!(
            now - killed < notice_bound,
            "still failing {notice_bound:?} after a replica died; B's flags: {}",
            r.health_flags(b_port).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // From then on Envoy sends nothing to B: 100 more requests.
    let attempts_on_b = r.attempts_on(b_port).await;
    let counted = Instant::now();
    while served_since(counted)().0 < 100 {
        assert!(Instant::now() < deadline, "load stopped");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    assert_eq!(
        r.attempts_on(b_port).await,
        attempts_on_b,
        "Envoy still tried the dead replica; B's flags: {}",
        r.health_flags(b_port).await
    );
    let flags = r.health_flags(b_port).await;
    assert!(
        flags.contains("failed_outlier_check") || flags.contains("failed_active_hc"),
        "Envoy should hold B as down: {flags}"
    );

    let log = std::mem::take(&mut *log.lock().unwrap());
    let (mut in_transition, mut later) = (0, 0);
    for o in &log {
        let got = (o.status, o.code.as_str());
        let at = o.start.saturating_duration_since(began);
        if o.revoked_token {
            // Never let through: refused as revoked, or (while B's death is noticed)
            // refused as unavailable.
            assert!(
                got == (401, "token_revoked") || got == (503, "policy_unavailable"),
                "revoked token at {at:?}: {got:?}"
            );
        } else {
            assert!(
                got == (200, "") || got == (503, "policy_unavailable"),
                "valid token at {at:?}: {got:?}"
            );
        }
        if got.0 == 503 {
            assert!(
                o.start >= killed - Duration::from_secs(1),
                "a 503 before B was killed, at {at:?}"
            );
            if o.start < recovered {
                in_transition += 1;
            } else {
                later += 1;
            }
        }
    }
    let valid_after = log
        .iter()
        .filter(|o| o.start >= recovered && !o.revoked_token)
        .count();
    println!(
        "{} requests; B killed at {:?}; all served again {:?} later; {in_transition} refused \
         with 503 meanwhile; afterwards {later} of {valid_after} valid requests refused with \
         503; B's flags at the end: {flags}",
        log.len(),
        killed - began,
        recovered.saturating_duration_since(killed),
    );
    // Once B is out, a 503 can only be A failing closed when it is too slow for the
    // callout deadline, which a loaded test machine may cause once in a while; never
    // more than 2 %.
    assert!(
        later * 50 <= valid_after,
        "{later} of {valid_after} valid requests refused after Envoy noticed"
    );
}

#[tokio::test]
async fn a_stopped_database_means_fast_503s_then_service_from_the_first_request_back() {
    // A deadline well below the connection wait, so that it is the deadline that is seen.
    let r = Replicas::start(&[
        ("MCPGUARD_CHECK_DEADLINE_MS", "150"),
        ("MCPGUARD_DB_ACQUIRE_TIMEOUT_MS", "3000"),
    ])
    .await;
    let (p, revoked) = provision(&r).await;
    let url = r.url();
    expect_n(&url, &p.token, 2, (200, "")).await;

    r.pg.stop().expect("stopping PostgreSQL");
    let http = reqwest::Client::new();
    for i in 0..8 {
        let token = if i % 2 == 0 { &p.token } else { &revoked };
        let started = Instant::now();
        let (status, code) = send(&http, &url, token).await;
        let took = started.elapsed();
        assert_eq!(
            (status, code.as_str()),
            (503, "policy_unavailable"),
            "request {i} with the database down"
        );
        assert!(
            took < Duration::from_millis(1500),
            "request {i} took {took:?} to be refused"
        );
    }
    // Each replica answers its check with 503 within its deadline, not after the 3 s
    // connection wait; its /healthz says unhealthy.
    for replica in [&r.a, &r.b] {
        let started = Instant::now();
        let (status, answer) = direct_check(replica, &p.token).await;
        let took = started.elapsed();
        assert_eq!(status, 503, "{answer}");
        assert!(took < Duration::from_secs(1), "the check took {took:?}");
        let health = reqwest::Client::new()
            .get(format!("http://127.0.0.1:{}/healthz", replica.check_port))
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .unwrap();
        assert!(!health.status().is_success(), "{}", health.status());
    }

    r.pg.restart().expect("starting PostgreSQL again");
    // Served again from the first request: each replica's check opens a new connection
    // for the read that finds none alive.
    expect_n(&url, &p.token, 6, (200, "")).await;
    // The revoked token is still refused.
    expect_n(&url, &revoked, 4, (401, "token_revoked")).await;
    let (status, _) = r.b.admin().get("/api/v1/gateways").await;
    assert_eq!(status, 200);

    // A restart between two checks costs no check: the connections that died with it
    // are replaced by the checks that find them dead.
    r.pg.stop().expect("stopping PostgreSQL");
    r.pg.restart().expect("starting PostgreSQL again");
    expect_n(&url, &p.token, 6, (200, "")).await;
}
