//! XEP-0357 Push Notifications: wake a phone whose app the OS suspended.
//!
//! A device sends `<enable jid='app-server' node='…'>` (with the app
//! server's secret as publish-options) to its own account; natter keeps
//! the registration with the account in the store (`KvStore`, namespace
//! `urn:xmpp:push:0`: it survives restarts, is shared by a cluster's nodes
//! and goes with the account), bound to the resource that enabled it.
//! `<disable/>` from any session removes it at once, whatever session
//! state a parked stream holds.
//!
//! A registration fires when a message for its account (a chat or normal
//! message with a body, an OMEMO payload or a call proposal; a group
//! message for an absent member) finds its device not live: the resource
//! has no session, or its session is parked by XEP-0198 (which is also
//! how an app frozen with an open socket shows: it stops answering ack
//! requests, and `c2s.ping_timeout_secs` later its session parks; the
//! messages it left unacknowledged then fire a push). A live device that
//! acknowledges gets nothing.
//!
//! Pushes are coalesced: the first message of a burst starts a
//! `push.coalesce_ms` timer and the push carries the count of messages
//! pending since the device was last online; at most
//! `push.max_per_minute` per device. The `urn:xmpp:push:summary` form
//! carries the count and the sender; the body only with
//! `push.include_body` (off: privacy). A message with a body, an OMEMO
//! payload or a call proposal is marked important by carrying
//! `push.important_body` as its body (what Prosody's mod_cloud_notify does
//! with `push_notification_important_body`): the app server then shows a
//! notification without learning anything.
//!
//! The app server answers the publish; an error of type cancel or auth
//! (the registration is gone or refused) removes the registration.
//!
//! natter is also the app server of its own chat page: a registration can
//! be a Web Push subscription (`urn:natter:webpush:0`, `webpush`), with
//! the same triggers, coalescing and rate; its push is a small JSON
//! (sender, count; the body only with `push.include_body`) POSTed to the
//! browser's push service, and a 404/410 from there removes it.

use super::{api, Cx, Event, EventKind, Flow, Hook, HookStanza, Iq, IqResult, IqType, Module};
use crate::error::{Condition, StanzaError};
use crate::state::ServerState;
use async_trait::async_trait;
use jid::{BareJid, FullJid, Jid};
use natter_store::StoreError;
use natter_xml::{Element, NS_CLIENT};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

mod webpush;

pub const NS: &str = "urn:xmpp:push:0";
/// The chat page's Web Push subscriptions.
pub const NS_WEBPUSH: &str = "urn:natter:webpush:0";
/// The service worker and the page's plugin (compiled in like the page).
const SERVICE_WORKER: &str = include_str!("../../web/sw.js");
const WEB_PLUGIN: &str = include_str!("../../web/webpush.js");
/// Characters of a message body a Web Push carries (with
/// `push.include_body`): the encrypted record stays well under the 4 kB
/// push services take.
const MAX_WEBPUSH_BODY: usize = 500;
const NS_SUMMARY: &str = "urn:xmpp:push:summary";
const NS_DATA: &str = "jabber:x:data";
const NS_PUBSUB: &str = "http://jabber.org/protocol/pubsub";
const NS_OMEMO: &str = "eu.siacs.conversations.axolotl";
const NS_OMEMO2: &str = "urn:xmpp:omemo:2";
const NS_JMI: &str = "urn:xmpp:jingle-message:0";
/// Where registrations live in the KvStore.
const KV_KEY: &str = "registrations";
/// Registrations (devices) per account.
const MAX_REGISTRATIONS: usize = 20;
/// Bytes of one registration's publish-options form.
const MAX_OPTIONS_BYTES: usize = 4096;
/// How long the answer to a push is waited for.
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// One device's registration.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
struct Registration {
    /// How pushes reach it (records from before Web Push: XMPP).
    #[serde(default)]
    kind: Transport,
    /// The app server (XEP-0357 `jid`) and the device's node there; for
    /// Web Push, the subscription's endpoint URL and "".
    service: String,
    node: String,
    /// The resource that enabled it: the device.
    resource: String,
    /// The publish-options form (the app server's secret), serialized.
    options: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "lowercase")]
enum Transport {
    /// XEP-0357: a publish to an XMPP app server.
    #[default]
    Xmpp,
    /// RFC 8030: a browser's subscription; its keys, base64url as the
    /// page sent them (checked when enabled).
    WebPush { p256dh: String, auth: String },
}

