//! One client session, whatever the transport: stream negotiation
//! (STARTTLS, SASL, resource binding, RFC 6120), then the bound loop that
//! stamps `from` on every stanza, hands it to the modules, writes queued
//! stanzas out, and pings idle clients (XEP-0199 heartbeat).
//!
//! Invariants:
//! - a stanza from a client always leaves here with `from` = its full JID;
//! - server-stamped elements (XEP-0359 stanza-id, XEP-0203 delay) that a
//!   client forged are stripped before anyone sees them;
//! - one bad stanza gets a stanza error; only stream-level faults end the
//!   session, and they end only this session.

pub mod throttle;
pub mod transport;

use crate::error::{Condition, StanzaError, StreamCondition, StreamError};
use crate::modules::{self, Cx};
use crate::router::{BindError, Deliver, SessionHandle};
use crate::state::ServerState;
use base64::Engine;
use jid::BareJid;
use natter_sasl::{Hash, Mechanism, SaslError, ScramServer};
use natter_xml::{Element, Limits, StreamEvent, NS_CLIENT};
use std::sync::Arc;
use std::time::Duration;
use throttle::{PreauthGuard, TokenBucket};
use tokio::sync::mpsc;
use tokio::time::Instant;
use transport::{ReadError, Transport};

pub const NS_TLS: &str = "urn:ietf:params:xml:ns:xmpp-tls";
pub const NS_SASL: &str = "urn:ietf:params:xml:ns:xmpp-sasl";
pub const NS_BIND: &str = "urn:ietf:params:xml:ns:xmpp-bind";
pub const NS_SESSION: &str = "urn:ietf:params:xml:ns:xmpp-session";
const NS_SID: &str = "urn:xmpp:sid:0";
const NS_DELAY: &str = "urn:xmpp:delay";

/// SASL failures tolerated on one connection before it is closed.
const MAX_SASL_FAILURES: u32 = 3;

enum Phase {
    /// Before authentication (TLS and SASL negotiation).
    Connected,
    Authenticated(BareJid),
    Bound(Arc<SessionHandle>),
}

/// What the loop does after an event.
enum Step {
    Continue,
    /// A new stream starts: drop the rest of this read batch.
    Restart,
    Close(Option<StreamError>),
}

struct Scram {
    server: ScramServer,
    user: Option<BareJid>,
}

struct Session {
    state: ServerState,
    phase: Phase,
    stream_id: String,
    domain: String,
    awaiting_open: bool,
    scram: Option<Scram>,
    sasl_failures: u32,
    rx: Option<mpsc::Receiver<Deliver>>,
    preauth: Option<PreauthGuard>,
    last_heard: Instant,
    ping_id: Option<String>,
    /// The queue overflowed: its contents are dropped, not flushed, at close.
    drop_queue: bool,
    /// A write timed out part-way: the stream is cut mid-stanza, so nothing
    /// more may be written to it (not even the stream error).
    write_broken: bool,
}

/// Serve one connection until it ends.
pub async fn serve<T: Transport>(mut t: T, state: ServerState, guard: PreauthGuard) {
    let peer = t.peer();
    let domain = state.config.domains[0].clone();
    let mut s = Session {
        phase: Phase::Connected,
        stream_id: modules::new_id(),
        domain,
        awaiting_open: true,
        scram: None,
        sasl_failures: 0,
        rx: None,
        preauth: Some(guard),
        last_heard: Instant::now(),
        ping_id: None,
        drop_queue: false,
        write_broken: false,
        state,
    };
    tracing::debug!(%peer, transport = t.kind(), "connection opened");
    let end = s.run(&mut t).await;
    if let Err(e) = &end {
        tracing::debug!(%peer, error = %e, "closing stream with error");
    }
    // Release the unauthenticated slot before the peer can see the close,
    // so a client that reconnects right after it is not refused.
    s.preauth = None;
    // Flush what was queued for this session before the stream closes
    // (not for a session that is not reading: that is what filled it).
    if !s.drop_queue {
        s.flush_queue(&mut t).await;
    }
    if !s.write_broken {
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            t.close(end.as_ref().err(), &s.domain),
        )
        .await;
    }
    s.teardown().await;
    tracing::debug!(%peer, "connection closed");
}

