//! Incremental XMPP stream parser (RFC 6120 §4) and WebSocket frame parser
//! (RFC 7395) with resource limits.

use rxml::error::EndOrError;
use rxml::{AttrMap, Event, Namespace, Options, Parse, Parser, RawEvent, WithOptions};

use crate::{Element, Node, NS_STREAM, NS_XML};

/// Upper bound for rxml's `max_token_length`. rxml reserves a scratch buffer
/// of this size when it lexes, so it is kept well below the stanza limit
/// (see `StreamParser::keeping_scratch` for when it is freed). Long text is
/// split into several events anyway; this only caps a single name or
/// attribute value (JIDs are at most 3071 bytes).
const MAX_TOKEN_CAP: usize = 8 * 1024;

/// Resource limits applied to every stanza (and to the stream header).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Maximum size in bytes of one depth-1 element, as read from the wire.
    pub max_stanza_bytes: usize,
    /// Maximum nesting; the stanza element itself is level 1.
    pub max_depth: usize,
    /// Maximum number of attributes on one element (namespace declarations
    /// not counted).
    pub max_attrs: usize,
    /// Maximum number of elements in one stanza, the stanza itself
    /// included (text runs count as elements too). A parsed element costs
    /// far more than its wire size; this bounds what one stanza can make
    /// the server allocate, whatever its byte size.
    pub max_elements: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_stanza_bytes: 256 * 1024,
            max_depth: 32,
            max_attrs: 64,
            max_elements: 5_000,
        }
    }
}

#[derive(Debug, PartialEq)]
pub enum StreamEvent {
    /// Attributes of `<stream:stream>` (to, from, version, xml:lang, id).
    Open { attrs: Vec<(String, String)> },
    /// A complete depth-1 child of the stream.
    Stanza(Element),
    /// `</stream:stream>`.
    Close,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum XmlError {
    /// Any XML syntax error, bad UTF-8, illegal character, mismatched tags.
    #[error("not-well-formed: {0}")]
    NotWellFormed(String),
    /// DTD, entity, processing instruction or comment.
    #[error("restricted-xml: {0}")]
    RestrictedXml(String),
    /// Wrong root element or namespace.
    #[error("invalid-namespace: {0}")]
    InvalidNamespace(String),
    /// A size, depth or attribute-count limit was exceeded.
    #[error("policy-violation: {0}")]
    PolicyViolation(String),
    /// Non-whitespace text directly inside the stream, etc.
    #[error("bad-format: {0}")]
    BadFormat(String),
}

impl XmlError {
    /// The RFC 6120 §4.9.3 stream error condition for this error.
    pub fn condition(&self) -> &'static str {
        match self {
            XmlError::NotWellFormed(_) => "not-well-formed",
            XmlError::RestrictedXml(_) => "restricted-xml",
            XmlError::InvalidNamespace(_) => "invalid-namespace",
            XmlError::PolicyViolation(_) => "policy-violation",
            XmlError::BadFormat(_) => "bad-format",
        }
    }
}

pub(crate) fn map_rxml_error(e: rxml::Error) -> XmlError {
    match e {
        // rxml's own length limits (our max_token_length) are resource limits.
        rxml::Error::RestrictedXml(m) if m == "long name or reference" || m == "event too long" => {
            XmlError::PolicyViolation(e.to_string())
        }
        // rxml reports this for `<!` not followed by a comment or CDATA
        // start, i.e. for `<!DOCTYPE`, `<!ENTITY` and other DTD markup.
        rxml::Error::InvalidSyntax("malformed cdata or comment section start") => {
            XmlError::RestrictedXml(format!("DTD markup declaration ({e})"))
        }
        // Only the five predefined entities exist in restricted XML.
        rxml::Error::RestrictedXml(_) | rxml::Error::UndeclaredEntity => {
            XmlError::RestrictedXml(e.to_string())
        }
        _ => XmlError::NotWellFormed(e.to_string()),
    }
}

pub(crate) fn new_rxml_parser(limits: &Limits) -> Parser {
    let mut p = Parser::with_options(Options {
        max_token_length: limits.max_stanza_bytes.clamp(1, MAX_TOKEN_CAP),
        ..Options::default()
    });
    // Emit text as soon as it is read: whitespace keepalives are then consumed
    // at once and the parser holds no text between stanzas.
    p.set_text_buffering(false);
    p
}

/// Keep unprefixed attributes and `xml:*`; drop other namespaced attributes,
/// which XMPP does not use and which we could not serialize without tracking
/// prefixes.
fn convert_attrs(attrs: AttrMap) -> Vec<(String, String)> {
    let mut out = Vec::with_capacity(attrs.len());
    for ((ns, name), value) in attrs {
        if ns.is_none() {
            out.push((String::from(name), value));
        } else if ns.as_str() == NS_XML {
            out.push((format!("xml:{}", name.as_str()), value));
        }
    }
    out
}

