//! Attacks on the policy service's ports themselves (issue 19, item 10): slow headers
//! and bodies, idle connections, connection floods and oversized bodies. Each is made
//! against the real service while real Envoy carries a real token's requests, which
//! must keep being served: the check port is shielded from a flooded public port.

use std::time::{Duration, Instant};

use futures::future::join_all;
use mcpguard_e2e::Stack;
use mcpguard_e2e::mcp::initialize_with;
use reqwest::Method;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads until the peer closes (EOF or reset); false if it is still open at `deadline`.
async fn closed_by(stream: &mut TcpStream, deadline: Instant) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

async fn open(port: u16, first_bytes: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    if !first_bytes.is_empty() {
        s.write_all(first_bytes).await.unwrap();
    }
    s
}

/// A fresh connection (no pooling) to `url`, answered within 2 s: its status.
async fn fresh_status(method: Method, url: &str, body: Option<Value>) -> Option<u16> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let mut req = client.request(method, url);
    if let Some(body) = body {
        req = req.json(&body);
    }
    req.send().await.ok().map(|r| r.status().as_u16())
}

/// A check as the filter sends it, for a token nobody holds.
fn check_body(request_id: &str) -> Value {
    json!({"credential": {"kind": "api_token", "hash": "ab".repeat(32)},
           "gateway": "eng", "server": "demo", "request_id": request_id})
}

/// The check port answers on a fresh connection (whatever the lead's authentication of
/// callers answers: any status short of a failure), and a real token's request through
/// Envoy is allowed.
async fn check_port_serves(stack: &Stack, token: &str) {
    let check = format!("http://127.0.0.1:{}", stack.policy.check_port);
    let healthz = fresh_status(Method::GET, &format!("{check}/healthz"), None).await;
    assert_eq!(
        healthz,
        Some(200),
        "check port /healthz on a new connection"
    );
    let status = fresh_status(
        Method::POST,
        &format!("{check}/v1/check"),
        Some(check_body("shielded")),
    )
    .await;
    assert!(
        status.is_some_and(|s| s < 500),
        "/v1/check on a new connection: {status:?}"
    );
    let a = initialize_with(&stack.envoy.mcp_url("eng", "demo"), Some(token)).await;
    assert_eq!(a.status, 200, "a real token through Envoy: {}", a.body);
}

/// Slowloris: many connections to the public port that never finish a request. Every
/// one is closed once the header read timeout has passed, and while they are all open
/// the check port answers and Envoy serves a real token.
#[tokio::test]
async fn slow_headers_on_the_public_port_are_cut_off_and_the_check_port_keeps_serving() {
    let timeout_ms = 1000;
    let stack = Stack::start_with(
        false,
        &[("MCPGUARD_HEADER_READ_TIMEOUT_MS", &timeout_ms.to_string())],
        None,
    )
    .await;
    let p = stack
        .admin()
        .provision("eng", "demo", &stack.demo.upstream_url())
        .await;
    let port = stack.policy.public_port;
    // Half a header; nothing at all; a prefix of the HTTP/2 preface; the whole preface
    // and SETTINGS but never a request.
    let h2_preface_and_settings: &[u8] =
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
    let kinds: [&[u8]; 4] = [
        b"POST /oauth/login HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: aaaa",
        b"",
        b"PRI * HTTP/2.0\r\n",
        h2_preface_and_settings,
    ];
    let opened = Instant::now();
    let mut slow = join_all((0..200).map(|i| open(port, kinds[i % kinds.len()]))).await;

    check_port_serves(&stack, &p.token).await;

    // All closed by the service, soon after the timeout (bounded poll, not a sleep).
    let deadline = opened + Duration::from_millis(timeout_ms) + Duration::from_secs(8);
    let closed = join_all(slow.iter_mut().map(|s| closed_by(s, deadline))).await;
    let still_open = closed.iter().filter(|c| !**c).count();
    assert_eq!(
        still_open,
        0,
        "slow connections still open after {:?}",
        opened.elapsed()
    );
    assert!(
        opened.elapsed() >= Duration::from_millis(timeout_ms - 100),
        "closed before the timeout"
    );
    // The service itself is fine.
    assert_eq!(stack.admin().get("/api/v1/gateways").await.0, 200);
}

