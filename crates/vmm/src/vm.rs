//! A running VM: boots from a [`VmConfig`] or restores a checkpoint, runs until the guest
//! exits, and can be paused, resumed and checkpointed from any thread while it runs.

use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::{info, info_span, warn};
use vm_memory::GuestMemoryMmap;

use crate::boot::BootSpec;
use crate::builder::{self, Console, Machine, Parts, Start, VmError, VmSummary, MAX_VCPUS};
use crate::checkpoint::dirty::DirtyLog;
use crate::checkpoint::disk_chain::{self, ChainError, ChainLayers, LayerMerge};
use crate::checkpoint::restore::{
    self, MemoryMode, RestoreError, RestoreOptions, RestoreRecord, RestoreStats, Standby,
};
use crate::checkpoint::{
    self, CheckpointContext, CheckpointError, CheckpointRequest, Progress, StoreSpec,
};
use crate::devices::virtio::block::{BlockHandle, DiskConfig};
use crate::devices::Bus;
use crate::exit::{ExitNotifier, VmExit};
use crate::kvm::vcpu::{ExitCounts, HeldPause, PauseGuard};
use crate::memory::{self, HugePages};
use crate::migration::{
    self, MigrateOptions, MigrationError, MigrationReport, ReceiveOptions, SendContext,
};
use crate::page_service::{PageService, SharedImage};

/// Everything needed to build a VM.
#[derive(Debug)]
pub struct VmConfig {
    /// Guest memory size in bytes.
    pub mem_size: u64,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Huge page policy of guest memory.
    pub hugepages: HugePages,
    /// Kernel image.
    pub kernel: PathBuf,
    /// Initial ramdisk.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Serial console output.
    pub console: Console,
    /// virtio-blk disks; disk i is at `virtio::mmio_base(i)` with IRQ `virtio::irq(i)`.
    pub disks: Vec<DiskConfig>,
}

/// A VM whose vCPUs are running.
pub struct Vm {
    machine: Machine,
    /// Held by the checkpoint in progress (one at a time) and by retention's merges: the
    /// layers of the disk chains the VM made, and those its retained checkpoints need.
    checkpoints: Mutex<ChainLayers>,
    /// How a restored VM got its memory; its page service while it may still serve memory.
    restore: Option<RestoreRecord>,
    /// The pages written since each recent checkpoint, for incremental ones.
    dirty: DirtyLog,
    /// The `uffd` copy-aside budget in bytes; 0 for the default.
    cow_budget: AtomicU64,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("vcpus", &self.machine.control.count())
            .field("memory", &memory::ram_size(&self.machine.memory))
            .finish()
    }
}

impl Vm {
    fn new(machine: Machine, restore: Option<RestoreRecord>) -> Vm {
        let mut layers = ChainLayers::default();
        if restore.is_some() {
            // A restore runs each disk on a COW file of its own over the checkpoint's disk.
            for info in machine
                .devices
                .disks()
                .iter()
                .filter_map(|d| d.image_info().ok())
            {
                layers.made(&info.path);
            }
        }
        Vm {
            dirty: DirtyLog::new(&memory::ram_regions(&machine.memory)),
            machine,
            checkpoints: Mutex::new(layers),
            restore,
            cow_budget: AtomicU64::new(0),
        }
    }

    /// Sets the copy-aside budget of this VM's `uffd` checkpoints: how many bytes of original
    /// pages may be copied aside and wait for the store before a guest write waits for the
    /// store (at least one 2 MiB block). `None` restores the default, a quarter of the host's
    /// available memory at each checkpoint's start and at least 64 MiB.
    pub fn set_cow_budget(&self, bytes: Option<u64>) {
        self.cow_budget
            .store(bytes.map_or(0, |b| b.max(1)), Ordering::Relaxed);
    }

    /// The copy-aside budget set by [`Self::set_cow_budget`] (`None`: the default).
    pub fn cow_budget(&self) -> Option<u64> {
        let budget = self.cow_budget.load(Ordering::Relaxed);
        (budget > 0).then_some(budget)
    }

    /// Keeps KVM's dirty log from the next checkpoint on, so that incremental checkpoints
    /// protect and write only the pages written since their parent (for periodic checkpoints
    /// with incrementals). Without it, logging starts at the first checkpoint that names a
    /// parent: it costs the guest a KVM fault per page it writes after each checkpoint.
    pub fn log_writes(&self) {
        self.dirty.want();
    }

    /// Whether [`Self::log_writes`] was asked for, or a checkpoint named a parent, or a
    /// migration ran: logging is on from then on.
    pub fn logs_writes(&self) -> bool {
        self.dirty.wanted()
    }

