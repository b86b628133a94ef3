//! `group`: XEP-0045 group chat fan-out. For each room size N (`--members`,
//! run one after another on fresh accounts and rooms), `--rooms` rooms of N
//! members, each member its own session. Setup, the same on every server:
//! the owner (member 0) creates the room by joining it, fetches the
//! muc#owner configuration form and submits it (members-only, persistent,
//! non-anonymous, archived, unmoderated, max users >= N: only the fields the
//! server's form offers; this also unlocks rooms that servers keep locked
//! until configured, status 201), adds the other N-1 members with muc#admin
//! IQs of `--batch` items, then the members join (`--concurrency` at once,
//! `<history maxstanzas='0'/>`) and each waits for its self-presence. The
//! measurement starts once every member has joined and has seen the
//! presence of all N occupants (or `--join-timeout` passed).
//!
//! Then `--senders` members per room (the first ones, owner included) send
//! `groupchat` messages at a fixed rate per room (`--rate`, open loop, the
//! same schedule and no-coordinated-omission rule as `chat --rate`). Every
//! member, senders included, receives the room's reflection of every
//! message; each copy counts as one delivered message. Each body is
//! `ROOM SENDER SEQ SEND_NS PADDING`; per member and per sender, the run
//! counts lost (sent in the measured window, never received), duplicated and
//! out-of-order copies, and records the latency of every copy.
//!
//! With `--server-pid`: the server's CPU time over the measured window (and
//! over the joins), and its resident memory (VmRSS) after the logins, once
//! everyone has joined, and at the end of the window.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use hdrhistogram::Histogram;
use natter_xml::{escape_attr, Element, NS_CLIENT};
use tokio::sync::{watch, Semaphore};

use crate::chat::{new_hist, setup, tally, Then};
use crate::net::need_files;
use crate::xmpp::{stanza_error, Conn};
use crate::{instant_at, now_ns, proc_cpu_secs, register_all, Ctx};

const NS_MUC: &str = "http://jabber.org/protocol/muc";
const NS_MUC_USER: &str = "http://jabber.org/protocol/muc#user";
const NS_MUC_ADMIN: &str = "http://jabber.org/protocol/muc#admin";
const NS_MUC_OWNER: &str = "http://jabber.org/protocol/muc#owner";
const NS_DATA: &str = "jabber:x:data";
const NS_ROOMCONFIG: &str = "http://jabber.org/protocol/muc#roomconfig";

#[derive(clap::Args)]
pub struct GroupArgs {
    /// Room sizes (members per room, owner included), run one after another
    /// on accounts of their own.
    #[arg(long, value_delimiter = ',', default_value = "10,100,1024")]
    pub members: Vec<u64>,
    /// Rooms of each size.
    #[arg(long, default_value_t = 1)]
    pub rooms: u64,
    /// Senders per room: its first members, the owner included.
    #[arg(long, default_value_t = 2)]
    pub senders: u64,
    /// Open loop: messages per second per room, over its senders; one value
    /// for every size, or one per size (same order as --members).
    #[arg(long, value_delimiter = ',', default_value = "10")]
    pub rate: Vec<f64>,
    /// Seconds measured, after the warm-up.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Seconds of sending before measuring starts.
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Seconds to wait after sending stops for copies still on their way.
    #[arg(long, default_value_t = 5.0)]
    pub drain: f64,
    /// Padding added to every body, in bytes.
    #[arg(long, default_value_t = 0)]
    pub body_bytes: usize,
    /// MUC service [default: conference.<domain>].
    #[arg(long)]
    pub service: Option<String>,
    /// Items per muc#admin IQ when adding the members.
    #[arg(long, default_value_t = 100)]
    pub batch: usize,
    /// Room names are PREFIX-N-K [default: a tag of this run, so that
    /// persistent rooms of earlier runs are not reused].
    #[arg(long)]
    pub room_prefix: Option<String>,
    /// Seconds allowed for all members to join and see every occupant.
    #[arg(long, default_value_t = 300.0)]
    pub join_timeout: f64,
    /// Also print the results as one JSON line per size.
    #[arg(long)]
    pub json: bool,
}

/// Messages written in one go at most.
const BATCH: usize = 64;
/// Open loop: a message sent at most this late counts from when it was sent.
const SLACK_NS: u64 = 2_000_000;
/// Highest sequence number a member tracks per sender.
const MAX_SEQ: u64 = 1 << 24;

/// Resident memory (VmRSS, KiB) of process `pid`.
pub fn proc_rss_kib(pid: u32) -> Option<u64> {
    crate::proc_status_kib(pid, "VmRSS:")
}

