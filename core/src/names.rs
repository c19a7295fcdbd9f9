//! How the gateway URL names what its servers offer: one namespace for every server
//! of the gateway, each name reversible to its server and the server's own name.
//!
//! - Tools and prompts: `{server_slug}__{name}`, always, even with one server, so
//!   adding a server renames nothing. A slug never holds `_`, so the first `__` ends
//!   it whatever the name holds.
//! - Resources (and resource templates): `{server_slug}+{uri}`. A URI scheme may hold
//!   `+` and a slug never does, so the result is still a URI (its scheme is
//!   `{slug}+{scheme}`), a template stays a template, and the first `+` ends the slug.
//!
//! Clients commonly refuse tool names over 64 characters; a name that would be longer
//! is left out of lists (and logged) rather than cut, which could collide.

use crate::route::is_valid_slug;

/// Between a server's slug and its tool or prompt's own name.
pub const SEPARATOR: &str = "__";

/// Between a server's slug and its resource's own URI.
pub const URI_SEPARATOR: char = '+';

/// Longest tool or prompt name offered, in bytes (clients' limit, e.g. `^[a-zA-Z0-9_-]{1,64}$`).
pub const MAX_NAME: usize = 64;

/// What kind of name: a tool's or prompt's, or a resource's URI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Naming {
    Name,
    Uri,
}

impl Naming {
    /// The gateway's name for `server`'s item `own`; `None` when it would be too long
    /// (names only: URIs have no such limit).
    pub fn expose(self, server: &str, own: &str) -> Option<String> {
        match self {
            Naming::Name => {
                let name = format!("{server}{SEPARATOR}{own}");
                (name.len() <= MAX_NAME).then_some(name)
            }
            Naming::Uri => Some(format!("{server}{URI_SEPARATOR}{own}")),
        }
    }

    /// The server and its own name behind a gateway name; `None` for a name the
    /// gateway never gave out.
    pub fn resolve(self, exposed: &str) -> Option<(&str, &str)> {
        let (server, own) = match self {
            Naming::Name => exposed.split_once(SEPARATOR)?,
            Naming::Uri => exposed.split_once(URI_SEPARATOR)?,
        };
        (is_valid_slug(server) && !own.is_empty()).then_some((server, own))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_the_first_separator_ends_the_slug() {
        for (server, own) in [
            ("demo", "echo"),
            ("git-hub", "create__issue"),
            ("a", "_x"),
            ("a", "__"),
        ] {
            let exposed = Naming::Name.expose(server, own).unwrap();
            assert_eq!(Naming::Name.resolve(&exposed), Some((server, own)));
        }
        assert_eq!(
            Naming::Name.expose("demo", "echo").as_deref(),
            Some("demo__echo")
        );
    }

    #[test]
    fn names_over_64_bytes_are_not_given_out() {
        let own = "x".repeat(MAX_NAME - "demo__".len());
        assert_eq!(Naming::Name.expose("demo", &own).unwrap().len(), MAX_NAME);
        assert_eq!(Naming::Name.expose("demo", &format!("{own}y")), None);
        assert_eq!(Naming::Name.expose("demo", &"é".repeat(30)), None);
    }

    #[test]
    fn uris_round_trip_and_stay_uris() {
        for (server, own) in [
            ("demo", "demo://greeting"),
            ("fs", "file:///tmp/a+b"),
            ("fs", "file:///{path}"),
            ("x", "https://h/p?q=1#f"),
        ] {
            let exposed = Naming::Uri.expose(server, own).unwrap();
            assert_eq!(Naming::Uri.resolve(&exposed), Some((server, own)));
        }
        assert_eq!(
            Naming::Uri.expose("fs", "file:///x").as_deref(),
            Some("fs+file:///x")
        );
    }

    #[test]
    fn names_the_gateway_never_gave_out_resolve_to_nothing() {
        for bad in [
            "echo",
            "__echo",
            "Demo__echo",
            "demo__",
            "de_mo__x",
            "-a__x",
            "",
        ] {
            assert_eq!(Naming::Name.resolve(bad), None, "{bad}");
        }
        for bad in ["demo://x", "+demo://x", "demo+", "DEMO+x://y"] {
            assert_eq!(Naming::Uri.resolve(bad), None, "{bad}");
        }
    }
}
