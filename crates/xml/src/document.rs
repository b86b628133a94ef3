//! Streaming reader for whole XML documents too large to hold in memory
//! (XEP-0227 backups): the caller walks start/end events and asks for a
//! full [`Element`] only for the subtrees it wants, one at a time.

use std::io::BufRead;

use rxml::error::EndOrError;
use rxml::{Event, Parse};

use crate::stream::{map_rxml_error, new_rxml_parser, TreeBuilder};
use crate::{Element, Limits, XmlError};

/// What [`DocumentReader::next`] yields.
#[derive(Debug, PartialEq)]
pub enum DocEvent {
    /// An element opened: its name, namespace and attributes, no children.
    /// Follow with [`DocumentReader::read_subtree`] to get the children, or
    /// [`DocumentReader::skip_subtree`] to pass over them.
    Start(Element),
    /// The innermost open element closed.
    End,
    /// Character data (may come in several pieces).
    Text(String),
}

#[derive(Debug, thiserror::Error)]
pub enum DocError {
    #[error("cannot read: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Xml(#[from] XmlError),
}

/// Pull reader over a complete XML document. Holds only rxml's buffers and
/// the subtree being built: memory does not grow with the document.
///
/// Limits: `max_depth` and `max_attrs` apply to the whole document,
/// `max_stanza_bytes` to each subtree built by [`read_subtree`](Self::read_subtree).
pub struct DocumentReader<R> {
    inner: R,
    parser: rxml::Parser,
    limits: Limits,
    depth: usize,
    position: u64,
}

impl<R: BufRead> DocumentReader<R> {
    pub fn new(inner: R, limits: Limits) -> Self {
        DocumentReader {
            parser: new_rxml_parser(&limits),
            inner,
            limits,
            depth: 0,
            position: 0,
        }
    }

    /// Bytes of the input consumed so far.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// Number of elements currently open (1 inside the root element).
    pub fn depth(&self) -> usize {
        self.depth
    }

    fn raw_next(&mut self) -> Result<Option<Event>, DocError> {
        loop {
            let buf = self.inner.fill_buf()?;
            let at_eof = buf.is_empty();
            let mut rest = buf;
            let r = self.parser.parse(&mut rest, at_eof);
            let used = buf.len() - rest.len();
            self.inner.consume(used);
            self.position += used as u64;
            match r {
                Ok(ev) => return Ok(ev),
                Err(EndOrError::NeedMoreData) if at_eof => {
                    return Err(XmlError::NotWellFormed("document ends early".into()).into())
                }
                Err(EndOrError::NeedMoreData) => {}
                Err(EndOrError::Error(e)) => return Err(map_rxml_error(e).into()),
            }
        }
    }

    fn opened(&mut self) -> Result<(), XmlError> {
        if self.depth >= self.limits.max_depth {
            return Err(XmlError::PolicyViolation(format!(
                "element nesting deeper than {}",
                self.limits.max_depth
            )));
        }
        self.depth += 1;
        Ok(())
    }

    /// The next event; `None` once the document is complete.
    pub fn next_event(&mut self) -> Result<Option<DocEvent>, DocError> {
        loop {
            let ev = match self.raw_next()? {
                None => return Ok(None),
                Some(Event::XmlDeclaration(..)) => continue,
                Some(Event::StartElement(_, (ns, name), attrs)) => {
                    self.opened()?;
                    // A one-element tree: the builder checks the attributes.
                    let mut tree = TreeBuilder::default();
                    tree.start(ns, name, attrs, &self.limits)?;
                    DocEvent::Start(tree.end(&self.limits)?.expect("one open element"))
                }
                Some(Event::EndElement(_)) => {
                    self.depth -= 1;
                    DocEvent::End
                }
                Some(Event::Text(_, text)) => DocEvent::Text(text),
            };
            return Ok(Some(ev));
        }
    }

