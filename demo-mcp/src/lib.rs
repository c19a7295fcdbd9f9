//! A small MCP server for demos and tests: `echo`, and tools that report which HTTP
//! headers reached it, so a test can prove what the gateway forwarded and what it kept
//! back; two prompts and two resources; and tools added or changed at run time
//! (`PUT /demo/tools/{name}` with the description as body, outside `/mcp`), so a test
//! can play an upstream that changes its tools (a rug-pull); each such change sends
//! `notifications/tools/list_changed` to every open session, and
//! `POST /demo/resources/updated` (the URI as body) sends
//! `notifications/resources/updated` for that URI, both on the sessions' GET streams,
//! so a test can see an upstream's notifications relayed; `POST /demo/roots` asks every
//! session for its roots (`roots/list`, on the GET stream) and prints what each answered
//! (`roots listed: file:///a file:///b`). With `--elicit` it also has
//! `ask`, which asks the client for a name (`elicitation/create`) while serving the
//! call and answers `hello {name}`, or the client's action when it did not accept, and
//! `sample`, which asks the client for a completion (`sampling/createMessage`) and
//! answers `{model}: {text}` of the client's answer, or why there was none. It
//! accepts
//! `logging/setLevel` and prints the level it was set to (`logging level set to
//! debug`), so a test can see the request arrived. With a page size, `tools/list`
//! answers in pages of that many tools (the cursor is the offset of the next one), so
//! a test can play an upstream whose list is paginated. `GET /demo/stats` says how
//! many sessions were initialized and, for each GET stream open now, the
//! `Authorization` it was opened with (`{"initialized": 2, "get_streams": ["Bearer
//! x"]}`), so a test can see from the server's side what the gateway opened and
//! closed, and with which credential. `PUT /demo/list-delay` with a number of
//! milliseconds as body (at most 10,000; 0 turns it off) makes every `tools/list`
//! answer that much later, so a benchmark can play an upstream that takes as long as
//! a remote one does.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rmcp::handler::server::tool::ToolCallContext;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, ElicitRequestParams,
    ElicitationAction, ElicitationSchema, GetPromptRequestParams, GetPromptResponse,
    GetPromptResult, Implementation, JsonObject, ListPromptsResult, ListResourcesResult,
    ListToolsResult, PaginatedRequestParams, Prompt, PromptArgument, PromptMessage,
    ReadResourceRequestParams, ReadResourceResponse, ReadResourceResult, Resource,
    ResourceContents, ResourceUpdatedNotificationParam, Role, ServerCapabilities, ServerConfig,
    Tool,
};
// MCP logging is deprecated (SEP-2577) but still in the spec versions clients speak; the
// demo server keeps it so tests can see `logging/setLevel` arrive.
#[allow(deprecated)]
use rmcp::model::SetLevelRequestParams;
// Sampling too (SEP-2577): the gateway relays a server's `sampling/createMessage`.
#[allow(deprecated)]
use rmcp::model::CreateMessageRequestParams;
use rmcp::service::{NotificationContext, Peer, RequestContext};
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::session::never::NeverSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ErrorData, RoleServer, ServerHandler, tool, tool_handler, tool_router};
use serde::Deserialize;

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct EchoArgs {
    /// Text to echo back
    pub text: String,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct HeaderArgs {
    /// HTTP header name (case-insensitive)
    pub name: String,
}

/// Tools added at run time: name -> description. Each echoes its `text`.
pub type ExtraTools = Arc<Mutex<BTreeMap<String, String>>>;

/// Every session's peer, to send it notifications outside any request.
pub type Peers = Arc<Mutex<Vec<Peer<RoleServer>>>>;

#[derive(Clone, Default)]
pub struct DemoServer {
    extra: ExtraTools,
    peers: Peers,
    /// Sessions initialized so far (`notifications/initialized` received).
    initialized: Arc<AtomicUsize>,
    elicit: bool,
    /// Tools a `tools/list` page holds; `None`: every tool on one page.
    page_size: Option<usize>,
    list_delay_ms: Arc<AtomicU64>,
}

/// What run-time changes touch: the tools, and the sessions to tell of them.
#[derive(Clone, Default)]
struct Shared {
    extra: ExtraTools,
    peers: Peers,
    initialized: Arc<AtomicUsize>,
    streams: Streams,
    /// `PUT /demo/list-delay`: how long each `tools/list` waits before answering.
    list_delay_ms: Arc<AtomicU64>,
}

/// The GET streams open now: a number of each, and the `Authorization` it came with.
#[derive(Clone, Default)]
struct Streams {
    open: Arc<Mutex<BTreeMap<u64, String>>>,
    next: Arc<AtomicU64>,
}

/// One open GET stream, forgotten when its response body is dropped (the client went,
/// or the session ended).
struct OpenStream {
    streams: Streams,
    number: u64,
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        if let Ok(mut open) = self.streams.open.lock() {
            open.remove(&self.number);
        }
    }
}

