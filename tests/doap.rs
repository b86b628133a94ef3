//! doap.xml must list the XEP behind every disco feature natter announces,
//! so the published software list can't drift from the code.

/// Feature namespace → the spec's resource name in doap.xml. A new module's feature must be added
/// here and to doap.xml.
const FEATURE_XEP: &[(&str, &str)] = &[
    ("http://jabber.org/protocol/disco#info", "xep-0030.html"),
    ("http://jabber.org/protocol/disco#items", "xep-0030.html"),
    ("vcard-temp", "xep-0054.html"),
    ("jabber:iq:register", "xep-0077.html"),
    ("jabber:iq:version", "xep-0092.html"),
    ("urn:xmpp:ping", "xep-0199.html"),
    ("urn:xmpp:carbons:2", "xep-0280.html"),
    ("jabber:iq:roster", "rfc6121"),
];

#[test]
fn doap_lists_every_announced_feature() {
    let doap = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/doap.xml")).unwrap();
    let modules = natter::modules::Modules::standard();
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