    /// Read the children of `start`, the element [`next_event`](Self::next_event) just
    /// returned, up to its end tag; returns it complete.
    pub fn read_subtree(&mut self, start: Element) -> Result<Element, DocError> {
        let from = self.position;
        let mut tree = TreeBuilder::with_root(start);
        loop {
            match self.raw_next()? {
                None => return Err(XmlError::NotWellFormed("document ends early".into()).into()),
                Some(Event::XmlDeclaration(..)) => {}
                Some(Event::StartElement(_, (ns, name), attrs)) => {
                    self.opened()?;
                    tree.start(ns, name, attrs, &self.limits)?;
                }
                Some(Event::EndElement(_)) => {
                    self.depth -= 1;
                    if let Some(el) = tree.end(&self.limits)? {
                        return Ok(el);
                    }
                }
                Some(Event::Text(_, text)) => tree.text(text),
            }
            if self.position - from > self.limits.max_stanza_bytes as u64 {
                return Err(XmlError::PolicyViolation(format!(
                    "element larger than {} bytes",
                    self.limits.max_stanza_bytes
                ))
                .into());
            }
        }
    }

    /// Pass over the rest of the element [`next_event`](Self::next_event)
    /// just opened (nothing is built).
    pub fn skip_subtree(&mut self) -> Result<(), DocError> {
        let depth = self.depth;
        while self.depth >= depth {
            match self.raw_next()? {
                None => return Err(XmlError::NotWellFormed("document ends early".into()).into()),
                Some(Event::StartElement(..)) => self.opened()?,
                Some(Event::EndElement(_)) => self.depth -= 1,
                Some(_) => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "<?xml version='1.0'?><root xmlns='urn:a'><big n='1'><x>one</x><y/></big>\
        <skip><deep><deeper/></deep></skip><big n='2'>two</big></root>";

    fn reader(doc: &str, limits: Limits) -> DocumentReader<std::io::BufReader<&[u8]>> {
        // A tiny buffer: events straddle every read.
        DocumentReader::new(std::io::BufReader::with_capacity(3, doc.as_bytes()), limits)
    }

    #[test]
    fn walks_the_document_and_builds_only_requested_subtrees() {
        let mut r = reader(DOC, Limits::default());
        let Some(DocEvent::Start(root)) = r.next_event().unwrap() else {
            panic!("no root")
        };
        assert!(root.is("root", "urn:a") && root.children.is_empty());
        let mut built = Vec::new();
        while let Some(ev) = r.next_event().unwrap() {
            match ev {
                DocEvent::Start(el) if el.name == "big" => built.push(r.read_subtree(el).unwrap()),
                DocEvent::Start(_) => r.skip_subtree().unwrap(),
                DocEvent::End => assert_eq!(r.depth(), 0),
                DocEvent::Text(t) => panic!("text {t:?}"),
            }
        }
        assert_eq!(r.position(), DOC.len() as u64);
        assert_eq!(built.len(), 2);
        assert_eq!(built[0].get_child("x", "urn:a").unwrap().text(), "one");
        assert!(built[0].get_child("y", "urn:a").is_some());
        assert_eq!(built[1].attr("n"), Some("2"));
        assert_eq!(built[1].text(), "two");
    }

    #[test]
    fn truncated_document_is_not_well_formed() {
        let cut = &DOC[..DOC.len() - 10];
        let mut r = reader(cut, Limits::default());
        let err = loop {
            match r.next_event() {
                Ok(Some(_)) => {}
                Ok(None) => panic!("truncated document accepted"),
                Err(e) => break e,
            }
        };
        assert!(
            matches!(err, DocError::Xml(XmlError::NotWellFormed(_))),
            "{err}"
        );
    }

    #[test]
    fn limits_apply_to_depth_and_subtree_size() {
        let limits = Limits {
            max_depth: 3,
            ..Limits::default()
        };
        let mut r = reader(DOC, limits);
        let err = loop {
            match r.next_event() {
                Ok(Some(_)) => {}
                Ok(None) => panic!("depth limit not applied"),
                Err(e) => break e,
            }
        };
        assert!(matches!(err, DocError::Xml(XmlError::PolicyViolation(_))));

        let limits = Limits {
            max_stanza_bytes: 8,
            ..Limits::default()
        };
        let mut r = reader(DOC, limits);
        r.next_event().unwrap();
        let Some(DocEvent::Start(big)) = r.next_event().unwrap() else {
            panic!("no <big/>")
        };
        let err = r.read_subtree(big).unwrap_err();
        assert!(matches!(err, DocError::Xml(XmlError::PolicyViolation(_))));
    }
}
