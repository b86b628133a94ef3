//! 24-hour statuses ("stories") on PEP (XEP-0163), after Movim's social
//! feeds (XEP-0472): each story is an Atom entry published as an item of
//! the author's `urn:xmpp:pubsub-stories:0` node. PEP does the storage,
//! authorization and notifications; this module owns the node's rules:
//!
//! - Defaults (`api::PepNodes`): access `presence` (the author's contacts),
//!   `pubsub#item_expire` = `stories.item_expire_secs` (24 h), room for
//!   `stories.max_live` items. `whitelist` with member affiliations
//!   (XEP-0060 §8.9) shows stories to a chosen list; `open` is refused.
//! - Limits, checked before PEP sees the publish: an item is an Atom
//!   `<entry/>` of at most `stories.max_item_bytes`; at most
//!   `stories.max_live` live stories; `pubsub#item_expire` between 1 s and
//!   the configured lifetime (a test may publish with a 1 s TTL).
//! - Media: a story links files of the upload service (XEP-0363); when the
//!   story goes (expiry, retraction, purge, node deletion) the author's
//!   uploads it links are deleted (`api::Files::message_removed`).
//! - Seen receipts: a viewer sends the author's bare JID a message with
//!   `<seen xmlns='urn:natter:stories:0' item='…'/>`. The server checks the
//!   viewer may read the story, records it for the author and passes it to
//!   the author's available resources only: it is never routed, archived,
//!   carbon-copied or queued offline. The author reads who saw what with
//!   `<iq type='get'><query xmlns='urn:natter:stories:0' item='…'/></iq>`
//!   (no `item`: every live story). A story's receipts go with it.

use super::{api, new_id, Cx, Flow, Hook, HookStanza, Iq, IqResult, Kind, Module, Shared, Target};
use crate::config::Config;
use crate::error::{Condition, StanzaError};
use crate::state::ServerState;
use async_trait::async_trait;
use jid::BareJid;
use natter_store::{PepNodeConfig, StoreError};
use natter_xml::{Element, NS_CLIENT};
use std::sync::Arc;

/// The PEP node holding a user's stories.
pub const NODE: &str = "urn:xmpp:pubsub-stories:0";
/// natter's namespace for seen receipts and the author's query.
pub const NS: &str = "urn:natter:stories:0";
pub const NS_ATOM: &str = "http://www.w3.org/2005/Atom";
/// The Converse.js plugin of the chat page.
const WEB_PLUGIN: &str = include_str!("../../web/stories.js");
/// Key-value namespace of the seen lists (one entry per story).
const KV_SEEN: &str = "urn:natter:stories:0#seen";
/// Locks serializing seen-list updates (read, add, write) per author hash.
const SEEN_LOCKS: usize = 64;

pub struct Stories {
    seen_locks: Vec<tokio::sync::Mutex<()>>,
}

impl Default for Stories {
    fn default() -> Self {
        Stories {
            seen_locks: (0..SEEN_LOCKS).map(|_| Default::default()).collect(),
        }
    }
}

