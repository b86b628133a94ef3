//! XEP-0163 Personal Eventing Protocol (1.2.2): a pubsub service on every
//! account, with the XEP-0060 subset PEP needs and XEP-0223 publish-options
//! (1.1.1). It carries OMEMO keys (XEP-0384), avatars (XEP-0084),
//! bookmarks (XEP-0402) and any other PEP payload.
//!
//! What works (and is announced in disco, nothing more):
//! - publish (auto-create, publish-options as preconditions or as the new
//!   node's configuration; `conflict` + `<precondition-not-met/>` on a
//!   mismatch), create (with configure), items retrieval (all, `max_items`,
//!   by id), retract, delete, purge, node configuration and default
//!   configuration (owner only).
//! - Configuration: `pubsub#access_model` open | presence | whitelist
//!   (whitelist = the owner and the node's `member`s, set by the owner with
//!   XEP-0060 §8.9 affiliation management),
//!   `pubsub#max_items` (a number up to [`MAX_NODE_ITEMS`], or `max` =
//!   that limit), `pubsub#persist_items` (false keeps only the last item,
//!   which PEP needs for last-published delivery),
//!   `pubsub#send_last_published_item` never | on_sub | on_sub_and_presence,
//!   `pubsub#notify_retract`, `pubsub#notify_delete`, `pubsub#item_expire`
//!   (seconds, 0 = never: older items are not returned and a background
//!   sweep retracts them, notifying like a retraction; the expiry instant is
//!   stored with each item, so it survives restarts and any node of a
//!   cluster may sweep — the one whose delete succeeds notifies), and
//!   `pubsub#publish_model` / `pubsub#deliver_payloads` /
//!   `pubsub#deliver_notifications` at their only supported values
//!   (publishers, true, true). Any other field is refused.
//! - Default access model `presence`, except: the OMEMO device list and
//!   bundle nodes (`eu.siacs.conversations.axolotl.*`, `urn:xmpp:omemo:2:*`)
//!   are `open` so anyone, contact or not yet, can start an encrypted chat
//!   (ejabberd #4103, dino #1139); private nodes (XEP-0402 bookmarks,
//!   XEP-0048 `storage:bookmarks`, XEP-0490 displayed markers) are
//!   `whitelist` with `max_items=max` and no last-item delivery.
//! - Every read is authorized against the node's access model: open =
//!   anyone, presence = the owner and contacts with subscription
//!   `from`/`both`, whitelist = the owner. Writes are the owner's only.
//!   XEP-0191 blocks apply in both directions (reads are gated in dispatch,
//!   notifications here).
//! - Notifications (XEP-0163 §4.3): on publish/retract/delete, to the
//!   owner's available resources and to available resources of contacts
//!   with subscription `from`/`both` (not for whitelist nodes), in both
//!   cases only where the resource's entity capabilities (XEP-0115) list
//!   `NODE+notify`. Explicit XEP-0060 subscriptions are not offered.
//! - Entity capabilities: the server reads the `<c/>` of each available
//!   presence, asks the client for `node#ver` disco#info once per
//!   verification string (from the server's domain; the answer comes back
//!   to the server through dispatch), checks the SHA-1 verification string
//!   (XEP-0115 §5.4, extended forms included) and caches verified answers
//!   by ver. An answer that doesn't verify (or uses another hash) applies
//!   to the session that gave it only. When a session's features become
//!   known (initial presence, or a caps change), it gets the last item of
//!   each node it has `+notify` for and may read (unless the node says
//!   `never`): the owner's own nodes and those of every contact it is
//!   subscribed to.
//!
//! Node options are the store's `PepNodeConfig` fields (persist_items,
//! send_last_published_item, notify_retract, notify_delete included).

pub use super::disco::caps_verification_string;
use super::vocab::{NS_CAPS, NS_DISCO_INFO, NS_DISCO_ITEMS};
use super::{
    api, new_id, presence_allowed, presence_allowed_to, Cx, Event, EventKind, Flow, Hook,
    HookStanza, Identity, Iq, IqResult, IqType, Kind, Module, Shared, Target,
};
use crate::error::{Condition, StanzaError};
use crate::router::SessionHandle;
use crate::state::ServerState;
use async_trait::async_trait;
use jid::{BareJid, FullJid, Jid};
use natter_store::{PepNodeConfig, Subscription};
use natter_xml::{Element, Limits, NS_CLIENT};
use parking_lot::Mutex;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const NS: &str = "http://jabber.org/protocol/pubsub";
pub const NS_OWNER: &str = "http://jabber.org/protocol/pubsub#owner";
pub const NS_EVENT: &str = "http://jabber.org/protocol/pubsub#event";
pub const NS_ERRORS: &str = "http://jabber.org/protocol/pubsub#errors";
pub use super::vocab::NS_DATA;
pub const NS_DELAY: &str = "urn:xmpp:delay";
pub const FORM_PUBLISH_OPTIONS: &str = "http://jabber.org/protocol/pubsub#publish-options";
pub const FORM_NODE_CONFIG: &str = "http://jabber.org/protocol/pubsub#node_config";

/// The most items a node keeps; `max_items=max` means this.
pub const MAX_NODE_ITEMS: u32 = 1000;
/// The most nodes one account may own.
pub const MAX_NODES: usize = 512;
/// Longest node name or item id, in bytes.
pub const MAX_NAME: usize = 1024;
/// Longest `pubsub#item_expire`, in seconds (ten years).
pub const MAX_ITEM_EXPIRE: u64 = 10 * 365 * 86_400;
/// Most affiliations one node may list.
pub const MAX_AFFILIATIONS: usize = 1000;
/// How often expired items are swept (reads hide them at once).
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// Expired items handled per store read in a sweep.
const SWEEP_BATCH: usize = 500;
/// Verified capabilities kept in memory (cleared when full).
const MAX_CAPS_CACHE: usize = 10_000;
/// Outstanding disco#info queries to clients.
const MAX_PENDING: usize = 10_000;
/// A client that didn't answer a caps query within this is asked again by
/// the next session with that ver.
const CAPS_QUERY_TIMEOUT: Duration = Duration::from_secs(30);

const FEATURES: &[&str] = &[
    NS,
    "http://jabber.org/protocol/pubsub#access-open",
    "http://jabber.org/protocol/pubsub#access-presence",
    "http://jabber.org/protocol/pubsub#access-whitelist",
    "http://jabber.org/protocol/pubsub#auto-create",
    "http://jabber.org/protocol/pubsub#auto-subscribe",
    "http://jabber.org/protocol/pubsub#config-node",
    "http://jabber.org/protocol/pubsub#create-and-configure",
    "http://jabber.org/protocol/pubsub#create-nodes",
    "http://jabber.org/protocol/pubsub#delete-items",
    "http://jabber.org/protocol/pubsub#delete-nodes",
    "http://jabber.org/protocol/pubsub#filtered-notifications",
    "http://jabber.org/protocol/pubsub#item-ids",
    "http://jabber.org/protocol/pubsub#last-published",
    "http://jabber.org/protocol/pubsub#member-affiliation",
    "http://jabber.org/protocol/pubsub#modify-affiliations",
    "http://jabber.org/protocol/pubsub#multi-items",
    "http://jabber.org/protocol/pubsub#persistent-items",
    "http://jabber.org/protocol/pubsub#presence-notifications",
    "http://jabber.org/protocol/pubsub#publish",
    "http://jabber.org/protocol/pubsub#publish-options",
    "http://jabber.org/protocol/pubsub#purge-nodes",
    "http://jabber.org/protocol/pubsub#retract-items",
    "http://jabber.org/protocol/pubsub#retrieve-default",
    "http://jabber.org/protocol/pubsub#retrieve-items",
];

/// XEP-0163 §6: the account's identity as a PEP service.
pub const IDENTITY: Identity = ("pubsub", "pep", "");

/// The disco#info features of a client.
type Features = Arc<HashSet<String>>;
/// A data form for hashing: FORM_TYPE and (var, values) fields.

#[derive(Default)]
pub struct Pep {
    /// Verified XEP-0115 ver → features.
    by_ver: Mutex<HashMap<String, Features>>,
    /// Session id → (ver, features) as currently known.
    by_session: Mutex<HashMap<u64, (String, Features)>>,
    /// Outstanding caps queries: iq id → what was asked.
    pending: Mutex<HashMap<String, PendingCaps>>,
    /// ver → when it was last asked and which sessions wait for it.
    asking: Mutex<HashMap<String, (Instant, Vec<Waiting>)>>,
    /// Contacts on other servers whose available presence reached a local
    /// user: bare JID → resource → caps (XEP-0163 notifications go to
    /// them over s2s). Bounded by `MAX_REMOTE_CONTACTS` and
    /// `MAX_REMOTE_RESOURCES` each.
    remote: Mutex<HashMap<BareJid, HashMap<String, RemoteResource>>>,
}

