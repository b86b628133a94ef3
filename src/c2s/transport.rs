//! The two ways a client's stream reaches a session: a TCP socket (plain
//! with STARTTLS, or direct TLS) carrying one XML stream, and a WebSocket
//! carrying one element per frame (RFC 7395). The session code above is
//! the same for both.
//!
//! Invariant: only this file (and src/net) touches sockets.

use crate::error::StreamError;
use crate::router::Outbound;
use natter_sasl::ChannelBinding;
use natter_xml::{parse_frame, Limits, StreamEvent, StreamParser, NS_FRAMING};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

#[derive(Debug)]
pub enum ReadError {
    /// The peer closed the connection (or the socket failed).
    Closed,
    /// The bytes were not an acceptable XML stream.
    Xml(natter_xml::XmlError),
}

pub trait Transport: Send {
    /// Next events from the client. Cancel-safe: no data is lost if the
    /// future is dropped before it completes.
    fn read(&mut self) -> impl Future<Output = Result<Vec<StreamEvent>, ReadError>> + Send;
    /// Send our stream header (TCP `<stream:stream>`, WebSocket `<open/>`).
    fn open(&mut self, id: &str, from: &str) -> impl Future<Output = io::Result<()>> + Send;
    /// Write stanzas (serialized once, shared; nonzas too). On failure,
    /// or when the future is dropped part-way (a write timeout),
    /// `delivered` tells how many of them wholly reached the socket.
    fn send(&mut self, stanzas: &[Outbound]) -> impl Future<Output = io::Result<()>> + Send;
    /// How many stanzas of the last `send` wholly reached the socket: the
    /// rest (one cut mid-write included) were not delivered.
    fn delivered(&self) -> usize;
    /// Close the stream, with an error if given (sending a header first if
    /// none was sent yet, RFC 6120 §4.9.1.1).
    fn close(
        &mut self,
        err: Option<&StreamError>,
        from: &str,
    ) -> impl Future<Output = io::Result<()>> + Send;
    /// Upgrade a plain TCP stream to TLS (after `<proceed/>`), or make the
    /// handshake of a direct TLS connection (`tls_pending`).
    fn starttls(
        &mut self,
        tls: Arc<rustls::ServerConfig>,
    ) -> impl Future<Output = io::Result<()>> + Send;
    fn can_starttls(&self) -> bool;
    /// A direct TLS connection whose handshake is still to be made.
    fn tls_pending(&self) -> bool {
        false
    }
    fn is_tls(&self) -> bool;
    fn channel_binding(&self) -> Option<ChannelBinding>;
    /// A new stream starts (after STARTTLS or SASL success). Bytes the
    /// client pipelined after the element that ended the old stream are
    /// kept for the new one (after STARTTLS they are discarded instead).
    fn reset(&mut self);
    /// SASL succeeded: no stream restart follows, so the transport may stop
    /// splitting its reads at element boundaries.
    fn authenticated(&mut self) {}
    fn set_limits(&mut self, limits: Limits);
    /// The session is idle: give back buffers the next read can rebuild.
    fn release(&mut self) {}
    fn peer(&self) -> SocketAddr;
    /// "tcp", "tls" or "ws", for logs and metrics.
    fn kind(&self) -> &'static str;
}

enum Io {
    Plain(TcpStream),
    /// Direct TLS before its handshake.
    Handshake(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    /// Only during the STARTTLS handshake.
    Upgrading,
}

pub struct TcpTransport {
    io: Io,
    parser: StreamParser,
    peer: SocketAddr,
    header_sent: bool,
    /// Before authentication a stream can be restarted by the element just
    /// read (`<success/>` follows `<auth/>`), so reads stop at each element
    /// end and keep the rest here for the next read: a client may pipeline
    /// its new stream header (and `<resume/>`) behind its SASL response.
    split: bool,
    leftover: Vec<u8>,
    /// See `Transport::delivered` (u32: packed beside the flags).
    delivered: u32,
}

const READ_CHUNK: usize = 16 * 1024;

/// Plaintext bytes of one TLS record (RFC 8446 §5.1).
const TLS_RECORD: usize = 16 * 1024;

thread_local! {
    /// One read buffer per worker thread instead of one per connection:
    /// bytes are parsed before the poll returns, so nothing outlives it.
    static SCRATCH: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0; READ_CHUNK].into_boxed_slice());
}

