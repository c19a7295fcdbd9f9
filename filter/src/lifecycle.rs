//! The life of one request through the filter, written once for both glues: remove
//! what a client must never send, decide ([`decide::start`]), fetch the JWKS first if
//! a JWT came before any keys, call the policy check, and refuse or forward once it
//! answers ([`decide::finish`]). The proxy-wasm glue (`wasm.rs`) and the dynamic module
//! implement [`Host`] in a few lines each and call [`Lifecycle`]'s two hooks.
//!
//! The hooks take `&self` and keep their state in cells: the dynamic-module ABI may
//! deliver a callout's answer inside the call that starts it, so `on_answer` can run
//! while `on_request_headers` is still on the stack. No cell stays borrowed across
//! [`Host::dispatch`], the one call that can re-enter.

use std::cell::{Cell, RefCell};
use std::fmt;
use std::ops::Deref;

use mcpguard_core::check::{CALLER_HEADER, CHECK_PATH, CHECKED_HEADER, DenyCode};
use mcpguard_core::features::{self, ListFilter, RpcId};
use mcpguard_core::jwt::Keys;
use mcpguard_core::oauth::CHECK_JWKS_PATH;

use crate::config::FilterConfig;
use crate::counters::Event;
use crate::decide::{
    self, ADDRESS_HEADER, Clock, Finish, Forward, Incoming, METADATA_HEADERS, ROUTE_HEADER,
    RawHeaders, Refusal, Start,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Info,
    Warn,
    Error,
}

/// What Envoy's MCP filter (`envoy.filters.http.mcp`) parsed from the JSON-RPC body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum McpField {
    /// `method`.
    Method,
    /// `params.name`: the tool of a `tools/call`, the prompt of a `prompts/get`.
    Tool,
    /// `params.uri`: the resource of a `resources/read`.
    Uri,
}

/// What the request-headers hook tells Envoy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Not ours: Envoy's routes decide (they forward nothing without the route header).
    Continue,
    /// Held, headers and body, until [`Host::resume`]; or answered locally.
    Pause,
}

/// What the lifecycle needs from Envoy, through whichever ABI the glue speaks.
pub trait Host {
    /// How the host holds its JWT verification keys.
    type Keys: Deref<Target = Keys>;

    // State the glue keeps.

    /// `None`: the stream came before a successful configuration; it is refused.
    fn config(&self) -> Option<&FilterConfig>;
    /// The keys known now (`None`: none yet).
    fn keys(&self) -> Option<Self::Keys>;
    /// Whether a JWT that arrives before any keys makes the request fetch the JWKS
    /// (once) and decide again; if not, it is refused `policy_unavailable`.
    fn fetches_keys(&self) -> bool;
    /// Keeps the keys a request fetched, for later requests too.
    fn store_keys(&self, keys: Keys);

    // Calls into Envoy.

    /// Whether the client sent the request header `name`, if the host knows without a
    /// call of its own (`None`: it cannot tell, and the lifecycle acts as if it had).
    fn has_request_header(&self, name: &str) -> Option<bool>;
    /// The headers the decision reads ([`decide::NEEDED_HEADERS`]), as bytes: a client
    /// may send any byte, and proxy-wasm's string getters panic on one not UTF-8.
    fn request_headers(&self) -> RawHeaders;
    fn mcp_metadata(&self, field: McpField) -> Option<String>;
    /// Whether Envoy's MCP filter says the body went past its parse limit
    /// (`is_exceeding_limit`): what it parsed may then miss `method` or `params.name`.
    /// `false` where the host cannot tell.
    fn mcp_exceeding_limit(&self) -> bool {
        false
    }
    /// The JSON-RPC id Envoy's MCP filter parsed (`None`: not known; a blocked item's
    /// JSON-RPC error then carries `null`).
    fn mcp_request_id(&self) -> Option<RpcId> {
        None
    }
    /// `None` removes the header.
    fn set_request_header(&self, name: &str, value: Option<&str>);
    /// Makes Envoy pick the route again after the headers changed; a no-op where
    /// every header edit does so by itself (proxy-wasm).
    fn clear_route_cache(&self);
    /// Starts a callout to the policy service; its answer comes to
    /// [`Lifecycle::on_answer`], possibly before this returns. `Err`: why it did
    /// not start.
    fn dispatch(
        &self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
        timeout_ms: u64,
    ) -> Result<(), String>;
    /// A local reply. The headers come as a `Vec` because proxy-wasm takes one.
    fn send_response(&self, status: u32, headers: Vec<(&str, &str)>, body: &[u8]);
    /// Lets the paused request go on, to the router.
    fn resume(&self);
    /// Unix seconds.
    fn now(&self) -> i64;
    fn count(&self, event: Event);
    fn log(&self, level: Level, message: fmt::Arguments<'_>);

    // The response path, for list replies filtered per caller (feature provisioning).
    // A host without it refuses list requests that need filtering (fail closed).

    /// Whether this host can rewrite response bodies.
    fn filters_responses(&self) -> bool {
        false
    }
    fn response_header(&self, _name: &str) -> Option<Vec<u8>> {
        None
    }
    /// `None` removes the header.
    fn set_response_header(&self, _name: &str, _value: Option<&str>) {}
    /// The response body buffered so far, `size` bytes of it.
    fn response_body(&self, _size: usize) -> Option<Vec<u8>> {
        None
    }
    /// Replaces the whole buffered response body (`size` bytes) with `body`.
    fn set_response_body(&self, _size: usize, _body: &[u8]) {}
}

/// What the callout in flight will answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Pending {
    #[default]
    Nothing,
    Keys,
    Check,
}

/// One request's state.
#[derive(Debug, Default)]
pub struct Lifecycle {
    pending: Cell<Pending>,
    /// This request fetched the JWKS once already: no second attempt.
    fetched_keys: Cell<bool>,
    /// The client's `:path`, kept for rewriting once the check answers.
    path: RefCell<String>,
    request_id: RefCell<Option<String>>,
    /// The JSON-RPC id, for a blocked item's JSON-RPC error.
    rpc_id: RefCell<Option<RpcId>>,
    /// What the reply to this list request may keep.
    list_filter: RefCell<Option<ListFilter>>,
    /// A request to the gateway URL: what the aggregator gets besides the request
    /// ([`decide::to_aggregator`]).
    aggregator: RefCell<Option<decide::ToAggregator>>,
    /// The reply is being filtered: its body is buffered to the end, and its
    /// `content-type` (JSON or SSE) kept.
    filtering: RefCell<Option<Option<String>>>,
}

