//! One server-to-server TCP connection: plain or TLS (after STARTTLS), the
//! stream parser with the c2s limits, headers, and writes under the c2s
//! write timeout. Both directions (outgoing and incoming) use it.

use crate::c2s::throttle::TokenBucket;
use crate::error::{StreamCondition, StreamError};
use natter_xml::{Element, StreamEvent, StreamParser, NS_STREAM};
use rustls::pki_types::CertificateDer;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub const NS_SERVER: &str = "jabber:server";
pub const NS_DIALBACK: &str = "jabber:server:dialback";
pub const NS_DIALBACK_FEATURE: &str = "urn:xmpp:features:dialback";
pub const NS_TLS: &str = "urn:ietf:params:xml:ns:xmpp-tls";
pub use crate::c2s::NS_SASL;

pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

pub struct Conn {
    io: Box<dyn Io>,
    parser: StreamParser,
    limits: natter_xml::Limits,
    buf: Vec<u8>,
    events: VecDeque<StreamEvent>,
    write_timeout: Duration,
    pub tls: bool,
    /// The certificate chain the peer presented in the TLS handshake.
    pub peer_certs: Vec<CertificateDer<'static>>,
    /// Incoming streams: the read rate limit (`s2s.rate_bytes_per_sec`).
    pub bucket: Option<TokenBucket>,
}

impl Conn {
    pub fn new(io: Box<dyn Io>, limits: natter_xml::Limits, write_timeout: Duration) -> Self {
        Conn {
            io,
            parser: StreamParser::new(limits),
            limits,
            buf: vec![0; 16 * 1024],
            events: VecDeque::new(),
            write_timeout,
            tls: false,
            peer_certs: Vec::new(),
            bucket: None,
        }
    }

    /// The next event; Ok(None) at the end of the connection.
    pub async fn next(&mut self) -> Result<Option<StreamEvent>, StreamError> {
        loop {
            if let Some(e) = self.events.pop_front() {
                return Ok(Some(e));
            }
            let n = match self.io.read(&mut self.buf).await {
                Ok(0) | Err(_) => return Ok(None),
                Ok(n) => n,
            };
            self.events.extend(self.parser.feed(&self.buf[..n])?);
            if let Some(pause) = self.bucket.as_mut().and_then(|b| b.take(n)) {
                // Reading stops while the debt is paid: the peer's writes
                // back up in TCP, as c2s clients' do.
                tokio::time::sleep(pause).await;
            }
        }
    }

    /// A new stream on the same transport (after SASL): a fresh parser for
    /// the new header. Anything the peer sent before it is dropped.
    pub fn restart(&mut self) {
        self.parser = StreamParser::new(self.limits);
        self.events.clear();
    }

    /// The next event if it is already parsed and is a stanza `pred`
    /// accepts (never waits for the network).
    pub fn buffered_stanza(&mut self, pred: impl Fn(&Element) -> bool) -> Option<Element> {
        match self.events.front() {
            Some(StreamEvent::Stanza(e)) if pred(e) => match self.events.pop_front() {
                Some(StreamEvent::Stanza(e)) => Some(e),
                _ => None,
            },
            _ => None,
        }
    }

    /// The next stanza-level element; a close, the end or a new header
    /// where one was expected is an error.
    pub async fn element(&mut self) -> Result<Element, StreamError> {
        match self.next().await? {
            Some(StreamEvent::Stanza(e)) => {
                if e.is("error", NS_STREAM) {
                    return Err(StreamError::with_text(
                        StreamCondition::UndefinedCondition,
                        "the peer sent a stream error",
                    ));
                }
                Ok(e)
            }
            _ => Err(StreamError::with_text(
                StreamCondition::BadFormat,
                "the stream ended early",
            )),
        }
    }

    /// The peer's stream header attributes.
    pub async fn header(&mut self) -> Result<Vec<(String, String)>, StreamError> {
        match self.next().await? {
            Some(StreamEvent::Open { attrs }) => Ok(attrs),
            _ => Err(StreamError::new(StreamCondition::BadFormat)),
        }
    }

    pub async fn send(&mut self, text: &str) -> Result<(), StreamError> {
        let w = async {
            self.io.write_all(text.as_bytes()).await?;
            self.io.flush().await
        };
        match tokio::time::timeout(self.write_timeout, w).await {
            Ok(Ok(())) => Ok(()),
            _ => Err(StreamError::new(StreamCondition::ConnectionTimeout)),
        }
    }

    /// Our stream header (`id` only on the receiving side).
    pub async fn open(
        &mut self,
        from: &str,
        to: &str,
        id: Option<&str>,
    ) -> Result<(), StreamError> {
        let mut h = format!(
            "<?xml version='1.0'?><stream:stream xmlns='{NS_SERVER}' \
             xmlns:stream='{NS_STREAM}' xmlns:db='{NS_DIALBACK}' version='1.0'"
        );
        for (k, v) in [("from", Some(from)), ("to", Some(to)), ("id", id)] {
            if let Some(v) = v.filter(|v| !v.is_empty()) {
                h.push_str(&format!(" {k}='"));
                natter_xml::escape_attr(v, &mut h);
                h.push('\'');
            }
        }
        h.push('>');
        self.send(&h).await
    }

    pub async fn write(&mut self, e: &Element) -> Result<(), StreamError> {
        let mut out = String::new();
        e.write_to(&mut out, NS_SERVER, true);
        self.send(&out).await
    }

    /// End the stream, with a stream error if there is one.
    pub async fn close(mut self, err: Option<StreamError>) {
        let mut out = String::new();
        if let Some(e) = err {
            e.to_element().write_to(&mut out, NS_SERVER, true);
        }
        out.push_str("</stream:stream>");
        let _ = self.send(&out).await;
        let _ = self.io.shutdown().await;
    }

    /// TLS after `<proceed/>` (either side), or at once for direct TLS;
    /// the stream restarts.
    pub async fn upgrade(self, tls: Tls<'_>) -> Result<Conn, StreamError> {
        let failed = |_| StreamError::with_text(StreamCondition::UndefinedCondition, "TLS failed");
        let owned = |c: Option<&[CertificateDer<'_>]>| -> Vec<CertificateDer<'static>> {
            c.unwrap_or_default()
                .iter()
                .map(|c| c.clone().into_owned())
                .collect()
        };
        let (io, peer_certs): (Box<dyn Io>, _) = match tls {
            Tls::Server(cfg) => {
                let s = tokio_rustls::TlsAcceptor::from(cfg.clone())
                    .accept(self.io)
                    .await
                    .map_err(failed)?;
                let certs = owned(s.get_ref().1.peer_certificates());
                (Box::new(s), certs)
            }
            Tls::Client(cfg, name) => {
                let name = rustls::pki_types::ServerName::try_from(name.to_string())
                    .map_err(|_| StreamError::new(StreamCondition::HostUnknown))?;
                let s = tokio_rustls::TlsConnector::from(cfg)
                    .connect(name, self.io)
                    .await
                    .map_err(failed)?;
                let certs = owned(s.get_ref().1.peer_certificates());
                (Box::new(s), certs)
            }
        };
        let mut c = Conn::new(io, self.limits, self.write_timeout);
        c.tls = true;
        c.peer_certs = peer_certs;
        c.bucket = self.bucket;
        Ok(c)
    }
}

pub enum Tls<'a> {
    Server(&'a Arc<rustls::ServerConfig>),
    Client(Arc<rustls::ClientConfig>, &'a str),
}

/// An attribute of a stream header.
pub fn attr<'a>(attrs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    attrs
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}
