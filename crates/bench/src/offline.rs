//! `offline`: XEP-0160 catch-up. U senders user(2i) each send M numbered
//! chat messages to the bare JID of receiver user(2i+1) while the receiver
//! has no session, then ping the server: it handles a session's stanzas in
//! order, so the answer means it has taken (stored) them all. Then the
//! receivers log in (bind, roster get) and, once all are in, send initial
//! presence at the same moment, which makes the server deliver what it
//! stored. Measured per receiver: from its presence to its M-th message;
//! overall: messages delivered per second from the first presence to the
//! last receiver's last message. Each receiver must get exactly M, in
//! order, once.
//!
//! Each body is `NONCE SEQ PADDING`; NONCE is random per run, so messages
//! left in a queue by an earlier run are told apart (counted as stale).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use natter_xml::{escape_attr, Element, NS_CLIENT};
use tokio::sync::watch;

use crate::chat::{is_set, setup, Then};
use crate::net::need_files;
use crate::xmpp::Conn;
use crate::{now_ns, register_all, report_cpu, Ctx};

#[derive(clap::Args)]
pub struct OfflineArgs {
    /// Receivers (offline while the messages are sent); as many senders.
    #[arg(long, default_value_t = 10)]
    pub receivers: u64,
    /// Messages each sender sends to its receiver (natter and the bench
    /// ejabberd config keep at most 10,000 per user).
    #[arg(long, default_value_t = 100)]
    pub messages: u64,
    /// Padding added to every body, in bytes.
    #[arg(long, default_value_t = 0)]
    pub body_bytes: usize,
    /// Seconds allowed for sending (until the server's answer to the ping)
    /// and, separately, for the catch-up.
    #[arg(long, default_value_t = 120.0)]
    pub timeout: f64,
    /// The catch-up ends early when no message arrived for this many seconds.
    #[arg(long, default_value_t = 5.0)]
    pub quiet: f64,
    /// Seconds to keep reading once every receiver is complete (late duplicates).
    #[arg(long, default_value_t = 1.0)]
    pub linger: f64,
    /// Do not empty the receivers' queues first (by default each receiver
    /// logs in once with presence and takes what earlier runs left there).
    #[arg(long)]
    pub no_predrain: bool,
    /// Also print the results as one JSON line.
    #[arg(long)]
    pub json: bool,
}

/// Messages written in one go at most.
const BATCH: u64 = 64;
/// Problems listed per kind in the report.
const SHOW: usize = 5;
/// The predrain ends for a receiver when no message came for this long.
const PREDRAIN_QUIET: Duration = Duration::from_secs(2);

/// Send `n` chat messages `NONCE SEQ PAD` (SEQ = 0..n) to `to`, then ping
/// the server and wait for its answer (all within `timeout`). Returns the
/// error replies (bounced messages) seen.
pub(crate) async fn send_numbered(
    c: &mut Conn,
    domain: &str,
    to: &str,
    nonce: u64,
    n: u64,
    pad: &str,
    timeout: Duration,
) -> anyhow::Result<u64> {
    let mut errors = 0u64;
    let mut count = |el: &Element| {
        if el.is("message", NS_CLIENT) && el.attr("type") == Some("error") {
            errors += 1;
        }
    };
    let mut to_attr = String::new();
    escape_attr(to, &mut to_attr);
    let work = async {
        let mut out = String::new();
        let mut seq = 0;
        while seq < n {
            out.clear();
            for _ in 0..BATCH.min(n - seq) {
                use std::fmt::Write;
                let _ = write!(
                    out,
                    "<message to='{to_attr}' type='chat' id='{nonce:x}-{seq}'>\
                     <body>{nonce:016x} {seq} {pad}</body></message>"
                );
                seq += 1;
            }
            c.send(&out).await?;
            // Take what the server sent meanwhile (bounces, pings), so that
            // it never blocks writing to us while we write to it.
            c.poll_ready().await?;
            while let Some(el) = c.pop() {
                if !c.answer_iq(&el).await? {
                    count(&el);
                }
            }
        }
        c.ping_server(domain, timeout, &mut count).await
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| anyhow!("sending {n} messages to {to} took more than {timeout:?}"))??;
    Ok(errors)
}

/// `(nonce, seq)` of a body written by [`send_numbered`].
pub(crate) fn parse_body(el: &Element) -> Option<(u64, u64)> {
    let body = el.get_child("body", NS_CLIENT)?.text();
    let mut f = body.split_ascii_whitespace();
    let nonce = u64::from_str_radix(f.next()?, 16).ok()?;
    let seq = f.next()?.parse().ok()?;
    Some((nonce, seq))
}

