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
//! checkpoints by itself past `CHECKPOINT_PAGES` (`sqlite.rs`). The writer and the fold
//! stay at nice 5, because under saturation they must keep a share (above). At
//! `SCHED_IDLE` they gain a little tail at 5,000 msgs/s on an idle host, but any other
//! busy process starves them: with two CPU-bound processes on this 2-core host the
//! delivery tests took 237 s at `SCHED_IDLE` against 28 s at nice 5, every offline
//! store and roster write waiting for a free core.
//!
//! Linux keeps a nice value and a policy per thread, so these calls touch only the named
//! threads. Lowering one's own priority needs no privilege. Elsewhere they do nothing.

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

/// Lowers every thread of this process named `name` (a thread sqlx starts for a
/// connection: it runs no code of ours to lower itself). Idempotent.
pub(crate) fn lower_threads_named(name: &str, how: Yield) {
    #[cfg(target_os = "linux")]
    {
        let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
            return;
        };
        for task in tasks.flatten() {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            if comm.trim_end() != name {
                continue;
            }
            let tid = task
                .file_name()
                .to_str()
                .and_then(|t| t.parse::<i32>().ok());
            let Some(pid) = tid.and_then(rustix::process::Pid::from_raw) else {
                continue;
            };
            let r = match how {
                Yield::Nice => rustix::process::setpriority_process(Some(pid), BACKGROUND_NICE)
                    .map_err(std::io::Error::from),
                Yield::Idle => natter_sched_idle::set_idle(pid.as_raw_nonzero().get()),
            };
            if let Err(e) = r {
                tracing::debug!(error = %e, thread = name, "cannot lower a thread's CPU priority");
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (name, how);
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

    #[test]
    fn only_the_checkpointer_goes_idle() {
        assert_eq!(yield_of(CHECKPOINT_THREAD), Yield::Idle);
        assert_eq!(yield_of(WRITER_THREAD), Yield::Nice);
        assert_eq!(yield_of(FOLD_THREAD), Yield::Nice);
    }
}
