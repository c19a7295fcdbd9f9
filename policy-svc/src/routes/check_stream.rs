//! EXPERIMENTAL (issue 27): `POST /mcpguard.v1.Check/Stream`, checks as messages on one
//! long-lived gRPC bidirectional stream (the wasm filter's `"check_transport":
//! "stream"`), framed as [`mcpguard_core::check_stream`] says. Every message goes
//! through the same pipeline as `/v1/check` ([`super::check::answer`]), uncached, each
//! on its own task; answers are written as each finishes, so out of order. Behind the
//! check secret like every check route (the middleware runs before this handler).
//!
//! A broken frame or a body that fails ends the stream with a gRPC error status: the
//! filter then refuses every check it still has in flight on it (fail closed).

use std::convert::Infallible;
use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use mcpguard_core::check::CheckRequest;
use mcpguard_core::check_stream::{self as wire, Frame as Next};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;

use crate::AppState;
use crate::config::CheckDeadline;
use crate::error::ApiError;

pub fn routes() -> Router<AppState> {
    Router::new().route(wire::PATH, post(stream))
}

/// gRPC status codes the stream ends with.
const GRPC_OK: &str = "0";
const GRPC_INVALID_ARGUMENT: &str = "3";
const GRPC_UNAVAILABLE: &str = "14";

/// Checks one stream runs at once. Past it the stream is not read until one answers,
/// so a peer that sends faster than it reads answers is slowed, not given memory.
const MAX_IN_FLIGHT: usize = 1024;

async fn stream(State(state): State<AppState>, req: Request) -> Response {
    let grpc = req
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if !grpc {
        return ApiError::bad_request("not_grpc", "this is a gRPC method: application/grpc")
            .into_response();
    }
    let deadline = req
        .extensions()
        .get::<CheckDeadline>()
        .copied()
        .unwrap_or_default();
    let (tx, rx) = mpsc::channel::<Frame<Bytes>>(MAX_IN_FLIGHT);
    tokio::spawn(read_checks(state, deadline, req.into_body(), tx));
    let body = StreamBody::new(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|frame| (Ok::<_, Infallible>(frame), rx))
    }));
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/grpc")],
        Body::new(body),
    )
        .into_response()
}

/// Reads the peer's messages, runs each check on a task of its own, and when the peer
/// ends its side (and every check has answered) ends the stream with its status.
async fn read_checks(
    state: AppState,
    deadline: CheckDeadline,
    mut body: Body,
    tx: mpsc::Sender<Frame<Bytes>>,
) {
    let mut buf: Vec<u8> = Vec::new();
    let mut checks = JoinSet::new();
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let status = loop {
        // Reap finished tasks as we go so the set does not grow with the stream's age.
        while checks.try_join_next().is_some() {}
        let data = match body.frame().await {
            None => break GRPC_OK,
            Some(Err(e)) => {
                tracing::debug!(error = %e, "check stream: request body failed");
                break GRPC_UNAVAILABLE;
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => data,
                // Request trailers: nothing for us in them.
                Err(_) => continue,
            },
        };
        buf.extend_from_slice(&data);
        let mut start = 0;
        let broken = loop {
            match wire::next_frame(&buf[start..]) {
                Next::Partial => break false,
                Next::Invalid => break true,
                Next::Message { len } => {
                    let message = &buf[start + 5..start + 5 + len];
                    start += 5 + len;
                    let Some((id, json)) = wire::decode_check(message) else {
                        break true;
                    };
                    let parsed = serde_json::from_slice::<CheckRequest>(json);
                    let (state, tx) = (state.clone(), tx.clone());
                    let Ok(permit) = in_flight.clone().acquire_owned().await else {
                        break true;
                    };
                    checks.spawn(async move {
                        let _permit = permit;
                        let (status, answer) = match parsed {
                            Ok(req) => answer(&state, deadline, &req).await,
                            Err(_) => (400, br#"{"error":"invalid_check"}"#.to_vec()),
                        };
                        let message = wire::encode_answer(id, status, &answer);
                        let _ = tx
                            .send(Frame::data(wire::grpc_frame(&message).into()))
                            .await;
                    });
                }
            }
        };
        buf.drain(..start);
        if broken {
            tracing::warn!("check stream: invalid frame; ending the stream");
            break GRPC_INVALID_ARGUMENT;
        }
    };
    if status == GRPC_OK {
        while checks.join_next().await.is_some() {}
    }
    // On an error the checks still running answer into a stream about to end; the
    // filter refuses whatever it has not heard back about.
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static(status));
    let _ = tx.send(Frame::trailers(trailers)).await;
}