    /// Builds the VM described by `config` and starts its vCPUs.
    pub fn boot(config: VmConfig) -> Result<Vm, VmError> {
        let span = info_span!("boot", mem = config.mem_size, vcpus = config.vcpus);
        let _enter = span.enter();
        if config.vcpus == 0 || config.vcpus > MAX_VCPUS {
            return Err(VmError::VcpuCount(config.vcpus));
        }
        memory::validate_size(config.mem_size)?;
        let memory = memory::create_guest_memory(config.mem_size, config.hugepages)?;
        let vm = builder::create_vm(&memory, None)?;
        let summary = VmSummary {
            mem_size: config.mem_size,
            vcpus: config.vcpus,
            kernel: Some(config.kernel.clone()),
            cmdline: Some(config.cmdline.clone()),
        };
        let parts = Parts {
            summary,
            memory,
            vm,
            exit: Arc::new(ExitNotifier::default()),
            console: config.console,
            disks: &config.disks,
            vcpus: None,
        };
        let spec = BootSpec {
            kernel: &config.kernel,
            initrd: config.initrd.as_deref(),
            cmdline: &config.cmdline,
        };
        let machine = builder::assemble(parts, Start::Boot(spec))?;
        info!(kernel = %config.kernel.display(), disks = config.disks.len(), "VM started");
        Ok(Vm::new(machine, None))
    }

    /// Restores the checkpoint in `store` into a new running VM: its memory is served on
    /// first touch by a page service, or read and verified first with `options.eager`.
    pub fn restore(store: &StoreSpec, options: RestoreOptions) -> Result<Vm, RestoreError> {
        let mode = if options.eager {
            MemoryMode::Eager
        } else {
            MemoryMode::Lazy
        };
        restore::restore(store, options, mode).map(|(m, r)| Vm::new(m, Some(r)))
    }

    /// Loads and verifies the memory of the checkpoint in `store` once, for
    /// [`restore_clone`](Self::restore_clone).
    pub fn load_shared_image(store: &StoreSpec) -> Result<SharedImage, RestoreError> {
        restore::load_shared_image(store)
    }

    /// Restores a clone of the checkpoint in `store` on `image` (made from that checkpoint
    /// with [`load_shared_image`](Self::load_shared_image)): the clones share every page none
    /// of them writes. `options.eager` is ignored.
    pub fn restore_clone(
        store: &StoreSpec,
        image: &SharedImage,
        options: RestoreOptions,
    ) -> Result<Vm, RestoreError> {
        restore::restore(store, options, MemoryMode::Shared(image))
            .map(|(m, r)| Vm::new(m, Some(r)))
    }

    /// Restores the checkpoint in `store` on `standby` (made in advance with
    /// [`Standby::new`]) and runs it: the KVM VM, its memory and vCPUs exist already, so only
    /// state is loaded before the first instruction. Memory is served on first touch. A
    /// checkpoint of another shape, or one that cannot be opened, is refused and leaves the
    /// standby as it was; after a failure past that point the standby is used up.
    /// `options.eager` is refused.
    pub fn restore_standby(
        standby: &mut Standby,
        store: &StoreSpec,
        options: RestoreOptions,
    ) -> Result<Vm, RestoreError> {
        standby
            .restore(store, options)
            .map(|(m, r)| Vm::new(m, Some(r)))
    }

    /// Receives one VM migrated on `stream` (accepted by the caller) and runs it: its memory
    /// not yet here is served on first touch from the source.
    pub fn receive(stream: TcpStream, options: ReceiveOptions) -> Result<Vm, MigrationError> {
        migration::receive(stream, options).map(|(m, r)| Vm::new(m, Some(r)))
    }

    /// Moves this VM to the `cowvm receive` at `options.to` and waits until the destination
    /// owns every page. On success this VM has ended ([`VmExit::Migrated`]); after an error
    /// [`MigrationError::Resumed`] it runs on as before.
    pub fn migrate(&self, options: &MigrateOptions) -> Result<MigrationReport, MigrationError> {
        let mut layers = self
            .checkpoints
            .try_lock()
            .map_err(|_| MigrationError::Busy)?;
        let result = migration::migrate(
            SendContext {
                machine: &self.machine,
                dirty: &self.dirty,
                layers: &mut layers,
                page_service: self.page_service(),
            },
            options,
        );
        if let Err(e) = disk_chain::merge_unneeded(self.disks(), &mut layers) {
            warn!("cannot merge disk layers no checkpoint needs: {e}");
        }
        result
    }

    /// The page service of a VM restored lazily, while it may still serve memory.
    fn page_service(&self) -> Option<&PageService> {
        self.restore.as_ref().and_then(RestoreRecord::page_service)
    }

    /// For a restored VM: time to its first instruction and what the page service did.
    pub fn restore_stats(&self) -> Option<RestoreStats> {
        self.restore.as_ref().map(RestoreRecord::stats)
    }

