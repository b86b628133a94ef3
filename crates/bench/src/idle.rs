//! `idle N`: N sessions that connect, authenticate, bind, fetch the roster,
//! send initial presence, then sit there answering server pings.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use tokio::sync::{watch, Notify, Semaphore};

use crate::net::raise_nofile;
use crate::xmpp::Conn;
use crate::{register_all, Ctx, Errors};

#[derive(clap::Args)]
pub struct IdleArgs {
    /// Sessions to open (at most ~19,900 per process: a process may hold 20,000 files).
    pub n: u64,
    /// Seconds to hold the sessions once all are up (Ctrl-C ends sooner).
    #[arg(long, default_value_t = 3600)]
    pub hold: u64,
    /// Seconds allowed for bringing all sessions up.
    #[arg(long, default_value_t = 600)]
    pub setup_timeout: u64,
    /// Leave parked sessions instead of connected ones: each enables
    /// XEP-0198 resumption, then drops its connection without closing the
    /// stream (a phone losing its network), so the server holds it for
    /// `c2s.resume_timeout_secs` (what a parked session costs).
    #[arg(long)]
    pub park: bool,
}

#[derive(Default)]
struct Counters {
    up: AtomicUsize,
    done: AtomicUsize,
    dropped: AtomicUsize,
    pings: AtomicU64,
    changed: Notify,
}

pub async fn run(ctx: Arc<Ctx>, register: bool, a: IdleArgs) -> anyhow::Result<()> {
    let limit = raise_nofile();
    if a.n + 64 > limit {
        bail!(
            "{} sessions need {} open files but this process may hold {limit}: \
             run several processes with --offset (e.g. 2 × 10000 with --offset 0 and --offset 10000)",
            a.n,
            a.n + 64
        );
    }
    let numbers: Vec<u64> = (0..a.n).map(|i| ctx.offset + i).collect();
    if register {
        register_all(&ctx, numbers.clone()).await?;
    }
    let counters = Arc::new(Counters::default());
    let errors = Arc::new(Errors::default());
    let sem = Arc::new(Semaphore::new(ctx.concurrency));
    let (stop_tx, stop_rx) = watch::channel(false);
    let setup_deadline = tokio::time::Instant::now() + Duration::from_secs(a.setup_timeout);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in numbers {
        let (ctx, counters, errors, sem) =
            (ctx.clone(), counters.clone(), errors.clone(), sem.clone());
        let mut stop = stop_rx.clone();
        let park = a.park;
        tasks.spawn(async move {
            let setup = async {
                let _permit = sem.acquire().await?;
                let mut c =
                    Conn::login(&ctx.target, &ctx.user(i), &ctx.password, &ctx.resource).await?;
                c.roster_and_presence().await?;
                if park {
                    c.send("<enable xmlns='urn:xmpp:sm:3' resume='true'/>")
                        .await?;
                    loop {
                        let el = c.next_step("<enabled/>").await?;
                        if el.name == "enabled" {
                            break;
                        }
                        if el.name == "failed" {
                            anyhow::bail!("stream management refused: {el}");
                        }
                    }
                }
                anyhow::Ok(c)
            };
            let conn = tokio::select! {
                r = tokio::time::timeout_at(setup_deadline, setup) => match r {
                    Ok(r) => r,
                    Err(_) => Err(anyhow::anyhow!("setup deadline passed")),
                },
                _ = stop.changed() => Err(anyhow::anyhow!("stopped during setup")),
            };
            let mut conn = match conn {
                Ok(c) => {
                    counters.up.fetch_add(1, Ordering::Relaxed);
                    c
                }
                Err(e) => {
                    errors.add(&e);
                    counters.done.fetch_add(1, Ordering::Relaxed);
                    counters.changed.notify_one();
                    return;
                }
            };
            counters.done.fetch_add(1, Ordering::Relaxed);
            counters.changed.notify_one();
            if park {
                // Dropped, not closed: the server parks the session.
                drop(conn);
                return;
            }
            // Hold: answer pings until told to stop or the server drops us.
            loop {
                tokio::select! {
                    _ = stop.changed() => {
                        conn.close().await;
                        break;
                    }
                    r = conn.next() => match r {
                        Ok(el) => {
                            let before = conn.pings;
                            if conn.answer_iq(&el).await.is_err() {
                                counters.dropped.fetch_add(1, Ordering::Relaxed);
                                break;
                            }
                            counters.pings.fetch_add(conn.pings - before, Ordering::Relaxed);
                        }
                        Err(_) => {
                            counters.dropped.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                    }
                }
            }
        });
    }

    let total = a.n as usize;
    let mut last_print = Instant::now();
    let mut interrupted = false;
    while counters.done.load(Ordering::Relaxed) < total {
        tokio::select! {
            _ = counters.changed.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = tokio::signal::ctrl_c() => { interrupted = true; break; }
        }
        if tokio::time::Instant::now() > setup_deadline + Duration::from_secs(5) {
            break;
        }
        if last_print.elapsed() >= Duration::from_secs(2) {
            last_print = Instant::now();
            eprintln!(
                "connecting: {} up, {} failed of {total}",
                counters.up.load(Ordering::Relaxed),
                errors.count()
            );
        }
    }
    let setup_secs = started.elapsed().as_secs_f64();
    let up = counters.up.load(Ordering::Relaxed);
    errors.report("sessions");
    println!(
        "READY {up} sessions ({} failed) in {setup_secs:.2} s: {:.0} sessions/s set up",
        errors.count(),
        up as f64 / setup_secs.max(1e-9)
    );
    if up == 0 {
        bail!("no session came up");
    }
    if !interrupted {
        eprintln!("holding for {} s (Ctrl-C to stop)", a.hold);
        let hold_until = tokio::time::Instant::now() + Duration::from_secs(a.hold);
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(hold_until) => break,
                _ = tokio::signal::ctrl_c() => break,
                _ = tokio::time::sleep(Duration::from_secs(30)) => {
                    eprintln!(
                        "holding: {} open, {} dropped by the server, {} pings answered",
                        up - counters.dropped.load(Ordering::Relaxed),
                        counters.dropped.load(Ordering::Relaxed),
                        counters.pings.load(Ordering::Relaxed)
                    );
                }
            }
        }
    }
    let held = started.elapsed().as_secs_f64() - setup_secs;
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    tasks.abort_all();
    let dropped = counters.dropped.load(Ordering::Relaxed);
    println!(
        "DONE held {} sessions for {held:.0} s; {dropped} dropped by the server; {} pings answered",
        up - dropped.min(up),
        counters.pings.load(Ordering::Relaxed)
    );
    Ok(())
}
