//! The fixed-reply server (`mcpguard-bench fixed-reply <port> <upstream>`): the
//! check port's two transports, `POST /v1/check` and the experimental check stream
//! (`mcpguard_core::check_stream`), answering every check with the same allow (to
//! `upstream`, the demo server) and nothing else: no store, no pipeline, no secret.
//! It serves over the policy service's own accept loop and HTTP stack
//! (`mcpguard_policy::serve`), so the policy service's CPU per check over this one's,
//! on the same transport in the same run, is what the check itself costs (issue 27's
//! target: at most 2x).

use std::convert::Infallible;
use std::time::Duration;

use anyhow::{Context, Result};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use mcpguard_core::check::{CHECK_PATH, CheckResponse, Scheme, Upstream};
use mcpguard_core::check_stream::{self as wire, Frame as Next};
use mcpguard_core::oauth::CHECK_JWKS_PATH;
use mcpguard_policy::serve::{PortLimits, serve};

/// The subcommand: serves until killed.
pub fn main(port: &str, upstream: &str) -> Result<()> {
    let port: u16 = port.parse().context("fixed-reply <port> <upstream>")?;
    let allow = CheckResponse::Allow {
        upstream: Upstream {
            scheme: Scheme::Http,
            authority: upstream.to_owned(),
            base_path: "/mcp".to_owned(),
            address: Some(upstream.to_owned()),
        },
        inject: None,
        list_filter: None,
    };
    let allow = Bytes::from(serde_json::to_vec(&allow)?);
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
        let http_allow = allow.clone();
        let app = Router::new()
            .route(
                CHECK_PATH,
                post(move |body: Bytes| {
                    let allow = http_allow.clone();
                    async move {
                        drop(body);
                        ([(header::CONTENT_TYPE, "application/json")], allow)
                    }
                }),
            )
            .route(
                wire::PATH,
                post(move |req: Request| stream(req, allow.clone())),
            )
            .route(
                CHECK_JWKS_PATH,
                get(|| async {
                    (
                        [(header::CONTENT_TYPE, "application/json")],
                        "{\"keys\":[]}",
                    )
                }),
            )
            .route("/healthz", get(|| async { "ok" }));
        // The policy service's defaults (config.rs), but for the body limit.
        let limits = PortLimits {
            max_connections: 1024,
            max_body_bytes: 16_384,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(600),
            request_timeout: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(1),
            h2_max_concurrent_streams: 256,
        };
        let (_stop_tx, stop) = tokio::sync::watch::channel(false);
        serve("check", listener, app, limits, stop).await;
        anyhow::Ok(())
    })
}

/// Answers each check message at once, in order, with `allow`.
async fn stream(req: Request, allow: Bytes) -> impl IntoResponse {
    let (tx, rx) = tokio::sync::mpsc::channel::<Frame<Bytes>>(1024);
    let mut body = req.into_body();
    tokio::spawn(async move {
        let mut buf = Vec::new();
        let mut status = "0";
        'read: while let Some(Ok(frame)) = body.frame().await {
            let Ok(data) = frame.into_data() else {
                continue;
            };
            buf.extend_from_slice(&data);
            let mut start = 0;
            while let Next::Message { len } = wire::next_frame(&buf[start..]) {
                let message = &buf[start + 5..start + 5 + len];
                start += 5 + len;
                let Some((id, _)) = wire::decode_check(message) else {
                    status = "3";
                    break 'read;
                };
                let answer = wire::grpc_frame(&wire::encode_answer(id, 200, &allow));
                if tx.send(Frame::data(answer.into())).await.is_err() {
                    return;
                }
            }
            buf.drain(..start);
        }
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static(status));
        let _ = tx.send(Frame::trailers(trailers)).await;
    });
    let body = StreamBody::new(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|frame| (Ok::<_, Infallible>(frame), rx))
    }));
    (
        [(header::CONTENT_TYPE, "application/grpc")],
        Body::new(body),
    )
}
