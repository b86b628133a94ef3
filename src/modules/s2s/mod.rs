//! RFC 6120 server-to-server federation over STARTTLS or direct TLS
//! (XEP-0368), authenticated by SASL EXTERNAL (XEP-0178) when the peer's
//! certificate is valid for its domain, else by XEP-0220 dialback.
//!
//! - Outgoing (`outgoing.rs`): a stanza for a domain natter does not serve
//!   goes to `api::Remote::send`, which queues it per (local, remote)
//!   domain pair — bounded in stanzas and bytes, held serialized — and one
//!   task per pair connects (`s2s.hosts`, else DNS SRV
//!   `_xmpps-server._tcp` and `_xmpp-server._tcp` merged by priority,
//!   else the domain on 5269), starts TLS (at once, or by STARTTLS),
//!   proves the local domain (EXTERNAL when offered, else dialback) and
//!   writes the queue; it closes when idle. When the domain cannot be reached the queue
//!   bounces with `remote-server-not-found` (or `remote-server-timeout`).
//! - Incoming (`incoming.rs`): the `listen.s2s` listener offers STARTTLS
//!   (`listen.s2s_tls` starts with TLS), then EXTERNAL to a peer whose
//!   certificate names the domain it claims (`certs.rs`) and dialback to
//!   any; a `db:result` is verified by connecting back to the
//!   claimed domain's server (`db:verify`), and `db:verify` requests for
//!   our own keys are answered. Stanzas then must come from a domain the
//!   stream authenticated (else `invalid-from`) to one we serve; they are
//!   checked like a client's (`c2s::strip`) and dispatched through the
//!   same hooks as local stanzas, as if sent by a session of the remote
//!   sender that is not in the router (`Router::detached`): what the
//!   hooks answer it goes back over s2s.
//!
//! Dialback keys (XEP-0185): HMAC-SHA256 keyed with SHA-256 of a random
//! secret of this node, over "receiving originating stream-id".

mod certs;
mod incoming;
mod outgoing;
mod stream;

use super::component::set_ns;
use super::{api, Module};
use crate::config::Config;
use crate::error::{Condition, StanzaError};
use crate::state::ServerState;
use async_trait::async_trait;
use hmac::{Hmac, Mac};
use jid::Jid;
use natter_xml::{Element, NS_CLIENT};
use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpStream;

pub use outgoing::Link;

pub struct S2s {
    /// (local domain, remote domain) → its outgoing queue and connection.
    links: Mutex<HashMap<(String, String), Arc<Link>>>,
    /// The dialback secret (per node: a key is verified by the node that
    /// made it, which is the node the peer connects back to only when the
    /// domain has one node or all nodes share it; see ARCHITECTURE.md).
    secret: [u8; 32],
    /// TLS settings, loaded at start (`prepare`) when s2s is enabled.
    certs: std::sync::OnceLock<certs::Certs>,
}

impl Default for S2s {
    fn default() -> Self {
        use rand::RngCore;
        let mut secret = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut secret);
        S2s {
            links: Mutex::new(HashMap::new()),
            secret,
            certs: std::sync::OnceLock::new(),
        }
    }
}

#[async_trait]
impl Module for S2s {
    fn name(&self) -> &'static str {
        "s2s"
    }
    fn prepare(&self, config: &Config) -> anyhow::Result<()> {
        if config.s2s_enabled() && self.certs.get().is_none() {
            let _ = self.certs.set(certs::Certs::load(config)?);
        }
        Ok(())
    }
    fn listeners(&self, config: &Config) -> Vec<(&'static str, String)> {
        if !config.s2s_enabled() {
            return Vec::new();
        }
        // Index 0 is STARTTLS, 1 direct TLS (`accept` tells them apart).
        let mut l = vec![("s2s", config.listen.s2s.clone())];
        if !config.listen.s2s_tls.is_empty() {
            l.push(("s2s direct TLS", config.listen.s2s_tls.clone()));
        }
        l
    }
    fn provide(self: Arc<Self>, shared: &mut super::Shared) {
        shared.provide::<dyn api::Remote>(self.clone());
        shared.provide::<S2s>(self);
    }
    async fn accept(&self, state: &ServerState, index: usize, socket: TcpStream, peer: SocketAddr) {
        incoming::serve(self, state, socket, peer, index == 1).await;
    }
}

impl api::Remote for S2s {
    fn enabled(&self, state: &ServerState) -> bool {
        state.config.s2s_enabled()
    }

