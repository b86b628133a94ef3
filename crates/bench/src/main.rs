//! natter-bench: an XMPP load generator that speaks plain RFC 6120/6121, so
//! the same runs can drive natter, ejabberd and Prosody. Loopback targets only;
//! every run is bounded in count and time and stops by itself.

mod chat;
mod group;
mod idle;
mod login;
mod mam;
mod net;
mod offline;
mod scram;
mod upload;
mod xmpp;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};
use tokio::sync::Semaphore;

use crate::net::{loopback_target, tls_config, Sources};
use crate::xmpp::{Mech, Registered, Target, TlsMode};

#[derive(Parser)]
#[command(
    name = "natter-bench",
    version,
    about = "XMPP load generator (idle sessions, chat throughput/latency, login rate, \
             offline catch-up, archive paging, group fan-out, file upload) for any server on a loopback address"
)]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Clone)]
struct Common {
    /// Server host; must resolve to a loopback address.
    #[arg(long, global = true, default_value = "127.0.0.1")]
    host: String,
    /// Server port [default: 5223 with --tls direct, else 5222].
    #[arg(long, global = true)]
    port: Option<u16>,
    /// XMPP domain of the accounts (stream `to`, TLS server name).
    #[arg(long, global = true, default_value = "localhost")]
    domain: String,
    /// starttls, direct (XEP-0368) or none (server must allow SASL on plaintext loopback).
    #[arg(long, global = true, value_enum, default_value = "starttls")]
    tls: TlsMode,
    /// Allow TLS session resumption (off: every connection does a full handshake).
    #[arg(long, global = true)]
    tls_resume: bool,
    /// SASL mechanism.
    #[arg(long, global = true, value_enum, default_value = "auto")]
    mech: Mech,
    /// Account name pattern; %d is replaced by the account number.
    #[arg(long, global = true, default_value = "user%d")]
    users: String,
    /// Password of every account.
    #[arg(long, global = true, default_value = "password")]
    password: String,
    /// Number of the first account (to split one population over several processes).
    #[arg(long, global = true, default_value_t = 0)]
    offset: u64,
    /// Create the accounts first with XEP-0077 in-band registration (existing ones are fine).
    #[arg(long, global = true)]
    register: bool,
    /// Spread connections over source addresses 127.0.0.1 ..= 127.0.0.N.
    #[arg(long, global = true, default_value_t = 1)]
    sources: usize,
    /// Connections being set up (or registrations running) at once.
    #[arg(long, global = true, default_value_t = 16)]
    concurrency: usize,
    /// Runtime worker threads (1 = current-thread runtime).
    #[arg(long, global = true, default_value_t = 1)]
    threads: usize,
    /// Seconds allowed for any single wait on the server during setup.
    #[arg(long, global = true, default_value_t = 30)]
    step_timeout: u64,
    /// Resource to bind (login adds a counter).
    #[arg(long, global = true, default_value = "bench")]
    resource: String,
    /// Server process whose CPU time (utime+stime from /proc/PID/stat) the
    /// scenarios report over their measured window (msgs, logins or pages
    /// per CPU-second); group also reports its memory (VmRSS).
    #[arg(long, global = true)]
    server_pid: Option<u32>,
    /// Another node of a natter cluster (its client port; repeat for
    /// each): connections go round-robin over --port and these, and chat
    /// puts each receiver on the node after its sender's.
    #[arg(long = "node-port", global = true)]
    node_ports: Vec<u16>,
    /// Another cluster node's PID (repeat for each): its CPU time is added
    /// to --server-pid's in chat.
    #[arg(long = "node-pid", global = true)]
    node_pids: Vec<u32>,
    /// Derive SCRAM keys (PBKDF2) on every login instead of caching them per
    /// salt like real clients do (the generator's core then bounds logins/s).
    #[arg(long, global = true)]
    scram_no_cache: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// Hold N authenticated, bound, available sessions open.
    Idle(idle::IdleArgs),
    /// Message pairs: throughput, loss, order and latency.
    Chat(chat::ChatArgs),
    /// Message pairs across two federated servers: senders on this server,
    /// receivers on the --peer-* server (server-to-server throughput and
    /// latency).
    S2s(chat::S2sArgs),
    /// N logins (connect, TLS, SCRAM, bind, close) with --concurrency at once.
    Login(login::LoginArgs),
    /// Offline catch-up (XEP-0160): messages stored for offline receivers,
    /// delivered at their initial presence.
    Offline(offline::OfflineArgs),
    /// Archive paging (XEP-0313 + RSM): last page, pages backward, pages forward.
    Mam(mam::MamArgs),
    /// Group chat fan-out (XEP-0045): rooms of N members, a few senders per
    /// room at a fixed rate; every member's copies counted.
    Group(group::GroupArgs),
    /// HTTP File Upload (XEP-0363): slots, PUTs streamed from a generator,
    /// parallel GETs checked by SHA-256; MB/s both ways and server memory.
    Upload(upload::UploadArgs),
    /// Only create accounts offset .. offset+N (XEP-0077; existing ones are fine).
    Register {
        /// Accounts to create.
        n: u64,
    },
}

