//! The service's one error type, mapped to HTTP once. Every refusal is
//! `{"error":{"code","message"}}`; internal details are logged, never returned.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::auth::Capability;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{message}")]
    BadRequest { code: &'static str, message: String },
    #[error("a valid admin token is required: send Authorization: Bearer <admin token>")]
    Unauthenticated,
    #[error("this call needs the capability {0}")]
    MissingCapability(Capability),
    /// Refused for a reason other than a missing capability (a host-bound admin token
    /// outside its host, a token for a user who did not consent).
    #[error("{message}")]
    Forbidden { code: &'static str, message: String },
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("method not allowed on this path")]
    MethodNotAllowed,
    #[error("{message}")]
    Conflict { code: &'static str, message: String },
    #[error("{message}")]
    Unprocessable { code: &'static str, message: String },
    /// An upstream the service itself called (an MCP server whose lists it fetched)
    /// failed: 502.
    #[error("{message}")]
    BadGateway { code: &'static str, message: String },
    #[error("the request body is larger than this endpoint accepts")]
    BodyTooLarge,
    #[error("the request took too long to arrive or to answer")]
    RequestTimeout,
    #[error("temporarily unavailable, try again")]
    Unavailable,
    /// Too many password hashes at once (`crate::signin::Busy`): 503 with `Retry-After`.
    #[error("too many password hashes at once; try again in a second")]
    Busy,
    #[error("internal error")]
    Internal(#[source] StoreError),
}

impl ApiError {
    pub fn unprocessable(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::Unprocessable {
            code,
            message: message.into(),
        }
    }

    pub fn forbidden(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::Forbidden {
            code,
            message: message.into(),
        }
    }

    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::Conflict {
            code,
            message: message.into(),
        }
    }

    /// The OS gave no randomness for a token or code: logged, and 503 to the caller.
    pub fn no_randomness(e: getrandom::Error) -> Self {
        tracing::error!(error = %e, "no randomness from the OS");
        ApiError::Unavailable
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::BadRequest {
            code,
            message: message.into(),
        }
    }

    fn status_and_code(&self) -> (StatusCode, String) {
        match self {
            ApiError::BadRequest { code, .. } => (StatusCode::BAD_REQUEST, (*code).to_owned()),
            ApiError::Unauthenticated => (StatusCode::UNAUTHORIZED, "unauthenticated".to_owned()),
            ApiError::MissingCapability(_) => {
                (StatusCode::FORBIDDEN, "missing_capability".to_owned())
            }
            ApiError::Forbidden { code, .. } => (StatusCode::FORBIDDEN, (*code).to_owned()),
            ApiError::NotFound(what) => (StatusCode::NOT_FOUND, format!("{what}_not_found")),
            ApiError::MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed".to_owned(),
            ),
            ApiError::Conflict { code, .. } => (StatusCode::CONFLICT, (*code).to_owned()),
            ApiError::Unprocessable { code, .. } => {
                (StatusCode::UNPROCESSABLE_ENTITY, (*code).to_owned())
            }
            ApiError::BadGateway { code, .. } => (StatusCode::BAD_GATEWAY, (*code).to_owned()),
            ApiError::BodyTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large".to_owned()),
            ApiError::RequestTimeout => (StatusCode::REQUEST_TIMEOUT, "request_timeout".to_owned()),
            ApiError::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "unavailable".to_owned()),
            ApiError::Busy => (StatusCode::SERVICE_UNAVAILABLE, "busy".to_owned()),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal".to_owned()),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            // Handlers that expect a conflict map it to a precise code first.
            StoreError::Conflict(what) => ApiError::conflict("conflict", what),
            other => ApiError::Internal(other),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        if let ApiError::Internal(source) = &self {
            tracing::error!(error = %source, "request failed");
        }
        let mut body = serde_json::json!({"error": {"code": code, "message": self.to_string()}});
        if let ApiError::MissingCapability(cap) = &self {
            body["error"]["capability"] = cap.as_str().into();
        }
        let mut response = (status, axum::Json(body)).into_response();
        if matches!(self, ApiError::Busy) {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(crate::signin::Busy::RETRY_AFTER_SECS),
            );
        }
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                "www-authenticate",
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}
