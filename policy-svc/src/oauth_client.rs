//! mcpguard as an OAuth client of an upstream's authorization server (issue 24):
//! discovery as an MCP client does it (the upstream's 401 and its protected-resource
//! metadata, RFC 9728, then the authorization server's metadata, RFC 8414), dynamic
//! client registration (RFC 7591), PKCE S256, `resource` (RFC 8707), and the token
//! endpoint's answers. The parsing is pure and tested here; the HTTP calls are thin.
//!
//! Nothing here logs a token or a secret: errors name the endpoint and the status,
//! never a body that could hold one.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

/// How long one call to an authorization server (or the upstream, for discovery) may
/// take, and how much of its answer is read.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_BODY: usize = 64 * 1024;
/// An access token without `expires_in` is taken to live this long.
const DEFAULT_LIFETIME_MS: i64 = 3_600_000;

/// Why talking to an authorization server failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// It answered, and said no (a 4xx on the token endpoint: `invalid_grant` and
    /// friends). For a refresh, the identity needs reconnecting.
    #[error("{what} refused: HTTP {status} {error}")]
    Refused {
        what: &'static str,
        status: u16,
        /// The RFC 6749 `error` code, if the body had one (never the description,
        /// which a server might fill with anything).
        error: String,
    },
    /// No usable answer: unreachable, timed out, 5xx, or not what the RFCs say.
    #[error("{0}")]
    Unavailable(String),
    /// Not called: the URL's host is not an address the upstream network policy
    /// permits (an upstream names its authorization server, so a hostile one could
    /// otherwise point this service at its own ports or the cloud metadata service).
    #[error("{url}: not called: {why}")]
    NotAllowed { url: String, why: String },
}

fn unavailable(what: impl std::fmt::Display) -> ClientError {
    ClientError::Unavailable(what.to_string())
}

/// What discovery found (or the admin configured): enough to run the flows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discovered {
    pub issuer: String,
    pub authorization_endpoint: String,
    pub token_endpoint: String,
    pub registration_endpoint: Option<String>,
    pub revocation_endpoint: Option<String>,
    /// The RFC 8707 resource to ask tokens for: the upstream.
    pub resource: String,
}

/// A PKCE pair: a fresh verifier (43 base64url characters, 256 random bits) and its
/// S256 challenge.
pub fn pkce_pair() -> Result<(String, String), getrandom::Error> {
    let verifier = crate::secrets::random_id()?;
    let challenge = mcpguard_core::oauth::s256_challenge(&verifier);
    Ok((verifier, challenge))
}

/// The `resource_metadata` parameter of a `WWW-Authenticate: Bearer …` challenge
/// (RFC 9728 §5.1), if it has one.
pub fn resource_metadata_of(challenge: &str) -> Option<String> {
    let rest = challenge.trim_start();
    let params = rest
        .strip_prefix("Bearer")
        .or_else(|| rest.strip_prefix("bearer"))?;
    auth_params(params)
        .into_iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("resource_metadata"))
        .map(|(_, v)| v)
}

/// `name=value` and `name="quoted \"value\""` pairs, comma separated (RFC 9110 §11.2).
fn auth_params(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace() || *c == ',') {
            chars.next();
        }
        let name: String = std::iter::from_fn(|| chars.next_if(|c| *c != '=' && *c != ','))
            .collect::<String>()
            .trim()
            .to_owned();
        if name.is_empty() || chars.next() != Some('=') {
            return out;
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            value = std::iter::from_fn(|| chars.next_if(|c| *c != ','))
                .collect::<String>()
                .trim()
                .to_owned();
        }
        out.push((name, value));
    }
}

/// RFC 9728 §3.1: where an upstream's protected-resource metadata lives when its 401
/// does not say: the well-known prefix inserted before the resource's path.
pub fn resource_metadata_url(upstream: &url::Url) -> String {
    let path = upstream.path().trim_end_matches('/');
    format!(
        "{}{}{path}",
        origin(upstream),
        mcpguard_core::oauth::RESOURCE_METADATA_PREFIX
    )
}

