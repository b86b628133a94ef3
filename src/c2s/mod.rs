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
//!   `modules::offline::requeue` when the session ends — never dropped.

pub mod fake_salt;
pub mod sm;
pub mod strip;
pub mod throttle;
pub mod transport;

use crate::error::{Condition, StanzaError, StreamCondition, StreamError};
use crate::metrics::ConnectionGuard;
use crate::modules::{self, Cx};
use crate::router::{BindError, Deliver, Outbound, QueueLimits, SessionHandle};
use crate::state::ServerState;
use base64::Engine;
use jid::BareJid;
use natter_sasl::{Hash, Mechanism, SaslError, ScramServer};
use natter_xml::{Element, Limits, StreamEvent, NS_CLIENT};
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

/// SASL failures tolerated on one connection before it is closed.
const MAX_SASL_FAILURES: u32 = 3;

/// Written stanzas wait this long for more before the server asks for an
/// ack (XEP-0198), unless `sm::REQUEST_EVERY` of them already did.
const ACK_IDLE: Duration = Duration::from_secs(2);

/// Takeover requests a resumable session's task can have pending.
const TAKEOVER_QUEUE: usize = 4;

/// Stanzas taken off the queue for one write stop at this many bytes (what
/// a write holds is outside the queue's bound while it waits).
const BATCH_BYTES: usize = 128 * 1024;

/// A bound session quiet this long gives back its buffers (parser, queue).
const IDLE_RELEASE: Duration = Duration::from_secs(1);

enum Phase {
    /// Before authentication (TLS and SASL negotiation).
    Connected,
    /// Boxed: the variant only lives between SASL and bind.
    Authenticated(Box<BareJid>),
    Bound(Arc<SessionHandle>),
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

struct Scram {
    server: ScramServer,
    /// The name tried, whether an account or not (failures count on it).
    user: BareJid,
    known: bool,
}

/// What woke the bound loop.
enum Wake {
    Takeover(sm::Takeover),
    Queue(Option<Deliver>),
    Read(Result<Vec<StreamEvent>, ReadError>),
    Timer,
}

struct Session {
    state: ServerState,
    phase: Phase,
    /// This stream's domain: its index in `config.domains`.
    domain: usize,
    awaiting_open: bool,
    /// A SCRAM exchange between its messages.
    scram: Option<Box<Scram>>,
    sasl_failures: u32,
    rx: Option<crate::router::QueueRx>,
    /// The unauthenticated-connection slot, until bound (boxed: a bound
    /// session keeps only the pointer's room).
    preauth: Option<Box<PreauthGuard>>,
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

impl Drop for Session {
    fn drop(&mut self) {
        // Whatever ends the task (a panic too), the user's quota gets the
        // bytes back.
        if let Some(rx) = &self.rx {
            rx.user_bytes().discharge(self.charged as usize);
        }
    }
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
        awaiting_open: true,
        scram: None,
        sasl_failures: 0,
        rx: None,
        preauth: Some(Box::new(guard)),
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

    fn bound(&self) -> Option<Arc<SessionHandle>> {
        match &self.phase {
            Phase::Bound(h) => Some(h.clone()),
            _ => None,
        }
    }

    fn resumable(&self) -> bool {
        self.bound().is_some() && self.sm.as_ref().is_some_and(|s| s.id.is_some())
    }

    /// Until a resource is bound or a session resumed: stream headers,
    /// STARTTLS, SASL, bind; then what the client sent after the element
    /// that bound it, in the same read.
    async fn negotiate<T: Transport>(&mut self, t: &mut T) -> Result<(), Box<End>> {
        self.negotiate_inner(t).await.map_err(Box::new)
    }

