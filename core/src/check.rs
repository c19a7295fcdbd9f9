//! The check callout: what the filter asks the policy service on every request, and the
//! answer. JSON over HTTP/1.1 or h2 on the policy service's check port.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::features::ListFilter;

/// Path of the check endpoint on the policy service's check port.
pub const CHECK_PATH: &str = "/v1/check";

/// Set by the filter on a request to a gateway URL (`/mcp/{gateway}`) it allowed, for
/// the aggregator: the caller's [`Credential`] as JSON, which the aggregator presents
/// in its own per-server checks. The filter removes any client-sent copy from every
/// request first, so it cannot be forged.
pub const CALLER_HEADER: &str = "x-mcpguard-caller";

/// Set by the filter beside [`CALLER_HEADER`] on a gateway-URL request that uses one
/// server's item (`tools/call`, `prompts/get`, `resources/read`): its per-server check,
/// made by the filter on this very request, as a [`Checked`] in JSON. The aggregator
/// acts on it instead of checking the same thing again, so such a call costs one check,
/// as on the per-server URL. Removed from every client request first, like the caller.
pub const CHECKED_HEADER: &str = "x-mcpguard-checked";

/// What [`CHECKED_HEADER`] holds: the check of `server`'s `item` for `method`, and
/// its answer (an allow, or a refusal of that one server).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checked {
    pub server: String,
    pub method: String,
    /// The server's own name (or URI) of the item.
    pub item: String,
    pub answer: CheckResponse,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckRequest {
    pub credential: Credential,
    /// The gateway the request's path names. `None` when it names none (a sidecar's
    /// app path, `/mcp` as the app serves it): then the gateway is the token's own, and
    /// only an API token has one (an access token is bound to an MCP URL that names
    /// its gateway, so it is refused `token_wrong_gateway`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// The server the request is for. Empty: a gateway-level check (a request to the
    /// gateway URL `/mcp/{gateway}`), which decides every layer up to the gateway's
    /// grant and answers [`CheckResponse::Gateway`].
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub server: String,
    /// JSON-RPC method of the MCP request, when the filter knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mcp_method: Option<String>,
    /// Tool name of a `tools/call`, when the filter knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool: Option<String>,
    /// Envoy's `x-request-id`, so both sides' logs can be joined.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// The item a `tools/call`, `prompts/get` or `resources/read` uses (`params.name`,
    /// or `params.uri`), whole: feature provisioning decides on it, so it is never cut
    /// short as `tool` is for the audit trail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub item: Option<String>,
    /// On a gateway-level check (an empty `server`) only: also decide these servers of
    /// the gateway, each as its own check of this request would (every layer of that
    /// server, provisioning, pinning, one audit entry each), and answer every decision
    /// in [`CheckResponse::Gateway`]'s `answers`. The aggregator's lists and
    /// `logging/setLevel` touch every server at once: one exchange instead of one per
    /// server, with the credential presented once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub each_server: Option<EachServer>,
}

/// Which servers a gateway-level check also decides ([`CheckRequest::each_server`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum EachServer {
    /// Every server the gateway exposes now.
    All,
    /// These (a list's later page: the servers its cursor goes on with), at most
    /// [`MAX_EACH_SERVER`]. One the gateway does not expose is answered as its own
    /// check would be (`server_not_exposed`).
    Only(Vec<String>),
}

/// The most servers [`EachServer::Only`] may name: more is a 400, not a decision.
pub const MAX_EACH_SERVER: usize = 256;

