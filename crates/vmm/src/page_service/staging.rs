//! Blocks installed as transparent huge pages.
//!
//! `UFFDIO_COPY` installs small pages, and a guest on small pages pays KVM a fault per page as
//! it first touches each one (on the development host, a first pass over 1 GiB took 0.9 s on
//! small pages and 0.15 s on huge ones). So where the kernel can move pages (`UFFDIO_MOVE`),
//! each service thread reads a block straight into a staging area of its own that asks for a
//! huge page, verifies it there, and moves it into guest memory: at 2 MiB-aligned addresses
//! the kernel hands over the huge page's page-table entry and no byte is copied again. Guest
//! memory asks for huge pages too, so that a fault on it leaves its page table empty for the
//! move. Where the kernel moves less (no huge page was free, a page of the block is present
//! already), the rest is copied from the staging area as before; a block that is all zeros is
//! mapped with the zero page, never staged.

use std::cell::RefCell;

use super::source::RunKind;
use super::{PageServiceError, Shared, BLOCK_PAGES};
use crate::memory::{self, RamRegion, PAGE_SIZE};

const BLOCK_BYTES: usize = (BLOCK_PAGES * PAGE_SIZE) as usize;

/// A 2 MiB-aligned block of anonymous memory that asks for a huge page; empty (reading as
/// zeros) whenever it is not in use.
struct Staging {
    /// The mapping: twice a block, so that an aligned block fits.
    map: *mut libc::c_void,
    /// The aligned block within it.
    block: *mut u8,
}

impl Staging {
    fn new() -> std::io::Result<Staging> {
        // SAFETY: a new private anonymous mapping; no existing memory is affected.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                2 * BLOCK_BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let offset = (map as usize).next_multiple_of(BLOCK_BYTES) - map as usize;
        // SAFETY: `offset` is below BLOCK_BYTES, so the block lies inside the mapping.
        let block = unsafe { map.cast::<u8>().add(offset) };
        // SAFETY: advice on this mapping's own pages. Without a huge page the block still
        // works, in small pages.
        unsafe { libc::madvise(block.cast(), BLOCK_BYTES, libc::MADV_HUGEPAGE) };
        Ok(Staging { map, block })
    }

    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: the block is BLOCK_BYTES of this mapping, which lives as long as `self`, and
        // `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.block, BLOCK_BYTES) }
    }

    /// Drops what is left in the block, so that it reads as zeros again.
    fn clear(&mut self) {
        // SAFETY: discards this mapping's own pages; no reference to them is alive.
        unsafe { libc::madvise(self.block.cast(), BLOCK_BYTES, libc::MADV_DONTNEED) };
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        // SAFETY: the mapping is this value's own, and no reference to it outlives `self`.
        unsafe { libc::munmap(self.map, 2 * BLOCK_BYTES) };
    }
}

thread_local! {
    /// This service thread's staging block, made at its first block.
    static STAGING: RefCell<Option<Staging>> = const { RefCell::new(None) };
}

/// Installs block `first..end` of `region` through this thread's staging block: `None` where
/// that does not apply (a partial or unaligned block, a source that reads into buffers of its
/// own, no staging memory), and the caller installs it as usual.
pub(super) fn install(
    shared: &Shared,
    region: &RamRegion,
    first: u64,
    end: u64,
) -> Option<Result<u64, PageServiceError>> {
    let host = region.host_of_page(first);
    if end - first != BLOCK_PAGES || host as u64 % memory::HUGE_SPAN != 0 {
        return None;
    }
    STAGING.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.is_none() {
            *cell = Staging::new().ok();
        }
        let staging = cell.as_mut()?;
        let runs = match shared.source.fetch_in_place(first, end, staging.bytes())? {
            Ok(runs) => runs,
            Err(e) => {
                staging.clear();
                return Some(Err(e));
            }
        };
        let data = runs.iter().any(|r| matches!(r.kind, RunKind::Data { .. }));
        let result = if data && runs.iter().all(|r| r.kind != RunKind::Present) {
            // Zero runs were never written: the staging block reads as zeros there.
            let moved = shared
                .uffd
                .move_pages(host, staging.block as usize, BLOCK_BYTES)
                as usize;
            if moved < BLOCK_BYTES {
                let copied = shared.uffd.copy(host + moved, &staging.bytes()[moved..]);
                staging.clear();
                if let Err(source) = copied {
                    return Some(Err(PageServiceError::Uffd { op: "copy", source }));
                }
            }
            Ok(BLOCK_BYTES as u64)
        } else {
            // Nothing worth a huge page: the runs go in as small pages.
            let installed = shared.install_runs(region, &runs, staging.bytes());
            if data || installed.is_err() {
                staging.clear();
            }
            installed
        };
        Some(result)
    })
}
