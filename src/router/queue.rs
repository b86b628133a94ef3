//! A session's inbound queue: bounded, and free when empty. tokio's mpsc
//! allocates a 32-slot block per channel up front (~4 KiB of `Deliver`s
//! per idle session); an empty `VecDeque` allocates nothing, and the
//! buffer is given back once a burst has drained.

use super::Deliver;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

/// Capacity kept after draining; bigger buffers are released.
const KEEP_CAPACITY: usize = 8;

struct Inner {
    items: VecDeque<Deliver>,
    closed: bool,
}

struct Shared {
    inner: Mutex<Inner>,
    ready: Notify,
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
            closed: false,
        }),
        ready: Notify::new(),
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
        drop(inner);
        self.0.ready.notify_one();
        Ok(())
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
        Self::pop(&self.0)
    }

    fn pop(shared: &Shared) -> Option<Deliver> {
        let mut inner = shared.inner.lock().unwrap();
        let d = inner.items.pop_front();
        if inner.items.is_empty() && inner.items.capacity() > KEEP_CAPACITY {
            inner.items.shrink_to(KEEP_CAPACITY);
        }
        d
    }

    /// Wait for the next item. Cancel-safe: an item is only taken when
    /// this returns it. Returns None once closed and drained.
    pub async fn recv(&mut self) -> Option<Deliver> {
        let shared = self.0.clone();
        loop {
            let notified = shared.ready.notified();
            tokio::pin!(notified);
            // Register before looking, so a push in between still wakes us.
            notified.as_mut().enable();
            if let Some(d) = Self::pop(&shared) {
                return Some(d);
            }
            if shared.inner.lock().unwrap().closed {
                return None;
            }
            notified.await;
        }
    }

    /// Refuse further pushes; what is queued can still be taken.
    pub fn close(&mut self) {
        self.0.inner.lock().unwrap().closed = true;
        self.0.ready.notify_one();
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
        assert!(matches!(rx.recv().await, Some(Deliver::Stanza(e)) if e.name == "a"));
        assert!(matches!(rx.try_recv(), Some(Deliver::Stanza(e)) if e.name == "b"));
        assert!(rx.try_recv().is_none());
        rx.close();
        assert_eq!(tx.try_send(st("d")), Err(PushError::Closed));
        assert!(rx.recv().await.is_none());
    }

    #[tokio::test]
    async fn wakes_a_waiting_receiver_and_releases_memory() {
        let (tx, mut rx) = queue(1000);
        let waiter = tokio::spawn(async move {
            let mut n = 0;
            while n < 500 {
                rx.recv().await.unwrap();
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
    }
}
