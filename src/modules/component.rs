//! XEP-0114 Jabber Component Protocol: external components (bots,
//! gateways) each serving a domain of its own (`[components."domain"]`),
//! on the `listen.component` listener (opened only when one is configured).
//!
//! A component opens a `jabber:component:accept` stream to its domain,
//! proves the shared secret with `<handshake>hex(SHA-1(id + secret))`
//! (compared in constant time) and then exchanges stanzas: what it sends
//! (`from` at its domain, else `invalid-from`) goes to local users — a
//! connected resource, or for messages the available resources or the
//! offline queue; what users send to its domain reaches it through
//! `service_stanza` (`service-unavailable` while it is not connected).
//! The stream has the c2s stanza limits; one connection per domain.

use super::{api, new_id, parse_to, Module, Service};
use crate::config::Config;
use crate::error::{Condition, StanzaError, StreamCondition, StreamError};
use crate::state::ServerState;
use async_trait::async_trait;
use jid::Jid;
use natter_xml::{Element, Node, StreamEvent, StreamParser, NS_CLIENT};
use parking_lot::Mutex;
use sha1::{Digest, Sha1};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;
use subtle::ConstantTimeEq;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

pub const NS_ACCEPT: &str = "jabber:component:accept";

#[derive(Default)]
pub struct Components {
    /// The connected components: domain → their outgoing queue.
    connected: Mutex<HashMap<String, mpsc::Sender<Element>>>,
}

#[async_trait]
impl Module for Components {
    fn name(&self) -> &'static str {
        "component"
    }
    fn services(&self, config: &Config) -> Vec<Service> {
        config
            .components
            .keys()
            .map(|d| Service {
                domain: d.clone(),
                identity: ("component".into(), "generic".into(), d.clone()),
                listed: true,
            })
            .collect()
    }
    fn listeners(&self, config: &Config) -> Vec<(&'static str, String)> {
        if config.components.is_empty() {
            return Vec::new();
        }
        vec![("components (XEP-0114)", config.listen.component.clone())]
    }
    async fn accept(
        &self,
        state: &ServerState,
        _index: usize,
        socket: TcpStream,
        peer: SocketAddr,
    ) {
        let mut conn = Conn::new(state, socket);
        let end = match self.serve(state, &mut conn).await {
            Ok(()) => None,
            Err(e) => {
                tracing::info!(%peer, error = %e, "component stream error");
                Some(e)
            }
        };
        conn.close(end).await;
    }
    async fn service_stanza(
        &self,
        _state: &ServerState,
        stanza: Element,
    ) -> Result<(), StanzaError> {
        let to = parse_to(&stanza)?.ok_or_else(|| StanzaError::new(Condition::BadRequest))?;
        let tx = self.connected.lock().get(to.domain().as_str()).cloned();
        let Some(tx) = tx else {
            return Err(StanzaError::new(Condition::ServiceUnavailable));
        };
        // Bounded: a component that stops reading gets errors, not memory.
        tx.try_send(stanza)
            .map_err(|_| StanzaError::new(Condition::ResourceConstraint))
    }
}

impl Components {
    /// One component connection, from its stream header on.
    async fn serve(&self, state: &ServerState, conn: &mut Conn) -> Result<(), StreamError> {
        let preauth = Duration::from_secs(state.config.c2s.preauth_timeout_secs);
        let attrs = match tokio::time::timeout(preauth, conn.next()).await {
            Ok(Some(StreamEvent::Open { attrs })) => attrs,
            Ok(_) => return Ok(()),
            Err(_) => return Err(StreamError::new(StreamCondition::ConnectionTimeout)),
        };
        let id = new_id();
        let to = attrs
            .iter()
            .find(|(k, _)| k == "to")
            .map(|(_, v)| v.as_str());
        let Some((domain, cfg)) = to.and_then(|t| state.config.components.get_key_value(t)) else {
            conn.open(None, &id).await;
            return Err(StreamError::new(StreamCondition::HostUnknown));
        };
        conn.open(Some(domain), &id).await;
        let handshake = match tokio::time::timeout(preauth, conn.next()).await {
            Ok(Some(StreamEvent::Stanza(h))) if h.is("handshake", NS_ACCEPT) => h,
            Ok(None | Some(StreamEvent::Close)) => return Ok(()),
            Ok(Some(_)) => return Err(StreamError::new(StreamCondition::NotAuthorized)),
            Err(_) => return Err(StreamError::new(StreamCondition::ConnectionTimeout)),
        };
        let expected = hex(&Sha1::digest(format!("{id}{}", cfg.secret).as_bytes()));
        let given = handshake.text().trim().to_ascii_lowercase();
        if !bool::from(given.as_bytes().ct_eq(expected.as_bytes())) {
            return Err(StreamError::new(StreamCondition::NotAuthorized));
        }
        let (tx, mut rx) = mpsc::channel(state.config.c2s.max_queue.max(1));
        {
            let mut connected = self.connected.lock();
            if connected.get(domain).is_some_and(|t| !t.is_closed()) {
                return Err(StreamError::with_text(
                    StreamCondition::Conflict,
                    "the component is connected already",
                ));
            }
            connected.insert(domain.clone(), tx.clone());
        }
        tracing::info!(%domain, "component connected");
        let r = match conn.write(&Element::new("handshake", NS_ACCEPT)).await {
            Ok(()) => self.stanzas(state, conn, domain, &mut rx).await,
            Err(e) => Err(e),
        };
        let mut connected = self.connected.lock();
        if connected.get(domain).is_some_and(|t| t.same_channel(&tx)) {
            connected.remove(domain);
        }
        r
    }