/// Value at quantile `q` of sorted `v` (nearest rank); `None` when empty.
fn quantile(v: &[f64], q: f64) -> Option<f64> {
    let i = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len().max(1)) - 1;
    v.get(i).copied()
}

#[derive(Default)]
struct Progress {
    complete: AtomicUsize,
    /// Latest arrival of a message of this run (ns since the epoch).
    last_rx: AtomicU64,
}

#[derive(Default)]
struct CatchUp {
    /// When initial presence was sent.
    presence_at: u64,
    /// Messages of this run, duplicates included.
    received: u64,
    distinct: u64,
    duplicated: u64,
    out_of_order: u64,
    /// Messages of other runs or bodies not written by this tool.
    stale: u64,
    /// Error replies (messages of type error).
    errors: u64,
    first_rx: Option<u64>,
    /// When the M-th distinct message arrived.
    complete_at: Option<u64>,
    last_rx: u64,
    seen: Vec<u64>,
    /// First duplicated sequence numbers.
    dup_seqs: Vec<u64>,
    /// First (seq, highest seq before it) that arrived out of order.
    ooo_seqs: Vec<(u64, u64)>,
    failure: Option<String>,
}

pub async fn run(ctx: Arc<Ctx>, register: bool, a: OfflineArgs) -> anyhow::Result<()> {
    if a.receivers == 0 || a.messages == 0 {
        bail!("--receivers and --messages must be at least 1");
    }
    if a.messages > 1 << 28 {
        bail!("--messages must be at most 2^28");
    }
    if !(a.timeout > 0.0 && a.quiet > 0.0 && a.linger >= 0.0) {
        bail!("--timeout and --quiet must be positive, --linger not negative");
    }
    need_files(a.receivers, &format!("{} receivers", a.receivers))?;
    let u = a.receivers;
    let m = a.messages;
    if register {
        register_all(&ctx, (0..2 * u).map(|i| ctx.offset + i).collect()).await?;
    }
    let nonce: u64 = rand::random();
    let timeout = Duration::from_secs_f64(a.timeout);
    let pad = "x".repeat(a.body_bytes);
    let receivers: Vec<u64> = (0..u).map(|i| ctx.offset + 2 * i + 1).collect();
    if !a.no_predrain {
        predrain(&ctx, receivers.clone(), timeout).await?;
    }

    // Store: the senders send while no receiver is logged in.
    eprintln!("setting up {u} senders");
    let senders = setup(
        &ctx,
        (0..u).map(|i| ctx.offset + 2 * i).collect(),
        Then::Presence,
    )
    .await?;
    eprintln!("sending {m} messages to each of {u} offline receivers");
    let fill_t0 = now_ns();
    let fill_cpu0 = ctx.server_cpu();
    let mut tasks = Vec::new();
    for (i, mut c) in senders.into_iter().enumerate() {
        let ctx = ctx.clone();
        let pad = pad.clone();
        tasks.push(tokio::spawn(async move {
            let to = format!(
                "{}@{}",
                ctx.user(ctx.offset + 2 * i as u64 + 1),
                ctx.target.domain
            );
            let r = send_numbered(&mut c, &ctx.target.domain, &to, nonce, m, &pad, timeout).await;
            c.close().await;
            r
        }));
    }
    let mut fill_errors = 0;
    for t in tasks {
        fill_errors += t.await.context("sender task")??;
    }
    let fill_s = (now_ns() - fill_t0) as f64 / 1e9;
    let fill_cpu = fill_cpu0.zip(ctx.server_cpu()).map(|(a, b)| b - a);
    println!(
        "sent to offline receivers: {u} senders × {m} = {} messages in {fill_s:.2} s = {:.0} \
         msgs/s (until the server answered each sender's ping); error replies (not stored) \
         {fill_errors}{}",
        u * m,
        (u * m) as f64 / fill_s.max(1e-9),
        fill_cpu
            .map(|c| format!("; server CPU {c:.2} s"))
            .unwrap_or_default()
    );

    // Catch-up: log in every receiver (not available yet), then all send
    // initial presence at once.
    eprintln!("logging in {u} receivers");
    let receivers = setup(&ctx, receivers, Then::Roster).await?;
    let progress = Arc::new(Progress::default());
    let (start_tx, start_rx) = watch::channel(false);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    for c in receivers {
        tasks.push(tokio::spawn(receiver(
            c,
            nonce,
            m,
            progress.clone(),
            start_rx.clone(),
            stop_rx.clone(),
        )));
    }
    let t0 = now_ns();
    let cpu0 = ctx.server_cpu();
    let _ = start_tx.send(true);
    let deadline = t0 + (a.timeout * 1e9) as u64;
    let quiet = (a.quiet * 1e9) as u64;
    let all = loop {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let now = now_ns();
        if progress.complete.load(Ordering::Relaxed) == u as usize {
            break true;
        }
        let last = progress.last_rx.load(Ordering::Relaxed).max(t0);
        if now >= deadline || now - last >= quiet {
            break false;
        }
    };
    let cpu = cpu0.zip(ctx.server_cpu()).map(|(a, b)| b - a);
    if all {
        tokio::time::sleep(Duration::from_secs_f64(a.linger)).await;
    }
    let _ = stop_tx.send(true);

    let mut rs = Vec::new();
    for t in tasks {
        rs.push(t.await.context("receiver task")?);
    }
    let (mut delivered, mut lost, mut dup, mut ooo, mut stale, mut errs) = (0, 0, 0, 0, 0, 0);
    let mut complete = 0;
    let mut times = Vec::new();
    let mut firsts = Vec::new();
    let mut end = t0;
    let mut start = u64::MAX;
    let mut failures = Vec::new();
    for (i, r) in rs.iter().enumerate() {
        let user = ctx.user(ctx.offset + 2 * i as u64 + 1);
        delivered += r.distinct;
        lost += m - r.distinct;
        dup += r.duplicated;
        ooo += r.out_of_order;
        stale += r.stale;
        errs += r.errors;
        start = start.min(r.presence_at);
        if let Some(f) = &r.failure {
            failures.push(format!("{user}: {f}"));
        }
        if let Some(f) = r.first_rx {
            firsts.push((f - r.presence_at) as f64 / 1e6);
        }
        if let Some(c) = r.complete_at {
            complete += 1;
            times.push((c - r.presence_at) as f64 / 1e6);
            end = end.max(c);
        } else if r.received > 0 {
            end = end.max(r.last_rx);
        }
        if r.distinct < m {
            let missing = missing_ranges(&r.seen, m);
            eprintln!(
                "{user}: got {} of {m} (missing seq {}{})",
                r.distinct,
                missing
                    .iter()
                    .take(SHOW)
                    .map(|(f, l)| if f == l {
                        format!("{f}")
                    } else {
                        format!("{f}..={l}")
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
                if missing.len() > SHOW { ", …" } else { "" }
            );
        }
        if r.duplicated > 0 {
            eprintln!(
                "{user}: {} duplicated (first seqs {:?})",
                r.duplicated, r.dup_seqs
            );
        }
        if r.out_of_order > 0 {
            eprintln!(
                "{user}: {} out of order (first (seq, after seq): {:?})",
                r.out_of_order, r.ooo_seqs
            );
        }
    }
    for f in failures.iter().take(SHOW) {
        eprintln!("session failed: {f}");
    }
    times.sort_by(f64::total_cmp);
    firsts.sort_by(f64::total_cmp);
    let start = start.min(t0);
    let secs = end.saturating_sub(start) as f64 / 1e9;
    let rate = delivered as f64 / secs.max(1e-9);
    println!(
        "catch-up: {u} receivers × {m} | delivered {delivered} of {} in {secs:.3} s = {rate:.0} msgs/s | \
         complete {complete}/{u} | lost {lost} ({fill_errors} of them refused when sent) | \
         duplicated {dup} | out-of-order {ooo} | stale {stale} | error replies {errs}",
        u * m
    );
    let ms = |v: &[f64], q: f64| quantile(v, q).map_or("n/a".into(), |x| format!("{x:.1}"));
    println!(
        "catch-up time ms per complete receiver (presence → M-th message): p50 {} p99 {} max {} \
         (n={}); first message ms: p50 {} p99 {}",
        ms(&times, 0.5),
        ms(&times, 0.99),
        ms(&times, 1.0),
        times.len(),
        ms(&firsts, 0.5),
        ms(&firsts, 0.99),
    );
    print!("catch-up: ");
    let per_cpu = report_cpu(cpu, secs, delivered as f64, "msgs");
    if a.json {
        let j = serde_json::json!({
            "scenario": "offline",
            "receivers": u,
            "messages": m,
            "body_bytes": a.body_bytes,
            "stored": u * m,
            "store_s": fill_s,
            "store_per_s": (u * m) as f64 / fill_s.max(1e-9),
            "store_error_replies": fill_errors,
            "server_cpu_store_s": fill_cpu,
            "delivered": delivered,
            "complete": complete,
            "catchup_s": secs,
            "delivered_per_s": rate,
            "lost": lost,
            "lost_not_refused": lost.saturating_sub(fill_errors),
            "duplicated": dup,
            "out_of_order": ooo,
            "stale": stale,
            "error_replies": errs,
            "failed_sessions": failures.len(),
            "p50_ms": quantile(&times, 0.5),
            "p99_ms": quantile(&times, 0.99),
            "max_ms": quantile(&times, 1.0),
            "first_p50_ms": quantile(&firsts, 0.5),
            "first_p99_ms": quantile(&firsts, 0.99),
            "server_cpu_s": cpu,
            "msgs_per_cpu_s": per_cpu,
        });
        println!("{j}");
    }
    if delivered == 0 {
        bail!("no message was delivered");
    }
    Ok(())
}

/// Log `numbers` in with presence and read until the server answered a
/// ping and then sent no message for [`PREDRAIN_QUIET`] (or `timeout`):
/// what an earlier run (or anything else) left in their offline queues must
/// not count in this one.
async fn predrain(ctx: &Arc<Ctx>, numbers: Vec<u64>, timeout: Duration) -> anyhow::Result<()> {
    let n = numbers.len();
    let sessions = setup(ctx, numbers, Then::Presence).await?;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut tasks = Vec::new();
    for mut c in sessions {
        let domain = ctx.target.domain.clone();
        tasks.push(tokio::spawn(async move {
            let mut got = 0u64;
            // Prosody sends the whole queue while handling the presence, so
            // the ping's answer comes after it (it may take seconds); natter
            // starts its catch-up right away.
            let mut count = |el: &Element| got += u64::from(el.is("message", NS_CLIENT));
            if c.ping_server(&domain, timeout, &mut count).await.is_err() {
                return got;
            }
            loop {
                let quiet = tokio::time::Instant::now() + PREDRAIN_QUIET;
                match tokio::time::timeout_at(quiet.min(deadline), c.next()).await {
                    Ok(Ok(el)) if el.is("message", NS_CLIENT) => got += 1,
                    Ok(Ok(el)) => {
                        if c.answer_iq(&el).await.is_err() {
                            break;
                        }
                    }
                    Ok(Err(_)) | Err(_) => break,
                }
            }
            c.close().await;
            got
        }));
    }
    let mut got = 0;
    for t in tasks {
        got += t.await.context("predrain task")?;
    }
    eprintln!("predrain: {got} messages left over from earlier runs taken by {n} receivers");
    Ok(())
}

/// Sequence numbers below `m` not set in `seen`, as inclusive ranges.
fn missing_ranges(seen: &[u64], m: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for s in (0..m).filter(|s| !is_set(seen, *s)) {
        match out.last_mut() {
            Some((_, l)) if *l + 1 == s => *l = s,
            _ => out.push((s, s)),
        }
    }
    out
}

async fn receiver(
    mut c: Conn,
    nonce: u64,
    m: u64,
    progress: Arc<Progress>,
    mut start: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
) -> CatchUp {
    let mut r = CatchUp {
        seen: vec![0; m.div_ceil(64) as usize],
        ..CatchUp::default()
    };
    if start.wait_for(|s| *s).await.is_err() {
        return r;
    }
    r.presence_at = now_ns();
    if let Err(e) = c.presence().await {
        r.failure = Some(format!("{e:#}"));
        return r;
    }
    let mut max_seq: Option<u64> = None;
    let failure = c
        .receive(&mut stop, |el, now| {
            if el.attr("type") == Some("error") {
                r.errors += 1;
                return;
            }
            let Some((_, seq)) = parse_body(el).filter(|(n, s)| *n == nonce && *s < m) else {
                r.stale += 1;
                return;
            };
            r.received += 1;
            r.last_rx = now;
            r.first_rx.get_or_insert(now);
            progress.last_rx.fetch_max(now, Ordering::Relaxed);
            let (word, bit) = ((seq / 64) as usize, 1u64 << (seq % 64));
            if r.seen[word] & bit != 0 {
                r.duplicated += 1;
                if r.dup_seqs.len() < SHOW {
                    r.dup_seqs.push(seq);
                }
                return;
            }
            r.seen[word] |= bit;
            r.distinct += 1;
            if let Some(mx) = max_seq.filter(|mx| seq < *mx) {
                r.out_of_order += 1;
                if r.ooo_seqs.len() < SHOW {
                    r.ooo_seqs.push((seq, mx));
                }
            }
            max_seq = Some(max_seq.map_or(seq, |mx| mx.max(seq)));
            if r.distinct == m {
                r.complete_at = Some(now);
                progress.complete.fetch_add(1, Ordering::Relaxed);
            }
        })
        .await;
    r.failure = failure;
    if r.failure.is_none() {
        c.close().await;
    }
    r
}
