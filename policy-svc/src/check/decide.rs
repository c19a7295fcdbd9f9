//! Decide: a request's answer as a pure function of the row the store read for it.

use mcpguard_core::check::{CheckResponse, DenyCode, InjectHeader, Scheme, Upstream};
use mcpguard_core::token::TokenHash;

use crate::secrets::{identity_binding, shared_binding};
use crate::store::check::CheckRow;

/// What a check decides on: one server of the gateway, or the gateway itself (a
/// request to the gateway URL, whose servers are each checked on their own later).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Scope {
    Server,
    /// Every layer up to the gateway's grant; allowed, it answers
    /// [`CheckResponse::Gateway`] (with no servers: the caller lists them).
    Gateway,
}

/// Decides a request from what [`Reads::load`](crate::store::check::Reads::load) read for an API token. Layers are
/// checked from the credential outward, so the refusal names the first layer that is
/// off. `unseal` opens a sealed credential given what it is bound to (`None` if it
/// cannot: the request is refused).
pub(super) fn decide(
    row: Option<&CheckRow>,
    presented: &TokenHash,
    gateway_slug: Option<&str>,
    now_ms: i64,
    scope: Scope,
    unseal: impl FnOnce(&str, &[u8]) -> Option<String>,
) -> CheckResponse {
    let deny = |code| CheckResponse::Deny { code };
    let Some(row) = row else {
        return deny(DenyCode::TokenUnknown);
    };
    // The lookup was by hash; comparing again in constant time costs nothing and does
    // not depend on the database's string comparison.
    if !TokenHash::from_hex(&row.token_hash).is_some_and(|stored| stored.ct_eq(presented)) {
        return deny(DenyCode::TokenUnknown);
    }
    if row.revoked_at.is_some() {
        return deny(DenyCode::TokenRevoked);
    }
    if row.expires_at.is_some_and(|t| t <= now_ms) {
        return deny(DenyCode::TokenExpired);
    }
    decide_layers(row, gateway_slug, scope, unseal)
}

/// Decides a request carrying a verified OAuth access token, from what [`Reads::load`](crate::store::check::Reads::load)
/// read: the grant must be live and the token's connection the grant's; then every
/// layer exactly as for API tokens.
pub(super) fn decide_oauth(
    row: Option<&CheckRow>,
    connection_id: i64,
    gateway_slug: Option<&str>,
    scope: Scope,
    unseal: impl FnOnce(&str, &[u8]) -> Option<String>,
) -> CheckResponse {
    let deny = |code| CheckResponse::Deny { code };
    let Some(row) = row.filter(|r| r.connection_id == connection_id) else {
        return deny(DenyCode::TokenUnknown);
    };
    if row.revoked_at.is_some() {
        return deny(DenyCode::TokenRevoked);
    }
    decide_layers(row, gateway_slug, scope, unseal)
}

