//! The `fork` strategy: a child process inherits guest memory (private anonymous mappings), and
//! the kernel's copy-on-write keeps the child's view frozen at the fork while the VM runs on in
//! the parent. The child writes every page and the page index, reports over a pipe, and exits.
//!
//! The child of a multi-threaded process may only rely on what the forking thread holds: it
//! takes no lock that another thread of the VMM could have held at the fork (no logging, no
//! stdout), uses the checkpoint writer that the forking thread owns, and leaves with `_exit`.
//! glibc's allocator is reinitialised in the child, so allocating is safe.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};

use ckpt_format::{CheckpointWriter, MemoryReport};

use super::{write_all, CowError, SaveCounters, Unpopulated};
use crate::checkpoint::dirty::PageBits;
use crate::memory::RamRegion;

/// A forked memory writer.
#[derive(Debug)]
pub struct ForkedWriter {
    pid: libc::pid_t,
    report: File,
}

fn pipe() -> Result<(File, File), CowError> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two new fds into the array on success.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(CowError::Fork(std::io::Error::last_os_error()));
    }
    // SAFETY: both fds are fresh and owned by nothing else.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    Ok((File::from(r), File::from(w)))
}

/// An error and its causes on one line, for the report: the parent gets text, not the error.
fn causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The child's work: write memory, finish the memory part of the checkpoint, report.
fn child_main(
    regions: &[RamRegion],
    writer: &mut CheckpointWriter,
    in_parent: Option<&PageBits>,
    unpopulated: Unpopulated,
    mut out: File,
) -> i32 {
    let counters = SaveCounters::default();
    // SAFETY: in the forked child, guest memory is this process's private copy as of the fork;
    // no vCPU or device runs here.
    let result = unsafe { write_all(regions, writer.memory(), &counters, in_parent, unpopulated) }
        .map_err(|e| causes(&e))
        .and_then(|()| writer.finish_memory().map_err(|e| causes(&e)))
        .and_then(|report| serde_json::to_vec(&report).map_err(|e| causes(&e)));
    let (payload, status) = match result {
        Ok(json) => (json, 0),
        Err(msg) => (format!("ERR {msg}").into_bytes(), 1),
    };
    match out.write_all(&payload) {
        Ok(()) => status,
        Err(_) => 2,
    }
}

/// Forks the writer. Call while the VM is paused: the child's memory is the checkpoint's. The
/// pages of `in_parent` are kept in the parent checkpoint, not written.
pub fn fork_writer(
    regions: &[RamRegion],
    writer: &mut CheckpointWriter,
    in_parent: Option<&PageBits>,
    unpopulated: Unpopulated,
) -> Result<ForkedWriter, CowError> {
    let (report_r, report_w) = pipe()?;
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    // SAFETY: fork duplicates the process; the child runs only `child_main` (see the module
    // documentation for why that is sound in a multi-threaded parent) and leaves with `_exit`.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(CowError::Fork(std::io::Error::last_os_error())),
        0 => {
            // The child dies with the VMM: a writer left behind would hold the store and
            // memory for nothing. If the VMM died before the request, the parent is already
            // another process.
            // SAFETY: prctl and getppid are plain system calls, safe in a forked child.
            let orphan = unsafe {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 || libc::getppid() != parent
            };
            if orphan {
                // SAFETY: as below.
                unsafe { libc::_exit(3) }
            }
            drop(report_r);
            let status = child_main(regions, writer, in_parent, unpopulated, report_w);
            // SAFETY: `_exit` ends the child without running the parent's atexit handlers or
            // destructors, which belong to the parent's threads.
            unsafe { libc::_exit(status) }
        }
        pid => {
            drop(report_w);
            Ok(ForkedWriter {
                pid,
                report: report_r,
            })
        }
    }
}

impl ForkedWriter {
    /// Waits for the child and returns its memory report.
    pub fn wait(mut self) -> Result<MemoryReport, CowError> {
        let mut payload = Vec::new();
        let read = self.report.read_to_end(&mut payload);
        let mut status = 0;
        // SAFETY: waits for our own child; `status` receives its exit status.
        let rc = unsafe { libc::waitpid(self.pid, &mut status, 0) };
        if rc != self.pid {
            return Err(CowError::Fork(std::io::Error::last_os_error()));
        }
        read.map_err(CowError::Fork)?;
        if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
            let msg = String::from_utf8_lossy(&payload);
            let detail = msg.strip_prefix("ERR ").unwrap_or("no report").to_string();
            return Err(CowError::Child(format!(
                "{detail} (wait status {status:#x})"
            )));
        }
        serde_json::from_slice(&payload).map_err(|e| CowError::Child(format!("bad report: {e}")))
    }
}
