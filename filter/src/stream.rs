//! EXPERIMENTAL (issue 27), `"check_transport": "stream"`: checks as messages on one
//! gRPC bidirectional stream per Envoy worker ([`mcpguard_core::check_stream`]) instead
//! of one HTTP/2 callout each. Glue only: a request's [`crate::lifecycle::Host::dispatch`]
//! hands its check body here, and the answer goes to the same
//! [`crate::lifecycle::Lifecycle::on_answer`] an HTTP callout's answer goes to.
//!
//! The root context owns the stream: the SDK delivers a stream's callbacks to the
//! context that opened it, and an HTTP context dies with its request. So the root opens
//! it (on a tick, or at once when a working stream closes), keeps id → request, and
//! resumes each request by making it the effective context. A request sends on the
//! root's stream the same way (Envoy looks a stream's token up in the context that
//! calls). Failing closed: a stream that closes refuses every check in flight on it
//! (`on_answer(None, None)`: 503 `policy_unavailable`); a check with no answer by its
//! deadline is refused by the root's tick; a check sent while no stream is open waits
//! for the next one, within the same deadline.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::{Rc, Weak};
use std::time::{Duration, SystemTime};

use mcpguard_core::check_stream as wire;
use proxy_wasm::hostcalls;

/// What a check answer is delivered to: the request's half of the glue.
pub trait Waiting {
    /// `status`/`body` `None`: no answer (stream closed, deadline passed).
    fn answer(&self, status: Option<u16>, body: Option<&[u8]>);
}

struct InFlight {
    context_id: u32,
    request: Weak<dyn Waiting>,
    deadline: SystemTime,
}

/// One worker's stream and the checks waiting on it.
pub struct CheckStream {
    root_id: u32,
    /// The open stream's token.
    token: Option<u32>,
    /// The open stream has answered at least once: when it closes, open the next one
    /// at once rather than on a tick (a stream that never answered waits, so a policy
    /// service that is down is not redialled in a loop).
    answered: bool,
    next_id: u64,
    in_flight: HashMap<u64, InFlight>,
    /// Sent while no stream was open; written when the next one opens.
    queued: Vec<Vec<u8>>,
    /// A stream was opened on this worker once.
    opened: bool,
    /// A check waits for this worker's first stream and the root was asked for a
    /// tick at once ([`HURRY`]) to open it; the next tick restores the period.
    hurried: bool,
}

pub type Shared = Rc<RefCell<CheckStream>>;

/// The tick that opens a worker's first stream when a check already waits for it:
/// without it the first checks waited up to a whole tick (50 ms), about 1% of the
/// allowed requests in the break-glass proof.
const HURRY: Duration = Duration::from_millis(1);

/// How often the root context sweeps for checks past their deadline (and reopens a
/// closed stream): a refusal comes at most this much after its deadline.
pub fn tick(check_timeout_ms: u64) -> Duration {
    Duration::from_millis((check_timeout_ms / 4).clamp(10, 50))
}

impl CheckStream {
    pub fn new(root_id: u32) -> Shared {
        Rc::new(RefCell::new(CheckStream {
            root_id,
            token: None,
            answered: false,
            next_id: 1,
            in_flight: HashMap::new(),
            queued: Vec::new(),
            opened: false,
            hurried: false,
        }))
    }
}

/// From a request context: sends its check. `Err` when it could not be (the lifecycle
/// then refuses the request).
pub fn send(
    stream: &Shared,
    context_id: u32,
    request: Weak<dyn Waiting>,
    body: &[u8],
    timeout: Duration,
) -> Result<(), String> {
    let now = hostcalls::get_current_time().map_err(|s| format!("{s:?}"))?;
    // No borrow is held across a host call: Envoy may call back into the VM inside one.
    let (id, token, root_id, message) = {
        let mut s = stream.borrow_mut();
        let id = s.next_id;
        s.next_id += 1;
        s.in_flight.insert(
            id,
            InFlight {
                context_id,
                request,
                deadline: now + timeout,
            },
        );
        let message = wire::encode_check(id, body);
        let root_id = s.root_id;
        match s.token {
            Some(token) => (id, token, root_id, message),
            None => {
                s.queued.push(message);
                // Only until a stream has opened once: a stream that closes later is
                // reopened on the tick's schedule (at once if it had worked), so a
                // policy service that is down is not redialled on every request. (Until
                // then an open can fail only locally, on a cluster Envoy lacks.)
                let hurry = !s.opened && !std::mem::replace(&mut s.hurried, true);
                drop(s);
                if hurry {
                    let _ = hostcalls::set_effective_context(root_id)
                        .and_then(|()| hostcalls::set_tick_period(HURRY));
                    let _ = hostcalls::set_effective_context(context_id);
                }
                return Ok(());
            }
        }
    };
    // The stream belongs to the root context: send as it.
    let sent = hostcalls::set_effective_context(root_id)
        .and_then(|()| hostcalls::send_grpc_stream_message(token, Some(&message), false));
    let _ = hostcalls::set_effective_context(context_id);
    sent.map_err(|status| {
        stream.borrow_mut().in_flight.remove(&id);
        format!("check stream send: {status:?}")
    })
}