fn is_xml_whitespace(s: &str) -> bool {
    s.bytes().all(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
}

/// Builds one element tree from rxml events, enforcing depth and attribute limits.
#[derive(Debug, Default)]
pub(crate) struct TreeBuilder {
    /// Open elements; index 0 is the top-level element being built.
    stack: Vec<Element>,
    /// Elements and text runs of the stanza being built.
    nodes: usize,
    /// A text run is open and not yet counted. It is counted when the next
    /// tag ends it: rxml reports a run in more or fewer pieces depending
    /// on how reads are cut, so counting at the first piece would make a
    /// limit trip at different bytes (found by the xml_stream fuzz target).
    text_open: bool,
}

impl TreeBuilder {
    /// A builder whose top-level element `root` is already open.
    pub(crate) fn with_root(root: Element) -> Self {
        TreeBuilder {
            stack: vec![root],
            nodes: 1,
            text_open: false,
        }
    }

    pub(crate) fn start(
        &mut self,
        ns: Namespace<'static>,
        name: rxml::NcName,
        attrs: AttrMap,
        limits: &Limits,
    ) -> Result<(), XmlError> {
        if self.stack.len() >= limits.max_depth {
            return Err(XmlError::PolicyViolation(format!(
                "element nesting deeper than {}",
                limits.max_depth
            )));
        }
        if attrs.len() > limits.max_attrs {
            return Err(XmlError::PolicyViolation(format!(
                "more than {} attributes",
                limits.max_attrs
            )));
        }
        self.close_text(limits)?;
        self.count(limits)?;
        self.stack.push(Element {
            name: name.into(),
            ns: ns.into(),
            attrs: convert_attrs(attrs),
            children: Vec::new(),
        });
        Ok(())
    }

    /// Close the innermost element; returns the top-level element once complete.
    pub(crate) fn end(&mut self, limits: &Limits) -> Result<Option<Element>, XmlError> {
        self.close_text(limits)?;
        let Some(el) = self.stack.pop() else {
            return Ok(None);
        };
        Ok(match self.stack.last_mut() {
            Some(parent) => {
                parent.append_child(el);
                None
            }
            None => Some(el),
        })
    }

    fn close_text(&mut self, limits: &Limits) -> Result<(), XmlError> {
        if std::mem::take(&mut self.text_open) {
            self.count(limits)?;
        }
        Ok(())
    }

    fn count(&mut self, limits: &Limits) -> Result<(), XmlError> {
        if self.stack.is_empty() {
            self.nodes = 0;
        }
        self.nodes += 1;
        if self.nodes > limits.max_elements {
            return Err(XmlError::PolicyViolation(format!(
                "stanza with more than {} elements",
                limits.max_elements
            )));
        }
        Ok(())
    }

    /// Text inside the stanza; counted once its run ends (`close_text`).
    pub(crate) fn text(&mut self, text: String) {
        let Some(top) = self.stack.last_mut() else {
            return;
        };
        // A run read in several pieces is one text node.
        if !text.is_empty() && !matches!(top.children.last(), Some(Node::Text(_))) {
            self.text_open = true;
        }
        top.append_text(text);
    }

    fn is_empty(&self) -> bool {
        self.stack.is_empty()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Waiting for the XML declaration / `<stream:stream>`.
    Header,
    /// Inside the stream.
    Open,
    /// `</stream:stream>` was seen; further input is ignored.
    Closed,
}

/// The usual stream header: what [`StreamParser::release`] replays into a
/// new rxml parser when the client's header declared just these namespaces.
const STANDARD_HEADER: &[u8] = b"<stream:stream xmlns='jabber:client' \
    xmlns:stream='http://etherx.jabber.org/streams'>";

/// How to bring a new rxml parser to where the stream is (inside the root).
#[derive(Debug)]
enum Replay {
    /// Before and while the header is read: its bytes so far.
    Capturing(Vec<u8>),
    Standard,
    /// The client's own header (other prefixes or namespaces declared).
    Custom(Box<[u8]>),
}

impl Replay {
    /// Decide once the header is complete; `header` holds its bytes (and
    /// possibly some after it).
    fn of(header: &[u8]) -> Replay {
        let mut p = rxml::RawParser::new();
        let mut buf = header;
        let mut len = 0;
        let mut root = None;
        let mut decls = Vec::new();
        loop {
            let ev = match p.parse(&mut buf, false) {
                Ok(Some(ev)) => ev,
                // Cannot happen: rxml accepted these bytes once already.
                _ => return Replay::Custom(header.into()),
            };
            len += ev.metrics().len();
            match ev {
                RawEvent::ElementHeadOpen(_, (prefix, name)) => {
                    root = Some((prefix.map(String::from), String::from(name)))
                }
                RawEvent::Attribute(_, (Some(prefix), name), value) if prefix == "xmlns" => {
                    decls.push((Some(String::from(name)), value))
                }
                RawEvent::Attribute(_, (None, name), value) if name == "xmlns" => {
                    decls.push((None, value))
                }
                RawEvent::ElementHeadClose(_) => break,
                _ => {}
            }
        }
        decls.sort();
        let standard = root == Some((Some("stream".into()), "stream".into()))
            && decls
                == [
                    (None, crate::NS_CLIENT.to_string()),
                    (Some("stream".into()), NS_STREAM.to_string()),
                ];
        if standard {
            Replay::Standard
        } else {
            Replay::Custom(header[..len.min(header.len())].into())
        }
    }
}

/// Checks that the byte stream is UTF-8 made only of XML characters, as
/// it arrives. rxml checks text lazily, when a run ends: in one large read
/// it buffers invalid bytes of an unfinished text run (up to the stanza
/// limit) while byte-wise reads fail at once (found by the xml_stream fuzz
/// target). Checking here fails every chunking at the same byte.
#[derive(Debug, Default)]
struct CharCheck {
    /// The start of a character split across reads.
    carry: [u8; 4],
    carry_len: usize,
}

impl CharCheck {
    /// Length of the longest prefix of `data` that continues the stream
    /// with valid characters, and the error at its end if there is one.
    fn check(&mut self, data: &[u8]) -> (usize, Option<XmlError>) {
        let mut start = 0;
        if self.carry_len > 0 {
            let width = utf8_width(self.carry[0]);
            let need = (width - self.carry_len).min(data.len());
            self.carry[self.carry_len..self.carry_len + need].copy_from_slice(&data[..need]);
            self.carry_len += need;
            if self.carry_len < width {
                return (data.len(), None);
            }
            let ch = &self.carry[..width];
            self.carry_len = 0;
            match std::str::from_utf8(ch) {
                Ok(s) if s.chars().all(is_xml_char) => start = need,
                Ok(_) => return (0, Some(invalid_char())),
                Err(_) => return (0, Some(invalid_utf8(ch[0]))),
            }
        }
        let rest = &data[start..];
        let (valid, error) = match std::str::from_utf8(rest) {
            Ok(s) => (s, None),
            Err(e) => {
                let valid = &rest[..e.valid_up_to()];
                // Valid by the check just made.
                let valid = std::str::from_utf8(valid).unwrap_or_default();
                match e.error_len() {
                    Some(_) => (valid, Some(invalid_utf8(rest[e.valid_up_to()]))),
                    None => {
                        let tail = &rest[e.valid_up_to()..];
                        self.carry[..tail.len()].copy_from_slice(tail);
                        self.carry_len = tail.len();
                        (valid, None)
                    }
                }
            }
        };
        // Most input is markup and ASCII text: look at bytes first.
        let bad = valid
            .bytes()
            .position(|b| (b < 0x20 && !matches!(b, b'\t' | b'\n' | b'\r')) || b == 0xEF)
            .and_then(|from| {
                valid[from..]
                    .char_indices()
                    .find(|&(_, c)| !is_xml_char(c))
                    .map(|(i, _)| from + i)
            });
        match bad {
            Some(at) => {
                self.carry_len = 0;
                (start + at, Some(invalid_char()))
            }
            None => match error {
                Some(e) => (start + valid.len(), Some(e)),
                None => (data.len(), None),
            },
        }
    }
}

/// XML line-end normalization (XML 1.0 §2.11: CRLF and a lone CR become
/// LF), done before rxml sees the bytes. rxml does it itself, but while it
/// waits to see what follows a CR it holds back the text read before it,
/// so one read ending in CR reported text that byte-wise reads had
/// reported already (found by the xml_stream fuzz target). At most one CR
/// is held here.
#[derive(Debug, Default)]
struct LineEnds {
    held_cr: bool,
}

impl LineEnds {
    fn normalize<'a>(&mut self, data: &'a [u8]) -> std::borrow::Cow<'a, [u8]> {
        if !self.held_cr && !data.contains(&b'\r') {
            return std::borrow::Cow::Borrowed(data);
        }
        let mut out = Vec::with_capacity(data.len() + 1);
        let mut cr = std::mem::take(&mut self.held_cr);
        for &b in data {
            if cr {
                cr = false;
                out.push(b'\n');
                if b == b'\n' {
                    continue;
                }
            }
            if b == b'\r' {
                cr = true;
            } else {
                out.push(b);
            }
        }
        self.held_cr = cr;
        std::borrow::Cow::Owned(out)
    }
}

