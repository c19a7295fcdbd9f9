//! Attacks on the data plane, performed through real Envoy with the shipped configs:
//! header bytes that are not UTF-8, path walks, forged routing headers (against both
//! builds of the filter), and a wasm VM that fails. Each test fails on the hole it
//! names being open again.

use std::time::{Duration, Instant};

use mcpguard_e2e::raw::{self, Rng, Spy};
use mcpguard_e2e::{Envoy, EnvoyOptions, Stack, free_port};

/// The bytes a client can put in a header value that Envoy's codec may let through:
/// visible ASCII, space and tab, obs-text (0x80-0xff), and now and then a byte the
/// codec must refuse (NUL, DEL, other controls). Never CR or LF: those end the line, a
/// matter of framing, not of the value's bytes.
fn header_value(rng: &mut Rng) -> Vec<u8> {
    let len = 1 + rng.below(24) as usize;
    (0..len)
        .map(|_| match rng.below(20) {
            0 => [0u8, 0x7f, 0x01, 0x1b][rng.below(4) as usize],
            1..=8 => 0x80 + rng.below(0x80) as u8,
            9 => b'\t',
            _ => 0x20 + rng.below(0x5f) as u8,
        })
        .collect()
}

async fn upstream_requests(envoy: &Envoy) -> u64 {
    envoy
        .stat("cluster.mcpguard_upstream_http.upstream_rq_total")
        .await
        + envoy
            .stat("cluster.mcpguard_upstream_https.upstream_rq_total")
            .await
}

/// A POST to `path` with these header lines (name, raw value) on the data plane.
fn head(path: &[u8], headers: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut h = b"POST ".to_vec();
    h.extend_from_slice(path);
    h.extend_from_slice(b" HTTP/1.1\r\nhost: gateway\r\n");
    h.extend_from_slice(raw::MCP_HEADERS.as_bytes());
    for (name, value) in headers {
        h.extend_from_slice(name);
        h.extend_from_slice(b": ");
        h.extend_from_slice(value);
        h.extend_from_slice(b"\r\n");
    }
    h
}

