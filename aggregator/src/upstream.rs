//! Talking to one upstream MCP server (streamable HTTP), as the policy service's allow
//! says: connect to the address it judged, `Host` its authority, its credential
//! injected, never the client's. An `https` upstream gets TLS verified against the
//! system's roots and `--trusted-ca-file`, for the authority's name (SNI and the
//! certificate's), still connected to the judged address.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mcpguard_core::check::{Scheme, Upstream};
use serde_json::{Value, json};

/// Largest upstream reply the aggregator reads whole (lists, `initialize`); a call's
/// reply is streamed through instead, but for plain JSON of a small known length
/// (`gateway::WHOLE_REPLY`).
pub const MAX_REPLY: usize = 8 << 20;

/// Where one allowed request goes.
#[derive(Clone)]
pub struct Target {
    /// `http://{address}{base_path}`, or `https://{authority}{base_path}` (connected
    /// to `tls`'s address).
    url: String,
    authority: String,
    /// For https: the authority's host (the TLS name) and the judged address.
    tls: Option<(String, SocketAddr)>,
    inject: Option<(String, String)>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The injected value is a downstream credential: never print it.
        f.debug_struct("Target")
            .field("url", &self.url)
            .field("authority", &self.authority)
            .finish_non_exhaustive()
    }
}

// Clone: one opening's failure is the outcome of every use waiting on it.
#[derive(Debug, Clone)]
pub enum UpstreamError {
    /// The allow named no address it judged.
    NoAddress,
    Unreachable(String),
    /// Answered, but not with what MCP says (status, body).
    Protocol(String),
    /// The upstream no longer knows the session (404 to a request carrying one).
    SessionGone,
}

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamError::NoAddress => f.write_str("the allow named no upstream address"),
            UpstreamError::Unreachable(e) => write!(f, "upstream unreachable: {e}"),
            UpstreamError::Protocol(e) => write!(f, "upstream answered outside MCP: {e}"),
            UpstreamError::SessionGone => f.write_str("the upstream ended the session"),
        }
    }
}

impl std::error::Error for UpstreamError {}

impl Target {
    pub fn of(
        upstream: &Upstream,
        inject: Option<(String, String)>,
    ) -> Result<Target, UpstreamError> {
        let address: SocketAddr = upstream
            .address
            .as_deref()
            .and_then(|a| a.parse().ok())
            .ok_or(UpstreamError::NoAddress)?;
        let base = upstream.base_path.trim_end_matches('/');
        let path = if base.is_empty() { "/" } else { base };
        let authority = upstream.authority.clone();
        let (url, tls) = match upstream.scheme {
            Scheme::Http => (format!("http://{address}{path}"), None),
            Scheme::Https => {
                let url = format!("https://{authority}{path}");
                let host = reqwest::Url::parse(&url)
                    .ok()
                    .and_then(|u| u.host_str().map(str::to_owned))
                    .ok_or_else(|| UpstreamError::Protocol(format!("bad authority {authority}")))?;
                (url, Some((host, address)))
            }
        };
        Ok(Target {
            url,
            authority,
            tls,
            inject,
        })
    }

    /// Whether two allows name the same upstream (a session opened at one is the
    /// other's).
    pub fn same_upstream(&self, other: &Target) -> bool {
        self.url == other.url && self.authority == other.authority
    }

    /// Whether two allows name the same upstream, reached the same way with the same
    /// credential: a GET stream opened with one may stay open under the other.
    pub fn same_as(&self, other: &Target) -> bool {
        self.same_upstream(other) && self.tls == other.tls && self.inject == other.inject
    }
}

/// An upstream's reply to a request.
pub struct Reply {
    pub status: u16,
    pub session_id: Option<String>,
    pub content_type: String,
    pub response: reqwest::Response,
}

/// Most https clients kept (one per TLS name and judged address, each with its own
/// connection pool); past that the cache starts over.
const MAX_TLS_CLIENTS: usize = 256;

#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    /// Certificates trusted besides the system's roots (`--trusted-ca-file`).
    extra_roots: Arc<Vec<reqwest::Certificate>>,
    /// https clients by (TLS name, judged address): each resolves that name to that
    /// address only, so the connection goes where the policy service judged while the
    /// certificate is checked for the server's own name.
    tls: Arc<Mutex<HashMap<(String, SocketAddr), reqwest::Client>>>,
    /// Time to the reply's headers (and, for replies read whole, its body).
    pub timeout: Duration,
}

impl Client {
    pub fn new(
        http: reqwest::Client,
        extra_roots: Vec<reqwest::Certificate>,
        timeout: Duration,
    ) -> Client {
        Client {
            http,
            extra_roots: Arc::new(extra_roots),
            tls: Arc::default(),
            timeout,
        }
    }

