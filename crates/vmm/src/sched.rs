//! Real-time priority for the threads a pause waits on.
//!
//! On a busy host a thread that another has preempted runs again only at the end of that one's
//! time slice, milliseconds later, and a pause waits on several threads in turn: the vCPU
//! threads must take their kick and park (one waiting in a write fault, only once the fault
//! handler has served it), the pausing thread must wake when they have, do its work and resume
//! them. So those threads are raised to the lowest real-time priority (`SCHED_FIFO` 1, ahead
//! of every ordinary thread) for as long as the pause needs them, then put back as they were.
//! That needs `CAP_SYS_NICE` or an `RLIMIT_RTPRIO` above zero; without it they wait their turn,
//! and a debug line says so once.

use std::marker::PhantomData;
use std::sync::Once;

use tracing::{debug, warn};

/// A thread's scheduling policy and priority before it was raised.
pub(crate) struct Scheduling {
    thread: libc::pthread_t,
    policy: libc::c_int,
    param: libc::sched_param,
}

impl Scheduling {
    /// Raises `thread` to `SCHED_FIFO` priority 1 if it is an ordinary (not real-time) thread
    /// and this process may; returns what it was.
    ///
    /// # Safety
    /// `thread` is a thread of this process that has not been joined (or detached and ended),
    /// and stays so until the result is restored or dropped: a thread id is only valid until
    /// then.
    pub(crate) unsafe fn raise(thread: libc::pthread_t) -> Option<Scheduling> {
        let mut policy = 0;
        let mut param = libc::sched_param { sched_priority: 0 };
        // SAFETY: the caller guarantees `thread` is valid; the out-pointers are locals.
        if unsafe { libc::pthread_getschedparam(thread, &mut policy, &mut param) } != 0 {
            return None;
        }
        if policy == libc::SCHED_FIFO || policy == libc::SCHED_RR {
            return None;
        }
        let raised = libc::sched_param { sched_priority: 1 };
        // SAFETY: as above; priority 1 is valid for SCHED_FIFO.
        let rc = unsafe { libc::pthread_setschedparam(thread, libc::SCHED_FIFO, &raised) };
        if rc != 0 {
            static NOT_PERMITTED: Once = Once::new();
            NOT_PERMITTED.call_once(|| {
                debug!(
                    "threads cannot be raised to real-time priority for pauses (error {rc}): a \
                     pause on a busy host may wait for the scheduler"
                );
            });
            return None;
        }
        Some(Scheduling {
            thread,
            policy,
            param,
        })
    }

    /// The thread this was raised for.
    pub(crate) fn thread(&self) -> libc::pthread_t {
        self.thread
    }

    /// Puts the thread back as it was.
    ///
    /// # Safety
    /// The thread is still valid, as [`raise`](Self::raise) requires.
    pub(crate) unsafe fn restore(self) {
        // SAFETY: the caller guarantees the thread is valid; `param` is what the kernel
        // reported for it with `policy`.
        let rc = unsafe { libc::pthread_setschedparam(self.thread, self.policy, &self.param) };
        if rc != 0 {
            warn!("cannot put a thread back to its scheduling after a pause (error {rc})");
        }
    }
}

/// Another thread of this process at real-time priority until this is dropped.
pub(crate) struct Raised(Option<Scheduling>);

impl Raised {
    /// # Safety
    /// `thread` stays valid (see [`Scheduling::raise`]) for as long as the result lives.
    pub(crate) unsafe fn new(thread: libc::pthread_t) -> Raised {
        // SAFETY: the caller's guarantee, for as long as the result lives.
        Raised(unsafe { Scheduling::raise(thread) })
    }
}

impl Drop for Raised {
    fn drop(&mut self) {
        if let Some(was) = self.0.take() {
            // SAFETY: `new`'s caller keeps the thread valid while this lives.
            unsafe { was.restore() };
        }
    }
}

/// The calling thread at real-time priority until this is dropped (on the same thread: it is
/// neither `Send` nor `Sync`).
pub(crate) struct RaisedHere {
    _raised: Raised,
    _here: PhantomData<*const ()>,
}

impl RaisedHere {
    pub(crate) fn new() -> RaisedHere {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        RaisedHere {
            // SAFETY: the calling thread is valid while it runs, and the result is dropped on
            // it (it is neither Send nor Sync).
            _raised: unsafe { Raised::new(me) },
            _here: PhantomData,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy_of_this_thread() -> (libc::c_int, libc::c_int) {
        let mut policy = 0;
        let mut param = libc::sched_param { sched_priority: 0 };
        // SAFETY: this thread is alive; the out-pointers are locals.
        let rc =
            unsafe { libc::pthread_getschedparam(libc::pthread_self(), &mut policy, &mut param) };
        assert_eq!(rc, 0);
        (policy, param.sched_priority)
    }

    /// Raised while the guard lives (where this process may), put back exactly after.
    #[test]
    fn raised_for_the_guard_and_put_back() {
        std::thread::spawn(|| {
            let before = policy_of_this_thread();
            assert_eq!(before.0, libc::SCHED_OTHER);
            let raised = RaisedHere::new();
            let during = policy_of_this_thread();
            if raised._raised.0.is_some() {
                assert_eq!(during, (libc::SCHED_FIFO, 1));
            } else {
                assert_eq!(during, before);
            }
            drop(raised);
            assert_eq!(policy_of_this_thread(), before);
        })
        .join()
        .expect("the test thread");
    }
}
