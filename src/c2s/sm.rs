//! XEP-0198 Stream Management (urn:xmpp:sm:3): stanza acknowledgements and
//! stream resumption; and the XEP-0352 Client State Indication hold-back
//! queue. The session loop in `mod.rs` drives these; this file holds the
//! state and the registry of resumable sessions.
//!
//! Invariants:
//! - `Sm::handled` counts client stanzas whose `modules::dispatch` returned
//!   (dispatch awaits durable writes, so an ack means durable);
//! - every stanza written to a stream-managed client stays in `unacked`
//!   until acknowledged; on the session's end what is left is resent on
//!   resumption or handed to `api::OfflineQueue::requeue`, never dropped;
//! - the unacked queue and the CSI hold-back queue are bounded, in
//!   stanzas (`c2s.max_unacked`) and in bytes (`c2s.max_queue_bytes`): a
//!   connected session past them is treated as a dead connection (parked
//!   when resumable, ended otherwise); a parked one stops taking stanzas
//!   from its queue, which then refuses more (they go to offline storage).

use crate::router::{Holdable, Outbound, QueueRx, SessionHandle};
use jid::BareJid;
use natter_xml::Element;
use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

pub const NS: &str = "urn:xmpp:sm:3";
pub const NS_CSI: &str = "urn:xmpp:csi:0";
const NS_STANZAS: &str = crate::error::NS_STANZAS;

/// Unacknowledged stanzas after which the server asks for an ack.
pub const REQUEST_EVERY: usize = 5;

/// Ended sessions whose final `h` is remembered for `<failed h='…'/>`.
const GONE_REMEMBERED: usize = 4096;

/// Stream management state of one session.
#[derive(Debug)]
pub struct Sm {
    /// SM-ID when resumption is enabled.
    pub id: Option<String>,
    /// Resumption timeout announced in `<enabled max='…'/>`, seconds.
    pub max: u64,
    /// Client stanzas handled (the `h` the server reports), mod 2^32.
    pub handled: u32,
    /// Stanzas counted as sent to the client, mod 2^32.
    pub sent: u32,
    /// Stanzas sent (or, while detached, queued) and not yet acknowledged,
    /// oldest first; the last `unwritten` of them never reached the socket.
    pub unacked: VecDeque<Outbound>,
    pub unwritten: usize,
    /// Bytes of `unacked` and `unsent`.
    pub bytes: usize,
    /// Stanzas written since the last `<r/>`.
    pub unrequested: usize,
    /// `<r/>` sent and not yet answered.
    pub requests: u32,
    /// An `<r/>` is unanswered: the client must ack by then.
    pub ack_deadline: Option<Instant>,
    /// Stanzas written without an ack request: ask at this time.
    pub ack_due: Option<Instant>,
    /// Taken from the queue but not written (unacked limit reached).
    pub unsent: Vec<Outbound>,
}

impl Sm {
    pub fn new(id: Option<String>, max: u64) -> Self {
        Sm {
            id,
            max,
            handled: 0,
            sent: 0,
            unacked: VecDeque::new(),
            unwritten: 0,
            bytes: 0,
            unrequested: 0,
            requests: 0,
            ack_deadline: None,
            ack_due: None,
            unsent: Vec::new(),
        }
    }

    /// The `h` last acknowledged by the client.
    pub fn acked(&self) -> u32 {
        self.sent.wrapping_sub(self.unacked.len() as u32)
    }

    /// Count a stanza as sent (it is written right after, or queued while
    /// detached when `written` is false).
    pub fn record(&mut self, el: Outbound, written: bool) {
        self.sent = self.sent.wrapping_add(1);
        self.bytes += el.size();
        self.unacked.push_back(el);
        if written {
            self.unrequested += 1;
        } else {
            self.unwritten += 1;
        }
    }

    /// Apply the client's `h`. Err((h, written count)) when it acknowledges
    /// more than was written (XEP-0198 §4: handled-count-too-high).
    pub fn ack(&mut self, h: u32) -> Result<(), (u32, u32)> {
        let n = h.wrapping_sub(self.acked()) as usize;
        let written = self.unacked.len() - self.unwritten;
        if n > written {
            return Err((h, self.sent.wrapping_sub(self.unwritten as u32)));
        }
        for el in self.unacked.drain(..n) {
            self.bytes -= el.size();
        }
        Ok(())
    }

    /// Keep stanzas that did not fit (`unacked` is full) for later.
    pub fn defer(&mut self, els: Vec<Outbound>) {
        self.bytes += els.iter().map(Outbound::size).sum::<usize>();
        self.unsent.extend(els);
    }

    /// What was deferred (taken from the queue, never written), in order.
    pub fn take_unsent(&mut self) -> Vec<Outbound> {
        self.bytes -= self.unsent.iter().map(Outbound::size).sum::<usize>();
        std::mem::take(&mut self.unsent)
    }

    /// Everything not acknowledged, oldest first; the state is emptied.
    pub fn take_all(&mut self) -> Vec<Outbound> {
        let mut all: Vec<_> = self.unacked.drain(..).collect();
        all.append(&mut self.unsent);
        self.bytes = 0;
        self.unwritten = 0;
        all
    }
}

