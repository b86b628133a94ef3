//! A stanza on its way to a client, kept compact: serialized once when it
//! is queued, shared (one `Arc`) when the same stanza goes to several
//! sessions, and costing its wire size plus a few words while it waits in
//! a session queue, the XEP-0198 unacked queue or the XEP-0352 hold-back
//! queue. A parsed tree costs many times its wire size (a 240 KB stanza of
//! 60,000 empty elements is ~18 MB as an `Element`); queues hold these
//! instead, and their bounds count `Outbound::size` bytes.
//!
//! What the session still needs to know without the tree is extracted
//! here: the stanza's kind (metrics), whether XEP-0352 may hold it back and
//! its sender (`csi`, `from`), and `ord`, its place in the recipient's
//! acceptance order (see `modules::offline`), which a requeued message
//! keeps.

use natter_xml::{Element, NS_CLIENT};
use std::sync::Arc;

const NS_CHATSTATES: &str = "http://jabber.org/protocol/chatstates";
const NS_CARBONS: &str = "urn:xmpp:carbons:2";
const NS_FORWARD: &str = "urn:xmpp:forward:0";

/// What XEP-0352 may hold back: the latest one per sender and kind waits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Holdable {
    /// A presence broadcast (available or unavailable).
    Presence,
    /// A message carrying nothing but a XEP-0085 chat state (also inside a
    /// XEP-0280 carbon).
    ChatState,
}

#[derive(Debug)]
struct Inner {
    /// The stanza as written on a TCP stream (`jabber:client` inherited
    /// from the stream header; any other namespace declared).
    xml: Box<str>,
    /// Top-level element name length (the WebSocket form declares the
    /// namespace right after it).
    name_len: u8,
    /// The WebSocket form when it is not `xml` with the namespace added
    /// (stream-level elements: `<stream:features>`, `<stream:error>`).
    ws: Option<Box<str>>,
    client_ns: bool,
    kind: &'static str,
    holdable: Option<Holdable>,
    from: Box<str>,
    ord: i64,
}

/// A serialized stanza with what routing and the session need from it.
/// Cloning shares the bytes.
#[derive(Clone, Debug)]
pub struct Outbound(Arc<Inner>);

impl Outbound {
    /// Serialize `el` once. `ord` is its acceptance order for the
    /// recipient (0: none, e.g. presence and IQs).
    pub fn new(el: &Element, ord: i64) -> Self {
        let mut xml = String::with_capacity(natter_xml::xml_capacity(el));
        el.write_to(&mut xml, NS_CLIENT, true);
        let ws = (el.ns == natter_xml::NS_STREAM).then(|| {
            let mut ws = String::new();
            el.write_to(&mut ws, "", false);
            ws.into_boxed_str()
        });
        Outbound(Arc::new(Inner {
            xml: xml.into_boxed_str(),
            ws,
            name_len: el.name.len().min(u8::MAX as usize) as u8,
            client_ns: el.ns == NS_CLIENT,
            kind: match (el.ns == NS_CLIENT, el.name.as_str()) {
                (true, "message") => "message",
                (true, "presence") => "presence",
                (true, "iq") => "iq",
                _ => "other",
            },
            holdable: holdable(el),
            from: el.attr("from").unwrap_or_default().into(),
            ord,
        }))
    }

    /// The TCP form.
    pub fn xml(&self) -> &str {
        &self.0.xml
    }

    /// The stanza as one RFC 7395 WebSocket frame: the same bytes with the
    /// `jabber:client` namespace declared on the top element.
    pub fn ws_frame(&self) -> String {
        let xml = &*self.0.xml;
        if let Some(ws) = &self.0.ws {
            return ws.to_string();
        }
        if !self.0.client_ns {
            return xml.to_owned();
        }
        let at = 1 + self.0.name_len as usize;
        let mut out = String::with_capacity(xml.len() + 24);
        out.push_str(&xml[..at]);
        out.push_str(" xmlns='");
        out.push_str(NS_CLIENT);
        out.push('\'');
        out.push_str(&xml[at..]);
        out
    }

