//! Attacks on sign-in and OAuth (issue 19, items 8, 9 and 12), each performed as an
//! outsider would, against the real policy service and through real Envoy where the
//! data plane is involved.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use mcpguard_e2e::mcp::{expect_refusal, initialize_with};
use mcpguard_e2e::oauth::{Browser, PASSWORD, RawClient, form_inputs, pkce, query_param};
use mcpguard_e2e::{Admin, Policy, Stack, free_port};
use reqwest::Method;
use serde_json::{Value, json};

/// A gateway `eng` exposing the demo server as `demo`, and `alice`, who can sign in.
async fn setup(stack: &Stack) -> (Admin, i64, i64) {
    let owner = stack.admin();
    let gateway = owner.gateway("eng").await;
    let server = owner.server("demo", &stack.demo.upstream_url()).await;
    owner.expose(gateway, server).await;
    let alice = owner.person("alice", PASSWORD).await;
    (owner, gateway, alice)
}

/// A loopback address other than 127.0.0.1: another client, as the service sees it.
fn loopback(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

/// A browser on a fresh sign-in page of `client` for `resource`, and the form filled
/// in with `user` and `password`.
async fn sign_in_form(
    mut browser: Browser,
    client: &RawClient,
    resource: &str,
    user: &str,
    password: &str,
) -> (Browser, std::collections::HashMap<String, String>) {
    let (_, challenge) = pkce("attack");
    let login = browser
        .get(&client.authorization_url(resource, &challenge, "st"))
        .await;
    assert_eq!(login.status, 200, "sign-in page: {}", login.body);
    let mut form = form_inputs(&login.body);
    form.insert("username".into(), user.into());
    form.insert("password".into(), password.into());
    (browser, form)
}

/// One sign-in from `browser`: status, `Retry-After`, page.
async fn try_sign_in(
    browser: Browser,
    client: &RawClient,
    resource: &str,
    user: &str,
    password: &str,
) -> (u16, Option<u64>, String) {
    let (mut browser, form) = sign_in_form(browser, client, resource, user, password).await;
    let answer = browser
        .post(&format!("{}/oauth/login", client.issuer), &form)
        .await;
    (answer.status, answer.retry_after, answer.body)
}

/// Item 8: every other place that runs argon2 shares the bound: the enrollment page's
/// sign-in and `PUT /api/v1/users/{id}/password` (one hash at once here, two queued).
#[tokio::test]
async fn the_enrollment_page_and_password_set_share_the_hashing_bound() {
    const BURST: usize = 30;
    let stack =
        Stack::start_with(false, &[("MCPGUARD_PASSWORD_HASH_CONCURRENCY", "1")], None).await;
    let owner = stack.admin();
    let p = owner
        .provision("eng", "demo", &stack.demo.upstream_url())
        .await;
    let alice = owner.person("alice", PASSWORD).await;

    let path = format!("/api/v1/users/{alice}/password");
    let set = futures::future::join_all((0..BURST).map(|i| {
        let body = json!({"password": format!("new passphrase {i:02}")});
        owner.call(Method::PUT, &path, Some(body))
    }))
    .await;
    let busy = set
        .iter()
        .filter(|(status, v)| *status == 503 && v["error"]["code"] == "busy")
        .count();
    let done = set.iter().filter(|(status, _)| *status == 204).count();
    assert!(busy > 0 && done > 0 && busy + done == BURST, "{set:?}");

    let (status, enrollment) = owner
        .post(
            &format!("/api/v1/hosts/{}/enrollments", p.host_id),
            json!({"gateway_id": p.gateway_id, "user_id": alice}),
        )
        .await;
    assert_eq!(status, 201, "{enrollment}");
    let link = enrollment["url"].as_str().unwrap().to_owned();
    let mut forms = Vec::new();
    for i in 0..BURST {
        let mut browser = Browser::default();
        let page = browser.get(&link).await;
        let mut form = form_inputs(&page.body);
        form.insert("username".into(), format!("nobody-{i}"));
        form.insert("password".into(), "a guess".into());
        forms.push((browser, form));
    }
    let answers = futures::future::join_all(forms.into_iter().map(|(mut browser, form)| {
        let link = link.clone();
        async move { browser.post(&link, &form).await }
    }))
    .await;
    let busy: Vec<_> = answers.iter().filter(|a| a.status == 503).collect();
    assert!(
        !busy.is_empty() && answers.iter().all(|a| a.status == 401 || a.status == 503),
        "{:?}",
        answers.iter().map(|a| a.status).collect::<Vec<_>>()
    );
    for page in busy {
        assert_eq!(page.retry_after, Some(1));
        assert!(page.body.contains("busy"), "{}", page.body);
    }
}

/// A field of `/proc/<pid>/status` in KiB (`VmRSS`, `VmHWM`).
fn vm_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
}

