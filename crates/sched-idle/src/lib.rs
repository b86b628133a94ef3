//! One call the natter crates cannot make themselves (they forbid `unsafe`,
//! and rustix has no `sched_setscheduler`): move a thread to `SCHED_IDLE`,
//! the policy of work that runs only on a core nothing else wants, and back.
//! A thread of the normal policy that wakes always preempts it at once.
//! Elsewhere this does nothing.

/// Moves thread `tid` (a Linux thread id, as listed in `/proc/self/task`)
/// to `SCHED_IDLE`. Lowering a thread's policy needs no privilege.
#[cfg(target_os = "linux")]
pub fn set_idle(tid: i32) -> std::io::Result<()> {
    set_policy(tid, libc::SCHED_IDLE)
}

/// Moves thread `tid` back to `SCHED_OTHER`, keeping its nice value. Leaving
/// `SCHED_IDLE` needs `CAP_SYS_NICE` or an `RLIMIT_NICE` that allows the
/// thread's nice value; without either it fails with `EPERM`.
#[cfg(target_os = "linux")]
pub fn set_normal(tid: i32) -> std::io::Result<()> {
    set_policy(tid, libc::SCHED_OTHER)
}

#[cfg(target_os = "linux")]
fn set_policy(tid: i32, policy: libc::c_int) -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid sched_param that outlives the call; a tid
    // that is gone makes the call fail with ESRCH and change nothing.
    if unsafe { libc::sched_setscheduler(tid, policy, &param) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
pub fn set_idle(_tid: i32) -> std::io::Result<()> {
    Ok(())
}

#[cfg(not(target_os = "linux"))]
pub fn set_normal(_tid: i32) -> std::io::Result<()> {
    Ok(())
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    fn policy_of(tid: i32) -> i32 {
        // SAFETY: takes a plain integer; a bad tid is an error return.
        unsafe { libc::sched_getscheduler(tid) }
    }

    fn my_tid() -> i32 {
        // SAFETY: gettid takes nothing and cannot fail.
        unsafe { libc::gettid() }
    }

    #[test]
    fn only_that_thread_becomes_idle() {
        let me = my_tid();
        let (tx, rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            tx.send(my_tid()).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(200));
        });
        let tid = rx.recv().unwrap();
        assert_eq!(policy_of(tid), libc::SCHED_OTHER, "SCHED_OTHER before");
        super::set_idle(tid).unwrap();
        assert_eq!(policy_of(tid), libc::SCHED_IDLE);
        assert_eq!(
            policy_of(me),
            libc::SCHED_OTHER,
            "other threads keep their policy"
        );
        t.join().unwrap();
        assert!(super::set_idle(i32::MAX).is_err(), "no such thread");
    }

    #[test]
    fn a_thread_goes_back_to_normal_when_allowed() {
        let (tx, rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            let me = my_tid();
            super::set_idle(me).unwrap();
            let idle = policy_of(me);
            // Allowed to root (CAP_SYS_NICE) or with RLIMIT_NICE; refused otherwise,
            // and the thread then stays idle.
            let back = super::set_normal(me);
            tx.send((idle, back.is_ok(), policy_of(me))).unwrap();
        });
        let (idle, back, after) = rx.recv().unwrap();
        t.join().unwrap();
        assert_eq!(idle, libc::SCHED_IDLE);
        let expect = if back {
            libc::SCHED_OTHER
        } else {
            libc::SCHED_IDLE
        };
        assert_eq!(after, expect);
    }
}