impl TcpTransport {
    pub fn plain(stream: TcpStream, peer: SocketAddr, limits: Limits) -> Self {
        TcpTransport {
            io: Io::Plain(stream),
            // `release` frees its scratch buffer once the session is idle.
            parser: StreamParser::new(limits).keeping_scratch(),
            peer,
            header_sent: false,
            split: true,
            leftover: Vec::new(),
            delivered: 0,
        }
    }

    /// Direct TLS (XEP-0368); the session makes the handshake.
    pub fn direct_tls(stream: TcpStream, peer: SocketAddr, limits: Limits) -> Self {
        TcpTransport {
            io: Io::Handshake(stream),
            ..Self::plain_placeholder(peer, limits)
        }
    }

    fn plain_placeholder(peer: SocketAddr, limits: Limits) -> Self {
        TcpTransport {
            io: Io::Upgrading,
            // `release` frees its scratch buffer once the session is idle.
            parser: StreamParser::new(limits).keeping_scratch(),
            peer,
            header_sent: false,
            split: true,
            leftover: Vec::new(),
            delivered: 0,
        }
    }

    /// Feed `data` up to the first '>' that completes an event; the bytes
    /// after it go to `leftover`.
    fn feed_split(&mut self, data: &[u8]) -> Result<Vec<StreamEvent>, ReadError> {
        let mut start = 0;
        while start < data.len() {
            let end = data[start..]
                .iter()
                .position(|&b| b == b'>')
                .map_or(data.len(), |i| start + i + 1);
            let events = self
                .parser
                .feed(&data[start..end])
                .map_err(ReadError::Xml)?;
            start = end;
            if !events.is_empty() {
                self.leftover.extend_from_slice(&data[start..]);
                return Ok(events);
            }
        }
        Ok(Vec::new())
    }

    async fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        match &mut self.io {
            Io::Plain(s) => s.write_all(data).await,
            Io::Tls(s) => {
                s.write_all(data).await?;
                s.flush().await
            }
            Io::Handshake(_) | Io::Upgrading => Err(io::ErrorKind::NotConnected.into()),
        }
    }
}

fn stream_header(id: &str, from: &str) -> String {
    format!(
        "<?xml version='1.0'?><stream:stream xmlns='jabber:client' \
         xmlns:stream='http://etherx.jabber.org/streams' id='{id}' from='{from}' \
         version='1.0' xml:lang='en'>"
    )
}

impl Transport for TcpTransport {
    async fn read(&mut self) -> Result<Vec<StreamEvent>, ReadError> {
        // Pipelined bytes from an earlier read come first (no await before
        // this, so the future stays cancel-safe).
        if !self.leftover.is_empty() {
            let data = std::mem::take(&mut self.leftover);
            return if self.split {
                self.feed_split(&data)
            } else {
                self.parser.feed(&data).map_err(ReadError::Xml)
            };
        }
        // Poll the socket straight into the thread's scratch buffer and
        // parse before returning: no await holds the buffer, so an idle
        // connection owns no read buffer and the future stays cancel-safe.
        std::future::poll_fn(|cx| {
            SCRATCH.with_borrow_mut(|buf| {
                let mut rb = tokio::io::ReadBuf::new(buf);
                let polled = match &mut self.io {
                    Io::Plain(s) => std::pin::Pin::new(s).poll_read(cx, &mut rb),
                    Io::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_read(cx, &mut rb),
                    Io::Handshake(_) | Io::Upgrading => {
                        return std::task::Poll::Ready(Err(ReadError::Closed))
                    }
                };
                std::task::Poll::Ready(match polled {
                    std::task::Poll::Pending => return std::task::Poll::Pending,
                    std::task::Poll::Ready(Err(_)) => Err(ReadError::Closed),
                    std::task::Poll::Ready(Ok(())) if rb.filled().is_empty() => {
                        Err(ReadError::Closed)
                    }
                    std::task::Poll::Ready(Ok(())) if self.split => self.feed_split(rb.filled()),
                    std::task::Poll::Ready(Ok(())) => {
                        self.parser.feed(rb.filled()).map_err(ReadError::Xml)
                    }
                })
            })
        })
        .await
    }

    async fn open(&mut self, id: &str, from: &str) -> io::Result<()> {
        self.header_sent = true;
        self.write_all(stream_header(id, from).as_bytes()).await
    }

