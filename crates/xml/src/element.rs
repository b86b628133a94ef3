//! A small owned XML element tree and its serializer.

use std::fmt;

use crate::{NS_STREAM, NS_XML};

/// An XML element with its resolved namespace.
///
/// Attribute names are plain local names (`to`, `id`) except for attributes in
/// the XML namespace, which keep the reserved `xml:` prefix (`xml:lang`).
/// Attributes in any other namespace are dropped by the parser: XMPP does not
/// use them on the wire and supporting them would mean tracking prefixes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Element {
    pub name: String,
    pub ns: String,
    pub attrs: Vec<(String, String)>,
    pub children: Vec<Node>,
}

/// A child of an [`Element`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Node {
    Element(Element),
    Text(String),
}

impl Element {
    pub fn new(name: impl Into<String>, ns: impl Into<String>) -> Self {
        Element {
            name: name.into(),
            ns: ns.into(),
            attrs: Vec::new(),
            children: Vec::new(),
        }
    }

    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Set an attribute, replacing an existing one of the same name.
    pub fn set_attr(&mut self, name: impl Into<String>, value: impl Into<String>) {
        let name = name.into();
        let value = value.into();
        match self.attrs.iter_mut().find(|(k, _)| *k == name) {
            Some((_, v)) => *v = value,
            None => self.attrs.push((name, value)),
        }
    }

    pub fn remove_attr(&mut self, name: &str) -> Option<String> {
        let idx = self.attrs.iter().position(|(k, _)| k == name)?;
        Some(self.attrs.remove(idx).1)
    }

    pub fn with_attr(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.set_attr(name, value);
        self
    }

    pub fn with_child(mut self, child: Element) -> Self {
        self.append_child(child);
        self
    }

    pub fn with_text(mut self, text: impl Into<String>) -> Self {
        self.append_text(text);
        self
    }

    pub fn append_child(&mut self, child: Element) {
        self.children.push(Node::Element(child));
    }

    /// Append text, merging it into a directly preceding text node so that
    /// parsed trees compare equal regardless of how the input was chunked.
    pub fn append_text(&mut self, text: impl Into<String>) {
        let text = text.into();
        if text.is_empty() {
            return;
        }
        match self.children.last_mut() {
            Some(Node::Text(prev)) => prev.push_str(&text),
            _ => self.children.push(Node::Text(text)),
        }
    }

    pub fn is(&self, name: &str, ns: &str) -> bool {
        self.name == name && self.ns == ns
    }

    pub fn get_child(&self, name: &str, ns: &str) -> Option<&Element> {
        self.children().find(|c| c.is(name, ns))
    }

    pub fn get_child_mut(&mut self, name: &str, ns: &str) -> Option<&mut Element> {
        self.children_mut().find(|c| c.is(name, ns))
    }

    /// Element children only (text nodes are skipped).
    pub fn children(&self) -> impl Iterator<Item = &Element> {
        self.children.iter().filter_map(|n| match n {
            Node::Element(e) => Some(e),
            Node::Text(_) => None,
        })
    }

    pub fn children_mut(&mut self) -> impl Iterator<Item = &mut Element> {
        self.children.iter_mut().filter_map(|n| match n {
            Node::Element(e) => Some(e),
            Node::Text(_) => None,
        })
    }

    /// Keep only the element children for which `keep` returns true; text
    /// nodes are always kept.
    pub fn retain_children(&mut self, mut keep: impl FnMut(&Element) -> bool) {
        self.children.retain(|n| match n {
            Node::Element(e) => keep(e),
            Node::Text(_) => true,
        });
    }

    /// About the serialized length in bytes, without namespace declarations or
    /// escaping: what a stanza weighs, cheaply (rate limits), and a first capacity for
    /// serializing it.
    pub fn approx_len(&self) -> usize {
        let mut n = self.name.len() * 2 + 5;
        for (k, v) in &self.attrs {
            n += k.len() + v.len() + 4;
        }
        for c in &self.children {
            n += match c {
                Node::Element(e) => e.approx_len(),
                Node::Text(t) => t.len(),
            };
        }
        n
    }

    /// The serialized element, with its namespace declared (as `to_string`), in a
    /// buffer sized up front rather than grown while writing.
    pub fn to_xml(&self) -> String {
        let mut out = String::with_capacity(xml_capacity(self));
        self.write_to(&mut out, "", false);
        out
    }