/// RFC 8414 §3.1: the authorization server's metadata, the well-known prefix inserted
/// before the issuer's path; then OpenID Connect discovery's, which many servers have.
pub fn authorization_server_metadata_urls(issuer: &url::Url) -> Vec<String> {
    let path = issuer.path().trim_end_matches('/');
    let base = origin(issuer);
    vec![
        format!("{base}/.well-known/oauth-authorization-server{path}"),
        format!("{base}{path}/.well-known/openid-configuration"),
    ]
}

fn origin(url: &url::Url) -> String {
    url.origin().ascii_serialization()
}

#[derive(Deserialize)]
struct ProtectedResource {
    resource: Option<String>,
    #[serde(default)]
    authorization_servers: Vec<String>,
}

/// From the protected-resource metadata of `upstream`: the resource to name (the
/// metadata's, which must be the upstream's origin, or the upstream itself) and the
/// first authorization server.
pub fn parse_resource_metadata(
    upstream: &url::Url,
    body: &[u8],
) -> Result<(String, String), ClientError> {
    let meta: ProtectedResource = serde_json::from_slice(body)
        .map_err(|e| unavailable(format!("protected-resource metadata: {e}")))?;
    let resource = match meta.resource {
        Some(r) => {
            let parsed = url::Url::parse(&r)
                .map_err(|_| unavailable("protected-resource metadata: resource is no URL"))?;
            // RFC 9728 §3.3: the metadata speaks for the resource it was fetched for;
            // one naming another origin is refused.
            if parsed.origin() != upstream.origin() {
                return Err(unavailable(format!(
                    "protected-resource metadata names another origin ({r})"
                )));
            }
            r
        }
        None => upstream.to_string(),
    };
    let server = meta
        .authorization_servers
        .into_iter()
        .next()
        .ok_or_else(|| unavailable("protected-resource metadata lists no authorization server"))?;
    Ok((resource, server))
}

#[derive(Deserialize)]
struct ServerMetadata {
    issuer: String,
    authorization_endpoint: String,
    token_endpoint: String,
    registration_endpoint: Option<String>,
    revocation_endpoint: Option<String>,
    code_challenge_methods_supported: Option<Vec<String>>,
}

/// The authorization server's metadata, fetched for `issuer`: it must name that issuer
/// (RFC 8414 §3.3) and offer PKCE S256 if it lists its methods; its endpoints must be
/// URLs.
pub fn parse_server_metadata(
    issuer: &str,
    resource: String,
    body: &[u8],
) -> Result<Discovered, ClientError> {
    let meta: ServerMetadata = serde_json::from_slice(body)
        .map_err(|e| unavailable(format!("authorization server metadata: {e}")))?;
    if meta.issuer.trim_end_matches('/') != issuer.trim_end_matches('/') {
        return Err(unavailable(format!(
            "authorization server metadata names issuer {:?}, not {issuer:?}",
            meta.issuer
        )));
    }
    if meta
        .code_challenge_methods_supported
        .as_ref()
        .is_some_and(|m| !m.iter().any(|m| m == "S256"))
    {
        return Err(unavailable(
            "the authorization server does not offer PKCE S256",
        ));
    }
    for endpoint in [&meta.authorization_endpoint, &meta.token_endpoint]
        .into_iter()
        .chain(meta.registration_endpoint.as_ref())
        .chain(meta.revocation_endpoint.as_ref())
    {
        check_endpoint(endpoint)?;
    }
    Ok(Discovered {
        issuer: meta.issuer,
        authorization_endpoint: meta.authorization_endpoint,
        token_endpoint: meta.token_endpoint,
        registration_endpoint: meta.registration_endpoint,
        revocation_endpoint: meta.revocation_endpoint,
        resource,
    })
}

/// An endpoint is an http(s) URL without a fragment.
pub fn check_endpoint(endpoint: &str) -> Result<url::Url, ClientError> {
    match url::Url::parse(endpoint) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.fragment().is_none() => Ok(u),
        _ => Err(unavailable(format!("{endpoint:?} is no http(s) endpoint"))),
    }
}

