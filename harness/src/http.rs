//! A minimal HTTP/1.1 client for loopback: readiness probes, the benchmark's sanity
//! checks, Envoy's admin stats and mcpguard-run's seeding. Blocking, no runtime: for
//! async code, use a real client (the tests use reqwest).

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

/// A minimal HTTP/1.1 exchange on loopback (`Connection: close`), for readiness polls,
/// sanity checks and Envoy's admin stats. Returns status and body.
pub fn request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> io::Result<(u16, String)> {
    request_with_headers(port, method, path, headers, body).map(|(status, _, body)| (status, body))
}

/// A response's headers: (lowercased name, value), in order.
pub type Headers = Vec<(String, String)>;

/// [`request`], also returning the response's headers (names lowercased), e.g. an
/// `mcp-session-id`.
pub fn request_with_headers(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> io::Result<(u16, Headers, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    stream.write_all(req.as_bytes())?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, rest) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| bad("no end of headers"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no status"))?;
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked")
    });
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_owned()
    };
    let response_headers = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok((status, response_headers, body))
}

fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

pub fn http_ok(port: u16, path: &str) -> bool {
    matches!(request(port, "GET", path, &[], ""), Ok((200, _)))
}

/// One counter or gauge from Envoy's admin `/stats` (0 when absent).
pub fn envoy_stat(admin_port: u16, name: &str) -> u64 {
    let path = format!("/stats?filter=^{}$", name.replace('.', "\\."));
    request(admin_port, "GET", &path, &[], "")
        .ok()
        .and_then(|(_, body)| {
            body.lines()
                .find_map(|l| l.strip_prefix(&format!("{name}: ")))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_bodies_are_joined() {
        assert_eq!(
            dechunk("5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
            "hello world"
        );
        assert_eq!(dechunk(""), "");
    }
}
