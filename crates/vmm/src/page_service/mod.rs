//! The page service: guest memory of a lazily restored VM, or of a VM migrated post-copy, is
//! private anonymous memory whose pages arrive on demand, verified, through userfaultfd
//! missing-page faults. Where they come from is a [`BlockSource`]: a checkpoint (its store,
//! verified against its page index, as described below) or a migration source.
//!
//! Memory is cut into blocks of [`BLOCK_PAGES`] pages. Each block is fetched exactly once,
//! by whoever claims it first (a compare-and-swap on its state, missing → claimed → resident):
//! - the **fault handler** ([`fault`]) claims the block of a page a vCPU, the VMM's device code
//!   or the kernel on its behalf touched first, and between faults reads ahead: the missing
//!   blocks after the last faulting one;
//! - the **prefetcher** ([`prefetch`]) claims every other block, the checkpoint's hot set first,
//!   at store speed.
//!
//! A claimed block is read from its [`PageSource`], every page is checked against the page
//! index, and only then installed, which wakes the threads waiting on it: moved in whole as a
//! huge page where the kernel can ([`staging`]; for a migration, through a reservoir of
//! blocks mapped before the VM moved, [`reservoir`]), else with `UFFDIO_COPY`.
//! The whole index (9 bytes per page) is read by the prefetcher, off the path to the first
//! instruction; until it is there, a block is checked against the index's segments that cover
//! it, fetched alone and each verified against its checksum in the manifest (a checkpoint
//! without those checksums has its whole index read before the VM starts).
//! Zero pages (per the page index) are never read: `UFFDIO_ZEROPAGE` maps them. A fault on a
//! block claimed by the other thread needs nothing: that thread's install wakes it.
//!
//! A page that cannot be read or does not verify stops the VM (a fatal exit naming the pages
//! and the store) and is never installed while the VM can run: its waiters stay blocked. Only
//! when the VM is torn down, after every vCPU has been told to exit (a signal is pending on each,
//! so KVM returns to user space before it would enter the guest again), are failed blocks
//! filled with zeros ([`PageService::release_failed`]): a vCPU whose guest page-table walk
//! waits in the kernel on such a page cannot otherwise leave `KVM_RUN`. The registration is lifted only once every block is resident, since
//! unregistering (or closing the userfaultfd) would let a waiting fault map a zero page.

mod checkpoint_blocks;
mod fault;
mod prefetch;
mod reservoir;
mod shared;
mod source;
mod staging;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use thiserror::Error;
use tracing::{error, info};

pub(crate) use self::checkpoint_blocks::CheckpointBlocks;
pub use self::reservoir::Reservoir;
pub use self::shared::{SharedImage, SharedImageError};
pub use self::source::SourceError;
pub(crate) use self::source::{BlockSource, Run, RunKind};
use crate::checkpoint::memory_cow::uffd_sys::{Uffd, UFFD_FEATURE_MOVE};
use crate::exit::{ExitNotifier, VmExit};
use crate::memory::{RamRegion, PAGE_SIZE};

/// Pages fetched, verified and installed per claim (2 MiB): a fault round trip costs tens of
/// microseconds here, reading and hashing 2 MiB a few hundred.
pub const BLOCK_PAGES: u64 = 512;

const MISSING: u8 = 0;
const CLAIMED: u8 = 1;
const RESIDENT: u8 = 2;
/// Could not be read or verified: never installed.
const FAILED: u8 = 3;