fn utf8_width(first: u8) -> usize {
    match first {
        0xF0..=0xF7 => 4,
        0xE0..=0xEF => 3,
        _ => 2,
    }
}

/// XML 1.0 `Char` (surrogates cannot be in a `char`).
fn is_xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..)
}

fn invalid_utf8(byte: u8) -> XmlError {
    XmlError::NotWellFormed(format!("invalid utf-8 byte: \\x{byte:02x}"))
}

fn invalid_char() -> XmlError {
    XmlError::NotWellFormed("character not allowed in XML".into())
}

/// rxml's parser and the stanza being built: what the stream needs only
/// while bytes arrive. Dropped when idle ([`StreamParser::release`]).
struct Live {
    parser: Parser,
    tree: TreeBuilder,
}

impl Live {
    fn new(limits: &Limits, replay: &Replay) -> Result<Box<Live>, XmlError> {
        let mut live = Box::new(Live {
            parser: new_rxml_parser(limits),
            tree: TreeBuilder::default(),
        });
        let mut buf: &[u8] = match replay {
            Replay::Capturing(_) => return Ok(live),
            Replay::Standard => STANDARD_HEADER,
            Replay::Custom(b) => b,
        };
        loop {
            match live.parser.parse(&mut buf, false) {
                Ok(Some(Event::StartElement(..))) => return Ok(live),
                Ok(Some(_)) => {}
                Ok(None) | Err(EndOrError::NeedMoreData) => {
                    return Err(XmlError::NotWellFormed("stream header replay".into()))
                }
                Err(EndOrError::Error(e)) => return Err(map_rxml_error(e)),
            }
        }
    }
}

/// Incremental parser for one direction of an XMPP stream over TCP.
pub struct StreamParser {
    limits: Limits,
    /// None until bytes come, and again after `release`.
    live: Option<Box<Live>>,
    state: State,
    replay: Replay,
    /// Bytes of the current stanza (or of the stream header) whose events
    /// have been handled.
    stanza_bytes: usize,
    /// Bytes rxml has consumed since its last event, i.e. the partial token
    /// or element head it is holding.
    pending: usize,
    /// First error; repeated on every later call.
    failed: Option<Box<XmlError>>,
    /// The last byte fed ended markup or was whitespace. rxml charges the
    /// `<` that ends a text run to the text event, so `pending == 0` alone
    /// does not prove it holds nothing (found by the xml_stream fuzz target).
    ends_clean: bool,
    chars: CharCheck,
    line_ends: LineEnds,
    /// At stream level between stanzas, nothing of the next one read yet:
    /// every byte until its `<` must be whitespace. Checked on the bytes
    /// as they are read, since rxml holds back text before a `]` or `\r`
    /// until it sees the next byte (found by the xml_stream fuzz target).
    between: bool,
    /// Keep rxml's scratch buffers between stanzas (`keeping_scratch`).
    keep_scratch: bool,
}

impl StreamParser {
    pub fn new(limits: Limits) -> Self {
        StreamParser {
            limits,
            live: None,
            state: State::Header,
            replay: Replay::Capturing(Vec::new()),
            stanza_bytes: 0,
            pending: 0,
            failed: None,
            ends_clean: true,
            chars: CharCheck::default(),
            line_ends: LineEnds::default(),
            between: false,
            keep_scratch: false,
        }
    }

    /// Keep rxml's scratch buffer (`MAX_TOKEN_CAP`) between stanzas instead
    /// of freeing it after each read, for an owner that calls
    /// [`release`](Self::release) once the stream is idle: on a busy stream,
    /// allocating it per read cost more than parsing a short message.
    pub fn keeping_scratch(mut self) -> Self {
        self.keep_scratch = true;
        self
    }

    /// Change the limits, e.g. raise the stanza limit after authentication.
    /// rxml's token length is fixed per parser, so a raised limit fully applies
    /// from the next [`reset`](Self::reset) (which follows SASL success anyway).
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    /// Forget all state: a new stream starts (after STARTTLS or SASL success).
    pub fn reset(&mut self) {
        *self = StreamParser {
            keep_scratch: self.keep_scratch,
            ..StreamParser::new(self.limits)
        };
    }

    /// Give back rxml's parser and the tree builder's stack if the stream is
    /// between stanzas (nothing partial held); the next `feed` rebuilds them
    /// by replaying the stream header. An idle stream then owns ~no heap.
    /// Returns whether anything was released.
    pub fn release(&mut self) -> bool {
        let idle = match self.state {
            State::Header => false,
            State::Open => {
                self.pending == 0
                    && self.ends_clean
                    && self.live.as_ref().is_some_and(|l| l.tree.is_empty())
            }
            State::Closed => true,
        };
        idle && self.live.take().is_some()
    }

    /// Feed bytes from the socket; returns every complete event they finish, in order.
    /// After an error the parser is unusable (the caller closes the stream).
    pub fn feed(&mut self, data: &[u8]) -> Result<Vec<StreamEvent>, XmlError> {
        if let Some(e) = &self.failed {
            return Err((**e).clone());
        }
        if let Some(&last) = data.last() {
            self.ends_clean = matches!(last, b'>' | b' ' | b'\t' | b'\n' | b'\r');
        }
        let mut events = Vec::new();
        let live = match self.live.take() {
            Some(l) => Ok(l),
            None => Live::new(&self.limits, &self.replay),
        };
        let (valid, bad_char) = self.chars.check(data);
        // On error nothing more will be parsed: the buffers are dropped.
        let r = live.and_then(|mut live| {
            // What comes before a bad character is parsed first, so that
            // its errors (and events) are the same in any chunking.
            let text = self.line_ends.normalize(&data[..valid]);
            self.feed_inner(&mut live, &text, &mut events)?;
            if let Some(e) = bad_char {
                return Err(e);
            }
            self.live = Some(live);
            Ok(())
        });
        match r {
            Ok(()) => Ok(events),
            Err(e) => {
                self.failed = Some(Box::new(e.clone()));
                self.replay = Replay::Standard;
                Err(e)
            }
        }
    }

