//! XEP-0280: Message Carbons — every device of a user sees both sides of
//! a conversation.

use super::{Cx, Flow, Hook, HookStanza, Iq, IqResult, IqType, Module};
use crate::error::{Condition, StanzaError};
use async_trait::async_trait;
use jid::BareJid;
use natter_xml::{Element, NS_CLIENT};

pub const NS: &str = "urn:xmpp:carbons:2";
pub const NS_FORWARD: &str = "urn:xmpp:forward:0";
pub const NS_HINTS: &str = "urn:xmpp:hints";

pub struct Carbons;

#[async_trait]
impl Module for Carbons {
    fn name(&self) -> &'static str {
        "carbons"
    }
    fn hooks(&self) -> &'static [(Hook, i32)] {
        &[(Hook::Delivered, 0)]
    }
    /// Copies of a routed message for the sender's other devices and the
    /// recipient's other devices.
    async fn on_stanza(
        &self,
        _hook: Hook,
        cx: &Cx<'_>,
        s: &HookStanza<'_>,
    ) -> Result<Flow, StanzaError> {
        let kind = s.kind();
        copy_sent(cx, s, kind);
        if let (true, Some(owner)) = (s.to_resource, s.recipient) {
            copy_received(cx, owner, s.delivered_to, s.stanza, kind);
        }
        Ok(Flow::Continue)
    }
    fn features(&self) -> &'static [&'static str] {
        &[NS]
    }
    fn iq_payloads(&self) -> &'static [(&'static str, &'static str)] {
        &[(NS, "enable"), (NS, "disable")]
    }
    async fn handle_iq(&self, cx: &Cx<'_>, iq: &Iq) -> IqResult {
        if iq.kind != IqType::Set || !iq.is_own_account() {
            return Err(StanzaError::new(Condition::BadRequest));
        }
        cx.session.set_carbons(iq.payload().name == "enable");
        Ok(None)
    }
}

/// XEP-0280 §6: chat messages, normal ones with a body, and messages with
/// IM payloads (chat states, receipts, markers — so read state syncs across
/// devices) are copied; `<private/>` (with `<no-copy/>`) opts out.
fn eligible(msg: &Element, kind: &str) -> bool {
    const IM_PAYLOADS: [&str; 3] = [
        "http://jabber.org/protocol/chatstates",
        "urn:xmpp:receipts",
        "urn:xmpp:chat-markers:0",
    ];
    let typed = kind == "chat"
        || (kind == "normal"
            && (msg.get_child("body", NS_CLIENT).is_some()
                || msg.children().any(|c| IM_PAYLOADS.contains(&c.ns.as_str()))));
    typed && msg.get_child("private", NS).is_none() && msg.get_child("no-copy", NS_HINTS).is_none()
}

fn wrap(direction: &str, owner: &BareJid, to: &str, msg: &Element, kind: &str) -> Element {
    Element::new("message", NS_CLIENT)
        .with_attr("from", owner.to_string())
        .with_attr("to", to)
        .with_attr("type", kind)
        .with_child(
            Element::new(direction, NS)
                .with_child(Element::new("forwarded", NS_FORWARD).with_child(msg.clone())),
        )
}

/// Copy an outgoing message to the sender's other carbon-enabled resources.
fn copy_sent(cx: &Cx<'_>, s: &HookStanza<'_>, kind: &str) {
    if !eligible(s.stanza, kind) {
        return;
    }
    // The sender's view is built once, and only when some device gets it.
    let mut built = None;
    for h in cx.state.routing.resources(&cx.session.bare) {
        if h.id != cx.session.id && h.carbons() {
            let msg = match &s.sent_copy {
                Some(copy) => &*built.get_or_insert_with(|| copy.build()),
                None => s.stanza,
            };
            h.send(wrap("sent", &h.bare, &h.jid.to_string(), msg, kind));
        }
    }
}

/// Copy a message delivered to one resource (`delivered_to`) of `owner` to
/// its other carbon-enabled resources.
fn copy_received(
    cx: &Cx<'_>,
    owner: &BareJid,
    delivered_to: Option<u64>,
    msg: &Element,
    kind: &str,
) {
    if !eligible(msg, kind) {
        return;
    }
    for h in cx.state.routing.resources(owner) {
        // The sender's own session never gets a received-carbon of its message.
        if Some(h.id) != delivered_to && h.id != cx.session.id && h.carbons() {
            h.send(wrap("received", owner, &h.jid.to_string(), msg, kind));
        }
    }
}