/// Errors of the page service.
#[derive(Debug, Error)]
pub enum PageServiceError {
    /// userfaultfd is unavailable.
    #[error("userfaultfd is unavailable")]
    Userfaultfd(#[source] std::io::Error),
    /// A userfaultfd operation failed.
    #[error("userfaultfd {op} failed")]
    Uffd {
        /// The operation.
        op: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The source could not deliver pages.
    #[error("checkpoint {store}")]
    Read {
        /// The store.
        store: String,
        /// Which pages, and why.
        #[source]
        source: SourceError,
    },
    /// A page does not match the page index.
    #[error("checkpoint {store}: memory is corrupt")]
    Verify {
        /// The store.
        store: String,
        /// The page and its mismatch.
        #[source]
        source: ckpt_format::Error,
    },
    /// The migration source could not deliver pages.
    #[error("migration source {peer}")]
    Peer {
        /// The source's address.
        peer: String,
        /// Which pages, and why.
        #[source]
        source: SourceError,
    },
    /// The page index cannot be read.
    #[error("checkpoint {store}: page index")]
    Index {
        /// The store.
        store: String,
        /// Cause.
        #[source]
        source: ckpt_format::Error,
    },
    /// A thread of the service could not be started.
    #[error("cannot start the page service {0} thread")]
    Thread(&'static str, #[source] std::io::Error),
    /// Memory did not become resident in time.
    #[error("guest memory is not resident after {0:?}")]
    Timeout(Duration),
    /// The service failed earlier (the VM has stopped).
    #[error("the page service failed: {0}")]
    Failed(String),
}

/// What the page service did, for reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PageServiceStats {
    /// Faults that fetched a block.
    pub faults_served: u64,
    /// Bytes installed for faults.
    pub bytes_by_fault: u64,
    /// Bytes installed by the prefetcher.
    pub bytes_prefetched: u64,
    /// From the start of the service until all of memory was resident, if it is.
    pub resident_after_us: Option<u64>,
}

struct Shared {
    uffd: Uffd,
    /// `UFFDIO_MOVE` is available: blocks are assembled in a staging huge page and moved in
    /// whole ([`staging`]).
    can_move: bool,
    /// Blocks mapped ahead to move arriving pages into, until they run out or every block is
    /// resident ([`reservoir`]).
    reservoir: Mutex<Option<Arc<Reservoir>>>,
    regions: Vec<RamRegion>,
    source: Arc<dyn BlockSource>,
    /// What a failure stops, for messages ("restored VM").
    role: &'static str,
    blocks: Vec<AtomicU8>,
    resident: AtomicU64,
    faults: AtomicU64,
    bytes_by_fault: AtomicU64,
    bytes_prefetched: AtomicU64,
    started: Instant,
    resident_after_us: AtomicU64,
    stop: AtomicBool,
    /// The VM is being torn down: no vCPU can enter the guest again, so a block that fails is
    /// filled with zeros at once, freeing whatever waits on it.
    tearing_down: AtomicBool,
    /// Set once all memory is resident and unregistered, or on failure.
    finished: Mutex<Option<Result<(), String>>>,
    finished_cv: Condvar,
    exit: Arc<ExitNotifier>,
}

/// Who installs a block, for the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Installer {
    Fault,
    Prefetch,
}

impl Shared {
    fn block_count(&self) -> u64 {
        self.blocks.len() as u64
    }

    fn region_of(&self, page: u64) -> &RamRegion {
        self.regions
            .iter()
            .find(|r| page >= r.first_page() && page < r.first_page() + r.pages())
            .expect("page numbers come from the regions")
    }

    /// The pages of block `block`: regions start on block boundaries (the 32-bit hole starts
    /// at 3 GiB), so a block never spans two regions.
    fn block_pages(&self, block: u64) -> (u64, u64) {
        let first = block * BLOCK_PAGES;
        let region = self.region_of(first);
        let end = (first + BLOCK_PAGES).min(region.first_page() + region.pages());
        (first, end)
    }

    fn state(&self, block: u64) -> u8 {
        self.blocks[block as usize].load(Ordering::Acquire)
    }

