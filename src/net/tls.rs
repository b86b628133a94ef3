//! TLS configuration: the configured certificate, or a self-signed one
//! generated under data_dir/tls on first start.

use anyhow::{bail, Context};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
use std::sync::Arc;

pub fn load(config: &crate::config::Config) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let (cert_path, key_path) = if config.tls.cert.is_empty() {
        let dir = config.data_dir.join("tls");
        let cert = dir.join("cert.pem");
        let key = dir.join("key.pem");
        if !cert.exists() || !key.exists() {
            generate(&dir, &cert, &key, &config.domains)?;
        }
        (cert, key)
    } else {
        (
            config.tls.cert.clone().into(),
            config.tls.key.clone().into(),
        )
    };
    let certs = read_certs(&cert_path)?;
    let key = read_key(&key_path)?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS protocol versions")?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .with_context(|| {
        format!(
            "certificate {} does not match key {}",
            cert_path.display(),
            key_path.display()
        )
    })?;
    // Browsers reach the WebSocket over plain HTTP here; ALPN stays unset
    // for c2s (XEP-0368 clients send "xmpp-client", which rustls accepts
    // when the server offers no list).
    cfg.alpn_protocols = Vec::new();
    Ok(Arc::new(cfg))
}

fn generate(dir: &Path, cert: &Path, key: &Path, domains: &[String]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let ck = rcgen::generate_simple_self_signed(domains.to_vec())
        .context("generating a self-signed certificate")?;
    std::fs::write(cert, ck.cert.pem())
        .with_context(|| format!("cannot write {}", cert.display()))?;
    write_private(key, ck.key_pair.serialize_pem().as_bytes())
        .with_context(|| format!("cannot write {}", key.display()))?;
    tracing::info!(cert = %cert.display(), "generated a self-signed certificate");
    Ok(())
}

#[cfg(unix)]
fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(data)
}

#[cfg(not(unix))]
fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    std::fs::write(path, data)
}

fn read_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let data = std::fs::read(path)
        .with_context(|| format!("cannot read TLS certificate {}", path.display()))?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut data.as_slice())
        .collect::<Result<_, _>>()
        .with_context(|| format!("TLS certificate {} is not valid PEM", path.display()))?;
    if certs.is_empty() {
        bail!("TLS certificate {} holds no certificate", path.display());
    }
    Ok(certs)
}

fn read_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    let data =
        std::fs::read(path).with_context(|| format!("cannot read TLS key {}", path.display()))?;
    rustls_pemfile::private_key(&mut data.as_slice())
        .with_context(|| format!("TLS key {} is not valid PEM", path.display()))?
        .with_context(|| format!("TLS key {} holds no private key", path.display()))
}
