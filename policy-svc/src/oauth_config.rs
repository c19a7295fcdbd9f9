//! The OAuth authorization server's settings: built from the command line by
//! `Config::oauth`, read by the OAuth routes, the access-token verification of the check
//! port, and the enrollment pages (whose links live under the issuer).

use crate::signin::Network;

/// OAuth settings, from the command line (`Config::oauth`).
#[derive(Debug, Clone)]
pub struct OauthConfig {
    /// This service's public URL, no trailing slash.
    pub issuer: String,
    /// Data-plane base URLs under which resources may be named.
    pub resource_base_urls: Vec<String>,
    pub access_token_ttl_secs: i64,
    pub refresh_token_ttl_ms: i64,
    /// Peers whose `X-Forwarded-For` names the client of a sign-in (`--trusted-proxies`).
    pub trusted_proxies: Vec<Network>,
    /// New headed hosts wait for approval on every gateway (`--approve-new-hosts`).
    pub approve_new_hosts: bool,
}

impl OauthConfig {
    pub fn for_tests() -> Self {
        OauthConfig {
            issuer: "http://127.0.0.1:8080".into(),
            resource_base_urls: vec!["http://127.0.0.1:10000".into()],
            access_token_ttl_secs: 300,
            refresh_token_ttl_ms: 86_400_000,
            trusted_proxies: Vec::new(),
            approve_new_hosts: false,
        }
    }

    /// How long a retired key stays published: its last token's lifetime, and a
    /// margin for clocks and in-flight requests.
    pub fn max_token_age_ms(&self) -> i64 {
        (self.access_token_ttl_secs + 60) * 1000
    }
}