/// Item 8: a burst of parallel sign-ins with valid forms (each under its own name, as an
/// attacker would to stay clear of any per-name limit) costs one argon2 instance each.
/// Unbounded, 200 of them took the service's peak memory (VmHWM) from 43 MiB to
/// 1979 MiB, and a data-plane check took 1.4 s. Bounded, the peak grows by the two
/// hashing threads' memory (19 MiB each; 21 MiB measured), the requests beyond the
/// bound are refused at once (503 with `Retry-After`), and the data plane keeps being
/// checked meanwhile.
#[tokio::test]
async fn a_sign_in_flood_is_refused_fast_while_memory_and_checks_hold() {
    const FLOOD: usize = 200;
    // Two hashes at once (the default on this 2-core machine is the number of CPUs).
    let stack =
        Stack::start_with(false, &[("MCPGUARD_PASSWORD_HASH_CONCURRENCY", "2")], None).await;
    let (owner, gateway, _) = setup(&stack).await;
    let host = owner.host("Probe bot").await;
    let token = owner.token(host, gateway).await["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let url = stack.envoy.mcp_url("eng", "demo");
    let client = RawClient::register(&stack.policy.public_url(), "Flood client").await;
    let mut forms = Vec::new();
    for i in 0..FLOOD {
        let name = format!("nobody-{i}");
        forms.push(sign_in_form(Browser::default(), &client, &url, &name, "a guess at it").await);
    }
    let pid = stack.policy.proc.pid();
    let before = vm_kib(pid, "VmHWM");

    // The data plane, probed through Envoy all through the flood.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let probe = {
        let (stop, url, token) = (stop.clone(), url.clone(), token.clone());
        tokio::spawn(async move {
            let mut seen = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                let answer = initialize_with(&url, Some(&token)).await;
                seen.push((answer.status, t.elapsed()));
            }
            seen
        })
    };
    let login = format!("{}/oauth/login", client.issuer);
    let started = Instant::now();
    let answers = futures::future::join_all(forms.into_iter().map(|(mut browser, form)| {
        let login = login.clone();
        async move {
            let t = Instant::now();
            let page = browser.post(&login, &form).await;
            (page.status, page.retry_after, page.body, t.elapsed())
        }
    }))
    .await;
    let flood_took = started.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let probes = probe.await.unwrap();
    let after = vm_kib(pid, "VmHWM");
    let grown_mib = after.saturating_sub(before) / 1024;
    let busy: Vec<_> = answers.iter().filter(|a| a.0 == 503).collect();
    let verified = answers.iter().filter(|a| a.0 == 401).count();
    eprintln!(
        "sign-in flood of {FLOOD}: {flood_took:?}; VmHWM {} -> {} MiB (+{grown_mib}); \
         {verified} verified, {} refused busy (slowest {:?}); {} data-plane probes, slowest {:?}",
        before / 1024,
        after / 1024,
        busy.len(),
        busy.iter().map(|a| a.3).max(),
        probes.len(),
        probes.iter().map(|p| p.1).max(),
    );

    assert!(
        answers.iter().all(|a| a.0 == 401 || a.0 == 503),
        "every answer is a refused sign-in or the busy page: {:?}",
        answers.iter().map(|a| a.0).collect::<Vec<_>>()
    );
    assert!(
        !busy.is_empty() && verified > 0,
        "beyond the bound the service refuses ({} busy, {verified} verified)",
        busy.len()
    );
    for (_, retry_after, body, took) in &busy {
        assert_eq!(*retry_after, Some(1), "a busy refusal says when to retry");
        assert!(body.contains("busy"), "{body}");
        assert!(
            *took < Duration::from_secs(2),
            "a busy refusal is fast, not queued: {took:?}"
        );
    }
    // Two argon2 memories (19 MiB each, the first allocated when alice's password was
    // set) and what 200 connections cost.
    assert!(
        grown_mib < 64,
        "the flood grew the service's peak memory by {grown_mib} MiB"
    );
    assert!(!probes.is_empty());
    for (status, took) in &probes {
        // 200: the check answered within the filter's deadline (else 503).
        assert_eq!(*status, 200, "the data plane is served during the flood");
        assert!(*took < Duration::from_secs(1), "a check took {took:?}");
    }
}

