//! Outgoing s2s: the per-domain-pair queue and the task that connects,
//! authenticates by dialback, writes the queue and closes when idle.

use super::certs;
use super::stream::{self, Conn, Tls, NS_DIALBACK, NS_SASL, NS_TLS};
use super::{deliver_local, targets, S2s};
use crate::config::S2sConfig;
use crate::error::{Condition, StanzaError, StreamCondition, StreamError};
use crate::state::ServerState;
use natter_xml::{Element, StreamEvent, NS_STREAM};
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::Notify;

/// What waits for one remote domain: serialized stanzas, bounded in count
/// and bytes (`s2s.max_queue`, `s2s.max_queue_bytes`).
#[derive(Default)]
pub struct Link {
    queue: Mutex<(VecDeque<String>, usize)>,
    wake: Notify,
}

impl Link {
    pub(super) fn push(&self, cfg: &S2sConfig, xml: String) -> Result<(), StanzaError> {
        let mut q = self.queue.lock();
        if q.0.len() >= cfg.max_queue || q.1 + xml.len() > cfg.max_queue_bytes {
            return Err(StanzaError::with_text(
                Condition::ResourceConstraint,
                "too much is waiting for this remote domain",
            ));
        }
        q.1 += xml.len();
        q.0.push_back(xml);
        drop(q);
        self.wake.notify_one();
        Ok(())
    }

    pub(super) fn take_all(&self) -> Vec<String> {
        let mut q = self.queue.lock();
        q.1 = 0;
        q.0.drain(..).collect()
    }
}

/// Why a connection attempt failed: which bounce the queue gets.
enum Failure {
    NotFound,
    Timeout,
}

/// The link's task: connect, write until idle or broken; bounce on failure.
pub(super) async fn run(state: ServerState, local: String, remote: String, link: Arc<Link>) {
    let s2s = state.modules.api::<S2s>();
    let key = (local.clone(), remote.clone());
    let cfg = &state.config.s2s;
    let connect = Duration::from_secs(cfg.connect_timeout_secs);
    let failure =
        match tokio::time::timeout(connect, authenticated(&state, &s2s, &local, &remote)).await {
            Ok(Ok(conn)) => match serve(&state, &link, conn).await {
                // Closed idle or by the peer: what is still queued tries again.
                Ok(()) => None,
                Err(_) => Some(Failure::NotFound),
            },
            Ok(Err(e)) => {
                tracing::info!(%local, %remote, error = %e, "s2s connection failed");
                Some(Failure::NotFound)
            }
            Err(_) => {
                tracing::info!(%local, %remote, "s2s connection timed out");
                Some(Failure::Timeout)
            }
        };
    let left = s2s.drop_link(&key, &link);
    match failure {
        Some(f) => bounce(&state, left, f),
        None => {
            // Stanzas that came while the connection was closing.
            for xml in left {
                if let Some(el) = parse(&state, &xml) {
                    let _ = api_send(&state, &el);
                }
            }
        }
    }
}

fn api_send(state: &ServerState, el: &Element) -> Result<(), StanzaError> {
    use crate::modules::api::Remote;
    let mut el = el.clone();
    super::set_ns(&mut el, stream::NS_SERVER, natter_xml::NS_CLIENT);
    state.modules.api::<S2s>().send(state, &el)
}

fn parse(state: &ServerState, xml: &str) -> Option<Element> {
    natter_xml::parse_frame(xml.as_bytes(), &crate::c2s_limits(&state.config, true)).ok()
}

/// RFC 6120 §8.3.1: errors for the local senders, never for errors or
/// IQ results.
fn bounce(state: &ServerState, stanzas: Vec<String>, why: Failure) {
    let cond = match why {
        Failure::NotFound => Condition::RemoteServerNotFound,
        Failure::Timeout => Condition::RemoteServerTimeout,
    };
    for xml in stanzas {
        let Some(mut el) = parse(state, &xml) else {
            continue;
        };
        super::set_ns(&mut el, stream::NS_SERVER, natter_xml::NS_CLIENT);
        let ty = el.attr("type");
        if ty == Some("error") || (el.name == "iq" && ty == Some("result")) {
            continue;
        }
        deliver_local(state, StanzaError::new(cond).reply_to(&el));
    }
}

/// The connection's life once authenticated: write what is queued, read
/// what the peer sends (only stream-level traffic is expected), close when
/// idle or at shutdown.
async fn serve(state: &ServerState, link: &Link, mut conn: Conn) -> Result<(), StreamError> {
    let idle = Duration::from_secs(state.config.s2s.idle_timeout_secs);
    loop {
        // What queued meanwhile goes out in one write (one TLS record run,
        // one flush), not one per stanza; the queue is bounded in bytes.
        let batch = link.take_all();
        if !batch.is_empty() {
            conn.send(&batch.concat()).await?;
        }
        tokio::select! {
            _ = state.shutdown.cancelled() => {
                conn.close(Some(StreamError::new(StreamCondition::SystemShutdown))).await;
                return Ok(());
            }
            _ = link.wake.notified() => {}
            ev = conn.next() => match ev? {
                Some(StreamEvent::Stanza(_)) => {}
                _ => return Ok(()),
            },
            _ = tokio::time::sleep(idle) => {
                conn.close(None).await;
                return Ok(());
            }
        }
    }
}

