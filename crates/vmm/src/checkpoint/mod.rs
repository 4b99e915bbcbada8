//! The live checkpoint (design.md §2), one function per phase:
//!
//! 1. [`prepare`] — while the VM runs: open the store, and for `uffd` write-protect memory
//!    ahead of the pause (arming);
//! 2. [`quiesce`] — stop the vCPUs (the pause begins); with the `drain` policy wait for disk I/O;
//! 3. [`mark_memory_cow`] — finish write protection (`uffd`), fork the writer (`fork`), or copy
//!    everything now (`stop`);
//! 4. [`save_state`] — vCPUs, irqchip, PIT, clock and devices into memory;
//! 5. resume — dropping the pause guard (the pause ends);
//! 6. [`write_out`] — state and original memory pages to the store while the VM runs; then
//!    memory is made durable, and the manifest and the completion marker are written. The
//!    checkpoint's `total_us` ends there: a checkpoint is complete only once durable.
//!
//! Why this order: device state is saved after memory is marked copy-on-write, so that a device
//! write to guest memory made between the two is either in the saved state and in the
//! checkpoint's memory, or in neither. vCPU state is read in the pause, after the vCPUs are
//! parked, so no instruction retires between the register read and the memory freeze.

pub mod dirty;
pub mod disk_chain;
pub(crate) mod disk_cow;
pub(crate) mod memory_cow;
pub(crate) mod restore;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ckpt_format::{
    CheckpointOptions, CheckpointWriter, Checksum, DeviceConfig, DirStore, DiskPolicy, IoPolicy,
    Layout, Manifest, MemStore, MemoryWriter, Metrics, PageIndex, ParentRef, RawStore, S3Store,
    Store, Strategy,
};
use thiserror::Error;
use tracing::{info, info_span, warn};
use vm_memory::GuestMemoryMmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use self::dirty::{BothObservers, DirtyLog, DirtyLogRefusal, PageBits};
use self::disk_chain::ChainLayers;
use self::memory_cow::fork::{fork_writer, ForkedWriter};
use self::memory_cow::uffd::UffdCow;
use self::memory_cow::{stop::StopCopy, CowError, SaveCounters, Unpopulated};
use crate::builder::{Machine, MachineState, VmError, VmSummary};
use crate::devices::manager::{DeviceError, DeviceManager};
use crate::devices::virtio::block::BlockHandle;
use crate::devices::virtio::DmaObserver;
use crate::error::ErrorKind;
use crate::exit::VmExit;
use crate::kvm::vcpu::{PauseGuard, VcpuControl};
use crate::kvm::{KvmError, KvmVm};
use crate::memory::{ram_regions, RamRegion};
use crate::page_service::{PageService, PageServiceError};
use crate::persist::Persist;
use crate::sched::{Raised, RaisedHere};