/// The status and body `/v1/check` would answer.
async fn answer(state: &AppState, deadline: CheckDeadline, req: &CheckRequest) -> (u16, Vec<u8>) {
    match super::check::answer(state, deadline, req).await {
        Ok(decision) => (200, serde_json::to_vec(&decision).unwrap_or_default()),
        Err(e) => {
            let response = e.into_response();
            let status = response.status().as_u16();
            let body = response
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes().to_vec())
                .unwrap_or_default();
            (status, body)
        }
    }
}

#[cfg(test)]
mod tests {
    use axum::http::Request;
    use mcpguard_core::check::{CheckResponse, Credential, DenyCode};
    use mcpguard_core::token::TokenHash;
    use tower::ServiceExt;

    use super::*;
    use crate::fixture::fixture;

    fn check(token: &str, server: &str) -> Vec<u8> {
        serde_json::to_vec(&CheckRequest {
            credential: Credential::ApiToken {
                hash: TokenHash::of(token).to_hex(),
            },
            gateway: Some("eng".into()),
            server: server.into(),
            mcp_method: None,
            tool: None,
            request_id: None,
            item: None,
            each_server: None,
        })
        .unwrap()
    }

    /// Sends `messages` as one stream, its side ended, and reads every answer (by id)
    /// and the stream's grpc-status.
    async fn exchange(app: &Router, body: Vec<u8>) -> (Vec<(u64, u16, Vec<u8>)>, String) {
        let req = Request::post(wire::PATH)
            .header("content-type", "application/grpc")
            .body(Body::from(body))
            .unwrap();
        let resp = app.clone().oneshot(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let collected = resp.into_body().collect().await.unwrap();
        let status = collected
            .trailers()
            .and_then(|t| t.get("grpc-status"))
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let bytes = collected.to_bytes();
        let (mut answers, mut at) = (Vec::new(), 0);
        while let Next::Message { len } = wire::next_frame(&bytes[at..]) {
            let (id, status, body) = wire::decode_answer(&bytes[at + 5..at + 5 + len]).unwrap();
            answers.push((id, status, body.to_vec()));
            at += 5 + len;
        }
        assert_eq!(at, bytes.len(), "trailing bytes");
        answers.sort_by_key(|a| a.0);
        (answers, status)
    }

    #[tokio::test]
    async fn each_message_is_checked_like_v1_check_and_answered_by_id() {
        let f = fixture().await;
        let mut body = Vec::new();
        for (id, message) in [
            (7, check(&f.token, "demo")),
            (3, check(&f.token, "nope")),
            (9, b"not json".to_vec()),
        ] {
            body.extend(wire::grpc_frame(&wire::encode_check(id, &message)));
        }
        let (answers, status) = exchange(&f.app, body).await;
        assert_eq!(status, GRPC_OK);
        let ids: Vec<u64> = answers.iter().map(|a| a.0).collect();
        assert_eq!(ids, [3, 7, 9]);
        let decision = |i: usize| serde_json::from_slice::<CheckResponse>(&answers[i].2).unwrap();
        assert_eq!(answers[1].1, 200);
        assert!(matches!(decision(1), CheckResponse::Allow { .. }));
        assert_eq!(answers[0].1, 200);
        assert!(
            matches!(decision(0), CheckResponse::Deny { code } if code != DenyCode::PolicyUnavailable)
        );
        assert_eq!(answers[2].1, 400);
    }

    #[tokio::test]
    async fn a_broken_frame_ends_the_stream_with_an_error() {
        let f = fixture().await;
        let mut body = wire::grpc_frame(&wire::encode_check(1, &check(&f.token, "demo")));
        body.extend([1, 0, 0, 0, 1, 0]); // compressed: no codec was negotiated
        let (_, status) = exchange(&f.app, body).await;
        assert_eq!(status, GRPC_INVALID_ARGUMENT);
    }

    #[tokio::test]
    async fn not_grpc_is_refused() {
        let f = fixture().await;
        let req = Request::post(wire::PATH)
            .header("content-type", "application/json")
            .body(Body::empty())
            .unwrap();
        assert_eq!(f.app.clone().oneshot(req).await.unwrap().status(), 400);
    }
}
