//! Blocks of memory mapped before the VM runs, for pages that arrive while it runs.
//!
//! `UFFDIO_COPY` allocates each page it installs, and a fresh page costs the kernel a clear
//! (and, on a host that is itself virtual, a fault of the outer hypervisor that backs it: ~10 µs
//! a page on the development host). A page service whose pages come over a connection
//! (a migration) can have that paid before the guest moves: the destination maps a reservoir
//! of zeroed blocks, as many as the source has populated, while the guest still runs at the
//! source. Each block that arrives is then written into a reservoir block and moved into guest
//! memory whole (`UFFDIO_MOVE`: page-table entries change hands, a huge page at 2 MiB-aligned
//! addresses moves as one), its zero pages included, so the guest's first write to one of those
//! costs no fault either. A block that holds pages already present, or one of zeros only, goes
//! in as before; so does every block once the reservoir is spent.
//!
//! A hybrid migration fills its reservoir another way: the blocks of guest memory it drops
//! before the hand-over (the guest wrote them again after pre-copy sent them) are moved into
//! the reservoir whole instead of being freed ([`Reservoir::adopt`]), and their memory serves
//! the pages that replace them. Such a block still holds its old bytes, so every zero run
//! installed from it is cleared first.

use std::sync::atomic::{AtomicU64, Ordering};

use tracing::debug;

use super::source::{Run, RunKind};
use super::{PageServiceError, Shared, BLOCK_PAGES};
use crate::checkpoint::memory_cow::uffd_sys::{Uffd, UFFD_FEATURE_MOVE};
use crate::memory::{self, RamRegion, PAGE_SIZE};

const BLOCK_BYTES: usize = (BLOCK_PAGES * PAGE_SIZE) as usize;

/// Blocks of anonymous memory, mapped ahead, each handed out once.
pub struct Reservoir {
    /// The mapping: one block more than the reservoir has room for, so that aligned blocks
    /// fit.
    map: *mut libc::c_void,
    map_len: usize,
    /// The first aligned block within it.
    first: *mut u8,
    /// Room, in blocks.
    room: u64,
    /// Blocks mapped (from the first): those handed out, and those still to hand out.
    blocks: u64,
    next: AtomicU64,
}

// SAFETY: the mapping is owned by the reservoir and each block is handed to one thread only
// (`next` counts them out); the raw pointers are not tied to the thread that made them.
unsafe impl Send for Reservoir {}
// SAFETY: as above: the only shared state is the atomic counter.
unsafe impl Sync for Reservoir {}

impl Reservoir {
    /// Maps `blocks` zeroed 2 MiB blocks, in huge pages where the kernel has them, and touches
    /// them all now. `None` if the kernel cannot map them ahead (before Linux 5.14) or the host
    /// lacks the memory: pages are then allocated as they arrive.
    pub fn mapped(blocks: u64) -> Option<Reservoir> {
        let mut reservoir = Reservoir::empty(blocks)?;
        let len = blocks as usize * BLOCK_BYTES;
        // SAFETY: advice on this mapping's own pages, which nothing references yet. Without
        // huge pages the blocks still work, in small pages.
        unsafe { libc::madvise(reservoir.first.cast(), len, libc::MADV_HUGEPAGE) };
        // SAFETY: as above; populating maps zeroed pages where none are.
        let rc = unsafe { libc::madvise(reservoir.first.cast(), len, libc::MADV_POPULATE_WRITE) };
        if rc != 0 {
            debug!("no reservoir: {}", std::io::Error::last_os_error());
            return None;
        }
        reservoir.blocks = blocks;
        Some(reservoir)
    }

