//! MCP clients through the gateway: the official Rust SDK for real sessions, and raw
//! HTTP for looking at statuses, headers and bodies.

use std::time::Duration;

use std::sync::{Arc, Mutex};

use rmcp::model::{
    CallToolRequestParams, ClientConfig, ElicitRequestParams, ElicitResult, ElicitationAction,
    ResourceUpdatedNotificationParam,
};
// Roots are deprecated (SEP-2577) but still in the spec versions clients speak: the
// gateway relays a server's `roots/list`.
#[allow(deprecated)]
use rmcp::model::{ListRootsResult, Root};
// Sampling too (SEP-2577): the gateway relays a server's `sampling/createMessage`.
#[allow(deprecated)]
use rmcp::model::{CreateMessageRequestParams, CreateMessageResult};
use rmcp::service::{ClientInitializeError, NotificationContext, RunningService};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::{
    StreamableHttpClientTransportConfig, StreamableHttpError,
};
use rmcp::{ClientHandler, Peer, RoleClient, ServiceError, ServiceExt};
use serde_json::{Value, json};

pub type Client = RunningService<RoleClient, ClientConfig>;

/// Connects (MCP `initialize`) with the official SDK client. On refusal, the HTTP status
/// the gateway answered with, when the SDK exposes one.
pub async fn connect(url: &str, token: Option<&str>) -> Result<Client, Option<u16>> {
    let mut config = StreamableHttpClientTransportConfig::with_uri(url);
    if let Some(t) = token {
        config = config.auth_header(t);
    }
    let transport = StreamableHttpClientTransport::from_config(config);
    match tokio::time::timeout(
        Duration::from_secs(20),
        ClientConfig::default().serve(transport),
    )
    .await
    {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(e)) => Err(status_of_init_error(&e)),
        Err(_) => panic!("MCP initialize through {url} hung for 20 s"),
    }
}

/// A client that keeps what it was told outside its calls (on the GET stream):
/// `tools/list_changed`, `prompts/list_changed`, `resources/list_changed`,
/// `resources/updated {uri}`.
#[derive(Clone, Default)]
pub struct Recorder {
    seen: Arc<Mutex<Vec<String>>>,
    arrived: Arc<tokio::sync::Notify>,
    /// When set, the client declares `elicitation`, `roots` and `sampling`, answers
    /// every elicitation with this as `name` (and notes `elicitation {message}`),
    /// lists one root, `file:///{name}`, and answers every sampling request as model
    /// `e2e-model` with `hello from {name}` (and notes `sampling {first message}`).
    name: Option<String>,
}

impl Recorder {
    /// A recorder that declares `elicitation` (accepting each with `{"name": name}`),
    /// `roots` (`file:///{name}`) and `sampling` (`hello from {name}`).
    pub fn answering(name: &str) -> Recorder {
        Recorder {
            name: Some(name.to_owned()),
            ..Recorder::default()
        }
    }

    fn note(&self, what: String) {
        self.seen.lock().unwrap().push(what);
        self.arrived.notify_waiters();
    }

    pub fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }

    pub fn clear(&self) {
        self.seen.lock().unwrap().clear();
    }

    /// Whether `what` arrives within `within`.
    pub async fn arrives(&self, what: &str, within: Duration) -> bool {
        tokio::time::timeout(within, async {
            loop {
                let arrived = self.arrived.notified();
                if self.seen().iter().any(|s| s == what) {
                    return;
                }
                arrived.await;
            }
        })
        .await
        .is_ok()
    }
}

impl ClientHandler for Recorder {
    fn get_info(&self) -> ClientConfig {
        let mut info = ClientConfig::default();
        if self.name.is_some() {
            info.capabilities =
                serde_json::from_value(json!({"elicitation": {}, "roots": {}, "sampling": {}}))
                    .expect("capabilities");
        }
        info
    }

    #[allow(deprecated)] // roots (see the import)
    async fn list_roots(
        &self,
        _: rmcp::service::RequestContext<RoleClient>,
    ) -> Result<ListRootsResult, rmcp::ErrorData> {
        let roots = self
            .name
            .iter()
            .map(|name| Root::new(format!("file:///{name}")))
            .collect();
        Ok(ListRootsResult::new(roots))
    }

