//! The `uffd` strategy: userfaultfd write protection.
//!
//! The invariant that makes it correct, owned by [`UffdCow`]: **from the pause on, every page is
//! write-protected or its original is already saved.** The page states (unsaved → claimed →
//! saved) are claimed with a compare-and-swap, so the fault path and the background writer never
//! both save a page and never miss one: whoever claims a page reads it while it is still
//! protected, writes it to the store, and only then lifts the protection.
//!
//! The pause must not grow with memory, yet write-protecting gigabytes takes tens of
//! milliseconds. So protection is laid **before** the pause, while the VM runs ("arming"): a
//! write fault during arming just lifts the protection and records the page as touched; touched
//! pages are protected again in a few shrinking rounds, and the pause only re-protects the last
//! few. The arming handler and the final re-protection are serialised by a lock, so no page can
//! be unprotected between the last re-protection and the switch to saving.
//!
//! An incremental checkpoint saves only the pages written since its parent, so only those are
//! protected: the ones the dirty log knows of when arming starts, and in the pause the few
//! written since. The pages kept in the parent are never protected (their content at the
//! instant is the parent's whatever the guest writes afterwards), which makes an incremental
//! checkpoint's cost follow what the guest wrote, not the size of memory.
//!
//! Faults are served a block at a time ([`BLOCK_PAGES`]): a guest writing memory sequentially
//! takes one fault per block instead of one per page, since a fault round trip costs tens of
//! microseconds here. And originals are *copied aside*: whoever claims a run copies it into a
//! buffer and lifts the protection at once; hashing and writing to the store happen afterwards,
//! off the faulting vCPU's path (a store writer thread for faults). The copies waiting for the
//! store are bounded by the copy-aside budget: while budget remains the guest never waits on the
//! store; once it is spent, the guest is slowed to store speed rather than memory growing
//! without limit. The background writer walks memory from the top down, away from a guest that
//! writes upwards; while three quarters of the budget last it only copies blocks aside for the
//! store writer, so it runs at memory speed and the guest meets more pages already saved. The
//! buffers are page-aligned mappings, which a directory store writes with direct I/O.
//!
//! Pages the guest never populated are recorded as zero without being read
//! ([`never_populated`]): in private anonymous memory (the only kind this strategy arms; a
//! clone's file-backed memory uses `fork`) such a page is zero, and reading it would cost a host
//! page fault and a scan for zeros each, most of a checkpoint of a guest that uses a tenth of
//! its memory.
//!
//! The handler times each fault from reading it to its page being writable: the vCPU's stall,
//! less the time the fault waited to be read (a lower bound, summed and maximised per
//! checkpoint).

use std::os::fd::AsRawFd;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ckpt_format::MemoryWriter;
use tracing::{debug, error};

use super::uffd_sys::{Uffd, WpFault, UFFD_FEATURE_PAGEFAULT_FLAG_WP, UFFD_FEATURE_WP_UNPOPULATED};
use super::{page_bytes, populated_in, Arena, CowError, SaveCounters};
use crate::checkpoint::dirty::PageBits;
use crate::devices::virtio::DmaObserver;
use crate::memory::{RamRegion, PAGE_SIZE};

/// Pages copied aside per claim: per write fault, and per background step (2 MiB). A fault
/// round trip costs tens of microseconds and copying 2 MiB about a hundred and fifty, so a guest
/// that writes everything still moves at several GB/s while the checkpoint runs.
pub const BLOCK_PAGES: u64 = 512;
/// Bytes of one block.
const BLOCK_BYTES: u64 = BLOCK_PAGES * PAGE_SIZE;
/// The most copy-aside buffers mapped before the pause (256 MiB). More would spare more faults
/// of a guest that rewrites gigabytes the cost of fresh memory, but mapping and freeing
/// gigabytes at every checkpoint keeps the host's memory compaction busy, and on the
/// development host that stretched the pauses of repeated checkpoints of a 4 GiB guest on huge
/// pages from a median of 0.4 ms to 2.4–5.5 ms.
const PREFAULTED_BUFFERS: usize = 128;
/// Re-protection rounds while the VM runs before the pause.
const ARMING_ROUNDS: usize = 3;

const UNSAVED: u8 = 0;
const CLAIMED: u8 = 1;
const SAVED: u8 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Arming,
    Saving,
}

