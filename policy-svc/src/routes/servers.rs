//! Upstream MCP servers.

use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};

use super::{Endpoint, Verb, audit_admin, endpoint, state_of};

use crate::AppState;
use crate::auth::{Admin, Capability};
use crate::error::ApiError;
use crate::extract::{Json, Path};
use crate::store::{StoreError, catalog, oauth_identities};
use crate::upstream_policy::Refused;

pub fn endpoints() -> Vec<Endpoint> {
    vec![
        endpoint(
            Verb::Post,
            "/api/v1/servers",
            Some(Capability::ServersManage),
            create,
        ),
        endpoint(
            Verb::Get,
            "/api/v1/servers",
            Some(Capability::ServersRead),
            list,
        ),
        endpoint(
            Verb::Put,
            "/api/v1/servers/{id}/oauth",
            Some(Capability::ServersManage),
            put_oauth,
        ),
        endpoint(
            Verb::Get,
            "/api/v1/servers/{id}/oauth",
            Some(Capability::ServersRead),
            get_oauth,
        ),
        endpoint(
            Verb::Delete,
            "/api/v1/servers/{id}/oauth",
            Some(Capability::ServersManage),
            delete_oauth,
        ),
    ]
}

/// A server's OAuth protection as the API shows it: never the client secret.
#[derive(Serialize)]
struct OauthView {
    #[serde(flatten)]
    oauth: oauth_identities::ServerOauth,
    has_client_secret: bool,
    /// Where the authorization server must send users back (register it there when
    /// entering a client by hand).
    redirect_uri: String,
}

fn oauth_view(state: &AppState, oauth: oauth_identities::ServerOauth) -> OauthView {
    OauthView {
        has_client_secret: oauth.client_secret_sealed.is_some(),
        redirect_uri: crate::oauth_identity::redirect_uri(state),
        oauth,
    }
}

/// Makes a server OAuth-protected (or sets it up again): its authorization server is
/// discovered from the upstream (or `issuer`), and a client registered there (or
/// `client_id` and `client_secret` used). Its per-user identities are then connected
/// by the users themselves ("Connect").
async fn put_oauth(
    State(state): State<AppState>,
    admin: Admin,
    Path(id): Path<i64>,
    Json(body): Json<crate::oauth_identity::Setup>,
) -> Result<Json<OauthView>, ApiError> {
    let server = catalog::list_servers(&state.db)
        .await?
        .into_iter()
        .find(|s| s.id == id)
        .ok_or(ApiError::NotFound("server"))?;
    let before = oauth_identities::server_oauth(&state.db, id)
        .await?
        .map(|o| oauth_view(&state, o));
    let oauth = crate::oauth_identity::set_up(&state, id, &server.upstream_url(), body).await?;
    let view = oauth_view(&state, oauth);
    audit_admin(
        &state,
        &admin,
        "server.oauth.set",
        format!("servers/{id}"),
        before.as_ref().and_then(state_of),
        state_of(&view),
    )
    .await?;
    Ok(Json(view))
}

async fn get_oauth(
    State(state): State<AppState>,
    Path(id): Path<i64>,
) -> Result<Json<OauthView>, ApiError> {
    let oauth = oauth_identities::server_oauth(&state.db, id)
        .await?
        .ok_or(ApiError::NotFound("server_oauth"))?;
    Ok(Json(oauth_view(&state, oauth)))
}

