//! XEP-0077 In-Band Registration: creating an account before
//! authentication (when enabled, over TLS only), and changing the password
//! or removing the account afterwards.

use super::{Cx, Iq, IqResult, IqType, Module};
use crate::accounts::{self, AccountError};
use crate::error::{Condition, StanzaError};
use crate::router::SessionHandle;
use crate::state::ServerState;
use async_trait::async_trait;
use natter_xml::{Element, NS_CLIENT};

pub const NS: &str = "jabber:iq:register";
pub const NS_FEATURE: &str = "http://jabber.org/features/iq-register";

pub struct Register;

fn form(registered: Option<&str>) -> Element {
    let mut q = Element::new("query", NS);
    match registered {
        Some(user) => {
            q.append_child(Element::new("registered", NS));
            q.append_child(Element::new("username", NS).with_text(user));
            q.append_child(Element::new("password", NS));
        }
        None => {
            q.append_child(
                Element::new("instructions", NS)
                    .with_text("Choose a username and password to register with this server."),
            );
            q.append_child(Element::new("username", NS));
            q.append_child(Element::new("password", NS));
        }
    }
    q
}

fn to_stanza_error(e: AccountError) -> StanzaError {
    match e {
        AccountError::Exists(_) => StanzaError::new(Condition::Conflict),
        AccountError::Reserved(_) => StanzaError::with_text(Condition::Conflict, e.to_string()),
        AccountError::WeakPassword(_) | AccountError::BadPassword(_) => {
            StanzaError::with_text(Condition::NotAcceptable, e.to_string())
        }
        AccountError::BadJid(_) | AccountError::UnstableJid(..) => {
            StanzaError::with_text(Condition::JidMalformed, e.to_string())
        }
        AccountError::UnknownDomain(_) => StanzaError::new(Condition::NotAllowed),
        AccountError::NotFound(_) => StanzaError::new(Condition::ItemNotFound),
        AccountError::Store(s) => s.into(),
    }
}

/// Registration before authentication. `domain` is the stream's `to`.
/// Returns the reply stanza (result or error).
pub async fn handle_preauth(state: &ServerState, domain: &str, stanza: &Element) -> Element {
    match preauth(state, domain, stanza).await {
        Ok(payload) => {
            let mut r = Element::new("iq", NS_CLIENT)
                .with_attr("type", "result")
                .with_attr("id", stanza.attr("id").unwrap_or_default());
            if let Some(p) = payload {
                r.append_child(p);
            }
            r
        }
        Err(e) => {
            let mut r = e.reply_to(stanza);
            r.remove_attr("to");
            r.remove_attr("from");
            r
        }
    }
}

async fn preauth(state: &ServerState, domain: &str, stanza: &Element) -> IqResult {
    if !state.config.registration_enabled() {
        return Err(StanzaError::new(Condition::ServiceUnavailable));
    }
    let q = stanza
        .get_child("query", NS)
        .ok_or_else(|| StanzaError::new(Condition::ServiceUnavailable))?;
    match stanza.attr("type") {
        Some("get") => Ok(Some(form(None))),
        Some("set") => {
            if q.get_child("remove", NS).is_some() {
                return Err(StanzaError::new(Condition::NotAuthorized));
            }
            let (Some(user), Some(pw)) =
                (q.child_text("username", NS), q.child_text("password", NS))
            else {
                return Err(StanzaError::with_text(
                    Condition::BadRequest,
                    "username and password are required",
                ));
            };
            let cfg = &state.config;
            let jid = accounts::parse_user(&format!("{user}@{domain}"), &cfg.domains)
                .map_err(to_stanza_error)?;
            accounts::create(
                state.store.as_ref(),
                &jid,
                &pw,
                cfg.registration.min_password_len,
                Some(cfg.registration.reserve_deleted_secs),
            )
            .await
            .map_err(to_stanza_error)?;
            tracing::info!(user = %jid, "account registered in-band");
            Ok(None)
        }
        _ => Err(StanzaError::new(Condition::BadRequest)),
    }
}

#[async_trait]
impl Module for Register {
    fn name(&self) -> &'static str {
        "register"
    }
    fn features(&self) -> &'static [&'static str] {
        &[NS]
    }
    fn iq_payloads(&self) -> &'static [(&'static str, &'static str)] {
        &[(NS, "query")]
    }
    async fn handle_iq(&self, cx: &Cx<'_>, iq: &Iq) -> IqResult {
        if !iq.is_own_account() {
            return Err(StanzaError::new(Condition::ServiceUnavailable));
        }
        let me = iq.from.to_bare();
        let q = iq.payload();
        match iq.kind {
            IqType::Get => Ok(Some(form(Some(
                me.node().map(|n| n.as_str()).unwrap_or(""),
            )))),
            IqType::Set if q.get_child("remove", NS).is_some() => {
                accounts::delete(cx.state.store.as_ref(), &me)
                    .await
                    .map_err(to_stanza_error)?;
                tracing::info!(user = %me, "account removed in-band");
                // XEP-0077 §3.2: the result is sent, then every session of the account ends.
                close_all(cx, &me);
                Ok(None)
            }
            IqType::Set => {
                let pw = q.child_text("password", NS).ok_or_else(|| {
                    StanzaError::with_text(Condition::BadRequest, "password is required")
                })?;
                if let Some(u) = q.child_text("username", NS) {
                    if Some(u.as_str()) != me.node().map(|n| n.as_str()) {
                        return Err(StanzaError::new(Condition::NotAuthorized));
                    }
                }
                accounts::set_password(
                    cx.state.store.as_ref(),
                    &me,
                    &pw,
                    cx.state.config.registration.min_password_len,
                )
                .await
                .map_err(to_stanza_error)?;
                Ok(None)
            }
        }
    }
}

fn close_all(cx: &Cx<'_>, me: &jid::BareJid) {
    use crate::error::{StreamCondition, StreamError};
    let sessions: Vec<std::sync::Arc<SessionHandle>> = cx.state.routing.resources(me);
    let err = StreamError::with_text(StreamCondition::NotAuthorized, "account removed");
    for h in sessions {
        if h.id == cx.session.id {
            h.close_after_reply(err.clone());
        } else {
            h.close(err.clone());
        }
    }
}
