//! XEP-0033 Extended Stanza Addressing, done by the server itself: a
//! message to a served domain (no local part) carrying `<addresses/>` is
//! sent as one 1:1 message per distinct recipient, each exactly what the
//! sender would have sent alone — pre-route hooks (blocking) run per copy,
//! then all copies go to the message router together (one group commit:
//! archived for both parties, delivered or queued offline, carbons).
//!
//! What each copy carries (§4.5, §6): the `<addresses/>` element without
//! `bcc` addresses, every `to`/`cc` address this server handled marked
//! `delivered='true'`; `noreply`, `replyto`, `replyroom`, `ofrom` and
//! unknown types pass through untouched. When nothing is left (bcc only)
//! the element is dropped.
//!
//! Choices kept simple, all before anything is sent:
//! - Recipients are the `to`/`cc`/`bcc` addresses not already marked
//!   `delivered='true'`; the same JID (after normalization) is sent once.
//!   A bare and a full JID of one account are different recipients.
//! - More distinct recipients than `limits.max_multicast_recipients`:
//!   `policy-violation`. No recipient at all: `bad-request`.
//! - An address with `uri` instead of `jid` (not supported), without
//!   either, with a malformed `jid`, or naming a served domain itself (it
//!   would come back here): the whole message is refused (`bad-request`,
//!   `jid-malformed`) and nobody gets it.
//! - A recipient the 1:1 path refuses (unknown account, blocked, full
//!   offline queue, another server: this one has no s2s) gets nothing and
//!   the sender gets that copy's error, from that recipient's JID, as for
//!   a 1:1 message; the others still get theirs.

use super::{Cx, Flow, Hook, HookStanza, Kind, Module};
use crate::error::{Condition, StanzaError};
use async_trait::async_trait;
use jid::Jid;
use natter_xml::Element;

pub const NS: &str = "http://jabber.org/protocol/address";

pub struct Multicast;

#[async_trait]
impl Module for Multicast {
    fn name(&self) -> &'static str {
        "multicast"
    }
    fn features(&self) -> &'static [&'static str] {
        &[NS]
    }
    /// Below policy hooks on the original (blocking at 100); the copies
    /// meet every pre-route hook again, one by one.
    fn hooks(&self) -> &'static [(Hook, i32)] {
        &[(Hook::PreRoute(Kind::Message), 50)]
    }
    async fn on_stanza(
        &self,
        _hook: Hook,
        cx: &Cx<'_>,
        s: &HookStanza<'_>,
    ) -> Result<Flow, StanzaError> {
        let Some(addresses) = s.stanza.get_child("addresses", NS) else {
            return Ok(Flow::Continue);
        };
        // Only what is addressed to the server itself, and never an error
        // (it would be answered with errors).
        match s.to {
            Some(to) if to.node().is_none() && cx.state.serves(to.domain().as_str()) => {}
            _ => return Ok(Flow::Continue),
        }
        if s.kind() == "error" {
            return Ok(Flow::Continue);
        }
        let limit = cx.state.config.limits.max_multicast_recipients;
        let fanout = expand(addresses, limit, |d| cx.state.serves(d))?;
        let copies: Vec<Element> = fanout
            .recipients
            .iter()
            .map(|r| copy(s.stanza, r, fanout.header.as_ref()))
            .collect();
        // Boxed here, not in the hook's future: every message passes this
        // hook, and few carry addresses.
        let results = Box::pin(super::dispatch_messages(cx, copies.clone())).await;
        for (c, r) in copies.iter().zip(results) {
            if let Err(e) = r {
                // As `dispatch` answers a 1:1 message: from that recipient.
                cx.state.metrics.stanza_error(&e);
                cx.session.send(e.reply_to(c));
            }
        }
        Ok(Flow::Stop)
    }
}

/// What one multicast message becomes.
#[derive(Debug, PartialEq)]
struct Fanout {
    /// Distinct recipients, in the order they were first named.
    recipients: Vec<Jid>,
    /// The `<addresses/>` every copy carries (None: nothing left to show).
    header: Option<Element>,
}

/// Check the addresses and work out the recipients and the copies' header
/// (`serves`: whether a domain is one of this server's).
fn expand(
    addresses: &Element,
    limit: usize,
    serves: impl Fn(&str) -> bool,
) -> Result<Fanout, StanzaError> {
    let mut recipients: Vec<Jid> = Vec::new();
    let mut header = addresses.clone();
    for a in header.children_mut().filter(|c| c.is("address", NS)) {
        let recipient = matches!(a.attr("type"), Some("to" | "cc" | "bcc"))
            && a.attr("delivered") != Some("true");
        if !recipient {
            continue;
        }
        let jid = match (a.attr("jid"), a.attr("uri")) {
            (Some(j), _) => Jid::new(j).map_err(|_| {
                StanzaError::with_text(Condition::JidMalformed, format!("bad address jid '{j}'"))
            })?,
            (None, Some(_)) => {
                return Err(StanzaError::with_text(
                    Condition::BadRequest,
                    "uri addresses are not supported",
                ))
            }
            (None, None) => {
                return Err(StanzaError::with_text(
                    Condition::BadRequest,
                    "address without jid",
                ))
            }
        };
        if jid.node().is_none() && serves(jid.domain().as_str()) {
            return Err(StanzaError::with_text(
                Condition::BadRequest,
                format!("'{jid}' is this server, not a recipient"),
            ));
        }
        if !recipients.contains(&jid) {
            // Checked as they come: a long list costs no more than `limit`.
            if recipients.len() == limit {
                return Err(StanzaError::with_text(
                    Condition::PolicyViolation,
                    format!("at most {limit} recipients per message"),
                ));
            }
            recipients.push(jid);
        }
        a.set_attr("delivered", "true");
    }
    if recipients.is_empty() {
        return Err(StanzaError::with_text(
            Condition::BadRequest,
            "no to, cc or bcc address to deliver to",
        ));
    }
    // Recipients must not learn who else got it in blind copy (§4.5).
    header.retain_children(|c| !(c.is("address", NS) && c.attr("type") == Some("bcc")));
    let shown = header.children().next().is_some();
    let header = shown.then_some(header);
    Ok(Fanout { recipients, header })
}

