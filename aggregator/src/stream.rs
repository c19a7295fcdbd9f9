//! The gateway URL's GET stream (streamable HTTP's server-initiated SSE): what the
//! gateway's servers tell a session outside any call, and `list_changed` when what the
//! session may use changes.
//!
//! One task per open stream. Every `--stream-check-ms` it asks which servers the
//! caller may use now (the gateway-level check, then each server's, uncached, as for a
//! list); when that set changed since the last time, the client is sent
//! `notifications/{tools,prompts,resources}/list_changed`, so it lists again. Each
//! usable server's own GET stream is opened for the session (a server answering 405
//! has none) and relayed; a server no longer usable (its check refused now: the
//! server, its exposure or the caller's identity disabled, the policy service not
//! answering) has its stream closed, and one whose allow now injects another
//! credential (a rotated or refreshed token) or names another upstream has its stream
//! closed and opened again on the next round with the new one: an upstream stream
//! never outlives, by more than a round, the allow it was opened under. Each relayed
//! message is checked for its server on its own (uncached) and dropped when refused.
//! A server's request of the client on it (roots, sampling, elicitation) is relayed
//! as on a call's reply ([`crate::asks`]) when the client declared it.
//! An upstream stream that breaks is opened again on the next round; the client's
//! stream ends only when the session ends, the client goes, or it opens another.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, header};
use axum::response::Response;
use futures_util::FutureExt as _;
use mcpguard_core::check::{CheckResponse, DenyCode, EachServer};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::App;
use crate::gateway::{Caller, open};
use crate::policy::Ask;
use crate::session::Session;
use crate::upstream::{SseEvents, Target, UpstreamError};
use mcpguard_core::names::Naming;

/// Events queued for a client that reads slowly; past that, relayed messages are
/// dropped (logged) rather than held without bound.
const QUEUE: usize = 64;

/// A comment sent on a quiet stream, so no proxy (Envoy's idle timeout is 5 minutes)
/// takes it for dead.
const KEEP_ALIVE: Duration = Duration::from_secs(30);

/// The `list_changed` notifications sent when the usable servers change.
const LIST_CHANGED: [&str; 3] = [
    "notifications/tools/list_changed",
    "notifications/prompts/list_changed",
    "notifications/resources/list_changed",
];

/// Opens the session's GET stream: the SSE response, fed by a task of its own.
pub(crate) fn serve(app: Arc<App>, caller: Caller, session: Arc<Session>) -> Response {
    let (tx, rx) = mpsc::channel::<Bytes>(QUEUE);
    let number = session.open_stream();
    tokio::spawn(watch(app, caller, session, number, tx));
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|event| (Ok::<_, std::convert::Infallible>(event), rx))
    });
    let mut response = Response::new(Body::from_stream(body));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// One JSON-RPC message as an SSE event.
fn event(message: &Value) -> Bytes {
    Bytes::from(format!("event: message\ndata: {message}\n\n"))
}

/// An upstream's GET stream, relayed by its own task; the task's answer says whether
/// the server has none (405), so it is not asked again. With the allow it was
/// opened under.
type Relay = (JoinHandle<bool>, Target);

