//! Plugin configuration, parsed once in the root context.

use serde::Deserialize;

/// Given to Envoy as a JSON `google.protobuf.StringValue` in the wasm filter's
/// `configuration`. Unknown fields are refused so a typo fails at load, not at 3 a.m.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterConfig {
    /// Envoy cluster that reaches the policy service's check port.
    pub policy_cluster: String,
    /// `:authority` sent on check callouts.
    #[serde(default = "default_policy_authority")]
    pub policy_authority: String,
    /// Deadline for one check callout; past it the request is refused with 503.
    #[serde(default = "default_check_timeout_ms")]
    pub check_timeout_ms: u64,
    /// Public base URL of this gateway (`https://mcp.example.com`), used for the
    /// `resource_metadata` URL in 401s. When unset it is taken from the request's
    /// `:scheme` and `:authority`.
    #[serde(default)]
    pub public_base_url: Option<String>,
    /// The policy service's public URL, as the OAuth issuer. When set, the filter
    /// accepts OAuth access tokens (JWTs) from headed hosts and serves each MCP URL's
    /// protected-resource metadata (RFC 9728) naming it as the authorization server.
    #[serde(default)]
    pub issuer: Option<String>,
    /// Verification keys (a JWKS document), when they are given here. Without them the
    /// filter fetches the policy service's JWKS through `policy_cluster`.
    #[serde(default)]
    pub jwks: Option<serde_json::Value>,
    /// Seconds between JWKS refreshes from the policy service.
    #[serde(default = "default_jwks_refresh_s")]
    pub jwks_refresh_s: u64,
    /// Sidecar mode: the filter sits in the pod of one MCP server (an Istio sidecar's
    /// inbound listener) and lets authorised requests go on to the route's own cluster,
    /// the app beside it, instead of to an upstream the policy service names.
    #[serde(default)]
    pub sidecar: Option<Sidecar>,
    /// How checks reach the policy service. EXPERIMENTAL (issue 27): `stream` carries
    /// them as messages on one gRPC stream per Envoy worker (`policy_cluster` must then
    /// speak HTTP/2); the default is one HTTP/2 callout per check.
    #[serde(default)]
    pub check_transport: CheckTransport,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckTransport {
    /// One `POST /v1/check` per request.
    #[default]
    Http,
    /// `mcpguard_core::check_stream`: one long-lived stream per worker.
    Stream,
}

/// The one server a sidecar fronts. Requests are `/mcp/{gateway}/{server}[/rest]` with
/// `server` this one's slug (any other is refused 404 without a callout, so no client
/// can have another server's credential injected into this app); the check asks about
/// this server, and the app receives `app_path` followed by the rest and the query.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sidecar {
    /// The slug the server is registered under in the policy service.
    pub server: String,
    /// The path the app serves MCP on.
    #[serde(default = "default_app_path")]
    pub app_path: String,
}

fn default_app_path() -> String {
    "/mcp".to_owned()
}

const fn default_jwks_refresh_s() -> u64 {
    30
}

fn default_policy_authority() -> String {
    "mcpguard-policy".to_owned()
}

const fn default_check_timeout_ms() -> u64 {
    300
}

/// Upper bound on the check deadline: a longer one would hold client requests hostage
/// to a sick policy service.
pub const MAX_CHECK_TIMEOUT_MS: u64 = 10_000;

/// A rotation is announced (the next key published) at least this long before the key
/// signs; refreshing less often would refuse fresh tokens after a rotation.
pub const MAX_JWKS_REFRESH_S: u64 = 3600;

