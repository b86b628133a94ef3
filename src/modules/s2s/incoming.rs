//! Incoming s2s: TLS (STARTTLS, or direct on `listen.s2s_tls`), then SASL
//! EXTERNAL for a peer whose certificate names its domain, or dialback
//! (verified by connecting back, or answering `db:verify` for our own
//! keys), then stanzas from the authenticated domains, checked and
//! dispatched like a client's.

use super::stream::{
    self, Conn, Tls, NS_DIALBACK, NS_DIALBACK_FEATURE, NS_SASL, NS_SERVER, NS_TLS,
};
use super::{certs, outgoing};
use super::{ours, set_ns, S2s};
use crate::error::{StreamCondition, StreamError};
use crate::modules::{api, dispatch, new_id, Cx};
use crate::router::{Deliver, QueueLimits};
use crate::state::ServerState;
use jid::{FullJid, Jid};
use natter_xml::{Element, StreamEvent, NS_CLIENT, NS_STREAM};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpStream;

pub(super) async fn serve(
    s2s: &S2s,
    state: &ServerState,
    socket: TcpStream,
    peer: SocketAddr,
    direct_tls: bool,
) {
    let Some(certs) = s2s.certs() else {
        return;
    };
    let write = Duration::from_secs(state.config.c2s.write_timeout_secs);
    let mut conn = Conn::new(
        Box::new(socket),
        crate::c2s_limits(&state.config, true),
        write,
    );
    let cfg = &state.config.s2s;
    conn.bucket = Some(crate::c2s::throttle::TokenBucket::new(
        cfg.rate_bytes_per_sec,
        cfg.rate_burst_bytes,
    ));
    if direct_tls {
        let preauth = Duration::from_secs(state.config.c2s.preauth_timeout_secs);
        match tokio::time::timeout(preauth, conn.upgrade(Tls::Server(&certs.server))).await {
            Ok(Ok(c)) => conn = c,
            _ => return,
        }
    }
    let mut authed = HashSet::new();
    // Each turn is one stream; STARTTLS and SASL restart it.
    loop {
        match stream(s2s, state, &mut conn, &mut authed).await {
            Ok(Next::Close) => return conn.close(None).await,
            Ok(Next::Restart) => conn.restart(),
            Ok(Next::StartTls) => match conn.upgrade(Tls::Server(&certs.server)).await {
                Ok(c) => conn = c,
                Err(_) => return,
            },
            Err(e) => {
                tracing::info!(%peer, error = %e, "incoming s2s stream error");
                return conn.close(Some(e)).await;
            }
        }
    }
}

enum Next {
    Close,
    StartTls,
    /// After SASL success: a new stream on the same transport.
    Restart,
}