    /// Room for `room` blocks, none mapped yet: [`Self::adopt`] fills it. `None` where the
    /// kernel cannot move pages into guest memory (`UFFDIO_MOVE`, Linux 6.8), which a
    /// reservoir is for.
    pub fn empty(room: u64) -> Option<Reservoir> {
        if room == 0 || Uffd::new(UFFD_FEATURE_MOVE).is_err() {
            return None;
        }
        let map_len = usize::try_from(room + 1).ok()?.checked_mul(BLOCK_BYTES)?;
        // SAFETY: a new private anonymous mapping; no existing memory is affected.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if map == libc::MAP_FAILED {
            debug!("no reservoir: {}", std::io::Error::last_os_error());
            return None;
        }
        let offset = (map as usize).next_multiple_of(BLOCK_BYTES) - map as usize;
        Some(Reservoir {
            map,
            map_len,
            // SAFETY: `offset` is below BLOCK_BYTES, so `room` blocks from there lie inside
            // the mapping.
            first: unsafe { map.cast::<u8>().add(offset) },
            room,
            blocks: 0,
            next: AtomicU64::new(0),
        })
    }

    /// Moves the pages of the 2 MiB-aligned block at host address `block` into the
    /// reservoir's next free block (`mremap` with `MREMAP_DONTUNMAP`: page-table entries change
    /// hands, a huge page whole, and `block` stays mapped, empty, reading as missing). The
    /// memory a stale block held thus serves the block that replaces it, with no allocation.
    /// False, and nothing changed, if the reservoir is full or the kernel refuses.
    pub fn adopt(&mut self, block: usize) -> bool {
        if self.blocks >= self.room || block % BLOCK_BYTES != 0 {
            return false;
        }
        // SAFETY: the free block lies inside the mapping (blocks < room).
        let to = unsafe { self.first.add(self.blocks as usize * BLOCK_BYTES) };
        // SAFETY: `block` is a block of private anonymous memory that the caller owns and
        // nothing else uses while it runs; its pages move to `to`, a block of this reservoir's
        // own mapping that holds nothing (MREMAP_FIXED replaces what is there), and `block`
        // stays mapped, empty.
        let moved = unsafe {
            libc::mremap(
                block as *mut libc::c_void,
                BLOCK_BYTES,
                BLOCK_BYTES,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED | libc::MREMAP_DONTUNMAP,
                to.cast::<libc::c_void>(),
            )
        };
        if moved == libc::MAP_FAILED {
            debug!(
                "a stale block is freed, not kept: {}",
                std::io::Error::last_os_error()
            );
            return false;
        }
        self.blocks += 1;
        true
    }

    /// The blocks handed out so far.
    #[cfg(test)]
    fn used(&self) -> u64 {
        self.next.load(Ordering::Relaxed).min(self.blocks)
    }

    /// The address of the next unused block, or `None` once all are handed out.
    fn take(&self) -> Option<*mut u8> {
        let index = self.next.fetch_add(1, Ordering::Relaxed);
        if index >= self.blocks {
            return None;
        }
        // SAFETY: block `index` lies inside the mapping (index < blocks).
        Some(unsafe { self.first.add(index as usize * BLOCK_BYTES) })
    }

    /// Installs fetched block `first..end` of `region` through a reservoir block: its data
    /// runs written there, its zero runs left zero, the whole moved into guest memory. `None`
    /// where that does not apply (a partial or unaligned block, pages present already, zeros
    /// only, the reservoir spent), and the caller installs the runs as usual.
    pub(super) fn install(
        &self,
        shared: &Shared,
        region: &RamRegion,
        first: u64,
        end: u64,
        runs: &[Run],
        buf: &[u8],
    ) -> Option<Result<u64, PageServiceError>> {
        let host = region.host_of_page(first);
        let whole = end - first == BLOCK_PAGES && host as u64 % memory::HUGE_SPAN == 0;
        let data = runs.iter().any(|r| matches!(r.kind, RunKind::Data { .. }));
        if !whole || !data || runs.iter().any(|r| r.kind == RunKind::Present) {
            return None;
        }
        let at = self.take()?;
        // SAFETY: the block lies inside the mapping, which lives as long as `self`; the
        // counter hands each block out once, so this is its only reference.
        let block = unsafe { std::slice::from_raw_parts_mut(at, BLOCK_BYTES) };
        for run in runs {
            let len = (run.count * PAGE_SIZE) as usize;
            let to = ((run.first - first) * PAGE_SIZE) as usize;
            match run.kind {
                RunKind::Data { at } => block[to..to + len].copy_from_slice(&buf[at..at + len]),
                // An adopted block holds what its pages held before.
                RunKind::Zero => block[to..to + len].fill(0),
                // Not in a block moved whole (see above).
                RunKind::Present => {}
            }
        }
        let moved = shared
            .uffd
            .move_pages(host, block.as_ptr() as usize, BLOCK_BYTES) as usize;
        if moved < BLOCK_BYTES {
            // What the kernel did not move stays in the reservoir block, unused, until the
            // reservoir goes.
            if let Err(source) = shared.uffd.copy(host + moved, &block[moved..]) {
                return Some(Err(PageServiceError::Uffd { op: "copy", source }));
            }
        }
        Some(Ok(BLOCK_BYTES as u64))
    }
}