/// The layers after the credential: gateway, host (and its approval), user,
/// connection, gateway, the user's grant, server, identity. `gateway_slug` is the
/// gateway the request's path names, if it names one; the row is the token's, on its
/// own gateway.
fn decide_layers(
    row: &CheckRow,
    gateway_slug: Option<&str>,
    scope: Scope,
    unseal: impl FnOnce(&str, &[u8]) -> Option<String>,
) -> CheckResponse {
    let deny = |code| CheckResponse::Deny { code };
    if gateway_slug.is_some_and(|g| g != row.gateway_slug) {
        return deny(DenyCode::TokenWrongGateway);
    }
    if !row.host_enabled.0 {
        return deny(DenyCode::HostDisabled);
    }
    if row.host_pending.0 {
        return deny(DenyCode::HostPending);
    }
    if !row.user_enabled.0 {
        return deny(DenyCode::UserDisabled);
    }
    if !row.connection_enabled.0 {
        return deny(DenyCode::ConnectionDisabled);
    }
    if !row.gateway_enabled.0 {
        return deny(DenyCode::GatewayDisabled);
    }
    // Who may connect: the grant is read with every other layer, so a user who left
    // the team (or whose team lost the gateway) is refused on the next request, and
    // granting again restores the same connection.
    if !row.gateway_granted.0 {
        return deny(DenyCode::GatewayNotGranted);
    }
    if scope == Scope::Gateway {
        return CheckResponse::Gateway {
            servers: Vec::new(),
            answers: Default::default(),
        };
    }
    let (Some(_exposed), Some(server_enabled), Some(scheme), Some(authority), Some(path)) = (
        row.identity.as_deref(),
        row.server_enabled,
        row.upstream_scheme.as_deref(),
        row.upstream_authority.as_ref(),
        row.upstream_path.as_ref(),
    ) else {
        return deny(DenyCode::ServerNotExposed);
    };
    if !server_enabled.0 {
        return deny(DenyCode::ServerDisabled);
    }
    // A per-user server is reached with the connection user's own credential, never
    // the agent's and never as nobody; a shared one with its service credential, if any:
    // a sealed header, or one user's identity (a service account), which is then held
    // to everything an identity is (the row joined it in place of the caller's).
    let server_id = row.server_id.unwrap_or_default();
    let (header, sealed, bound_to) = if let Some(owner) = row.identity_owner() {
        let (Some(enabled), Some(header), Some(sealed)) = (
            row.identity_enabled,
            row.identity_header.as_ref(),
            row.identity_sealed.as_deref(),
        ) else {
            return deny(DenyCode::IdentityMissing);
        };
        if !enabled.0 {
            return deny(DenyCode::IdentityDisabled);
        }
        // An OAuth identity whose refresh the authorization server refused: only the
        // user can mend it, by connecting again.
        if row.identity_oauth_status.as_deref() == Some(crate::oauth_identity::NEEDS_RECONNECT) {
            return deny(DenyCode::IdentityExpired);
        }
        (
            Some(header),
            Some(sealed),
            identity_binding(owner, server_id),
        )
    } else {
        (
            row.shared_header.as_ref(),
            row.shared_sealed.as_deref(),
            shared_binding(row.gateway_id, server_id),
        )
    };
    let inject = match (header, sealed) {
        (Some(name), Some(sealed)) => {
            // Cannot open it (wrong key, or tampered): refuse, and say it is our fault.
            let Some(value) = unseal(&bound_to, sealed) else {
                return deny(DenyCode::PolicyUnavailable);
            };
            Some(InjectHeader {
                name: name.clone(),
                value,
            })
        }
        _ => None,
    };
    let scheme = if scheme == "https" {
        Scheme::Https
    } else {
        Scheme::Http
    };
    CheckResponse::Allow {
        upstream: Upstream {
            scheme,
            authority: authority.clone(),
            base_path: path.clone(),
            // Pinned by the check route, which resolves and judges the authority.
            address: None,
        },
        inject,
        list_filter: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::DbBool;

    fn token() -> TokenHash {
        TokenHash::of("mcpgt_example")
    }

    fn row() -> CheckRow {
        CheckRow {
            token_id: 1,
            token_hash: token().to_hex(),
            expires_at: None,
            revoked_at: None,
            connection_id: 2,
            host_id: 3,
            user_id: 4,
            connection_enabled: DbBool(true),
            host_enabled: DbBool(true),
            user_enabled: DbBool(true),
            gateway_slug: "eng".into(),
            gateway_enabled: DbBool(true),
            server_enabled: Some(DbBool(true)),
            upstream_scheme: Some("https".into()),
            upstream_authority: Some("api.example.com:443".into()),
            upstream_path: Some("/mcp".into()),
            identity: Some("shared".into()),
            server_id: Some(5),
            identity_id: None,
            identity_enabled: None,
            identity_header: None,
            identity_sealed: None,
            gateway_id: 6,
            shared_header: None,
            shared_sealed: None,
            host_pending: DbBool(false),
            gateway_granted: DbBool(true),
            tools_mode: Some("allow_all".into()),
            prompts_mode: Some("allow_all".into()),
            resources_mode: Some("allow_all".into()),
            identity_oauth_status: None,
            identity_oauth_expires_at: None,
            identity_oauth_refresh_at: None,
            shared_user_id: None,
        }
    }

    /// Opens a "sealed" value that is `<binding>|<plain>` (stands in for the AEAD).
    fn opened(bound_to: &str, sealed: &[u8]) -> Option<String> {
        let text = String::from_utf8(sealed.to_vec()).ok()?;
        text.strip_prefix(&format!("{bound_to}|"))
            .map(str::to_owned)
    }

    fn code(r: &CheckRow) -> Option<DenyCode> {
        match decide(Some(r), &token(), Some("eng"), 1_000, Scope::Server, opened) {
            CheckResponse::Deny { code } => Some(code),
            CheckResponse::Allow { .. } | CheckResponse::Gateway { .. } => None,
        }
    }

    #[test]
    fn a_live_token_on_its_gateway_is_allowed_to_the_upstream() {
        let CheckResponse::Allow {
            upstream, inject, ..
        } = decide(
            Some(&row()),
            &token(),
            Some("eng"),
            1_000,
            Scope::Server,
            opened,
        )
        else {
            panic!("expected allow");
        };
        assert_eq!(upstream.scheme, Scheme::Https);
        assert_eq!(upstream.authority, "api.example.com:443");
        assert_eq!(upstream.base_path, "/mcp");
        assert!(inject.is_none());
    }

    #[test]
    fn a_request_naming_no_gateway_is_decided_on_the_tokens_own() {
        let mut ops = row();
        ops.gateway_slug = "ops".into();
        let allowed = |r: &CheckRow, gateway| {
            matches!(
                decide(Some(r), &token(), gateway, 1_000, Scope::Server, opened),
                CheckResponse::Allow { .. }
            )
        };
        assert!(allowed(&ops, None), "the token's gateway, whichever it is");
        assert!(
            !allowed(&ops, Some("eng")),
            "a path naming another still refuses"
        );
        // Every other layer still counts, the token's gateway's switch included.
        let mut off = ops.clone();
        off.gateway_enabled = DbBool(false);
        assert_eq!(
            decide(Some(&off), &token(), None, 1_000, Scope::Server, opened),
            CheckResponse::Deny {
                code: DenyCode::GatewayDisabled
            }
        );
    }

    type Change = fn(&mut CheckRow);

    #[test]
    fn each_layer_refuses_with_its_own_code() {
        let cases: Vec<(Change, DenyCode)> = vec![
            (
                |r| r.token_hash = TokenHash::of("other").to_hex(),
                DenyCode::TokenUnknown,
            ),
            (|r| r.revoked_at = Some(5), DenyCode::TokenRevoked),
            (|r| r.expires_at = Some(1_000), DenyCode::TokenExpired),
            (
                |r| r.gateway_slug = "ops".into(),
                DenyCode::TokenWrongGateway,
            ),
            (|r| r.host_enabled = DbBool(false), DenyCode::HostDisabled),
            (|r| r.host_pending = DbBool(true), DenyCode::HostPending),
            (|r| r.user_enabled = DbBool(false), DenyCode::UserDisabled),
            (
                |r| r.connection_enabled = DbBool(false),
                DenyCode::ConnectionDisabled,
            ),
            (
                |r| r.gateway_enabled = DbBool(false),
                DenyCode::GatewayDisabled,
            ),
            (
                |r| r.gateway_granted = DbBool(false),
                DenyCode::GatewayNotGranted,
            ),
            (|r| r.identity = None, DenyCode::ServerNotExposed),
            (
                |r| {
                    r.server_enabled = None;
                    r.upstream_authority = None;
                },
                DenyCode::ServerNotExposed,
            ),
            (
                |r| r.server_enabled = Some(DbBool(false)),
                DenyCode::ServerDisabled,
            ),
            (
                |r| r.identity = Some("per_user".into()),
                DenyCode::IdentityMissing,
            ),
            (
                |r| {
                    with_identity(r);
                    r.identity_enabled = Some(DbBool(false));
                },
                DenyCode::IdentityDisabled,
            ),
            (
                |r| {
                    with_identity(r);
                    r.identity_oauth_status = Some("needs_reconnect".into());
                },
                DenyCode::IdentityExpired,
            ),
            (
                |r| {
                    with_identity(r);
                    r.identity_sealed = Some(vec![0xff]); // does not open
                },
                DenyCode::PolicyUnavailable,
            ),
        ];
        for (change, expected) in cases {
            let mut r = row();
            change(&mut r);
            assert_eq!(code(&r), Some(expected));
        }
    }

    fn with_identity(r: &mut CheckRow) {
        r.identity = Some("per_user".into());
        r.identity_id = Some(9);
        r.identity_enabled = Some(DbBool(true));
        r.identity_header = Some("authorization".into());
        r.identity_sealed = Some(format!("{}|Bearer alice", identity_binding(4, 5)).into_bytes());
    }

    #[test]
    fn a_per_user_server_gets_the_users_own_credential_and_a_shared_one_none() {
        let mut r = row();
        r.identity_sealed = Some(b"never injected for shared".to_vec());
        let CheckResponse::Allow { inject, .. } = decide(
            Some(&r),
            &token(),
            Some("eng"),
            1_000,
            Scope::Server,
            opened,
        ) else {
            panic!("expected allow");
        };
        assert_eq!(inject, None);
        with_identity(&mut r);
        let CheckResponse::Allow { inject, .. } = decide(
            Some(&r),
            &token(),
            Some("eng"),
            1_000,
            Scope::Server,
            opened,
        ) else {
            panic!("expected allow");
        };
        let inject = inject.unwrap();
        assert_eq!(
            (inject.name.as_str(), inject.value.as_str()),
            ("authorization", "Bearer alice")
        );
    }

    // A shared exposure naming a service account: its identity for every caller, bound
    // to that user (not the caller), and held to an identity's layers.
    #[test]
    fn a_shared_exposure_with_a_service_account_sends_that_identity() {
        let allow = |r: &CheckRow| match decide(
            Some(r),
            &token(),
            Some("eng"),
            1_000,
            Scope::Server,
            opened,
        ) {
            CheckResponse::Allow { inject, .. } => Ok(inject.map(|i| i.value)),
            CheckResponse::Deny { code } => Err(code),
            other => panic!("{other:?}"),
        };
        let mut r = row();
        r.shared_user_id = Some(7);
        assert_eq!(allow(&r), Err(DenyCode::IdentityMissing));
        r.identity_id = Some(9);
        r.identity_enabled = Some(DbBool(true));
        r.identity_header = Some("authorization".into());
        // Sealed for the caller (user 4): does not open as the service account's.
        r.identity_sealed = Some(format!("{}|Bearer alice", identity_binding(4, 5)).into_bytes());
        assert_eq!(allow(&r), Err(DenyCode::PolicyUnavailable));
        r.identity_sealed = Some(format!("{}|Bearer svc", identity_binding(7, 5)).into_bytes());
        assert_eq!(allow(&r), Ok(Some("Bearer svc".into())));
        r.identity_oauth_status = Some("needs_reconnect".into());
        assert_eq!(allow(&r), Err(DenyCode::IdentityExpired));
        r.identity_enabled = Some(DbBool(false));
        assert_eq!(allow(&r), Err(DenyCode::IdentityDisabled));
    }

    #[test]
    fn unknown_token_and_not_yet_expired_token() {
        assert_eq!(
            decide(None, &token(), Some("eng"), 0, Scope::Server, opened),
            CheckResponse::Deny {
                code: DenyCode::TokenUnknown
            }
        );
        let mut r = row();
        r.expires_at = Some(1_001);
        assert_eq!(code(&r), None);
    }

    #[test]
    fn oauth_tokens_pass_the_same_layers_through_their_grant() {
        let mut r = row();
        r.token_hash = String::new();
        let oauth = |r: &CheckRow, connection| match decide_oauth(
            Some(r),
            connection,
            Some("eng"),
            Scope::Server,
            opened,
        ) {
            CheckResponse::Deny { code } => Some(code),
            CheckResponse::Allow { .. } | CheckResponse::Gateway { .. } => None,
        };
        assert_eq!(oauth(&r, 2), None);
        assert_eq!(
            oauth(&r, 99),
            Some(DenyCode::TokenUnknown),
            "another connection"
        );
        assert_eq!(
            decide_oauth(None, 2, Some("eng"), Scope::Server, opened),
            CheckResponse::Deny {
                code: DenyCode::TokenUnknown
            }
        );
        r.host_enabled = DbBool(false);
        assert_eq!(oauth(&r, 2), Some(DenyCode::HostDisabled));
        r.revoked_at = Some(1);
        assert_eq!(oauth(&r, 2), Some(DenyCode::TokenRevoked), "family revoked");
    }

    #[test]
    fn a_gateway_level_check_decides_every_layer_up_to_the_grant_and_no_server() {
        let gateway = |r: &CheckRow| {
            decide(
                Some(r),
                &token(),
                Some("eng"),
                1_000,
                Scope::Gateway,
                opened,
            )
        };
        // No server row at all (the gateway URL names none): still allowed.
        let mut r = row();
        r.identity = None;
        r.server_id = None;
        r.server_enabled = Some(DbBool(false));
        assert_eq!(
            gateway(&r),
            CheckResponse::Gateway {
                servers: vec![],
                answers: Default::default()
            }
        );
        for (change, code) in [
            (
                (|r| r.revoked_at = Some(5)) as Change,
                DenyCode::TokenRevoked,
            ),
            (
                |r| r.gateway_slug = "ops".into(),
                DenyCode::TokenWrongGateway,
            ),
            (|r| r.host_enabled = DbBool(false), DenyCode::HostDisabled),
            (|r| r.user_enabled = DbBool(false), DenyCode::UserDisabled),
            (
                |r| r.connection_enabled = DbBool(false),
                DenyCode::ConnectionDisabled,
            ),
            (
                |r| r.gateway_enabled = DbBool(false),
                DenyCode::GatewayDisabled,
            ),
            (
                |r| r.gateway_granted = DbBool(false),
                DenyCode::GatewayNotGranted,
            ),
        ] {
            let mut r = row();
            change(&mut r);
            assert_eq!(gateway(&r), CheckResponse::Deny { code });
        }
    }

    #[test]
    fn the_credential_layer_is_named_before_the_outer_layers() {
        let mut r = row();
        r.revoked_at = Some(1);
        r.host_enabled = DbBool(false);
        r.gateway_enabled = DbBool(false);
        assert_eq!(code(&r), Some(DenyCode::TokenRevoked));
    }
}
