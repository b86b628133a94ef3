//! One client session, whatever the transport: stream negotiation
//! (STARTTLS, SASL, resource binding, RFC 6120), then the bound loop that
//! stamps `from` on every stanza, hands it to the modules, writes queued
//! stanzas out, and pings idle clients (XEP-0199 heartbeat). Stream
//! management (XEP-0198, `sm.rs`): acks, and resumption — a resumable
//! session whose connection dies without `</stream>` detaches: its task
//! stays, routable and queueing, until a new connection resumes it or
//! `c2s.resume_timeout_secs` pass. Client State Indication (XEP-0352):
//! presence and chat states wait while the client is inactive.
//!
//! Invariants:
//! - a stanza from a client always leaves here with `from` = its full JID;
//! - server-stamped elements (XEP-0359 stanza-id, XEP-0203 delay, …) that a
//!   client forged are stripped, and forged carbons/archive results
//!   refused, before anyone sees them (`strip.rs`);
//! - one bad stanza gets a stanza error; only stream-level faults end the
//!   session, and they end only this session;
//! - SM `h` counts client stanzas whose dispatch returned; a stanza queued
//!   for a session is written, resent on resumption, or handed to
//!   `api::OfflineQueue::requeue` when the session ends — never dropped;
//! - a handler's panic ends only its session, which still leaves routing
//!   and gives back what it held (caught per wake-up; else the drop guard
//!   in `teardown.rs`).

pub mod fake_salt;
pub mod sm;
pub mod strip;
pub mod throttle;
pub mod transport;

mod auth;
mod bind;
mod bound;
mod intake;
mod negotiate;
mod teardown;
mod write;

use crate::error::{Condition, StanzaError, StreamCondition, StreamError};
use crate::metrics::ConnectionGuard;
use crate::modules::{self, Cx};
use crate::router::{BindError, Deliver, Outbound, QueueLimits, SessionHandle};
use crate::state::ServerState;
use base64::Engine;
use futures::FutureExt;
use jid::BareJid;
use natter_sasl::{Hash, Mechanism, SaslError, ScramServer};
use natter_xml::{Element, Limits, StreamEvent, NS_CLIENT};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;
use throttle::{PreauthGuard, TokenBucket};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use transport::{ReadError, Transport};

pub const NS_TLS: &str = "urn:ietf:params:xml:ns:xmpp-tls";
pub const NS_SASL: &str = "urn:ietf:params:xml:ns:xmpp-sasl";
pub const NS_BIND: &str = "urn:ietf:params:xml:ns:xmpp-bind";
pub const NS_SESSION: &str = "urn:ietf:params:xml:ns:xmpp-session";

enum Phase {
    /// Before authentication (TLS and SASL negotiation).
    Connected,
    /// Boxed: the variant only lives between SASL and bind.
    Authenticated(Box<BareJid>),
    Bound(Arc<SessionHandle>),
    /// Torn down, or handed to a resuming connection: nothing left to end.
    Ended,
}

/// What the loop does after an event.
enum Step {
    Continue,
    /// A new stream starts: drop the rest of this read batch.
    Restart,
    /// The client closed the stream.
    Close,
}

/// How a connection's loop ended.
enum End {
    /// The client closed the stream.
    Clean,
    /// Close the stream with this error; the session ends.
    Error(StreamError),
    /// The connection died without `</stream>` (EOF, read or write failure,
    /// no answer to a ping or an ack request); the error is sent if the
    /// stream can still be written. A resumable session detaches.
    Lost(Option<StreamError>),
    /// A new connection resumes this session (XEP-0198).
    Takeover(sm::Takeover),
}

impl From<StreamError> for End {
    fn from(e: StreamError) -> Self {
        End::Error(e)
    }
}

/// The state of negotiation (before a resource is bound or a session
/// resumed).
struct Negotiation {
    awaiting_open: bool,
    /// A SCRAM exchange between its messages.
    scram: Option<auth::Scram>,
    sasl_failures: u32,
    /// The unauthenticated-connection slot.
    _preauth: PreauthGuard,
}

struct Session {
    state: ServerState,
    phase: Phase,
    /// This stream's domain: its index in `config.domains`.
    domain: usize,
    /// What only negotiation needs, until bound (boxed: a bound session
    /// keeps only the pointer's room).
    neg: Option<Box<Negotiation>>,
    rx: Option<crate::router::QueueRx>,
    last_heard: Instant,
    ping_id: Option<String>,
    /// The queue overflowed: its contents are not flushed at close.
    drop_queue: bool,
    /// A write failed or timed out part-way: the stream may be cut
    /// mid-stanza, so nothing more may be written to it (not even the
    /// stream error).
    write_broken: bool,
    /// XEP-0198 state once the client enabled it.
    sm: Option<Box<sm::Sm>>,
    /// XEP-0352 state and held-back stanzas.
    held: sm::Held,
    /// A resumable session's takeover requests (its sender is registered
    /// in `router.resumable`).
    takeover: Option<(mpsc::Sender<sm::Takeover>, mpsc::Receiver<sm::Takeover>)>,
    /// The session was busy: give buffers back if it is still idle then.
    release_at: Option<Instant>,
    /// The read rate limit, over the connection's life.
    bucket: TokenBucket,
    /// Stanzas being written without stream management: on a failed
    /// write, those that did not wholly reach the socket (`inflight`
    /// trimmed by `Transport::delivered`) are requeued at the end.
    inflight: Box<[Outbound]>,
    /// Bytes this session holds past its queue (unacked, held, in flight)
    /// as last added to its user's counter (`sync_bytes`).
    charged: u32,
}

