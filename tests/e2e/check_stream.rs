//! EXPERIMENTAL (issue 27): the wasm filter with `"check_transport": "stream"`, its
//! checks as messages on one gRPC stream per Envoy worker to the policy service's
//! `/mcpguard.v1.Check/Stream`. Real Envoy, real `.wasm`, real policy service: the
//! same answers as the HTTP callout, and the same fail-closed behaviour when the stream
//! breaks or the policy service is slow.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use hyper::body::{Bytes, Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mcpguard_core::check_stream as wire;
use mcpguard_e2e::mcp::{self, call_text, initialize_with};
use mcpguard_e2e::procs::check_secret;
use mcpguard_e2e::{Envoy, EnvoyOptions, Stack, free_port};
use serde_json::{Value, json};

use crate::failure::{assert_refused_at_the_deadline, silent_check_port};

/// Sets `check_transport` in every mcpguard plugin configuration of a rendered config.
fn with_stream(node: &mut Value) {
    match node {
        Value::Object(map) => {
            if let Some(Value::String(text)) = map.get_mut("value")
                && let Ok(mut plugin) = serde_json::from_str::<Value>(text)
                && plugin.get("policy_cluster").is_some()
            {
                plugin["check_transport"] = "stream".into();
                *text = plugin.to_string();
            }
            map.values_mut().for_each(with_stream);
        }
        Value::Array(items) => items.iter_mut().for_each(with_stream),
        _ => {}
    }
}

/// An Envoy like the stack's, its checks on the stream, to `check_port`.
async fn stream_envoy(check_port: u16, timeout_ms: Option<u64>, dir: &std::path::Path) -> Envoy {
    let opts = EnvoyOptions {
        config: "envoy/mcpguard.yaml",
        check_port,
        check_timeout_ms: timeout_ms.or(mcpguard_e2e::db::postgres_requested()
            .then_some(mcpguard_e2e::db::POSTGRES_CHECK_TIMEOUT_MS)),
        trusted_ca: None,
        issuer: None,
        jwks_refresh_s: None,
    };
    let (port, admin_port) = (free_port(), free_port());
    let mut cfg: Value = serde_json::from_str(&Envoy::render(&opts, port, admin_port)).unwrap();
    with_stream(&mut cfg);
    assert!(
        cfg.to_string().contains("check_transport"),
        "no plugin config found"
    );
    Envoy::start_config(&cfg.to_string(), port, admin_port, dir).await
}

#[tokio::test]
async fn checks_on_the_stream_allow_and_refuse_as_the_callout_does() {
    let stack = Stack::start().await;
    let p = stack
        .admin()
        .provision("eng", "demo", &stack.demo.upstream_url())
        .await;
    let envoy = stream_envoy(stack.policy.check_port, None, stack.dir.path()).await;
    let url = envoy.mcp_url("eng", "demo");

    let session = mcp::connect(&url, Some(&p.token)).await.unwrap();
    let text = call_text(&session, "echo", json!({"text": "over the stream"}))
        .await
        .unwrap();
    assert!(text.contains("over the stream"), "{text}");

    let unknown = mcpguard_core::token::format_token(
        mcpguard_core::token::TokenKind::HostApi,
        &"a".repeat(40),
    )
    .unwrap();
    let a = initialize_with(&url, Some(&unknown)).await;
    assert_eq!(
        (a.status, a.code().as_str()),
        (401, "token_unknown"),
        "{}",
        a.body
    );
    let a = initialize_with(&envoy.mcp_url("eng", "nope"), Some(&p.token)).await;
    assert_ne!(a.status, 200, "{}", a.body);
    // Revoked now: the very next check on the same stream refuses it (no cache).
    stack.admin().revoke(p.token_id).await;
    let a = initialize_with(&url, Some(&p.token)).await;
    assert_eq!(
        (a.status, a.code().as_str()),
        (401, "token_revoked"),
        "{}",
        a.body
    );
}

