//! The SQLite store's background threads run at a lower CPU priority than the sessions.
//!
//! Folding the archive log, the writer connection's statements and the WAL checkpoints
//! are throughput work: nothing a client waits on is acknowledged by them (an append is
//! acknowledged once logged; see `journal.rs`). Given the same priority, a fold of a few
//! thousand rows competes with the session threads for every time slice on a busy core,
//! and a message that arrives meanwhile waits for the fold's slice to end (measured on
//! one core at 2,000 msgs/s: p99 31–43 ms at the same priority, 2.7–2.9 ms below it).
//! A lower priority changes nothing when a core is free, and it is a share, not a
//! starvation: the fold still gets about a quarter of a saturated core, about what it
//! needs there, so appends seldom wait for it (they do once `MAX_PENDING_BYTES` are
//! logged but not folded). At nice 10 (a tenth) the fold fell that far behind under
//! saturation that waiting appends made the p99 of closed-loop traffic 60 ms.
//!
//! The checkpointer goes further, to `SCHED_IDLE`: a session thread that wakes always
//! preempts it at once, where a nice-5 thread may keep the core to the end of its slice.
//! A passive checkpoint ran up to 5.6 ms at a time while the sessions' thread waited
//! (`perf sched`, one core, 5,000 msgs/s). Starving it is harmless: the writer
//! checkpoints by itself past `CHECKPOINT_PAGES` (`sqlite.rs`).
//!
//! The writer and the fold gain from `SCHED_IDLE` too, but only while they keep up. A
//! nice-5 thread that EEVDF picks while a session thread has run ahead of its share
//! keeps the core until the next tick (4 ms at 250 Hz): at 2,000 msgs/s on one core
//! that put the p99 above 2 ms in 3 runs of 7, against 0 of 4 with both at
//! `SCHED_IDLE`. A fixed `SCHED_IDLE` starves them once anything else keeps the core
//! busy, though: the fold falls behind and appends wait for it (closed-loop p99 48–57 ms
//! against 20), and with two CPU-bound processes on this 2-core host the delivery tests
//! took 237 s against 28 s, every offline store waiting for a free core. So a
//! [`Governor`] keeps them at `SCHED_IDLE` and raises one to nice 5 once it has been
//! starved for [`STARVED_FOR`] (looking every [`POLL`]; see [`Watched::decide`]). It
//! stays raised while it still waits for the core, and goes back to `SCHED_IDLE` a
//! [`HOLD`] after it last did (longer after lowerings that proved wrong). With it, on
//! one core: p99 ≤ 5 ms at 10,000 msgs/s in every run, and the saturated closed-loop
//! p99 of nice 5 (BENCHMARKS.md, issue 15); the delivery tests next to two CPU-bound
//! processes took 32–35 s (nice 5: 29–30 s).
//!
//! Leaving `SCHED_IDLE` needs `CAP_SYS_NICE` or an `RLIMIT_NICE` of at least 15 (nice 5;
//! systemd's `LimitNICE=+5`). Without either, nothing could raise a starved thread, so
//! the writer and the fold stay at nice 5 and no governor runs ([`Governor::start`]
//! checks on a thread of its own first).
//!
//! Linux keeps a nice value and a policy per thread, so these calls touch only the named
//! threads. Lowering one's own priority needs no privilege. Elsewhere they do nothing.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The nice value of the background threads (the sessions keep the process's, usually 0).
/// 5 weighs about a third of a nice-0 thread on a contended core.
pub(crate) const BACKGROUND_NICE: i32 = 5;

/// Name of the writer connection's worker thread (at most 15 bytes: Linux's `comm`).
pub(crate) const WRITER_THREAD: &str = "natter-db-write";
/// Name of the background checkpointer connection's worker thread.
pub(crate) const CHECKPOINT_THREAD: &str = "natter-db-ckpt";
/// Name of the thread that folds the archive log.
pub(crate) const FOLD_THREAD: &str = "natter-fold";

/// Lowers the calling thread to [`BACKGROUND_NICE`].
pub(crate) fn lower_this_thread() {
    #[cfg(target_os = "linux")]
    if let Err(e) = rustix::process::setpriority_process(None, BACKGROUND_NICE) {
        tracing::debug!(error = %e, "cannot lower this thread's CPU priority");
    }
}