    /// The client that reaches `target`.
    fn client(&self, target: &Target) -> Result<reqwest::Client, UpstreamError> {
        let Some((host, address)) = &target.tls else {
            return Ok(self.http.clone());
        };
        let key = (host.clone(), *address);
        let mut cache = self.tls.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = cache.get(&key) {
            return Ok(c.clone());
        }
        let client = reqwest::Client::builder()
            .no_proxy()
            .tcp_nodelay(true)
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(2))
            .tls_version_min(reqwest::tls::Version::TLS_1_2)
            .tls_certs_merge(self.extra_roots.iter().cloned())
            .resolve(host, *address)
            .build()
            .map_err(|e| UpstreamError::Unreachable(describe(e)))?;
        if cache.len() >= MAX_TLS_CLIENTS {
            cache.clear();
        }
        cache.insert(key, client.clone());
        Ok(client)
    }

    /// Sends `req` within the upstream timeout: the response once its headers arrived.
    /// A 404 for a `session` means the upstream forgot it ([`UpstreamError::SessionGone`]).
    async fn send(
        &self,
        req: reqwest::RequestBuilder,
        session: Option<&str>,
    ) -> Result<reqwest::Response, UpstreamError> {
        let response = tokio::time::timeout(self.timeout, req.send())
            .await
            .map_err(|_| {
                UpstreamError::Unreachable(format!("no answer within {:?}", self.timeout))
            })?
            .map_err(|e| UpstreamError::Unreachable(describe(e)))?;
        if response.status() == 404 && session.is_some() {
            return Err(UpstreamError::SessionGone);
        }
        Ok(response)
    }

    fn request(
        &self,
        method: reqwest::Method,
        target: &Target,
        session: Option<&str>,
        protocol_version: Option<&str>,
    ) -> Result<reqwest::RequestBuilder, UpstreamError> {
        let accept = if method == reqwest::Method::GET {
            "text/event-stream"
        } else {
            "application/json, text/event-stream"
        };
        let mut req = self
            .client(target)?
            .request(method, &target.url)
            .header("host", &target.authority)
            .header("accept", accept);
        if let Some((name, value)) = &target.inject {
            req = req.header(name.as_str(), value.as_str());
        }
        if let Some(id) = session {
            req = req.header("mcp-session-id", id);
        }
        if let Some(v) = protocol_version {
            req = req.header("mcp-protocol-version", v);
        }
        Ok(req)
    }

    /// POSTs one JSON-RPC message; the reply's headers, within the timeout.
    pub async fn post(
        &self,
        target: &Target,
        session: Option<&str>,
        protocol_version: Option<&str>,
        message: &Value,
    ) -> Result<Reply, UpstreamError> {
        let req = self
            .request(reqwest::Method::POST, target, session, protocol_version)?
            .header("content-type", "application/json")
            .body(message.to_string());
        let response = self.send(req, session).await?;
        let status = response.status().as_u16();
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        Ok(Reply {
            status,
            session_id: header("mcp-session-id"),
            content_type: header("content-type").unwrap_or_default(),
            response,
        })
    }

    /// POSTs a request and reads its reply whole: the JSON-RPC message answering `id`
    /// (from plain JSON, or from an SSE stream, read until that message).
    pub async fn request_reply(
        &self,
        target: &Target,
        session: Option<&str>,
        protocol_version: Option<&str>,
        message: &Value,
    ) -> Result<(Option<String>, Value), UpstreamError> {
        let reply = self
            .post(target, session, protocol_version, message)
            .await?;
        if reply.status != 200 {
            return Err(UpstreamError::Protocol(format!("status {}", reply.status)));
        }
        let id = message.get("id").cloned().unwrap_or(Value::Null);
        let session_id = reply.session_id.clone();
        let answer = tokio::time::timeout(self.timeout, read_answer(reply, &id))
            .await
            .map_err(|_| {
                UpstreamError::Unreachable(format!("no reply within {:?}", self.timeout))
            })??;
        Ok((session_id, answer))
    }

    /// Opens a session: `initialize`, then `notifications/initialized`. Returns the
    /// upstream's session id (if any) and the protocol version it chose.
    /// `capabilities` are the client's, so a server asks the client (through the
    /// aggregator) only what it can answer.
    pub async fn initialize(
        &self,
        target: &Target,
        protocol_version: &str,
        capabilities: &Value,
    ) -> Result<(Option<String>, Option<String>), UpstreamError> {
        let init = json!({
            "jsonrpc": "2.0",
            "id": "mcpguard-initialize",
            "method": "initialize",
            "params": {
                "protocolVersion": protocol_version,
                "capabilities": capabilities,
                "clientInfo": {"name": "mcpguard-aggregator", "version": env!("CARGO_PKG_VERSION")},
            },
        });
        let (session, answer) = self.request_reply(target, None, None, &init).await?;
        let version = answer["result"]["protocolVersion"]
            .as_str()
            .map(str::to_owned);
        if answer.get("result").is_none() {
            return Err(UpstreamError::Protocol(format!(
                "initialize failed: {}",
                answer.get("error").unwrap_or(&Value::Null)
            )));
        }
        let note = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
        let reply = self
            .post(target, session.as_deref(), version.as_deref(), &note)
            .await?;
        if !(200..300).contains(&reply.status) {
            return Err(UpstreamError::Protocol(format!(
                "notifications/initialized answered {}",
                reply.status
            )));
        }
        Ok((session, version))
    }

    /// Opens the upstream's GET stream (server-initiated SSE) for `session`: the
    /// response once its headers arrived within the timeout; its body is the stream.
    pub async fn get_stream(
        &self,
        target: &Target,
        session: Option<&str>,
        protocol_version: Option<&str>,
    ) -> Result<reqwest::Response, UpstreamError> {
        let req = self.request(reqwest::Method::GET, target, session, protocol_version)?;
        self.send(req, session).await
    }

    /// Ends an upstream session (`DELETE`); failures only logged.
    pub async fn end(&self, target: &Target, session: &str, protocol_version: Option<&str>) {
        let Ok(req) = self.request(
            reqwest::Method::DELETE,
            target,
            Some(session),
            protocol_version,
        ) else {
            return;
        };
        if let Err(e) = tokio::time::timeout(self.timeout, req.send()).await {
            tracing::debug!(error = %e, "ending an upstream session timed out");
        }
    }
}