#[tokio::test]
async fn a_killed_policy_service_refuses_in_flight_checks_and_a_new_stream_takes_over() {
    let mut stack = Stack::start().await;
    let p = stack
        .admin()
        .provision("eng", "demo", &stack.demo.upstream_url())
        .await;
    let envoy = stream_envoy(stack.policy.check_port, None, stack.dir.path()).await;
    let url = envoy.mcp_url("eng", "demo");
    assert_eq!(initialize_with(&url, Some(&p.token)).await.status, 200);

    // Requests keep coming, several at once, while the policy service dies: each is
    // either allowed (answered before) or refused 503; never anything else.
    let load = (0..8).map(|_| {
        let (url, token) = (url.clone(), p.token.clone());
        tokio::spawn(async move {
            let mut seen = Vec::new();
            let until = Instant::now() + Duration::from_millis(1500);
            while Instant::now() < until {
                let a = initialize_with(&url, Some(&token)).await;
                // An allowed initialize answers as an event stream, not JSON.
                let code = if a.status == 200 {
                    String::new()
                } else {
                    a.code()
                };
                seen.push((a.status, code));
            }
            seen
        })
    });
    let load: Vec<_> = load.collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stack.policy.proc.kill();
    let mut refused = 0;
    for task in load {
        for (status, code) in task.await.unwrap() {
            match status {
                200 => {}
                503 => {
                    assert_eq!(code, "policy_unavailable");
                    refused += 1;
                }
                other => panic!("answered {other} {code} while the policy service died"),
            }
        }
    }
    assert!(refused > 0, "nothing was refused after the kill");
    assert!(
        envoy
            .stat("wasmcustom.mcpguard.denied.policy_unavailable")
            .await
            >= refused
    );

    // Back on the same data and port: a new stream serves (polled, bounded).
    stack.policy.restart(stack.dir.path()).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let a = initialize_with(&url, Some(&p.token)).await;
        if a.status == 200 {
            break;
        }
        assert_eq!(a.code(), "policy_unavailable", "{}", a.body);
        assert!(Instant::now() < deadline, "no new stream took over");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Connections Envoy has opened to the policy cluster.
const POLICY_CONNECTIONS: &str = "cluster.mcpguard_policy.upstream_cx_total";

#[tokio::test]
async fn a_stream_outlives_the_policy_services_idle_timeout_and_keeps_answering() {
    // A stream is one request that never ends: the connection it rides on must not
    // count as idle. Short timeouts, so a wrong close shows within a second.
    let (idle_ms, drain_ms) = (300, 100);
    let stack = Stack::start_with(
        false,
        &[
            ("MCPGUARD_IDLE_TIMEOUT_MS", &idle_ms.to_string()),
            ("MCPGUARD_DRAIN_TIMEOUT_MS", &drain_ms.to_string()),
        ],
        None,
    )
    .await;
    let p = stack
        .admin()
        .provision("eng", "demo", &stack.demo.upstream_url())
        .await;
    let envoy = stream_envoy(stack.policy.check_port, None, stack.dir.path()).await;
    let url = envoy.mcp_url("eng", "demo");
    assert_eq!(initialize_with(&url, Some(&p.token)).await.status, 200);
    let connections = envoy.stat(POLICY_CONNECTIONS).await;
    let past_the_timeouts = Duration::from_millis(3 * (idle_ms + drain_ms));

    // Quiet: nothing on the stream for several idle timeouts (time passing is the
    // point). Before the fix the policy service sent GOAWAY at 300 ms and cut the
    // connection, and the stream with it, 100 ms later.
    tokio::time::sleep(past_the_timeouts).await;
    let a = initialize_with(&url, Some(&p.token)).await;
    assert_eq!(a.status, 200, "{}", a.body);

    // Busy: checks back to back for as long again, every one answered on the stream.
    let until = Instant::now() + past_the_timeouts;
    let mut answered = 0;
    while Instant::now() < until {
        let a = initialize_with(&url, Some(&p.token)).await;
        assert_eq!(a.status, 200, "check {answered} in a row: {}", a.body);
        answered += 1;
    }
    assert!(answered > 10, "only {answered} checks");
    assert_eq!(
        envoy.stat(POLICY_CONNECTIONS).await,
        connections,
        "the stream's connection was closed and replaced"
    );
    assert_eq!(
        envoy
            .stat("wasmcustom.mcpguard.denied.policy_unavailable")
            .await,
        0
    );
}

#[tokio::test]
async fn a_stream_that_never_answers_refuses_within_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let (silent_port, hold) = silent_check_port().await;
    let envoy = stream_envoy(silent_port, Some(200), dir.path()).await;
    // Twice: a request after that refusal is refused the same way, not left waiting.
    for _ in 0..2 {
        assert_refused_at_the_deadline(&envoy).await;
    }
    hold.abort();
}