/// A registration, as the coalescing and rate state is keyed.
type RegKey = (BareJid, String, String);

/// What waits to be pushed to one registration.
#[derive(Default)]
struct Pending {
    /// Messages since the device was last online.
    count: u32,
    sender: String,
    body: Option<String>,
    important: bool,
    /// A flush is scheduled.
    scheduled: bool,
    /// When the latest pushes went out (the rate limit's window).
    sent: VecDeque<Instant>,
}

#[derive(Default)]
pub struct Push {
    /// Sessions of this node parked by XEP-0198 (per node: sessions are).
    parked: Mutex<HashSet<FullJid>>,
    pending: Mutex<HashMap<RegKey, Pending>>,
    /// Pushes sent and not yet answered: IQ id → registration.
    inflight: Mutex<HashMap<String, (RegKey, Instant)>>,
    /// Serializes read-modify-write of an account's registrations (per
    /// node; enabling from two nodes at the same instant may lose one, and
    /// the client enables again at its next login).
    updating: tokio::sync::Mutex<()>,
    /// Web Push's VAPID key and HTTP client, set by `prepare` when Web
    /// Push is on.
    webpush: OnceLock<webpush::Sender>,
    /// Registrations per account: every delivered message consults them,
    /// so routing between online users reads nothing from the store.
    cache: super::cache::UserCache<Vec<Registration>>,
}