    fn claim(&self, block: u64) -> bool {
        self.blocks[block as usize]
            .compare_exchange(MISSING, CLAIMED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Fetches, verifies and installs a claimed block. On failure the block stays missing
    /// (marked failed) and the VM is stopped.
    fn serve(&self, block: u64, buf: &mut Vec<u8>, by: Installer) -> Result<(), PageServiceError> {
        let result = self.install(block, buf);
        match &result {
            Ok(bytes) => {
                self.blocks[block as usize].store(RESIDENT, Ordering::Release);
                match by {
                    Installer::Fault => {
                        self.faults.fetch_add(1, Ordering::Relaxed);
                        self.bytes_by_fault.fetch_add(*bytes, Ordering::Relaxed);
                    }
                    Installer::Prefetch => {
                        self.bytes_prefetched.fetch_add(*bytes, Ordering::Relaxed);
                    }
                }
                if self.resident.fetch_add(1, Ordering::AcqRel) + 1 == self.block_count() {
                    // What is left of the reservoir is not needed any more.
                    drop(self.reservoir_lock().take());
                    // Under the lock, so the prefetcher cannot miss it between its check and
                    // its wait.
                    let _finished = self.finished.lock().unwrap_or_else(|p| p.into_inner());
                    self.finished_cv.notify_all();
                }
            }
            Err(e) => {
                self.blocks[block as usize].store(FAILED, Ordering::SeqCst);
                self.fail(e);
                if self.tearing_down.load(Ordering::SeqCst) {
                    self.release_block(block);
                }
            }
        }
        result.map(|_| ())
    }

    /// Maps zero pages over a failed block (pages already there are left), waking what waits
    /// on it. Only while the VM is torn down: the data is not the guest's.
    fn release_block(&self, block: u64) {
        let (first, end) = self.block_pages(block);
        let host = self.region_of(first).host_of_page(first);
        if let Err(e) = self.uffd.zero(host, ((end - first) * PAGE_SIZE) as usize) {
            error!("cannot release a failed block of guest memory: {e}");
        }
    }

    /// Installs the pages of `block` run by run as its source delivers them, verified: zero
    /// runs mapped, data runs copied in, pages already present left. Returns the bytes
    /// installed.
    fn install(&self, block: u64, buf: &mut Vec<u8>) -> Result<u64, PageServiceError> {
        let (first, end) = self.block_pages(block);
        let region = *self.region_of(first);
        if self.can_move {
            if let Some(installed) = staging::install(self, &region, first, end) {
                return installed;
            }
        }
        let runs = self.source.fetch(first, end, buf)?;
        debug_assert!(runs
            .iter()
            .all(|r| r.first >= first && r.first + r.count <= end));
        if self.can_move {
            let reservoir = self.reservoir_lock().clone();
            if let Some(installed) =
                reservoir.and_then(|r| r.install(self, &region, first, end, &runs, buf))
            {
                return installed;
            }
        }
        self.install_runs(&region, &runs, buf)
    }

    fn reservoir_lock(&self) -> std::sync::MutexGuard<'_, Option<Arc<Reservoir>>> {
        self.reservoir.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Installs fetched runs of one block of `region` in small pages: zero runs mapped, data
    /// runs copied in from `buf`, pages already present left. Returns the bytes installed.
    fn install_runs(
        &self,
        region: &RamRegion,
        runs: &[Run],
        buf: &[u8],
    ) -> Result<u64, PageServiceError> {
        let mut bytes = 0;
        for run in runs {
            let len = (run.count * PAGE_SIZE) as usize;
            let host = region.host_of_page(run.first);
            match run.kind {
                RunKind::Zero => {
                    self.uffd
                        .zero(host, len)
                        .map_err(|source| PageServiceError::Uffd {
                            op: "zeropage",
                            source,
                        })?;
                }
                RunKind::Data { at } => {
                    self.uffd
                        .copy(host, &buf[at..at + len])
                        .map_err(|source| PageServiceError::Uffd { op: "copy", source })?;
                }
                RunKind::Present => continue,
            }
            bytes += len as u64;
        }
        Ok(bytes)
    }

    /// Records the first failure and stops the VM with it.
    fn fail(&self, err: &PageServiceError) {
        let mut text = err.to_string();
        let mut cause = std::error::Error::source(err);
        while let Some(c) = cause {
            text.push_str(": ");
            text.push_str(&c.to_string());
            cause = c.source();
        }
        error!("{} stopped: {text}", self.role);
        let mut finished = self.finished.lock().unwrap_or_else(|p| p.into_inner());
        if finished.is_none() {
            *finished = Some(Err(text.clone()));
        }
        self.finished_cv.notify_all();
        drop(finished);
        self.exit
            .notify(VmExit::Fatal(format!("{} stopped: {text}", self.role)));
    }

    fn is_resident(&self) -> bool {
        matches!(
            *self.finished.lock().unwrap_or_else(|p| p.into_inner()),
            Some(Ok(()))
        )
    }

    fn is_finished(&self) -> bool {
        self.finished
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }
}

/// The running page service of one restored VM. Dropping it stops its threads; it must outlive
/// every thread that can touch guest memory (the VM stops its vCPUs and devices first).
pub struct PageService {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// The prefetch order, until [`PageService::prefetch`] starts the prefetcher.
    order: Mutex<Option<Vec<u64>>>,
}

impl std::fmt::Debug for PageService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageService")
            .field("source", &self.shared.source.describe())
            .field("stats", &self.stats())
            .finish()
    }
}

/// What a page service serves.
pub struct ServiceSpec {
    /// Guest memory, registered with userfaultfd; every page the source does not report
    /// present must still be missing.
    pub regions: Vec<RamRegion>,
    /// Where verified pages come from.
    pub source: Arc<dyn BlockSource>,
    /// What a failure stops, for messages ("restored VM").
    pub role: &'static str,
    /// First image pages of the blocks to prefetch first, in order.
    pub hot_pages: Vec<u64>,
    /// Where a failure stops the VM.
    pub exit: Arc<ExitNotifier>,
    /// Blocks mapped ahead for the pages that arrive (a migration's), if any.
    pub reservoir: Option<Arc<Reservoir>>,
}

impl PageService {
    /// Registers guest memory for missing-page faults and starts the fault handler (the
    /// prefetcher starts with [`PageService::prefetch`]). Call before anything touches guest
    /// memory.
    pub fn start(spec: ServiceSpec) -> Result<PageService, PageServiceError> {
        let (uffd, can_move) = match Uffd::new(UFFD_FEATURE_MOVE) {
            Ok(uffd) => (uffd, true),
            Err(_) => (Uffd::new(0).map_err(PageServiceError::Userfaultfd)?, false),
        };
        for r in &spec.regions {
            uffd.register_missing(r.host, r.len as usize)
                .map_err(|source| PageServiceError::Uffd {
                    op: "register",
                    source,
                })?;
        }
        let pages: u64 = spec.regions.iter().map(RamRegion::pages).sum();
        let blocks: Vec<AtomicU8> = (0..pages.div_ceil(BLOCK_PAGES))
            .map(|_| AtomicU8::new(MISSING))
            .collect();
        let mut shared = Shared {
            uffd,
            can_move,
            reservoir: Mutex::new(spec.reservoir),
            regions: spec.regions,
            source: spec.source,
            role: spec.role,
            blocks,
            resident: AtomicU64::new(0),
            faults: AtomicU64::new(0),
            bytes_by_fault: AtomicU64::new(0),
            bytes_prefetched: AtomicU64::new(0),
            started: Instant::now(),
            resident_after_us: AtomicU64::new(u64::MAX),
            stop: AtomicBool::new(false),
            tearing_down: AtomicBool::new(false),
            finished: Mutex::new(None),
            finished_cv: Condvar::new(),
            exit: spec.exit,
        };
        // Blocks the source already has in place (a migration's pre-copied pages) start
        // resident.
        let mut resident = 0;
        for block in 0..shared.block_count() {
            let (first, end) = shared.block_pages(block);
            if !shared.source.missing_at_start(first, end) {
                *shared.blocks[block as usize].get_mut() = RESIDENT;
                resident += 1;
            }
        }
        *shared.resident.get_mut() = resident;
        let order = prefetch::order(&spec.hot_pages, shared.block_count());
        let shared = Arc::new(shared);
        let service = PageService {
            shared: shared.clone(),
            threads: Mutex::new(Vec::new()),
            order: Mutex::new(Some(order)),
        };
        let handler = std::thread::Builder::new()
            .name("page-faults".into())
            .spawn({
                let shared = shared.clone();
                move || fault::handler_loop(&shared)
            })
            .map_err(|e| PageServiceError::Thread("fault handler", e))?;
        service.lock_threads().push(handler);
        Ok(service)
    }

