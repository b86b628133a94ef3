//! XML support for natter: an owned element tree with a serializer, and a
//! limited, incremental XMPP stream parser built on `rxml`.
//!
//! `rxml` already rejects DTDs, entity declarations, processing instructions,
//! comments, invalid UTF-8 and characters outside the XML 1.0 range; this
//! crate adds the XMPP framing (stream header, depth-1 stanzas) and
//! resource limits on top.
#![forbid(unsafe_code)]

mod document;
mod element;
mod stream;

pub use document::{DocError, DocEvent, DocumentReader};
pub use element::{escape_attr, escape_text, xml_capacity, Element, Node};
pub use stream::{parse_frame, Limits, StreamEvent, StreamParser, XmlError};

pub const NS_CLIENT: &str = "jabber:client";
pub const NS_STREAM: &str = "http://etherx.jabber.org/streams";
/// WebSocket framing namespace (RFC 7395).
pub const NS_FRAMING: &str = "urn:ietf:params:xml:ns:xmpp-framing";
/// Namespace of the reserved `xml:` prefix (`xml:lang`).
pub const NS_XML: &str = "http://www.w3.org/XML/1998/namespace";
