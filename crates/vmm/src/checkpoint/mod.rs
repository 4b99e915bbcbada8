//! The live checkpoint (SPEC §2), one function per phase:
//!
//! 1. [`prepare`] — while the VM runs: open the store, and for `uffd` write-protect memory
//!    ahead of the pause (arming);
//! 2. [`quiesce`] — stop the vCPUs (the pause begins); with the `drain` policy wait for disk I/O;
//! 3. [`mark_memory_cow`] — finish write protection (`uffd`), fork the writer (`fork`), or copy
//!    everything now (`stop`);
//! 4. [`save_state`] — vCPUs, irqchip, PIT, clock and devices into memory;
//! 5. resume — dropping the pause guard (the pause ends);
//! 6. [`write_out`] — state and original memory pages to the store while the VM runs, then the
//!    completion marker.
//!
//! Why this order: device state is saved after memory is marked copy-on-write, so that a device
//! write to guest memory made between the two is either in the saved state and in the
//! checkpoint's memory, or in neither. vCPU state is read in the pause, after the vCPUs are
//! parked, so no instruction retires between the register read and the memory freeze.

mod disk_cow;
pub mod memory_cow;
pub mod restore;
pub mod state;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ckpt_format::{
    CheckpointOptions, CheckpointWriter, DeviceConfig, DirStore, DiskPolicy, IoPolicy, Layout,
    Manifest, MemStore, Metrics, RawStore, Store, Strategy,
};
use thiserror::Error;
use tracing::{info, info_span, warn};
use vm_memory::GuestMemoryMmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use self::memory_cow::fork::{fork_writer, ForkedWriter};
use self::memory_cow::uffd::UffdCow;
use self::memory_cow::{stop, CowError, SaveCounters};
use self::state::VmSnapshot;
use crate::exit::VmExit;
use crate::kvm::state::{save_vcpu, save_vm};
use crate::kvm::vcpu::PauseGuard;
use crate::kvm::KvmError;
use crate::memory::{ram_regions, RamRegion};
use crate::vm::{Vm, VmError};