pub fn parse_h(el: &Element) -> Option<u32> {
    el.attr("h")?.parse().ok()
}

pub fn a(h: u32) -> Element {
    Element::new("a", NS).with_attr("h", h.to_string())
}

pub fn r() -> Element {
    Element::new("r", NS)
}

pub fn failed(condition: &str, h: Option<u32>) -> Element {
    let mut f = Element::new("failed", NS).with_child(Element::new(condition, NS_STANZAS));
    if let Some(h) = h {
        f.set_attr("h", h.to_string());
    }
    f
}

/// `<handled-count-too-high/>` for the undefined-condition stream error.
pub fn too_high(h: u32, sent: u32) -> Element {
    Element::new("handled-count-too-high", NS)
        .with_attr("h", h.to_string())
        .with_attr("send-count", sent.to_string())
}

/// An unguessable SM-ID: 128 bits from the thread-local CSPRNG (ChaCha,
/// seeded from the OS).
pub fn new_id() -> String {
    use rand::Rng;
    let bytes: [u8; 16] = rand::thread_rng().gen();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// XEP-0198 boolean attribute.
pub fn truthy(v: Option<&str>) -> bool {
    matches!(v, Some("true") | Some("1"))
}

/// Everything a session owns besides its connection: handed from the task
/// that held it to the connection that resumes it.
pub struct Parked {
    pub handle: Arc<SessionHandle>,
    pub rx: QueueRx,
    pub sm: Box<Sm>,
    pub held: Held,
}

/// A request to hand a session over to the connection resuming it.
pub type Takeover = oneshot::Sender<Parked>;

struct Slot {
    owner: BareJid,
    tx: mpsc::Sender<Takeover>,
}

/// Resumable sessions by SM-ID, and the final `h` of recently ended ones.
#[derive(Default)]
pub struct Registry {
    live: Mutex<HashMap<String, Slot>>,
    gone: Mutex<VecDeque<(String, BareJid, u32)>>,
}

/// What a `<resume previd='…'/>` finds.
pub enum Lookup {
    Live(mpsc::Sender<Takeover>),
    /// Unknown, expired or someone else's; the final `h` when it was this
    /// user's and is still remembered.
    Gone(Option<u32>),
}

impl Registry {
    /// Register (or, after a resumption, re-register) the task owning `id`.
    pub fn insert(&self, id: &str, owner: BareJid, tx: mpsc::Sender<Takeover>) {
        self.live.lock().insert(id.to_string(), Slot { owner, tx });
    }

    pub fn lookup(&self, id: &str, user: &BareJid) -> Lookup {
        if let Some(slot) = self.live.lock().get(id) {
            if &slot.owner == user {
                return Lookup::Live(slot.tx.clone());
            }
            return Lookup::Gone(None);
        }
        let gone = self.gone.lock();
        Lookup::Gone(
            gone.iter()
                .find(|(i, owner, _)| i == id && owner == user)
                .map(|(_, _, h)| *h),
        )
    }

    /// The session `id` ended with `handled` client stanzas handled. Only
    /// the task registered for it (`tx`) can remove it.
    pub fn remove(&self, id: &str, tx: &mpsc::Sender<Takeover>, handled: u32) {
        let mut live = self.live.lock();
        let Some(slot) = live.get(id) else { return };
        if !slot.tx.same_channel(tx) {
            return;
        }
        let owner = live.remove(id).expect("checked").owner;
        drop(live);
        let mut gone = self.gone.lock();
        if gone.len() >= GONE_REMEMBERED {
            gone.pop_front();
        }
        gone.push_back((id.to_string(), owner, handled));
    }

    pub fn len(&self) -> usize {
        self.live.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// XEP-0352: presence updates and standalone chat states held back while
/// the client is inactive, only the latest per sender and kind.
#[derive(Debug, Default)]
pub struct Held {
    pub inactive: bool,
    items: Vec<(Holdable, Outbound)>,
    bytes: usize,
}

impl Held {
    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The session is idle: keep no spare capacity.
    pub fn shrink(&mut self) {
        self.items.shrink_to_fit();
    }

    /// Everything held, oldest first.
    pub fn take_all(&mut self) -> Vec<Outbound> {
        self.bytes = 0;
        self.items.drain(..).map(|(_, e)| e).collect()
    }

    /// The stanzas to send now, in order, for `el` on its way to the
    /// client: nothing if it is held back (`hold`: inactive client or a
    /// detached session, and a stanza that can wait; it replaces an older
    /// one of its kind from the same sender); otherwise what is held from
    /// its sender, then `el`, so each sender's stanzas stay in order.
    pub fn filter(&mut self, el: Outbound, hold: bool, out: &mut Vec<Outbound>) {
        if hold {
            if let Some(kind) = el.holdable() {
                let bytes = &mut self.bytes;
                self.items.retain(|(k, e)| {
                    let same = *k == kind && e.from() == el.from();
                    if same {
                        *bytes -= e.size();
                    }
                    !same
                });
                self.bytes += el.size();
                self.items.push((kind, el));
                return;
            }
        }
        if !self.items.is_empty() {
            let bare = el.from().split('/').next().unwrap_or_default();
            let mut i = 0;
            while i < self.items.len() {
                if self.items[i].1.from().split('/').next() == Some(bare) {
                    let (_, e) = self.items.remove(i);
                    self.bytes -= e.size();
                    out.push(e);
                } else {
                    i += 1;
                }
            }
        }
        out.push(el);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use natter_xml::NS_CLIENT;

    const NS_CHATSTATES: &str = "http://jabber.org/protocol/chatstates";

    fn msg(i: u32) -> Outbound {
        Outbound::new(
            &Element::new("message", NS_CLIENT).with_attr("id", i.to_string()),
            0,
        )
    }

    fn el(o: &Outbound) -> Element {
        o.to_element().unwrap()
    }

    #[test]
    fn ack_trims_and_rejects_too_high() {
        let mut sm = Sm::new(None, 300);
        for i in 0..3 {
            sm.record(msg(i), true);
        }
        sm.record(msg(3), false);
        assert_eq!(sm.ack(2), Ok(()));
        assert_eq!(sm.unacked.len(), 2);
        assert_eq!(sm.ack(2), Ok(()));
        // Only 3 were written; the 4th is queued.
        assert_eq!(sm.ack(4), Err((4, 3)));
        assert_eq!(sm.ack(3), Ok(()));
        assert_eq!(sm.unacked.len(), 1);
    }

    #[test]
    fn ack_wraps_at_2_pow_32() {
        let mut sm = Sm::new(None, 300);
        sm.sent = u32::MAX - 1;
        sm.record(msg(0), true);
        sm.record(msg(1), true);
        sm.record(msg(2), true);
        assert_eq!(sm.sent, 1);
        assert_eq!(sm.ack(u32::MAX), Ok(()));
        assert_eq!(sm.unacked.len(), 2);
        assert_eq!(sm.ack(1), Ok(()));
        assert!(sm.unacked.is_empty());
    }

    #[test]
    fn registry_owner_and_gone_h() {
        let reg = Registry::default();
        let alice = BareJid::new("alice@x").unwrap();
        let bob = BareJid::new("bob@x").unwrap();
        let (tx, _rx) = mpsc::channel(1);
        reg.insert("id1", alice.clone(), tx.clone());
        assert!(matches!(reg.lookup("id1", &alice), Lookup::Live(_)));
        assert!(matches!(reg.lookup("id1", &bob), Lookup::Gone(None)));
        let (other, _rx2) = mpsc::channel(1);
        reg.remove("id1", &other, 7);
        assert_eq!(reg.len(), 1);
        reg.remove("id1", &tx, 7);
        assert!(matches!(reg.lookup("id1", &alice), Lookup::Gone(Some(7))));
        assert!(matches!(reg.lookup("id1", &bob), Lookup::Gone(None)));
    }

    #[test]
    fn csi_keeps_latest_per_sender_and_releases_before_a_body() {
        let mut held = Held::default();
        let p = |from: &str, show: &str| {
            Outbound::new(
                &Element::new("presence", NS_CLIENT)
                    .with_attr("from", from)
                    .with_child(Element::new("show", NS_CLIENT).with_text(show)),
                0,
            )
        };
        let mut out = Vec::new();
        held.filter(p("a@x/1", "away"), true, &mut out);
        held.filter(p("b@x/1", "away"), true, &mut out);
        held.filter(p("a@x/1", "dnd"), true, &mut out);
        assert!(out.is_empty());
        assert_eq!(held.len(), 2);
        let typing = Element::new("message", NS_CLIENT)
            .with_attr("from", "a@x/1")
            .with_child(Element::new("composing", NS_CHATSTATES));
        held.filter(Outbound::new(&typing, 0), true, &mut out);
        assert!(out.is_empty());
        let body = Element::new("message", NS_CLIENT)
            .with_attr("from", "a@x/1")
            .with_child(Element::new("body", NS_CLIENT).with_text("hi"))
            .with_child(Element::new("active", NS_CHATSTATES));
        held.filter(Outbound::new(&body, 0), true, &mut out);
        // a's presence and chat state first, then the message; b's stays.
        assert_eq!(out.len(), 3);
        assert_eq!(
            el(&out[0]).child_text("show", NS_CLIENT).as_deref(),
            Some("dnd")
        );
        assert!(el(&out[1]).get_child("composing", NS_CHATSTATES).is_some());
        assert!(el(&out[2]).get_child("body", NS_CLIENT).is_some());
        assert_eq!(held.bytes(), p("b@x/1", "away").size());
        assert_eq!(held.take_all().len(), 1);
        assert_eq!(held.bytes(), 0);
        // Not holding: written at once.
        held.filter(p("b@x/1", "away"), false, &mut out);
        assert_eq!(out.len(), 4);
    }
}