impl Session {
    fn cfg(&self) -> &crate::config::Config {
        &self.state.config
    }

    fn limits(&self, authed: bool) -> Limits {
        let l = &self.cfg().limits;
        Limits {
            max_stanza_bytes: if authed {
                l.max_stanza_bytes
            } else {
                l.max_stanza_bytes_preauth
            },
            max_depth: l.max_depth,
            max_attrs: l.max_attrs,
        }
    }

    /// The loop; Ok = the client closed cleanly, Err = close with that error.
    async fn run<T: Transport>(&mut self, t: &mut T) -> Result<(), StreamError> {
        t.set_limits(self.limits(false));
        let preauth_deadline =
            Instant::now() + Duration::from_secs(self.cfg().c2s.preauth_timeout_secs);
        let ping_interval = Duration::from_secs(self.cfg().c2s.ping_interval_secs);
        let ping_timeout = Duration::from_secs(self.cfg().c2s.ping_timeout_secs);
        let write_timeout = Duration::from_secs(self.cfg().c2s.write_timeout_secs);
        let mut bucket = TokenBucket::new(
            self.cfg().limits.rate_bytes_per_sec,
            self.cfg().limits.rate_burst_bytes,
        );
        let shutdown = self.state.shutdown.clone();
        loop {
            let bound = match &self.phase {
                Phase::Bound(h) => Some(h.clone()),
                _ => None,
            };
            let timer = match (&bound, &self.ping_id) {
                (None, _) => preauth_deadline,
                (Some(_), None) => self.last_heard + ping_interval,
                (Some(_), Some(_)) => self.last_heard + ping_interval + ping_timeout,
            };
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    return Err(StreamError::new(StreamCondition::SystemShutdown));
                }
                _ = async { match &bound { Some(h) => h.overflow.notified().await, None => std::future::pending().await } } => {
                    self.drop_queue = true;
                    return Err(StreamError::with_text(
                        StreamCondition::PolicyViolation,
                        "too many stanzas queued for this session: it is not reading",
                    ));
                }
                d = async { match self.rx.as_mut() { Some(rx) => rx.recv().await, None => std::future::pending().await } } => {
                    let mut batch = Vec::new();
                    let mut next = d;
                    // Write everything already queued in one go.
                    loop {
                        match next {
                            Some(Deliver::Stanza(el)) => batch.push(el),
                            Some(Deliver::Close(err)) => {
                                if tokio::time::timeout(write_timeout, t.send(&batch)).await.is_err() {
                                    self.write_broken = true;
                                }
                                return Err(err);
                            }
                            None => break,
                        }
                        if batch.len() >= 64 {
                            break;
                        }
                        next = self.rx.as_mut().and_then(|rx| rx.try_recv().ok());
                    }
                    tracing::trace!(n = batch.len(), "writing stanzas");
                    match tokio::time::timeout(write_timeout, t.send(&batch)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) => return Ok(()),
                        Err(_) => {
                            self.write_broken = true;
                            return Err(StreamError::with_text(
                                StreamCondition::ConnectionTimeout,
                                "client stopped reading",
                            ));
                        }
                    }
                }
                r = t.read() => {
                    let events = match r {
                        Ok(ev) => ev,
                        Err(ReadError::Closed) => return Ok(()),
                        Err(ReadError::Xml(e)) => return Err(e.into()),
                    };
                    tracing::trace!(n = events.len(), "events read");
                    self.last_heard = Instant::now();
                    self.ping_id = None;
                    let mut bytes = 0;
                    for ev in events {
                        if let StreamEvent::Stanza(el) = &ev {
                            bytes += approx_size(el);
                        }
                        match self.on_event(t, ev).await? {
                            Step::Continue => {}
                            Step::Restart => break,
                            Step::Close(None) => return Ok(()),
                            Step::Close(Some(e)) => return Err(e),
                        }
                    }
                    if let Some(pause) = bucket.take(bytes) {
                        tokio::time::sleep(pause).await;
                    }
                }
                _ = tokio::time::sleep_until(timer) => {
                    let Some(h) = bound else {
                        return Err(StreamError::with_text(
                            StreamCondition::ConnectionTimeout,
                            "authentication took too long",
                        ));
                    };
                    if self.ping_id.is_some() {
                        return Err(StreamError::with_text(
                            StreamCondition::ConnectionTimeout,
                            "no answer to ping",
                        ));
                    }
                    let id = format!("ping-{}", modules::new_id());
                    let ping = modules::iq("get", &id, &self.domain, &h.jid.to_string())
                        .with_child(Element::new("ping", modules::ping::NS));
                    self.ping_id = Some(id);
                    // A ping that cannot be written means the peer is gone.
                    if tokio::time::timeout(write_timeout, t.send(&[ping])).await.ok().and_then(Result::ok).is_none() {
                        self.write_broken = true;
                        return Ok(());
                    }
                }
            }
        }
    }

    async fn on_event<T: Transport>(
        &mut self,
        t: &mut T,
        ev: StreamEvent,
    ) -> Result<Step, StreamError> {
        match ev {
            StreamEvent::Open { attrs } => self.on_open(t, attrs).await,
            StreamEvent::Close => Ok(Step::Close(None)),
            StreamEvent::Stanza(_) if self.awaiting_open => Err(StreamError::with_text(
                StreamCondition::NotAuthorized,
                "stanza before stream header",
            )),
            StreamEvent::Stanza(el) => match &self.phase {
                Phase::Bound(h) => {
                    let h = h.clone();
                    self.on_stanza(t, &h, el).await
                }
                _ => self.on_negotiation(t, el).await,
            },
        }
    }

    fn secure<T: Transport>(&self, t: &T) -> bool {
        // WebSocket on loopback: TLS is terminated by a local proxy (or the
        // browser is on this machine).
        t.is_tls() || (t.kind() == "ws" && t.peer().ip().is_loopback())
    }

    fn plaintext_ok<T: Transport>(&self, t: &T) -> bool {
        self.secure(t) || (self.cfg().c2s.allow_plaintext_loopback && t.peer().ip().is_loopback())
    }

    async fn on_open<T: Transport>(
        &mut self,
        t: &mut T,
        attrs: Vec<(String, String)>,
    ) -> Result<Step, StreamError> {
        if !self.awaiting_open {
            return Err(StreamError::with_text(
                StreamCondition::BadFormat,
                "unexpected stream header",
            ));
        }
        let get = |k: &str| attrs.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        let to = get("to").unwrap_or_default().to_ascii_lowercase();
        if !self.state.serves(&to) {
            return Err(StreamError::with_text(
                StreamCondition::HostUnknown,
                format!("this server does not serve {to:?}"),
            ));
        }
        if matches!(self.phase, Phase::Connected) {
            self.domain = to;
        } else if to != self.domain {
            return Err(StreamError::new(StreamCondition::HostUnknown));
        }
        self.stream_id = modules::new_id();
        t.open(&self.stream_id, &self.domain)
            .await
            .map_err(|_| StreamError::new(StreamCondition::UndefinedCondition))?;
        if get("version") != Some("1.0") {
            return Err(StreamError::with_text(
                StreamCondition::UnsupportedVersion,
                "XMPP 1.0 streams only",
            ));
        }
        self.awaiting_open = false;
        let features = self.features(t);
        t.send(&[features])
            .await
            .map_err(|_| StreamError::new(StreamCondition::UndefinedCondition))?;
        Ok(Step::Continue)
    }

    fn features<T: Transport>(&self, t: &T) -> Element {
        let mut f = Element::new("features", natter_xml::NS_STREAM);
        match &self.phase {
            Phase::Connected => {
                if t.can_starttls() {
                    let mut st = Element::new("starttls", NS_TLS);
                    if !self.plaintext_ok(t) {
                        st.append_child(Element::new("required", NS_TLS));
                    }
                    f.append_child(st);
                }
                if self.plaintext_ok(t) {
                    let mut mechs = Element::new("mechanisms", NS_SASL);
                    for m in self.mechanisms(t) {
                        mechs.append_child(Element::new("mechanism", NS_SASL).with_text(m.name()));
                    }
                    f.append_child(mechs);
                    if self.cfg().registration_enabled() && self.secure(t) {
                        f.append_child(Element::new("register", modules::register::NS_FEATURE));
                    }
                }
            }
            Phase::Authenticated(_) => {
                f.append_child(Element::new("bind", NS_BIND));
                f.append_child(
                    Element::new("session", NS_SESSION)
                        .with_child(Element::new("optional", NS_SESSION)),
                );
                for e in self.state.modules.stream_features() {
                    f.append_child(e);
                }
                f.append_child(modules::disco::caps_element(&self.state.modules.features()));
            }
            Phase::Bound(_) => {}
        }
        f
    }

    fn mechanisms<T: Transport>(&self, t: &T) -> Vec<Mechanism> {
        let mut m = Vec::new();
        if t.channel_binding().is_some() {
            m.extend([Mechanism::ScramSha256Plus, Mechanism::ScramSha1Plus]);
        }
        m.extend([Mechanism::ScramSha256, Mechanism::ScramSha1]);
        if self.secure(t) {
            m.push(Mechanism::Plain);
        }
        m
    }

    async fn on_negotiation<T: Transport>(
        &mut self,
        t: &mut T,
        el: Element,
    ) -> Result<Step, StreamError> {
        let send = |el: Element| async move { el };
        match (&self.phase, el.ns.as_str(), el.name.as_str()) {
            (Phase::Connected, NS_TLS, "starttls") if t.can_starttls() => {
                t.send(&[send(Element::new("proceed", NS_TLS)).await])
                    .await
                    .map_err(|_| StreamError::new(StreamCondition::UndefinedCondition))?;
                let tls = self.state.tls.clone();
                match tokio::time::timeout(Duration::from_secs(10), t.starttls(tls)).await {
                    Ok(Ok(())) => {}
                    // The TLS layer is broken: nothing more can be said on it.
                    _ => return Ok(Step::Close(None)),
                }
                self.awaiting_open = true;
                Ok(Step::Restart)
            }
            (Phase::Connected, NS_SASL, _) => self.on_sasl(t, el).await,
            (Phase::Connected, NS_CLIENT, "iq")
                if el.get_child("query", modules::register::NS).is_some() && self.secure(t) =>
            {
                let reply = modules::register::handle_preauth(&self.state, &self.domain, &el).await;
                self.send_or_close(t, reply).await
            }
            (Phase::Authenticated(user), NS_CLIENT, "iq")
                if el.get_child("bind", NS_BIND).is_some() && el.attr("type") == Some("set") =>
            {
                let user = user.clone();
                self.bind(t, user, el).await
            }
            _ => Err(StreamError::with_text(
                StreamCondition::NotAuthorized,
                "authenticate and bind a resource first",
            )),
        }
    }

    async fn send_or_close<T: Transport>(
        &self,
        t: &mut T,
        el: Element,
    ) -> Result<Step, StreamError> {
        t.send(&[el])
            .await
            .map_err(|_| StreamError::new(StreamCondition::UndefinedCondition))?;
        Ok(Step::Continue)
    }

    async fn sasl_failure<T: Transport>(
        &mut self,
        t: &mut T,
        err: SaslError,
        user: Option<&BareJid>,
    ) -> Result<Step, StreamError> {
        self.scram = None;
        if matches!(err, SaslError::NotAuthorized) {
            self.state
                .throttle
                .failure(t.peer().ip(), user.map(|u| u.as_str()));
            self.sasl_failures += 1;
            tracing::info!(peer = %t.peer(), user = user.map(|u| u.to_string()), "authentication failed");
        }
        let f = Element::new("failure", NS_SASL).with_child(Element::new(err.condition(), NS_SASL));
        self.send_or_close(t, f).await?;
        if self.sasl_failures >= MAX_SASL_FAILURES {
            return Err(StreamError::with_text(
                StreamCondition::PolicyViolation,
                "too many failed authentication attempts",
            ));
        }
        Ok(Step::Continue)
    }

    async fn on_sasl<T: Transport>(&mut self, t: &mut T, el: Element) -> Result<Step, StreamError> {
        let ip = t.peer().ip();
        match el.name.as_str() {
            "abort" => {
                return self.sasl_failure(t, SaslError::Aborted, None).await;
            }
            "auth" if self.scram.is_none() => {}
            "response" if self.scram.is_some() => {
                let scram = self.scram.take().expect("checked");
                let user = scram.user.clone();
                let mut server = scram.server;
                let data = match decode_sasl(&el.text()) {
                    Ok(d) => d,
                    Err(e) => return self.sasl_failure(t, e, user.as_ref()).await,
                };
                return match (server.client_final(&data), user) {
                    (Ok(v), Some(user)) => self.sasl_success(t, user, Some(v)).await,
                    (Ok(_), None) => self.sasl_failure(t, SaslError::NotAuthorized, None).await,
                    (Err(e), user) => self.sasl_failure(t, e, user.as_ref()).await,
                };
            }
            _ => {
                return self
                    .sasl_failure(
                        t,
                        SaslError::MalformedRequest("unexpected SASL element".into()),
                        None,
                    )
                    .await
            }
        }
        if !self.plaintext_ok(t) {
            return self
                .sasl_failure(t, SaslError::EncryptionRequired, None)
                .await;
        }
        if !self.state.throttle.allowed(ip, None) {
            return self
                .sasl_failure(t, SaslError::TemporaryAuthFailure, None)
                .await;
        }
        let mech = el.attr("mechanism").and_then(Mechanism::from_name);
        let Some(mech) = mech.filter(|m| self.mechanisms(t).contains(m)) else {
            return self
                .sasl_failure(t, SaslError::InvalidMechanism, None)
                .await;
        };
        let data = match decode_sasl(&el.text()) {
            Ok(d) => d,
            Err(e) => return self.sasl_failure(t, e, None).await,
        };
        match mech.hash() {
            None => self.plain(t, &data).await,
            Some(hash) => {
                let plus = matches!(mech, Mechanism::ScramSha1Plus | Mechanism::ScramSha256Plus);
                let mut server = ScramServer::new(hash, plus, t.channel_binding());
                let first = match server.client_first(&data) {
                    Ok(f) => f,
                    Err(e) => return self.sasl_failure(t, e, None).await,
                };
                let user = match self.authzid_check(&first.username, first.authzid.as_deref()) {
                    Ok(u) => u,
                    Err(e) => return self.sasl_failure(t, e, None).await,
                };
                if !self.state.throttle.allowed(ip, Some(user.as_str())) {
                    return self
                        .sasl_failure(t, SaslError::TemporaryAuthFailure, None)
                        .await;
                }
                let creds = self.load_creds(&user, hash).await?;
                let challenge = server.server_first(creds.as_ref());
                self.scram = Some(Scram {
                    server,
                    user: creds.is_some().then_some(user),
                });
                let c = Element::new("challenge", NS_SASL)
                    .with_text(base64::engine::general_purpose::STANDARD.encode(challenge));
                self.send_or_close(t, c).await
            }
        }
    }

    /// The username as a JID on this stream's domain; an authzid naming
    /// anyone else is refused (ejabberd #4601).
    fn authzid_check(&self, username: &str, authzid: Option<&str>) -> Result<BareJid, SaslError> {
        let user = BareJid::new(&format!("{username}@{}", self.domain))
            .map_err(|_| SaslError::NotAuthorized)?;
        if let Some(z) = authzid {
            match BareJid::new(z) {
                Ok(z) if z == user => {}
                _ => return Err(SaslError::InvalidAuthzid),
            }
        }
        Ok(user)
    }

    async fn load_creds(
        &self,
        user: &BareJid,
        hash: Hash,
    ) -> Result<Option<natter_sasl::ScramCredentials>, StreamError> {
        let creds = self
            .state
            .store
            .credentials(user.as_str())
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "store error during login");
                StreamError::new(StreamCondition::InternalServerError)
            })?;
        Ok(creds.map(|c| {
            let s = match hash {
                Hash::Sha1 => c.sha1,
                Hash::Sha256 => c.sha256,
            };
            natter_sasl::ScramCredentials {
                salt: s.salt,
                iterations: s.iterations,
                stored_key: s.stored_key,
                server_key: s.server_key,
            }
        }))
    }

    async fn plain<T: Transport>(&mut self, t: &mut T, data: &[u8]) -> Result<Step, StreamError> {
        let (authzid, authcid, password) = match natter_sasl::parse_plain(data) {
            Ok(p) => p,
            Err(e) => return self.sasl_failure(t, e, None).await,
        };
        let user = match self.authzid_check(&authcid, authzid.as_deref()) {
            Ok(u) => u,
            Err(e) => return self.sasl_failure(t, e, None).await,
        };
        if !self
            .state
            .throttle
            .allowed(t.peer().ip(), Some(user.as_str()))
        {
            return self
                .sasl_failure(t, SaslError::TemporaryAuthFailure, None)
                .await;
        }
        let creds = self.load_creds(&user, Hash::Sha256).await?;
        // PBKDF2 is slow on purpose; keep it off the async workers.
        let ok = match creds {
            Some(c) => tokio::task::spawn_blocking(move || {
                natter_sasl::verify_password(&c, Hash::Sha256, &password)
            })
            .await
            .unwrap_or(false),
            None => false,
        };
        if ok {
            self.sasl_success(t, user, None).await
        } else {
            self.sasl_failure(t, SaslError::NotAuthorized, Some(&user))
                .await
        }
    }

    async fn sasl_success<T: Transport>(
        &mut self,
        t: &mut T,
        user: BareJid,
        additional: Option<Vec<u8>>,
    ) -> Result<Step, StreamError> {
        self.state.throttle.success(user.as_str());
        let mut s = Element::new("success", NS_SASL);
        if let Some(a) = additional {
            s.append_text(base64::engine::general_purpose::STANDARD.encode(a));
        }
        self.send_or_close(t, s).await?;
        tracing::info!(user = %user, transport = t.kind(), "authenticated");
        self.phase = Phase::Authenticated(user);
        t.reset();
        t.set_limits(self.limits(true));
        self.awaiting_open = true;
        Ok(Step::Restart)
    }

    async fn bind<T: Transport>(
        &mut self,
        t: &mut T,
        user: BareJid,
        iq: Element,
    ) -> Result<Step, StreamError> {
        let requested = iq
            .get_child("bind", NS_BIND)
            .and_then(|b| b.child_text("resource", NS_BIND))
            .filter(|r| !r.is_empty());
        let resource = requested.unwrap_or_else(|| format!("natter-{}", &modules::new_id()[..8]));
        let full = match user.with_resource_str(&resource) {
            Ok(f) => f,
            Err(_) => {
                let e = StanzaError::with_text(Condition::BadRequest, "invalid resource");
                return self.send_or_close(t, e.reply_to(&iq)).await;
            }
        };
        let c2s = &self.cfg().c2s;
        let (handle, rx, replaced) =
            match self
                .state
                .router
                .bind(full, c2s.max_queue, c2s.max_resources)
            {
                Ok(b) => b,
                Err(BindError::TooManyResources) => {
                    let e = StanzaError::with_text(
                        Condition::ResourceConstraint,
                        "too many devices connected",
                    );
                    return self.send_or_close(t, e.reply_to(&iq)).await;
                }
            };
        if let Some(old) = replaced {
            old.close(StreamError::with_text(
                StreamCondition::Conflict,
                "replaced by a new connection",
            ));
        }
        let reply = Element::new("iq", NS_CLIENT)
            .with_attr("type", "result")
            .with_attr("id", iq.attr("id").unwrap_or_default())
            .with_child(
                Element::new("bind", NS_BIND)
                    .with_child(Element::new("jid", NS_BIND).with_text(handle.jid.to_string())),
            );
        tracing::info!(jid = %handle.jid, transport = t.kind(), "resource bound");
        self.phase = Phase::Bound(handle);
        self.rx = Some(rx);
        self.preauth = None;
        self.send_or_close(t, reply).await
    }

    async fn on_stanza<T: Transport>(
        &mut self,
        t: &mut T,
        h: &Arc<SessionHandle>,
        mut el: Element,
    ) -> Result<Step, StreamError> {
        if el.ns != NS_CLIENT || !matches!(el.name.as_str(), "message" | "presence" | "iq") {
            return Err(StreamError::with_text(
                StreamCondition::UnsupportedStanzaType,
                format!("unsupported element {{{}}}{}", el.ns, el.name),
            ));
        }
        el.set_attr("from", h.jid.to_string());
        self.strip_server_elements(&mut el);
        if el.name == "iq" {
            // Our own ping answered.
            if matches!(el.attr("type"), Some("result") | Some("error"))
                && el.attr("id").is_some()
                && el.attr("id") == self.ping_id.as_deref()
            {
                self.ping_id = None;
                return Ok(Step::Continue);
            }
            // RFC 3921 session establishment, kept for old clients: a no-op.
            if el.get_child("session", NS_SESSION).is_some()
                && el.attr("to").is_none_or(|to| to == self.domain)
            {
                let r = modules::iq(
                    "result",
                    el.attr("id").unwrap_or_default(),
                    &self.domain,
                    &h.jid.to_string(),
                );
                return self.send_or_close(t, r).await;
            }
        }
        let cx = Cx {
            state: &self.state,
            session: h,
        };
        modules::dispatch(&cx, el).await;
        Ok(Step::Continue)
    }

    /// XEP-0359 §5 / XEP-0203: only this server may stamp these.
    fn strip_server_elements(&self, el: &mut Element) {
        let ours = |v: Option<&str>| {
            v.and_then(|j| jid::Jid::new(j).ok())
                .is_some_and(|j| self.state.serves(j.domain().as_str()))
        };
        el.retain_children(|c| {
            !((c.ns == NS_SID && c.name == "stanza-id" && ours(c.attr("by")))
                || (c.ns == NS_DELAY && c.name == "delay" && ours(c.attr("from"))))
        });
    }

    async fn flush_queue<T: Transport>(&mut self, t: &mut T) {
        let Some(rx) = self.rx.as_mut() else { return };
        let mut batch = Vec::new();
        while let Ok(Deliver::Stanza(el)) = rx.try_recv() {
            batch.push(el);
        }
        if !batch.is_empty()
            && tokio::time::timeout(Duration::from_secs(2), t.send(&batch))
                .await
                .is_err()
        {
            self.write_broken = true;
        }
    }

    async fn teardown(&mut self) {
        if let Phase::Bound(h) = &self.phase {
            let cx = Cx {
                state: &self.state,
                session: h,
            };
            self.state.modules.session_closed(&cx).await;
            self.state.router.unbind(h);
        }
    }
}

fn decode_sasl(text: &str) -> Result<Vec<u8>, SaslError> {
    let text = text.trim();
    // RFC 6120 §6.4.2: "=" is an empty initial response.
    if text.is_empty() || text == "=" {
        return Ok(Vec::new());
    }
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|_| SaslError::MalformedRequest("invalid base64".into()))
}

/// Rough byte size of a stanza for the rate limit (serializing it exactly
/// would cost more than the limit is worth).
fn approx_size(el: &Element) -> usize {
    let mut n = el.name.len() * 2 + 5;
    for (k, v) in &el.attrs {
        n += k.len() + v.len() + 4;
    }
    for c in &el.children {
        n += match c {
            natter_xml::Node::Element(e) => approx_size(e),
            natter_xml::Node::Text(t) => t.len(),
        };
    }
    n
}