/// The request headers of the JWKS fetch, which the wasm root context's refresh
/// timer sends too.
pub fn jwks_request(config: &FilterConfig) -> [(&str, &str); 3] {
    [
        (":method", "GET"),
        (":path", CHECK_JWKS_PATH),
        (":authority", &config.policy_authority),
    ]
}

impl Lifecycle {
    pub fn on_request_headers(&self, host: &impl Host) -> Next {
        // Whatever happens next, a client can never choose a forwarding route, or the
        // address Envoy connects to, itself.
        if host.has_request_header(ROUTE_HEADER) != Some(false) {
            host.set_request_header(ROUTE_HEADER, None);
            // Envoy picked (and cached) the route on the client's headers before this
            // filter ran: without picking again, a forged route header on a request
            // this filter passes through would still use a forwarding route.
            host.clear_route_cache();
        }
        // Always, whatever the host knows: the cluster reads it, not the route; and the
        // aggregator trusts the caller and checked headers as the filter's word.
        host.set_request_header(ADDRESS_HEADER, None);
        host.set_request_header(CALLER_HEADER, None);
        host.set_request_header(CHECKED_HEADER, None);
        self.decide(host)
    }

    /// The answer to the callout in flight: `status` is `None` when there was none
    /// (unreachable, timed out, reset). An answer with nothing in flight is ignored, so
    /// no request is carried out twice, nor a refused one resumed.
    pub fn on_answer(&self, host: &impl Host, status: Option<u16>, body: Option<&[u8]>) {
        match self.pending.replace(Pending::Nothing) {
            Pending::Nothing => {}
            Pending::Keys => {
                match (status, Keys::from_jwks(body.unwrap_or_default())) {
                    (Some(200), Ok(keys)) => host.store_keys(keys),
                    (status, parsed) => host.log(
                        Level::Warn,
                        format_args!("JWKS fetch failed (status {status:?}, {:?})", parsed.err()),
                    ),
                }
                if self.decide(host) == Next::Continue {
                    host.resume();
                }
            }
            Pending::Check => {
                let finish = {
                    let request_id = self.request_id.borrow();
                    if let Some(note) = decide::unanswered_check(status, request_id.as_deref()) {
                        host.log(Level::Warn, format_args!("{note}"));
                    }
                    let sidecar = host.config().and_then(|c| c.sidecar.as_ref());
                    let rpc_id = self.rpc_id.borrow();
                    let path = self.path.borrow();
                    match self.aggregator.borrow().as_ref() {
                        Some(to) => decide::finish_gateway(status, body, &path, to),
                        None => decide::finish(status, body, &path, sidecar, rpc_id.as_ref()),
                    }
                };
                match finish {
                    Finish::Forward(forward) => self.forward(host, forward),
                    Finish::Refuse(refusal) => self.refuse(host, refusal),
                }
            }
        }
    }

    /// Reads what the decision needs and acts on it.
    fn decide(&self, host: &impl Host) -> Next {
        let headers = host.request_headers();
        let mcp_method = host.mcp_metadata(McpField::Method);
        let tool = host.mcp_metadata(McpField::Tool);
        let uri = host.mcp_metadata(McpField::Uri);
        self.rpc_id.replace(host.mcp_request_id());
        let incoming = Incoming::from_headers(
            &headers,
            mcp_method.as_deref(),
            tool.as_deref(),
            uri.as_deref(),
            host.mcp_exceeding_limit(),
        );
        self.path.replace(incoming.path.to_owned());
        self.request_id
            .replace(incoming.request_id.map(str::to_owned));
        let Some(config) = host.config() else {
            self.refuse(host, Refusal::new(DenyCode::PolicyUnavailable, None));
            return Next::Pause;
        };
        let keys = host.keys();
        let clock = Clock {
            keys: keys.as_deref(),
            now: host.now(),
        };
        match decide::start(&incoming, config, clock) {
            Start::PassThrough => return Next::Continue,
            Start::Metadata(doc) => {
                host.send_response(200, METADATA_HEADERS.to_vec(), doc.as_bytes());
            }
            Start::Refuse(refusal) => self.refuse(host, refusal),
            Start::NeedKeys if !host.fetches_keys() || self.fetched_keys.get() => {
                self.refuse(host, Refusal::new(DenyCode::PolicyUnavailable, None));
            }
            Start::NeedKeys => {
                self.fetched_keys.set(true);
                self.call(host, config, Pending::Keys, &jwks_request(config), None);
            }
            Start::Check(check) => match serde_json::to_vec(&check) {
                Ok(body) => {
                    self.aggregator
                        .replace(decide::to_aggregator(&check, incoming.path));
                    let headers = [
                        (":method", "POST"),
                        (":path", CHECK_PATH),
                        (":authority", config.policy_authority.as_str()),
                        ("content-type", "application/json"),
                    ];
                    self.call(host, config, Pending::Check, &headers, Some(&body));
                }
                Err(e) => {
                    host.log(
                        Level::Error,
                        format_args!("cannot encode check request: {e}"),
                    );
                    self.refuse(host, Refusal::new(DenyCode::PolicyUnavailable, None));
                }
            },
        }
        // Paused until the callout answers; the body waits in Envoy's buffer.
        Next::Pause
    }

    fn call(
        &self,
        host: &impl Host,
        config: &FilterConfig,
        pending: Pending,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) {
        // Set before the call: its answer may arrive inside it.
        self.pending.set(pending);
        let started = host.dispatch(
            &config.policy_cluster,
            headers,
            body,
            config.check_timeout_ms,
        );
        // Not started, and not answered inside the call either (that answer would have
        // been carried out already, and may have started the next callout).
        if let Err(why) = started
            && self.pending.get() == pending
        {
            self.pending.set(Pending::Nothing);
            let what = match pending {
                Pending::Keys => "JWKS",
                _ => "check",
            };
            host.log(
                Level::Error,
                format_args!(
                    "{what} callout to cluster {:?} failed to start: {why}",
                    config.policy_cluster
                ),
            );
            self.refuse(host, Refusal::new(DenyCode::PolicyUnavailable, None));
        }
    }

