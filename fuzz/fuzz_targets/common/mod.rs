//! Helpers shared by the fuzz targets (included with `#[path]`, each target
//! is its own binary).
#![allow(dead_code)]

use natter_xml::{parse_frame, Element, Limits, StreamEvent, StreamParser, NS_CLIENT};

/// Limit sets a target picks from with one input byte: the defaults, and
/// small ones so that every limit check is reached by short inputs.
pub const LIMITS: [Limits; 4] = [
    Limits {
        max_stanza_bytes: 256 * 1024,
        max_depth: 32,
        max_attrs: 64,
        max_elements: 5_000,
    },
    Limits {
        max_stanza_bytes: 64,
        max_depth: 3,
        max_attrs: 2,
        max_elements: 4,
    },
    Limits {
        max_stanza_bytes: 512,
        max_depth: 8,
        max_attrs: 8,
        max_elements: 16,
    },
    Limits {
        max_stanza_bytes: 1,
        max_depth: 1,
        max_attrs: 0,
        max_elements: 1,
    },
];

pub fn limits(selector: u8) -> Limits {
    LIMITS[selector as usize % LIMITS.len()]
}

/// Limits large enough for anything the serializer writes back.
pub const ROOMY: Limits = Limits {
    max_stanza_bytes: 1 << 30,
    max_depth: 1 << 20,
    max_attrs: 1 << 20,
    max_elements: 1 << 30,
};

pub const CLIENT_HEADER: &str = "<stream:stream xmlns='jabber:client' \
    xmlns:stream='http://etherx.jabber.org/streams'>";

/// What natter writes is what it read: a parsed element serialized the way
/// the TCP transport writes it (inside a stream) and the way the WebSocket
/// transport writes it (one self-contained frame) parses back to the same
/// element. A difference means the serializer lets a sender change what a
/// recipient sees (an injection) or loses data.
pub fn assert_roundtrips(el: &Element) {
    let mut tcp = String::new();
    el.write_to(&mut tcp, NS_CLIENT, true);
    let mut p = StreamParser::new(ROOMY);
    let mut evs = p
        .feed(CLIENT_HEADER.as_bytes())
        .unwrap_or_else(|e| panic!("header: {e}"));
    evs.extend(
        p.feed(tcp.as_bytes())
            .unwrap_or_else(|e| panic!("TCP form of {el:?} does not parse back: {e}\n{tcp}")),
    );
    match evs.as_slice() {
        [StreamEvent::Open { .. }, StreamEvent::Stanza(back)] => assert_eq!(
            back, el,
            "TCP form parses back to a different element\n{tcp}"
        ),
        other => panic!("TCP form of {el:?} gives {other:?}\n{tcp}"),
    }

    let mut ws = String::new();
    el.write_to(&mut ws, "", false);
    let back = parse_frame(ws.as_bytes(), &ROOMY)
        .unwrap_or_else(|e| panic!("WebSocket form of {el:?} does not parse back: {e}\n{ws}"));
    assert_eq!(&back, el, "WebSocket form parses back differently\n{ws}");
}

/// A tiny deterministic PRNG (xorshift) for chunk plans driven by one seed byte.
pub struct Rng(u32);

impl Rng {
    pub fn new(seed: u8) -> Rng {
        Rng(0x9E37_79B9 ^ (u32::from(seed) << 8 | u32::from(seed)))
    }
    pub fn next(&mut self) -> u32 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.0 = x;
        x
    }
}