/// How far a background thread yields the core.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Yield {
    /// [`BACKGROUND_NICE`]: a share of a contended core.
    Nice,
    /// `SCHED_IDLE`: only what the other threads leave.
    Idle,
}

/// How far the thread named `name` yields: the checkpointer all the way, the rest a share.
pub(crate) fn yield_of(name: &str) -> Yield {
    if name == CHECKPOINT_THREAD {
        Yield::Idle
    } else {
        Yield::Nice
    }
}

/// The threads the [`Governor`] moves between `SCHED_IDLE` and [`BACKGROUND_NICE`].
const GOVERNED: [&str; 2] = [WRITER_THREAD, FOLD_THREAD];
/// Time between the governor's looks at its threads.
const POLL: Duration = Duration::from_millis(50);
/// How long an idle thread must have been starved before it is raised.
const STARVED_FOR: Duration = Duration::from_millis(200);
/// How long a raised thread stays raised after it last waited for the core, at first.
/// Lowering it is a guess that the load has gone. Under a lasting foreign load a writer
/// used now and then waits too briefly at nice 5 to show it, and is starved anew for
/// about [`STARVED_FOR`] each time it is lowered; so a thread starved again within two
/// holds of being lowered is held twice as long next time, up to [`MAX_HOLDS`] times
/// this (a stall in 64 s: 0.4 % of the time). One that stays lowered longer starts over.
/// A short first hold gives the tail back soon after a burst (logins, a flood) ends.
const HOLD: Duration = Duration::from_secs(2);
/// The longest hold, in first holds, after repeated wrong guesses.
const MAX_HOLDS: u32 = 32;
/// How often the governor lists the threads again (a replaced writer connection has a
/// new one).
const RESCAN: Duration = Duration::from_secs(1);

/// What one look at a thread found.
#[derive(Clone, Copy, Debug)]
struct Look {
    /// Running or waiting for a core (state `R`).
    runnable: bool,
    /// CPU time used since it started, in nanoseconds.
    ran_ns: u64,
    /// Time spent waiting for a core since it started, in nanoseconds (counted when
    /// the wait ends, so a thread that gets no core at all shows none).
    waited_ns: u64,
    /// At `SCHED_IDLE` now.
    idle: bool,
}

/// What the governor does to a thread after a look.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Change {
    Raise,
    Lower,
    Keep,
}

/// One governed thread: its last look, since when it has been starved at `SCHED_IDLE`,
/// when it last waited for the core at nice 5, and how long it stays raised after that.
struct Watched {
    last: Look,
    at: Instant,
    starved: Option<Instant>,
    waited: Option<Instant>,
    first_hold: Duration,
    hold: Duration,
    lowered: Option<Instant>,
}

impl Watched {
    fn new(last: Look, at: Instant, first_hold: Duration) -> Self {
        Watched {
            last,
            at,
            starved: None,
            waited: None,
            first_hold,
            hold: first_hold,
            lowered: None,
        }
    }

    /// Takes look `now` (at `at`) and decides. An idle thread starved for [`STARVED_FOR`]
    /// is raised: starved in each time between looks, that is runnable at both and having
    /// run under an eighth of it, or having waited for a core more than three quarters
    /// of it (a thread that alternates with the fold thread is not runnable at every
    /// look). The sessions alone seldom take so much of a core for so long (at 10,000
    /// msgs/s they take about half); a CPU-bound process or a saturated server does. A
    /// raised thread that still waits, runnable at both looks and getting under a third
    /// or waiting over a quarter (nice 5 against one busy nice-0 thread gets a quarter),
    /// stays raised; one that has not waited for its hold goes back to idle (see
    /// [`HOLD`]).
    fn decide(&mut self, now: Look, at: Instant) -> Change {
        let between = at.saturating_duration_since(self.at).as_nanos() as u64;
        let got = now.ran_ns.saturating_sub(self.last.ran_ns);
        let waited = now.waited_ns.saturating_sub(self.last.waited_ns);
        let runnable = self.last.runnable && now.runnable;
        let since = self.at;
        self.last = now;
        self.at = at;
        if now.idle {
            if !(runnable && got < between / 8 || waited > between / 4 * 3) {
                self.starved = None;
                return Change::Keep;
            }
            let from = *self.starved.get_or_insert(since);
            if at.saturating_duration_since(from) < STARVED_FOR {
                return Change::Keep;
            }
            self.starved = None;
            self.waited = Some(at);
            let wrong = self
                .lowered
                .is_some_and(|l| at.saturating_duration_since(l) < self.hold * 2 + STARVED_FOR);
            self.hold = if wrong {
                (self.hold * 2).min(self.first_hold * MAX_HOLDS)
            } else {
                self.first_hold
            };
            return Change::Raise;
        }
        self.starved = None;
        if runnable && got < between / 3 || waited > between / 4 {
            self.waited = Some(at);
        }
        match self.waited {
            Some(t) if at.saturating_duration_since(t) < self.hold => Change::Keep,
            _ => {
                // Only lowering after a raise is a guess (not a start at nice 5).
                if self.waited.is_some() {
                    self.lowered = Some(at);
                }
                Change::Lower
            }
        }
    }
}