    async fn send(&mut self, stanzas: &[Outbound]) -> io::Result<()> {
        self.delivered = 0;
        match &mut self.io {
            // Bytes the kernel took are delivered (they reach the client
            // unless the connection breaks); one write for the batch.
            Io::Plain(s) => {
                let mut out = String::with_capacity(stanzas.iter().map(|s| s.xml().len()).sum());
                let mut ends = Vec::with_capacity(stanzas.len());
                for st in stanzas {
                    out.push_str(st.xml());
                    ends.push(out.len());
                }
                let data = out.as_bytes();
                let mut pos = 0;
                while pos < data.len() {
                    let n = s.write(&data[pos..]).await?;
                    if n == 0 {
                        return Err(io::ErrorKind::WriteZero.into());
                    }
                    pos += n;
                    self.delivered = ends.partition_point(|&e| e <= pos) as u32;
                }
            }
            // A client reads a TLS record whole or not at all: stanzas go
            // out in groups of at most one record, each flushed to the
            // kernel before the next, so `delivered` is exact.
            Io::Tls(s) => {
                let mut group = String::new();
                let mut i = 0;
                while i < stanzas.len() {
                    group.clear();
                    let start = i;
                    while i < stanzas.len()
                        && (i == start || group.len() + stanzas[i].xml().len() <= TLS_RECORD)
                    {
                        group.push_str(stanzas[i].xml());
                        i += 1;
                    }
                    s.write_all(group.as_bytes()).await?;
                    s.flush().await?;
                    self.delivered = i as u32;
                }
            }
            Io::Handshake(_) | Io::Upgrading => return Err(io::ErrorKind::NotConnected.into()),
        }
        self.delivered = stanzas.len() as u32;
        Ok(())
    }

    fn delivered(&self) -> usize {
        self.delivered as usize
    }

    async fn close(&mut self, err: Option<&StreamError>, from: &str) -> io::Result<()> {
        let mut out = String::new();
        if !self.header_sent {
            out.push_str(&stream_header(&crate::modules::new_id(), from));
        }
        if let Some(e) = err {
            e.to_element()
                .write_to(&mut out, natter_xml::NS_CLIENT, true);
        }
        out.push_str("</stream:stream>");
        let r = self.write_all(out.as_bytes()).await;
        match &mut self.io {
            Io::Plain(s) => {
                let _ = s.shutdown().await;
            }
            Io::Tls(s) => {
                let _ = s.shutdown().await;
            }
            Io::Handshake(_) | Io::Upgrading => {}
        }
        r
    }

    async fn starttls(&mut self, tls: Arc<rustls::ServerConfig>) -> io::Result<()> {
        let tcp = match std::mem::replace(&mut self.io, Io::Upgrading) {
            Io::Plain(tcp) | Io::Handshake(tcp) => tcp,
            other => {
                self.io = other;
                return Err(io::Error::other(
                    "STARTTLS on a stream that is not plain TCP",
                ));
            }
        };
        // Bytes the client pipelined after <starttls/> were parsed by the
        // pre-TLS parser and are discarded with it (CVE-2011-1431 class).
        self.parser.reset();
        self.leftover = Vec::new();
        self.header_sent = false;
        let stream = tokio_rustls::TlsAcceptor::from(tls).accept(tcp).await?;
        self.io = Io::Tls(Box::new(stream));
        Ok(())
    }

    fn can_starttls(&self) -> bool {
        matches!(self.io, Io::Plain(_))
    }

    fn tls_pending(&self) -> bool {
        matches!(self.io, Io::Handshake(_))
    }

    fn is_tls(&self) -> bool {
        matches!(self.io, Io::Tls(_))
    }

    fn channel_binding(&self) -> Option<ChannelBinding> {
        let Io::Tls(s) = &self.io else { return None };
        let conn = s.get_ref().1;
        // RFC 9266: tls-exporter is defined for TLS 1.3 only.
        if conn.protocol_version() != Some(rustls::ProtocolVersion::TLSv1_3) {
            return None;
        }
        let mut data = vec![0u8; 32];
        conn.export_keying_material(&mut data, b"EXPORTER-Channel-Binding", Some(&[]))
            .ok()?;
        Some(ChannelBinding {
            kind: "tls-exporter",
            data,
        })
    }

    fn reset(&mut self) {
        self.parser.reset();
        self.header_sent = false;
    }

    fn authenticated(&mut self) {
        self.split = false;
    }