#[async_trait]
impl Module for Push {
    fn name(&self) -> &'static str {
        "push"
    }
    fn hooks(&self) -> &'static [(Hook, i32)] {
        &[(Hook::Delivered, 50), (Hook::IqReply, 0)]
    }
    fn events(&self) -> &'static [(EventKind, i32)] {
        &[
            (EventKind::Bound, 0),
            (EventKind::Parked, 0),
            (EventKind::Resumed, 0),
            (EventKind::Closed, 0),
            (EventKind::GroupMessageMissed, 0),
            (EventKind::StoredDataChanged, 0),
        ]
    }
    fn provide(self: Arc<Self>, shared: &mut super::Shared) {
        shared.provide::<Push>(self.clone());
        shared.provide::<dyn api::IqReplies>(self);
    }
    /// XEP-0357 §5: advertised on the account.
    fn account_features(&self) -> &'static [&'static str] {
        &[NS, NS_WEBPUSH]
    }
    fn iq_payloads(&self) -> &'static [(&'static str, &'static str)] {
        &[
            (NS, "enable"),
            (NS, "disable"),
            (NS_WEBPUSH, "enable"),
            (NS_WEBPUSH, "disable"),
        ]
    }
    fn prepare(&self, config: &crate::config::Config) -> anyhow::Result<()> {
        if config.push.enabled && config.push.webpush {
            let sender = webpush::Sender::new(config)?;
            let _ = self.webpush.set(sender);
        }
        Ok(())
    }
    /// The page's service worker (at the origin's root, so its scope is
    /// the whole page), its plugin, and the VAPID public key it subscribes
    /// with.
    fn http(&self) -> Option<axum::Router<ServerState>> {
        use axum::http::{header, StatusCode};
        use axum::response::IntoResponse;
        use axum::routing::get;
        let js = |body: &'static str| {
            get(move || async move {
                (
                    [
                        (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
                        (header::CACHE_CONTROL, "no-cache"),
                    ],
                    body,
                )
            })
        };
        Some(
            axum::Router::new()
                .route("/sw.js", js(SERVICE_WORKER))
                .route("/webpush.js", js(WEB_PLUGIN))
                .route(
                    "/push/vapid-public-key",
                    get(|axum::extract::State(state): axum::extract::State<ServerState>| async move {
                        match state.modules.api::<Push>().webpush.get() {
                            Some(s) => (
                                [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                                s.public_key().to_string(),
                            )
                                .into_response(),
                            None => (StatusCode::NOT_FOUND, "Web Push is off on this server\n")
                                .into_response(),
                        }
                    }),
                ),
        )
    }
    async fn handle_iq(&self, cx: &Cx<'_>, iq: &Iq) -> IqResult {
        if iq.kind != IqType::Set || !iq.is_own_account() {
            return Err(StanzaError::with_text(
                Condition::BadRequest,
                "push is enabled with an iq set to your own account",
            ));
        }
        if !cx.state.config.push.enabled {
            return Err(StanzaError::new(Condition::FeatureNotImplemented));
        }
        let p = iq.payload();
        if p.ns == NS_WEBPUSH {
            return self.handle_webpush(cx, iq).await;
        }
        let service = p
            .attr("jid")
            .and_then(|j| j.parse::<Jid>().ok())
            .ok_or_else(|| {
                StanzaError::with_text(Condition::BadRequest, "a valid jid is required")
            })?
            .to_string();
        let node = p.attr("node").map(str::to_string);
        let user = iq.from.to_bare();
        if p.name == "enable" {
            let options = p
                .get_child("x", NS_DATA)
                .map(|x| x.to_string())
                .filter(|o| !o.is_empty());
            if options
                .as_ref()
                .is_some_and(|o| o.len() > MAX_OPTIONS_BYTES)
            {
                return Err(StanzaError::with_text(
                    Condition::NotAcceptable,
                    format!("publish-options over {MAX_OPTIONS_BYTES} bytes"),
                ));
            }
            let reg = Registration {
                kind: Transport::Xmpp,
                service,
                node: node.unwrap_or_default(),
                resource: iq.from.resource().to_string(),
                options,
            };
            self.enable(cx.state, &user, reg).await?;
        } else {
            self.disable(cx.state, &user, |r| {
                r.kind == Transport::Xmpp
                    && r.service == service
                    && node.as_deref().is_none_or(|n| r.node == n)
            })
            .await?;
        }
        Ok(None)
    }
    async fn on_stanza(
        &self,
        hook: Hook,
        cx: &Cx<'_>,
        s: &HookStanza<'_>,
    ) -> Result<Flow, StanzaError> {
        if hook == Hook::IqReply {
            if api::IqReplies::reply(self, cx.state, s.stanza).await {
                return Ok(Flow::Stop);
            }
        } else if let (Some(user), Some(summary)) = (s.recipient, Summary::of(s.stanza)) {
            self.message_for(cx.state, user, summary).await;
        }
        Ok(Flow::Continue)
    }
    async fn on_event(
        &self,
        state: &ServerState,
        session: Option<&Arc<crate::router::SessionHandle>>,
        event: &Event<'_>,
    ) {
        match event {
            Event::StoredDataChanged { user, module } if *module == self.name() => {
                self.cache.forget(user);
            }
            Event::GroupMessageMissed { user, stanza, .. } => {
                if let Some(summary) = Summary::of(stanza) {
                    self.message_for(state, user, summary).await;
                }
            }
            Event::Parked { unacked } => {
                if let Some(h) = session {
                    self.parked.lock().insert(h.jid.clone());
                    // What it left unacknowledged waits: its device gets
                    // a push (messages counted while it was live are not:
                    // they reached it). A tab or app closed with
                    // everything worth a push acknowledged gets none —
                    // unacked headlines, receipts or archive pages don't.
                    if unacked.iter().any(|m| Summary::of(m).is_some()) {
                        self.flush_device(state, &h.jid).await;
                    }
                }
            }
            Event::Bound | Event::Resumed | Event::Closed => {
                if let Some(h) = session {
                    self.parked.lock().remove(&h.jid);
                    if matches!(event, Event::Closed) {
                        self.cache
                            .forget_unless_online(&*state.routing, &h.bare, h.id);
                    } else {
                        self.online(state, &h.jid).await;
                    }
                }
            }
            _ => {}
        }
    }
}

/// What a push says about one message.
struct Summary {
    sender: String,
    body: Option<String>,
    important: bool,
}

impl Summary {
    /// Messages that warrant waking a device: a body, an OMEMO payload or
    /// a call proposal (not receipts, markers or chat states alone).
    fn of(msg: &Element) -> Option<Summary> {
        if msg.name != "message" || matches!(msg.attr("type"), Some("error" | "headline")) {
            return None;
        }
        let body = msg.child_text("body", NS_CLIENT);
        let encrypted = msg.get_child("encrypted", NS_OMEMO).is_some()
            || msg.get_child("encrypted", NS_OMEMO2).is_some();
        let call = msg.get_child("propose", NS_JMI).is_some();
        if body.is_none() && !encrypted && !call {
            return None;
        }
        Some(Summary {
            sender: msg.attr("from").unwrap_or_default().to_string(),
            // An encrypted message's body is only a fallback text.
            body: body.filter(|_| !encrypted),
            important: true,
        })
    }
}