/// Moves the [`GOVERNED`] threads between `SCHED_IDLE` and [`BACKGROUND_NICE`] (see the
/// module docs) from a thread of its own at the process's priority. Dropping it stops
/// that thread within one [`POLL`]. It goes by thread names, so with several stores in
/// one process (tests) each governor watches all their threads, by the same rules.
pub(crate) struct Governor {
    _stop: std::sync::mpsc::Sender<()>,
}

impl Governor {
    /// Starts governing the [`GOVERNED`] threads, or returns `None` (they stay at nice 5)
    /// where a thread cannot leave `SCHED_IDLE` again.
    pub(crate) fn start() -> Option<Governor> {
        Self::start_for(&GOVERNED, HOLD)
    }

    fn start_for(names: &'static [&'static str], hold: Duration) -> Option<Governor> {
        if !can_leave_idle() {
            tracing::info!(
                "the SQLite writer and fold stay at nice 5: moving them to SCHED_IDLE while \
                 they keep up needs CAP_SYS_NICE or RLIMIT_NICE >= 15 (systemd: LimitNICE=+5)"
            );
            return None;
        }
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let spawned = std::thread::Builder::new()
            .name("natter-db-prio".into())
            .spawn(move || govern(names, hold, &stopped));
        match spawned {
            Ok(_) => Some(Governor { _stop: stop }),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the SQLite priority governor");
                None
            }
        }
    }
}

/// The governor's loop: until its sender is dropped.
fn govern(names: &[&str], hold: Duration, stopped: &std::sync::mpsc::Receiver<()>) {
    let mut watched: HashMap<i32, Watched> = HashMap::new();
    let mut scanned: Option<Instant> = None;
    while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(POLL) {
        let at = Instant::now();
        if scanned.is_none_or(|s| at.saturating_duration_since(s) >= RESCAN) {
            scanned = Some(at);
            for tid in tids_named(names) {
                if let (std::collections::hash_map::Entry::Vacant(v), Some(last)) =
                    (watched.entry(tid), look(tid))
                {
                    v.insert(Watched::new(last, at, hold));
                }
            }
        }
        // A thread that is gone (its look fails) is forgotten.
        watched.retain(|&tid, w| {
            let Some(now) = look(tid) else {
                return false;
            };
            let how = match w.decide(now, at) {
                Change::Keep => return true,
                Change::Raise => Yield::Nice,
                Change::Lower => Yield::Idle,
            };
            match set_yield(tid, how) {
                Ok(()) => tracing::debug!(
                    tid,
                    ?how,
                    hold_ms = w.hold.as_millis() as u64,
                    "SQLite background thread's CPU priority changed"
                ),
                Err(e) => tracing::debug!(error = %e, tid, ?how,
                    "cannot change a SQLite thread's CPU priority"),
            }
            true
        });
    }
}

/// Moves thread `tid` to `how`: `SCHED_IDLE`, or the normal policy at
/// [`BACKGROUND_NICE`] (which, from `SCHED_IDLE`, needs the privilege
/// [`can_leave_idle`] probes for).
fn set_yield(tid: i32, how: Yield) -> std::io::Result<()> {
    match how {
        Yield::Idle => natter_sched_idle::set_idle(tid),
        Yield::Nice => {
            natter_sched_idle::set_normal(tid)?;
            #[cfg(target_os = "linux")]
            if let Some(pid) = rustix::process::Pid::from_raw(tid) {
                rustix::process::setpriority_process(Some(pid), BACKGROUND_NICE)?;
            }
            Ok(())
        }
    }
}

