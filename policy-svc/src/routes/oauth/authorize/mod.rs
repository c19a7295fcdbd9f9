//! The authorization endpoint (`GET /oauth/authorize`): the request is validated
//! ([`request`]), then the browser is shown the sign-in page ([`login`]) or, once it
//! holds a session ([`session`]), the consent page ([`consent`]).

mod connect;
mod consent;
mod login;
mod request;
mod session;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;

pub(super) use connect::{callback as connect_callback, start as connect_start};
pub(super) use consent::consent;
pub(super) use login::login;

use super::Params;
use crate::AppState;
use crate::pages::PageError;

pub(super) async fn authorize(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Response, PageError> {
    let Ok(Query(pairs)) = query else {
        return Err(PageError::page(
            StatusCode::BAD_REQUEST,
            "Cannot sign in",
            "<p>Malformed request.</p>".into(),
        ));
    };
    let p = Params(pairs);
    let authz = request::validate_authz(&state, &p)
        .await
        .map_err(|e| e.into_page(&state.oauth.issuer))?;
    Ok(match session::signed_in(&state, &headers).await? {
        Some((session, user)) => consent::consent_page(&state, &p, &authz, &session, user).await?,
        None => login::login_page(&state.oauth.issuer, &p, &authz, None)?,
    })
}