impl Push {
    /// A device is online again: its pending count starts over.
    async fn online(&self, state: &ServerState, full: &FullJid) {
        let bare = full.to_bare();
        if !self.pending.lock().keys().any(|k| k.0 == bare) {
            return;
        }
        let Ok(regs) = self.registrations(state, &bare).await else {
            return;
        };
        let mut pending = self.pending.lock();
        for reg in regs
            .iter()
            .filter(|r| r.resource == full.resource().as_str())
        {
            pending.remove(&(bare.clone(), reg.service.clone(), reg.node.clone()));
        }
    }

    async fn registrations(
        &self,
        state: &ServerState,
        user: &BareJid,
    ) -> Result<Vec<Registration>, StoreError> {
        if let Some(regs) = self.cache.get(user) {
            return Ok(regs.to_vec());
        }
        let load = self.cache.load(user);
        let regs = match state.store.kv_get(user.as_str(), NS, KV_KEY).await? {
            None => Vec::new(),
            Some(json) => serde_json::from_str(&json)
                .map_err(|e| StoreError::Backend(format!("push registrations of {user}: {e}")))?,
        };
        Ok(load.fill(&*state.routing, Arc::new(regs)).to_vec())
    }

    async fn save(
        &self,
        state: &ServerState,
        user: &BareJid,
        regs: &[Registration],
    ) -> Result<(), StoreError> {
        if regs.is_empty() {
            state.store.kv_delete(user.as_str(), NS, KV_KEY).await?;
        } else {
            let json = serde_json::to_string(regs).expect("registrations serialize");
            state.store.kv_put(user.as_str(), NS, KV_KEY, &json).await?;
        }
        self.cache.set(user, Arc::new(regs.to_vec()));
        super::cluster::stored_data_changed(state, self.name(), user).await;
        Ok(())
    }

    async fn enable(
        &self,
        state: &ServerState,
        user: &BareJid,
        reg: Registration,
    ) -> Result<(), StanzaError> {
        let _one = self.updating.lock().await;
        let mut regs = self.registrations(state, user).await?;
        // The same app-server node again (a reconnect): replaced.
        regs.retain(|r| !(r.service == reg.service && r.node == reg.node));
        if regs.len() >= MAX_REGISTRATIONS {
            return Err(StanzaError::with_text(
                Condition::ResourceConstraint,
                format!("at most {MAX_REGISTRATIONS} push registrations per account"),
            ));
        }
        tracing::info!(%user, service = %reg.service, "push enabled");
        regs.push(reg);
        self.save(state, user, &regs).await?;
        Ok(())
    }

    /// Remove the registrations of `user` that `gone` picks.
    async fn disable(
        &self,
        state: &ServerState,
        user: &BareJid,
        gone: impl Fn(&Registration) -> bool,
    ) -> Result<(), StanzaError> {
        let _one = self.updating.lock().await;
        let mut regs = self.registrations(state, user).await?;
        let (removed, kept): (Vec<_>, Vec<_>) = regs.drain(..).partition(|r| gone(r));
        self.save(state, user, &kept).await?;
        let mut pending = self.pending.lock();
        for r in &removed {
            tracing::info!(%user, service = %r.service, "push disabled");
            pending.remove(&(user.clone(), r.service.clone(), r.node.clone()));
        }
        Ok(())
    }

    /// `<enable xmlns='urn:natter:webpush:0' endpoint='…' p256dh='…'
    /// auth='…'/>` (a `PushSubscription`, bound to the sending resource
    /// like XEP-0357's enable) and `<disable endpoint='…'/>` (without
    /// endpoint: all of the account's Web Push registrations).
    async fn handle_webpush(&self, cx: &Cx<'_>, iq: &Iq) -> IqResult {
        if self.webpush.get().is_none() {
            return Err(StanzaError::with_text(
                Condition::FeatureNotImplemented,
                "Web Push is off on this server",
            ));
        }
        let p = iq.payload();
        let user = iq.from.to_bare();
        let endpoint = p.attr("endpoint");
        if p.name == "disable" {
            self.disable(cx.state, &user, |r| {
                matches!(r.kind, Transport::WebPush { .. })
                    && endpoint.is_none_or(|e| r.service == e)
            })
            .await?;
            return Ok(None);
        }
        let (Some(endpoint), Some(p256dh), Some(auth)) =
            (endpoint, p.attr("p256dh"), p.attr("auth"))
        else {
            return Err(StanzaError::with_text(
                Condition::BadRequest,
                "endpoint, p256dh and auth are required",
            ));
        };
        let allow_http = cx.state.config.push.webpush_allow_http;
        webpush::Subscription::parse(endpoint, p256dh, auth, allow_http)
            .map_err(|why| StanzaError::with_text(Condition::NotAcceptable, why))?;
        let reg = Registration {
            kind: Transport::WebPush {
                p256dh: p256dh.to_string(),
                auth: auth.to_string(),
            },
            service: endpoint.to_string(),
            node: String::new(),
            resource: iq.from.resource().to_string(),
            options: None,
        };
        self.enable(cx.state, &user, reg).await?;
        Ok(None)
    }

