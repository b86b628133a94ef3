//! The points where modules plug into the server, declared as data.
//!
//! A module lists the hooks it runs at (with a priority: higher runs
//! first) and the session events it wants; `Modules` sorts those lists
//! once at start, and the core runs them without knowing any module by
//! name — Prosody's `module:hook` with priorities is the model.
//!
//! Stanza hooks (`Module::on_stanza`) may stop the chain: `Flow::Stop`
//! means "handled, nothing more to do", an `Err` becomes the stanza error
//! the sender gets. Events (`Module::on_event`) are notifications: every
//! listener runs, in priority order, and none can stop the others.
//!
//! Order of one stanza from a bound session (see ARCHITECTURE.md):
//! `PreRoute(kind)` hooks → routing by address (to a service: the
//! service's module; to the server: the IQ table; to a bare or full JID:
//! the message/presence core) → `Delivered` hooks for messages that
//! reached a recipient or its offline queue.

use jid::{BareJid, Jid};
use natter_xml::Element;
use std::sync::Arc;

/// The three stanza kinds (RFC 6120 §8).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Message,
    Presence,
    Iq,
}

impl Kind {
    pub fn of(stanza: &Element) -> Option<Kind> {
        match stanza.name.as_str() {
            "message" => Some(Kind::Message),
            "presence" => Some(Kind::Presence),
            "iq" => Some(Kind::Iq),
            _ => None,
        }
    }
}

/// Where a stanza hook runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Hook {
    /// A stanza from a local session, before it is routed anywhere (its
    /// `from` is stamped, its `to` parsed). Policy lives here: blocking,
    /// rate limits, spam checks.
    PreRoute(Kind),
    /// A message or presence for a local JID (bare, full or the server's
    /// own domain) after the pre-route hooks: the routing itself. The core
    /// message and presence modules run here at priority 0.
    Route(Kind),
    /// A message after routing: delivered to `delivered_to` (or queued
    /// offline when that is None). Copies to other devices live here.
    Delivered,
    /// An IQ result or error addressed to the server: the answer to a
    /// request the server sent (caps queries, pings).
    IqReply,
}

/// Whether a stanza hook chain goes on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// Handled (or deliberately dropped): later hooks and routing don't run.
    Stop,
}

/// What a stanza hook sees.
pub struct HookStanza<'a> {
    pub stanza: &'a Element,
    /// The parsed `to`, if any.
    pub to: Option<&'a Jid>,
    /// `Delivered`: the id of the session that got the message live, None
    /// when it went to offline storage or to every available resource.
    pub delivered_to: Option<u64>,
    /// `Delivered`: the message as the sender's other devices should see it
    /// (with the sender's own archive id), when it differs from `stanza`.
    pub sent_copy: Option<SentCopy<'a>>,
    /// `Delivered`: the owner of the receiving end (bare JID).
    pub recipient: Option<&'a BareJid>,
    /// `Delivered`: it was routed to one resource of the recipient (a full
    /// JID), not to all of them.
    pub to_resource: bool,
}

/// The sender's view of a delivered message, built only by a hook that
/// sends it somewhere: most messages have no other device to copy to, and
/// building it copies the whole stanza.
#[derive(Clone, Copy)]
pub struct SentCopy<'a> {
    /// The message as delivered.
    pub delivered: &'a Element,
    /// Whose archive id `delivered` carries (the recipient's), if it
    /// carries one: left out of the sender's view.
    pub recipient_id_by: Option<&'a BareJid>,
    /// The sender's archive id (XEP-0359), given `by` the sender.
    pub stanza_id: &'a str,
    pub by: &'a BareJid,
}

impl SentCopy<'_> {
    /// XEP-0313 "Communicating the archive ID": the sender's devices see
    /// the sender's id, never the recipient's.
    pub fn build(&self) -> Element {
        let mut msg = self.delivered.clone();
        if let Some(recipient) = self.recipient_id_by {
            msg.retain_children(|c| {
                !(c.is("stanza-id", super::vocab::NS_SID)
                    && c.attr("by") == Some(recipient.as_str()))
            });
        }
        msg.append_child(super::vocab::stanza_id(self.stanza_id, self.by));
        msg
    }
}