/// Errors of taking a checkpoint. The VM keeps running after any of them, and the checkpoint
/// is left incomplete (never reported complete).
#[derive(Debug, Error)]
pub enum CheckpointError {
    /// Another checkpoint of this VM is in progress.
    #[error("a checkpoint of this VM is already in progress")]
    Busy,
    /// The request cannot be carried out as asked.
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// The checkpoint store refused or failed.
    #[error("checkpoint store {store}")]
    Store {
        /// The store.
        store: String,
        /// Cause.
        #[source]
        source: ckpt_format::Error,
    },
    /// Pausing the VM failed (or it is exiting).
    #[error("cannot pause the VM")]
    Pause(#[source] VmError),
    /// The guest has ended (before the checkpoint or while it was being prepared): there is
    /// nothing left to capture, and a restore of its last instant would only spin.
    #[error("the VM has already ended: {0}")]
    Exited(VmExit),
    /// Reading KVM state failed.
    #[error("cannot save vCPU or VM state")]
    Kvm(#[from] KvmError),
    /// The memory COW mechanism failed.
    #[error("memory copy-on-write failed")]
    Memory(#[from] CowError),
    /// Saving the device state failed.
    #[error("cannot save the device state")]
    Devices(#[source] DeviceError),
    /// A lazily restored VM's memory did not become resident, which a write-protect
    /// checkpoint needs.
    #[error("restored memory is not resident")]
    NotResident(#[source] PageServiceError),
    /// A disk device refused or failed.
    #[error("disk {index}")]
    Disk {
        /// Device index.
        index: usize,
        /// Cause.
        #[source]
        source: crate::devices::virtio::block::BlockError,
    },
    /// The parent of an incremental checkpoint cannot be read.
    #[error("parent checkpoint {address}")]
    Parent {
        /// The parent's address.
        address: String,
        /// Cause.
        #[source]
        source: ckpt_format::Error,
    },
    /// A disk has no image to put a COW file over.
    #[error("disk {0} has no image")]
    NoImage(usize),
    /// A disk image could not be created or read.
    #[error("disk {index} image")]
    DiskImage {
        /// Device index.
        index: usize,
        /// Cause.
        #[source]
        source: disk::Error,
    },
    /// Copying a disk for the checkpoint failed.
    #[error("cannot copy the checkpoint disk to {path}")]
    Copy {
        /// Destination.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

impl CheckpointError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            CheckpointError::Busy => ErrorKind::Conflict,
            CheckpointError::Refused(_) | CheckpointError::Parent { .. } => ErrorKind::InvalidInput,
            CheckpointError::Store { source, .. } => match source {
                ckpt_format::Error::CheckpointExists { .. } => ErrorKind::AlreadyExists,
                ckpt_format::Error::StoreFull { .. } => ErrorKind::Internal,
                _ => ErrorKind::InvalidInput,
            },
            CheckpointError::Pause(e) => e.kind(),
            CheckpointError::Exited(_) => ErrorKind::VmExited,
            _ => ErrorKind::Internal,
        }
    }
}

/// Why a checkpoint request is refused before anything is done.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Refusal {
    /// `copy-commit` copies the disks into the store, which only a directory store can hold.
    #[error("disk copy-commit needs a directory store to hold the disk copy")]
    CopyCommitNeedsDirectory,
    /// The parent of an incremental checkpoint cannot be one.
    #[error("parent checkpoint {address} cannot be the parent: {reason}")]
    Parent {
        /// The parent's address.
        address: String,
        /// Why.
        reason: DirtyLogRefusal,
    },
}

/// Where a checkpoint goes.
#[derive(Debug, Clone)]
pub enum StoreSpec {
    /// A directory of files (the default).
    Dir(PathBuf),
    /// One raw file or block device.
    Raw(PathBuf),
    /// RAM (a memfd), for the fastest clone within one host.
    Mem(Arc<MemStore>),
    /// Objects in an S3-protocol bucket (the store carries its endpoint, if not the
    /// environment's).
    S3(S3Store),
}

impl StoreSpec {
    pub(crate) fn store(&self) -> Box<dyn Store + '_> {
        match self {
            StoreSpec::Dir(p) => Box::new(DirStore::new(p.clone())),
            StoreSpec::Raw(p) => Box::new(RawStore::new(p.clone())),
            StoreSpec::Mem(m) => Box::new(MemStoreRef(m)),
            StoreSpec::S3(s) => Box::new(s.clone()),
        }
    }

    pub(crate) fn describe(&self) -> String {
        match self {
            StoreSpec::Dir(p) | StoreSpec::Raw(p) => p.display().to_string(),
            StoreSpec::Mem(_) => "memory store".to_string(),
            StoreSpec::S3(s) => s.location().to_string(),
        }
    }
}

/// Lets a shared memory store be used through the `Store` trait.
#[derive(Debug)]
struct MemStoreRef<'a>(&'a MemStore);

impl Store for MemStoreRef<'_> {
    fn create(
        &self,
        layout: &Layout,
    ) -> ckpt_format::Result<Box<dyn ckpt_format::store::StoreWriter>> {
        self.0.create(layout)
    }
    fn open(&self) -> ckpt_format::Result<Box<dyn ckpt_format::store::StoreReader>> {
        self.0.open()
    }
}

