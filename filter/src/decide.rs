//! What the filter does with a request, as plain functions of what Envoy hands it.
//! `lifecycle` carries them out over a host; the glues (`wasm.rs`, the dynamic module)
//! only move data between Envoy and it.

use mcpguard_core::check::{
    Body, CALLER_HEADER, CHECKED_HEADER, CheckRequest, CheckResponse, Checked, Credential,
    DenyCode, bounded_request_id,
};
use mcpguard_core::features::{self, Kind, ListFilter, RpcId};
use mcpguard_core::names::Naming;
use mcpguard_core::route::{McpPath, PathError, gateway_url};
use mcpguard_core::token::{TokenHash, data_plane_kind};

use crate::config::{FilterConfig, Sidecar};
use mcpguard_core::jwt::{self, Keys};

/// Set by the filter on requests it authorised; Envoy's forwarding routes match on it.
/// The filter removes any client-sent copy first, so it cannot be forged.
pub const ROUTE_HEADER: &str = "x-mcpguard-route";

/// The [`ROUTE_HEADER`] value of a request authorised in sidecar mode: the sidecar's
/// forwarding route matches it and goes to its own cluster (the app in the pod), so a
/// gateway's `http`/`https` routes never carry a sidecar's requests, nor the reverse.
pub const SIDECAR_ROUTE: &str = "sidecar";

/// The [`ROUTE_HEADER`] value of an allowed request to a gateway URL (`/mcp/{gateway}`):
/// Envoy's route for it goes to the aggregator's cluster (`mcpguard_aggregator`), which
/// merges the gateway's servers. A use of one server's item is checked here for that
/// server ([`CHECKED_HEADER`]); the aggregator checks whatever else a request touches.
pub const AGGREGATOR_ROUTE: &str = "aggregator";

/// Set by the filter on requests it authorised: the address (`ip:port`) the policy
/// service resolved and judged for this request, which Envoy's original-destination
/// clusters connect to. Removed from client requests first thing, like
/// [`ROUTE_HEADER`], and from the upstream request by the cluster.
pub const ADDRESS_HEADER: &str = "x-mcpguard-upstream-addr";

/// The request headers the decision reads, in the order [`RawHeaders`] holds them.
pub const NEEDED_HEADERS: [&str; 6] = [
    ":path",
    ":scheme",
    ":authority",
    "authorization",
    "x-request-id",
    ":method",
];

/// The values of [`NEEDED_HEADERS`] as Envoy hands them over: bytes, since a client
/// may send any byte Envoy's codec lets through (obs-text such as `\xff` included),
/// and proxy-wasm's string getters panic on the first one that is not UTF-8.
#[derive(Debug, Default, Clone)]
pub struct RawHeaders([Option<Vec<u8>>; 6]);

impl RawHeaders {
    /// Reads each needed header with `get` (one host call each).
    pub fn read(mut get: impl FnMut(&str) -> Option<Vec<u8>>) -> Self {
        RawHeaders(NEEDED_HEADERS.map(&mut get))
    }

    /// Picks the needed headers out of all of a request's headers.
    pub fn from_pairs<K: AsRef<[u8]>, V: AsRef<[u8]>>(pairs: &[(K, V)]) -> Self {
        Self::read(|name| {
            pairs
                .iter()
                .find(|(k, _)| k.as_ref() == name.as_bytes())
                .map(|(_, v)| v.as_ref().to_vec())
        })
    }

    fn text(&self, i: usize) -> Option<&str> {
        self.0[i]
            .as_deref()
            .and_then(|b| std::str::from_utf8(b).ok())
    }

    /// Whether the request is a POST: the one method whose body carries a JSON-RPC
    /// message (Envoy's MCP filter reads the bodies of POSTs only).
    fn is_post(&self) -> bool {
        self.0[5].as_deref() == Some(b"POST")
    }

    fn garbled(&self, i: usize) -> bool {
        self.0[i]
            .as_deref()
            .is_some_and(|b| std::str::from_utf8(b).is_err())
    }
}

/// The request headers the decision needs.
#[derive(Debug, Default, Clone)]
pub struct Incoming<'a> {
    pub path: &'a str,
    pub scheme: Option<&'a str>,
    pub authority: Option<&'a str>,
    pub authorization: Option<&'a str>,
    pub request_id: Option<&'a str>,
    /// JSON-RPC method, from Envoy's MCP filter metadata when present.
    pub mcp_method: Option<&'a str>,
    /// Tool name of a `tools/call`, likewise.
    pub tool: Option<&'a str>,
    /// The item a `tools/call`, `prompts/get` or `resources/read` uses (`params.name`
    /// or `params.uri`), whole, for feature provisioning.
    pub item: Option<&'a str>,
    /// What Envoy's MCP filter could make of the body.
    pub body: Body,
    /// A header the decision cannot do without arrived as bytes that are not UTF-8:
    /// the request is refused for it (`:path`: `unknown_route`, `authorization`:
    /// `token_malformed`). Other headers that are not UTF-8 count as absent.
    pub garbled: Option<Garbled>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Garbled {
    Path,
    Authorization,
}

impl<'a> Incoming<'a> {
    /// From the request's headers, as the glue copies them out of Envoy, and what
    /// Envoy's MCP filter parsed from the body (`exceeding_limit`: it says the body
    /// went past its parse limit).
    pub fn from_headers(
        headers: &'a RawHeaders,
        mcp_method: Option<&'a str>,
        tool: Option<&'a str>,
        uri: Option<&'a str>,
        exceeding_limit: bool,
    ) -> Self {
        let garbled = if headers.garbled(0) {
            Some(Garbled::Path)
        } else if headers.garbled(3) {
            Some(Garbled::Authorization)
        } else {
            None
        };
        Incoming {
            path: headers.text(0).unwrap_or_default(),
            scheme: headers.text(1),
            authority: headers.text(2),
            authorization: headers.text(3),
            request_id: headers.text(4),
            mcp_method,
            tool,
            item: item_of(mcp_method, tool, uri),
            body: Body::of(headers.is_post(), mcp_method.is_some(), exceeding_limit),
            garbled,
        }
    }
}

/// The item a method uses: a resource's URI for `resources/read`, the name for the
/// other use methods, nothing for any other method.
fn item_of<'a>(
    method: Option<&str>,
    name: Option<&'a str>,
    uri: Option<&'a str>,
) -> Option<&'a str> {
    match method.and_then(Kind::of_use_method)? {
        Kind::Resources => uri,
        Kind::Tools | Kind::Prompts => name,
    }
}

fn bounded(name: Option<&str>) -> Option<String> {
    name.map(|n| mcpguard_core::check::bounded_name(n).to_owned())
}

/// The headers of the 200 that answers [`Start::Metadata`].
pub const METADATA_HEADERS: [(&str, &str); 2] = [
    ("content-type", "application/json"),
    ("cache-control", "max-age=300"),
];

#[derive(Debug, PartialEq, Eq)]
pub enum Start {
    /// Not an MCP path: let Envoy's routes decide (they never forward such requests
    /// upstream, as they lack the route header).
    PassThrough,
    Refuse(Refusal),
    Check(CheckRequest),
    /// Answer 200 with this JSON: an MCP URL's protected-resource metadata.
    Metadata(String),
    /// A JWT arrived before any verification keys (just after start): fetch them, then
    /// decide again. If they still cannot be had, refuse with
    /// [`DenyCode::PolicyUnavailable`].
    NeedKeys,
}

