//! The gateway URL and its upstream sessions, through real Envoy, the real `.wasm`, the
//! real aggregator and policy service and real MCP servers: a server's sampling
//! request reaches a client that declared it, under the aggregator's id (and is refused
//! at once to one that did not); an upstream GET stream lives only as long as the allow it was opened under
//! (refused now: closed; another credential: opened again with it), seen from the
//! server's side; a session's first uses arriving together open one upstream session
//! per server; a GET with `Last-Event-ID` gets a fresh, working stream.

use std::time::{Duration, Instant};

use mcpguard_e2e::gateway::{GatewayStack, STREAM_CHECK_MS};
use mcpguard_e2e::mcp::{self, call_text};
use reqwest::Method;
use serde_json::{Value, json};

use crate::gateway_url::{
    Raw, RawStream, WAIT, asker_call, raw_session, tool_names, two_servers, updated, updated_of,
    with_asker,
};

/// The sampling case: a server that asks the client for a completion while
/// serving a call (`sampling/createMessage` on the call's reply stream) reaches a
/// client that declared `sampling` under an id of the aggregator's, and the client's
/// answer goes back to that server (the call's result says what the client answered).
/// A client that did not declare it is never asked: the server's request is answered
/// at once with a JSON-RPC error, which the tool's result reports; no hang.
#[tokio::test]
async fn a_servers_sampling_request_reaches_a_client_that_declared_it() {
    let (stack, token, _asker) = with_asker().await;
    let url = stack.gateway_url("eng");

    let (client, seen) = mcp::connect_with(&url, &token, mcp::Recorder::answering("Ada")).await;
    assert!(
        tool_names(&client)
            .await
            .contains(&"asker__sample".to_owned())
    );
    assert_eq!(
        asker_call(&client, "sample").await,
        "e2e-model: hello from Ada"
    );
    assert_eq!(seen.seen(), vec!["sampling Say hello"]);
    // Twice, and the session's other servers are unaffected.
    assert_eq!(
        asker_call(&client, "sample").await,
        "e2e-model: hello from Ada"
    );
    assert_eq!(
        call_text(&client, "alpha__echo", json!({"text": "x"}))
            .await
            .unwrap(),
        "x"
    );
    client.cancel().await.unwrap();

    let (plain, seen) = mcp::connect_recording(&url, &token).await;
    let started = Instant::now();
    let text = asker_call(&plain, "sample").await;
    assert!(
        text.starts_with("sampling failed") && text.contains("did not declare"),
        "{text}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "refused at once, not after a timeout: {:?}",
        started.elapsed()
    );
    assert!(seen.seen().is_empty(), "{:?}", seen.seen());
    assert_eq!(
        call_text(&plain, "alpha__echo", json!({"text": "y"}))
            .await
            .unwrap(),
        "y"
    );
    plain.cancel().await.unwrap();
}

/// The sampling relay at the HTTP level: the server's request reaches the client on
/// the call's reply stream under an id of the aggregator's, not the server's; an answer
/// under the server's own id is dropped (202, nothing sent); the answer under the
/// aggregator's id reaches the server, whose call then answers with it.
#[tokio::test]
async fn a_sampling_request_is_relayed_under_the_aggregators_id() {
    let (stack, token, _asker) = with_asker().await;
    let raw = Raw {
        http: reqwest::Client::new(),
        url: stack.gateway_url("eng"),
    };
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {"sampling": {}},
        "clientInfo": {"name": "mcpguard-e2e", "version": "0"}}});
    let (status, sid, _) = raw.post(&token, None, init).await;
    assert_eq!(status, 200);
    let sid = sid.expect("a session id");
    raw.post(
        &token,
        Some(&sid),
        json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
    )
    .await;
    let call = json!({"jsonrpc": "2.0", "id": "call-1", "method": "tools/call",
        "params": {"name": "asker__sample", "arguments": {}}});
    let mut reply = raw.send(&token, Some(&sid), &call).await;
    assert_eq!(reply.status(), 200);
    // The call's reply, message by message, within a bound.
    let mut buf = String::new();
    let mut next_message = async || -> Value {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Some(end) = buf.find("\n\n") {
                    let event: String = buf.drain(..end + 2).collect();
                    // Events without data (rmcp's priming event, comments) carry nothing.
                    let data = event.lines().find_map(|l| l.strip_prefix("data:"));
                    if let Some(data) = data.map(str::trim).filter(|d| !d.is_empty()) {
                        return serde_json::from_str::<Value>(data).unwrap();
                    }
                    continue;
                }
                let chunk = reply.chunk().await.unwrap().expect("the reply went on");
                buf.push_str(&String::from_utf8_lossy(&chunk));
            }
        })
        .await
        .expect("a message on the call's reply within 10 s")
    };
    let asked = next_message().await;
    assert_eq!(asked["method"], "sampling/createMessage", "{asked}");
    let ours = asked["id"].as_str().unwrap_or_default().to_owned();
    assert!(ours.starts_with("mcpguard-ask-"), "{asked}");
    let answer = |id: Value, text: &str| {
        json!({"jsonrpc": "2.0", "id": id, "result": {"model": "raw-model",
            "role": "assistant", "content": {"type": "text", "text": text}}})
    };
    // The server's own id is not one the client was given: dropped (were it sent,
    // the call would answer "raw-model: wrong").
    let (status, _, _) = raw
        .post(&token, Some(&sid), answer(json!(0), "wrong"))
        .await;
    assert_eq!(status, 202);
    let (status, _, _) = raw
        .post(&token, Some(&sid), answer(json!(ours), "hi"))
        .await;
    assert_eq!(status, 202);
    let result = next_message().await;
    assert_eq!(result["id"], "call-1", "{result}");
    assert_eq!(
        result["result"]["content"][0]["text"], "raw-model: hi",
        "{result}"
    );
}

