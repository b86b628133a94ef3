//! A session's inbound queue: bounded, and free when empty. tokio's mpsc
//! allocates a 32-slot block per channel up front (~4 KiB of `Deliver`s
//! per idle session); an empty `VecDeque` allocates nothing, a drained
//! burst's buffer shrinks, and an idle session gives it all back
//! (`release`). There is one receiver, so it waits with a plain waker
//! kept under the queue's lock (no `Notify` and its waiter node in every
//! idle session). A refused push flags the queue as overflowed, which the
//! receiver sees first.

use super::Deliver;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};

/// Capacity kept after draining; bigger buffers are released.
const KEEP_CAPACITY: usize = 8;

struct Inner {
    items: VecDeque<Deliver>,
    /// The receiver waiting for a push.
    waker: Option<Waker>,
    closed: bool,
    overflowed: bool,
    shutdown: bool,
}

struct Shared {
    inner: Mutex<Inner>,
    cap: usize,
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

pub fn queue(cap: usize) -> (QueueTx, QueueRx) {
    let shared = Arc::new(Shared {
        inner: Mutex::new(Inner {
            items: VecDeque::new(),
            waker: None,
            closed: false,
            overflowed: false,
            shutdown: false,
        }),
        cap: cap.max(1),
    });
    (QueueTx(shared.clone()), QueueRx(shared))
}

impl QueueTx {
    pub fn try_send(&self, d: Deliver) -> Result<(), PushError> {
        let mut inner = self.0.inner.lock().unwrap();
        if inner.closed {
            return Err(PushError::Closed);
        }
        if inner.items.len() >= self.0.cap {
            return Err(PushError::Full);
        }
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
        let mut inner = self.0.inner.lock().unwrap();
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
        let mut inner = self.0.inner.lock().unwrap();
        inner.shutdown = true;
        let waker = inner.waker.take();
        drop(inner);
        if let Some(w) = waker {
            w.wake();
        }
    }

    pub fn len(&self) -> usize {
        self.0.inner.lock().unwrap().items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl QueueRx {
    pub fn try_recv(&mut self) -> Option<Deliver> {
        Self::pop(&mut self.0.inner.lock().unwrap())
    }

    fn pop(inner: &mut Inner) -> Option<Deliver> {
        let d = inner.items.pop_front();
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
            let mut inner = self.0.inner.lock().unwrap();
            if signals && inner.shutdown {
                return Poll::Ready(Some(Deliver::Shutdown));
            }
            if signals && inner.overflowed {
                return Poll::Ready(Some(Deliver::Overflow));
            }
            if let Some(d) = Self::pop(&mut inner) {
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

    pub fn overflowed(&self) -> bool {
        self.0.inner.lock().unwrap().overflowed
    }

    pub fn shutting_down(&self) -> bool {
        self.0.inner.lock().unwrap().shutdown
    }

    /// The session is idle: give the buffer back if nothing is queued.
    pub fn release(&self) {
        let mut inner = self.0.inner.lock().unwrap();
        if inner.items.is_empty() {
            inner.items = VecDeque::new();
        }
    }

    /// Refuse further pushes; what is queued can still be taken.
    pub fn close(&mut self) {
        let mut inner = self.0.inner.lock().unwrap();
        inner.closed = true;
        inner.waker = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use natter_xml::Element;

    fn st(n: &str) -> Deliver {
        Deliver::Stanza(Element::new(n, "jabber:client"))
    }

    #[tokio::test]
    async fn bounded_ordered_and_closable() {
        let (tx, mut rx) = queue(2);
        tx.try_send(st("a")).unwrap();
        tx.try_send(st("b")).unwrap();
        assert_eq!(tx.try_send(st("c")), Err(PushError::Full));
        assert!(matches!(rx.recv(true).await, Some(Deliver::Stanza(e)) if e.name == "a"));
        assert!(matches!(rx.try_recv(), Some(Deliver::Stanza(e)) if e.name == "b"));
        assert!(rx.try_recv().is_none());
        rx.close();
        assert_eq!(tx.try_send(st("d")), Err(PushError::Closed));
        assert!(rx.recv(true).await.is_none());
    }

    #[tokio::test]
    async fn wakes_a_waiting_receiver_and_releases_memory() {
        let (tx, mut rx) = queue(1000);
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
        assert!(rx.0.inner.lock().unwrap().items.capacity() <= KEEP_CAPACITY);
        tx.try_send(st("m")).unwrap();
        rx.release();
        assert_eq!(rx.0.inner.lock().unwrap().items.len(), 1);
        let mut rx = rx;
        rx.try_recv().unwrap();
        rx.release();
        assert_eq!(rx.0.inner.lock().unwrap().items.capacity(), 0);
    }

    #[tokio::test]
    async fn overflow_comes_first_and_stays() {
        let (tx, mut rx) = queue(1);
        tx.try_send(st("a")).unwrap();
        assert_eq!(tx.try_send(st("b")), Err(PushError::Full));
        assert!(tx.overflow());
        assert!(!tx.overflow());
        assert!(matches!(rx.recv(true).await, Some(Deliver::Overflow)));
        assert!(matches!(rx.recv(true).await, Some(Deliver::Overflow)));
        assert!(rx.overflowed());
        // Without asking for it, items still come.
        assert!(matches!(rx.recv(false).await, Some(Deliver::Stanza(e)) if e.name == "a"));
        tx.shutdown();
        assert!(matches!(rx.recv(true).await, Some(Deliver::Shutdown)));
        assert!(rx.shutting_down());
    }
}
