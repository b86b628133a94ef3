//! The interfaces modules offer each other — the only way one module
//! reaches another (Prosody's `module:depends` + `module:shared`). A
//! module provides an implementation in `Module::provide`; users look it
//! up with `Modules::api::<dyn Trait>()`, never by the provider's name.

use super::Cx;
use crate::error::StanzaError;
use crate::router::{Outbound, QueueRx, SessionHandle};
use crate::state::ServerState;
use async_trait::async_trait;
use jid::{BareJid, FullJid, Jid};
use natter_store::{NewArchiveEntry, PepNodeConfig};
use natter_xml::Element;
use std::sync::Arc;

/// Server-to-server federation: stanzas for domains natter does not serve.
pub trait Remote: Send + Sync {
    /// Whether federation runs (`s2s.enabled`).
    fn enabled(&self, state: &ServerState) -> bool;
    /// Queue a stanza (`from` a local JID, `to` a remote one) for its
    /// domain's server; failures later come back to the sender as errors.
    fn send(&self, state: &ServerState, stanza: &Element) -> Result<(), StanzaError>;
}

/// Routing several messages from one session with one durable write.
#[async_trait]
pub trait MessageBatch: Send + Sync {
    /// Each message's outcome, in order. Pre-route hooks already ran; each
    /// message comes with its parsed `to`.
    async fn route_many(
        &self,
        cx: &Cx<'_>,
        msgs: Vec<(Element, Option<Jid>)>,
    ) -> Vec<Result<(), StanzaError>>;
}

/// XEP-0160 offline storage and the live/offline hand-over.
#[async_trait]
pub trait OfflineQueue: Send + Sync {
    /// Whether a message of this type is kept for an offline recipient.
    fn storable(&self, msg: &Element, kind: &str) -> bool;
    /// Whether `bare` has a resource that takes messages live.
    fn online(&self, state: &ServerState, bare: &BareJid) -> bool;
    /// The error for a full offline queue.
    fn queue_full(&self) -> StanzaError;
    /// Deliver `msg` to `full` (or the user's available resources) or queue
    /// it offline, durably, in acceptance order (`ord`: None = now).
    /// Returns the sessions that got it live.
    #[allow(clippy::too_many_arguments)]
    async fn deliver(
        &self,
        state: &ServerState,
        bare: &BareJid,
        full: Option<&FullJid>,
        msg: &Element,
        archive_id: Option<&str>,
        limit: usize,
        ord: Option<i64>,
    ) -> Result<Vec<Arc<SessionHandle>>, StanzaError>;
    /// Messages an ending session held and did not deliver: back to the
    /// offline queue, at their acceptance position.
    async fn requeue(&self, state: &ServerState, stanzas: Vec<Outbound>);
    /// A parked session was resumed after its queue refused stanzas.
    fn resumed(&self, state: &ServerState, h: &Arc<SessionHandle>, rx: &QueueRx);
    /// Messages were queued for `h`'s user on another node (a cluster):
    /// hand `h` what is queued now, behind nothing newer.
    fn catch_up_now(&self, state: &ServerState, h: &Arc<SessionHandle>);
}

/// XEP-0313 archiving decisions for the message router.
#[async_trait]
pub trait Archive: Send + Sync {
    /// Whether a message has content worth keeping (not chat states alone).
    fn has_content(&self, msg: &Element) -> bool;
    /// Whether a message of this type is archived at all.
    fn archivable(&self, msg: &Element, kind: &str) -> bool;
    /// The archive rows for a message from `from` to `to` (per their
    /// preferences) and which of them is the sender's and the recipient's.
    async fn entries(
        &self,
        state: &ServerState,
        from: &BareJid,
        to: &BareJid,
        xml: &str,
    ) -> Result<(Vec<NewArchiveEntry>, Option<usize>, Option<usize>), StanzaError>;
    /// The `<stanza-id/>` element for an archive id in `by`'s archive.
    fn stanza_id(&self, id: &str, by: &BareJid) -> Element;
}

/// XEP-0191 block lists, for modules that fan out on the user's behalf.
#[async_trait]
pub trait Blocklist: Send + Sync {
    /// Whether presence (or a PEP notification) from `from` may reach `to`.
    async fn presence_allowed(&self, state: &ServerState, from: &Jid, to: &SessionHandle) -> bool;
    /// The same for an addressee that has no session here (a remote JID).
    async fn allowed(&self, state: &ServerState, from: &Jid, to: &Jid) -> bool;
}

/// XEP-0163 PEP: what presence handling tells it, and what other modules
/// built on PEP nodes ask it.
#[async_trait]
pub trait Pep: Send + Sync {
    /// `subscriber` now has a presence subscription to `owner`.
    fn new_subscriber(&self, state: &ServerState, owner: &BareJid, subscriber: &BareJid);
    /// Whether `who` may read `owner`'s `node` under its access model
    /// (`item-not-found` when there is no such node).
    async fn may_read(
        &self,
        state: &ServerState,
        owner: &BareJid,
        node: &str,
        who: &BareJid,
    ) -> Result<(), StanzaError>;
}

/// A module that owns some PEP nodes' semantics (stories): their defaults,
/// and what happens when their items go.
#[async_trait]
pub trait PepNodes: Send + Sync {
    /// The configuration a new `node` gets before the request's options, if
    /// this module owns the node.
    fn defaults(&self, config: &crate::config::Config, node: &str) -> Option<PepNodeConfig>;
    /// Items (serialized payloads) left `owner`'s `node` by retraction,
    /// purge, node deletion or expiry — not by being replaced.
    async fn items_removed(
        &self,
        state: &ServerState,
        owner: &BareJid,
        node: &str,
        payloads: &[(String, String)],
    );
}

/// Uploaded files (XEP-0363), for modules that remove messages.
#[async_trait]
pub trait Files: Send + Sync {
    /// A message (`stanza`, serialized) that `author` sent was retracted or
    /// moderated: the files it links to that `author` uploaded are deleted,
    /// and their bytes with them unless another upload shares them.
    async fn message_removed(&self, state: &ServerState, stanza: &str, author: &BareJid);
}

/// Answers to IQs the server sent on its own or an account's behalf
/// (pushes to app servers), arriving from components, which have no
/// session for `Hook::IqReply` to run in (remote servers' answers do run
/// it).
#[async_trait]
pub trait IqReplies: Send + Sync {
    /// Whether the reply was one this module waited for (consumed).
    async fn reply(&self, state: &ServerState, stanza: &Element) -> bool;
}