    /// The authenticated stream: stanzas both ways until either side ends.
    async fn stanzas(
        &self,
        state: &ServerState,
        conn: &mut Conn,
        domain: &str,
        rx: &mut mpsc::Receiver<Element>,
    ) -> Result<(), StreamError> {
        loop {
            tokio::select! {
                _ = state.shutdown.cancelled() => {
                    return Err(StreamError::new(StreamCondition::SystemShutdown));
                }
                out = rx.recv() => match out {
                    Some(s) => conn.write(&s).await?,
                    None => return Ok(()),
                },
                ev = conn.next_now() => match ev? {
                    Some(StreamEvent::Stanza(s)) => {
                        if let Some(reply) = from_component(state, domain, s).await? {
                            conn.write(&reply).await?;
                        }
                    }
                    Some(StreamEvent::Close) | None => return Ok(()),
                    Some(StreamEvent::Open { .. }) => {
                        return Err(StreamError::new(StreamCondition::BadFormat))
                    }
                },
            }
        }
    }
}

/// Route a stanza the component sent; returns the error for it, if any.
async fn from_component(
    state: &ServerState,
    domain: &str,
    mut stanza: Element,
) -> Result<Option<Element>, StreamError> {
    if stanza.ns != NS_ACCEPT {
        return Err(StreamError::new(StreamCondition::InvalidNamespace));
    }
    if !matches!(stanza.name.as_str(), "message" | "presence" | "iq") {
        return Err(StreamError::new(StreamCondition::UnsupportedStanzaType));
    }
    let from = stanza.attr("from").and_then(|f| Jid::new(f).ok());
    if from.as_ref().is_none_or(|f| f.domain().as_str() != domain) {
        return Err(StreamError::with_text(
            StreamCondition::InvalidFrom,
            format!("stanzas must come from {domain}"),
        ));
    }
    set_ns(&mut stanza, NS_ACCEPT, NS_CLIENT);
    match route(state, &stanza).await {
        Ok(()) => Ok(None),
        Err(_) if stanza.attr("type") == Some("error") => Ok(None),
        Err(e) => Ok(Some(e.reply_to(&stanza))),
    }
}

/// To a local user: a connected resource; for messages, the available
/// resources or the offline queue; presence to the available resources.
async fn route(state: &ServerState, stanza: &Element) -> Result<(), StanzaError> {
    let to = parse_to(stanza)?.ok_or_else(|| StanzaError::new(Condition::BadRequest))?;
    if stanza.name == "iq" && matches!(stanza.attr("type"), Some("result" | "error")) {
        // An answer to a request the server sent (a push to an app server).
        if let Some(r) = state.modules.try_api::<dyn api::IqReplies>() {
            if r.reply(state, stanza).await {
                return Ok(());
            }
        }
    }
    if !state.serves(to.domain().as_str()) {
        return Err(StanzaError::new(Condition::RemoteServerNotFound));
    }
    if to.node().is_none() {
        // The server itself answers only its own users.
        return Err(StanzaError::new(Condition::ServiceUnavailable));
    }
    let bare = to.to_bare();
    let session = to.try_as_full().ok().and_then(|f| state.routing.session(f));
    match stanza.name.as_str() {
        "message" => {
            let offline = state.modules.api::<dyn api::OfflineQueue>();
            let kind = stanza.attr("type").unwrap_or("normal");
            if offline.storable(stanza, kind) {
                let full = session.as_ref().map(|h| h.jid.clone());
                let limit = state.config.store.offline_limit;
                offline
                    .deliver(state, &bare, full.as_ref(), stanza, None, limit, None)
                    .await?;
            } else {
                to_available(state, session, &bare, stanza);
            }
        }
        "presence" => to_available(state, session, &bare, stanza),
        _ => match session {
            Some(h) => {
                h.send(stanza.clone());
            }
            None => return Err(StanzaError::new(Condition::ServiceUnavailable)),
        },
    }
    Ok(())
}

