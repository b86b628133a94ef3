//! The client side of an XMPP c2s stream (RFC 6120): stream headers,
//! STARTTLS or direct TLS, SCRAM, resource binding, in-band registration
//! (XEP-0077), and answers to server pings (XEP-0199).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use natter_sasl::Hash;
use natter_xml::{escape_attr, escape_text, Element, Limits, StreamEvent, StreamParser};
use natter_xml::{NS_CLIENT, NS_STREAM};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use crate::net::{tls_handshake, Io, Sources};

pub const NS_TLS: &str = "urn:ietf:params:xml:ns:xmpp-tls";
pub const NS_SASL: &str = "urn:ietf:params:xml:ns:xmpp-sasl";
pub const NS_BIND: &str = "urn:ietf:params:xml:ns:xmpp-bind";
pub const NS_SESSION: &str = "urn:ietf:params:xml:ns:xmpp-session";
pub const NS_PING: &str = "urn:xmpp:ping";

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TlsMode {
    /// Plain TCP, then STARTTLS (port 5222).
    Starttls,
    /// TLS from the first byte (XEP-0368, port 5223).
    Direct,
    /// No TLS at all: the server must allow SASL on plaintext loopback.
    None,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mech {
    /// SCRAM-SHA-256 when offered, else SCRAM-SHA-1.
    Auto,
    ScramSha256,
    ScramSha1,
}

/// Where and how to connect; shared by every session of a run.
#[derive(Clone)]
pub struct Target {
    pub addr: SocketAddr,
    /// Other nodes of a cluster: connections take `addr` and these in turn.
    pub others: Vec<SocketAddr>,
    pub next: Arc<std::sync::atomic::AtomicUsize>,
    pub domain: String,
    pub tls: TlsMode,
    pub tls_cfg: Arc<rustls::ClientConfig>,
    pub sources: Sources,
    pub mech: Mech,
    /// Bound on every single wait for the server during negotiation.
    pub step_timeout: Duration,
}

impl Target {
    /// The node the next connection goes to (round-robin).
    pub fn pick(&self) -> SocketAddr {
        if self.others.is_empty() {
            return self.addr;
        }
        let i =
            self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % (1 + self.others.len());
        if i == 0 {
            self.addr
        } else {
            self.others[i - 1]
        }
    }

    /// Make the next connection go to the node `shift` places after the
    /// one the first connection went to (chat: receivers on one node,
    /// their senders on the next).
    pub fn align(&self, shift: usize) {
        let n = 1 + self.others.len();
        let cur = self.next.load(std::sync::atomic::Ordering::Relaxed);
        let at = cur + (n + shift % n - cur % n) % n;
        self.next.store(at, std::sync::atomic::Ordering::Relaxed);
    }
}

/// One client stream.
pub struct Conn {
    io: Io,
    parser: StreamParser,
    pending: VecDeque<Element>,
    closed: bool,
    buf: Box<[u8]>,
    step_timeout: Duration,
    /// The full JID the server bound.
    pub jid: String,
    /// Server pings answered on this stream.
    pub pings: u64,
}

const READ_BUF: usize = 8 * 1024;

fn parser() -> StreamParser {
    // Large enough for any stanza a benchmark sends or receives.
    StreamParser::new(Limits {
        max_stanza_bytes: 1024 * 1024,
        ..Limits::default()
    })
}

impl Conn {
    fn new(io: Io, step_timeout: Duration) -> Self {
        Conn {
            io,
            parser: parser(),
            pending: VecDeque::new(),
            closed: false,
            buf: vec![0u8; READ_BUF].into_boxed_slice(),
            step_timeout,
            jid: String::new(),
            pings: 0,
        }
    }

    /// TCP (and for direct TLS, the TLS handshake).
    pub async fn connect(t: &Target) -> anyhow::Result<Conn> {
        let addr = t.pick();
        let tcp = tokio::time::timeout(t.step_timeout, t.sources.connect(addr))
            .await
            .map_err(|_| anyhow!("TCP connect timed out"))?
            .with_context(|| format!("connect to {addr}"))?;
        let io = match t.tls {
            TlsMode::Direct => {
                let tls =
                    tokio::time::timeout(t.step_timeout, tls_handshake(&t.tls_cfg, &t.domain, tcp))
                        .await
                        .map_err(|_| anyhow!("TLS handshake timed out"))??;
                Io::Tls(Box::new(tls))
            }
            _ => Io::Plain(tcp),
        };
        Ok(Conn::new(io, t.step_timeout))
    }

    /// Bound on every single wait for the server during negotiation.
    pub fn step_timeout(&self) -> Duration {
        self.step_timeout
    }

    pub fn is_tls(&self) -> bool {
        matches!(self.io, Io::Tls(_))
    }

    pub async fn send(&mut self, data: &str) -> anyhow::Result<()> {
        self.io.write_all(data.as_bytes()).await?;
        self.io.flush().await?;
        Ok(())
    }

    /// Read once from the socket and parse; complete stanzas are queued.
    /// Cancel-safe: nothing is lost when the future is dropped before it
    /// completes.
    pub async fn read_some(&mut self) -> anyhow::Result<()> {
        if self.closed {
            bail!("the server closed the stream");
        }
        let n = self.io.read(&mut self.buf).await?;
        if n == 0 {
            self.closed = true;
            bail!("the server closed the connection");
        }
        for ev in self.parser.feed(&self.buf[..n])? {
            match ev {
                StreamEvent::Open { .. } => {}
                StreamEvent::Stanza(el) => {
                    if el.is("error", NS_STREAM) {
                        let cond = el
                            .children()
                            .find(|c| c.name != "text")
                            .map(|c| c.name.clone())
                            .unwrap_or_default();
                        let text = el.child_text("text", "urn:ietf:params:xml:ns:xmpp-streams");
                        self.closed = true;
                        bail!("stream error {cond}: {}", text.unwrap_or_default());
                    }
                    self.pending.push_back(el);
                }
                StreamEvent::Close => self.closed = true,
            }
        }
        Ok(())
    }

    /// Next queued stanza, without reading.
    pub fn pop(&mut self) -> Option<Element> {
        self.pending.pop_front()
    }

    /// Next stanza (reads as needed); no timeout.
    pub async fn next(&mut self) -> anyhow::Result<Element> {
        loop {
            if let Some(el) = self.pending.pop_front() {
                return Ok(el);
            }
            self.read_some().await?;
        }
    }

    /// Next stanza within the step timeout.
    pub async fn next_step(&mut self, what: &str) -> anyhow::Result<Element> {
        match tokio::time::timeout(self.step_timeout, self.next()).await {
            Ok(r) => r.with_context(|| format!("waiting for {what}")),
            Err(_) => bail!("timed out waiting for {what}"),
        }
    }

    /// Answer what a client must answer: server pings with a result, other
    /// get/set IQs with an error. Returns true when `el` was such an IQ.
    pub async fn answer_iq(&mut self, el: &Element) -> anyhow::Result<bool> {
        if !el.is("iq", NS_CLIENT) || !matches!(el.attr("type"), Some("get" | "set")) {
            return Ok(false);
        }
        let mut out = String::from("<iq id='");
        escape_attr(el.attr("id").unwrap_or_default(), &mut out);
        out.push('\'');
        if let Some(from) = el.attr("from") {
            out.push_str(" to='");
            escape_attr(from, &mut out);
            out.push('\'');
        }
        if el.get_child("ping", NS_PING).is_some() {
            self.pings += 1;
            out.push_str(" type='result'/>");
        } else {
            out.push_str(
                " type='error'><error type='cancel'><feature-not-implemented \
                 xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>",
            );
        }
        self.send(&out).await?;
        Ok(true)
    }

    /// Wait for the IQ answering `id` (result or error), answering pings meanwhile.
    pub async fn wait_iq(&mut self, id: &str, what: &str) -> anyhow::Result<Element> {
        self.wait_iq_with(id, what, self.step_timeout, |_| {}).await
    }

    /// Like [`Conn::wait_iq`], within `timeout`; every other stanza that
    /// arrives meanwhile (and is not an IQ we must answer) goes to `other`.
    pub async fn wait_iq_with(
        &mut self,
        id: &str,
        what: &str,
        timeout: Duration,
        mut other: impl FnMut(&Element),
    ) -> anyhow::Result<Element> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let el = match tokio::time::timeout_at(deadline, self.next()).await {
                Ok(r) => r.with_context(|| format!("waiting for {what}"))?,
                Err(_) => bail!("timed out waiting for {what}"),
            };
            if el.is("iq", NS_CLIENT)
                && el.attr("id") == Some(id)
                && matches!(el.attr("type"), Some("result" | "error"))
            {
                return Ok(el);
            }
            if !self.answer_iq(&el).await? {
                other(&el);
            }
        }
    }

    /// Ping the server (XEP-0199) and wait up to `timeout` for the answer,
    /// passing every other stanza to `other`. The server handles a
    /// session's stanzas in order, so the answer means it has taken all
    /// that were sent before.
    pub async fn ping_server(
        &mut self,
        domain: &str,
        timeout: Duration,
        other: impl FnMut(&Element),
    ) -> anyhow::Result<()> {
        let mut iq = String::from("<iq type='get' id='ping1' to='");
        escape_attr(domain, &mut iq);
        iq.push_str("'><ping xmlns='urn:xmpp:ping'/></iq>");
        self.send(&iq).await?;
        self.wait_iq_with("ping1", "ping answer", timeout, other)
            .await?;
        Ok(())
    }

    /// Read until `stop` changes or the stream fails (returns the failure),
    /// answering IQs; `f(message, arrival)` for every `<message/>`, the
    /// arrival in ns since the epoch (one clock reading per read).
    pub async fn receive(
        &mut self,
        stop: &mut watch::Receiver<bool>,
        mut f: impl FnMut(&Element, u64),
    ) -> Option<String> {
        loop {
            tokio::select! {
                _ = stop.changed() => return None,
                r = self.read_some() => {
                    if let Err(e) = r {
                        return Some(format!("{e:#}"));
                    }
                }
            }
            let now = crate::now_ns();
            while let Some(el) = self.pop() {
                if el.is("message", NS_CLIENT) {
                    f(&el, now);
                } else if let Err(e) = self.answer_iq(&el).await {
                    return Some(format!("{e:#}"));
                }
            }
        }
    }

    /// Queued or immediately readable stanzas, without waiting for more.
    pub async fn poll_ready(&mut self) -> anyhow::Result<()> {
        // `read_some` is cancel-safe, and `timeout` polls it once before
        // looking at its (already passed) deadline.
        while let Ok(r) = tokio::time::timeout(Duration::ZERO, self.read_some()).await {
            r?;
        }
        Ok(())
    }

    /// Send our stream header and return the server's `<stream:features/>`.
    async fn open_stream(&mut self, domain: &str) -> anyhow::Result<Element> {
        let mut hdr = String::from(
            "<?xml version='1.0'?><stream:stream xmlns='jabber:client' \
             xmlns:stream='http://etherx.jabber.org/streams' version='1.0' to='",
        );
        escape_attr(domain, &mut hdr);
        hdr.push_str("'>");
        self.send(&hdr).await?;
        loop {
            let el = self.next_step("stream features").await?;
            if el.is("features", NS_STREAM) {
                return Ok(el);
            }
        }
    }

    async fn starttls(mut self, t: &Target) -> anyhow::Result<Conn> {
        self.send("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
            .await?;
        let el = self.next_step("STARTTLS proceed").await?;
        if !el.is("proceed", NS_TLS) {
            bail!("STARTTLS refused: <{}/>", el.name);
        }
        let Io::Plain(tcp) = self.io else {
            bail!("STARTTLS on a TLS stream");
        };
        let tls = tokio::time::timeout(t.step_timeout, tls_handshake(&t.tls_cfg, &t.domain, tcp))
            .await
            .map_err(|_| anyhow!("TLS handshake timed out"))??;
        Ok(Conn::new(Io::Tls(Box::new(tls)), t.step_timeout))
    }

    /// Connect and get to the point where SASL (or registration) may start:
    /// returns the stream and its features. `need_tls` forces STARTTLS
    /// even in `--tls none` mode (registration needs TLS on most servers).
    pub async fn negotiated(t: &Target, need_tls: bool) -> anyhow::Result<(Conn, Element)> {
        let mut c = Conn::connect(t).await?;
        let features = c.open_stream(&t.domain).await?;
        let want_tls = !c.is_tls() && (t.tls == TlsMode::Starttls || need_tls);
        if !want_tls {
            return Ok((c, features));
        }
        if features.get_child("starttls", NS_TLS).is_none() {
            if t.tls == TlsMode::Starttls {
                bail!("the server does not offer STARTTLS");
            }
            return Ok((c, features));
        }
        let mut c = c.starttls(t).await?;
        let features = c.open_stream(&t.domain).await?;
        Ok((c, features))
    }

    async fn sasl(
        &mut self,
        t: &Target,
        features: &Element,
        user: &str,
        password: &str,
    ) -> anyhow::Result<()> {
        let offered: Vec<String> = features
            .get_child("mechanisms", NS_SASL)
            .map(|m| m.children().map(|c| c.text()).collect())
            .unwrap_or_default();
        let has = |m: &str| offered.iter().any(|o| o == m);
        let (name, hash) = match t.mech {
            Mech::Auto if has("SCRAM-SHA-256") => ("SCRAM-SHA-256", Hash::Sha256),
            Mech::Auto | Mech::ScramSha1 if has("SCRAM-SHA-1") => ("SCRAM-SHA-1", Hash::Sha1),
            Mech::ScramSha256 if has("SCRAM-SHA-256") => ("SCRAM-SHA-256", Hash::Sha256),
            _ => bail!(
                "no usable SASL mechanism offered (offered: {offered:?}; \
                 without TLS the server must allow SASL on plaintext loopback)"
            ),
        };
        let mut scram = crate::scram::Client::new(hash, user, password);
        self.send(&format!(
            "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='{name}'>{}</auth>",
            B64.encode(scram.client_first())
        ))
        .await?;
        let challenge = self.next_step("SASL challenge").await?;
        check_sasl(&challenge, "challenge")?;
        let server_first = B64.decode(challenge.text().trim())?;
        let client_final = scram.client_final(&server_first)?;
        self.send(&format!(
            "<response xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>{}</response>",
            B64.encode(client_final)
        ))
        .await?;
        let mut el = self.next_step("SASL success").await?;
        if el.is("challenge", NS_SASL) {
            // RFC 6120 allows the server-final-message in a last challenge.
            let v = B64.decode(el.text().trim())?;
            scram.verify_server_final(&v)?;
            self.send("<response xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>")
                .await?;
            el = self.next_step("SASL success").await?;
            check_sasl(&el, "success")?;
        } else {
            check_sasl(&el, "success")?;
            let v = B64.decode(el.text().trim())?;
            scram.verify_server_final(&v)?;
        }
        self.parser = parser();
        Ok(())
    }

    async fn bind(&mut self, features: &Element, resource: &str) -> anyhow::Result<()> {
        if features.get_child("bind", NS_BIND).is_none() {
            bail!("the server offers no resource binding");
        }
        let mut iq = String::from(
            "<iq type='set' id='bind1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>",
        );
        escape_text(resource, &mut iq);
        iq.push_str("</resource></bind></iq>");
        self.send(&iq).await?;
        let r = self.wait_iq("bind1", "bind result").await?;
        if r.attr("type") != Some("result") {
            bail!("bind failed: {}", stanza_error(&r));
        }
        self.jid = r
            .get_child("bind", NS_BIND)
            .and_then(|b| b.child_text("jid", NS_BIND))
            .ok_or_else(|| anyhow!("bind result without a JID"))?;
        // RFC 3921 sessions, for servers that still require them.
        if let Some(s) = features.get_child("session", NS_SESSION) {
            if s.get_child("optional", NS_SESSION).is_none() {
                self.send(
                    "<iq type='set' id='sess1'>\
                     <session xmlns='urn:ietf:params:xml:ns:xmpp-session'/></iq>",
                )
                .await?;
                let r = self.wait_iq("sess1", "session result").await?;
                if r.attr("type") != Some("result") {
                    bail!("session failed: {}", stanza_error(&r));
                }
            }
        }
        Ok(())
    }

    /// Connect, TLS (per mode), SCRAM, bind.
    pub async fn login(
        t: &Target,
        user: &str,
        password: &str,
        resource: &str,
    ) -> anyhow::Result<Conn> {
        let (mut c, features) = Conn::negotiated(t, false).await?;
        c.sasl(t, &features, user, password).await?;
        let features = c.open_stream(&t.domain).await?;
        c.bind(&features, resource).await?;
        Ok(c)
    }

    /// Roster get (result or error both count as answered) and initial presence.
    pub async fn roster_and_presence(&mut self) -> anyhow::Result<()> {
        self.roster().await?;
        self.presence().await
    }

    /// Roster get; a result or an error both count as answered.
    pub async fn roster(&mut self) -> anyhow::Result<()> {
        self.send("<iq type='get' id='roster1'><query xmlns='jabber:iq:roster'/></iq>")
            .await?;
        self.wait_iq("roster1", "roster result").await?;
        Ok(())
    }

    pub async fn presence(&mut self) -> anyhow::Result<()> {
        self.send("<presence/>").await
    }

    /// Close our stream and wait (briefly) for the server to close its side,
    /// so the server, not us, holds the TIME_WAIT socket.
    pub async fn close(mut self) {
        let _ = self.send("</stream:stream>").await;
        let wait = async {
            while !self.closed {
                if self.read_some().await.is_err() {
                    break;
                }
                self.pending.clear();
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), wait).await;
        let _ = tokio::time::timeout(Duration::from_secs(1), self.io.shutdown()).await;
    }
}

