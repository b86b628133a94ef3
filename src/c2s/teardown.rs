//! The session's end: closing the stream, parking a resumable session,
//! handing it to a resuming connection, and giving back (requeueing)
//! everything it was given and did not deliver.

use super::*;

impl Session {
    /// The connection ended: close the stream, then end the session — or,
    /// when a resumable session's connection was lost, keep the session
    /// (without the connection) until it is resumed or times out.
    pub(super) async fn finish<T: Transport>(&mut self, mut t: T, conn: ConnectionGuard, end: End) {
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
        self.neg = None;
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
    pub(super) fn hand_over(&mut self, reply: sm::Takeover) -> bool {
        let (Phase::Bound(handle), Some(rx), Some(sm)) = (
            std::mem::replace(&mut self.phase, Phase::Ended),
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
        let unacked: Vec<_> = self.sm.as_ref().map_or_else(Vec::new, |sm| {
            sm.unacked
                .iter()
                .chain(&sm.unsent)
                .filter(|o| o.is_message())
                .filter_map(|o| o.to_element())
                .collect()
        });
        let ev = modules::Event::Parked { unacked: &unacked };
        self.state.modules.emit(&self.state, Some(&h), &ev).await;
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
    /// deliver goes to `api::OfflineQueue::requeue` (`give_back`), then the
    /// modules see it close (unavailable presence) and it is unbound.
    pub(super) async fn teardown(&mut self) {
        self.give_back().await;
        if let Some(leave) = self.leave() {
            leave.run().await;
        }
    }

    /// The session leaves routing and requeues everything it was given and
    /// did not deliver, in acceptance order (again: nothing, when done).
    async fn give_back(&mut self) {
        let undelivered = self.take_undelivered();
        if !undelivered.is_empty() {
            requeue(&self.state, undelivered).await;
        }
    }

    /// Everything the session was given and did not deliver, taken out of
    /// it, in acceptance order; the session is marked closing first, so
    /// nothing is routed to it any more, and its queue refuses pushes.
    fn take_undelivered(&mut self) -> Vec<Outbound> {
        let Some(h) = self.bound() else {
            return Vec::new();
        };
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
        }
        undelivered
    }

    /// The session stops being bound; whoever gets the `Leave` takes it
    /// out of the router (once).
    fn leave(&mut self) -> Option<Leave> {
        match std::mem::replace(&mut self.phase, Phase::Ended) {
            Phase::Bound(handle) => Some(Leave {
                state: self.state.clone(),
                handle,
            }),
            other => {
                self.phase = other;
                None
            }
        }
    }

    /// The drop guard (`Session`'s `Drop`): a session dropped while still
    /// bound — a panic that escaped the catch in `negotiate` and
    /// `on_wake_caught`,
    /// or its task dropped — would otherwise stay routable with what it
    /// held lost. It ends like `teardown`: leaves routing now, and a
    /// tracked task (which `Running::shutdown` waits for) requeues what it
    /// held and then lets the modules see it close.
    fn abandon(&mut self) {
        let undelivered = self.take_undelivered();
        let Some(leave) = self.leave() else { return };
        tracing::warn!(jid = %leave.handle.jid, n = undelivered.len(), "session ended abnormally");
        let state = self.state.clone();
        let end = async move {
            if !undelivered.is_empty() {
                requeue(&state, undelivered).await;
            }
            leave.run().await;
        };
        // Outside a runtime (never, while the server runs) the future is
        // dropped unrun: its `Leave` still unbinds the session.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            self.state.tasks.spawn_on(end, &rt);
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.abandon();
        // Whatever ends the task (a panic too), the user's quota gets the
        // bytes back.
        if let Some(rx) = &self.rx {
            rx.user_bytes().discharge(self.charged as usize);
        }
    }
}

/// Hand what an ending session did not deliver to the offline queue.
async fn requeue(state: &ServerState, undelivered: Vec<Outbound>) {
    state
        .modules
        .api::<dyn modules::api::OfflineQueue>()
        .requeue(state, undelivered)
        .await;
}

/// A bound session's exit from the router, done exactly once however the
/// session ends: `run` lets the modules see it close (unavailable
/// presence, last activity), and dropping it — after `run`, or instead of
/// it when a panic cut that short — unbinds the session.
struct Leave {
    state: ServerState,
    handle: Arc<SessionHandle>,
}

impl Leave {
    async fn run(self) {
        let closed = modules::Event::Closed;
        self.state
            .modules
            .emit(&self.state, Some(&self.handle), &closed)
            .await;
    }
}

impl Drop for Leave {
    fn drop(&mut self) {
        self.handle.mark_closing();
        self.state.metrics.session_closed(self.handle.id);
        self.state.router.unbind(&self.handle);
    }
}
