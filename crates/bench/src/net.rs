//! Sockets: loopback-only targets, source-address spreading, TLS that accepts
//! any certificate (this is a benchmark tool, never a client for real use).

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use anyhow::{bail, Context as _};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// A client connection, before or after TLS.
pub enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Accepts every certificate. Handshake signatures are still checked, so
/// the TLS cost measured is that of a real client.
#[derive(Debug)]
struct AnyCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// TLS client configuration. Session resumption is off unless asked for, so
/// every connection pays for a full handshake (the worst case a server sees).
pub fn tls_config(resume: bool) -> anyhow::Result<Arc<ClientConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
        .with_no_client_auth();
    if !resume {
        cfg.resumption = rustls::client::Resumption::disabled();
    }
    Ok(Arc::new(cfg))
}

pub async fn tls_handshake(
    cfg: &Arc<ClientConfig>,
    domain: &str,
    tcp: TcpStream,
) -> anyhow::Result<TlsStream<TcpStream>> {
    let name = ServerName::try_from(domain.to_owned()).context("TLS server name")?;
    let s = TlsConnector::from(cfg.clone())
        .connect(name, tcp)
        .await
        .context("TLS handshake")?;
    Ok(s)
}

/// Resolve `host:port` and refuse anything that is not a loopback address.
pub async fn loopback_target(host: &str, port: u16) -> anyhow::Result<SocketAddr> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .with_context(|| format!("resolving {host}"))?
        .collect();
    match addrs.iter().find(|a| a.ip().is_loopback()) {
        Some(a) => Ok(*a),
        None => bail!(
            "{host} resolves to {addrs:?}: natter-bench only drives servers on loopback \
             addresses (127.0.0.0/8, ::1)"
        ),
    }
}

/// Round-robin over source addresses 127.0.0.1 ..= 127.0.0.N, so that more
/// than one address's worth of ephemeral ports (~28k) is available.
pub struct Sources {
    n: usize,
    next: AtomicUsize,
}

impl Clone for Sources {
    /// A fresh round-robin over the same addresses.
    fn clone(&self) -> Self {
        Sources::new(self.n)
    }
}

impl Sources {
    pub fn new(n: usize) -> Self {
        Sources {
            n: n.max(1),
            next: AtomicUsize::new(0),
        }
    }

    fn pick(&self) -> Ipv4Addr {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.n;
        // 127.0.0.1 + i, carrying into the third octet past .255.
        Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 0, 0, 1)) + i as u32)
    }

    /// TCP connect with the source address bound first (IPv4 targets only).
    pub async fn connect(&self, target: SocketAddr) -> io::Result<TcpStream> {
        let stream = match target.ip() {
            IpAddr::V4(_) => {
                let sock = TcpSocket::new_v4()?;
                // Lets bind() reuse a port whose old connection is in TIME_WAIT.
                sock.set_reuseaddr(true)?;
                sock.bind(SocketAddr::new(IpAddr::V4(self.pick()), 0))?;
                sock.connect(target).await?
            }
            IpAddr::V6(_) => TcpStream::connect(target).await?,
        };
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

/// Raise the soft open-files limit to the hard one; returns the soft limit now
/// in force.
pub fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    // rlim_t is not u64 on every platform.
    #[allow(clippy::unnecessary_cast)]
    let cur = lim.rlim_cur as u64;
    cur
}

/// Raise the open-files limit (see [`raise_nofile`]) and fail unless
/// `sessions` connections (and a margin) fit; `what` names them for the error.
pub fn need_files(sessions: u64, what: &str) -> anyhow::Result<()> {
    let limit = raise_nofile();
    if sessions + 64 > limit {
        anyhow::bail!("{what} need more than the {limit} files this process may hold");
    }
    Ok(())
}
