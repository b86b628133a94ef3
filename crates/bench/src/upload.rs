//! `upload`: XEP-0363 HTTP File Upload throughput and server memory.
//!
//! P sessions (`--parallel`) request slots from the upload service (given
//! with `--service`, else found by disco#items + disco#info on the domain)
//! and PUT `--files` files of `--size` bytes, P at a time, each streamed
//! from a generator: the same server-independent pseudo-random bytes for a
//! file every run, a per-run header first so that no two files (and no two
//! runs) have equal contents (natter stores equal bytes once). Then
//! `--downloads` GETs, `--download-parallel` at a time, round-robin over
//! the uploaded files, each hashed and compared with what was sent.
//!
//! With `--server-pid`, a thread samples the server's VmRSS (and RssAnon)
//! every 100 ms; each phase reports the value just before it (baseline),
//! the peak during it, and the server's CPU seconds.
//!
//! The HTTP side is hyper's HTTP/1.1 client, one keep-alive connection
//! per worker; URLs must name a loopback host (`localhost` and
//! `*.localhost`, RFC 6761, mean 127.0.0.1).

use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use natter_xml::{escape_attr, Element, NS_CLIENT};
use rand::RngCore;
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;

use crate::net::loopback_target;
use crate::xmpp::{stanza_error, Conn};
use crate::{proc_status_kib, register_all, Ctx, Errors};

const NS_UPLOAD: &str = "urn:xmpp:http:upload:0";
const NS_DISCO_ITEMS: &str = "http://jabber.org/protocol/disco#items";
const NS_DISCO_INFO: &str = "http://jabber.org/protocol/disco#info";
/// Bytes per body frame the generator hands to hyper.
const CHUNK: usize = 256 * 1024;
/// Random bytes the frames are cut from (zero-copy slices of one buffer).
const POOL: usize = 4 * 1024 * 1024;

#[derive(clap::Args)]
pub struct UploadArgs {
    /// Upload service JID [default: found by disco on the domain].
    #[arg(long)]
    pub service: Option<String>,
    /// Bytes per file (suffixes K, M, G = KiB, MiB, GiB).
    #[arg(long, value_parser = parse_size, default_value = "1M")]
    pub size: u64,
    /// Files to upload.
    #[arg(long, default_value_t = 1)]
    pub files: u64,
    /// Uploads at once; also the number of XMPP sessions (accounts
    /// offset .. offset+P) that request the slots.
    #[arg(long, default_value_t = 1)]
    pub parallel: u64,
    /// GETs after the uploads, round-robin over the files [default: --files].
    #[arg(long)]
    pub downloads: Option<u64>,
    /// GETs at once [default: --parallel].
    #[arg(long)]
    pub download_parallel: Option<u64>,
    /// Content type of the files.
    #[arg(long, default_value = "application/octet-stream")]
    pub content_type: String,
    /// Bound on each HTTP request, seconds.
    #[arg(long, default_value_t = 900)]
    pub request_timeout: u64,
    /// Also print the results as one JSON line.
    #[arg(long)]
    pub json: bool,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mul) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        None => (s, 1),
        Some((i, _)) => {
            let m = match s[i..].to_ascii_uppercase().trim_end_matches(['B', 'I']) {
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "" => 1,
                u => return Err(format!("unknown size unit {u:?} (K, M, G)")),
            };
            (&s[..i], m)
        }
    };
    let n: u64 = num.parse().map_err(|e| format!("{s}: {e}"))?;
    n.checked_mul(mul)
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{s}: must be between 1 byte and 2^64"))
}

// ---------------------------------------------------------------------------
// Server memory
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Default, Debug)]
struct Mem {
    rss: u64,
    anon: u64,
}

fn mem_of(pid: u32) -> Option<Mem> {
    Some(Mem {
        rss: proc_status_kib(pid, "VmRSS:")?,
        anon: proc_status_kib(pid, "RssAnon:").unwrap_or(0),
    })
}