    /// Whether the device that enabled `reg` is live (bound, not parked).
    fn live(&self, state: &ServerState, user: &BareJid, reg: &Registration) -> bool {
        let Ok(full) = user.with_resource_str(&reg.resource) else {
            return false;
        };
        state.routing.session(&full).is_some() && !self.parked.lock().contains(&full)
    }

    /// A message for `user`: count it for every device that is not live.
    async fn message_for(&self, state: &ServerState, user: &BareJid, s: Summary) {
        if !state.config.push.enabled {
            return;
        }
        let regs = match self.registrations(state, user).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(%user, error = %e, "cannot read push registrations");
                return;
            }
        };
        for reg in regs {
            if self.live(state, user, &reg) {
                continue;
            }
            let key = (user.clone(), reg.service.clone(), reg.node.clone());
            let schedule = {
                let mut pending = self.pending.lock();
                let p = pending.entry(key.clone()).or_default();
                p.count = p.count.saturating_add(1);
                p.sender.clone_from(&s.sender);
                p.body.clone_from(&s.body);
                p.important |= s.important;
                !std::mem::replace(&mut p.scheduled, true)
            };
            if schedule {
                let delay = Duration::from_millis(state.config.push.coalesce_ms);
                self.schedule(state, key, delay);
            }
        }
    }

    /// A parked device: push what is pending for it now that it is not
    /// live (the session parked with messages it never acknowledged).
    async fn flush_device(&self, state: &ServerState, full: &FullJid) {
        let bare = full.to_bare();
        let Ok(regs) = self.registrations(state, &bare).await else {
            return;
        };
        for reg in regs
            .iter()
            .filter(|r| r.resource == full.resource().as_str())
        {
            let key = (bare.clone(), reg.service.clone(), reg.node.clone());
            let schedule = {
                let mut pending = self.pending.lock();
                let p = pending.entry(key.clone()).or_default();
                if p.count == 0 {
                    // Unacknowledged messages are not counted per message:
                    // at least one waits.
                    p.count = 1;
                    p.important = true;
                }
                !std::mem::replace(&mut p.scheduled, true)
            };
            if schedule {
                self.schedule(state, key, Duration::ZERO);
            }
        }
    }

    fn schedule(&self, state: &ServerState, key: RegKey, delay: Duration) {
        let state = state.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = state.shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            let push = state.modules.api::<Push>();
            push.flush(&state, key).await;
        });
    }

    /// Send the pending push of one registration, unless its rate is spent
    /// (then later).
    async fn flush(&self, state: &ServerState, key: RegKey) {
        let per_minute = state.config.push.max_per_minute.max(1);
        let now = Instant::now();
        let (count, sender, body, important) = {
            let mut pending = self.pending.lock();
            let Some(p) = pending.get_mut(&key) else {
                return;
            };
            while p
                .sent
                .front()
                .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(60))
            {
                p.sent.pop_front();
            }
            if p.sent.len() >= per_minute {
                let wait = Duration::from_secs(60) - now.duration_since(p.sent[0]);
                drop(pending);
                self.schedule(state, key, wait);
                return;
            }
            p.sent.push_back(now);
            p.scheduled = false;
            let important = std::mem::take(&mut p.important);
            (p.count, p.sender.clone(), p.body.take(), important)
        };
        // Still a registration? (disabled meanwhile: nothing goes out)
        let regs = match self.registrations(state, &key.0).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(user = %key.0, error = %e, "cannot read push registrations");
                return;
            }
        };
        let Some(reg) = regs
            .into_iter()
            .find(|r| r.service == key.1 && r.node == key.2)
        else {
            self.pending.lock().remove(&key);
            return;
        };
        let cfg = &state.config.push;
        if let Transport::WebPush { p256dh, auth } = &reg.kind {
            self.send_webpush(
                state,
                &key,
                &reg.service,
                p256dh,
                auth,
                count,
                &sender,
                body,
            )
            .await;
            return;
        }
        let shown_body = match body {
            Some(b) if cfg.include_body => Some(b),
            _ if important => Some(cfg.important_body.clone()),
            _ => None,
        };
        let iq = notification(&key.0, &reg, count, &sender, shown_body.as_deref());
        let id = iq.attr("id").unwrap_or_default().to_string();
        self.inflight.lock().insert(id, (key.clone(), now));
        self.inflight
            .lock()
            .retain(|_, (_, at)| now.duration_since(*at) < REPLY_TIMEOUT);
        send(state, &reg.service, iq).await;
    }
}