    fn send(&self, state: &ServerState, stanza: &Element) -> Result<(), StanzaError> {
        let not_found = || StanzaError::new(Condition::RemoteServerNotFound);
        if !state.config.s2s_enabled() {
            return Err(not_found());
        }
        let jid = |a| stanza.attr(a).and_then(|v| Jid::new(v).ok());
        let (Some(from), Some(to)) = (jid("from"), jid("to")) else {
            return Err(StanzaError::new(Condition::JidMalformed));
        };
        let (local, remote) = (from.domain().as_str(), to.domain().as_str());
        if !ours(state, local) || ours(state, remote) {
            return Err(not_found());
        }
        if !state.config.s2s_allows(remote) {
            return Err(StanzaError::with_text(
                Condition::RemoteServerNotFound,
                "federation with this domain is not allowed here",
            ));
        }
        let mut s = stanza.clone();
        set_ns(&mut s, NS_CLIENT, stream::NS_SERVER);
        let mut xml = String::new();
        // With its xmlns, so a bounce can parse it back on its own.
        s.write_to(&mut xml, "", true);
        let mut links = self.links.lock();
        let key = (local.to_string(), remote.to_string());
        if let Some(l) = links.get(&key) {
            return l.push(&state.config.s2s, xml);
        }
        let link = Arc::new(Link::default());
        link.push(&state.config.s2s, xml)?;
        links.insert(key.clone(), link.clone());
        let st = state.clone();
        state.tasks.spawn(outgoing::run(st, key.0, key.1, link));
        Ok(())
    }
}

impl S2s {
    /// TLS settings; only None when s2s is disabled (nothing connects then).
    fn certs(&self) -> Option<&certs::Certs> {
        self.certs.get()
    }

    /// XEP-0185 dialback key.
    fn key(&self, receiving: &str, originating: &str, id: &str) -> String {
        let k = Sha256::digest(self.secret);
        let mut mac = Hmac::<Sha256>::new_from_slice(&k).expect("any key length");
        mac.update(format!("{receiving} {originating} {id}").as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    fn valid_key(&self, receiving: &str, originating: &str, id: &str, key: &str) -> bool {
        use subtle::ConstantTimeEq;
        let want = self.key(receiving, originating, id);
        bool::from(want.as_bytes().ct_eq(key.trim().as_bytes()))
    }

    /// Forget a link whose task ended (only that one: a new one may exist).
    fn drop_link(&self, key: &(String, String), link: &Arc<Link>) -> Vec<String> {
        let mut links = self.links.lock();
        if links.get(key).is_some_and(|l| Arc::ptr_eq(l, link)) {
            links.remove(key);
        }
        link.take_all()
    }
}

/// A domain this server answers for: a served domain or one of its
/// services (`conference.`, `upload.`, components), each of which talks to
/// other servers under its own name.
fn ours(state: &ServerState, domain: &str) -> bool {
    state.serves(domain) || state.modules.is_service(domain)
}

/// One place a remote domain's server may listen.
#[derive(Debug, PartialEq)]
struct Target {
    addr: String,
    /// TLS from the first byte (XEP-0368), else STARTTLS.
    direct_tls: bool,
}

/// Where to connect for `domain`, best first: the static host map, else DNS
/// SRV `_xmpps-server._tcp` and `_xmpp-server._tcp` merged by priority and
/// weight (direct TLS first at equal priority, XEP-0368), else the domain
/// on 5269.
async fn targets(state: &ServerState, domain: &str) -> Vec<Target> {
    if let Some(a) = state.config.s2s.hosts.get(domain) {
        return vec![match a.strip_prefix("tls://") {
            Some(addr) => Target {
                addr: addr.to_string(),
                direct_tls: true,
            },
            None => Target {
                addr: a.clone(),
                direct_tls: false,
            },
        }];
    }
    let mut srv = Vec::new();
    // A "." `_xmpp-server` record forbids the 5269 fallback; `_xmpps-server`
    // records say nothing about STARTTLS.
    let mut starttls_record = false;
    if let Ok(r) = hickory_resolver::TokioResolver::builder_tokio().and_then(|b| b.build()) {
        for (service, direct_tls) in [("_xmpps-server", true), ("_xmpp-server", false)] {
            let Ok(l) = r.srv_lookup(format!("{service}._tcp.{domain}.")).await else {
                continue;
            };
            for rec in l.answers() {
                if let hickory_resolver::proto::rr::RData::SRV(s) = &rec.data {
                    starttls_record |= !direct_tls;
                    let host = s.target.to_utf8();
                    // "." means this service is decidedly not available (RFC 2782).
                    if host != "." {
                        let addr = format!("{}:{}", host.trim_end_matches('.'), s.port);
                        srv.push((s.priority, !direct_tls, std::cmp::Reverse(s.weight), addr));
                    }
                }
            }
        }
    }
    srv.sort();
    let mut out: Vec<Target> = srv
        .into_iter()
        .map(|(_, starttls, _, addr)| Target {
            addr,
            direct_tls: !starttls,
        })
        .collect();
    if out.is_empty() && !starttls_record {
        out.push(Target {
            addr: format!("{domain}:5269"),
            direct_tls: false,
        });
    }
    out
}

/// Deliver a stanza the server made (a bounce) to a local JID: that
/// session, or every available resource of a bare JID.
fn deliver_local(state: &ServerState, stanza: Element) {
    let Some(to) = stanza.attr("to").and_then(|t| Jid::new(t).ok()) else {
        return;
    };
    match to.try_as_full() {
        Ok(full) => {
            if let Some(h) = state.routing.session(full) {
                h.send(stanza);
            }
        }
        Err(bare) => {
            for h in state.routing.resources(bare) {
                if h.is_available() {
                    h.send(stanza.clone());
                }
            }
        }
    }
}