/// Whether a thread of this process may leave `SCHED_IDLE` again: tried on a thread of
/// its own, which ends right after.
fn can_leave_idle() -> bool {
    #[cfg(target_os = "linux")]
    {
        let probe = std::thread::Builder::new()
            .name("natter-prio-try".into())
            .spawn(|| {
                let me = rustix::thread::gettid().as_raw_nonzero().get();
                lower_this_thread();
                set_yield(me, Yield::Idle).is_ok() && set_yield(me, Yield::Nice).is_ok()
            });
        probe.ok().and_then(|t| t.join().ok()).unwrap_or(false)
    }
    #[cfg(not(target_os = "linux"))]
    false
}

/// This process's threads named one of `names`.
fn tids_named(names: &[&str]) -> Vec<i32> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter(|task| {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            names.contains(&comm.trim_end())
        })
        .filter_map(|task| task.file_name().to_str()?.parse().ok())
        .collect()
}

/// Looks at thread `tid` of this process (`None` once it is gone).
fn look(tid: i32) -> Option<Look> {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
    // After the parenthesised name: field 3 (state) first, field 41 (policy) 38 later.
    let mut rest = stat.get(stat.rfind(')')? + 2..)?.split(' ');
    let runnable = rest.next()? == "R";
    let policy: i32 = rest.nth(37)?.parse().ok()?;
    let schedstat = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).ok()?;
    let mut times = schedstat.split(' ');
    let ran_ns = times.next()?.parse().ok()?;
    let waited_ns = times.next()?.parse().ok()?;
    Some(Look {
        runnable,
        ran_ns,
        waited_ns,
        idle: policy == SCHED_IDLE_POLICY,
    })
}

/// Linux's number for `SCHED_IDLE` (as `/proc/<pid>/stat` shows the policy).
const SCHED_IDLE_POLICY: i32 = 5;

