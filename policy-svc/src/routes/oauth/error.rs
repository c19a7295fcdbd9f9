//! The OAuth endpoints' errors: RFC 6749 §5.2 bodies, never cached.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::pages::{PageError, no_store};
use crate::store;

/// An RFC 6749 §5.2 error response.
#[derive(Debug)]
pub struct OauthError {
    status: StatusCode,
    error: &'static str,
    description: String,
}

impl OauthError {
    pub fn new(status: StatusCode, error: &'static str, description: impl Into<String>) -> Self {
        OauthError {
            status,
            error,
            description: description.into(),
        }
    }

    pub fn invalid_request(description: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", description)
    }

    pub fn invalid_grant(description: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_grant", description)
    }

    pub fn server_error(e: impl std::fmt::Display) -> Self {
        tracing::error!(error = %e, "oauth: internal error");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "temporarily_unavailable",
            "try again",
        )
    }
}

impl From<store::StoreError> for OauthError {
    fn from(e: store::StoreError) -> Self {
        OauthError::server_error(e)
    }
}

impl IntoResponse for OauthError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"error": self.error, "error_description": self.description});
        no_store((self.status, axum::Json(body)).into_response())
    }
}

/// The sign-in and consent pages answer a failure of the store (or of the OS's
/// randomness) as the OAuth endpoints do: 503 `temporarily_unavailable`.
impl From<OauthError> for PageError {
    fn from(e: OauthError) -> Self {
        PageError::shown(e.into_response())
    }
}