/// The free failures a client has under one name (`signin::FREE_FAILURES`).
const FREE_FAILURES: usize = 3;

/// Item 9: wrong passwords under the victim's name, from five addresses, six each.
/// Before, five failures locked the name for everyone, the victim included. Now each
/// address gets its free failures and then waits (429 with `Retry-After`, even with the
/// right password, which is then not verified), and the victim, from her own address,
/// signs in and reaches the data plane.
#[tokio::test]
async fn an_attackers_wrong_passwords_never_keep_the_user_out() {
    let stack = Stack::start().await;
    setup(&stack).await;
    let url = stack.envoy.mcp_url("eng", "demo");
    let client = RawClient::register(&stack.policy.public_url(), "Guessing client").await;
    for last in 2..=6 {
        let attacker = || Browser::from_address(loopback(last));
        for attempt in 1..=6 {
            let (status, retry_after, page) =
                try_sign_in(attacker(), &client, &url, "alice", "wrong password").await;
            if attempt <= FREE_FAILURES {
                assert_eq!(status, 401, "127.0.0.{last}, attempt {attempt}: {page}");
            } else {
                assert_eq!(status, 429, "127.0.0.{last}, attempt {attempt}: {page}");
                assert!(
                    retry_after.is_some_and(|s| (1..=15).contains(&s)),
                    "{retry_after:?}"
                );
                assert!(page.contains("Too many sign-in attempts"), "{page}");
            }
        }
        let (status, _, _) = try_sign_in(attacker(), &client, &url, "alice", PASSWORD).await;
        assert_eq!(
            status, 429,
            "a waiting client is not verified, right or wrong"
        );
    }
    // Fifteen failures have spent the name's budget; alice's own client has none.
    let tokens = client.sign_in(&url, "alice", PASSWORD).await;
    let access = tokens["access_token"].as_str().unwrap();
    assert_eq!(initialize_with(&url, Some(access)).await.status, 200);
}