    fn feed_inner(
        &mut self,
        live: &mut Live,
        mut data: &[u8],
        events: &mut Vec<StreamEvent>,
    ) -> Result<(), XmlError> {
        // rxml may queue events (e.g. the end of `<x/>`), so keep calling it
        // until it asks for more data, even once `data` is used up.
        while self.state != State::Closed {
            // Hand rxml at most one byte more than the stanza may still grow,
            // so an over-long element head or token is caught right away
            // instead of after rxml has buffered all of it.
            let allowance = self
                .limits
                .max_stanza_bytes
                .saturating_sub(self.stanza_bytes + self.pending);
            let take = data.len().min(allowance.saturating_add(1));
            let mut chunk = &data[..take];
            let result = live.parser.parse(&mut chunk, false);
            let consumed = take - chunk.len();
            if let Replay::Capturing(header) = &mut self.replay {
                header.extend_from_slice(&data[..consumed]);
            }
            if self.between {
                self.check_between(&data[..consumed])?;
            }
            data = &data[consumed..];
            self.pending += consumed;
            let starved = match result {
                Ok(Some(ev)) => {
                    // Charge the event with every byte consumed since the
                    // previous one. rxml's own EventMetrics under-count text
                    // split inside a multi-byte char when text buffering is
                    // off, which would let `pending` drift upwards forever.
                    let len = std::mem::take(&mut self.pending);
                    self.handle(&mut live.tree, ev, len, events)?;
                    false
                }
                // `None` means EOF, which we never signal.
                Ok(None) => true,
                Err(EndOrError::NeedMoreData) => data.is_empty(),
                Err(EndOrError::Error(e)) => return Err(map_rxml_error(e)),
            };
            self.check_size()?;
            if starved {
                break;
            }
        }
        if !self.keep_scratch && self.state == State::Open && live.tree.is_empty() {
            // Idle between stanzas: return rxml's scratch buffers.
            live.parser.release_temporaries();
        }
        Ok(())
    }

    fn check_between(&mut self, bytes: &[u8]) -> Result<(), XmlError> {
        for &b in bytes {
            match b {
                b' ' | b'\t' | b'\n' | b'\r' => {}
                b'<' => {
                    self.between = false;
                    return Ok(());
                }
                _ => {
                    return Err(XmlError::BadFormat(
                        "text directly inside the stream".into(),
                    ))
                }
            }
        }
        Ok(())
    }

    fn check_size(&self) -> Result<(), XmlError> {
        if self.stanza_bytes + self.pending > self.limits.max_stanza_bytes {
            let what = if self.state == State::Header {
                "stream header"
            } else {
                "stanza"
            };
            return Err(XmlError::PolicyViolation(format!(
                "{what} larger than {} bytes",
                self.limits.max_stanza_bytes
            )));
        }
        Ok(())
    }

    fn handle(
        &mut self,
        tree: &mut TreeBuilder,
        ev: Event,
        len: usize,
        events: &mut Vec<StreamEvent>,
    ) -> Result<(), XmlError> {
        match ev {
            Event::XmlDeclaration(..) => self.stanza_bytes += len,
            Event::StartElement(_, (ns, name), attrs) => {
                if self.state == State::Header {
                    if name.as_str() != "stream" || ns.as_str() != NS_STREAM {
                        return Err(XmlError::InvalidNamespace(format!(
                            "root element must be <stream:stream xmlns:stream='{NS_STREAM}'>"
                        )));
                    }
                    if attrs.len() > self.limits.max_attrs {
                        return Err(XmlError::PolicyViolation(format!(
                            "more than {} attributes",
                            self.limits.max_attrs
                        )));
                    }
                    self.state = State::Open;
                    self.between = true;
                    self.stanza_bytes = 0;
                    if let Replay::Capturing(header) = &self.replay {
                        self.replay = Replay::of(header);
                    }
                    events.push(StreamEvent::Open {
                        attrs: convert_attrs(attrs),
                    });
                } else {
                    self.stanza_bytes += len;
                    self.check_size()?;
                    tree.start(ns, name, attrs, &self.limits)?;
                }
            }
            Event::EndElement(_) => {
                if tree.is_empty() {
                    self.state = State::Closed;
                    events.push(StreamEvent::Close);
                } else {
                    self.stanza_bytes += len;
                    self.check_size()?;
                    if let Some(stanza) = tree.end(&self.limits)? {
                        self.stanza_bytes = 0;
                        self.between = true;
                        events.push(StreamEvent::Stanza(stanza));
                    }
                }
            }
            Event::Text(_, text) => {
                if tree.is_empty() {
                    // rxml only allows whitespace outside the root itself.
                    if !is_xml_whitespace(&text) {
                        return Err(XmlError::BadFormat(
                            "text directly inside the stream".into(),
                        ));
                    }
                } else {
                    self.stanza_bytes += len;
                    self.check_size()?;
                    tree.text(text);
                }
            }
        }
        Ok(())
    }
}

