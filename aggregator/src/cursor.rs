//! The gateway URL's list cursors: where a merged list goes on, as a `nextCursor` no
//! one can forge and only the session it was given to can use.
//!
//! A page of a merged list holds one upstream page from each server that still has
//! one, so a cursor names every server whose list goes on and that server's own cursor
//! (a server whose list ended, or that was left out, is not named). It is
//! `{payload}.{tag}` in hex: the payload is JSON (`{"m": method, "s": [[slug,
//! cursor], ...]}`, slugs in order), the tag HMAC-SHA256 over the session id, then the
//! payload, under the session key. A cursor of another session, another list method,
//! or tampered with fails, and the request is a JSON-RPC error `-32602`. The servers it
//! names are still checked on every page, uncached: a cursor only says where to go on,
//! never what the caller may use.

use mcpguard_core::route::is_valid_slug;
use serde_json::{Value, json};
use subtle::ConstantTimeEq;

use crate::session::SessionKey;

/// Longest cursor accepted from a client (checked before anything is decoded).
pub const MAX_CURSOR: usize = 64 * 1024;

/// Longest upstream cursor carried on; a server whose cursor is longer has its list
/// end there (logged), so the gateway's cursor stays bounded.
pub const MAX_UPSTREAM_CURSOR: usize = 1024;

const DOMAIN: &[u8] = b"mcpguard-aggregator-cursor\0";

/// Where a merged list goes on: each server whose list goes on, in slug order, with
/// its own cursor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub method: String,
    pub servers: Vec<(String, String)>,
}

impl Cursor {
    /// The `nextCursor` for `session_id`.
    pub fn encode(&self, key: &SessionKey, session_id: &str) -> String {
        let payload = json!({"m": self.method, "s": self.servers}).to_string();
        let tag = key.tag_parts(DOMAIN, &[session_id.as_bytes(), payload.as_bytes()]);
        format!("{}.{}", hex::encode(payload), hex::encode(tag))
    }

    /// The cursor `text` says, if `key` gave it out to `session_id` for `method`.
    /// Constant time in the tag; the payload is read only once the tag holds.
    pub fn decode(key: &SessionKey, session_id: &str, method: &str, text: &str) -> Option<Cursor> {
        if text.len() > MAX_CURSOR
            || !text
                .bytes()
                .all(|b| b == b'.' || b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return None;
        }
        let (payload, tag) = text.split_once('.')?;
        let (payload, tag) = (hex::decode(payload).ok()?, hex::decode(tag).ok()?);
        let expected = key.tag_parts(DOMAIN, &[session_id.as_bytes(), &payload]);
        if !bool::from(expected.ct_eq(&tag)) {
            return None;
        }
        let value: Value = serde_json::from_slice(&payload).ok()?;
        if value.get("m")?.as_str()? != method {
            return None;
        }
        let servers = value
            .get("s")?
            .as_array()?
            .iter()
            .map(|pair| match pair.as_array()?.as_slice() {
                [Value::String(slug), Value::String(cursor)] if is_valid_slug(slug) => {
                    Some((slug.clone(), cursor.clone()))
                }
                _ => None,
            })
            .collect::<Option<Vec<_>>>()?;
        Some(Cursor {
            method: method.to_owned(),
            servers,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cursor() -> Cursor {
        Cursor {
            method: "tools/list".into(),
            servers: vec![
                ("alpha".into(), "page-2".into()),
                ("beta".into(), "{\"offset\":40}".into()),
            ],
        }
    }

    #[test]
    fn a_cursor_comes_back_as_it_was_given() {
        let key = SessionKey::fixed(1);
        let text = cursor().encode(&key, "s1");
        assert_eq!(
            Cursor::decode(&key, "s1", "tools/list", &text),
            Some(cursor())
        );
        // Opaque to the client: no slug or upstream cursor in the clear.
        assert!(
            !text.contains("alpha") && !text.contains("page-2"),
            "{text}"
        );
    }

    #[test]
    fn a_cursor_of_another_session_key_or_method_is_refused() {
        let key = SessionKey::fixed(1);
        let text = cursor().encode(&key, "s1");
        assert_eq!(Cursor::decode(&key, "s2", "tools/list", &text), None);
        assert_eq!(
            Cursor::decode(&SessionKey::fixed(2), "s1", "tools/list", &text),
            None
        );
        assert_eq!(Cursor::decode(&key, "s1", "prompts/list", &text), None);
    }

    #[test]
    fn a_tampered_or_malformed_cursor_is_refused() {
        let key = SessionKey::fixed(1);
        let text = cursor().encode(&key, "s1");
        let (payload, tag) = text.split_once('.').unwrap();
        // Another server named in the payload, the tag kept.
        let forged = Cursor {
            method: "tools/list".into(),
            servers: vec![("secret".into(), String::new())],
        }
        .encode(&key, "s1");
        let forged_payload = forged.split_once('.').unwrap().0;
        let mut flipped = text.clone().into_bytes();
        let last = flipped.len() - 1;
        flipped[last] = if flipped[last] == b'0' { b'1' } else { b'0' };
        let flipped = String::from_utf8(flipped).unwrap();
        for bad in [
            String::new(),
            "bogus".into(),
            payload.to_owned(),
            format!("{payload}."),
            format!("{forged_payload}.{tag}"),
            flipped,
            text.to_uppercase(),
            format!("{text}00"),
            format!("{payload}.{tag}.{tag}"),
            "a".repeat(MAX_CURSOR + 1),
        ] {
            assert_eq!(
                Cursor::decode(&key, "s1", "tools/list", &bad),
                None,
                "{bad}"
            );
        }
        // Well signed but not a cursor's shape (a bad slug): refused too.
        let odd = Cursor {
            method: "tools/list".into(),
            servers: vec![("Not A Slug".into(), String::new())],
        }
        .encode(&key, "s1");
        assert_eq!(Cursor::decode(&key, "s1", "tools/list", &odd), None);
    }
}