/// Called in the pause, after the state is saved and before the vCPUs resume, with guest
/// memory as it is at the checkpoint instant. Tests and benchmarks use it to record that
/// instant; its running time adds to the pause.
pub type PauseProbe = Arc<dyn Fn(&GuestMemoryMmap) + Send + Sync>;

/// What to checkpoint and how.
#[derive(Clone)]
pub struct CheckpointRequest {
    /// The store.
    pub store: StoreSpec,
    /// Strategy, I/O policy, disk policy.
    pub options: CheckpointOptions,
    /// Optional observer of the checkpoint instant.
    pub pause_probe: Option<PauseProbe>,
    /// For an incremental checkpoint, its parent: a complete checkpoint of this VM taken by this
    /// process. Only the pages written since the parent's instant are written.
    pub parent: Option<ParentSpec>,
}

/// The parent of an incremental checkpoint.
#[derive(Debug, Clone)]
pub struct ParentSpec {
    /// Its address, as the manifest records it (`DIR`, `raw:PATH` or `s3://BUCKET/PREFIX`).
    pub address: String,
    /// Its store.
    pub store: StoreSpec,
}

impl CheckpointRequest {
    /// Refuses a request that cannot be carried out on a VM with `disks` disks.
    pub fn validate(&self, disks: usize) -> Result<(), Refusal> {
        if self.options.disk == DiskPolicy::CopyCommit
            && disks > 0
            && !matches!(self.store, StoreSpec::Dir(_))
        {
            return Err(Refusal::CopyCommitNeedsDirectory);
        }
        Ok(())
    }
}

impl std::fmt::Debug for CheckpointRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointRequest")
            .field("store", &self.store)
            .field("options", &self.options)
            .field("pause_probe", &self.pause_probe.is_some())
            .field("parent", &self.parent.as_ref().map(|p| &p.address))
            .finish()
    }
}

/// The phase a checkpoint is in, for progress reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// Not started.
    Pending = 0,
    /// Store opened, memory being armed.
    Preparing = 1,
    /// The VM is paused.
    Paused = 2,
    /// Writing memory and state while the VM runs.
    Writing = 3,
    /// Complete.
    Done = 4,
    /// Failed.
    Failed = 5,
}

/// Progress of one checkpoint, readable from other threads while it runs.
#[derive(Debug, Default)]
pub struct Progress {
    phase: AtomicU8,
    pages_total: AtomicU64,
    pages_done: AtomicU64,
    /// The store writer's memory while pages are written out: its counter is the progress.
    writing: Mutex<Option<Arc<MemoryWriter>>>,
}

impl Progress {
    fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::Release);
    }

    /// Reads the progress of the write-out from `memory` (until called with `None`, which
    /// must happen before the checkpoint is finished: the store writer waits for every
    /// holder of its memory to let go).
    fn watch(&self, memory: Option<Arc<MemoryWriter>>) {
        if let Some(m) = &memory {
            let done = m.progress().pages_done;
            self.pages_done.fetch_max(done, Ordering::Relaxed);
        }
        let previous = std::mem::replace(
            &mut *self.writing.lock().unwrap_or_else(|p| p.into_inner()),
            memory,
        );
        if let Some(m) = previous {
            self.pages_done
                .fetch_max(m.progress().pages_done, Ordering::Relaxed);
        }
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Acquire) {
            1 => Phase::Preparing,
            2 => Phase::Paused,
            3 => Phase::Writing,
            4 => Phase::Done,
            5 => Phase::Failed,
            _ => Phase::Pending,
        }
    }

    /// (pages saved, pages total).
    pub fn pages(&self) -> (u64, u64) {
        let writing = self
            .writing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map_or(0, |m| m.progress().pages_done);
        (
            self.pages_done.load(Ordering::Relaxed).max(writing),
            self.pages_total.load(Ordering::Relaxed),
        )
    }
}