async fn stream(
    s2s: &S2s,
    state: &ServerState,
    conn: &mut Conn,
    authed: &mut HashSet<String>,
) -> Result<Next, StreamError> {
    let preauth = Duration::from_secs(state.config.c2s.preauth_timeout_secs);
    let attrs = match tokio::time::timeout(preauth, conn.next()).await {
        Ok(Ok(Some(StreamEvent::Open { attrs }))) => attrs,
        Ok(Ok(_)) => return Ok(Next::Close),
        Ok(Err(e)) => return Err(e),
        Err(_) => return Err(StreamError::new(StreamCondition::ConnectionTimeout)),
    };
    let id = new_id();
    let local = stream::attr(&attrs, "to").unwrap_or_default().to_string();
    let from = stream::attr(&attrs, "from").unwrap_or_default().to_string();
    conn.open(&local, &from, Some(&id)).await?;
    if !ours(state, &local) {
        return Err(StreamError::new(StreamCondition::HostUnknown));
    }
    // EXTERNAL only for a domain whose certificate the peer presented, not
    // yet authenticated on this connection and allowed here (XEP-0178).
    let external = conn.tls
        && !authed.contains(&from)
        && state.config.s2s_allows(&from)
        && !ours(state, &from)
        && s2s
            .certs()
            .is_some_and(|c| c.valid_for(&conn.peer_certs, &from));
    let mut features = Element::new("features", NS_STREAM)
        .with_child(Element::new("dialback", NS_DIALBACK_FEATURE));
    if external {
        features.append_child(certs::external_feature());
    }
    if !conn.tls {
        features.append_child(
            Element::new("starttls", NS_TLS).with_child(Element::new("required", NS_TLS)),
        );
    }
    conn.write(&features).await?;
    let idle = Duration::from_secs(state.config.s2s.idle_timeout_secs);
    loop {
        let ev = tokio::select! {
            _ = state.shutdown.cancelled() => {
                return Err(StreamError::new(StreamCondition::SystemShutdown));
            }
            ev = conn.next() => ev?,
            _ = tokio::time::sleep(if authed.is_empty() { preauth } else { idle }) => {
                return Err(StreamError::new(StreamCondition::ConnectionTimeout));
            }
        };
        let el = match ev {
            Some(StreamEvent::Stanza(el)) => el,
            Some(StreamEvent::Close) | None => return Ok(Next::Close),
            Some(StreamEvent::Open { .. }) => {
                return Err(StreamError::new(StreamCondition::BadFormat))
            }
        };
        if el.is("starttls", NS_TLS) && !conn.tls {
            conn.write(&Element::new("proceed", NS_TLS)).await?;
            return Ok(Next::StartTls);
        }
        if !conn.tls {
            // Nothing but STARTTLS is taken in the clear.
            return Err(StreamError::with_text(
                StreamCondition::PolicyViolation,
                "STARTTLS is required",
            ));
        }
        if el.is("auth", NS_SASL) {
            let wanted = certs::requested_identity(&el, &from);
            if external
                && el.attr("mechanism") == Some("EXTERNAL")
                && wanted.as_ref() == Some(&from)
            {
                conn.write(&Element::new("success", NS_SASL)).await?;
                tracing::info!(%local, remote = %from, "incoming s2s authenticated by SASL EXTERNAL");
                authed.insert(from);
                return Ok(Next::Restart);
            }
            conn.write(
                &Element::new("failure", NS_SASL)
                    .with_child(Element::new("not-authorized", NS_SASL)),
            )
            .await?;
        } else if el.is("result", NS_DIALBACK) {
            dialback_result(s2s, state, conn, authed, &local, &id, &el).await?;
        } else if el.is("verify", NS_DIALBACK) {
            let (from, to) = (el.attr("from").unwrap_or(""), el.attr("to").unwrap_or(""));
            let sid = el.attr("id").unwrap_or("");
            let valid = ours(state, to) && s2s.valid_key(from, to, sid, &el.text());
            conn.write(
                &Element::new("verify", NS_DIALBACK)
                    .with_attr("from", to)
                    .with_attr("to", from)
                    .with_attr("id", sid)
                    .with_attr("type", if valid { "valid" } else { "invalid" }),
            )
            .await?;
        } else if el.ns == NS_SERVER && el.name == "message" {
            // Messages already read in the same burst go together: one run
            // per sender (in order, one archive write) and all senders'
            // runs at once, so their writes share group commits instead of
            // waiting for each other on this one stream.
            let mut batch = vec![el];
            while batch.len() < MAX_BATCH {
                match conn.buffered_stanza(|e| e.ns == NS_SERVER && e.name == "message") {
                    Some(next) => batch.push(next),
                    None => break,
                }
            }
            messages(state, authed, batch).await?;
        } else if el.ns == NS_SERVER && matches!(el.name.as_str(), "presence" | "iq") {
            stanza(state, authed, el).await?;
        } else {
            return Err(StreamError::new(StreamCondition::UnsupportedStanzaType));
        }
    }
}

/// XEP-0220 §2.2: the peer claims a domain; ask that domain's server.
#[allow(clippy::too_many_arguments)]
async fn dialback_result(
    s2s: &S2s,
    state: &ServerState,
    conn: &mut Conn,
    authed: &mut HashSet<String>,
    local: &str,
    id: &str,
    el: &Element,
) -> Result<(), StreamError> {
    let remote = el.attr("from").unwrap_or("").to_string();
    let to = el.attr("to").unwrap_or("");
    let domain = Jid::new(&remote).is_ok_and(|j| j.node().is_none() && j.resource().is_none());
    if !domain || to != local || ours(state, &remote) {
        return Err(StreamError::new(StreamCondition::InvalidFrom));
    }
    let valid = state.config.s2s_allows(&remote)
        && outgoing::verify(state, s2s, local, &remote, id, &el.text()).await;
    conn.write(
        &Element::new("result", NS_DIALBACK)
            .with_attr("from", local)
            .with_attr("to", remote.as_str())
            .with_attr("type", if valid { "valid" } else { "invalid" }),
    )
    .await?;
    if !valid {
        return Err(StreamError::new(StreamCondition::NotAuthorized));
    }
    tracing::info!(%local, %remote, "incoming s2s authenticated by dialback");
    authed.insert(remote);
    Ok(())
}

/// Most messages routed as one batch.
const MAX_BATCH: usize = 256;