/// An available resource of a contact on another server.
struct RemoteResource {
    ver: String,
    /// None until its caps are known.
    features: Option<Features>,
}

/// Remote contacts remembered at most, and resources per contact (each a
/// few hundred bytes): checked in O(1) on every presence.
const MAX_REMOTE_CONTACTS: usize = 50_000;
const MAX_REMOTE_RESOURCES: usize = 16;
/// `PendingCaps::session` of a query to a remote contact's resource.
const REMOTE_SESSION: u64 = u64::MAX;

/// A session (id, account) waiting for a caps answer.
type Waiting = (u64, BareJid);

struct PendingCaps {
    jid: FullJid,
    session: u64,
    node: String,
    ver: String,
    hash: String,
    /// Remote queries: the local account whose contact it is (gets its
    /// last items sent once the caps are known).
    owner: Option<BareJid>,
    /// When it was asked: unanswered queries make room after
    /// `CAPS_QUERY_TIMEOUT`.
    at: Instant,
}

#[async_trait]
impl Module for Pep {
    fn name(&self) -> &'static str {
        "pep"
    }
    /// XEP-0223 §4 / XEP-0163 §6: the server and every account are PEP
    /// services too.
    fn identities(&self) -> &'static [Identity] {
        &[IDENTITY]
    }
    fn account_identities(&self) -> &'static [Identity] {
        &[IDENTITY]
    }
    fn hooks(&self) -> &'static [(Hook, i32)] {
        // Presence from remote contacts is watched before `presence` (0)
        // routes it.
        &[(Hook::IqReply, 0), (Hook::Route(Kind::Presence), 10)]
    }
    fn events(&self) -> &'static [(EventKind, i32)] {
        &[(EventKind::Available, 0), (EventKind::Closed, 0)]
    }
    fn provide(self: Arc<Self>, shared: &mut Shared) {
        shared.provide::<Pep>(self.clone());
        shared.provide::<dyn api::Pep>(self);
    }
    fn tasks(&self, state: &ServerState) -> Vec<super::Task> {
        vec![super::periodic(state.clone(), SWEEP_EVERY, |state| {
            Box::pin(async move {
                if let Err(e) = sweep(&state).await {
                    tracing::warn!(error = %e, "PEP expiry sweep failed");
                }
            })
        })]
    }
    fn features(&self) -> &'static [&'static str] {
        FEATURES
    }
    fn account_features(&self) -> &'static [&'static str] {
        FEATURES
    }
    fn iq_payloads(&self) -> &'static [(&'static str, &'static str)] {
        &[(NS, "pubsub"), (NS_OWNER, "pubsub")]
    }
    async fn handle_iq(&self, cx: &Cx<'_>, iq: &Iq) -> IqResult {
        let owner = match &iq.target {
            Target::Account(b) => b.clone(),
            Target::Server(_) if iq.stanza.attr("to").is_none() => cx.session.bare.clone(),
            // No pubsub service on the domain itself.
            Target::Server(_) => return Err(StanzaError::new(Condition::ServiceUnavailable)),
        };
        let p = iq.payload();
        let own = owner == cx.session.bare;
        if p.ns == NS_OWNER {
            if !own {
                return Err(StanzaError::new(Condition::Forbidden));
            }
            return owner_request(cx, iq.kind, p).await;
        }
        // <publish-options/> goes with <publish/>, <configure/> with <create/>.
        let ops: Vec<&Element> = p
            .children()
            .filter(|c| !(c.is("publish-options", NS) || c.is("configure", NS)))
            .collect();
        let [op] = ops.as_slice() else {
            return Err(StanzaError::with_text(
                Condition::BadRequest,
                "one pubsub operation per request",
            ));
        };
        match (iq.kind, op.name.as_str()) {
            (IqType::Set, "publish") => publish(cx, &owner, own, op, p).await,
            (IqType::Set, "retract") => retract(cx, &owner, own, op).await,
            (IqType::Set, "create") => create(cx, &owner, own, p).await,
            (IqType::Get, "items") => items(cx, &owner, op).await,
            (_, name) => Err(unsupported(match name {
                "subscribe" | "unsubscribe" | "options" => "subscribe",
                "subscriptions" => "retrieve-subscriptions",
                "affiliations" => "retrieve-affiliations",
                _ => "",
            })),
        }
    }
    async fn on_stanza(
        &self,
        hook: Hook,
        cx: &Cx<'_>,
        s: &HookStanza<'_>,
    ) -> Result<Flow, StanzaError> {
        if hook == Hook::Route(Kind::Presence) {
            remote_presence(cx.state, s.stanza).await;
            return Ok(Flow::Continue);
        }
        Ok(if caps_reply(cx.state, cx.session, s.stanza).await {
            Flow::Stop
        } else {
            Flow::Continue
        })
    }
    async fn on_event(
        &self,
        state: &ServerState,
        session: Option<&Arc<SessionHandle>>,
        event: &Event<'_>,
    ) {
        let Some(h) = session else { return };
        match event {
            Event::Available { presence, .. } => on_available(state, h, presence).await,
            Event::Closed => {
                self.by_session.lock().remove(&h.id);
                self.pending.lock().retain(|_, p| p.session != h.id);
            }
            _ => {}
        }
    }
    async fn account_items(
        &self,
        cx: &Cx<'_>,
        owner: &BareJid,
    ) -> Result<Vec<Element>, StanzaError> {
        disco_items(cx.state, owner, &cx.session.bare).await
    }
    async fn account_node_info(
        &self,
        cx: &Cx<'_>,
        owner: &BareJid,
        node: &str,
    ) -> Option<IqResult> {
        Some(disco_node_info(cx.state, owner, node, &cx.session.bare).await)
    }
}

#[async_trait]
impl api::Pep for Pep {
    fn new_subscriber(&self, state: &ServerState, owner: &BareJid, subscriber: &BareJid) {
        new_subscriber(state, owner, subscriber)
    }
    async fn may_read(
        &self,
        state: &ServerState,
        owner: &BareJid,
        node: &str,
        who: &BareJid,
    ) -> Result<(), StanzaError> {
        let Some(cfg) = node_config(state, owner, node).await? else {
            return Err(StanzaError::new(Condition::ItemNotFound));
        };
        authorize(state, owner, node, &cfg, who).await
    }
}

// ---------------------------------------------------------------------------
// Node configuration
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Open,
    Presence,
    Whitelist,
}

