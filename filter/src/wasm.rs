//! The proxy-wasm glue: the root context (configuration, counters, the JWKS refresh
//! timer) and each request's [`Host`], over which [`Lifecycle`] runs the request. No
//! decision is made here.

use std::cell::RefCell;
use std::rc::{Rc, Weak};
use std::time::{Duration, UNIX_EPOCH};

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MetricType};

use crate::config::{CheckTransport, FilterConfig};
use crate::counters::{Counters, Event};
use crate::decide::RawHeaders;
use crate::lifecycle::{self, Host, Lifecycle, McpField, Next};
use crate::stream::{self, CheckStream, Waiting};
use mcpguard_core::check::CHECK_PATH;
use mcpguard_core::features::RpcId;
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
    proxy_wasm::set_root_context(|id| Box::new(Root {
        id,
        ..Root::default()
    }));
}}

/// Counters in Envoy's stats (`wasmcustom.mcpguard.*`), so an operator sees refusals by
/// reason in `/stats` and Prometheus output.
type Metrics = Counters<u32>;

#[derive(Default)]
struct Root {
    id: u32,
    config: Option<Rc<FilterConfig>>,
    metrics: Option<Rc<Metrics>>,
    keys: SharedKeys,
    /// A JWKS fetch is in flight.
    fetching: bool,
    /// `"check_transport": "stream"` (experimental): this worker's check stream. The
    /// tick then runs every few milliseconds for its deadlines, and the JWKS refresh
    /// keeps its own schedule in `jwks_due`.
    stream: Option<stream::Shared>,
    jwks_due: Option<std::time::SystemTime>,
}

impl Root {
    /// The next JWKS refresh, `after` from now.
    fn schedule_jwks(&mut self, after: Duration) {
        if self.stream.is_some() {
            self.jwks_due = Some(self.get_current_time() + after);
        } else {
            self.set_tick_period(after);
        }
    }

