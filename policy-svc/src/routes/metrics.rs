//! `GET /metrics` on the check port: Prometheus's scrape ([`crate::metrics`]).

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use crate::AppState;
use crate::error::ApiError;
use crate::metrics::{self, Scraped};

pub(super) async fn metrics(State(state): State<AppState>) -> Response {
    let scraped = Scraped {
        pool_size: state.db.size(),
        pool_idle: u32::try_from(state.db.num_idle()).unwrap_or(u32::MAX),
        pool_max: state.db.options().get_max_connections(),
        audit: state.audit.status(state.audit_retention_days),
    };
    match metrics::encode(scraped) {
        Ok(text) => ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text).into_response(),
        Err(_) => ApiError::Unavailable.into_response(),
    }
}