    async fn create_elicitation(
        &self,
        request: ElicitRequestParams,
        _: rmcp::service::RequestContext<RoleClient>,
    ) -> Result<ElicitResult, rmcp::ErrorData> {
        let message = match &request {
            ElicitRequestParams::FormElicitationParams { message, .. } => message.clone(),
            _ => String::new(),
        };
        self.note(format!("elicitation {message}"));
        Ok(match &self.name {
            Some(name) => {
                ElicitResult::new(ElicitationAction::Accept).with_content(json!({ "name": name }))
            }
            None => ElicitResult::new(ElicitationAction::Decline),
        })
    }

    #[allow(deprecated)] // sampling (see the import)
    async fn create_message(
        &self,
        request: CreateMessageRequestParams,
        _: rmcp::service::RequestContext<RoleClient>,
    ) -> Result<CreateMessageResult, rmcp::ErrorData> {
        let asked = serde_json::to_value(&request.messages).unwrap_or_default();
        self.note(format!(
            "sampling {}",
            asked[0]["content"]["text"].as_str().unwrap_or_default()
        ));
        let Some(name) = &self.name else {
            return Err(rmcp::ErrorData::invalid_request(
                "sampling not declared",
                None,
            ));
        };
        serde_json::from_value(json!({
            "model": "e2e-model",
            "role": "assistant",
            "content": {"type": "text", "text": format!("hello from {name}")},
        }))
        .map_err(|e| rmcp::ErrorData::internal_error(e.to_string(), None))
    }

    async fn on_tool_list_changed(&self, _: NotificationContext<RoleClient>) {
        self.note("tools/list_changed".into());
    }
    async fn on_prompt_list_changed(&self, _: NotificationContext<RoleClient>) {
        self.note("prompts/list_changed".into());
    }
    async fn on_resource_list_changed(&self, _: NotificationContext<RoleClient>) {
        self.note("resources/list_changed".into());
    }
    async fn on_resource_updated(
        &self,
        params: ResourceUpdatedNotificationParam,
        _: NotificationContext<RoleClient>,
    ) {
        self.note(format!("resources/updated {}", params.uri));
    }
}

/// [`connect`] with a [`Recorder`] as the client's handler; the SDK opens the GET
/// stream after `initialize`.
pub async fn connect_recording(
    url: &str,
    token: &str,
) -> (RunningService<RoleClient, Recorder>, Recorder) {
    connect_with(url, token, Recorder::default()).await
}

/// [`connect_recording`] with a recorder of the caller's.
pub async fn connect_with(
    url: &str,
    token: &str,
    recorder: Recorder,
) -> (RunningService<RoleClient, Recorder>, Recorder) {
    let config = StreamableHttpClientTransportConfig::with_uri(url).auth_header(token);
    let transport = StreamableHttpClientTransport::from_config(config);
    match tokio::time::timeout(Duration::from_secs(20), recorder.clone().serve(transport)).await {
        Ok(Ok(client)) => (client, recorder),
        Ok(Err(e)) => panic!("initialize through {url}: {e}"),
        Err(_) => panic!("MCP initialize through {url} hung for 20 s"),
    }
}

/// `tools/call` returning the first text content.
pub async fn call_text(
    client: &Peer<RoleClient>,
    tool: &str,
    args: Value,
) -> Result<String, ServiceError> {
    let mut params = CallToolRequestParams::new(tool.to_owned());
    if let Value::Object(map) = args {
        params = params.with_arguments(map);
    }
    let result = client.call_tool(params).await?;
    Ok(result
        .content
        .first()
        .and_then(|c| c.as_text())
        .map(|t| t.text.clone())
        .unwrap_or_default())
}

/// `whoami` `rounds` times on each client, all at once and interleaved: each must see
/// exactly its own expected `Authorization` every time.
pub async fn each_sees_its_own(clients: &[(&Client, &str)], rounds: usize) {
    let calls = (0..rounds)
        .flat_map(|_| clients.iter())
        .map(|&(client, expected)| async move {
            (
                call_text(client, "whoami", serde_json::json!({}))
                    .await
                    .unwrap(),
                expected,
            )
        });
    for (seen, expected) in futures::future::join_all(calls).await {
        assert_eq!(seen, expected);
    }
}