/// Samples a process's memory every 100 ms on a thread of its own (the
/// runtime may be busy hashing), keeping the peak since the last `mark`.
struct Sampler {
    pid: u32,
    peak: Arc<Mutex<(Mem, u64)>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    fn start(pid: u32) -> Self {
        let peak = Arc::new(Mutex::new((Mem::default(), 0)));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (peak.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Some(m) = mem_of(pid) {
                    let mut g = p.lock().unwrap();
                    g.0.rss = g.0.rss.max(m.rss);
                    g.0.anon = g.0.anon.max(m.anon);
                    g.1 += 1;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Sampler {
            pid,
            peak,
            stop,
            thread: Some(thread),
        }
    }

    /// The memory now, which also starts a new peak.
    fn mark(&self) -> Mem {
        let now = mem_of(self.pid).unwrap_or_default();
        *self.peak.lock().unwrap() = (now, 0);
        now
    }

    /// Peak since `mark` (the current value included) and samples taken.
    fn peak(&self) -> (Mem, u64) {
        let now = mem_of(self.pid).unwrap_or_default();
        let g = self.peak.lock().unwrap();
        (
            Mem {
                rss: g.0.rss.max(now.rss),
                anon: g.0.anon.max(now.anon),
            },
            g.1,
        )
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------
// Generated file contents
// ---------------------------------------------------------------------------

/// A PUT body: a per-file header, then `CHUNK`-sized slices of the random
/// pool at offsets that depend on the file and the chunk number. Hashes
/// what it hands out and sends the SHA-256 when the last byte is out.
struct GenBody {
    pool: Bytes,
    header: Option<Bytes>,
    file: u64,
    chunk: u64,
    remaining: u64,
    hasher: Sha256,
    done: Option<oneshot::Sender<[u8; 32]>>,
}

impl GenBody {
    fn new(pool: Bytes, nonce: u64, file: u64, size: u64) -> (Self, oneshot::Receiver<[u8; 32]>) {
        let (tx, rx) = oneshot::channel();
        let mut header = format!("natter-bench {nonce:016x} file {file}\n").into_bytes();
        header.truncate(size as usize);
        let remaining = size - header.len() as u64;
        let body = GenBody {
            pool,
            header: Some(Bytes::from(header)),
            file,
            chunk: 0,
            remaining,
            hasher: Sha256::new(),
            done: Some(tx),
        };
        (body, rx)
    }

    fn next_chunk(&mut self) -> Option<Bytes> {
        if let Some(h) = self.header.take() {
            if !h.is_empty() {
                return Some(h);
            }
        }
        if self.remaining == 0 {
            return None;
        }
        let n = (self.remaining as usize).min(CHUNK);
        // An odd multiplier walks the pool's 64-byte slots in a file-specific order.
        let slot = (self.file.wrapping_mul(0x9E37_79B9) ^ self.chunk.wrapping_mul(40_503))
            % (POOL as u64 / 64);
        let off = slot as usize * 64;
        self.chunk += 1;
        self.remaining -= n as u64;
        Some(self.pool.slice(off..off + n))
    }
}

impl Body for GenBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match this.next_chunk() {
            Some(b) => {
                this.hasher.update(&b);
                if this.remaining == 0 && this.header.is_none() {
                    this.finish();
                }
                Poll::Ready(Some(Ok(Frame::data(b))))
            }
            None => {
                this.finish();
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0 && self.header.as_ref().is_none_or(|h| h.is_empty())
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining + self.header.as_ref().map_or(0, |h| h.len() as u64))
    }
}

impl GenBody {
    fn finish(&mut self) {
        if let Some(tx) = self.done.take() {
            let h = std::mem::take(&mut self.hasher).finalize();
            let _ = tx.send(h.into());
        }
    }
}

/// PUTs and GETs share one connection type; a GET has no body.
enum ReqBody {
    Gen(Box<GenBody>),
    Empty,
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            ReqBody::Gen(g) => Pin::new(g.as_mut()).poll_frame(cx),
            ReqBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReqBody::Gen(g) => g.is_end_stream(),
            ReqBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Gen(g) => g.size_hint(),
            ReqBody::Empty => SizeHint::with_exact(0),
        }
    }
}

// ---------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------

struct Url {
    addr: SocketAddr,
    /// `host[:port]` as in the URL, for the Host header.
    authority: String,
    path: String,
}

async fn parse_url(u: &str) -> anyhow::Result<Url> {
    let rest = u
        .strip_prefix("http://")
        .ok_or_else(|| anyhow!("{u}: only http:// URLs are supported (loopback, no TLS)"))?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    // `[v6]:port`, `host:port` or a host alone.
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !p.contains(']') => (
            h,
            p.parse::<u16>().with_context(|| format!("{u}: bad port"))?,
        ),
        _ => (authority, 80),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let lower = host.to_ascii_lowercase();
    // RFC 6761: localhost names are loopback; /etc/hosts may list ::1 first
    // while the servers listen on 127.0.0.1 only.
    let addr = if lower == "localhost" || lower.ends_with(".localhost") {
        SocketAddr::from((Ipv4Addr::LOCALHOST, port))
    } else {
        loopback_target(host, port).await?
    };
    Ok(Url {
        addr,
        authority: authority.to_string(),
        path: if path.is_empty() { "/" } else { path }.to_string(),
    })
}

/// One worker's keep-alive HTTP/1.1 connection.
#[derive(Default)]
struct Http {
    conn: Option<(SocketAddr, hyper::client::conn::http1::SendRequest<ReqBody>)>,
}

impl Http {
    async fn send(
        &mut self,
        req: hyper::Request<ReqBody>,
        addr: SocketAddr,
    ) -> anyhow::Result<hyper::Response<hyper::body::Incoming>> {
        let reusable = match &mut self.conn {
            Some((a, s)) if *a == addr && !s.is_closed() => s.ready().await.is_ok(),
            _ => false,
        };
        if !reusable {
            let tcp = tokio::net::TcpStream::connect(addr)
                .await
                .with_context(|| format!("connecting to {addr}"))?;
            tcp.set_nodelay(true)?;
            let (sender, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            self.conn = Some((addr, sender));
        }
        let (_, sender) = self.conn.as_mut().expect("connected above");
        Ok(sender.send_request(req).await?)
    }
}

/// Reads a response body to its end: (bytes, SHA-256).
async fn drain(body: hyper::body::Incoming) -> anyhow::Result<(u64, [u8; 32])> {
    let mut body = body;
    let mut hasher = Sha256::new();
    let mut n = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            n += data.len() as u64;
            hasher.update(&data);
        }
    }
    Ok((n, hasher.finalize().into()))
}