/// What OAuth verification needs besides the request: the keys known so far (`None`
/// until the first JWKS arrived) and the time, in unix seconds.
#[derive(Debug, Clone, Copy)]
pub struct Clock<'a> {
    pub keys: Option<&'a Keys>,
    pub now: i64,
}

pub fn start(req: &Incoming<'_>, config: &FilterConfig, clock: Clock<'_>) -> Start {
    if req.garbled == Some(Garbled::Path) {
        return Start::Refuse(Refusal::new(DenyCode::UnknownRoute, None));
    }
    if let Some(resource_path) = req
        .path
        .strip_prefix(mcpguard_core::oauth::RESOURCE_METADATA_PREFIX)
    {
        return metadata(req, config, resource_path);
    }
    if let Some(sidecar) = config.sidecar.as_ref().filter(|s| is_app_path(req.path, s)) {
        // The app's own URL: no gateway in the path, so the token's gateway it is. No
        // metadata URL either: protected-resource metadata exists per MCP URL with a
        // gateway, which is what OAuth clients must use.
        return check(req, config, clock, None, &sidecar.server, None);
    }
    if let Some(gateway) = gateway_url(req.path) {
        // A sidecar fronts one server: it has no gateway URL.
        if config.sidecar.is_some() {
            return Start::Refuse(Refusal::new(DenyCode::UnknownRoute, None));
        }
        let metadata = resource_metadata_url(req, config);
        // A use of one server's item: checked here for that server, on this request,
        // so the aggregator need not check it again. The audience stays the gateway
        // URL's (empty server): the caller's token is for the URL it uses.
        if let Some((server, own)) = gateway_item(req) {
            let use_of = Incoming {
                tool: req.tool.map(|_| own),
                item: Some(own),
                ..req.clone()
            };
            return match check(&use_of, config, clock, Some(gateway), "", Some(&metadata)) {
                Start::Check(check) => Start::Check(CheckRequest {
                    server: server.to_owned(),
                    ..check
                }),
                other => other,
            };
        }
        // The gateway-level check: an empty server (core::check::CheckRequest).
        return check(req, config, clock, Some(gateway), "", Some(&metadata));
    }
    let path = match McpPath::parse(req.path) {
        Ok(p) => p,
        Err(PathError::NotMcp) => return Start::PassThrough,
        Err(PathError::Malformed) => {
            return Start::Refuse(Refusal::new(DenyCode::UnknownRoute, None));
        }
    };
    if !fronts(config, path.server) {
        return Start::Refuse(Refusal::new(DenyCode::UnknownRoute, None));
    }
    let metadata = resource_metadata_url(req, config);
    check(
        req,
        config,
        clock,
        Some(path.gateway),
        path.server,
        Some(&metadata),
    )
}

/// On the gateway URL, the server and its own name behind the item a use method names
/// (as the aggregator resolves it, [`Naming`]); `None` for any other request, or a
/// name the gateway never gave out (the aggregator answers that one).
fn gateway_item<'a>(req: &Incoming<'a>) -> Option<(&'a str, &'a str)> {
    let naming = match req.mcp_method.and_then(Kind::of_use_method)? {
        Kind::Resources => Naming::Uri,
        Kind::Tools | Kind::Prompts => Naming::Name,
    };
    naming.resolve(req.item?)
}

/// In sidecar mode, whether `path` is the app's own MCP path (`app_path`, with any
/// query): a request that names no gateway.
fn is_app_path(path: &str, sidecar: &Sidecar) -> bool {
    path.split_once('?').map_or(path, |(p, _)| p) == sidecar.app_path
}

/// The check for a request to `server` (of `gateway`, when the path names one), or the
/// refusal of its credential; `metadata` is the resource-metadata URL 401s name.
fn check(
    req: &Incoming<'_>,
    config: &FilterConfig,
    clock: Clock<'_>,
    gateway: Option<&str>,
    server: &str,
    metadata: Option<&str>,
) -> Start {
    let refuse = |code| Start::Refuse(Refusal::new(code, metadata));
    if let Some(code) = req.body.refusal() {
        // Before the token: whoever sends it, nothing can be decided on this body.
        return refuse(code);
    }
    if req.garbled == Some(Garbled::Authorization) {
        return refuse(DenyCode::TokenMalformed);
    }
    let Some(header) = req.authorization else {
        return refuse(DenyCode::TokenMissing);
    };
    let Some(token) = mcpguard_core::bearer_token(header) else {
        return refuse(DenyCode::TokenMalformed);
    };
    if let (Some(issuer), true) = (&config.issuer, jwt::looks_like_jwt(token)) {
        // An access token's audience is an MCP URL, which names its gateway.
        let Some(gateway) = gateway else {
            return refuse(DenyCode::TokenWrongGateway);
        };
        let Some(keys) = clock.keys else {
            return Start::NeedKeys;
        };
        let audience = resource(req, config, gateway, server);
        return match jwt::verify(token, keys, issuer, &audience, clock.now) {
            Ok(_) => Start::Check(CheckRequest {
                credential: Credential::Oauth {
                    token: token.to_owned(),
                    resource: audience,
                },
                gateway: Some(gateway.to_owned()),
                server: server.to_owned(),
                mcp_method: bounded(req.mcp_method),
                tool: bounded(req.tool),
                request_id: req.request_id.map(|id| bounded_request_id(id).to_owned()),
                item: req.item.map(str::to_owned),
                each_server: None,
            }),
            Err(code) => refuse(code),
        };
    }
    if let Err(code) = data_plane_kind(token) {
        return refuse(code);
    }
    Start::Check(CheckRequest {
        credential: Credential::ApiToken {
            hash: TokenHash::of(token).to_hex(),
        },
        gateway: gateway.map(str::to_owned),
        server: server.to_owned(),
        mcp_method: bounded(req.mcp_method),
        tool: bounded(req.tool),
        request_id: req.request_id.map(|id| bounded_request_id(id).to_owned()),
        item: req.item.map(str::to_owned),
        each_server: None,
    })
}

/// Whether requests for `server` are this filter's to check: every server in gateway
/// mode, only the configured one in sidecar mode. The check names that server, so the
/// policy service's allow (and the credential it injects) is for the very server the
/// app beside the sidecar is.
fn fronts(config: &FilterConfig, server: &str) -> bool {
    config.sidecar.as_ref().is_none_or(|s| s.server == server)
}

/// The gateway's public base: `public_base_url`, else the request's own scheme and
/// authority.
fn base_url(req: &Incoming<'_>, config: &FilterConfig) -> String {
    match &config.public_base_url {
        Some(base) => base.clone(),
        None => format!(
            "{}://{}",
            req.scheme.unwrap_or("http"),
            req.authority.unwrap_or("localhost")
        ),
    }
}

fn resource_metadata_url(req: &Incoming<'_>, config: &FilterConfig) -> String {
    mcpguard_core::check::resource_metadata_url(&base_url(req, config), req.path)
}