#[async_trait]
impl Module for Stories {
    fn name(&self) -> &'static str {
        "stories"
    }
    fn depends(&self) -> &'static [&'static str] {
        &["pep"]
    }
    fn features(&self) -> &'static [&'static str] {
        &[NS]
    }
    fn account_features(&self) -> &'static [&'static str] {
        &[NS]
    }
    fn iq_payloads(&self) -> &'static [(&'static str, &'static str)] {
        &[(NS, "query")]
    }
    fn hooks(&self) -> &'static [(Hook, i32)] {
        // After blocking (100): a blocked viewer's receipt never gets here.
        &[
            (Hook::PreRoute(Kind::Iq), 40),
            (Hook::PreRoute(Kind::Message), 40),
        ]
    }
    fn provide(self: Arc<Self>, shared: &mut Shared) {
        shared.provide::<dyn api::PepNodes>(self);
    }
    /// The chat page's stories plugin (web/stories.js, compiled in like the
    /// page itself).
    fn http(&self) -> Option<axum::Router<ServerState>> {
        Some(axum::Router::new().route(
            "/stories.js",
            axum::routing::get(|| async {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/javascript; charset=utf-8",
                    )],
                    WEB_PLUGIN,
                )
            }),
        ))
    }
    async fn on_stanza(
        &self,
        hook: Hook,
        cx: &Cx<'_>,
        s: &HookStanza<'_>,
    ) -> Result<Flow, StanzaError> {
        match hook {
            Hook::PreRoute(Kind::Iq) => {
                check_pubsub(cx, s).await?;
                Ok(Flow::Continue)
            }
            Hook::PreRoute(Kind::Message) => match s.stanza.get_child("seen", NS) {
                Some(seen) => {
                    self.seen(cx, s, seen).await?;
                    Ok(Flow::Stop)
                }
                None => Ok(Flow::Continue),
            },
            _ => Ok(Flow::Continue),
        }
    }
    async fn handle_iq(&self, cx: &Cx<'_>, iq: &Iq) -> IqResult {
        let own = match &iq.target {
            Target::Account(b) => *b == cx.session.bare,
            Target::Server(_) => iq.stanza.attr("to").is_none(),
        };
        if !own {
            return Err(StanzaError::with_text(
                Condition::Forbidden,
                "only the author sees who saw their stories",
            ));
        }
        if iq.kind != super::IqType::Get {
            return Err(StanzaError::new(Condition::BadRequest));
        }
        seen_query(cx.state, &cx.session.bare, iq.payload().attr("item")).await
    }
}

#[async_trait]
impl api::PepNodes for Stories {
    fn defaults(&self, config: &Config, node: &str) -> Option<PepNodeConfig> {
        (node == NODE).then(|| PepNodeConfig {
            access_model: "presence".into(),
            max_items: config.stories.max_live,
            item_expire_secs: config.stories.item_expire_secs,
            ..PepNodeConfig::default()
        })
    }