/// Process-wide monotonic clock origin; message timestamps are ns since it.
static EPOCH: OnceLock<Instant> = OnceLock::new();

pub fn now_ns() -> u64 {
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

pub fn instant_at(ns: u64) -> tokio::time::Instant {
    tokio::time::Instant::from_std(*EPOCH.get_or_init(Instant::now) + Duration::from_nanos(ns))
}

#[derive(Clone)]
pub struct Ctx {
    pub target: Arc<Target>,
    pub users: String,
    pub password: String,
    pub offset: u64,
    pub concurrency: usize,
    pub resource: String,
    pub server_pid: Option<u32>,
    /// Other cluster nodes' PIDs (chat adds their CPU time).
    pub node_pids: Vec<u32>,
}

/// CPU seconds (user + system) process `pid` has used so far.
pub fn proc_cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime and stime are fields 14 and 15.
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Some((utime + stime) / if tck > 0 { tck as f64 } else { 100.0 })
}

/// A `/proc/PID/status` field in KiB, e.g. `VmRSS:`.
pub fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Prints the server's CPU time over a window of `secs` in which `work`
/// `unit`s were done (with `--server-pid`); returns the units per CPU-second.
pub fn report_cpu(cpu: Option<f64>, secs: f64, work: f64, unit: &str) -> Option<f64> {
    let per_cpu = cpu.filter(|c| *c > 0.0).map(|c| work / c);
    if let Some(c) = cpu {
        println!(
            "server CPU {c:.2} s = {:.0}% of a core; {} {unit} per CPU-second",
            100.0 * c / secs.max(1e-9),
            per_cpu.map_or_else(|| "n/a".into(), |p| format!("{p:.0}"))
        );
    }
    per_cpu
}

impl Ctx {
    /// The server's CPU seconds so far, with `--server-pid`.
    pub fn server_cpu(&self) -> Option<f64> {
        self.server_pid.and_then(proc_cpu_secs)
    }

    /// Local part of account number `i` (already offset).
    pub fn user(&self, i: u64) -> String {
        if self.users.contains("%d") {
            self.users.replace("%d", &i.to_string())
        } else {
            format!("{}{i}", self.users)
        }
    }
}

/// Keeps the first few error messages of a run for the report.
#[derive(Default)]
pub struct Errors {
    count: AtomicUsize,
    first: Mutex<Vec<String>>,
}

impl Errors {
    pub fn add(&self, e: &anyhow::Error) {
        self.count.fetch_add(1, Ordering::Relaxed);
        let mut f = self.first.lock().unwrap();
        if f.len() < 5 {
            f.push(format!("{e:#}"));
        }
    }