    /// Starts installing every block nobody has faulted on yet, in the background (once; a
    /// later call does nothing). Until it runs, memory becomes resident only by faults.
    pub fn prefetch(&self) -> Result<(), PageServiceError> {
        let Some(order) = self.order.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return Ok(());
        };
        let shared = self.shared.clone();
        let prefetcher = std::thread::Builder::new()
            .name("page-prefetch".into())
            .spawn(move || prefetch::prefetch_loop(&shared, &order))
            .map_err(|e| PageServiceError::Thread("prefetcher", e))?;
        self.lock_threads().push(prefetcher);
        Ok(())
    }

    fn lock_threads(&self) -> std::sync::MutexGuard<'_, Vec<JoinHandle<()>>> {
        self.threads.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What the service has done so far.
    pub fn stats(&self) -> PageServiceStats {
        let s = &self.shared;
        let resident = s.resident_after_us.load(Ordering::Acquire);
        PageServiceStats {
            faults_served: s.faults.load(Ordering::Relaxed),
            bytes_by_fault: s.bytes_by_fault.load(Ordering::Relaxed),
            bytes_prefetched: s.bytes_prefetched.load(Ordering::Relaxed),
            resident_after_us: (resident != u64::MAX).then_some(resident),
        }
    }

    /// Whether all of memory is resident and the service has let go of it.
    pub fn all_resident(&self) -> bool {
        self.shared.is_resident()
    }

