//! A small MCP server for demos and tests: `echo`, and tools that report which HTTP
//! headers reached it, so a test can prove what the gateway forwarded and what it kept
//! back; two prompts and two resources; and tools added or changed at run time
//! (`PUT /demo/tools/{name}` with the description as body, outside `/mcp`), so a test
//! can play an upstream that changes its tools (a rug-pull). It accepts
//! `logging/setLevel` and prints the level it was set to (`logging level set to
//! debug`), so a test can see the request arrived. With a page size, `tools/list`
//! answers in pages of that many tools (the cursor is the offset of the next one), so
//! a test can play an upstream whose list is paginated.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use rmcp::handler::server::tool::ToolCallContext;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, GetPromptRequestParams,
    GetPromptResponse, GetPromptResult, Implementation, JsonObject, ListPromptsResult,
    ListResourcesResult, ListToolsResult, PaginatedRequestParams, Prompt, PromptArgument,
    PromptMessage, ReadResourceRequestParams, ReadResourceResponse, ReadResourceResult, Resource,
    ResourceContents, Role, ServerCapabilities, ServerConfig, Tool,
};
// MCP logging is deprecated (SEP-2577) but still in the spec versions clients speak; the
// demo server keeps it so tests can see `logging/setLevel` arrive.
#[allow(deprecated)]
use rmcp::model::SetLevelRequestParams;
use rmcp::service::RequestContext;
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

#[derive(Debug, Clone, Default)]
pub struct DemoServer {
    extra: ExtraTools,
    /// Tools a `tools/list` page holds; `None`: every tool on one page.
    page_size: Option<usize>,
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

/// The MCP endpoint at `/mcp`. Stateful mode keeps sessions (`Mcp-Session-Id`) and
/// answers over SSE, as most servers in the wild do; stateless answers each POST with
/// plain JSON.
/// `page_size`: tools a `tools/list` page holds (`None`: all on one page).
pub fn router(stateless: bool, page_size: Option<usize>) -> axum::Router {
    let extra = ExtraTools::default();
    let tools = axum::Router::new()
        .route("/demo/tools/{name}", axum::routing::put(put_tool))
        .with_state(extra.clone());
    mcp_router(stateless, extra, page_size).merge(tools)
}

/// Adds a run-time tool, or changes its description: the next `tools/list` shows it.
async fn put_tool(
    axum::extract::State(extra): axum::extract::State<ExtraTools>,
    axum::extract::Path(name): axum::extract::Path<String>,
    description: String,
) -> http::StatusCode {
    match extra.lock() {
        Ok(mut tools) => {
            tools.insert(name, description);
            http::StatusCode::NO_CONTENT
        }
        Err(_) => http::StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn mcp_router(stateless: bool, extra: ExtraTools, page_size: Option<usize>) -> axum::Router {
    let server = move || {
        Ok(DemoServer {
            extra: extra.clone(),
            page_size,
        })
    };
    if stateless {
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