async fn short_text(body: hyper::body::Incoming) -> String {
    match body.collect().await {
        Ok(b) => String::from_utf8_lossy(&b.to_bytes())
            .trim()
            .chars()
            .take(200)
            .collect(),
        Err(e) => format!("(body: {e})"),
    }
}

// ---------------------------------------------------------------------------
// XMPP
// ---------------------------------------------------------------------------

struct Slot {
    put: String,
    headers: Vec<(String, String)>,
    get: String,
}

/// The first disco#items entry of the domain whose disco#info has the
/// upload feature.
async fn discover(c: &mut Conn, domain: &str) -> anyhow::Result<String> {
    let mut iq = String::from("<iq type='get' id='items1' to='");
    escape_attr(domain, &mut iq);
    iq.push_str("'><query xmlns='http://jabber.org/protocol/disco#items'/></iq>");
    c.send(&iq).await?;
    let r = c.wait_iq("items1", "disco#items").await?;
    let items: Vec<String> = r
        .get_child("query", NS_DISCO_ITEMS)
        .map(|q| {
            q.children()
                .filter_map(|i| i.attr("jid").map(String::from))
                .collect()
        })
        .unwrap_or_default();
    for (k, jid) in items.iter().enumerate() {
        let id = format!("info{k}");
        let mut iq = format!("<iq type='get' id='{id}' to='");
        escape_attr(jid, &mut iq);
        iq.push_str("'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>");
        c.send(&iq).await?;
        let r = c.wait_iq(&id, "disco#info").await?;
        let has = r.get_child("query", NS_DISCO_INFO).is_some_and(|q| {
            q.children()
                .any(|f| f.name == "feature" && f.attr("var") == Some(NS_UPLOAD))
        });
        if has {
            return Ok(jid.clone());
        }
    }
    bail!("no upload service among the items of {domain} ({items:?}); give --service")
}

