//! A session's inbound queue: bounded in stanzas and in bytes (its own,
//! and its user's across all of the user's sessions), and free when empty. tokio's mpsc
//! allocates a 32-slot block per channel up front (~4 KiB of `Deliver`s
//! per idle session); an empty `VecDeque` allocates nothing, a drained
//! burst's buffer shrinks, and an idle session gives it all back
//! (`release`). There is one receiver, so it waits with a plain waker
//! kept under the queue's lock (no `Notify` and its waiter node in every
//! idle session). A refused push flags the queue as overflowed, which the
//! receiver sees first; once flagged it refuses every later push, so
//! nothing routed after a refused stanza can overtake it (the refused one
//! went to offline storage; so do the later ones).
//!
//! Bytes are `Outbound::size`, the serialized size: what a queued stanza
//! really costs. The user's counter is shared by all of the user's
//! sessions and also carries what each session holds past the queue
//! (unacked and held-back stanzas, `UserBytes::charge`).

use super::Deliver;
#[cfg(test)]
use super::Outbound;
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Poll, Waker};

/// Capacity kept after draining; bigger buffers are released.
const KEEP_CAPACITY: usize = 8;

struct Inner {
    items: VecDeque<Deliver>,
    /// `Outbound::size` of the queued stanzas.
    bytes: usize,
    /// The receiver waiting for a push.
    waker: Option<Waker>,
    closed: bool,
    overflowed: bool,
    shutdown: bool,
}

struct Shared {
    inner: Mutex<Inner>,
    limits: QueueLimits,
    user: UserBytes,
}

/// A session queue's bounds.
#[derive(Clone, Copy, Debug)]
pub struct QueueLimits {
    /// Stanzas.
    pub items: usize,
    /// Bytes of this session's queue.
    pub bytes: usize,
    /// Bytes of all of its user's sessions (queues, unacked, held).
    pub user_bytes: usize,
}

/// Bytes held for one user's sessions, shared by them.
#[derive(Clone, Debug, Default)]
pub struct UserBytes(Arc<AtomicUsize>);

impl UserBytes {
    pub fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
    /// A session holds `n` more bytes for its client (unacked, held).
    pub fn charge(&self, n: usize) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn discharge(&self, n: usize) {
        self.0.fetch_sub(n, Ordering::Relaxed);
    }
    /// Whether two sessions share a counter (same user).
    pub fn same(&self, other: &UserBytes) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // What was never taken off no longer counts against the user.
        let bytes = self.inner.get_mut().bytes;
        self.user.discharge(bytes);
    }
}

/// Why a push failed (the item is dropped; callers route it elsewhere).
#[derive(Debug, PartialEq, Eq)]
pub enum PushError {
    Full,
    Closed,
}

/// The routing side (held by the `SessionHandle`).
#[derive(Clone)]
pub struct QueueTx(Arc<Shared>);

/// The session side.
pub struct QueueRx(Arc<Shared>);

fn size(d: &Deliver) -> usize {
    match d {
        Deliver::Stanza(o) => o.size(),
        _ => 0,
    }
}

pub fn queue(limits: QueueLimits, user: UserBytes) -> (QueueTx, QueueRx) {
    let shared = Arc::new(Shared {
        inner: Mutex::new(Inner {
            items: VecDeque::new(),
            bytes: 0,
            waker: None,
            closed: false,
            overflowed: false,
            shutdown: false,
        }),
        limits: QueueLimits {
            items: limits.items.max(1),
            ..limits
        },
        user,
    });
    (QueueTx(shared.clone()), QueueRx(shared))
}

impl QueueTx {
    pub fn try_send(&self, d: Deliver) -> Result<(), PushError> {
        let mut inner = self.0.inner.lock();
        if inner.closed {
            return Err(PushError::Closed);
        }
        let n = size(&d);
        let l = &self.0.limits;
        // One stanza always fits an empty queue (it is bounded by the
        // stanza size limit); a signal (close) always fits, also after an
        // overflow (a parked session must still hear `conflict`).
        let full = n > 0
            && (inner.overflowed
                || inner.items.len() >= l.items
                || (!inner.items.is_empty()
                    && (inner.bytes + n > l.bytes || self.0.user.get() + n > l.user_bytes)));
        if full {
            return Err(PushError::Full);
        }
        inner.bytes += n;
        self.0.user.charge(n);
        inner.items.push_back(d);
        let waker = inner.waker.take();
        drop(inner);
        if let Some(w) = waker {
            w.wake();
        }
        Ok(())
    }

