//! Serving one port: our own accept loop over hyper, for the limits `axum::serve` has
//! no knobs for. Each port has its own budget of connections (past it a new connection
//! is closed at once, so a flood of the public port never takes the file descriptors
//! and tasks the check port needs), a deadline for each request's headers and for a new
//! connection's first request (slowloris), an idle timeout, a deadline per request
//! (slow bodies), a body size limit, and on shutdown a bounded drain.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tower::ServiceExt;

use crate::error::ApiError;

/// What one port allows (the flags in `config.rs`).
#[derive(Debug, Clone, Copy)]
pub struct PortLimits {
    pub max_connections: u32,
    pub max_body_bytes: usize,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub request_timeout: Duration,
    pub drain_timeout: Duration,
    pub h2_max_concurrent_streams: u32,
}

/// Serves `app` on `listener` until `stop` turns true, then stops accepting, lets every
/// connection finish what it has in flight (at most `drain_timeout`) and returns once
/// all are closed, so that every clone of the app (and of the state in it) is gone.
pub async fn serve(
    port: &'static str,
    listener: TcpListener,
    app: Router,
    limits: PortLimits,
    mut stop: watch::Receiver<bool>,
) {
    let budget = Arc::new(Semaphore::new(limits.max_connections as usize));
    let builder = Arc::new(builder(&limits));
    let mut refused = Refused::default();
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stop.wait_for(|stop| *stop) => break,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors (EMFILE) or a connection reset while queued:
                // the others wait in the kernel's queue; try again shortly rather than spin.
                tracing::warn!(port, error = %e, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let Ok(permit) = budget.clone().try_acquire_owned() else {
            // Closing it at once (rather than leaving it queued) tells the client now and
            // keeps the descriptor free.
            drop(tcp);
            refused.note(port, limits.max_connections);
            continue;
        };
        tokio::spawn(connection(
            tcp,
            peer,
            app.clone(),
            builder.clone(),
            limits,
            stop.clone(),
            permit,
        ));
    }
    drop(listener);
    // Each connection drains and closes on its own; its permit comes back when it has.
    let _ = budget.acquire_many(limits.max_connections).await;
}

fn builder(limits: &PortLimits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // HTTP/1.1: hyper starts this timer whenever the connection waits for a request, so
    // it bounds both a request's headers and an idle keep-alive connection.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    // HTTP/2 (Envoy's callouts to the check port, prior knowledge): many requests per
    // connection, bounded; idling is watched in `connection`.
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.h2_max_concurrent_streams);
    builder
}

async fn connection(
    tcp: TcpStream,
    peer: std::net::SocketAddr,
    app: Router,
    builder: Arc<auto::Builder<TokioExecutor>>,
    limits: PortLimits,
    mut stop: watch::Receiver<bool>,
    _permit: OwnedSemaphorePermit,
) {
    // TCP_NODELAY: an answer is written in two segments (hyper's HTTP/2 flow-control
    // update, then the response); with Nagle the second waits for the peer's delayed
    // ACK of the first, which put 40 ms on a check's tail in `make bench`.
    let _ = tcp.set_nodelay(true);
    let activity = Arc::new(Activity::new());
    let max_body = limits.max_body_bytes as u64;
    let service = {
        let activity = activity.clone();
        hyper::service::service_fn(move |mut req: Request<hyper::body::Incoming>| {
            let in_flight = activity.begin();
            // The peer address, as axum's `into_make_service_with_connect_info` gives it:
            // the sign-in throttle counts attempts per client.
            req.extensions_mut()
                .insert(axum::extract::ConnectInfo(peer));
            // A declared larger body is refused before any handler runs; a longer one
            // than declared (or chunked) is cut off by the extractors (`limit_bodies`).
            let too_large = declared_length(&req).is_some_and(|len| len > max_body);
            let answer = (!too_large)
                .then(|| tokio::time::timeout(limits.request_timeout, app.clone().oneshot(req)));
            async move {
                let response = match answer {
                    None => ApiError::BodyTooLarge.into_response(),
                    Some(answer) => match answer.await {
                        Ok(Ok(response)) => in_our_format(response),
                        Ok(Err(never)) => match never {},
                        Err(_) => ApiError::RequestTimeout.into_response(),
                    },
                };
                Ok::<_, Infallible>(in_flight.until_sent(response))
            }
        })
    };
    let conn = builder.serve_connection(TokioIo::new(tcp), service);
    tokio::pin!(conn);
    loop {
        // Re-armed on every wake: requests may have come and gone meanwhile.
        let check_at = activity
            .closes_at(&limits)
            .unwrap_or_else(|| Instant::now() + limits.idle_timeout);
        tokio::select! {
            _ = conn.as_mut() => return,
            _ = stop.wait_for(|stop| *stop) => break,
            // From the first request's deadline to the idle timeout's.
            () = activity.first_request.notified() => {}
            () = tokio::time::sleep_until(check_at.into()) => {
                if activity.closes_at(&limits).is_some_and(|at| at <= Instant::now()) {
                    if !activity.served.load(Ordering::Acquire) {
                        // Never sent a request: nothing to finish, no GOAWAY to wait on.
                        return;
                    }
                    break;
                }
            }
        }
    }
    // HTTP/1.1: close after the answer in flight; HTTP/2: GOAWAY, finish the streams.
    // A peer that never reads its answers is cut off after the drain timeout.
    conn.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(limits.drain_timeout, conn).await;
}