    /// Bytes this costs while queued (its wire size; the bookkeeping
    /// around it is a few words).
    pub fn size(&self) -> usize {
        self.0.xml.len() + self.0.from.len() + std::mem::size_of::<Inner>()
    }

    /// "message", "presence", "iq" or "other".
    pub fn kind(&self) -> &'static str {
        self.0.kind
    }

    pub fn is_message(&self) -> bool {
        self.0.kind == "message"
    }

    pub fn holdable(&self) -> Option<Holdable> {
        self.0.holdable
    }

    /// The `from` attribute ("" when absent).
    pub fn from(&self) -> &str {
        &self.0.from
    }

    pub fn ord(&self) -> i64 {
        self.0.ord
    }

    /// The tree again (requeueing, tests): parsed from our own bytes.
    pub fn to_element(&self) -> Option<Element> {
        let limits = natter_xml::Limits {
            max_stanza_bytes: usize::MAX,
            max_depth: usize::MAX,
            max_attrs: usize::MAX,
            max_elements: usize::MAX,
        };
        natter_xml::parse_frame(self.ws_frame().as_bytes(), &limits).ok()
    }
}

fn holdable(el: &Element) -> Option<Holdable> {
    if el.ns != NS_CLIENT {
        return None;
    }
    match el.name.as_str() {
        "presence" => {
            matches!(el.attr("type"), None | Some("unavailable")).then_some(Holdable::Presence)
        }
        "message" => {
            let inner = el
                .children()
                .find(|c| c.ns == NS_CARBONS && (c.name == "sent" || c.name == "received"))
                .and_then(|c| c.get_child("forwarded", NS_FORWARD))
                .and_then(|f| f.get_child("message", NS_CLIENT));
            only_chat_state(inner.unwrap_or(el)).then_some(Holdable::ChatState)
        }
        _ => None,
    }
}

fn only_chat_state(m: &Element) -> bool {
    if m.attr("type") == Some("error") {
        return false;
    }
    let mut state = false;
    for c in m.children() {
        match (c.ns.as_str(), c.name.as_str()) {
            (NS_CHATSTATES, _) => state = true,
            // Carried along with a chat state, never content.
            (NS_CLIENT, "thread") | ("urn:xmpp:hints", _) | ("urn:xmpp:sid:0", _) => {}
            (NS_CARBONS, "sent" | "received") => {}
            _ => return false,
        }
    }
    state
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_and_websocket_forms_round_trip() {
        let el = Element::new("message", NS_CLIENT)
            .with_attr("from", "a@x/1")
            .with_attr("to", "b@x")
            .with_child(Element::new("body", NS_CLIENT).with_text("hi <3 'you'"))
            .with_child(Element::new("active", NS_CHATSTATES));
        let o = Outbound::new(&el, 42);
        assert!(o.xml().starts_with("<message from="));
        assert!(o
            .ws_frame()
            .starts_with("<message xmlns='jabber:client' from="));
        assert_eq!(o.to_element().unwrap(), el);
        assert_eq!((o.kind(), o.from(), o.ord()), ("message", "a@x/1", 42));
        assert_eq!(o.holdable(), None);
        let typing =
            Element::new("message", NS_CLIENT).with_child(Element::new("composing", NS_CHATSTATES));
        assert_eq!(
            Outbound::new(&typing, 0).holdable(),
            Some(Holdable::ChatState)
        );
    }

    #[test]
    fn queued_cost_is_wire_size_not_tree_size() {
        // The memory-amplification stanza: many empty children.
        let mut el = Element::new("message", NS_CLIENT);
        for _ in 0..10_000 {
            el.append_child(Element::new("a", NS_CLIENT));
        }
        let o = Outbound::new(&el, 0);
        assert!(o.size() < 10_000 * 4 + 200, "{}", o.size());
    }
}
