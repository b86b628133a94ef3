//! Protocol modules, one file per XEP family. A module declares its disco
//! features, the IQ payloads it answers and the stream features it offers
//! as data; `Modules` builds the dispatch table from those declarations.
//!
//! Invariant: every stanza reaching a module has a `from` stamped by the
//! c2s session (the sender's full JID) and a syntactically valid `to`.

pub mod blocking;
mod cache;
pub mod carbons;
pub mod disco;
pub mod last;
pub mod mam;
pub mod message;
pub mod offline;
pub mod pep;
pub mod ping;
pub mod presence;
pub mod register;
pub mod roster;
pub mod vcard;
pub mod version;

use crate::error::{Condition, StanzaError};
use crate::router::SessionHandle;
use crate::state::ServerState;
use async_trait::async_trait;
use jid::{BareJid, FullJid, Jid};
use natter_xml::{Element, NS_CLIENT};
use std::sync::Arc;

/// Who an IQ is for, once routing decided the server answers it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// The server itself (no `to`, or `to` = a served domain).
    Server(String),
    /// An account hosted here, answered by the server on its behalf
    /// (RFC 6120 §10.5.3.1: `to` absent means the sender's own account for
    /// account-level namespaces such as roster and vCard).
    Account(BareJid),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IqType {
    Get,
    Set,
}

/// A request IQ for a module: the whole stanza plus what routing found.
pub struct Iq {
    pub stanza: Element,
    pub kind: IqType,
    pub from: FullJid,
    pub target: Target,
}

impl Iq {
    pub fn payload(&self) -> &Element {
        self.stanza
            .children()
            .next()
            .expect("dispatch checked one payload")
    }

    /// True when the IQ targets the sender's own account (or the server
    /// with no `to`, which RFC 6120 treats as the account).
    pub fn is_own_account(&self) -> bool {
        match &self.target {
            Target::Account(b) => *b == self.from.to_bare(),
            Target::Server(_) => self.stanza.attr("to").is_none(),
        }
    }
}

/// The requesting session and the server.
pub struct Cx<'a> {
    pub state: &'a ServerState,
    pub session: &'a Arc<SessionHandle>,
}

/// (namespace, element name) of an IQ payload.
pub type PayloadKey = (&'static str, &'static str);

pub type IqResult = Result<Option<Element>, StanzaError>;

#[async_trait]
pub trait Module: Send + Sync + 'static {
    /// disco#info features this module adds to the server.
    fn features(&self) -> &'static [&'static str] {
        &[]
    }
    /// disco#info features this module adds to each account (bare JID).
    fn account_features(&self) -> &'static [&'static str] {
        &[]
    }
    /// IQ payloads this module answers: (namespace, element name).
    fn iq_payloads(&self) -> &'static [(&'static str, &'static str)] {
        &[]
    }
    /// Stream features offered after authentication.
    fn stream_features(&self) -> Vec<Element> {
        Vec::new()
    }
    async fn handle_iq(&self, _cx: &Cx<'_>, _iq: &Iq) -> IqResult {
        Err(StanzaError::new(Condition::FeatureNotImplemented))
    }
    /// Called once when a bound session ends, before it leaves the router.
    async fn session_closed(&self, _cx: &Cx<'_>) {}
}

pub struct Modules {
    list: Vec<Arc<dyn Module>>,
    /// (namespace, element) → module; a handful of entries, scanned linearly.
    iq: Vec<(PayloadKey, Arc<dyn Module>)>,
    /// Modules whose in-memory state other modules consult (also in `list`
    /// when registered by `standard`).
    pub blocking: Arc<blocking::Blocking>,
    pub pep: Arc<pep::Pep>,
    pub last: Arc<last::Last>,
    pub mam: Arc<mam::Mam>,
    /// Offline-queue coordination (XEP-0160): catch-ups and pushes per user.
    pub offline: offline::Offline,
}

impl Modules {
    pub fn new(list: Vec<Arc<dyn Module>>) -> Self {
        let mut iq: Vec<(PayloadKey, Arc<dyn Module>)> = Vec::new();
        for m in &list {
            for key in m.iq_payloads() {
                assert!(
                    iq.iter().all(|(k, _)| k != key),
                    "two modules claim IQ payload {key:?}"
                );
                iq.push((*key, m.clone()));
            }
        }
        Modules {
            list,
            iq,
            blocking: Arc::default(),
            pep: Arc::default(),
            last: Arc::default(),
            mam: Arc::default(),
            offline: offline::Offline::default(),
        }
    }

    /// The modules natter runs.
    pub fn standard() -> Self {
        Self::standard_with(Vec::new())
    }

    /// The standard modules, then `extra`.
    pub fn standard_with(extra: Vec<Arc<dyn Module>>) -> Self {
        let blocking = Arc::new(blocking::Blocking::default());
        let pep = Arc::new(pep::Pep::default());
        let last = Arc::new(last::Last::default());
        let mam = Arc::new(mam::Mam::default());
        let mut list: Vec<Arc<dyn Module>> = vec![
            Arc::new(disco::Disco),
            Arc::new(ping::Ping),
            Arc::new(roster::Roster),
            Arc::new(presence::Presence),
            Arc::new(message::Messages),
            mam.clone(),
            Arc::new(offline::OfflineMessages),
            Arc::new(carbons::Carbons),
            Arc::new(vcard::VCard),
            Arc::new(register::Register),
            Arc::new(version::Version),
            blocking.clone(),
            pep.clone(),
            last.clone(),
        ];
        list.extend(extra);
        let mut m = Self::new(list);
        m.blocking = blocking;
        m.pep = pep;
        m.last = last;
        m.mam = mam;
        m
    }

