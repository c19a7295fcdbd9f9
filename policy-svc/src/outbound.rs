//! HTTP clients for what the policy service itself calls: an upstream's live lists
//! (feature provisioning) and the OTLP collector (audit export). One builder, so each
//! speaks https the same way: rustls, certificates verified against the system's roots
//! (`/etc/ssl/certs`, as Envoy's shipped config) plus the operator's own
//! (`--trusted-ca-file`), the name checked, TLS 1.2 at least.

use std::path::Path;
use std::sync::Arc;

/// What every outbound client trusts besides the system's roots.
#[derive(Clone, Default)]
pub struct Outbound {
    extra_roots: Arc<Vec<reqwest::Certificate>>,
}

impl std::fmt::Debug for Outbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbound")
            .field("extra_roots", &self.extra_roots.len())
            .finish()
    }
}

impl Outbound {
    /// With the PEM certificates of `ca_file` trusted too. A file that cannot be read,
    /// or holds no certificate, stops the start: a typo must not leave https silently
    /// failing later.
    pub fn load(ca_file: Option<&Path>) -> anyhow::Result<Self> {
        let Some(path) = ca_file else {
            return Ok(Outbound::default());
        };
        let pem = std::fs::read(path)
            .map_err(|e| anyhow::anyhow!("--trusted-ca-file {}: {e}", path.display()))?;
        let roots = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| anyhow::anyhow!("--trusted-ca-file {}: {e}", path.display()))?;
        anyhow::ensure!(
            !roots.is_empty(),
            "--trusted-ca-file {}: no PEM certificate in it",
            path.display()
        );
        Ok(Outbound {
            extra_roots: Arc::new(roots),
        })
    }

    /// A client builder for http and https, redirects not followed (a redirect could
    /// lead anywhere, past the address the upstream policy judged).
    pub fn builder(&self) -> reqwest::ClientBuilder {
        reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .tls_version_min(reqwest::tls::Version::TLS_1_2)
            .tls_certs_merge(self.extra_roots.iter().cloned())
    }
}
