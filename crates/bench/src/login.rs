//! `login N`: N complete logins (connect, TLS, SCRAM, bind, close), with
//! `--concurrency` running at once. Worker w always logs in account
//! offset + w, so only `--concurrency` accounts are needed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use hdrhistogram::Histogram;

use crate::xmpp::Conn;
use crate::{register_all, report_cpu, Ctx, Errors};

#[derive(clap::Args)]
pub struct LoginArgs {
    /// Logins to perform.
    pub n: u64,
    /// Stop after this many seconds even if not all logins are done.
    #[arg(long, default_value_t = 600)]
    pub max_secs: u64,
    /// Also print the results as one JSON line.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(ctx: Arc<Ctx>, register: bool, a: LoginArgs) -> anyhow::Result<()> {
    let workers = (ctx.concurrency as u64).min(a.n.max(1));
    if register {
        register_all(&ctx, (0..workers).map(|w| ctx.offset + w).collect()).await?;
    }
    let next = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(Errors::default());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(a.max_secs);
    let started = Instant::now();
    let cpu0 = ctx.server_cpu();
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..workers {
        let (ctx, next, errors) = (ctx.clone(), next.clone(), errors.clone());
        let n = a.n;
        tasks.spawn(async move {
            // Login time in microseconds.
            let mut hist = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)
                .expect("valid histogram bounds");
            let user = ctx.user(ctx.offset + w);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n || tokio::time::Instant::now() >= deadline {
                    break;
                }
                let t0 = Instant::now();
                let login = Conn::login(&ctx.target, &user, &ctx.password, &ctx.resource);
                match tokio::time::timeout_at(deadline, login).await {
                    Ok(Ok(c)) => {
                        hist.saturating_record(t0.elapsed().as_micros() as u64);
                        c.close().await;
                    }
                    Ok(Err(e)) => errors.add(&e),
                    Err(_) => break,
                }
            }
            hist
        });
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    while let Some(h) = tasks.join_next().await {
        hist.add(&h?).ok();
    }
    let secs = started.elapsed().as_secs_f64();
    let server_cpu = cpu0.zip(ctx.server_cpu()).map(|(a, b)| b - a);
    errors.report("logins");
    let ok = hist.len();
    let rate = ok as f64 / secs.max(1e-9);
    let q = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "logins {ok} ok, {} failed in {secs:.2} s = {rate:.0} logins/s (concurrency {workers}); \
         login time ms p50 {:.2} p99 {:.2} max {:.2}",
        errors.count(),
        q(0.5),
        q(0.99),
        hist.max() as f64 / 1000.0
    );
    let per_cpu = report_cpu(server_cpu, secs, ok as f64, "logins");
    if a.json {
        let j = serde_json::json!({
            "scenario": "login",
            "server_cpu_s": server_cpu,
            "logins_per_cpu_s": per_cpu,
            "ok": ok,
            "failed": errors.count(),
            "seconds": secs,
            "logins_per_s": rate,
            "concurrency": workers,
            "p50_ms": q(0.5),
            "p99_ms": q(0.99),
            "max_ms": hist.max() as f64 / 1000.0,
        });
        println!("{j}");
    }
    if ok == 0 {
        bail!("no login succeeded");
    }
    Ok(())
}