impl FilterConfig {
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        let config: FilterConfig = serde_json::from_slice(bytes)
            .map_err(|e| format!("invalid mcpguard filter configuration: {e}"))?;
        if config.policy_cluster.is_empty() {
            return Err("policy_cluster must name the Envoy cluster of the policy service".into());
        }
        if !(1..=MAX_CHECK_TIMEOUT_MS).contains(&config.check_timeout_ms) {
            return Err(format!(
                "check_timeout_ms must be between 1 and {MAX_CHECK_TIMEOUT_MS}"
            ));
        }
        let base_ok = |url: &str| {
            (url.starts_with("http://") || url.starts_with("https://"))
                && !url.ends_with('/')
                && !url.contains(char::is_whitespace)
        };
        for (field, url) in [
            ("public_base_url", &config.public_base_url),
            ("issuer", &config.issuer),
        ] {
            if let Some(url) = url.as_deref().filter(|u| !base_ok(u)) {
                return Err(format!(
                    "{field} must be an http(s) URL without a trailing slash, got {url:?}"
                ));
            }
        }
        if !(1..=MAX_JWKS_REFRESH_S).contains(&config.jwks_refresh_s) {
            return Err(format!(
                "jwks_refresh_s must be between 1 and {MAX_JWKS_REFRESH_S}"
            ));
        }
        if let Some(jwks) = &config.jwks {
            if config.issuer.is_none() {
                return Err("jwks is only used with issuer: set both".into());
            }
            let keys =
                mcpguard_core::jwt::Keys::from_value(jwks).map_err(|e| format!("jwks: {e}"))?;
            if keys.is_empty() {
                return Err("jwks holds no Ed25519 key".into());
            }
        }
        if let Some(sidecar) = &config.sidecar {
            if !mcpguard_core::route::is_valid_slug(&sidecar.server) {
                return Err(format!(
                    "sidecar.server must be the slug of the server this sidecar fronts, got {:?}",
                    sidecar.server
                ));
            }
            // Only plain path characters: the app's path is set verbatim as `:path`.
            let plain = |b: u8| b.is_ascii_alphanumeric() || b"/-._~".contains(&b);
            if !sidecar.app_path.starts_with('/') || !sidecar.app_path.bytes().all(plain) {
                return Err(format!(
                    "sidecar.app_path must be a plain absolute path such as \"/mcp\", got {:?}",
                    sidecar.app_path
                ));
            }
        }
        Ok(config)
    }

    /// The mode, for the log line that says the filter is configured.
    pub fn mode(&self) -> String {
        match &self.sidecar {
            None => "gateway mode".to_owned(),
            Some(s) => format!("sidecar mode for server {:?} at {}", s.server, s.app_path),
        }
    }

    /// Whether the keys come from the policy service (no `jwks` given here).
    pub fn fetches_jwks(&self) -> bool {
        self.issuer.is_some() && self.jwks.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_config_gets_defaults() {
        let c = FilterConfig::parse(br#"{"policy_cluster":"mcpguard_policy"}"#).unwrap();
        assert_eq!(c.policy_cluster, "mcpguard_policy");
        assert_eq!(c.policy_authority, "mcpguard-policy");
        assert_eq!(c.check_timeout_ms, 300);
        assert_eq!(c.public_base_url, None);
        assert_eq!((c.issuer, c.jwks, c.jwks_refresh_s), (None, None, 30));
        assert_eq!(c.sidecar, None, "gateway mode unless asked");
        assert_eq!(c.check_transport, CheckTransport::Http);
        let c =
            FilterConfig::parse(br#"{"policy_cluster":"p","check_transport":"stream"}"#).unwrap();
        assert_eq!(c.check_transport, CheckTransport::Stream);
        assert!(
            FilterConfig::parse(br#"{"policy_cluster":"p","check_transport":"grpc"}"#).is_err()
        );
    }

    #[test]
    fn sidecar_names_a_server_slug_and_a_plain_app_path() {
        let c =
            FilterConfig::parse(br#"{"policy_cluster":"p","sidecar":{"server":"demo"}}"#).unwrap();
        assert_eq!(
            c.sidecar,
            Some(Sidecar {
                server: "demo".into(),
                app_path: "/mcp".into()
            })
        );
        for (bad, why) in [
            (r#"{"server":"Demo"}"#, "sidecar.server"),
            (r#"{"server":""}"#, "sidecar.server"),
            (r#"{}"#, "server"),
            (r#"{"server":"demo","app_path":"mcp"}"#, "app_path"),
            (r#"{"server":"demo","app_path":"/a?b"}"#, "app_path"),
            (r#"{"server":"demo","app_path":"/a%2e"}"#, "app_path"),
            (r#"{"server":"demo","upstream":"x"}"#, "unknown field"),
        ] {
            let json = format!(r#"{{"policy_cluster":"p","sidecar":{bad}}}"#);
            let err = FilterConfig::parse(json.as_bytes()).unwrap_err();
            assert!(err.contains(why), "{bad}: {err} should mention {why}");
        }
    }

    #[test]
    fn oauth_fields_are_checked_at_load() {
        let c =
            FilterConfig::parse(br#"{"policy_cluster":"p","issuer":"http://as:8080"}"#).unwrap();
        assert!(c.fetches_jwks());
        let (_, jwks) = mcpguard_core::jwt::testing::key(1, "k1");
        let inline =
            serde_json::json!({"policy_cluster": "p", "issuer": "http://as", "jwks": jwks});
        let c = FilterConfig::parse(inline.to_string().as_bytes()).unwrap();
        assert!(!c.fetches_jwks());
        for (bad, why) in [
            (r#"{"policy_cluster":"p","issuer":"as"}"#, "issuer"),
            (
                r#"{"policy_cluster":"p","issuer":"http://as","jwks_refresh_s":0}"#,
                "jwks_refresh_s",
            ),
            (r#"{"policy_cluster":"p","jwks":{"keys":[]}}"#, "issuer"),
            (
                r#"{"policy_cluster":"p","issuer":"http://as","jwks":{"keys":[]}}"#,
                "no Ed25519",
            ),
            (
                r#"{"policy_cluster":"p","issuer":"http://as","jwks":{}}"#,
                "jwks",
            ),
        ] {
            let err = FilterConfig::parse(bad.as_bytes()).unwrap_err();
            assert!(err.contains(why), "{err} should mention {why}");
        }
    }

    #[test]
    fn bad_configs_are_refused_with_a_reason() {
        for (bad, why) in [
            (&b""[..], "invalid"),
            (br#"{}"#, "policy_cluster"),
            (br#"{"policy_cluster":""}"#, "policy_cluster"),
            (br#"{"policy_cluster":"p","typo":1}"#, "unknown field"),
            (
                br#"{"policy_cluster":"p","check_timeout_ms":0}"#,
                "check_timeout_ms",
            ),
            (
                br#"{"policy_cluster":"p","check_timeout_ms":60000}"#,
                "check_timeout_ms",
            ),
            (
                br#"{"policy_cluster":"p","public_base_url":"example.com"}"#,
                "public_base_url",
            ),
            (
                br#"{"policy_cluster":"p","public_base_url":"https://x/"}"#,
                "public_base_url",
            ),
        ] {
            let err = FilterConfig::parse(bad).unwrap_err();
            assert!(err.contains(why), "{err} should mention {why}");
        }
    }
}