/// The send schedule, known once everyone has joined.
#[derive(Clone, Copy, Default)]
struct Timing {
    start: u64,
    warm_end: u64,
    send_end: u64,
}

struct Shared {
    members: u64,
    senders: u64,
    joined: AtomicUsize,
    /// Members whose join failed.
    join_failed: AtomicUsize,
    settled: AtomicUsize,
    measured_sent: AtomicU64,
    measured_received: AtomicU64,
    senders_done: AtomicUsize,
    first_error: Mutex<Option<String>>,
}

/// One member's session and what it knows of its room.
struct Member {
    conn: Conn,
    room: u64,
    index: u64,
    room_jid: String,
    /// Full occupant JID room@service/nick.
    occupant: String,
}

#[derive(Default)]
struct Track {
    seen: Vec<u64>,
    max_seq: Option<u64>,
}

struct MemberResult {
    room: u64,
    /// Per sender of the room.
    tracks: Vec<Track>,
    hist: Histogram<u64>,
    received: u64,
    duplicated: u64,
    out_of_order: u64,
    errors: u64,
    /// Sender only: sequence numbers sent inside the measured window.
    measured: Option<(u64, u64)>,
    sent: u64,
    failure: Option<String>,
}

fn nick(i: u64) -> String {
    format!("m{i}")
}

fn join_presence(occupant: &str) -> String {
    let mut s = String::from("<presence to='");
    escape_attr(occupant, &mut s);
    s.push_str(&format!(
        "'><x xmlns='{NS_MUC}'><history maxstanzas='0'/></x></presence>"
    ));
    s
}