    /// Flag the queue as overflowed (the session will close itself) and wake
    /// the receiver. True the first time.
    pub fn overflow(&self) -> bool {
        let mut inner = self.0.inner.lock();
        let first = !std::mem::replace(&mut inner.overflowed, true);
        let waker = inner.waker.take();
        drop(inner);
        if let Some(w) = waker {
            w.wake();
        }
        first
    }

    /// The server is shutting down: the session closes its stream (the
    /// receiver sees this before anything else).
    pub fn shutdown(&self) {
        let mut inner = self.0.inner.lock();
        inner.shutdown = true;
        let waker = inner.waker.take();
        drop(inner);
        if let Some(w) = waker {
            w.wake();
        }
    }

    pub fn len(&self) -> usize {
        self.0.inner.lock().items.len()
    }

    /// Bytes queued.
    pub fn bytes(&self) -> usize {
        self.0.inner.lock().bytes
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn overflowed(&self) -> bool {
        self.0.inner.lock().overflowed
    }

    pub fn limits(&self) -> QueueLimits {
        self.0.limits
    }

    pub fn user_bytes(&self) -> &UserBytes {
        &self.0.user
    }
}

impl QueueRx {
    pub fn try_recv(&mut self) -> Option<Deliver> {
        self.pop(&mut self.0.inner.lock())
    }

    fn pop(&self, inner: &mut Inner) -> Option<Deliver> {
        let d = inner.items.pop_front();
        if let Some(d) = &d {
            let n = size(d);
            inner.bytes -= n;
            self.0.user.discharge(n);
        }
        if inner.items.is_empty() && inner.items.capacity() > KEEP_CAPACITY {
            inner.items.shrink_to(KEEP_CAPACITY);
        }
        d
    }

    /// Wait for the next item; with `signals`, `Deliver::Shutdown` and then
    /// `Deliver::Overflow` come first once flagged. Cancel-safe: an item is
    /// only taken when this returns it. Returns None once closed and drained.
    pub fn recv(
        &mut self,
        signals: bool,
    ) -> impl std::future::Future<Output = Option<Deliver>> + Send + '_ {
        std::future::poll_fn(move |cx| {
            let mut inner = self.0.inner.lock();
            if signals && inner.shutdown {
                return Poll::Ready(Some(Deliver::Shutdown));
            }
            if signals && inner.overflowed {
                return Poll::Ready(Some(Deliver::Overflow));
            }
            if let Some(d) = self.pop(&mut inner) {
                return Poll::Ready(Some(d));
            }
            if inner.closed {
                return Poll::Ready(None);
            }
            match &mut inner.waker {
                Some(w) => w.clone_from(cx.waker()),
                None => inner.waker = Some(cx.waker().clone()),
            }
            Poll::Pending
        })
    }