/// How the caller proved who it is: proof of possession of a live token, never
/// something guessable (ids) and never an opaque API token in clear.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Credential {
    /// An opaque API token, as the hex SHA-256 of the whole token.
    ApiToken { hash: String },
    /// An OAuth access token (JWT) that the filter verified (signature, issuer,
    /// audience, expiry). It travels whole, because its signature is the proof: the
    /// policy service verifies it again before it hands out a credential, so knowing
    /// a grant's or connection's id gets nobody anything. A JWT is short-lived and
    /// bound to its audience; the check port only answers Envoy.
    Oauth {
        token: String,
        /// The audience the filter verified: this request's MCP URL.
        resource: String,
    },
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // An access token is a bearer secret: never print it.
        match self {
            Credential::ApiToken { hash } => {
                f.debug_struct("ApiToken").field("hash", hash).finish()
            }
            Credential::Oauth { resource, .. } => f
                .debug_struct("Oauth")
                .field("token", &"<redacted>")
                .field("resource", resource)
                .finish(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum CheckResponse {
    Allow {
        upstream: Upstream,
        /// A header to set toward the upstream (the downstream credential), replacing
        /// the client's `Authorization`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        inject: Option<InjectHeader>,
        /// On a list request (`tools/list`, ...) to an exposure that does not allow
        /// everything: what the reply may keep ([`crate::features`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        list_filter: Option<ListFilter>,
    },
    Deny {
        code: DenyCode,
    },
    /// The answer to a gateway-level check (an empty `server`): the credential may use
    /// the gateway; `servers` are the slugs of the servers it exposes (each still
    /// checked on its own, on every request that touches it).
    Gateway {
        servers: Vec<String>,
        /// What each server asked for in [`CheckRequest::each_server`] was decided:
        /// an allow or a refusal, as its own check would answer (a decision the store
        /// gave no answer for is `policy_unavailable`).
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        answers: BTreeMap<String, CheckResponse>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Upstream {
    pub scheme: Scheme,
    /// `host:port`, port always explicit.
    pub authority: String,
    /// The server's base path, e.g. `/mcp`; may be empty.
    pub base_path: String,
    /// The address Envoy connects to (`ip:port`), resolved and judged against the
    /// upstream network policy by the policy service for this very request, so a name
    /// that resolves elsewhere later (DNS rebinding) is never connected to. `authority`
    /// stays the `Host` and the TLS name. The filter refuses an allow without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    pub const fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InjectHeader {
    pub name: String,
    pub value: String,
}

impl std::fmt::Debug for InjectHeader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The value is a downstream credential: never print it.
        f.debug_struct("InjectHeader")
            .field("name", &self.name)
            .field("value", &"<redacted>")
            .finish()
    }
}

/// What Envoy's MCP filter made of a request's body. Every decision about an item
/// (provisioning, the audit's tool) rests on what it parsed, so a POST it could not
/// read as one whole JSON-RPC message is refused rather than checked on its headers
/// alone: otherwise a batch (no metadata at all), or a body whose `method` or
/// `params.name` lie past the parse limit, would pass as if it used nothing.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    /// No body to read (not a POST), or a POST read as one JSON-RPC message.
    #[default]
    Read,
    /// A POST that is not one JSON-RPC message: a batch (an array, which MCP removed
    /// in 2025-06-18), or no JSON-RPC at all.
    NotOneMessage,
    /// A POST larger than the MCP filter's parse limit (`max_request_body_size`).
    TooLarge,
}

impl Body {
    /// `method_read`: the MCP filter gave the JSON-RPC method (it gives one for every
    /// message it reads, `__jsonrpc_response` for a response); `exceeding`: it says
    /// the body went past its limit.
    pub fn of(is_post: bool, method_read: bool, exceeding: bool) -> Self {
        match (is_post, exceeding, method_read) {
            (false, _, _) => Body::Read,
            (true, true, _) => Body::TooLarge,
            (true, false, false) => Body::NotOneMessage,
            (true, false, true) => Body::Read,
        }
    }

    /// The refusal of a body nothing can be decided on.
    pub fn refusal(self) -> Option<DenyCode> {
        match self {
            Body::Read => None,
            Body::NotOneMessage => Some(DenyCode::RequestUnreadable),
            Body::TooLarge => Some(DenyCode::RequestTooLarge),
        }
    }
}

/// Why a request was refused. The wire name is the `error.code` clients see.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DenyCode {
    TokenMissing,
    TokenMalformed,
    TokenUnknown,
    TokenRevoked,
    TokenExpired,
    TokenWrongGateway,
    UnknownRoute,
    ServerNotExposed,
    HostDisabled,
    ConnectionDisabled,
    UserDisabled,
    IdentityDisabled,
    IdentityMissing,
    IdentityExpired,
    ServerDisabled,
    GatewayDisabled,
    UpstreamDenied,
    UpstreamUnresolved,
    PolicyUnavailable,
    GatewayNotGranted,
    HostPending,
    ToolBlocked,
    PromptBlocked,
    ResourceBlocked,
    RequestUnreadable,
    RequestTooLarge,
}

