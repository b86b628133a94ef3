//! Becoming a bound session: resource binding, XEP-0198 `<enable/>`, and
//! resumption of a parked session (`<resume/>`).

use super::*;

/// Takeover requests a resumable session's task can have pending.
const TAKEOVER_QUEUE: usize = 4;

impl Session {
    pub(super) async fn bind<T: Transport>(
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
        let limits = QueueLimits {
            items: c2s.max_queue,
            bytes: c2s.max_queue_bytes,
            user_bytes: c2s.max_user_bytes,
        };
        let (handle, rx, replaced) = match self.state.router.bind(full, limits, c2s.max_resources) {
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
        self.state.metrics.session_bound(handle.id, t.kind());
        let ev = modules::Event::Bound;
        self.state
            .modules
            .emit(&self.state, Some(&handle), &ev)
            .await;
        self.phase = Phase::Bound(handle);
        self.rx = Some(rx);
        self.neg = None;
        self.send_or_close(t, reply).await
    }

    /// XEP-0198 §3: `<enable/>` after binding.
    pub(super) fn enable(&mut self, h: &Arc<SessionHandle>, el: &Element) -> Element {
        let limit = self.cfg().c2s.resume_timeout_secs;
        let max = match el.attr("max").and_then(|m| m.parse::<u64>().ok()) {
            Some(m) if m > 0 => m.min(limit),
            _ => limit,
        };
        let resume = sm::truthy(el.attr("resume")) && max > 0;
        let mut enabled = Element::new("enabled", sm::NS);
        let id = resume.then(sm::new_id);
        if let Some(id) = &id {
            let (tx, rx) = mpsc::channel(TAKEOVER_QUEUE);
            self.state
                .router
                .resumable
                .insert(id, h.bare.clone(), tx.clone());
            self.takeover = Some((tx, rx));
            enabled.set_attr("id", id.clone());
            enabled.set_attr("resume", "true");
            enabled.set_attr("max", max.to_string());
        }
        tracing::debug!(jid = %h.jid, resume, "stream management enabled");
        self.sm = Some(Box::new(sm::Sm::new(id, max)));
        enabled
    }

    /// SM and CSI nonzas after SASL, before binding.
    pub(super) async fn on_authenticated_nonza<T: Transport>(
        &mut self,
        t: &mut T,
        user: BareJid,
        el: Element,
    ) -> Result<Step, End> {
        match (el.ns.as_str(), el.name.as_str()) {
            (sm::NS, "resume") => self.resume(t, user, el).await,
            (sm::NS_CSI, "inactive") => {
                self.held.inactive = true;
                Ok(Step::Continue)
            }
            (sm::NS_CSI, _) => {
                self.held.inactive = false;
                Ok(Step::Continue)
            }
            // XEP-0198 §3: enabling needs a bound resource.
            (sm::NS, "enable") => {
                self.send_raw(t, &[sm::failed("unexpected-request", None)])
                    .await?;
                Ok(Step::Continue)
            }
            _ => Err(End::Error(StreamError::with_text(
                StreamCondition::NotAuthorized,
                "bind a resource first",
            ))),
        }
    }

    /// XEP-0198 §5: `<resume previd='…' h='…'/>` instead of binding.
    pub(super) async fn resume<T: Transport>(
        &mut self,
        t: &mut T,
        user: BareJid,
        el: Element,
    ) -> Result<Step, End> {
        let (Some(previd), Some(h)) = (el.attr("previd"), sm::parse_h(&el)) else {
            self.send_raw(t, &[sm::failed("bad-request", None)]).await?;
            return Ok(Step::Continue);
        };
        let registry = &self.state.router.resumable;
        let owner = match registry.lookup(previd, &user) {
            sm::Lookup::Live(tx) => tx,
            sm::Lookup::Gone(last) => {
                tracing::debug!(user = %user, "resumption of an unknown session");
                self.send_raw(t, &[sm::failed("item-not-found", last)])
                    .await?;
                return Ok(Step::Continue);
            }
        };
        // The task holding the session (detached, or still on a connection
        // the client gave up on) hands it over.
        let (reply, parked) = oneshot::channel();
        let wait = Duration::from_secs(self.cfg().c2s.write_timeout_secs + 2);
        let parked = match owner.try_send(reply) {
            Ok(()) => tokio::time::timeout(wait, parked)
                .await
                .ok()
                .and_then(Result::ok),
            Err(_) => None,
        };
        let Some(p) = parked else {
            self.send_raw(t, &[sm::failed("item-not-found", None)])
                .await?;
            return Ok(Step::Continue);
        };
        // From here this connection owns the session.
        let previd = previd.to_string();
        let (tx, rx) = mpsc::channel(TAKEOVER_QUEUE);
        self.state
            .router
            .resumable
            .insert(&previd, p.handle.bare.clone(), tx.clone());
        self.takeover = Some((tx, rx));
        let jid = p.handle.jid.clone();
        self.phase = Phase::Bound(p.handle);
        self.rx = Some(p.rx);
        self.held = p.held;
        self.neg = None;
        let sm = self.sm.insert(p.sm);
        if let Err((n, sent)) = sm.ack(h) {
            tracing::info!(%jid, "resumption with a wrong h; session closed");
            return Err(End::Error(
                StreamError::with_text(
                    StreamCondition::UndefinedCondition,
                    format!("you acknowledged {n} stanzas but were sent {sent}"),
                )
                .with_app(sm::too_high(n, sent)),
            ));
        }
        // Everything not acknowledged, in order, exactly once more.
        sm.unwritten = 0;
        sm.requests = 0;
        let mut out = Vec::with_capacity(sm.unacked.len() + 2);
        out.push(Outbound::new(
            &Element::new("resumed", sm::NS)
                .with_attr("previd", previd)
                .with_attr("h", sm.handled.to_string()),
            0,
        ));
        out.extend(sm.unacked.iter().cloned());
        let resent = out.len() - 1;
        sm.ack_deadline = None;
        sm.ack_due = None;
        let unsent = sm.take_unsent();
        if resent > 0 {
            out.push(Outbound::new(&sm::r(), 0));
            self.requested();
        }
        tracing::info!(%jid, resent, transport = t.kind(), "session resumed");
        if let Some(h) = self.bound() {
            let ev = modules::Event::Resumed;
            self.state.modules.emit(&self.state, Some(&h), &ev).await;
        }
        self.state.metrics.stanzas_out(&out[1..=resent]);
        self.send_out(t, &out).await?;
        // Then what it took from its queue and could not write yet.
        self.write(t, unsent).await?;
        // A new stream starts active (XEP-0352 §4): release what was held.
        self.held.inactive = false;
        let held = self.held.take_all();
        self.write(t, held).await?;
        // Its queue refused stanzas while it was parked: they are in
        // offline storage, after everything it holds; deliver them next.
        if let (Some(h), Some(rx)) = (self.bound(), self.rx.as_ref()) {
            if rx.overflowed() {
                self.state
                    .modules
                    .api::<dyn modules::api::OfflineQueue>()
                    .resumed(&self.state, &h, rx);
            }
        }
        Ok(Step::Continue)
    }
}
