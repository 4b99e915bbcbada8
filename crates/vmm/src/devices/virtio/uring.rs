//! A small io_uring wrapper for the block device thread: positional reads and writes between
//! image files and guest memory, with completions signalled on an eventfd.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};

use io_uring::{opcode, squeue, types, IoUring};
use vmm_sys_util::eventfd::EventFd;

/// Submission queue depth; more operations wait in a software queue.
const RING_ENTRIES: u32 = 256;

/// One positional transfer between a file and host memory.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Transfer {
    pub fd: RawFd,
    pub buf: *mut u8,
    pub len: u32,
    pub offset: u64,
    /// File ← memory when true, memory ← file otherwise.
    pub write: bool,
    pub user_data: u64,
}

pub(crate) struct Uring {
    ring: IoUring,
    completion: EventFd,
    backlog: VecDeque<squeue::Entry>,
    in_kernel: usize,
}

impl Uring {
    pub fn new() -> io::Result<Uring> {
        let ring = IoUring::new(RING_ENTRIES)?;
        let completion = EventFd::new(libc::EFD_NONBLOCK)?;
        ring.submitter().register_eventfd(completion.as_raw_fd())?;
        Ok(Uring {
            ring,
            completion,
            backlog: VecDeque::new(),
            in_kernel: 0,
        })
    }

    /// The eventfd that becomes readable when completions arrive.
    pub fn completion_fd(&self) -> RawFd {
        self.completion.as_raw_fd()
    }

    /// Operations queued or in the kernel.
    pub fn outstanding(&self) -> usize {
        self.in_kernel + self.backlog.len()
    }

    /// Queues a transfer; it reaches the kernel at the next [`Uring::submit`].
    ///
    /// # Safety
    /// `t.buf..t.buf + t.len` must stay valid (mapped, and for a read not used as a Rust
    /// reference) and `t.fd` open until the transfer's completion has been reaped.
    pub unsafe fn push(&mut self, t: Transfer) {
        let fd = types::Fd(t.fd);
        let entry = if t.write {
            opcode::Write::new(fd, t.buf, t.len)
                .offset(t.offset)
                .build()
        } else {
            opcode::Read::new(fd, t.buf, t.len).offset(t.offset).build()
        };
        self.backlog.push_back(entry.user_data(t.user_data));
    }

    /// Moves queued transfers into the submission ring and tells the kernel.
    pub fn submit(&mut self) -> io::Result<()> {
        let mut pushed = 0;
        {
            let mut sq = self.ring.submission();
            while let Some(entry) = self.backlog.front() {
                // SAFETY: every entry was queued through `push`, whose contract keeps its
                // buffer and file valid until the completion is reaped.
                if unsafe { sq.push(entry) }.is_err() {
                    break;
                }
                self.backlog.pop_front();
                pushed += 1;
            }
        }
        if pushed > 0 {
            self.in_kernel += pushed;
            self.ring.submit()?;
        }
        Ok(())
    }

    /// Reaps completions as `(user_data, result)`: bytes transferred, or `-errno`.
    pub fn reap(&mut self) -> Vec<(u64, i32)> {
        // Reset the eventfd first: a completion that lands after this read re-arms it.
        let _ = self.completion.read();
        let done: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        self.in_kernel -= done.len();
        done
    }

    /// Blocks until at least one operation in the kernel completes.
    pub fn wait_one(&mut self) -> io::Result<()> {
        self.ring.submit_and_wait(1).map(|_| ())
    }
}