/// Item 9: 40 guesses at once from one client, half of them to a second replica on the
/// same database. Before, all 40 were verified. The attempt is reserved in the
/// database before the password is verified, so at most the client's free failures are
/// (the hashing bound is raised so that all 40 reach the reservation together).
#[tokio::test]
async fn parallel_guesses_are_not_all_verified() {
    const GUESSES: usize = 40;
    let stack =
        Stack::start_with(false, &[("MCPGUARD_PASSWORD_HASH_CONCURRENCY", "20")], None).await;
    setup(&stack).await;
    let url = stack.envoy.mcp_url("eng", "demo");
    let client = RawClient::register(&stack.policy.public_url(), "Racing client").await;
    let mut forms = Vec::new();
    for i in 0..GUESSES {
        let guess = format!("guess number {i}");
        let browser = Browser::from_address(loopback(7));
        forms.push(sign_in_form(browser, &client, &url, "alice", &guess).await);
    }
    // A second replica on the same database takes half of them.
    let db = stack.policy.database_url.clone().unwrap_or_else(|| {
        let file = stack.policy.data_dir.join("mcpguard.db");
        format!("sqlite://{}?mode=rwc", file.display())
    });
    let key = stack.policy.data_dir.join("secrets.key");
    let base = stack.envoy.base_url();
    let env = [
        ("DATABASE_URL", db.as_str()),
        ("MCPGUARD_SECRETS_KEY_FILE", &key.display().to_string()),
        ("MCPGUARD_PASSWORD_HASH_CONCURRENCY", "20"),
        ("MCPGUARD_RESOURCE_BASE_URLS", base.as_str()),
    ]
    .map(|(k, v)| (k, v.to_owned()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let replica = Policy::start_with(&stack.dir.path().join("b"), stack.dir.path(), &env).await;
    let logins = [
        format!("{}/oauth/login", client.issuer),
        format!("{}/oauth/login", replica.public_url()),
    ];
    let statuses: Vec<u16> =
        futures::future::join_all(forms.into_iter().enumerate().map(|(i, (mut b, form))| {
            let login = logins[i % 2].clone();
            async move { b.post(&login, &form).await.status }
        }))
        .await;
    let verified = statuses.iter().filter(|&&s| s == 401).count();
    eprintln!("{GUESSES} parallel guesses: {verified} verified; {statuses:?}");
    assert!(
        (1..=FREE_FAILURES).contains(&verified),
        "{verified} of {GUESSES} parallel guesses were verified: {statuses:?}"
    );
    assert!(
        statuses.iter().all(|&s| s == 401 || s == 429),
        "{statuses:?}"
    );
    // And the limit holds afterwards: the next guess from there waits too.
    let (status, _, _) = try_sign_in(
        Browser::from_address(loopback(7)),
        &client,
        &url,
        "alice",
        "one more",
    )
    .await;
    assert_eq!(status, 429);
}

/// Item 9, behind a reverse proxy (an Istio sidecar connects from 127.0.0.6): every
/// client has the proxy's address, so without `--trusted-proxies` an attacker behind it
/// holds the victim behind it back too. With it, the client is the hop the proxy
/// appended to `X-Forwarded-For`; what a client writes there itself changes nothing,
/// and a client that connects directly is its own address whatever it claims.
#[tokio::test]
async fn forwarded_for_names_the_client_only_from_a_trusted_proxy() {
    let proxy = loopback(8);
    let stack = Stack::start_with(false, &[("MCPGUARD_TRUSTED_PROXIES", "127.0.0.8")], None).await;
    setup(&stack).await;
    let url = stack.envoy.mcp_url("eng", "demo");
    let client = RawClient::register(&stack.policy.public_url(), "Proxied client").await;
    // Straight to the port, with a new made-up address each time: still one client.
    for attempt in 1..=4 {
        let spoofed = format!("198.51.100.{attempt}");
        let browser = Browser::from_address(loopback(2)).with_header("x-forwarded-for", &spoofed);
        let (status, _, _) = try_sign_in(browser, &client, &url, "alice", "wrong").await;
        let expected = if attempt <= FREE_FAILURES { 401 } else { 429 };
        assert_eq!(status, expected, "direct attempt {attempt}");
    }
    // Through the proxy: the attacker (203.0.113.7, as the proxy appends it) rotates
    // what it writes to the left, and waits all the same.
    for attempt in 1..=5 {
        let xff = format!("10.{attempt}.0.1, 203.0.113.7");
        let browser = Browser::from_address(proxy).with_header("x-forwarded-for", &xff);
        let (status, _, _) = try_sign_in(browser, &client, &url, "alice", "wrong").await;
        let expected = if attempt <= FREE_FAILURES { 401 } else { 429 };
        assert_eq!(status, expected, "proxied attempt {attempt}");
    }
    // Alice, behind the same proxy, is another client.
    let browser = Browser::from_address(proxy).with_header("x-forwarded-for", "203.0.113.9");
    let (status, _, page) = try_sign_in(browser, &client, &url, "alice", PASSWORD).await;
    assert_eq!(status, 303, "{page}");
}

/// Item 12: changing a user's password signs them out everywhere. Before, sessions,
/// refresh tokens and access tokens opened with the old password kept working.
#[tokio::test]
async fn a_password_change_ends_sessions_and_oauth_grants() {
    let stack = Stack::start().await;
    let (owner, _, alice) = setup(&stack).await;
    let url = stack.envoy.mcp_url("eng", "demo");
    let issuer = stack.policy.public_url();
    let client = RawClient::register(&issuer, "Desk app").await;
    let tokens = client.sign_in(&url, "alice", PASSWORD).await;
    let (access, refresh) = (
        tokens["access_token"].as_str().unwrap(),
        tokens["refresh_token"].as_str().unwrap(),
    );
    assert_eq!(initialize_with(&url, Some(access)).await.status, 200);
    // A browser signed in (its session skips the sign-in page), with a code not yet
    // exchanged.
    let (verifier, challenge) = pkce("pending");
    let auth_url = client.authorization_url(&url, &challenge, "st");
    let mut browser = Browser::default();
    let back = browser
        .authorize(&issuer, &auth_url, "alice", PASSWORD, &[])
        .await;
    let pending_code = query_param(&back, "code").unwrap();
    assert!(browser.get(&auth_url).await.body.contains("Allow access"));

    let (status, v) = owner
        .call(
            Method::PUT,
            &format!("/api/v1/users/{alice}/password"),
            Some(json!({"password": "a brand new passphrase"})),
        )
        .await;
    assert_eq!(status, 204, "{v}");

    expect_refusal(&url, Some(access), (401, "token_revoked")).await;
    let (status, body) = client.refresh(refresh).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_grant"))
    );
    let (status, body) = client.exchange(&pending_code, &verifier).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_grant"))
    );
    let page = browser.get(&auth_url).await;
    assert!(
        page.body.contains("<h1>Sign in</h1>") && !page.body.contains("Allow access"),
        "the session ended: {}",
        page.body
    );
    // The old password is refused, the new one works.
    let (status, _, _) = try_sign_in(Browser::default(), &client, &url, "alice", PASSWORD).await;
    assert_eq!(status, 401);
    let tokens = client
        .sign_in(&url, "alice", "a brand new passphrase")
        .await;
    let access = tokens["access_token"].as_str().unwrap();
    assert_eq!(initialize_with(&url, Some(access)).await.status, 200);
}

