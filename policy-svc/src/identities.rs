//! A user's identities on servers (the credential sent upstream as them), and the
//! credentials an admin sets: checked, sealed, saved and audited the same way whether
//! they come from the admin API or from a page (the OAuth consent page, the enrollment
//! page).

use crate::AppState;
use crate::error::ApiError;
use crate::secrets;
use crate::store::identities;

/// A credential for a server, as the server expects it: a user's identity, or the
/// shared service credential of an exposure.
#[derive(serde::Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ServerCredential {
    /// Sent as `Authorization: Bearer <token>`.
    Bearer { token: String },
    /// Sent as `<name>: <value>`.
    Header { name: String, value: String },
}

/// Headers a credential may not set: routing, framing, and our own.
const FORBIDDEN_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "content-type",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "upgrade",
    "proxy-authorization",
    "x-mcpguard-route",
    "x-request-id",
    "mcp-session-id",
];

impl ServerCredential {
    /// The header to send and its value, refusing headers that would reroute or
    /// reframe the request.
    pub fn into_header(self) -> Result<(String, String), ApiError> {
        let (name, value) = match self {
            ServerCredential::Bearer { token }
                if token.is_empty() || token.contains(char::is_whitespace) =>
            {
                return Err(ApiError::unprocessable(
                    "invalid_credential",
                    "a bearer token is one word: no spaces",
                ));
            }
            ServerCredential::Bearer { token } => {
                ("authorization".to_owned(), format!("Bearer {token}"))
            }
            ServerCredential::Header { name, value } => (name.to_ascii_lowercase(), value),
        };
        let name_ok = !name.is_empty()
            && name.len() <= 64
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !FORBIDDEN_HEADERS.contains(&name.as_str());
        if !name_ok {
            return Err(ApiError::unprocessable(
                "invalid_credential",
                format!("{name:?} cannot carry a credential"),
            ));
        }
        let value_ok = !value.trim().is_empty()
            && value.len() <= 8192
            && !value.bytes().any(|b| b.is_ascii_control());
        if !value_ok {
            return Err(ApiError::unprocessable(
                "invalid_credential",
                "the credential must be 1 to 8192 printable characters",
            ));
        }
        Ok((name, value))
    }
}

/// Identities checked and ready to save: server id, and the header that carries the
/// credential upstream.
pub type CheckedIdentities = Vec<(i64, (String, String))>;

/// The bearer tokens a person typed into a page's `identity_{server_id}` fields (the
/// OAuth consent page, the enrollment page), one per server in `missing`, all checked
/// before any is stored so that a refused form changes nothing. A field left empty is
/// skipped, unless `required`. `Err` is the server whose field is refused.
pub fn identities_from_form<'a, 'f>(
    missing: &'a [identities::Missing],
    field: impl Fn(&str) -> Option<&'f str>,
    required: bool,
) -> Result<CheckedIdentities, &'a identities::Missing> {
    let mut checked = Vec::new();
    for m in missing {
        let typed = field(&format!("identity_{}", m.server_id))
            .map(str::trim)
            .filter(|t| !t.is_empty());
        let Some(token) = typed else {
            if required {
                return Err(m);
            }
            continue;
        };
        let header = ServerCredential::Bearer {
            token: token.to_owned(),
        }
        .into_header()
        .map_err(|_| m)?;
        checked.push((m.server_id, header));
    }
    Ok(checked)
}

/// Saves what [`identities_from_form`] checked, as set by the user themself.
pub async fn save_identities(
    state: &AppState,
    user_id: i64,
    checked: CheckedIdentities,
) -> Result<(), ApiError> {
    for (server_id, header) in checked {
        save_identity(state, user_id, user_id, server_id, header).await?;
    }
    Ok(())
}

/// Seals and saves a user's credential (a checked header and value) for a server, and
/// audits it as done by `actor`. Metadata only: the credential itself is never logged,
/// audited or returned.
pub async fn save_identity(
    state: &AppState,
    actor: i64,
    user_id: i64,
    server_id: i64,
    (header, value): (String, String),
) -> Result<identities::Identity, ApiError> {
    let sealed = state
        .secrets
        .seal(&value, &secrets::identity_binding(user_id, server_id))
        .map_err(|e| {
            tracing::error!(error = %e, "could not seal an identity");
            ApiError::Unavailable
        })?;
    let identity = identities::put(&state.db, user_id, server_id, &header, &sealed).await?;
    state
        .audit
        .admin(
            actor,
            "identity.set",
            format!("identities/{}", identity.id),
            None,
            serde_json::to_value(&identity).ok(),
        )
        .await?;
    Ok(identity)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn missing(server_id: i64, name: &str) -> identities::Missing {
        identities::Missing {
            server_id,
            slug: name.to_lowercase(),
            name: name.into(),
            oauth: crate::store::DbBool(false),
        }
    }

    #[test]
    fn identity_fields_are_all_checked_before_any_is_kept() {
        let servers = [missing(1, "GitHub"), missing(2, "Linear")];
        let form = |fields: &'static [(&'static str, &'static str)]| {
            move |name: &str| fields.iter().find(|(k, _)| *k == name).map(|(_, v)| *v)
        };
        let bearer = |t: &str| ("authorization".to_owned(), format!("Bearer {t}"));

        let both = form(&[("identity_1", " gh-token "), ("identity_2", "lin")]);
        for required in [true, false] {
            assert_eq!(
                identities_from_form(&servers, both, required).unwrap(),
                vec![(1, bearer("gh-token")), (2, bearer("lin"))]
            );
        }
        // Left empty (or blank): skipped on the consent page, refused on enrollment.
        let one = form(&[("identity_1", "gh-token"), ("identity_2", "  ")]);
        assert_eq!(
            identities_from_form(&servers, one, false).unwrap(),
            vec![(1, bearer("gh-token"))]
        );
        assert_eq!(
            identities_from_form(&servers, one, true).unwrap_err().name,
            "Linear"
        );
        // Not one word: refused, whichever field it is, even after a good one.
        let spaced = form(&[("identity_1", "gh-token"), ("identity_2", "two words")]);
        for required in [true, false] {
            assert_eq!(
                identities_from_form(&servers, spaced, required)
                    .unwrap_err()
                    .server_id,
                2
            );
        }
    }
}