fn check_sasl(el: &Element, want: &str) -> anyhow::Result<()> {
    if el.is(want, NS_SASL) {
        return Ok(());
    }
    if el.is("failure", NS_SASL) {
        let cond = el
            .children()
            .find(|c| c.name != "text")
            .map(|c| c.name.clone())
            .unwrap_or_default();
        bail!(
            "SASL failure: {cond} {}",
            el.child_text("text", NS_SASL).unwrap_or_default()
        );
    }
    bail!("expected SASL {want}, got <{}/>", el.name)
}

/// The condition of a stanza error, e.g. "conflict".
pub fn stanza_error(el: &Element) -> String {
    el.get_child("error", NS_CLIENT)
        .and_then(|e| e.children().find(|c| c.name != "text"))
        .map(|c| c.name.clone())
        .unwrap_or_else(|| "unknown error".into())
}

#[derive(Debug, PartialEq, Eq)]
pub enum Registered {
    Created,
    Exists,
}

/// XEP-0077 in-band registration before authentication, on its own stream.
pub async fn register(t: &Target, user: &str, password: &str) -> anyhow::Result<Registered> {
    let (mut c, _features) = Conn::negotiated(t, true).await?;
    let mut iq =
        String::from("<iq type='set' id='reg1'><query xmlns='jabber:iq:register'><username>");
    escape_text(user, &mut iq);
    iq.push_str("</username><password>");
    escape_text(password, &mut iq);
    iq.push_str("</password></query></iq>");
    c.send(&iq).await?;
    let r = c.wait_iq("reg1", "registration result").await;
    c.close().await;
    let r = r?;
    match r.attr("type") {
        Some("result") => Ok(Registered::Created),
        _ if stanza_error(&r) == "conflict" => Ok(Registered::Exists),
        _ => bail!("registration of {user} failed: {}", stanza_error(&r)),
    }
}
