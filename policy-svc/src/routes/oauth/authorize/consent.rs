//! The consent page of the authorization endpoint and its form
//! (`POST /oauth/consent`): what the signed-in user allows, the identities they bring,
//! and the authorization code that the answer grants.

use axum::extract::rejection::FormRejection;
use axum::extract::{Form, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use mcpguard_core::token::{TokenHash, TokenKind};

use super::super::error::OauthError;
use super::super::{Params, form_params};
use super::request::{Authz, client_redirect, hidden_authz_fields, validate_authz};
use super::session::{self, session_csrf};
use crate::error::ApiError;
use crate::pages::{PageError, escape, html};
use crate::secrets::ct_eq;
use crate::store::{self, oauth as db};
use crate::{AppState, identities, secrets};

const CODE_TTL_MS: i64 = 60_000;

/// The consent form for `authz`, shown to the signed-in `user` (id, name), with a
/// field for each per-user server of the gateway the user has no identity on yet.
pub(super) async fn consent_page(
    state: &AppState,
    p: &Params,
    authz: &Authz,
    session: &str,
    user: (i64, String),
) -> Result<Response, OauthError> {
    if let Some(reason) = not_allowed(state, user.0, authz).await? {
        tracing::info!(user_id = user.0, gateway_id = authz.gateway_id, client_id = %authz.client.client_id, reason = reason.code(), "oauth consent refused: not allowed to connect");
        return Ok(html(
            StatusCode::FORBIDDEN,
            "Not allowed",
            format!(
                "<p>Signed in as <strong>{}</strong>.</p><p>{}</p>",
                escape(&user.1),
                escape(&reason.message(&authz.gateway_name))
            ),
        ));
    }
    let missing =
        store::identities::missing_on_gateway(&state.db, authz.gateway_id, user.0).await?;
    let csrf = session_csrf(session);
    let hidden = hidden_authz_fields(p);
    // OAuth-protected servers are connected (each its own form, outside the consent
    // form); the others take a token typed in.
    let connect: String = missing
        .iter()
        .filter(|m| m.oauth.0)
        .map(|m| super::connect::connect_form(&csrf, m.server_id, &m.name, &hidden))
        .collect();
    let connect = if connect.is_empty() {
        connect
    } else {
        format!(
            "<fieldset><legend>Servers that act as you: connect your accounts</legend>{connect}</fieldset>"
        )
    };
    let identities: String = missing
        .iter()
        .filter(|m| !m.oauth.0)
        .map(|m| {
            format!(
                "<label>Your token for <strong>{}</strong> ({}), optional <input name=\"identity_{}\" type=\"password\" autocomplete=\"off\"></label>",
                escape(&m.name),
                escape(&m.slug),
                m.server_id
            )
        })
        .collect();
    let identities = if identities.is_empty() {
        identities
    } else {
        format!(
            "<fieldset><legend>Servers on this gateway that act as you</legend>{identities}</fieldset>"
        )
    };
    let body = format!(
        "<p>Signed in as <strong>{user}</strong>.</p>\
         <p>Allow <strong>{client}</strong> to use the gateway <strong>{gateway}</strong> as you?</p>\
         <p><small>{resource}</small></p>\
         <p><small>Your answer goes back to {redirect}</small></p>{connect}\
         <form method=\"post\" action=\"/oauth/consent\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">{hidden}{identities}\
         <button type=\"submit\" name=\"decision\" value=\"allow\">Allow</button>\
         <button type=\"submit\" name=\"decision\" value=\"deny\">Deny</button></form>",
        user = escape(&user.1),
        client = escape(&authz.client.client_name),
        gateway = escape(&authz.gateway_name),
        resource = escape(&authz.resource),
        redirect = escape(&authz.redirect_uri),
    );
    Ok(html(StatusCode::OK, "Allow access", body))
}

pub(in crate::routes::oauth) async fn consent(
    State(state): State<AppState>,
    headers: HeaderMap,
    form: Result<Form<Vec<(String, String)>>, FormRejection>,
) -> Result<Response, PageError> {
    let issuer = state.oauth.issuer.clone();
    let cannot = |status, message: &str| {
        PageError::page(status, "Cannot continue", format!("<p>{message}</p>"))
    };
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
    let authz = validate_authz(&state, &p)
        .await
        .map_err(|e| e.into_page(&issuer))?;
    if p.get("decision").ok().flatten() != Some("allow") {
        return Ok(client_redirect(
            &issuer,
            &authz.redirect_uri,
            authz.state.as_deref(),
            &[
                ("error", "access_denied"),
                ("error_description", "the user declined"),
            ],
        ));
    }
    if let Some(reason) = not_allowed(&state, user_id, &authz).await? {
        tracing::info!(user_id, gateway_id = authz.gateway_id, client_id = %authz.client.client_id, reason = reason.code(), "oauth consent refused: not allowed to connect");
        return Ok(client_redirect(
            &issuer,
            &authz.redirect_uri,
            authz.state.as_deref(),
            &[
                ("error", "access_denied"),
                ("error_description", &reason.message(&authz.gateway_name)),
            ],
        ));
    }
    let code = grant_code(&state, &p, &authz, user_id).await?;
    Ok(client_redirect(
        &issuer,
        &authz.redirect_uri,
        authz.state.as_deref(),
        &[("code", &code)],
    ))
}

/// Why a signed-in user may not connect a headed app to the request's gateway.
#[derive(Debug, Clone, Copy)]
enum NotAllowed {
    /// The user's role lacks `oauth.connect`.
    NoOauthConnect,
    /// None of the user's teams is granted the gateway.
    NotGranted,
}

impl NotAllowed {
    /// For the log.
    fn code(self) -> &'static str {
        match self {
            NotAllowed::NoOauthConnect => "oauth_connect_missing",
            NotAllowed::NotGranted => "gateway_not_granted",
        }
    }

    /// For the user, on the page or in the client's `error_description`.
    fn message(self, gateway: &str) -> String {
        match self {
            NotAllowed::NoOauthConnect => {
                "Your role does not let you connect applications by OAuth (oauth.connect). \
                 Ask an admin."
                    .to_owned()
            }
            NotAllowed::NotGranted => format!(
                "None of your teams is granted the gateway {gateway}, so you cannot connect \
                 an application to it. Ask an admin."
            ),
        }
    }
}