/// Durations of the phases, in microseconds.
#[derive(Debug, Default)]
struct Timeline {
    phases: Vec<(&'static str, u64)>,
}

impl Timeline {
    fn time<T>(&mut self, name: &'static str, f: impl FnOnce() -> T) -> T {
        let start = Instant::now();
        let out = f();
        self.phases.push((name, start.elapsed().as_micros() as u64));
        out
    }
}

/// The memory mechanism in use for one checkpoint.
enum MemoryCow {
    Uffd(UffdCow),
    Fork(Option<ForkedWriter>, Unpopulated),
    Stop(StopCopy),
}

/// What a checkpoint runs with besides its request: the VM's dirty log, the disk layers its
/// checkpoints made, and the `uffd` copy-aside budget in bytes (`None`: the default, see
/// [`memory_cow::default_cow_budget`]).
pub(crate) struct CheckpointContext<'a> {
    pub dirty: &'a DirtyLog,
    pub layers: &'a mut ChainLayers,
    pub cow_budget: Option<u64>,
}

/// Takes a live checkpoint of `machine` (whose memory `page_service` may still be filling)
/// and waits until it is complete. The caller ensures only one runs at a time.
pub(crate) fn checkpoint(
    machine: &Machine,
    page_service: Option<&PageService>,
    context: CheckpointContext<'_>,
    request: &CheckpointRequest,
    progress: &Progress,
) -> Result<Manifest, CheckpointError> {
    let span = info_span!("checkpoint", store = %request.store.describe(), strategy = ?request.options.strategy);
    let _enter = span.enter();
    let result = take_checkpoint(machine, page_service, context, request, progress);
    progress.set_phase(if result.is_ok() {
        Phase::Done
    } else {
        Phase::Failed
    });
    result
}

fn store_err(store: &StoreSpec) -> impl FnOnce(ckpt_format::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Store {
        store: store.describe(),
        source,
    }
}

/// The manifest checksum and resolved page index of the complete checkpoint in the parent's
/// store, refused unless this VM's dirty log knows it.
fn check_parent(
    parent: &ParentSpec,
    dirty: &DirtyLog,
) -> Result<(u64, Arc<PageIndex>), CheckpointError> {
    let unreadable = |source| CheckpointError::Parent {
        address: parent.address.clone(),
        source,
    };
    let commit = parent
        .store
        .store()
        .open()
        .and_then(|r| r.read_commit())
        .map_err(unreadable)?
        .ok_or_else(|| {
            unreadable(ckpt_format::Error::Incomplete {
                store: parent.store.describe(),
            })
        })?;
    let checksum = commit.checksum.map_or(0, |c| c.0);
    let index = dirty
        .check_parent(checksum)
        .map_err(|reason| Refusal::Parent {
            address: parent.address.clone(),
            reason,
        })?;
    Ok((checksum, index))
}