impl<'a> HookStanza<'a> {
    pub fn new(stanza: &'a Element, to: Option<&'a Jid>) -> Self {
        HookStanza {
            stanza,
            to,
            delivered_to: None,
            sent_copy: None,
            recipient: None,
            to_resource: false,
        }
    }

    /// The `type` attribute, with RFC 6121's defaults.
    pub fn kind(&self) -> &str {
        self.stanza
            .attr("type")
            .unwrap_or(match self.stanza.name.as_str() {
                "message" => "normal",
                "presence" => "available",
                _ => "",
            })
    }
}

/// Session and store events, in the order a session lives them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// SASL succeeded (no resource yet).
    Authenticated,
    /// A resource is bound and routable.
    Bound,
    /// The session is about to become available (initial presence, or a
    /// negative priority turning non-negative), before its presence is
    /// broadcast. Listeners may `hold` a guard that is dropped once the
    /// broadcast is done (the offline queue is delivered that way).
    ComingOnline,
    /// Available presence was broadcast.
    Available,
    /// The resource went unavailable (it was available).
    Unavailable,
    /// The server answered an idle session's ping: it is still there.
    Heartbeat,
    /// The connection dropped; the session waits for XEP-0198 resumption.
    Parked,
    /// A parked session was resumed.
    Resumed,
    /// The session ended and left the router.
    Closed,
    /// A message was stored in a user's offline queue.
    OfflineQueued,
    /// A group message reached a room member who is not joined and did
    /// not opt in to delivery at the bare JID: it waits in the room's
    /// archive (push notifications listen here).
    GroupMessageMissed,
    /// The session queried its message archive.
    ArchiveQueried,
    /// Another node of the cluster changed a user's stored data that a
    /// module keeps in memory: drop the copy.
    StoredDataChanged,
    /// A session on another node of the cluster ended (or its node died);
    /// the session passed is its proxy here.
    RemoteSessionGone,
}

/// One event, with what listeners need to know.
pub enum Event<'a> {
    Authenticated {
        user: &'a BareJid,
    },
    Bound,
    ComingOnline {
        presence: &'a Element,
        hold: &'a Hold,
    },
    Available {
        presence: &'a Element,
        initial: bool,
    },
    Unavailable {
        presence: &'a Element,
    },
    Heartbeat,
    Parked {
        /// Messages sent to it that it never acknowledged (XEP-0198).
        unacked: &'a [Element],
    },
    Resumed,
    Closed,
    OfflineQueued {
        user: &'a BareJid,
        stanza: &'a Element,
    },
    GroupMessageMissed {
        user: &'a BareJid,
        room: &'a BareJid,
        stanza: &'a Element,
    },
    ArchiveQueried,
    StoredDataChanged {
        user: &'a BareJid,
        /// The module whose copy is stale (`Module::name`).
        module: &'a str,
    },
    RemoteSessionGone,
}

impl Event<'_> {
    pub fn kind(&self) -> EventKind {
        match self {
            Event::Authenticated { .. } => EventKind::Authenticated,
            Event::Bound => EventKind::Bound,
            Event::ComingOnline { .. } => EventKind::ComingOnline,
            Event::Available { .. } => EventKind::Available,
            Event::Unavailable { .. } => EventKind::Unavailable,
            Event::Heartbeat => EventKind::Heartbeat,
            Event::Parked { .. } => EventKind::Parked,
            Event::Resumed => EventKind::Resumed,
            Event::Closed => EventKind::Closed,
            Event::OfflineQueued { .. } => EventKind::OfflineQueued,
            Event::GroupMessageMissed { .. } => EventKind::GroupMessageMissed,
            Event::ArchiveQueried => EventKind::ArchiveQueried,
            Event::StoredDataChanged { .. } => EventKind::StoredDataChanged,
            Event::RemoteSessionGone => EventKind::RemoteSessionGone,
        }
    }
}

/// Guards an event's listeners keep alive until the code that fired the
/// event is done (dropped with it).
#[derive(Default)]
pub struct Hold(parking_lot::Mutex<Vec<Box<dyn std::any::Any + Send>>>);