async fn oauth_hosts(owner: &Admin, name: &str) -> Vec<Value> {
    let (status, hosts) = owner.get("/api/v1/hosts").await;
    assert_eq!(status, 200);
    hosts
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h["name"] == name && h["kind"] == "oauth")
        .cloned()
        .collect()
}

/// Item 12: a headed host an admin disabled stays disabled when its app registers
/// again (dynamic registration gives it a new client id). Before, the new registration
/// became a new, enabled host.
#[tokio::test]
async fn a_disabled_headed_host_stays_disabled_when_its_app_registers_again() {
    let stack = Stack::start().await;
    let (owner, _, _) = setup(&stack).await;
    owner.person("bob", PASSWORD).await;
    let url = stack.envoy.mcp_url("eng", "demo");
    let issuer = stack.policy.public_url();
    let first = RawClient::register(&issuer, "Shady app").await;
    let tokens = first.sign_in(&url, "alice", PASSWORD).await;
    let old_access = tokens["access_token"].as_str().unwrap().to_owned();
    let hosts = oauth_hosts(&owner, "Shady app").await;
    assert_eq!(hosts.len(), 1);
    let host = hosts[0]["id"].as_i64().unwrap();
    owner.set_enabled("hosts", host, false).await;
    expect_refusal(&url, Some(&old_access), (403, "host_disabled")).await;

    // The same app registers again and alice allows it again.
    let again = RawClient::register(&issuer, "Shady app").await;
    assert_ne!(again.client_id, first.client_id);
    let tokens = again.sign_in(&url, "alice", PASSWORD).await;
    let new_access = tokens["access_token"].as_str().unwrap().to_owned();
    expect_refusal(&url, Some(&new_access), (403, "host_disabled")).await;
    let hosts = oauth_hosts(&owner, "Shady app").await;
    assert_eq!(
        (hosts.len(), hosts[0]["enabled"].as_bool()),
        (1, Some(false)),
        "no new host: {hosts:?}"
    );

    // Until an admin acts: enabling the host lets the app in again, both registrations.
    owner.set_enabled("hosts", host, true).await;
    for access in [&old_access, &new_access] {
        assert_eq!(initialize_with(&url, Some(access)).await.status, 200);
    }
    // What is kept is the app as alice ran it: bob's own copy is a host of its own.
    let bobs = RawClient::register(&issuer, "Shady app").await;
    owner.set_enabled("hosts", host, false).await;
    let tokens = bobs.sign_in(&url, "bob", PASSWORD).await;
    let access = tokens["access_token"].as_str().unwrap();
    assert_eq!(initialize_with(&url, Some(access)).await.status, 200);
    assert_eq!(oauth_hosts(&owner, "Shady app").await.len(), 2);
}

