//! JID parsing as natter uses it: the `jid` crate's Jid / BareJid / FullJid
//! (every `to`, `from`, roster, blocklist and MAM filter JID), natter's
//! `accounts::parse_user` (CLI, admin API, registration) and
//! `modules::parse_to` (every stanza's `to`), and the account JID built from
//! a SASL username (`<username>@<domain>`, as c2s does after SASL).
//!
//! Input: a string. Checks, besides "no panic": the three types agree,
//! `parse_user` only returns local JIDs of a served domain that are at a
//! fixed point of normalization (printed and parsed again, the same JID: else
//! one name could be stored as one account and addressed as another), and
//! a SASL username can only ever name an account of the stream's own domain.
#![no_main]

use jid::{BareJid, FullJid, Jid};
use libfuzzer_sys::fuzz_target;
use natter_xml::{Element, NS_CLIENT};

const DOMAIN: &str = "localhost";

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let jid = Jid::new(s);
    if let Ok(j) = &jid {
        // Not checked: that `j` printed parses to `j` again. The jid crate's
        // nodeprep is not idempotent ("al\u{213B}" -> "alFAX" -> "alfax");
        // natter refuses such names where accounts are made (parse_user,
        // checked below), so they never name an account.
        let bare = j.to_bare();
        assert_eq!(bare.node(), j.node());
        assert_eq!(bare.domain(), j.domain());
    }
    match BareJid::new(s) {
        Ok(b) => {
            let j = jid.as_ref().expect("a bare JID is a JID");
            assert!(j.resource().is_none());
            assert_eq!(j.to_bare(), b);
        }
        Err(_) => assert!(jid.as_ref().map_or(true, |j| j.resource().is_some())),
    }
    match FullJid::new(s) {
        Ok(f) => {
            let j = jid.as_ref().expect("a full JID is a JID");
            assert_eq!(j.resource(), Some(f.resource()));
            assert!(!f.resource().as_str().is_empty());
        }
        Err(_) => assert!(jid.as_ref().map_or(true, |j| j.resource().is_none())),
    }

    // Every stanza's `to`.
    let el = Element::new("message", NS_CLIENT).with_attr("to", s);
    match natter::modules::parse_to(&el) {
        Ok(Some(to)) => assert_eq!(Ok(to), jid),
        Ok(None) => panic!("parse_to lost the to attribute"),
        Err(_) => assert!(jid.is_err()),
    }

    // Accounts (CLI, admin API, registration).
    if let Ok(user) = natter::accounts::parse_user(s, &[DOMAIN.to_string()]) {
        assert!(user.node().is_some(), "{s:?} names no user");
        assert_eq!(user.domain().as_str(), DOMAIN, "{s:?}");
        assert_eq!(BareJid::new(user.as_str()).as_ref(), Ok(&user));
    }

    // The account a SASL username logs in to (c2s: `<username>@<domain>`,
    // the username already SASLprepped): never another domain's, never a
    // JID with a resource.
    if let Ok(username) = stringprep::saslprep(s) {
        if let Ok(user) = BareJid::new(&format!("{username}@{DOMAIN}")) {
            assert_eq!(user.domain().as_str(), DOMAIN, "username {username:?}");
            assert!(user.node().is_some(), "username {username:?} names no user");
        }
    }
});