impl Push {
    /// POST one Web Push; a subscription its push service says is gone
    /// is removed.
    #[allow(clippy::too_many_arguments)]
    async fn send_webpush(
        &self,
        state: &ServerState,
        key: &RegKey,
        endpoint: &str,
        p256dh: &str,
        auth: &str,
        count: u32,
        sender: &str,
        body: Option<String>,
    ) {
        let Some(ws) = self.webpush.get() else {
            return;
        };
        let allow_http = state.config.push.webpush_allow_http;
        let sub = match webpush::Subscription::parse(endpoint, p256dh, auth, allow_http) {
            Ok(s) => s,
            Err(why) => {
                // Stored before a config change (webpush_allow_http off).
                tracing::warn!(user = %key.0, %why, "Web Push registration no longer valid");
                return;
            }
        };
        let payload = webpush_payload(
            count,
            sender,
            body.filter(|_| state.config.push.include_body),
        );
        match ws.send(&sub, payload.as_bytes()).await {
            webpush::Outcome::Accepted => {}
            webpush::Outcome::Gone => {
                tracing::info!(user = %key.0, "Web Push subscription gone: removed");
                let gone = |r: &Registration| r.service == endpoint && r.kind != Transport::Xmpp;
                if let Err(e) = self.disable(state, &key.0, gone).await {
                    tracing::warn!(error = ?e, "cannot remove a push registration");
                }
            }
            webpush::Outcome::Failed(why) => {
                tracing::warn!(user = %key.0, %why, "Web Push not delivered");
            }
        }
    }
}

/// What the page's service worker shows: the sender's bare JID and the
/// count; the body (shortened) only with `push.include_body`.
fn webpush_payload(count: u32, sender: &str, body: Option<String>) -> String {
    let sender = sender
        .parse::<Jid>()
        .map_or(sender.to_string(), |j| j.to_bare().to_string());
    let mut p = serde_json::json!({ "sender": sender, "count": count });
    if let Some(b) = body {
        p["body"] = b.chars().take(MAX_WEBPUSH_BODY).collect::<String>().into();
    }
    p.to_string()
}

/// The XEP-0357 §7 publish to the app server.
fn notification(
    user: &BareJid,
    reg: &Registration,
    count: u32,
    sender: &str,
    body: Option<&str>,
) -> Element {
    let field = |var: &str, value: &str| {
        Element::new("field", NS_DATA)
            .with_attr("var", var)
            .with_child(Element::new("value", NS_DATA).with_text(value))
    };
    let mut form = Element::new("x", NS_DATA)
        .with_attr("type", "form")
        .with_child(field("FORM_TYPE", NS_SUMMARY))
        .with_child(field("message-count", &count.to_string()));
    if !sender.is_empty() {
        form.append_child(field("last-message-sender", sender));
    }
    if let Some(b) = body {
        form.append_child(field("last-message-body", b));
    }
    let mut publish = Element::new("publish", NS_PUBSUB);
    if !reg.node.is_empty() {
        publish.set_attr("node", &reg.node);
    }
    publish.append_child(
        Element::new("item", NS_PUBSUB)
            .with_child(Element::new("notification", NS).with_child(form)),
    );
    let mut pubsub = Element::new("pubsub", NS_PUBSUB).with_child(publish);
    if let Some(opts) = reg
        .options
        .as_deref()
        .and_then(|o| natter_xml::parse_frame(o.as_bytes(), &natter_xml::Limits::default()).ok())
    {
        pubsub.append_child(Element::new("publish-options", NS_PUBSUB).with_child(opts));
    }
    super::iq("set", &super::new_id(), user.as_str(), &reg.service).with_child(pubsub)
}