/// The resource identifier (RFC 8707) of an MCP URL: what access tokens name as their
/// audience.
fn resource(req: &Incoming<'_>, config: &FilterConfig, gateway: &str, server: &str) -> String {
    mcpguard_core::oauth::resource_url(&base_url(req, config), gateway, server)
}

/// The protected-resource metadata of `/mcp/{g}/{s}` and of the gateway URL `/mcp/{g}`,
/// when OAuth is configured; other well-known paths are not ours.
fn metadata(req: &Incoming<'_>, config: &FilterConfig, resource_path: &str) -> Start {
    let Some(issuer) = &config.issuer else {
        return Start::PassThrough;
    };
    if let Some(gateway) = gateway_url(resource_path).filter(|_| config.sidecar.is_none()) {
        return Start::Metadata(mcpguard_core::oauth::protected_resource_metadata(
            &resource(req, config, gateway, ""),
            issuer,
        ));
    }
    match McpPath::parse(resource_path) {
        Ok(p) if p.rest.is_empty() && fronts(config, p.server) => {
            Start::Metadata(mcpguard_core::oauth::protected_resource_metadata(
                &resource(req, config, p.gateway, p.server),
                issuer,
            ))
        }
        _ => Start::PassThrough,
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Finish {
    Forward(Forward),
    Refuse(Refusal),
}

/// How to rewrite an authorised request so Envoy carries it to its upstream.
#[derive(Debug, PartialEq, Eq)]
pub struct Forward {
    /// The upstream's `:authority` and where Envoy connects ([`ADDRESS_HEADER`]);
    /// `None` in sidecar mode, where the route's own cluster is the destination and
    /// the client's `:authority` stays.
    pub upstream: Option<(String, String)>,
    pub path: String,
    /// Value of [`ROUTE_HEADER`]: `http` or `https`, picking the forward-proxy cluster,
    /// or [`SIDECAR_ROUTE`].
    pub route: &'static str,
    /// Replaces the client's `Authorization`; `None` removes it.
    pub inject: Option<(String, String)>,
    /// For the aggregator: the per-server check of a gateway-URL request
    /// ([`CHECKED_HEADER`]).
    pub checked: Option<String>,
    /// What the reply to this list request may keep (feature provisioning); `None`:
    /// the reply passes as it is.
    pub list_filter: Option<ListFilter>,
}

impl Forward {
    /// The request-header edits that carry the request to its upstream, in the order
    /// to apply them; `None` removes the header. The client's `Authorization` goes
    /// before an injected credential is set (which may use the same name), and the
    /// route header comes last: only then may the request match a forwarding route.
    pub fn header_edits(&self) -> Vec<(&str, Option<&str>)> {
        let upstream = self.upstream.as_ref();
        let mut edits: Vec<_> = [
            upstream.map(|(authority, _)| (":authority", Some(authority.as_str()))),
            Some((":path", Some(self.path.as_str()))),
            upstream.map(|(_, address)| (ADDRESS_HEADER, Some(address.as_str()))),
            Some(("authorization", None)),
        ]
        .into_iter()
        .flatten()
        .collect();
        if let Some((name, value)) = &self.inject {
            edits.push((name.as_str(), Some(value.as_str())));
        }
        if let Some(checked) = &self.checked {
            edits.push((CHECKED_HEADER, Some(checked.as_str())));
        }
        edits.push((ROUTE_HEADER, Some(self.route)));
        edits
    }
}

/// What to log when the check callout did not answer 200 (`None`: no answer at all,
/// unreachable or timed out); nothing when it did.
pub fn unanswered_check(status: Option<u16>, request_id: Option<&str>) -> Option<String> {
    (status != Some(200)).then(|| {
        format!(
            "policy check answered {} (no status: unreachable or timed out) request_id={}",
            status.map_or_else(|| "nothing".to_owned(), |s| s.to_string()),
            request_id.unwrap_or("-"),
        )
    })
}

/// Turns the check callout's outcome into the filter's answer. Anything but a
/// well-formed 200 refuses the request: the filter fails closed. In sidecar mode the
/// answer's upstream is not used at all: the request goes to the app beside the
/// sidecar, at its configured path, whatever the policy service names.
pub fn finish(
    status: Option<u16>,
    body: Option<&[u8]>,
    request_path: &str,
    sidecar: Option<&Sidecar>,
    rpc_id: Option<&RpcId>,
) -> Finish {
    let unavailable = || Finish::Refuse(Refusal::new(DenyCode::PolicyUnavailable, None));
    if status != Some(200) {
        return unavailable();
    }
    let Some(answer) = body.and_then(|b| serde_json::from_slice::<CheckResponse>(b).ok()) else {
        return unavailable();
    };
    // Where the request goes if allowed: in sidecar mode the app's path (the request's
    // own when it came to the app's path), else below the upstream's base path.
    let (path, app_path) = match sidecar {
        Some(s) if is_app_path(request_path, s) => (None, Some(request_path.to_owned())),
        _ => match McpPath::parse(request_path) {
            Ok(p) => {
                let app_path = sidecar.map(|s| p.upstream_path(&s.app_path));
                (Some(p), app_path)
            }
            Err(_) => return unavailable(),
        },
    };
    match answer {
        // Only a gateway-level check is answered so (see [`finish_gateway`]).
        CheckResponse::Gateway { .. } => unavailable(),
        // A blocked item: a JSON-RPC error the model reads, the session goes on.
        CheckResponse::Deny { code } if code.is_item_refusal() => {
            Finish::Refuse(Refusal::item(code, rpc_id))
        }
        CheckResponse::Deny { code } => {
            // The metadata URL only matters to clients that can fix their token; it
            // was already sent on the token-less 401 they saw first.
            Finish::Refuse(Refusal::new(code, None))
        }
        CheckResponse::Allow {
            upstream,
            inject,
            list_filter,
        } => {
            let inject = inject.map(|h| (h.name, h.value));
            if let Some(app_path) = app_path {
                return Finish::Forward(Forward {
                    upstream: None,
                    path: app_path,
                    route: SIDECAR_ROUTE,
                    inject,
                    checked: None,
                    list_filter,
                });
            }
            let Some(path) = path else {
                return unavailable();
            };
            // An allow names the address to connect to; without one there is nowhere
            // judged to send the request.
            let Some(address) = upstream
                .address
                .filter(|a| a.parse::<std::net::SocketAddr>().is_ok())
            else {
                return unavailable();
            };
            Finish::Forward(Forward {
                upstream: Some((upstream.authority, address)),
                path: path.upstream_path(&upstream.base_path),
                route: upstream.scheme.as_str(),
                inject,
                checked: None,
                list_filter,
            })
        }
    }
}

/// A request to the gateway URL as the aggregator gets it: the caller's credential
/// ([`CALLER_HEADER`]) and, when the filter checked one server's item, what that check
/// was about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToAggregator {
    caller: String,
    /// Server, method and item of a per-server check; `None`: a gateway-level one.
    item: Option<(String, String, String)>,
}

/// What a check of a request to `path` hands the aggregator; `None` for any other
/// request than to a gateway URL.
pub fn to_aggregator(check: &CheckRequest, path: &str) -> Option<ToAggregator> {
    gateway_url(path)?;
    let item = (!check.server.is_empty()).then(|| {
        (
            check.server.clone(),
            check.mcp_method.clone().unwrap_or_default(),
            check.item.clone().unwrap_or_default(),
        )
    });
    Some(ToAggregator {
        caller: serde_json::to_string(&check.credential).ok()?,
        item,
    })
}

/// Turns the outcome of a gateway-URL request's check into the filter's answer:
/// allowed, the request goes as it came (path, authority) to the aggregator, with the
/// caller's credential in [`CALLER_HEADER`] instead of its `Authorization`, and a
/// per-server check's answer in [`CHECKED_HEADER`]. A refusal of that one server
/// goes there too, so the aggregator answers it as a JSON-RPC error of the call and
/// the session goes on; a refusal of the caller is the filter's, as on any URL. Fails
/// closed like [`finish`]; an answer of the wrong kind is no answer.
pub fn finish_gateway(
    status: Option<u16>,
    body: Option<&[u8]>,
    request_path: &str,
    to: &ToAggregator,
) -> Finish {
    let unavailable = || Finish::Refuse(Refusal::new(DenyCode::PolicyUnavailable, None));
    if status != Some(200) {
        return unavailable();
    }
    let Some(answer) = body.and_then(|b| serde_json::from_slice::<CheckResponse>(b).ok()) else {
        return unavailable();
    };
    let forward = |checked| {
        Finish::Forward(Forward {
            upstream: None,
            path: request_path.to_owned(),
            route: AGGREGATOR_ROUTE,
            inject: Some((CALLER_HEADER.to_owned(), to.caller.clone())),
            checked,
            list_filter: None,
        })
    };
    match (answer, &to.item) {
        (CheckResponse::Gateway { .. }, None) => forward(None),
        (CheckResponse::Deny { code }, _) if to.item.is_none() || !code.is_server_level() => {
            Finish::Refuse(Refusal::new(code, None))
        }
        (answer @ (CheckResponse::Allow { .. } | CheckResponse::Deny { .. }), Some(item)) => {
            let (server, method, item) = item.clone();
            let checked = Checked {
                server,
                method,
                item,
                answer,
            };
            match serde_json::to_string(&checked) {
                Ok(json) => forward(Some(json)),
                Err(_) => unavailable(),
            }
        }
        _ => unavailable(),
    }
}

/// A local reply: status, headers and the JSON error body of the contract.
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal {
    pub code: DenyCode,
    status: u32,
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
}

impl Refusal {
    pub fn new(code: DenyCode, resource_metadata: Option<&str>) -> Self {
        let mut headers = vec![("content-type", "application/json".to_owned())];
        if let Some(challenge) = code.challenge(resource_metadata) {
            headers.push(("www-authenticate", challenge));
        }
        Refusal {
            code,
            status: u32::from(code.status()),
            headers,
            body: code.body(),
        }
    }

    /// A call to a blocked item, answered as MCP answers a failed request: HTTP 200
    /// with a JSON-RPC error carrying the request's id.
    pub fn item(code: DenyCode, rpc_id: Option<&RpcId>) -> Self {
        Refusal {
            code,
            status: 200,
            headers: vec![("content-type", "application/json".to_owned())],
            body: features::blocked_reply(rpc_id, code),
        }
    }

    pub fn status(&self) -> u32 {
        self.status
    }

    /// The log line of a refusal: the path without its query, never the token.
    /// Formatted only when written (a glue whose log level drops it pays nothing).
    pub fn log_line<'a>(
        &'a self,
        path: &'a str,
        request_id: Option<&'a str>,
    ) -> impl std::fmt::Display + 'a {
        LogLine {
            refusal: self,
            path,
            request_id,
        }
    }
}