/// A fault injector on the check stream: a gRPC server speaking the stream's framing
/// that holds each check until the next one arrives and then answers the later one
/// first. The answers themselves are the real policy service's: each check is relayed
/// to its `/v1/check`, so only their order is forged.
struct ReorderingCheckPort {
    port: u16,
    /// Check messages received so far, over every stream.
    received: tokio::sync::watch::Receiver<usize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ReorderingCheckPort {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ReorderingCheckPort {
    async fn start(policy_check_port: u16) -> ReorderingCheckPort {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (count, received) = tokio::sync::watch::channel(0);
        let relay = Arc::new(Relay {
            check_url: format!("http://127.0.0.1:{policy_check_port}/v1/check"),
            http: reqwest::Client::new(),
            count,
        });
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let relay = relay.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let relay = relay.clone();
                        async move { Ok::<_, Infallible>(relay.serve(req)) }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        ReorderingCheckPort {
            port,
            received,
            task,
        }
    }

    /// Waits (bounded) until `n` check messages have arrived.
    async fn wait_received(&mut self, n: usize) {
        let arrived = tokio::time::timeout(
            Duration::from_secs(10),
            self.received.wait_for(|got| *got >= n),
        )
        .await
        .is_ok_and(|r| r.is_ok());
        let got = *self.received.borrow();
        assert!(
            arrived,
            "{n} checks did not arrive on the stream (got {got})"
        );
    }
}

type StreamBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

struct Relay {
    check_url: String,
    http: reqwest::Client,
    count: tokio::sync::watch::Sender<usize>,
}

impl Relay {
    fn serve(self: &Arc<Self>, req: hyper::Request<Incoming>) -> hyper::Response<StreamBody> {
        let (tx, rx) = tokio::sync::mpsc::channel::<Frame<Bytes>>(16);
        if req.uri().path() == wire::PATH {
            tokio::spawn(self.clone().checks(req.into_body(), tx));
        } else {
            // The filter's key fetch: nothing here for it (it retries; API tokens do
            // not need keys).
            drop(tx);
        }
        let frames = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|frame| (Ok(frame), rx))
        });
        hyper::Response::builder()
            .header("content-type", "application/grpc")
            .body(http_body_util::StreamBody::new(frames).boxed())
            .unwrap()
    }

    /// Reads the stream's checks; each second one is answered before the first.
    async fn checks(
        self: Arc<Self>,
        mut body: Incoming,
        tx: tokio::sync::mpsc::Sender<Frame<Bytes>>,
    ) {
        let (mut buf, mut held) = (Vec::new(), None);
        while let Some(Ok(frame)) = body.frame().await {
            let Ok(data) = frame.into_data() else {
                continue;
            };
            buf.extend_from_slice(&data);
            while let wire::Frame::Message { len } = wire::next_frame(&buf) {
                let message: Vec<u8> = buf.drain(..5 + len).skip(5).collect();
                let (id, check) = wire::decode_check(&message).unwrap();
                let check = (id, check.to_vec());
                self.count.send_modify(|n| *n += 1);
                let Some(first) = held.take() else {
                    held = Some(check);
                    continue;
                };
                for (id, check) in [check, first] {
                    let answer = self.answer(id, &check).await;
                    if tx.send(Frame::data(answer.into())).await.is_err() {
                        return;
                    }
                }
            }
        }
    }

    /// The real policy service's answer to one check, framed for the stream.
    async fn answer(&self, id: u64, check: &[u8]) -> Vec<u8> {
        let r = self
            .http
            .post(&self.check_url)
            .header("x-mcpguard-check-secret", check_secret())
            .header("content-type", "application/json")
            .body(check.to_vec())
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let body = r.bytes().await.unwrap();
        wire::grpc_frame(&wire::encode_answer(id, status, &body))
    }
}

#[tokio::test]
async fn answers_out_of_order_reach_the_requests_they_answer() {
    let stack = Stack::start().await;
    let p = stack
        .admin()
        .provision("eng", "demo", &stack.demo.upstream_url())
        .await;
    let mut reorder = ReorderingCheckPort::start(stack.policy.check_port).await;
    // The first check of each pair waits for the second to be sent: room for that.
    let envoy = stream_envoy(reorder.port, Some(5_000), stack.dir.path()).await;
    let url = envoy.mcp_url("eng", "demo");
    let unknown = mcpguard_core::token::format_token(
        mcpguard_core::token::TokenKind::HostApi,
        &"b".repeat(40),
    )
    .unwrap();
    // Which token each pair's first and second request carry: the allowed one first,
    // then the refused one first.
    let rounds = [
        [p.token.as_str(), unknown.as_str()],
        [unknown.as_str(), p.token.as_str()],
        [p.token.as_str(), unknown.as_str()],
        [unknown.as_str(), p.token.as_str()],
    ];
    for (round, tokens) in rounds.iter().enumerate() {
        let ask = |token: &str| {
            let (url, token) = (url.clone(), token.to_owned());
            tokio::spawn(async move { (initialize_with(&url, Some(&token)).await, token) })
        };
        let first = ask(tokens[0]);
        // Sent second only once the first is held on the stream: the answer to the
        // second is then written first.
        reorder.wait_received(2 * round + 1).await;
        let second = ask(tokens[1]);
        for task in [first, second] {
            let (a, token) = task.await.unwrap();
            if token == p.token {
                assert_eq!(
                    a.status, 200,
                    "round {round}: the allowed token got {}",
                    a.body
                );
            } else {
                assert_eq!(
                    (a.status, a.code().as_str()),
                    (401, "token_unknown"),
                    "round {round}: the unknown token got {}",
                    a.body
                );
            }
        }
    }
    assert_eq!(*reorder.received.borrow(), 2 * rounds.len());
}
