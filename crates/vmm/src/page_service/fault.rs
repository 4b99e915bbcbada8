//! The fault handler: serves the block of each first touch.

use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::{Installer, PageServiceError, Shared, BLOCK_PAGES, RESIDENT};
use crate::memory::PAGE_SIZE;

/// How long the handler waits for a fault between checks of its stop flag.
const POLL: Duration = Duration::from_millis(20);

pub(super) fn handler_loop(shared: &Shared) {
    let mut faults = Vec::with_capacity(32);
    let mut buf = vec![0u8; (BLOCK_PAGES * PAGE_SIZE) as usize];
    while !shared.stop.load(Ordering::Acquire) && !shared.is_resident() {
        let mut pfd = libc::pollfd {
            fd: shared.uffd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: polls one valid fd for at most POLL.
        let rc = unsafe { libc::poll(&mut pfd, 1, POLL.as_millis() as i32) };
        if rc <= 0 {
            continue;
        }
        faults.clear();
        if let Err(source) = shared.uffd.read_missing(&mut faults) {
            shared.fail(&PageServiceError::Uffd { op: "read", source });
            return;
        }
        for &address in &faults {
            if let Err(e) = serve_fault(shared, address as usize, &mut buf) {
                // A failed block is never installed: its waiters stay blocked (the VM is
                // stopping). Other blocks are still served, so the VMM's own threads are not
                // left waiting on good pages while the VM shuts down.
                tracing::debug!("fault at {address:#x} not served: {e}");
            }
        }
    }
}

fn serve_fault(shared: &Shared, address: usize, buf: &mut [u8]) -> Result<(), PageServiceError> {
    let Some(page) = shared.regions.iter().find_map(|r| r.page_of_host(address)) else {
        return Ok(());
    };
    let block = page / BLOCK_PAGES;
    if shared.claim(block) {
        return shared.serve(block, buf, Installer::Fault);
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
    Ok(())
}
