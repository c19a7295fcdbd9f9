//! HTTP routes, one module per resource, merged here.

mod audit;
mod check;
mod check_stream;
pub mod console;
mod enrollments;
mod ext_authz;
mod features;
mod gateways;
mod host_approval;
mod hosts;
mod metrics;
pub mod oauth;
mod servers;
mod teams;
mod toggles;
mod users;

pub(crate) use servers::warn_about_registered;

use axum::Router;
use axum::extract::{Request, State};
use axum::handler::Handler;
use axum::middleware::Next;
use axum::routing::{MethodRouter, delete, get, post, put};
use serde::Serialize;

use crate::AppState;
use crate::auth::{self, Capability, Scope};
use crate::error::ApiError;
use crate::extract::Json;

/// One admin API endpoint, the capability it needs (`None`: any authenticated admin)
/// and its scope (what a host-bound admin token may reach through it; `Global`, refused
/// to such tokens, unless declared otherwise with [`Endpoint::scope`]). The router is
/// built from this table and nothing else, with both checked in front of each handler,
/// so an endpoint cannot exist without declaring what it requires;
/// `GET /api/v1/endpoints` serves the table.
pub struct Endpoint {
    pub method: Verb,
    pub path: &'static str,
    pub capability: Option<Capability>,
    pub scope: Scope,
    handler: MethodRouter<AppState>,
}

