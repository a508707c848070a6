//! Real-time scheduling for the daemons whose judgements are time-critical (the controller's
//! membership, netpair's path decisions), so that a busy host cannot delay them past their
//! timeouts — as corosync runs under SCHED_RR.
//!
//! Written by hand: the `libc` call is one line, and the crates that wrap it (e.g.
//! `thread-priority`) set one thread's priority, not the policy that every thread the process
//! starts later inherits.
#![allow(unsafe_code)]

/// Puts the calling thread under SCHED_FIFO at `prio` (1–99). Threads it starts afterwards
/// inherit the policy, so call it before starting a runtime. Fails without CAP_SYS_NICE, or
/// when the cgroup has no real-time budget.
pub fn set_fifo(prio: u8) -> std::io::Result<()> {
    if !(1..=99).contains(&prio) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("SCHED_FIFO priority {prio} is not in 1..=99"),
        ));
    }
    let param = libc::sched_param {
        sched_priority: i32::from(prio),
    };
    // SAFETY: `param` is a live, initialised sched_param for the duration of the call; pid 0
    // is the calling thread; the call reads the struct and changes nothing in our memory.
    let r = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The calling thread's scheduling policy is SCHED_FIFO.
pub fn is_fifo() -> bool {
    // SAFETY: no arguments but the calling thread (pid 0); reads nothing from our memory.
    unsafe { libc::sched_getscheduler(0) == libc::SCHED_FIFO }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_range_priorities_are_refused_without_a_system_call() {
        assert!(set_fifo(0).is_err());
        assert!(set_fifo(100).is_err());
    }
}