    /// Wait for `Deliver::Shutdown` or `Deliver::Overflow` only, leaving
    /// items queued (the session has no room for them now).
    pub fn signal(&mut self) -> impl std::future::Future<Output = Deliver> + Send + '_ {
        std::future::poll_fn(move |cx| {
            let mut inner = self.0.inner.lock();
            if inner.shutdown {
                return Poll::Ready(Deliver::Shutdown);
            }
            if inner.overflowed {
                return Poll::Ready(Deliver::Overflow);
            }
            match &mut inner.waker {
                Some(w) => w.clone_from(cx.waker()),
                None => inner.waker = Some(cx.waker().clone()),
            }
            Poll::Pending
        })
    }

    pub fn overflowed(&self) -> bool {
        self.0.inner.lock().overflowed
    }

    pub fn shutting_down(&self) -> bool {
        self.0.inner.lock().shutdown
    }

    /// Accept pushes again after an overflow: the session was resumed and
    /// catches up on what went to offline storage meanwhile.
    pub fn clear_overflow(&self) {
        self.0.inner.lock().overflowed = false;
    }

    /// The counter of this session's user.
    pub fn user_bytes(&self) -> &UserBytes {
        &self.0.user
    }

    pub fn limits(&self) -> QueueLimits {
        self.0.limits
    }

    /// The session is idle: give the buffer back if nothing is queued.
    pub fn release(&self) {
        let mut inner = self.0.inner.lock();
        if inner.items.is_empty() {
            inner.items = VecDeque::new();
        }
    }

    /// Refuse further pushes; what is queued can still be taken.
    pub fn close(&mut self) {
        let mut inner = self.0.inner.lock();
        inner.closed = true;
        inner.waker = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use natter_xml::Element;

    fn st(n: &str) -> Deliver {
        Deliver::Stanza(Outbound::new(&Element::new(n, "jabber:client"), 0))
    }

    fn items(n: usize) -> QueueLimits {
        QueueLimits {
            items: n,
            bytes: usize::MAX / 4,
            user_bytes: usize::MAX / 4,
        }
    }

    fn name(d: Option<Deliver>) -> String {
        match d {
            Some(Deliver::Stanza(o)) => o.to_element().unwrap().name,
            other => format!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn bounded_ordered_and_closable() {
        let (tx, mut rx) = queue(items(2), UserBytes::default());
        tx.try_send(st("a")).unwrap();
        tx.try_send(st("b")).unwrap();
        assert_eq!(tx.try_send(st("c")), Err(PushError::Full));
        assert_eq!(name(rx.recv(true).await), "a");
        assert_eq!(name(rx.try_recv()), "b");
        assert!(rx.try_recv().is_none());
        rx.close();
        assert_eq!(tx.try_send(st("d")), Err(PushError::Closed));
        assert!(rx.recv(true).await.is_none());
    }

    #[tokio::test]
    async fn wakes_a_waiting_receiver_and_releases_memory() {
        let (tx, mut rx) = queue(items(1000), UserBytes::default());
        let waiter = tokio::spawn(async move {
            let mut n = 0;
            while n < 500 {
                rx.recv(true).await.unwrap();
                n += 1;
            }
            rx
        });
        for _ in 0..500 {
            while tx.try_send(st("m")).is_err() {
                tokio::task::yield_now().await;
            }
        }
        let rx = waiter.await.unwrap();
        assert!(rx.0.inner.lock().items.capacity() <= KEEP_CAPACITY);
        tx.try_send(st("m")).unwrap();
        rx.release();
        assert_eq!(rx.0.inner.lock().items.len(), 1);
        let mut rx = rx;
        rx.try_recv().unwrap();
        rx.release();
        assert_eq!(rx.0.inner.lock().items.capacity(), 0);
    }

    #[tokio::test]
    async fn overflow_comes_first_and_stays() {
        let (tx, mut rx) = queue(items(1), UserBytes::default());
        tx.try_send(st("a")).unwrap();
        assert_eq!(tx.try_send(st("b")), Err(PushError::Full));
        assert!(tx.overflow());
        assert!(!tx.overflow());
        assert!(matches!(rx.recv(true).await, Some(Deliver::Overflow)));
        assert!(matches!(rx.recv(true).await, Some(Deliver::Overflow)));
        assert!(rx.overflowed());
        // Without asking for it, items still come.
        assert_eq!(name(rx.recv(false).await), "a");
        // Room again, but nothing may overtake what was refused.
        assert_eq!(tx.try_send(st("c")), Err(PushError::Full));
        rx.clear_overflow();
        tx.try_send(st("c")).unwrap();
        tx.shutdown();
        assert!(matches!(rx.recv(true).await, Some(Deliver::Shutdown)));
        assert!(rx.shutting_down());
    }

    #[test]
    fn queue_is_bounded_in_bytes_and_per_user() {
        let big = |n: usize| {
            let el = Element::new("message", "jabber:client")
                .with_child(Element::new("body", "jabber:client").with_text("x".repeat(n)));
            Deliver::Stanza(Outbound::new(&el, 0))
        };
        let user = UserBytes::default();
        let limits = QueueLimits {
            items: 1000,
            bytes: 10_000,
            user_bytes: 15_000,
        };
        let (tx1, rx1) = queue(limits, user.clone());
        let (tx2, mut rx2) = queue(limits, user.clone());
        // Alone, a stanza over the byte bound still fits.
        tx1.try_send(big(20_000)).unwrap();
        assert_eq!(tx1.try_send(big(10)), Err(PushError::Full));
        assert!(user.get() > 20_000);
        // The user's other session is over the user's quota now; an
        // empty queue still takes one.
        tx2.try_send(big(100)).unwrap();
        assert_eq!(tx2.try_send(big(100)), Err(PushError::Full));
        rx2.try_recv().unwrap();
        drop((tx1, rx1));
        assert!(user.get() < 1_000, "{}", user.get());
        tx2.try_send(big(5_000)).unwrap();
        tx2.try_send(big(4_000)).unwrap();
        assert_eq!(tx2.try_send(big(2_000)), Err(PushError::Full));
        assert_eq!(tx2.bytes(), user.get());
    }
}