/// The tools `--elicit` adds.
const ASK: &str = "ask";
const SAMPLE: &str = "sample";

/// `ask`: asks the client for a name while serving the call.
async fn ask(context: &RequestContext<RoleServer>) -> Result<CallToolResponse, ErrorData> {
    let schema = serde_json::json!({
        "type": "object",
        "properties": {"name": {"type": "string", "description": "Your name"}},
        "required": ["name"],
    });
    let serde_json::Value::Object(schema) = schema else {
        return Err(ErrorData::internal_error("schema", None));
    };
    let schema = ElicitationSchema::from_json_schema(schema)
        .map_err(|e| ErrorData::internal_error(e.to_string(), None))?;
    let params = ElicitRequestParams::FormElicitationParams {
        meta: None,
        message: "What is your name?".into(),
        requested_schema: schema,
    };
    let text = match context.peer.create_elicitation(params).await {
        Ok(answer) if answer.action == ElicitationAction::Accept => {
            let name = answer
                .content
                .as_ref()
                .and_then(|c| c.get("name"))
                .and_then(|n| n.as_str())
                .unwrap_or("?")
                .to_owned();
            format!("hello {name}")
        }
        Ok(answer) => format!("{:?}", answer.action).to_lowercase(),
        Err(e) => format!("elicitation failed: {e}"),
    };
    Ok(CallToolResult::success(vec![ContentBlock::text(text)]).into())
}

/// `sample`: asks the client for a completion while serving the call.
#[allow(deprecated)] // sampling (see the import)
async fn sample(context: &RequestContext<RoleServer>) -> Result<CallToolResponse, ErrorData> {
    let params: CreateMessageRequestParams = serde_json::from_value(serde_json::json!({
        "messages": [{"role": "user", "content": {"type": "text", "text": "Say hello"}}],
        "maxTokens": 16,
    }))
    .map_err(|e| ErrorData::internal_error(e.to_string(), None))?;
    let text = match context.peer.create_message(params).await {
        Ok(answer) => {
            let answer = serde_json::to_value(&answer).unwrap_or_default();
            format!(
                "{}: {}",
                answer["model"].as_str().unwrap_or("?"),
                answer["content"]["text"].as_str().unwrap_or("?")
            )
        }
        Err(e) => format!("sampling failed: {e}"),
    };
    Ok(CallToolResult::success(vec![ContentBlock::text(text)]).into())
}

impl Shared {
    fn peers(&self) -> Vec<Peer<RoleServer>> {
        self.peers.lock().map(|p| p.clone()).unwrap_or_default()
    }

    /// Forgets the peers whose session ended.
    fn prune(&self) {
        if let Ok(mut peers) = self.peers.lock() {
            peers.retain(|p| !p.is_transport_closed());
        }
    }
}

fn extra_tools(extra: &ExtraTools) -> Vec<(String, String)> {
    extra
        .lock()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default()
}

const PROMPTS: [(&str, &str); 2] = [
    ("greet", "Greet someone by name"),
    ("summarize", "Summarize a text"),
];

const RESOURCES: [(&str, &str, &str); 2] = [
    ("demo://readme", "readme", "The demo server's readme"),
    (
        "demo://secret",
        "secret",
        "Something only some callers should read",
    ),
];