/// A request whose headers arrived but whose body never does is answered 408 at the
/// request timeout instead of holding its connection forever.
#[tokio::test]
async fn a_body_that_never_arrives_gets_408() {
    let stack = Stack::start_with(false, &[("MCPGUARD_REQUEST_TIMEOUT_MS", "1500")], None).await;
    let mut s = open(
        stack.policy.public_port,
        format!(
            "POST /api/v1/gateways HTTP/1.1\r\nHost: 127.0.0.1\r\n\
             Authorization: Bearer {}\r\nContent-Type: application/json\r\n\
             Content-Length: 100\r\n\r\n{{\"name\":",
            mcpguard_e2e::procs::ADMIN_TOKEN
        )
        .as_bytes(),
    )
    .await;
    let started = Instant::now();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = [0u8; 1024];
        while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "no answer after 10 s to a body that never came"
    );
    let head = String::from_utf8_lossy(&answer);
    assert!(head.starts_with("HTTP/1.1 408"), "{head}");
    assert!(
        started.elapsed() >= Duration::from_millis(1400),
        "{:?}",
        started.elapsed()
    );
}

/// HTTP/2 (h2c prior knowledge, as Envoy talks to the check port) still works, and a
/// connection that stops sending requests is closed with GOAWAY at the idle timeout.
#[tokio::test]
async fn an_idle_h2_connection_to_the_check_port_gets_goaway() {
    let stack = Stack::start_with(false, &[("MCPGUARD_IDLE_TIMEOUT_MS", "1000")], None).await;
    let mut s = open(
        stack.policy.check_port,
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00",
    )
    .await;
    // GET /healthz on stream 1: HPACK static entries (:method GET, :scheme http), then
    // :path and :authority as literals.
    let mut block = vec![0x82, 0x86, 0x44, 8];
    block.extend_from_slice(b"/healthz");
    block.extend_from_slice(&[0x41, 9]);
    block.extend_from_slice(b"127.0.0.1");
    let mut headers = vec![0, 0, block.len() as u8, 0x1, 0x5, 0, 0, 0, 1];
    headers.extend_from_slice(&block);
    s.write_all(&headers).await.unwrap();
    let sent = Instant::now();
    // Frames until GOAWAY, then the close.
    let (mut answered, mut goaway) = (None, None);
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let mut head = [0u8; 9];
            if s.read_exact(&mut head).await.is_err() {
                return;
            }
            let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
            let mut payload = vec![0u8; len];
            if s.read_exact(&mut payload).await.is_err() {
                return;
            }
            let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            match head[3] {
                0x1 if stream == 1 => answered = Some(payload.first().copied()),
                0x7 if goaway.is_none() => goaway = Some(sent.elapsed()),
                // As every client does: acknowledge PINGs (a graceful close uses one).
                0x6 if head[4] & 0x1 == 0 => {
                    let mut ack = vec![0, 0, 8, 0x6, 0x1, 0, 0, 0, 0];
                    ack.extend_from_slice(&payload);
                    if s.write_all(&ack).await.is_err() {
                        return;
                    }
                }
                _ => {}
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the idle connection is still open after 10 s");
    // 0x88: HPACK static entry 8, `:status 200`.
    assert_eq!(
        answered,
        Some(Some(0x88)),
        "the h2 request was answered 200"
    );
    let goaway = goaway.expect("GOAWAY before the close");
    assert!(
        goaway >= Duration::from_millis(900),
        "GOAWAY after {goaway:?}"
    );
}

/// A connection flood on the public port: past its budget new connections are closed
/// at once, and the check port, with a budget of its own, keeps accepting. The service
/// runs with 256 file descriptors, so without the budgets the flood would take them
/// all and the check port could accept nothing.
#[tokio::test]
async fn a_connection_flood_on_the_public_port_does_not_stop_the_check_port() {
    let stack = Stack::start_with(
        false,
        &[
            ("MCPGUARD_PUBLIC_MAX_CONNECTIONS", "64"),
            ("MCPGUARD_CHECK_MAX_CONNECTIONS", "32"),
        ],
        None,
    )
    .await;
    let p = stack
        .admin()
        .provision("eng", "demo", &stack.demo.upstream_url())
        .await;
    let pid = i32::try_from(stack.policy.proc.pid()).unwrap();
    rlimit::prlimit(pid, rlimit::Resource::NOFILE, Some((256, 256)), None).unwrap();

    let flood = 400;
    let mut conns = Vec::new();
    for _ in 0..flood {
        match TcpStream::connect(("127.0.0.1", stack.policy.public_port)).await {
            Ok(s) => conns.push(s),
            Err(_) => break,
        }
    }
    // While the flood is open, the check port accepts and serves.
    check_port_serves(&stack, &p.token).await;
    // Over budget: closed at once. Within it: held (until the header read timeout).
    let deadline = Instant::now() + Duration::from_secs(2);
    let closed = join_all(conns.iter_mut().map(|s| closed_by(s, deadline))).await;
    let held = closed.iter().filter(|c| !**c).count();
    assert!(
        (32..=64).contains(&held),
        "{held} of {flood} connections held; the public budget is 64"
    );

    drop(conns);
    // The public port serves again once the flood is gone.
    let admin = stack.admin();
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let status = fresh_status(Method::GET, &format!("{}/healthz", admin.base), None).await;
        if status == Some(200) {
            break;
        }
        assert!(
            Instant::now() < until,
            "public port after the flood: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn decisions(stack: &Stack) -> usize {
    let (status, page) = stack
        .admin()
        .get("/api/v1/audit?kind=decision&limit=100")
        .await;
    assert_eq!(status, 200, "{page}");
    page["entries"].as_array().unwrap().len()
}

fn assert_too_large(status: u16, body: &str, what: &str) {
    assert_eq!(status, 413, "{what}: {body}");
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{what}: {e}: {body}"));
    assert_eq!(v["error"]["code"], "body_too_large", "{what}: {body}");
}

/// An oversized body gets 413 in the error format on each port, declared or not, and
/// changes nothing: no gateway is created, no check is made or audited.
#[tokio::test]
async fn an_oversized_body_gets_413_on_each_port_and_changes_nothing() {
    let stack = Stack::start().await;
    let admin = stack.admin();
    let p = admin
        .provision("eng", "demo", &stack.demo.upstream_url())
        .await;
    let http = reqwest::Client::new();
    let big = json!({"name": "a".repeat(300 * 1024), "slug": "big"}).to_string();

    // Public port, with Content-Length and chunked (no length declared).
    let url = format!("{}/api/v1/gateways", admin.base);
    let bearer = format!("Bearer {}", mcpguard_e2e::procs::ADMIN_TOKEN);
    let declared = http
        .post(&url)
        .header("authorization", &bearer)
        .header("content-type", "application/json")
        .body(big.clone())
        .send()
        .await
        .unwrap();
    let status = declared.status().as_u16();
    assert_too_large(status, &declared.text().await.unwrap(), "declared, public");
    let chunks = futures::stream::iter(
        big.clone()
            .into_bytes()
            .chunks(16 * 1024)
            .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
            .collect::<Vec<_>>(),
    );
    let chunked = http
        .post(&url)
        .header("authorization", &bearer)
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    let status = chunked.status().as_u16();
    assert_too_large(status, &chunked.text().await.unwrap(), "chunked, public");
    let (_, gateways) = admin.get("/api/v1/gateways").await;
    assert!(
        !gateways.to_string().contains("\"big\""),
        "a gateway was created: {gateways}"
    );

    // Check port: a check and an ext_authz question far past its 16 KiB.
    let before = decisions(&stack).await;
    let check = format!("http://127.0.0.1:{}", stack.policy.check_port);
    for path in ["/v1/check", "/v1/ext_authz/mcp/eng/demo"] {
        let resp = http
            .post(format!("{check}{path}"))
            .header("content-type", "application/json")
            .body(check_body(&"r".repeat(64 * 1024)).to_string())
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        assert_too_large(status, &resp.text().await.unwrap(), path);
    }
    // A refused request through Envoy is audited; it must be the only new decision.
    let unknown = mcpguard_core::token::format_token(
        mcpguard_core::token::TokenKind::HostApi,
        &"u".repeat(40),
    )
    .unwrap();
    let a = initialize_with(&stack.envoy.mcp_url("eng", "demo"), Some(&unknown)).await;
    assert_eq!(a.status, 401, "{}", a.body);
    let until = Instant::now() + Duration::from_secs(10);
    while decisions(&stack).await == before {
        assert!(
            Instant::now() < until,
            "the sentinel decision was never audited"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(decisions(&stack).await, before + 1);
    // And the real token still works.
    let a = initialize_with(&stack.envoy.mcp_url("eng", "demo"), Some(&p.token)).await;
    assert_eq!(a.status, 200, "{}", a.body);
}