async fn request_slot(
    c: &mut Conn,
    service: &str,
    id: &str,
    name: &str,
    size: u64,
    content_type: &str,
) -> anyhow::Result<Slot> {
    let mut iq = format!("<iq type='get' id='{id}' to='");
    escape_attr(service, &mut iq);
    iq.push_str("'><request xmlns='urn:xmpp:http:upload:0' filename='");
    escape_attr(name, &mut iq);
    iq.push_str(&format!("' size='{size}' content-type='"));
    escape_attr(content_type, &mut iq);
    iq.push_str("'/></iq>");
    c.send(&iq).await?;
    let r = c.wait_iq(id, "upload slot").await?;
    if r.attr("type") != Some("result") {
        bail!(
            "slot refused: {} {}",
            stanza_error(&r),
            r.get_child("error", NS_CLIENT)
                .and_then(|e| e.child_text("text", "urn:ietf:params:xml:ns:xmpp-stanzas"))
                .unwrap_or_default()
        );
    }
    let slot = r
        .get_child("slot", NS_UPLOAD)
        .ok_or_else(|| anyhow!("slot result without <slot/>"))?;
    let put: &Element = slot
        .get_child("put", NS_UPLOAD)
        .ok_or_else(|| anyhow!("slot without <put/>"))?;
    let get = slot
        .get_child("get", NS_UPLOAD)
        .and_then(|g| g.attr("url"))
        .ok_or_else(|| anyhow!("slot without <get url/>"))?;
    // XEP-0363 §4: only these headers may be passed on.
    let headers = put
        .children()
        .filter(|h| h.name == "header")
        .filter_map(|h| Some((h.attr("name")?.to_string(), h.text())))
        .filter(|(n, _)| {
            ["authorization", "cookie", "expires"].contains(&n.to_ascii_lowercase().as_str())
        })
        .map(|(n, v)| (n, v.replace(['\r', '\n'], "")))
        .collect();
    Ok(Slot {
        put: put
            .attr("url")
            .ok_or_else(|| anyhow!("<put/> without url"))?
            .to_string(),
        headers,
        get: get.to_string(),
    })
}

// ---------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------

struct Uploaded {
    get: String,
    sha256: [u8; 32],
}

struct Phase {
    bytes: u64,
    ok: u64,
    secs: f64,
    hist: Histogram<u64>,
    server_cpu: Option<f64>,
    base: Option<Mem>,
    peak: Option<(Mem, u64)>,
}

/// What a phase's figures are measured from.
struct PhaseStart {
    base: Option<Mem>,
    cpu0: Option<f64>,
    started: Instant,
}

impl PhaseStart {
    fn new(ctx: &Ctx, sampler: Option<&Sampler>) -> Self {
        PhaseStart {
            base: sampler.map(Sampler::mark),
            cpu0: ctx.server_cpu(),
            started: Instant::now(),
        }
    }

    /// The phase's figures; `hist` has one entry per completed file.
    fn end(self, hist: Histogram<u64>, size: u64, ctx: &Ctx, sampler: Option<&Sampler>) -> Phase {
        Phase {
            bytes: hist.len() * size,
            ok: hist.len(),
            secs: self.started.elapsed().as_secs_f64(),
            hist,
            server_cpu: self.cpu0.zip(ctx.server_cpu()).map(|(a, b)| b - a),
            base: self.base,
            peak: sampler.map(Sampler::peak),
        }
    }
}