impl Endpoint {
    /// Declares what a host-bound admin token may reach through this endpoint.
    pub fn scope(self, scope: Scope) -> Endpoint {
        Endpoint { scope, ..self }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Verb {
    Get,
    Post,
    Put,
    Delete,
}

pub fn endpoint<H, T>(
    method: Verb,
    path: &'static str,
    capability: Option<Capability>,
    handler: H,
) -> Endpoint
where
    H: Handler<T, AppState>,
    T: 'static,
{
    let handler = match method {
        Verb::Get => get(handler),
        Verb::Post => post(handler),
        Verb::Put => put(handler),
        Verb::Delete => delete(handler),
    };
    Endpoint {
        method,
        path,
        capability,
        scope: Scope::Global,
        handler,
    }
}

/// The capability the admin endpoint `method path` needs (`Some(None)`: any admin),
/// `None` when there is no such endpoint: what the console asks before it shows a
/// control, so that it shows exactly what the gate would let through.
pub fn capability_of(method: Verb, path: &str) -> Option<Option<Capability>> {
    // The table without its handlers, built once: pages ask this for every control.
    type Rule = (Verb, &'static str, Option<Capability>);
    static RULES: std::sync::OnceLock<Vec<Rule>> = std::sync::OnceLock::new();
    RULES
        .get_or_init(|| {
            admin_api()
                .iter()
                .map(|e| (e.method, e.path, e.capability))
                .collect()
        })
        .iter()
        .find(|(m, p, _)| *m == method && *p == path)
        .map(|(_, _, c)| *c)
}

/// Every admin endpoint.
pub fn admin_api() -> Vec<Endpoint> {
    let mut all =
        vec![endpoint(Verb::Get, "/api/v1/endpoints", None, catalog).scope(Scope::Caller)];
    all.extend(gateways::endpoints());
    all.extend(servers::endpoints());
    all.extend(features::endpoints());
    all.extend(hosts::endpoints());
    all.extend(enrollments::endpoints());
    all.extend(toggles::endpoints());
    all.extend(users::endpoints());
    all.extend(teams::endpoints());
    all.extend(host_approval::endpoints());
    all.extend(audit::endpoints());
    all.extend(signing_keys_endpoints());
    all
}

#[derive(Serialize)]
struct EndpointInfo {
    method: Verb,
    path: &'static str,
    capability: Option<&'static str>,
    /// `global`, `host` (a host-bound token reaches it on its own host only) or
    /// `caller` (open to every admin token).
    scope: &'static str,
}

async fn catalog() -> Json<Vec<EndpointInfo>> {
    Json(
        admin_api()
            .iter()
            .map(|e| EndpointInfo {
                method: e.method,
                path: e.path,
                capability: e.capability.map(Capability::as_str),
                scope: e.scope.as_str(),
            })
            .collect(),
    )
}

/// The admin API: every endpoint of [`admin_api`] behind its gate.
fn admin_routes(state: &AppState) -> Router<AppState> {
    let mut router = Router::new();
    for e in admin_api() {
        let (gate_state, rule) = (state.clone(), (e.capability, e.scope));
        let gate = axum::middleware::from_fn(move |req: Request, next: Next| {
            auth::authorize(gate_state.clone(), rule, req, next)
        });
        router = router.route(e.path, e.handler.route_layer(gate));
    }
    router
}

/// The public port: the admin API, the admin console, and the OAuth endpoints and pages.
pub fn public(state: AppState) -> Router {
    // The console calls the admin API in-process, through the same gates.
    let api = admin_routes(&state)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state.clone());
    Router::new()
        .route("/healthz", get(healthz))
        .merge(oauth::routes())
        .merge(enrollments::pages())
        .merge(admin_routes(&state))
        .merge(console::routes(state.clone(), api))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// The check port: only the filter's callouts.
pub fn check(state: AppState) -> Router {
    check::routes()
        .merge(check_stream::routes())
        .merge(ext_authz::routes())
        .merge(oauth::check_routes())
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics::metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

fn signing_keys_endpoints() -> Vec<Endpoint> {
    vec![
        // Signing keys belong to sign-in, the users area (rotating needs users.manage).
        endpoint(
            Verb::Get,
            "/api/v1/oauth/signing-keys",
            Some(Capability::UsersRead),
            list_signing_keys,
        ),
        // Whoever can rotate the keys can cut every headed host off until clients
        // refresh; `users.manage` already grants everything else.
        endpoint(
            Verb::Post,
            "/api/v1/oauth/signing-keys/rotate",
            Some(Capability::UsersManage),
            rotate_signing_keys,
        ),
    ]
}

async fn list_signing_keys(
    State(state): State<AppState>,
) -> Result<Json<Vec<crate::store::oauth::KeyInfo>>, ApiError> {
    Ok(Json(crate::store::oauth::list_keys(&state.db).await?))
}

/// The next key (published since the last rotation) starts signing; the active one
/// retires and stays published until its tokens have expired; a new next key appears.
async fn rotate_signing_keys(
    State(state): State<AppState>,
    admin: auth::Admin,
) -> Result<Json<Vec<crate::store::oauth::KeyInfo>>, ApiError> {
    let before = crate::store::oauth::list_keys(&state.db).await?;
    let next = crate::keys::generate(&state.secrets)?;
    crate::store::oauth::rotate_keys(&state.db, next).await?;
    let after = crate::store::oauth::list_keys(&state.db).await?;
    audit_admin(
        &state,
        &admin,
        "signing_key.rotate",
        "oauth/signing-keys".into(),
        state_of(&before),
        state_of(&after),
    )
    .await?;
    tracing::info!("OAuth signing keys rotated");
    Ok(Json(after))
}

async fn healthz(State(state): State<AppState>) -> Result<axum::Json<serde_json::Value>, ApiError> {
    crate::store::ping(&state.db).await?;
    Ok(axum::Json(serde_json::json!({"status": "ok"})))
}

async fn not_found() -> ApiError {
    ApiError::NotFound("route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// Names and slugs arrive in request bodies; check them the same way everywhere.
pub(crate) fn validate_name(name: &str) -> Result<&str, ApiError> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 200 || name.chars().any(char::is_control) {
        return Err(ApiError::unprocessable(
            "invalid_name",
            "name must be 1 to 200 printable characters",
        ));
    }
    Ok(name)
}

pub(crate) fn validate_slug(slug: &str) -> Result<&str, ApiError> {
    if mcpguard_core::route::is_valid_slug(slug) {
        Ok(slug)
    } else {
        Err(ApiError::unprocessable(
            "invalid_slug",
            "slug must be 1 to 63 lowercase letters, digits or inner hyphens",
        ))
    }
}

/// Records an admin action (who, what, before, after) before the call returns.
pub(crate) async fn audit_admin(
    state: &AppState,
    admin: &auth::Admin,
    action: &str,
    target: String,
    before: Option<serde_json::Value>,
    after: Option<serde_json::Value>,
) -> Result<(), ApiError> {
    Ok(state
        .audit
        .admin(admin.user_id, action, target, before, after)
        .await?)
}

/// A value as audit state; the types written here always serialize.
pub(crate) fn state_of<T: Serialize>(value: &T) -> Option<serde_json::Value> {
    serde_json::to_value(value).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the gate relies on: an endpoint open to every admin shows only the caller
    /// (or static facts), and a host-scoped one has the `{id}` the gate reads.
    #[test]
    fn the_endpoint_table_declares_scopes_the_gate_can_enforce() {
        let all = admin_api();
        for e in &all {
            if e.capability.is_none() {
                assert_eq!(e.scope, Scope::Caller, "{} needs no capability", e.path);
                assert_eq!(e.method, Verb::Get, "{}", e.path);
            }
            if let Scope::Host(_) = e.scope {
                assert!(e.path.contains("/{id}"), "{}", e.path);
                assert!(e.capability.is_some(), "{}", e.path);
            }
        }
        let host_scoped: Vec<&str> = all
            .iter()
            .filter(|e| matches!(e.scope, Scope::Host(_)))
            .map(|e| e.path)
            .collect();
        for path in [
            "/api/v1/hosts/{id}/tokens",
            "/api/v1/tokens/{id}",
            "/api/v1/hosts/{id}/enrollments",
            "/api/v1/enrollments/{id}",
            "/api/v1/enrollments/{id}/token",
        ] {
            assert!(host_scoped.contains(&path), "{path}");
        }
    }
}