/// Checked on the consent page and again when its form comes back, before anything
/// is stored: the role's `oauth.connect`, then a team's grant of the gateway.
async fn not_allowed(
    state: &AppState,
    user_id: i64,
    authz: &Authz,
) -> Result<Option<NotAllowed>, OauthError> {
    if !store::teams::may_connect_by_oauth(&state.db, user_id).await? {
        return Ok(Some(NotAllowed::NoOauthConnect));
    }
    if !store::teams::user_granted(&state.db, user_id, authz.gateway_id).await? {
        return Ok(Some(NotAllowed::NotGranted));
    }
    Ok(None)
}

/// After consent: identities the user brought, the headed host (on the client's first
/// authorization), the connection, the audit entry, and the code. The code is stored
/// only once its audit entry is written: a consent that cannot be audited fails as an
/// admin call does (500 `internal`) and grants nothing. The host and connection it
/// settled stay, as an admin change does when its audit write fails; they carry no
/// credential, and the next consent reuses them.
async fn grant_code(
    state: &AppState,
    p: &Params,
    authz: &Authz,
    user_id: i64,
) -> Result<String, PageError> {
    // Validate every identity field before storing any, so a bad one changes nothing.
    let mut missing = store::identities::missing_on_gateway(&state.db, authz.gateway_id, user_id)
        .await
        .map_err(OauthError::from)?;
    // An OAuth-protected server's identity is connected, never typed in.
    missing.retain(|m| !m.oauth.0);
    let field = |name: &str| p.get(name).ok().flatten();
    let brought = identities::identities_from_form(&missing, field, false).map_err(|m| {
        PageError::page(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Cannot continue",
            format!(
                "<p>The token for {} must be one word, without spaces.</p>",
                escape(&m.name)
            ),
        )
    })?;
    identities::save_identities(state, user_id, brought).await?;
    let first = authz.client.host_id.is_none();
    let approve = state.oauth.approve_new_hosts
        || store::catalog::approves_hosts(&state.db, authz.gateway_id)
            .await
            .map_err(OauthError::from)?;
    let host_id = db::host_for_client(&state.db, &authz.client, user_id, approve)
        .await
        .map_err(OauthError::from)?;
    let connection_id = store::hosts::connect(&state.db, host_id, authz.gateway_id, user_id)
        .await
        .map_err(OauthError::from)?;
    if first {
        tracing::info!(host_id, client_id = %authz.client.client_id, name = %authz.client.client_name, approval_required = approve, "client's first authorization: its headed host settled");
    }
    let code = secrets::mint(TokenKind::Code).map_err(OauthError::server_error)?;
    state
        .audit
        .admin(
            user_id,
            "oauth.authorize",
            format!("connections/{connection_id}"),
            None,
            Some(serde_json::json!({"host_id": host_id, "client_id": authz.client.client_id, "resource": authz.resource})),
        )
        .await
        .map_err(ApiError::from)?;
    db::insert_code(
        &state.db,
        &db::NewCode {
            code_hash: &TokenHash::of(&code).to_hex(),
            client_id: authz.client.id,
            user_id,
            connection_id,
            redirect_uri: &authz.redirect_uri,
            code_challenge: &authz.code_challenge,
            resource: &authz.resource,
            scope: authz.scope.as_deref(),
            ttl_ms: CODE_TTL_MS,
        },
    )
    .await
    .map_err(OauthError::from)?;
    Ok(code)
}

