//! Protocol vocabulary several modules speak: namespaces, XEP-0082 time
//! stamps, XEP-0203 delays, XEP-0359 stanza-ids and which messages carry
//! content. Pure functions, no state: not a module.

use jid::BareJid;
use natter_xml::{Element, NS_CLIENT};

pub const NS_SID: &str = "urn:xmpp:sid:0";
pub const NS_DELAY: &str = "urn:xmpp:delay";
pub const NS_FORWARD: &str = "urn:xmpp:forward:0";
pub const NS_HINTS: &str = "urn:xmpp:hints";
pub const NS_CHATSTATES: &str = "http://jabber.org/protocol/chatstates";
pub const NS_IBB: &str = "http://jabber.org/protocol/ibb";
pub const NS_CARBONS: &str = "urn:xmpp:carbons:2";
pub const NS_DISCO_INFO: &str = "http://jabber.org/protocol/disco#info";
pub const NS_DISCO_ITEMS: &str = "http://jabber.org/protocol/disco#items";
pub const NS_CAPS: &str = "http://jabber.org/protocol/caps";
pub const NS_DATA: &str = "jabber:x:data";
pub const NS_MAM: &str = "urn:xmpp:mam:2";

pub fn has_hint(msg: &Element, hint: &str) -> bool {
    msg.get_child(hint, NS_HINTS).is_some()
}

/// The message carries something a client needs to rebuild a conversation:
/// any payload other than chat states (XEP-0085), hints (XEP-0334), a
/// thread, origin-id (XEP-0359) or in-band bytestream data. That covers
/// bodies, receipts (XEP-0184), markers (XEP-0333), corrections (XEP-0308),
/// reactions (XEP-0444), retractions (XEP-0424), OMEMO key transport
/// messages, call (jingle message) signalling, invitations, …
/// A `<store/>` hint counts as content.
pub fn has_content(msg: &Element) -> bool {
    has_hint(msg, "store")
        || msg.children().any(|c| {
            !(c.ns == NS_CHATSTATES
                || c.ns == NS_HINTS
                || c.ns == NS_IBB
                || (c.ns == NS_SID && c.name == "origin-id")
                || (c.ns == NS_CLIENT && c.name == "thread")
                || (c.ns == NS_CLIENT && c.name == "error"))
        })
}

/// `<stanza-id xmlns='urn:xmpp:sid:0' id by/>` (XEP-0359).
pub fn stanza_id(id: &str, by: &BareJid) -> Element {
    Element::new("stanza-id", NS_SID)
        .with_attr("id", id)
        .with_attr("by", by.to_string())
}

/// The stanza-id a message got from `by`'s archive, if any.
pub fn stanza_id_of<'a>(msg: &'a Element, by: &BareJid) -> Option<&'a str> {
    msg.children()
        .find(|c| c.is("stanza-id", NS_SID) && c.attr("by") == Some(by.as_str()))
        .and_then(|c| c.attr("id"))
}

// ---------------------------------------------------------------------------
// Time stamps (XEP-0082)
// ---------------------------------------------------------------------------

/// XEP-0082 DateTime in UTC with microseconds, e.g. `2024-05-01T10:00:00.123456Z`.
pub fn stamp(micros: i64) -> String {
    chrono::DateTime::from_timestamp_micros(micros)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// Current time as unix microseconds.
pub fn now_micros() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

/// Parse a XEP-0082 DateTime (any offset, optional fraction) to unix µs.
pub fn parse_stamp(s: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(s.trim())
        .ok()
        .map(|d| d.timestamp_micros())
}

/// `<delay xmlns='urn:xmpp:delay' stamp/>` (XEP-0203), `from` if given.
pub fn delay(micros: i64, from: Option<&str>) -> Element {
    let mut d = Element::new("delay", NS_DELAY).with_attr("stamp", stamp(micros));
    if let Some(f) = from {
        d.set_attr("from", f);
    }
    d
}

/// A carbon copy or an archive result (never archived or queued again).
pub fn is_wrapper(msg: &Element) -> bool {
    msg.children().any(|c| {
        (c.ns == NS_CARBONS && (c.name == "sent" || c.name == "received")) || c.is("result", NS_MAM)
    })
}

/// RFC 6121 §4.7.2.3: -128..127; out of range is clamped, garbage is 0.
pub fn priority(p: &Element) -> i8 {
    p.child_text("priority", NS_CLIENT)
        .and_then(|t| t.trim().parse::<i64>().ok())
        .map_or(0, |v| v.clamp(i8::MIN.into(), i8::MAX.into()) as i8)
}