/// The 1:1 message for one recipient: the original to `to`, with `header`
/// in place of the `<addresses/>` it came with.
fn copy(original: &Element, to: &Jid, header: Option<&Element>) -> Element {
    let mut m = original.clone();
    m.set_attr("to", to.to_string());
    m.retain_children(|c| !c.is("addresses", NS));
    if let Some(h) = header {
        m.append_child(h.clone());
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(kind: &str, jid: &str) -> Element {
        Element::new("address", NS)
            .with_attr("type", kind)
            .with_attr("jid", jid)
    }

    fn addresses(list: Vec<Element>) -> Element {
        list.into_iter()
            .fold(Element::new("addresses", NS), |a, c| a.with_child(c))
    }

    fn local(d: &str) -> bool {
        d == "example.org"
    }

    fn summary(header: &Element) -> Vec<(String, String, Option<String>)> {
        header
            .children()
            .map(|a| {
                (
                    a.attr("type").unwrap_or_default().to_string(),
                    a.attr("jid").unwrap_or_default().to_string(),
                    a.attr("delivered").map(str::to_string),
                )
            })
            .collect()
    }

    #[test]
    fn bcc_hidden_duplicates_once_others_untouched() {
        let a = addresses(vec![
            addr("to", "a@example.org"),
            addr("cc", "B@Example.org"),
            addr("bcc", "c@example.org"),
            addr("to", "b@example.org"),
            addr("replyto", "r@example.org"),
            addr("noreply", "n@example.org"),
        ]);
        let f = expand(&a, 10, local).unwrap();
        let names: Vec<String> = f.recipients.iter().map(|j| j.to_string()).collect();
        assert_eq!(names, ["a@example.org", "b@example.org", "c@example.org"]);
        let t = Some("true".to_string());
        assert_eq!(
            summary(f.header.as_ref().unwrap()),
            vec![
                ("to".into(), "a@example.org".into(), t.clone()),
                ("cc".into(), "B@Example.org".into(), t.clone()),
                ("to".into(), "b@example.org".into(), t),
                ("replyto".into(), "r@example.org".into(), None),
                ("noreply".into(), "n@example.org".into(), None),
            ]
        );
    }

    #[test]
    fn bcc_only_leaves_no_header_and_delivered_ones_are_skipped() {
        let done = addr("to", "a@example.org").with_attr("delivered", "true");
        let a = addresses(vec![done, addr("bcc", "c@example.org")]);
        let f = expand(&a, 10, local).unwrap();
        assert_eq!(f.recipients, vec![Jid::new("c@example.org").unwrap()]);
        assert_eq!(summary(f.header.as_ref().unwrap()).len(), 1);
        let f = expand(&addresses(vec![addr("bcc", "c@example.org")]), 10, local).unwrap();
        assert_eq!(f.header, None);
    }

    #[test]
    fn refusals() {
        let cond = |a: Element, limit| expand(&a, limit, local).unwrap_err().condition;
        let three = addresses(vec![
            addr("to", "a@example.org"),
            addr("to", "b@example.org"),
            addr("to", "a@example.org"),
            addr("to", "c@example.org"),
        ]);
        assert_eq!(cond(three.clone(), 2), Condition::PolicyViolation);
        assert_eq!(expand(&three, 3, local).unwrap().recipients.len(), 3);
        let uri = Element::new("address", NS)
            .with_attr("type", "to")
            .with_attr("uri", "mailto:a@example.org");
        assert_eq!(cond(addresses(vec![uri]), 5), Condition::BadRequest);
        assert_eq!(
            cond(addresses(vec![addr("to", "@example.org")]), 5),
            Condition::JidMalformed
        );
        assert_eq!(
            cond(addresses(vec![addr("to", "example.org")]), 5),
            Condition::BadRequest
        );
        assert_eq!(
            cond(addresses(vec![addr("replyto", "a@example.org")]), 5),
            Condition::BadRequest
        );
    }

    #[test]
    fn copy_replaces_the_header_and_the_address() {
        let original = Element::new("message", natter_xml::NS_CLIENT)
            .with_attr("to", "example.org")
            .with_attr("id", "m1")
            .with_child(Element::new("body", natter_xml::NS_CLIENT).with_text("hi"))
            .with_child(addresses(vec![addr("bcc", "c@example.org")]));
        let to = Jid::new("c@example.org/phone").unwrap();
        let c = copy(&original, &to, None);
        assert_eq!(c.attr("to"), Some("c@example.org/phone"));
        assert_eq!(c.attr("id"), Some("m1"));
        assert!(c.get_child("addresses", NS).is_none());
        assert_eq!(
            c.child_text("body", natter_xml::NS_CLIENT).as_deref(),
            Some("hi")
        );
    }
}