/// Runs `mcpguard-policy` on `data` until it exits (at most 30 s): exit success, output.
fn policy_run(data: &std::path::Path, database_url: Option<&str>) -> (bool, String) {
    let mut cmd = std::process::Command::new(mcpguard_e2e::procs::binary("mcpguard-policy"));
    cmd.arg("--data-dir")
        .arg(data)
        .arg("--public-listen")
        .arg(format!("127.0.0.1:{}", free_port()))
        .arg("--check-listen")
        .arg(format!("127.0.0.1:{}", free_port()))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    if let Some(url) = database_url {
        cmd.env("DATABASE_URL", url);
    }
    let mut child = cmd.spawn().unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn mode(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Item 12: secret files get their mode even when they exist already. Before, a
/// leftover world-readable `bootstrap-admin-token` received the new admin token and
/// stayed world-readable, and a world-readable secrets key was used as it was.
#[tokio::test]
async fn secret_files_are_owner_only_even_when_they_existed() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let token_file = data.join("bootstrap-admin-token");
    std::fs::write(&token_file, "left over\n").unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o644)).unwrap();

    let mut policy = Policy::start_generating_admin_token(&data, dir.path()).await;
    assert_eq!(mode(&token_file), 0o600);
    let token = std::fs::read_to_string(&token_file).unwrap();
    assert!(token.starts_with("mcpga_"), "{token}");
    let (status, _) = policy
        .admin()
        .with_token(token.trim())
        .get("/api/v1/users")
        .await;
    assert_eq!(status, 200);
    assert_eq!(mode(&data.join("secrets.key")), 0o600);
    policy.proc.kill();

    // A secrets key its group or others can read: refused at start, saying what to do.
    let key = data.join("secrets.key");
    for loose in [0o644, 0o640] {
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(loose)).unwrap();
        let (ok, out) = policy_run(&data, policy.database_url.as_deref());
        assert!(!ok, "started with a key of mode {loose:o}: {out}");
        assert!(
            out.contains("can be read by its group or other users") && out.contains("chmod 600"),
            "{out}"
        );
    }
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    policy.restart(dir.path()).await;
}
