//! Minting new tokens from the operating system's CSPRNG.

use mcpguard_core::token::{ALPHABET, ENTROPY_CHARS, TokenKind, format_token};

/// A fresh token of `kind`. Fails only if the OS cannot provide randomness, in which
/// case no token must be issued at all.
pub fn mint(kind: TokenKind) -> Result<String, getrandom::Error> {
    let mut entropy = String::with_capacity(ENTROPY_CHARS);
    let mut buf = [0u8; 64];
    while entropy.len() < ENTROPY_CHARS {
        getrandom::fill(&mut buf)?;
        // Rejection sampling: 248 = 4 * 62, so every character is equally likely.
        for b in buf.iter().filter(|&&b| b < 248) {
            if entropy.len() == ENTROPY_CHARS {
                break;
            }
            entropy.push(char::from(ALPHABET[usize::from(*b % 62)]));
        }
    }
    // The entropy is well-formed by construction.
    format_token(kind, &entropy).map_err(|_| getrandom::Error::UNSUPPORTED)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mcpguard_core::token::parse_token;

    #[test]
    fn minted_tokens_are_well_formed_and_distinct() {
        let a = mint(TokenKind::HostApi).unwrap();
        let b = mint(TokenKind::HostApi).unwrap();
        assert_ne!(a, b);
        assert_eq!(parse_token(&a), Ok(TokenKind::HostApi));
        assert_eq!(
            parse_token(&mint(TokenKind::Admin).unwrap()),
            Ok(TokenKind::Admin)
        );
    }
}