impl Hold {
    pub fn keep(&self, guard: impl std::any::Any + Send) {
        self.0.lock().push(Box::new(guard));
    }
}

/// A service on its own domain (`conference.example.org`, a component's
/// `bot.example.org`): every stanza to that domain or a JID under it goes
/// to the module that declared it (`Module::service_stanza`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    /// The service's domain.
    pub domain: String,
    /// XEP-0030 identity: category, type, name.
    pub identity: (String, String, String),
    /// Listed in the server's disco#items.
    pub listed: bool,
}

impl Service {
    /// One listed service at `<label>.<domain>` for every served domain.
    pub fn per_domain(
        domains: &[String],
        label: &str,
        (category, kind, name): (&str, &str, &str),
    ) -> Vec<Service> {
        domains
            .iter()
            .map(|d| Service {
                domain: format!("{label}.{d}"),
                identity: (category.into(), kind.into(), name.into()),
                listed: true,
            })
            .collect()
    }
}

/// An ordered hook table: for each point, the modules (by index) that
/// run there, highest priority first (ties: registration order).
pub(crate) struct Table<K> {
    entries: Vec<(K, i32, usize)>,
}

impl<K> Default for Table<K> {
    fn default() -> Self {
        Table {
            entries: Vec::new(),
        }
    }
}

impl<K: PartialEq + Copy> Table<K> {
    pub(crate) fn add(&mut self, key: K, prio: i32, module: usize) {
        self.entries.push((key, prio, module));
        // Stable: equal priorities keep registration order.
        self.entries.sort_by_key(|e| std::cmp::Reverse(e.1));
    }

    pub(crate) fn at(&self, key: K) -> impl Iterator<Item = usize> + '_ {
        self.entries
            .iter()
            .filter(move |(k, _, _)| *k == key)
            .map(|(_, _, m)| *m)
    }
}

/// Shared interfaces modules offer each other (Prosody's `module:shared`):
/// one value per type, registered by the module that owns it, looked up by
/// the type (usually a `dyn Trait` from `modules::api`).
#[derive(Default)]
pub struct Shared {
    /// TypeIds are not chosen by users: no need for SipHash's resistance.
    map: std::collections::HashMap<
        std::any::TypeId,
        Box<dyn std::any::Any + Send + Sync>,
        foldhash::fast::FixedState,
    >,
}

impl Shared {
    pub fn provide<T: ?Sized + Send + Sync + 'static>(&mut self, value: Arc<T>) {
        let prev = self
            .map
            .insert(std::any::TypeId::of::<Arc<T>>(), Box::new(value));
        assert!(
            prev.is_none(),
            "two modules provide {}",
            std::any::type_name::<T>()
        );
    }

    pub fn get<T: ?Sized + Send + Sync + 'static>(&self) -> Option<Arc<T>> {
        self.map
            .get(&std::any::TypeId::of::<Arc<T>>())
            .and_then(|b| b.downcast_ref::<Arc<T>>())
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_orders_by_priority_then_registration() {
        let mut t = Table::default();
        t.add(Hook::Delivered, 0, 1);
        t.add(Hook::Delivered, 10, 2);
        t.add(Hook::IqReply, 50, 3);
        t.add(Hook::Delivered, 0, 4);
        assert_eq!(t.at(Hook::Delivered).collect::<Vec<_>>(), vec![2, 1, 4]);
        assert_eq!(t.at(Hook::IqReply).collect::<Vec<_>>(), vec![3]);
    }

    trait Greeter: Send + Sync {
        fn hi(&self) -> &'static str;
    }
    struct En;
    impl Greeter for En {
        fn hi(&self) -> &'static str {
            "hello"
        }
    }

    #[test]
    fn shared_interfaces_by_trait_object_type() {
        let mut s = Shared::default();
        assert!(s.get::<dyn Greeter>().is_none());
        s.provide::<dyn Greeter>(Arc::new(En));
        assert_eq!(s.get::<dyn Greeter>().unwrap().hi(), "hello");
    }
}
