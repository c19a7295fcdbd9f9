//! A small MCP server for demos and tests: `echo`, and tools that report which HTTP
//! headers reached it, so a test can prove what the gateway forwarded and what it kept
//! back.

use std::sync::Arc;

use rmcp::handler::server::wrapper::Parameters;
use rmcp::service::RequestContext;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::session::never::NeverSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{RoleServer, ServerHandler, tool, tool_handler, tool_router};
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

#[derive(Debug, Clone, Default)]
pub struct DemoServer;

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
impl ServerHandler for DemoServer {}

/// The MCP endpoint at `/mcp`. Stateful mode keeps sessions (`Mcp-Session-Id`) and
/// answers over SSE, as most servers in the wild do; stateless answers each POST with
/// plain JSON.
pub fn router(stateless: bool) -> axum::Router {
    if stateless {
        let config = StreamableHttpServerConfig::default()
            .with_legacy_session_mode(false)
            .with_json_response(true)
            .with_sse_keep_alive(None);
        let service = StreamableHttpService::new(
            || Ok(DemoServer),
            Arc::new(NeverSessionManager::default()),
            config,
        );
        axum::Router::new().nest_service("/mcp", service)
    } else {
        let service = StreamableHttpService::new(
            || Ok(DemoServer),
            Arc::new(LocalSessionManager::default()),
            StreamableHttpServerConfig::default(),
        );
        axum::Router::new().nest_service("/mcp", service)
    }
}