/// Parse one complete WebSocket frame (RFC 7395): exactly one element, with its
/// namespace declared in the frame. Same limits and errors.
///
/// The root is not checked here: the caller knows whether it expects
/// `<open/>` (and reports invalid-namespace otherwise) or a stanza.
pub fn parse_frame(data: &[u8], limits: &Limits) -> Result<Element, XmlError> {
    if data.len() > limits.max_stanza_bytes {
        return Err(XmlError::PolicyViolation(format!(
            "frame larger than {} bytes",
            limits.max_stanza_bytes
        )));
    }
    let mut parser = new_rxml_parser(limits);
    let mut tree = TreeBuilder::default();
    let mut root = None;
    let mut buf = data;
    loop {
        match parser.parse(&mut buf, true) {
            Ok(None) => break,
            Ok(Some(ev)) => match ev {
                Event::XmlDeclaration(..) => {}
                Event::StartElement(_, (ns, name), attrs) => tree.start(ns, name, attrs, limits)?,
                Event::EndElement(_) => {
                    if let Some(el) = tree.end(limits)? {
                        root = Some(el);
                    }
                }
                Event::Text(_, text) => tree.text(text),
            },
            Err(EndOrError::NeedMoreData) => {
                return Err(XmlError::NotWellFormed("incomplete frame".into()))
            }
            Err(EndOrError::Error(e)) => return Err(map_rxml_error(e)),
        }
    }
    // rxml itself rejects a second root element and an empty document.
    root.ok_or_else(|| XmlError::NotWellFormed("frame contains no element".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Node, NS_CLIENT, NS_FRAMING};

    const HEADER: &str = "<?xml version='1.0'?><stream:stream xmlns='jabber:client' \
        xmlns:stream='http://etherx.jabber.org/streams' to='localhost' version='1.0' xml:lang='en'>";

    fn open(limits: Limits) -> StreamParser {
        let mut p = StreamParser::new(limits);
        let evs = p.feed(HEADER.as_bytes()).unwrap();
        assert_eq!(evs.len(), 1);
        p
    }

    fn stanzas(evs: Vec<StreamEvent>) -> Vec<Element> {
        evs.into_iter()
            .map(|e| match e {
                StreamEvent::Stanza(s) => s,
                other => panic!("unexpected {other:?}"),
            })
            .collect()
    }

    /// Feed a whole document after the header and return the first error.
    fn stream_err(body: &str, limits: Limits) -> XmlError {
        open(limits).feed(body.as_bytes()).unwrap_err()
    }

    #[test]
    fn header_attrs() {
        let mut p = StreamParser::new(Limits::default());
        let evs = p.feed(HEADER.as_bytes()).unwrap();
        let StreamEvent::Open { attrs } = &evs[0] else {
            panic!("{evs:?}")
        };
        let mut attrs = attrs.clone();
        attrs.sort();
        assert_eq!(
            attrs,
            vec![
                ("to".into(), "localhost".into()),
                ("version".into(), "1.0".into()),
                ("xml:lang".into(), "en".into()),
            ]
        );
    }

    #[test]
    fn round_trip_message() {
        let msg =
            "<message to='juliet@example.com/balcony' id='ktx72v49' type='chat' xml:lang='en'>\
            <body>Wherefore art thou, Romeo? ☃ 𝄞 ünïcödé &amp; &lt;tags&gt;</body>\
            <active xmlns='http://jabber.org/protocol/chatstates'/>\
            <x xmlns='urn:a'><y xmlns='urn:b'><z>deep</z></y><w/></x></message>";
        let mut p = open(Limits::default());
        let mut s = stanzas(p.feed(msg.as_bytes()).unwrap());
        assert_eq!(s.len(), 1);
        let m = s.pop().unwrap();
        assert!(m.is("message", NS_CLIENT));
        assert_eq!(m.attr("xml:lang"), Some("en"));
        assert_eq!(
            m.child_text("body", NS_CLIENT).unwrap(),
            "Wherefore art thou, Romeo? ☃ 𝄞 ünïcödé & <tags>"
        );
        let x = m.get_child("x", "urn:a").unwrap();
        let y = x.get_child("y", "urn:b").unwrap();
        assert_eq!(y.child_text("z", "urn:b").as_deref(), Some("deep"));
        assert!(x.get_child("w", "urn:a").is_some());

        // Serialize in the stream's namespace context and parse it back.
        let mut out = String::new();
        m.write_to(&mut out, NS_CLIENT, true);
        assert!(out.starts_with("<message "), "{out}");
        assert!(out.contains("<x xmlns='urn:a'><y xmlns='urn:b'><z>deep</z></y><w/></x>"));
        let again = stanzas(p.feed(out.as_bytes()).unwrap());
        assert_eq!(again, vec![m.clone()]);
        // Standalone serialization declares the namespace and parses as a frame.
        assert_eq!(
            parse_frame(m.to_string().as_bytes(), &Limits::default()).unwrap(),
            m
        );
    }

    #[test]
    fn release_when_idle_and_replay_the_header() {
        let mut p = open(Limits::default());
        assert!(matches!(p.replay, Replay::Standard));
        // Mid-stanza nothing is released.
        assert!(p.feed(b"<message><bo").unwrap().is_empty());
        assert!(!p.release());
        let s = stanzas(p.feed(b"dy>a</body></message>").unwrap());
        assert_eq!(s[0].child_text("body", NS_CLIENT).as_deref(), Some("a"));
        assert!(p.release());
        assert!(p.live.is_none());
        assert!(!p.release());
        // Byte accounting starts afresh; the stream namespace still applies.
        let s = stanzas(p.feed(b" <iq type='get' id='1'/>").unwrap());
        assert!(s[0].is("iq", NS_CLIENT));
        assert_eq!((p.pending, p.stanza_bytes), (0, 0));
        assert!(p.release());
        assert_eq!(
            p.feed(b"</stream:stream>").unwrap(),
            vec![StreamEvent::Close]
        );
    }

    #[test]
    fn release_replays_a_custom_header() {
        let header = "<?xml version='1.0'?><s:stream xmlns:s='http://etherx.jabber.org/streams' \
            xmlns='jabber:client' xmlns:f='urn:f' to='localhost' version='1.0'><message/>";
        let mut p = StreamParser::new(Limits::default());
        let evs = p.feed(header.as_bytes()).unwrap();
        assert_eq!(evs.len(), 2);
        assert!(matches!(&p.replay, Replay::Custom(b) if b.ends_with(b"version='1.0'>")));
        assert!(p.release());
        let s = stanzas(p.feed(b"<message><f:x/></message>").unwrap());
        assert!(s[0].get_child("x", "urn:f").is_some());
        assert!(p.release());
        assert!(p.feed(b"</stream:stream>").is_err());
        let mut p = StreamParser::new(Limits::default());
        p.feed(header.as_bytes()).unwrap();
        assert!(p.release());
        assert_eq!(p.feed(b"</s:stream>").unwrap(), vec![StreamEvent::Close]);
    }

    #[test]
    fn standard_header_in_any_form() {
        let mut p = StreamParser::new(Limits::default());
        p.feed(b"<stream:stream xmlns:stream=\"http://etherx.jabber.org/streams\" xml:lang='en' to='x' xmlns=\"jabber:client\">")
            .unwrap();
        assert!(matches!(p.replay, Replay::Standard));
    }

    #[test]
    fn one_byte_at_a_time() {
        let doc = format!(
            "{HEADER} \n<message><body>☃héllo ☃ 𝄞 &amp; &#x263A;</body></message>\n \
             <iq type='get' id='1'><ping xmlns='urn:xmpp:ping'/></iq></stream:stream>"
        );
        let mut p = StreamParser::new(Limits::default());
        let mut evs = Vec::new();
        for b in doc.as_bytes() {
            let new = p.feed(std::slice::from_ref(b)).unwrap();
            if matches!(new.last(), Some(StreamEvent::Stanza(_))) {
                // Byte accounting is exact: nothing is left over between stanzas.
                assert_eq!((p.pending, p.stanza_bytes), (0, 0));
            }
            evs.extend(new);
        }
        assert_eq!(evs.len(), 4, "{evs:?}");
        assert!(matches!(&evs[0], StreamEvent::Open { .. }));
        let StreamEvent::Stanza(m) = &evs[1] else {
            panic!()
        };
        assert_eq!(m.child_text("body", NS_CLIENT).unwrap(), "☃héllo ☃ 𝄞 & ☺");
        // Text delivered in many events is merged into one node.
        assert_eq!(m.get_child("body", NS_CLIENT).unwrap().children.len(), 1);
        let StreamEvent::Stanza(iq) = &evs[2] else {
            panic!()
        };
        assert!(iq.get_child("ping", "urn:xmpp:ping").is_some());
        assert_eq!(evs[3], StreamEvent::Close);
    }

    #[test]
    fn any_chunking_gives_same_events() {
        let doc = format!(
            "{HEADER}<message id='a&amp;b'><body>ä☃𝄞 &lt;x&gt; <![CDATA[<raw>]]></body>\
             <x xmlns='urn:x' xml:lang='fr'/></message> \n\t<presence/></stream:stream>"
        );
        let whole = StreamParser::new(Limits::default())
            .feed(doc.as_bytes())
            .unwrap();
        assert_eq!(whole.len(), 4);
        for size in 1..=13 {
            let mut p = StreamParser::new(Limits::default());
            let mut evs = Vec::new();
            for chunk in doc.as_bytes().chunks(size) {
                evs.extend(p.feed(chunk).unwrap());
            }
            assert_eq!(evs, whole, "chunk size {size}");
        }
    }

    #[test]
    fn two_stanzas_and_close_in_one_feed() {
        let mut p = StreamParser::new(Limits::default());
        let doc = format!("{HEADER}<presence/> <message><body>a</body></message></stream:stream>");
        let evs = p.feed(doc.as_bytes()).unwrap();
        assert_eq!(evs.len(), 4);
        assert_eq!(
            evs[1],
            StreamEvent::Stanza(Element::new("presence", NS_CLIENT))
        );
        assert!(matches!(&evs[2], StreamEvent::Stanza(m) if m.is("message", NS_CLIENT)));
        assert_eq!(evs[3], StreamEvent::Close);
        // Anything after the close is ignored.
        assert_eq!(p.feed(b"garbage").unwrap(), vec![]);
    }

    /// rxml charges the `<` that ends a text run to the text event, so a
    /// read ending in "\n <" looked idle; releasing then lost the `<` and
    /// the next read was text in the stream: a spurious bad-format close of
    /// a client that paused mid-write (found by the xml_stream fuzz target).
    #[test]
    fn release_after_a_read_ending_in_lt_keeps_the_next_element() {
        let mut p = open(Limits::default());
        assert_eq!(stanzas(p.feed(b"<message/>\n <").unwrap()).len(), 1);
        p.release();
        let evs = p.feed(b"presence/>").unwrap();
        assert_eq!(
            evs,
            vec![StreamEvent::Stanza(Element::new("presence", NS_CLIENT))]
        );
        // Idle between stanzas it is still released.
        assert!(p.release());
        assert_eq!(stanzas(p.feed(b"<presence/>").unwrap()).len(), 1);
    }

    #[test]
    fn whitespace_keepalive_ignored() {
        let mut p = open(Limits::default());
        for _ in 0..3 {
            assert_eq!(p.feed(b" ").unwrap(), vec![]);
            assert_eq!(p.feed(b"\r\n\t").unwrap(), vec![]);
        }
        assert_eq!(p.pending, 0);
        assert_eq!(stanzas(p.feed(b"<presence/>").unwrap()).len(), 1);
        assert_eq!(p.pending, 0);
        assert_eq!(p.stanza_bytes, 0);
    }

    #[test]
    fn text_in_stream_is_bad_format() {
        let e = stream_err("hello", Limits::default());
        assert_eq!(e.condition(), "bad-format");
    }

    #[test]
    fn reset_accepts_new_header() {
        let mut p = open(Limits::default());
        assert_eq!(
            p.feed(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
                .unwrap()
                .len(),
            1
        );
        p.reset();
        let evs = p.feed(HEADER.as_bytes()).unwrap();
        assert!(matches!(&evs[0], StreamEvent::Open { .. }));
        p.reset();
        // The XML declaration is optional.
        let evs = p
            .feed(b"<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>")
            .unwrap();
        assert!(matches!(&evs[0], StreamEvent::Open { .. }));
    }

    #[test]
    fn wrong_root() {
        let mut p = StreamParser::new(Limits::default());
        let e = p
            .feed(b"<stream:stream xmlns:stream='urn:wrong' xmlns='jabber:client'>")
            .unwrap_err();
        assert_eq!(e.condition(), "invalid-namespace");
        let mut p = StreamParser::new(Limits::default());
        let e = p.feed(b"<message xmlns='jabber:client'>").unwrap_err();
        assert_eq!(e.condition(), "invalid-namespace");
        // The parser stays failed.
        assert_eq!(p.feed(b"x").unwrap_err(), e);
    }

    #[test]
    fn doctype_and_entities() {
        let mut p = StreamParser::new(Limits::default());
        let e = p
            .feed(b"<?xml version='1.0'?><!DOCTYPE x [<!ENTITY a \"aaaa\">]><x>&a;</x>")
            .unwrap_err();
        assert_eq!(e.condition(), "restricted-xml", "{e}");
        let e = stream_err("<message><body>&a;</body></message>", Limits::default());
        assert_eq!(e.condition(), "restricted-xml", "{e}");
    }

    #[test]
    fn processing_instruction_and_comment() {
        let e = stream_err("<?foo bar?>", Limits::default());
        assert_eq!(e.condition(), "restricted-xml", "{e}");
        let e = stream_err("<message><?foo bar?></message>", Limits::default());
        assert_eq!(e.condition(), "restricted-xml", "{e}");
        let e = stream_err("<!-- hi -->", Limits::default());
        assert_eq!(e.condition(), "restricted-xml", "{e}");
        // rxml lexes `<?xml-…` as a broken XML declaration.
        let mut p = StreamParser::new(Limits::default());
        let e = p.feed(b"<?xml-stylesheet href='x'?>").unwrap_err();
        assert_eq!(e.condition(), "not-well-formed", "{e}");
    }

    #[test]
    fn invalid_utf8() {
        let mut p = open(Limits::default());
        let e = p
            .feed(b"<message><body>\xff\xfe</body></message>")
            .unwrap_err();
        assert_eq!(e.condition(), "not-well-formed", "{e}");
        // A truncated multi-byte sequence followed by ASCII.
        let mut p = open(Limits::default());
        let e = p
            .feed(b"<message><body>\xe2\x98x</body></message>")
            .unwrap_err();
        assert_eq!(e.condition(), "not-well-formed", "{e}");
    }

    /// rxml checks an unfinished text run only when it ends, so one large
    /// read used to hold garbage that byte-wise reads refused at once.
    #[test]
    fn bad_bytes_fail_at_once_in_any_chunking() {
        let cases: [&[u8]; 4] = [
            b" \r\n\xff\xff\xff",
            b"<message><body>ok \xff more",
            b"<message><body>ok \x01 more",
            b"<message><body>ok \xef\xbf\xbe more",
        ];
        for bytes in cases {
            let mut whole = open(Limits::default());
            let e = whole.feed(bytes).unwrap_err();
            assert_eq!(e.condition(), "not-well-formed", "{bytes:?}: {e}");
            let mut bytewise = open(Limits::default());
            let e2 = bytes
                .iter()
                .find_map(|b| bytewise.feed(std::slice::from_ref(b)).err())
                .expect("byte-wise reads fail too");
            assert_eq!(e.condition(), e2.condition(), "{bytes:?}");
        }
        // A character split across reads is fine.
        let mut p = open(Limits::default());
        let msg = "<message><body>☃𝄞\u{FFFD}</body></message>".as_bytes();
        let mut got = Vec::new();
        for b in msg {
            got.extend(p.feed(std::slice::from_ref(b)).unwrap());
        }
        let s = stanzas(got);
        assert_eq!(s[0].child_text("body", NS_CLIENT).unwrap(), "☃𝄞\u{FFFD}");
    }

    /// rxml holds back text read before a CR until it sees the next byte.
    #[test]
    fn text_before_a_trailing_cr_is_reported_at_once() {
        let mut p = open(Limits::default());
        let e = p.feed(b"t \r").unwrap_err();
        assert_eq!(e.condition(), "bad-format", "{e}");
        // Line ends are normalized as XML says, across reads too.
        for reads in [
            &[
                &b"<message><body>a\r\nb\rc\r"[..],
                b"\nd\r",
                b"\r</body></message>",
            ][..],
            &[
                b"<message><body>a\r",
                b"\nb\r",
                b"c\r\nd\r\r</body></message>",
            ],
        ] {
            let mut p = open(Limits::default());
            let mut evs = Vec::new();
            for r in reads {
                evs.extend(p.feed(r).unwrap());
            }
            let s = stanzas(evs);
            assert_eq!(
                s[0].child_text("body", NS_CLIENT).unwrap(),
                "a\nb\nc\nd\n\n"
            );
        }
    }

    /// rxml holds back text before a `]` until it sees the next byte.
    #[test]
    fn stream_level_text_is_refused_at_once() {
        for tail in [&b"<presence/>ab]"[..], b"\n x]", b"<presence/> \n]"] {
            let mut p = open(Limits::default());
            let e = p.feed(tail).unwrap_err();
            assert_eq!(e.condition(), "bad-format", "{tail:?}: {e}");
        }
        // Whitespace and stanzas in any cut are fine.
        let mut p = open(Limits::default());
        let mut n = 0;
        for b in b" \n<presence/>\t <presence>x]y</presence> " {
            n += p.feed(std::slice::from_ref(b)).unwrap().len();
        }
        assert_eq!(n, 2);
    }

    /// A text run counts once, at the tag that ends it, however it was cut.
    #[test]
    fn text_runs_count_once_in_any_chunking() {
        let limits = Limits {
            max_elements: 2,
            ..Limits::default()
        };
        let mut whole = open(limits);
        assert!(whole.feed(b"<message>ab]").unwrap().is_empty());
        let mut bytewise = open(limits);
        for b in b"<message>ab]" {
            assert!(bytewise.feed(std::slice::from_ref(b)).unwrap().is_empty());
        }
        for p in [&mut whole, &mut bytewise] {
            let e = p.feed(b"<x/></message>").unwrap_err();
            assert_eq!(e.condition(), "policy-violation", "{e}");
        }
    }

    #[test]
    fn illegal_chars() {
        for body in ["\u{0}", "\u{c}", "&#0;", "&#x0C;"] {
            let e = stream_err(
                &format!("<message><body>{body}</body></message>"),
                Limits::default(),
            );
            assert_eq!(e.condition(), "not-well-formed", "{body:?}: {e}");
        }
        let e = stream_err("<message a='\u{c}'/>", Limits::default());
        assert_eq!(e.condition(), "not-well-formed", "{e}");
    }

    #[test]
    fn mismatched_and_undeclared_prefix() {
        let e = stream_err("<message></iq>", Limits::default());
        assert_eq!(e.condition(), "not-well-formed");
        let e = stream_err("<foo:bar/>", Limits::default());
        assert_eq!(e.condition(), "not-well-formed");
    }

    #[test]
    fn oversized_stanza() {
        let limits = Limits {
            max_stanza_bytes: 1000,
            ..Limits::default()
        };
        // Exactly at the limit is fine.
        let body = "x".repeat(1000 - "<message><body></body></message>".len());
        let ok = format!("<message><body>{body}</body></message>");
        assert_eq!(ok.len(), 1000);
        let mut p = open(limits);
        assert_eq!(stanzas(p.feed(ok.as_bytes()).unwrap()).len(), 1);
        // The limit is per stanza, not cumulative.
        assert_eq!(stanzas(p.feed(ok.as_bytes()).unwrap()).len(), 1);
        let big = format!("<message><body>{body}x</body></message>");
        assert_eq!(
            p.feed(big.as_bytes()).unwrap_err().condition(),
            "policy-violation"
        );
    }

    #[test]
    fn oversized_stanza_detected_early() {
        let limits = Limits {
            max_stanza_bytes: 1000,
            ..Limits::default()
        };
        // Never-ending text, element head and attribute value: each is
        // rejected once the limit is passed, without waiting for the end.
        for start in ["<message><body>", "<message ", "<message a='", "<message><"] {
            let mut p = open(limits);
            p.feed(start.as_bytes()).unwrap();
            let filler: &[u8] = if start.ends_with(' ') {
                b"a='b' "
            } else {
                b"xxxxx"
            };
            let mut sent = start.len();
            let err = loop {
                match p.feed(filler) {
                    Ok(evs) => assert!(evs.is_empty()),
                    Err(e) => break e,
                }
                sent += filler.len();
                assert!(sent <= 1000 + filler.len(), "{start}: not detected");
                // rxml must never hold much more than the limit.
                assert!(p.pending + p.stanza_bytes <= 1000, "{start}");
            };
            assert_eq!(err.condition(), "policy-violation", "{start}: {err}");
        }
        // One huge chunk is rejected too.
        let mut p = open(limits);
        let huge = format!("<message a='{}'/>", "x".repeat(1 << 20));
        assert_eq!(
            p.feed(huge.as_bytes()).unwrap_err().condition(),
            "policy-violation"
        );
        // And so is a huge stream header.
        let mut p = StreamParser::new(limits);
        let header = format!(
            "<stream:stream xmlns:stream='{NS_STREAM}' a='{}'>",
            "x".repeat(2000)
        );
        assert_eq!(
            p.feed(header.as_bytes()).unwrap_err().condition(),
            "policy-violation"
        );
    }

    #[test]
    fn long_text_is_split_not_rejected() {
        // Text longer than rxml's token cap arrives in pieces and is merged.
        let body = "y".repeat(3 * MAX_TOKEN_CAP + 17);
        let mut p = open(Limits::default());
        let s = stanzas(
            p.feed(format!("<message><body>{body}</body></message>").as_bytes())
                .unwrap(),
        );
        let b = s[0].get_child("body", NS_CLIENT).unwrap();
        assert_eq!(b.children, vec![Node::Text(body)]);
    }

    #[test]
    fn raised_limit_after_reset() {
        let small = Limits {
            max_stanza_bytes: 300,
            ..Limits::default()
        };
        let msg = format!("<message><body>{}</body></message>", "z".repeat(500));
        let mut p = open(small);
        assert_eq!(
            p.feed(msg.as_bytes()).unwrap_err().condition(),
            "policy-violation"
        );
        let mut p = open(small);
        p.set_limits(Limits::default());
        p.reset();
        p.feed(HEADER.as_bytes()).unwrap();
        assert_eq!(stanzas(p.feed(msg.as_bytes()).unwrap()).len(), 1);
    }

    #[test]
    fn huge_attribute_value_is_policy_violation() {
        let mut p = open(Limits::default());
        let m = format!("<message id='{}'/>", "i".repeat(MAX_TOKEN_CAP + 1));
        assert_eq!(
            p.feed(m.as_bytes()).unwrap_err().condition(),
            "policy-violation"
        );
    }

    #[test]
    fn element_heavy_stanza_is_policy_violation() {
        // The memory-amplification stanza (issue 9): tens of thousands of
        // empty elements in a stanza well under the byte limit.
        let limits = Limits {
            max_elements: 100,
            ..Limits::default()
        };
        let heavy = format!("<message>{}</message>", "<a/>".repeat(100));
        let mut p = open(limits);
        assert_eq!(
            p.feed(heavy.as_bytes()).unwrap_err().condition(),
            "policy-violation"
        );
        assert!(parse_frame(heavy.as_bytes(), &limits).is_err());
        // At the limit (99 children + the stanza) it parses, and the count
        // starts again with the next stanza; a text run fed in pieces is one.
        let ok = format!("<message>{}</message>", "<a/>".repeat(99));
        let mut p = open(limits);
        assert_eq!(stanzas(p.feed(ok.as_bytes()).unwrap()).len(), 1);
        assert_eq!(stanzas(p.feed(ok.as_bytes()).unwrap()).len(), 1);
        let mut p = open(limits);
        p.feed(b"<message><body>").unwrap();
        for _ in 0..200 {
            p.feed(b"text ").unwrap();
        }
        assert_eq!(stanzas(p.feed(b"</body></message>").unwrap()).len(), 1);
    }

    fn nested(levels: usize) -> String {
        let mut s = String::new();
        for _ in 0..levels {
            s.push_str("<a>");
        }
        for _ in 0..levels {
            s.push_str("</a>");
        }
        s
    }

    #[test]
    fn too_deep() {
        let limits = Limits {
            max_depth: 4,
            ..Limits::default()
        };
        let mut p = open(limits);
        assert_eq!(stanzas(p.feed(nested(4).as_bytes()).unwrap()).len(), 1);
        let e = p.feed(nested(5).as_bytes()).unwrap_err();
        assert_eq!(e.condition(), "policy-violation");
        assert_eq!(
            parse_frame(nested(4).as_bytes(), &limits).unwrap().name,
            "a"
        );
        let e = parse_frame(nested(5).as_bytes(), &limits).unwrap_err();
        assert_eq!(e.condition(), "policy-violation");
    }

    #[test]
    fn too_many_attrs() {
        let limits = Limits {
            max_attrs: 3,
            ..Limits::default()
        };
        let mut p = open(limits);
        // Namespace declarations are not counted.
        let ok = "<message xmlns:foo='urn:foo' a='1' b='2' xml:lang='en'/>";
        assert_eq!(stanzas(p.feed(ok.as_bytes()).unwrap()).len(), 1);
        let e = p
            .feed(b"<message><x a='1' b='2' c='3' d='4'/></message>")
            .unwrap_err();
        assert_eq!(e.condition(), "policy-violation");
        let e = parse_frame(b"<m a='1' b='2' c='3' d='4'/>", &limits).unwrap_err();
        assert_eq!(e.condition(), "policy-violation");
    }

    #[test]
    fn foreign_namespaced_attrs_dropped() {
        let mut p = open(Limits::default());
        let s = stanzas(
            p.feed(b"<message xmlns:f='urn:f' f:x='1' y='2' xml:lang='de'/>")
                .unwrap(),
        );
        let mut attrs = s[0].attrs.clone();
        attrs.sort();
        assert_eq!(
            attrs,
            vec![("xml:lang".into(), "de".into()), ("y".into(), "2".into())]
        );
    }

    #[test]
    fn frame_open() {
        let el = parse_frame(
            b"<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' to='localhost' version='1.0'/>",
            &Limits::default(),
        )
        .unwrap();
        assert!(el.is("open", NS_FRAMING));
        assert_eq!(el.attr("to"), Some("localhost"));
        assert_eq!(el.attr("version"), Some("1.0"));
        assert!(el.children.is_empty());
    }

    #[test]
    fn frame_message() {
        let el = parse_frame(
            "<message xmlns='jabber:client' to='a@b' type='chat'><body>hi ☃</body></message>"
                .as_bytes(),
            &Limits::default(),
        )
        .unwrap();
        assert!(el.is("message", NS_CLIENT));
        assert_eq!(el.child_text("body", NS_CLIENT).as_deref(), Some("hi ☃"));
    }

    #[test]
    fn frame_errors() {
        let l = Limits::default();
        let cond = |d: &[u8]| parse_frame(d, &l).unwrap_err().condition();
        assert_eq!(cond(b""), "not-well-formed");
        assert_eq!(cond(b"<a/><b/>"), "not-well-formed");
        assert_eq!(cond(b"<a>"), "not-well-formed");
        assert_eq!(cond(b"<a/>x"), "not-well-formed");
        assert_eq!(cond(b"<a>\xff</a>"), "not-well-formed");
        assert_eq!(cond(b"<!DOCTYPE a><a/>"), "restricted-xml");
        assert_eq!(cond(b"<?pi?><a/>"), "restricted-xml");
        let small = Limits {
            max_stanza_bytes: 10,
            ..l
        };
        assert_eq!(
            parse_frame(b"<message xmlns='jabber:client'/>", &small)
                .unwrap_err()
                .condition(),
            "policy-violation"
        );
    }
}