    /// Waits up to `timeout` until all of memory is resident and the service has let go of
    /// it (a write-protect checkpoint can then register it).
    pub fn wait_resident(&self, timeout: Duration) -> Result<(), PageServiceError> {
        let finished = self
            .shared
            .finished
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let (finished, _) = self
            .shared
            .finished_cv
            .wait_timeout_while(finished, timeout, |f| f.is_none())
            .unwrap_or_else(|p| p.into_inner());
        match finished.as_ref() {
            Some(Ok(())) => Ok(()),
            Some(Err(e)) => Err(PageServiceError::Failed(e.clone())),
            None => Err(PageServiceError::Timeout(timeout)),
        }
    }

    /// Maps zero pages over the blocks that failed, so threads waiting on them in the kernel
    /// can return. Call only once no vCPU can enter the guest again (the VM is being torn
    /// down): the data is not the guest's.
    /// Blocks that fail from now on (a vCPU may still be waiting on one not fetched yet) are
    /// filled as they fail.
    pub(crate) fn release_failed(&self) {
        let s = &self.shared;
        s.tearing_down.store(true, Ordering::SeqCst);
        for block in 0..s.block_count() {
            if s.blocks[block as usize].load(Ordering::SeqCst) == FAILED {
                s.release_block(block);
            }
        }
    }

    /// Stops the service threads. Memory not yet resident stays registered until the
    /// userfaultfd is closed with the service.
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::Release);
        drop(
            self.shared
                .finished
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        self.shared.finished_cv.notify_all();
        for t in self.lock_threads().drain(..) {
            if t.join().is_err() {
                error!("a page service thread panicked");
            }
        }
    }
}

impl Drop for PageService {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Marks the service done once every block is resident: lifts the registration (no fault can
/// be waiting, as every page is present) and wakes [`PageService::wait_resident`].
fn finish_resident(shared: &Shared) {
    for r in &shared.regions {
        if let Err(e) = shared.uffd.unregister(r.host, r.len as usize) {
            shared.fail(&PageServiceError::Uffd {
                op: "unregister",
                source: e,
            });
            return;
        }
    }
    let us = shared.started.elapsed().as_micros() as u64;
    shared.resident_after_us.store(us, Ordering::Release);
    shared.source.all_resident();
    info!(
        resident_after_us = us,
        faults_served = shared.faults.load(Ordering::Relaxed),
        bytes_prefetched = shared.bytes_prefetched.load(Ordering::Relaxed),
        "all memory is resident"
    );
    let mut finished = shared.finished.lock().unwrap_or_else(|p| p.into_inner());
    finished.get_or_insert(Ok(()));
    shared.finished_cv.notify_all();
}