/// What one connection is doing, for its idle timeout: requests in flight, and since
/// when none has been.
struct Activity {
    opened: Instant,
    in_flight: AtomicUsize,
    served: AtomicBool,
    /// Wakes the connection's watch once, at its first request (only then: a timer
    /// re-armed on every request would cost the check path).
    first_request: tokio::sync::Notify,
    /// Since `opened`, when the last request in flight ended.
    idle_since_nanos: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            opened: Instant::now(),
            in_flight: AtomicUsize::new(0),
            served: AtomicBool::new(false),
            first_request: tokio::sync::Notify::new(),
            idle_since_nanos: AtomicU64::new(0),
        }
    }

    fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        if !self.served.swap(true, Ordering::AcqRel) {
            self.first_request.notify_one();
        }
        InFlight(self.clone())
    }

    /// When this connection is to be closed as things stand: `None` while a request
    /// is in flight. A connection that never sent a request gets the header read
    /// timeout (the wait for its first request's headers, whatever the protocol).
    fn closes_at(&self, limits: &PortLimits) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let since =
            self.opened + Duration::from_nanos(self.idle_since_nanos.load(Ordering::Acquire));
        Some(if self.served.load(Ordering::Acquire) {
            since + limits.idle_timeout
        } else {
            since + limits.header_read_timeout
        })
    }
}

struct InFlight(Arc<Activity>);

impl InFlight {
    /// Ends this request's activity when `response` is done: now for a body already
    /// whole in memory (every JSON answer: the check path pays nothing more), else when
    /// its body ends or is dropped. A streaming handler (the check stream, an event
    /// stream) returns at once while its body lives on; had the guard dropped with the
    /// handler, a stream alone on its connection would be closed by the idle timeout.
    fn until_sent(self, response: Response) -> Response {
        use hyper::body::Body as _;
        if response.body().is_end_stream() || response.body().size_hint().exact().is_some() {
            return response;
        }
        response.map(|body| {
            axum::body::Body::new(Guarded {
                body,
                in_flight: Some(self),
            })
        })
    }
}

/// A response body that holds its request's [`InFlight`] until it ends.
struct Guarded {
    body: axum::body::Body,
    in_flight: Option<InFlight>,
}