/// Errors of taking a checkpoint. The VM keeps running after any of them, and the checkpoint
/// is left incomplete (never reported complete).
#[derive(Debug, Error)]
pub enum CheckpointError {
    /// Another checkpoint of this VM is in progress.
    #[error("a checkpoint of this VM is already in progress")]
    Busy,
    /// The strategy or policy is not one this VMM implements.
    #[error("unsupported checkpoint option: {0}")]
    Unsupported(&'static str),
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
    /// A lazily restored VM's memory did not become resident, which a write-protect
    /// checkpoint needs.
    #[error("restored memory is not resident")]
    NotResident(#[source] crate::page_service::PageServiceError),
    /// A disk device refused or failed.
    #[error("disk {index}")]
    Disk {
        /// Device index.
        index: usize,
        /// Cause.
        #[source]
        source: crate::devices::virtio::block::BlockError,
    },
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

/// Where a checkpoint goes.
#[derive(Debug, Clone)]
pub enum StoreSpec {
    /// A directory of files (the default).
    Dir(PathBuf),
    /// One raw file or block device.
    Raw(PathBuf),
    /// RAM (a memfd), for the fastest clone within one host.
    Mem(Arc<MemStore>),
}

impl StoreSpec {
    pub(crate) fn store(&self) -> Box<dyn Store + '_> {
        match self {
            StoreSpec::Dir(p) => Box::new(DirStore::new(p.clone())),
            StoreSpec::Raw(p) => Box::new(RawStore::new(p.clone())),
            StoreSpec::Mem(m) => Box::new(MemStoreRef(m)),
        }
    }

    pub(crate) fn describe(&self) -> String {
        match self {
            StoreSpec::Dir(p) | StoreSpec::Raw(p) => p.display().to_string(),
            StoreSpec::Mem(_) => "memory store".to_string(),
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
}

impl std::fmt::Debug for CheckpointRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointRequest")
            .field("store", &self.store)
            .field("options", &self.options)
            .field("pause_probe", &self.pause_probe.is_some())
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
}

impl Progress {
    fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::Release);
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
        (
            self.pages_done.load(Ordering::Relaxed),
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
    Fork(Option<ForkedWriter>),
    Stop,
}

/// How often the progress of a write-out is sampled.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(20);

/// Serialises checkpoints of one VM.
#[derive(Debug, Default)]
pub struct CheckpointLock(Mutex<()>);

impl Vm {
    /// Takes a live checkpoint (SPEC §2) and waits until it is complete.
    pub fn checkpoint(
        &self,
        request: &CheckpointRequest,
        progress: &Progress,
    ) -> Result<Manifest, CheckpointError> {
        let _busy = self
            .checkpoint_lock()
            .0
            .try_lock()
            .map_err(|_| CheckpointError::Busy)?;
        let span = info_span!("checkpoint", store = %request.store.describe(), strategy = ?request.options.strategy);
        let _enter = span.enter();
        let result = take_checkpoint(self, request, progress);
        progress.set_phase(if result.is_ok() {
            Phase::Done
        } else {
            Phase::Failed
        });
        result
    }
}

fn store_err(store: &StoreSpec) -> impl FnOnce(ckpt_format::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Store {
        store: store.describe(),
        source,
    }
}

fn take_checkpoint(
    vm: &Vm,
    request: &CheckpointRequest,
    progress: &Progress,
) -> Result<Manifest, CheckpointError> {
    let options = request.options;
    if matches!(options.strategy, Strategy::Unknown) || matches!(options.io, IoPolicy::Unknown) {
        return Err(CheckpointError::Unsupported(
            "unknown strategy or I/O policy",
        ));
    }
    if let Some(exit) = vm.exit_status() {
        return Err(CheckpointError::Exited(exit));
    }
    if options.disk == DiskPolicy::CopyCommit
        && !vm.disks().is_empty()
        && !matches!(request.store, StoreSpec::Dir(_))
    {
        return Err(CheckpointError::Unsupported(
            "copy-commit needs a directory store to hold the disk copy",
        ));
    }
    let started = Instant::now();
    let mut timeline = Timeline::default();
    let regions = ram_regions(vm.memory());
    let pages: u64 = regions.iter().map(RamRegion::pages).sum();
    progress.pages_total.store(pages, Ordering::Relaxed);
    progress.set_phase(Phase::Preparing);

    let tag = format!(
        "ckpt-{}",
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros())
    );
    let mut disks = timeline.time("prepare_disks", || disk_cow::prepare_disks(vm, &tag))?;
    let (mut writer, mut cow) = timeline.time("prepare", || prepare(vm, request, &regions))?;
    let options = CheckpointOptions {
        strategy: cow.strategy(),
        ..options
    };

    progress.set_phase(Phase::Paused);
    let pause_start = Instant::now();
    let (guard, frozen) = timeline.time("quiesce", || quiesce(vm, options.io))?;
    let counters = SaveCounters::default();
    timeline.time("mark_memory_cow", || {
        mark_memory_cow(vm, &mut cow, &regions, &mut writer, &counters)
    })?;
    let snapshot = timeline.time("save_state", || save_state(vm, &guard))?;
    if let Some(probe) = &request.pause_probe {
        probe(vm.memory());
    }
    timeline.time("switch_disks", || disk_cow::switch_disks(vm, &mut disks))?;
    timeline.time("resume", || {
        drop(frozen);
        guard.resume()
    });
    let pause_us = pause_start.elapsed().as_micros() as u64;
    progress.set_phase(Phase::Writing);
    info!(pause_us, "VM resumed");

    let state = ckpt_format::encode_state(&snapshot).map_err(store_err(&request.store))?;
    writer
        .write_state(&state)
        .map_err(store_err(&request.store))?;
    let (by_fault, in_background) = timeline.time("write_out", || {
        write_out(vm, cow, &mut writer, &counters, progress)
    })?;
    let store_dir = match &request.store {
        StoreSpec::Dir(d) => Some(d.as_path()),
        _ => None,
    };
    let disk_configs = timeline.time("finish_disks", || {
        disk_cow::finish_disks(vm, &disks, &snapshot.disks, options.disk, store_dir, &tag)
    })?;

    writer.set_vm_config(vm_config(vm, disk_configs));
    writer.set_options(options);
    writer.set_created_unix_ms(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
    );
    let mut metrics = Metrics {
        pause_us,
        pages_saved_by_fault: by_fault,
        pages_saved_in_background: in_background,
        ..Metrics::default()
    };
    metrics.phases_us = timeline
        .phases
        .iter()
        .map(|(name, us)| (name.to_string(), *us))
        .collect();
    metrics.total_us = started.elapsed().as_micros() as u64;
    writer.set_metrics(metrics);
    let manifest = writer.finish().map_err(store_err(&request.store))?;
    info!(
        pause_us,
        total_us = manifest.metrics.total_us,
        bytes = manifest.metrics.bytes_written,
        "checkpoint complete"
    );
    progress.pages_done.store(pages, Ordering::Relaxed);
    Ok(manifest)
}

/// Phase 1, while the VM runs: open the store and, for `uffd`, protect memory ahead of the pause.
fn prepare(
    vm: &Vm,
    request: &CheckpointRequest,
    regions: &[RamRegion],
) -> Result<(CheckpointWriter, MemoryCow), CheckpointError> {
    let store = request.store.store();
    let writer = CheckpointWriter::create(
        store.as_ref(),
        &Layout {
            mem_size: vm.summary().mem_size,
        },
    )
    .map_err(store_err(&request.store))?;
    // A lazily restored VM's memory is registered with its page service until all of it is
    // resident. `uffd` cannot register it twice, and a forked writer would see the pages still
    // missing as zeros, so every strategy but `stop` (which reads memory through the page
    // service) waits for residency: the prefetcher gets there at store speed.
    if request.options.strategy != Strategy::Stop {
        if let Some(service) = vm.page_service() {
            service
                .wait_resident(RESIDENCY_WAIT)
                .map_err(CheckpointError::NotResident)?;
        }
    }
    let cow = match request.options.strategy {
        // A clone maps the shared image of its checkpoint privately, which userfaultfd cannot
        // write-protect; the kernel's own copy-on-write (fork) protects it just as well. The
        // manifest records the strategy used.
        Strategy::Uffd if shared_image(vm) => MemoryCow::Fork(None),
        Strategy::Uffd => MemoryCow::Uffd(UffdCow::arm(regions)?),
        Strategy::Fork => MemoryCow::Fork(None),
        Strategy::Stop | Strategy::Unknown => MemoryCow::Stop,
    };
    Ok((writer, cow))
}

/// Whether guest memory maps a clones' shared image (file-backed, unlike all other memory).
fn shared_image(vm: &Vm) -> bool {
    vm.memory().iter().any(|r| r.file_offset().is_some())
}

/// How long a checkpoint of a lazily restored VM waits for its memory to become resident.
const RESIDENCY_WAIT: Duration = Duration::from_secs(120);

impl MemoryCow {
    /// The strategy actually used, as recorded in the manifest.
    fn strategy(&self) -> Strategy {
        match self {
            MemoryCow::Uffd(_) => Strategy::Uffd,
            MemoryCow::Fork(_) => Strategy::Fork,
            MemoryCow::Stop => Strategy::Stop,
        }
    }
}

/// Phase 2: stop every vCPU, then (after waiting for disk I/O under `drain`) freeze the disks.
fn quiesce(
    vm: &Vm,
    io: IoPolicy,
) -> Result<(PauseGuard<'_>, disk_cow::FrozenDisks<'_>), CheckpointError> {
    let guard = vm.pause().map_err(CheckpointError::Pause)?;
    // Parked vCPUs have reported every exit they made, so this answer holds for the pause.
    if let Some(exit) = vm.exit_status() {
        return Err(CheckpointError::Exited(exit));
    }
    let frozen = disk_cow::freeze_disks(vm, io)?;
    Ok((guard, frozen))
}

/// Phase 3, in the pause: make memory copy-on-write (or, for `stop`, copy it now).
fn mark_memory_cow(
    vm: &Vm,
    cow: &mut MemoryCow,
    regions: &[RamRegion],
    writer: &mut CheckpointWriter,
    counters: &SaveCounters,
) -> Result<(), CheckpointError> {
    match cow {
        MemoryCow::Uffd(u) => {
            u.seal(writer.memory().clone())?;
            // New disk reads must not overwrite originals: they are saved first (M11).
            for (i, h) in vm.disks().iter().enumerate() {
                h.set_dma_observer(Some(u.observer()))
                    .map_err(|source| CheckpointError::Disk { index: i, source })?;
            }
        }
        MemoryCow::Fork(child) => *child = Some(fork_writer(regions, writer)?),
        MemoryCow::Stop => stop::copy_while_paused(regions, writer.memory(), counters)?,
    }
    Ok(())
}

/// Phase 4, in the pause: vCPUs, VM-wide KVM state and devices into memory.
fn save_state(vm: &Vm, guard: &PauseGuard<'_>) -> Result<VmSnapshot, CheckpointError> {
    let serial = vm.serial().lock().unwrap_or_else(|p| p.into_inner()).save();
    let vcpus = guard
        .vcpus()
        .enumerate()
        .map(|(id, fd)| save_vcpu(id as u8, &fd, vm.msr_indices()))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(VmSnapshot {
        vm: save_vm(vm.fd())?,
        vcpus,
        serial,
        disks: disk_cow::save_disks(vm)?,
    })
}

/// Phase 6, while the VM runs: memory to the store. Returns (pages by fault, in background).
fn write_out(
    vm: &Vm,
    cow: MemoryCow,
    writer: &mut CheckpointWriter,
    counters: &SaveCounters,
    progress: &Progress,
) -> Result<(u64, u64), CheckpointError> {
    match cow {
        MemoryCow::Uffd(mut u) => {
            u.start_background()?;
            let memory = writer.memory().clone();
            let done = AtomicBool::new(false);
            let counts = std::thread::scope(|s| {
                s.spawn(|| {
                    while !done.load(Ordering::Acquire) {
                        let saved = memory.progress().pages_done;
                        progress.pages_done.store(saved, Ordering::Relaxed);
                        std::thread::sleep(PROGRESS_INTERVAL);
                    }
                });
                let counts = u.wait_background().and_then(|()| {
                    // Every block is saved: the hot set is complete.
                    writer.set_hot_pages(u.hot_pages());
                    // The observers hold the store writer's queue open.
                    for h in vm.disks() {
                        if let Err(e) = h.set_dma_observer(None) {
                            warn!("cannot remove a disk's DMA observer: {e}");
                        }
                    }
                    u.finish()
                });
                done.store(true, Ordering::Release);
                counts
            })?;
            Ok(counts)
        }
        MemoryCow::Fork(child) => {
            let child = child.expect("forked in the pause");
            let report = child.wait()?;
            let pages = report.pages;
            writer
                .adopt_memory(report)
                .map_err(|e| CowError::Child(e.to_string()))?;
            Ok((0, pages))
        }
        MemoryCow::Stop => Ok(counters.get()),
    }
}

fn vm_config(vm: &Vm, disks: Vec<ckpt_format::DiskConfig>) -> ckpt_format::VmConfig {
    let s = vm.summary();
    ckpt_format::VmConfig {
        mem_size: s.mem_size,
        vcpus: u32::from(s.vcpus),
        kernel: s.kernel.clone(),
        cmdline: s.cmdline.clone(),
        devices: std::iter::once(DeviceConfig {
            id: "serial0".into(),
            kind: "serial".into(),
            params: [("port".to_string(), "0x3f8".to_string())].into(),
        })
        .chain(disks.iter().enumerate().map(|(i, d)| {
            DeviceConfig {
                id: d.id.clone(),
                kind: "virtio-blk".into(),
                params: [
                    (
                        "mmio".to_string(),
                        format!("{:#x}", crate::devices::virtio::mmio_base(i)),
                    ),
                    (
                        "irq".to_string(),
                        crate::devices::virtio::irq(i).to_string(),
                    ),
                ]
                .into(),
            }
        }))
        .collect(),
        disks,
    }
}