    fn refresh_jwks(&mut self) {
        let Some(config) = self.config.clone() else {
            return;
        };
        let timeout = Duration::from_millis(config.check_timeout_ms.max(1000));
        let headers = lifecycle::jwks_request(&config).to_vec();
        match self.dispatch_http_call(&config.policy_cluster, headers, None, vec![], timeout) {
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
                self.schedule_jwks(refresh);
            }
            (status, parsed) => {
                // Keep the keys we had: tokens they verify still go through the check,
                // which fails closed on its own if the policy service is down.
                log::warn!(
                    "JWKS refresh failed (status {status:?}, {:?})",
                    parsed.err()
                );
                let known = self.keys.borrow().is_some();
                self.schedule_jwks(if known { refresh } else { JWKS_RETRY });
            }
        }
    }

    fn on_grpc_stream_message(&mut self, token: u32, size: usize) {
        if let Some(stream) = &self.stream {
            let message =
                hostcalls::get_buffer(proxy_wasm::types::BufferType::GrpcReceiveBuffer, 0, size)
                    .ok()
                    .flatten();
            stream::root::on_message(stream, token, message.as_deref());
        }
    }

    fn on_grpc_stream_close(&mut self, token: u32, status: u32) {
        if let (Some(stream), Some(config)) = (&self.stream, &self.config) {
            log::debug!("check stream closed, grpc-status {status}");
            stream::root::on_close(stream, token, Some(&config.policy_cluster));
        }
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = self.get_plugin_configuration().unwrap_or_default();
        match FilterConfig::parse(&bytes) {
            Ok(config) => {
                log::info!(
                    "configured, policy cluster {:?}, check timeout {} ms, {}",
                    config.policy_cluster,
                    config.check_timeout_ms,
                    config.mode()
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
                let timeout_ms = config.check_timeout_ms;
                if config.check_transport == CheckTransport::Stream {
                    log::warn!("check_transport \"stream\" is experimental (issue 27)");
                    self.stream = Some(CheckStream::new(self.id));
                    // The first tick opens the stream (and fetches the JWKS if needed).
                    self.set_tick_period(stream::tick(timeout_ms));
                }
                self.config = Some(Rc::new(config));
                self.metrics = Some(Rc::new(Metrics::define(|name| {
                    hostcalls::define_metric(MetricType::Counter, name).ok()
                })));
                if fetch && self.stream.is_none() {
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
        let jwks_due = match (&self.stream, &self.config) {
            (Some(stream), Some(config)) => {
                if stream::root::on_tick(stream, &config.policy_cluster) {
                    self.set_tick_period(stream::tick(config.check_timeout_ms));
                }
                config.fetches_jwks()
                    && self
                        .jwks_due
                        .is_none_or(|due| self.get_current_time() >= due)
            }
            _ => true,
        };
        if jwks_due && !self.fetching {
            self.refresh_jwks();
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        let inner = Rc::new_cyclic(|me: &Weak<Inner>| Inner {
            context_id,
            me: me.clone(),
            keys: self.keys.clone(),
            config: self.config.clone(),
            metrics: self.metrics.clone(),
            stream: self.stream.clone(),
            lifecycle: Lifecycle::default(),
        });
        Some(Box::new(Request(inner)))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// The HTTP context Envoy's SDK owns; the request itself is shared with the check
/// stream (`Weak`), which answers it from the root context.
struct Request(Rc<Inner>);

struct Inner {
    context_id: u32,
    me: Weak<Inner>,
    /// `None` only if Envoy created a stream before a successful `on_configure`;
    /// such a stream is refused.
    config: Option<Rc<FilterConfig>>,
    metrics: Option<Rc<Metrics>>,
    keys: SharedKeys,
    stream: Option<stream::Shared>,
    lifecycle: Lifecycle,
}

// For the SDK's default host-call helpers (headers, local replies, callouts).
impl Context for Inner {}
impl HttpContext for Inner {}

impl Waiting for Inner {
    fn answer(&self, status: Option<u16>, body: Option<&[u8]>) {
        self.lifecycle.on_answer(self, status, body);
    }
}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        let this: &Inner = &self.0;
        match this.lifecycle.on_request_headers(this) {
            Next::Continue => Action::Continue,
            Next::Pause => Action::Pause,
        }
    }

    fn on_http_response_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        let this: &Inner = &self.0;
        this.lifecycle.on_response_headers(this);
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let this: &Inner = &self.0;
        match this
            .lifecycle
            .on_response_body(this, body_size, end_of_stream)
        {
            Next::Continue => Action::Continue,
            Next::Pause => Action::Pause,
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
        let this: &Inner = &self.0;
        let status = this
            .get_http_call_response_header_bytes(":status")
            .and_then(|s| std::str::from_utf8(&s).ok()?.parse::<u16>().ok());
        let body = this.get_http_call_response_body(0, body_size);
        this.lifecycle.on_answer(this, status, body.as_deref());
    }
}

impl Host for Inner {
    type Keys = Rc<Keys>;

    fn config(&self) -> Option<&FilterConfig> {
        self.config.as_deref()
    }

    fn keys(&self) -> Option<Rc<Keys>> {
        self.keys.borrow().clone()
    }

    fn fetches_keys(&self) -> bool {
        true
    }

    fn store_keys(&self, keys: Keys) {
        *self.keys.borrow_mut() = Some(Rc::new(keys));
    }

    fn has_request_header(&self, _name: &str) -> Option<bool> {
        // Asking would cost a host call of its own, as much as removing it.
        None
    }

    fn request_headers(&self) -> RawHeaders {
        // As bytes, one host call per needed header: proxy-wasm's string getters (and
        // its all-headers getter, for names) unwrap UTF-8, and one client-sent byte
        // that is not UTF-8 would panic the VM for every request on this worker.
        RawHeaders::read(|name| self.get_http_request_header_bytes(name))
    }

    fn mcp_metadata(&self, field: McpField) -> Option<String> {
        let key: &[&str] = match field {
            McpField::Method => &["method"],
            McpField::Tool => &["params", "name"],
            McpField::Uri => &["params", "uri"],
        };
        let mut path = vec!["metadata", "filter_metadata", "envoy.filters.http.mcp"];
        path.extend_from_slice(key);
        self.get_property(path)
            .and_then(|v| String::from_utf8(v).ok())
    }

    fn mcp_exceeding_limit(&self) -> bool {
        let path = vec![
            "metadata",
            "filter_metadata",
            "envoy.filters.http.mcp",
            "is_exceeding_limit",
        ];
        // A metadata bool comes as one byte (Envoy serialises CEL bools raw).
        matches!(
            self.get_property(path).as_deref(),
            Some([1]) | Some(b"true")
        )
    }

    fn mcp_request_id(&self) -> Option<RpcId> {
        let path = vec![
            "metadata",
            "filter_metadata",
            "envoy.filters.http.mcp",
            "id",
        ];
        self.get_property(path)
            .and_then(|bytes| RpcId::from_property(&bytes))
    }

    fn filters_responses(&self) -> bool {
        true
    }

    fn response_header(&self, name: &str) -> Option<Vec<u8>> {
        self.get_http_response_header_bytes(name)
    }

    fn set_response_header(&self, name: &str, value: Option<&str>) {
        self.set_http_response_header(name, value);
    }

    fn response_body(&self, size: usize) -> Option<Vec<u8>> {
        self.get_http_response_body(0, size)
    }

    fn set_response_body(&self, size: usize, body: &[u8]) {
        self.set_http_response_body(0, size, body);
    }

    fn set_request_header(&self, name: &str, value: Option<&str>) {
        self.set_http_request_header(name, value);
    }

    fn clear_route_cache(&self) {
        // Envoy's proxy-wasm host clears it on every request-header edit already.
    }

    fn dispatch(
        &self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
        timeout_ms: u64,
    ) -> Result<(), String> {
        let timeout = Duration::from_millis(timeout_ms);
        if let Some(stream) = &self.stream
            && headers.contains(&(":path", CHECK_PATH))
        {
            let me: Weak<dyn Waiting> = self.me.clone();
            return stream::send(
                stream,
                self.context_id,
                me,
                body.unwrap_or_default(),
                timeout,
            );
        }
        self.dispatch_http_call(cluster, headers.to_vec(), body, vec![], timeout)
            .map(drop)
            .map_err(|status| format!("{status:?}"))
    }

    fn send_response(&self, status: u32, headers: Vec<(&str, &str)>, body: &[u8]) {
        self.send_http_response(status, headers, Some(body));
    }

    fn resume(&self) {
        self.resume_http_request();
    }

    fn now(&self) -> i64 {
        self.get_current_time()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
    }

    fn count(&self, event: Event) {
        if let Some(id) = self.metrics.as_ref().and_then(|m| m.id(event)) {
            let _ = hostcalls::increment_metric(id, 1);
        }
    }

    fn log(&self, level: lifecycle::Level, message: std::fmt::Arguments<'_>) {
        let level = match level {
            lifecycle::Level::Info => log::Level::Info,
            lifecycle::Level::Warn => log::Level::Warn,
            lifecycle::Level::Error => log::Level::Error,
        };
        log::log!(level, "{message}");
    }
}
