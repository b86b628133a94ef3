//! Elements only a server may put into a stanza, checked on everything a
//! client sends before anyone else sees it.
//!
//! Clients trust these because their server stamped them: a carbon
//! (XEP-0280) or an archive result (XEP-0313) says "this is a message of
//! yours", a stanza-id by your account (XEP-0359) is your archive's id, a
//! delay from your server (XEP-0203, XEP-0091) says when it got there, an
//! `ofrom` address (XEP-0033) names the original sender. From another
//! client each of them is a forgery.
//!
//! Per element:
//! - carbons `<sent>`/`<received>` and MAM `<result>` wrappers make the
//!   whole message a lie about who sent what, and no client ever sends
//!   one, so the message is refused with `not-acceptable` naming the
//!   element (a message of type `error` is never answered: the wrapper is
//!   dropped and the rest delivered). Prosody and ejabberd pass these
//!   through and leave the check to the receiving client (XEP-0280 §11);
//!   refusing costs nothing and protects clients that skip the check;
//! - stanza-id, delay, legacy delay and `ofrom` addresses are stripped,
//!   as Prosody's and ejabberd's MAM modules strip stanza-ids (XEP-0359 §5
//!   asks for exactly that), and the stanza goes on: they come along in
//!   honest stanzas too (a client echoing what it received).
//!
//! A JID counts as local when its domain, after normalization (nameprep,
//! lower case, a trailing dot removed), is one this server serves; a value
//! that does not parse as a JID counts as local too (no honest use, and a
//! client comparing strings loosely might still match it).

use crate::error::{Condition, StanzaError};
use crate::router::SessionHandle;
use crate::state::ServerState;
use jid::Jid;
use natter_xml::Element;
use std::borrow::Cow;

const NS_SID: &str = "urn:xmpp:sid:0";
const NS_DELAY: &str = "urn:xmpp:delay";
/// XEP-0091 (obsolete, still read by old clients).
const NS_LEGACY_DELAY: &str = "jabber:x:delay";
/// XEP-0033 extended addressing.
const NS_ADDRESS: &str = "http://jabber.org/protocol/address";
/// XEP-0280, current and first published namespace.
const NS_CARBONS: [&str; 2] = ["urn:xmpp:carbons:2", "urn:xmpp:carbons:1"];
/// XEP-0313, current and older namespaces clients still understand.
const NS_MAM: [&str; 4] = [
    "urn:xmpp:mam:2",
    "urn:xmpp:mam:1",
    "urn:xmpp:mam:0",
    "urn:xmpp:mam:tmp",
];

/// Parse a JID with its domain normalized. jid 0.12.3 drops a trailing
/// dot from the domain only when something else in the JID changed, so
/// `bob@localhost.` would keep `localhost.` as its domain: the dot is
/// removed here first. The domain ends at the first `/` (a node cannot
/// contain one).
pub fn parse_jid(s: &str) -> Option<Jid> {
    let end = s.find('/').unwrap_or(s.len());
    let s = match s[..end].strip_suffix('.') {
        Some(head) => Cow::Owned(format!("{head}{}", &s[end..])),
        None => Cow::Borrowed(s),
    };
    Jid::new(&s).ok()
}

/// The session's check of one stanza from its client: false when it was
/// refused (the error is already on its way back to the client).
pub fn admit(state: &ServerState, h: &SessionHandle, el: &mut Element) -> bool {
    match client_stanza(el, |d| state.serves(d)) {
        Ok(()) => true,
        Err(e) => {
            state.metrics.stanza_error(&e);
            h.send(e.reply_to(el));
            false
        }
    }
}

