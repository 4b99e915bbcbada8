//! The fault handler: serves the block of each first touch, and while no fault waits, reads
//! ahead of the last one.
//!
//! Read-ahead: a guest that faults on a block is likely to touch the blocks after it next (a
//! sequential pass over memory is the common case, and the worst one for a service that fetches
//! on demand: the guest would wait for every block in turn). So between faults the handler
//! installs the missing blocks after the last faulting one, one at a time, checking for a new
//! fault before each: a fault waits for at most the block being installed. The prefetcher works
//! through its own order meanwhile; each block is still installed once, by whoever claims it.

use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::{Installer, PageServiceError, Shared, BLOCK_PAGES, MISSING, RESIDENT};
use crate::memory::PAGE_SIZE;

/// How long the handler waits for a fault between checks of its stop flag.
const POLL: Duration = Duration::from_millis(20);

pub(super) fn handler_loop(shared: &Shared) {
    let mut faults = Vec::with_capacity(32);
    let mut buf = vec![0u8; (BLOCK_PAGES * PAGE_SIZE) as usize];
    // The next block to read ahead, if any.
    let mut ahead: Option<u64> = None;
    while !shared.stop.load(Ordering::Acquire) && !shared.is_resident() {
        let mut pfd = libc::pollfd {
            fd: shared.uffd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let timeout = if ahead.is_some() {
            0
        } else {
            POLL.as_millis() as i32
        };
        // SAFETY: polls one valid fd for at most POLL.
        let rc = unsafe { libc::poll(&mut pfd, 1, timeout) };
        if rc <= 0 {
            if let Some(block) = ahead {
                ahead = read_ahead(shared, block, &mut buf);
            }
            continue;
        }
        faults.clear();
        if let Err(source) = shared.uffd.read_missing(&mut faults) {
            shared.fail(&PageServiceError::Uffd { op: "read", source });
            return;
        }
        for &address in &faults {
            match serve_fault(shared, address as usize, &mut buf) {
                Ok(Some(block)) => ahead = Some(block + 1),
                Ok(None) => {}
                // A failed block is never installed: its waiters stay blocked (the VM is
                // stopping). Other blocks are still served, so the VMM's own threads are not
                // left waiting on good pages while the VM shuts down.
                Err(e) => tracing::debug!("fault at {address:#x} not served: {e}"),
            }
        }
    }
}

/// Serves the fault at `address`; returns its block.
fn serve_fault(
    shared: &Shared,
    address: usize,
    buf: &mut Vec<u8>,
) -> Result<Option<u64>, PageServiceError> {
    let Some(page) = shared.regions.iter().find_map(|r| r.page_of_host(address)) else {
        return Ok(None);
    };
    let block = page / BLOCK_PAGES;
    if shared.claim(block) {
        return shared
            .serve(block, buf, Installer::Fault)
            .map(|()| Some(block));
    }
    if shared.state(block) == RESIDENT {
        // Installed by the prefetcher, whose copy may have woken the range before this thread
        // went to sleep on it: wake it explicitly. A block still claimed is woken by its
        // installer; a failed one never.
        let region = shared.region_of(page);
        shared
            .uffd
            .wake(region.host_of_page(page), PAGE_SIZE as usize)
            .map_err(|source| PageServiceError::Uffd { op: "wake", source })?;
    }
    Ok(Some(block))
}

/// Installs the first missing block from `from` on (wrapping around at the end of memory);
/// returns the block to continue from, or `None` when none is missing or the service failed.
fn read_ahead(shared: &Shared, from: u64, buf: &mut Vec<u8>) -> Option<u64> {
    let blocks = shared.block_count();
    let block = (0..blocks)
        .map(|i| (from + i) % blocks)
        .find(|&b| shared.state(b) == MISSING)?;
    if !shared.claim(block) {
        // Claimed by the prefetcher just now: look again after it.
        return Some(block + 1);
    }
    shared
        .serve(block, buf, Installer::Prefetch)
        .ok()
        .map(|()| block + 1)
}