    pub fn count(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// The first few errors kept.
    pub fn first(&self) -> Vec<String> {
        self.first.lock().unwrap().clone()
    }

    pub fn report(&self, what: &str) {
        let n = self.count();
        if n > 0 {
            eprintln!("{n} {what} failed; first errors:");
            for e in self.first.lock().unwrap().iter() {
                eprintln!("  {e}");
            }
        }
    }
}

/// Register accounts `numbers` (XEP-0077), `concurrency` at a time.
pub async fn register_all(ctx: &Arc<Ctx>, numbers: Vec<u64>) -> anyhow::Result<()> {
    let started = Instant::now();
    let sem = Arc::new(Semaphore::new(ctx.concurrency.max(1)));
    let errors = Arc::new(Errors::default());
    let created = Arc::new(AtomicUsize::new(0));
    let existed = Arc::new(AtomicUsize::new(0));
    let total = numbers.len();
    let mut tasks = tokio::task::JoinSet::new();
    for i in numbers {
        let (ctx, sem, errors) = (ctx.clone(), sem.clone(), errors.clone());
        let (created, existed) = (created.clone(), existed.clone());
        tasks.spawn(async move {
            let _permit = sem.acquire().await;
            let user = ctx.user(i);
            // Bounded: a few tries, for servers that shed load at connect.
            for attempt in 0..3 {
                match xmpp::register(&ctx.target, &user, &ctx.password).await {
                    Ok(Registered::Created) => {
                        created.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    Ok(Registered::Exists) => {
                        existed.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    Err(e) if attempt == 2 => errors.add(&e),
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    errors.report("registrations");
    println!(
        "registered: {} created, {} existed, {} failed of {total} in {:.1} s",
        created.load(Ordering::Relaxed),
        existed.load(Ordering::Relaxed),
        errors.count(),
        started.elapsed().as_secs_f64()
    );
    if errors.count() > 0 {
        bail!("registration failed for {} accounts", errors.count());
    }
    Ok(())
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let c = &cli.common;
    if c.sources == 0 || c.sources > 65_000 {
        bail!("--sources must be between 1 and 65000");
    }
    let port = c.port.unwrap_or(match c.tls {
        TlsMode::Direct => 5223,
        _ => 5222,
    });
    let addr = loopback_target(&c.host, port).await?;
    let mut others = Vec::new();
    for p in &c.node_ports {
        others.push(loopback_target(&c.host, *p).await?);
    }
    let target = Arc::new(Target {
        addr,
        others,
        next: Default::default(),
        domain: c.domain.clone(),
        tls: c.tls,
        tls_cfg: tls_config(c.tls_resume)?,
        sources: Sources::new(c.sources),
        mech: c.mech,
        step_timeout: Duration::from_secs(c.step_timeout.max(1)),
    });
    let ctx = Arc::new(Ctx {
        target,
        users: c.users.clone(),
        password: c.password.clone(),
        offset: c.offset,
        concurrency: c.concurrency.max(1),
        resource: c.resource.clone(),
        server_pid: c.server_pid,
        node_pids: c.node_pids.clone(),
    });
    if let Some(pid) = c.server_pid {
        if proc_cpu_secs(pid).is_none() {
            bail!("--server-pid {pid}: cannot read /proc/{pid}/stat");
        }
    }
    scram::NO_CACHE.store(c.scram_no_cache, Ordering::Relaxed);
    let register = c.register;
    match cli.cmd {
        Cmd::Idle(a) => idle::run(ctx, register, a).await,
        Cmd::Chat(a) => chat::run(ctx.clone(), ctx, register, a).await,
        Cmd::S2s(a) => {
            let peer = Arc::new(Target {
                addr: loopback_target(&c.host, a.peer_port).await?,
                domain: a.peer_domain.clone(),
                others: Vec::new(),
                next: Default::default(),
                ..Target::clone(&ctx.target)
            });
            let rx = Arc::new(Ctx {
                target: peer,
                server_pid: a.peer_server_pid,
                ..Ctx::clone(&ctx)
            });
            chat::run(ctx, rx, register, a.chat).await
        }
        Cmd::Login(a) => login::run(ctx, register, a).await,
        Cmd::Offline(a) => offline::run(ctx, register, a).await,
        Cmd::Mam(a) => mam::run(ctx, register, a).await,
        Cmd::Group(a) => group::run(ctx, register, a).await,
        Cmd::Upload(a) => upload::run(ctx, register, a).await,
        Cmd::Register { n } => register_all(&ctx, (0..n).map(|i| ctx.offset + i).collect()).await,
    }
}

fn main() -> std::process::ExitCode {
    match real_main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("natter-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn real_main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    now_ns();
    let threads = cli.common.threads.max(1);
    let rt = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    }
    .context("starting the tokio runtime")?;
    let r = rt.block_on(run(cli));
    // Do not wait for tasks still blocked on a dead server.
    rt.shutdown_timeout(Duration::from_secs(2));
    r
}