/// Delivers an answer (or its absence) to a request, as that request's context.
fn deliver(root_id: u32, waiting: InFlight, status: Option<u16>, body: Option<&[u8]>) {
    // Gone already: the client went away, or Envoy ended the request.
    let Some(request) = waiting.request.upgrade() else {
        return;
    };
    if hostcalls::set_effective_context(waiting.context_id).is_ok() {
        request.answer(status, body);
    }
    let _ = hostcalls::set_effective_context(root_id);
}

/// The root context's side: opening, answers, closes and the deadline sweep. Every
/// function here runs in a root-context callback.
pub mod root {
    use super::*;

    /// Opens the stream if none is, and writes what was queued meanwhile.
    pub fn open(stream: &Shared, cluster: &str) {
        if stream.borrow().token.is_some() {
            return;
        }
        match hostcalls::open_grpc_stream(cluster, wire::SERVICE, wire::METHOD, vec![]) {
            Ok(token) => {
                let queued = {
                    let mut s = stream.borrow_mut();
                    s.token = Some(token);
                    s.answered = false;
                    s.opened = true;
                    std::mem::take(&mut s.queued)
                };
                for message in queued {
                    if let Err(e) =
                        hostcalls::send_grpc_stream_message(token, Some(&message), false)
                    {
                        // Its check is refused by the sweep, at its deadline.
                        log::warn!("check stream: queued send failed: {e:?}");
                    }
                }
            }
            Err(e) => log::warn!("check stream to cluster {cluster:?} failed to open: {e:?}"),
        }
    }

    pub fn on_message(stream: &Shared, token: u32, message: Option<&[u8]>) {
        let Some((id, status, body)) = message.and_then(wire::decode_answer) else {
            log::error!("check stream: malformed answer; closing the stream");
            // Its close refuses everything in flight on it.
            let _ = hostcalls::cancel_grpc_stream(token);
            on_close(stream, token, None);
            return;
        };
        let (root_id, waiting) = {
            let mut s = stream.borrow_mut();
            s.answered = true;
            (s.root_id, s.in_flight.remove(&id))
        };
        // Late (past its deadline, refused already) or unknown: ignored.
        if let Some(waiting) = waiting {
            deliver(root_id, waiting, Some(status), Some(body));
        }
    }

    /// The stream ended (reset, the policy service gone, its grpc-status): every check
    /// sent on it is refused. Reopened at once if it had worked, else on the next tick.
    pub fn on_close(stream: &Shared, token: u32, cluster: Option<&str>) {
        let (root_id, failed, reopen) = {
            let mut s = stream.borrow_mut();
            if s.token != Some(token) {
                return;
            }
            s.token = None;
            // Checks queued for the next stream stay; the rest were sent on this one.
            let failed: Vec<InFlight> = s.in_flight.drain().map(|(_, w)| w).collect();
            (s.root_id, failed, s.answered)
        };
        if !failed.is_empty() {
            log::warn!(
                "check stream closed with {} checks in flight: refused",
                failed.len()
            );
        }
        for waiting in failed {
            deliver(root_id, waiting, None, None);
        }
        if let (true, Some(cluster)) = (reopen, cluster) {
            open(stream, cluster);
        }
    }

    /// Refuses the checks past their deadline; opens a stream if none is. True when
    /// this was the [`HURRY`] tick: the caller restores the tick period.
    pub fn on_tick(stream: &Shared, cluster: &str) -> bool {
        let hurried = std::mem::take(&mut stream.borrow_mut().hurried);
        let Ok(now) = hostcalls::get_current_time() else {
            return hurried;
        };
        let (root_id, expired) = {
            let mut s = stream.borrow_mut();
            let ids: Vec<u64> = s
                .in_flight
                .iter()
                .filter(|(_, w)| w.deadline <= now)
                .map(|(id, _)| *id)
                .collect();
            let expired: Vec<InFlight> =
                ids.iter().filter_map(|id| s.in_flight.remove(id)).collect();
            if s.token.is_none() && s.in_flight.is_empty() {
                // Nothing waits for what was queued: drop it rather than send it late.
                s.queued.clear();
            }
            (s.root_id, expired)
        };
        for waiting in expired {
            deliver(root_id, waiting, None, None);
        }
        open(stream, cluster);
        hurried
    }
}