    fn forward(&self, host: &impl Host, mut forward: Forward) {
        if let Some(filter) = forward.list_filter.take() {
            if !host.filters_responses() {
                host.log(
                    Level::Warn,
                    format_args!("this host cannot filter list replies; refusing"),
                );
                self.refuse(host, Refusal::new(DenyCode::PolicyUnavailable, None));
                return;
            }
            self.list_filter.replace(Some(filter));
        }
        for (name, value) in forward.header_edits() {
            host.set_request_header(name, value);
        }
        host.clear_route_cache();
        host.count(Event::Allowed);
        host.resume();
    }

    /// The response headers of a request that was forwarded: a list reply to filter
    /// (status 200) loses its `content-length`, since its body will change.
    pub fn on_response_headers(&self, host: &impl Host) {
        if self.list_filter.borrow().is_none() {
            return;
        }
        if host.response_header(":status").as_deref() != Some(b"200") {
            return;
        }
        let content_type = host
            .response_header("content-type")
            .and_then(|v| String::from_utf8(v).ok());
        host.set_response_header("content-length", None);
        self.filtering.replace(Some(content_type));
    }

    /// A chunk of the response body (`size`: all of it buffered so far). A filtered
    /// reply is held to its end, then rewritten once; anything else passes.
    pub fn on_response_body(&self, host: &impl Host, size: usize, end_of_stream: bool) -> Next {
        let filtering = self.filtering.borrow();
        let (Some(content_type), Some(filter)) =
            (filtering.as_ref(), self.list_filter.borrow().clone())
        else {
            return Next::Continue;
        };
        if !end_of_stream {
            return Next::Pause;
        }
        let body = host.response_body(size).unwrap_or_default();
        let filtered = filter
            .filter_body(content_type.as_deref(), &body)
            .unwrap_or_else(|| {
                host.log(
                    Level::Warn,
                    format_args!(
                        "a {} reply did not parse; replaced by an error",
                        filter.kind.list_method()
                    ),
                );
                let error = features::unfilterable_reply();
                let sse = content_type
                    .as_deref()
                    .is_some_and(|c| c.starts_with("text/event-stream"));
                if sse {
                    format!("event: message\ndata: {error}\n\n").into_bytes()
                } else {
                    error.into_bytes()
                }
            });
        host.set_response_body(size, &filtered);
        Next::Continue
    }