fn take_checkpoint(
    machine: &Machine,
    page_service: Option<&PageService>,
    context: CheckpointContext<'_>,
    request: &CheckpointRequest,
    progress: &Progress,
) -> Result<Manifest, CheckpointError> {
    let CheckpointContext {
        dirty,
        layers,
        cow_budget,
    } = context;
    let options = request.options;
    let disks = machine.devices.disks();
    if let Some(exit) = machine.exit.get() {
        return Err(CheckpointError::Exited(exit));
    }
    request.validate(disks.len())?;
    let (parent, parent_index) = match &request.parent {
        Some(p) => {
            let (sum, index) = check_parent(p, dirty)?;
            // Incremental checkpoints are wanted: the next ones write and protect only the pages
            // written (this one, if logging was off, compares every page with the parent).
            dirty.want();
            (Some((p, sum)), Some(index))
        }
        None => (None, None),
    };
    let started = Instant::now();
    let mut timeline = Timeline::default();
    let regions = ram_regions(&machine.memory);
    let pages: u64 = regions.iter().map(RamRegion::pages).sum();
    progress.pages_total.store(pages, Ordering::Relaxed);
    progress.set_phase(Phase::Preparing);

    let tag = format!(
        "ckpt-{}",
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros())
    );
    let mut preps = timeline.time("prepare_disks", || disk_cow::prepare_disks(disks, &tag))?;
    timeline.time("prepare_dirty_log", || {
        dirty.prepare(&machine.vm, &machine.memory)
    });
    // An incremental checkpoint saves only the pages written since its parent: `uffd` need not
    // protect the others (those written from now until the pause are protected in it).
    let candidates = parent.and_then(|(_, sum)| dirty.written_so_far(sum));
    let (mut writer, mut cow) = timeline.time("prepare", || {
        prepare(
            &machine.memory,
            machine.summary.mem_size,
            page_service,
            request,
            &regions,
            candidates,
            cow_budget.unwrap_or_else(memory_cow::default_cow_budget),
        )
    })?;
    let options = CheckpointOptions {
        strategy: cow.strategy(),
        ..options
    };
    if let Some(index) = &parent_index {
        writer
            .memory()
            .compare_with_parent(index.clone())
            .map_err(store_err(&request.store))?;
    }
    progress.set_phase(Phase::Paused);
    // Until the VM resumes, this thread runs ahead of ordinary ones (crate::sched), so that
    // nothing else on the host (the memory savers started in the pause among them) preempts
    // it, nor delays its waking when the vCPUs have parked. Only where the pause is short:
    // `stop` copies memory and `fork` copies page tables in it, which must not hold a core at
    // real-time priority.
    let raised = (options.strategy == Strategy::Uffd).then(RaisedHere::new);
    // A vCPU that the pause kicks may be waiting for the fault handler to serve a write fault
    // (arming protects memory before the pause): it parks only once the handler has run.
    let handler = match &cow {
        // SAFETY: `cow` owns the handler thread's handle and joins it only when finished or
        // dropped, after `handler` (dropped at the resume below, or first on an early return).
        MemoryCow::Uffd(u) => u.fault_handler().map(|t| unsafe { Raised::new(t) }),
        _ => None,
    };
    let pause_start = Instant::now();
    let (guard, frozen) = timeline.time("quiesce", || quiesce(machine, options.io))?;
    let in_parent = timeline.time("dirty_log", || {
        in_parent_pages(
            dirty,
            machine,
            parent.map(|(p, sum)| (p.address.as_str(), sum)),
        )
    })?;
    let counters = SaveCounters::default();
    timeline.time("mark_memory_cow", || {
        mark_memory_cow(
            disks,
            &mut cow,
            &regions,
            &mut writer,
            &counters,
            in_parent.as_ref(),
            dirty,
        )
    })?;
    let state = timeline.time("save_state", || {
        save_state(&machine.vm, &machine.devices, &guard)
    })?;
    dirty.in_flight(&state.devices.blocks);
    if let Some(probe) = &request.pause_probe {
        probe(&machine.memory);
    }
    let switched = timeline.time("switch_disks", || disk_cow::switch_disks(disks, &mut preps));
    disk_cow::record_layers(&preps, layers);
    switched?;
    let resumed = timeline.time("resume", || {
        drop(frozen);
        guard.resume()
    });
    drop(handler);
    drop(raised);
    let pause_us = (resumed - pause_start).as_micros() as u64;
    progress.set_phase(Phase::Writing);
    info!(pause_us, "VM resumed");

    let encoded = ckpt_format::encode_state(&state).map_err(store_err(&request.store))?;
    writer
        .write_state(&encoded)
        .map_err(store_err(&request.store))?;
    progress.watch(Some(writer.memory().clone()));
    let written = timeline.time("write_out", || {
        write_out(disks, cow, &mut writer, &counters, dirty.observer())
    });
    progress.watch(None);
    let saved = written?;
    let store_dir = match &request.store {
        StoreSpec::Dir(d) => Some(d.as_path()),
        _ => None,
    };
    let disk_configs = timeline.time("finish_disks", || {
        disk_cow::finish_disks(
            disks,
            &preps,
            &state.devices.blocks,
            options.disk,
            store_dir,
            &tag,
        )
    })?;

    if let Some((p, sum)) = parent {
        writer.set_parent(ParentRef {
            address: p.address.clone(),
            manifest_checksum: Checksum(sum),
        });
    }
    writer.set_vm_config(vm_config(&machine.summary, disk_configs));
    writer.set_options(options);
    writer.set_created_unix_ms(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
    );
    // Memory and the page index durable: the write-out is over.
    let own_index = timeline
        .time("make_durable", || writer.memory_index().cloned())
        .map_err(store_err(&request.store))?;
    let write_out_us = resumed.elapsed().as_micros() as u64;
    let resolved = match &parent_index {
        Some(p) => own_index.resolve(p),
        None => Ok(own_index),
    }
    .map_err(store_err(&request.store))?;
    let stall_us = saved.stalls.map(|(sum, _)| sum);
    let mut metrics = Metrics {
        pause_us,
        write_out_us,
        stall_us,
        max_stall_us: saved.stalls.map(|(_, max)| max),
        guest_lost_us: pause_us + stall_us.unwrap_or(0),
        pages_saved_by_fault: saved.by_fault,
        pages_saved_in_background: saved.in_background,
        ..Metrics::default()
    };
    metrics.phases_us = timeline
        .phases
        .iter()
        .map(|(name, us)| (name.to_string(), *us))
        .collect();
    // The manifest can only hold the time up to its own writing; the caller gets the time to
    // the durable completion marker below.
    metrics.total_us = started.elapsed().as_micros() as u64;
    writer.set_metrics(metrics);
    let mut manifest = writer.finish().map_err(store_err(&request.store))?;
    let json = manifest.to_json().map_err(store_err(&request.store))?;
    manifest.metrics.total_us = started.elapsed().as_micros() as u64;
    for disk in &manifest.vm.disks {
        layers.retain(&disk.path);
    }
    dirty.completed(Checksum::of(&json).0, Arc::new(resolved));
    info!(
        pause_us,
        total_us = manifest.metrics.total_us,
        guest_lost_us = manifest.metrics.guest_lost_us,
        bytes = manifest.metrics.bytes_written,
        "checkpoint complete"
    );
    progress.pages_done.store(pages, Ordering::Relaxed);
    Ok(manifest)
}