#[tokio::test]
async fn random_header_bytes_never_fail_the_filter() {
    let stack = Stack::start().await;
    let spy = Spy::start().await;
    let p = stack
        .admin()
        .provision("eng", "spy", &spy.url("/base"))
        .await;
    let bearer = format!("Bearer {}", p.token);
    let seed = Rng::seed_from_clock();
    let mut rng = Rng::new(seed);
    let names: [&[u8]; 6] = [
        b"authorization",
        b"x-request-id",
        b"x-p",
        b"user-agent",
        b"accept",
        b"x-forwarded-host",
    ];
    let mut refused_by_codec = 0;
    for i in 0..300 {
        let value = header_value(&mut rng);
        let name = names[rng.below(names.len() as u64) as usize];
        let mut headers: Vec<(&[u8], &[u8])> = vec![(name, &value)];
        // Mostly with the live token beside the random header (so the check runs),
        // sometimes the random bytes are the token.
        let with_token = name != b"authorization";
        if with_token {
            headers.push((b"authorization", bearer.as_bytes()));
        }
        let (status, body) = raw::request(
            stack.envoy.port,
            &head(b"/mcp/eng/spy", &headers),
            raw::PING,
        )
        .await;
        match status {
            // Envoy's codec refusing a byte it does not allow in a value.
            400 => refused_by_codec += 1,
            // The filter refusing a token it cannot read, with the contract's body.
            401 => assert!(
                !with_token && body.contains("\"code\""),
                "seed {seed} case {i}: {name:?}={value:?}: 401 {body}"
            ),
            200 => assert!(
                with_token,
                "seed {seed} case {i}: {name:?}={value:?} was allowed"
            ),
            other => panic!("seed {seed} case {i}: {name:?}={value:?}: {other} {body}"),
        }
    }
    assert!(
        refused_by_codec < 300,
        "seed {seed}: nothing reached the filter"
    );
    // No VM failed on the way (a failure would have been healed by FAIL_RELOAD, and
    // counted here), and the gateway still serves.
    for stat in [
        "wasm.mcpguard.vm_reload_backoff",
        "wasm.mcpguard.vm_reload_success",
    ] {
        assert_eq!(stack.envoy.stat(stat).await, 0, "seed {seed}: {stat}");
    }
    assert!(
        !stack.envoy.proc.log_text().contains("panicked"),
        "seed {seed}: the filter panicked"
    );
    let (status, _) = raw::request(
        stack.envoy.port,
        &head(b"/mcp/eng/spy", &[(b"authorization", bearer.as_bytes())]),
        raw::PING,
    )
    .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn path_walks_never_reach_the_upstream_outside_its_path() {
    let stack = Stack::start().await;
    let spy = Spy::start().await;
    let admin = stack.admin();
    let p = admin.provision("eng", "spy", &spy.url("/base")).await;
    let bearer = format!("Bearer {}", p.token);
    let auth: [(&[u8], &[u8]); 1] = [(b"authorization", bearer.as_bytes())];
    let walks: [&[u8]; 14] = [
        b"/mcp/eng/spy/%2e%2e/x",
        b"/mcp/eng/spy/.%2e/x",
        b"/mcp/eng/spy/..;/x",
        b"/mcp/eng/spy/x/..;/..;/y",
        b"/mcp/eng/spy/%5c..%5cx",
        b"/mcp/eng/spy/%252e%252e/x",
        b"/mcp/eng/spy/%252e%252e%252fx",
        b"/mcp/eng/spy//x",
        b"/mcp/eng/spy///x",
        b"/mcp/eng/spy/%2F..%2Fx",
        b"/mcp/eng/spy/a/../../x",
        b"/mcp/eng/spy/..\\x",
        b"/mcp/eng/spy/x/%2e%2e%5c%2e%2e/y",
        b"/mcp/eng/spy/%c0%ae%c0%ae/x",
    ];
    for walk in walks {
        let (status, body) = raw::request(stack.envoy.port, &head(walk, &auth), raw::PING).await;
        assert!(
            status == 200 || (400..500).contains(&status),
            "{}: {status} {body}",
            String::from_utf8_lossy(walk)
        );
    }
    // A plain sub-path still goes through, below the server's path.
    let (status, _) = raw::request(
        stack.envoy.port,
        &head(b"/mcp/eng/spy/ok", &auth),
        raw::PING,
    )
    .await;
    assert_eq!(status, 200);
    let seen = spy.paths();
    assert!(seen.contains(&"/base/ok".to_owned()), "{seen:?}");
    for path in &seen {
        let walks_out = !(path == "/base" || path.starts_with("/base/"))
            || path.contains("..")
            || path.contains('%')
            || path.contains(';')
            || path.contains('\\')
            || path.contains("//");
        assert!(!walks_out, "the upstream saw {path:?} (all: {seen:?})");
    }
}

/// The forged-route attack: the header that selects a forwarding route, plus a `Host`
/// naming any address, on requests the filter does not authorise.
async fn forged_routes_reach_nothing(config: &'static str) {
    let stack = Stack::start_config(config).await;
    let spy = Spy::start().await;
    let target = format!("127.0.0.1:{}", spy.port);
    let before = upstream_requests(&stack.envoy).await;
    for route in ["http", "https"] {
        for path in ["/", "/anything", "/.well-known/x", "/mcpx/a/b", "/mcp"] {
            let mut h = format!("GET {path} HTTP/1.1\r\nhost: {target}\r\n").into_bytes();
            h.extend_from_slice(format!("x-mcpguard-route: {route}\r\n").as_bytes());
            let (status, body) = raw::request(stack.envoy.port, &h, b"").await;
            assert_eq!(
                status, 404,
                "{config}: {path} with route {route}: {status} {body}"
            );
            assert!(body.contains("unknown_route"), "{config}: {path}: {body}");
        }
    }
    assert_eq!(
        spy.paths(),
        Vec::<String>::new(),
        "{config}: reached the spy"
    );
    assert_eq!(upstream_requests(&stack.envoy).await, before, "{config}");
}

#[tokio::test]
async fn forged_route_headers_reach_nothing_through_the_wasm_filter() {
    forged_routes_reach_nothing("envoy/mcpguard.yaml").await;
}

#[tokio::test]
async fn forged_route_headers_reach_nothing_through_the_dynamic_module() {
    forged_routes_reach_nothing("bench/envoy/dynamic-module.yaml").await;
}

/// The shipped config's `failure_policy`, watched with a stand-in filter that panics
/// on demand (tests/crash-filter): a request that meets the failed VM is refused, no
/// request ever reaches an upstream, and the gateway serves again by itself.
#[tokio::test]
async fn a_failed_vm_refuses_then_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let opts = EnvoyOptions {
        config: "envoy/mcpguard.yaml",
        check_port: free_port(),
        check_timeout_ms: None,
        trusted_ca: None,
        issuer: None,
        jwks_refresh_s: None,
    };
    let (port, admin_port) = (free_port(), free_port());
    let shipped = Envoy::wasm().display().to_string();
    let crasher = shipped.replace("mcpguard_filter.wasm", "mcpguard_crash_filter.wasm");
    assert!(std::path::Path::new(&crasher).exists(), "run `make build`");
    let config = Envoy::render(&opts, port, admin_port).replace(&shipped, &crasher);
    let envoy = Envoy::start_config(&config, port, admin_port, dir.path()).await;
    let get = |crash: bool| async move {
        let extra = if crash { "x-crash: 1\r\n" } else { "" };
        let h = format!("GET /mcp/g/s HTTP/1.1\r\nhost: gw\r\n{extra}");
        raw::request(port, h.as_bytes(), b"").await
    };
    assert_eq!(get(false).await, (200, "checked".to_owned()));
    let (status, _) = get(true).await;
    assert_eq!(status, 503, "the crashing request is refused");
    let started = Instant::now();
    let mut refused = 0;
    loop {
        match get(false).await {
            (200, body) if body == "checked" => break,
            (503, _) => refused += 1,
            other => panic!("after the crash: {other:?}"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "no recovery within 15 s ({refused} refused)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(envoy.stat("wasm.mcpguard.vm_reload_success").await >= 1);
    assert_eq!(upstream_requests(&envoy).await, 0);
}

/// A direct call to the check port, as any process on the host could make.
async fn direct(
    port: u16,
    path: &str,
    secret: Option<&str>,
    body: serde_json::Value,
) -> (u16, String) {
    let mut req = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}{path}"))
        .timeout(Duration::from_secs(10))
        .json(&body);
    if let Some(s) = secret {
        req = req.header("x-mcpguard-check-secret", s);
    }
    let resp = req.send().await.expect("check port reachable");
    (
        resp.status().as_u16(),
        resp.text().await.unwrap_or_default(),
    )
}

#[tokio::test]
async fn the_check_port_hands_credentials_to_envoy_only() {
    let stack = Stack::start().await;
    let admin = stack.admin();
    let p = admin
        .provision("eng", "demo", &stack.demo.upstream_url())
        .await;
    let downstream = "shared-downstream-secret-0123456789";
    admin
        .expose_as(
            p.gateway_id,
            p.server_id,
            serde_json::json!({"identity": "shared",
                "credential": {"type": "bearer", "token": downstream}}),
        )
        .await;
    let check_port = stack.policy.check_port;
    let hash = mcpguard_core::token::TokenHash::of(&p.token).to_hex();
    let api_check = serde_json::json!({
        "credential": {"kind": "api_token", "hash": hash},
        "gateway": "eng", "server": "demo",
    });
    // Anyone but Envoy: 401 and nothing else, on every decision endpoint.
    let secret = mcpguard_e2e::procs::check_secret();
    let wrong = "0".repeat(secret.len());
    for s in [None, Some(""), Some(wrong.as_str())] {
        for path in ["/v1/check", "/v1/ext_authz/mcp/eng/demo"] {
            let (status, body) = direct(check_port, path, s, api_check.clone()).await;
            assert_eq!(status, 401, "{path} with {s:?}: {body}");
            assert!(body.contains("check_unauthenticated"), "{body}");
            assert!(!body.contains(downstream), "{path}: {body}");
        }
    }
    // With the secret, guessable ids are no proof: the old OAuth shape does not parse,
    // and a made-up access token for a real grant is refused.
    let ids = serde_json::json!({
        "credential": {"kind": "oauth", "grant": 1, "connection": p.connection_id, "jti": "x"},
        "gateway": "eng", "server": "demo",
    });
    let (status, body) = direct(check_port, "/v1/check", Some(secret), ids).await;
    assert_eq!(status, 422, "{body}");
    assert!(!body.contains(downstream), "{body}");
    let forged = serde_json::json!({
        "credential": {"kind": "oauth",
            "token": "eyJhbGciOiJFZERTQSIsInR5cCI6ImF0K2p3dCJ9.eyJnaWQiOjEsImNpZCI6MX0.c2ln",
            "resource": stack.envoy.mcp_url("eng", "demo")},
        "gateway": "eng", "server": "demo",
    });
    let (status, body) = direct(check_port, "/v1/check", Some(secret), forged).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"deny\""), "{body}");
    assert!(!body.contains(downstream), "{body}");
    // Envoy itself holds the secret: the token works through it, credential injected.
    let client = mcpguard_e2e::mcp::connect(&stack.envoy.mcp_url("eng", "demo"), Some(&p.token))
        .await
        .expect("the token works through Envoy");
    let seen = mcpguard_e2e::mcp::call_text(&client, "whoami", serde_json::json!({}))
        .await
        .unwrap();
    assert!(seen.contains(downstream), "{seen}");
}