/// What demo server `demo` says it has seen (`GET /demo/stats`).
async fn stats(stack: &GatewayStack, demo: usize) -> Value {
    let url = format!("http://127.0.0.1:{}/demo/stats", stack.demos[demo].port);
    reqwest::get(url).await.unwrap().json().await.unwrap()
}

/// The `Authorization` of every GET stream open on demo `demo`, sorted.
async fn open_streams(stack: &GatewayStack, demo: usize) -> Vec<String> {
    let mut streams: Vec<String> = stats(stack, demo).await["get_streams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect();
    streams.sort();
    streams
}

/// Most rounds of the aggregator's stream check (`--stream-check-ms`) a change may
/// take to show on the server's side: the round that sees it closes the stream, the
/// next opens the new one; the rest is slack for a loaded machine.
const ROUNDS: u32 = 12;

/// Polls demo `demo` until its open GET streams are `expected`, within [`ROUNDS`]
/// rounds; how long that took.
async fn streams_become(stack: &GatewayStack, demo: usize, expected: &[&str]) -> Duration {
    let bound = Duration::from_millis(STREAM_CHECK_MS) * ROUNDS;
    let started = Instant::now();
    loop {
        let now = open_streams(stack, demo).await;
        if now == expected {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < bound,
            "demo {demo}'s GET streams are {now:?}, not {expected:?}, after {bound:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Sends `notifications/resources/updated` for `uri` from demo `demo` until it arrives
/// on `stream` as `exposed`; bounded.
async fn relayed(stack: &GatewayStack, stream: &mut RawStream, demo: usize, exposed: &str) {
    for _ in 0..50 {
        updated(stack, demo, "demo://readme").await;
        if stream.arrives(WAIT, updated_of(exposed)).await {
            return;
        }
    }
    panic!("{exposed} never reached the client's stream");
}

/// Puts `token` as the caller's (user 1's) identity at `server`; its id.
async fn identity(stack: &GatewayStack, server: i64, token: &str) -> i64 {
    let (status, v) = stack
        .admin()
        .call(
            Method::PUT,
            &format!("/api/v1/users/1/identities/{server}"),
            Some(json!({"credential": {"type": "bearer", "token": token}})),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    v["id"].as_i64().unwrap()
}

/// An upstream GET stream is re-checked with the session's every round: seen from the
/// servers' side, the stream opened with the caller's identity (alpha, per user) and
/// the one opened with the shared credential (beta) are each closed and opened again
/// with the new credential once it changes (a refreshed identity, a rotated shared
/// token), and notifications flow on the new one; the identity disabled, alpha's
/// stream is closed, and the server disabled, beta's; each within a few rounds.
#[tokio::test]
async fn an_upstream_stream_lives_only_as_long_as_its_allow() {
    let (stack, token, alpha, beta, gateway_id) = two_servers().await;
    let admin = stack.admin();
    admin
        .expose_as(gateway_id, alpha, json!({"identity": "per_user"}))
        .await;
    identity(&stack, alpha, "owner-at-alpha").await;
    let url = stack.gateway_url("eng");
    let raw = Raw {
        http: reqwest::Client::new(),
        url: url.clone(),
    };
    let sid = raw_session(&raw, &token).await;
    let mut stream = RawStream::open(&url, &token, &sid).await;
    streams_become(&stack, 0, &["Bearer owner-at-alpha"]).await;
    streams_become(&stack, 1, &["Bearer beta-secret"]).await;

    // The identity's token refreshed, the shared one rotated: each stream opened
    // again with its new credential, the old one closed.
    let identity_id = identity(&stack, alpha, "owner-at-alpha-2").await;
    let took = streams_become(&stack, 0, &["Bearer owner-at-alpha-2"]).await;
    println!("alpha's stream on its refreshed identity within {took:?}");
    admin
        .expose_as(
            gateway_id,
            beta,
            json!({"identity": "shared", "credential": {"type": "bearer", "token": "beta-secret-2"}}),
        )
        .await;
    let took = streams_become(&stack, 1, &["Bearer beta-secret-2"]).await;
    println!("beta's stream on its rotated credential within {took:?}");
    // The new streams carry the servers' notifications (the old ones are gone on the
    // servers' side, so the new ones are theirs to send on).
    relayed(&stack, &mut stream, 0, "alpha+demo://readme").await;
    relayed(&stack, &mut stream, 1, "beta+demo://readme").await;

    // Refused now: the stream is closed.
    admin.set_enabled("identities", identity_id, false).await;
    let took = streams_become(&stack, 0, &[]).await;
    println!("alpha's stream closed on its identity disabled within {took:?}");
    admin.set_enabled("servers", beta, false).await;
    let took = streams_become(&stack, 1, &[]).await;
    println!("beta's stream closed on the server disabled within {took:?}");
    // And opened again once usable again.
    admin.set_enabled("servers", beta, true).await;
    streams_become(&stack, 1, &["Bearer beta-secret-2"]).await;
    assert!(!stream.ended.is_finished(), "the client's stream goes on");
}

/// A new session's first uses arriving together (its GET stream and eight calls to
/// alpha, at once) open one upstream session per server, not one each: the servers
/// count the sessions initialized.
#[tokio::test]
async fn first_uses_at_once_open_one_upstream_session_per_server() {
    let (stack, token, ..) = two_servers().await;
    let before = [
        stats(&stack, 0).await["initialized"].as_u64().unwrap(),
        stats(&stack, 1).await["initialized"].as_u64().unwrap(),
    ];
    let url = stack.gateway_url("eng");
    let raw = Raw {
        http: reqwest::Client::new(),
        url: url.clone(),
    };
    let sid = raw_session(&raw, &token).await;
    let calls = (0..8).map(|i| {
        let call = json!({"jsonrpc": "2.0", "id": i, "method": "tools/call",
            "params": {"name": "alpha__echo", "arguments": {"text": format!("c{i}")}}});
        raw.post(&token, Some(&sid), call)
    });
    let (stream, answers) = tokio::join!(
        RawStream::open(&url, &token, &sid),
        futures::future::join_all(calls)
    );
    for (i, (status, _, answer)) in answers.iter().enumerate() {
        assert_eq!(*status, 200, "{answer}");
        assert_eq!(
            answer["result"]["content"][0]["text"],
            format!("c{i}"),
            "{answer}"
        );
    }
    // The stream's upstream streams are up: every first use has opened what it opens.
    streams_become(&stack, 0, &["Bearer alpha-secret"]).await;
    streams_become(&stack, 1, &["Bearer beta-secret"]).await;
    for demo in [0, 1] {
        let now = stats(&stack, demo).await["initialized"].as_u64().unwrap();
        assert_eq!(
            now - before[demo],
            1,
            "demo {demo}: upstream sessions opened"
        );
    }
    drop(stream);
}

/// Resumption is optional in the spec and the gateway URL does not replay: a GET with
/// `Last-Event-ID` is not refused but gets a fresh stream that works (docs/gateway.md).
#[tokio::test]
async fn a_get_with_last_event_id_gets_a_fresh_working_stream() {
    let (stack, token, ..) = two_servers().await;
    let url = stack.gateway_url("eng");
    let raw = Raw {
        http: reqwest::Client::new(),
        url: url.clone(),
    };
    let sid = raw_session(&raw, &token).await;
    let mut first = RawStream::open(&url, &token, &sid).await;
    relayed(&stack, &mut first, 0, "alpha+demo://readme").await;
    let mut again = RawStream::open_with(&url, &token, &sid, &[("last-event-id", "42")]).await;
    relayed(&stack, &mut again, 0, "alpha+demo://readme").await;
    relayed(&stack, &mut again, 1, "beta+demo://readme").await;
    // The newer stream replaced the older one, which ends.
    tokio::time::timeout(Duration::from_secs(5), first.ended)
        .await
        .expect("the older stream ended")
        .unwrap();
}