/// Phase 1, while the VM runs: open the store and, for `uffd`, protect memory ahead of the pause.
fn prepare(
    memory: &GuestMemoryMmap,
    mem_size: u64,
    page_service: Option<&PageService>,
    request: &CheckpointRequest,
    regions: &[RamRegion],
    candidates: Option<PageBits>,
    cow_budget: u64,
) -> Result<(CheckpointWriter, MemoryCow), CheckpointError> {
    let store = request.store.store();
    let writer = CheckpointWriter::create(store.as_ref(), &Layout { mem_size })
        .map_err(store_err(&request.store))?;
    // A lazily restored VM's memory is registered with its page service until all of it is
    // resident. `uffd` cannot register it twice, and a forked writer would see the pages still
    // missing as zeros, so every strategy but `stop` (which reads memory through the page
    // service) waits for residency: the prefetcher gets there at store speed.
    if request.options.strategy != Strategy::Stop {
        if let Some(service) = page_service {
            service
                .wait_resident(RESIDENCY_WAIT)
                .map_err(CheckpointError::NotResident)?;
        }
    }
    // Only `stop` can find a page service still filling memory (see above).
    let unpopulated = if shared_image(memory) || page_service.is_some_and(|s| !s.all_resident()) {
        Unpopulated::Read
    } else {
        Unpopulated::Zero
    };
    let cow = match request.options.strategy {
        // A clone maps the shared image of its checkpoint privately, which userfaultfd cannot
        // write-protect; the kernel's own copy-on-write (fork) protects it just as well. The
        // manifest records the strategy used.
        Strategy::Uffd if shared_image(memory) => MemoryCow::Fork(None, unpopulated),
        Strategy::Uffd => MemoryCow::Uffd(UffdCow::arm(regions, candidates, cow_budget)?),
        Strategy::Fork => MemoryCow::Fork(None, unpopulated),
        Strategy::Stop => MemoryCow::Stop(StopCopy::prepare(regions, unpopulated, cow_budget)),
    };
    Ok((writer, cow))
}

