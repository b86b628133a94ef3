//! `chat`: P pairs, sender user(2i) → receiver user(2i+1), each its own
//! session. `s2s`: the same with the receivers on another server, so every
//! message crosses a server-to-server stream (CPU reported for both). Open loop (`--rate`, total msgs/s) or closed loop (`--window`
//! unacknowledged messages per pair; the receiver task hands the credit back
//! in-process, so the server carries no extra ack traffic).
//!
//! Each body is `PAIR SEQ SEND_NS PADDING`; SEND_NS is the monotonic time
//! the message was sent. Open loop: when the generator is more than 2 ms
//! behind schedule (a server that stopped reading blocks our writes), it is
//! the time the message was *due*, so a stall is not hidden by the generator
//! falling behind (no coordinated omission).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use hdrhistogram::Histogram;
use natter_xml::{escape_attr, NS_CLIENT};
use tokio::sync::{watch, Semaphore};

use crate::net::need_files;
use crate::xmpp::Conn;
use crate::{instant_at, now_ns, proc_cpu_secs, register_all, Ctx};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum To {
    /// The receiver's bound full JID (works without presence handling).
    Full,
    /// The receiver's bare JID (server picks the available resources).
    Bare,
}

#[derive(clap::Args)]
pub struct ChatArgs {
    /// Sender/receiver pairs (2 × sessions).
    #[arg(long, default_value_t = 1)]
    pub pairs: u64,
    /// Open loop: total messages per second over all pairs.
    #[arg(long, conflicts_with = "window")]
    pub rate: Option<f64>,
    /// Closed loop: unacknowledged messages in flight per pair [default: 64].
    #[arg(long)]
    pub window: Option<usize>,
    /// Seconds measured, after the warm-up.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Seconds of sending before measuring starts.
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Seconds to wait after sending stops for messages still on their way.
    #[arg(long, default_value_t = 5.0)]
    pub drain: f64,
    /// Padding added to every body, in bytes.
    #[arg(long, default_value_t = 0)]
    pub body_bytes: usize,
    /// Address messages to the receiver's full or bare JID.
    #[arg(long, value_enum, default_value = "full")]
    pub to: To,
    /// Also print the results as one JSON line.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args)]
pub struct S2sArgs {
    #[command(flatten)]
    pub chat: ChatArgs,
    /// The receivers' server: c2s port (same --host).
    #[arg(long)]
    pub peer_port: u16,
    /// The receivers' XMPP domain.
    #[arg(long)]
    pub peer_domain: String,
    /// The receivers' server process, for its CPU time.
    #[arg(long)]
    pub peer_server_pid: Option<u32>,
}

/// Messages written in one go at most.
const BATCH: usize = 64;
/// Open loop: a message sent at most this late counts from when it was sent.
const SLACK_NS: u64 = 2_000_000;
/// Highest sequence number a receiver tracks (bitset bound: 32 MiB per pair).
const MAX_SEQ: u64 = 1 << 28;

struct Shared {
    warm_end: u64,
    send_end: u64,
    measured_sent: AtomicU64,
    measured_received: AtomicU64,
    senders_done: AtomicUsize,
}

struct SenderResult {
    sent: u64,
    /// Sequence numbers sent inside the measured window: first..=last.
    measured: Option<(u64, u64)>,
    errors: u64,
    failure: Option<String>,
}

struct ReceiverResult {
    hist: Histogram<u64>,
    seen: Vec<u64>,
    received: u64,
    duplicated: u64,
    out_of_order: u64,
    /// When the last message of this pair arrived (ns since the epoch).
    last_rx: u64,
    failure: Option<String>,
}

/// Senders log in through `ctx`, receivers through `rx_ctx` (the same
/// server for `chat`, another one for `s2s`).
pub async fn run(
    ctx: Arc<Ctx>,
    rx_ctx: Arc<Ctx>,
    register: bool,
    a: ChatArgs,
) -> anyhow::Result<()> {
    let s2s = !Arc::ptr_eq(&ctx, &rx_ctx);
    if a.pairs == 0 {
        bail!("--pairs must be at least 1");
    }
    if !(a.duration > 0.0 && a.warmup >= 0.0 && a.drain >= 0.0) {
        bail!("--duration must be positive, --warmup and --drain not negative");
    }
    if let Some(r) = a.rate {
        if !(r > 0.0 && r <= 10_000_000.0) {
            bail!("--rate must be in (0, 10000000]");
        }
    }
    let window = a.window.unwrap_or(64).max(1);
    need_files(2 * a.pairs, &format!("{} pairs", a.pairs))?;
    let n = 2 * a.pairs;
    if register && !s2s {
        register_all(&ctx, (0..n).map(|i| ctx.offset + i).collect()).await?;
    } else if register {
        let nums = |r: u64| (0..a.pairs).map(|p| ctx.offset + 2 * p + r).collect();
        register_all(&ctx, nums(0)).await?;
        register_all(&rx_ctx, nums(1)).await?;
    }

    // Receivers first, so that nothing is sent to a session that is not there.
    eprintln!("setting up {} receivers and {} senders", a.pairs, a.pairs);
    let receivers = setup(
        &rx_ctx,
        (0..a.pairs).map(|p| ctx.offset + 2 * p + 1).collect(),
        Then::Presence,
    )
    .await?;
    // In a cluster, sender k goes to the node after receiver k's.
    ctx.target.align(1);
    let senders = setup(
        &ctx,
        (0..a.pairs).map(|p| ctx.offset + 2 * p).collect(),
        Then::Presence,
    )
    .await?;

    // The measured servers (with s2s: both, their CPU summed): first let them go
    // quiet, then take their CPU time over exactly the measured window.
    let pids: Vec<u32> = [ctx.server_pid, rx_ctx.server_pid.filter(|_| s2s)]
        .into_iter()
        .flatten()
        .chain(ctx.node_pids.iter().copied())
        .collect();
    settle(&pids).await;

    let start = now_ns() + 200_000_000;
    let warm_end = start + (a.warmup * 1e9) as u64;
    let send_end = warm_end + (a.duration * 1e9) as u64;
    let shared = Arc::new(Shared {
        warm_end,
        send_end,
        measured_sent: AtomicU64::new(0),
        measured_received: AtomicU64::new(0),
        senders_done: AtomicUsize::new(0),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let cpu_task = (!pids.is_empty()).then(|| {
        tokio::spawn(async move {
            let total =
                |pids: &[u32]| -> Option<f64> { pids.iter().map(|p| proc_cpu_secs(*p)).sum() };
            tokio::time::sleep_until(instant_at(warm_end)).await;
            let c0 = total(&pids);
            tokio::time::sleep_until(instant_at(send_end)).await;
            let c1 = total(&pids);
            c0.zip(c1).map(|(a, b)| b - a)
        })
    });
    let mut rx_tasks = Vec::new();
    let mut tx_tasks = Vec::new();
    let pad = "x".repeat(a.body_bytes);
    for (p, (rc, sc)) in receivers.into_iter().zip(senders).enumerate() {
        let credit = Arc::new(Semaphore::new(window));
        let to = match a.to {
            To::Full => rc.jid.clone(),
            To::Bare => format!(
                "{}@{}",
                ctx.user(ctx.offset + 2 * p as u64 + 1),
                rx_ctx.target.domain
            ),
        };
        let closed_loop = a.rate.is_none();
        rx_tasks.push(tokio::spawn(receiver(
            rc,
            p as u64,
            shared.clone(),
            closed_loop.then(|| credit.clone()),
            stop_rx.clone(),
        )));
        let mode = match a.rate {
            Some(r) => Mode::Rate {
                interval_ns: (1e9 * a.pairs as f64 / r).max(1.0),
                // Stagger the pairs over one interval.
                phase: p as f64 / a.pairs as f64,
            },
            None => Mode::Window(credit),
        };
        tx_tasks.push(tokio::spawn(sender(
            sc,
            p as u64,
            to,
            pad.clone(),
            mode,
            shared.clone(),
            start,
            stop_rx.clone(),
        )));
    }
    eprintln!(
        "sending: {:.0} s warm-up, {:.0} s measured ({})",
        a.warmup,
        a.duration,
        match a.rate {
            Some(r) => format!("open loop, {r} msgs/s total"),
            None => format!("closed loop, window {window} per pair"),
        }
    );

    // Wait for the senders to finish, then for the last messages (bounded).
    tokio::time::sleep_until(instant_at(send_end)).await;
    let drain_end = tokio::time::Instant::now() + Duration::from_secs_f64(a.drain);
    loop {
        let done = shared.senders_done.load(Ordering::Relaxed) == a.pairs as usize;
        let all_in = shared.measured_received.load(Ordering::Relaxed)
            >= shared.measured_sent.load(Ordering::Relaxed);
        if (done && all_in) || tokio::time::Instant::now() >= drain_end {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop_tx.send(true);

    let mut failures = Vec::new();
    let mut sent = 0;
    let mut errors = 0;
    let mut ranges = Vec::new();
    for t in tx_tasks {
        let r = t.await.context("sender task")?;
        sent += r.sent;
        errors += r.errors;
        ranges.push(r.measured);
        failures.extend(r.failure);
    }
    let mut hist = new_hist();
    let (mut delivered, mut lost, mut dup, mut ooo, mut received) = (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut stalled = 0;
    for (p, (t, range)) in rx_tasks.into_iter().zip(&ranges).enumerate() {
        let r = t.await.context("receiver task")?;
        if r.last_rx + 1_000_000_000 < send_end && stalled < 5 {
            stalled += 1;
            eprintln!(
                "pair {p}: nothing received in the last {:.1} s of sending ({} received)",
                send_end.saturating_sub(r.last_rx.max(start)) as f64 / 1e9,
                r.received
            );
        }
        hist.add(&r.hist).ok();
        received += r.received;
        dup += r.duplicated;
        ooo += r.out_of_order;
        failures.extend(r.failure);
        if let Some((first, last)) = *range {
            let (d, l) = tally(&r.seen, first, last);
            delivered += d;
            lost += l;
        }
    }
    for f in failures.iter().take(5) {
        eprintln!("session failed: {f}");
    }
    let measured_sent: u64 = ranges.iter().flatten().map(|(f, l)| l - f + 1).sum();
    let q = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    let rate = delivered as f64 / a.duration;
    let server_cpu = match cpu_task {
        Some(t) => t.await.ok().flatten(),
        None => None,
    };
    let per_cpu = server_cpu
        .filter(|c| *c > 0.0)
        .map(|c| delivered as f64 / c);
    if let Some(c) = server_cpu {
        println!(
            "server CPU {c:.2} s over the measured {:.0} s = {:.0}% of a core; {} msgs per CPU-second",
            a.duration,
            100.0 * c / a.duration,
            per_cpu.map(|p| format!("{p:.0}")).unwrap_or_else(|| "n/a".into())
        );
    }
    println!(
        "pairs {} | sent {sent} (measured {measured_sent}) | delivered {delivered} = {rate:.0} msgs/s | \
         lost {lost} | duplicated {dup} | out-of-order {ooo} | error replies {errors}",
        a.pairs
    );
    println!(
        "latency ms: p50 {:.3} p90 {:.3} p99 {:.3} p99.9 {:.3} max {:.3} (n={})",
        q(0.5),
        q(0.9),
        q(0.99),
        q(0.999),
        hist.max() as f64 / 1000.0,
        hist.len()
    );
    if a.json {
        let j = serde_json::json!({
            "scenario": if s2s { "s2s" } else { "chat" },
            "pairs": a.pairs,
            "mode": if a.rate.is_some() { "rate" } else { "window" },
            "rate": a.rate,
            "window": if a.rate.is_none() { Some(window) } else { None },
            "duration_s": a.duration,
            "body_bytes": a.body_bytes,
            "sent": sent,
            "measured_sent": measured_sent,
            "received": received,
            "delivered": delivered,
            "delivered_per_s": rate,
            "lost": lost,
            "duplicated": dup,
            "out_of_order": ooo,
            "error_replies": errors,
            "failed_sessions": failures.len(),
            "p50_ms": q(0.5),
            "p90_ms": q(0.9),
            "p99_ms": q(0.99),
            "p999_ms": q(0.999),
            "max_ms": hist.max() as f64 / 1000.0,
            "server_cpu_s": server_cpu,
            "msgs_per_cpu_s": per_cpu,
        });
        println!("{j}");
    }
    if delivered == 0 {
        bail!("no message was delivered");
    }
    Ok(())
}

pub(crate) fn new_hist() -> Histogram<u64> {
    // Microseconds, 1 µs .. 60 s, 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// (seen, missing) among the sequence numbers `first..=last`.
pub(crate) fn tally(bits: &[u64], first: u64, last: u64) -> (u64, u64) {
    let seen = (first..=last).filter(|&i| is_set(bits, i)).count() as u64;
    (seen, last - first + 1 - seen)
}

pub(crate) fn is_set(bits: &[u64], i: u64) -> bool {
    bits.get((i / 64) as usize)
        .is_some_and(|w| w & (1 << (i % 64)) != 0)
}

/// What a session does right after binding, in [`setup`].
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Then {
    /// Initial presence (no roster get).
    Presence,
    /// Roster get only: not available, so the server delivers no offline
    /// messages and nothing addressed to the bare JID.
    Roster,
    /// Nothing.
    Nothing,
}

/// Log in the accounts `numbers` (concurrency-limited), then `then`; all
/// must succeed. The sessions come back in the order of `numbers`.
pub(crate) async fn setup(
    ctx: &Arc<Ctx>,
    numbers: Vec<u64>,
    then: Then,
) -> anyhow::Result<Vec<Conn>> {
    let sem = Arc::new(Semaphore::new(ctx.concurrency));
    let mut handles = Vec::new();
    for i in numbers {
        let (ctx, sem) = (ctx.clone(), sem.clone());
        handles.push(tokio::spawn(async move {
            let _permit = sem.acquire().await?;
            let mut c = Conn::login(&ctx.target, &ctx.user(i), &ctx.password, &ctx.resource)
                .await
                .with_context(|| format!("logging in {}", ctx.user(i)))?;
            match then {
                Then::Presence => c.presence().await?,
                Then::Roster => c.roster().await?,
                Then::Nothing => {}
            }
            anyhow::Ok(c)
        }));
    }
    let mut out = Vec::new();
    let mut first_err = None;
    for h in handles {
        match h.await? {
            Ok(c) => out.push(c),
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

enum Mode {
    Rate { interval_ns: f64, phase: f64 },
    Window(Arc<Semaphore>),
}

#[allow(clippy::too_many_arguments)]
async fn sender(
    mut c: Conn,
    pair: u64,
    to: String,
    pad: String,
    mode: Mode,
    shared: Arc<Shared>,
    start: u64,
    mut stop: watch::Receiver<bool>,
) -> SenderResult {
    let mut res = SenderResult {
        sent: 0,
        measured: None,
        errors: 0,
        failure: None,
    };
    let mut to_attr = String::new();
    escape_attr(&to, &mut to_attr);
    let mut out = String::with_capacity(BATCH * (160 + to_attr.len() + pad.len()));
    let mut seq: u64 = 0;
    let send_end = instant_at(shared.send_end);
    tokio::time::sleep_until(instant_at(start)).await;
    let mut sending = true;
    let mut failed = false;
    while sending {
        // How many to send now, or None to only read.
        let due = tokio::select! {
            biased;
            _ = tokio::time::sleep_until(send_end) => { sending = false; None }
            r = c.read_some() => {
                if let Err(e) = r { res.failure = Some(format!("{e:#}")); failed = true; break; }
                None
            }
            n = async {
                match &mode {
                    Mode::Window(credit) => {
                        let Ok(p) = credit.acquire().await else { return 0 };
                        p.forget();
                        let mut n = 1;
                        while n < BATCH {
                            match credit.try_acquire() {
                                Ok(p) => { p.forget(); n += 1; }
                                Err(_) => break,
                            }
                        }
                        n
                    }
                    Mode::Rate { interval_ns, phase } => {
                        let next = start + ((seq as f64 + phase) * interval_ns) as u64;
                        tokio::time::sleep_until(instant_at(next)).await;
                        let now = now_ns();
                        let behind = ((now - start) as f64 / interval_ns - phase).floor() as u64 + 1;
                        (behind.saturating_sub(seq) as usize).clamp(1, BATCH)
                    }
                }
            } => Some(n),
        };
        if let Some(n) = due {
            out.clear();
            let now = now_ns();
            let mut written = 0;
            for _ in 0..n {
                let t = match &mode {
                    Mode::Window(_) => now,
                    Mode::Rate { interval_ns, phase } => {
                        let due = start + ((seq as f64 + phase) * interval_ns) as u64;
                        // Timer jitter (tokio's timer ticks in ms) is ours, not
                        // the server's; a real backlog is charged from the due time.
                        if now.saturating_sub(due) <= SLACK_NS {
                            now
                        } else {
                            due
                        }
                    }
                };
                if t >= shared.send_end {
                    sending = false;
                    break;
                }
                use std::fmt::Write;
                let _ = write!(
                    out,
                    "<message to='{to_attr}' type='chat' id='{pair}-{seq}'><body>{pair} {seq} {t} {pad}</body></message>"
                );
                if t >= shared.warm_end {
                    res.measured = Some(match res.measured {
                        Some((f, _)) => (f, seq),
                        None => (seq, seq),
                    });
                    shared.measured_sent.fetch_add(1, Ordering::Relaxed);
                }
                seq += 1;
                written += 1;
            }
            res.sent += written;
            if !out.is_empty() {
                if let Err(e) = c.send(&out).await {
                    res.failure = Some(format!("{e:#}"));
                    failed = true;
                    break;
                }
            }
        }
        while let Some(el) = c.pop() {
            if el.is("message", NS_CLIENT) && el.attr("type") == Some("error") {
                res.errors += 1;
            } else if c.answer_iq(&el).await.is_err() {
                failed = true;
            }
        }
        if failed {
            break;
        }
    }
    shared.senders_done.fetch_add(1, Ordering::Relaxed);
    // Stay connected (answering pings) until the receivers have drained.
    if !failed {
        loop {
            tokio::select! {
                _ = stop.changed() => break,
                r = c.next() => match r {
                    Ok(el) => {
                        if el.is("message", NS_CLIENT) && el.attr("type") == Some("error") {
                            res.errors += 1;
                        } else if c.answer_iq(&el).await.is_err() {
                            break;
                        }
                    }
                    Err(_) => break,
                }
            }
        }
        c.close().await;
    }
    res
}

async fn receiver(
    mut c: Conn,
    pair: u64,
    shared: Arc<Shared>,
    credit: Option<Arc<Semaphore>>,
    mut stop: watch::Receiver<bool>,
) -> ReceiverResult {
    let mut r = ReceiverResult {
        hist: new_hist(),
        seen: Vec::new(),
        received: 0,
        duplicated: 0,
        out_of_order: 0,
        last_rx: 0,
        failure: None,
    };
    let mut max_seq: Option<u64> = None;
    let failure = c
        .receive(&mut stop, |el, now| {
            let Some(body) = el.get_child("body", NS_CLIENT) else {
                return;
            };
            let body = body.text();
            let mut f = body.split_ascii_whitespace().map(|s| s.parse::<u64>());
            let (Some(Ok(p)), Some(Ok(seq)), Some(Ok(t))) = (f.next(), f.next(), f.next()) else {
                return;
            };
            if p != pair || seq >= MAX_SEQ {
                return;
            }
            r.received += 1;
            r.last_rx = now;
            if let Some(credit) = &credit {
                credit.add_permits(1);
            }
            let word = (seq / 64) as usize;
            if word >= r.seen.len() {
                r.seen.resize(word + 1, 0);
            }
            let bit = 1u64 << (seq % 64);
            if r.seen[word] & bit != 0 {
                r.duplicated += 1;
                return;
            }
            r.seen[word] |= bit;
            if max_seq.is_some_and(|m| seq < m) {
                r.out_of_order += 1;
            }
            max_seq = Some(max_seq.map_or(seq, |m| m.max(seq)));
            if t >= shared.warm_end && t < shared.send_end {
                r.hist
                    .saturating_record((now.saturating_sub(t) / 1000).max(1));
                shared.measured_received.fetch_add(1, Ordering::Relaxed);
            }
        })
        .await;
    r.failure = failure;
    if r.failure.is_none() {
        c.close().await;
    }
    r
}

/// Waits, at most [`SETTLE_MAX`], until the measured servers are quiet: at most 20 ms of
/// CPU in half a second. Work a previous run left behind (a log folded into the
/// database, tables dumped, garbage collected) is then not charged to this one.
async fn settle(pids: &[u32]) {
    let total = || -> Option<f64> { pids.iter().map(|p| proc_cpu_secs(*p)).sum() };
    let Some(mut last) = total() else { return };
    let deadline = tokio::time::Instant::now() + SETTLE_MAX;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let Some(now) = total() else { return };
        if now - last <= 0.02 {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            eprintln!(
                "the server still used {:.0} % of a core after {} s: measuring anyway",
                200.0 * (now - last),
                SETTLE_MAX.as_secs()
            );
            return;
        }
        last = now;
    }
}

/// Longest [`settle`] waits.
const SETTLE_MAX: Duration = Duration::from_secs(30);
