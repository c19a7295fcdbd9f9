//! Requests a server makes of the client while serving a call (`elicitation/create`,
//! `sampling/createMessage`, `roots/list`), met on the call's SSE reply. One the client
//! declared it can answer at `initialize` is relayed on that reply under an id of the
//! aggregator's (two servers' ids never clash), and the client's answer goes back to
//! the server that asked ([`crate::gateway`]'s `answer_server`). Any other is answered
//! at once with a JSON-RPC error (`ping` with `{}`), so the server is not left waiting.

use std::collections::VecDeque;
use std::sync::Arc;

use axum::body::Bytes;
use futures_util::Stream;
use serde_json::{Value, json};

use crate::session::Session;
use crate::upstream::{Client, SseEvents, Target};

/// Where the call went: what a request of its server needs to be relayed or refused.
pub struct Asks {
    pub upstreams: Client,
    pub session: Arc<Session>,
    pub server: String,
    pub target: Target,
    /// The upstream session the call went on (id, protocol version).
    pub opened: (Option<String>, Option<String>),
}

impl Asks {
    /// The call's SSE reply, event by event, its server's requests relayed or refused.
    /// `guard` lives as long as the stream (the call is in flight until it ends).
    pub fn relay<G: Send + 'static>(
        self,
        response: reqwest::Response,
        guard: G,
    ) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
        let state = (
            self,
            response,
            SseEvents::default(),
            VecDeque::<Bytes>::new(),
            guard,
        );
        futures_util::stream::unfold(
            state,
            |(asks, mut response, mut events, mut queue, guard)| async move {
                loop {
                    if let Some(next) = queue.pop_front() {
                        return Some((Ok(next), (asks, response, events, queue, guard)));
                    }
                    let chunk = match response.chunk().await {
                        Ok(Some(chunk)) => chunk,
                        Ok(None) => return None,
                        Err(e) => {
                            let e = std::io::Error::other(e.without_url());
                            return Some((Err(e), (asks, response, events, queue, guard)));
                        }
                    };
                    let Ok(data) = events.push(&chunk) else {
                        tracing::warn!(server = asks.server, "call reply dropped: event too large");
                        return None;
                    };
                    for data in data {
                        if let Some(event) = asks.pass(data) {
                            queue.push_back(event);
                        }
                    }
                }
            },
        )
    }

    /// What the client is sent of one event's data: the message, or nothing when it is
    /// a request of the server's that is not relayed.
    fn pass(&self, data: String) -> Option<Bytes> {
        let Ok(mut message) = serde_json::from_str::<Value>(&data) else {
            return Some(event(&data));
        };
        let (Some(method), Some(id)) = (
            message
                .get("method")
                .and_then(Value::as_str)
                .map(str::to_owned),
            message.get("id").cloned(),
        ) else {
            return Some(event(&data));
        };
        if self.session.client_answers(&method)
            && let Some(ours) = self.session.ask_client(&self.server, id.clone(), &method)
        {
            message["id"] = Value::String(ours);
            return Some(event(&message.to_string()));
        }
        let answer = if method == "ping" {
            json!({"jsonrpc": "2.0", "id": id, "result": {}})
        } else {
            tracing::info!(
                server = self.server,
                method,
                "a server's request of the client refused: not declared by the client"
            );
            json!({"jsonrpc": "2.0", "id": id, "error": {
                "code": -32601,
                "message": format!("{method}: the client did not declare it can answer this"),
            }})
        };
        let (upstreams, target) = (self.upstreams.clone(), self.target.clone());
        let (sid, version) = self.opened.clone();
        let server = self.server.clone();
        tokio::spawn(async move {
            let sent = upstreams
                .post(&target, sid.as_deref(), version.as_deref(), &answer)
                .await;
            if let Err(e) = sent {
                tracing::debug!(server, error = %e, "answering the server's request failed");
            }
        });
        None
    }
}

/// One SSE event of `data` (a line of its own for each line of it).
fn event(data: &str) -> Bytes {
    let mut text = String::from("event: message\n");
    for line in data.split('\n') {
        text.push_str("data: ");
        text.push_str(line);
        text.push('\n');
    }
    text.push('\n');
    Bytes::from(text)
}
