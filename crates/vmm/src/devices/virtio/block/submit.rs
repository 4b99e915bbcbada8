//! Data transfers on io_uring. A request's data moves as one transfer per piece that is
//! contiguous both in guest memory and in a host file; a short transfer is continued where it
//! stopped, and each finished transfer is reported against its request.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use disk::Extent;
use tracing::{error, warn};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::BlockError;
use crate::devices::virtio::uring::{Transfer, Uring};

/// One transfer: file, guest address, length, file offset.
pub(super) type Piece = (Arc<File>, u64, u32, u64);

/// A transfer the kernel may be performing now.
struct Op {
    disk: usize,
    req: u64,
    file: Arc<File>,
    gpa: u64,
    len: u32,
    offset: u64,
    write: bool,
}

/// A transfer that has finished (possibly after being continued).
pub(super) struct Finished {
    pub disk: usize,
    pub req: u64,
    pub failed: bool,
}

/// The ring and the transfers on it.
pub(super) struct Submitter {
    mem: GuestMemoryMmap,
    uring: Uring,
    ops: HashMap<u64, Op>,
    next_id: u64,
}

impl Submitter {
    pub fn new(mem: &GuestMemoryMmap) -> Result<Submitter, BlockError> {
        Ok(Submitter {
            mem: mem.clone(),
            uring: Uring::new().map_err(BlockError::Uring)?,
            ops: HashMap::new(),
            next_id: 0,
        })
    }

    /// Readable when completions wait to be reaped.
    pub fn completion_fd(&self) -> RawFd {
        self.uring.completion_fd()
    }

    /// Transfers queued or performed by the kernel, not reaped yet.
    pub fn outstanding(&self) -> usize {
        self.uring.outstanding()
    }

    /// Queues the transfers of request `req` of disk `disk` (submitted by [`Self::submit`]).
    pub fn push(&mut self, disk: usize, req: u64, pieces: Vec<Piece>, write: bool) {
        for (file, gpa, len, offset) in pieces {
            self.push_op(Op {
                disk,
                req,
                file,
                gpa,
                len,
                offset,
                write,
            });
        }
    }

    fn push_op(&mut self, op: Op) {
        self.next_id += 1;
        let op_id = self.next_id;
        let buf = self
            .mem
            .get_slice(GuestAddress(op.gpa), op.len as usize)
            .expect("transfer ranges were checked against guest memory")
            .ptr_guard_mut()
            .as_ptr();
        let t = Transfer {
            fd: op.file.as_raw_fd(),
            buf,
            len: op.len,
            offset: op.offset,
            write: op.write,
            user_data: op_id,
        };
        self.ops.insert(op_id, op);
        // SAFETY: `buf` points into guest memory, which `self.mem` keeps mapped until the
        // thread exits, and the worker's shutdown reaps every transfer before that; the file
        // stays open because its `Arc` lives in `self.ops` until the completion is reaped. The
        // VMM never forms Rust references to guest memory, so the kernel writing it aliases
        // nothing.
        unsafe { self.uring.push(t) };
    }

    /// Hands the queued transfers to the kernel.
    pub fn submit(&mut self) {
        if let Err(e) = self.uring.submit() {
            error!("io_uring submit failed: {e}");
        }
    }

    /// Blocks until at least one transfer completes.
    pub fn wait_one(&mut self) -> std::io::Result<()> {
        self.uring.wait_one()
    }

    /// Takes the completions: a short transfer is queued again for its rest, the others are
    /// returned.
    pub fn reap(&mut self) -> Vec<Finished> {
        let mut finished = Vec::new();
        for (op_id, res) in self.uring.reap() {
            let Some(mut op) = self.ops.remove(&op_id) else {
                continue;
            };
            let mut failed = res < 0;
            if res >= 0 && (res as u32) < op.len {
                let n = res as u32;
                if n == 0 && !op.write {
                    // Past the end of a file that ends inside a cluster: zeros.
                    failed = zero(&self.mem, op.gpa, op.len).is_err();
                } else if n == 0 {
                    failed = true;
                } else {
                    op.gpa += u64::from(n);
                    op.offset += u64::from(n);
                    op.len -= n;
                    self.push_op(op);
                    continue;
                }
            }
            if failed {
                warn!(disk = op.disk, res, "disk I/O failed");
            }
            finished.push(Finished {
                disk: op.disk,
                req: op.req,
                failed,
            });
        }
        finished
    }
}

/// Pairs the guest segments of a request with the host extents of its sectors: one transfer
/// per piece that is contiguous in both; zero extents are filled at once.
pub(super) fn pair(
    mem: &GuestMemoryMmap,
    segments: &[(u64, u32)],
    extents: &[Extent],
) -> Result<Vec<Piece>, ()> {
    let mut out = Vec::new();
    let mut seg = segments.iter().copied().filter(|s| s.1 > 0);
    let mut cur = seg.next();
    for ext in extents {
        let mut done = 0u64;
        while done < ext.len() {
            let Some((gpa, len)) = cur else {
                return Err(());
            };
            let n = u64::from(len).min(ext.len() - done);
            match ext {
                Extent::Data {
                    file, file_offset, ..
                } => out.push((file.clone(), gpa, n as u32, file_offset + done)),
                Extent::Zero { .. } => zero(mem, gpa, n as u32)?,
            }
            done += n;
            cur = if n == u64::from(len) {
                seg.next()
            } else {
                Some((gpa + n, len - n as u32))
            };
        }
    }
    Ok(out)
}

fn zero(mem: &GuestMemoryMmap, gpa: u64, len: u32) -> Result<(), ()> {
    const ZEROS: [u8; 4096] = [0; 4096];
    let mut at = 0u64;
    while at < u64::from(len) {
        let n = (u64::from(len) - at).min(4096) as usize;
        mem.write_slice(&ZEROS[..n], GuestAddress(gpa + at))
            .map_err(|_| ())?;
        at += n as u64;
    }
    Ok(())
}