impl Drop for Reservoir {
    fn drop(&mut self) {
        debug!(
            used = self.next.load(Ordering::Relaxed).min(self.blocks),
            blocks = self.blocks,
            "reservoir released"
        );
        // SAFETY: the mapping is this value's own, and no block handed out outlives `self`
        // (they are borrowed from it). Pages moved out of it belong to guest memory now.
        unsafe { libc::munmap(self.map, self.map_len) };
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::exit::ExitNotifier;
    use crate::memory::HugePages;
    use crate::page_service::{BlockSource, PageService, ServiceSpec};

    /// Page `p` holds `p + 1` in every byte, except every third page, which is zero; the
    /// second block is all zeros.
    fn expected(page: u64) -> u8 {
        if page % 3 == 0 || page / BLOCK_PAGES == 1 {
            0
        } else {
            (page + 1) as u8
        }
    }

    struct Pattern;

    impl BlockSource for Pattern {
        fn describe(&self) -> String {
            "a pattern".into()
        }

        fn fetch(
            &self,
            first: u64,
            end: u64,
            buf: &mut Vec<u8>,
        ) -> Result<Vec<Run>, PageServiceError> {
            buf.clear();
            let mut runs = Vec::new();
            for page in first..end {
                let kind = match expected(page) {
                    0 => RunKind::Zero,
                    byte => {
                        buf.extend(std::iter::repeat_n(byte, PAGE_SIZE as usize));
                        RunKind::Data {
                            at: buf.len() - PAGE_SIZE as usize,
                        }
                    }
                };
                runs.push(Run {
                    first: page,
                    count: 1,
                    kind,
                });
            }
            Ok(runs)
        }
    }

    /// Serves the pattern into `regions` through `reservoir` until every block is resident.
    fn serve_pattern(regions: &[RamRegion], reservoir: &Arc<Reservoir>) {
        let service = PageService::start(ServiceSpec {
            regions: regions.to_vec(),
            source: Arc::new(Pattern),
            role: "test VM",
            hot_pages: Vec::new(),
            exit: Arc::new(ExitNotifier::default()),
            reservoir: Some(reservoir.clone()),
        })
        .unwrap();
        service.prefetch().unwrap();
        service.wait_resident(Duration::from_secs(10)).unwrap();
    }

    /// Checks every page of `memory` against the pattern.
    fn assert_holds_pattern(memory: &vm_memory::GuestMemoryMmap) {
        let regions = memory::ram_regions(memory);
        let mut page = vec![0u8; PAGE_SIZE as usize];
        for p in 0..regions[0].pages() {
            memory
                .read_slice(&mut page, GuestAddress(p * PAGE_SIZE))
                .unwrap();
            assert!(
                page.iter().all(|&b| b == expected(p)),
                "page {p} does not hold what was sent"
            );
        }
    }

    #[test]
    fn blocks_moved_from_the_reservoir_read_back_as_sent() {
        let memory = memory::create_guest_memory(16 << 20, HugePages::Thp).unwrap();
        let regions = memory::ram_regions(&memory);
        let reservoir = Arc::new(Reservoir::mapped(4).expect("a reservoir"));
        serve_pattern(&regions, &reservoir);
        // Seven blocks hold data: four come from the reservoir, the others are copied in once
        // it is spent; the block of zeros is mapped as such.
        assert_eq!(reservoir.used(), 4);
        assert_holds_pattern(&memory);
        // A zero page that came with a data block is the guest's to write.
        let mut page = [0u8; 1];
        memory
            .write_slice(&[7], GuestAddress(3 * PAGE_SIZE))
            .unwrap();
        memory
            .read_slice(&mut page, GuestAddress(3 * PAGE_SIZE))
            .unwrap();
        assert_eq!(page[0], 7);
    }

    #[test]
    fn adopted_blocks_serve_new_pages_and_their_old_bytes_never_show() {
        let memory = memory::create_guest_memory(16 << 20, HugePages::Thp).unwrap();
        let regions = memory::ram_regions(&memory);
        // Stale bytes everywhere, as pre-copy would have left them.
        memory
            .write_slice(&vec![0xee; 16 << 20], GuestAddress(0))
            .unwrap();
        let mut reservoir = Reservoir::empty(8).expect("room");
        for block in 0..8 {
            let host = regions[0].host_of_page(block * BLOCK_PAGES);
            assert!(reservoir.adopt(host), "block {block} not adopted");
        }
        assert!(
            !reservoir.adopt(regions[0].host_of_page(0)),
            "a full reservoir adopts"
        );
        // Adopted blocks are left empty (reading one now would map a zero page over it).
        let map = std::fs::File::open("/proc/self/pagemap").unwrap();
        let present = memory::populated(&map, regions[0].host, regions[0].pages()).unwrap();
        assert!(present.iter().all(|&p| !p), "a page stayed behind");
        let reservoir = Arc::new(reservoir);
        serve_pattern(&regions, &reservoir);
        // Seven blocks hold data, each served by an adopted block.
        assert_eq!(reservoir.used(), 7);
        assert_holds_pattern(&memory);
    }
}
