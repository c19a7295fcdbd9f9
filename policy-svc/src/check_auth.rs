//! Who may call the check port. Its answers carry downstream credentials (shared
//! service credentials, users' identities), so only Envoy may ask: every request but
//! the public documents (`/healthz`, `/metrics`, and the RFC 9728 metadata that Envoy's
//! ext_authz mode routes here for clients) must carry the check secret in [`HEADER`], which Envoy adds to each
//! request of its policy cluster (an upstream `header_mutation` filter on the cluster,
//! from its own environment: `envoy/mcpguard.yaml`). Anything else gets 401 and
//! nothing else. In a mesh, where mutual TLS and an AuthorizationPolicy already admit
//! only the gateway's workload identity to this port, `--check-auth mesh` hands the
//! job to the mesh instead.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The request header that carries the check secret.
pub const HEADER: &str = "x-mcpguard-check-secret";

/// Shortest secret accepted: 32 characters (the generated ones are 64 hex digits).
pub const MIN_SECRET: usize = 32;

#[derive(Clone)]
pub enum CheckAuth {
    /// The SHA-256 of the secret; compared in constant time.
    Secret(Arc<[u8; 32]>),
    /// The mesh authenticates callers (Istio mTLS plus an AuthorizationPolicy).
    Mesh,
}

impl CheckAuth {
    pub fn secret(secret: &str) -> anyhow::Result<CheckAuth> {
        let secret = secret.trim();
        anyhow::ensure!(
            secret.len() >= MIN_SECRET && secret.bytes().all(|b| b.is_ascii_graphic()),
            "the check secret must be at least {MIN_SECRET} visible ASCII characters"
        );
        Ok(CheckAuth::Secret(Arc::new(Sha256::digest(secret).into())))
    }

    /// The secret in `path`, created (64 random hex digits, mode 0600) when missing.
    pub fn from_file(path: &Path) -> anyhow::Result<CheckAuth> {
        if !path.exists() {
            let mut bytes = [0u8; 32];
            getrandom::fill(&mut bytes)?;
            crate::write_secret_file(path, &hex::encode(bytes))?;
            tracing::info!(path = %path.display(), "created a new check secret: give it to Envoy as MCPGUARD_CHECK_SECRET");
        }
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the check secret {}", path.display()))?;
        Self::secret(&text).with_context(|| format!("in {}", path.display()))
    }

    fn admits(&self, presented: Option<&HeaderValue>) -> bool {
        match self {
            CheckAuth::Mesh => true,
            CheckAuth::Secret(expected) => presented.is_some_and(|v| {
                let got: [u8; 32] = Sha256::digest(v.as_bytes()).into();
                bool::from(got.ct_eq(expected.as_ref()))
            }),
        }
    }
}

/// Middleware in front of the check port's routes.
pub async fn require(State(auth): State<CheckAuth>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    // `/metrics` serves counts under fixed labels, nothing from the store: Prometheus
    // scrapes it without the secret (docs/observability.md).
    let public = path == "/healthz"
        || path == "/metrics"
        || path.starts_with(mcpguard_core::oauth::RESOURCE_METADATA_PREFIX);
    if public || auth.admits(req.headers().get(HEADER)) {
        return next.run(req).await;
    }
    let body = serde_json::json!({"error": {
        "code": "check_unauthenticated",
        "message": format!("the check port answers only Envoy: send the check secret in {HEADER}"),
    }});
    let mut response = (StatusCode::UNAUTHORIZED, body.to_string()).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::Router;
    use axum::body::Body;
    use axum::routing::{get, post};
    use tower::ServiceExt;

    fn app(auth: CheckAuth) -> Router {
        Router::new()
            .route("/v1/check", post(|| async { "answer" }))
            .route("/healthz", get(|| async { "ok" }))
            .layer(axum::middleware::from_fn_with_state(auth, require))
    }

    async fn status(app: Router, path: &str, secret: Option<&[u8]>) -> StatusCode {
        let mut req = Request::builder()
            .method(if path == "/healthz" { "GET" } else { "POST" })
            .uri(path);
        if let Some(s) = secret {
            req = req.header(HEADER, HeaderValue::from_bytes(s).unwrap());
        }
        app.oneshot(req.body(Body::empty()).unwrap())
            .await
            .unwrap()
            .status()
    }

    #[tokio::test]
    async fn only_the_secret_opens_the_check_port() {
        let secret = "s".repeat(40);
        let auth = CheckAuth::secret(&format!("{secret}\n")).unwrap();
        assert_eq!(
            status(app(auth.clone()), "/v1/check", Some(secret.as_bytes())).await,
            StatusCode::OK
        );
        for wrong in [None, Some(&b""[..]), Some(b"sss"), Some(&[0xff; 40][..])] {
            assert_eq!(
                status(app(auth.clone()), "/v1/check", wrong).await,
                StatusCode::UNAUTHORIZED,
                "{wrong:?}"
            );
        }
        let one_off = format!("{}t", &secret[..39]);
        assert_eq!(
            status(app(auth.clone()), "/v1/check", Some(one_off.as_bytes())).await,
            StatusCode::UNAUTHORIZED
        );
        // Readiness probes need no secret, and learn nothing.
        assert_eq!(status(app(auth), "/healthz", None).await, StatusCode::OK);
        assert_eq!(
            status(app(CheckAuth::Mesh), "/v1/check", None).await,
            StatusCode::OK
        );
    }

    #[test]
    fn short_or_odd_secrets_are_refused() {
        assert!(CheckAuth::secret("short").is_err());
        assert!(CheckAuth::secret(&format!("{} x", "a".repeat(40))).is_err());
        assert!(CheckAuth::secret(&"a".repeat(32)).is_ok());
    }

    #[test]
    fn a_missing_secret_file_is_created_private_and_reused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("check-secret");
        CheckAuth::from_file(&path).unwrap();
        let first = std::fs::read_to_string(&path).unwrap();
        assert_eq!(first.trim().len(), 64);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        CheckAuth::from_file(&path).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), first);
    }
}