/// The addressed session, or else every available resource (none: dropped).
fn to_available(
    state: &ServerState,
    session: Option<std::sync::Arc<crate::router::SessionHandle>>,
    bare: &jid::BareJid,
    stanza: &Element,
) {
    let targets = match session {
        Some(h) => vec![h],
        None => state.routing.resources(bare),
    };
    for h in targets.into_iter().filter(|h| h.is_available()) {
        h.send(stanza.clone());
    }
}

/// Stanza namespace between the component stream and the core's.
pub(crate) fn set_ns(e: &mut Element, from: &str, to: &str) {
    if e.ns == from {
        e.ns = to.to_string();
    }
    for c in &mut e.children {
        if let Node::Element(c) = c {
            set_ns(c, from, to);
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A component's TCP connection: the parser with the c2s limits, and the
/// write timeout of c2s sessions.
struct Conn {
    socket: TcpStream,
    parser: StreamParser,
    buf: Vec<u8>,
    events: std::collections::VecDeque<StreamEvent>,
    write_timeout: Duration,
    opened: bool,
}

impl Conn {
    fn new(state: &ServerState, socket: TcpStream) -> Self {
        Conn {
            socket,
            parser: StreamParser::new(crate::c2s_limits(&state.config, true)),
            buf: vec![0; 16 * 1024],
            events: Default::default(),
            write_timeout: Duration::from_secs(state.config.c2s.write_timeout_secs),
            opened: false,
        }
    }

    /// The next event; None at the end of the connection or on a read error.
    async fn next(&mut self) -> Option<StreamEvent> {
        self.next_now().await.ok().flatten()
    }

    /// The next event; Err for XML the parser refuses.
    async fn next_now(&mut self) -> Result<Option<StreamEvent>, StreamError> {
        loop {
            if let Some(e) = self.events.pop_front() {
                return Ok(Some(e));
            }
            let n = match self.socket.read(&mut self.buf).await {
                Ok(0) | Err(_) => return Ok(None),
                Ok(n) => n,
            };
            self.events.extend(self.parser.feed(&self.buf[..n])?);
        }
    }

    async fn send(&mut self, text: &str) -> Result<(), StreamError> {
        match tokio::time::timeout(self.write_timeout, self.socket.write_all(text.as_bytes())).await
        {
            Ok(Ok(())) => Ok(()),
            _ => Err(StreamError::new(StreamCondition::ConnectionTimeout)),
        }
    }

    /// The stream header; `from` is the component's domain when known.
    async fn open(&mut self, from: Option<&str>, id: &str) {
        let mut header = format!(
            "<?xml version='1.0'?><stream:stream xmlns:stream='http://etherx.jabber.org/streams' \
             xmlns='{NS_ACCEPT}' id='{id}'"
        );
        if let Some(f) = from {
            header.push_str(" from='");
            natter_xml::escape_attr(f, &mut header);
            header.push('\'');
        }
        header.push('>');
        self.opened = self.send(&header).await.is_ok();
    }

    async fn write(&mut self, stanza: &Element) -> Result<(), StreamError> {
        let mut s = stanza.clone();
        set_ns(&mut s, NS_CLIENT, NS_ACCEPT);
        let mut out = String::new();
        s.write_to(&mut out, NS_ACCEPT, true);
        self.send(&out).await
    }

    /// End the stream, with a stream error if there is one.
    async fn close(mut self, err: Option<StreamError>) {
        if !self.opened {
            self.open(None, &new_id()).await;
        }
        let mut out = String::new();
        if let Some(e) = err {
            e.to_element().write_to(&mut out, NS_ACCEPT, true);
        }
        out.push_str("</stream:stream>");
        let _ = self.send(&out).await;
        let _ = self.socket.shutdown().await;
    }
}