/// Splits an SSE byte stream into its events' data, as the bytes arrive.
#[derive(Default)]
pub struct SseEvents {
    buf: Vec<u8>,
    /// How far `buf` is known to hold no event end: each byte is looked at about once.
    scanned: usize,
}

impl SseEvents {
    /// Adds `chunk`; returns the data of every event it completed (events without
    /// data, such as comments and `retry:`, are skipped). `Err` when an event grows
    /// past [`MAX_REPLY`] bytes.
    pub fn push(&mut self, chunk: &[u8]) -> Result<Vec<String>, UpstreamError> {
        self.buf.extend_from_slice(chunk);
        let mut data = Vec::new();
        while let Some((end, sep)) = event_end(&self.buf, self.scanned.saturating_sub(3)) {
            self.scanned = 0;
            let event: Vec<u8> = self.buf.drain(..end + sep).collect();
            let text = String::from_utf8_lossy(&event[..end]).replace("\r\n", "\n");
            let lines: Vec<&str> = text
                .split(['\n', '\r'])
                .filter_map(|l| l.strip_prefix("data:"))
                .map(|d| d.strip_prefix(' ').unwrap_or(d))
                .collect();
            if !lines.is_empty() {
                data.push(lines.join("\n"));
            }
        }
        self.scanned = self.buf.len();
        if self.buf.len() > MAX_REPLY {
            return Err(UpstreamError::Protocol(format!(
                "SSE event over {MAX_REPLY} bytes"
            )));
        }
        Ok(data)
    }
}

/// Where the first complete event in `buf` (searched from `from`) ends, and the
/// length of the blank line that ends it.
fn event_end(buf: &[u8], from: usize) -> Option<(usize, usize)> {
    (from..buf.len()).find_map(|i| {
        let rest = &buf[i..];
        [&b"\r\n\r\n"[..], b"\n\n", b"\r\r"]
            .into_iter()
            .find(|sep| rest.starts_with(sep))
            .map(|sep| (i, sep.len()))
    })
}

/// An HTTP client error with its causes (a TLS failure says why: an unknown issuer, a
/// name mismatch), without the URL.
fn describe(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// The message answering `id` in a reply read whole, at most [`MAX_REPLY`] bytes.
async fn read_answer(reply: Reply, id: &Value) -> Result<Value, UpstreamError> {
    let is_sse = reply
        .content_type
        .split(';')
        .next()
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("text/event-stream"));
    let mut response = reply.response;
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let chunk = response
            .chunk()
            .await
            .map_err(|e| UpstreamError::Unreachable(describe(e)))?;
        let Some(chunk) = chunk else { break };
        buf.extend_from_slice(&chunk);
        if buf.len() > MAX_REPLY {
            return Err(UpstreamError::Protocol(format!(
                "reply over {MAX_REPLY} bytes"
            )));
        }
        // An SSE reply may stay open after its answer: stop at the answer.
        if is_sse && let Some(answer) = sse_answer(&buf, id) {
            return Ok(answer);
        }
    }
    if is_sse {
        return sse_answer(&buf, id)
            .ok_or_else(|| UpstreamError::Protocol("no answer in the SSE stream".into()));
    }
    serde_json::from_slice(&buf)
        .map_err(|e| UpstreamError::Protocol(format!("reply is not JSON: {e}")))
}