    fn set_limits(&mut self, limits: Limits) {
        self.parser.set_limits(limits);
    }

    fn release(&mut self) {
        self.parser.release();
        if self.leftover.is_empty() {
            self.leftover = Vec::new();
        }
    }

    fn peer(&self) -> SocketAddr {
        self.peer
    }

    fn kind(&self) -> &'static str {
        match self.io {
            Io::Tls(_) | Io::Handshake(_) => "tls",
            _ => "tcp",
        }
    }
}

/// RFC 7395 over axum's WebSocket.
pub struct WsTransport {
    ws: axum::extract::ws::WebSocket,
    limits: Limits,
    peer: SocketAddr,
    delivered: usize,
}

impl WsTransport {
    pub fn new(ws: axum::extract::ws::WebSocket, peer: SocketAddr, limits: Limits) -> Self {
        WsTransport {
            ws,
            limits,
            peer,
            delivered: 0,
        }
    }

    async fn send_text(&mut self, text: String) -> io::Result<()> {
        use axum::extract::ws::Message;
        self.ws
            .send(Message::Text(text.into()))
            .await
            .map_err(io::Error::other)
    }
}

/// One RFC 7395 text frame as a stream event: `<open/>` and `<close/>` in
/// the framing namespace open and close the stream, any other element is a
/// stanza. Public for the `ws_frame` fuzz target (fuzz/).
pub fn frame_event(text: &[u8], limits: &Limits) -> Result<StreamEvent, natter_xml::XmlError> {
    let el = parse_frame(text, limits)?;
    Ok(if el.ns == NS_FRAMING && el.name == "open" {
        StreamEvent::Open { attrs: el.attrs }
    } else if el.ns == NS_FRAMING && el.name == "close" {
        StreamEvent::Close
    } else {
        StreamEvent::Stanza(el)
    })
}

fn framing_open(id: &str, from: &str) -> String {
    format!("<open xmlns='{NS_FRAMING}' id='{id}' from='{from}' version='1.0' xml:lang='en'/>")
}

impl Transport for WsTransport {
    async fn read(&mut self) -> Result<Vec<StreamEvent>, ReadError> {
        use axum::extract::ws::Message;
        loop {
            let msg = match self.ws.recv().await {
                Some(Ok(m)) => m,
                _ => return Err(ReadError::Closed),
            };
            let text = match msg {
                Message::Text(t) => t,
                Message::Binary(_) => {
                    return Err(ReadError::Xml(natter_xml::XmlError::BadFormat(
                        "binary WebSocket frames are not XMPP (RFC 7395 §3.2)".into(),
                    )))
                }
                Message::Close(_) => return Err(ReadError::Closed),
                // Pings are answered by the WebSocket layer.
                _ => continue,
            };
            return Ok(vec![
                frame_event(text.as_bytes(), &self.limits).map_err(ReadError::Xml)?
            ]);
        }
    }

    async fn open(&mut self, id: &str, from: &str) -> io::Result<()> {
        self.send_text(framing_open(id, from)).await
    }

    async fn send(&mut self, stanzas: &[Outbound]) -> io::Result<()> {
        self.delivered = 0;
        for s in stanzas {
            // Each frame stands alone: namespaces are declared in it.
            self.send_text(s.ws_frame()).await?;
            self.delivered += 1;
        }
        Ok(())
    }

    fn delivered(&self) -> usize {
        self.delivered
    }

    async fn close(&mut self, err: Option<&StreamError>, _from: &str) -> io::Result<()> {
        if let Some(e) = err {
            let mut out = String::new();
            e.to_element().write_to(&mut out, "", false);
            self.send_text(out).await?;
        }
        self.send_text(format!("<close xmlns='{NS_FRAMING}'/>"))
            .await?;
        let _ = self.ws.send(axum::extract::ws::Message::Close(None)).await;
        Ok(())
    }

    async fn starttls(&mut self, _tls: Arc<rustls::ServerConfig>) -> io::Result<()> {
        Err(io::Error::other("STARTTLS is not available over WebSocket"))
    }

    fn can_starttls(&self) -> bool {
        false
    }

    fn is_tls(&self) -> bool {
        false
    }

    fn channel_binding(&self) -> Option<ChannelBinding> {
        None
    }

    fn reset(&mut self) {}

    fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    fn peer(&self) -> SocketAddr {
        self.peer
    }

    fn kind(&self) -> &'static str {
        "ws"
    }
}