    async fn negotiate_inner<T: Transport>(&mut self, t: &mut T) -> Result<(), End> {
        t.set_limits(self.limits(false));
        let deadline = Instant::now() + Duration::from_secs(self.cfg().c2s.preauth_timeout_secs);
        let shutdown = self.state.shutdown.clone();
        loop {
            let events = tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    return Err(End::Error(StreamError::new(StreamCondition::SystemShutdown)));
                }
                r = t.read() => match r {
                    Ok(ev) => ev,
                    Err(ReadError::Closed) => return Err(End::Lost(None)),
                    Err(ReadError::Xml(e)) => return Err(End::Error(e.into())),
                },
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(End::Error(StreamError::with_text(
                        StreamCondition::ConnectionTimeout,
                        "authentication took too long",
                    )));
                }
            };
            tracing::trace!(n = events.len(), "events read");
            self.last_heard = Instant::now();
            let mut bytes = 0;
            let mut events = events.into_iter();
            let mut bound = false;
            for ev in events.by_ref() {
                if let StreamEvent::Stanza(el) = &ev {
                    bytes += approx_size(el);
                }
                match self.on_event(t, ev).await? {
                    Step::Continue => {}
                    Step::Restart => break,
                    Step::Close => return Err(End::Clean),
                }
                if matches!(self.phase, Phase::Bound(_)) {
                    bound = true;
                    break;
                }
            }
            if let Some(pause) = self.bucket.take(bytes) {
                tokio::time::sleep(pause).await;
            }
            if bound {
                let rest: Vec<_> = events.collect();
                if !rest.is_empty() {
                    let h = self.bound().expect("bound");
                    self.on_read(t, &h, rest).await?;
                }
                return Ok(());
            }
        }
    }

    /// A bound session, until its connection or the session ends. This
    /// loop's waits are what an idle session holds: keep them few and
    /// small, and box what runs on a wake-up. (Not an `async fn`, whose
    /// arguments would be stored twice.)
    #[allow(clippy::manual_async_fn)]
    fn bound_loop<'a, T: Transport>(
        &'a mut self,
        t: &'a mut T,
    ) -> impl std::future::Future<Output = End> + Send + 'a {
        async move {
            loop {
                // A session bound after `Router::shutdown` went through the
                // table sees the token instead.
                if self.state.shutdown.is_cancelled() {
                    return shutting_down();
                }
                let timer = self.next_timer();
                let full = self.awaiting_acks();
                let w = tokio::select! {
                    biased;
                    req = async { match self.takeover.as_mut() { Some((_, rx)) => rx.recv().await, None => std::future::pending().await } } => {
                        match req {
                            Some(reply) => Wake::Takeover(reply),
                            None => continue,
                        }
                    }
                    d = async { match self.rx.as_mut() { Some(rx) if full => Some(rx.signal().await), Some(rx) => rx.recv(true).await, None => std::future::pending().await } } => Wake::Queue(d),
                    r = t.read() => Wake::Read(r),
                    _ = tokio::time::sleep_until(timer) => Wake::Timer,
                };
                let r = Box::pin(self.on_wake(t, w)).await;
                self.sync_bytes();
                if let Err(end) = r {
                    return end;
                }
            }
        }
    }

    async fn on_wake<T: Transport>(&mut self, t: &mut T, wake: Wake) -> Result<(), End> {
        let Some(h) = self.bound() else {
            unreachable!("the bound loop runs for bound sessions only");
        };
        match wake {
            Wake::Takeover(reply) => {
                // A shutdown or an overflow is noticed before a takeover.
                if self.rx.as_ref().is_some_and(|rx| rx.shutting_down()) {
                    return Err(shutting_down());
                }
                if self.rx.as_ref().is_some_and(|rx| rx.overflowed()) {
                    return Err(self.overflowed());
                }
                Err(End::Takeover(reply))
            }
            Wake::Queue(d) => self.on_queue(t, d).await,
            Wake::Read(Ok(events)) => self.on_read(t, &h, events).await,
            Wake::Read(Err(ReadError::Closed)) => Err(End::Lost(None)),
            Wake::Read(Err(ReadError::Xml(e))) => Err(End::Error(e.into())),
            Wake::Timer => self.on_timer(t, &h).await,
        }
    }

    /// The queue refused a stanza: the client is not reading. A resumable
    /// session parks like any dead connection (its client resumes with its
    /// real `h`); another one ends, and what it held goes back to offline
    /// storage.
    fn overflowed(&mut self) -> End {
        let err = StreamError::with_text(
            StreamCondition::PolicyViolation,
            "too many stanzas queued for this session: it is not reading",
        );
        if self.resumable() {
            return End::Lost(Some(err));
        }
        self.drop_queue = true;
        End::Error(err)
    }

    /// Bring the user's byte counter up to what this session holds past
    /// its queue.
    fn sync_bytes(&mut self) {
        let Some(rx) = &self.rx else { return };
        let now = self.sm.as_ref().map_or(0, |s| s.bytes)
            + self.held.bytes()
            + self.inflight.iter().map(Outbound::size).sum::<usize>();
        let user = rx.user_bytes();
        let charged = self.charged as usize;
        if now > charged {
            user.charge(now - charged);
        } else {
            user.discharge(charged - now);
        }
        // A session holds a few MiB at most (its own bounds).
        self.charged = u32::try_from(now).unwrap_or(u32::MAX);
    }

    /// Under `c2s.max_unacked` stanzas and `c2s.max_queue_bytes` bytes.
    fn has_room(&self, items: usize, bytes: usize) -> bool {
        let c2s = &self.cfg().c2s;
        items < c2s.max_unacked && bytes < c2s.max_queue_bytes
    }

    /// Stream management is waiting for acks: nothing more is taken from
    /// the queue until some come (back-pressure; a client that never acks
    /// is found by its unanswered `<r/>`, or its queue overflows).
    fn awaiting_acks(&self) -> bool {
        self.sm
            .as_ref()
            .is_some_and(|s| !s.unsent.is_empty() || !self.has_room(s.unacked.len(), s.bytes))
    }

    /// When the bound loop's timer fires next: the heartbeat (ping, or the
    /// answer to one or to an ack request), a due ack request, or the
    /// release of buffers once idle.
    fn next_timer(&self) -> Instant {
        let mut at = self.heartbeat();
        let ack_due = self.sm.as_ref().and_then(|s| s.ack_due);
        for d in [ack_due, self.release_at].into_iter().flatten() {
            at = at.min(d);
        }
        at
    }

    fn heartbeat(&self) -> Instant {
        let c = &self.cfg().c2s;
        let interval = Duration::from_secs(c.ping_interval_secs);
        match (self.sm.as_ref().and_then(|s| s.ack_deadline), &self.ping_id) {
            (Some(d), _) => d,
            (None, Some(_)) => {
                self.last_heard + interval + Duration::from_secs(c.ping_timeout_secs)
            }
            (None, None) => self.last_heard + interval,
        }
    }

    /// Something happened: release buffers once the session is idle again.
    fn busy(&mut self) {
        self.release_at = Some(Instant::now() + IDLE_RELEASE);
    }

    /// Idle for `IDLE_RELEASE`: give back what the last burst grew (parser,
    /// queue, SM queue); the next one allocates them again.
    fn release<T: Transport>(&mut self, t: &mut T) {
        self.release_at = None;
        t.release();
        if let Some(rx) = &self.rx {
            rx.release();
        }
        self.held.shrink();
        if let Some(sm) = self.sm.as_mut() {
            sm.unacked.shrink_to_fit();
        }
    }

    /// Stanzas from the queue: everything already queued goes out in one write.
    async fn on_queue<T: Transport>(&mut self, t: &mut T, d: Option<Deliver>) -> Result<(), End> {
        self.busy();
        let mut batch = Vec::new();
        let mut next = d;
        let mut close = None;
        loop {
            match next {
                Some(Deliver::Stanza(el)) => {
                    let hold = self.held.inactive;
                    self.held.filter(el, hold, &mut batch);
                    if !self.has_room(self.held.len(), self.held.bytes()) {
                        batch.extend(self.held.take_all());
                    }
                }
                Some(Deliver::Close(err)) => {
                    close = Some(err);
                    break;
                }
                Some(Deliver::Overflow) => return Err(self.overflowed()),
                Some(Deliver::Shutdown) => return Err(shutting_down()),
                None => break,
            }
            let bytes: usize = batch.iter().map(Outbound::size).sum();
            let sm_full = self
                .sm
                .as_ref()
                .is_some_and(|s| !self.has_room(s.unacked.len() + batch.len(), s.bytes + bytes));
            if batch.len() >= 64 || bytes >= BATCH_BYTES || sm_full {
                break;
            }
            next = self.rx.as_mut().and_then(|rx| rx.try_recv());
        }
        tracing::trace!(n = batch.len(), "writing stanzas");
        let written = self.write(t, batch).await;
        if let Some(err) = close {
            return Err(End::Error(err));
        }
        written
    }

    /// Events read on a bound stream. Consecutive messages share one
    /// durable write.
    async fn on_read<T: Transport>(
        &mut self,
        t: &mut T,
        h: &Arc<SessionHandle>,
        events: Vec<StreamEvent>,
    ) -> Result<(), End> {
        tracing::trace!(n = events.len(), "events read");
        self.last_heard = Instant::now();
        self.ping_id = None;
        self.busy();
        let mut bytes = 0;
        let mut events = events.into_iter().peekable();
        while let Some(ev) = events.next() {
            let el = match ev {
                StreamEvent::Stanza(el) => el,
                StreamEvent::Close => return Err(End::Clean),
                StreamEvent::Open { .. } => {
                    return Err(End::Error(StreamError::with_text(
                        StreamCondition::BadFormat,
                        "unexpected stream header",
                    )))
                }
            };
            bytes += approx_size(&el);
            if is_message(&el) {
                let mut run = vec![el];
                while let Some(StreamEvent::Stanza(el)) =
                    events.next_if(|e| matches!(e, StreamEvent::Stanza(el) if is_message(el)))
                {
                    bytes += approx_size(&el);
                    run.push(el);
                }
                self.on_messages(t, h, run).await?;
                continue;
            }
            self.on_bound(t, h, el).await?;
        }
        if let Some(pause) = self.bucket.take(bytes) {
            tokio::time::sleep(pause).await;
        }
        Ok(())
    }

    /// The bound loop's timer: release idle buffers, ask for an ack, or
    /// the heartbeat (XEP-0199 ping, or an ack request under XEP-0198).
    async fn on_timer<T: Transport>(
        &mut self,
        t: &mut T,
        h: &Arc<SessionHandle>,
    ) -> Result<(), End> {
        let now = Instant::now();
        if self.release_at.is_some_and(|d| d <= now) {
            self.release(t);
        }
        if let Some(sm) = self.sm.as_mut() {
            if sm.ack_deadline.is_some_and(|d| d <= now) {
                return Err(End::Lost(Some(StreamError::with_text(
                    StreamCondition::ConnectionTimeout,
                    "no answer to an ack request",
                ))));
            }
            if sm.ack_due.is_some_and(|d| d <= now) {
                sm.ack_due = None;
                return self.request_ack(t).await;
            }
        }
        if now < self.heartbeat() {
            return Ok(());
        }
        if self.ping_id.is_some() {
            return Err(End::Lost(Some(StreamError::with_text(
                StreamCondition::ConnectionTimeout,
                "no answer to ping",
            ))));
        }
        // XEP-0012: the heartbeat keeps "last seen" fresh.
        self.state
            .modules
            .emit(&self.state, Some(h), &modules::Event::Heartbeat)
            .await;
        // Idle: a stream-managed client answers an ack request (not
        // counted as a stanza); others get a ping.
        if self.sm.is_some() {
            self.request_ack(t).await
        } else {
            let id = format!("ping-{}", modules::new_id());
            let ping = modules::iq("get", &id, self.domain(), &h.jid.to_string())
                .with_child(Element::new("ping", modules::ping::NS));
            self.ping_id = Some(id);
            self.write(t, vec![Outbound::new(&ping, 0)]).await
        }
    }

    /// The connection ended: close the stream, then end the session — or,
    /// when a resumable session's connection was lost, keep the session
    /// (without the connection) until it is resumed or times out.
    async fn finish<T: Transport>(&mut self, mut t: T, conn: ConnectionGuard, end: End) {
        let lost = matches!(end, End::Lost(_));
        if lost && self.resumable() {
            self.close_stream(&mut t, end).await;
            tracing::debug!(peer = %t.peer(), "connection closed");
            drop(t);
            drop(conn);
            self.park().await;
            return;
        }
        // A client still reading gets what was queued for it before the
        // stream closes (not one that is not reading: that is what filled
        // the queue). Stream-managed sessions instead requeue it.
        if !lost && self.sm.is_none() && !self.drop_queue {
            self.flush_queue(&mut t).await;
        }
        // What the session gives back is in the offline queue before the
        // client can see its stream end: a client that reconnects at once
        // gets it, in order, before anything newer.
        self.give_back().await;
        self.close_stream(&mut t, end).await;
        tracing::debug!(peer = %t.peer(), "connection closed");
        self.teardown().await;
    }

    /// The connection's end: what is queued goes out to a client still
    /// reading, then the stream is closed (with the error, if any).
    async fn close_stream<T: Transport>(&mut self, t: &mut T, end: End) {
        let err = match &end {
            End::Error(e) | End::Lost(Some(e)) => Some(e.clone()),
            _ => None,
        };
        if let Some(e) = &err {
            self.state.metrics.stream_error(e);
            tracing::debug!(peer = %t.peer(), error = %e, "closing stream with error");
        }
        // Release the unauthenticated slot before the peer can see the close,
        // so a client that reconnects right after it is not refused.
        self.preauth = None;
        let lost = matches!(end, End::Lost(_));
        if !self.write_broken {
            let wait = if lost { 2 } else { 5 };
            let _ = tokio::time::timeout(
                Duration::from_secs(wait),
                t.close(err.as_ref(), self.domain()),
            )
            .await;
        }
    }

    /// Write stanzas to the client (after the CSI filter). With stream
    /// management each is counted and kept until acknowledged, and an ack
    /// is requested every `sm::REQUEST_EVERY` stanzas; past `c2s.max_unacked`
    /// stanzas or `c2s.max_queue_bytes` bytes unacknowledged the rest waits
    /// (`Sm::unsent`) for acks, and nothing more is taken from the queue
    /// meanwhile (`awaiting_acks`): back-pressure, not an error.
    async fn write<T: Transport>(
        &mut self,
        t: &mut T,
        mut batch: Vec<Outbound>,
    ) -> Result<(), End> {
        if batch.is_empty() {
            return Ok(());
        }
        let max_unacked = self.cfg().c2s.max_unacked;
        let max_bytes = self.cfg().c2s.max_queue_bytes;
        if let Some(sm) = self.sm.as_mut() {
            let (mut n, mut bytes) = (sm.unacked.len(), sm.bytes);
            let room = batch
                .iter()
                .take_while(|el| {
                    n += 1;
                    bytes += el.size();
                    n <= max_unacked && (bytes <= max_bytes || n == 1)
                })
                .count();
            if room < batch.len() {
                sm.defer(batch.split_off(room));
            }
            for el in &batch {
                sm.record(el.clone(), true);
            }
        }
        if batch.is_empty() {
            return Ok(());
        }
        self.state.metrics.stanzas_out(&batch);
        let Some(unrequested) = self.sm.as_ref().map(|s| s.unrequested) else {
            return self.send_tracked(t, batch).await;
        };
        if unrequested >= sm::REQUEST_EVERY {
            batch.push(Outbound::new(&sm::r(), 0));
            self.requested();
        }
        self.send_out(t, &batch).await?;
        self.schedule_ack();
        Ok(())
    }

    /// A write failed after `delivered` stanzas of `inflight` wholly
    /// reached the socket: keep only the others.
    fn keep_undelivered(&mut self, delivered: usize) {
        let delivered = delivered.min(self.inflight.len());
        self.inflight = self.inflight[delivered..].into();
    }

    /// Write stanzas of a session without stream management, keeping
    /// those not delivered in `inflight` when the write fails.
    async fn send_tracked<T: Transport>(
        &mut self,
        t: &mut T,
        batch: Vec<Outbound>,
    ) -> Result<(), End> {
        self.inflight = batch.into_boxed_slice();
        self.sync_bytes();
        let timeout = Duration::from_secs(self.cfg().c2s.write_timeout_secs);
        let r = tokio::time::timeout(timeout, t.send(&self.inflight)).await;
        if matches!(r, Ok(Ok(()))) {
            self.inflight = Box::default();
            return Ok(());
        }
        // Cut mid-write, or the peer stopped reading: what did not wholly
        // reach the socket was not delivered.
        self.keep_undelivered(t.delivered());
        self.write_broken = true;
        Err(End::Lost(None))
    }

    /// Write elements as they are (nonzas, or stanzas already counted).
    async fn send_raw<T: Transport>(&mut self, t: &mut T, els: &[Element]) -> Result<(), End> {
        let out: Vec<_> = els.iter().map(|e| Outbound::new(e, 0)).collect();
        self.send_out(t, &out).await
    }

    async fn send_out<T: Transport>(&mut self, t: &mut T, out: &[Outbound]) -> Result<(), End> {
        // What waits on this write counts against the user's quota now.
        self.sync_bytes();
        let timeout = Duration::from_secs(self.cfg().c2s.write_timeout_secs);
        match tokio::time::timeout(timeout, t.send(out)).await {
            Ok(Ok(())) => Ok(()),
            // The peer is gone, or stopped reading: nothing more can be
            // written to this stream.
            Ok(Err(_)) | Err(_) => {
                self.write_broken = true;
                Err(End::Lost(None))
            }
        }
    }

    /// An `<r/>` goes out now: the client must answer within the ping timeout.
    fn requested(&mut self) {
        let timeout = Duration::from_secs(self.cfg().c2s.ping_timeout_secs);
        if let Some(sm) = self.sm.as_mut() {
            sm.unrequested = 0;
            sm.requests += 1;
            sm.ack_due = None;
            if sm.ack_deadline.is_none() {
                sm.ack_deadline = Some(Instant::now() + timeout);
            }
        }
    }

    async fn request_ack<T: Transport>(&mut self, t: &mut T) -> Result<(), End> {
        self.requested();
        self.send_raw(t, &[sm::r()]).await
    }

    /// Stanzas written without an ack request: ask once the stream is idle.
    fn schedule_ack(&mut self) {
        if let Some(sm) = self.sm.as_mut() {
            if sm.unrequested > 0 && sm.requests == 0 && sm.ack_due.is_none() {
                sm.ack_due = Some(Instant::now() + ACK_IDLE);
            }
        }
    }

    async fn on_event<T: Transport>(&mut self, t: &mut T, ev: StreamEvent) -> Result<Step, End> {
        match ev {
            StreamEvent::Open { attrs } => Ok(self.on_open(t, attrs).await?),
            StreamEvent::Close => Ok(Step::Close),
            StreamEvent::Stanza(_) if self.awaiting_open => {
                Err(End::Error(StreamError::with_text(
                    StreamCondition::NotAuthorized,
                    "stanza before stream header",
                )))
            }
            StreamEvent::Stanza(el) => match &self.phase {
                Phase::Bound(h) => {
                    let h = h.clone();
                    self.on_bound(t, &h, el).await
                }
                Phase::Authenticated(user) if el.ns == sm::NS || el.ns == sm::NS_CSI => {
                    let user = BareJid::clone(user);
                    self.on_authenticated_nonza(t, user, el).await
                }
                _ => Ok(self.on_negotiation(t, el).await?),
            },
        }
    }

    fn secure<T: Transport>(&self, t: &T) -> bool {
        // WebSocket on loopback: TLS is terminated by a local proxy (or the
        // browser is on this machine).
        t.is_tls() || (t.kind() == "ws" && t.peer().ip().is_loopback())
    }

    fn plaintext_ok<T: Transport>(&self, t: &T) -> bool {
        self.secure(t) || (self.cfg().c2s.allow_plaintext_loopback && t.peer().ip().is_loopback())
    }

    async fn on_open<T: Transport>(
        &mut self,
        t: &mut T,
        attrs: Vec<(String, String)>,
    ) -> Result<Step, StreamError> {
        if !self.awaiting_open {
            return Err(StreamError::with_text(
                StreamCondition::BadFormat,
                "unexpected stream header",
            ));
        }
        let get = |k: &str| attrs.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        let to = get("to").unwrap_or_default().to_ascii_lowercase();
        if !self.state.serves(&to) {
            return Err(StreamError::with_text(
                StreamCondition::HostUnknown,
                format!("this server does not serve {to:?}"),
            ));
        }
        if matches!(self.phase, Phase::Connected) {
            self.domain = self
                .cfg()
                .domains
                .iter()
                .position(|d| *d == to)
                .unwrap_or(0);
        } else if to != self.domain() {
            return Err(StreamError::new(StreamCondition::HostUnknown));
        }
        t.open(&modules::new_id(), self.domain())
            .await
            .map_err(|_| StreamError::new(StreamCondition::UndefinedCondition))?;
        if get("version") != Some("1.0") {
            return Err(StreamError::with_text(
                StreamCondition::UnsupportedVersion,
                "XMPP 1.0 streams only",
            ));
        }
        self.awaiting_open = false;
        let features = self.features(t);
        t.send(&[Outbound::new(&features, 0)])
            .await
            .map_err(|_| StreamError::new(StreamCondition::UndefinedCondition))?;
        Ok(Step::Continue)
    }

    fn features<T: Transport>(&self, t: &T) -> Element {
        let mut f = Element::new("features", natter_xml::NS_STREAM);
        match &self.phase {
            Phase::Connected => {
                if t.can_starttls() {
                    let mut st = Element::new("starttls", NS_TLS);
                    if !self.plaintext_ok(t) {
                        st.append_child(Element::new("required", NS_TLS));
                    }
                    f.append_child(st);
                }
                if self.plaintext_ok(t) {
                    let mut mechs = Element::new("mechanisms", NS_SASL);
                    for m in self.mechanisms(t) {
                        mechs.append_child(Element::new("mechanism", NS_SASL).with_text(m.name()));
                    }
                    f.append_child(mechs);
                    if self.cfg().registration_enabled() && self.secure(t) {
                        f.append_child(Element::new("register", modules::register::NS_FEATURE));
                    }
                }
            }
            Phase::Authenticated(_) => {
                f.append_child(Element::new("bind", NS_BIND));
                f.append_child(
                    Element::new("session", NS_SESSION)
                        .with_child(Element::new("optional", NS_SESSION)),
                );
                f.append_child(Element::new("sm", sm::NS));
                f.append_child(Element::new("csi", sm::NS_CSI));
                for e in self.state.modules.stream_features() {
                    f.append_child(e);
                }
                f.append_child(self.state.modules.caps_element());
            }
            Phase::Bound(_) => {}
        }
        f
    }

    fn mechanisms<T: Transport>(&self, t: &T) -> Vec<Mechanism> {
        let mut m = Vec::new();
        if t.channel_binding().is_some() {
            m.extend([Mechanism::ScramSha256Plus, Mechanism::ScramSha1Plus]);
        }
        m.extend([Mechanism::ScramSha256, Mechanism::ScramSha1]);
        if self.secure(t) {
            m.push(Mechanism::Plain);
        }
        m
    }

    async fn on_negotiation<T: Transport>(
        &mut self,
        t: &mut T,
        el: Element,
    ) -> Result<Step, StreamError> {
        let send = |el: Element| async move { el };
        match (&self.phase, el.ns.as_str(), el.name.as_str()) {
            (Phase::Connected, NS_TLS, "starttls") if t.can_starttls() => {
                t.send(&[Outbound::new(
                    &send(Element::new("proceed", NS_TLS)).await,
                    0,
                )])
                .await
                .map_err(|_| StreamError::new(StreamCondition::UndefinedCondition))?;
                let tls = self.state.tls.clone();
                match tokio::time::timeout(Duration::from_secs(10), t.starttls(tls)).await {
                    Ok(Ok(())) => {}
                    // The TLS layer is broken: nothing more can be said on it.
                    _ => return Ok(Step::Close),
                }
                self.awaiting_open = true;
                Ok(Step::Restart)
            }
            (Phase::Connected, NS_SASL, _) => self.on_sasl(t, el).await,
            (Phase::Connected, NS_CLIENT, "iq")
                if el.get_child("query", modules::register::NS).is_some() && self.secure(t) =>
            {
                let reply =
                    modules::register::handle_preauth(&self.state, self.domain(), &el).await;
                self.send_or_close(t, reply).await
            }
            (Phase::Authenticated(user), NS_CLIENT, "iq")
                if el.get_child("bind", NS_BIND).is_some() && el.attr("type") == Some("set") =>
            {
                let user = BareJid::clone(user);
                self.bind(t, user, el).await
            }
            _ => Err(StreamError::with_text(
                StreamCondition::NotAuthorized,
                "authenticate and bind a resource first",
            )),
        }
    }

    async fn send_or_close<T: Transport>(
        &self,
        t: &mut T,
        el: Element,
    ) -> Result<Step, StreamError> {
        t.send(&[Outbound::new(&el, 0)])
            .await
            .map_err(|_| StreamError::new(StreamCondition::UndefinedCondition))?;
        Ok(Step::Continue)
    }

    async fn sasl_failure<T: Transport>(
        &mut self,
        t: &mut T,
        err: SaslError,
        user: Option<&BareJid>,
    ) -> Result<Step, StreamError> {
        self.scram = None;
        self.state.metrics.auth_failure(err.condition());
        if matches!(err, SaslError::NotAuthorized) {
            let delay = self
                .state
                .throttle
                .failure(t.peer().ip(), user.map(|u| u.as_str()));
            // Slows the guesser; a right password is never held back.
            tokio::time::sleep(delay).await;
            self.sasl_failures += 1;
            tracing::info!(peer = %t.peer(), user = user.map(|u| u.to_string()), "authentication failed");
        }
        let f = Element::new("failure", NS_SASL).with_child(Element::new(err.condition(), NS_SASL));
        self.send_or_close(t, f).await?;
        if self.sasl_failures >= MAX_SASL_FAILURES {
            return Err(StreamError::with_text(
                StreamCondition::PolicyViolation,
                "too many failed authentication attempts",
            ));
        }
        Ok(Step::Continue)
    }

    async fn on_sasl<T: Transport>(&mut self, t: &mut T, el: Element) -> Result<Step, StreamError> {
        let ip = t.peer().ip();
        match el.name.as_str() {
            "abort" => {
                return self.sasl_failure(t, SaslError::Aborted, None).await;
            }
            "auth" if self.scram.is_none() => {}
            "response" if self.scram.is_some() => {
                let Scram {
                    mut server,
                    user,
                    known,
                } = *self.scram.take().expect("checked");
                let data = match decode_sasl(&el.text()) {
                    Ok(d) => d,
                    Err(e) => return self.sasl_failure(t, e, Some(&user)).await,
                };
                return match server.client_final(&data) {
                    Ok(v) if known => self.sasl_success(t, user, Some(v)).await,
                    Ok(_) => {
                        self.sasl_failure(t, SaslError::NotAuthorized, Some(&user))
                            .await
                    }
                    Err(e) => self.sasl_failure(t, e, Some(&user)).await,
                };
            }
            _ => {
                return self
                    .sasl_failure(
                        t,
                        SaslError::MalformedRequest("unexpected SASL element".into()),
                        None,
                    )
                    .await
            }
        }
        if !self.plaintext_ok(t) {
            return self
                .sasl_failure(t, SaslError::EncryptionRequired, None)
                .await;
        }
        if self.state.throttle.check(ip) == throttle::Verdict::Refused {
            return self
                .sasl_failure(t, SaslError::TemporaryAuthFailure, None)
                .await;
        }
        let mech = el.attr("mechanism").and_then(Mechanism::from_name);
        let Some(mech) = mech.filter(|m| self.mechanisms(t).contains(m)) else {
            return self
                .sasl_failure(t, SaslError::InvalidMechanism, None)
                .await;
        };
        let data = match decode_sasl(&el.text()) {
            Ok(d) => d,
            Err(e) => return self.sasl_failure(t, e, None).await,
        };
        match mech.hash() {
            None => self.plain(t, &data).await,
            Some(hash) => {
                let plus = matches!(mech, Mechanism::ScramSha1Plus | Mechanism::ScramSha256Plus);
                let mut server = ScramServer::new(hash, plus, t.channel_binding());
                let first = match server.client_first(&data) {
                    Ok(f) => f,
                    Err(e) => return self.sasl_failure(t, e, None).await,
                };
                let user = match self.authzid_check(&first.username, first.authzid.as_deref()) {
                    Ok(u) => u,
                    Err(e) => return self.sasl_failure(t, e, None).await,
                };
                let creds = self.load_creds(&user, hash).await?;
                let challenge = server.server_first(creds.as_ref(), &self.state.fake_salt);
                self.scram = Some(Box::new(Scram {
                    server,
                    user,
                    known: creds.is_some(),
                }));
                let c = Element::new("challenge", NS_SASL)
                    .with_text(base64::engine::general_purpose::STANDARD.encode(challenge));
                self.send_or_close(t, c).await
            }
        }
    }

    /// The username as a JID on this stream's domain; an authzid naming
    /// anyone else is refused (ejabberd #4601).
    fn authzid_check(&self, username: &str, authzid: Option<&str>) -> Result<BareJid, SaslError> {
        let user = BareJid::new(&format!("{username}@{}", self.domain()))
            .map_err(|_| SaslError::NotAuthorized)?;
        if let Some(z) = authzid {
            match BareJid::new(z) {
                Ok(z) if z == user => {}
                _ => return Err(SaslError::InvalidAuthzid),
            }
        }
        Ok(user)
    }

    async fn load_creds(
        &self,
        user: &BareJid,
        hash: Hash,
    ) -> Result<Option<natter_sasl::ScramCredentials>, StreamError> {
        let creds = self
            .state
            .store
            .credentials(user.as_str())
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "store error during login");
                StreamError::new(StreamCondition::InternalServerError)
            })?;
        Ok(creds.map(|c| {
            let s = match hash {
                Hash::Sha1 => c.sha1,
                Hash::Sha256 => c.sha256,
            };
            natter_sasl::ScramCredentials {
                salt: s.salt,
                iterations: s.iterations,
                stored_key: s.stored_key,
                server_key: s.server_key,
            }
        }))
    }

    async fn plain<T: Transport>(&mut self, t: &mut T, data: &[u8]) -> Result<Step, StreamError> {
        let (authzid, authcid, password) = match natter_sasl::parse_plain(data) {
            Ok(p) => p,
            Err(e) => return self.sasl_failure(t, e, None).await,
        };
        let user = match self.authzid_check(&authcid, authzid.as_deref()) {
            Ok(u) => u,
            Err(e) => return self.sasl_failure(t, e, None).await,
        };
        let creds = self.load_creds(&user, Hash::Sha256).await?;
        let known = creds.is_some();
        // An unknown name costs the same PBKDF2 as an account: no timing tell.
        let c = creds.unwrap_or_else(|| self.state.fake_salt.credentials(Hash::Sha256, &authcid));
        // PBKDF2 is slow on purpose; keep it off the async workers.
        let ok = tokio::task::spawn_blocking(move || {
            natter_sasl::verify_password(&c, Hash::Sha256, &password)
        })
        .await
        .unwrap_or(false);
        if ok && known {
            self.sasl_success(t, user, None).await
        } else {
            self.sasl_failure(t, SaslError::NotAuthorized, Some(&user))
                .await
        }
    }

    async fn sasl_success<T: Transport>(
        &mut self,
        t: &mut T,
        user: BareJid,
        additional: Option<Vec<u8>>,
    ) -> Result<Step, StreamError> {
        let mut s = Element::new("success", NS_SASL);
        if let Some(a) = additional {
            s.append_text(base64::engine::general_purpose::STANDARD.encode(a));
        }
        self.send_or_close(t, s).await?;
        tracing::info!(user = %user, transport = t.kind(), "authenticated");
        self.phase = Phase::Authenticated(Box::new(user));
        t.reset();
        t.authenticated();
        t.set_limits(self.limits(true));
        self.awaiting_open = true;
        Ok(Step::Restart)
    }

    async fn bind<T: Transport>(
        &mut self,
        t: &mut T,
        user: BareJid,
        iq: Element,
    ) -> Result<Step, StreamError> {
        let requested = iq
            .get_child("bind", NS_BIND)
            .and_then(|b| b.child_text("resource", NS_BIND))
            .filter(|r| !r.is_empty());
        let resource = requested.unwrap_or_else(|| format!("natter-{}", &modules::new_id()[..8]));
        let full = match user.with_resource_str(&resource) {
            Ok(f) => f,
            Err(_) => {
                let e = StanzaError::with_text(Condition::BadRequest, "invalid resource");
                return self.send_or_close(t, e.reply_to(&iq)).await;
            }
        };
        let c2s = &self.cfg().c2s;
        let limits = QueueLimits {
            items: c2s.max_queue,
            bytes: c2s.max_queue_bytes,
            user_bytes: c2s.max_user_bytes,
        };
        let (handle, rx, replaced) = match self.state.router.bind(full, limits, c2s.max_resources) {
            Ok(b) => b,
            Err(BindError::TooManyResources) => {
                let e = StanzaError::with_text(
                    Condition::ResourceConstraint,
                    "too many devices connected",
                );
                return self.send_or_close(t, e.reply_to(&iq)).await;
            }
        };
        if let Some(old) = replaced {
            old.close(StreamError::with_text(
                StreamCondition::Conflict,
                "replaced by a new connection",
            ));
        }
        let reply = Element::new("iq", NS_CLIENT)
            .with_attr("type", "result")
            .with_attr("id", iq.attr("id").unwrap_or_default())
            .with_child(
                Element::new("bind", NS_BIND)
                    .with_child(Element::new("jid", NS_BIND).with_text(handle.jid.to_string())),
            );
        tracing::info!(jid = %handle.jid, transport = t.kind(), "resource bound");
        self.state.metrics.session_bound(handle.id, t.kind());
        self.phase = Phase::Bound(handle);
        self.rx = Some(rx);
        self.preauth = None;
        self.send_or_close(t, reply).await
    }

    /// A top-level element on a bound stream: XEP-0198/XEP-0352 nonzas, or
    /// a stanza.
    async fn on_bound<T: Transport>(
        &mut self,
        t: &mut T,
        h: &Arc<SessionHandle>,
        el: Element,
    ) -> Result<Step, End> {
        if el.ns == sm::NS_CSI {
            match el.name.as_str() {
                "inactive" => self.held.inactive = true,
                "active" => {
                    self.held.inactive = false;
                    let held = self.held.take_all();
                    self.write(t, held).await?;
                }
                _ => {}
            }
            return Ok(Step::Continue);
        }
        if el.ns != sm::NS {
            return self.on_stanza(t, h, el).await;
        }
        match (el.name.as_str(), self.sm.is_some()) {
            ("enable", false) => {
                let enabled = self.enable(h, &el);
                self.send_raw(t, &[enabled]).await?;
            }
            ("r", true) => {
                let handled = self.sm.as_ref().map_or(0, |s| s.handled);
                self.send_raw(t, &[sm::a(handled)]).await?;
            }
            ("a", true) => {
                let Some(n) = sm::parse_h(&el) else {
                    return Err(End::Error(StreamError::with_text(
                        StreamCondition::BadFormat,
                        "<a/> needs a numeric 'h'",
                    )));
                };
                let sm = self.sm.as_mut().expect("checked");
                if let Err((n, sent)) = sm.ack(n) {
                    return Err(End::Error(
                        StreamError::with_text(
                            StreamCondition::UndefinedCondition,
                            format!("you acknowledged {n} stanzas but were sent {sent}"),
                        )
                        .with_app(sm::too_high(n, sent)),
                    ));
                }
                sm.requests = sm.requests.saturating_sub(1);
                let pending = sm.requests > 0;
                let timeout = Duration::from_secs(self.state.config.c2s.ping_timeout_secs);
                sm.ack_deadline = pending.then(|| Instant::now() + timeout);
                // Room again for what waited on acks.
                let unsent = sm.take_unsent();
                self.schedule_ack();
                self.write(t, unsent).await?;
            }
            ("enable" | "resume", _) => {
                // Enabled already, or resuming on a bound stream (XEP-0198 §3, §5).
                self.send_raw(t, &[sm::failed("unexpected-request", None)])
                    .await?;
            }
            _ => {
                return Err(End::Error(StreamError::with_text(
                    StreamCondition::UnsupportedStanzaType,
                    format!("unexpected {{{}}}{}", el.ns, el.name),
                )));
            }
        }
        Ok(Step::Continue)
    }

    /// XEP-0198 §3: `<enable/>` after binding.
    fn enable(&mut self, h: &Arc<SessionHandle>, el: &Element) -> Element {
        let limit = self.cfg().c2s.resume_timeout_secs;
        let max = match el.attr("max").and_then(|m| m.parse::<u64>().ok()) {
            Some(m) if m > 0 => m.min(limit),
            _ => limit,
        };
        let resume = sm::truthy(el.attr("resume")) && max > 0;
        let mut enabled = Element::new("enabled", sm::NS);
        let id = resume.then(sm::new_id);
        if let Some(id) = &id {
            let (tx, rx) = mpsc::channel(TAKEOVER_QUEUE);
            self.state
                .router
                .resumable
                .insert(id, h.bare.clone(), tx.clone());
            self.takeover = Some((tx, rx));
            enabled.set_attr("id", id.clone());
            enabled.set_attr("resume", "true");
            enabled.set_attr("max", max.to_string());
        }
        tracing::debug!(jid = %h.jid, resume, "stream management enabled");
        self.sm = Some(Box::new(sm::Sm::new(id, max)));
        enabled
    }

    /// SM and CSI nonzas after SASL, before binding.
    async fn on_authenticated_nonza<T: Transport>(
        &mut self,
        t: &mut T,
        user: BareJid,
        el: Element,
    ) -> Result<Step, End> {
        match (el.ns.as_str(), el.name.as_str()) {
            (sm::NS, "resume") => self.resume(t, user, el).await,
            (sm::NS_CSI, "inactive") => {
                self.held.inactive = true;
                Ok(Step::Continue)
            }
            (sm::NS_CSI, _) => {
                self.held.inactive = false;
                Ok(Step::Continue)
            }
            // XEP-0198 §3: enabling needs a bound resource.
            (sm::NS, "enable") => {
                self.send_raw(t, &[sm::failed("unexpected-request", None)])
                    .await?;
                Ok(Step::Continue)
            }
            _ => Err(End::Error(StreamError::with_text(
                StreamCondition::NotAuthorized,
                "bind a resource first",
            ))),
        }
    }

    /// XEP-0198 §5: `<resume previd='…' h='…'/>` instead of binding.
    async fn resume<T: Transport>(
        &mut self,
        t: &mut T,
        user: BareJid,
        el: Element,
    ) -> Result<Step, End> {
        let (Some(previd), Some(h)) = (el.attr("previd"), sm::parse_h(&el)) else {
            self.send_raw(t, &[sm::failed("bad-request", None)]).await?;
            return Ok(Step::Continue);
        };
        let registry = &self.state.router.resumable;
        let owner = match registry.lookup(previd, &user) {
            sm::Lookup::Live(tx) => tx,
            sm::Lookup::Gone(last) => {
                tracing::debug!(user = %user, "resumption of an unknown session");
                self.send_raw(t, &[sm::failed("item-not-found", last)])
                    .await?;
                return Ok(Step::Continue);
            }
        };
        // The task holding the session (detached, or still on a connection
        // the client gave up on) hands it over.
        let (reply, parked) = oneshot::channel();
        let wait = Duration::from_secs(self.cfg().c2s.write_timeout_secs + 2);
        let parked = match owner.try_send(reply) {
            Ok(()) => tokio::time::timeout(wait, parked)
                .await
                .ok()
                .and_then(Result::ok),
            Err(_) => None,
        };
        let Some(p) = parked else {
            self.send_raw(t, &[sm::failed("item-not-found", None)])
                .await?;
            return Ok(Step::Continue);
        };
        // From here this connection owns the session.
        let previd = previd.to_string();
        let (tx, rx) = mpsc::channel(TAKEOVER_QUEUE);
        self.state
            .router
            .resumable
            .insert(&previd, p.handle.bare.clone(), tx.clone());
        self.takeover = Some((tx, rx));
        let jid = p.handle.jid.clone();
        self.phase = Phase::Bound(p.handle);
        self.rx = Some(p.rx);
        self.held = p.held;
        self.preauth = None;
        let sm = self.sm.insert(p.sm);
        if let Err((n, sent)) = sm.ack(h) {
            tracing::info!(%jid, "resumption with a wrong h; session closed");
            return Err(End::Error(
                StreamError::with_text(
                    StreamCondition::UndefinedCondition,
                    format!("you acknowledged {n} stanzas but were sent {sent}"),
                )
                .with_app(sm::too_high(n, sent)),
            ));
        }
        // Everything not acknowledged, in order, exactly once more.
        sm.unwritten = 0;
        sm.requests = 0;
        let mut out = Vec::with_capacity(sm.unacked.len() + 2);
        out.push(Outbound::new(
            &Element::new("resumed", sm::NS)
                .with_attr("previd", previd)
                .with_attr("h", sm.handled.to_string()),
            0,
        ));
        out.extend(sm.unacked.iter().cloned());
        let resent = out.len() - 1;
        sm.ack_deadline = None;
        sm.ack_due = None;
        let unsent = sm.take_unsent();
        if resent > 0 {
            out.push(Outbound::new(&sm::r(), 0));
            self.requested();
        }
        tracing::info!(%jid, resent, transport = t.kind(), "session resumed");
        self.state.metrics.stanzas_out(&out[1..=resent]);
        self.send_out(t, &out).await?;
        // Then what it took from its queue and could not write yet.
        self.write(t, unsent).await?;
        // A new stream starts active (XEP-0352 §4): release what was held.
        self.held.inactive = false;
        let held = self.held.take_all();
        self.write(t, held).await?;
        // Its queue refused stanzas while it was parked: they are in
        // offline storage, after everything it holds; deliver them next.
        if let (Some(h), Some(rx)) = (self.bound(), self.rx.as_ref()) {
            if rx.overflowed() {
                self.state
                    .modules
                    .api::<dyn modules::api::OfflineQueue>()
                    .resumed(&self.state, &h, rx);
            }
        }
        Ok(Step::Continue)
    }

    async fn on_stanza<T: Transport>(
        &mut self,
        t: &mut T,
        h: &Arc<SessionHandle>,
        el: Element,
    ) -> Result<Step, End> {
        let step = self.handle_stanza(t, h, el).await?;
        // Handled (XEP-0198 §4): dispatch returned.
        if let Some(sm) = self.sm.as_mut() {
            sm.handled = sm.handled.wrapping_add(1);
        }
        Ok(step)
    }

    /// A run of message stanzas from one read: prepared one by one like
    /// any stanza, routed with one archive write (`route_many`), each
    /// counted as handled (XEP-0198) only after that write is durable.
    async fn on_messages<T: Transport>(
        &mut self,
        t: &mut T,
        h: &Arc<SessionHandle>,
        run: Vec<Element>,
    ) -> Result<(), End> {
        if run.len() == 1 {
            let el = run.into_iter().next().expect("one");
            return self.on_stanza(t, h, el).await.map(|_| ());
        }
        let n = run.len() as u32;
        let mut msgs = Vec::with_capacity(run.len());
        for mut el in run {
            el.set_attr("from", h.jid.to_string());
            self.state.metrics.stanza_in(&el.name);
            if strip::admit(&self.state, h, &mut el) {
                msgs.push(el);
            }
        }
        let cx = Cx {
            state: &self.state,
            session: h,
        };
        let originals = msgs.clone();
        let _timer = self.state.metrics.routing_timer("message");
        let results = modules::dispatch_messages(&cx, msgs).await;
        for (msg, r) in originals.iter().zip(results) {
            // Never answer an error with an error (RFC 6120 §8.3.1).
            if let Err(e) = r {
                if msg.attr("type") != Some("error") {
                    h.send(e.reply_to(msg));
                }
            }
        }
        if let Some(sm) = self.sm.as_mut() {
            sm.handled = sm.handled.wrapping_add(n);
        }
        Ok(())
    }

    async fn handle_stanza<T: Transport>(
        &mut self,
        t: &mut T,
        h: &Arc<SessionHandle>,
        mut el: Element,
    ) -> Result<Step, End> {
        if el.ns != NS_CLIENT || !matches!(el.name.as_str(), "message" | "presence" | "iq") {
            return Err(End::Error(StreamError::with_text(
                StreamCondition::UnsupportedStanzaType,
                format!("unsupported element {{{}}}{}", el.ns, el.name),
            )));
        }
        el.set_attr("from", h.jid.to_string());
        self.state.metrics.stanza_in(&el.name);
        if !strip::admit(&self.state, h, &mut el) {
            return Ok(Step::Continue);
        }
        if el.name == "iq" {
            // Our own ping answered.
            if matches!(el.attr("type"), Some("result") | Some("error"))
                && el.attr("id").is_some()
                && el.attr("id") == self.ping_id.as_deref()
            {
                self.ping_id = None;
                return Ok(Step::Continue);
            }
            // RFC 3921 session establishment, kept for old clients: a no-op.
            if el.get_child("session", NS_SESSION).is_some()
                && el.attr("to").is_none_or(|to| to == self.domain())
            {
                let r = modules::iq(
                    "result",
                    el.attr("id").unwrap_or_default(),
                    self.domain(),
                    &h.jid.to_string(),
                );
                self.write(t, vec![Outbound::new(&r, 0)]).await?;
                return Ok(Step::Continue);
            }
        }
        let cx = Cx {
            state: &self.state,
            session: h,
        };
        let _timer = self.state.metrics.routing_timer(&el.name);
        modules::dispatch(&cx, el).await;
        Ok(Step::Continue)
    }

    /// Write what is held and queued before the stream closes (sessions
    /// without stream management, whose client is still there). What does
    /// not wholly reach the socket stays in `inflight` for requeueing.
    async fn flush_queue<T: Transport>(&mut self, t: &mut T) {
        let Some(rx) = self.rx.as_mut() else { return };
        let mut batch = self.held.take_all();
        while let Some(Deliver::Stanza(el)) = rx.try_recv() {
            batch.push(el);
        }
        if batch.is_empty() {
            return;
        }
        self.inflight = batch.into_boxed_slice();
        match tokio::time::timeout(Duration::from_secs(2), t.send(&self.inflight)).await {
            Ok(Ok(())) => self.inflight = Box::default(),
            _ => {
                self.keep_undelivered(t.delivered());
                self.write_broken = true;
            }
        }
    }

    /// Give the session to the connection resuming it. False (and nothing
    /// changed) when that connection gave up waiting.
    fn hand_over(&mut self, reply: sm::Takeover) -> bool {
        let (Phase::Bound(handle), Some(rx), Some(sm)) = (
            std::mem::replace(&mut self.phase, Phase::Connected),
            self.rx.take(),
            self.sm.take(),
        ) else {
            unreachable!("only a bound, resumable session is registered for takeover");
        };
        // The new connection's task accounts for these bytes from now on.
        rx.user_bytes().discharge(self.charged as usize);
        let charged = std::mem::take(&mut self.charged);
        let parked = sm::Parked {
            handle,
            rx,
            sm,
            held: std::mem::take(&mut self.held),
        };
        match reply.send(parked) {
            Ok(()) => {
                self.takeover = None;
                true
            }
            Err(p) => {
                p.rx.user_bytes().charge(charged as usize);
                self.charged = charged;
                self.phase = Phase::Bound(p.handle);
                self.rx = Some(p.rx);
                self.sm = Some(p.sm);
                self.held = p.held;
                false
            }
        }
    }

    /// XEP-0198 §5: the connection is gone; the session stays routable and
    /// keeps queueing (presence and chat states collapsed per sender) until
    /// it is resumed or the resumption timeout passes. Presence stays as it
    /// was meanwhile. What it holds is bounded (`has_room`): past that
    /// it stops taking stanzas from its queue, the queue fills and refuses
    /// the next one, and from then on messages for it go to offline storage
    /// — in order, after what it holds (`offline::resumed` delivers them
    /// after a resumption; `teardown` requeues what it held before them).
    async fn park(&mut self) {
        let Some(h) = self.bound() else { return };
        let secs = self.sm.as_ref().map_or(0, |s| s.max);
        let deadline = Instant::now() + Duration::from_secs(secs);
        let shutdown = self.state.shutdown.clone();
        tracing::info!(jid = %h.jid, secs, "connection lost; session waits for resumption");
        if let Some(sm) = self.sm.as_mut() {
            sm.ack_deadline = None;
            sm.ack_due = None;
            // Taken from the queue before what comes next: kept in order.
            for el in sm.take_unsent() {
                sm.record(el, false);
            }
        }
        self.release_at = None;
        if let Some(rx) = &self.rx {
            rx.release();
        }
        loop {
            self.sync_bytes();
            let room = self.sm.as_ref().is_some_and(|sm| {
                self.has_room(
                    sm.unacked.len() + self.held.len(),
                    sm.bytes + self.held.bytes(),
                )
            });
            let (Some((_, takeover)), Some(rx)) = (self.takeover.as_mut(), self.rx.as_mut()) else {
                break;
            };
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                req = takeover.recv() => {
                    let Some(reply) = req else { break };
                    if self.hand_over(reply) {
                        return;
                    }
                }
                d = rx.recv(false), if room => {
                    let Some(Deliver::Stanza(el)) = d else { break };
                    let mut now = Vec::new();
                    self.held.filter(el, true, &mut now);
                    let sm = self.sm.as_mut().expect("resumable");
                    for el in now {
                        sm.record(el, false);
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {
                    tracing::info!(jid = %h.jid, "session not resumed in time");
                    break;
                }
            }
        }
        Box::pin(self.teardown()).await;
    }

    /// The session ends: it leaves routing, what it was given and did not
    /// deliver goes to `modules::offline::requeue` (`give_back`), then the
    /// modules see it close (unavailable presence) and it is unbound.
    async fn teardown(&mut self) {
        self.give_back().await;
        let Some(h) = self.bound() else { return };
        let cx = Cx {
            state: &self.state,
            session: &h,
        };
        self.state
            .modules
            .emit(&self.state, Some(cx.session), &modules::Event::Closed)
            .await;
        self.state.metrics.session_closed(h.id);
        self.state.router.unbind(&h);
    }

    /// The session leaves routing and requeues everything it was given and
    /// did not deliver, in acceptance order (again: nothing, when done).
    async fn give_back(&mut self) {
        let Some(h) = self.bound() else { return };
        h.mark_closing();
        let mut undelivered = Vec::new();
        if let Some(sm) = self.sm.as_mut() {
            if let (Some(id), Some((tx, _))) = (&sm.id, &self.takeover) {
                self.state.router.resumable.remove(id, tx, sm.handled);
            }
            undelivered.extend(sm.take_all());
        }
        self.takeover = None;
        undelivered.extend(std::mem::take(&mut self.inflight).into_vec());
        undelivered.extend(self.held.take_all());
        if let Some(rx) = self.rx.as_mut() {
            rx.close();
            while let Some(d) = rx.try_recv() {
                if let Deliver::Stanza(el) = d {
                    undelivered.push(el);
                }
            }
        }
        self.sync_bytes();
        let freed: usize = undelivered.iter().map(Outbound::size).sum();
        self.state.router.note_freed(freed);
        if !undelivered.is_empty() {
            tracing::debug!(jid = %h.jid, n = undelivered.len(), "requeueing undelivered stanzas");
            self.state.router.count_requeued(undelivered.len());
            self.state
                .modules
                .api::<dyn modules::api::OfflineQueue>()
                .requeue(&self.state, undelivered)
                .await;
        }
    }
}

fn shutting_down() -> End {
    End::Error(StreamError::new(StreamCondition::SystemShutdown))
}

fn is_message(el: &Element) -> bool {
    el.ns == NS_CLIENT && el.name == "message"
}

fn decode_sasl(text: &str) -> Result<Vec<u8>, SaslError> {
    let text = text.trim();
    // RFC 6120 §6.4.2: "=" is an empty initial response.
    if text.is_empty() || text == "=" {
        return Ok(Vec::new());
    }
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|_| SaslError::MalformedRequest("invalid base64".into()))
}

/// Rough byte size of a stanza for the rate limit (serializing it exactly
/// would cost more than the limit is worth).
fn approx_size(el: &Element) -> usize {
    let mut n = el.name.len() * 2 + 5;
    for (k, v) in &el.attrs {
        n += k.len() + v.len() + 4;
    }
    for c in &el.children {
        n += match c {
            natter_xml::Node::Element(e) => approx_size(e),
            natter_xml::Node::Text(t) => t.len(),
        };
    }
    n
}