impl Phase {
    fn mb_per_s(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.secs.max(1e-9)
    }

    fn print(&self, what: &str, failed: usize, extra: &str) {
        let q = |q: f64| self.hist.value_at_quantile(q) as f64 / 1000.0;
        println!(
            "{what}: {} ok, {failed} failed{extra}, {:.1} MB in {:.2} s = {:.1} MB/s; \
             per file ms p50 {:.1} p99 {:.1} max {:.1}",
            self.ok,
            self.bytes as f64 / 1e6,
            self.secs,
            self.mb_per_s(),
            q(0.5),
            q(0.99),
            self.hist.max() as f64 / 1000.0
        );
        if let Some(c) = self.server_cpu {
            println!(
                "  server CPU {c:.2} s = {:.0}% of a core",
                100.0 * c / self.secs.max(1e-9)
            );
        }
        if let (Some(b), Some((p, n))) = (self.base, self.peak) {
            println!(
                "  server RSS MiB: before {:.1}, peak {:.1} (+{:.1}); RssAnon before {:.1}, peak {:.1} \
                 (+{:.1}); {n} samples",
                mib(b.rss),
                mib(p.rss),
                mib(p.rss.saturating_sub(b.rss)),
                mib(b.anon),
                mib(p.anon),
                mib(p.anon.saturating_sub(b.anon))
            );
        }
    }

