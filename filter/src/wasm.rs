//! proxy-wasm glue: reads headers from Envoy, hands them to `decide`, and carries out
//! the answer. No decision is made here.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

use mcpguard_core::check::{CHECK_PATH, DenyCode};
use mcpguard_core::oauth::CHECK_JWKS_PATH;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MetricType};

use crate::config::FilterConfig;
use crate::counters::Counters;
use crate::decide::{
    self, ADDRESS_HEADER, Clock, Finish, Incoming, METADATA_HEADERS, ROUTE_HEADER, RawHeaders,
    Refusal, Start,
};
use mcpguard_core::jwt::Keys;

/// The JWT verification keys, shared by the root context (which refreshes them) and
/// every request of this VM.
type SharedKeys = Rc<RefCell<Option<Rc<Keys>>>>;

/// How often the root context retries while it has no JWKS yet (a request carrying a
/// JWT meanwhile fetches one itself rather than wait).
const JWKS_RETRY: Duration = Duration::from_millis(250);

proxy_wasm::main! {{
    // Also installs a panic hook that logs at critical through Envoy.
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| Box::new(Root::default()));
}}

/// Counters in Envoy's stats (`wasmcustom.mcpguard.*`), so an operator sees refusals by
/// reason in `/stats` and Prometheus output.
type Metrics = Counters<u32>;

fn count(id: Option<u32>) {
    if let Some(id) = id {
        let _ = hostcalls::increment_metric(id, 1);
    }
}

#[derive(Default)]
struct Root {
    config: Option<Rc<FilterConfig>>,
    metrics: Option<Rc<Metrics>>,
    keys: SharedKeys,
    /// A JWKS fetch is in flight.
    fetching: bool,
}

/// Asks the policy service for its JWKS; the answer comes to `ctx`'s
/// `on_http_call_response`.
fn fetch_jwks(
    ctx: &impl Context,
    config: &FilterConfig,
    timeout: Duration,
) -> Result<u32, proxy_wasm::types::Status> {
    ctx.dispatch_http_call(
        &config.policy_cluster,
        vec![
            (":method", "GET"),
            (":path", CHECK_JWKS_PATH),
            (":authority", &config.policy_authority),
        ],
        None,
        vec![],
        timeout,
    )
}

impl Root {
    fn refresh_jwks(&mut self) {
        let Some(config) = self.config.clone() else {
            return;
        };
        let timeout = Duration::from_millis(config.check_timeout_ms.max(1000));
        match fetch_jwks(self, &config, timeout) {
            Ok(_) => self.fetching = true,
            Err(status) => log::error!(
                "JWKS fetch from cluster {:?} failed to start: {status:?}",
                config.policy_cluster
            ),
        }
    }
}

impl Context for Root {
    fn on_http_call_response(
        &mut self,
        _token: u32,
        _headers: usize,
        body_size: usize,
        _trailers: usize,
    ) {
        self.fetching = false;
        let status = self
            .get_http_call_response_header_bytes(":status")
            .and_then(|s| String::from_utf8(s).ok());
        let body = self
            .get_http_call_response_body(0, body_size)
            .unwrap_or_default();
        let refresh = self
            .config
            .as_ref()
            .map_or(JWKS_RETRY, |c| Duration::from_secs(c.jwks_refresh_s));
        match (status.as_deref(), Keys::from_jwks(&body)) {
            (Some("200"), Ok(keys)) => {
                log::debug!("JWKS refreshed: {keys:?}");
                *self.keys.borrow_mut() = Some(Rc::new(keys));
                self.set_tick_period(refresh);
            }
            (status, parsed) => {
                // Keep the keys we had: tokens they verify still go through the check,
                // which fails closed on its own if the policy service is down.
                log::warn!(
                    "JWKS refresh failed (status {status:?}, {:?})",
                    parsed.err()
                );
                let known = self.keys.borrow().is_some();
                self.set_tick_period(if known { refresh } else { JWKS_RETRY });
            }
        }
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = self.get_plugin_configuration().unwrap_or_default();
        match FilterConfig::parse(&bytes) {
            Ok(config) => {
                log::info!(
                    "configured, policy cluster {:?}, check timeout {} ms",
                    config.policy_cluster,
                    config.check_timeout_ms
                );
                if let Some(jwks) = &config.jwks {
                    match Keys::from_value(jwks) {
                        Ok(keys) => *self.keys.borrow_mut() = Some(Rc::new(keys)),
                        Err(e) => {
                            log::error!("jwks: {e}");
                            return false;
                        }
                    }
                }
                let fetch = config.fetches_jwks();
                self.config = Some(Rc::new(config));
                self.metrics = Some(Rc::new(Metrics::define(|name| {
                    hostcalls::define_metric(MetricType::Counter, name).ok()
                })));
                if fetch {
                    // The first tick fetches; later ones refresh.
                    self.set_tick_period(JWKS_RETRY);
                }
                true
            }
            Err(e) => {
                log::error!("{e}");
                false
            }
        }
    }