/// The JSON-RPC message of a complete SSE event in `buf` whose id is `id`.
pub fn sse_answer(buf: &[u8], id: &Value) -> Option<Value> {
    let text = String::from_utf8_lossy(buf)
        .replace("\r\n", "\n")
        .replace('\r', "\n");
    // Only complete events: those followed by a blank line.
    let complete = text.rfind("\n\n").map_or("", |end| &text[..end]);
    complete.split("\n\n").find_map(|event| {
        let data: Vec<&str> = event
            .lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .map(|d| d.strip_prefix(' ').unwrap_or(d))
            .collect();
        if data.is_empty() {
            return None;
        }
        let message: Value = serde_json::from_str(&data.join("\n")).ok()?;
        let answers = message.get("id") == Some(id)
            && (message.get("result").is_some() || message.get("error").is_some());
        answers.then_some(message)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_answer_is_found_in_an_sse_stream_once_its_event_is_complete() {
        let id = json!(7);
        let stream = "event: message\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\"}\n\n\
                      id: 2\ndata: {\"jsonrpc\":\"2.0\",\"id\":7,\"result\":{\"ok\":1}}\n\n";
        assert_eq!(
            sse_answer(stream.as_bytes(), &id).unwrap()["result"]["ok"],
            1
        );
        let cut = &stream[..stream.len() - 2];
        assert_eq!(sse_answer(cut.as_bytes(), &id), None, "not complete yet");
        assert_eq!(
            sse_answer(stream.as_bytes(), &json!("7")),
            None,
            "ids are typed"
        );
        let crlf = stream.replace('\n', "\r\n");
        assert!(sse_answer(crlf.as_bytes(), &id).is_some());
    }

    #[test]
    fn sse_events_are_split_as_their_bytes_arrive() {
        let mut events = SseEvents::default();
        assert!(
            events
                .push(b": keep-alive\n\nretry: 3000\n\n")
                .unwrap()
                .is_empty()
        );
        assert!(events.push(b"id: 1\ndata: {\"a\"").unwrap().is_empty());
        assert_eq!(
            events.push(b":1}\n\ndata: x\r\n").unwrap(),
            vec!["{\"a\":1}"]
        );
        assert_eq!(
            events.push(b"data: y\r\n\r\n").unwrap(),
            vec!["x\ny"],
            "CRLF, and data lines joined"
        );
        let mut big = SseEvents::default();
        assert!(big.push(&vec![b'a'; MAX_REPLY + 1]).is_err());
    }

    #[test]
    fn upstreams_with_a_judged_address_are_targets() {
        let up = |scheme, address: Option<&str>| Upstream {
            scheme,
            authority: "demo.local:9100".into(),
            base_path: "/mcp/".into(),
            address: address.map(str::to_owned),
        };
        let t = Target::of(&up(Scheme::Http, Some("127.0.0.1:9100")), None).unwrap();
        assert_eq!(t.url, "http://127.0.0.1:9100/mcp");
        assert_eq!(t.authority, "demo.local:9100");
        assert!(matches!(
            Target::of(&up(Scheme::Http, None), None),
            Err(UpstreamError::NoAddress)
        ));
        assert!(matches!(
            Target::of(&up(Scheme::Http, Some("demo.local:9100")), None),
            Err(UpstreamError::NoAddress)
        ));
        // https: the URL names the authority (SNI, the certificate's name); the
        // connection goes to the judged address.
        let t = Target::of(&up(Scheme::Https, Some("127.0.0.1:9443")), None).unwrap();
        assert_eq!(t.url, "https://demo.local:9100/mcp");
        assert_eq!(
            t.tls,
            Some(("demo.local".to_owned(), "127.0.0.1:9443".parse().unwrap()))
        );
        let secret = Target::of(
            &up(Scheme::Http, Some("127.0.0.1:9100")),
            Some(("authorization".into(), "Bearer s3cret".into())),
        )
        .unwrap();
        assert!(!format!("{secret:?}").contains("s3cret"));
    }
}
