//! "Connect" on the consent page (issue 24): the signed-in user brings their identity
//! for an OAuth-protected server by signing in at that server's authorization server.
//! `POST /oauth/connect` (the page's form, with its CSRF token) starts the flow and
//! sends the browser there; `GET /oauth/connect/callback` is where it comes back, with
//! a `state` that works once and only for the browser session that started it. Then
//! the browser returns to the consent page it left.

use axum::extract::rejection::{FormRejection, QueryRejection};
use axum::extract::{Form, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;

use super::super::{Params, form_params, sha256_hex};
use super::request::{AUTHZ_PARAMS, see_other};
use super::session::{self, session_csrf};
use crate::AppState;
use crate::oauth_identity::{self, ConnectError};
use crate::pages::{PageError, cookie, escape, html};
use crate::secrets::ct_eq;

fn cannot(status: StatusCode, message: &str) -> PageError {
    PageError::page(
        status,
        "Cannot connect",
        format!("<p>{}</p>", escape(message)),
    )
}

/// The consent page's form for one OAuth-protected server: its CSRF token, the server,
/// and the authorization request to come back to.
pub(super) fn connect_form(csrf: &str, server_id: i64, name: &str, hidden_authz: &str) -> String {
    format!(
        "<form method=\"post\" action=\"/oauth/connect\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
         <input type=\"hidden\" name=\"server_id\" value=\"{server_id}\">{hidden_authz}\
         <button type=\"submit\">Connect your {name} account</button></form>",
        csrf = escape(csrf),
        name = escape(name),
    )
}

/// The consent page's address for the authorization request in `p`.
fn consent_again(p: &Params) -> String {
    let mut q = url::form_urlencoded::Serializer::new(String::new());
    for name in AUTHZ_PARAMS {
        if let Ok(Some(v)) = p.get(name) {
            q.append_pair(name, v);
        }
    }
    format!("{}?{}", mcpguard_core::oauth::AUTHORIZE_PATH, q.finish())
}

pub(in crate::routes::oauth) async fn start(
    State(state): State<AppState>,
    headers: HeaderMap,
    form: Result<Form<Vec<(String, String)>>, FormRejection>,
) -> Result<Response, PageError> {
    let p = form_params(form).ok_or_else(|| cannot(StatusCode::BAD_REQUEST, "Malformed form."))?;
    let Some((session, (user_id, _))) = session::signed_in(&state, &headers).await? else {
        return Err(cannot(
            StatusCode::FORBIDDEN,
            "Your sign-in expired. Start again from your application.",
        ));
    };
    if !p
        .get("csrf")
        .ok()
        .flatten()
        .is_some_and(|f| ct_eq(f, &session_csrf(&session)))
    {
        return Err(cannot(
            StatusCode::FORBIDDEN,
            "The form did not come from this site.",
        ));
    }
    let Some(server_id) = p
        .get("server_id")
        .ok()
        .flatten()
        .and_then(|s| s.parse::<i64>().ok())
    else {
        return Err(cannot(StatusCode::BAD_REQUEST, "No server to connect."));
    };
    let return_to = consent_again(&p);
    let Some(url) = oauth_identity::begin_connect(
        &state,
        (user_id, user_id),
        &sha256_hex(&session),
        server_id,
        &return_to,
    )
    .await?
    else {
        return Err(cannot(
            StatusCode::NOT_FOUND,
            "That server does not sign in by OAuth.",
        ));
    };
    tracing::info!(user_id, server_id, "oauth connect started");
    Ok(see_other(&url, None))
}

pub(in crate::routes::oauth) async fn callback(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Response, PageError> {
    let Ok(Query(pairs)) = query else {
        return Err(cannot(StatusCode::BAD_REQUEST, "Malformed request."));
    };
    let p = Params(pairs);
    let bad = |_| cannot(StatusCode::BAD_REQUEST, "Malformed request.");
    let flow_state = p.required("state").map_err(bad)?;
    if let Some(error) = p.get("error").map_err(bad)? {
        // Declined (or refused) at the authorization server: the flow is spent.
        let _ = crate::store::oauth_identities::take_connect_state(
            &state.db,
            &oauth_identity::state_hash(flow_state),
        )
        .await;
        let error: String = error.chars().take(64).collect();
        return Err(cannot(
            StatusCode::FORBIDDEN,
            &format!(
                "The server did not connect your account ({error}). Start again from your application."
            ),
        ));
    }
    let code = p.required("code").map_err(bad)?;
    // The browser's bindings: its consent-page session, and the connect cookie of a
    // page without one (the enrollment page).
    let session = session::signed_in(&state, &headers).await?;
    let bindings: Vec<String> = session
        .iter()
        .map(|(token, _)| sha256_hex(token))
        .chain(
            cookie(&headers, oauth_identity::CONNECT_COOKIE)
                .map(|c| oauth_identity::session_hash(&c)),
        )
        .collect();
    let bindings: Vec<&str> = bindings.iter().map(String::as_str).collect();
    match oauth_identity::finish_connect(&state, &bindings, flow_state, code).await {
        Ok(return_to) if return_to == oauth_identity::RETURN_DONE => Ok(html(
            StatusCode::OK,
            "Connected",
            "<p>Your account is connected. Go back to the page you came from to finish \
             (open your enrollment link again).</p>"
                .into(),
        )),
        // The console's session cookie is SameSite=Strict: a browser does not send it
        // on a redirect of a navigation that began at the authorization server (another
        // site), so the way back is a link the user follows from here.
        Ok(return_to) if return_to.starts_with("/console") => Ok(html(
            StatusCode::OK,
            "Connected",
            format!(
                "<p>Your account is connected.</p><p><a id=\"back\" href=\"{}\">Back to the console</a></p>",
                escape(&return_to)
            ),
        )),
        Ok(return_to) => Ok(see_other(&return_to, None)),
        Err(ConnectError::Api(e)) => Err(e.into()),
        Err(e @ ConnectError::Token(_)) => {
            tracing::info!(error = %e, "oauth connect: the code exchange failed");
            Err(cannot(StatusCode::BAD_GATEWAY, &e.to_string()))
        }
        Err(e) => {
            tracing::info!(error = %e, "oauth connect refused");
            Err(cannot(StatusCode::BAD_REQUEST, &e.to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_browser_returns_to_the_same_authorization_request() {
        let p = Params(vec![
            ("client_id".into(), "c&1".into()),
            ("resource".into(), "http://gw/mcp/eng/demo".into()),
            ("csrf".into(), "not carried".into()),
            ("server_id".into(), "3".into()),
        ]);
        let back = consent_again(&p);
        assert_eq!(
            back,
            "/oauth/authorize?client_id=c%261&resource=http%3A%2F%2Fgw%2Fmcp%2Feng%2Fdemo"
        );
        let form = connect_form("t\"", 3, "<Jira>", "");
        assert!(
            form.contains("value=\"t&quot;\"") && form.contains("&lt;Jira&gt;"),
            "{form}"
        );
    }
}