    fn refuse(&self, host: &impl Host, refusal: Refusal) {
        host.log(
            Level::Info,
            format_args!(
                "{}",
                refusal.log_line(&self.path.borrow(), self.request_id.borrow().as_deref())
            ),
        );
        host.count(Event::Denied(refusal.code));
        let headers = refusal
            .headers
            .iter()
            .map(|(n, v)| (*n, v.as_str()))
            .collect();
        host.send_response(refusal.status(), headers, refusal.body.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    //! The lifecycle against a fake host that records what it was asked to do. The
    //! tests assert outcomes a user relies on (what was answered, forwarded, counted,
    //! and that the client's route and address headers went first), not the order of
    //! every call.

    use std::collections::VecDeque;
    use std::rc::Rc;

    use mcpguard_core::check::{CheckResponse, Scheme, Upstream};
    use mcpguard_core::jwt::testing;
    use mcpguard_core::token::{TokenHash, TokenKind, format_token};

    use super::*;

    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Call {
        ClearRouteCache,
        Set(String, Option<String>),
        Dispatch {
            cluster: String,
            path: String,
            body: Option<String>,
        },
        Respond(u32, String),
        Resume,
        Count(Event),
        StoreKeys,
    }

    /// How the fake host answers the next dispatch.
    enum Callout {
        /// Started; the test delivers the answer later.
        Later,
        /// Did not start.
        NotStarted,
        /// Answered inside the dispatch call, which then returns `started`.
        Inline {
            status: Option<u16>,
            body: Vec<u8>,
            started: bool,
        },
    }

    struct Fake<'a> {
        lifecycle: &'a Lifecycle,
        config: Option<FilterConfig>,
        keys: RefCell<Option<Rc<Keys>>>,
        fetches_keys: bool,
        /// The client's headers.
        headers: Vec<(&'static str, Vec<u8>)>,
        /// Like the dynamic module (it sees all headers at once) rather than proxy-wasm
        /// (which removes without knowing).
        knows_headers: bool,
        callouts: RefCell<VecDeque<Callout>>,
        calls: RefCell<Vec<Call>>,
        logs: RefCell<Vec<(Level, String)>>,
    }

    fn api_token() -> String {
        format_token(TokenKind::HostApi, &"a".repeat(40)).unwrap()
    }

    fn config(json: &str) -> FilterConfig {
        FilterConfig::parse(json.as_bytes()).unwrap()
    }

    impl<'a> Fake<'a> {
        fn new(lifecycle: &'a Lifecycle, authorization: Option<&str>) -> Self {
            let mut headers = vec![
                (":path", b"/mcp/eng/github/sub?q=1".to_vec()),
                (":scheme", b"http".to_vec()),
                (":authority", b"gw.local:10000".to_vec()),
                ("x-request-id", b"rid-1".to_vec()),
            ];
            if let Some(a) = authorization {
                headers.push(("authorization", a.as_bytes().to_vec()));
            }
            Fake {
                lifecycle,
                config: Some(config(r#"{"policy_cluster":"policy"}"#)),
                keys: RefCell::default(),
                fetches_keys: true,
                headers,
                knows_headers: false,
                callouts: RefCell::default(),
                calls: RefCell::default(),
                logs: RefCell::default(),
            }
        }

        fn with_token(lifecycle: &'a Lifecycle) -> Self {
            Fake::new(lifecycle, Some(&*format!("Bearer {}", api_token())))
        }

        fn callout(self, callout: Callout) -> Self {
            self.callouts.borrow_mut().push_back(callout);
            self
        }

        fn record(&self, call: Call) {
            self.calls.borrow_mut().push(call);
        }

        fn calls(&self) -> Vec<Call> {
            self.calls.borrow().clone()
        }

        fn count_of(&self, wanted: impl Fn(&Call) -> bool) -> usize {
            self.calls.borrow().iter().filter(|c| wanted(c)).count()
        }

        fn responses(&self) -> Vec<(u32, String)> {
            self.calls
                .borrow()
                .iter()
                .filter_map(|c| match c {
                    Call::Respond(status, body) => Some((*status, body.clone())),
                    _ => None,
                })
                .collect()
        }

        fn dispatched_paths(&self) -> Vec<String> {
            self.calls
                .borrow()
                .iter()
                .filter_map(|c| match c {
                    Call::Dispatch { path, .. } => Some(path.clone()),
                    _ => None,
                })
                .collect()
        }

        fn resumes(&self) -> usize {
            self.count_of(|c| *c == Call::Resume)
        }

        /// The one refusal sent, by code; no resume.
        fn refused(&self) -> DenyCode {
            let responses = self.responses();
            assert_eq!(responses.len(), 1, "{:?}", self.calls());
            assert_eq!(self.resumes(), 0, "a refused request never goes on");
            let body: serde_json::Value = serde_json::from_str(&responses[0].1).unwrap();
            let code: DenyCode = serde_json::from_value(body["error"]["code"].clone()).unwrap();
            assert_eq!(responses[0].0, u32::from(code.status()));
            assert!(self.calls().contains(&Call::Count(Event::Denied(code))));
            code
        }

        /// Forwarded once, to the judged upstream, and counted.
        fn assert_forwarded(&self) {
            let calls = self.calls();
            assert_eq!(self.resumes(), 1, "{calls:?}");
            assert!(self.responses().is_empty(), "{calls:?}");
            assert_eq!(self.count_of(|c| *c == Call::Count(Event::Allowed)), 1);
            let set = |name: &str| {
                calls.iter().rev().find_map(|c| match c {
                    Call::Set(n, v) if n == name => Some(v.clone()),
                    _ => None,
                })
            };
            assert_eq!(set(ADDRESS_HEADER), Some(Some("127.0.0.1:9100".into())));
            assert_eq!(set(":path"), Some(Some("/mcp/sub?q=1".into())));
            assert_eq!(set("authorization"), Some(None), "the client's token stays");
            // The route header is the last edit before the route is picked again.
            let route = calls
                .iter()
                .rposition(|c| *c == Call::Set(ROUTE_HEADER.into(), Some("http".into())))
                .unwrap();
            assert!(
                matches!(calls[route + 1], Call::ClearRouteCache),
                "{calls:?}"
            );
            assert!(
                calls[route + 1..]
                    .iter()
                    .all(|c| !matches!(c, Call::Set(..)))
            );
        }
    }

    impl Host for Fake<'_> {
        type Keys = Rc<Keys>;

        fn config(&self) -> Option<&FilterConfig> {
            self.config.as_ref()
        }
        fn keys(&self) -> Option<Rc<Keys>> {
            self.keys.borrow().clone()
        }
        fn fetches_keys(&self) -> bool {
            self.fetches_keys
        }
        fn store_keys(&self, keys: Keys) {
            self.record(Call::StoreKeys);
            *self.keys.borrow_mut() = Some(Rc::new(keys));
        }
        fn has_request_header(&self, name: &str) -> Option<bool> {
            let sent = self.headers.iter().any(|(n, _)| *n == name);
            self.knows_headers.then_some(sent)
        }
        fn request_headers(&self) -> RawHeaders {
            RawHeaders::from_pairs(&self.headers)
        }
        fn mcp_metadata(&self, field: McpField) -> Option<String> {
            (field == McpField::Method).then(|| "tools/call".into())
        }
        fn set_request_header(&self, name: &str, value: Option<&str>) {
            self.record(Call::Set(name.into(), value.map(str::to_owned)));
        }
        fn clear_route_cache(&self) {
            self.record(Call::ClearRouteCache);
        }
        fn dispatch(
            &self,
            cluster: &str,
            headers: &[(&str, &str)],
            body: Option<&[u8]>,
            _timeout_ms: u64,
        ) -> Result<(), String> {
            let path = headers.iter().find(|(n, _)| *n == ":path").unwrap().1;
            self.record(Call::Dispatch {
                cluster: cluster.into(),
                path: path.into(),
                body: body.map(|b| String::from_utf8(b.to_vec()).unwrap()),
            });
            let next = self.callouts.borrow_mut().pop_front();
            match next.unwrap_or(Callout::Later) {
                Callout::Later => Ok(()),
                Callout::NotStarted => Err("no healthy upstream".into()),
                Callout::Inline {
                    status,
                    body,
                    started,
                } => {
                    self.lifecycle.on_answer(self, status, Some(&body));
                    if started {
                        Ok(())
                    } else {
                        Err("answered at once".into())
                    }
                }
            }
        }
        fn send_response(&self, status: u32, _headers: Vec<(&str, &str)>, body: &[u8]) {
            self.record(Call::Respond(
                status,
                String::from_utf8(body.to_vec()).unwrap(),
            ));
        }
        fn resume(&self) {
            self.record(Call::Resume);
        }
        fn now(&self) -> i64 {
            1_500
        }
        fn count(&self, event: Event) {
            self.record(Call::Count(event));
        }
        fn log(&self, level: Level, message: fmt::Arguments<'_>) {
            self.logs.borrow_mut().push((level, message.to_string()));
        }
    }

    fn allow(address: Option<&str>) -> Vec<u8> {
        serde_json::to_vec(&CheckResponse::Allow {
            upstream: Upstream {
                scheme: Scheme::Http,
                authority: "mcp.example:9100".into(),
                base_path: "/mcp".into(),
                address: address.map(str::to_owned),
            },
            inject: None,
            list_filter: None,
        })
        .unwrap()
    }

    fn allowed() -> Vec<u8> {
        allow(Some("127.0.0.1:9100"))
    }

    fn deny(code: &str) -> Vec<u8> {
        format!(r#"{{"decision":"deny","code":"{code}"}}"#).into_bytes()
    }

    #[test]
    fn the_clients_route_and_address_headers_go_before_anything_else() {
        // proxy-wasm: cannot tell what was sent without a call, so removes both.
        let l = Lifecycle::default();
        let host = Fake::with_token(&l);
        l.on_request_headers(&host);
        assert_eq!(
            host.calls()[..5],
            [
                Call::Set(ROUTE_HEADER.into(), None),
                Call::ClearRouteCache,
                Call::Set(ADDRESS_HEADER.into(), None),
                Call::Set(CALLER_HEADER.into(), None),
                Call::Set(CHECKED_HEADER.into(), None),
            ]
        );
        // The dynamic module: sees every header, and removes the route header and picks
        // the route again only when a forged one was there; the address header goes
        // whether or not it saw one.
        for forged in [false, true] {
            let l = Lifecycle::default();
            let mut host = Fake::with_token(&l);
            host.knows_headers = true;
            if forged {
                host.headers.push((ROUTE_HEADER, b"http".to_vec()));
            }
            l.on_request_headers(&host);
            let mut first = vec![
                Call::Set(ADDRESS_HEADER.into(), None),
                Call::Set(CALLER_HEADER.into(), None),
                Call::Set(CHECKED_HEADER.into(), None),
            ];
            if forged {
                first.splice(
                    0..0,
                    [Call::Set(ROUTE_HEADER.into(), None), Call::ClearRouteCache],
                );
            }
            assert_eq!(host.calls()[..first.len()], first[..], "forged {forged}");
            assert!(matches!(host.calls()[first.len()], Call::Dispatch { .. }));
        }
        // Even on a path this filter does not handle.
        let l = Lifecycle::default();
        let mut host = Fake::new(&l, None);
        host.headers[0].1 = b"/healthz".to_vec();
        assert_eq!(l.on_request_headers(&host), Next::Continue);
        assert_eq!(
            host.calls(),
            [
                Call::Set(ROUTE_HEADER.into(), None),
                Call::ClearRouteCache,
                Call::Set(ADDRESS_HEADER.into(), None),
                Call::Set(CALLER_HEADER.into(), None),
                Call::Set(CHECKED_HEADER.into(), None),
            ]
        );
    }

    #[test]
    fn no_token_and_bad_tokens_are_refused_without_a_callout() {
        let admin = format_token(TokenKind::Admin, &"a".repeat(40)).unwrap();
        for (authorization, code) in [
            (None, DenyCode::TokenMissing),
            (Some("Bearer garbage".to_owned()), DenyCode::TokenMalformed),
            (Some(format!("Bearer {admin}")), DenyCode::TokenUnknown),
        ] {
            let l = Lifecycle::default();
            let host = Fake::new(&l, authorization.as_deref());
            assert_eq!(l.on_request_headers(&host), Next::Pause);
            assert_eq!(host.refused(), code);
            assert!(host.dispatched_paths().is_empty());
            let logs = host.logs.borrow();
            assert!(
                logs.iter().any(|(level, line)| *level == Level::Info
                    && line.starts_with("refused 401 /mcp/eng/github/sub ")
                    && line.ends_with("request_id=rid-1")),
                "{logs:?}"
            );
        }
        // Not configured: refused too.
        let l = Lifecycle::default();
        let mut host = Fake::with_token(&l);
        host.config = None;
        l.on_request_headers(&host);
        assert_eq!(host.refused(), DenyCode::PolicyUnavailable);
    }

    #[test]
    fn a_check_answered_allow_forwards_once_toward_the_judged_address() {
        let l = Lifecycle::default();
        let host = Fake::with_token(&l);
        assert_eq!(l.on_request_headers(&host), Next::Pause);
        let dispatch = host
            .calls()
            .into_iter()
            .find(|c| matches!(c, Call::Dispatch { .. }))
            .unwrap();
        let Call::Dispatch {
            cluster,
            path,
            body,
        } = dispatch
        else {
            unreachable!()
        };
        assert_eq!((cluster.as_str(), path.as_str()), ("policy", CHECK_PATH));
        let body = body.unwrap();
        assert!(body.contains(&TokenHash::of(&api_token()).to_hex()));
        assert!(
            !body.contains(&api_token()),
            "the token itself never leaves"
        );
        assert!(body.contains("tools/call"));
        assert_eq!(host.resumes(), 0, "nothing goes on before the answer");

        l.on_answer(&host, Some(200), Some(&allowed()));
        host.assert_forwarded();
        // A second answer (there is none in flight) changes nothing.
        let before = host.calls();
        l.on_answer(&host, Some(200), Some(&allowed()));
        l.on_answer(&host, Some(200), Some(&deny("host_disabled")));
        assert_eq!(host.calls(), before);
    }

    #[test]
    fn the_gateway_url_goes_to_the_aggregator_with_the_callers_credential() {
        let l = Lifecycle::default();
        let mut host = Fake::with_token(&l);
        host.headers[0].1 = b"/mcp/eng".to_vec();
        // A client's own caller header is gone before anything else happens.
        host.headers
            .push((CALLER_HEADER, b"{\"kind\":\"api_token\"}".to_vec()));
        assert_eq!(l.on_request_headers(&host), Next::Pause);
        assert!(host.calls()[..5].contains(&Call::Set(CALLER_HEADER.into(), None)));
        let gateway = br#"{"decision":"gateway","servers":["a","b"]}"#;
        l.on_answer(&host, Some(200), Some(gateway));
        let calls = host.calls();
        assert_eq!(host.resumes(), 1, "{calls:?}");
        let caller = format!(
            r#"{{"kind":"api_token","hash":"{}"}}"#,
            TokenHash::of(&api_token()).to_hex()
        );
        let edits: Vec<_> = calls
            .iter()
            .filter_map(|c| match c {
                Call::Set(n, v) => Some((n.as_str(), v.as_deref())),
                _ => None,
            })
            .skip(4)
            .collect();
        assert_eq!(
            edits,
            [
                (":path", Some("/mcp/eng")),
                ("authorization", None),
                (CALLER_HEADER, Some(caller.as_str())),
                (ROUTE_HEADER, Some("aggregator")),
            ]
        );
        // A server's answer to it is no answer.
        let l = Lifecycle::default();
        let mut host = Fake::with_token(&l);
        host.headers[0].1 = b"/mcp/eng".to_vec();
        l.on_request_headers(&host);
        l.on_answer(&host, Some(200), Some(&allowed()));
        assert_eq!(host.refused(), DenyCode::PolicyUnavailable);
    }

    #[test]
    fn a_sidecar_forwards_to_its_own_cluster_whatever_the_answer_names() {
        let l = Lifecycle::default();
        let mut host = Fake::with_token(&l);
        host.headers[0].1 = b"/mcp/eng/demo/sub?q=1".to_vec();
        host.config = Some(config(
            r#"{"policy_cluster":"policy","sidecar":{"server":"demo"}}"#,
        ));
        l.on_request_headers(&host);
        let Some(Call::Dispatch { body, .. }) = host
            .calls()
            .into_iter()
            .find(|c| matches!(c, Call::Dispatch { .. }))
        else {
            panic!("expected a check: {:?}", host.calls());
        };
        assert!(body.unwrap().contains(r#""server":"demo""#));
        l.on_answer(&host, Some(200), Some(&allowed()));
        assert_eq!(host.resumes(), 1);
        let set: Vec<_> = host
            .calls()
            .into_iter()
            .filter_map(|c| match c {
                Call::Set(name, Some(value)) => Some((name, value)),
                _ => None,
            })
            .collect();
        assert_eq!(
            set,
            [
                (":path".to_owned(), "/mcp/sub?q=1".to_owned()),
                (ROUTE_HEADER.to_owned(), "sidecar".to_owned()),
            ],
            "no :authority and no address from the answer"
        );
        assert_eq!(host.calls().last(), Some(&Call::Resume));
    }

    #[test]
    fn a_check_answered_deny_is_refused_with_its_code() {
        let l = Lifecycle::default();
        let host = Fake::with_token(&l);
        l.on_request_headers(&host);
        l.on_answer(&host, Some(200), Some(&deny("host_disabled")));
        assert_eq!(host.refused(), DenyCode::HostDisabled);
        assert!(
            !host
                .calls()
                .iter()
                .any(|c| matches!(c, Call::Set(_, Some(_)))),
            "no rewrite toward an upstream"
        );
    }

    #[test]
    fn no_answer_or_a_bad_one_fails_closed() {
        for (status, body) in [
            (None, None),
            (Some(500), Some(allowed())),
            (Some(200), Some(b"{".to_vec())),
            // An allow without an address judged for it.
            (Some(200), Some(allow(None))),
            (Some(200), Some(allow(Some("mcp.example:9100")))),
        ] {
            let l = Lifecycle::default();
            let host = Fake::with_token(&l);
            l.on_request_headers(&host);
            l.on_answer(&host, status, body.as_deref());
            assert_eq!(host.refused(), DenyCode::PolicyUnavailable, "{status:?}");
        }
        // No answer at all is logged as such.
        let l = Lifecycle::default();
        let host = Fake::with_token(&l);
        l.on_request_headers(&host);
        l.on_answer(&host, None, None);
        assert!(
            host.logs
                .borrow()
                .iter()
                .any(|(level, line)| *level == Level::Warn && line.contains("answered nothing"))
        );
    }

    #[test]
    fn a_callout_that_cannot_start_is_refused_503() {
        let l = Lifecycle::default();
        let host = Fake::with_token(&l).callout(Callout::NotStarted);
        l.on_request_headers(&host);
        assert_eq!(host.refused(), DenyCode::PolicyUnavailable);
        assert!(
            host.logs
                .borrow()
                .iter()
                .any(|(level, line)| *level == Level::Error
                    && line.contains(r#"check callout to cluster "policy" failed to start"#))
        );
        // A late answer (Envoy would not send one) is ignored.
        l.on_answer(&host, Some(200), Some(&allowed()));
        assert_eq!(host.resumes(), 0);
    }

    #[test]
    fn an_answer_inside_the_dispatch_call_is_carried_out_exactly_once() {
        // Whether the call then reports the callout started or not.
        for started in [true, false] {
            let l = Lifecycle::default();
            let host = Fake::with_token(&l).callout(Callout::Inline {
                status: Some(200),
                body: allowed(),
                started,
            });
            assert_eq!(l.on_request_headers(&host), Next::Pause);
            host.assert_forwarded();

            let l = Lifecycle::default();
            let host = Fake::with_token(&l).callout(Callout::Inline {
                status: Some(200),
                body: deny("token_revoked"),
                started,
            });
            l.on_request_headers(&host);
            // Refused once: not a second 503 for the "failed" start.
            assert_eq!(host.refused(), DenyCode::TokenRevoked, "started {started}");

            let l = Lifecycle::default();
            let host = Fake::with_token(&l).callout(Callout::Inline {
                status: None,
                body: Vec::new(),
                started,
            });
            l.on_request_headers(&host);
            assert_eq!(host.refused(), DenyCode::PolicyUnavailable);
        }
    }

    fn oauth_config() -> FilterConfig {
        config(r#"{"policy_cluster":"policy","issuer":"http://as"}"#)
    }

    /// A JWT for `/mcp/eng/github` at `gw.local:10000`, and the JWKS that verifies it.
    fn jwt() -> (String, Vec<u8>) {
        let (key, jwks) = testing::key(3, "k1");
        let mut claims = testing::claims();
        claims.iss = "http://as".into();
        (
            testing::sign(&key, "k1", &claims),
            serde_json::to_vec(&jwks).unwrap(),
        )
    }

    fn jwt_host<'a>(l: &'a Lifecycle, jwt: &str) -> Fake<'a> {
        let mut host = Fake::new(l, Some(&*format!("Bearer {jwt}")));
        host.config = Some(oauth_config());
        host
    }

    #[test]
    fn a_jwt_before_any_keys_fetches_them_then_decides_again() {
        let (jwt, jwks) = jwt();
        let l = Lifecycle::default();
        let host = jwt_host(&l, &jwt);
        assert_eq!(l.on_request_headers(&host), Next::Pause);
        assert_eq!(host.dispatched_paths(), [CHECK_JWKS_PATH]);
        assert!(host.responses().is_empty(), "the token is not at fault");

        l.on_answer(&host, Some(200), Some(&jwks));
        assert!(
            host.calls().contains(&Call::StoreKeys),
            "kept for later requests"
        );
        assert_eq!(host.dispatched_paths(), [CHECK_JWKS_PATH, CHECK_PATH]);
        let check = host.calls().into_iter().rev().find_map(|c| match c {
            Call::Dispatch { body, .. } => body,
            _ => None,
        });
        assert!(check.unwrap().contains(r#""kind":"oauth""#));
        l.on_answer(&host, Some(200), Some(&allowed()));
        host.assert_forwarded();

        // The next request has the keys: straight to the check.
        let next = Lifecycle::default();
        let mut host2 = jwt_host(&next, &jwt);
        host2.keys = RefCell::new(host.keys());
        next.on_request_headers(&host2);
        assert_eq!(host2.dispatched_paths(), [CHECK_PATH]);
    }

    #[test]
    fn keys_still_missing_after_the_one_fetch_refuse_503() {
        let (jwt, jwks) = jwt();
        for (status, body) in [
            (Some(503), jwks.clone()),
            (None, Vec::new()),
            (Some(200), b"{}".to_vec()),
        ] {
            let l = Lifecycle::default();
            let host = jwt_host(&l, &jwt);
            l.on_request_headers(&host);
            l.on_answer(&host, status, Some(&body));
            assert_eq!(host.refused(), DenyCode::PolicyUnavailable);
            assert_eq!(host.dispatched_paths(), [CHECK_JWKS_PATH], "one fetch only");
        }
        // Answered inside the dispatch call, then the check too.
        let l = Lifecycle::default();
        let host = jwt_host(&l, &jwt)
            .callout(Callout::Inline {
                status: Some(200),
                body: jwks,
                started: false,
            })
            .callout(Callout::Inline {
                status: Some(200),
                body: allowed(),
                started: true,
            });
        l.on_request_headers(&host);
        assert_eq!(host.dispatched_paths(), [CHECK_JWKS_PATH, CHECK_PATH]);
        host.assert_forwarded();
        // The fetch cannot start: refused.
        let l = Lifecycle::default();
        let host = jwt_host(&l, &jwt).callout(Callout::NotStarted);
        l.on_request_headers(&host);
        assert_eq!(host.refused(), DenyCode::PolicyUnavailable);
    }

    #[test]
    fn a_host_with_keys_from_config_only_refuses_a_jwt_before_keys() {
        let (jwt, _) = jwt();
        let l = Lifecycle::default();
        let mut host = jwt_host(&l, &jwt);
        host.fetches_keys = false;
        l.on_request_headers(&host);
        assert_eq!(host.refused(), DenyCode::PolicyUnavailable);
        assert!(host.dispatched_paths().is_empty());
    }

    #[test]
    fn protected_resource_metadata_is_answered_locally() {
        let l = Lifecycle::default();
        let mut host = Fake::new(&l, None);
        host.config = Some(oauth_config());
        host.headers[0].1 = b"/.well-known/oauth-protected-resource/mcp/eng/github".to_vec();
        assert_eq!(l.on_request_headers(&host), Next::Pause);
        let responses = host.responses();
        assert_eq!(responses.len(), 1);
        assert_eq!(responses[0].0, 200);
        assert!(
            responses[0]
                .1
                .contains("http://gw.local:10000/mcp/eng/github")
        );
        assert!(host.dispatched_paths().is_empty());
    }
}

#[cfg(test)]
mod response_tests {
    //! The response path (list replies filtered per caller) and blocked items, through
    //! the whole lifecycle against a small host that keeps a response.

    use std::cell::RefCell;

    use mcpguard_core::check::{CheckResponse, Scheme, Upstream};
    use mcpguard_core::features::{Item, Kind, ListFilter, definition_hash};
    use mcpguard_core::token::{TokenKind, format_token};
    use serde_json::{Value, json};

    use super::*;

    struct Host2 {
        config: FilterConfig,
        method: &'static str,
        id: Option<RpcId>,
        filters: bool,
        response_headers: RefCell<Vec<(String, Option<String>)>>,
        body: RefCell<Vec<u8>>,
        sent: RefCell<Option<(u32, String)>>,
        resumed: RefCell<bool>,
    }

    impl Host2 {
        fn new(method: &'static str, content_type: &str) -> Self {
            Host2 {
                config: FilterConfig::parse(br#"{"policy_cluster":"policy"}"#).unwrap(),
                method,
                id: Some(RpcId::Number(7.0)),
                filters: true,
                response_headers: RefCell::new(vec![
                    (":status".into(), Some("200".into())),
                    ("content-type".into(), Some(content_type.into())),
                    ("content-length".into(), Some("999".into())),
                ]),
                body: RefCell::default(),
                sent: RefCell::default(),
                resumed: RefCell::default(),
            }
        }
    }

    impl Host for Host2 {
        type Keys = std::rc::Rc<Keys>;
        fn config(&self) -> Option<&FilterConfig> {
            Some(&self.config)
        }
        fn keys(&self) -> Option<Self::Keys> {
            None
        }
        fn fetches_keys(&self) -> bool {
            false
        }
        fn store_keys(&self, _keys: Keys) {}
        fn has_request_header(&self, _name: &str) -> Option<bool> {
            Some(false)
        }
        fn request_headers(&self) -> RawHeaders {
            let token = format!(
                "Bearer {}",
                format_token(TokenKind::HostApi, &"a".repeat(40)).unwrap()
            );
            RawHeaders::from_pairs(&[(":path", "/mcp/eng/demo"), ("authorization", &token)])
        }
        fn mcp_metadata(&self, field: McpField) -> Option<String> {
            match field {
                McpField::Method => Some(self.method.into()),
                McpField::Tool => Some("whoami".into()),
                McpField::Uri => None,
            }
        }
        fn mcp_request_id(&self) -> Option<RpcId> {
            self.id.clone()
        }
        fn set_request_header(&self, _name: &str, _value: Option<&str>) {}
        fn clear_route_cache(&self) {}
        fn dispatch(
            &self,
            _cluster: &str,
            _headers: &[(&str, &str)],
            _body: Option<&[u8]>,
            _timeout_ms: u64,
        ) -> Result<(), String> {
            Ok(())
        }
        fn send_response(&self, status: u32, _headers: Vec<(&str, &str)>, body: &[u8]) {
            *self.sent.borrow_mut() = Some((status, String::from_utf8(body.to_vec()).unwrap()));
        }
        fn resume(&self) {
            *self.resumed.borrow_mut() = true;
        }
        fn now(&self) -> i64 {
            0
        }
        fn count(&self, _event: Event) {}
        fn log(&self, _level: Level, _message: fmt::Arguments<'_>) {}
        fn filters_responses(&self) -> bool {
            self.filters
        }
        fn response_header(&self, name: &str) -> Option<Vec<u8>> {
            self.response_headers
                .borrow()
                .iter()
                .find(|(n, _)| n == name)
                .and_then(|(_, v)| v.clone())
                .map(String::into_bytes)
        }
        fn set_response_header(&self, name: &str, value: Option<&str>) {
            for (n, v) in self.response_headers.borrow_mut().iter_mut() {
                if n == name {
                    *v = value.map(str::to_owned);
                }
            }
        }
        fn response_body(&self, size: usize) -> Option<Vec<u8>> {
            Some(self.body.borrow()[..size].to_vec())
        }
        fn set_response_body(&self, size: usize, body: &[u8]) {
            assert_eq!(size, self.body.borrow().len());
            *self.body.borrow_mut() = body.to_vec();
        }
    }

    fn allow(list_filter: Option<ListFilter>) -> Vec<u8> {
        serde_json::to_vec(&CheckResponse::Allow {
            upstream: Upstream {
                scheme: Scheme::Http,
                authority: "mcp.example:9100".into(),
                base_path: "/mcp".into(),
                address: Some("127.0.0.1:9100".into()),
            },
            inject: None,
            list_filter,
        })
        .unwrap()
    }

    fn echo() -> Value {
        json!({"name": "echo", "description": "Echo", "inputSchema": {"type": "object"}})
    }

    fn only_echo() -> ListFilter {
        ListFilter {
            kind: Kind::Tools,
            allowed: vec![Item {
                name: "echo".into(),
                hash: definition_hash(Kind::Tools, &echo()),
            }],
        }
    }

    #[test]
    fn a_list_reply_is_held_to_its_end_and_filtered_once() {
        let host = Host2::new("tools/list", "text/event-stream");
        let life = Lifecycle::default();
        assert_eq!(life.on_request_headers(&host), Next::Pause);
        life.on_answer(&host, Some(200), Some(&allow(Some(only_echo()))));
        assert!(*host.resumed.borrow());
        life.on_response_headers(&host);
        assert_eq!(host.response_header("content-length"), None);
        let reply =
            json!({"jsonrpc": "2.0", "id": 7, "result": {"tools": [echo(), {"name": "whoami"}]}});
        let body = format!("event: message\ndata: {reply}\n\n");
        let (first, rest) = body.split_at(10);
        host.body.borrow_mut().extend_from_slice(first.as_bytes());
        assert_eq!(
            life.on_response_body(&host, first.len(), false),
            Next::Pause
        );
        host.body.borrow_mut().extend_from_slice(rest.as_bytes());
        assert_eq!(
            life.on_response_body(&host, body.len(), true),
            Next::Continue
        );
        let out = String::from_utf8(host.body.borrow().clone()).unwrap();
        assert!(out.contains("\"echo\""), "{out}");
        assert!(!out.contains("whoami"), "{out}");
    }

    #[test]
    fn an_unreadable_list_reply_never_reaches_the_client_unfiltered() {
        let host = Host2::new("tools/list", "application/json");
        let life = Lifecycle::default();
        life.on_request_headers(&host);
        life.on_answer(&host, Some(200), Some(&allow(Some(only_echo()))));
        life.on_response_headers(&host);
        *host.body.borrow_mut() = b"{\"tools\": [\"whoami\"".to_vec();
        let size = host.body.borrow().len();
        life.on_response_body(&host, size, true);
        let out: Value = serde_json::from_slice(&host.body.borrow()).unwrap();
        assert_eq!(out["error"]["code"], -32603, "{out}");
    }

    #[test]
    fn replies_without_a_filter_pass_untouched() {
        let host = Host2::new("tools/call", "application/json");
        let life = Lifecycle::default();
        life.on_request_headers(&host);
        life.on_answer(&host, Some(200), Some(&allow(None)));
        life.on_response_headers(&host);
        assert_eq!(
            host.response_header("content-length"),
            Some(b"999".to_vec())
        );
        assert_eq!(life.on_response_body(&host, 0, false), Next::Continue);
    }

    #[test]
    fn a_host_that_cannot_filter_refuses_instead_of_passing_the_list() {
        let mut host = Host2::new("tools/list", "application/json");
        host.filters = false;
        let life = Lifecycle::default();
        life.on_request_headers(&host);
        life.on_answer(&host, Some(200), Some(&allow(Some(only_echo()))));
        assert!(!*host.resumed.borrow());
        assert_eq!(host.sent.borrow().as_ref().unwrap().0, 503);
    }

    #[test]
    fn a_blocked_item_is_a_json_rpc_error_with_the_request_id() {
        let host = Host2::new("tools/call", "application/json");
        let life = Lifecycle::default();
        life.on_request_headers(&host);
        life.on_answer(
            &host,
            Some(200),
            Some(br#"{"decision":"deny","code":"tool_blocked"}"#),
        );
        let (status, body) = host.sent.borrow().clone().unwrap();
        assert_eq!(status, 200);
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["id"], 7);
        assert_eq!(v["error"]["data"]["code"], "tool_blocked");
        assert!(!*host.resumed.borrow());
    }
}
