//! The TCP XML stream parser (natter_xml::StreamParser) with its limits.
//!
//! Input: byte 0 picks the limits (common::LIMITS), byte 1 seeds how the
//! rest is cut into reads (and where the parser is released in between, as
//! an idle session does); the rest is the client's byte stream.
//!
//! Checks, besides "no panic": any chunking and any release points give the
//! same events as one read of everything, and fail exactly when it fails; a failed
//! parser stays failed; every stanza survives a serialize/parse round trip.
#![no_main]

#[path = "common/mod.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use natter_xml::{Limits, StreamEvent, StreamParser, XmlError};

struct Outcome {
    events: Vec<StreamEvent>,
    error: Option<XmlError>,
}

fn run(limits: Limits, chunks: &[&[u8]], release_after: &[bool]) -> Outcome {
    let mut p = StreamParser::new(limits);
    let mut events = Vec::new();
    for (i, chunk) in chunks.iter().enumerate() {
        match p.feed(chunk) {
            Ok(evs) => events.extend(evs),
            Err(e) => {
                // The parser stays failed with the same error.
                assert_eq!(p.feed(b"<x/>").unwrap_err(), e, "failed parser recovered");
                return Outcome {
                    events,
                    error: Some(e),
                };
            }
        }
        if release_after.get(i).copied().unwrap_or(false) {
            p.release();
        }
    }
    Outcome {
        events,
        error: None,
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let limits = common::limits(data[0]);
    let mut rng = common::Rng::new(data[1]);
    let stream = &data[2..];

    let whole = run(limits, &[stream], &[true]);

    let max_chunk = 1 + (data[1] as usize % 17);
    let mut chunks = Vec::new();
    let mut release = Vec::new();
    let mut rest = stream;
    while !rest.is_empty() {
        let n = (1 + rng.next() as usize % max_chunk).min(rest.len());
        chunks.push(&rest[..n]);
        release.push(rng.next() % 3 == 0);
        rest = &rest[n..];
    }
    let chunked = run(limits, &chunks, &release);

    match (&whole.error, &chunked.error) {
        (None, None) => assert_eq!(
            whole.events, chunked.events,
            "chunking changed the events (max chunk {max_chunk})"
        ),
        // Both fail. The condition may differ: one read drops the events of
        // the read that failed, and rxml reports text (bad-format outside a
        // stanza) per read, so a later syntax error or limit can be met
        // first in one read and second in small ones. Either way the stream
        // ends with an error, which is what matters.
        (Some(_), Some(_)) => {}
        // Before the stream header rxml may wait for more bytes of a
        // garbage document start in one read and reject it in small ones:
        // either way no stream opens (noted in bench/README.md).
        _ if !whole
            .events
            .iter()
            .any(|e| matches!(e, StreamEvent::Open { .. })) => {}
        (a, b) => panic!("one read: {a:?}; chunked reads: {b:?} (max chunk {max_chunk})"),
    }

    for ev in whole.events.iter().chain(&chunked.events) {
        if let StreamEvent::Stanza(el) = ev {
            common::assert_roundtrips(el);
        }
    }
});
