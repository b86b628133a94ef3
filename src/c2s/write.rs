//! Writing to a bound client: SM accounting, ack requests, tracked writes
//! (what did not reach the socket stays requeueable).

use super::bound::ACK_IDLE;
use super::*;

/// `f`'s output, or None once `limit` has passed (`tokio::time::timeout`).
/// The timer is made only when the first poll is pending: nearly every
/// write completes at once, and making a timer reads the clock and the
/// runtime's handle, for every stanza written.
async fn within<F: std::future::Future>(limit: Duration, f: F) -> Option<F::Output> {
    let mut f = std::pin::pin!(f);
    match std::future::poll_fn(|cx| std::task::Poll::Ready(f.as_mut().poll(cx))).await {
        std::task::Poll::Ready(out) => Some(out),
        std::task::Poll::Pending => tokio::time::timeout(limit, f).await.ok(),
    }
}

impl Session {
    /// Write stanzas to the client (after the CSI filter). With stream
    /// management each is counted and kept until acknowledged, and an ack
    /// is requested every `sm::REQUEST_EVERY` stanzas; past `c2s.max_unacked`
    /// stanzas or `c2s.max_queue_bytes` bytes unacknowledged the rest waits
    /// (`Sm::unsent`) for acks, and nothing more is taken from the queue
    /// meanwhile (`awaiting_acks`): back-pressure, not an error.
    pub(super) async fn write<T: Transport>(
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
    pub(super) fn keep_undelivered(&mut self, delivered: usize) {
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
        let r = within(timeout, t.send(&self.inflight)).await;
        if matches!(r, Some(Ok(()))) {
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
    pub(super) async fn send_raw<T: Transport>(
        &mut self,
        t: &mut T,
        els: &[Element],
    ) -> Result<(), End> {
        let out: Vec<_> = els.iter().map(|e| Outbound::new(e, 0)).collect();
        self.send_out(t, &out).await
    }

    pub(super) async fn send_out<T: Transport>(
        &mut self,
        t: &mut T,
        out: &[Outbound],
    ) -> Result<(), End> {
        // What waits on this write counts against the user's quota now.
        self.sync_bytes();
        let timeout = Duration::from_secs(self.cfg().c2s.write_timeout_secs);
        match within(timeout, t.send(out)).await {
            Some(Ok(())) => Ok(()),
            // The peer is gone, or stopped reading: nothing more can be
            // written to this stream.
            Some(Err(_)) | None => {
                self.write_broken = true;
                Err(End::Lost(None))
            }
        }
    }

    /// An `<r/>` goes out now: the client must answer within the ping timeout.
    pub(super) fn requested(&mut self) {
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

    pub(super) async fn request_ack<T: Transport>(&mut self, t: &mut T) -> Result<(), End> {
        self.requested();
        self.send_raw(t, &[sm::r()]).await
    }

    /// Stanzas written without an ack request: ask once the stream is idle.
    pub(super) fn schedule_ack(&mut self) {
        if let Some(sm) = self.sm.as_mut() {
            if sm.unrequested > 0 && sm.requests == 0 && sm.ack_due.is_none() {
                sm.ack_due = Some(Instant::now() + ACK_IDLE);
            }
        }
    }
}
