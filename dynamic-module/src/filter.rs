//! What the wasm filter's `http.rs` does, through the dynamic-module ABI instead of
//! proxy-wasm: read the request, let `decide` answer, carry the answer out.

use std::cell::{Cell, RefCell};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use mcpguard_core::check::{CHECK_PATH, DenyCode};
use mcpguard_core::jwt::Keys;
use mcpguard_filter::config::FilterConfig;
use mcpguard_filter::counters::Counters;
use mcpguard_filter::decide::{
    self, ADDRESS_HEADER, Clock, Finish, Incoming, METADATA_HEADERS, ROUTE_HEADER, RawHeaders,
    Refusal, Start,
};

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
                "mcpguard: configured, policy cluster {:?}, check timeout {} ms",
                filter.policy_cluster, filter.check_timeout_ms
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
/// while `on_request_headers` is still on the stack.
pub struct Request {
    config: Arc<Config>,
    /// The client's `:path`, kept for rewriting once the check answers.
    path: RefCell<String>,
    request_id: RefCell<Option<String>>,
    /// The check has answered (possibly before the callout call returned).
    answered: Cell<bool>,
}

impl Request {
    pub fn new(config: Arc<Config>) -> Request {
        Request {
            config,
            path: RefCell::default(),
            request_id: RefCell::default(),
            answered: Cell::new(false),
        }
    }

    pub fn on_request_headers(&self, s: &Stream<'_>) -> HeadersStatus {
        let all = s.request_headers();
        // Whatever happens next, a client can never choose a forwarding route itself.
        // Envoy picked (and cached) the route from the client's headers before this
        // hook, and this ABI, unlike proxy-wasm's, does not clear that cache when a
        // header is removed: without the clear, a forged route header plus any `Host`
        // made a request that this filter passes through (not an MCP path) use a
        // forwarding route, an open proxy.
        if all
            .iter()
            .any(|(k, _)| k.as_slice() == ROUTE_HEADER.as_bytes())
        {
            s.set_request_header(ROUTE_HEADER, None);
            s.clear_route_cache();
        }
        // Nor the address Envoy connects to (read by the cluster, not the route).
        s.set_request_header(ADDRESS_HEADER, None);
        let headers = RawHeaders::from_pairs(&all);
        // The tool name sits in a nested struct (`params.name`), which this ABI cannot
        // read; the method is enough for the decision, the tool is only audited.
        let mcp_method = s.metadata_string(MCP_METADATA, "method");
        let incoming = Incoming::from_headers(&headers, mcp_method.as_deref(), None);
        self.path.replace(incoming.path.to_owned());
        self.request_id
            .replace(incoming.request_id.map(str::to_owned));
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        let config = &self.config.filter;
        let clock = Clock {
            keys: self.config.keys.as_ref(),
            now,
        };
        match decide::start(&incoming, config, clock) {
            Start::PassThrough => return HeadersStatus::Continue,
            Start::Metadata(doc) => s.send_response(200, &METADATA_HEADERS, doc.as_bytes()),
            Start::Refuse(refusal) => self.refuse(s, refusal),
            Start::NeedKeys => {
                self.refuse(s, Refusal::new(DenyCode::PolicyUnavailable, None));
            }
            Start::Check(check) => {
                let started = serde_json::to_vec(&check).is_ok_and(|body| {
                    s.callout(
                        &config.policy_cluster,
                        &[
                            (":method", "POST"),
                            (":path", CHECK_PATH),
                            (":authority", &config.policy_authority),
                            ("content-type", "application/json"),
                        ],
                        &body,
                        config.check_timeout_ms,
                    )
                });
                // Not started, unless Envoy answered it at once (and that answer was
                // carried out already).
                if !started && !self.answered.get() {
                    log(Level::Error, || {
                        format!(
                            "mcpguard: check callout to cluster {:?} failed to start",
                            config.policy_cluster
                        )
                    });
                    self.refuse(s, Refusal::new(DenyCode::PolicyUnavailable, None));
                }
            }
        }
        // Paused until the check answers; the body waits in Envoy's buffer.
        HeadersStatus::StopAllIterationAndWatermark
    }

    /// The check's answer: `status` is `None` when the callout failed (unreachable,
    /// timed out, reset).
    pub fn on_check_answer(&self, s: &Stream<'_>, status: Option<u16>, body: &[u8]) {
        self.answered.set(true);
        let request_id = self.request_id.borrow().clone();
        if let Some(note) = decide::unanswered_check(status, request_id.as_deref()) {
            log(Level::Warn, || format!("mcpguard: {note}"));
        }
        let path = self.path.borrow().clone();
        match decide::finish(status, Some(body), &path) {
            Finish::Forward(forward) => {
                for (name, value) in forward.header_edits() {
                    s.set_request_header(name, value);
                }
                s.clear_route_cache();
                if let Some(id) = self.config.counters.allowed() {
                    s.increment_counter(id);
                }
                s.continue_decoding();
            }
            Finish::Refuse(refusal) => self.refuse(s, refusal),
        }
    }

    fn refuse(&self, s: &Stream<'_>, refusal: Refusal) {
        log(Level::Info, || {
            format!(
                "mcpguard: {}",
                refusal.log_line(&self.path.borrow(), self.request_id.borrow().as_deref())
            )
        });
        if let Some(id) = self.config.counters.denied(refusal.code) {
            s.increment_counter(id);
        }
        let headers: Vec<(&str, &str)> = refusal
            .headers
            .iter()
            .map(|(n, v)| (*n, v.as_str()))
            .collect();
        s.send_response(refusal.status(), &headers, refusal.body.as_bytes());
    }
}
