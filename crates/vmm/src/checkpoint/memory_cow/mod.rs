//! Marking guest memory copy-on-write and writing its checkpoint-instant content out.
//!
//! Three strategies (design.md §2), all honouring the same promise — the store ends up holding every
//! page exactly as it was at the pause:
//! - [`uffd`]: userfaultfd write-protection; a write fault saves the original before it lifts
//!   the protection, while a background thread saves everything else;
//! - [`fork`]: a child process inherits guest memory, and the kernel's own copy-on-write keeps
//!   the child's view frozen while it writes it out;
//! - [`stop`]: stop-and-copy, the baseline: the VM stays paused until memory is written.
//!
//! None of them reads a page the guest never populated where such a page is known to be zero
//! (see [`Unpopulated`]).

pub mod fork;
pub mod stop;
pub mod uffd;
pub(crate) mod uffd_sys;

use std::sync::atomic::{AtomicU64, Ordering};

use ckpt_format::MemoryWriter;
use thiserror::Error;

use super::dirty::PageBits;
use crate::memory::{RamRegion, PAGE_SIZE};

/// Errors of the memory COW mechanisms.
#[derive(Debug, Error)]
pub enum CowError {
    /// userfaultfd is unavailable or lacks a feature.
    #[error("userfaultfd write protection is unavailable")]
    Userfaultfd(#[source] std::io::Error),
    /// A userfaultfd operation failed.
    #[error("userfaultfd {op} failed")]
    UffdOp {
        /// The operation.
        op: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Writing pages to the store failed.
    #[error("writing guest memory to the checkpoint store failed")]
    Store(#[source] ckpt_format::Error),
    /// fork() or its pipe failed.
    #[error("cannot fork the memory writer process")]
    Fork(#[source] std::io::Error),
    /// The forked writer failed.
    #[error("the forked memory writer failed: {0}")]
    Child(String),
    /// A thread of the mechanism could not be started.
    #[error("cannot start the {0} thread")]
    Thread(&'static str, #[source] std::io::Error),
    /// A buffer to copy original pages aside could not be mapped.
    #[error("cannot map a buffer for original pages")]
    CopyBuffer(#[source] std::io::Error),
    /// A worker thread panicked.
    #[error("the {0} thread panicked")]
    Panicked(&'static str),
}

/// How many pages each path saved.
#[derive(Debug, Default)]
pub struct SaveCounters {
    /// Pages saved by the write-fault path (uffd) or by nobody but the copier (0 elsewhere).
    pub by_fault: AtomicU64,
    /// Pages saved by the background writer (or the child, or the stop-and-copy loop).
    pub in_background: AtomicU64,
}

impl SaveCounters {
    /// (by fault, in background).
    pub fn get(&self) -> (u64, u64) {
        (
            self.by_fault.load(Ordering::Relaxed),
            self.in_background.load(Ordering::Relaxed),
        )
    }
}

/// The copy-aside budget of `uffd` when the user sets none: a quarter of the host's available
/// memory (`MemAvailable`) at the checkpoint's start, at least [`MIN_COW_BUDGET`]. A quarter
/// leaves the page cache the store writes through, and the rest of the host, most of what is
/// free; the floor keeps a small host's guest from waiting on the store at its first faults.
pub(crate) fn default_cow_budget() -> u64 {
    (host_available_memory().unwrap_or(0) / 4).max(MIN_COW_BUDGET)
}

/// The host's available memory (`MemAvailable`), in bytes, if `/proc/meminfo` tells.
pub(crate) fn host_available_memory() -> Option<u64> {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| mem_available(&text))
}

/// The smallest default copy-aside budget (64 MiB).
pub(crate) const MIN_COW_BUDGET: u64 = 64 << 20;

/// `MemAvailable` of a `/proc/meminfo` text, in bytes.
fn mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Largest run of pages saved in one store write.
pub(crate) const RUN_PAGES: u64 = 512;

/// The bytes of `count` pages of `region` starting at image page `first`.
///
/// # Safety
/// The pages must not change while the returned slice is alive: the VM is paused, or this is
/// the frozen copy in a forked child, or the pages are write-protected (any writer, vCPU, device
/// or kernel, blocks on the protection until it is lifted after the slice is dropped).
pub(crate) unsafe fn page_bytes(region: &RamRegion, first: u64, count: u64) -> &[u8] {
    debug_assert!(
        first >= region.first_page() && first + count <= region.first_page() + region.pages()
    );
    // SAFETY: the range lies inside the region's live mapping (checked above in debug builds and
    // by every caller's loop bounds); stability is the caller's promise.
    unsafe {
        std::slice::from_raw_parts(
            region.host_of_page(first) as *const u8,
            (count * PAGE_SIZE) as usize,
        )
    }
}

/// What a page of guest memory that was never populated holds, for the strategies that read
/// all of memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unpopulated {
    /// Zero: guest memory is private anonymous memory and nothing fills it in behind the
    /// guest, so such a page is recorded as zero without being read (which would cost a host
    /// page fault and a scan for zeros each).
    Zero,
    /// Unknown, so every page is read: a clone's memory maps its checkpoint's image (a page not
    /// mapped there holds the file's bytes), or a page service is still filling memory.
    Read,
}

/// Where [`save_all`] puts the bytes of a run of populated pages: (first image page, bytes).
pub(crate) type Sink<'a> = dyn FnMut(u64, &[u8]) -> Result<(), CowError> + 'a;

/// Writes every page of `regions` to the store, as [`save_all`].
///
/// # Safety
/// As [`page_bytes`]: nothing may write guest memory while this runs.
pub(crate) unsafe fn write_all(
    regions: &[RamRegion],
    writer: &MemoryWriter,
    counters: &SaveCounters,
    in_parent: Option<&PageBits>,
    unpopulated: Unpopulated,
) -> Result<(), CowError> {
    let mut to_store =
        |first: u64, bytes: &[u8]| writer.write_pages(first, bytes).map_err(CowError::Store);
    // SAFETY: the caller's promise.
    unsafe {
        save_all(
            regions,
            writer,
            counters,
            in_parent,
            unpopulated,
            &mut to_store,
        )
    }
}

/// Saves every page of `regions` in runs of [`RUN_PAGES`], counting them as background saves:
/// the bytes of populated pages go to `sink`; the pages of `in_parent` (an incremental
/// checkpoint's pages unchanged since its parent) are recorded in `writer` as kept in the
/// parent. With [`Unpopulated::Zero`], pages this process never populated (per
/// `/proc/self/pagemap`, opened here: in a forked child it is the child's) are recorded as zero
/// without being read.
///
/// # Safety
/// As [`page_bytes`]: nothing may write guest memory while this runs.
pub(crate) unsafe fn save_all(
    regions: &[RamRegion],
    writer: &MemoryWriter,
    counters: &SaveCounters,
    in_parent: Option<&PageBits>,
    unpopulated: Unpopulated,
    sink: &mut Sink<'_>,
) -> Result<(), CowError> {
    let map = match unpopulated {
        Unpopulated::Zero => std::fs::File::open("/proc/self/pagemap").ok(),
        Unpopulated::Read => None,
    };
    for region in regions {
        let end = region.first_page() + region.pages();
        let mut page = region.first_page();
        while page < end {
            let count = RUN_PAGES.min(end - page);
            let Some(kept) = in_parent else {
                // SAFETY: the caller's promise.
                unsafe { write_run(region, page, count, writer, map.as_ref(), sink)? };
                counters.in_background.fetch_add(count, Ordering::Relaxed);
                page += count;
                continue;
            };
            for (first, n) in kept.runs(page, page + count, true) {
                writer.keep_in_parent(first, n).map_err(CowError::Store)?;
            }
            for (first, n) in kept.runs(page, page + count, false) {
                // SAFETY: the caller's promise.
                unsafe { write_run(region, first, n, writer, map.as_ref(), sink)? };
                counters.in_background.fetch_add(n, Ordering::Relaxed);
            }
            page += count;
        }
    }
    Ok(())
}

/// Saves pages `first..first + count` of `region`: those `map` (this process's page map, if
/// given and readable) shows were never populated are recorded as zero without being read, the
/// others go to `sink`.
///
/// # Safety
/// As [`page_bytes`].
unsafe fn write_run(
    region: &RamRegion,
    first: u64,
    count: u64,
    writer: &MemoryWriter,
    map: Option<&std::fs::File>,
    sink: &mut Sink<'_>,
) -> Result<(), CowError> {
    let populated = map.and_then(|m| {
        crate::memory::populated(m, region.host_of_page(first), count)
            .map_err(|e| tracing::debug!("cannot read the page map: {e}"))
            .ok()
    });
    let Some(populated) = populated else {
        // SAFETY: the caller's promise.
        let bytes = unsafe { page_bytes(region, first, count) };
        return sink(first, bytes);
    };
    let mut i = 0;
    while i < count {
        let there = populated[i as usize];
        let run = populated[i as usize..]
            .iter()
            .take_while(|&&p| p == there)
            .count() as u64;
        if there {
            // SAFETY: the caller's promise.
            let bytes = unsafe { page_bytes(region, first + i, run) };
            sink(first + i, bytes)?;
        } else {
            writer.write_zero(first + i, run).map_err(CowError::Store)?;
        }
        i += run;
    }
    Ok(())
}

/// Host memory for copies of guest pages, private and anonymous, page-aligned so that a store
/// may write from it with direct I/O. Populated when made where asked: copying into memory
/// already mapped runs several times faster than into fresh memory, each page of which costs a
/// host page fault (and zeroing) at its first touch.
pub(crate) struct Arena {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: the arena owns its mapping; nothing else refers to it.
unsafe impl Send for Arena {}

impl Arena {
    /// An arena of `len` bytes (a multiple of the page size); `populate` maps its pages now
    /// rather than at their first write.
    pub(crate) fn new(len: usize, populate: bool) -> std::io::Result<Arena> {
        debug_assert!(len > 0 && len as u64 % PAGE_SIZE == 0);
        let populate = if populate { libc::MAP_POPULATE } else { 0 };
        // SAFETY: a new private anonymous mapping; no existing memory is affected.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | populate,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Arena {
            ptr: std::ptr::NonNull::new(raw.cast()).expect("mmap never returns null"),
            len,
        })
    }
}

impl std::ops::Deref for Arena {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: the mapping is `len` bytes, readable, and lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for Arena {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as for `deref`, and `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: the mapping is this arena's own, and no reference to it outlives `self`.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// The pages of `regions` the guest populated (mapped, or swapped out), per this process's page
/// map; `None` if it cannot be read.
pub(crate) fn populated_pages(regions: &[RamRegion]) -> Option<PageBits> {
    const CHUNK: u64 = 1 << 16;
    let map = std::fs::File::open("/proc/self/pagemap")
        .map_err(|e| tracing::debug!("cannot open the page map: {e}"))
        .ok()?;
    let pages = regions.iter().map(RamRegion::pages).sum();
    let mut populated = PageBits::new(pages);
    for r in regions {
        let mut done = 0;
        while done < r.pages() {
            let n = CHUNK.min(r.pages() - done);
            let present = crate::memory::populated(&map, r.host_of_page(r.first_page() + done), n)
                .map_err(|e| tracing::debug!("cannot read the page map: {e}"))
                .ok()?;
            for (i, _) in present.iter().enumerate().filter(|(_, &p)| p) {
                populated.set(r.first_page() + done + i as u64);
            }
            done += n;
        }
    }
    Some(populated)
}

/// How much of `regions` the guest populated: (pages, blocks of `block_pages` from each
/// region's start holding at least one such page); `None` if the page map cannot be read.
pub(crate) fn populated_in(regions: &[RamRegion], block_pages: u64) -> Option<(u64, u64)> {
    let populated = populated_pages(regions)?;
    let mut blocks = 0;
    for r in regions {
        let end = r.first_page() + r.pages();
        let mut first = r.first_page();
        while first < end {
            let block_end = (first + block_pages).min(end);
            blocks += u64::from(populated.any(first, block_end));
            first = block_end;
        }
    }
    Some((populated.count(), blocks))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_available_is_read_in_bytes() {
        let text = "MemTotal:        8000000 kB\nMemFree:  100 kB\nMemAvailable:    4096 kB\n";
        assert_eq!(mem_available(text), Some(4 << 20));
        assert_eq!(mem_available("MemTotal: 1 kB\n"), None);
        assert!(default_cow_budget() >= MIN_COW_BUDGET);
    }
}