/// Check and clean one stanza from a client (its `from` already set).
/// `serves` tells whether a normalized domain is one of this server's.
/// Strips what may be stripped; `Err` is the error to answer when the
/// stanza must not be routed at all (then `el` is already stripped, so the
/// error reply does not echo the forgery).
pub fn client_stanza(el: &mut Element, serves: impl Fn(&str) -> bool) -> Result<(), StanzaError> {
    let local = |jid: &str| parse_jid(jid).is_none_or(|j| serves(j.domain().as_str()));
    let mut wrapper = None;
    el.retain_children(|c| {
        if is_wrapper(c) {
            wrapper.get_or_insert_with(|| format!("<{} xmlns='{}'/>", c.name, c.ns));
            return false;
        }
        let forged =
            // XEP-0359: 'by' is required; none at all is no honest stanza-id.
            (c.is("stanza-id", NS_SID) && c.attr("by").is_none_or(local))
            // A delay without 'from' claims nothing about who stamped it.
            || ((c.is("delay", NS_DELAY) || c.is("x", NS_LEGACY_DELAY))
                && c.attr("from").is_some_and(local));
        !forged
    });
    for a in el.children_mut().filter(|c| c.is("addresses", NS_ADDRESS)) {
        a.retain_children(|c| !(c.name == "address" && c.attr("type") == Some("ofrom")));
    }
    el.retain_children(|c| !(c.is("addresses", NS_ADDRESS) && c.children().next().is_none()));
    match wrapper {
        // Never answer an error with an error (RFC 6120 §8.3.1).
        Some(w) if el.name == "message" && el.attr("type") != Some("error") => {
            Err(StanzaError::with_text(
                Condition::NotAcceptable,
                format!("{w} is added by the server only; a client must not send it"),
            ))
        }
        _ => Ok(()),
    }
}

/// A carbon copy or an archive result: a server's statement that the
/// forwarded message inside is the user's own.
fn is_wrapper(c: &Element) -> bool {
    (NS_CARBONS.contains(&c.ns.as_str()) && matches!(c.name.as_str(), "sent" | "received"))
        || (NS_MAM.contains(&c.ns.as_str()) && c.name == "result")
}

#[cfg(test)]
mod tests {
    use super::*;
    use natter_xml::NS_CLIENT;

    const FWD: &str = "urn:xmpp:forward:0";

    fn serves(d: &str) -> bool {
        d == "localhost" || d == "example.org"
    }

    fn msg(kind: &str) -> Element {
        Element::new("message", NS_CLIENT)
            .with_attr("from", "mallory@localhost/r")
            .with_attr("to", "bob@localhost")
            .with_attr("type", kind)
            .with_child(Element::new("body", NS_CLIENT).with_text("hi"))
    }

    fn forwarded_from_alice() -> Element {
        Element::new("forwarded", FWD).with_child(
            Element::new("message", NS_CLIENT)
                .with_attr("from", "alice@localhost/phone")
                .with_attr("to", "bob@localhost")
                .with_child(Element::new("body", NS_CLIENT).with_text("send me money")),
        )
    }

    fn names(el: &Element) -> Vec<String> {
        el.children()
            .map(|c| format!("{}:{}", c.ns, c.name))
            .collect()
    }

    #[test]
    fn trailing_dot_and_case_name_the_same_jid() {
        for s in [
            "bob@localhost.",
            "bob@LOCALHOST.",
            "Bob@LocalHost",
            "bob@localhost./res",
            "localhost.",
            "localhost./x",
        ] {
            let j = parse_jid(s).unwrap_or_else(|| panic!("{s} parses"));
            assert_eq!(j.domain().as_str(), "localhost", "{s}");
        }
        assert_eq!(
            parse_jid("bob@localhost./a/b.")
                .unwrap()
                .resource()
                .unwrap()
                .as_str(),
            "a/b."
        );
        assert!(parse_jid("not a jid@@").is_none());
    }

    #[test]
    fn forged_carbons_and_archive_results_are_refused_in_every_namespace() {
        for (name, ns) in [
            ("sent", "urn:xmpp:carbons:2"),
            ("received", "urn:xmpp:carbons:2"),
            ("received", "urn:xmpp:carbons:1"),
            ("result", "urn:xmpp:mam:2"),
            ("result", "urn:xmpp:mam:1"),
            ("result", "urn:xmpp:mam:0"),
            ("result", "urn:xmpp:mam:tmp"),
        ] {
            let mut m =
                msg("chat").with_child(Element::new(name, ns).with_child(forwarded_from_alice()));
            let e = client_stanza(&mut m, serves).expect_err(ns);
            assert_eq!(e.condition, Condition::NotAcceptable);
            assert!(e.text.unwrap().contains(ns));
            // The reply built from `m` does not carry the forgery back.
            assert_eq!(names(&m), vec![format!("{NS_CLIENT}:body")], "{ns}");
        }
    }

    #[test]
    fn a_wrapper_in_an_error_message_is_dropped_not_answered() {
        let mut m = msg("error").with_child(
            Element::new("sent", "urn:xmpp:carbons:2").with_child(forwarded_from_alice()),
        );
        assert!(client_stanza(&mut m, serves).is_ok());
        assert_eq!(names(&m), vec![format!("{NS_CLIENT}:body")]);
    }