/// Serve one connection until it ends.
///
/// The task's future is what an idle session costs, so it holds only the
/// session, the transport and the bound loop's waits: the TLS handshake,
/// negotiation, each wake-up's handling and the teardown run in boxed
/// futures of their own, allocated while they run. Not an `async fn`: its
/// arguments would be stored twice (`net::tests` checks the size).
pub fn serve<T: Transport>(
    t: T,
    state: ServerState,
    guard: PreauthGuard,
) -> impl std::future::Future<Output = ()> + Send {
    let mut s = Session {
        phase: Phase::Connected,
        domain: 0,
        neg: Some(Box::new(Negotiation {
            awaiting_open: true,
            scram: None,
            sasl_failures: 0,
            _preauth: guard,
        })),
        rx: None,
        last_heard: Instant::now(),
        ping_id: None,
        drop_queue: false,
        write_broken: false,
        sm: None,
        held: sm::Held::default(),
        takeover: None,
        release_at: None,
        bucket: TokenBucket::new(
            state.config.limits.rate_bytes_per_sec,
            state.config.limits.rate_burst_bytes,
        ),
        inflight: Box::default(),
        charged: 0,
        state,
    };
    let mut t = t;
    async move {
        if t.tls_pending() {
            // Direct TLS (XEP-0368): a failed handshake is not a connection.
            let tls = s.state.tls.clone();
            let secs = s.cfg().c2s.preauth_timeout_secs;
            let accept = Box::pin(tokio::time::timeout(
                Duration::from_secs(secs),
                t.starttls(tls),
            ));
            if !matches!(accept.await, Ok(Ok(()))) {
                return;
            }
        }
        tracing::debug!(peer = %t.peer(), transport = t.kind(), "connection opened");
        let conn = s.state.metrics.connection(t.kind());
        // Nothing that only negotiation needs may be live across the bound
        // loop's wait: it would be stored in this future (hence the boxed
        // error, too).
        if let Err(end) = Box::pin(s.negotiate(&mut t)).await {
            return Box::pin(s.finish(t, conn, *end)).await;
        }
        s.sync_bytes();
        let end = loop {
            match s.bound_loop(&mut t).await {
                End::Takeover(reply) => {
                    if s.hand_over(reply) {
                        break End::Error(StreamError::with_text(
                            StreamCondition::Conflict,
                            "the session was resumed on another connection",
                        ));
                    }
                    // The resuming connection gave up: carry on.
                }
                end => break end,
            }
        };
        Box::pin(s.finish(t, conn, end)).await
    }
}

impl Session {
    fn cfg(&self) -> &crate::config::Config {
        &self.state.config
    }

    fn domain(&self) -> &str {
        &self.state.config.domains[self.domain]
    }

    fn limits(&self, authed: bool) -> Limits {
        let l = &self.cfg().limits;
        Limits {
            max_stanza_bytes: if authed {
                l.max_stanza_bytes
            } else {
                l.max_stanza_bytes_preauth
            },
            max_depth: l.max_depth,
            max_attrs: l.max_attrs,
            max_elements: l.max_elements,
        }
    }

    /// Negotiation's state; gone once bound, when nothing negotiates.
    // The error is the negotiation steps' own (`?` there); not worth a box.
    #[allow(clippy::result_large_err)]
    fn neg(&mut self) -> Result<&mut Negotiation, StreamError> {
        self.neg
            .as_deref_mut()
            .ok_or_else(|| StreamError::new(StreamCondition::InternalServerError))
    }

    fn bound(&self) -> Option<Arc<SessionHandle>> {
        match &self.phase {
            Phase::Bound(h) => Some(h.clone()),
            _ => None,
        }
    }

    fn resumable(&self) -> bool {
        self.bound().is_some() && self.sm.as_ref().is_some_and(|s| s.id.is_some())
    }
}

fn shutting_down() -> End {
    End::Error(StreamError::new(StreamCondition::SystemShutdown))
}

/// A handler panicked: log it; the session ends with
/// `internal-server-error`.
fn panicked(panic: Box<dyn std::any::Any + Send>) -> End {
    let what = panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(not a string)");
    tracing::error!(panic = what, "a stanza handler panicked; session ended");
    End::Error(StreamError::with_text(
        StreamCondition::InternalServerError,
        "internal error",
    ))
}
