//! The cluster's part in message handling (issue 14): a node that lost
//! NATS refuses messages (`internal-server-error`, type `wait`) rather
//! than accept what it could not route to the other nodes — no split
//! brain, nothing acknowledged and then lost — and a message queued
//! offline here is announced to the other nodes (`cluster::routing::poke`),
//! whose sessions of that user may have come online a moment ago. In
//! embedded mode (`cluster.enabled = false`) it does nothing.
//!
//! [`stored_data_changed`] is how a module that caches per-user data
//! (block lists, archive preferences, push registrations) tells the other
//! nodes their copies are stale; they get `Event::StoredDataChanged`.

use super::{Cx, Event, EventKind, Flow, Hook, HookStanza, Kind, Module};
use crate::error::{Condition, ErrorType, StanzaError};
use crate::router::SessionHandle;
use crate::state::ServerState;
use async_trait::async_trait;
use std::sync::Arc;

pub struct ClusterGate;

#[async_trait]
impl Module for ClusterGate {
    fn name(&self) -> &'static str {
        "cluster"
    }
    fn hooks(&self) -> &'static [(Hook, i32)] {
        // Before anything else looks at a message.
        &[(Hook::PreRoute(Kind::Message), 1000)]
    }
    fn events(&self) -> &'static [(EventKind, i32)] {
        &[(EventKind::OfflineQueued, 0)]
    }
    async fn on_stanza(
        &self,
        _hook: Hook,
        cx: &Cx<'_>,
        _s: &HookStanza<'_>,
    ) -> Result<Flow, StanzaError> {
        match &cx.state.cluster {
            Some(c) if !c.connected() => Err(StanzaError::with_text(
                Condition::InternalServerError,
                "the cluster's message bus is unreachable; retry later",
            )
            .with_type(ErrorType::Wait)),
            _ => Ok(Flow::Continue),
        }
    }
    async fn on_event(
        &self,
        state: &ServerState,
        _session: Option<&Arc<SessionHandle>>,
        event: &Event<'_>,
    ) {
        if let (Event::OfflineQueued { user, .. }, Some(c)) = (event, &state.cluster) {
            crate::cluster::routing::poke(c, user).await;
        }
    }
}

/// `module` changed `user`'s stored data that nodes cache: the other nodes
/// of the cluster drop their copies (nothing in embedded mode).
pub async fn stored_data_changed(state: &ServerState, module: &str, user: &jid::BareJid) {
    if let Some(c) = &state.cluster {
        crate::cluster::routing::announce_change(c, module, user).await;
    }
}
