//! TLS for federation and XEP-0178 SASL EXTERNAL: natter presents its
//! certificate both ways (as server, and as client when it connects), asks
//! peers for theirs, and a peer whose certificate chains to a trusted root
//! (the system's, plus `s2s.ca_file`) and names the domain it claims may
//! authenticate with EXTERNAL instead of dialback.

use crate::config::Config;
use anyhow::Context;
use base64::Engine;
use natter_xml::Element;
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use std::sync::Arc;

use super::stream::NS_SASL;

pub struct Certs {
    /// Outgoing STARTTLS (any server certificate: dialback or EXTERNAL
    /// authenticates, TLS keeps the stream private).
    pub starttls: Arc<rustls::ClientConfig>,
    /// Outgoing direct TLS (XEP-0368): the same with ALPN "xmpp-server".
    pub direct: Arc<rustls::ClientConfig>,
    /// Incoming, STARTTLS or direct TLS: asks for a client certificate.
    pub server: Arc<rustls::ServerConfig>,
    /// Checks a peer's chain and name; None when no root is trusted.
    verifier: Option<Arc<rustls::client::WebPkiServerVerifier>>,
}

impl Certs {
    pub fn load(config: &Config) -> anyhow::Result<Certs> {
        let tls = crate::net::tls::identity;
        let starttls = crate::net::tls::unverified_client_config_with(tls(config)?)?;
        let mut direct = starttls.clone();
        direct.alpn_protocols = vec![b"xmpp-server".to_vec()];
        let server = crate::net::tls::optional_client_cert_config(tls(config)?)?;
        Ok(Certs {
            starttls: Arc::new(starttls),
            direct: Arc::new(direct),
            server: Arc::new(server),
            verifier: verifier(config)?,
        })
    }

    /// Whether `chain` (end entity first) is valid now for `domain`.
    pub fn valid_for(&self, chain: &[CertificateDer<'_>], domain: &str) -> bool {
        let (Some(v), Some((end, rest))) = (&self.verifier, chain.split_first()) else {
            return false;
        };
        let Ok(name) = ServerName::try_from(domain) else {
            return false;
        };
        v.verify_server_cert(end, rest, &name, &[], UnixTime::now())
            .is_ok()
    }
}

fn verifier(config: &Config) -> anyhow::Result<Option<Arc<rustls::client::WebPkiServerVerifier>>> {
    let mut roots = rustls::RootCertStore::empty();
    // Unreadable system certificates only lose EXTERNAL for those roots.
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    let file = &config.s2s.ca_file;
    if !file.is_empty() {
        let certs =
            crate::net::tls::read_certs(std::path::Path::new(file)).context("s2s.ca_file")?;
        for c in certs {
            roots
                .add(c)
                .with_context(|| format!("s2s.ca_file: {file} holds an unusable certificate"))?;
        }
    }
    if roots.is_empty() {
        return Ok(None);
    }
    let v = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        crate::net::tls::provider(),
    )
    .build()
    .context("s2s certificate verifier")?;
    Ok(Some(v))
}

/// The `<mechanisms/>` stream feature offering EXTERNAL.
pub fn external_feature() -> Element {
    Element::new("mechanisms", NS_SASL)
        .with_child(Element::new("mechanism", NS_SASL).with_text("EXTERNAL"))
}

/// Whether stream features offer SASL EXTERNAL.
pub fn offers_external(features: &Element) -> bool {
    features.get_child("mechanisms", NS_SASL).is_some_and(|m| {
        m.children()
            .any(|c| c.name == "mechanism" && c.text().trim() == "EXTERNAL")
    })
}

/// `<auth mechanism='EXTERNAL'>` naming `domain` as the authorization identity.
pub fn auth(domain: &str) -> Element {
    Element::new("auth", NS_SASL)
        .with_attr("mechanism", "EXTERNAL")
        .with_text(base64::engine::general_purpose::STANDARD.encode(domain))
}

/// The domain an `<auth/>` asks to act as: its authorization identity, or
/// the stream's `from` when it gives none ("=" or empty, RFC 6120 §6.4.2).
pub fn requested_identity(auth: &Element, stream_from: &str) -> Option<String> {
    let text = auth.text();
    let text = text.trim();
    if text.is_empty() || text == "=" {
        return Some(stream_from.to_string());
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(text)
        .ok()?;
    String::from_utf8(raw).ok()
}
