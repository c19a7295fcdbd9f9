//! The wasm filter's request lifecycle (`mcpguard_filter::lifecycle`) through the
//! dynamic-module ABI instead of proxy-wasm: this file is its config and its [`Host`].

use std::cell::OnceCell;
use std::fmt;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use mcpguard_core::jwt::Keys;
use mcpguard_filter::config::FilterConfig;
use mcpguard_filter::counters::{Counters, Event};
use mcpguard_filter::decide::RawHeaders;
use mcpguard_filter::lifecycle::{self, Host, Lifecycle, McpField, Next};

use crate::abi::{ConfigSite, HeadersStatus, Level, Stream, log};

/// Where Envoy's `envoy.filters.http.mcp` puts what it parsed from the JSON-RPC body.
const MCP_METADATA: &str = "envoy.filters.http.mcp";

/// One filter config, shared by the streams of every worker.
pub struct Config {
    filter: FilterConfig,
    /// Only keys given in the config (`jwks`): this module does not fetch a JWKS, so
    /// an access token without them is refused `policy_unavailable`.
    keys: Option<Keys>,
    counters: Counters<usize>,
}

impl Config {
    /// `None` rejects the config; the reason is logged.
    pub fn new(bytes: &[u8], site: &ConfigSite) -> Option<Config> {
        let filter = FilterConfig::parse(bytes)
            .map_err(|e| log(Level::Error, || format!("mcpguard: {e}")))
            .ok()?;
        let keys = match &filter.jwks {
            Some(jwks) => Some(
                Keys::from_value(jwks)
                    .map_err(|e| log(Level::Error, || format!("mcpguard: jwks: {e}")))
                    .ok()?,
            ),
            None => None,
        };
        log(Level::Info, || {
            format!(
                "mcpguard: configured, policy cluster {:?}, check timeout {} ms, {}",
                filter.policy_cluster,
                filter.check_timeout_ms,
                filter.mode()
            )
        });
        Some(Config {
            filter,
            keys,
            counters: Counters::define(|name| site.define_counter(name)),
        })
    }
}

/// One request. Its hooks take `&self`: Envoy may deliver a callout's answer inside
/// the call that starts it (a reply Envoy makes itself), so `on_check_answer` can run
/// while `on_request_headers` is still on the stack; [`Lifecycle`] is made for that.
pub struct Request {
    config: Arc<Config>,
    lifecycle: Lifecycle,
}

impl Request {
    pub fn new(config: Arc<Config>) -> Request {
        Request {
            config,
            lifecycle: Lifecycle::default(),
        }
    }

    pub fn on_request_headers(&self, s: &Stream<'_>) -> HeadersStatus {
        match self.lifecycle.on_request_headers(&self.host(s)) {
            Next::Continue => HeadersStatus::Continue,
            Next::Pause => HeadersStatus::StopAllIterationAndWatermark,
        }
    }

    /// The check's answer: `status` is `None` when the callout failed (unreachable,
    /// timed out, reset).
    pub fn on_check_answer(&self, s: &Stream<'_>, status: Option<u16>, body: &[u8]) {
        self.lifecycle.on_answer(&self.host(s), status, Some(body));
    }

    fn host<'a>(&'a self, stream: &'a Stream<'a>) -> Envoy<'a> {
        Envoy {
            stream,
            config: &self.config,
            headers: OnceCell::new(),
        }
    }
}

/// The stream of one hook, as the lifecycle's host.
struct Envoy<'a> {
    stream: &'a Stream<'a>,
    config: &'a Config,
    /// Every request header, copied out of Envoy in one call when first needed.
    headers: OnceCell<Vec<(Vec<u8>, Vec<u8>)>>,
}

impl Envoy<'_> {
    fn headers(&self) -> &[(Vec<u8>, Vec<u8>)] {
        self.headers.get_or_init(|| self.stream.request_headers())
    }
}

impl<'a> Host for Envoy<'a> {
    type Keys = &'a Keys;

    fn config(&self) -> Option<&FilterConfig> {
        Some(&self.config.filter)
    }

    fn keys(&self) -> Option<&'a Keys> {
        self.config.keys.as_ref()
    }

    /// Keys come only from the config: an access token without them is refused
    /// `policy_unavailable`.
    fn fetches_keys(&self) -> bool {
        false
    }

    fn store_keys(&self, _keys: Keys) {
        // Never asked: this host fetches no keys.
    }

    fn has_request_header(&self, name: &str) -> Option<bool> {
        // This ABI, unlike proxy-wasm's, does not clear the route cache when a header is
        // removed; knowing what the client sent, the lifecycle clears it only when a
        // route header was there.
        Some(
            self.headers()
                .iter()
                .any(|(k, _)| k.as_slice() == name.as_bytes()),
        )
    }

    fn request_headers(&self) -> RawHeaders {
        RawHeaders::from_pairs(self.headers())
    }

    fn mcp_metadata(&self, field: McpField) -> Option<String> {
        match field {
            McpField::Method => self.stream.metadata_string(MCP_METADATA, "method"),
            // The tool name and URI sit in a nested struct (`params`), which this ABI
            // cannot read; the method is enough for the decision, the tool is only
            // audited.
            McpField::Tool | McpField::Uri => None,
        }
    }

    fn set_request_header(&self, name: &str, value: Option<&str>) {
        self.stream.set_request_header(name, value);
    }

    fn clear_route_cache(&self) {
        self.stream.clear_route_cache();
    }

    fn dispatch(
        &self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
        timeout_ms: u64,
    ) -> Result<(), String> {
        if self
            .stream
            .callout(cluster, headers, body.unwrap_or_default(), timeout_ms)
        {
            Ok(())
        } else {
            Err("Envoy did not start it".to_owned())
        }
    }

    fn send_response(&self, status: u32, headers: Vec<(&str, &str)>, body: &[u8]) {
        self.stream.send_response(status, &headers, body);
    }

    fn resume(&self) {
        self.stream.continue_decoding();
    }

    fn now(&self) -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
    }

    fn count(&self, event: Event) {
        if let Some(id) = self.config.counters.id(event) {
            self.stream.increment_counter(id);
        }
    }

    fn log(&self, level: lifecycle::Level, message: fmt::Arguments<'_>) {
        let level = match level {
            lifecycle::Level::Info => Level::Info,
            lifecycle::Level::Warn => Level::Warn,
            lifecycle::Level::Error => Level::Error,
        };
        log(level, || format!("mcpguard: {message}"));
    }
}