impl DenyCode {
    pub const ALL: [DenyCode; 26] = [
        DenyCode::TokenMissing,
        DenyCode::TokenMalformed,
        DenyCode::TokenUnknown,
        DenyCode::TokenRevoked,
        DenyCode::TokenExpired,
        DenyCode::TokenWrongGateway,
        DenyCode::UnknownRoute,
        DenyCode::ServerNotExposed,
        DenyCode::HostDisabled,
        DenyCode::ConnectionDisabled,
        DenyCode::UserDisabled,
        DenyCode::IdentityDisabled,
        DenyCode::IdentityMissing,
        DenyCode::IdentityExpired,
        DenyCode::ServerDisabled,
        DenyCode::GatewayDisabled,
        DenyCode::UpstreamDenied,
        DenyCode::UpstreamUnresolved,
        DenyCode::PolicyUnavailable,
        DenyCode::GatewayNotGranted,
        DenyCode::HostPending,
        DenyCode::ToolBlocked,
        DenyCode::PromptBlocked,
        DenyCode::ResourceBlocked,
        DenyCode::RequestUnreadable,
        DenyCode::RequestTooLarge,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            DenyCode::TokenMissing => "token_missing",
            DenyCode::TokenMalformed => "token_malformed",
            DenyCode::TokenUnknown => "token_unknown",
            DenyCode::TokenRevoked => "token_revoked",
            DenyCode::TokenExpired => "token_expired",
            DenyCode::TokenWrongGateway => "token_wrong_gateway",
            DenyCode::UnknownRoute => "unknown_route",
            DenyCode::ServerNotExposed => "server_not_exposed",
            DenyCode::HostDisabled => "host_disabled",
            DenyCode::ConnectionDisabled => "connection_disabled",
            DenyCode::UserDisabled => "user_disabled",
            DenyCode::IdentityDisabled => "identity_disabled",
            DenyCode::IdentityMissing => "identity_missing",
            DenyCode::IdentityExpired => "identity_expired",
            DenyCode::ServerDisabled => "server_disabled",
            DenyCode::GatewayDisabled => "gateway_disabled",
            DenyCode::UpstreamDenied => "upstream_denied",
            DenyCode::UpstreamUnresolved => "upstream_unresolved",
            DenyCode::PolicyUnavailable => "policy_unavailable",
            DenyCode::GatewayNotGranted => "gateway_not_granted",
            DenyCode::HostPending => "host_pending",
            DenyCode::ToolBlocked => "tool_blocked",
            DenyCode::PromptBlocked => "prompt_blocked",
            DenyCode::ResourceBlocked => "resource_blocked",
            DenyCode::RequestUnreadable => "request_unreadable",
            DenyCode::RequestTooLarge => "request_too_large",
        }
    }

    pub const fn status(self) -> u16 {
        match self {
            DenyCode::TokenMissing
            | DenyCode::TokenMalformed
            | DenyCode::TokenUnknown
            | DenyCode::TokenRevoked
            | DenyCode::TokenExpired
            | DenyCode::TokenWrongGateway => 401,
            DenyCode::UnknownRoute => 404,
            DenyCode::RequestUnreadable => 400,
            DenyCode::RequestTooLarge => 413,
            DenyCode::ServerNotExposed
            | DenyCode::HostDisabled
            | DenyCode::ConnectionDisabled
            | DenyCode::UserDisabled
            | DenyCode::IdentityDisabled
            | DenyCode::IdentityMissing
            | DenyCode::IdentityExpired
            | DenyCode::ServerDisabled
            | DenyCode::GatewayDisabled
            | DenyCode::GatewayNotGranted
            | DenyCode::HostPending
            | DenyCode::UpstreamDenied
            | DenyCode::ToolBlocked
            | DenyCode::PromptBlocked
            | DenyCode::ResourceBlocked => 403,
            DenyCode::UpstreamUnresolved => 502,
            DenyCode::PolicyUnavailable => 503,
        }
    }

    /// A sentence for the person reading the error; names what to do where it can.
    pub const fn message(self) -> &'static str {
        match self {
            DenyCode::TokenMissing => "no bearer token: send Authorization: Bearer <token>",
            DenyCode::TokenMalformed => "the bearer token is not a well-formed mcpguard token",
            DenyCode::TokenUnknown => "the bearer token is not known to mcpguard",
            DenyCode::TokenRevoked => "the bearer token has been revoked",
            DenyCode::TokenExpired => "the bearer token has expired",
            DenyCode::TokenWrongGateway => "the bearer token is not valid for this gateway",
            DenyCode::UnknownRoute => "no MCP endpoint here: use /mcp/{gateway}/{server}",
            DenyCode::ServerNotExposed => "this gateway does not expose this server",
            DenyCode::HostDisabled => "the host (client application) is disabled",
            DenyCode::ConnectionDisabled => "this connection is disabled",
            DenyCode::UserDisabled => "the user is disabled",
            DenyCode::IdentityDisabled => "the user's identity for this server is disabled",
            DenyCode::IdentityMissing => "the user has no identity for this server",
            DenyCode::IdentityExpired => {
                "the server refused to renew the user's sign-in: reconnect the account \
                 (Connect, on the consent or enrollment page)"
            }
            DenyCode::ServerDisabled => "the server is disabled",
            DenyCode::GatewayDisabled => "the gateway is disabled",
            DenyCode::GatewayNotGranted => {
                "none of the user's teams is granted this gateway: ask an admin"
            }
            DenyCode::HostPending => {
                "the host (client application) is waiting for an admin's approval"
            }
            DenyCode::UpstreamDenied => {
                "the server's upstream address is outside the networks this gateway may reach"
            }
            DenyCode::UpstreamUnresolved => "the server's upstream host name does not resolve",
            DenyCode::PolicyUnavailable => {
                "the policy service could not be reached in time; refusing (fail closed)"
            }
            DenyCode::ToolBlocked => "this tool is not offered on this gateway",
            DenyCode::PromptBlocked => "this prompt is not offered on this gateway",
            DenyCode::ResourceBlocked => "this resource is not offered on this gateway",
            DenyCode::RequestUnreadable => {
                "the POST could not be read as one JSON-RPC message: send one message (no batch), with Content-Type: application/json and Accept: application/json, text/event-stream"
            }
            DenyCode::RequestTooLarge => {
                "the POST body is larger than the gateway reads (1 MiB): it cannot be checked"
            }
        }
    }

    /// Refusals of one server of a gateway rather than of the caller: the layers past
    /// the gateway's grant. Through the gateway URL they are a JSON-RPC error of that
    /// one call and the session goes on; the others (the caller's token, host, user,
    /// connection, the gateway itself) refuse the request as on any URL.
    pub const fn is_server_level(self) -> bool {
        matches!(
            self,
            DenyCode::ServerNotExposed
                | DenyCode::ServerDisabled
                | DenyCode::IdentityDisabled
                | DenyCode::IdentityMissing
                | DenyCode::IdentityExpired
                | DenyCode::UpstreamDenied
                | DenyCode::UpstreamUnresolved
        ) || self.is_item_refusal()
    }

    /// Refusals of one MCP item rather than of the request's path: the wasm filter
    /// answers them as a JSON-RPC error (HTTP 200, the request's id) that the model
    /// reads, so the session goes on. Elsewhere (ext_authz) they are a 403.
    pub const fn is_item_refusal(self) -> bool {
        matches!(
            self,
            DenyCode::ToolBlocked | DenyCode::PromptBlocked | DenyCode::ResourceBlocked
        )
    }

    /// 401s about a presented token carry `error="invalid_token"` (RFC 6750 §3.1).
    pub const fn is_invalid_token(self) -> bool {
        matches!(
            self,
            DenyCode::TokenMalformed
                | DenyCode::TokenUnknown
                | DenyCode::TokenRevoked
                | DenyCode::TokenExpired
                | DenyCode::TokenWrongGateway
        )
    }

    /// `WWW-Authenticate` of a 401 (RFC 6750 §3, RFC 9728 §5.1); `None` for other
    /// statuses.
    pub fn challenge(self, resource_metadata: Option<&str>) -> Option<String> {
        if self.status() != 401 {
            return None;
        }
        let mut challenge = "Bearer".to_owned();
        if let Some(url) = resource_metadata {
            challenge.push_str(&format!(" resource_metadata=\"{url}\""));
        }
        if self.is_invalid_token() {
            let sep = if resource_metadata.is_some() { "," } else { "" };
            challenge.push_str(&format!(
                "{sep} error=\"invalid_token\", error_description=\"{}\"",
                self.message()
            ));
        }
        Some(challenge)
    }

    /// The JSON error body clients receive.
    pub fn body(self) -> String {
        serde_json::json!({"error": {"code": self.as_str(), "message": self.message()}}).to_string()
    }
}