impl Access {
    fn parse(s: &str) -> Option<Access> {
        Some(match s {
            "open" => Access::Open,
            "presence" => Access::Presence,
            "whitelist" => Access::Whitelist,
            _ => return None,
        })
    }
    fn as_str(self) -> &'static str {
        match self {
            Access::Open => "open",
            Access::Presence => "presence",
            Access::Whitelist => "whitelist",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendLast {
    Never,
    OnSub,
    OnSubAndPresence,
}

impl SendLast {
    fn parse(s: &str) -> Option<SendLast> {
        Some(match s {
            "never" => SendLast::Never,
            "on_sub" => SendLast::OnSub,
            "on_sub_and_presence" => SendLast::OnSubAndPresence,
            _ => return None,
        })
    }
    fn as_str(self) -> &'static str {
        match self {
            SendLast::Never => "never",
            SendLast::OnSub => "on_sub",
            SendLast::OnSubAndPresence => "on_sub_and_presence",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeConfig {
    pub access: Access,
    /// 1..=MAX_NODE_ITEMS; MAX_NODE_ITEMS is shown as `max`.
    pub max_items: u32,
    pub persist: bool,
    pub send_last: SendLast,
    pub notify_retract: bool,
    pub notify_delete: bool,
    /// `pubsub#item_expire` in seconds; 0 = never.
    pub item_expire: u64,
}

fn is_omemo(node: &str) -> bool {
    node == "eu.siacs.conversations.axolotl.devicelist"
        || node.starts_with("eu.siacs.conversations.axolotl.bundles:")
        || node == "urn:xmpp:omemo:2:devices"
        || node == "urn:xmpp:omemo:2:bundles"
}

/// Nodes holding the user's private data.
fn is_private(node: &str) -> bool {
    matches!(
        node,
        "urn:xmpp:bookmarks:1" | "storage:bookmarks" | "urn:xmpp:mds:displayed:0"
    )
}

impl NodeConfig {
    /// The configuration a new node gets before any options apply.
    pub fn default_for(node: &str) -> NodeConfig {
        let mut c = NodeConfig {
            access: Access::Presence,
            max_items: 1,
            persist: true,
            send_last: SendLast::OnSubAndPresence,
            notify_retract: true,
            notify_delete: true,
            item_expire: 0,
        };
        if is_omemo(node) {
            c.access = Access::Open;
            if node == "urn:xmpp:omemo:2:bundles" {
                c.max_items = MAX_NODE_ITEMS;
            }
        } else if is_private(node) {
            c.access = Access::Whitelist;
            if node != "storage:bookmarks" {
                c.max_items = MAX_NODE_ITEMS;
                c.send_last = SendLast::Never;
            }
        }
        c
    }

    fn to_store(&self) -> PepNodeConfig {
        PepNodeConfig {
            access_model: self.access.as_str().into(),
            max_items: if self.persist { self.max_items } else { 1 },
            publish_model: "publishers".into(),
            persist_items: self.persist,
            send_last_published_item: self.send_last.as_str().into(),
            notify_retract: self.notify_retract,
            notify_delete: self.notify_delete,
            item_expire_secs: self.item_expire,
        }
    }

    fn from_store(c: &PepNodeConfig) -> NodeConfig {
        NodeConfig {
            // Unknown values (a newer binary wrote them) fail closed.
            access: Access::parse(&c.access_model).unwrap_or(Access::Whitelist),
            max_items: c.max_items.clamp(1, MAX_NODE_ITEMS),
            persist: c.persist_items,
            send_last: SendLast::parse(&c.send_last_published_item).unwrap_or(SendLast::Never),
            notify_retract: c.notify_retract,
            notify_delete: c.notify_delete,
            item_expire: c.item_expire_secs.min(MAX_ITEM_EXPIRE),
        }
    }

    fn max_items_str(&self) -> String {
        if self.max_items == MAX_NODE_ITEMS {
            "max".into()
        } else {
            self.max_items.to_string()
        }
    }

    /// Apply one form field. Err(()) for an unknown field or a bad value.
    fn apply(&mut self, var: &str, value: &str) -> Result<(), ()> {
        match var {
            "pubsub#access_model" => self.access = Access::parse(value).ok_or(())?,
            "pubsub#max_items" => {
                self.max_items = if value == "max" {
                    MAX_NODE_ITEMS
                } else {
                    match value.trim().parse::<u32>() {
                        Ok(n) if (1..=MAX_NODE_ITEMS).contains(&n) => n,
                        _ => return Err(()),
                    }
                }
            }
            "pubsub#persist_items" => {
                self.persist = parse_bool(value).ok_or(())?;
                if !self.persist {
                    self.max_items = 1;
                }
            }
            "pubsub#send_last_published_item" => {
                self.send_last = SendLast::parse(value).ok_or(())?
            }
            "pubsub#notify_retract" => self.notify_retract = parse_bool(value).ok_or(())?,
            "pubsub#notify_delete" => self.notify_delete = parse_bool(value).ok_or(())?,
            "pubsub#item_expire" => {
                self.item_expire = match value.trim().parse::<u64>() {
                    Ok(n) if n <= MAX_ITEM_EXPIRE => n,
                    _ => return Err(()),
                }
            }
            "pubsub#publish_model" if value == "publishers" => {}
            "pubsub#deliver_payloads" | "pubsub#deliver_notifications"
                if parse_bool(value) == Some(true) => {}
            _ => return Err(()),
        }
        Ok(())
    }

    /// XEP-0060 §7.1.5: does this node satisfy a publish-options field?
    fn satisfies(&self, var: &str, value: &str) -> bool {
        let mut probe = self.clone();
        probe.apply(var, value).is_ok() && probe == *self
    }

    /// The node_config data form (type `form` to fill in).
    fn form(&self) -> Element {
        let mut x = Element::new("x", NS_DATA).with_attr("type", "form");
        x.append_child(hidden_form_type(FORM_NODE_CONFIG));
        let list = |var: &str, label: &str, value: &str, options: &[&str]| {
            let mut f = field(var, "list-single", label, value);
            for o in options {
                f.append_child(
                    Element::new("option", NS_DATA)
                        .with_child(Element::new("value", NS_DATA).with_text(*o)),
                );
            }
            f
        };
        let b = |v: bool| if v { "1" } else { "0" };
        x.append_child(list(
            "pubsub#access_model",
            "Who may retrieve items and get notifications",
            self.access.as_str(),
            &["open", "presence", "whitelist"],
        ));
        x.append_child(field(
            "pubsub#max_items",
            "text-single",
            "Most items to keep (or max)",
            &self.max_items_str(),
        ));
        x.append_child(field(
            "pubsub#persist_items",
            "boolean",
            "Keep items (false: only the last one)",
            b(self.persist),
        ));
        x.append_child(list(
            "pubsub#send_last_published_item",
            "When to send the last published item",
            self.send_last.as_str(),
            &["never", "on_sub", "on_sub_and_presence"],
        ));
        x.append_child(field(
            "pubsub#notify_retract",
            "boolean",
            "Notify when items are retracted",
            b(self.notify_retract),
        ));
        x.append_child(field(
            "pubsub#notify_delete",
            "boolean",
            "Notify when the node is deleted",
            b(self.notify_delete),
        ));
        x.append_child(field(
            "pubsub#item_expire",
            "text-single",
            "Seconds after publication an item is deleted (0: never)",
            &self.item_expire.to_string(),
        ));
        x.append_child(list(
            "pubsub#publish_model",
            "Who may publish",
            "publishers",
            &["publishers"],
        ));
        x.append_child(field(
            "pubsub#deliver_payloads",
            "boolean",
            "Deliver payloads with notifications",
            "1",
        ));
        x.append_child(field(
            "pubsub#deliver_notifications",
            "boolean",
            "Deliver event notifications",
            "1",
        ));
        x
    }
}

fn parse_bool(v: &str) -> Option<bool> {
    match v.trim() {
        "1" | "true" => Some(true),
        "0" | "false" => Some(false),
        _ => None,
    }
}

fn field(var: &str, kind: &str, label: &str, value: &str) -> Element {
    Element::new("field", NS_DATA)
        .with_attr("var", var)
        .with_attr("type", kind)
        .with_attr("label", label)
        .with_child(Element::new("value", NS_DATA).with_text(value))
}

fn hidden_form_type(form_type: &str) -> Element {
    Element::new("field", NS_DATA)
        .with_attr("var", "FORM_TYPE")
        .with_attr("type", "hidden")
        .with_child(Element::new("value", NS_DATA).with_text(form_type))
}

/// The fields of a submitted data form (FORM_TYPE excluded), after checking
/// its FORM_TYPE (when present) is `form_type`. None for `type='cancel'`.
fn submitted(x: &Element, form_type: &str) -> Result<Option<Vec<(String, String)>>, StanzaError> {
    if x.attr("type") == Some("cancel") {
        return Ok(None);
    }
    if !matches!(x.attr("type"), Some("submit") | None) {
        return Err(StanzaError::with_text(
            Condition::BadRequest,
            "expected a submitted data form",
        ));
    }
    let mut out = Vec::new();
    for f in x.children().filter(|c| c.is("field", NS_DATA)) {
        let var = f.attr("var").unwrap_or_default();
        let value = f.child_text("value", NS_DATA).unwrap_or_default();
        if var == "FORM_TYPE" {
            if value != form_type {
                return Err(StanzaError::with_text(
                    Condition::BadRequest,
                    format!("expected FORM_TYPE {form_type}"),
                ));
            }
            continue;
        }
        out.push((var.to_string(), value));
    }
    Ok(Some(out))
}

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

fn pubsub_error(cond: Condition, app: &'static str) -> StanzaError {
    StanzaError::new(cond).with_app(app, NS_ERRORS)
}

fn unsupported(feature: &'static str) -> StanzaError {
    let e = StanzaError::new(Condition::FeatureNotImplemented).with_app("unsupported", NS_ERRORS);
    if feature.is_empty() {
        e
    } else {
        e.with_app_attr("feature", feature)
    }
}

fn precondition_not_met() -> StanzaError {
    pubsub_error(Condition::Conflict, "precondition-not-met")
}

fn node_name(el: &Element) -> Result<String, StanzaError> {
    match el.attr("node") {
        Some(n) if !n.is_empty() && n.len() <= MAX_NAME => Ok(n.to_string()),
        Some(n) if n.len() > MAX_NAME => Err(StanzaError::with_text(
            Condition::NotAcceptable,
            "node name too long",
        )),
        _ => Err(pubsub_error(Condition::BadRequest, "nodeid-required")),
    }
}

// ---------------------------------------------------------------------------
// Authorization
// ---------------------------------------------------------------------------

fn has_from(s: Subscription) -> bool {
    matches!(s, Subscription::From | Subscription::Both)
}

/// Whether `who` is subscribed to `owner`'s presence.
async fn subscribed(state: &ServerState, owner: &BareJid, who: &BareJid) -> bool {
    matches!(
        state.store.roster_item(owner.as_str(), who.as_str()).await,
        Ok(Some(i)) if has_from(i.subscription)
    )
}

/// Whether `who` is listed as a member (or publisher) of a whitelist node.
async fn whitelisted(state: &ServerState, owner: &BareJid, node: &str, who: &BareJid) -> bool {
    match state.store.pep_affiliations(owner.as_str(), node).await {
        Ok(list) => list
            .iter()
            .any(|(j, a)| j == who.as_str() && matches!(a.as_str(), "member" | "publisher")),
        Err(e) => {
            tracing::warn!(error = %e, "PEP affiliations read failed");
            false
        }
    }
}

/// XEP-0060 §6.5.9 / XEP-0163 §4.2: may `who` read `owner`'s node?
async fn authorize(
    state: &ServerState,
    owner: &BareJid,
    node: &str,
    cfg: &NodeConfig,
    who: &BareJid,
) -> Result<(), StanzaError> {
    if who == owner {
        return Ok(());
    }
    match cfg.access {
        Access::Open => Ok(()),
        Access::Presence if subscribed(state, owner, who).await => Ok(()),
        Access::Presence => Err(pubsub_error(
            Condition::NotAuthorized,
            "presence-subscription-required",
        )),
        Access::Whitelist if whitelisted(state, owner, node, who).await => Ok(()),
        Access::Whitelist => Err(pubsub_error(Condition::NotAllowed, "closed-node")),
    }
}

/// The configuration a new node gets: a module owning the node decides
/// (`api::PepNodes`), else PEP's own defaults.
fn node_defaults(state: &ServerState, node: &str) -> NodeConfig {
    state
        .modules
        .try_api::<dyn api::PepNodes>()
        .and_then(|m| m.defaults(&state.config, node))
        .map_or_else(
            || NodeConfig::default_for(node),
            |c| NodeConfig::from_store(&c),
        )
}

/// Tell the module owning `node` (if any) that these (id, payload) items left it.
async fn items_removed(
    state: &ServerState,
    owner: &BareJid,
    node: &str,
    items: &[(String, String)],
) {
    if items.is_empty() {
        return;
    }
    if let Some(m) = state.modules.try_api::<dyn api::PepNodes>() {
        m.items_removed(state, owner, node, items).await;
    }
}

async fn node_config(
    state: &ServerState,
    owner: &BareJid,
    node: &str,
) -> Result<Option<NodeConfig>, StanzaError> {
    Ok(state
        .store
        .pep_node(owner.as_str(), node)
        .await?
        .map(|c| NodeConfig::from_store(&c)))
}

fn forbid_others(own: bool) -> Result<(), StanzaError> {
    if own {
        Ok(())
    } else {
        Err(StanzaError::new(Condition::Forbidden))
    }
}

// ---------------------------------------------------------------------------
// Operations
// ---------------------------------------------------------------------------

fn limits(state: &ServerState) -> Limits {
    Limits {
        max_stanza_bytes: state.config.limits.max_stanza_bytes.max(1 << 20),
        max_depth: state.config.limits.max_depth.max(64),
        max_attrs: state.config.limits.max_attrs.max(64),
        max_elements: state.config.limits.max_elements.max(10_000),
    }
}

/// A stored item as `<item id='…'>payload</item>` in namespace `ns`.
fn item_element(state: &ServerState, ns: &str, id: &str, payload: &str) -> Element {
    let mut item = Element::new("item", ns).with_attr("id", id);
    match natter_xml::parse_frame(payload.as_bytes(), &limits(state)) {
        Ok(p) => item.append_child(p),
        Err(e) => tracing::error!(error = %e, "stored PEP payload does not parse"),
    }
    item
}

async fn create_node(
    state: &ServerState,
    owner: &BareJid,
    node: &str,
    cfg: &NodeConfig,
) -> Result<(), StanzaError> {
    if state.store.pep_nodes(owner.as_str()).await?.len() >= MAX_NODES {
        return Err(StanzaError::with_text(
            Condition::ResourceConstraint,
            "too many nodes",
        ));
    }
    state
        .store
        .pep_create_or_configure(owner.as_str(), node, &cfg.to_store())
        .await?;
    Ok(())
}

/// XEP-0060 §7.1 + §7.1.5 (publish-options) + XEP-0163 §3 (auto-create).
async fn publish(cx: &Cx<'_>, owner: &BareJid, own: bool, op: &Element, p: &Element) -> IqResult {
    forbid_others(own)?;
    let state = cx.state;
    let node = node_name(op)?;
    let mut items = op.children().filter(|c| c.is("item", NS));
    let (Some(item), None) = (items.next(), items.next()) else {
        return Err(pubsub_error(Condition::BadRequest, "item-required"));
    };
    if op.children().count() != 1 {
        return Err(pubsub_error(Condition::BadRequest, "invalid-payload"));
    }
    let mut payloads = item.children();
    let payload = match (payloads.next(), payloads.next()) {
        (Some(pl), None) => pl,
        (None, _) => return Err(pubsub_error(Condition::BadRequest, "payload-required")),
        _ => return Err(pubsub_error(Condition::BadRequest, "invalid-payload")),
    };
    let id = match item.attr("id") {
        Some(id) if !id.is_empty() && id.len() <= MAX_NAME => id.to_string(),
        Some(id) if id.len() > MAX_NAME => {
            return Err(StanzaError::with_text(
                Condition::NotAcceptable,
                "item id too long",
            ))
        }
        _ => new_id(),
    };
    let options = match p.get_child("publish-options", NS) {
        Some(po) => match po.get_child("x", NS_DATA) {
            Some(x) => submitted(x, FORM_PUBLISH_OPTIONS)?.unwrap_or_default(),
            None => Vec::new(),
        },
        None => Vec::new(),
    };
    let cfg = match node_config(state, owner, &node).await? {
        Some(cfg) => {
            if !options.iter().all(|(k, v)| cfg.satisfies(k, v)) {
                return Err(precondition_not_met());
            }
            cfg
        }
        None => {
            let mut cfg = node_defaults(state, &node);
            for (k, v) in &options {
                if cfg.apply(k, v).is_err() {
                    return Err(precondition_not_met());
                }
            }
            create_node(state, owner, &node, &cfg).await?;
            cfg
        }
    };
    state
        .store
        .pep_publish(owner.as_str(), &node, &id, &payload.to_string())
        .await?;
    let event_item = Element::new("item", NS_EVENT)
        .with_attr("id", id.clone())
        .with_child(payload.clone());
    notify(
        state,
        owner,
        &node,
        &cfg,
        Element::new("items", NS_EVENT)
            .with_attr("node", node.clone())
            .with_child(event_item),
    )
    .await;
    Ok(Some(
        Element::new("pubsub", NS).with_child(
            Element::new("publish", NS)
                .with_attr("node", node)
                .with_child(Element::new("item", NS).with_attr("id", id)),
        ),
    ))
}

/// XEP-0060 §7.2.
async fn retract(cx: &Cx<'_>, owner: &BareJid, own: bool, op: &Element) -> IqResult {
    forbid_others(own)?;
    let state = cx.state;
    let node = node_name(op)?;
    let ids: Vec<String> = op
        .children()
        .filter(|c| c.is("item", NS))
        .filter_map(|c| c.attr("id").map(str::to_string))
        .collect();
    if ids.is_empty() {
        return Err(pubsub_error(Condition::BadRequest, "item-required"));
    }
    let Some(cfg) = node_config(state, owner, &node).await? else {
        return Err(StanzaError::new(Condition::ItemNotFound));
    };
    // Read first: the owning module gets the payloads of what goes. An
    // expired item is already gone for everyone; the sweep retracts it.
    let found = state
        .store
        .pep_items(owner.as_str(), &node, None, Some(&ids))
        .await?;
    let mut removed = Vec::new();
    for it in found {
        if state
            .store
            .pep_retract(owner.as_str(), &node, &it.id)
            .await?
        {
            removed.push((it.id, it.payload));
        }
    }
    if removed.is_empty() {
        return Err(StanzaError::new(Condition::ItemNotFound));
    }
    items_removed(state, owner, &node, &removed).await;
    let gone: Vec<String> = removed.into_iter().map(|(id, _)| id).collect();
    let notify_attr = op.attr("notify").map(parse_bool);
    let wanted = match notify_attr {
        Some(Some(b)) => b,
        Some(None) => return Err(StanzaError::new(Condition::BadRequest)),
        None => cfg.notify_retract,
    };
    if wanted {
        let mut items = Element::new("items", NS_EVENT).with_attr("node", node.clone());
        for id in gone {
            items.append_child(Element::new("retract", NS_EVENT).with_attr("id", id));
        }
        notify(state, owner, &node, &cfg, items).await;
    }
    Ok(None)
}

/// XEP-0060 §8.1 (create, with §8.1.3 configure). Instant nodes are not
/// supported.
async fn create(cx: &Cx<'_>, owner: &BareJid, own: bool, p: &Element) -> IqResult {
    forbid_others(own)?;
    let state = cx.state;
    let Some(c) = p.get_child("create", NS) else {
        return Err(StanzaError::new(Condition::BadRequest));
    };
    if p.children()
        .any(|x| !(x.is("create", NS) || x.is("configure", NS)))
    {
        return Err(StanzaError::new(Condition::BadRequest));
    }
    let node = match c.attr("node") {
        Some(_) => node_name(c)?,
        None => return Err(pubsub_error(Condition::NotAcceptable, "nodeid-required")),
    };
    if node_config(state, owner, &node).await?.is_some() {
        return Err(StanzaError::new(Condition::Conflict));
    }
    let mut cfg = node_defaults(state, &node);
    if let Some(x) = p
        .get_child("configure", NS)
        .and_then(|c| c.get_child("x", NS_DATA))
    {
        for (k, v) in submitted(x, FORM_NODE_CONFIG)?.unwrap_or_default() {
            if cfg.apply(&k, &v).is_err() {
                return Err(StanzaError::with_text(
                    Condition::NotAcceptable,
                    format!("unsupported value for {k}"),
                ));
            }
        }
    }
    create_node(state, owner, &node, &cfg).await?;
    Ok(None)
}

/// XEP-0060 §6.5: all items, the newest `max_items`, or those by id; oldest
/// first.
async fn items(cx: &Cx<'_>, owner: &BareJid, op: &Element) -> IqResult {
    let state = cx.state;
    let node = node_name(op)?;
    let Some(cfg) = node_config(state, owner, &node).await? else {
        return Err(StanzaError::new(Condition::ItemNotFound));
    };
    authorize(state, owner, &node, &cfg, &cx.session.bare).await?;
    let ids: Vec<String> = op
        .children()
        .filter(|c| c.is("item", NS))
        .filter_map(|c| c.attr("id").map(str::to_string))
        .collect();
    let max = match op.attr("max_items") {
        Some(m) => Some(
            m.trim()
                .parse::<usize>()
                .map_err(|_| StanzaError::with_text(Condition::BadRequest, "bad max_items"))?,
        ),
        None => None,
    };
    let ids = (!ids.is_empty()).then_some(ids);
    let mut found = state
        .store
        .pep_items(owner.as_str(), &node, max, ids.as_deref())
        .await?;
    found.reverse();
    let mut el = Element::new("items", NS).with_attr("node", node);
    for it in found {
        el.append_child(item_element(state, NS, &it.id, &it.payload));
    }
    Ok(Some(Element::new("pubsub", NS).with_child(el)))
}

/// `http://jabber.org/protocol/pubsub#owner` requests (the owner's only).
async fn owner_request(cx: &Cx<'_>, kind: IqType, p: &Element) -> IqResult {
    let state = cx.state;
    let owner = &cx.session.bare;
    let mut ops = p.children();
    let (Some(op), None) = (ops.next(), ops.next()) else {
        return Err(StanzaError::new(Condition::BadRequest));
    };
    match (kind, op.name.as_str()) {
        (IqType::Get, "default") => Ok(Some(Element::new("pubsub", NS_OWNER).with_child(
            Element::new("default", NS_OWNER).with_child(NodeConfig::default_for("").form()),
        ))),
        (IqType::Get, "configure") => {
            let node = node_name(op)?;
            let Some(cfg) = node_config(state, owner, &node).await? else {
                return Err(StanzaError::new(Condition::ItemNotFound));
            };
            Ok(Some(
                Element::new("pubsub", NS_OWNER).with_child(
                    Element::new("configure", NS_OWNER)
                        .with_attr("node", node)
                        .with_child(cfg.form()),
                ),
            ))
        }
        (IqType::Set, "configure") => {
            let node = node_name(op)?;
            let Some(mut cfg) = node_config(state, owner, &node).await? else {
                return Err(StanzaError::new(Condition::ItemNotFound));
            };
            let Some(x) = op.get_child("x", NS_DATA) else {
                return Err(StanzaError::with_text(
                    Condition::BadRequest,
                    "missing data form",
                ));
            };
            let Some(fields) = submitted(x, FORM_NODE_CONFIG)? else {
                return Ok(None);
            };
            for (k, v) in fields {
                if cfg.apply(&k, &v).is_err() {
                    return Err(StanzaError::with_text(
                        Condition::NotAcceptable,
                        format!("unsupported value for {k}"),
                    ));
                }
            }
            state
                .store
                .pep_create_or_configure(owner.as_str(), &node, &cfg.to_store())
                .await?;
            Ok(None)
        }
        (IqType::Set, "delete") => {
            let node = node_name(op)?;
            let Some(cfg) = node_config(state, owner, &node).await? else {
                return Err(StanzaError::new(Condition::ItemNotFound));
            };
            let items = state
                .store
                .pep_items(owner.as_str(), &node, None, None)
                .await?;
            state.store.pep_delete_node(owner.as_str(), &node).await?;
            let removed: Vec<(String, String)> =
                items.into_iter().map(|it| (it.id, it.payload)).collect();
            items_removed(state, owner, &node, &removed).await;
            if cfg.notify_delete {
                let del = Element::new("delete", NS_EVENT).with_attr("node", node.clone());
                notify(state, owner, &node, &cfg, del).await;
            }
            Ok(None)
        }
        (IqType::Set, "purge") => {
            let node = node_name(op)?;
            let Some(cfg) = node_config(state, owner, &node).await? else {
                return Err(StanzaError::new(Condition::ItemNotFound));
            };
            let mut removed = Vec::new();
            for it in state
                .store
                .pep_items(owner.as_str(), &node, None, None)
                .await?
            {
                if state
                    .store
                    .pep_retract(owner.as_str(), &node, &it.id)
                    .await?
                {
                    removed.push((it.id, it.payload));
                }
            }
            items_removed(state, owner, &node, &removed).await;
            if cfg.notify_retract {
                let purge = Element::new("purge", NS_EVENT).with_attr("node", node.clone());
                notify(state, owner, &node, &cfg, purge).await;
            }
            Ok(None)
        }
        (IqType::Get, "affiliations") => {
            let node = node_name(op)?;
            if node_config(state, owner, &node).await?.is_none() {
                return Err(StanzaError::new(Condition::ItemNotFound));
            }
            let mut list = Element::new("affiliations", NS_OWNER).with_attr("node", node.clone());
            for (jid, aff) in state.store.pep_affiliations(owner.as_str(), &node).await? {
                list.append_child(
                    Element::new("affiliation", NS_OWNER)
                        .with_attr("jid", jid)
                        .with_attr("affiliation", aff),
                );
            }
            Ok(Some(Element::new("pubsub", NS_OWNER).with_child(list)))
        }
        (IqType::Set, "affiliations") => set_affiliations(state, owner, op).await,
        (_, "subscriptions") => Err(unsupported("manage-subscriptions")),
        _ => Err(StanzaError::new(Condition::BadRequest)),
    }
}

/// XEP-0060 §8.9.2: the owner sets `member` or `none` for bare JIDs (the
/// only affiliations a PEP node needs: who a whitelist node lets read).
/// All changes are checked before any is applied.
async fn set_affiliations(state: &ServerState, owner: &BareJid, op: &Element) -> IqResult {
    let node = node_name(op)?;
    if node_config(state, owner, &node).await?.is_none() {
        return Err(StanzaError::new(Condition::ItemNotFound));
    }
    let mut changes = Vec::new();
    for a in op.children().filter(|c| c.is("affiliation", NS_OWNER)) {
        let jid = a
            .attr("jid")
            .and_then(|j| BareJid::new(j).ok())
            .filter(|j| j != owner)
            .ok_or_else(|| {
                StanzaError::with_text(
                    Condition::BadRequest,
                    "an affiliation needs the bare JID of someone other than the owner",
                )
            })?;
        let aff = match a.attr("affiliation") {
            Some("member") => Some("member"),
            Some("none") => None,
            _ => return Err(unsupported("modify-affiliations")),
        };
        changes.push((jid, aff));
    }
    if changes.is_empty() {
        return Err(StanzaError::with_text(
            Condition::BadRequest,
            "no affiliation to change",
        ));
    }
    let current = state.store.pep_affiliations(owner.as_str(), &node).await?;
    let added = changes
        .iter()
        .filter(|(j, a)| a.is_some() && !current.iter().any(|(c, _)| c == j.as_str()))
        .count();
    if current.len() + added > MAX_AFFILIATIONS {
        return Err(StanzaError::with_text(
            Condition::ResourceConstraint,
            format!("a node lists at most {MAX_AFFILIATIONS} affiliations"),
        ));
    }
    for (jid, aff) in changes {
        state
            .store
            .pep_set_affiliation(owner.as_str(), &node, jid.as_str(), aff)
            .await?;
    }
    Ok(None)
}

// ---------------------------------------------------------------------------
// Expiry (pubsub#item_expire)
// ---------------------------------------------------------------------------

/// Retract every item past its node's `item_expire`, as a retraction by
/// the owner would (notifications, the owning module told). Several nodes
/// of a cluster may sweep at once: only the one whose delete succeeds acts.
/// Returns how many items this call retracted.
pub async fn sweep(state: &ServerState) -> Result<usize, natter_store::StoreError> {
    let mut done = 0;
    loop {
        let now = chrono::Utc::now().timestamp_micros();
        let due = state.store.pep_expired(now, SWEEP_BATCH).await?;
        let batch = due.len();
        for e in due {
            if !state
                .store
                .pep_retract(&e.owner, &e.node, &e.item.id)
                .await?
            {
                continue;
            }
            done += 1;
            let Ok(owner) = BareJid::new(&e.owner) else {
                continue;
            };
            items_removed(
                state,
                &owner,
                &e.node,
                &[(e.item.id.clone(), e.item.payload)],
            )
            .await;
            let cfg = state.store.pep_node(&e.owner, &e.node).await?;
            if let Some(cfg) = cfg.map(|c| NodeConfig::from_store(&c)) {
                if cfg.notify_retract {
                    let items = Element::new("items", NS_EVENT)
                        .with_attr("node", e.node.clone())
                        .with_child(Element::new("retract", NS_EVENT).with_attr("id", e.item.id));
                    notify(state, &owner, &e.node, &cfg, items).await;
                }
            }
        }
        if batch < SWEEP_BATCH {
            return Ok(done);
        }
    }
}

// ---------------------------------------------------------------------------
// Notifications
// ---------------------------------------------------------------------------

fn event_message(owner: &BareJid, to: &FullJid, payload: Element) -> Element {
    Element::new("message", NS_CLIENT)
        .with_attr("from", owner.to_string())
        .with_attr("to", to.to_string())
        .with_attr("type", "headline")
        .with_attr("id", new_id())
        .with_child(Element::new("event", NS_EVENT).with_child(payload))
}

/// The local-or-not bare JIDs a whitelist node lets read, besides the owner.
async fn whitelist_members(state: &ServerState, owner: &BareJid, node: &str) -> Vec<BareJid> {
    match state.store.pep_affiliations(owner.as_str(), node).await {
        Ok(list) => list
            .into_iter()
            .filter(|(_, a)| matches!(a.as_str(), "member" | "publisher"))
            .filter_map(|(j, _)| BareJid::new(&j).ok())
            .collect(),
        Err(e) => {
            tracing::warn!(error = %e, "PEP notification: affiliations read failed");
            Vec::new()
        }
    }
}

/// Whether session `h` has `node+notify` in its capabilities.
pub fn wants(state: &ServerState, h: &SessionHandle, node: &str) -> bool {
    let pep = state.modules.api::<Pep>();
    let map = pep.by_session.lock();
    map.get(&h.id)
        .is_some_and(|(_, f)| f.contains(&format!("{node}+notify")))
}

/// XEP-0163 §4.3: `payload` (an `<items/>`, `<delete/>` or `<purge/>`) to
/// every available resource that should see it.
async fn notify(
    state: &ServerState,
    owner: &BareJid,
    node: &str,
    cfg: &NodeConfig,
    payload: Element,
) {
    let mut targets: Vec<Arc<SessionHandle>> = state.routing.resources(owner);
    let mut readers = Vec::new();
    if cfg.access == Access::Whitelist {
        readers = whitelist_members(state, owner, node).await;
    } else {
        match state.store.roster(owner.as_str()).await {
            Ok((_, roster)) => {
                readers = roster
                    .iter()
                    .filter(|i| has_from(i.subscription))
                    .filter_map(|i| BareJid::new(&i.jid).ok())
                    .collect();
            }
            Err(e) => tracing::warn!(error = %e, "PEP notification: roster read failed"),
        }
    }
    // Contacts here by session; contacts elsewhere by the resources their
    // presence announced with `node+notify` (sent over s2s).
    let mut remote_targets = Vec::new();
    let want = format!("{node}+notify");
    for b in readers {
        if state.serves(b.domain().as_str()) {
            targets.extend(state.routing.resources(&b));
        } else if let Some(res) = state.modules.api::<Pep>().remote.lock().get(&b) {
            for (r, rr) in res {
                if rr.features.as_ref().is_some_and(|f| f.contains(&want)) {
                    if let Ok(full) = b.with_resource_str(r) {
                        remote_targets.push(full);
                    }
                }
            }
        }
    }
    let from = Jid::from(owner.clone());
    for h in targets {
        if !h.is_available() || !wants(state, &h, node) {
            continue;
        }
        if !presence_allowed(state, &from, &h).await {
            continue;
        }
        h.send(event_message(owner, &h.jid, payload.clone()));
    }
    for to in remote_targets {
        let r = Recipient::Remote(to);
        if r.allowed(state, &from).await {
            r.send(state, event_message(owner, r.jid(), payload.clone()));
        }
    }
}

/// XEP-0060 §6.1.7 / XEP-0163 §4.3.2: the last item of each node of each
/// account `h` may follow, for the nodes `features` ask `+notify` for.
async fn send_last_items(state: &ServerState, h: &Arc<SessionHandle>, features: &HashSet<String>) {
    let mut owners = vec![h.bare.clone()];
    match state.store.roster(h.bare.as_str()).await {
        Ok((_, roster)) => {
            for item in roster
                .iter()
                .filter(|i| matches!(i.subscription, Subscription::To | Subscription::Both))
            {
                if let Ok(b) = BareJid::new(&item.jid) {
                    if state.serves(b.domain().as_str()) {
                        owners.push(b);
                    }
                }
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "PEP last items: roster read failed");
            return;
        }
    }
    send_last_items_of(state, h, features, &owners).await;
}

/// `subscriber` was just subscribed to `owner`'s presence (RFC 6121 §3.1.5):
/// its available resources get `owner`'s last items (XEP-0163 §4.3.1).
fn new_subscriber(state: &ServerState, owner: &BareJid, subscriber: &BareJid) {
    let pep = state.modules.api::<Pep>();
    for h in state.routing.resources(subscriber) {
        let features = pep.by_session.lock().get(&h.id).map(|(_, f)| f.clone());
        let Some(features) = features.filter(|_| h.is_available()) else {
            continue;
        };
        let (state, owner) = (state.clone(), owner.clone());
        let tasks = state.tasks.clone();
        tasks.spawn(async move { send_last_items_of(&state, &h, &features, &[owner]).await });
    }
}

/// Who gets notifications: a session here, or a contact's resource on
/// another server.
enum Recipient {
    Local(Arc<SessionHandle>),
    Remote(FullJid),
}

impl Recipient {
    fn jid(&self) -> &FullJid {
        match self {
            Recipient::Local(h) => &h.jid,
            Recipient::Remote(j) => j,
        }
    }

    /// Whether `from`'s presence (and so its notifications) may reach it.
    async fn allowed(&self, state: &ServerState, from: &Jid) -> bool {
        match self {
            Recipient::Local(h) => presence_allowed(state, from, h).await,
            Recipient::Remote(j) => presence_allowed_to(state, from, &Jid::from(j.clone())).await,
        }
    }

    fn send(&self, state: &ServerState, el: Element) {
        match self {
            Recipient::Local(h) => {
                h.send(el);
            }
            Recipient::Remote(_) => {
                if let Some(r) = state.modules.try_api::<dyn api::Remote>() {
                    let _ = r.send(state, &el);
                }
            }
        }
    }
}

async fn send_last_items_of(
    state: &ServerState,
    h: &Arc<SessionHandle>,
    features: &HashSet<String>,
    owners: &[BareJid],
) {
    send_last_items_to(state, &Recipient::Local(h.clone()), features, owners).await
}

async fn send_last_items_to(
    state: &ServerState,
    h: &Recipient,
    features: &HashSet<String>,
    owners: &[BareJid],
) {
    let bare = h.jid().to_bare();
    let nodes_wanted: HashSet<&str> = features
        .iter()
        .filter_map(|f| f.strip_suffix("+notify"))
        .collect();
    if nodes_wanted.is_empty() {
        return;
    }
    for owner in owners {
        if *owner != bare && !h.allowed(state, &Jid::from(owner.clone())).await {
            continue;
        }
        let Ok(nodes) = state.store.pep_nodes(owner.as_str()).await else {
            continue;
        };
        for node in nodes.iter().filter(|n| nodes_wanted.contains(n.as_str())) {
            let Ok(Some(cfg)) = node_config(state, owner, node).await else {
                continue;
            };
            if cfg.send_last == SendLast::Never
                || authorize(state, owner, node, &cfg, &bare).await.is_err()
            {
                continue;
            }
            let Ok(last) = state
                .store
                .pep_items(owner.as_str(), node, Some(1), None)
                .await
            else {
                continue;
            };
            for it in last {
                let mut item = item_element(state, NS_EVENT, &it.id, &it.payload);
                item.set_attr("id", it.id.clone());
                let mut msg = event_message(
                    owner,
                    h.jid(),
                    Element::new("items", NS_EVENT)
                        .with_attr("node", node.clone())
                        .with_child(item),
                );
                if let Some(stamp) = chrono::DateTime::from_timestamp_micros(it.published_micros) {
                    msg.append_child(
                        Element::new("delay", NS_DELAY)
                            .with_attr("from", owner.to_string())
                            .with_attr(
                                "stamp",
                                stamp.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                            ),
                    );
                }
                h.send(state, msg);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Entity capabilities (XEP-0115)
// ---------------------------------------------------------------------------

/// Session `me` broadcast available presence `p`: learn its capabilities
/// and, when they are new for the session, send it the last items.
async fn on_available(state: &ServerState, me: &Arc<SessionHandle>, p: &Element) {
    let pep = state.modules.api::<Pep>();
    let Some(c) = p.get_child("c", NS_CAPS) else {
        pep.by_session.lock().remove(&me.id);
        return;
    };
    let (Some(node), Some(ver)) = (c.attr("node"), c.attr("ver")) else {
        return;
    };
    let hash = c.attr("hash").unwrap_or_default();
    if pep
        .by_session
        .lock()
        .get(&me.id)
        .is_some_and(|(v, _)| v == ver)
    {
        // Same capabilities as before: a presence update, nothing new.
        return;
    }
    let known = pep.by_ver.lock().get(ver).cloned();
    if let Some(features) = known {
        pep.by_session
            .lock()
            .insert(me.id, (ver.to_string(), features.clone()));
        spawn_last_items(state, me, features);
        return;
    }
    {
        let mut asking = pep.asking.lock();
        let now = Instant::now();
        match asking.get_mut(ver) {
            Some((at, waiting)) if now.duration_since(*at) < CAPS_QUERY_TIMEOUT => {
                if !waiting.iter().any(|(id, _)| *id == me.id) {
                    waiting.push((me.id, me.bare.clone()));
                }
                return;
            }
            _ => {
                if asking.len() >= MAX_PENDING {
                    asking.retain(|_, (at, _)| now.duration_since(*at) < CAPS_QUERY_TIMEOUT);
                    if asking.len() >= MAX_PENDING {
                        return;
                    }
                }
                asking.insert(ver.to_string(), (now, vec![(me.id, me.bare.clone())]));
            }
        }
    }
    ask_caps(state, me, node, ver, hash);
}

/// Send `h` a disco#info query for `node#ver`.
fn ask_caps(state: &ServerState, h: &SessionHandle, node: &str, ver: &str, hash: &str) {
    let domain = h.jid.domain().to_string();
    let pending = PendingCaps {
        jid: h.jid.clone(),
        session: h.id,
        node: node.to_string(),
        ver: ver.to_string(),
        hash: hash.to_string(),
        owner: None,
        at: Instant::now(),
    };
    if let Some(q) = caps_query(state, &domain, pending) {
        h.send(q);
    }
}

/// Remember `pending` under a new id and return the disco#info query from
/// `from` to ask it (None when too many are outstanding).
fn caps_query(state: &ServerState, from: &str, pending: PendingCaps) -> Option<Element> {
    let pep = state.modules.api::<Pep>();
    let id = format!("caps-{}", new_id());
    let q = super::iq("get", &id, from, &pending.jid.to_string()).with_child(
        Element::new("query", NS_DISCO_INFO)
            .with_attr("node", format!("{}#{}", pending.node, pending.ver)),
    );
    let mut map = pep.pending.lock();
    if map.len() >= MAX_PENDING {
        // Peers that never answer (or a flood of made-up vers) must not
        // block caps discovery for everyone.
        map.retain(|_, p| p.at.elapsed() < CAPS_QUERY_TIMEOUT);
        if map.len() >= MAX_PENDING {
            return None;
        }
    }
    map.insert(id, pending);
    Some(q)
}

/// The features a disco#info answer lists; remembered for its ver when
/// the answer verifies (XEP-0115 §5.4).
fn answered_features(
    state: &ServerState,
    pending: &PendingCaps,
    query: &Element,
) -> (Features, bool) {
    let features: Features = Arc::new(
        query
            .children()
            .filter(|c| c.is("feature", NS_DISCO_INFO))
            .filter_map(|c| c.attr("var").map(str::to_string))
            .collect(),
    );
    let verified =
        pending.hash == "sha-1" && caps_verification_string(query).as_deref() == Some(&pending.ver);
    if verified {
        let pep = state.modules.api::<Pep>();
        let mut by_ver = pep.by_ver.lock();
        if by_ver.len() >= MAX_CAPS_CACHE {
            by_ver.clear();
        }
        by_ver.insert(pending.ver.clone(), features.clone());
    }
    (features, verified)
}

/// An IQ result/error from a client: if it answers one of our caps
/// queries, use it and return true (dispatch then drops it).
async fn caps_reply(state: &ServerState, from: &Arc<SessionHandle>, iq: &Element) -> bool {
    let Some(id) = iq.attr("id").filter(|i| i.starts_with("caps-")) else {
        return false;
    };
    let pep = state.modules.api::<Pep>();
    let pending = {
        let mut map = pep.pending.lock();
        match map.get(id) {
            Some(p)
                if p.jid == from.jid
                    && (p.session == from.id
                        || (p.session == REMOTE_SESSION
                            && !state.serves(from.jid.domain().as_str()))) =>
            {
                map.remove(id)
            }
            _ => None,
        }
    };
    let Some(pending) = pending else {
        return false;
    };
    if pending.session == REMOTE_SESSION {
        remote_caps_reply(state, pending, iq).await;
        return true;
    }
    let query = iq
        .get_child("query", NS_DISCO_INFO)
        .filter(|_| iq.attr("type") == Some("result"));
    let Some(query) = query else {
        // An error: the next waiting session may answer instead.
        ask_next(state, &pending.ver, from.id);
        return true;
    };
    let (features, verified) = answered_features(state, &pending, query);
    let mut served = vec![(from.id, from.bare.clone())];
    if verified {
        if let Some((_, waiting)) = pep.asking.lock().remove(&pending.ver) {
            served.extend(waiting);
        }
    } else {
        tracing::debug!(jid = %from.jid, node = %pending.node, "caps answer does not verify; used for this session only");
        ask_next(state, &pending.ver, from.id);
    }
    served.sort_unstable_by_key(|(id, _)| *id);
    served.dedup_by_key(|(id, _)| *id);
    for (sid, bare) in served {
        let Some(h) = find_session(state, sid, &bare, &pending.ver) else {
            continue;
        };
        pep.by_session
            .lock()
            .insert(h.id, (pending.ver.clone(), features.clone()));
        spawn_last_items(state, &h, features.clone());
    }
    true
}

/// Presence from a contact on another server to a local user: remember
/// its available resources and their caps (asking for unknown ones), and
/// send new `+notify` resources the addressee's last items.
async fn remote_presence(state: &ServerState, p: &Element) {
    let jid = |a| p.attr(a).and_then(|v| Jid::new(v).ok());
    let (Some(from), Some(to)) = (jid("from"), jid("to")) else {
        return;
    };
    let Ok(from) = from.try_into_full() else {
        return;
    };
    let local = |d: &str| state.serves(d) || state.modules.is_service(d);
    if local(from.domain().as_str()) || !state.serves(to.domain().as_str()) || to.node().is_none() {
        return;
    }
    let pep = state.modules.api::<Pep>();
    let (bare, res) = (from.to_bare(), from.resource().to_string());
    let caps = p.get_child("c", NS_CAPS);
    match p.attr("type") {
        None => {}
        Some("unavailable") => {
            let mut remote = pep.remote.lock();
            if let Some(r) = remote.get_mut(&bare) {
                r.remove(&res);
                if r.is_empty() {
                    remote.remove(&bare);
                }
            }
            return;
        }
        // Subscriptions, probes, errors: nothing about availability.
        Some(_) => return,
    }
    let (Some(node), Some(ver)) = (
        caps.and_then(|c| c.attr("node")),
        caps.and_then(|c| c.attr("ver")),
    ) else {
        return;
    };
    if pep
        .remote
        .lock()
        .get(&bare)
        .and_then(|r| r.get(&res))
        .is_some_and(|r| r.ver == ver)
    {
        return;
    }
    // Only contacts who may get notifications are remembered (not any
    // stranger who sends presence; the map stays theirs).
    let owner = to.to_bare();
    if !subscribed_to(state, &owner, &bare).await {
        return;
    }
    let features = pep.by_ver.lock().get(ver).cloned();
    {
        let mut remote = pep.remote.lock();
        if remote
            .get(&bare)
            .and_then(|r| r.get(&res))
            .is_some_and(|r| r.ver == ver)
        {
            return;
        }
        if remote.len() >= MAX_REMOTE_CONTACTS && !remote.contains_key(&bare) {
            return;
        }
        let resources = remote.entry(bare).or_default();
        if resources.len() >= MAX_REMOTE_RESOURCES && !resources.contains_key(&res) {
            return;
        }
        resources.insert(
            res,
            RemoteResource {
                ver: ver.to_string(),
                features: features.clone(),
            },
        );
    }
    match features {
        Some(f) => spawn_remote_last_items(state, from, owner, f),
        None => {
            let pending = PendingCaps {
                jid: from,
                session: REMOTE_SESSION,
                node: node.to_string(),
                ver: ver.to_string(),
                hash: caps
                    .and_then(|c| c.attr("hash"))
                    .unwrap_or_default()
                    .to_string(),
                owner: Some(owner.clone()),
                at: Instant::now(),
            };
            let remote = state.modules.try_api::<dyn api::Remote>();
            if let (Some(q), Some(r)) = (caps_query(state, owner.as_str(), pending), remote) {
                let _ = r.send(state, &q);
            }
        }
    }
}

/// A remote resource answered our caps query.
async fn remote_caps_reply(state: &ServerState, pending: PendingCaps, iq: &Element) {
    let pep = state.modules.api::<Pep>();
    let Some(query) = iq
        .get_child("query", NS_DISCO_INFO)
        .filter(|_| iq.attr("type") == Some("result"))
    else {
        return;
    };
    let (features, _) = answered_features(state, &pending, query);
    let bare = pending.jid.to_bare();
    {
        let mut remote = pep.remote.lock();
        let Some(r) = remote
            .get_mut(&bare)
            .and_then(|r| r.get_mut(pending.jid.resource().as_str()))
            .filter(|r| r.ver == pending.ver)
        else {
            return;
        };
        r.features = Some(features.clone());
    }
    if let Some(owner) = pending.owner {
        spawn_remote_last_items(state, pending.jid, owner, features);
    }
}

/// XEP-0163 §4.3.1 for a remote contact's resource: `owner`'s last items
/// of the nodes it wants.
fn spawn_remote_last_items(state: &ServerState, to: FullJid, owner: BareJid, features: Features) {
    let state = state.clone();
    let tasks = state.tasks.clone();
    tasks.spawn(async move {
        if subscribed_to(&state, &owner, &to.to_bare()).await {
            send_last_items_to(&state, &Recipient::Remote(to), &features, &[owner]).await;
        }
    });
}

/// Whether `contact` has a subscription to `owner`'s presence (from/both
/// in `owner`'s roster).
async fn subscribed_to(state: &ServerState, owner: &BareJid, contact: &BareJid) -> bool {
    match state.store.roster(owner.as_str()).await {
        Ok((_, roster)) => roster
            .iter()
            .any(|i| has_from(i.subscription) && i.jid == contact.as_str()),
        Err(_) => false,
    }
}

/// The session with id `sid` whose current presence advertises `ver`.
fn find_session(
    state: &ServerState,
    sid: u64,
    bare: &BareJid,
    ver: &str,
) -> Option<Arc<SessionHandle>> {
    let has_ver = |h: &SessionHandle| {
        h.available_presence()
            .is_some_and(|p| p.get_child("c", NS_CAPS).and_then(|c| c.attr("ver")) == Some(ver))
    };
    state
        .routing
        .session_by_id(bare, sid)
        .filter(|h| has_ver(h))
}

/// Ask the next session waiting for `ver` (after `done` failed to give a
/// verifiable answer).
fn ask_next(state: &ServerState, ver: &str, done: u64) {
    let pep = state.modules.api::<Pep>();
    let next = {
        let mut asking = pep.asking.lock();
        let Some((at, waiting)) = asking.get_mut(ver) else {
            return;
        };
        waiting.retain(|(s, _)| *s != done);
        *at = Instant::now();
        let next = waiting.first().cloned();
        if next.is_none() {
            asking.remove(ver);
        }
        next
    };
    let Some((sid, bare)) = next else { return };
    if let Some(h) = state.routing.session_by_id(&bare, sid) {
        let caps = h
            .available_presence()
            .and_then(|p| p.get_child("c", NS_CAPS).cloned());
        if let Some(c) = caps {
            if c.attr("ver") == Some(ver) {
                ask_caps(
                    state,
                    &h,
                    c.attr("node").unwrap_or_default(),
                    ver,
                    c.attr("hash").unwrap_or_default(),
                );
            }
        }
    }
}

fn spawn_last_items(state: &ServerState, h: &Arc<SessionHandle>, features: Arc<HashSet<String>>) {
    let state = state.clone();
    let h = h.clone();
    let tasks = state.tasks.clone();
    tasks.spawn(async move { send_last_items(&state, &h, &features).await });
}

// ---------------------------------------------------------------------------
// Service discovery on the account (XEP-0030 / XEP-0060 §5)
// ---------------------------------------------------------------------------

/// disco#items of an account: its nodes that `who` may read.
async fn disco_items(
    state: &ServerState,
    owner: &BareJid,
    who: &BareJid,
) -> Result<Vec<Element>, StanzaError> {
    let mut q = Vec::new();
    for node in state.store.pep_nodes(owner.as_str()).await? {
        let Some(cfg) = node_config(state, owner, &node).await? else {
            continue;
        };
        if authorize(state, owner, &node, &cfg, who).await.is_ok() {
            q.push(
                Element::new("item", NS_DISCO_ITEMS)
                    .with_attr("jid", owner.to_string())
                    .with_attr("node", node),
            );
        }
    }
    Ok(q)
}

/// disco#info of one node (XEP-0060 §5.3); item-not-found when it doesn't
/// exist or `who` may not read it.
async fn disco_node_info(
    state: &ServerState,
    owner: &BareJid,
    node: &str,
    who: &BareJid,
) -> IqResult {
    let Some(cfg) = node_config(state, owner, node).await? else {
        return Err(StanzaError::new(Condition::ItemNotFound));
    };
    if authorize(state, owner, node, &cfg, who).await.is_err() {
        return Err(StanzaError::new(Condition::ItemNotFound));
    }
    Ok(Some(
        Element::new("query", NS_DISCO_INFO)
            .with_attr("node", node)
            .with_child(
                Element::new("identity", NS_DISCO_INFO)
                    .with_attr("category", "pubsub")
                    .with_attr("type", "leaf"),
            )
            .with_child(Element::new("feature", NS_DISCO_INFO).with_attr("var", NS)),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_open_omemo_and_close_private_nodes() {
        let d = NodeConfig::default_for("eu.siacs.conversations.axolotl.devicelist");
        assert_eq!(d.access, Access::Open);
        let d = NodeConfig::default_for("eu.siacs.conversations.axolotl.bundles:1234");
        assert_eq!(d.access, Access::Open);
        let d = NodeConfig::default_for("urn:xmpp:omemo:2:bundles");
        assert_eq!((d.access, d.max_items), (Access::Open, MAX_NODE_ITEMS));
        let d = NodeConfig::default_for("urn:xmpp:bookmarks:1");
        assert_eq!(
            (d.access, d.send_last),
            (Access::Whitelist, SendLast::Never)
        );
        let d = NodeConfig::default_for("urn:xmpp:avatar:metadata");
        assert_eq!((d.access, d.max_items), (Access::Presence, 1));
    }

    #[test]
    fn store_round_trip_and_preconditions() {
        let mut c = NodeConfig::default_for("x");
        c.apply("pubsub#max_items", "max").unwrap();
        c.apply("pubsub#send_last_published_item", "never").unwrap();
        c.apply("pubsub#notify_retract", "false").unwrap();
        let back = NodeConfig::from_store(&c.to_store());
        assert_eq!(back, c);
        assert!(c.satisfies("pubsub#max_items", "max"));
        assert!(!c.satisfies("pubsub#max_items", "1"));
        assert!(c.satisfies("pubsub#access_model", "presence"));
        assert!(!c.satisfies("pubsub#access_model", "open"));
        assert!(!c.satisfies("pubsub#title", "x"));
        assert!(c.apply("pubsub#max_items", "0").is_err());
        assert!(c.apply("pubsub#max_items", "1001").is_err());
        assert!(c.apply("pubsub#access_model", "roster").is_err());
        c.apply("pubsub#persist_items", "0").unwrap();
        assert_eq!(NodeConfig::from_store(&c.to_store()), c);
        assert_eq!(c.to_store().max_items, 1);
    }
}