    /// Concatenation of the direct text children.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for n in &self.children {
            if let Node::Text(t) = n {
                out.push_str(t);
            }
        }
        out
    }

    pub fn child_text(&self, name: &str, ns: &str) -> Option<String> {
        self.get_child(name, ns).map(Element::text)
    }

    /// Serialize; `inherited_ns` is the default namespace in scope at the parent
    /// ("" = none). An `xmlns='…'` is written only when `self.ns` differs from it.
    /// Elements in NS_STREAM are written with the `stream:` prefix (`<stream:features>`,
    /// `<stream:error>`), adding `xmlns:stream='…'` only when `stream_prefix_declared` is false.
    pub fn write_to(&self, out: &mut String, inherited_ns: &str, stream_prefix_declared: bool) {
        // A prefixed element does not change the default namespace, so its
        // children inherit the parent's one. Elements in the XML namespace
        // take its reserved, always-bound `xml:` prefix: `xmlns='…/XML/1998/
        // namespace'` is not well-formed and would end the recipient's stream.
        let prefix = if self.ns == NS_STREAM {
            Some("stream:")
        } else if self.ns == NS_XML {
            Some("xml:")
        } else {
            None
        };
        let prefixed = prefix.is_some();
        let child_ns = if prefixed { inherited_ns } else { &self.ns };

        out.push('<');
        out.push_str(prefix.unwrap_or_default());
        out.push_str(&self.name);
        if prefixed {
            if self.ns == NS_STREAM && !stream_prefix_declared {
                out.push_str(" xmlns:stream='");
                escape_attr(NS_STREAM, out);
                out.push('\'');
            }
        } else if self.ns != inherited_ns {
            out.push_str(" xmlns='");
            escape_attr(&self.ns, out);
            out.push('\'');
        }
        for (k, v) in &self.attrs {
            out.push(' ');
            out.push_str(k);
            out.push_str("='");
            escape_attr(v, out);
            out.push('\'');
        }
        if self.children.is_empty() {
            out.push_str("/>");
            return;
        }
        out.push('>');
        for n in &self.children {
            match n {
                Node::Element(e) => e.write_to(
                    out,
                    child_ns,
                    stream_prefix_declared || self.ns == NS_STREAM,
                ),
                Node::Text(t) => escape_text(t, out),
            }
        }
        out.push_str("</");
        out.push_str(prefix.unwrap_or_default());
        out.push_str(&self.name);
        out.push('>');
    }
}

impl fmt::Display for Element {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_xml())
    }
}

/// A buffer size that `write_to` rarely has to grow: the approximate length plus room
/// for namespace declarations and some escaping.
pub fn xml_capacity(el: &Element) -> usize {
    let n = el.approx_len();
    n + n / 4 + 64
}

/// Append `s` escaped for use as character data.
///
/// `\r` is written as a character reference because a receiving parser would
/// otherwise normalize it to `\n`.
pub fn escape_text(s: &str, out: &mut String) {
    escape(s, out, false);
}

/// Append `s` escaped for use inside a single- or double-quoted attribute value.
///
/// Tab, CR and LF are written as character references because attribute-value
/// normalization would otherwise turn them into spaces.
pub fn escape_attr(s: &str, out: &mut String) {
    escape(s, out, true);
}