/// Connect to `remote`'s server, start TLS (directly or by STARTTLS) and
/// open a stream from `local`: the stream id of the TLS-protected stream
/// and its features are returned with it.
pub(super) async fn connect(
    state: &ServerState,
    s2s: &S2s,
    local: &str,
    remote: &str,
) -> Result<(Conn, String, Element), StreamError> {
    let certs = s2s.certs().ok_or_else(|| {
        StreamError::with_text(
            StreamCondition::UndefinedCondition,
            "federation is not configured",
        )
    })?;
    let mut sock = None;
    for t in targets(state, remote).await {
        if let Ok(s) = TcpStream::connect(&t.addr).await {
            sock = Some((s, t.direct_tls));
            break;
        }
    }
    let Some((sock, direct_tls)) = sock else {
        return Err(StreamError::with_text(
            StreamCondition::HostUnknown,
            "no server of the domain answers",
        ));
    };
    let _ = sock.set_nodelay(true);
    let write = Duration::from_secs(state.config.c2s.write_timeout_secs);
    let mut conn = Conn::new(
        Box::new(sock),
        crate::c2s_limits(&state.config, true),
        write,
    );
    if direct_tls {
        conn = conn
            .upgrade(Tls::Client(certs.direct.clone(), remote))
            .await?;
    } else {
        conn.open(local, remote, None).await?;
        conn.header().await?;
        let features = conn.element().await?;
        if features.get_child("starttls", NS_TLS).is_none() {
            // Dialback over plaintext would let anyone on the path read and
            // change everything: TLS is required.
            return Err(StreamError::with_text(
                StreamCondition::PolicyViolation,
                "the peer does not offer STARTTLS",
            ));
        }
        conn.write(&Element::new("starttls", NS_TLS)).await?;
        if !conn.element().await?.is("proceed", NS_TLS) {
            return Err(StreamError::new(StreamCondition::PolicyViolation));
        }
        conn = conn
            .upgrade(Tls::Client(certs.starttls.clone(), remote))
            .await?;
    }
    conn.open(local, remote, None).await?;
    let attrs = conn.header().await?;
    let id = stream::attr(&attrs, "id").unwrap_or_default().to_string();
    let features = conn.element().await?;
    if !features.is("features", NS_STREAM) || id.is_empty() {
        return Err(StreamError::new(StreamCondition::BadFormat));
    }
    Ok((conn, id, features))
}

/// A connection on which `local` is authenticated to `remote`: by SASL
/// EXTERNAL when the peer offers it (it accepted our certificate), else by
/// dialback on the same stream.
async fn authenticated(
    state: &ServerState,
    s2s: &S2s,
    local: &str,
    remote: &str,
) -> Result<Conn, StreamError> {
    let (mut conn, id, features) = connect(state, s2s, local, remote).await?;
    if certs::offers_external(&features) {
        conn.write(&certs::auth(local)).await?;
        let answer = conn.element().await?;
        if answer.is("success", NS_SASL) {
            // RFC 6120 §6.4.6: the stream restarts after SASL.
            conn.restart();
            conn.open(local, remote, None).await?;
            conn.header().await?;
            conn.element().await?;
            tracing::info!(%local, %remote, "outgoing s2s authenticated by SASL EXTERNAL");
            return Ok(conn);
        }
        tracing::info!(%local, %remote, "SASL EXTERNAL refused; trying dialback");
    }
    let key = s2s.key(remote, local, &id);
    conn.write(
        &Element::new("result", NS_DIALBACK)
            .with_attr("from", local)
            .with_attr("to", remote)
            .with_text(key),
    )
    .await?;
    loop {
        let e = conn.element().await?;
        if e.is("result", NS_DIALBACK) {
            return match e.attr("type") {
                Some("valid") => Ok(conn),
                _ => Err(StreamError::new(StreamCondition::NotAuthorized)),
            };
        }
    }
}

/// Ask `remote`'s authoritative server whether `key` is its key for the
/// stream `id` it opened to `local` (XEP-0220 §2.1.3).
pub(super) async fn verify(
    state: &ServerState,
    s2s: &S2s,
    local: &str,
    remote: &str,
    id: &str,
    key: &str,
) -> bool {
    let ask = async {
        let (mut conn, _, _) = connect(state, s2s, local, remote).await?;
        conn.write(
            &Element::new("verify", NS_DIALBACK)
                .with_attr("from", local)
                .with_attr("to", remote)
                .with_attr("id", id)
                .with_text(key),
        )
        .await?;
        loop {
            let e = conn.element().await?;
            if e.is("verify", NS_DIALBACK) && e.attr("id") == Some(id) {
                let ok = e.attr("type") == Some("valid");
                conn.close(None).await;
                return Ok::<bool, StreamError>(ok);
            }
        }
    };
    let limit = Duration::from_secs(state.config.s2s.connect_timeout_secs);
    matches!(tokio::time::timeout(limit, ask).await, Ok(Ok(true)))
}
