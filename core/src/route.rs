//! The data-plane URLs: `/mcp/{gateway_slug}/{server_slug}[/rest][?query]` (one
//! server), and the gateway URL `/mcp/{gateway_slug}[?query]` (every server the
//! gateway exposes, behind one MCP endpoint: docs/gateway.md).

/// Slugs appear in URLs: lowercase ASCII letters, digits and inner hyphens, 1 to 63
/// characters (a DNS label), so they never need escaping.
pub fn is_valid_slug(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

pub const MCP_PREFIX: &str = "/mcp/";

/// The gateway slug of a gateway URL: exactly `/mcp/{gateway}`, with any query and
/// nothing after the slug (not even `/`, so one URL names the gateway, and no path
/// below it can mean something to an upstream). `None` for every other path.
pub fn gateway_url(path: &str) -> Option<&str> {
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    let gateway = path.strip_prefix(MCP_PREFIX)?;
    is_valid_slug(gateway).then_some(gateway)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct McpPath<'a> {
    pub gateway: &'a str,
    pub server: &'a str,
    /// Whatever follows the server slug, starting with `/`, or empty.
    pub rest: &'a str,
    /// The query string without `?`, if any.
    pub query: Option<&'a str>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// Not under `/mcp/` at all: not ours to govern.
    NotMcp,
    /// Under `/mcp/` but not `/mcp/{gateway}/{server}` with valid slugs.
    Malformed,
}

/// Whether what follows the server slug can only mean a path below the server's own:
/// `/`-separated segments of plain characters, none empty (`//`) or a dot segment,
/// and nothing an upstream might decode or split differently than we do. Refused:
/// percent-encoding (`%2e%2e`, `%252e`, `%5c`, `%2f`), backslashes, `;` (path
/// parameters: `/..;/` is `..` to some servlet containers), `#`, controls and
/// non-ASCII. A trailing `/` is allowed. Envoy normalises the path before the filter
/// sees it (envoy/mcpguard.yaml); this is the filter's own line behind that.
fn is_plain_rest(rest: &str) -> bool {
    if rest.is_empty() {
        return true;
    }
    let Some(inner) = rest.strip_prefix('/') else {
        return false;
    };
    let inner = inner.strip_suffix('/').unwrap_or(inner);
    if inner.is_empty() {
        return rest == "/";
    }
    inner.split('/').all(|seg| {
        !seg.is_empty()
            && seg != "."
            && seg != ".."
            && seg.bytes().all(|b| {
                b.is_ascii_alphanumeric()
                    || matches!(
                        b,
                        b'-' | b'.'
                            | b'_'
                            | b'~'
                            | b'!'
                            | b'$'
                            | b'&'
                            | b'\''
                            | b'('
                            | b')'
                            | b'*'
                            | b'+'
                            | b','
                            | b'='
                            | b':'
                            | b'@'
                    )
            })
    })
}

impl<'a> McpPath<'a> {
    pub fn parse(path: &'a str) -> Result<Self, PathError> {
        let (path, query) = match path.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path, None),
        };
        let after = path.strip_prefix(MCP_PREFIX).ok_or(PathError::NotMcp)?;
        let mut parts = after.splitn(3, '/');
        let gateway = parts.next().unwrap_or_default();
        let server = parts.next().unwrap_or_default();
        if !is_valid_slug(gateway) || !is_valid_slug(server) {
            return Err(PathError::Malformed);
        }
        let rest = &after[gateway.len() + 1 + server.len()..];
        if !is_plain_rest(rest) {
            return Err(PathError::Malformed);
        }
        Ok(McpPath {
            gateway,
            server,
            rest,
            query,
        })
    }

    /// The path to send upstream: the server's base path, then the rest and query.
    pub fn upstream_path(&self, base: &str) -> String {
        let base = base.trim_end_matches('/');
        let mut out = String::with_capacity(base.len() + self.rest.len() + 1);
        out.push_str(base);
        out.push_str(self.rest);
        if out.is_empty() {
            out.push('/');
        }
        if let Some(q) = self.query {
            out.push('?');
            out.push_str(q);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs() {
        for ok in ["a", "demo", "git-hub", "x1", &"a".repeat(63)] {
            assert!(is_valid_slug(ok), "{ok}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "A",
            "a_b",
            "a.b",
            "a/b",
            "é",
            &"a".repeat(64),
        ] {
            assert!(!is_valid_slug(bad), "{bad}");
        }
    }

    #[test]
    fn parses_gateway_server_rest_and_query() {
        let p = McpPath::parse("/mcp/eng/github").unwrap();
        assert_eq!(
            (p.gateway, p.server, p.rest, p.query),
            ("eng", "github", "", None)
        );

        let p = McpPath::parse("/mcp/eng/github/sub/path?x=1&y=2").unwrap();
        assert_eq!(
            (p.gateway, p.server, p.rest, p.query),
            ("eng", "github", "/sub/path", Some("x=1&y=2"))
        );
        let p = McpPath::parse("/mcp/eng/github/").unwrap();
        assert_eq!(p.rest, "/");
        let p = McpPath::parse("/mcp/eng/github/v1.2/a-b_c~d/x@y:z/").unwrap();
        assert_eq!(p.rest, "/v1.2/a-b_c~d/x@y:z/");
        // The query is not part of the path walk: it is passed on as it came.
        let p = McpPath::parse("/mcp/eng/github?q=%2e%2e/x").unwrap();
        assert_eq!((p.rest, p.query), ("", Some("q=%2e%2e/x")));
    }

    #[test]
    fn refuses_what_is_not_ours_or_malformed() {
        assert_eq!(McpPath::parse("/"), Err(PathError::NotMcp));
        assert_eq!(McpPath::parse("/mcpx/a/b"), Err(PathError::NotMcp));
        assert_eq!(McpPath::parse("/.well-known/x"), Err(PathError::NotMcp));
        for bad in [
            "/mcp/",
            "/mcp/eng",
            "/mcp/eng/",
            "/mcp//github",
            "/mcp/Eng/github",
            "/mcp/eng/git%68ub",
            "/mcp/eng/github/../admin",
            "/mcp/eng/github/./x",
            "/mcp/eng/github/a%2F..%2fb",
            "/mcp/eng/github/%2e%2e/x",
            "/mcp/eng/github\\x",
            "/mcp/eng/github/a\\b",
            // Walks an upstream might still make of what passed Envoy.
            "/mcp/eng/github/..;/x",
            "/mcp/eng/github/x/..;/..;/y",
            "/mcp/eng/github/%5c..%5cx",
            "/mcp/eng/github/%252e%252e/x",
            "/mcp/eng/github//x",
            "/mcp/eng/github/x//",
            "/mcp/eng/github/a;b",
            "/mcp/eng/github/%41",
            "/mcp/eng/github/caf\u{e9}",
            "/mcp/eng/github/a\tb",
            "/mcp/eng/github/a#b",
            "/mcp/eng/github/...x/../y",
        ] {
            assert_eq!(McpPath::parse(bad), Err(PathError::Malformed), "{bad}");
        }
    }

    #[test]
    fn the_gateway_url_is_exactly_one_slug() {
        assert_eq!(gateway_url("/mcp/eng"), Some("eng"));
        assert_eq!(gateway_url("/mcp/eng?x=1"), Some("eng"));
        for other in [
            "/mcp/",
            "/mcp",
            "/mcp/eng/",
            "/mcp/eng/github",
            "/mcp/Eng",
            "/mcp/e%6eg",
            "/mcpx/eng",
            "/.well-known/oauth-protected-resource/mcp/eng",
            "/mcp/eng;x",
        ] {
            assert_eq!(gateway_url(other), None, "{other}");
        }
        // Not a server path either: the two forms never overlap.
        assert_eq!(McpPath::parse("/mcp/eng"), Err(PathError::Malformed));
    }

    #[test]
    fn upstream_path_joins_base_rest_and_query() {
        let p = McpPath::parse("/mcp/g/s").unwrap();
        assert_eq!(p.upstream_path("/mcp"), "/mcp");
        assert_eq!(p.upstream_path(""), "/");
        assert_eq!(p.upstream_path("/"), "/");
        let p = McpPath::parse("/mcp/g/s/x?a=b").unwrap();
        assert_eq!(p.upstream_path("/api/mcp/"), "/api/mcp/x?a=b");
        assert_eq!(p.upstream_path(""), "/x?a=b");
    }
}