/// Whether guest memory maps a clones' shared image (file-backed, unlike all other memory).
fn shared_image(memory: &GuestMemoryMmap) -> bool {
    memory.iter().any(|r| r.file_offset().is_some())
}

/// How long a checkpoint of a lazily restored VM waits for its memory to become resident.
const RESIDENCY_WAIT: Duration = Duration::from_secs(120);

impl MemoryCow {
    /// The strategy actually used, as recorded in the manifest.
    fn strategy(&self) -> Strategy {
        match self {
            MemoryCow::Uffd(_) => Strategy::Uffd,
            MemoryCow::Fork(..) => Strategy::Fork,
            MemoryCow::Stop(_) => Strategy::Stop,
        }
    }
}

/// Phase 2: stop every vCPU, then (after waiting for disk I/O under `drain`) freeze the disks.
fn quiesce(
    machine: &Machine,
    io: IoPolicy,
) -> Result<(PauseGuard<'_>, disk_cow::FrozenDisks<'_>), CheckpointError> {
    let control: &VcpuControl = &machine.control;
    let guard = control
        .pause()
        .map_err(|e| CheckpointError::Pause(e.into()))?;
    // Parked vCPUs have reported every exit they made, so this answer holds for the pause.
    if let Some(exit) = machine.exit.get() {
        return Err(CheckpointError::Exited(exit));
    }
    let frozen = disk_cow::freeze_disks(machine.devices.disks(), io)?;
    Ok((guard, frozen))
}

/// In the pause, before memory is marked: the instant of the dirty log. For an incremental
/// checkpoint, the pages unchanged since its parent's instant (kept in the parent).
fn in_parent_pages(
    dirty: &DirtyLog,
    machine: &Machine,
    parent: Option<(&str, u64)>,
) -> Result<Option<Arc<PageBits>>, CheckpointError> {
    let written = dirty
        .instant(&machine.vm, parent.map(|(_, sum)| sum))
        .map_err(|reason| Refusal::Parent {
            address: parent.map(|(a, _)| a.to_string()).unwrap_or_default(),
            reason,
        })?;
    Ok(written.map(|w| Arc::new(w.complement())))
}

/// Phase 3, in the pause: make memory copy-on-write (or, for `stop`, copy it now), keeping the
/// pages of `in_parent` in the parent checkpoint. Every disk carries the dirty log's observer
/// from now on (with the `uffd` saver while the checkpoint runs).
fn mark_memory_cow(
    disks: &[BlockHandle],
    cow: &mut MemoryCow,
    regions: &[RamRegion],
    writer: &mut CheckpointWriter,
    counters: &SaveCounters,
    in_parent: Option<&Arc<PageBits>>,
    dirty: &DirtyLog,
) -> Result<(), CheckpointError> {
    let first = dirty.observer_first_installed();
    let observer: Option<Arc<dyn DmaObserver>> = match cow {
        MemoryCow::Uffd(u) => {
            u.seal(writer.memory().clone(), in_parent.cloned())?;
            // New disk reads must not overwrite originals: they are saved first (M11).
            Some(Arc::new(BothObservers(u.observer(), dirty.observer())))
        }
        MemoryCow::Fork(child, unpopulated) => {
            *child = Some(fork_writer(
                regions,
                writer,
                in_parent.map(|k| &**k),
                *unpopulated,
            )?);
            first.then(|| dirty.observer())
        }
        MemoryCow::Stop(copy) => {
            copy.copy_while_paused(regions, writer.memory(), counters, in_parent.map(|k| &**k))?;
            first.then(|| dirty.observer())
        }
    };
    for (i, h) in disks.iter().enumerate() {
        if let Some(o) = &observer {
            h.set_dma_observer(Some(o.clone()))
                .map_err(|source| CheckpointError::Disk { index: i, source })?;
        }
    }
    Ok(())
}

