//! The admin console: server-rendered pages under `/console` on the public port, for
//! the whole admin job in a browser. It works without JavaScript (one static script
//! only copies to the clipboard), under a CSP that forbids inline script.
//!
//! Pages read, and forms change, through the admin API itself, called in-process as the
//! signed-in user ([`api`]): the capabilities that gate a control are the endpoint
//! table's, a control the user lacks is not shown, and a forged post gets the API's
//! 403 and changes nothing. Every form carries the session's CSRF token ([`session`]).

mod act;
mod api;
mod layout;
mod pages;
mod session;
mod signin;

use axum::Router;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;

use crate::AppState;

pub use session::IDLE_MS as SESSION_IDLE_MS;
pub use signin::new_link;

/// What the console's handlers share: the service's state, and the admin API router
/// the pages call.
#[derive(Clone)]
pub struct Console {
    app: AppState,
    api: Router,
}

pub fn routes(app: AppState, api: Router) -> Router<AppState> {
    Router::new()
        .route("/console", get(pages::overview::page))
        .route("/console/", get(pages::overview::page))
        .route("/console/login", get(signin::form).post(signin::submit))
        .route("/console/logout", post(signin::sign_out))
        .route(
            "/console/link/{code}",
            get(signin::link).post(signin::use_link),
        )
        .route("/console/static/console.css", get(css))
        .route("/console/static/console.js", get(js))
        .route("/console/act", post(act::act))
        .route("/console/hosts", get(pages::hosts::list))
        .route("/console/hosts/{id}", get(pages::hosts::one))
        .route("/console/hosts/{id}/connect", get(pages::connect::page))
        .route("/console/connect", post(pages::connect::start))
        .route("/console/gateways", get(pages::gateways::list))
        .route("/console/gateways/{id}", get(pages::gateways::one))
        .route(
            "/console/gateways/{id}/servers/{server_id}",
            get(pages::features::page),
        )
        .route("/console/servers", get(pages::servers::list))
        .route("/console/people", get(pages::people::list))
        .route("/console/people/{id}", get(pages::people::one))
        .route("/console/teams", get(pages::teams::list))
        .route("/console/audit", get(pages::audit::list))
        .route(
            "/console/audit/export.jsonl",
            get(pages::audit::export_jsonl),
        )
        .route("/console/audit/export.csv", get(pages::audit::export_csv))
        .route("/console/keys", get(pages::keys::list))
        .with_state(Console { app, api })
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut response = body.into_response();
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=300"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

async fn css() -> Response {
    asset("text/css; charset=utf-8", layout::CSS)
}

async fn js() -> Response {
    asset("text/javascript; charset=utf-8", layout::JS)
}

/// The outcome of the last action, named in the address the action sent the browser
/// back to (`?done=`); only these fixed sentences are ever shown from it.
#[derive(Deserialize, Default)]
pub struct Done {
    done: Option<String>,
}

impl Done {
    fn notice(&self) -> Option<&'static str> {
        Some(match self.done.as_deref()? {
            "disabled" => "Disabled. This holds from the next request.",
            "enabled" => "Enabled. This holds from the next request.",
            "revoked" => "Revoked. The token is refused from the next request.",
            "removed" => "Removed. This holds from the next request.",
            "rotated" => "Rotated.",
            "saved" => "Saved.",
            "created" => "Created.",
            "refreshed" => "Refreshed from the upstream.",
            "approved" => "Allowed. This holds from the next request.",
            "granted" => "Granted. This holds from the next request.",
            "connected" => "Connected. The server knows you from the next request.",
            _ => return None,
        })
    }
}