/// Serves stream `number` of `session` until the session ends, the client goes, or
/// a newer stream replaces it.
async fn watch(
    app: Arc<App>,
    caller: Caller,
    session: Arc<Session>,
    number: u64,
    tx: mpsc::Sender<Bytes>,
) {
    let caller = Arc::new(caller);
    // The stream this one replaces ends at once (below) and closes its upstream
    // streams before this one opens any.
    let _relaying = tokio::select! {
        relaying = session.relaying.lock() => relaying,
        () = session.replaced(number) => return,
        () = session.ended() => return,
        () = tx.closed() => return,
    };
    let mut tick = tokio::time::interval(app.stream_check);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut usable: Option<BTreeSet<String>> = None;
    let mut relays: HashMap<String, Relay> = HashMap::new();
    let mut has_none: BTreeSet<String> = BTreeSet::new();
    let mut last_sent = Instant::now();
    loop {
        tokio::select! {
            () = session.ended() => break,
            () = tx.closed() => break,
            () = session.replaced(number) => break,
            _ = tick.tick() => {}
        }
        let now = match usable_servers(&app, &caller).await {
            Ok(now) => now,
            Err(code) => {
                // The caller may no longer use the gateway at all (its token revoked,
                // the gateway or user disabled): the stream it opened ends too.
                tracing::info!(
                    gateway = caller.gateway,
                    code = code.as_str(),
                    "GET stream ended: the gateway refuses its caller now"
                );
                break;
            }
        };
        if usable
            .as_ref()
            .is_some_and(|before| *before != now.keys().cloned().collect())
        {
            tracing::info!(
                gateway = caller.gateway,
                "the servers this session may use changed: list_changed sent"
            );
            for method in LIST_CHANGED {
                let note = json!({"jsonrpc": "2.0", "method": method});
                if tx.send(event(&note)).await.is_err() {
                    break;
                }
            }
            last_sent = Instant::now();
        }
        usable = Some(now.keys().cloned().collect());
        // Break before make: a server may serve one GET stream per session (rmcp's
        // gives a second one nothing while the first looks alive), so a stream whose
        // credential changed is closed now and opened again on the next round.
        let mut reopen = BTreeSet::new();
        relays.retain(|server, (relay, opened_with)| {
            let keep = match now.get(server) {
                None => {
                    tracing::debug!(server, "upstream GET stream closed: refused now");
                    false
                }
                Some(target) if !target.same_as(opened_with) => {
                    tracing::info!(
                        server,
                        "upstream GET stream closed: its allow changed (credential or \
                         upstream); opened again on the next round"
                    );
                    reopen.insert(server.clone());
                    false
                }
                Some(_) => true,
            };
            if !keep {
                relay.abort();
            }
            keep
        });
        has_none.retain(|server| now.contains_key(server));
        for (server, target) in now {
            if has_none.contains(&server) || reopen.contains(&server) {
                continue;
            }
            if let Some((relay, _)) = relays.get_mut(&server) {
                match relay.now_or_never() {
                    // Still relaying.
                    None => continue,
                    Some(Ok(true)) => {
                        has_none.insert(server.clone());
                        relays.remove(&server);
                        continue;
                    }
                    // Broken (or ended): opened again below.
                    Some(_) => {}
                }
            }
            let relay = tokio::spawn(relay(
                app.clone(),
                caller.clone(),
                session.clone(),
                server.clone(),
                target.clone(),
                tx.clone(),
            ));
            relays.insert(server, (relay, target));
        }
        if last_sent.elapsed() >= KEEP_ALIVE {
            if tx
                .send(Bytes::from_static(b": keep-alive\n\n"))
                .await
                .is_err()
            {
                break;
            }
            last_sent = Instant::now();
        }
    }
    // Closed, not just told to close, before `_relaying` lets a newer stream open its
    // own: an aborted task has dropped its upstream response once awaited.
    for (relay, _) in relays.into_values() {
        relay.abort();
        let _ = relay.await;
    }
}

/// The servers of the gateway the caller may use now, each with where it is reached:
/// the gateway-level check with each server's, in one exchange. A refusal, or no
/// answer, leaves the server out. `Err` when the gateway itself refuses the caller
/// (not for want of an answer: the policy service being down ends no stream).
async fn usable_servers(app: &App, caller: &Caller) -> Result<HashMap<String, Target>, DenyCode> {
    let answers = match app
        .policy
        .check_each(stream_ask(caller, ""), EachServer::All)
        .await
    {
        Ok(each) => each.answers,
        Err(code) if code != DenyCode::PolicyUnavailable => return Err(code),
        Err(_) => return Ok(HashMap::new()),
    };
    Ok(answers
        .into_iter()
        .filter_map(|(server, answer)| match answer {
            CheckResponse::Allow {
                upstream, inject, ..
            } => Target::of(&upstream, inject.map(|h| (h.name, h.value)))
                .ok()
                .map(|t| (server, t)),
            _ => None,
        })
        .collect())
}

/// The stream's own check of `server`: it names no method, as a GET carries none.
fn stream_ask<'a>(caller: &'a Caller, server: &'a str) -> Ask<'a> {
    Ask {
        method: None,
        ..caller.ask(server, "", None)
    }
}