/// The authorization request the user's browser is sent to.
pub fn authorize_url(
    authorization_endpoint: &str,
    client_id: &str,
    redirect_uri: &str,
    state: &str,
    challenge: &str,
    resource: &str,
    scope: Option<&str>,
) -> Result<String, ClientError> {
    let mut url = check_endpoint(authorization_endpoint)?;
    {
        let mut q = url.query_pairs_mut();
        q.append_pair("response_type", "code")
            .append_pair("client_id", client_id)
            .append_pair("redirect_uri", redirect_uri)
            .append_pair("state", state)
            .append_pair("code_challenge", challenge)
            .append_pair("code_challenge_method", "S256")
            .append_pair("resource", resource);
        if let Some(scope) = scope {
            q.append_pair("scope", scope);
        }
    }
    Ok(url.into())
}

/// A token endpoint's successful answer. (Its `Debug` shows no token.)
#[derive(Clone, PartialEq, Eq)]
pub struct Tokens {
    pub access_token: String,
    pub refresh_token: Option<String>,
    /// When the access token expires, and when to refresh it: three quarters into
    /// its life, so that a refresh is done while the old token still works.
    pub expires_at: i64,
    pub refresh_at: i64,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("access_token", &"<redacted>")
            .field(
                "refresh_token",
                &self.refresh_token.as_ref().map(|_| "<redacted>"),
            )
            .field("expires_at", &self.expires_at)
            .field("refresh_at", &self.refresh_at)
            .finish()
    }
}

impl std::fmt::Debug for ClientSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientSecret(<redacted>)")
    }
}

/// A client secret, never printed.
#[derive(Clone)]
pub struct ClientSecret(pub String);

#[derive(Deserialize)]
struct TokenBody {
    access_token: String,
    token_type: String,
    expires_in: Option<i64>,
    refresh_token: Option<String>,
}

/// A token endpoint's 200 answer, received at `now_ms`: a bearer access token, one
/// word, with its lifetime.
pub fn parse_tokens(body: &[u8], now_ms: i64) -> Result<Tokens, ClientError> {
    let t: TokenBody = serde_json::from_slice(body)
        .map_err(|_| unavailable("the token endpoint's answer is not a token response"))?;
    if !t.token_type.eq_ignore_ascii_case("bearer") {
        return Err(unavailable(format!(
            "token type {:?} is not bearer",
            t.token_type
        )));
    }
    let one_word =
        |s: &str| !s.is_empty() && s.len() <= 8192 && s.bytes().all(|b| b.is_ascii_graphic());
    if !one_word(&t.access_token) || t.refresh_token.as_deref().is_some_and(|r| !one_word(r)) {
        return Err(unavailable(
            "the token endpoint sent a token that is not one word",
        ));
    }
    let lifetime = t
        .expires_in
        .filter(|s| *s > 0)
        .map_or(DEFAULT_LIFETIME_MS, |s| s.saturating_mul(1000));
    Ok(Tokens {
        access_token: t.access_token,
        refresh_token: t.refresh_token,
        expires_at: now_ms.saturating_add(lifetime),
        refresh_at: now_ms.saturating_add(lifetime / 4 * 3),
    })
}

/// A token endpoint's refusal: 4xx, with the RFC 6749 `error` code if there is one.
/// 5xx and anything else is no answer.
pub fn token_refusal(what: &'static str, status: u16, body: &[u8]) -> ClientError {
    if !(400..500).contains(&status) {
        return unavailable(format!("{what}: HTTP {status}"));
    }
    let error = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("error")?.as_str().map(str::to_owned))
        .filter(|e| e.len() <= 64 && e.bytes().all(|b| b.is_ascii_graphic()))
        .unwrap_or_default();
    ClientError::Refused {
        what,
        status,
        error,
    }
}

/// The HTTP side: no redirects followed (an endpoint is called where its metadata
/// says, nowhere else), bounded in time and size; http or https. Every call connects
/// only to addresses the upstream network policy judged for it just before (the
/// judgement of an upstream's own address, `crate::upstream_policy`), so a name that
/// resolves inside the deployment, then or later (DNS rebinding), is never connected to.
#[derive(Clone)]
pub struct Http {
    outbound: crate::outbound::Outbound,
    upstreams: std::sync::Arc<crate::upstream_policy::UpstreamPolicy>,
}

