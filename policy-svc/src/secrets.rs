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

/// Whether two secrets (a CSRF value, a client id) are equal, compared in constant time.
pub fn ct_eq(a: &str, b: &str) -> bool {
    use subtle::ConstantTimeEq;
    a.as_bytes().ct_eq(b.as_bytes()).into()
}

/// 256 random bits, base64url: one-time secrets (links, sessions), client ids, `jti`s.
pub fn random_id() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)?;
    Ok(mcpguard_core::oauth::base64url(&bytes))
}

/// Seals credentials at rest with XChaCha20-Poly1305 under the operator's key. Each
/// sealed value is bound to what it belongs to (associated data), so a ciphertext
/// copied onto another user's row does not open.
///
/// During a key rotation it also holds the previous key: values are sealed under the
/// current key and open under either, so replicas keep serving while `reseal` moves
/// every stored value to the current key.
pub struct SecretBox {
    current: chacha20poly1305::XChaCha20Poly1305,
    previous: Option<chacha20poly1305::XChaCha20Poly1305>,
}

const NONCE: usize = 24;

/// Which key opened a sealed value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opened {
    Current(String),
    Previous(String),
}

/// Writes a fresh random key to `path` (mode 0600); refuses to replace an existing file,
/// which may be the only copy of a key that stored values need.
pub fn create_key_file(path: &std::path::Path) -> anyhow::Result<()> {
    if path.exists() {
        anyhow::bail!("{} exists; not replacing a key", path.display());
    }
    let mut key = [0u8; 32];
    getrandom::fill(&mut key)?;
    crate::write_secret_file(path, &hex::encode(key))
}

/// A key file that its group or other users may read is refused, not quietly fixed:
/// whoever could read it may hold a copy (and a file mounted read-only, such as a
/// Kubernetes secret, cannot be fixed from here anyway).
fn check_key_mode(path: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .with_context(|| format!("reading the secrets key {}", path.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        anyhow::bail!(
            "the secrets key {} can be read by its group or other users (mode {:04o}); \
             make it readable by its owner only (chmod 600, or defaultMode 0400 for a \
             Kubernetes secret volume) and, if others may have read it, rotate the key",
            path.display(),
            mode & 0o7777
        );
    }
    Ok(())
}

fn read_key(path: &std::path::Path) -> anyhow::Result<chacha20poly1305::XChaCha20Poly1305> {
    use anyhow::Context;
    use chacha20poly1305::KeyInit;
    check_key_mode(path)?;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the secrets key {}", path.display()))?;
    let mut key = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut key).map_err(|_| {
        anyhow::anyhow!(
            "{} must hold 64 hex characters (a 32-byte key)",
            path.display()
        )
    })?;
    Ok(chacha20poly1305::XChaCha20Poly1305::new(&key.into()))
}

impl SecretBox {
    /// The key is 32 bytes, hex-encoded (64 characters) in `path`. A missing file is
    /// created with a fresh key (mode 0600), so a first start needs no setup.
    pub fn load_or_create(path: &std::path::Path) -> anyhow::Result<Self> {
        if !path.exists() {
            create_key_file(path)?;
            tracing::info!(path = %path.display(), "created a new secrets key");
        }
        Ok(SecretBox {
            current: read_key(path)?,
            previous: None,
        })
    }

    /// The current key as [`SecretBox::load_or_create`], and the key being retired,
    /// which must exist.
    pub fn load(
        path: &std::path::Path,
        previous: Option<&std::path::Path>,
    ) -> anyhow::Result<Self> {
        let mut sb = Self::load_or_create(path)?;
        sb.previous = previous.map(read_key).transpose()?;
        Ok(sb)
    }

    pub fn seal(&self, plain: &str, bound_to: &str) -> Result<Vec<u8>, getrandom::Error> {
        use chacha20poly1305::aead::{Aead, Payload};
        let mut nonce = [0u8; NONCE];
        getrandom::fill(&mut nonce)?;
        let sealed = self
            .current
            .encrypt(
                &nonce.into(),
                Payload {
                    msg: plain.as_bytes(),
                    aad: bound_to.as_bytes(),
                },
            )
            .map_err(|_| getrandom::Error::UNSUPPORTED)?;
        Ok([nonce.as_slice(), &sealed].concat())
    }

    /// `None` when the value was sealed under another key, for something else, or has
    /// been tampered with.
    pub fn open(&self, sealed: &[u8], bound_to: &str) -> Option<String> {
        match self.open_which(sealed, bound_to)? {
            Opened::Current(v) | Opened::Previous(v) => Some(v),
        }
    }