    pub fn features(&self) -> Vec<&'static str> {
        let mut f: Vec<_> = self
            .list
            .iter()
            .flat_map(|m| m.features())
            .copied()
            .collect();
        f.sort_unstable();
        f.dedup();
        f
    }

    pub fn account_features(&self) -> Vec<&'static str> {
        let mut f: Vec<_> = self
            .list
            .iter()
            .flat_map(|m| m.account_features())
            .copied()
            .collect();
        f.sort_unstable();
        f.dedup();
        f
    }

    pub fn stream_features(&self) -> Vec<Element> {
        self.list.iter().flat_map(|m| m.stream_features()).collect()
    }

    pub async fn session_closed(&self, cx: &Cx<'_>) {
        for m in &self.list {
            m.session_closed(cx).await;
        }
    }

    fn iq_module(&self, payload: &Element) -> Option<&Arc<dyn Module>> {
        self.iq
            .iter()
            .find(|((ns, name), _)| *ns == payload.ns && *name == payload.name)
            .map(|(_, m)| m)
    }
}

/// Handle one stanza from a bound session. `from` is already stamped.
pub async fn dispatch(cx: &Cx<'_>, stanza: Element) {
    let result = match stanza.name.as_str() {
        "iq" => handle_iq(cx, &stanza).await,
        "message" => message::route(cx, stanza.clone()).await,
        "presence" => presence::handle(cx, stanza.clone()).await,
        _ => Ok(()),
    };
    if let Err(e) = result {
        cx.state.metrics.stanza_error(&e);
        // Never answer an error with an error (RFC 6120 §8.3.1).
        if stanza.attr("type") != Some("error") {
            cx.session.send(e.reply_to(&stanza));
        }
    }
}

/// Parse the `to` of a stanza; None when absent.
pub fn parse_to(stanza: &Element) -> Result<Option<Jid>, StanzaError> {
    stanza
        .attr("to")
        .map(|t| Jid::new(t).map_err(|_| StanzaError::new(Condition::JidMalformed)))
        .transpose()
}

async fn handle_iq(cx: &Cx<'_>, stanza: &Element) -> Result<(), StanzaError> {
    let kind = match stanza.attr("type") {
        Some("get") => IqType::Get,
        Some("set") => IqType::Set,
        // Replies to the server's own IQs (pings) are consumed by the session;
        // replies addressed to another entity are routed like any IQ.
        Some("result") | Some("error") => {
            if pep::caps_reply(cx.state, cx.session, stanza).await {
                return Ok(());
            }
            if let Some(Ok(to)) = parse_to(stanza)?.map(Jid::try_into_full) {
                if cx.state.serves(to.domain().as_str())
                    && !blocking::gate(cx, stanza, &Jid::from(to.clone())).await?
                {
                    route_to_full(cx, &to, stanza.clone());
                }
            }
            return Ok(());
        }
        _ => {
            return Err(StanzaError::with_text(
                Condition::BadRequest,
                "missing or invalid iq type",
            ))
        }
    };
    if stanza.attr("id").is_none() || stanza.children().count() != 1 {
        return Err(StanzaError::with_text(
            Condition::BadRequest,
            "an iq get/set needs an id and exactly one payload",
        ));
    }
    let from = cx.session.jid.clone();
    let target = match parse_to(stanza)? {
        None => Target::Server(from.domain().to_string()),
        Some(to) if !cx.state.serves(to.domain().as_str()) => {
            return Err(StanzaError::new(Condition::RemoteServerNotFound))
        }
        // XEP-0191: nothing between a blocker and a blocked JID.
        Some(to) if blocking::gate(cx, stanza, &to).await? => return Ok(()),
        Some(to) => match to.try_into_full() {
            Ok(full) => {
                // Only the addressed resource can answer; the server relays.
                if route_to_full(cx, &full, stanza.clone()) {
                    return Ok(());
                }
                return Err(StanzaError::new(Condition::ServiceUnavailable));
            }
            Err(bare) if bare.node().is_none() => Target::Server(bare.to_string()),
            Err(bare) => Target::Account(bare),
        },
    };
    let payload = stanza.children().next().expect("checked above");
    let Some(module) = cx.state.modules.iq_module(payload) else {
        return Err(StanzaError::new(Condition::ServiceUnavailable));
    };
    let iq = Iq {
        stanza: stanza.clone(),
        kind,
        from,
        target,
    };
    let payload = module.handle_iq(cx, &iq).await?;
    let mut reply = Element::new("iq", NS_CLIENT)
        .with_attr("type", "result")
        .with_attr("id", stanza.attr("id").unwrap_or_default())
        .with_attr("to", cx.session.jid.to_string());
    if let Some(to) = stanza.attr("to") {
        reply.set_attr("from", to);
    }
    if let Some(p) = payload {
        reply.append_child(p);
    }
    cx.session.send(reply);
    let close = cx.session.state.lock().close_after_reply.take();
    if let Some(err) = close {
        cx.session.close(err);
    }
    Ok(())
}

/// Deliver to one connected resource, if it is here.
pub fn route_to_full(cx: &Cx<'_>, to: &FullJid, stanza: Element) -> bool {
    match cx.state.router.session(to) {
        Some(h) => h.send(stanza),
        None => false,
    }
}

/// An IQ result/error/get built by the server.
pub fn iq(kind: &str, id: &str, from: &str, to: &str) -> Element {
    Element::new("iq", NS_CLIENT)
        .with_attr("type", kind)
        .with_attr("id", id)
        .with_attr("from", from)
        .with_attr("to", to)
}

/// A fresh random id for stanzas the server originates.
pub fn new_id() -> String {
    use rand::Rng;
    let n: u64 = rand::thread_rng().gen();
    format!("{n:016x}")
}
