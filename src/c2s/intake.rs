//! What a bound client sends: stanzas (from-stamping, stripping,
//! dispatch), XEP-0198 acks and XEP-0352 state.

use super::*;

impl Session {
    /// Events read on a bound stream. Consecutive messages share one
    /// durable write.
    pub(super) async fn on_read<T: Transport>(
        &mut self,
        t: &mut T,
        h: &Arc<SessionHandle>,
        events: Vec<StreamEvent>,
    ) -> Result<(), End> {
        tracing::trace!(n = events.len(), "events read");
        self.last_heard = Instant::now();
        self.ping_id = None;
        self.busy();
        let mut bytes = 0;
        let mut events = events.into_iter().peekable();
        while let Some(ev) = events.next() {
            let el = match ev {
                StreamEvent::Stanza(el) => el,
                StreamEvent::Close => return Err(End::Clean),
                StreamEvent::Open { .. } => {
                    return Err(End::Error(StreamError::with_text(
                        StreamCondition::BadFormat,
                        "unexpected stream header",
                    )))
                }
            };
            bytes += el.approx_len();
            if is_message(&el) {
                let mut run = vec![el];
                while let Some(StreamEvent::Stanza(el)) =
                    events.next_if(|e| matches!(e, StreamEvent::Stanza(el) if is_message(el)))
                {
                    bytes += el.approx_len();
                    run.push(el);
                }
                self.on_messages(t, h, run).await?;
                continue;
            }
            self.on_bound(t, h, el).await?;
        }
        if let Some(pause) = self.bucket.take(bytes) {
            tokio::time::sleep(pause).await;
        }
        Ok(())
    }

    /// A top-level element on a bound stream: XEP-0198/XEP-0352 nonzas, or
    /// a stanza.
    pub(super) async fn on_bound<T: Transport>(
        &mut self,
        t: &mut T,
        h: &Arc<SessionHandle>,
        el: Element,
    ) -> Result<Step, End> {
        if el.ns == sm::NS_CSI {
            match el.name.as_str() {
                "inactive" => self.held.inactive = true,
                "active" => {
                    self.held.inactive = false;
                    let held = self.held.take_all();
                    self.write(t, held).await?;
                }
                _ => {}
            }
            return Ok(Step::Continue);
        }
        if el.ns != sm::NS {
            return self.on_stanza(t, h, el).await;
        }
        match (el.name.as_str(), self.sm.is_some()) {
            ("enable", false) => {
                let enabled = self.enable(h, &el);
                self.send_raw(t, &[enabled]).await?;
            }
            ("r", true) => {
                let handled = self.sm.as_ref().map_or(0, |s| s.handled);
                self.send_raw(t, &[sm::a(handled)]).await?;
            }
            ("a", true) => {
                let Some(n) = sm::parse_h(&el) else {
                    return Err(End::Error(StreamError::with_text(
                        StreamCondition::BadFormat,
                        "<a/> needs a numeric 'h'",
                    )));
                };
                let sm = self.sm.as_mut().expect("checked");
                if let Err((n, sent)) = sm.ack(n) {
                    return Err(End::Error(
                        StreamError::with_text(
                            StreamCondition::UndefinedCondition,
                            format!("you acknowledged {n} stanzas but were sent {sent}"),
                        )
                        .with_app(sm::too_high(n, sent)),
                    ));
                }
                sm.requests = sm.requests.saturating_sub(1);
                let pending = sm.requests > 0;
                let timeout = Duration::from_secs(self.state.config.c2s.ping_timeout_secs);
                sm.ack_deadline = pending.then(|| Instant::now() + timeout);
                // Room again for what waited on acks.
                let unsent = sm.take_unsent();
                self.schedule_ack();
                self.write(t, unsent).await?;
            }
            ("enable" | "resume", _) => {
                // Enabled already, or resuming on a bound stream (XEP-0198 §3, §5).
                self.send_raw(t, &[sm::failed("unexpected-request", None)])
                    .await?;
            }
            _ => {
                return Err(End::Error(StreamError::with_text(
                    StreamCondition::UnsupportedStanzaType,
                    format!("unexpected {{{}}}{}", el.ns, el.name),
                )));
            }
        }
        Ok(Step::Continue)
    }

    async fn on_stanza<T: Transport>(
        &mut self,
        t: &mut T,
        h: &Arc<SessionHandle>,
        el: Element,
    ) -> Result<Step, End> {
        let step = self.handle_stanza(t, h, el).await?;
        // Handled (XEP-0198 §4): dispatch returned.
        if let Some(sm) = self.sm.as_mut() {
            sm.handled = sm.handled.wrapping_add(1);
        }
        Ok(step)
    }

    /// A run of message stanzas from one read: prepared one by one like
    /// any stanza, routed with one archive write (`route_many`), each
    /// counted as handled (XEP-0198) only after that write is durable.
    async fn on_messages<T: Transport>(
        &mut self,
        t: &mut T,
        h: &Arc<SessionHandle>,
        run: Vec<Element>,
    ) -> Result<(), End> {
        if run.len() == 1 {
            let el = run.into_iter().next().expect("one");
            return self.on_stanza(t, h, el).await.map(|_| ());
        }
        let n = run.len() as u32;
        let mut msgs = Vec::with_capacity(run.len());
        for mut el in run {
            el.set_attr("from", h.jid.to_string());
            self.state.metrics.stanza_in(&el.name);
            if strip::admit(&self.state, h, &mut el) {
                msgs.push(el);
            }
        }
        let cx = Cx {
            state: &self.state,
            session: h,
        };
        let originals = msgs.clone();
        let _timer = self.state.metrics.routing_timer("message");
        let results = modules::dispatch_messages(&cx, msgs).await;
        for (msg, r) in originals.iter().zip(results) {
            // Never answer an error with an error (RFC 6120 §8.3.1).
            if let Err(e) = r {
                if msg.attr("type") != Some("error") {
                    h.send(e.reply_to(msg));
                }
            }
        }
        if let Some(sm) = self.sm.as_mut() {
            sm.handled = sm.handled.wrapping_add(n);
        }
        Ok(())
    }

    async fn handle_stanza<T: Transport>(
        &mut self,
        t: &mut T,
        h: &Arc<SessionHandle>,
        mut el: Element,
    ) -> Result<Step, End> {
        if el.ns != NS_CLIENT || !matches!(el.name.as_str(), "message" | "presence" | "iq") {
            return Err(End::Error(StreamError::with_text(
                StreamCondition::UnsupportedStanzaType,
                format!("unsupported element {{{}}}{}", el.ns, el.name),
            )));
        }
        el.set_attr("from", h.jid.to_string());
        self.state.metrics.stanza_in(&el.name);
        if !strip::admit(&self.state, h, &mut el) {
            return Ok(Step::Continue);
        }
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
                && el.attr("to").is_none_or(|to| to == self.domain())
            {
                let r = modules::iq(
                    "result",
                    el.attr("id").unwrap_or_default(),
                    self.domain(),
                    &h.jid.to_string(),
                );
                self.write(t, vec![Outbound::new(&r, 0)]).await?;
                return Ok(Step::Continue);
            }
        }
        let cx = Cx {
            state: &self.state,
            session: h,
        };
        let _timer = self.state.metrics.routing_timer(&el.name);
        modules::dispatch(&cx, el).await;
        Ok(Step::Continue)
    }
}

fn is_message(el: &Element) -> bool {
    el.ns == NS_CLIENT && el.name == "message"
}