    fn json(&self, failed: usize) -> serde_json::Value {
        let q = |q: f64| self.hist.value_at_quantile(q) as f64 / 1000.0;
        serde_json::json!({
            "ok": self.ok,
            "failed": failed,
            "bytes": self.bytes,
            "seconds": self.secs,
            "mb_per_s": self.mb_per_s(),
            "p50_ms": q(0.5),
            "p99_ms": q(0.99),
            "max_ms": self.hist.max() as f64 / 1000.0,
            "server_cpu_s": self.server_cpu,
            "rss_base_kib": self.base.map(|m| m.rss),
            "rss_peak_kib": self.peak.map(|p| p.0.rss),
            "rss_growth_kib": self.base.zip(self.peak).map(|(b, p)| p.0.rss.saturating_sub(b.rss)),
            "anon_base_kib": self.base.map(|m| m.anon),
            "anon_peak_kib": self.peak.map(|p| p.0.anon),
            "rss_samples": self.peak.map(|p| p.1),
        })
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

pub async fn run(ctx: Arc<Ctx>, register: bool, a: UploadArgs) -> anyhow::Result<()> {
    let workers = a.parallel.clamp(1, a.files.max(1));
    let downloads = a.downloads.unwrap_or(a.files);
    let down_workers = a
        .download_parallel
        .unwrap_or(a.parallel)
        .clamp(1, downloads.max(1));
    if register {
        register_all(&ctx, (0..workers).map(|w| ctx.offset + w).collect()).await?;
    }
    let mut sessions = Vec::new();
    for w in 0..workers {
        let user = ctx.user(ctx.offset + w);
        let c = Conn::login(&ctx.target, &user, &ctx.password, &ctx.resource)
            .await
            .with_context(|| format!("login of {user}"))?;
        sessions.push(c);
    }
    let service = match &a.service {
        Some(s) => s.clone(),
        None => discover(&mut sessions[0], &ctx.target.domain).await?,
    };
    let mut pool = vec![0u8; POOL + CHUNK];
    rand::thread_rng().fill_bytes(&mut pool);
    let pool = Bytes::from(pool);
    let nonce = rand::thread_rng().next_u64();
    let sampler = ctx.server_pid.map(Sampler::start);
    let timeout = Duration::from_secs(a.request_timeout.max(1));
    println!(
        "upload service {service}: {} files of {} bytes, {workers} at once; then {downloads} GETs, \
         {down_workers} at once",
        a.files, a.size
    );

    // Uploads.
    let next = Arc::new(AtomicU64::new(0));
    let up_errors = Arc::new(Errors::default());
    let uploaded: Arc<Mutex<Vec<Option<Uploaded>>>> =
        Arc::new(Mutex::new((0..a.files).map(|_| None).collect()));
    let start = PhaseStart::new(&ctx, sampler.as_ref());
    let mut tasks = tokio::task::JoinSet::new();
    for (w, mut c) in sessions.into_iter().enumerate() {
        let (next, errors, uploaded, pool) = (
            next.clone(),
            up_errors.clone(),
            uploaded.clone(),
            pool.clone(),
        );
        let (service, ctype, size, files) =
            (service.clone(), a.content_type.clone(), a.size, a.files);
        tasks.spawn(async move {
            let mut http = Http::default();
            let mut h = hist();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= files {
                    break;
                }
                let t0 = Instant::now();
                let one = async {
                    let name = format!("bench-{nonce:016x}-{i}.bin");
                    let slot =
                        request_slot(&mut c, &service, &format!("slot{i}"), &name, size, &ctype)
                            .await?;
                    let url = parse_url(&slot.put).await?;
                    let (body, hash) = GenBody::new(pool.clone(), nonce, i, size);
                    let mut req = hyper::Request::put(&url.path)
                        .header(hyper::header::HOST, &url.authority)
                        .header(hyper::header::CONTENT_LENGTH, size)
                        .header(hyper::header::CONTENT_TYPE, &ctype);
                    for (n, v) in &slot.headers {
                        req = req.header(n.as_str(), v.as_str());
                    }
                    let resp = tokio::time::timeout(
                        timeout,
                        http.send(req.body(ReqBody::Gen(Box::new(body)))?, url.addr),
                    )
                    .await
                    .map_err(|_| anyhow!("PUT timed out"))??;
                    let status = resp.status();
                    let text = short_text(resp.into_body()).await;
                    if !status.is_success() {
                        bail!("PUT {}: {status} {text}", slot.put);
                    }
                    let sha256 = hash.await.map_err(|_| anyhow!("body not sent in full"))?;
                    Ok(Uploaded {
                        get: slot.get,
                        sha256,
                    })
                };
                match one.await {
                    Ok(u) => {
                        h.saturating_record(t0.elapsed().as_micros() as u64);
                        uploaded.lock().unwrap()[i as usize] = Some(u);
                    }
                    Err(e) => errors.add(&e.context(format!("upload {i}"))),
                }
            }
            (w, c, h)
        });
    }
    let mut up_hist = hist();
    let mut sessions = Vec::new();
    while let Some(r) = tasks.join_next().await {
        let (_, c, h) = r?;
        up_hist.add(&h).ok();
        sessions.push(c);
    }
    let up = start.end(up_hist, a.size, &ctx, sampler.as_ref());
    up_errors.report("uploads");
    up.print("upload", up_errors.count(), "");
    for c in sessions {
        c.close().await;
    }
    let files: Arc<Vec<Uploaded>> =
        Arc::new(uploaded.lock().unwrap().drain(..).flatten().collect());

    // Downloads.
    let next = Arc::new(AtomicU64::new(0));
    let down_errors = Arc::new(Errors::default());
    let mismatched = Arc::new(AtomicU64::new(0));
    // Let the page cache and the server settle after the uploads' writes.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let start = PhaseStart::new(&ctx, sampler.as_ref());
    let mut tasks = tokio::task::JoinSet::new();
    let n_down = if files.is_empty() { 0 } else { downloads };
    for _ in 0..down_workers.min(n_down.max(1)) {
        let (next, errors, files, mismatched) = (
            next.clone(),
            down_errors.clone(),
            files.clone(),
            mismatched.clone(),
        );
        let size = a.size;
        tasks.spawn(async move {
            let mut http = Http::default();
            let mut h = hist();
            loop {
                let d = next.fetch_add(1, Ordering::Relaxed);
                if d >= n_down {
                    break;
                }
                let f = &files[(d % files.len() as u64) as usize];
                let t0 = Instant::now();
                let one = async {
                    let url = parse_url(&f.get).await?;
                    let req = hyper::Request::get(&url.path)
                        .header(hyper::header::HOST, &url.authority)
                        .body(ReqBody::Empty)?;
                    let got = async {
                        let resp = http.send(req, url.addr).await?;
                        let status = resp.status();
                        if status != hyper::StatusCode::OK {
                            bail!(
                                "GET {}: {status} {}",
                                f.get,
                                short_text(resp.into_body()).await
                            );
                        }
                        drain(resp.into_body()).await
                    };
                    tokio::time::timeout(timeout, got)
                        .await
                        .map_err(|_| anyhow!("GET timed out"))?
                };
                match one.await {
                    Ok((n, sha)) if n == size && sha == f.sha256 => {
                        h.saturating_record(t0.elapsed().as_micros() as u64);
                    }
                    Ok((n, _)) => {
                        mismatched.fetch_add(1, Ordering::Relaxed);
                        errors.add(&anyhow!(
                            "GET {}: {n} bytes, not the {size} bytes uploaded (or other bytes)",
                            f.get
                        ));
                    }
                    Err(e) => errors.add(&e),
                }
            }
            h
        });
    }
    let mut down_hist = hist();
    while let Some(h) = tasks.join_next().await {
        down_hist.add(&h?).ok();
    }
    let down = start.end(down_hist, a.size, &ctx, sampler.as_ref());
    down_errors.report("downloads");
    let mism = mismatched.load(Ordering::Relaxed);
    down.print(
        "download",
        down_errors.count(),
        &format!(" ({mism} with other bytes than uploaded)"),
    );
    // The generator's own peak, to show it streams rather than buffers.
    let gen_hwm = proc_status_kib(std::process::id(), "VmHWM:");
    println!(
        "generator peak RSS {:.1} MiB",
        gen_hwm.map_or(0.0, |k| k as f64 / 1024.0)
    );
    if a.json {
        let j = serde_json::json!({
            "scenario": "upload",
            "service": service,
            "size": a.size,
            "files": a.files,
            "parallel": workers,
            "downloads": n_down,
            "download_parallel": down_workers,
            "upload": up.json(up_errors.count()),
            "download": down.json(down_errors.count()),
            "mismatched": mism,
            "first_errors": up_errors.first().into_iter().chain(down_errors.first()).collect::<Vec<_>>(),
            "generator_hwm_kib": gen_hwm,
        });
        println!("{j}");
    }
    if up.ok == 0 {
        bail!("no upload succeeded");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1024"), Ok(1024));
        assert_eq!(parse_size("1K"), Ok(1024));
        assert_eq!(parse_size("100M"), Ok(100 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert!(parse_size("0").is_err());
        assert!(parse_size("3T").is_err());
    }

    #[test]
    fn generated_files_have_their_size_and_differ() {
        let mut pool = vec![0u8; POOL + CHUNK];
        rand::thread_rng().fill_bytes(&mut pool);
        let pool = Bytes::from(pool);
        let all = |file: u64, size: u64| {
            let (mut b, _) = GenBody::new(pool.clone(), 7, file, size);
            let mut out = Vec::new();
            while let Some(c) = b.next_chunk() {
                out.extend_from_slice(&c);
            }
            out
        };
        for size in [1, 10, 40, CHUNK as u64 + 3, 3 * CHUNK as u64] {
            assert_eq!(all(0, size).len() as u64, size);
        }
        assert_ne!(all(1, 1 << 20), all(2, 1 << 20));
    }

    #[tokio::test]
    async fn urls() {
        let u = parse_url("http://upload.localhost:36280/file_share/abc/x.bin")
            .await
            .unwrap();
        assert_eq!(u.addr, "127.0.0.1:36280".parse().unwrap());
        assert_eq!(u.authority, "upload.localhost:36280");
        assert_eq!(u.path, "/file_share/abc/x.bin");
        let u = parse_url("http://127.0.0.1:80").await.unwrap();
        assert_eq!(u.path, "/");
        assert!(parse_url("https://localhost/x").await.is_err());
    }
}