async fn delete_oauth(
    State(state): State<AppState>,
    admin: Admin,
    Path(id): Path<i64>,
) -> Result<StatusCode, ApiError> {
    let before = oauth_identities::server_oauth(&state.db, id)
        .await?
        .ok_or(ApiError::NotFound("server_oauth"))?;
    let before = oauth_view(&state, before);
    oauth_identities::delete_server_oauth(&state.db, id).await?;
    audit_admin(
        &state,
        &admin,
        "server.oauth.delete",
        format!("servers/{id}"),
        state_of(&before),
        None,
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewServer {
    name: String,
    slug: String,
    upstream_url: String,
}

/// A server as the API shows it: the stored parts joined back into one URL.
#[derive(Serialize)]
struct ServerView {
    #[serde(flatten)]
    server: catalog::Server,
    upstream_url: String,
}

impl From<catalog::Server> for ServerView {
    fn from(server: catalog::Server) -> Self {
        ServerView {
            upstream_url: server.upstream_url(),
            server,
        }
    }
}

async fn create(
    State(state): State<AppState>,
    admin: Admin,
    Json(body): Json<NewServer>,
) -> Result<(StatusCode, Json<ServerView>), ApiError> {
    let name = super::validate_name(&body.name)?;
    let slug = super::validate_slug(&body.slug)?;
    let upstream = parse_upstream(&body.upstream_url)?;
    permitted(&state, &upstream).await?;
    match catalog::create_server(&state.db, name, slug, &upstream).await {
        Ok(s) => {
            let view = ServerView::from(s);
            let target = format!("servers/{}", view.server.id);
            audit_admin(
                &state,
                &admin,
                "server.create",
                target,
                None,
                state_of(&view),
            )
            .await?;
            Ok((StatusCode::CREATED, Json(view)))
        }
        Err(StoreError::Conflict(_)) => Err(ApiError::conflict(
            "slug_taken",
            format!("a server with slug {slug:?} exists"),
        )),
        Err(e) => Err(e.into()),
    }
}

async fn list(State(state): State<AppState>) -> Result<Json<Vec<ServerView>>, ApiError> {
    let servers = catalog::list_servers(&state.db).await?;
    Ok(Json(servers.into_iter().map(Into::into).collect()))
}

/// Refuses an upstream at an address the upstream policy denies (422 `upstream_denied`,
/// naming the rule): a literal address as it is, a name by every address it resolves
/// to now. A name that does not resolve yet is accepted (logged): registration cannot
/// see the future anyway, which is why the data plane judges the addresses it
/// connects to as well.
async fn permitted(state: &AppState, upstream: &catalog::UpstreamParts) -> Result<(), ApiError> {
    match state.upstreams.resolve_authority(&upstream.authority).await {
        Ok(_) => Ok(()),
        Err(Refused::Denied(denied)) => {
            tracing::warn!(upstream = %upstream.authority, %denied, "server registration refused");
            Err(ApiError::unprocessable(
                "upstream_denied",
                format!("upstream_url {}: {denied}", upstream.authority),
            ))
        }
        Err(e @ Refused::Unresolvable { .. }) => {
            tracing::warn!(upstream = %upstream.authority, error = %e, "server registered with a name that does not resolve yet");
            Ok(())
        }
    }
}

/// Logs a warning for each registered server whose upstream the policy refuses now (one
/// registered before these rules, or before the flags changed), so that operators can
/// disable or re-register it. Run in the background at start: names are resolved.
pub(crate) async fn warn_about_registered(
    db: crate::store::Db,
    policy: std::sync::Arc<crate::upstream_policy::UpstreamPolicy>,
) {
    let servers = match catalog::list_servers(&db).await {
        Ok(servers) => servers,
        Err(e) => {
            tracing::warn!(error = %e, "could not list servers to check their upstreams");
            return;
        }
    };
    for server in servers {
        if let Err(Refused::Denied(denied)) =
            policy.resolve_authority(&server.upstream_authority).await
        {
            tracing::warn!(server_id = server.id, slug = %server.slug, %denied, "a registered server's upstream is refused by the upstream policy: disable it (POST /api/v1/servers/{{id}}/disable) or register it elsewhere");
        }
    }
}

/// Splits an upstream URL into what the filter needs. Only plain http(s) URLs with a
/// host: credentials belong in an identity, not in a URL that is listed to admins.
fn parse_upstream(raw: &str) -> Result<catalog::UpstreamParts, ApiError> {
    let bad =
        |why: &str| ApiError::unprocessable("invalid_upstream_url", format!("upstream_url {why}"));
    let url = url::Url::parse(raw).map_err(|e| bad(&format!("is not a URL: {e}")))?;
    if url.scheme() != "http" && url.scheme() != "https" {
        return Err(bad("must be http or https"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(bad("must not carry credentials"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(bad("must not have a query or fragment"));
    }
    let host = url.host_str().ok_or_else(|| bad("must name a host"))?;
    let port = url
        .port_or_known_default()
        .ok_or_else(|| bad("must have a port"))?;
    Ok(catalog::UpstreamParts {
        scheme: url.scheme().to_owned(),
        authority: format!("{host}:{port}"),
        path: url.path().trim_end_matches('/').to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::parse_upstream;

    #[test]
    fn upstream_urls_are_split_with_explicit_ports() {
        let p = parse_upstream("http://127.0.0.1:9100/mcp").unwrap();
        assert_eq!(
            (p.scheme.as_str(), p.authority.as_str(), p.path.as_str()),
            ("http", "127.0.0.1:9100", "/mcp")
        );
        let p = parse_upstream("https://api.example.com").unwrap();
        assert_eq!(
            (p.authority.as_str(), p.path.as_str()),
            ("api.example.com:443", "")
        );
        let p = parse_upstream("http://[::1]:8000/a/b/").unwrap();
        assert_eq!(
            (p.authority.as_str(), p.path.as_str()),
            ("[::1]:8000", "/a/b")
        );
    }

    #[test]
    fn unusable_upstream_urls_are_refused() {
        for bad in [
            "not a url",
            "ftp://example.com",
            "http://user:pw@example.com/",
            "http://example.com/?token=x",
            "http://example.com/#f",
            "unix:/tmp/sock",
        ] {
            assert!(parse_upstream(bad).is_err(), "{bad}");
        }
    }
}
