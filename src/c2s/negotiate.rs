//! Before binding: stream headers, features, STARTTLS, and dispatch of
//! negotiation elements to SASL (`auth.rs`) and bind/resume (`bind.rs`).

use super::*;

impl Session {
    /// Until a resource is bound or a session resumed: stream headers,
    /// STARTTLS, SASL, bind; then what the client sent after the element
    /// that bound it, in the same read.
    pub(super) async fn negotiate<T: Transport>(&mut self, t: &mut T) -> Result<(), Box<End>> {
        // A handler's panic (a pipelined stanza's, after binding) ends the
        // session like an internal error, through the ordinary teardown.
        let r = match AssertUnwindSafe(self.negotiate_inner(t))
            .catch_unwind()
            .await
        {
            Ok(r) => r,
            Err(panic) => Err(panicked(panic)),
        };
        r.map_err(Box::new)
    }

    async fn negotiate_inner<T: Transport>(&mut self, t: &mut T) -> Result<(), End> {
        t.set_limits(self.limits(false));
        let deadline = Instant::now() + Duration::from_secs(self.cfg().c2s.preauth_timeout_secs);
        let shutdown = self.state.shutdown.clone();
        loop {
            let events = tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    return Err(End::Error(StreamError::new(StreamCondition::SystemShutdown)));
                }
                r = t.read() => match r {
                    Ok(ev) => ev,
                    Err(ReadError::Closed) => return Err(End::Lost(None)),
                    Err(ReadError::Xml(e)) => return Err(End::Error(e.into())),
                },
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(End::Error(StreamError::with_text(
                        StreamCondition::ConnectionTimeout,
                        "authentication took too long",
                    )));
                }
            };
            tracing::trace!(n = events.len(), "events read");
            self.last_heard = Instant::now();
            let mut bytes = 0;
            let mut events = events.into_iter();
            let mut bound = false;
            for ev in events.by_ref() {
                if let StreamEvent::Stanza(el) = &ev {
                    bytes += el.approx_len();
                }
                match self.on_event(t, ev).await? {
                    Step::Continue => {}
                    Step::Restart => break,
                    Step::Close => return Err(End::Clean),
                }
                if matches!(self.phase, Phase::Bound(_)) {
                    bound = true;
                    break;
                }
            }
            if let Some(pause) = self.bucket.take(bytes) {
                tokio::time::sleep(pause).await;
            }
            if bound {
                let rest: Vec<_> = events.collect();
                if !rest.is_empty() {
                    let h = self.bound().expect("bound");
                    self.on_read(t, &h, rest).await?;
                }
                return Ok(());
            }
        }
    }

    async fn on_event<T: Transport>(&mut self, t: &mut T, ev: StreamEvent) -> Result<Step, End> {
        match ev {
            StreamEvent::Open { attrs } => Ok(self.on_open(t, attrs).await?),
            StreamEvent::Close => Ok(Step::Close),
            StreamEvent::Stanza(_) if self.neg.as_ref().is_none_or(|n| n.awaiting_open) => {
                Err(End::Error(StreamError::with_text(
                    StreamCondition::NotAuthorized,
                    "stanza before stream header",
                )))
            }
            StreamEvent::Stanza(el) => match &self.phase {
                Phase::Bound(h) => {
                    let h = h.clone();
                    self.on_bound(t, &h, el).await
                }
                Phase::Authenticated(user) if el.ns == sm::NS || el.ns == sm::NS_CSI => {
                    let user = BareJid::clone(user);
                    self.on_authenticated_nonza(t, user, el).await
                }
                _ => Ok(self.on_negotiation(t, el).await?),
            },
        }
    }

    fn secure<T: Transport>(&self, t: &T) -> bool {
        // WebSocket on loopback: TLS is terminated by a local proxy (or the
        // browser is on this machine).
        t.is_tls() || (t.kind() == "ws" && t.peer().ip().is_loopback())
    }

    pub(super) fn plaintext_ok<T: Transport>(&self, t: &T) -> bool {
        self.secure(t) || (self.cfg().c2s.allow_plaintext_loopback && t.peer().ip().is_loopback())
    }

    async fn on_open<T: Transport>(
        &mut self,
        t: &mut T,
        attrs: Vec<(String, String)>,
    ) -> Result<Step, StreamError> {
        if !self.neg()?.awaiting_open {
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
            self.domain = self
                .cfg()
                .domains
                .iter()
                .position(|d| *d == to)
                .unwrap_or(0);
        } else if to != self.domain() {
            return Err(StreamError::new(StreamCondition::HostUnknown));
        }
        t.open(&modules::new_id(), self.domain())
            .await
            .map_err(|_| StreamError::new(StreamCondition::UndefinedCondition))?;
        if get("version") != Some("1.0") {
            return Err(StreamError::with_text(
                StreamCondition::UnsupportedVersion,
                "XMPP 1.0 streams only",
            ));
        }
        self.neg()?.awaiting_open = false;
        let features = self.features(t);
        t.send(&[Outbound::new(&features, 0)])
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
                f.append_child(Element::new("sm", sm::NS));
                f.append_child(Element::new("csi", sm::NS_CSI));
                for e in self.state.modules.stream_features() {
                    f.append_child(e);
                }
                f.append_child(self.state.modules.caps_element());
            }
            Phase::Bound(_) | Phase::Ended => {}
        }
        f
    }

    pub(super) fn mechanisms<T: Transport>(&self, t: &T) -> Vec<Mechanism> {
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
                t.send(&[Outbound::new(
                    &send(Element::new("proceed", NS_TLS)).await,
                    0,
                )])
                .await
                .map_err(|_| StreamError::new(StreamCondition::UndefinedCondition))?;
                let tls = self.state.tls.clone();
                match tokio::time::timeout(Duration::from_secs(10), t.starttls(tls)).await {
                    Ok(Ok(())) => {}
                    // The TLS layer is broken: nothing more can be said on it.
                    _ => return Ok(Step::Close),
                }
                self.neg()?.awaiting_open = true;
                Ok(Step::Restart)
            }
            (Phase::Connected, NS_SASL, _) => self.on_sasl(t, el).await,
            (Phase::Connected, NS_CLIENT, "iq")
                if el.get_child("query", modules::register::NS).is_some() && self.secure(t) =>
            {
                let reply =
                    modules::register::handle_preauth(&self.state, self.domain(), &el).await;
                self.send_or_close(t, reply).await
            }
            (Phase::Authenticated(user), NS_CLIENT, "iq")
                if el.get_child("bind", NS_BIND).is_some() && el.attr("type") == Some("set") =>
            {
                let user = BareJid::clone(user);
                self.bind(t, user, el).await
            }
            _ => Err(StreamError::with_text(
                StreamCondition::NotAuthorized,
                "authenticate and bind a resource first",
            )),
        }
    }

    pub(super) async fn send_or_close<T: Transport>(
        &self,
        t: &mut T,
        el: Element,
    ) -> Result<Step, StreamError> {
        t.send(&[Outbound::new(&el, 0)])
            .await
            .map_err(|_| StreamError::new(StreamCondition::UndefinedCondition))?;
        Ok(Step::Continue)
    }
}