/// A request's answer: status, the `WWW-Authenticate` header, and the body.
struct Answer {
    status: u16,
    challenge: Option<String>,
    body: Vec<u8>,
}

impl Http {
    /// On the service's outbound client (`crate::outbound`: http, and https verified
    /// against the system's roots and the operator's), redirects not followed.
    pub fn new(
        outbound: &crate::outbound::Outbound,
        upstreams: std::sync::Arc<crate::upstream_policy::UpstreamPolicy>,
    ) -> Http {
        Http {
            outbound: outbound.clone(),
            upstreams,
        }
    }

    /// `url`'s host and the addresses the upstream network policy permits for it now
    /// (all of them permitted, or refused).
    pub async fn judge(&self, url: &str) -> Result<(String, Vec<SocketAddr>), ClientError> {
        let not_allowed = |why: String| ClientError::NotAllowed {
            url: url.to_owned(),
            why,
        };
        let parsed = url::Url::parse(url).map_err(|e| not_allowed(e.to_string()))?;
        let (Some(host), Some(port)) = (parsed.host_str(), parsed.port_or_known_default()) else {
            return Err(not_allowed("no host".into()));
        };
        let addrs = self
            .upstreams
            .resolve(host, port)
            .await
            .map_err(|e| not_allowed(e.to_string()))?;
        Ok((host.to_owned(), addrs))
    }

    /// A client for one call to `url`, pinned to the addresses judged for its host now.
    async fn client_for(&self, url: &str) -> Result<reqwest::Client, ClientError> {
        let (host, addrs) = self.judge(url).await?;
        self.outbound
            .builder()
            .timeout(CALL_TIMEOUT)
            .resolve_to_addrs(&host, &addrs)
            .build()
            .map_err(|e| unavailable(format!("no HTTP client: {}", without_url(&e))))
    }

    async fn send(&self, req: reqwest::RequestBuilder, what: &str) -> Result<Answer, ClientError> {
        let mut resp = req
            .send()
            .await
            .map_err(|e| unavailable(format!("{what}: {}", without_url(&e))))?;
        let status = resp.status().as_u16();
        let challenge = resp
            .headers()
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let mut body = Vec::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| unavailable(format!("{what}: {}", without_url(&e))))?
        {
            if body.len() + chunk.len() > MAX_BODY {
                return Err(unavailable(format!(
                    "{what}: answer larger than {MAX_BODY} bytes"
                )));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Answer {
            status,
            challenge,
            body,
        })
    }

    async fn get_json(&self, url: &str, what: &str) -> Result<Vec<u8>, ClientError> {
        let a = self
            .send(
                self.client_for(url)
                    .await?
                    .get(url)
                    .header("accept", "application/json"),
                what,
            )
            .await?;
        if a.status != 200 {
            return Err(unavailable(format!("{what} at {url}: HTTP {}", a.status)));
        }
        Ok(a.body)
    }