struct Shared {
    uffd: Uffd,
    regions: Vec<RamRegion>,
    pages: u64,
    state: Vec<AtomicU8>,
    /// Pages unprotected by the arming handler since the last re-protection round.
    touched: Vec<AtomicU64>,
    phase: Mutex<Phase>,
    writer: Mutex<Option<Arc<MemoryWriter>>>,
    counters: SaveCounters,
    stop: AtomicBool,
    failed: Mutex<Option<CowError>>,
    /// Recycled copy-aside buffers of `BLOCK_PAGES` pages.
    pool: Mutex<Vec<CopyBuf>>,
    /// Copies waiting for the store writer, and how many of them the background writer may
    /// add: the rest of the copy-aside budget is kept for write faults.
    in_queue: AtomicUsize,
    background_share: usize,
    /// First page of each block a write fault saved, in fault order: the guest's hot set.
    hot: Mutex<Vec<u64>>,
    /// An incremental checkpoint's pages unchanged since its parent: claimed like the others,
    /// never copied (and never protected when `armed` is known).
    in_parent: OnceLock<Arc<PageBits>>,
    /// The pages protected while arming, if not all of memory: an incremental checkpoint's
    /// pages written since its parent as known before the pause.
    armed: Option<PageBits>,
    /// Write-fault stalls: summed and longest, in nanoseconds.
    stall_ns: AtomicU64,
    max_stall_ns: AtomicU64,
    /// This process's page map (`/proc/self/pagemap`), if readable: which claimed pages were
    /// never populated, and so are zero without being read.
    page_map: Option<std::fs::File>,
}

/// A copy-aside buffer of one block: an [`Arena`] of its own, so page-aligned, which a store
/// may write without copying it first (a directory store writes it with `O_DIRECT`).
type CopyBuf = Arena;

/// A run of claimed pages on its way to the store: its first image page and what it holds.
struct Copied {
    first: u64,
    pages: u64,
    content: Content,
}

/// What a claimed run holds.
enum Content {
    /// The pages' bytes, copied aside.
    Bytes(CopyBuf),
    /// Nothing to copy: the pages were never populated, so they are zero.
    Zero,
    /// Nothing to copy: the pages are kept in the parent checkpoint.
    Parent,
}

impl Copied {
    /// Pages saved in this checkpoint (not kept in the parent).
    fn saved(&self) -> u64 {
        match self.content {
            Content::Parent => 0,
            Content::Bytes(_) | Content::Zero => self.pages,
        }
    }
}

/// Which of `count` pages from host address `host` are known never to have been populated,
/// from the page map `map` (`/proc/self/pagemap`) of memory armed for write protection.
///
/// Write protection leaves a marker where no page was mapped (`UFFD_FEATURE_WP_UNPOPULATED`),
/// and the page map shows a marker as a swap entry of the kernel's marker type (the last of
/// its 32 swap types) whose offset is the marker's bits, here only its write-protect bit. Only
/// an entry exactly like that, or an empty one, counts: a page swapped out, migrating, or
/// anything the map shows otherwise is read. Without `CAP_SYS_ADMIN` the page map hides the
/// details of swap entries, so no marker is recognised and every page is read.
fn never_populated(map: &std::fs::File, host: usize, count: u64) -> std::io::Result<Vec<bool>> {
    use std::os::unix::fs::FileExt;
    const PRESENT: u64 = 1 << 63;
    const SWAP: u64 = 1 << 62;
    /// Bits 0-54: the frame, or for a swap entry its type (bits 0-4) and offset (from bit 5).
    const FRAME: u64 = (1 << 55) - 1;
    /// Swap type 31 (markers) with offset 1 (the write-protect marker).
    const WP_MARKER: u64 = 31 | (1 << 5);
    let mut entries = vec![0u8; (count * 8) as usize];
    map.read_exact_at(&mut entries, host as u64 / PAGE_SIZE * 8)?;
    Ok(entries
        .chunks_exact(8)
        .map(|e| {
            let e = u64::from_le_bytes(e.try_into().expect("8 bytes"));
            e & PRESENT == 0 && (e & SWAP == 0 || e & FRAME == WP_MARKER)
        })
        .collect())
}

