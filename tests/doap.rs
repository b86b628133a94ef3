//! doap.xml must list the XEP behind every disco feature natter announces,
//! so the published software list can't drift from the code.

/// Feature namespace → the spec's resource name in doap.xml. A new module's feature must be added
/// here and to doap.xml.
const FEATURE_XEP: &[(&str, &str)] = &[
    ("http://jabber.org/protocol/address", "xep-0033.html"),
    ("http://jabber.org/protocol/disco#info", "xep-0030.html"),
    ("http://jabber.org/protocol/disco#items", "xep-0030.html"),
    ("jabber:iq:private", "xep-0049.html"),
    ("vcard-temp", "xep-0054.html"),
    ("jabber:iq:register", "xep-0077.html"),
    ("jabber:iq:version", "xep-0092.html"),
    ("urn:xmpp:ping", "xep-0199.html"),
    ("urn:xmpp:extdisco:2", "xep-0215.html"),
    ("urn:xmpp:carbons:2", "xep-0280.html"),
    ("urn:xmpp:mam:2", "xep-0313.html"),
    ("urn:xmpp:mam:2#extended", "xep-0313.html"),
    ("urn:xmpp:sid:0", "xep-0359.html"),
    ("msgoffline", "xep-0160.html"),
    ("jabber:iq:last", "xep-0012.html"),
    ("urn:xmpp:blocking", "xep-0191.html"),
    ("http://jabber.org/protocol/pubsub", "xep-0163.html"),
    (
        "http://jabber.org/protocol/pubsub#access-open",
        "xep-0060.html",
    ),
    (
        "http://jabber.org/protocol/pubsub#access-presence",
        "xep-0060.html",
    ),
    (
        "http://jabber.org/protocol/pubsub#access-whitelist",
        "xep-0060.html",
    ),
    (
        "http://jabber.org/protocol/pubsub#auto-create",
        "xep-0060.html",
    ),
    (
        "http://jabber.org/protocol/pubsub#auto-subscribe",
        "xep-0060.html",
    ),
    (
        "http://jabber.org/protocol/pubsub#config-node",
        "xep-0060.html",
    ),
    (
        "http://jabber.org/protocol/pubsub#create-and-configure",
        "xep-0060.html",
    ),
    (
        "http://jabber.org/protocol/pubsub#create-nodes",
        "xep-0060.html",
    ),
    (
        "http://jabber.org/protocol/pubsub#delete-items",
        "xep-0060.html",
    ),
    (
        "http://jabber.org/protocol/pubsub#delete-nodes",
        "xep-0060.html",
    ),
    (
        "http://jabber.org/protocol/pubsub#filtered-notifications",
        "xep-0060.html",
    ),
    (
        "http://jabber.org/protocol/pubsub#item-ids",
        "xep-0060.html",
    ),
    (
        "http://jabber.org/protocol/pubsub#last-published",
        "xep-0060.html",
    ),
    (
        "http://jabber.org/protocol/pubsub#multi-items",
        "xep-0060.html",
    ),
    (
        "http://jabber.org/protocol/pubsub#persistent-items",
        "xep-0060.html",
    ),
    (
        "http://jabber.org/protocol/pubsub#presence-notifications",
        "xep-0060.html",
    ),
    ("http://jabber.org/protocol/pubsub#publish", "xep-0060.html"),
    (
        "http://jabber.org/protocol/pubsub#purge-nodes",
        "xep-0060.html",
    ),
    (
        "http://jabber.org/protocol/pubsub#retract-items",
        "xep-0060.html",
    ),
    (
        "http://jabber.org/protocol/pubsub#retrieve-default",
        "xep-0060.html",
    ),
    (
        "http://jabber.org/protocol/pubsub#retrieve-items",
        "xep-0060.html",
    ),
    (
        "http://jabber.org/protocol/pubsub#publish-options",
        "xep-0223.html",
    ),
    ("jabber:iq:roster", "rfc6121"),
    (
        "http://jabber.org/protocol/pubsub#member-affiliation",
        "xep-0060.html",
    ),
    (
        "http://jabber.org/protocol/pubsub#modify-affiliations",
        "xep-0060.html",
    ),
    ("urn:xmpp:push:0", "xep-0357.html"),
    // Web Push subscriptions of natter's own page: push's other transport.
    ("urn:natter:webpush:0", "xep-0357.html"),
    // 24-hour stories: Atom entries on a PEP node, after XEP-0472.
    ("urn:natter:stories:0", "xep-0472.html"),
];

#[test]
fn doap_lists_every_announced_feature() {
    let doap = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/doap.xml")).unwrap();
    let modules = natter::modules::Modules::standard(&natter::config::Config::default());
    let mut features = modules.features();
    features.extend(modules.account_features());
    for f in features {
        let (_, needle) = FEATURE_XEP
            .iter()
            .find(|(ns, _)| *ns == f)
            .unwrap_or_else(|| panic!("feature {f} has no entry in FEATURE_XEP / doap.xml"));
        assert!(
            doap.contains(needle),
            "doap.xml does not list {needle} (for {f})"
        );
    }
}