    /// Discovery as an MCP client does it: an unauthenticated MCP request to the
    /// upstream, whose 401 names its protected-resource metadata (else the well-known
    /// URL); that names the authorization server, whose metadata names the endpoints.
    /// With `issuer` set (by the admin), the upstream is not asked.
    pub async fn discover(
        &self,
        upstream: &url::Url,
        issuer: Option<&str>,
    ) -> Result<Discovered, ClientError> {
        let (resource, issuer) = match issuer {
            Some(issuer) => (upstream.to_string(), issuer.to_owned()),
            None => {
                let probe = self
                    .client_for(upstream.as_str())
                    .await?
                    .post(upstream.as_str())
                    .header("content-type", "application/json")
                    .header("accept", "application/json, text/event-stream")
                    .body(r#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"mcpguard","version":"0"}}}"#);
                let a = self.send(probe, "the upstream").await?;
                if a.status != 401 {
                    return Err(unavailable(format!(
                        "the upstream answered HTTP {} without a token, not 401: is it OAuth-protected?",
                        a.status
                    )));
                }
                let metadata_url = a
                    .challenge
                    .as_deref()
                    .and_then(resource_metadata_of)
                    .unwrap_or_else(|| resource_metadata_url(upstream));
                check_endpoint(&metadata_url)?;
                let body = self
                    .get_json(&metadata_url, "protected-resource metadata")
                    .await?;
                parse_resource_metadata(upstream, &body)?
            }
        };
        let issuer_url = check_endpoint(&issuer)?;
        let mut last = unavailable("no authorization server metadata");
        for url in authorization_server_metadata_urls(&issuer_url) {
            match self.get_json(&url, "authorization server metadata").await {
                Ok(body) => return parse_server_metadata(&issuer, resource, &body),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Dynamic client registration (RFC 7591): a client for `redirect_uri`, public if
    /// the server allows it. Returns the client id and its secret, if it issued one.
    pub async fn register(
        &self,
        registration_endpoint: &str,
        redirect_uri: &str,
    ) -> Result<(String, Option<ClientSecret>), ClientError> {
        check_endpoint(registration_endpoint)?;
        let body = serde_json::json!({
            "client_name": "mcpguard",
            "redirect_uris": [redirect_uri],
            "grant_types": ["authorization_code", "refresh_token"],
            "response_types": ["code"],
            "token_endpoint_auth_method": "none",
        });
        let a = self
            .send(
                self.client_for(registration_endpoint)
                    .await?
                    .post(registration_endpoint)
                    .header("content-type", "application/json")
                    .body(body.to_string()),
                "client registration",
            )
            .await?;
        if !(200..300).contains(&a.status) {
            return Err(token_refusal("client registration", a.status, &a.body));
        }
        #[derive(Deserialize)]
        struct Registered {
            client_id: String,
            client_secret: Option<String>,
        }
        let r: Registered = serde_json::from_slice(&a.body)
            .map_err(|_| unavailable("client registration: not a registration response"))?;
        Ok((r.client_id, r.client_secret.map(ClientSecret)))
    }

    /// A token request (`params` besides the client's), at `now_ms`.
    pub async fn token(
        &self,
        what: &'static str,
        token_endpoint: &str,
        client_id: &str,
        secret: Option<&ClientSecret>,
        params: &[(&str, &str)],
        now_ms: i64,
    ) -> Result<Tokens, ClientError> {
        check_endpoint(token_endpoint)?;
        // The serializer is not `Send`: the body is finished before any await.
        let mut pairs: Vec<(&str, &str)> = params.to_vec();
        let mut req = self
            .client_for(token_endpoint)
            .await?
            .post(token_endpoint)
            .header("content-type", "application/x-www-form-urlencoded")
            .header("accept", "application/json");
        match secret {
            // RFC 6749 §2.3.1: client_secret_basic, each part form-encoded.
            Some(ClientSecret(secret)) => {
                let enc = |s: &str| {
                    url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>()
                };
                let basic = mcpguard_core::oauth::base64url(
                    format!("{}:{}", enc(client_id), enc(secret)).as_bytes(),
                );
                // Basic is standard base64, not base64url: translate the two characters
                // and pad.
                let mut basic = basic.replace('-', "+").replace('_', "/");
                while !basic.len().is_multiple_of(4) {
                    basic.push('=');
                }
                req = req.header("authorization", format!("Basic {basic}"));
            }
            None => pairs.push(("client_id", client_id)),
        }
        let a = self.send(req.body(form_body(&pairs)), what).await?;
        if a.status != 200 {
            return Err(token_refusal(what, a.status, &a.body));
        }
        parse_tokens(&a.body, now_ms)
    }

    /// Token revocation (RFC 7009), best effort: its answer changes nothing here.
    pub async fn revoke(
        &self,
        revocation_endpoint: &str,
        client_id: &str,
        token: &str,
    ) -> Result<(), ClientError> {
        check_endpoint(revocation_endpoint)?;
        let body = form_body(&[
            ("token", token),
            ("token_type_hint", "refresh_token"),
            ("client_id", client_id),
        ]);
        let a = self
            .send(
                self.client_for(revocation_endpoint)
                    .await?
                    .post(revocation_endpoint)
                    .header("content-type", "application/x-www-form-urlencoded")
                    .body(body),
                "token revocation",
            )
            .await?;
        if a.status != 200 {
            return Err(unavailable(format!("token revocation: HTTP {}", a.status)));
        }
        Ok(())
    }
}

fn form_body(pairs: &[(&str, &str)]) -> String {
    url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish()
}

/// A reqwest error without its URL (which could carry a query), for logs.
fn without_url(e: &reqwest::Error) -> String {
    let mut e = format!("{}", WithoutUrl(e));
    e.truncate(300);
    e
}

struct WithoutUrl<'a>(&'a reqwest::Error);

impl std::fmt::Display for WithoutUrl<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let e = self.0;
        if e.is_timeout() {
            f.write_str("timed out")
        } else if e.is_connect() {
            f.write_str("could not connect")
        } else if e.is_body() || e.is_decode() {
            f.write_str("the answer broke off")
        } else {
            f.write_str("request failed")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> url::Url {
        url::Url::parse(s).unwrap()
    }

    #[test]
    fn pkce_pairs_are_fresh_and_s256() {
        let (v1, c1) = pkce_pair().unwrap();
        let (v2, _) = pkce_pair().unwrap();
        assert_ne!(v1, v2);
        assert!(mcpguard_core::oauth::is_valid_code_verifier(&v1), "{v1}");
        assert!(mcpguard_core::oauth::pkce_matches(&v1, &c1));
        assert!(mcpguard_core::oauth::is_valid_code_challenge(&c1));
    }

    #[test]
    fn the_resource_metadata_is_read_from_the_challenge() {
        assert_eq!(
            resource_metadata_of(
                r#"Bearer resource_metadata="http://gw:10000/.well-known/oauth-protected-resource/mcp/eng/demo""#
            )
            .as_deref(),
            Some("http://gw:10000/.well-known/oauth-protected-resource/mcp/eng/demo")
        );
        assert_eq!(
            resource_metadata_of(
                r#"Bearer realm="x", error="invalid_token", error_description="a \"quoted\", comma", resource_metadata=https://as/m"#
            )
            .as_deref(),
            Some("https://as/m")
        );
        assert_eq!(resource_metadata_of(r#"Bearer realm="x""#), None);
        assert_eq!(resource_metadata_of(r#"Basic resource_metadata="x""#), None);
        assert_eq!(resource_metadata_of("Bearer"), None);
        assert_eq!(resource_metadata_of("Bearer ===,,\"\\"), None);
    }

    #[test]
    fn well_known_urls_insert_the_prefix_before_the_path() {
        assert_eq!(
            resource_metadata_url(&url("http://gw:10000/mcp/eng/demo")),
            "http://gw:10000/.well-known/oauth-protected-resource/mcp/eng/demo"
        );
        assert_eq!(
            authorization_server_metadata_urls(&url("https://as.example/tenant1")),
            vec![
                "https://as.example/.well-known/oauth-authorization-server/tenant1",
                "https://as.example/tenant1/.well-known/openid-configuration"
            ]
        );
        assert_eq!(
            authorization_server_metadata_urls(&url("http://127.0.0.1:8080"))[0],
            "http://127.0.0.1:8080/.well-known/oauth-authorization-server"
        );
    }

    #[test]
    fn resource_metadata_must_speak_for_the_upstreams_origin() {
        let up = url("http://gw:10000/mcp/eng/demo");
        let ok = br#"{"resource":"http://gw:10000/mcp/eng/demo","authorization_servers":["http://as:9000"]}"#;
        assert_eq!(
            parse_resource_metadata(&up, ok).unwrap(),
            (
                "http://gw:10000/mcp/eng/demo".into(),
                "http://as:9000".into()
            )
        );
        let other =
            br#"{"resource":"http://evil:10000/mcp","authorization_servers":["http://as"]}"#;
        assert!(parse_resource_metadata(&up, other).is_err());
        let none = br#"{"resource":"http://gw:10000/mcp/eng/demo","authorization_servers":[]}"#;
        assert!(parse_resource_metadata(&up, none).is_err());
        assert!(parse_resource_metadata(&up, b"not json").is_err());
    }

    #[test]
    fn server_metadata_must_name_its_issuer_and_offer_s256() {
        let meta = |issuer: &str, methods: &str| {
            format!(
                r#"{{"issuer":"{issuer}","authorization_endpoint":"http://as/oauth/authorize",
                "token_endpoint":"http://as/oauth/token","registration_endpoint":"http://as/oauth/register"
                {methods}}}"#
            )
        };
        let d = parse_server_metadata("http://as", "r".into(), meta("http://as", "").as_bytes())
            .unwrap();
        assert_eq!(d.token_endpoint, "http://as/oauth/token");
        assert_eq!(
            d.registration_endpoint.as_deref(),
            Some("http://as/oauth/register")
        );
        assert_eq!(d.revocation_endpoint, None);
        assert!(
            parse_server_metadata("http://as", "r".into(), meta("http://evil", "").as_bytes())
                .is_err()
        );
        let plain = meta(
            "http://as",
            r#","code_challenge_methods_supported":["plain"]"#,
        );
        assert!(parse_server_metadata("http://as", "r".into(), plain.as_bytes()).is_err());
        let s256 = meta(
            "http://as",
            r#","code_challenge_methods_supported":["S256"]"#,
        );
        assert!(parse_server_metadata("http://as", "r".into(), s256.as_bytes()).is_ok());
        let js = r#"{"issuer":"http://as","authorization_endpoint":"javascript:alert(1)","token_endpoint":"http://as/t"}"#;
        assert!(parse_server_metadata("http://as", "r".into(), js.as_bytes()).is_err());
    }

    #[test]
    fn the_authorization_request_carries_pkce_state_and_resource() {
        let u = authorize_url(
            "http://as/oauth/authorize?tenant=1",
            "cid",
            "http://me/oauth/connect/callback",
            "st&ate",
            "chal",
            "http://gw/mcp/eng/demo",
            None,
        )
        .unwrap();
        let parsed = url("http://x").join(&u).unwrap();
        let q: std::collections::HashMap<_, _> = parsed.query_pairs().into_owned().collect();
        assert_eq!(q["tenant"], "1");
        assert_eq!(q["state"], "st&ate");
        assert_eq!(q["code_challenge_method"], "S256");
        assert_eq!(q["resource"], "http://gw/mcp/eng/demo");
        assert!(!q.contains_key("scope"));
    }

    #[test]
    fn token_answers_are_bearer_tokens_refreshed_three_quarters_into_their_life() {
        let t = parse_tokens(
            br#"{"access_token":"at","token_type":"Bearer","expires_in":4,"refresh_token":"rt"}"#,
            1_000,
        )
        .unwrap();
        assert_eq!((t.expires_at, t.refresh_at), (5_000, 4_000));
        assert_eq!(t.refresh_token.as_deref(), Some("rt"));
        let shown = format!("{t:?}");
        assert!(
            !shown.contains("\"at\"") && !shown.contains("rt"),
            "{shown}"
        );
        let no_expiry = parse_tokens(br#"{"access_token":"at","token_type":"bearer"}"#, 0).unwrap();
        assert_eq!(no_expiry.expires_at, DEFAULT_LIFETIME_MS);
        assert!(parse_tokens(br#"{"access_token":"at","token_type":"mac"}"#, 0).is_err());
        assert!(parse_tokens(br#"{"access_token":"a t","token_type":"bearer"}"#, 0).is_err());
        assert!(parse_tokens(br#"{"access_token":"","token_type":"bearer"}"#, 0).is_err());
        assert!(parse_tokens(b"<html>", 0).is_err());
    }

    #[test]
    fn a_4xx_is_a_refusal_and_a_5xx_no_answer() {
        match token_refusal(
            "refresh",
            400,
            br#"{"error":"invalid_grant","error_description":"secret stuff"}"#,
        ) {
            ClientError::Refused { status, error, .. } => {
                assert_eq!((status, error.as_str()), (400, "invalid_grant"));
            }
            e => panic!("{e:?}"),
        }
        assert!(matches!(
            token_refusal("refresh", 401, b"nope"),
            ClientError::Refused { .. }
        ));
        assert!(matches!(
            token_refusal("refresh", 503, b""),
            ClientError::Unavailable(_)
        ));
        let shown = token_refusal(
            "refresh",
            400,
            br#"{"error":"invalid_grant","error_description":"secret stuff"}"#,
        )
        .to_string();
        assert!(!shown.contains("secret"), "{shown}");
    }
}