fn request_header(ctx: &RequestContext<RoleServer>, name: &str) -> String {
    // rmcp puts the HTTP request parts of the POST that carried this call into the
    // request extensions.
    ctx.extensions
        .get::<http::request::Parts>()
        .and_then(|parts| parts.headers.get(name))
        .and_then(|v| v.to_str().ok())
        .unwrap_or("none")
        .to_owned()
}

#[tool_router]
impl DemoServer {
    #[tool(description = "Echo the given text back")]
    async fn echo(&self, Parameters(EchoArgs { text }): Parameters<EchoArgs>) -> String {
        text
    }

    #[tool(description = "Return the Authorization header that reached this server, or \"none\"")]
    async fn whoami(&self, ctx: RequestContext<RoleServer>) -> String {
        request_header(&ctx, "authorization")
    }

    #[tool(
        description = "Return the value of any HTTP request header that reached this server, or \"none\""
    )]
    async fn header(
        &self,
        Parameters(HeaderArgs { name }): Parameters<HeaderArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> String {
        request_header(&ctx, &name)
    }
}

#[tool_handler(name = "mcpguard-demo", version = "0.1.0")]
impl ServerHandler for DemoServer {
    #[allow(deprecated)] // logging (see the import)
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(
            ServerCapabilities::builder()
                .enable_tools()
                .enable_prompts()
                .enable_resources()
                .enable_logging()
                .build(),
        )
        .with_server_info(Implementation::new("mcpguard-demo", "0.1.0"))
    }

    async fn on_initialized(&self, context: NotificationContext<RoleServer>) {
        self.initialized.fetch_add(1, Ordering::SeqCst);
        if let Ok(mut peers) = self.peers.lock() {
            peers.retain(|p| !p.is_transport_closed());
            peers.push(context.peer);
        }
    }

    #[allow(deprecated)] // logging (see the import)
    async fn set_level(
        &self,
        request: SetLevelRequestParams,
        _: RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        let level = serde_json::to_value(request.level).unwrap_or_default();
        println!("logging level set to {}", level.as_str().unwrap_or("?"));
        Ok(())
    }

    async fn list_tools(
        &self,
        request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        let delay = self.list_delay_ms.load(Ordering::Relaxed);
        if delay > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
        }
        let mut tools = Self::tool_router().list_all();
        let schema = serde_json::json!({
            "type": "object",
            "properties": {"text": {"type": "string", "description": "Text to echo back"}},
        });
        let schema: Arc<JsonObject> = Arc::new(match schema {
            serde_json::Value::Object(map) => map,
            _ => JsonObject::default(),
        });
        for (name, description) in extra_tools(&self.extra) {
            tools.push(Tool::new(name, description, schema.clone()));
        }
        if self.elicit {
            let empty = Arc::new(JsonObject::from_iter([(
                "type".to_owned(),
                serde_json::json!("object"),
            )]));
            tools.push(Tool::new(ASK, "Ask the client for a name", empty.clone()));
            tools.push(Tool::new(SAMPLE, "Ask the client for a completion", empty));
        }
        let Some(size) = self.page_size else {
            return Ok(ListToolsResult::with_all_items(tools));
        };
        let start = match request.and_then(|r| r.cursor) {
            None => 0,
            Some(c) => c
                .parse::<usize>()
                .ok()
                .filter(|&offset| offset < tools.len())
                .ok_or_else(|| ErrorData::invalid_params("invalid cursor", None))?,
        };
        let end = tools.len().min(start + size);
        let next = (end < tools.len()).then(|| end.to_string());
        let mut page = ListToolsResult::with_all_items(tools.drain(start..end).collect());
        page.next_cursor = next;
        Ok(page)
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        if extra_tools(&self.extra)
            .iter()
            .any(|(name, _)| *name == request.name)
        {
            let text = request
                .arguments
                .as_ref()
                .and_then(|a| a.get("text"))
                .and_then(|t| t.as_str())
                .unwrap_or_default()
                .to_owned();
            return Ok(CallToolResult::success(vec![ContentBlock::text(text)]).into());
        }
        if self.elicit && request.name == ASK {
            return ask(&context).await;
        }
        if self.elicit && request.name == SAMPLE {
            return sample(&context).await;
        }
        let tcc = ToolCallContext::new(self, request, context);
        Self::tool_router().call(tcc).await
    }

    async fn list_prompts(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListPromptsResult, ErrorData> {
        let prompts = PROMPTS
            .iter()
            .map(|(name, description)| {
                Prompt::new(
                    *name,
                    Some(*description),
                    Some(vec![PromptArgument::new("name").with_required(false)]),
                )
            })
            .collect();
        Ok(ListPromptsResult::with_all_items(prompts))
    }

    async fn get_prompt(
        &self,
        request: GetPromptRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<GetPromptResponse, ErrorData> {
        let Some((name, description)) = PROMPTS.iter().find(|(n, _)| *n == request.name) else {
            return Err(ErrorData::invalid_params("no such prompt", None));
        };
        let text = format!("{description} ({name})");
        Ok(GetPromptResult::new(vec![PromptMessage::new_text(Role::User, text)]).into())
    }

    async fn list_resources(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListResourcesResult, ErrorData> {
        let resources = RESOURCES
            .iter()
            .map(|(uri, name, description)| {
                Resource::new(*uri, *name)
                    .with_description(*description)
                    .with_mime_type("text/plain")
            })
            .collect();
        Ok(ListResourcesResult::with_all_items(resources))
    }

    async fn read_resource(
        &self,
        request: ReadResourceRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<ReadResourceResponse, ErrorData> {
        let Some((uri, _, description)) = RESOURCES.iter().find(|(u, ..)| *u == request.uri) else {
            return Err(ErrorData::resource_not_found("no such resource", None));
        };
        Ok(ReadResourceResult::new(vec![ResourceContents::text(*description, *uri)]).into())
    }
}

/// How the demo server behaves (see `mcpguard-demo-mcp`'s usage).
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Stateful mode keeps sessions (`Mcp-Session-Id`) and answers over SSE, as most
    /// servers in the wild do; stateless answers each POST with plain JSON.
    pub stateless: bool,
    /// Adds the `ask` tool, which asks the client for a name (elicitation), and
    /// `sample`, which asks it for a completion (sampling).
    pub elicit: bool,
    /// Tools a `tools/list` page holds (`None`: all on one page).
    pub page_size: Option<usize>,
}

/// The MCP endpoint at `/mcp`, and the test hooks under `/demo/` (changing a tool,
/// announcing a resource update, asking sessions for their roots, what was opened).
pub fn router(options: Options) -> axum::Router {
    let shared = Shared::default();
    let changes = axum::Router::new()
        .route("/demo/tools/{name}", axum::routing::put(put_tool))
        .route(
            "/demo/resources/updated",
            axum::routing::post(resource_updated),
        )
        .route("/demo/roots", axum::routing::post(list_roots))
        .route("/demo/stats", axum::routing::get(stats))
        .route("/demo/list-delay", axum::routing::put(put_list_delay))
        .with_state(shared.clone());
    let streams = shared.streams.clone();
    mcp_router(options, shared)
        .layer(axum::middleware::from_fn(
            move |request: axum::extract::Request, next: axum::middleware::Next| {
                track_stream(streams.clone(), request, next)
            },
        ))
        .merge(changes)
}

/// Keeps a GET stream in [`Streams`] for as long as its response body lives.
async fn track_stream(
    streams: Streams,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    if request.method() != http::Method::GET {
        return next.run(request).await;
    }
    let authorization = request
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("none")
        .to_owned();
    let response = next.run(request).await;
    if !response.status().is_success() {
        return response;
    }
    let number = streams.next.fetch_add(1, Ordering::SeqCst);
    if let Ok(mut open) = streams.open.lock() {
        open.insert(number, authorization);
    }
    let open = OpenStream { streams, number };
    let (parts, body) = response.into_parts();
    let body = futures_util::StreamExt::map(body.into_data_stream(), move |chunk| {
        let _ = &open;
        chunk
    });
    axum::response::Response::from_parts(parts, axum::body::Body::from_stream(body))
}

/// `{"initialized": N, "get_streams": [authorization, ...]}`.
async fn stats(
    axum::extract::State(shared): axum::extract::State<Shared>,
) -> axum::Json<serde_json::Value> {
    let streams: Vec<String> = shared
        .streams
        .open
        .lock()
        .map(|open| open.values().cloned().collect())
        .unwrap_or_default();
    axum::Json(serde_json::json!({
        "initialized": shared.initialized.load(Ordering::SeqCst),
        "get_streams": streams,
    }))
}

/// The longest `PUT /demo/list-delay` takes: a benchmark's upstream, not a stalled one.
const MAX_LIST_DELAY_MS: u64 = 10_000;

/// Sets how long each `tools/list` waits: 204, or 400 for anything but a number of
/// milliseconds up to [`MAX_LIST_DELAY_MS`].
async fn put_list_delay(
    axum::extract::State(shared): axum::extract::State<Shared>,
    body: String,
) -> http::StatusCode {
    match body.trim().parse::<u64>() {
        Ok(ms) if ms <= MAX_LIST_DELAY_MS => {
            shared.list_delay_ms.store(ms, Ordering::Relaxed);
            http::StatusCode::NO_CONTENT
        }
        _ => http::StatusCode::BAD_REQUEST,
    }
}

/// Adds a run-time tool, or changes its description: the next `tools/list` shows it,
/// and every open session is sent `notifications/tools/list_changed`.
async fn put_tool(
    axum::extract::State(shared): axum::extract::State<Shared>,
    axum::extract::Path(name): axum::extract::Path<String>,
    description: String,
) -> http::StatusCode {
    match shared.extra.lock() {
        Ok(mut tools) => {
            tools.insert(name, description);
        }
        Err(_) => return http::StatusCode::INTERNAL_SERVER_ERROR,
    }
    for peer in shared.peers() {
        // A session without a GET stream open just misses it, as the spec allows.
        let _ = peer.notify_tool_list_changed().await;
    }
    shared.prune();
    http::StatusCode::NO_CONTENT
}

/// Sends `notifications/resources/updated` for the URI in the body to every session.
async fn resource_updated(
    axum::extract::State(shared): axum::extract::State<Shared>,
    uri: String,
) -> http::StatusCode {
    for peer in shared.peers() {
        let _ = peer
            .notify_resource_updated(ResourceUpdatedNotificationParam::new(uri.clone()))
            .await;
    }
    shared.prune();
    http::StatusCode::NO_CONTENT
}

/// Asks every session for its roots, each in the background (a session that never
/// answers is given 10 s); prints each answer.
// Roots are deprecated (SEP-2577) but still in the spec versions clients speak.
#[allow(deprecated)]
async fn list_roots(
    axum::extract::State(shared): axum::extract::State<Shared>,
) -> http::StatusCode {
    for peer in shared.peers() {
        tokio::spawn(async move {
            let asked = tokio::time::timeout(std::time::Duration::from_secs(10), peer.list_roots());
            match asked.await {
                Ok(Ok(answer)) => {
                    let uris: Vec<String> = answer.roots.into_iter().map(|r| r.uri).collect();
                    println!("roots listed: {}", uris.join(" "));
                }
                Ok(Err(e)) => println!("roots not listed: {e}"),
                Err(_) => println!("roots not listed: no answer in 10 s"),
            }
        });
    }
    shared.prune();
    http::StatusCode::ACCEPTED
}

fn mcp_router(options: Options, shared: Shared) -> axum::Router {
    let server = move || {
        Ok(DemoServer {
            extra: shared.extra.clone(),
            peers: shared.peers.clone(),
            initialized: shared.initialized.clone(),
            elicit: options.elicit,
            page_size: options.page_size,
            list_delay_ms: shared.list_delay_ms.clone(),
        })
    };
    if options.stateless {
        let config = StreamableHttpServerConfig::default()
            .with_legacy_session_mode(false)
            .with_json_response(true)
            .with_sse_keep_alive(None);
        let service =
            StreamableHttpService::new(server, Arc::new(NeverSessionManager::default()), config);
        axum::Router::new().nest_service("/mcp", service)
    } else {
        let service = StreamableHttpService::new(
            server,
            Arc::new(LocalSessionManager::default()),
            StreamableHttpServerConfig::default(),
        );
        axum::Router::new().nest_service("/mcp", service)
    }
}
