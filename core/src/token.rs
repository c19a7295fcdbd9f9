//! Opaque bearer tokens.
//!
//! Shape: `<kind>_<40 base62 characters of entropy><6 base62 characters of CRC32>`,
//! for example `mcpgt_3kT…`. The fixed prefix lets secret scanners find leaked tokens;
//! the checksum lets the filter reject typos and garbage without a callout (it is not a
//! security boundary: only the hash lookup in the policy service is). Tokens are stored
//! and sent between our components only as their SHA-256.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::check::DenyCode;

pub const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
/// 40 base62 characters carry about 238 bits of entropy.
pub const ENTROPY_CHARS: usize = 40;
const CHECKSUM_CHARS: usize = 6;
/// How much of a token is shown in listings: the kind and the first 8 characters.
const DISPLAY_CHARS: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// API access token of a token-based host, bound to one connection.
    HostApi,
    /// Token minted for one end user of a token-based host.
    PerUser,
    /// Personal admin API token.
    Admin,
    /// OAuth refresh token of a headed host (only ever sent to the token endpoint).
    Refresh,
    /// OAuth authorization code (single use, short-lived).
    Code,
}

impl TokenKind {
    pub const ALL: [TokenKind; 5] = [
        TokenKind::HostApi,
        TokenKind::PerUser,
        TokenKind::Admin,
        TokenKind::Refresh,
        TokenKind::Code,
    ];

    pub const fn prefix(self) -> &'static str {
        match self {
            TokenKind::HostApi => "mcpgt",
            TokenKind::PerUser => "mcpgu",
            TokenKind::Admin => "mcpga",
            TokenKind::Refresh => "mcpgr",
            TokenKind::Code => "mcpgc",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenError {
    UnknownPrefix,
    BadLength,
    BadCharacter,
    BadChecksum,
}

impl std::fmt::Display for TokenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TokenError::UnknownPrefix => "token has no known mcpguard prefix",
            TokenError::BadLength => "token has the wrong length",
            TokenError::BadCharacter => "token contains a character outside base62",
            TokenError::BadChecksum => "token checksum does not match (truncated or mistyped?)",
        })
    }
}

impl std::error::Error for TokenError {}

/// Builds a token from `entropy`, which must be [`ENTROPY_CHARS`] characters of
/// [`ALPHABET`] drawn uniformly at random by the caller.
pub fn format_token(kind: TokenKind, entropy: &str) -> Result<String, TokenError> {
    if entropy.len() != ENTROPY_CHARS {
        return Err(TokenError::BadLength);
    }
    if !entropy.bytes().all(|b| ALPHABET.contains(&b)) {
        return Err(TokenError::BadCharacter);
    }
    let mut token = String::with_capacity(kind.prefix().len() + 1 + ENTROPY_CHARS + CHECKSUM_CHARS);
    token.push_str(kind.prefix());
    token.push('_');
    token.push_str(entropy);
    let checksum = checksum(&token);
    token.push_str(&checksum);
    Ok(token)
}

/// Checks a presented token's shape and checksum, returning its kind.
pub fn parse_token(token: &str) -> Result<TokenKind, TokenError> {
    let kind = TokenKind::ALL
        .into_iter()
        .find(|k| {
            token
                .strip_prefix(k.prefix())
                .is_some_and(|rest| rest.starts_with('_'))
        })
        .ok_or(TokenError::UnknownPrefix)?;
    let body_start = kind.prefix().len() + 1;
    if token.len() != body_start + ENTROPY_CHARS + CHECKSUM_CHARS {
        return Err(TokenError::BadLength);
    }
    if !token.as_bytes()[body_start..]
        .iter()
        .all(|b| ALPHABET.contains(b))
    {
        return Err(TokenError::BadCharacter);
    }
    let (signed, sum) = token.split_at(body_start + ENTROPY_CHARS);
    if checksum(signed).as_bytes().ct_eq(sum.as_bytes()).into() {
        Ok(kind)
    } else {
        Err(TokenError::BadChecksum)
    }
}

/// The data plane's reading of an opaque bearer token, for the wasm filter and the
/// policy service's ext_authz endpoint alike: an API token (a host's, or one minted
/// for an end user) goes on to the check; any other kind of ours is `token_unknown`
/// (admin tokens are for the admin API only, refresh tokens and codes for the token
/// endpoint: none may act on the data plane); anything else is `token_malformed`.
pub fn data_plane_kind(token: &str) -> Result<TokenKind, DenyCode> {
    match parse_token(token) {
        Ok(kind @ (TokenKind::HostApi | TokenKind::PerUser)) => Ok(kind),
        Ok(TokenKind::Admin | TokenKind::Refresh | TokenKind::Code) => Err(DenyCode::TokenUnknown),
        Err(_) => Err(DenyCode::TokenMalformed),
    }
}

/// The part of a token that may be shown in listings and logs.
pub fn display_prefix(token: &str) -> &str {
    let end = token
        .find('_')
        .map_or(0, |i| i + 1 + DISPLAY_CHARS)
        .min(token.len());
    token.get(..end).unwrap_or_default()
}