struct LogLine<'a> {
    refusal: &'a Refusal,
    path: &'a str,
    request_id: Option<&'a str>,
}

impl std::fmt::Display for LogLine<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "refused {} {} ({}) request_id={}",
            self.refusal.status(),
            self.path.split('?').next().unwrap_or_default(),
            self.refusal.code.as_str(),
            self.request_id.unwrap_or("-"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mcpguard_core::check::{InjectHeader, MAX_NAME, Scheme, Upstream};
    use mcpguard_core::token::{TokenKind, format_token};

    fn config() -> FilterConfig {
        FilterConfig::parse(br#"{"policy_cluster":"p"}"#).unwrap()
    }

    fn token() -> String {
        format_token(TokenKind::HostApi, &"a".repeat(40)).unwrap()
    }

    fn incoming<'a>(path: &'a str, authorization: Option<&'a str>) -> Incoming<'a> {
        Incoming {
            path,
            scheme: Some("http"),
            authority: Some("gw.local:10000"),
            authorization,
            request_id: Some("rid-1"),
            mcp_method: None,
            tool: None,
            item: None,
            body: Body::Read,
            garbled: None,
        }
    }

    fn start_(req: &Incoming<'_>, config: &FilterConfig) -> Start {
        start(req, config, Clock { keys: None, now: 0 })
    }

    fn refused(start: Start) -> Refusal {
        match start {
            Start::Refuse(r) => r,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    fn header<'a>(r: &'a Refusal, name: &str) -> Option<&'a str> {
        r.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn non_mcp_paths_pass_through_to_the_routes() {
        assert_eq!(
            start_(&incoming("/healthz", None), &config()),
            Start::PassThrough
        );
    }

    #[test]
    fn malformed_mcp_path_is_404_without_callout() {
        for path in ["/mcp/eng/", "/mcp/Eng", "/mcp/"] {
            let r = refused(start_(&incoming(path, Some("Bearer x")), &config()));
            assert_eq!(
                (r.code, r.status()),
                (DenyCode::UnknownRoute, 404),
                "{path}"
            );
        }
    }

    #[test]
    fn missing_token_gets_401_pointing_at_resource_metadata() {
        let r = refused(start_(&incoming("/mcp/eng/github?x=1", None), &config()));
        assert_eq!((r.code, r.status()), (DenyCode::TokenMissing, 401));
        assert_eq!(
            header(&r, "www-authenticate"),
            Some(
                r#"Bearer resource_metadata="http://gw.local:10000/.well-known/oauth-protected-resource/mcp/eng/github""#
            )
        );
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(v["error"]["code"], "token_missing");
    }

    #[test]
    fn public_base_url_overrides_the_request_authority() {
        let c = FilterConfig::parse(
            br#"{"policy_cluster":"p","public_base_url":"https://mcp.example.com"}"#,
        )
        .unwrap();
        let r = refused(start_(&incoming("/mcp/eng/github", None), &c));
        assert!(header(&r, "www-authenticate").unwrap().contains(
            "https://mcp.example.com/.well-known/oauth-protected-resource/mcp/eng/github"
        ));
    }

    #[test]
    fn garbage_and_admin_tokens_are_refused_without_callout() {
        let admin = format_token(TokenKind::Admin, &"a".repeat(40)).unwrap();
        let mut typo = token();
        typo.replace_range(10..11, "b");
        for (auth, code) in [
            ("Basic dXNlcjpwYXNz".to_owned(), DenyCode::TokenMalformed),
            ("Bearer garbage".to_owned(), DenyCode::TokenMalformed),
            (format!("Bearer {typo}"), DenyCode::TokenMalformed),
            (format!("Bearer {admin}"), DenyCode::TokenUnknown),
        ] {
            let r = refused(start_(&incoming("/mcp/eng/github", Some(&auth)), &config()));
            assert_eq!(r.code, code, "{auth}");
            let challenge = header(&r, "www-authenticate").unwrap();
            assert!(
                challenge.contains(r#"error="invalid_token""#),
                "{challenge}"
            );
            assert!(challenge.contains("resource_metadata="), "{challenge}");
        }
    }

    #[test]
    fn well_formed_token_is_checked_by_hash_never_in_clear() {
        let t = token();
        let auth = format!("Bearer {t}");
        let Start::Check(req) = start_(&incoming("/mcp/eng/github/x", Some(&auth)), &config())
        else {
            panic!("expected a check");
        };
        assert_eq!(
            (req.gateway.as_deref(), req.server.as_str()),
            (Some("eng"), "github")
        );
        assert_eq!(
            req.credential,
            Credential::ApiToken {
                hash: TokenHash::of(&t).to_hex()
            }
        );
        assert_eq!(req.request_id.as_deref(), Some("rid-1"));
        assert!(!serde_json::to_string(&req).unwrap().contains(&t));
        assert_eq!((req.mcp_method, req.tool), (None, None));
    }

    #[test]
    fn method_and_tool_are_passed_on_and_bounded() {
        let auth = format!("Bearer {}", token());
        let long = "é".repeat(MAX_NAME + 10);
        let mut req = incoming("/mcp/eng/github", Some(&auth));
        req.mcp_method = Some("tools/call");
        req.tool = Some(&long);
        let Start::Check(check) = start_(&req, &config()) else {
            panic!("expected a check");
        };
        assert_eq!(check.mcp_method.as_deref(), Some("tools/call"));
        assert_eq!(
            check.tool.as_ref().map(|t| t.chars().count()),
            Some(MAX_NAME)
        );
    }

    #[test]
    fn a_post_whose_body_was_not_read_as_one_message_is_refused_without_a_callout() {
        let token = format!("Bearer {}", token());
        let post = |method: Option<&str>, exceeding: bool| {
            let headers = RawHeaders::from_pairs(&[
                (":path", "/mcp/eng/demo"),
                (":method", "POST"),
                ("authorization", token.as_str()),
            ]);
            let req = Incoming::from_headers(&headers, method, Some("whoami"), None, exceeding);
            start_(&req, &config())
        };
        // A batch, or no JSON-RPC at all: Envoy's MCP filter gives no method.
        let batch = refused(post(None, false));
        assert_eq!(
            (batch.code, batch.status()),
            (DenyCode::RequestUnreadable, 400)
        );
        // Past the parse limit, even with a method read before it: the name it gave
        // may not be the one the upstream reads.
        let large = refused(post(Some("tools/call"), true));
        assert_eq!(
            (large.code, large.status()),
            (DenyCode::RequestTooLarge, 413)
        );
        // Whoever sends it: no token is no excuse to read on.
        let headers = RawHeaders::from_pairs(&[(":path", "/mcp/eng/demo"), (":method", "POST")]);
        let anonymous = Incoming::from_headers(&headers, None, None, None, false);
        assert_eq!(
            refused(start_(&anonymous, &config())).code,
            DenyCode::RequestUnreadable
        );
        // A message it read, and every method without a body, go to the check.
        assert!(matches!(post(Some("tools/call"), false), Start::Check(_)));
        for method in ["GET", "DELETE"] {
            let headers = RawHeaders::from_pairs(&[
                (":path", "/mcp/eng/demo"),
                (":method", method),
                ("authorization", token.as_str()),
            ]);
            let req = Incoming::from_headers(&headers, None, None, None, false);
            assert!(
                matches!(start_(&req, &config()), Start::Check(_)),
                "{method}"
            );
        }
    }

    fn oauth_config() -> FilterConfig {
        FilterConfig::parse(br#"{"policy_cluster":"p","issuer":"http://as"}"#).unwrap()
    }

    #[test]
    fn each_mcp_url_has_its_protected_resource_metadata_when_oauth_is_on() {
        let req = incoming("/.well-known/oauth-protected-resource/mcp/eng/github", None);
        let Start::Metadata(doc) = start_(&req, &oauth_config()) else {
            panic!("expected metadata");
        };
        let doc: serde_json::Value = serde_json::from_str(&doc).unwrap();
        assert_eq!(doc["resource"], "http://gw.local:10000/mcp/eng/github");
        assert_eq!(doc["authorization_servers"][0], "http://as");
        assert_eq!(start_(&req, &config()), Start::PassThrough, "OAuth off");
        for other in [
            "/.well-known/oauth-protected-resource",
            "/.well-known/oauth-protected-resource/mcp/eng/",
            "/.well-known/oauth-protected-resource/mcp/eng/github/x",
            "/.well-known/oauth-protected-resourcex/mcp/eng/github",
        ] {
            assert_eq!(
                start_(&incoming(other, None), &oauth_config()),
                Start::PassThrough,
                "{other}"
            );
        }
    }

    #[test]
    fn a_verified_jwt_is_checked_with_the_token_itself_as_proof() {
        let (key, jwks) = mcpguard_core::jwt::testing::key(3, "k1");
        let keys = Keys::from_value(&jwks).unwrap();
        let mut claims = mcpguard_core::jwt::testing::claims();
        claims.iss = "http://as".into();
        let jwt = mcpguard_core::jwt::testing::sign(&key, "k1", &claims);
        let auth = format!("Bearer {jwt}");
        let req = incoming("/mcp/eng/github", Some(&auth));
        let clock = Clock {
            keys: Some(&keys),
            now: 1_500,
        };
        let Start::Check(check) = start(&req, &oauth_config(), clock) else {
            panic!("expected a check");
        };
        // The policy service verifies the token again before it hands out a
        // credential; ids alone would be guessable.
        let Credential::Oauth { token, resource } = &check.credential else {
            panic!("expected an OAuth credential: {:?}", check.credential);
        };
        assert_eq!(token, &jwt);
        assert_eq!(resource, &claims.aud);

        // Refused without a callout, with the contract's codes and a challenge.
        let other = incoming("/mcp/eng/other", Some(&auth));
        for (r, code) in [
            (&other, DenyCode::TokenWrongGateway),
            (&req, DenyCode::TokenExpired),
        ] {
            let now = if code == DenyCode::TokenExpired {
                2_000
            } else {
                1_500
            };
            let clock = Clock {
                keys: Some(&keys),
                now,
            };
            let refusal = refused(start(r, &oauth_config(), clock));
            assert_eq!((refusal.code, refusal.status()), (code, 401));
            assert!(
                header(&refusal, "www-authenticate")
                    .unwrap()
                    .contains("invalid_token")
            );
        }
        // Keys not there yet: fetch them first, the client's token is not at fault.
        assert_eq!(start_(&req, &oauth_config()), Start::NeedKeys);
        // OAuth off: a JWT is just not an mcpguard token.
        assert_eq!(
            refused(start(&req, &config(), clock)).code,
            DenyCode::TokenMalformed
        );
    }

    #[test]
    fn the_gateway_url_gets_a_gateway_level_check_and_goes_to_the_aggregator() {
        let t = token();
        let auth = format!("Bearer {t}");
        let mut req = incoming("/mcp/eng?x=1", Some(&auth));
        req.mcp_method = Some("tools/list");
        let Start::Check(check) = start_(&req, &config()) else {
            panic!("expected a check");
        };
        assert_eq!(
            (check.gateway.as_deref(), check.server.as_str()),
            (Some("eng"), "")
        );
        let to = to_aggregator(&check, req.path).unwrap();
        let caller = to.caller.clone();
        assert_eq!(to.item, None);
        assert_eq!(
            serde_json::from_str::<Credential>(&caller).unwrap(),
            check.credential
        );
        assert!(!caller.contains(&t), "the hash, never the token");
        // No token: 401 pointing at the gateway URL's own metadata.
        let r = refused(start_(&incoming("/mcp/eng", None), &config()));
        assert_eq!((r.code, r.status()), (DenyCode::TokenMissing, 401));
        assert!(
            header(&r, "www-authenticate")
                .unwrap()
                .contains("/.well-known/oauth-protected-resource/mcp/eng\""),
            "{r:?}"
        );

        let body = serde_json::to_vec(&CheckResponse::Gateway {
            servers: vec!["demo".into()],
            answers: Default::default(),
        })
        .unwrap();
        let Finish::Forward(f) = finish_gateway(Some(200), Some(&body), "/mcp/eng?x=1", &to) else {
            panic!("expected a forward");
        };
        assert_eq!(
            f.header_edits(),
            vec![
                (":path", Some("/mcp/eng?x=1")),
                ("authorization", None),
                (CALLER_HEADER, Some(caller.as_str())),
                (ROUTE_HEADER, Some(AGGREGATOR_ROUTE)),
            ]
        );
        // A deny is refused with its code; an answer for one server, or none, fails
        // closed; a gateway answer to a server's check likewise.
        let deny = br#"{"decision":"deny","code":"gateway_disabled"}"#;
        let Finish::Refuse(r) = finish_gateway(Some(200), Some(deny), "/mcp/eng", &to) else {
            panic!("expected a refusal");
        };
        assert_eq!((r.code, r.status()), (DenyCode::GatewayDisabled, 403));
        let allow = allow_body(Scheme::Http, None);
        for (status, body) in [
            (Some(200), Some(&allow[..])),
            (Some(503), Some(&body[..])),
            (None, None),
        ] {
            let Finish::Refuse(r) = finish_gateway(status, body, "/mcp/eng", &to) else {
                panic!("expected a refusal");
            };
            assert_eq!(r.code, DenyCode::PolicyUnavailable);
        }
        let Finish::Refuse(r) = finish(Some(200), Some(&body), "/mcp/eng/demo", None, None) else {
            panic!("expected a refusal");
        };
        assert_eq!(r.code, DenyCode::PolicyUnavailable);
        // A sidecar has no gateway URL; a server check carries no caller header.
        let sidecar = FilterConfig::parse(
            br#"{"policy_cluster":"p","sidecar":{"server":"demo","app_path":"/mcp"}}"#,
        )
        .unwrap();
        assert_eq!(
            refused(start_(&incoming("/mcp/eng", Some(&auth)), &sidecar)).code,
            DenyCode::UnknownRoute
        );
        let Start::Check(server_check) = start_(&incoming("/mcp/eng/demo", Some(&auth)), &config())
        else {
            panic!("expected a check");
        };
        assert_eq!(to_aggregator(&server_check, "/mcp/eng/demo"), None);
        // Its metadata names the gateway URL, when OAuth is on.
        let Start::Metadata(doc) = start_(
            &incoming("/.well-known/oauth-protected-resource/mcp/eng", None),
            &oauth_config(),
        ) else {
            panic!("expected metadata");
        };
        let doc: serde_json::Value = serde_json::from_str(&doc).unwrap();
        assert_eq!(doc["resource"], "http://gw.local:10000/mcp/eng");
    }

    #[test]
    fn a_use_of_one_servers_item_on_the_gateway_url_is_checked_for_that_server() {
        let auth = format!("Bearer {}", token());
        let mut req = incoming("/mcp/eng", Some(&auth));
        req.mcp_method = Some("tools/call");
        req.tool = Some("demo__echo");
        req.item = Some("demo__echo");
        let Start::Check(check) = start_(&req, &config()) else {
            panic!("expected a check");
        };
        assert_eq!(
            (
                check.gateway.as_deref(),
                check.server.as_str(),
                check.tool.as_deref(),
                check.item.as_deref()
            ),
            (Some("eng"), "demo", Some("echo"), Some("echo"))
        );
        let to = to_aggregator(&check, req.path).unwrap();
        let checked = |f: &Forward| {
            let (_, json) = f
                .header_edits()
                .into_iter()
                .find(|(n, _)| *n == CHECKED_HEADER)
                .unwrap();
            serde_json::from_str::<Checked>(json.unwrap()).unwrap()
        };
        // Allowed: to the aggregator with the caller and the answer for that item.
        let allow = allow_body(Scheme::Http, None);
        let Finish::Forward(f) = finish_gateway(Some(200), Some(&allow), "/mcp/eng", &to) else {
            panic!("expected a forward");
        };
        assert_eq!(f.route, AGGREGATOR_ROUTE);
        let c = checked(&f);
        assert_eq!(
            (c.server.as_str(), c.method.as_str(), c.item.as_str()),
            ("demo", "tools/call", "echo")
        );
        assert_eq!(c.answer, serde_json::from_slice(&allow).unwrap());
        // A refusal of that server goes there too (a JSON-RPC error of the call); one
        // of the caller is the filter's own; no answer fails closed.
        let off = br#"{"decision":"deny","code":"server_disabled"}"#;
        let Finish::Forward(f) = finish_gateway(Some(200), Some(off), "/mcp/eng", &to) else {
            panic!("expected a forward");
        };
        assert_eq!(
            checked(&f).answer,
            CheckResponse::Deny {
                code: DenyCode::ServerDisabled
            }
        );
        let revoked = br#"{"decision":"deny","code":"token_revoked"}"#;
        let Finish::Refuse(r) = finish_gateway(Some(200), Some(revoked), "/mcp/eng", &to) else {
            panic!("expected a refusal");
        };
        assert_eq!((r.code, r.status()), (DenyCode::TokenRevoked, 401));
        let gateway = br#"{"decision":"gateway","servers":[]}"#;
        for (status, body) in [(Some(200), Some(&gateway[..])), (Some(503), None)] {
            let Finish::Refuse(r) = finish_gateway(status, body, "/mcp/eng", &to) else {
                panic!("expected a refusal");
            };
            assert_eq!(r.code, DenyCode::PolicyUnavailable);
        }
        // A resource's URI maps the same way; a name the gateway never gave out, or a
        // list, stays a gateway-level check (the aggregator answers it).
        req.mcp_method = Some("resources/read");
        req.tool = None;
        req.item = Some("fs+file:///a");
        let Start::Check(check) = start_(&req, &config()) else {
            panic!("expected a check");
        };
        assert_eq!(
            (check.server.as_str(), check.item.as_deref(), check.tool),
            ("fs", Some("file:///a"), None)
        );
        for (method, item) in [("tools/call", Some("echo")), ("tools/list", None)] {
            req.mcp_method = Some(method);
            req.item = item;
            let Start::Check(check) = start_(&req, &config()) else {
                panic!("expected a check");
            };
            assert_eq!(check.server, "", "{method}");
        }
    }

    fn allow_body(scheme: Scheme, inject: Option<InjectHeader>) -> Vec<u8> {
        allow_at(scheme, inject, Some("127.0.0.1:9100"))
    }

    fn allow_at(scheme: Scheme, inject: Option<InjectHeader>, address: Option<&str>) -> Vec<u8> {
        serde_json::to_vec(&CheckResponse::Allow {
            upstream: Upstream {
                scheme,
                authority: "mcp.example:9100".into(),
                base_path: "/mcp".into(),
                address: address.map(str::to_owned),
            },
            inject,
            list_filter: None,
        })
        .unwrap()
    }

    #[test]
    fn allow_rewrites_toward_the_upstream() {
        let body = allow_body(Scheme::Http, None);
        let f = finish(
            Some(200),
            Some(&body),
            "/mcp/eng/github/sub?q=1",
            None,
            None,
        );
        assert_eq!(
            f,
            Finish::Forward(Forward {
                upstream: Some(("mcp.example:9100".into(), "127.0.0.1:9100".into())),
                path: "/mcp/sub?q=1".into(),
                route: "http",
                inject: None,
                checked: None,
                list_filter: None,
            })
        );
        let inject = InjectHeader {
            name: "authorization".into(),
            value: "Bearer down".into(),
        };
        let body = allow_body(Scheme::Https, Some(inject));
        let Finish::Forward(f) = finish(Some(200), Some(&body), "/mcp/eng/github", None, None)
        else {
            panic!("expected forward");
        };
        assert_eq!(f.route, "https");
        assert_eq!(
            f.inject,
            Some(("authorization".into(), "Bearer down".into()))
        );
    }

    #[test]
    fn deny_carries_the_layer_that_refused() {
        let body = br#"{"decision":"deny","code":"host_disabled"}"#;
        let Finish::Refuse(r) = finish(Some(200), Some(body), "/mcp/eng/github", None, None) else {
            panic!("expected refusal");
        };
        assert_eq!((r.code, r.status()), (DenyCode::HostDisabled, 403));
        assert_eq!(header(&r, "www-authenticate"), None);

        let body = br#"{"decision":"deny","code":"token_revoked"}"#;
        let Finish::Refuse(r) = finish(Some(200), Some(body), "/mcp/eng/github", None, None) else {
            panic!("expected refusal");
        };
        assert_eq!(r.status(), 401);
        assert!(
            header(&r, "www-authenticate")
                .unwrap()
                .contains("invalid_token")
        );
    }

    #[test]
    fn anything_but_a_good_answer_fails_closed() {
        let good = allow_body(Scheme::Http, None);
        for (status, body) in [
            (None, Some(&good[..])),      // callee down: no :status
            (Some(500), Some(&good[..])), // policy-svc error
            (Some(200), None),            // empty
            (Some(200), Some(&b"{"[..])), // truncated
            (Some(200), Some(&br#"{"decision":"maybe"}"#[..])),
            // An allow with no judged address to connect to, or not an address.
            (Some(200), Some(&allow_at(Scheme::Http, None, None)[..])),
            (
                Some(200),
                Some(&allow_at(Scheme::Http, None, Some("mcp.example:1"))[..]),
            ),
        ] {
            let Finish::Refuse(r) = finish(status, body, "/mcp/eng/github", None, None) else {
                panic!("{status:?} must not forward");
            };
            assert_eq!((r.code, r.status()), (DenyCode::PolicyUnavailable, 503));
        }
        // Sidecar mode fails closed the same way (the answer's address is not needed
        // there, so an allow without one forwards, as the next test shows).
        let sidecar = sidecar_config().sidecar;
        for (status, body) in [
            (None, Some(&good[..])),
            (Some(503), Some(&good[..])),
            (Some(200), Some(&br#"{"decision":"allow"}"#[..])),
        ] {
            let Finish::Refuse(r) = finish(status, body, "/mcp/eng/demo", sidecar.as_ref(), None)
            else {
                panic!("{status:?} must not forward");
            };
            assert_eq!(r.code, DenyCode::PolicyUnavailable);
        }
    }

    fn sidecar_config() -> FilterConfig {
        FilterConfig::parse(
            br#"{"policy_cluster":"p","issuer":"http://as","sidecar":{"server":"demo","app_path":"/app/mcp"}}"#,
        )
        .unwrap()
    }

    #[test]
    fn sidecar_checks_only_its_own_server_and_never_routes_where_the_answer_says() {
        let config = sidecar_config();
        let auth = format!("Bearer {}", token());
        // Its own server, through any gateway: checked, naming this server.
        let Start::Check(check) = start_(&incoming("/mcp/eng/demo/x", Some(&auth)), &config) else {
            panic!("expected a check");
        };
        assert_eq!(
            (check.gateway.as_deref(), check.server.as_str()),
            (Some("eng"), "demo")
        );
        // Another server's URL: refused here, without a callout, so that no client can
        // have another server's credential injected into this app.
        for path in ["/mcp/eng/github", "/mcp/eng/demo2", "/mcp/eng"] {
            let r = refused(start_(&incoming(path, Some(&auth)), &config));
            assert_eq!(
                (r.code, r.status()),
                (DenyCode::UnknownRoute, 404),
                "{path}"
            );
        }
        // Nor does it describe another server's URL as a protected resource.
        let other = incoming("/.well-known/oauth-protected-resource/mcp/eng/github", None);
        assert_eq!(start_(&other, &config), Start::PassThrough);
        let own = incoming("/.well-known/oauth-protected-resource/mcp/eng/demo", None);
        assert!(matches!(start_(&own, &config), Start::Metadata(_)));

        // An allow: the app's path, the sidecar route, the credential injected, and
        // nothing of the answer's upstream (its authority, address or base path).
        let inject = InjectHeader {
            name: "authorization".into(),
            value: "Bearer down".into(),
        };
        for address in [Some("203.0.113.9:443"), None] {
            let body = allow_at(Scheme::Https, Some(inject.clone()), address);
            let f = finish(
                Some(200),
                Some(&body),
                "/mcp/eng/demo/x?q=1",
                config.sidecar.as_ref(),
                None,
            );
            let expected = Forward {
                upstream: None,
                path: "/app/mcp/x?q=1".into(),
                route: SIDECAR_ROUTE,
                inject: Some(("authorization".into(), "Bearer down".into())),
                checked: None,
                list_filter: None,
            };
            assert_eq!(f, Finish::Forward(expected));
        }
        let Finish::Forward(f) = finish(
            Some(200),
            Some(&allow_body(Scheme::Http, None)),
            "/mcp/eng/demo",
            config.sidecar.as_ref(),
            None,
        ) else {
            panic!("expected forward");
        };
        assert_eq!(
            f.header_edits(),
            vec![
                (":path", Some("/app/mcp")),
                ("authorization", None),
                (ROUTE_HEADER, Some(SIDECAR_ROUTE)),
            ],
            "no :authority and no address: the route's own cluster is the destination"
        );
        // Refusals are the same as in gateway mode.
        let deny = br#"{"decision":"deny","code":"server_disabled"}"#;
        let Finish::Refuse(r) = finish(
            Some(200),
            Some(deny),
            "/mcp/eng/demo",
            config.sidecar.as_ref(),
            None,
        ) else {
            panic!("expected refusal");
        };
        assert_eq!((r.code, r.status()), (DenyCode::ServerDisabled, 403));
    }
    #[test]
    fn a_sidecar_takes_the_gateway_from_the_token_on_the_apps_own_path() {
        let config = sidecar_config();
        let auth = format!("Bearer {}", token());
        // The app's path (with a query too): a check naming this server and no
        // gateway, which the policy service answers for the token's own.
        for path in ["/app/mcp", "/app/mcp?session=1"] {
            let Start::Check(check) = start_(&incoming(path, Some(&auth)), &config) else {
                panic!("expected a check for {path}");
            };
            assert_eq!((check.gateway, check.server.as_str()), (None, "demo"));
            assert!(matches!(check.credential, Credential::ApiToken { .. }));
        }
        // Anything else under it is no app path: not ours (Envoy's routes refuse it).
        for path in ["/app/mcp/", "/app/mcpx", "/app"] {
            assert_eq!(
                start_(&incoming(path, Some(&auth)), &config),
                Start::PassThrough,
                "{path}"
            );
        }
        // Refused as on any MCP URL, without a metadata URL (OAuth clients use the
        // URL with the gateway); an access token is for an URL naming its gateway.
        let r = refused(start_(&incoming("/app/mcp", None), &config));
        assert_eq!((r.code, r.status()), (DenyCode::TokenMissing, 401));
        assert!(
            !header(&r, "www-authenticate")
                .unwrap_or("")
                .contains("resource_metadata")
        );
        let (key, _) = mcpguard_core::jwt::testing::key(3, "k1");
        let jwt =
            mcpguard_core::jwt::testing::sign(&key, "k1", &mcpguard_core::jwt::testing::claims());
        let bearer = format!("Bearer {jwt}");
        let r = refused(start_(&incoming("/app/mcp", Some(&bearer)), &config));
        assert_eq!(r.code, DenyCode::TokenWrongGateway);
        // In gateway mode the same path is no MCP URL at all.
        assert_eq!(
            start_(&incoming("/app/mcp", Some(&auth)), &self::config()),
            Start::PassThrough
        );

        // Allowed: to the app at the request's own path and query, as on any path.
        let body = allow_at(Scheme::Https, None, Some("203.0.113.9:443"));
        let f = finish(
            Some(200),
            Some(&body),
            "/app/mcp?session=1",
            config.sidecar.as_ref(),
            None,
        );
        assert_eq!(
            f,
            Finish::Forward(Forward {
                upstream: None,
                path: "/app/mcp?session=1".into(),
                route: SIDECAR_ROUTE,
                inject: None,
                checked: None,
                list_filter: None,
            })
        );
        // Only in sidecar mode: a gateway never forwards a path that names no server.
        let f = finish(Some(200), Some(&body), "/app/mcp", None, None);
        assert!(matches!(f, Finish::Refuse(r) if r.code == DenyCode::PolicyUnavailable));
    }

    #[test]
    fn header_edits_drop_the_clients_token_before_injecting_and_set_the_route_last() {
        let forward = Forward {
            upstream: Some(("up:443".into(), "192.0.2.1:443".into())),
            path: "/mcp".into(),
            route: "https",
            inject: Some(("authorization".into(), "Bearer per-user".into())),
            checked: None,
            list_filter: None,
        };
        assert_eq!(
            forward.header_edits(),
            vec![
                (":authority", Some("up:443")),
                (":path", Some("/mcp")),
                (ADDRESS_HEADER, Some("192.0.2.1:443")),
                ("authorization", None),
                ("authorization", Some("Bearer per-user")),
                (ROUTE_HEADER, Some("https")),
            ]
        );
        let plain = Forward {
            inject: None,
            checked: None,
            ..forward
        };
        assert_eq!(plain.header_edits().len(), 5);
        assert_eq!(plain.header_edits()[4], (ROUTE_HEADER, Some("https")));
    }

    #[test]
    fn incoming_is_read_from_the_headers_envoy_hands_over() {
        let headers = RawHeaders::from_pairs(&[
            (":path", "/mcp/eng/demo"),
            (":scheme", "https"),
            (":authority", "gw:10000"),
            ("authorization", "Bearer t"),
            ("x-request-id", "rid"),
            ("x-other", "ignored"),
        ]);
        let req = Incoming::from_headers(&headers, Some("tools/call"), None, None, false);
        assert_eq!(
            (req.path, req.scheme, req.authority, req.authorization),
            (
                "/mcp/eng/demo",
                Some("https"),
                Some("gw:10000"),
                Some("Bearer t")
            )
        );
        assert_eq!(
            (req.request_id, req.mcp_method),
            (Some("rid"), Some("tools/call"))
        );
        let none = RawHeaders::default();
        let bare = Incoming::from_headers(&none, None, None, None, false);
        assert_eq!(
            (bare.path, bare.authorization, bare.garbled),
            ("", None, None)
        );
    }

    #[test]
    fn headers_that_are_not_utf8_are_refused_or_ignored_never_a_panic() {
        let config = config();
        let clock = Clock { keys: None, now: 0 };
        let bearer = format!("Bearer {}", token());
        let decide = |pairs: &[(&str, &[u8])]| {
            let raw = RawHeaders::from_pairs(pairs);
            let req = Incoming::from_headers(&raw, None, None, None, false);
            start(&req, &config, clock)
        };
        let refused = |s: Start| match s {
            Start::Refuse(r) => r.code,
            other => panic!("expected a refusal, got {other:?}"),
        };
        assert_eq!(
            refused(decide(&[(":path", b"/mcp/eng/\xffdemo")])),
            DenyCode::UnknownRoute
        );
        assert_eq!(
            refused(decide(&[
                (":path", b"/mcp/eng/demo"),
                ("authorization", b"Bearer \xff\xfe"),
            ])),
            DenyCode::TokenMalformed
        );
        // Not needed for the decision: dropped, and the request is checked as usual.
        let checked = decide(&[
            (":path", b"/mcp/eng/demo"),
            ("authorization", bearer.as_bytes()),
            ("x-request-id", b"\xff"),
            (":authority", b"h\xc3"),
        ]);
        assert!(
            matches!(&checked, Start::Check(c) if c.request_id.is_none()),
            "{checked:?}"
        );
    }

    #[test]
    fn log_lines_name_no_token_and_no_query() {
        let r = Refusal::new(DenyCode::TokenRevoked, None);
        let line = r
            .log_line("/mcp/eng/demo?token=secret", Some("rid"))
            .to_string();
        assert_eq!(
            line,
            "refused 401 /mcp/eng/demo (token_revoked) request_id=rid"
        );
        assert_eq!(unanswered_check(Some(200), None), None);
        assert_eq!(
            unanswered_check(None, None).as_deref(),
            Some(
                "policy check answered nothing (no status: unreachable or timed out) request_id=-"
            )
        );
    }
}
