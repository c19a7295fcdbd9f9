//! Wire types and pure logic shared by the mcpguard filter (wasm) and the policy
//! service. Nothing here knows about proxy-wasm, axum or a database, so all of it is
//! unit-tested natively and compiles for `wasm32-wasip1`.

pub mod check;
pub mod check_stream;
pub mod features;
pub mod jwt;
pub mod names;
pub mod oauth;
pub mod route;
pub mod token;

/// Extracts the token from an `Authorization: Bearer <token>` header value. The scheme
/// is case-insensitive (RFC 7235); surrounding whitespace is ignored.
pub fn bearer_token(header: &str) -> Option<&str> {
    let header = header.trim();
    let (scheme, token) = header.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = token.trim();
    (!token.is_empty() && !token.contains(char::is_whitespace)).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::bearer_token;

    #[test]
    fn bearer_header_parsing() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer  abc "), Some("abc"));
        assert_eq!(bearer_token("BEARER abc"), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer"), None);
        assert_eq!(bearer_token("Bearer "), None);
        assert_eq!(bearer_token("Bearer a b"), None);
        assert_eq!(bearer_token("abc"), None);
    }
}