    async fn items_removed(
        &self,
        state: &ServerState,
        owner: &BareJid,
        node: &str,
        items: &[(String, String)],
    ) {
        if node != NODE {
            return;
        }
        let files = state.modules.try_api::<dyn api::Files>();
        for (id, payload) in items {
            if let Some(files) = &files {
                files.message_removed(state, payload, owner).await;
            }
            if let Err(e) = state.store.kv_delete(owner.as_str(), KV_SEEN, id).await {
                tracing::warn!(error = %e, "cannot delete a story's seen list");
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Publishing and configuring the stories node
// ---------------------------------------------------------------------------

/// An IQ publishing to or configuring the sender's own stories node: the
/// story rules, before PEP handles it.
async fn check_pubsub(cx: &Cx<'_>, s: &HookStanza<'_>) -> Result<(), StanzaError> {
    let iq = s.stanza;
    if iq.attr("type") != Some("set") {
        return Ok(());
    }
    let own = match s.to {
        None => true,
        Some(to) => to.node().is_some() && to.to_bare() == cx.session.bare,
    };
    let Some(p) = iq.children().next().filter(|_| own) else {
        return Ok(());
    };
    let stories = |el: &Element| el.attr("node") == Some(NODE);
    let limits = &cx.state.config.stories;
    if p.is("pubsub", super::pep::NS_OWNER) {
        if let Some(x) = p
            .get_child("configure", super::pep::NS_OWNER)
            .filter(|c| stories(c))
            .and_then(|c| c.get_child("x", super::pep::NS_DATA))
        {
            check_options(cx.state, x)?;
        }
        return Ok(());
    }
    if !p.is("pubsub", super::pep::NS) {
        return Ok(());
    }
    if let Some(x) = p
        .get_child("configure", super::pep::NS)
        .filter(|_| p.get_child("create", super::pep::NS).is_some_and(stories))
        .and_then(|c| c.get_child("x", super::pep::NS_DATA))
    {
        check_options(cx.state, x)?;
    }
    let Some(publish) = p
        .get_child("publish", super::pep::NS)
        .filter(|e| stories(e))
    else {
        return Ok(());
    };
    if let Some(x) = p
        .get_child("publish-options", super::pep::NS)
        .and_then(|o| o.get_child("x", super::pep::NS_DATA))
    {
        check_options(cx.state, x)?;
    }
    let Some(item) = publish.get_child("item", super::pep::NS) else {
        return Ok(()); // PEP answers item-required
    };
    let Some(entry) = item.children().next() else {
        return Ok(()); // PEP answers payload-required
    };
    if !entry.is("entry", NS_ATOM) {
        return Err(StanzaError::with_text(
            Condition::BadRequest,
            "a story is an Atom <entry xmlns='http://www.w3.org/2005/Atom'/>",
        )
        .with_app("invalid-payload", super::pep::NS_ERRORS));
    }
    if entry.to_string().len() > limits.max_item_bytes {
        return Err(StanzaError::with_text(
            Condition::NotAcceptable,
            format!("a story item is at most {} bytes", limits.max_item_bytes),
        )
        .with_app("payload-too-big", super::pep::NS_ERRORS));
    }
    let owner = &cx.session.bare;
    let live = cx
        .state
        .store
        .pep_items(owner.as_str(), NODE, None, None)
        .await?;
    let replaces = item
        .attr("id")
        .is_some_and(|id| live.iter().any(|it| it.id == id));
    if !replaces && live.len() >= limits.max_live as usize {
        return Err(StanzaError::with_text(
            Condition::ResourceConstraint,
            format!(
                "at most {} live stories: retract one or wait for one to expire",
                limits.max_live
            ),
        ));
    }
    Ok(())
}

/// Options for the stories node that PEP would accept but stories don't.
fn check_options(state: &ServerState, x: &Element) -> Result<(), StanzaError> {
    let most = state.config.stories.item_expire_secs;
    for f in x.children().filter(|c| c.is("field", super::pep::NS_DATA)) {
        let value = f
            .child_text("value", super::pep::NS_DATA)
            .unwrap_or_default();
        match f.attr("var") {
            Some("pubsub#item_expire") => match value.trim().parse::<u64>() {
                Ok(n) if (1..=most).contains(&n) => {}
                _ => {
                    return Err(StanzaError::with_text(
                        Condition::NotAcceptable,
                        format!("stories: pubsub#item_expire is 1 to {most} seconds"),
                    ))
                }
            },
            Some("pubsub#access_model") if !matches!(value.trim(), "presence" | "whitelist") => {
                return Err(StanzaError::with_text(
                    Condition::NotAcceptable,
                    "stories are for contacts (presence) or a chosen list (whitelist)",
                ))
            }
            _ => {}
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Seen receipts
// ---------------------------------------------------------------------------

/// One viewer of one story, as kept in the author's seen list.
#[derive(serde::Serialize, serde::Deserialize)]
struct Viewer {
    jid: String,
    /// When they first saw it, unix microseconds.
    at: i64,
}

impl Stories {
    /// A viewer's `<seen/>` for the story `item` of the message's
    /// recipient: checked, recorded, passed to the author's resources.
    async fn seen(
        &self,
        cx: &Cx<'_>,
        s: &HookStanza<'_>,
        seen: &Element,
    ) -> Result<(), StanzaError> {
        let state = cx.state;
        let viewer = &cx.session.bare;
        let author =
            s.to.filter(|t| t.resource().is_none())
                .map(|t| t.to_bare())
                .filter(|b| b.node().is_some() && state.serves(b.domain().as_str()) && b != viewer)
                .ok_or_else(|| {
                    StanzaError::with_text(
                        Condition::BadRequest,
                        "a seen receipt goes to the story's author: a bare JID of this server",
                    )
                })?;
        if seen.attr("node").is_some_and(|n| n != NODE) {
            return Err(StanzaError::with_text(
                Condition::BadRequest,
                format!("seen receipts are for {NODE}"),
            ));
        }
        let item = seen
            .attr("item")
            .filter(|i| !i.is_empty() && i.len() <= super::pep::MAX_NAME)
            .ok_or_else(|| {
                StanzaError::with_text(Condition::BadRequest, "a seen receipt names its item")
            })?;
        let pep = state.modules.api::<dyn api::Pep>();
        pep.may_read(state, &author, NODE, viewer).await?;
        let live = state
            .store
            .pep_items(author.as_str(), NODE, Some(1), Some(&[item.to_string()]))
            .await?;
        if live.is_empty() {
            return Err(StanzaError::with_text(
                Condition::ItemNotFound,
                "no such story (it may have expired)",
            ));
        }
        let at = chrono::Utc::now().timestamp_micros();
        let first = self.record(state, &author, item, viewer, at).await?;
        if !first {
            return Ok(());
        }
        for h in state.routing.resources(&author) {
            if !h.is_available() {
                continue;
            }
            h.send(
                Element::new("message", NS_CLIENT)
                    .with_attr("from", viewer.to_string())
                    .with_attr("to", h.jid.to_string())
                    .with_attr("type", "headline")
                    .with_attr("id", new_id())
                    .with_child(seen_element(item, &viewer.to_string(), at)),
            );
        }
        Ok(())
    }

    /// Add `viewer` to the seen list of `author`'s `item`; false when they
    /// were on it already.
    async fn record(
        &self,
        state: &ServerState,
        author: &BareJid,
        item: &str,
        viewer: &BareJid,
        at: i64,
    ) -> Result<bool, StanzaError> {
        let lock = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            author.as_str().hash(&mut h);
            &self.seen_locks[(h.finish() as usize) % SEEN_LOCKS]
        };
        let _guard = lock.lock().await;
        let mut list = viewers(state, author, item).await?;
        if list.iter().any(|v| v.jid == viewer.as_str()) {
            return Ok(false);
        }
        list.push(Viewer {
            jid: viewer.to_string(),
            at,
        });
        let json = serde_json::to_string(&list)
            .map_err(|_| StanzaError::new(Condition::InternalServerError))?;
        match state
            .store
            .kv_put(author.as_str(), KV_SEEN, item, &json)
            .await
        {
            Ok(()) => Ok(true),
            // A full list keeps its first viewers; the author still hears live.
            Err(StoreError::QuotaExceeded) => Ok(true),
            Err(e) => Err(e.into()),
        }
    }
}

async fn viewers(
    state: &ServerState,
    author: &BareJid,
    item: &str,
) -> Result<Vec<Viewer>, StanzaError> {
    Ok(state
        .store
        .kv_get(author.as_str(), KV_SEEN, item)
        .await?
        .and_then(|v| serde_json::from_str(&v).ok())
        .unwrap_or_default())
}

fn seen_element(item: &str, jid: &str, at: i64) -> Element {
    let mut el = Element::new("seen", NS)
        .with_attr("node", NODE)
        .with_attr("item", item)
        .with_attr("jid", jid);
    if let Some(t) = chrono::DateTime::from_timestamp_micros(at) {
        el.set_attr(
            "stamp",
            t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        );
    }
    el
}

/// The author's view: who saw `item` (or each live story), first first.
async fn seen_query(state: &ServerState, author: &BareJid, item: Option<&str>) -> IqResult {
    let items: Vec<String> = match item {
        Some(i) => vec![i.to_string()],
        None => state
            .store
            .pep_items(author.as_str(), NODE, None, None)
            .await?
            .into_iter()
            .map(|it| it.id)
            .collect(),
    };
    let mut q = Element::new("query", NS);
    if let Some(i) = item {
        q.set_attr("item", i);
    }
    for id in &items {
        for v in viewers(state, author, id).await? {
            q.append_child(seen_element(id, &v.jid, v.at));
        }
    }
    Ok(Some(q))
}