impl hyper::body::Body for Guarded {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.body).poll_frame(cx);
        if let std::task::Poll::Ready(None | Some(Err(_))) = polled {
            // Ended (or failed): the connection may idle from now.
            self.in_flight = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let since = u64::try_from(self.0.opened.elapsed().as_nanos()).unwrap_or(u64::MAX);
        // Before the count drops, so whoever sees no request in flight sees this time.
        self.0.idle_since_nanos.fetch_max(since, Ordering::AcqRel);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Connections closed because the port's budget was spent, logged at most every 10 s.
#[derive(Default)]
struct Refused {
    since_log: u64,
    logged: Option<Instant>,
}

impl Refused {
    fn note(&mut self, port: &'static str, max_connections: u32) {
        self.since_log += 1;
        if self
            .logged
            .is_none_or(|at| at.elapsed() >= Duration::from_secs(10))
        {
            tracing::warn!(
                port,
                max_connections,
                refused = self.since_log,
                "connection limit reached: new connections are closed at once"
            );
            self.since_log = 0;
            self.logged = Some(Instant::now());
        }
    }
}

/// `app` with request bodies limited to `max` bytes where they are read (axum's
/// extractors; every handler reads its body through one): a longer body is cut off
/// where it passes the limit, and the answer is 413 `body_too_large` in our error
/// format. A declared larger body is refused earlier, in `connection`. (Done here and
/// there rather than in a middleware: a middleware and a wrapped body per request cost
/// the check path several percent of its checks/s in `make bench`.)
pub fn limit_bodies(app: Router, max: usize) -> Router {
    app.layer(DefaultBodyLimit::max(max))
}

fn declared_length<B>(req: &Request<B>) -> Option<u64> {
    req.headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

/// Extractors other than ours (forms, text) answer a cut-off body in plain text.
fn in_our_format(response: Response) -> Response {
    if response.status() != StatusCode::PAYLOAD_TOO_LARGE {
        return response;
    }
    let json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if json {
        response
    } else {
        ApiError::BodyTooLarge.into_response()
    }
}

/// Raises the open-file soft limit to the hard limit (a flood must meet the connection
/// budgets, not the often low default soft limit) and returns the limit now in force.
pub fn raise_open_file_limit() -> Option<u64> {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => Some(limit),
        Err(e) => {
            tracing::warn!(error = %e, "could not read or raise the open-file limit");
            None
        }
    }
}

/// The connection budgets (public, check) that fit in `open_files` descriptors with
/// `reserve` kept for everything else (database connections, files, listeners): the
/// check port's budget is kept whole if it can be, the public port's shrinks first.
pub fn fit_budgets(open_files: u64, reserve: u64, public: u32, check: u32) -> (u32, u32) {
    let room = open_files.saturating_sub(reserve);
    let check_fits = u64::from(check).min(room).max(1);
    let public_fits = u64::from(public)
        .min(room.saturating_sub(check_fits))
        .max(1);
    (
        u32::try_from(public_fits).unwrap_or(public),
        u32::try_from(check_fits).unwrap_or(check),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_check_port_keeps_its_budget_and_the_public_port_shrinks_first() {
        assert_eq!(fit_budgets(1_048_576, 100, 1024, 1024), (1024, 1024));
        assert_eq!(fit_budgets(2000, 100, 1024, 1024), (876, 1024));
        assert_eq!(fit_budgets(1124, 100, 1024, 1024), (1, 1024));
        assert_eq!(fit_budgets(600, 100, 1024, 1024), (1, 500));
        assert_eq!(fit_budgets(50, 100, 1024, 1024), (1, 1));
    }

    fn limits() -> PortLimits {
        PortLimits {
            max_connections: 4,
            max_body_bytes: 16,
            header_read_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(1),
            h2_max_concurrent_streams: 8,
        }
    }

    #[test]
    fn a_connection_idles_from_its_last_request_and_never_while_one_is_in_flight() {
        let activity = Arc::new(Activity::new());
        let l = limits();
        // No request yet: the first must arrive within the header read timeout.
        assert_eq!(
            activity.closes_at(&l),
            Some(activity.opened + l.header_read_timeout)
        );
        let first = activity.begin();
        let second = activity.begin();
        assert_eq!(activity.closes_at(&l), None);
        drop(first);
        assert_eq!(activity.closes_at(&l), None, "one still in flight");
        drop(second);
        let at = activity.closes_at(&l).unwrap();
        assert!(at > activity.opened + l.idle_timeout);
        assert!(at <= Instant::now() + l.idle_timeout);
    }

    /// Reads from `tcp` until `want` has arrived; `false` on EOF (the server closed).
    async fn read_until(tcp: &mut TcpStream, seen: &mut Vec<u8>, want: &[u8]) -> bool {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 1024];
        while !seen.windows(want.len()).any(|w| w == want) {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
        true
    }

    #[tokio::test]
    async fn a_streaming_answer_keeps_its_connection_open_until_its_body_ends() {
        use tokio::io::AsyncWriteExt;
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<axum::body::Bytes, Infallible>>(1);
        let rx = Arc::new(std::sync::Mutex::new(Some(rx)));
        let app = Router::new().route(
            "/stream",
            axum::routing::get(move || {
                let rx = rx.lock().unwrap().take().unwrap();
                async move {
                    axum::body::Body::from_stream(futures_util::stream::unfold(
                        rx,
                        |mut rx| async move { rx.recv().await.map(|chunk| (chunk, rx)) },
                    ))
                }
            }),
        );
        let l = PortLimits {
            idle_timeout: Duration::from_millis(150),
            drain_timeout: Duration::from_millis(100),
            // Longer than the whole test: a close comes from the idle watch, not hyper.
            header_read_timeout: Duration::from_secs(30),
            ..limits()
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (_stop_tx, stop) = watch::channel(false);
        let server = tokio::spawn(serve("test", listener, app, l, stop));

        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET /stream HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut seen = Vec::new();
        assert!(read_until(&mut tcp, &mut seen, b"\r\n\r\n").await);
        // Time passing is the point: several idle timeouts plus the drain timeout, with
        // nothing sent. Before the fix the idle watch sent its close at 150 ms and cut
        // the connection 100 ms later.
        tokio::time::sleep(4 * l.idle_timeout + l.drain_timeout).await;
        // Before the fix the body was dropped with the connection: this send fails.
        let sent = tx.send(Ok("still here".into())).await;
        assert!(
            sent.is_ok(),
            "the connection was closed while its answer was still streaming"
        );
        assert!(
            read_until(&mut tcp, &mut seen, b"still here").await,
            "the connection was closed while its answer was still streaming"
        );

        // The body ends: from then on the connection idles, and is closed.
        drop(tx);
        assert!(read_until(&mut tcp, &mut seen, b"0\r\n\r\n").await);
        let ended = Instant::now();
        let closed = tokio::time::timeout(
            Duration::from_secs(5),
            read_until(&mut tcp, &mut seen, b"never sent"),
        )
        .await;
        assert_eq!(closed, Ok(false), "not closed after its body ended");
        assert!(
            ended.elapsed() < Duration::from_secs(2),
            "{:?}",
            ended.elapsed()
        );
        server.abort();
    }
}