/// Owns the write protection of guest memory for one checkpoint, the fault handler thread and
/// the background writer; the only reader of guest pages while the VM runs. Dropping it lifts
/// any protection left and unregisters the memory.
pub struct UffdCow {
    shared: Arc<Shared>,
    handler: Option<JoinHandle<()>>,
    background: Option<JoinHandle<()>>,
    store_writer: Option<JoinHandle<()>>,
    from_faults: Option<Receiver<Copied>>,
    /// Kept to hand to DMA observers; dropped before waiting for the store writer.
    to_store: Option<SyncSender<Copied>>,
}

impl std::fmt::Debug for UffdCow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UffdCow")
            .field("pages", &self.shared.pages)
            .finish()
    }
}

fn uffd_op(op: &'static str) -> impl FnOnce(std::io::Error) -> CowError {
    move |source| CowError::UffdOp { op, source }
}

impl Shared {
    fn region_of(&self, page: u64) -> &RamRegion {
        self.regions
            .iter()
            .find(|r| page >= r.first_page() && page < r.first_page() + r.pages())
            .expect("page numbers come from the regions")
    }

    fn page_of_host(&self, addr: usize) -> Option<u64> {
        self.regions.iter().find_map(|r| r.page_of_host(addr))
    }

    fn protect_pages(&self, first: u64, count: u64, protect: bool) -> std::io::Result<()> {
        let region = self.region_of(first);
        self.uffd.write_protect(
            region.host_of_page(first),
            (count * PAGE_SIZE) as usize,
            protect,
        )
    }

    fn lock_phase(&self) -> MutexGuard<'_, Phase> {
        self.phase.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fail(&self, err: CowError) {
        error!("live checkpoint of memory failed: {err}");
        let mut slot = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        slot.get_or_insert(err);
    }

    /// Takes the touched set and protects those pages again, coalescing runs. Returns how many.
    fn reprotect_touched(&self) -> std::io::Result<u64> {
        let mut count = 0;
        let mut run: Option<(u64, u64)> = None;
        for (w, word) in self.touched.iter().enumerate() {
            let mut bits = word.swap(0, Ordering::AcqRel);
            while bits != 0 {
                let page = w as u64 * 64 + u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                count += 1;
                run = match run {
                    Some((start, len))
                        if start + len == page && self.region_of(start) == self.region_of(page) =>
                    {
                        Some((start, len + 1))
                    }
                    Some((start, len)) => {
                        self.protect_pages(start, len, true)?;
                        Some((page, 1))
                    }
                    None => Some((page, 1)),
                };
            }
        }
        if let Some((start, len)) = run {
            self.protect_pages(start, len, true)?;
        }
        Ok(count)
    }