    /// Like [`SecretBox::open`], saying which key opened it.
    pub fn open_which(&self, sealed: &[u8], bound_to: &str) -> Option<Opened> {
        use chacha20poly1305::aead::{Aead, Payload};
        if sealed.len() < NONCE {
            return None;
        }
        let (nonce, body) = sealed.split_at(NONCE);
        let nonce: [u8; NONCE] = nonce.try_into().ok()?;
        let open = |cipher: &chacha20poly1305::XChaCha20Poly1305| {
            let plain = cipher
                .decrypt(
                    &nonce.into(),
                    Payload {
                        msg: body,
                        aad: bound_to.as_bytes(),
                    },
                )
                .ok()?;
            String::from_utf8(plain).ok()
        };
        if let Some(v) = open(&self.current) {
            return Some(Opened::Current(v));
        }
        self.previous.as_ref().and_then(open).map(Opened::Previous)
    }
}

/// What an identity's sealed value is bound to.
pub fn identity_binding(user_id: i64, server_id: i64) -> String {
    format!("mcpguard identity user={user_id} server={server_id}")
}

/// What an OAuth signing key's sealed private half is bound to.
pub fn signing_key_binding(kid: &str) -> String {
    format!("mcpguard signing key kid={kid}")
}

/// What an exposure's shared credential is bound to.
pub fn shared_binding(gateway_id: i64, server_id: i64) -> String {
    format!("mcpguard shared gateway={gateway_id} server={server_id}")
}

#[cfg(test)]
mod box_tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_with_the_same_key_and_binding() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k");
        let sb = SecretBox::load_or_create(&key).unwrap();
        let sealed = sb.seal("Bearer alice", &identity_binding(1, 2)).unwrap();
        assert!(!String::from_utf8_lossy(&sealed).contains("alice"));
        assert_eq!(
            sb.open(&sealed, &identity_binding(1, 2)).as_deref(),
            Some("Bearer alice")
        );
        assert_eq!(
            sb.open(&sealed, &identity_binding(3, 2)),
            None,
            "moved to another user"
        );
        let mut tampered = sealed.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert_eq!(sb.open(&tampered, &identity_binding(1, 2)), None);
        // The same file gives the same key; another file does not.
        assert!(
            SecretBox::load_or_create(&key)
                .unwrap()
                .open(&sealed, &identity_binding(1, 2))
                .is_some()
        );
        let other = SecretBox::load_or_create(&dir.path().join("other")).unwrap();
        assert_eq!(other.open(&sealed, &identity_binding(1, 2)), None);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn a_key_file_others_can_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k");
        SecretBox::load_or_create(&key).unwrap();
        for loose in [0o644, 0o640, 0o604] {
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(loose)).unwrap();
            let err = SecretBox::load_or_create(&key).err().unwrap().to_string();
            assert!(
                err.contains("can be read by its group or other users"),
                "{err}"
            );
            assert!(
                SecretBox::load(&dir.path().join("new"), Some(&key)).is_err(),
                "the previous key too"
            );
        }
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert!(SecretBox::load_or_create(&key).is_ok());
    }

    #[test]
    fn secret_files_are_made_owner_only_even_when_they_exist() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bootstrap-admin-token");
        std::fs::write(&path, "old").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        crate::write_secret_file(&path, "new").unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new\n");
    }

    #[test]
    fn during_a_rotation_values_seal_under_the_new_key_and_open_under_either() {
        let dir = tempfile::tempdir().unwrap();
        let (old_key, new_key) = (dir.path().join("old"), dir.path().join("new"));
        let bound = identity_binding(1, 2);
        let old = SecretBox::load_or_create(&old_key).unwrap();
        let sealed_old = old.seal("Bearer alice", &bound).unwrap();

        create_key_file(&new_key).unwrap();
        let before = std::fs::read(&new_key).unwrap();
        assert!(
            create_key_file(&new_key).is_err(),
            "an existing key is never replaced"
        );
        assert_eq!(std::fs::read(&new_key).unwrap(), before);

        let rotating = SecretBox::load(&new_key, Some(&old_key)).unwrap();
        assert_eq!(
            rotating.open_which(&sealed_old, &bound),
            Some(Opened::Previous("Bearer alice".into()))
        );
        let sealed_new = rotating.seal("Bearer alice", &bound).unwrap();
        assert_eq!(
            rotating.open_which(&sealed_new, &bound),
            Some(Opened::Current("Bearer alice".into()))
        );
        // After the rotation the old key is gone: only re-sealed values open.
        let rotated = SecretBox::load(&new_key, None).unwrap();
        assert_eq!(rotated.open(&sealed_old, &bound), None);
        assert!(rotated.open(&sealed_new, &bound).is_some());
        assert_eq!(old.open(&sealed_new, &bound), None);
        // A previous key that does not exist is an error, not a fresh key.
        assert!(SecretBox::load(&new_key, Some(&dir.path().join("missing"))).is_err());
    }
}

impl SecretBox {
    /// `open` for `check::decide`. A value that does not open is logged (it means
    /// a wrong key or tampering) and the request is refused.
    pub fn opener(&self) -> impl FnOnce(&str, &[u8]) -> Option<String> + '_ {
        move |bound_to, sealed| {
            let opened = self.open(sealed, bound_to);
            if opened.is_none() {
                tracing::error!(
                    bound_to,
                    "stored credential does not open with the secrets key; refusing"
                );
            }
            opened
        }
    }
}