/// DNS rebinding, and a forged destination: Envoy connects only to the address the
/// policy service resolved and judged for the very request, never to one a client
/// names, and a name whose addresses the policy now refuses is refused at once.
#[tokio::test]
async fn every_request_connects_only_to_an_address_judged_for_it() {
    let mut stack = Stack::start().await;
    let spy = Spy::start().await;
    let decoy = Spy::start().await;
    let admin = stack.admin();
    let by_name = format!("http://localhost:{}/base", spy.port);
    let p = admin.provision("eng", "spy", &by_name).await;
    let bearer = format!("Bearer {}", p.token);
    let decoy_addr = format!("127.0.0.1:{}", decoy.port);
    let headers: [(&[u8], &[u8]); 2] = [
        (b"authorization", bearer.as_bytes()),
        (b"x-mcpguard-upstream-addr", decoy_addr.as_bytes()),
    ];
    let (status, body) = raw::request(
        stack.envoy.port,
        &head(b"/mcp/eng/spy", &headers),
        raw::PING,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(spy.paths(), vec!["/base".to_owned()]);
    assert_eq!(
        spy.hosts(),
        vec![format!("localhost:{}", spy.port)],
        "the name stays the Host"
    );
    assert_eq!(
        decoy.paths(),
        Vec::<String>::new(),
        "a client-named address was used"
    );

    // The name now resolves only into networks the operator denies (what a rebinding
    // to an inside address looks like to the policy): refused on the next request.
    stack
        .policy
        .restart_with(
            stack.dir.path(),
            &[("MCPGUARD_UPSTREAM_DENY_NETWORKS", "127.0.0.0/8,::1/128")],
        )
        .await;
    let (status, body) = raw::request(
        stack.envoy.port,
        &head(b"/mcp/eng/spy", &headers),
        raw::PING,
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("upstream_denied"), "{body}");
    assert_eq!(
        spy.paths().len(),
        1,
        "the refused request reached the upstream"
    );
    assert_eq!(decoy.paths(), Vec::<String>::new());
}