    fn on_tick(&mut self) {
        if !self.fetching {
            self.refresh_jwks();
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Request {
            keys: self.keys.clone(),
            awaiting_keys: false,
            fetched_keys: false,
            config: self.config.clone(),
            metrics: self.metrics.clone(),
            path: String::new(),
            request_id: None,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Request {
    /// `None` only if Envoy created a stream before a successful `on_configure`;
    /// such a stream is refused.
    config: Option<Rc<FilterConfig>>,
    metrics: Option<Rc<Metrics>>,
    keys: SharedKeys,
    /// Where the pending callout goes: the JWKS (first JWT after start) or the check.
    awaiting_keys: bool,
    /// This request already fetched the JWKS once; no second attempt.
    fetched_keys: bool,
    /// The client's `:path`, kept for rewriting once the check answers.
    path: String,
    request_id: Option<String>,
}

impl Request {
    fn refuse(&self, refusal: Refusal) {
        log::info!(
            "{}",
            refusal.log_line(&self.path, self.request_id.as_deref())
        );
        if let Some(m) = &self.metrics {
            count(m.denied(refusal.code));
        }
        let headers = refusal
            .headers
            .iter()
            .map(|(n, v)| (*n, v.as_str()))
            .collect();
        self.send_http_response(refusal.status(), headers, Some(refusal.body.as_bytes()));
    }

    fn forward(&self, forward: decide::Forward) {
        for (name, value) in forward.header_edits() {
            self.set_http_request_header(name, value);
        }
        if let Some(m) = &self.metrics {
            count(m.allowed());
        }
        self.resume_http_request();
    }
}

impl Request {
    /// A value Envoy's `envoy.filters.http.mcp` parsed from the JSON-RPC body, if that
    /// filter runs before this one and the body was MCP.
    fn mcp_metadata(&self, key: &[&str]) -> Option<String> {
        let mut path = vec!["metadata", "filter_metadata", "envoy.filters.http.mcp"];
        path.extend_from_slice(key);
        self.get_property(path)
            .and_then(|v| String::from_utf8(v).ok())
    }
}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        // Whatever happens next, a client can never choose a forwarding route, or the
        // address it connects to, itself.
        self.set_http_request_header(ROUTE_HEADER, None);
        self.set_http_request_header(ADDRESS_HEADER, None);
        self.decide()
    }
}

impl Request {
    /// Reads what the decision needs from Envoy and acts on it; `Pause` unless the
    /// request is not ours.
    fn decide(&mut self) -> Action {
        // As bytes, one host call per needed header: proxy-wasm's string getters (and
        // its all-headers getter, for names) unwrap UTF-8, and one client-sent byte
        // that is not UTF-8 would panic the VM for every request on this worker.
        let headers = RawHeaders::read(|name| self.get_http_request_header_bytes(name));
        let mcp_method = self.mcp_metadata(&["method"]);
        let tool = self.mcp_metadata(&["params", "name"]);
        let incoming = Incoming::from_headers(&headers, mcp_method.as_deref(), tool.as_deref());
        self.path = incoming.path.to_owned();
        self.request_id = incoming.request_id.map(str::to_owned);
        let Some(config) = self.config.clone() else {
            self.refuse(Refusal::new(DenyCode::PolicyUnavailable, None));
            return Action::Pause;
        };
        let keys = self.keys.borrow().clone();
        let now = self
            .get_current_time()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        let clock = Clock {
            keys: keys.as_deref(),
            now,
        };
        match decide::start(&incoming, &config, clock) {
            Start::PassThrough => Action::Continue,
            Start::Metadata(doc) => {
                self.send_http_response(200, METADATA_HEADERS.to_vec(), Some(doc.as_bytes()));
                Action::Pause
            }
            Start::Refuse(refusal) => {
                self.refuse(refusal);
                Action::Pause
            }
            Start::NeedKeys if self.fetched_keys => {
                self.refuse(Refusal::new(DenyCode::PolicyUnavailable, None));
                Action::Pause
            }
            Start::NeedKeys => {
                let timeout = Duration::from_millis(config.check_timeout_ms);
                match fetch_jwks(self, &config, timeout) {
                    Ok(_) => {
                        self.awaiting_keys = true;
                        self.fetched_keys = true;
                    }
                    Err(status) => {
                        log::error!("JWKS fetch failed to start: {status:?}");
                        self.refuse(Refusal::new(DenyCode::PolicyUnavailable, None));
                    }
                }
                Action::Pause
            }
            Start::Check(check) => {
                let body = match serde_json::to_vec(&check) {
                    Ok(body) => body,
                    Err(e) => {
                        log::error!("cannot encode check request: {e}");
                        self.refuse(Refusal::new(DenyCode::PolicyUnavailable, None));
                        return Action::Pause;
                    }
                };
                let dispatched = self.dispatch_http_call(
                    &config.policy_cluster,
                    vec![
                        (":method", "POST"),
                        (":path", CHECK_PATH),
                        (":authority", &config.policy_authority),
                        ("content-type", "application/json"),
                    ],
                    Some(&body),
                    vec![],
                    Duration::from_millis(config.check_timeout_ms),
                );
                if let Err(status) = dispatched {
                    log::error!(
                        "check callout to cluster {:?} failed to start: {status:?}",
                        config.policy_cluster
                    );
                    self.refuse(Refusal::new(DenyCode::PolicyUnavailable, None));
                }
                // Paused until the check answers; the body waits in Envoy's buffer.
                Action::Pause
            }
        }
    }
}

impl Context for Request {
    fn on_http_call_response(
        &mut self,
        _token: u32,
        _headers: usize,
        body_size: usize,
        _trailers: usize,
    ) {
        let status = self
            .get_http_call_response_header_bytes(":status")
            .and_then(|s| std::str::from_utf8(&s).ok()?.parse::<u16>().ok());
        let body = self.get_http_call_response_body(0, body_size);
        if self.awaiting_keys {
            self.awaiting_keys = false;
            match (status, Keys::from_jwks(body.as_deref().unwrap_or_default())) {
                (Some(200), Ok(keys)) => *self.keys.borrow_mut() = Some(Rc::new(keys)),
                (status, parsed) => {
                    log::warn!("JWKS fetch failed (status {status:?}, {:?})", parsed.err())
                }
            }
            if let Action::Continue = self.decide() {
                self.resume_http_request();
            }
            return;
        }
        if let Some(note) = decide::unanswered_check(status, self.request_id.as_deref()) {
            log::warn!("{note}");
        }
        match decide::finish(status, body.as_deref(), &self.path) {
            Finish::Forward(forward) => self.forward(forward),
            Finish::Refuse(refusal) => self.refuse(refusal),
        }
    }
}