/// Opens `server`'s GET stream for the session and relays it until it breaks.
/// `true` when the server has none (it answered 405, or is stateless).
async fn relay(
    app: Arc<App>,
    caller: Arc<Caller>,
    session: Arc<Session>,
    server: String,
    target: Target,
    tx: mpsc::Sender<Bytes>,
) -> bool {
    let opened = match open(&app, &session, &server, &target).await {
        Ok(opened) => opened,
        Err(e) => {
            tracing::debug!(server, error = %e, "no upstream session for the GET stream");
            return false;
        }
    };
    let (sid, version) = opened;
    if sid.is_none() {
        // A stateless server has nothing to say outside a call.
        return true;
    }
    let response = match app
        .upstreams
        .get_stream(&target, sid.as_deref(), version.as_deref())
        .await
    {
        Ok(r) => r,
        Err(UpstreamError::SessionGone) => {
            // Opened again on the next round.
            session.forget_upstream(&server, sid.as_deref()).await;
            return false;
        }
        Err(e) => {
            tracing::debug!(server, error = %e, "upstream GET stream not opened");
            return false;
        }
    };
    match response.status().as_u16() {
        200 => {}
        405 => return true,
        status => {
            tracing::debug!(server, status, "upstream GET stream refused");
            return false;
        }
    }
    let mut response = response;
    let mut events = SseEvents::default();
    loop {
        let chunk = match response.chunk().await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => break,
            Err(e) => {
                tracing::debug!(server, error = %e, "upstream GET stream broke");
                break;
            }
        };
        let data = match events.push(&chunk) {
            Ok(data) => data,
            Err(e) => {
                tracing::warn!(server, error = %e, "upstream GET stream dropped");
                break;
            }
        };
        for data in data {
            let Ok(message) = serde_json::from_str::<Value>(&data) else {
                tracing::debug!(server, "upstream GET stream: an event that is not JSON");
                continue;
            };
            let Some(message) =
                from_server(&app, &caller, &session, &server, &target, message).await
            else {
                continue;
            };
            if tx.try_send(event(&message)).is_err() {
                if tx.is_closed() {
                    return false;
                }
                tracing::warn!(server, "client reads its GET stream too slowly: dropped");
            }
        }
    }
    false
}

/// What the client is sent of a message `server` sent on its GET stream, renamed;
/// `None` when it is not relayed (refused now, or not for the client).
async fn from_server(
    app: &App,
    caller: &Caller,
    session: &Session,
    server: &str,
    target: &Target,
    mut message: Value,
) -> Option<Value> {
    let method = message.get("method")?.as_str()?.to_owned();
    if let Some(id) = message.get("id").cloned() {
        // A request of the client (roots, sampling, elicitation) outside any call:
        // relayed under an id of the aggregator's when the client declared it and the
        // server may be used now; else the server is told at once, not left waiting.
        if session.client_answers(&method)
            && matches!(
                app.policy.check(caller.ask(server, &method, None)).await,
                CheckResponse::Allow { .. }
            )
            && let Some(ours) = session.ask_client(server, id.clone(), &method)
        {
            message["id"] = Value::String(ours);
            return Some(message);
        }
        answer_server(app, session, server, target, &id, &method).await;
        return None;
    }
    let (checked_method, item) = match method.as_str() {
        "notifications/tools/list_changed"
        | "notifications/prompts/list_changed"
        | "notifications/resources/list_changed"
        | "notifications/message" => (method.as_str(), None),
        "notifications/resources/updated" => {
            let uri = message.pointer("/params/uri")?.as_str()?.to_owned();
            let exposed = Naming::Uri.expose(server, &uri)?;
            message["params"]["uri"] = Value::String(exposed);
            // Checked as its read: an update of a resource the caller may not read is
            // not relayed either.
            ("resources/read", Some(uri))
        }
        _ => return None,
    };
    match app
        .policy
        .check(caller.ask(server, checked_method, item.as_deref()))
        .await
    {
        CheckResponse::Allow { .. } => Some(message),
        CheckResponse::Deny { code } => {
            tracing::debug!(
                server,
                method,
                code = code.as_str(),
                "not relayed: refused now"
            );
            None
        }
        CheckResponse::Gateway { .. } => None,
    }
}

/// Answers a request `server` made of the client on its GET stream that is not
/// relayed: `ping` with `{}`, anything else with a JSON-RPC error, on the server's
/// session.
async fn answer_server(
    app: &App,
    session: &Session,
    server: &str,
    target: &Target,
    id: &Value,
    method: &str,
) {
    let answer = if method == "ping" {
        json!({"jsonrpc": "2.0", "id": id, "result": {}})
    } else {
        json!({"jsonrpc": "2.0", "id": id, "error": {
            "code": -32601,
            "message": format!("{method}: not relayed to the client (not declared, or refused)"),
        }})
    };
    let upstream = session.upstreams.lock().await.get(server).cloned();
    let Some(up) = upstream else { return };
    let sent = app
        .upstreams
        .post(
            target,
            up.id.as_deref(),
            up.protocol_version.as_deref(),
            &answer,
        )
        .await;
    if let Err(e) = sent {
        tracing::debug!(server, error = %e, "answering the server's request failed");
    }
}