/// Status codes of a MUC presence.
fn statuses(el: &Element) -> Vec<String> {
    el.get_child("x", NS_MUC_USER)
        .map(|x| {
            x.children()
                .filter(|c| c.name == "status")
                .filter_map(|c| c.attr("code").map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

pub async fn run(ctx: Arc<Ctx>, register: bool, a: GroupArgs) -> anyhow::Result<()> {
    if a.members.is_empty() || a.members.iter().any(|&n| n < 2) {
        bail!("--members: room sizes of at least 2");
    }
    if a.rooms == 0 || a.senders == 0 {
        bail!("--rooms and --senders must be at least 1");
    }
    if let Some(&n) = a.members.iter().find(|&&n| n < a.senders) {
        bail!(
            "--senders {} is more than a room of {n} has members",
            a.senders
        );
    }
    if !(a.rate.len() == 1 || a.rate.len() == a.members.len()) {
        bail!("--rate: one value, or one per --members size");
    }
    if a.rate.iter().any(|r| !(*r > 0.0 && *r <= 1_000_000.0)) {
        bail!("--rate must be in (0, 1000000]");
    }
    if !(a.duration > 0.0 && a.warmup >= 0.0 && a.drain >= 0.0) {
        bail!("--duration must be positive, --warmup and --drain not negative");
    }
    let biggest = a.members.iter().max().copied().unwrap_or(0) * a.rooms;
    need_files(biggest, &format!("{biggest} members"))?;
    let total: u64 = a.members.iter().map(|n| n * a.rooms).sum();
    if register {
        register_all(&ctx, (0..total).map(|i| ctx.offset + i).collect()).await?;
    }
    let service = a
        .service
        .clone()
        .unwrap_or_else(|| format!("conference.{}", ctx.target.domain));
    let prefix = a.room_prefix.clone().unwrap_or_else(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        format!("bench{t}")
    });
    let mut base = ctx.offset;
    let mut failed = false;
    for (i, &n) in a.members.iter().enumerate() {
        let rate = if a.rate.len() == 1 {
            a.rate[0]
        } else {
            a.rate[i]
        };
        let r = run_size(&ctx, &a, &service, &prefix, base, n, rate).await;
        base += n * a.rooms;
        if let Err(e) = r {
            eprintln!("group of {n}: {e:#}");
            failed = true;
        }
        // Let the server finish the leave broadcasts of this size.
        if i + 1 < a.members.len() {
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }
    if failed {
        bail!("some sizes failed");
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn run_size(
    ctx: &Arc<Ctx>,
    a: &GroupArgs,
    service: &str,
    prefix: &str,
    base: u64,
    n: u64,
    rate: f64,
) -> anyhow::Result<()> {
    let rooms = a.rooms;
    let pid = ctx.server_pid;
    let rss = || pid.and_then(proc_rss_kib);
    eprintln!(
        "group: {rooms} room(s) of {n} members, {} senders per room, {rate} msgs/s per room",
        a.senders
    );
    let t0 = Instant::now();
    let numbers: Vec<u64> = (0..n * rooms).map(|i| base + i).collect();
    let conns = setup(ctx, numbers, Then::Presence).await?;
    let login_s = t0.elapsed().as_secs_f64();
    let rss_login = rss();

    // Rooms: the owner creates, configures and fills each.
    let t1 = Instant::now();
    let cpu_join0 = ctx.server_cpu();
    let mut members = Vec::with_capacity(conns.len());
    let mut config_notes = Vec::new();
    for (i, conn) in conns.into_iter().enumerate() {
        let (room, index) = (i as u64 / n, i as u64 % n);
        let room_jid = format!("{prefix}-{n}-{room}@{service}");
        let occupant = format!("{room_jid}/{}", nick(index));
        members.push(Member {
            conn,
            room,
            index,
            room_jid,
            occupant,
        });
    }
    for room in 0..rooms {
        let jids: Vec<String> = (1..n)
            .map(|j| format!("{}@{}", ctx.user(base + room * n + j), ctx.target.domain))
            .collect();
        let owner = &mut members[(room * n) as usize];
        let note = create_room(owner, &jids, n, a.batch)
            .await
            .with_context(|| format!("creating room {}", owner.room_jid))?;
        if room == 0 {
            config_notes = note;
        }
    }
    eprintln!(
        "rooms created and configured ({}); members joining",
        config_notes.join(", ")
    );

    let shared = Arc::new(Shared {
        members: n,
        senders: a.senders,
        joined: AtomicUsize::new(0),
        join_failed: AtomicUsize::new(0),
        settled: AtomicUsize::new(0),
        measured_sent: AtomicU64::new(0),
        measured_received: AtomicU64::new(0),
        senders_done: AtomicUsize::new(0),
        first_error: Mutex::new(None),
    });
    let (timing_tx, timing_rx) = watch::channel(Timing::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let join_sem = Arc::new(Semaphore::new(ctx.concurrency));
    let pad = "x".repeat(a.body_bytes);
    let mut tasks = Vec::new();
    for m in members {
        let sender = m.index < a.senders;
        // Stagger the senders over one interval.
        let phase = (m.room * a.senders + m.index) as f64 / (rooms * a.senders) as f64;
        let interval_ns = (1e9 * a.senders as f64 / rate).max(1.0);
        tasks.push(tokio::spawn(member(
            m,
            sender.then_some((interval_ns, phase)),
            pad.clone(),
            shared.clone(),
            join_sem.clone(),
            timing_rx.clone(),
            stop_rx.clone(),
        )));
    }
    // Wait for the joins, then for everyone to have seen every occupant.
    let everyone = (n * rooms) as usize;
    let deadline = Instant::now() + Duration::from_secs_f64(a.join_timeout);
    let mut last_print = Instant::now();
    while shared.settled.load(Ordering::Relaxed) < everyone && Instant::now() < deadline {
        if tasks.iter().all(|t| t.is_finished())
            || shared.joined.load(Ordering::Relaxed) + shared.join_failed.load(Ordering::Relaxed)
                >= everyone
                && shared.join_failed.load(Ordering::Relaxed) > 0
        {
            break;
        }
        if last_print.elapsed() > Duration::from_secs(10) {
            last_print = Instant::now();
            eprintln!(
                "  {} of {everyone} joined, {} saw all {n} occupants",
                shared.joined.load(Ordering::Relaxed),
                shared.settled.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let joined = shared.joined.load(Ordering::Relaxed);
    let settled = shared.settled.load(Ordering::Relaxed);
    let join_s = t1.elapsed().as_secs_f64();
    let join_cpu = cpu_join0.zip(ctx.server_cpu()).map(|(a, b)| b - a);
    if joined < everyone {
        let _ = stop_tx.send(true);
        let mut why = Vec::new();
        for t in tasks {
            if let Ok(r) = t.await {
                if let Some(f) = r.failure {
                    if why.len() < 3 {
                        why.push(f);
                    }
                }
            }
        }
        bail!(
            "only {joined} of {everyone} members joined within {:.0} s: {}",
            a.join_timeout,
            why.join("; ")
        );
    }
    if settled < everyone {
        eprintln!(
            "warning: {settled} of {everyone} members saw all {n} occupants' presence \
             within --join-timeout; measuring anyway"
        );
    }
    // Let the last presence broadcasts go out before measuring.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_joined = rss();
    eprintln!(
        "{everyone} members joined in {join_s:.1} s (logins took {login_s:.1} s); sending: \
         {:.0} s warm-up, {:.0} s measured, open loop {rate} msgs/s per room",
        a.warmup, a.duration
    );

    let start = now_ns() + 200_000_000;
    let warm_end = start + (a.warmup * 1e9) as u64;
    let send_end = warm_end + (a.duration * 1e9) as u64;
    let _ = timing_tx.send(Timing {
        start,
        warm_end,
        send_end,
    });
    let cpu_task = pid.map(|pid| {
        tokio::spawn(async move {
            tokio::time::sleep_until(instant_at(warm_end)).await;
            let c0 = proc_cpu_secs(pid);
            tokio::time::sleep_until(instant_at(send_end)).await;
            let c1 = proc_cpu_secs(pid);
            (c0.zip(c1).map(|(a, b)| b - a), proc_rss_kib(pid))
        })
    });
    tokio::time::sleep_until(instant_at(send_end)).await;
    let drain_end = tokio::time::Instant::now() + Duration::from_secs_f64(a.drain);
    let total_senders = (rooms * a.senders) as usize;
    loop {
        let done = shared.senders_done.load(Ordering::Relaxed) >= total_senders;
        let all_in = shared.measured_received.load(Ordering::Relaxed)
            >= shared.measured_sent.load(Ordering::Relaxed) * n;
        if (done && all_in) || tokio::time::Instant::now() >= drain_end {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop_tx.send(true);

    let mut results = Vec::with_capacity(tasks.len());
    for t in tasks {
        results.push(t.await.context("member task")?);
    }
    // Each sender's measured range, by (room, sender).
    let mut ranges = vec![None; (rooms * a.senders) as usize];
    let (mut sent, mut errors) = (0u64, 0u64);
    let mut failures = Vec::new();
    for (i, r) in results.iter().enumerate() {
        let (room, index) = (i as u64 / n, i as u64 % n);
        if index < a.senders {
            ranges[(room * a.senders + index) as usize] = r.measured;
            sent += r.sent;
        }
        errors += r.errors;
        failures.extend(r.failure.clone());
    }
    let mut hist = new_hist();
    let (mut delivered, mut lost, mut dup, mut ooo, mut received) = (0u64, 0u64, 0u64, 0u64, 0u64);
    for r in &results {
        hist.add(&r.hist).ok();
        received += r.received;
        dup += r.duplicated;
        ooo += r.out_of_order;
        for (s, t) in r.tracks.iter().enumerate() {
            if let Some((first, last)) = ranges[(r.room * a.senders + s as u64) as usize] {
                let (d, l) = tally(&t.seen, first, last);
                delivered += d;
                lost += l;
            }
        }
    }
    for f in failures.iter().take(5) {
        eprintln!("session failed: {f}");
    }
    let measured_sent: u64 = ranges.iter().flatten().map(|(f, l)| l - f + 1).sum();
    let expected = measured_sent * n;
    let q = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    let per_s = delivered as f64 / a.duration;
    let (server_cpu, rss_end) = match cpu_task {
        Some(t) => t.await.unwrap_or((None, None)),
        None => (None, None),
    };
    let per_cpu = server_cpu
        .filter(|c| *c > 0.0)
        .map(|c| delivered as f64 / c);
    let first_error = shared.first_error.lock().unwrap().clone();
    let mib =
        |k: Option<u64>| k.map_or_else(|| "n/a".into(), |k| format!("{:.1}", k as f64 / 1024.0));
    let per_member = rss_login
        .zip(rss_joined)
        .map(|(l, j)| (j as f64 - l as f64) / everyone as f64);
    println!(
        "group {rooms} x {n} members, {} senders/room, {rate} msgs/s per room = {:.0} copies/s offered",
        a.senders,
        rate * (rooms * n) as f64
    );
    println!(
        "setup: logins {login_s:.1} s, rooms + joins {join_s:.1} s{} | {settled} of {everyone} saw all occupants",
        join_cpu.map_or_else(String::new, |c| format!(" (server CPU {c:.2} s)"))
    );
    if pid.is_some() {
        println!(
            "server RSS MiB: logged in {} | joined {} ({} KiB per member) | end of window {}",
            mib(rss_login),
            mib(rss_joined),
            per_member.map_or_else(|| "n/a".into(), |p| format!("{p:.1}")),
            mib(rss_end)
        );
    }
    if let Some(c) = server_cpu {
        println!(
            "server CPU {c:.2} s over the measured {:.0} s = {:.0}% of a core; {} copies per CPU-second",
            a.duration,
            100.0 * c / a.duration,
            per_cpu.map(|p| format!("{p:.0}")).unwrap_or_else(|| "n/a".into())
        );
    }
    println!(
        "sent {sent} (measured {measured_sent}, x {n} members = {expected} copies) | delivered {delivered} = \
         {per_s:.0} copies/s | lost {lost} | duplicated {dup} | out-of-order {ooo} | error replies {errors}{}",
        first_error
            .as_ref()
            .map_or_else(String::new, |e| format!(" (first: {e})"))
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
            "scenario": "group",
            "members": n,
            "rooms": rooms,
            "senders": a.senders,
            "rate_per_room": rate,
            "offered_per_s": rate * (rooms * n) as f64,
            "duration_s": a.duration,
            "body_bytes": a.body_bytes,
            "room_config": config_notes,
            "login_s": login_s,
            "join_s": join_s,
            "join_server_cpu_s": join_cpu,
            "joined": joined,
            "settled": settled,
            "sent": sent,
            "measured_sent": measured_sent,
            "expected": expected,
            "received": received,
            "delivered": delivered,
            "delivered_per_s": per_s,
            "lost": lost,
            "duplicated": dup,
            "out_of_order": ooo,
            "error_replies": errors,
            "first_error": first_error,
            "failed_sessions": failures.len(),
            "p50_ms": q(0.5),
            "p90_ms": q(0.9),
            "p99_ms": q(0.99),
            "p999_ms": q(0.999),
            "max_ms": hist.max() as f64 / 1000.0,
            "server_cpu_s": server_cpu,
            "msgs_per_cpu_s": per_cpu,
            "rss_login_kib": rss_login,
            "rss_joined_kib": rss_joined,
            "rss_end_kib": rss_end,
            "rss_per_member_kib": per_member,
        });
        println!("{j}");
    }
    if delivered == 0 {
        bail!("no message was delivered");
    }
    Ok(())
}

/// Wait for the answer to IQ `id`, failing on an error reply.
async fn iq_ok(c: &mut Conn, id: &str, what: &str) -> anyhow::Result<Element> {
    let r = c.wait_iq(id, what).await?;
    if r.attr("type") != Some("result") {
        let text = r
            .get_child("error", NS_CLIENT)
            .and_then(|e| e.child_text("text", "urn:ietf:params:xml:ns:xmpp-stanzas"))
            .unwrap_or_default();
        bail!("{what}: {} {text}", stanza_error(&r));
    }
    Ok(r)
}

/// The owner joins (creating the room), configures it and adds the members.
/// Returns notes on the configuration applied.
async fn create_room(
    owner: &mut Member,
    member_jids: &[String],
    n: u64,
    batch: usize,
) -> anyhow::Result<Vec<String>> {
    let c = &mut owner.conn;
    c.send(&join_presence(&owner.occupant)).await?;
    let deadline = tokio::time::Instant::now() + c.step_timeout();
    let created = loop {
        let el = match tokio::time::timeout_at(deadline, c.next()).await {
            Ok(r) => r.context("waiting for the owner's self-presence")?,
            Err(_) => bail!("timed out waiting for the owner's self-presence"),
        };
        if c.answer_iq(&el).await? {
            continue;
        }
        if el.name == "presence" && el.attr("from") == Some(owner.occupant.as_str()) {
            if el.attr("type") == Some("error") {
                bail!("the room refused its creator: {}", stanza_error(&el));
            }
            let st = statuses(&el);
            if st.iter().any(|s| s == "110") || el.attr("type").is_none() {
                break st.iter().any(|s| s == "201");
            }
        }
    };
    let mut room_attr = String::new();
    escape_attr(&owner.room_jid, &mut room_attr);
    // The server's configuration form, to submit only fields it knows.
    c.send(&format!(
        "<iq type='get' id='cfg1' to='{room_attr}'><query xmlns='{NS_MUC_OWNER}'/></iq>"
    ))
    .await?;
    let form = c.wait_iq("cfg1", "configuration form").await?;
    let fields: Vec<Element> = form
        .get_child("query", NS_MUC_OWNER)
        .and_then(|q| q.get_child("x", NS_DATA))
        .map(|x| {
            x.children()
                .filter(|f| f.name == "field")
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    let offered = |var: &str| fields.iter().find(|f| f.attr("var") == Some(var));
    let blind = fields.is_empty();
    let mut want: Vec<(&str, String)> = vec![
        ("muc#roomconfig_persistentroom", "1".into()),
        ("muc#roomconfig_membersonly", "1".into()),
        ("muc#roomconfig_moderatedroom", "0".into()),
        ("muc#roomconfig_whois", "anyone".into()),
        ("muc#roomconfig_publicroom", "0".into()),
    ];
    // Archiving: XEP-0045/0313 name, or ejabberd's "mam".
    match (offered("muc#roomconfig_enablearchiving"), offered("mam")) {
        (None, Some(_)) => want.push(("mam", "1".into())),
        _ => want.push(("muc#roomconfig_enablearchiving", "1".into())),
    }
    // Max users: the smallest offered choice that holds n, else n.
    let maxusers = match offered("muc#roomconfig_maxusers") {
        Some(f) => {
            let mut opts: Vec<u64> = f
                .children()
                .filter(|o| o.name == "option")
                .filter_map(|o| o.child_text("value", NS_DATA))
                .filter_map(|v| v.trim().parse().ok())
                .collect();
            opts.sort_unstable();
            if opts.is_empty() {
                Some(n.to_string())
            } else {
                Some(
                    opts.iter()
                        .find(|&&o| o >= n)
                        .or(opts.last())
                        .unwrap()
                        .to_string(),
                )
            }
        }
        None if blind => Some(n.to_string()),
        None => None,
    };
    let no_maxusers = maxusers.is_none();
    if let Some(m) = maxusers {
        want.push(("muc#roomconfig_maxusers", m));
    }
    let mut x = format!(
        "<x xmlns='{NS_DATA}' type='submit'><field var='FORM_TYPE' type='hidden'>\
         <value>{NS_ROOMCONFIG}</value></field>"
    );
    let mut notes = Vec::new();
    let mut missing = Vec::new();
    for (var, value) in &want {
        if blind || offered(var).is_some() {
            x.push_str(&format!(
                "<field var='{var}'><value>{value}</value></field>"
            ));
            notes.push(format!(
                "{}={value}",
                var.trim_start_matches("muc#roomconfig_")
            ));
        } else {
            missing.push(var.trim_start_matches("muc#roomconfig_").to_string());
        }
    }
    x.push_str("</x>");
    if no_maxusers {
        missing.push("maxusers".into());
    }
    if !missing.is_empty() {
        notes.push(format!("not in the server's form: {}", missing.join(" ")));
    }
    if blind {
        notes.push("no form returned, submitted blind".into());
    }
    if created {
        notes.push("new room (201)".into());
    }
    c.send(&format!(
        "<iq type='set' id='cfg2' to='{room_attr}'><query xmlns='{NS_MUC_OWNER}'>{x}</query></iq>"
    ))
    .await?;
    iq_ok(c, "cfg2", "submitting the room configuration").await?;
    for (b, chunk) in member_jids.chunks(batch.max(1)).enumerate() {
        let mut iq =
            format!("<iq type='set' id='aff{b}' to='{room_attr}'><query xmlns='{NS_MUC_ADMIN}'>");
        for j in chunk {
            iq.push_str("<item jid='");
            escape_attr(j, &mut iq);
            iq.push_str("' affiliation='member'/>");
        }
        iq.push_str("</query></iq>");
        c.send(&iq).await?;
        iq_ok(c, &format!("aff{b}"), "adding members (muc#admin)").await?;
    }
    // Some servers (Prosody 0.12) apply only the first item of an IQ:
    // check the member list and add whoever is missing one per IQ.
    c.send(&format!(
        "<iq type='get' id='mlist' to='{room_attr}'><query xmlns='{NS_MUC_ADMIN}'>\
         <item affiliation='member'/></query></iq>"
    ))
    .await?;
    let list = iq_ok(c, "mlist", "member list (muc#admin)").await?;
    let listed: std::collections::HashSet<String> = list
        .get_child("query", NS_MUC_ADMIN)
        .map(|q| {
            q.children()
                .filter(|i| i.name == "item")
                .filter_map(|i| i.attr("jid"))
                .map(|j| j.split('/').next().unwrap_or(j).to_ascii_lowercase())
                .collect()
        })
        .unwrap_or_default();
    let missing: Vec<&String> = member_jids
        .iter()
        .filter(|j| !listed.contains(&j.to_ascii_lowercase()))
        .collect();
    if missing.is_empty() {
        notes.push(format!("muc#admin {} items per IQ", batch.max(1)));
    } else {
        notes.push(format!(
            "muc#admin: only {} of {} members after batches of {}, the other {} added one per IQ",
            listed.len(),
            member_jids.len(),
            batch.max(1),
            missing.len()
        ));
        for (b, j) in missing.into_iter().enumerate() {
            let mut iq = format!(
                "<iq type='set' id='one{b}' to='{room_attr}'><query xmlns='{NS_MUC_ADMIN}'><item jid='"
            );
            escape_attr(j, &mut iq);
            iq.push_str("' affiliation='member'/></query></iq>");
            c.send(&iq).await?;
            iq_ok(c, &format!("one{b}"), "adding a member (muc#admin)").await?;
        }
    }
    Ok(notes)
}

/// What a member's stanza means to it.
enum Seen {
    SelfJoined,
    JoinRefused(String),
    Other,
}

struct Tally {
    res: MemberResult,
    /// Occupants (nick indexes) whose presence this member has seen.
    occupants: Vec<u64>,
    occupants_seen: u64,
    settled: bool,
    timing: Timing,
}

impl Tally {
    fn on_stanza(&mut self, m: &Member, el: &Element, now: u64, shared: &Shared) -> Seen {
        if el.name == "presence" {
            let Some(from) = el.attr("from") else {
                return Seen::Other;
            };
            let Some(nick) = from
                .strip_prefix(m.room_jid.as_str())
                .and_then(|r| r.strip_prefix('/'))
            else {
                return Seen::Other;
            };
            if el.attr("type") == Some("error") {
                if nick == self::nick(m.index) {
                    let text = el
                        .get_child("error", NS_CLIENT)
                        .and_then(|e| e.child_text("text", "urn:ietf:params:xml:ns:xmpp-stanzas"))
                        .unwrap_or_default();
                    return Seen::JoinRefused(format!("{} {text}", stanza_error(el)));
                }
                return Seen::Other;
            }
            if el.attr("type").is_some() {
                return Seen::Other;
            }
            if let Some(i) = nick.strip_prefix('m').and_then(|s| s.parse::<u64>().ok()) {
                if i < shared.members {
                    let (w, b) = ((i / 64) as usize, 1u64 << (i % 64));
                    if self.occupants[w] & b == 0 {
                        self.occupants[w] |= b;
                        self.occupants_seen += 1;
                        if self.occupants_seen == shared.members && !self.settled {
                            self.settled = true;
                            shared.settled.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                if i == m.index {
                    return Seen::SelfJoined;
                }
            }
            return Seen::Other;
        }
        if el.name != "message" {
            return Seen::Other;
        }
        if el.attr("type") == Some("error") {
            self.res.errors += 1;
            let mut fe = shared.first_error.lock().unwrap();
            if fe.is_none() {
                let text = el
                    .get_child("error", NS_CLIENT)
                    .and_then(|e| e.child_text("text", "urn:ietf:params:xml:ns:xmpp-stanzas"))
                    .unwrap_or_default();
                *fe = Some(format!("{} {text}", stanza_error(el)).trim().to_string());
            }
            return Seen::Other;
        }
        let Some(body) = el.get_child("body", NS_CLIENT) else {
            return Seen::Other;
        };
        let body = body.text();
        let mut f = body.split_ascii_whitespace().map(|s| s.parse::<u64>());
        let (Some(Ok(room)), Some(Ok(s)), Some(Ok(seq)), Some(Ok(t))) =
            (f.next(), f.next(), f.next(), f.next())
        else {
            return Seen::Other;
        };
        if room != m.room || s >= shared.senders || seq >= MAX_SEQ {
            return Seen::Other;
        }
        self.res.received += 1;
        let tr = &mut self.res.tracks[s as usize];
        let word = (seq / 64) as usize;
        if word >= tr.seen.len() {
            tr.seen.resize(word + 1, 0);
        }
        let bit = 1u64 << (seq % 64);
        if tr.seen[word] & bit != 0 {
            self.res.duplicated += 1;
            return Seen::Other;
        }
        tr.seen[word] |= bit;
        if tr.max_seq.is_some_and(|mx| seq < mx) {
            self.res.out_of_order += 1;
        }
        tr.max_seq = Some(tr.max_seq.map_or(seq, |mx| mx.max(seq)));
        if self.timing.start != 0 && t >= self.timing.warm_end && t < self.timing.send_end {
            self.res
                .hist
                .saturating_record((now.saturating_sub(t) / 1000).max(1));
            shared.measured_received.fetch_add(1, Ordering::Relaxed);
        }
        Seen::Other
    }
}

#[allow(clippy::too_many_arguments)]
async fn member(
    mut m: Member,
    schedule: Option<(f64, f64)>,
    pad: String,
    shared: Arc<Shared>,
    join_sem: Arc<Semaphore>,
    mut timing_rx: watch::Receiver<Timing>,
    mut stop: watch::Receiver<bool>,
) -> MemberResult {
    let mut tally = Tally {
        res: MemberResult {
            room: m.room,
            tracks: (0..shared.senders).map(|_| Track::default()).collect(),
            hist: new_hist(),
            received: 0,
            duplicated: 0,
            out_of_order: 0,
            errors: 0,
            measured: None,
            sent: 0,
            failure: None,
        },
        occupants: vec![0; shared.members.div_ceil(64) as usize],
        occupants_seen: 0,
        settled: false,
        timing: Timing::default(),
    };
    // Join (the owner already has).
    if m.index != 0 {
        if let Err(f) = join(&mut m, &mut tally, &shared, &join_sem).await {
            if shared.join_failed.fetch_add(1, Ordering::Relaxed) < 3 {
                eprintln!("{}: {f}", m.occupant);
            }
            tally.res.failure = Some(f);
            return tally.res;
        }
    } else {
        tally.occupants[0] |= 1;
        tally.occupants_seen = 1;
    }
    shared.joined.fetch_add(1, Ordering::Relaxed);
    if shared.members == 1 && !tally.settled {
        tally.settled = true;
        shared.settled.fetch_add(1, Ordering::Relaxed);
    }

    let mut room_attr = String::new();
    escape_attr(&m.room_jid, &mut room_attr);
    let mut out = String::new();
    let mut seq: u64 = 0;
    let mut sending = schedule.is_some();
    let mut done_counted = false;
    loop {
        // Stanzas already read (the join may leave some queued) first.
        let now = now_ns();
        let mut failed = false;
        while let Some(el) = m.conn.pop() {
            match m.conn.answer_iq(&el).await {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => {
                    tally.res.failure = Some(format!("{e:#}"));
                    failed = true;
                    break;
                }
            }
            tally.on_stanza(&m, &el, now, &shared);
        }
        if failed {
            break;
        }
        let t = tally.timing;
        let next_due = match schedule {
            Some((interval_ns, phase)) if sending && t.start != 0 => Some(instant_at(
                t.start + ((seq as f64 + phase) * interval_ns) as u64,
            )),
            _ => None,
        };
        let mut due = false;
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            r = timing_rx.changed(), if t.start == 0 => {
                if r.is_err() { break; }
                tally.timing = *timing_rx.borrow();
                continue;
            }
            _ = tokio::time::sleep_until(next_due.unwrap_or_else(tokio::time::Instant::now)), if next_due.is_some() => {
                due = true;
            }
            r = m.conn.read_some() => {
                if let Err(e) = r {
                    tally.res.failure = Some(format!("{e:#}"));
                    break;
                }
            }
        }
        if due {
            let (interval_ns, phase) = schedule.expect("sender");
            let now = now_ns();
            let behind =
                ((now.saturating_sub(t.start)) as f64 / interval_ns - phase).floor() as u64 + 1;
            let n = (behind.saturating_sub(seq) as usize).clamp(1, BATCH);
            out.clear();
            for _ in 0..n {
                let due_at = t.start + ((seq as f64 + phase) * interval_ns) as u64;
                let ts = if now.saturating_sub(due_at) <= SLACK_NS {
                    now
                } else {
                    due_at
                };
                if ts >= t.send_end {
                    sending = false;
                    break;
                }
                use std::fmt::Write;
                let _ = write!(
                    out,
                    "<message to='{room_attr}' type='groupchat' id='{}-{}-{seq}'><body>{} {} {seq} {ts} {pad}</body></message>",
                    m.room, m.index, m.room, m.index
                );
                if ts >= t.warm_end {
                    tally.res.measured = Some(match tally.res.measured {
                        Some((f, _)) => (f, seq),
                        None => (seq, seq),
                    });
                    shared.measured_sent.fetch_add(1, Ordering::Relaxed);
                }
                seq += 1;
                tally.res.sent += 1;
            }
            if !out.is_empty() {
                if let Err(e) = m.conn.send(&out).await {
                    tally.res.failure = Some(format!("{e:#}"));
                    break;
                }
            }
        }
        if schedule.is_some() && !sending && !done_counted {
            done_counted = true;
            shared.senders_done.fetch_add(1, Ordering::Relaxed);
        }
    }
    if schedule.is_some() && !done_counted {
        shared.senders_done.fetch_add(1, Ordering::Relaxed);
    }
    if tally.res.failure.is_none() {
        m.conn.close().await;
    }
    tally.res
}

/// Join the room and wait for the self-presence; the reason when that fails.
async fn join(
    m: &mut Member,
    tally: &mut Tally,
    shared: &Shared,
    join_sem: &Semaphore,
) -> Result<(), String> {
    let _permit = join_sem.acquire().await;
    m.conn
        .send(&join_presence(&m.occupant))
        .await
        .map_err(|e| format!("{e:#}"))?;
    let deadline = tokio::time::Instant::now() + m.conn.step_timeout();
    loop {
        let el = match tokio::time::timeout_at(deadline, m.conn.next()).await {
            Ok(Ok(el)) => el,
            Ok(Err(e)) => return Err(format!("joining: {e:#}")),
            Err(_) => return Err("timed out waiting for the self-presence".into()),
        };
        match m.conn.answer_iq(&el).await {
            Ok(true) => continue,
            Ok(false) => {}
            Err(e) => return Err(format!("{e:#}")),
        }
        match tally.on_stanza(m, &el, now_ns(), shared) {
            Seen::SelfJoined => return Ok(()),
            Seen::JoinRefused(e) => return Err(format!("join refused: {e}")),
            Seen::Other => {}
        }
    }
}