fn escape(s: &str, out: &mut String, attr: bool) {
    let mut last = 0;
    for (i, b) in s.bytes().enumerate() {
        let rep = match b {
            b'&' => "&amp;",
            b'<' => "&lt;",
            b'>' => "&gt;",
            b'\r' => "&#13;",
            b'"' if attr => "&quot;",
            b'\'' if attr => "&apos;",
            b'\t' if attr => "&#9;",
            b'\n' if attr => "&#10;",
            _ => continue,
        };
        // All replaced bytes are ASCII, so `i` is always a char boundary.
        out.push_str(&s[last..i]);
        out.push_str(rep);
        last = i + 1;
    }
    out.push_str(&s[last..]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NS_CLIENT;

    /// `<xml:x/>` used to be written as `<x xmlns='…/XML/1998/namespace'/>`,
    /// which no parser accepts (found by the ws_frame fuzz target).
    #[test]
    fn element_in_the_xml_namespace_is_written_as_well_formed_xml() {
        let header = "<stream:stream xmlns='jabber:client' \
                      xmlns:stream='http://etherx.jabber.org/streams'>";
        let stanza = "<message><xml:x xml:lang='en'><y/></xml:x></message>";
        let mut p = crate::StreamParser::new(crate::Limits::default());
        p.feed(header.as_bytes()).unwrap();
        let Some(crate::StreamEvent::Stanza(m)) = p.feed(stanza.as_bytes()).unwrap().pop() else {
            panic!("no stanza")
        };
        assert_eq!(
            m.get_child("x", NS_XML).unwrap().attr("xml:lang"),
            Some("en")
        );
        // Inside a stream (TCP) ...
        let mut tcp = String::new();
        m.write_to(&mut tcp, NS_CLIENT, true);
        assert_eq!(tcp, stanza);
        let mut p = crate::StreamParser::new(crate::Limits::default());
        p.feed(header.as_bytes()).unwrap();
        assert_eq!(
            p.feed(tcp.as_bytes()).unwrap(),
            vec![crate::StreamEvent::Stanza(m.clone())]
        );
        // ... and as a self-contained WebSocket frame.
        let frame = m.to_string();
        assert_eq!(
            crate::parse_frame(frame.as_bytes(), &crate::Limits::default()).unwrap(),
            m
        );
    }

    #[test]
    fn attrs_and_children() {
        let mut e = Element::new("message", NS_CLIENT)
            .with_attr("to", "a@b")
            .with_attr("type", "chat")
            .with_child(Element::new("body", NS_CLIENT).with_text("hi"))
            .with_text(" ")
            .with_child(Element::new("x", "urn:x"));
        assert_eq!(e.attr("to"), Some("a@b"));
        e.set_attr("to", "c@d");
        assert_eq!(e.attr("to"), Some("c@d"));
        assert_eq!(e.attrs.len(), 2);
        assert_eq!(e.remove_attr("type"), Some("chat".into()));
        assert_eq!(e.remove_attr("type"), None);
        assert_eq!(e.child_text("body", NS_CLIENT).as_deref(), Some("hi"));
        assert!(e.get_child("body", "urn:x").is_none());
        assert_eq!(e.children().count(), 2);
        e.get_child_mut("x", "urn:x").unwrap().append_text("a");
        e.get_child_mut("x", "urn:x").unwrap().append_text("b");
        assert_eq!(e.child_text("x", "urn:x").as_deref(), Some("ab"));
        e.retain_children(|c| c.name != "body");
        assert_eq!(e.children().count(), 1);
        assert_eq!(e.text(), " ");
        for c in e.children_mut() {
            c.name = "y".into();
        }
        assert!(e.get_child("y", "urn:x").is_some());
    }

    #[test]
    fn serialize_stream_features() {
        let f = Element::new("features", NS_STREAM).with_child(
            Element::new("mechanisms", "urn:ietf:params:xml:ns:xmpp-sasl").with_child(
                Element::new("mechanism", "urn:ietf:params:xml:ns:xmpp-sasl").with_text("PLAIN"),
            ),
        );
        let mut out = String::new();
        f.write_to(&mut out, NS_CLIENT, true);
        assert_eq!(
            out,
            "<stream:features><mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>\
             <mechanism>PLAIN</mechanism></mechanisms></stream:features>"
        );
        assert_eq!(
            f.to_string(),
            "<stream:features xmlns:stream='http://etherx.jabber.org/streams'>\
             <mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>\
             <mechanism>PLAIN</mechanism></mechanisms></stream:features>"
        );
        // A stream-namespaced child of a stream element needs no second declaration.
        let err = Element::new("error", NS_STREAM).with_child(Element::new("text", NS_STREAM));
        assert_eq!(
            err.to_string(),
            "<stream:error xmlns:stream='http://etherx.jabber.org/streams'><stream:text/></stream:error>"
        );
    }

    #[test]
    fn serialize_namespaces() {
        let m = Element::new("message", NS_CLIENT)
            .with_child(Element::new("body", NS_CLIENT))
            .with_child(Element::new("x", "").with_child(Element::new("y", "")));
        let mut out = String::new();
        m.write_to(&mut out, NS_CLIENT, true);
        assert_eq!(out, "<message><body/><x xmlns=''><y/></x></message>");
        assert_eq!(
            m.to_string(),
            "<message xmlns='jabber:client'><body/><x xmlns=''><y/></x></message>"
        );
    }

    #[test]
    fn escaping() {
        let e = Element::new("a", "")
            .with_attr("v", "<&>\"'\t\n\r")
            .with_text("<&>\"'\r\n");
        assert_eq!(
            e.to_string(),
            "<a v='&lt;&amp;&gt;&quot;&apos;&#9;&#10;&#13;'>&lt;&amp;&gt;\"'&#13;\n</a>"
        );
        let mut out = String::new();
        escape_text("ünï & cödé", &mut out);
        assert_eq!(out, "ünï &amp; cödé");
    }

    /// A typical stanza serializes into the buffer `to_xml` sized, without growing it.
    #[test]
    fn to_xml_is_to_string_in_one_buffer() {
        let m = Element::new("message", "jabber:client")
            .with_attr("to", "bob@example.org")
            .with_attr("id", "a1b2c3")
            .with_attr("type", "chat")
            .with_child(Element::new("body", "jabber:client").with_text("hello & <bye>"))
            .with_child(Element::new("request", "urn:xmpp:receipts"))
            .with_child(
                Element::new("stanza-id", "urn:xmpp:sid:0")
                    .with_attr("id", "0123456789abcdef")
                    .with_attr("by", "alice@example.org"),
            );
        let xml = m.to_xml();
        assert_eq!(xml, m.to_string());
        assert!(
            xml.len() <= xml_capacity(&m),
            "{} > {}",
            xml.len(),
            xml_capacity(&m)
        );
    }
}
