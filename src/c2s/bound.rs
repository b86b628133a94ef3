//! The bound loop: what an idle session waits on (takeover, queue,
//! socket, timer), each wake-up's handling, heartbeat, acks due, queue
//! intake, idle release, and the user's byte quota.

use super::*;

/// Written stanzas wait this long for more before the server asks for an
/// ack (XEP-0198), unless `sm::REQUEST_EVERY` of them already did.
pub(super) const ACK_IDLE: Duration = Duration::from_secs(2);

/// Stanzas taken off the queue for one write stop at this many bytes (what
/// a write holds is outside the queue's bound while it waits).
const BATCH_BYTES: usize = 128 * 1024;

/// A bound session quiet this long gives back its buffers (parser, queue).
const IDLE_RELEASE: Duration = Duration::from_secs(1);

/// What woke the bound loop.
enum Wake {
    Takeover(sm::Takeover),
    Queue(Option<Deliver>),
    Read(Result<Vec<StreamEvent>, ReadError>),
    Timer,
}

/// What the session waits on: a takeover, its queue, the socket, its
/// timer. (A macro, not an `async fn`: inlined in `bound_loop`, it adds
/// nothing to what an idle session holds.) `$shutdown` leaves when the
/// server shuts down.
macro_rules! next_wake {
    ($s:ident, $t:ident, $shutdown:expr) => {
        loop {
            // A session bound after `Router::shutdown` went through the
            // table sees the token instead.
            if $s.state.shutdown.is_cancelled() {
                $shutdown;
            }
            let timer = $s.next_timer();
            let full = $s.awaiting_acks();
            break tokio::select! {
                biased;
                req = async { match $s.takeover.as_mut() { Some((_, rx)) => rx.recv().await, None => std::future::pending().await } } => {
                    match req {
                        Some(reply) => Wake::Takeover(reply),
                        None => continue,
                    }
                }
                d = async { match $s.rx.as_mut() { Some(rx) if full => Some(rx.signal().await), Some(rx) => rx.recv(true).await, None => std::future::pending().await } } => Wake::Queue(d),
                r = $t.read() => Wake::Read(r),
                _ = tokio::time::sleep_until(timer) => Wake::Timer,
            };
        }
    };
}

impl Session {
    /// A bound session, until its connection or the session ends. This
    /// loop's waits are what an idle session holds: keep them few and
    /// small. What runs on a wake-up is boxed, and the box is kept for the
    /// wake-ups after it until the session is idle (`while_busy`). (Not an
    /// `async fn`, whose arguments would be stored twice.)
    #[allow(clippy::manual_async_fn)]
    pub(super) fn bound_loop<'a, T: Transport>(
        &'a mut self,
        t: &'a mut T,
    ) -> impl std::future::Future<Output = End> + Send + 'a {
        async move {
            loop {
                let w = next_wake!(self, t, return shutting_down());
                if let Err(end) = Box::pin(self.while_busy(t, w)).await {
                    return end;
                }
            }
        }
    }

    /// A wake-up and the ones after it, in one allocation, until the
    /// session gives back its buffers (`release`, `IDLE_RELEASE` after the
    /// last activity): a busy session does not allocate its handler's
    /// state (a few KiB, past the allocator's small-size caches) on every
    /// wake-up, and an idle one holds none of it.
    async fn while_busy<T: Transport>(&mut self, t: &mut T, mut w: Wake) -> Result<(), End> {
        loop {
            let r = self.on_wake_caught(t, w).await;
            self.sync_bytes();
            r?;
            if self.release_at.is_none() {
                return Ok(());
            }
            w = next_wake!(self, t, return Err(shutting_down()));
        }
    }

    /// `on_wake`, with a handler's panic caught: the session's own state
    /// is intact (the panic unwound only the handler), so it ends as after
    /// an internal error and the ordinary teardown requeues what it held.
    /// (Caught in here so the catch lives in the boxed future, not in the
    /// long-lived loop.)
    async fn on_wake_caught<T: Transport>(&mut self, t: &mut T, wake: Wake) -> Result<(), End> {
        match AssertUnwindSafe(self.on_wake(t, wake)).catch_unwind().await {
            Ok(r) => r,
            Err(panic) => Err(panicked(panic)),
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
    pub(super) fn overflowed(&mut self) -> End {
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
    pub(super) fn sync_bytes(&mut self) {
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
    pub(super) fn has_room(&self, items: usize, bytes: usize) -> bool {
        let c2s = &self.cfg().c2s;
        items < c2s.max_unacked && bytes < c2s.max_queue_bytes
    }

    /// Stream management is waiting for acks: nothing more is taken from
    /// the queue until some come (back-pressure; a client that never acks
    /// is found by its unanswered `<r/>`, or its queue overflows).
    pub(super) fn awaiting_acks(&self) -> bool {
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

    pub(super) fn heartbeat(&self) -> Instant {
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
    pub(super) fn busy(&mut self) {
        self.release_at = Some(Instant::now() + IDLE_RELEASE);
    }

    /// Idle for `IDLE_RELEASE`: give back what the last burst grew (parser,
    /// queue, SM queue); the next one allocates them again.
    pub(super) fn release<T: Transport>(&mut self, t: &mut T) {
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
}
