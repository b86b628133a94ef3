//! One call the natter crates cannot make themselves (they forbid `unsafe`,
//! and rustix has no `sched_setscheduler`): move a thread to `SCHED_IDLE`,
//! the policy of work that runs only on a core nothing else wants. A thread
//! of the normal policy that wakes always preempts it at once. Elsewhere
//! this does nothing.

/// Moves thread `tid` (a Linux thread id, as listed in `/proc/self/task`)
/// to `SCHED_IDLE`. Lowering a thread's policy needs no privilege.
#[cfg(target_os = "linux")]
pub fn set_idle(tid: i32) -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid sched_param that outlives the call; a tid
    // that is gone makes the call fail with ESRCH and change nothing.
    if unsafe { libc::sched_setscheduler(tid, libc::SCHED_IDLE, &param) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
pub fn set_idle(_tid: i32) -> std::io::Result<()> {
    Ok(())
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    fn policy_of(tid: &str) -> u32 {
        // Field 41 of /proc/<pid>/task/<tid>/stat.
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        rest.split(' ').nth(38).unwrap().parse().unwrap()
    }

    #[test]
    fn only_that_thread_becomes_idle() {
        let me = std::fs::read_link("/proc/thread-self")
            .unwrap()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let (tx, rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            let tid = std::fs::read_link("/proc/thread-self")
                .unwrap()
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned();
            tx.send(tid).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(200));
        });
        let tid = rx.recv().unwrap();
        assert_eq!(policy_of(&tid), 0, "SCHED_OTHER before");
        super::set_idle(tid.parse().unwrap()).unwrap();
        assert_eq!(policy_of(&tid), libc::SCHED_IDLE as u32);
        assert_eq!(policy_of(&me), 0, "other threads keep their policy");
        t.join().unwrap();
        assert!(super::set_idle(i32::MAX).is_err(), "no such thread");
    }
}
