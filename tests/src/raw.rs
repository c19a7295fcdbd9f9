//! HTTP at the byte level, for attacks an ordinary client will not send: header bytes
//! that are not UTF-8, paths with dot segments (URL libraries resolve them before
//! sending), and an upstream that records exactly what reached it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A whole JSON-RPC message, for raw requests that must reach the check: a POST whose
/// body Envoy's MCP filter cannot read as one message is refused before it.
pub const PING: &[u8] = br#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#;

/// The headers of an MCP POST (each line ending in CRLF): Envoy's MCP filter reads the
/// body only of a POST that has them, as the MCP spec requires of clients.
pub const MCP_HEADERS: &str =
    "content-type: application/json\r\naccept: application/json, text/event-stream\r\n";

/// Sends `head` (request line and headers, each line ending in CRLF, without the blank
/// line) and `body` on a new connection to `127.0.0.1:port`; returns the status (0 when
/// the peer closed without one) and the body, read until the peer closes.
pub async fn request(port: u16, head: &[u8], body: &[u8]) -> (u16, String) {
    let mut tcp = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let mut msg = head.to_vec();
    msg.extend_from_slice(
        format!(
            "content-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    msg.extend_from_slice(body);
    tcp.write_all(&msg).await.expect("send");
    let read = tokio::time::timeout(Duration::from_secs(10), read_response(&mut tcp)).await;
    let Ok(answer) = read else {
        panic!(
            "no answer within 10 s to {:?}",
            String::from_utf8_lossy(head)
        );
    };
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// One response: up to the end of its body when it names its length (Envoy holds a
/// connection it refused open for a second before closing it), else up to the close.
async fn read_response(tcp: &mut TcpStream) -> Vec<u8> {
    let mut answer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = answer.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&answer[..end]).to_ascii_lowercase();
            let length = head.lines().find_map(|l| {
                l.strip_prefix("content-length:")
                    .and_then(|v| v.trim().parse::<usize>().ok())
            });
            if length.is_some_and(|n| answer.len() >= end + 4 + n) {
                return answer;
            }
        }
        match tcp.read(&mut chunk).await {
            Ok(0) | Err(_) => return answer,
            Ok(n) => answer.extend_from_slice(&chunk[..n]),
        }
    }
}

/// An upstream that answers every request `200 {}` (or as told) and records each
/// request line's target (the path it was sent) and the `host` header.
pub struct Spy {
    pub port: u16,
    seen: Arc<Mutex<Vec<(String, String)>>>,
}

impl Spy {
    pub async fn start() -> Spy {
        Self::answering(|_, _| None).await
    }

    /// A spy that answers a request for `target` with `answer(its port, target)`: the
    /// status and headers after `HTTP/1.1 ` (`"401 Unauthorized\r\nwww-authenticate:
    /// …"`) and the body; `None` for `200 {}`.
    pub async fn answering(
        answer: impl Fn(u16, &str) -> Option<(String, String)> + Send + Sync + 'static,
    ) -> Spy {
        let answer = Arc::new(answer);
        let port = crate::free_port();
        let listener = TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("spy bind");
        let seen: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
        let log = seen.clone();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                let (log, answer) = (log.clone(), answer.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tcp.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&buf).into_owned();
                    let target = head.split(' ').nth(1).unwrap_or_default().to_owned();
                    let host = head
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("host").then(|| v.trim().to_owned())
                        })
                        .unwrap_or_default();
                    let (head, body) = answer(port, &target).unwrap_or_else(|| {
                        (
                            "200 OK\r\ncontent-type: application/json".into(),
                            "{}".into(),
                        )
                    });
                    log.lock().expect("spy log").push((target, host));
                    let reply = format!(
                        "HTTP/1.1 {head}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = tcp.write_all(reply.as_bytes()).await;
                });
            }
        });
        Spy { port, seen }
    }

    /// The paths (request targets) that reached this upstream so far, in order.
    pub fn paths(&self) -> Vec<String> {
        self.seen
            .lock()
            .expect("spy log")
            .iter()
            .map(|(p, _)| p.clone())
            .collect()
    }

    /// The `Host` of each request that reached this upstream, in order.
    pub fn hosts(&self) -> Vec<String> {
        self.seen
            .lock()
            .expect("spy log")
            .iter()
            .map(|(_, h)| h.clone())
            .collect()
    }

    pub fn url(&self, base_path: &str) -> String {
        format!("http://127.0.0.1:{}{base_path}", self.port)
    }
}

/// A small deterministic generator (xorshift64*), so a failing random case can be
/// replayed from the seed the test prints.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    /// A seed from the clock, to vary the cases run to run.
    pub fn seed_from_clock() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}