/// Longest `x-request-id` kept (Envoy's own are 36-character UUIDs).
pub const MAX_REQUEST_ID: usize = 128;
/// Longest MCP method or tool name kept, in characters.
pub const MAX_NAME: usize = 128;

/// The part of a client-controlled `x-request-id` worth logging and storing: its
/// first [`MAX_REQUEST_ID`] bytes of visible ASCII, up to the first other byte. A
/// client that sends 50 kB, or control characters, gets neither into a log line or
/// an audit row.
pub fn bounded_request_id(id: &str) -> &str {
    let end = id
        .bytes()
        .take(MAX_REQUEST_ID)
        .position(|b| !b.is_ascii_graphic())
        .unwrap_or_else(|| id.len().min(MAX_REQUEST_ID));
    &id[..end]
}

/// A method or tool name cut to [`MAX_NAME`] characters: they are for the audit trail,
/// and a client controls them.
pub fn bounded_name(name: &str) -> &str {
    let end = name
        .char_indices()
        .nth(MAX_NAME)
        .map_or(name.len(), |(i, _)| i);
    &name[..end]
}

/// RFC 9728 §3.1: the metadata of resource `https://h/mcp/g/s` lives at
/// `https://h/.well-known/oauth-protected-resource/mcp/g/s`. `base` is scheme and
/// authority without a trailing slash; any query on `path` is dropped.
pub fn resource_metadata_url(base: &str, path: &str) -> String {
    let path = path.split('?').next().unwrap_or_default();
    format!("{base}{}{path}", crate::oauth::RESOURCE_METADATA_PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_controlled_names_are_bounded() {
        let uuid = "f43dbca0-dc6d-471a-9771-adaa888f1c94";
        assert_eq!(bounded_request_id(uuid), uuid);
        assert_eq!(
            bounded_request_id(&"x".repeat(50_000)).len(),
            MAX_REQUEST_ID
        );
        assert_eq!(bounded_request_id("abc\ndef"), "abc");
        assert_eq!(bounded_request_id("ab c"), "ab");
        assert_eq!(bounded_request_id("é"), "");
        assert_eq!(bounded_name(&"é".repeat(500)).chars().count(), MAX_NAME);
        assert_eq!(bounded_name("tools/call"), "tools/call");
    }

    #[test]
    fn wire_names_match_as_str() {
        for code in DenyCode::ALL {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
            assert_eq!(serde_json::from_str::<DenyCode>(&json).unwrap(), code);
        }
    }

    #[test]
    fn body_is_the_documented_error_shape() {
        let v: serde_json::Value = serde_json::from_str(&DenyCode::HostDisabled.body()).unwrap();
        assert_eq!(v["error"]["code"], "host_disabled");
        assert!(v["error"]["message"].as_str().unwrap().contains("disabled"));
    }

    #[test]
    fn challenges_follow_rfc_6750_and_rfc_9728() {
        let url = resource_metadata_url("https://h", "/mcp/g/s?x=1");
        assert_eq!(
            url,
            "https://h/.well-known/oauth-protected-resource/mcp/g/s"
        );
        assert_eq!(
            DenyCode::TokenMissing.challenge(Some(&url)).unwrap(),
            format!("Bearer resource_metadata=\"{url}\"")
        );
        let invalid = DenyCode::TokenRevoked.challenge(None).unwrap();
        assert!(
            invalid.starts_with("Bearer error=\"invalid_token\""),
            "{invalid}"
        );
        assert_eq!(DenyCode::HostDisabled.challenge(Some(&url)), None);
    }

    #[test]
    fn statuses_follow_the_contract() {
        assert_eq!(DenyCode::TokenUnknown.status(), 401);
        assert_eq!(DenyCode::TokenWrongGateway.status(), 401);
        assert_eq!(DenyCode::ServerNotExposed.status(), 403);
        assert_eq!(DenyCode::GatewayDisabled.status(), 403);
        assert_eq!(DenyCode::PolicyUnavailable.status(), 503);
        assert!(!DenyCode::TokenMissing.is_invalid_token());
        assert!(DenyCode::TokenRevoked.is_invalid_token());
    }

    #[test]
    fn check_messages_round_trip() {
        let req = CheckRequest {
            credential: Credential::ApiToken {
                hash: "ab".repeat(32),
            },
            gateway: Some("eng".into()),
            server: "github".into(),
            mcp_method: Some("tools/call".into()),
            tool: None,
            request_id: None,
            item: None,
            each_server: None,
        };
        let json = serde_json::to_string(&req).unwrap();
        assert_eq!(serde_json::from_str::<CheckRequest>(&json).unwrap(), req);
        assert!(json.contains(r#""kind":"api_token""#));
        let oauth = Credential::Oauth {
            token: "eyJ.secret.sig".into(),
            resource: "http://gw/mcp/eng/github".into(),
        };
        assert!(!format!("{oauth:?}").contains("secret"));
        // The ids of old never prove anything: such a request does not parse.
        assert!(
            serde_json::from_str::<Credential>(
                r#"{"kind":"oauth","grant":1,"connection":1,"jti":"x"}"#
            )
            .is_err()
        );

        let allow = CheckResponse::Allow {
            upstream: Upstream {
                scheme: Scheme::Https,
                authority: "api.example.com:443".into(),
                base_path: "/mcp".into(),
                address: Some("192.0.2.7:443".into()),
            },
            inject: Some(InjectHeader {
                name: "authorization".into(),
                value: "Bearer s3cret".into(),
            }),
            list_filter: None,
        };
        let json = serde_json::to_string(&allow).unwrap();
        assert_eq!(serde_json::from_str::<CheckResponse>(&json).unwrap(), allow);
        assert!(!format!("{allow:?}").contains("s3cret"));

        let gateway = CheckResponse::Gateway {
            servers: vec!["a".into(), "b".into()],
            answers: BTreeMap::new(),
        };
        let json = serde_json::to_string(&gateway).unwrap();
        assert_eq!(json, r#"{"decision":"gateway","servers":["a","b"]}"#);
        assert_eq!(
            serde_json::from_str::<CheckResponse>(&json).unwrap(),
            gateway
        );
        let each = CheckResponse::Gateway {
            servers: vec!["a".into()],
            answers: BTreeMap::from([("a".to_owned(), allow.clone())]),
        };
        let json = serde_json::to_string(&each).unwrap();
        assert_eq!(serde_json::from_str::<CheckResponse>(&json).unwrap(), each);
        let mut level = req.clone();
        level.server = String::new();
        let json = serde_json::to_string(&level).unwrap();
        assert!(!json.contains("server"), "{json}");
        assert_eq!(serde_json::from_str::<CheckRequest>(&json).unwrap(), level);
        for (each, wire) in [
            (EachServer::All, r#""each_server":"all""#),
            (
                EachServer::Only(vec!["a".into()]),
                r#""each_server":{"only":["a"]}"#,
            ),
        ] {
            level.each_server = Some(each);
            let json = serde_json::to_string(&level).unwrap();
            assert!(json.contains(wire), "{json}");
            assert_eq!(serde_json::from_str::<CheckRequest>(&json).unwrap(), level);
        }

        let deny: CheckResponse =
            serde_json::from_str(r#"{"decision":"deny","code":"connection_disabled"}"#).unwrap();
        assert_eq!(
            deny,
            CheckResponse::Deny {
                code: DenyCode::ConnectionDisabled
            }
        );
    }

    #[test]
    fn only_refusals_past_the_gateways_grant_are_of_one_server() {
        let of_the_caller = [
            DenyCode::TokenMissing,
            DenyCode::TokenMalformed,
            DenyCode::TokenUnknown,
            DenyCode::TokenRevoked,
            DenyCode::TokenExpired,
            DenyCode::TokenWrongGateway,
            DenyCode::UnknownRoute,
            DenyCode::HostDisabled,
            DenyCode::HostPending,
            DenyCode::UserDisabled,
            DenyCode::ConnectionDisabled,
            DenyCode::GatewayDisabled,
            DenyCode::GatewayNotGranted,
            DenyCode::PolicyUnavailable,
            DenyCode::RequestUnreadable,
            DenyCode::RequestTooLarge,
        ];
        for code in DenyCode::ALL {
            assert_eq!(
                code.is_server_level(),
                !of_the_caller.contains(&code),
                "{code:?}"
            );
        }
    }
}