#[cfg(test)]
mod tests {
    use axum::response::IntoResponse;

    use super::*;
    use crate::store::Db;

    /// A store with a user, the gateway `eng`, and a registered client not yet
    /// authorized (no host), and the request the user is consenting to.
    async fn consenting() -> (tempfile::TempDir, AppState, Authz) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("t.db").display());
        let db = store::open(&url, 2).await.unwrap();
        for sql in [
            "INSERT INTO roles (id, name, created_at) VALUES (1, 'owner', $1)",
            "INSERT INTO users (id, name, role_id, enabled, created_at) VALUES (1, 'ada', 1, 1, $1)",
            "INSERT INTO gateways (id, name, slug, enabled, created_at) VALUES (1, 'Eng', 'eng', 1, $1)",
            "INSERT INTO oauth_clients (id, client_id, client_name, redirect_uris, created_at)
             VALUES (1, 'c', 'App', '[\"http://127.0.0.1/cb\"]', $1)",
        ] {
            sqlx::query(sql)
                .bind(store::now_ms())
                .execute(&db)
                .await
                .unwrap();
        }
        let secrets = crate::secrets::SecretBox::load_or_create(&dir.path().join("k")).unwrap();
        let state =
            crate::fixture::state(db.clone(), store::check::Reads::Pool(db.clone()), secrets);
        let authz = Authz {
            client: db::get_client(&db, "c").await.unwrap().unwrap(),
            redirect_uri: "http://127.0.0.1/cb".into(),
            state: None,
            code_challenge: "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM".into(),
            resource: "http://127.0.0.1:10000/mcp/eng/demo".into(),
            gateway_id: 1,
            gateway_name: "Eng".into(),
            scope: None,
        };
        (dir, state, authz)
    }

    async fn count(db: &Db, sql: &'static str) -> i64 {
        sqlx::query_scalar(sql).fetch_one(db).await.unwrap()
    }

    #[tokio::test]
    async fn a_consent_grants_its_code_with_its_audit_entry() {
        let (_dir, state, authz) = consenting().await;
        grant_code(&state, &Params(Vec::new()), &authz, 1)
            .await
            .unwrap();
        assert_eq!(
            count(&state.db, "SELECT COUNT(*) FROM oauth_codes").await,
            1
        );
        assert_eq!(
            count(
                &state.db,
                "SELECT COUNT(*) FROM audit_events WHERE action = 'oauth.authorize'"
            )
            .await,
            1
        );
    }

    /// An admin action that cannot be audited fails: the consent answers an error and
    /// no code exists to be exchanged.
    #[tokio::test]
    async fn a_consent_that_cannot_be_audited_grants_nothing() {
        let (_dir, state, authz) = consenting().await;
        sqlx::query("DROP TABLE audit_events")
            .execute(&state.db)
            .await
            .unwrap();
        let refused = grant_code(&state, &Params(Vec::new()), &authz, 1)
            .await
            .unwrap_err()
            .into_response();
        assert_eq!(refused.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(
            count(&state.db, "SELECT COUNT(*) FROM oauth_codes").await,
            0
        );
    }
}
