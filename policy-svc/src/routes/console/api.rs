//! The console's one way to read and change anything: the admin API, called
//! in-process as the signed-in user ([`ConsoleCaller`]), through the same router and
//! the same gates as a bearer-token call. So a page can never show or change more than
//! the API would let this user, and every change is audited as theirs.

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderValue, Method, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use tower::ServiceExt;

use crate::auth::{Admin, ConsoleCaller};
use crate::routes::Verb;

/// The largest API answer a page reads (a full audit page is well under it).
const MAX_ANSWER_BYTES: usize = 8 << 20;

/// The admin API as one signed-in user.
pub struct Api {
    pub(super) router: Router,
    pub admin: Admin,
}

/// What the API answered.
pub struct Answer {
    pub status: StatusCode,
    pub body: Value,
}

impl Answer {
    /// The API's error message, for a page that says why something was refused.
    pub fn message(&self) -> String {
        self.body["error"]["message"].as_str().map_or_else(
            || format!("the call failed ({})", self.status),
            str::to_owned,
        )
    }
}

impl Api {
    /// The raw answer (the audit export streams through as it is).
    pub async fn send(&self, method: Method, path: &str, body: Option<&Value>) -> Response {
        let mut request = Request::new(match body {
            Some(v) => Body::from(v.to_string()),
            None => Body::empty(),
        });
        *request.method_mut() = method;
        match path.parse() {
            Ok(uri) => *request.uri_mut() = uri,
            Err(_) => {
                return crate::error::ApiError::bad_request("invalid_path", "not a path")
                    .into_response();
            }
        }
        if body.is_some() {
            request.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
        }
        request
            .extensions_mut()
            .insert(ConsoleCaller(self.admin.clone()));
        match self.router.clone().oneshot(request).await {
            Ok(response) => response,
            Err(never) => match never {},
        }
    }

    pub async fn call(&self, method: Method, path: &str, body: Option<&Value>) -> Answer {
        let response = self.send(method, path, body).await;
        let status = response.status();
        let bytes = match axum::body::to_bytes(response.into_body(), MAX_ANSWER_BYTES).await {
            Ok(b) => b,
            Err(_) => {
                return Answer {
                    status: StatusCode::INTERNAL_SERVER_ERROR,
                    body: Value::Null,
                };
            }
        };
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or(Value::Null)
        };
        Answer { status, body }
    }

    /// A listing, or the API's refusal.
    pub async fn get(&self, path: &str) -> Result<Value, Answer> {
        let answer = self.call(Method::GET, path, None).await;
        if answer.status.is_success() {
            Ok(answer.body)
        } else {
            Err(answer)
        }
    }

    /// A listing as its items; empty when refused (the page shows what it may).
    pub async fn items(&self, path: &str) -> Vec<Value> {
        match self.get(path).await {
            Ok(Value::Array(items)) => items,
            _ => Vec::new(),
        }
    }

    /// Whether the gate would let this user through `method template` (a path of the
    /// endpoint table, with `{id}`): a control is shown only then.
    pub fn can(&self, method: Verb, template: &str) -> bool {
        match crate::routes::capability_of(method, template) {
            Some(Some(cap)) => self.admin.capabilities.contains(&cap),
            Some(None) => true,
            None => false,
        }
    }
}
