//! WebSocket framing (RFC 7395): natter_xml::parse_frame and the transport's
//! frame classification (natter::c2s::transport::frame_event), which every
//! text frame of a WebSocket client goes through.
//!
//! Input: byte 0 picks the limits, the rest is one text frame's payload.
//! Checks, besides "no panic": an accepted frame is within the size limit,
//! `<open/>` / `<close/>` are recognised only in the framing namespace, and
//! every accepted element survives a serialize/parse round trip.
#![no_main]

#[path = "common/mod.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use natter::c2s::transport::frame_event;
use natter_xml::{parse_frame, StreamEvent, NS_FRAMING};

fuzz_target!(|data: &[u8]| {
    let Some((&sel, frame)) = data.split_first() else {
        return;
    };
    let limits = common::limits(sel);
    let parsed = parse_frame(frame, &limits);
    let event = frame_event(frame, &limits);
    match (&parsed, &event) {
        (Ok(el), Ok(ev)) => {
            assert!(frame.len() <= limits.max_stanza_bytes);
            common::assert_roundtrips(el);
            let framing = |name| el.ns == NS_FRAMING && el.name == name;
            match ev {
                StreamEvent::Open { attrs } => {
                    assert!(framing("open"));
                    assert_eq!(attrs, &el.attrs);
                }
                StreamEvent::Close => assert!(framing("close")),
                StreamEvent::Stanza(s) => {
                    assert!(!framing("open") && !framing("close"));
                    assert_eq!(s, el);
                }
            }
        }
        (Err(a), Err(b)) => assert_eq!(a, b),
        _ => panic!("parse_frame {parsed:?} but frame_event {event:?}"),
    }
});
