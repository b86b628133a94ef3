//! The SQLite store's background threads run at `SCHED_IDLE`, below the sessions.
//!
//! Folding the archive log, the writer connection's statements and the WAL checkpoints
//! are throughput work: nothing a client waits on is acknowledged by them (an append is
//! acknowledged once logged; see `journal.rs`). A session thread that wakes must get the
//! core at once, and only `SCHED_IDLE` gives that on Linux's EEVDF scheduler: a woken
//! thread of the normal policy preempts an idle-policy one on the spot, where it
//! preempts a nice-5 thread only if it is "eligible", which a session thread that
//! used more than its share is not. It then waits for the background thread to block
//! or for the next tick (4 ms at `HZ=250`). `perf sched timehist` on one core at 5,000
//! msgs/s showed the sessions' thread waiting 0.8–1.7 ms, many times a second, behind
//! the writer running one 256-row INSERT or a fold's COMMIT at nice 5.
//!
//! `SCHED_IDLE` is not a share: on a saturated core these threads get almost nothing.
//! The fold keeps up there because appends wait for it (`journal.rs`: past
//! `SOFT_PENDING_BYTES` logged but not folded, each log write first leaves the core to
//! the fold for a moment; past `MAX_PENDING_BYTES` it waits for a whole fold), and the
//! checkpointer skips its turns while a fold is due. The checkpointer may starve: the
//! writer checkpoints by itself past `CHECKPOINT_PAGES` (`sqlite.rs`).
//!
//! Linux keeps a policy per thread, so these calls touch only the named threads.
//! Lowering one's own policy needs no privilege (going back would, so it is never done).
//! Elsewhere they do nothing.

/// Name of the writer connection's worker thread (at most 15 bytes: Linux's `comm`).
pub(crate) const WRITER_THREAD: &str = "natter-db-write";
/// Name of the background checkpointer connection's worker thread.
pub(crate) const CHECKPOINT_THREAD: &str = "natter-db-ckpt";
/// Name of the thread that folds the archive log.
pub(crate) const FOLD_THREAD: &str = "natter-fold";

/// Moves the calling thread to `SCHED_IDLE`.
pub(crate) fn lower_this_thread() {
    #[cfg(target_os = "linux")]
    if let Err(e) = natter_sched_idle::set_idle(rustix::thread::gettid().as_raw_nonzero().get()) {
        tracing::debug!(error = %e, "cannot lower this thread's CPU priority");
    }
}

/// Moves every thread of this process named `name` (a thread sqlx starts for a
/// connection: it runs no code of ours to lower itself) to `SCHED_IDLE`. Idempotent.
pub(crate) fn lower_threads_named(name: &str) {
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
            let Some(tid) = tid else {
                continue;
            };
            if let Err(e) = natter_sched_idle::set_idle(tid) {
                tracing::debug!(error = %e, thread = name, "cannot lower a thread's CPU priority");
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = name;
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    fn policy_of(tid: &str) -> u32 {
        // Field 41 of /proc/<pid>/task/<tid>/stat (the policy), after the parenthesised name.
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        rest.split(' ').nth(38).unwrap().parse().unwrap()
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

    const SCHED_OTHER: u32 = 0;
    const SCHED_IDLE: u32 = 5;

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
        assert_eq!(policy_of(&tid), SCHED_OTHER);
        let me = rustix::thread::gettid().as_raw_nonzero().to_string();
        let mine = policy_of(&me);
        lower_threads_named("natter-test-low");
        assert_eq!(policy_of(&tid), SCHED_IDLE);
        assert_eq!(policy_of(&me), mine, "other threads keep their policy");
        done.send(()).unwrap();
        t.join().unwrap();
    }
}