/// A stanza from an authenticated peer: its `from` must be in a domain the
/// stream proved, its `to` one we serve; then it goes through `dispatch`
/// as if a session of the sender sent it.
async fn stanza(
    state: &ServerState,
    authed: &HashSet<String>,
    el: Element,
) -> Result<(), StreamError> {
    let Some((el, sender)) = admit(state, authed, el)? else {
        return Ok(());
    };
    let (proxy, rx) = detached(state, sender);
    dispatch(
        &Cx {
            state,
            session: &proxy,
        },
        el,
    )
    .await;
    answer(state, rx);
    Ok(())
}

/// A batch of messages: checked one by one (a stream error ends the
/// stream after what came before it is routed), then routed as one run per
/// sender, the runs concurrently.
async fn messages(
    state: &ServerState,
    authed: &HashSet<String>,
    batch: Vec<Element>,
) -> Result<(), StreamError> {
    let mut runs: Vec<(FullJid, Vec<Element>)> = Vec::new();
    let mut failed = None;
    for el in batch {
        match admit(state, authed, el) {
            Ok(Some((el, from))) => match runs.iter_mut().find(|(f, _)| *f == from) {
                Some((_, run)) => run.push(el),
                None => runs.push((from, vec![el])),
            },
            Ok(None) => {}
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    futures::future::join_all(
        runs.into_iter()
            .map(|(from, run)| sender_run(state, from, run)),
    )
    .await;
    failed.map_or(Ok(()), Err)
}

/// One sender's messages, routed with one durable archive write
/// (`dispatch_messages`); stanza errors go back over s2s.
async fn sender_run(state: &ServerState, sender: FullJid, msgs: Vec<Element>) {
    let (proxy, rx) = detached(state, sender);
    let originals = msgs.clone();
    let results = crate::modules::dispatch_messages(
        &Cx {
            state,
            session: &proxy,
        },
        msgs,
    )
    .await;
    let remote = state.modules.api::<dyn api::Remote>();
    for (msg, r) in originals.iter().zip(results) {
        // Never answer an error with an error (RFC 6120 §8.3.1).
        if let (Err(e), false) = (r, msg.attr("type") == Some("error")) {
            let _ = remote.send(state, &e.reply_to(msg));
        }
    }
    answer(state, rx);
}

/// Check a stanza from the peer and make it a client stanza: Ok(None) when
/// it was refused with a stanza error (sent back already).
// The error is the stream's own (`?` in the read loop); not worth a box.
#[allow(clippy::result_large_err)]
fn admit(
    state: &ServerState,
    authed: &HashSet<String>,
    mut el: Element,
) -> Result<Option<(Element, FullJid)>, StreamError> {
    let jid = |a| el.attr(a).and_then(|v| Jid::new(v).ok());
    let (from, to) = (jid("from"), jid("to"));
    let Some(from) = from.filter(|f| authed.contains(f.domain().as_str())) else {
        return Err(StreamError::with_text(
            StreamCondition::InvalidFrom,
            "stanzas must come from a domain this stream authenticated",
        ));
    };
    if !to.is_some_and(|t| ours(state, t.domain().as_str())) {
        return Err(StreamError::new(StreamCondition::HostUnknown));
    }
    set_ns(&mut el, NS_SERVER, NS_CLIENT);
    if let Err(e) = crate::c2s::strip::client_stanza(&mut el, |d| state.serves(d)) {
        if el.attr("type") != Some("error") {
            let _ = state
                .modules
                .api::<dyn api::Remote>()
                .send(state, &e.reply_to(&el));
        }
        return Ok(None);
    }
    // The sender as a session the router does not know: a bare sender
    // (subscriptions, probes) gets a placeholder resource, which nothing
    // addresses since replies go to the stanza's `from`.
    let full = match from.try_into_full() {
        Ok(f) => f,
        Err(b) => FullJid::new(&format!("{b}/s2s"))
            .map_err(|_| StreamError::new(StreamCondition::InvalidFrom))?,
    };
    Ok(Some((el, full)))
}

fn detached(
    state: &ServerState,
    sender: FullJid,
) -> (
    std::sync::Arc<crate::router::SessionHandle>,
    crate::router::QueueRx,
) {
    let c2s = &state.config.c2s;
    let limits = QueueLimits {
        items: c2s.max_queue,
        bytes: c2s.max_queue_bytes,
        user_bytes: c2s.max_user_bytes,
    };
    state.router.detached(sender, limits)
}

/// What the hooks answered the sender goes back over s2s.
fn answer(state: &ServerState, mut rx: crate::router::QueueRx) {
    let remote = state.modules.api::<dyn api::Remote>();
    while let Some(d) = rx.try_recv() {
        if let Deliver::Stanza(o) = d {
            if let Some(reply) = o.to_element() {
                let _ = remote.send(state, &reply);
            }
        }
    }
}