    #[test]
    fn plain_forwarding_and_private_hint_pass() {
        let mut m = msg("chat")
            .with_child(forwarded_from_alice())
            .with_child(Element::new("private", "urn:xmpp:carbons:2"));
        let before = m.clone();
        assert!(client_stanza(&mut m, serves).is_ok());
        assert_eq!(m, before);
    }

    #[test]
    fn stanza_ids_by_any_local_jid_are_stripped() {
        let mut m = msg("chat");
        for (i, by) in [
            Some("bob@localhost."),
            Some("BOB@LocalHost"),
            Some("mallory@localhost"),
            Some("localhost."),
            Some("LOCALHOST"),
            Some("example.org"),
            Some("room@localhost/nick"),
            Some("@@bad"),
            None,
        ]
        .into_iter()
        .enumerate()
        {
            let mut sid = Element::new("stanza-id", NS_SID).with_attr("id", format!("f{i}"));
            if let Some(by) = by {
                sid.set_attr("by", by);
            }
            m.append_child(sid);
        }
        m.append_child(
            Element::new("stanza-id", NS_SID)
                .with_attr("by", "room@conference.other.example")
                .with_attr("id", "kept"),
        );
        m.append_child(Element::new("origin-id", NS_SID).with_attr("id", "o1"));
        assert!(client_stanza(&mut m, serves).is_ok());
        let ids: Vec<_> = m.children().filter_map(|c| c.attr("id")).collect();
        assert_eq!(ids, vec!["kept", "o1"]);
    }

    #[test]
    fn delays_from_local_jids_are_stripped_in_both_namespaces() {
        let mut m = msg("chat");
        for (ns, name) in [(NS_DELAY, "delay"), (NS_LEGACY_DELAY, "x")] {
            for from in [
                "localhost",
                "localhost.",
                "Bob@Localhost.",
                "mallory@localhost/r",
            ] {
                m.append_child(
                    Element::new(name, ns)
                        .with_attr("from", from)
                        .with_attr("stamp", "2002-09-10T23:08:25Z"),
                );
            }
            m.append_child(Element::new(name, ns).with_attr("from", "other.example"));
            m.append_child(Element::new(name, ns).with_attr("stamp", "2002-09-10T23:08:25Z"));
        }
        assert!(client_stanza(&mut m, serves).is_ok());
        let kept: Vec<_> = m
            .children()
            .filter(|c| c.name != "body")
            .map(|c| (c.ns.as_str(), c.attr("from")))
            .collect();
        assert_eq!(
            kept,
            vec![
                (NS_DELAY, Some("other.example")),
                (NS_DELAY, None),
                (NS_LEGACY_DELAY, Some("other.example")),
                (NS_LEGACY_DELAY, None),
            ]
        );
    }

    #[test]
    fn ofrom_addresses_are_stripped_and_others_kept() {
        let addr = |t: &str, j: &str| {
            Element::new("address", NS_ADDRESS)
                .with_attr("type", t)
                .with_attr("jid", j)
        };
        let mut m = msg("chat")
            .with_child(
                Element::new("addresses", NS_ADDRESS)
                    .with_child(addr("ofrom", "alice@localhost"))
                    .with_child(addr("replyto", "mallory@localhost")),
            )
            .with_child(
                Element::new("addresses", NS_ADDRESS).with_child(addr("ofrom", "alice@localhost")),
            );
        assert!(client_stanza(&mut m, serves).is_ok());
        let addrs: Vec<_> = m
            .children()
            .filter(|c| c.is("addresses", NS_ADDRESS))
            .collect();
        assert_eq!(addrs.len(), 1, "the emptied <addresses/> goes");
        let types: Vec<_> = addrs[0].children().filter_map(|c| c.attr("type")).collect();
        assert_eq!(types, vec!["replyto"]);
    }

    #[test]
    fn presence_and_iq_are_stripped_never_refused() {
        for name in ["presence", "iq"] {
            let mut el = Element::new(name, NS_CLIENT)
                .with_attr("type", "result")
                .with_child(Element::new("result", "urn:xmpp:mam:2"))
                .with_child(Element::new("delay", NS_DELAY).with_attr("from", "localhost"));
            assert!(client_stanza(&mut el, serves).is_ok());
            assert_eq!(el.children().count(), 0, "{name}");
        }
    }
}
