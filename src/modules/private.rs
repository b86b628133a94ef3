//! XEP-0049 Private XML Storage (`jabber:iq:private`), kept where Prosody
//! keeps it: as PEP items (XEP-0223) of the owner — node = the element's
//! namespace, item id = its name, access model `whitelist` (the owner
//! only), never sent as a last item. So a client reading
//! `storage:bookmarks` through PEP sees what another stored here, backups
//! carry it, and no new store method is needed.
//!
//! Only the account itself reads or writes (forbidden otherwise);
//! `jabber:*` and `http://jabber.org/*` namespaces are refused with
//! not-acceptable (XEP-0049 §3). Storing an empty element deletes it.
//! Sizes are bounded per element and per account.

use super::{Cx, Iq, IqResult, IqType, Module};
use crate::error::{Condition, StanzaError};
use crate::state::ServerState;
use async_trait::async_trait;
use jid::BareJid;
use natter_store::PepNodeConfig;
use natter_xml::{Element, Limits};

pub const NS: &str = "jabber:iq:private";

/// Largest stored element, serialized.
pub const MAX_ELEMENT_BYTES: usize = 64 * 1024;
/// Most bytes of private XML one account keeps.
pub const MAX_ACCOUNT_BYTES: usize = 1024 * 1024;
/// Longest namespace (a PEP node name) or element name.
const MAX_NAME: usize = 1024;
/// Marks the PEP nodes this module created, for the per-account total
/// (in `publish_model`, a column the PEP module writes but never reads).
const MARK: &str = ";private=1";
/// PEP holds at most this many items per node; one per element name.
const MAX_ITEMS: u32 = 1000;
/// Most PEP nodes an account owns (as the PEP module allows).
const MAX_NODES: usize = 512;

pub struct Private;

#[async_trait]
impl Module for Private {
    fn name(&self) -> &'static str {
        "private"
    }
    fn features(&self) -> &'static [&'static str] {
        &[NS]
    }
    fn iq_payloads(&self) -> &'static [(&'static str, &'static str)] {
        &[(NS, "query")]
    }
    async fn handle_iq(&self, cx: &Cx<'_>, iq: &Iq) -> IqResult {
        if !iq.is_own_account() {
            return Err(StanzaError::new(Condition::Forbidden));
        }
        let owner = iq.from.to_bare();
        let query = iq.payload();
        let mut elements = query.children().peekable();
        if elements.peek().is_none() {
            return Err(StanzaError::with_text(
                Condition::NotAcceptable,
                "name the element to get or set",
            ));
        }
        for e in query.children() {
            check_name(e)?;
        }
        match iq.kind {
            IqType::Get => {
                let mut answer = Element::new("query", NS);
                for e in elements {
                    answer.append_child(load(cx.state, &owner, e).await?);
                }
                Ok(Some(answer))
            }
            IqType::Set => {
                let sets: Vec<(&Element, String)> = elements.map(|e| (e, e.to_string())).collect();
                check_room(cx.state, &owner, &sets).await?;
                for (e, xml) in &sets {
                    save(cx.state, &owner, e, xml).await?;
                }
                Ok(None)
            }
        }
    }
}

/// XEP-0049 §3: reserved namespaces, and names PEP can hold.
fn check_name(e: &Element) -> Result<(), StanzaError> {
    if e.ns.starts_with("jabber:") || e.ns.starts_with("http://jabber.org/") {
        return Err(StanzaError::with_text(
            Condition::NotAcceptable,
            "jabber:* and http://jabber.org/* namespaces are reserved",
        ));
    }
    if e.ns.is_empty() || e.ns.len() > MAX_NAME || e.name.len() > MAX_NAME {
        return Err(StanzaError::new(Condition::NotAcceptable));
    }
    Ok(())
}

fn is_empty(e: &Element) -> bool {
    e.children.is_empty() && e.attrs.is_empty()
}

/// The stored element, or the empty one asked for (XEP-0049 §2.2).
async fn load(state: &ServerState, owner: &BareJid, e: &Element) -> Result<Element, StanzaError> {
    let ids = [e.name.clone()];
    let stored = state
        .store
        .pep_items(owner.as_str(), &e.ns, Some(1), Some(&ids))
        .await?;
    let Some(item) = stored.first() else {
        return Ok(Element::new(e.name.clone(), e.ns.clone()));
    };
    natter_xml::parse_frame(item.payload.as_bytes(), &limits(state)).map_err(|err| {
        tracing::error!(error = %err, "stored private XML does not parse");
        StanzaError::new(Condition::InternalServerError)
    })
}

/// Per element and per account size limits, counting what `sets` replace.
async fn check_room(
    state: &ServerState,
    owner: &BareJid,
    sets: &[(&Element, String)],
) -> Result<(), StanzaError> {
    if sets.iter().any(|(_, xml)| xml.len() > MAX_ELEMENT_BYTES) {
        return Err(StanzaError::with_text(
            Condition::NotAcceptable,
            format!("a private element may have at most {MAX_ELEMENT_BYTES} bytes"),
        ));
    }
    let replaced = |node: &str, id: &str| sets.iter().any(|(e, _)| e.ns == node && e.name == id);
    let mut total: usize = sets
        .iter()
        .filter(|(e, _)| !is_empty(e))
        .map(|(_, xml)| xml.len())
        .sum();
    for node in state.store.pep_nodes(owner.as_str()).await? {
        let ours = state
            .store
            .pep_node(owner.as_str(), &node)
            .await?
            .is_some_and(|c| c.publish_model.contains(MARK));
        if !ours {
            continue;
        }
        for item in state
            .store
            .pep_items(owner.as_str(), &node, None, None)
            .await?
        {
            if !replaced(&node, &item.id) {
                total += item.payload.len();
            }
        }
    }
    if total > MAX_ACCOUNT_BYTES {
        return Err(StanzaError::with_text(
            Condition::ResourceConstraint,
            format!("private storage is limited to {MAX_ACCOUNT_BYTES} bytes per account"),
        ));
    }
    Ok(())
}

async fn save(
    state: &ServerState,
    owner: &BareJid,
    e: &Element,
    xml: &str,
) -> Result<(), StanzaError> {
    let store = &state.store;
    let user = owner.as_str();
    if is_empty(e) {
        store.pep_retract(user, &e.ns, &e.name).await?;
        return Ok(());
    }
    match store.pep_node(user, &e.ns).await? {
        // A PEP node of that name others may read: private data stays out.
        Some(c) if c.access_model != "whitelist" => {
            return Err(StanzaError::with_text(
                Condition::Conflict,
                "a PEP node of this namespace is readable by others",
            ))
        }
        Some(_) => {}
        None => {
            if store.pep_nodes(user).await?.len() >= MAX_NODES {
                return Err(StanzaError::with_text(
                    Condition::ResourceConstraint,
                    "too many namespaces",
                ));
            }
            let cfg = PepNodeConfig {
                access_model: "whitelist".into(),
                max_items: MAX_ITEMS,
                publish_model: format!("publishers{MARK}"),
                send_last_published_item: "never".into(),
                ..PepNodeConfig::default()
            };
            store.pep_create_or_configure(user, &e.ns, &cfg).await?;
        }
    }
    store.pep_publish(user, &e.ns, &e.name, xml).await?;
    Ok(())
}

fn limits(state: &ServerState) -> Limits {
    crate::c2s_limits(&state.config, true)
}