    /// Claims the unsaved pages among `first..first + count` (all in one region, at most
    /// `BLOCK_PAGES`), copies each claimed run aside, marks it saved and lifts its protection.
    fn capture(&self, first: u64, count: u64, out: &mut Vec<Copied>) -> Result<(), CowError> {
        let region = *self.region_of(first);
        let mut page = first;
        while page < first + count {
            if self.state[page as usize]
                .compare_exchange(UNSAVED, CLAIMED, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                page += 1;
                continue;
            }
            let mut end = page + 1;
            while end < first + count
                && self.state[end as usize]
                    .compare_exchange(UNSAVED, CLAIMED, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            {
                end += 1;
            }
            let kept = |p: u64| self.in_parent.get().is_some_and(|k| k.get(p));
            let mut run = page;
            while run < end {
                let keep = kept(run);
                let mut run_end = run + 1;
                while run_end < end && kept(run_end) == keep {
                    run_end += 1;
                }
                self.save_run(&region, run, run_end, keep, out)?;
                run = run_end;
            }
            page = end;
        }
        Ok(())
    }

    /// Which of the `count` claimed pages from `first` (in `region`) were never populated;
    /// `None` if the page map cannot say (then all are read).
    fn never_populated(&self, region: &RamRegion, first: u64, count: u64) -> Option<Vec<bool>> {
        let map = self.page_map.as_ref()?;
        never_populated(map, region.host_of_page(first), count)
            .map_err(|e| debug!("cannot read the page map: {e}"))
            .ok()
    }

    /// Copies the claimed pages `first..end` aside (unless they are kept in the parent), marks
    /// them saved and lifts their protection. Pages never populated are not read but recorded
    /// as zero: guest memory is private anonymous memory, where such a page is zero, and a
    /// claimed page stays protected until saved, so nothing can give it other bytes meanwhile.
    fn save_run(
        &self,
        region: &RamRegion,
        first: u64,
        end: u64,
        keep: bool,
        out: &mut Vec<Copied>,
    ) -> Result<(), CowError> {
        let count = end - first;
        let unpopulated = if keep {
            None
        } else {
            self.never_populated(region, first, count)
        };
        let content = if keep {
            Content::Parent
        } else if unpopulated.as_ref().is_some_and(|u| u.iter().all(|&u| u)) {
            Content::Zero
        } else {
            let mut buf = self.take_buffer()?;
            // SAFETY: these pages are claimed by this thread and still write-protected: any
            // writer blocks until `protect_pages(.., false)` below.
            let pages = unsafe { page_bytes(region, first, count) };
            let len = (count * PAGE_SIZE) as usize;
            match &unpopulated {
                Some(unpopulated) => {
                    for ((to, from), &zero) in buf[..len]
                        .chunks_exact_mut(PAGE_SIZE as usize)
                        .zip(pages.chunks_exact(PAGE_SIZE as usize))
                        .zip(unpopulated)
                    {
                        if zero {
                            to.fill(0);
                        } else {
                            to.copy_from_slice(from);
                        }
                    }
                }
                None => buf[..len].copy_from_slice(pages),
            }
            Content::Bytes(buf)
        };
        for p in first..end {
            self.state[p as usize].store(SAVED, Ordering::Release);
        }
        // Pages kept in the parent were never protected when only the written ones were.
        if !(keep && self.armed.is_some()) {
            self.protect_pages(first, end - first, false)
                .map_err(uffd_op("unprotect"))?;
        }
        out.push(Copied {
            first,
            pages: count,
            content,
        });
        Ok(())
    }

    fn take_buffer(&self) -> Result<CopyBuf, CowError> {
        let recycled = self.pool.lock().unwrap_or_else(|p| p.into_inner()).pop();
        match recycled {
            Some(buf) => Ok(buf),
            None => Arena::new(BLOCK_BYTES as usize, false).map_err(CowError::CopyBuffer),
        }
    }

    /// Writes a copied run to the store and recycles its buffer.
    fn store(&self, writer: &MemoryWriter, copied: Copied) -> Result<(), CowError> {
        let buf = match copied.content {
            Content::Bytes(buf) => buf,
            Content::Zero => {
                return writer
                    .write_zero(copied.first, copied.pages)
                    .map_err(CowError::Store)
            }
            Content::Parent => {
                return writer
                    .keep_in_parent(copied.first, copied.pages)
                    .map_err(CowError::Store)
            }
        };
        let len = (copied.pages * PAGE_SIZE) as usize;
        let result = writer
            .write_pages(copied.first, &buf[..len])
            .map_err(CowError::Store);
        self.pool
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(buf);
        result
    }

    /// Records a vCPU stall on a write fault read at `read_at`, now over.
    fn stalled_since(&self, read_at: Instant) {
        let ns = read_at.elapsed().as_nanos() as u64;
        self.stall_ns.fetch_add(ns, Ordering::Relaxed);
        self.max_stall_ns.fetch_max(ns, Ordering::Relaxed);
    }

    fn handle_fault(
        &self,
        fault: WpFault,
        read_at: Instant,
        to_store: &SyncSender<Copied>,
    ) -> Result<(), CowError> {
        let Some(page) = self.page_of_host(fault.address as usize) else {
            return Ok(());
        };
        {
            let phase = self.lock_phase();
            if *phase == Phase::Arming {
                self.touched[(page / 64) as usize].fetch_or(1 << (page % 64), Ordering::AcqRel);
                self.protect_pages(page, 1, false)
                    .map_err(uffd_op("unprotect"))?;
                self.stalled_since(read_at);
                return Ok(());
            }
        }
        let region = *self.region_of(page);
        let block_start =
            (page - region.first_page()) / BLOCK_PAGES * BLOCK_PAGES + region.first_page();
        let block_end = (block_start + BLOCK_PAGES).min(region.first_page() + region.pages());
        let mut copied = Vec::new();
        self.capture(block_start, block_end - block_start, &mut copied)?;
        let saved: u64 = copied.iter().map(Copied::saved).sum();
        self.counters.by_fault.fetch_add(saved, Ordering::Relaxed);
        if saved > 0 {
            self.hot
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(block_start);
        }
        if self.state[page as usize].load(Ordering::Acquire) == SAVED {
            // Saved earlier (or just now) by someone else whose unprotect may have come before
            // this thread blocked: wake it explicitly. A page still CLAIMED is woken by its
            // claimer's unprotect.
            self.uffd
                .wake(region.host_of_page(page), PAGE_SIZE as usize)
                .map_err(uffd_op("wake"))?;
        }
        self.stalled_since(read_at);
        for c in copied {
            // Blocks once the copy-aside budget is spent: the guest then runs at store speed.
            self.queue(to_store, c)?;
        }
        Ok(())
    }

    /// Hands a copy to the store writer, waiting while the copy-aside budget is spent.
    fn queue(&self, to_store: &SyncSender<Copied>, c: Copied) -> Result<(), CowError> {
        self.in_queue.fetch_add(1, Ordering::AcqRel);
        to_store.send(c).map_err(|_| {
            self.in_queue.fetch_sub(1, Ordering::AcqRel);
            CowError::Panicked("store writer")
        })
    }

    /// Hands a copy of the background writer's to the store writer if the background's share
    /// of the budget allows and the queue has room; else gives it back, to be written by the
    /// caller (so are runs without bytes: zero, or kept in the parent).
    fn offer(&self, to_store: &SyncSender<Copied>, c: Copied) -> Result<Option<Copied>, CowError> {
        if !matches!(c.content, Content::Bytes(_))
            || self.in_queue.load(Ordering::Acquire) >= self.background_share
        {
            return Ok(Some(c));
        }
        self.in_queue.fetch_add(1, Ordering::AcqRel);
        match to_store.try_send(c) {
            Ok(()) => Ok(None),
            Err(TrySendError::Full(c)) => {
                self.in_queue.fetch_sub(1, Ordering::AcqRel);
                Ok(Some(c))
            }
            Err(TrySendError::Disconnected(_)) => Err(CowError::Panicked("store writer")),
        }
    }

    fn handler_loop(&self, to_store: SyncSender<Copied>) {
        let mut faults = Vec::with_capacity(32);
        while !self.stop.load(Ordering::Acquire) {
            let mut pfd = libc::pollfd {
                fd: self.uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: polls one valid fd for at most HANDLER_POLL.
            let rc = unsafe { libc::poll(&mut pfd, 1, HANDLER_POLL.as_millis() as i32) };
            if rc <= 0 {
                continue;
            }
            faults.clear();
            if let Err(e) = self.uffd.read_faults(&mut faults) {
                self.fail(CowError::UffdOp {
                    op: "read",
                    source: e,
                });
                return;
            }
            let read_at = Instant::now();
            for &fault in &faults {
                if let Err(e) = self.handle_fault(fault, read_at, &to_store) {
                    self.fail(e);
                    // Never leave a vCPU blocked: lift all protection and stop.
                    self.unprotect_all();
                    return;
                }
            }
        }
    }

    /// Saves every page not saved yet, from the top of memory down. While its share of the
    /// copy-aside budget lasts, it only copies blocks aside and leaves them to the store writer,
    /// so that it runs ahead of the guest at memory speed and the guest meets pages already
    /// saved instead of faulting; past its share it writes to the store itself (a second
    /// writer next to the store writer).
    fn background_loop(
        &self,
        writer: &MemoryWriter,
        to_store: &SyncSender<Copied>,
    ) -> Result<(), CowError> {
        let mut copied = Vec::new();
        for region in self.regions.iter().rev() {
            let mut end = region.first_page() + region.pages();
            while end > region.first_page() {
                if self.stop.load(Ordering::Acquire) {
                    return Ok(());
                }
                let start = end.saturating_sub(BLOCK_PAGES).max(region.first_page());
                self.capture(start, end - start, &mut copied)?;
                for c in copied.drain(..) {
                    self.counters
                        .in_background
                        .fetch_add(c.saved(), Ordering::Relaxed);
                    if let Some(c) = self.offer(to_store, c)? {
                        self.store(writer, c)?;
                    }
                }
                end = start;
            }
        }
        Ok(())
    }

    fn store_loop(&self, from_faults: Receiver<Copied>) {
        let writer = self
            .writer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for copied in from_faults {
            self.in_queue.fetch_sub(1, Ordering::AcqRel);
            let Some(writer) = &writer else { continue };
            if let Err(e) = self.store(writer, copied) {
                self.fail(e);
            }
        }
    }

    fn unprotect_all(&self) {
        for r in &self.regions {
            if let Err(e) = self.uffd.write_protect(r.host, r.len as usize, false) {
                error!("cannot lift write protection: {e}");
            }
        }
    }
}

impl UffdCow {
    /// Registers guest memory, starts the fault handler, and write-protects memory while the VM
    /// runs (arming): all of it, or only the pages of `only` (an incremental checkpoint's pages
    /// written since its parent so far; [`Self::seal`] protects those written later). Call
    /// before the pause. At most `budget` bytes of copies (at least one block) wait for the
    /// store before a write fault waits for it.
    pub fn arm(
        regions: &[RamRegion],
        only: Option<PageBits>,
        budget: u64,
    ) -> Result<UffdCow, CowError> {
        let uffd = Uffd::new(UFFD_FEATURE_PAGEFAULT_FLAG_WP | UFFD_FEATURE_WP_UNPOPULATED)
            .map_err(CowError::Userfaultfd)?;
        for r in regions {
            uffd.register_wp(r.host, r.len as usize)
                .map_err(uffd_op("register"))?;
        }
        let pages: u64 = regions.iter().map(RamRegion::pages).sum();
        let queued = (budget / BLOCK_BYTES).clamp(1, pages.div_ceil(BLOCK_PAGES).max(1)) as usize;
        let page_map = std::fs::File::open("/proc/self/pagemap")
            .map_err(|e| debug!("cannot open the page map, every page is read: {e}"))
            .ok();
        // Copy-aside buffers are mapped now, while the VM runs, so that the copies after the
        // pause do not pay for fresh memory (mapping a block's pages at their first touch
        // costs several times copying it): up to PREFAULTED_BUFFERS, as many as the budget
        // holds, and no more than the blocks armed that hold a page the guest populated (the
        // others are recorded as zero).
        let armed_pages = only.as_ref().map_or(pages, PageBits::count);
        let prefaulted = PREFAULTED_BUFFERS
            .min(queued)
            .min(armed_pages.div_ceil(BLOCK_PAGES) as usize)
            .min(populated_in(regions, BLOCK_PAGES).map_or(usize::MAX, |(_, b)| b as usize));
        let shared = Arc::new(Shared {
            uffd,
            regions: regions.to_vec(),
            pages,
            state: (0..pages).map(|_| AtomicU8::new(UNSAVED)).collect(),
            touched: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            phase: Mutex::new(Phase::Arming),
            writer: Mutex::new(None),
            counters: SaveCounters::default(),
            stop: AtomicBool::new(false),
            failed: Mutex::new(None),
            pool: Mutex::new(
                (0..prefaulted)
                    .map(|_| Arena::new(BLOCK_BYTES as usize, true))
                    .collect::<std::io::Result<_>>()
                    .map_err(CowError::CopyBuffer)?,
            ),
            in_queue: AtomicUsize::new(0),
            background_share: queued * 3 / 4,
            hot: Mutex::new(Vec::new()),
            in_parent: OnceLock::new(),
            armed: only,
            stall_ns: AtomicU64::new(0),
            max_stall_ns: AtomicU64::new(0),
            page_map,
        });
        let (to_store, from_faults) = sync_channel(queued);
        let handler_shared = shared.clone();
        let handler = std::thread::Builder::new()
            .name("uffd-faults".into())
            .spawn({
                let to_store = to_store.clone();
                move || handler_shared.handler_loop(to_store)
            })
            .map_err(|e| CowError::Thread("userfaultfd handler", e))?;
        let mut cow = UffdCow {
            shared,
            handler: Some(handler),
            background: None,
            store_writer: None,
            from_faults: Some(from_faults),
            to_store: Some(to_store),
        };
        let protecting = Instant::now();
        match &cow.shared.armed {
            None => {
                for r in regions {
                    cow.shared
                        .uffd
                        .write_protect(r.host, r.len as usize, true)
                        .map_err(uffd_op("write-protect"))?;
                }
            }
            Some(only) => {
                for r in regions {
                    let end = r.first_page() + r.pages();
                    for (first, count) in only.runs(r.first_page(), end, true) {
                        cow.shared
                            .protect_pages(first, count, true)
                            .map_err(uffd_op("write-protect"))?;
                    }
                }
            }
        }
        debug!(
            us = protecting.elapsed().as_micros() as u64,
            buffers = prefaulted,
            "memory write-protected while the VM runs"
        );
        for round in 0..ARMING_ROUNDS {
            let n = cow
                .shared
                .reprotect_touched()
                .map_err(uffd_op("write-protect"))?;
            debug!(round, pages = n, "re-protected pages touched while arming");
            if n == 0 {
                break;
            }
        }
        cow.check_failed()?;
        Ok(cow)
    }

    fn check_failed(&mut self) -> Result<(), CowError> {
        match self
            .shared
            .failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// In the pause: re-protects the last touched pages and switches to saving, so that from
    /// now on every page is protected or saved (the pages of `in_parent` are kept in the parent
    /// checkpoint: only unprotected when claimed). Returns the pages re-protected in the pause.
    pub fn seal(
        &mut self,
        writer: Arc<MemoryWriter>,
        in_parent: Option<Arc<PageBits>>,
    ) -> Result<u64, CowError> {
        *self.shared.writer.lock().unwrap_or_else(|p| p.into_inner()) = Some(writer);
        let mut phase = self.shared.lock_phase();
        // Only some pages were armed: the others written since the parent (after arming looked)
        // are protected now, with the last touched ones.
        if let Some(armed) = &self.shared.armed {
            match &in_parent {
                Some(kept) => {
                    let written = kept.complement();
                    for ((touched, &w), &a) in self
                        .shared
                        .touched
                        .iter()
                        .zip(written.words())
                        .zip(armed.words())
                    {
                        touched.fetch_or(w & !a, Ordering::AcqRel);
                    }
                }
                // Not incremental after all: every page is saved, so every page is protected.
                None => {
                    for r in &self.shared.regions {
                        self.shared
                            .uffd
                            .write_protect(r.host, r.len as usize, true)
                            .map_err(uffd_op("write-protect"))?;
                    }
                }
            }
        }
        if let Some(kept) = in_parent {
            // Sealed once per checkpoint.
            let _ = self.shared.in_parent.set(kept);
        }
        let n = self
            .shared
            .reprotect_touched()
            .map_err(uffd_op("write-protect"))?;
        *phase = Phase::Saving;
        drop(phase);
        self.check_failed()?;
        Ok(n)
    }

    /// After the resume: starts the store writer (for pages copied aside by faults) and the
    /// background writer.
    pub fn start_background(&mut self) -> Result<(), CowError> {
        if let Some(from_faults) = self.from_faults.take() {
            let shared = self.shared.clone();
            let handle = std::thread::Builder::new()
                .name("ckpt-store".into())
                .spawn(move || shared.store_loop(from_faults))
                .map_err(|e| CowError::Thread("store writer", e))?;
            self.store_writer = Some(handle);
        }
        let shared = self.shared.clone();
        let writer = shared
            .writer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .expect("sealed before the background starts");
        let to_store = self
            .to_store
            .clone()
            .expect("the background starts before finish");
        let handle = std::thread::Builder::new()
            .name("ckpt-writer".into())
            .spawn(move || {
                if let Err(e) = shared.background_loop(&writer, &to_store) {
                    shared.fail(e);
                    shared.unprotect_all();
                }
            })
            .map_err(|e| CowError::Thread("background writer", e))?;
        self.background = Some(handle);
        Ok(())
    }

    /// The fault handler thread, while it runs: a vCPU that the pause kicks may be waiting for
    /// it to serve a write fault. It lives as long as `self` (joined in `finish` or on drop).
    pub fn fault_handler(&self) -> Option<libc::pthread_t> {
        self.handler.as_ref().map(|h| h.as_pthread_t())
    }

    /// An observer that saves the pages a device is about to write (for disk reads issued
    /// after the instant, M11). Every observer must be dropped before [`Self::finish`].
    pub fn observer(&self) -> Arc<dyn DmaObserver> {
        Arc::new(DmaSaver {
            shared: self.shared.clone(),
            to_store: self
                .to_store
                .clone()
                .expect("observers are made before finish"),
        })
    }

    /// The guest's hot set so far: the first page of each block saved by a write fault, in
    /// fault order.
    pub fn hot_pages(&self) -> Vec<u64> {
        self.shared
            .hot
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The vCPUs' write-fault stalls so far, in microseconds: (summed, longest).
    pub fn stalls_us(&self) -> (u64, u64) {
        (
            self.shared.stall_ns.load(Ordering::Relaxed) / 1000,
            self.shared.max_stall_ns.load(Ordering::Relaxed) / 1000,
        )
    }

    /// Waits until the background writer has gone through all of memory: from then on every
    /// page is saved (some perhaps still queued for the store).
    pub fn wait_background(&mut self) -> Result<(), CowError> {
        if let Some(bg) = self.background.take() {
            bg.join()
                .map_err(|_| CowError::Panicked("background writer"))?;
        }
        self.check_failed()
    }

    /// Waits until every page is saved and written, then stops the handler and lifts the
    /// registration. Returns the pages saved (by fault, in background).
    pub fn finish(mut self) -> Result<(u64, u64), CowError> {
        self.wait_background()?;
        self.to_store = None;
        self.stop_handler()?;
        self.join_store_writer()?;
        // Drop the handler's clone of the writer so the checkpoint can finish its memory.
        self.shared
            .writer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        self.check_failed()?;
        Ok(self.shared.counters.get())
    }

    /// Waits for the store writer to drain what faults copied aside (it ends once the handler,
    /// the only sender, is gone).
    fn join_store_writer(&mut self) -> Result<(), CowError> {
        if let Some(h) = self.store_writer.take() {
            h.join().map_err(|_| CowError::Panicked("store writer"))?;
        }
        Ok(())
    }

    fn stop_handler(&mut self) -> Result<(), CowError> {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(h) = self.handler.take() {
            h.join()
                .map_err(|_| CowError::Panicked("userfaultfd handler"))?;
        }
        Ok(())
    }
}

impl Drop for UffdCow {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(bg) = self.background.take() {
            if bg.join().is_err() {
                error!("the checkpoint background writer panicked");
            }
        }
        // Lift protection first so no vCPU stays blocked once the handler is gone.
        self.shared.unprotect_all();
        self.to_store = None;
        if let Err(e) = self.stop_handler().and_then(|()| self.join_store_writer()) {
            error!("{e}");
        }
        for r in &self.shared.regions {
            if let Err(e) = self.shared.uffd.unregister(r.host, r.len as usize) {
                error!("cannot unregister guest memory from userfaultfd: {e}");
            }
        }
    }
}

/// Saves the pages a device is about to write, before it writes them.
struct DmaSaver {
    shared: Arc<Shared>,
    to_store: SyncSender<Copied>,
}

impl DmaSaver {
    fn save_range(&self, gpa: u64, len: u64) -> Result<(), CowError> {
        let end = gpa.saturating_add(len);
        let mut copied = Vec::new();
        for region in &self.shared.regions {
            let (lo, hi) = (gpa.max(region.gpa), end.min(region.gpa + region.len));
            if lo >= hi {
                continue;
            }
            let first = region.first_page() + (lo - region.gpa) / PAGE_SIZE;
            let last = region.first_page() + (hi - 1 - region.gpa) / PAGE_SIZE;
            let mut block = first / BLOCK_PAGES * BLOCK_PAGES;
            while block <= last {
                let start = block.max(region.first_page());
                let stop = (block + BLOCK_PAGES).min(region.first_page() + region.pages());
                self.shared.capture(start, stop - start, &mut copied)?;
                block += BLOCK_PAGES;
            }
        }
        for c in copied {
            self.shared
                .counters
                .by_fault
                .fetch_add(c.saved(), Ordering::Relaxed);
            self.shared.queue(&self.to_store, c)?;
        }
        Ok(())
    }
}

impl DmaObserver for DmaSaver {
    fn before_device_write(&self, gpa: u64, len: u64) {
        if let Err(e) = self.save_range(gpa, len) {
            self.shared.fail(e);
            self.shared.unprotect_all();
        }
    }
}

/// How long the handler waits for events between checks of its stop flag.
const HANDLER_POLL: Duration = Duration::from_millis(20);