/// The HTTP status behind a failed call, when the SDK exposes one.
pub fn status_of_service_error(err: &ServiceError) -> Option<u16> {
    match err {
        ServiceError::TransportSend(e) => status_of_transport_error(e),
        _ => None,
    }
}

fn status_of_init_error(err: &ClientInitializeError) -> Option<u16> {
    match err {
        ClientInitializeError::TransportError { error, .. } => status_of_transport_error(error),
        _ => None,
    }
}

fn status_of_transport_error(err: &rmcp::transport::DynamicTransportError) -> Option<u16> {
    use StreamableHttpError as E;
    match err.error.downcast_ref::<E<reqwest::Error>>()? {
        E::HttpStatus(s) => Some(s.status),
        E::AuthRequired(_) => Some(401),
        E::InsufficientScope(_) => Some(403),
        E::Client(e) => e.status().map(|s| s.as_u16()),
        // Other non-2xx answers come as "HTTP 403 Forbidden: <body>".
        E::UnexpectedServerResponse(msg) => msg.strip_prefix("HTTP ")?.get(..3)?.parse().ok(),
        _ => None,
    }
}

/// A raw HTTP answer.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: String,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.body))
    }

    /// `error.code` of a refusal.
    pub fn code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

pub fn initialize_body() -> Value {
    json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {},
        "clientInfo": {"name": "mcpguard-e2e", "version": "0"}}})
}

/// POSTs an MCP `initialize` with the given extra headers.
pub async fn post_initialize(url: &str, headers: &[(&str, &str)]) -> Answer {
    post(url, headers, initialize_body().to_string()).await
}

/// POSTs `body` as it is, as an MCP client would send a message, with extra headers.
pub async fn post(url: &str, headers: &[(&str, &str)], body: String) -> Answer {
    let mut req = reqwest::Client::new()
        .post(url)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .timeout(Duration::from_secs(10))
        .body(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.expect("gateway reachable");
    Answer {
        status: resp.status().as_u16(),
        headers: resp.headers().clone(),
        body: resp.text().await.unwrap_or_default(),
    }
}

/// POSTs `initialize` with a bearer token (or none).
pub async fn initialize_with(url: &str, token: Option<&str>) -> Answer {
    match token {
        Some(t) => post_initialize(url, &[("authorization", &format!("Bearer {t}"))]).await,
        None => post_initialize(url, &[]).await,
    }
}

/// POSTs `initialize` with `token` (or none) and asserts the answer's status and
/// `error.code`; returns the answer for further checks.
pub async fn expect_refusal(url: &str, token: Option<&str>, (status, code): (u16, &str)) -> Answer {
    let answer = initialize_with(url, token).await;
    assert_eq!(
        (answer.status, answer.code().as_str()),
        (status, code),
        "{url}: {}",
        answer.body
    );
    answer
}

/// The challenge an `initialize` with no token gets at `url` (`{base}/mcp/...`), and the
/// RFC 9728 metadata it points at (`{base}/.well-known/oauth-protected-resource/mcp/...`),
/// fetched with no token: a 401 `token_missing` whose challenge names that document,
/// and a document that names `url` as its resource.
pub async fn challenge_and_metadata(url: &str) -> (String, Value) {
    let refused = expect_refusal(url, None, (401, "token_missing")).await;
    let challenge = refused
        .header("www-authenticate")
        .expect("a 401 carries a challenge")
        .to_owned();
    let path = url.find("/mcp/").expect("an MCP URL: {base}/mcp/...");
    let metadata_url = format!(
        "{}/.well-known/oauth-protected-resource{}",
        &url[..path],
        &url[path..]
    );
    assert!(challenge.contains(&metadata_url), "{challenge}");
    let resp = reqwest::get(&metadata_url)
        .await
        .expect("metadata reachable");
    assert_eq!(resp.status(), 200, "{metadata_url}");
    let metadata: Value = resp.json().await.expect("metadata is JSON");
    assert_eq!(metadata["resource"], url, "{metadata}");
    (challenge, metadata)
}