/// Phase 4, in the pause: devices, vCPUs and VM-wide KVM state into memory.
pub(crate) fn save_state(
    vm: &KvmVm,
    devices: &DeviceManager,
    guard: &PauseGuard<'_>,
) -> Result<MachineState, CheckpointError> {
    let devices = devices.save().map_err(CheckpointError::Devices)?;
    let vcpus = guard
        .vcpus()
        .map(|vcpu| vcpu.save())
        .collect::<Result<Vec<_>, _>>()?;
    Ok(MachineState {
        vm: vm.save()?,
        vcpus,
        devices,
    })
}

/// What the write-out saved, and what it cost the guest.
struct Saved {
    by_fault: u64,
    in_background: u64,
    /// The vCPUs' copy-on-write stalls in microseconds (summed, longest); `None` where the
    /// VMM cannot see them (`fork`).
    stalls: Option<(u64, u64)>,
}

/// Phase 6, while the VM runs: memory to the store.
fn write_out(
    disks: &[BlockHandle],
    cow: MemoryCow,
    writer: &mut CheckpointWriter,
    counters: &SaveCounters,
    tracker: Arc<dyn DmaObserver>,
) -> Result<Saved, CheckpointError> {
    match cow {
        MemoryCow::Uffd(mut u) => {
            u.start_background()?;
            u.wait_background()?;
            // Every block is saved: the hot set is complete.
            writer.set_hot_pages(u.hot_pages());
            // The observers hold the store writer's queue open; the dirty log's stays.
            for h in disks {
                if let Err(e) = h.set_dma_observer(Some(tracker.clone())) {
                    warn!("cannot remove a disk's DMA observer: {e}");
                }
            }
            let stalls = u.stalls_us();
            let (by_fault, in_background) = u.finish()?;
            Ok(Saved {
                by_fault,
                in_background,
                stalls: Some(stalls),
            })
        }
        MemoryCow::Fork(child, _) => {
            let child = child.expect("forked in the pause");
            let report = child.wait()?;
            let pages = report.pages;
            writer
                .adopt_memory(report)
                .map_err(|e| CowError::Child(e.to_string()))?;
            Ok(Saved {
                by_fault: 0,
                in_background: pages,
                stalls: None,
            })
        }
        MemoryCow::Stop(copy) => {
            copy.write_out(writer.memory())?;
            let (by_fault, in_background) = counters.get();
            Ok(Saved {
                by_fault,
                in_background,
                // The guest runs unprotected once resumed: nothing stalls it.
                stalls: Some((0, 0)),
            })
        }
    }
}

fn vm_config(summary: &VmSummary, disks: Vec<ckpt_format::DiskConfig>) -> ckpt_format::VmConfig {
    let serial = DeviceConfig::Serial {
        port: crate::devices::serial::COM1_PORT as u16,
    };
    let blocks = disks
        .iter()
        .enumerate()
        .map(|(i, d)| DeviceConfig::VirtioBlk {
            mmio: crate::devices::virtio::mmio_base(i),
            irq: crate::devices::virtio::irq(i),
            disk: d.id.clone(),
        });
    ckpt_format::VmConfig {
        mem_size: summary.mem_size,
        vcpus: u32::from(summary.vcpus),
        kernel: summary.kernel.clone(),
        cmdline: summary.cmdline.clone(),
        devices: std::iter::once(serial).chain(blocks).collect(),
        disks,
    }
}