fn checksum(signed: &str) -> String {
    let mut n = crc32fast::hash(signed.as_bytes());
    let mut out = [b'0'; CHECKSUM_CHARS];
    for slot in out.iter_mut().rev() {
        *slot = ALPHABET[(n % 62) as usize];
        n /= 62;
    }
    out.iter().map(|&b| b as char).collect()
}

/// SHA-256 of a token: the only form in which a token is stored or leaves the filter.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TokenHash([u8; 32]);

impl TokenHash {
    pub fn of(token: &str) -> Self {
        TokenHash(Sha256::digest(token.as_bytes()).into())
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn from_hex(s: &str) -> Option<Self> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(TokenHash(out))
    }

    /// Constant-time comparison, for checking a stored hash against a presented one.
    pub fn ct_eq(&self, other: &TokenHash) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl std::fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Hashes are not secrets, but a short form keeps logs readable.
        write!(f, "TokenHash({}…)", &self.to_hex()[..12])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENTROPY: &str = "0123456789abcdefghijABCDEFGHIJklmnopqrst";

    #[test]
    fn formatted_tokens_parse_back_with_their_kind() {
        for kind in TokenKind::ALL {
            let t = format_token(kind, ENTROPY).unwrap();
            assert!(t.starts_with(&format!("{}_", kind.prefix())));
            assert_eq!(t.len(), 6 + 40 + 6);
            assert_eq!(parse_token(&t), Ok(kind));
        }
    }

    #[test]
    fn any_single_character_change_is_caught() {
        let t = format_token(TokenKind::HostApi, ENTROPY).unwrap();
        for i in 6..t.len() {
            let mut bytes = t.clone().into_bytes();
            bytes[i] = if bytes[i] == b'x' { b'y' } else { b'x' };
            let changed = String::from_utf8(bytes).unwrap();
            assert_eq!(
                parse_token(&changed),
                Err(TokenError::BadChecksum),
                "position {i}"
            );
        }
    }

    #[test]
    fn malformed_tokens_are_rejected() {
        let t = format_token(TokenKind::Admin, ENTROPY).unwrap();
        assert_eq!(parse_token(""), Err(TokenError::UnknownPrefix));
        assert_eq!(parse_token("ghp_abc"), Err(TokenError::UnknownPrefix));
        assert_eq!(parse_token("mcpgtx"), Err(TokenError::UnknownPrefix));
        assert_eq!(parse_token(&t[..t.len() - 1]), Err(TokenError::BadLength));
        assert_eq!(parse_token(&format!("{t}0")), Err(TokenError::BadLength));
        let with_dash = format!("{}-{}", &t[..10], &t[11..]);
        assert_eq!(parse_token(&with_dash), Err(TokenError::BadCharacter));
        let non_ascii = format!("{}é{}", &t[..10], &t[12..]);
        assert_eq!(parse_token(&non_ascii), Err(TokenError::BadCharacter));
    }

    #[test]
    fn only_api_tokens_act_on_the_data_plane() {
        for kind in TokenKind::ALL {
            let t = format_token(kind, ENTROPY).unwrap();
            let expected = match kind {
                TokenKind::HostApi | TokenKind::PerUser => Ok(kind),
                TokenKind::Admin | TokenKind::Refresh | TokenKind::Code => {
                    Err(DenyCode::TokenUnknown)
                }
            };
            assert_eq!(data_plane_kind(&t), expected, "{kind:?}");
            assert_eq!(
                data_plane_kind(&t[..t.len() - 1]),
                Err(DenyCode::TokenMalformed)
            );
        }
        for garbage in ["", "not-a-token", "ghp_abc", "eyJ.a.b"] {
            assert_eq!(data_plane_kind(garbage), Err(DenyCode::TokenMalformed));
        }
    }

    #[test]
    fn format_refuses_bad_entropy() {
        assert_eq!(
            format_token(TokenKind::HostApi, "short"),
            Err(TokenError::BadLength)
        );
        let bad = "!".repeat(ENTROPY_CHARS);
        assert_eq!(
            format_token(TokenKind::HostApi, &bad),
            Err(TokenError::BadCharacter)
        );
    }

    #[test]
    fn display_prefix_shows_kind_and_eight_characters() {
        let t = format_token(TokenKind::HostApi, ENTROPY).unwrap();
        assert_eq!(display_prefix(&t), "mcpgt_01234567");
        assert_eq!(display_prefix("abc"), "");
        assert_eq!(display_prefix("x_ab"), "x_ab");
    }

    #[test]
    fn hash_is_sha256_hex_and_round_trips() {
        let h = TokenHash::of("abc");
        assert_eq!(
            h.to_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(TokenHash::from_hex(&h.to_hex()).unwrap().ct_eq(&h));
        assert!(!TokenHash::of("abd").ct_eq(&h));
        assert!(TokenHash::from_hex("zz").is_none());
    }
}