/// Hand a server-originated stanza to the app server: a service or
/// component of this server (XEP-0114), else a remote domain.
async fn send(state: &ServerState, to: &str, stanza: Element) {
    let domain = to.parse::<Jid>().map(|j| j.domain().to_string());
    let service = domain.as_deref().is_ok_and(|d| state.modules.is_service(d));
    match service {
        true => {
            if let Some(Err(e)) = state.modules.to_service(state, stanza).await {
                tracing::warn!(app_server = %to, error = ?e, "push not delivered");
            }
        }
        false => match state.modules.try_api::<dyn api::Remote>() {
            Some(remote) if remote.enabled(state) => {
                if let Err(e) = remote.send(state, &stanza) {
                    tracing::warn!(app_server = %to, error = ?e, "push not sent");
                }
            }
            _ => tracing::warn!(app_server = %to, "push not sent: federation is off"),
        },
    }
}

#[async_trait]
impl api::IqReplies for Push {
    async fn reply(&self, state: &ServerState, stanza: &Element) -> bool {
        let Some(id) = stanza.attr("id") else {
            return false;
        };
        let Some((key, _)) = self.inflight.lock().remove(id) else {
            return false;
        };
        if stanza.attr("type") == Some("error") {
            let error = stanza.get_child("error", NS_CLIENT);
            let kind = error.and_then(|e| e.attr("type")).unwrap_or("cancel");
            if matches!(kind, "cancel" | "auth") {
                // The app server says the registration is gone or refused.
                tracing::info!(user = %key.0, app_server = %key.1, "push registration removed by the app server");
                let gone = |r: &Registration| {
                    r.kind == Transport::Xmpp && r.service == key.1 && r.node == key.2
                };
                if let Err(e) = self.disable(state, &key.0, gone).await {
                    tracing::warn!(error = ?e, "cannot remove a push registration");
                }
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_from_before_web_push_are_xmpp_ones() {
        let old = r#"[{"service":"push.example","node":"n","resource":"r","options":null}]"#;
        let regs: Vec<Registration> = serde_json::from_str(old).unwrap();
        assert_eq!(regs[0].kind, Transport::Xmpp);
        let web = Registration {
            kind: Transport::WebPush {
                p256dh: "k".into(),
                auth: "a".into(),
            },
            ..regs[0].clone()
        };
        let json = serde_json::to_string(&web).unwrap();
        assert_eq!(serde_json::from_str::<Registration>(&json).unwrap(), web);
    }

    #[test]
    fn the_web_push_payload_is_small_and_private() {
        assert_eq!(
            webpush_payload(3, "bob@x/phone", None),
            r#"{"count":3,"sender":"bob@x"}"#
        );
        let long = "é".repeat(2000);
        let p: serde_json::Value =
            serde_json::from_str(&webpush_payload(1, "bob@x", Some(long))).unwrap();
        assert_eq!(
            p["body"].as_str().unwrap().chars().count(),
            MAX_WEBPUSH_BODY
        );
    }

    #[test]
    fn what_warrants_a_push() {
        let parse = |s: &str| natter_xml::parse_frame(s.as_bytes(), &Default::default()).unwrap();
        let m = parse(
            "<message xmlns='jabber:client' from='a@x/r' type='chat'><body>hi</body></message>",
        );
        let s = Summary::of(&m).unwrap();
        assert_eq!(
            (s.sender.as_str(), s.body.as_deref()),
            ("a@x/r", Some("hi"))
        );
        let omemo = parse(
            "<message xmlns='jabber:client' type='chat'><body>fallback</body>\
             <encrypted xmlns='eu.siacs.conversations.axolotl'/></message>",
        );
        assert_eq!(
            Summary::of(&omemo).unwrap().body,
            None,
            "never the fallback text"
        );
        let receipt = parse(
            "<message xmlns='jabber:client'><received xmlns='urn:xmpp:receipts' id='1'/></message>",
        );
        assert!(Summary::of(&receipt).is_none());
        let call = parse(
            "<message xmlns='jabber:client'><propose xmlns='urn:xmpp:jingle-message:0' id='c'/></message>",
        );
        assert!(Summary::of(&call).is_some());
    }
}
