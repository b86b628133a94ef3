//! XEP-0012 Last Activity (2.0): "last seen".
//!
//! - To an account's bare JID: seconds since the account's last logout and
//!   the status of its last unavailable presence, `seconds='0'` while it
//!   has an available resource. Only for entities allowed to see the
//!   account's presence (subscription `from`/`both` on the account's side,
//!   or the account itself); anyone else gets `forbidden` (§4, §8).
//! - To the server: its uptime (§6).
//! - To a full JID: routed to that client (dispatch does that).
//!
//! The store is updated when a resource that was available goes
//! unavailable (explicit unavailable presence, or the session ending) and,
//! at most every [`HEARTBEAT_WRITE_SECS`], on the server's ping heartbeat,
//! so a crash loses at most that much of "last seen".

use super::{Cx, Event, EventKind, Iq, IqResult, IqType, Module, Shared, Target};
use crate::error::{Condition, StanzaError};
use crate::router::SessionHandle;
use crate::state::ServerState;
use async_trait::async_trait;
use natter_store::Subscription;
use natter_xml::{Element, NS_CLIENT};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

pub const NS: &str = "jabber:iq:last";

/// A heartbeat writes last activity at most this often per account.
pub const HEARTBEAT_WRITE_SECS: u64 = 600;

pub struct Last {
    started: Instant,
    /// Account → when the heartbeat last wrote its activity.
    beats: Mutex<HashMap<String, Instant>>,
}

impl Default for Last {
    fn default() -> Self {
        Last {
            started: Instant::now(),
            beats: Mutex::new(HashMap::new()),
        }
    }
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

#[async_trait]
impl Module for Last {
    fn name(&self) -> &'static str {
        "last"
    }
    fn events(&self) -> &'static [(EventKind, i32)] {
        &[
            (EventKind::Unavailable, 0),
            (EventKind::Heartbeat, 0),
            (EventKind::Closed, 0),
        ]
    }
    fn provide(self: Arc<Self>, shared: &mut Shared) {
        shared.provide::<Last>(self);
    }
    async fn on_event(
        &self,
        state: &ServerState,
        session: Option<&Arc<SessionHandle>>,
        event: &Event<'_>,
    ) {
        let Some(h) = session else { return };
        match event {
            Event::Unavailable { presence } => went_unavailable(state, h, presence).await,
            Event::Heartbeat => heartbeat(state, h).await,
            Event::Closed if state.routing.resources(&h.bare).len() <= 1 => {
                self.beats.lock().remove(h.bare.as_str());
            }
            _ => {}
        }
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
    async fn handle_iq(&self, cx: &Cx<'_>, iq: &Iq) -> IqResult {
        if iq.kind != IqType::Get {
            return Err(StanzaError::new(Condition::NotAllowed));
        }
        let account = match &iq.target {
            Target::Server(_) if iq.stanza.attr("to").is_some() => {
                let up = self.started.elapsed().as_secs();
                return Ok(Some(
                    Element::new("query", NS).with_attr("seconds", up.to_string()),
                ));
            }
            // No `to`: the user's own account.
            Target::Server(_) => cx.session.bare.clone(),
            Target::Account(b) => b.clone(),
        };
        let state = cx.state;
        if account != cx.session.bare {
            let allowed = state
                .store
                .roster_item(account.as_str(), cx.session.bare.as_str())
                .await?
                .is_some_and(|i| matches!(i.subscription, Subscription::From | Subscription::Both));
            if !allowed {
                return Err(StanzaError::new(Condition::Forbidden));
            }
        }
        if state
            .routing
            .resources(&account)
            .iter()
            .any(|h| h.is_available())
        {
            return Ok(Some(Element::new("query", NS).with_attr("seconds", "0")));
        }
        match state.store.last_activity(account.as_str()).await? {
            Some((at, status)) => {
                let secs = (now_unix() - at).max(0);
                let mut q = Element::new("query", NS).with_attr("seconds", secs.to_string());
                if !status.is_empty() {
                    q.append_text(status);
                }
                Ok(Some(q))
            }
            None if state.store.credentials(account.as_str()).await?.is_none() => {
                Err(StanzaError::new(Condition::ServiceUnavailable))
            }
            None => Err(StanzaError::with_text(
                Condition::ItemNotFound,
                "no activity recorded yet",
            )),
        }
    }
}

/// A resource that was available went unavailable with presence `p`.
async fn went_unavailable(state: &ServerState, me: &SessionHandle, p: &Element) {
    let status = p.child_text("status", NS_CLIENT).unwrap_or_default();
    if let Err(e) = state
        .store
        .set_last_activity(me.bare.as_str(), now_unix(), &status)
        .await
    {
        tracing::warn!(jid = %me.jid, error = %e, "recording last activity failed");
    }
}

/// The server pinged an idle session: it is still there. Writes at most
/// every [`HEARTBEAT_WRITE_SECS`] per account, and only for available ones.
async fn heartbeat(state: &ServerState, me: &SessionHandle) {
    if !me.is_available() {
        return;
    }
    let last = state.modules.api::<Last>();
    {
        let mut beats = last.beats.lock();
        let now = Instant::now();
        match beats.get(me.bare.as_str()) {
            Some(t) if now.duration_since(*t).as_secs() < HEARTBEAT_WRITE_SECS => return,
            _ => {
                beats.insert(me.bare.to_string(), now);
            }
        }
    }
    if let Err(e) = state
        .store
        .set_last_activity(me.bare.as_str(), now_unix(), "")
        .await
    {
        tracing::warn!(jid = %me.jid, error = %e, "recording last activity failed");
    }
}