    /// Takes a live checkpoint (design.md §2) and waits until it is complete.
    pub fn checkpoint(
        &self,
        request: &CheckpointRequest,
        progress: &Progress,
    ) -> Result<ckpt_format::Manifest, CheckpointError> {
        let mut layers = self
            .checkpoints
            .try_lock()
            .map_err(|_| CheckpointError::Busy)?;
        let budget = self.cow_budget.load(Ordering::Relaxed);
        let context = CheckpointContext {
            dirty: &self.dirty,
            layers: &mut layers,
            cow_budget: (budget > 0).then_some(budget),
        };
        let result = checkpoint::checkpoint(
            &self.machine,
            self.page_service(),
            context,
            request,
            progress,
        );
        // A layer left for later (its child was the running top) has a new child now.
        if let Err(e) = disk_chain::merge_unneeded(self.disks(), &mut layers) {
            warn!("cannot merge disk layers no checkpoint needs: {e}");
        }
        result
    }

    /// Retention: checkpoints naming `disks` as their disk files (from their manifests) were
    /// deleted. Every layer of the disk chains that this VM made and that no retained
    /// checkpoint needs any more is merged into the layer above it and deleted; one whose
    /// child is the running top is merged after the next checkpoint. Waits for a checkpoint
    /// in progress. The user's own images are never merged or deleted.
    pub fn release_checkpoint_disks(
        &self,
        disks: &[PathBuf],
    ) -> Result<Vec<LayerMerge>, ChainError> {
        let mut layers = self.checkpoints.lock().unwrap_or_else(|p| p.into_inner());
        for disk in disks {
            layers.release(disk);
        }
        disk_chain::merge_unneeded(self.disks(), &mut layers)
    }

    /// What the VM was built from.
    pub fn summary(&self) -> &VmSummary {
        &self.machine.summary
    }

    /// The virtio-blk disks, in configuration order.
    pub fn disks(&self) -> &[BlockHandle] {
        self.machine.devices.disks()
    }

    /// The MMIO bus as the vCPUs see it (tests drive devices through it).
    pub fn mmio_bus(&self) -> &Bus {
        self.machine.devices.mmio()
    }

    /// Guest memory. While the VM runs, vCPUs write it concurrently.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.machine.memory
    }

    /// Stops every vCPU; they resume when the guard is dropped.
    pub fn pause(&self) -> Result<PauseGuard<'_>, VmError> {
        Ok(self.machine.control.pause()?)
    }

    /// Stops every vCPU until the returned pause is dropped: for a controller whose pause
    /// spans requests (the API's `PATCH /vm`). Like [`pause`](Self::pause), it fails while
    /// another pause (a checkpoint's) is in force.
    pub fn pause_held(&self) -> Result<HeldPause, VmError> {
        Ok(self.machine.control.pause_held()?)
    }

    /// Whether the VM is paused.
    pub fn is_paused(&self) -> bool {
        self.machine.control.is_paused()
    }

    /// Exits of the vCPUs to the VMM so far, by reason.
    pub fn exit_counts(&self) -> ExitCounts {
        self.machine.control.exits()
    }

    /// Number of vCPUs.
    pub fn vcpu_count(&self) -> usize {
        self.machine.control.count()
    }

    /// The exit, if the VM has stopped.
    pub fn exit_status(&self) -> Option<VmExit> {
        self.machine.exit.get()
    }

    /// Waits up to `timeout` for the VM to exit.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<VmExit> {
        self.machine.exit.wait_timeout(timeout)
    }

    /// Runs until the guest exits, then stops the vCPU threads and flushes the console.
    pub fn wait(self) -> VmExit {
        self.machine.exit.wait()
    }

    /// Stops the VM from the VMM side. The vCPUs run on until the VM is dropped (a checkpoint
    /// in progress can still pause them).
    pub fn stop(&self) {
        self.machine.exit.notify(VmExit::Stopped);
    }

    /// Stops the VM and makes every vCPU thread leave its run loop now, even one parked by a
    /// pause: a VM replaced by a rollback is paused, then retired, and must not run again when
    /// that pause is dropped, whoever still holds a reference to it.
    pub fn retire(&self) {
        self.stop();
        self.machine.control.request_exit();
    }

    /// Writes the console's partial line, if any, to its output (so that the console of a VM
    /// that replaces this one continues after it).
    pub fn flush_console(&self) -> std::io::Result<()> {
        self.machine.devices.flush_console()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.machine.exit.notify(VmExit::Stopped);
        self.machine.control.request_exit();
        // A vCPU waiting on a page the page service refused must be able to leave KVM_RUN;
        // it has been told to exit, so it cannot run guest code again.
        if let Some(service) = self.page_service() {
            service.release_failed();
        }
        self.machine.control.join();
        self.machine.devices.stop();
        // Only once nothing else can touch guest memory.
        if let Some(service) = self.page_service() {
            service.stop();
        }
        if let Err(e) = self.flush_console() {
            tracing::warn!("console flush failed: {e}");
        }
    }
}
