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
//! Faults are served a block at a time ([`FAULT_BLOCK_PAGES`]): a guest writing memory
//! sequentially takes one fault per block instead of one per page, since a fault round trip
//! costs tens of microseconds here.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use ckpt_format::MemoryWriter;
use tracing::{debug, error};

use super::uffd_sys::{Uffd, WpFault, UFFD_FEATURE_PAGEFAULT_FLAG_WP, UFFD_FEATURE_WP_UNPOPULATED};
use super::{page_bytes, CowError, SaveCounters, RUN_PAGES};
use crate::memory::{RamRegion, PAGE_SIZE};

/// Pages saved and unprotected per write fault (256 KiB).
pub const FAULT_BLOCK_PAGES: u64 = 64;
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
}

/// Owns the write protection of guest memory for one checkpoint, the fault handler thread and
/// the background writer; the only reader of guest pages while the VM runs. Dropping it lifts
/// any protection left and unregisters the memory.
pub struct UffdCow {
    shared: Arc<Shared>,
    handler: Option<JoinHandle<()>>,
    background: Option<JoinHandle<()>>,
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

    /// Saves the unsaved pages among `first..first + count` (all in one region) and unprotects
    /// them. Returns the number saved here.
    fn save_block(&self, writer: &MemoryWriter, first: u64, count: u64) -> Result<u64, CowError> {
        let region = *self.region_of(first);
        let mut saved = 0;
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
            // SAFETY: these pages are claimed by this thread and still write-protected: any
            // writer blocks until `protect_pages(.., false)` below.
            let bytes = unsafe { page_bytes(&region, page, end - page) };
            writer.write_pages(page, bytes).map_err(CowError::Store)?;
            for p in page..end {
                self.state[p as usize].store(SAVED, Ordering::Release);
            }
            self.protect_pages(page, end - page, false)
                .map_err(uffd_op("unprotect"))?;
            saved += end - page;
            page = end;
        }
        Ok(saved)
    }

    fn handle_fault(&self, fault: WpFault) -> Result<(), CowError> {
        let Some(page) = self.page_of_host(fault.address as usize) else {
            return Ok(());
        };
        {
            let phase = self.lock_phase();
            if *phase == Phase::Arming {
                self.touched[(page / 64) as usize].fetch_or(1 << (page % 64), Ordering::AcqRel);
                self.protect_pages(page, 1, false)
                    .map_err(uffd_op("unprotect"))?;
                return Ok(());
            }
        }
        let writer = self
            .writer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .expect("the writer is set before the phase becomes Saving");
        let region = *self.region_of(page);
        let block_start = (page - region.first_page()) / FAULT_BLOCK_PAGES * FAULT_BLOCK_PAGES
            + region.first_page();
        let block_end = (block_start + FAULT_BLOCK_PAGES).min(region.first_page() + region.pages());
        let saved = self.save_block(&writer, block_start, block_end - block_start)?;
        self.counters.by_fault.fetch_add(saved, Ordering::Relaxed);
        if self.state[page as usize].load(Ordering::Acquire) == SAVED {
            // Saved earlier (or just now) by someone else whose unprotect may have come before
            // this thread blocked: wake it explicitly. A page still CLAIMED is woken by its
            // saver's unprotect.
            self.uffd
                .wake(region.host_of_page(page), PAGE_SIZE as usize)
                .map_err(uffd_op("wake"))?;
        }
        Ok(())
    }

    fn handler_loop(&self) {
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
            for &fault in &faults {
                if let Err(e) = self.handle_fault(fault) {
                    self.fail(e);
                    // Never leave a vCPU blocked: lift all protection and stop.
                    self.unprotect_all();
                    return;
                }
            }
        }
    }

    fn background_loop(&self, writer: &MemoryWriter) -> Result<(), CowError> {
        for region in &self.regions {
            let end = region.first_page() + region.pages();
            let mut page = region.first_page();
            while page < end {
                if self.stop.load(Ordering::Acquire) {
                    return Ok(());
                }
                let count = RUN_PAGES.min(end - page);
                let saved = self.save_block(writer, page, count)?;
                self.counters
                    .in_background
                    .fetch_add(saved, Ordering::Relaxed);
                page += count;
            }
        }
        Ok(())
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
    /// Registers guest memory, starts the fault handler, and write-protects all of memory while
    /// the VM runs (arming). Call before the pause.
    pub fn arm(regions: &[RamRegion]) -> Result<UffdCow, CowError> {
        let uffd = Uffd::new(UFFD_FEATURE_PAGEFAULT_FLAG_WP | UFFD_FEATURE_WP_UNPOPULATED)
            .map_err(CowError::Userfaultfd)?;
        for r in regions {
            uffd.register_wp(r.host, r.len as usize)
                .map_err(uffd_op("register"))?;
        }
        let pages: u64 = regions.iter().map(RamRegion::pages).sum();
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
        });
        let handler_shared = shared.clone();
        let handler = std::thread::Builder::new()
            .name("uffd-faults".into())
            .spawn(move || handler_shared.handler_loop())
            .map_err(|e| CowError::Thread("userfaultfd handler", e))?;
        let mut cow = UffdCow {
            shared,
            handler: Some(handler),
            background: None,
        };
        for r in regions {
            cow.shared
                .uffd
                .write_protect(r.host, r.len as usize, true)
                .map_err(uffd_op("write-protect"))?;
        }
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
    /// now on every page is protected or saved. Returns the pages re-protected in the pause.
    pub fn seal(&mut self, writer: Arc<MemoryWriter>) -> Result<u64, CowError> {
        *self.shared.writer.lock().unwrap_or_else(|p| p.into_inner()) = Some(writer);
        let mut phase = self.shared.lock_phase();
        let n = self
            .shared
            .reprotect_touched()
            .map_err(uffd_op("write-protect"))?;
        *phase = Phase::Saving;
        drop(phase);
        self.check_failed()?;
        Ok(n)
    }

    /// After the resume: starts the background writer.
    pub fn start_background(&mut self) -> Result<(), CowError> {
        let shared = self.shared.clone();
        let writer = shared
            .writer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .expect("sealed before the background starts");
        let handle = std::thread::Builder::new()
            .name("ckpt-writer".into())
            .spawn(move || {
                if let Err(e) = shared.background_loop(&writer) {
                    shared.fail(e);
                    shared.unprotect_all();
                }
            })
            .map_err(|e| CowError::Thread("background writer", e))?;
        self.background = Some(handle);
        Ok(())
    }

    /// Waits until every page is saved, then stops the handler and lifts the registration.
    /// Returns the pages saved (by fault, in background).
    pub fn finish(mut self) -> Result<(u64, u64), CowError> {
        if let Some(bg) = self.background.take() {
            bg.join()
                .map_err(|_| CowError::Panicked("background writer"))?;
        }
        self.stop_handler()?;
        // Drop the handler's clone of the writer so the checkpoint can finish its memory.
        self.shared
            .writer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        self.check_failed()?;
        Ok(self.shared.counters.get())
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
        if let Err(e) = self.stop_handler() {
            error!("{e}");
        }
        for r in &self.shared.regions {
            if let Err(e) = self.shared.uffd.unregister(r.host, r.len as usize) {
                error!("cannot unregister guest memory from userfaultfd: {e}");
            }
        }
    }
}

/// How long the handler waits for events between checks of its stop flag.
const HANDLER_POLL: Duration = Duration::from_millis(20);
