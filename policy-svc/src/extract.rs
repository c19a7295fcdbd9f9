//! Axum's `Json` and `Path` with rejections in our error format, so malformed input
//! gets the same `{"error":{...}}` body as every other refusal.

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{FromRequest, FromRequestParts};
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;

#[derive(FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct Json<T>(pub T);

impl<T: serde::Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        match rejection {
            JsonRejection::JsonDataError(e) => {
                ApiError::unprocessable("invalid_body", e.body_text())
            }
            JsonRejection::MissingJsonContentType(_) => {
                ApiError::bad_request("invalid_body", "expected Content-Type: application/json")
            }
            // The body limit (serve.rs) cut it off: the size, not the JSON, is wrong.
            other if other.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE => {
                ApiError::BodyTooLarge
            }
            other => ApiError::bad_request("invalid_json", other.body_text()),
        }
    }
}

#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct Path<T>(pub T);

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        ApiError::bad_request("invalid_path", rejection.body_text())
    }
}

#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct Query<T>(pub T);

impl From<axum::extract::rejection::QueryRejection> for ApiError {
    fn from(rejection: axum::extract::rejection::QueryRejection) -> Self {
        ApiError::bad_request("invalid_query", rejection.body_text())
    }
}