/// Lowers every thread of this process named `name` (a thread sqlx starts for a
/// connection: it runs no code of ours to lower itself). Idempotent.
pub(crate) fn lower_threads_named(name: &str, how: Yield) {
    for tid in tids_named(&[name]) {
        if let Err(e) = set_yield(tid, how) {
            tracing::debug!(error = %e, thread = name, "cannot lower a thread's CPU priority");
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    fn nice_of(tid: &str) -> i32 {
        // Field 19 of /proc/<pid>/task/<tid>/stat, after the parenthesised name.
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        rest.split(' ').nth(16).unwrap().parse().unwrap()
    }

    fn tid_named(name: &str) -> Option<String> {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .flatten()
            .find_map(|t| {
                let comm = std::fs::read_to_string(t.path().join("comm")).ok()?;
                (comm.trim_end() == name).then(|| t.file_name().to_string_lossy().into_owned())
            })
    }

    #[test]
    fn only_the_named_thread_is_lowered() {
        let (ready, wait) = std::sync::mpsc::channel();
        let (done, stop) = std::sync::mpsc::channel::<()>();
        let t = std::thread::Builder::new()
            .name("natter-test-low".into())
            .spawn(move || {
                ready.send(()).unwrap();
                let _ = stop.recv();
            })
            .unwrap();
        wait.recv().unwrap();
        let tid = tid_named("natter-test-low").expect("the test thread is listed");
        let before = nice_of(&tid);
        let me = rustix::thread::gettid().as_raw_nonzero().to_string();
        let mine = nice_of(&me);
        lower_threads_named("natter-test-low", Yield::Nice);
        assert_eq!(nice_of(&tid), BACKGROUND_NICE.max(before));
        assert_eq!(nice_of(&me), mine, "other threads keep their priority");
        done.send(()).unwrap();
        t.join().unwrap();
    }

    fn looked(runnable: bool, ran_ms: u64, idle: bool) -> Look {
        Look {
            runnable,
            ran_ns: ran_ms * 1_000_000,
            waited_ns: 0,
            idle,
        }
    }

    /// A thread first seen as `first`, with a first hold of `hold_ms`; and the instant
    /// `n` ms after that first look.
    fn watched(first: Look, hold_ms: u64) -> (Watched, impl Fn(u64) -> Instant) {
        let t0 = Instant::now();
        let hold = Duration::from_millis(hold_ms);
        (Watched::new(first, t0, hold), move |n| {
            t0 + Duration::from_millis(n)
        })
    }

    #[test]
    fn a_starved_idle_thread_is_raised_and_lowered_after_the_hold() {
        let (mut w, ms) = watched(looked(false, 0, false), 300);
        // Started at nice 5 with nothing to do: to idle.
        assert_eq!(w.decide(looked(false, 0, false), ms(50)), Change::Lower);
        // Idle and running most of the time: kept idle.
        assert_eq!(w.decide(looked(true, 40, true), ms(100)), Change::Keep);
        assert_eq!(w.decide(looked(true, 80, true), ms(150)), Change::Keep);
        // Runnable at every look with 5 ms of each 50: starved, raised after 200 ms.
        for (n, at) in [200, 250, 300].into_iter().enumerate() {
            let l = looked(true, 85 + 5 * n as u64, true);
            assert_eq!(w.decide(l, ms(at)), Change::Keep, "starved only {at} ms");
        }
        assert_eq!(w.decide(looked(true, 100, true), ms(350)), Change::Raise);
        // Raised, and still getting under a third: stays raised past the hold.
        assert_eq!(w.decide(looked(true, 110, false), ms(400)), Change::Keep);
        assert_eq!(w.decide(looked(true, 120, false), ms(550)), Change::Keep);
        // Asleep from then on: lowered once the hold has passed since it last waited.
        assert_eq!(w.decide(looked(false, 130, false), ms(800)), Change::Keep);
        assert_eq!(w.decide(looked(false, 130, false), ms(851)), Change::Lower);
    }

    #[test]
    fn a_thread_starved_again_soon_after_it_is_lowered_is_held_longer() {
        let (mut w, ms) = watched(looked(false, 0, true), 100);
        // (time in ms, CPU ms so far)
        let mut clock = (0, 0);
        // Starved until raised; then asleep at nice 5 until lowered: how long it was held.
        let cycle = |w: &mut Watched, (t, ran): &mut (u64, u64)| {
            loop {
                *t += 50;
                *ran += 1;
                if w.decide(looked(true, *ran, true), ms(*t)) == Change::Raise {
                    break;
                }
            }
            let raised = *t;
            loop {
                *t += 50;
                if w.decide(looked(false, *ran, false), ms(*t)) == Change::Lower {
                    return *t - raised;
                }
            }
        };
        let holds: Vec<u64> = (0..8).map(|_| cycle(&mut w, &mut clock)).collect();
        // Each lowering proved wrong within two holds: 100, 200, 400 ... up to 32 x 100.
        assert_eq!(holds, [100, 200, 400, 800, 1600, 3200, 3200, 3200]);
        // Lowered for longer than two holds: the next hold is the first one again.
        clock.0 += 6500;
        assert_eq!(
            w.decide(looked(false, clock.1, true), ms(clock.0)),
            Change::Keep
        );
        assert_eq!(cycle(&mut w, &mut clock), 100);
    }

    #[test]
    fn an_idle_thread_that_mostly_waits_between_looks_is_raised() {
        let (mut w, ms) = watched(looked(false, 0, true), 5000);
        // Asleep at every look, but each 50 ms it waited 40 for a core and ran 2.
        let waits = |n: u64| Look {
            waited_ns: n * 40_000_000,
            ..looked(false, 2 * n, true)
        };
        for n in 1..4 {
            assert_eq!(w.decide(waits(n), ms(50 * n)), Change::Keep);
        }
        assert_eq!(w.decide(waits(4), ms(200)), Change::Raise);
        // Raised, it still waits 20 ms of 50: kept raised past the hold.
        let raised = |n: u64| Look {
            waited_ns: 160_000_000 + n * 20_000_000,
            ..looked(false, 8 + 10 * n, false)
        };
        for n in 1..=120 {
            assert_eq!(w.decide(raised(n), ms(200 + 50 * n)), Change::Keep);
        }
        // Then it no longer waits: lowered once the hold has passed.
        assert_eq!(w.decide(raised(120), ms(6200 + 4999)), Change::Keep);
        assert_eq!(w.decide(raised(120), ms(6200 + 5001)), Change::Lower);
    }

    #[test]
    fn an_idle_thread_that_sleeps_or_runs_is_not_raised() {
        let (mut w, ms) = watched(looked(true, 0, true), 5000);
        // Runnable at one look only: it may have slept between.
        assert_eq!(w.decide(looked(false, 1, true), ms(50)), Change::Keep);
        assert_eq!(w.decide(looked(true, 1, true), ms(100)), Change::Keep);
        // Starved for 150 ms, then it ran 20 ms of 50 (sessions took the rest): the
        // count starts over, and it is never raised.
        for (n, at) in [150, 200, 250].into_iter().enumerate() {
            assert_eq!(
                w.decide(looked(true, 2 + n as u64, true), ms(at)),
                Change::Keep
            );
        }
        assert_eq!(w.decide(looked(true, 24, true), ms(300)), Change::Keep);
        for (n, at) in [350, 400, 450].into_iter().enumerate() {
            assert_eq!(
                w.decide(looked(true, 25 + n as u64, true), ms(at)),
                Change::Keep
            );
        }
    }

    fn policy_and_nice(tid: i32) -> (i32, i32) {
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
        let rest: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
        (rest[38].parse().unwrap(), rest[16].parse().unwrap())
    }

    fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
        let until = Instant::now() + Duration::from_secs(20);
        while !cond() {
            assert!(Instant::now() < until, "timed out waiting until {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// On one core with a busy thread of normal priority, a governed thread that spins is
    /// starved at `SCHED_IDLE` and raised; once it sleeps it goes back to `SCHED_IDLE`.
    #[test]
    fn the_governor_raises_a_starved_thread_and_lowers_it_when_it_sleeps() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        const NAMES: [&str; 1] = ["natter-test-gov"];
        if !can_leave_idle() {
            // Unprivileged: no governor, and the threads keep nice 5.
            assert!(Governor::start_for(&NAMES, Duration::from_millis(300)).is_none());
            return;
        }
        let one_cpu = || {
            let mut cpus = rustix::thread::CpuSet::new();
            cpus.set(0);
            rustix::thread::sched_setaffinity(None, &cpus).unwrap();
        };
        // While `spin` is set the governed thread spins; otherwise it blocks on `orders`
        // (no wake-ups, so a busy CI host cannot make it look as if it waited for a core).
        let spin = Arc::new(AtomicBool::new(false));
        let (order, orders) = std::sync::mpsc::channel::<()>();
        let (tx, rx) = std::sync::mpsc::channel();
        let spinning = spin.clone();
        let governed = std::thread::Builder::new()
            .name(NAMES[0].into())
            .spawn(move || {
                one_cpu();
                lower_this_thread();
                tx.send(rustix::thread::gettid().as_raw_nonzero().get())
                    .unwrap();
                while orders.recv().is_ok() {
                    while spinning.load(Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                }
            })
            .unwrap();
        let tid = rx.recv().unwrap();
        let governor = Governor::start_for(&NAMES, Duration::from_millis(300)).unwrap();
        wait_for("the blocked thread is idle", || {
            policy_and_nice(tid).0 == SCHED_IDLE_POLICY
        });
        spin.store(true, Ordering::Relaxed);
        let hogging = spin.clone();
        let hog = std::thread::spawn(move || {
            one_cpu();
            while hogging.load(Ordering::Relaxed) {
                std::hint::spin_loop();
            }
        });
        order.send(()).unwrap();
        wait_for("the starved thread is raised to nice 5", || {
            policy_and_nice(tid) == (0, BACKGROUND_NICE)
        });
        spin.store(false, Ordering::Relaxed);
        hog.join().unwrap();
        wait_for("the blocked thread is idle again", || {
            policy_and_nice(tid).0 == SCHED_IDLE_POLICY
        });
        drop(order);
        governed.join().unwrap();
        drop(governor);
    }

    #[test]
    fn only_the_checkpointer_goes_idle() {
        assert_eq!(yield_of(CHECKPOINT_THREAD), Yield::Idle);
        assert_eq!(yield_of(WRITER_THREAD), Yield::Nice);
        assert_eq!(yield_of(FOLD_THREAD), Yield::Nice);
    }
}
