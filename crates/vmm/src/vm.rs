//! A running VM: builds memory, KVM, devices and vCPUs from a [`VmConfig`], then runs until the
//! guest exits. The VM can be paused and resumed from any thread while it runs.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use thiserror::Error;
use tracing::{info, info_span};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::boot::{self, BootError, BootSpec};
use crate::checkpoint::CheckpointLock;
use crate::devices::debug_exit::{DebugExit, DEBUG_EXIT_PORT, DEBUG_EXIT_SIZE};
use crate::devices::serial::{SerialConsole, COM1_IRQ, COM1_PORT, COM1_SIZE};
use crate::devices::virtio::block::{Block, BlockError, BlockHandle, DiskConfig, DiskSet};
use crate::devices::{Bus, BusError};
use crate::exit::{ExitNotifier, VmExit};
use crate::kvm::cpu::{configure_vcpu, set_boot_registers, supported_cpuid, vcpu_cpuid};
use crate::kvm::state::savable_msrs;
use crate::kvm::vcpu::{
    start_vcpus, ExitCounts, HeldPause, PauseGuard, Vcpu, VcpuControl, VcpuError,
};
use crate::kvm::{self, KvmError};
use crate::memory::{self, HugePages, MemoryError};

/// Most vCPUs a VM may have (the xAPIC id space).
pub const MAX_VCPUS: u8 = 254;

/// Where the serial console writes.
pub enum Console {
    /// The VMM's standard output.
    Stdout,
    /// A file, created or truncated.
    File(PathBuf),
    /// A file, created or appended to: a VM rolled back in the same process continues the
    /// console of the VM it replaces.
    Append(PathBuf),
    /// Any writer (tests capture the console this way).
    Writer(Box<dyn Write + Send>),
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Console::Stdout => write!(f, "Stdout"),
            Console::File(p) => write!(f, "File({})", p.display()),
            Console::Append(p) => write!(f, "Append({})", p.display()),
            Console::Writer(_) => write!(f, "Writer"),
        }
    }
}

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

/// Errors of building or controlling a VM.
#[derive(Debug, Error)]
pub enum VmError {
    /// Invalid vCPU count.
    #[error("invalid vCPU count {0}: it must be between 1 and {MAX_VCPUS}")]
    VcpuCount(u8),
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// KVM.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// Kernel loading.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// vCPU threads.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// Device placement.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// The console file cannot be created.
    #[error("cannot open console file {path}")]
    Console {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A device could not be created from its saved state.
    #[error("cannot restore a device: {0}")]
    Device(String),
    /// An eventfd for an interrupt cannot be created.
    #[error("cannot create an interrupt eventfd")]
    EventFd(#[source] std::io::Error),
    /// A disk cannot be set up.
    #[error("disk {index}")]
    Disk {
        /// Position of the disk in the configuration.
        index: usize,
        /// Cause.
        #[source]
        source: BlockError,
    },
}

/// What a VM was built from, kept for checkpoints (which record it) and status queries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSummary {
    /// Guest memory size in bytes.
    pub mem_size: u64,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Kernel image (none for a restored VM that did not boot).
    pub kernel: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: Option<String>,
}

/// A VM whose vCPUs are running.
pub struct Vm {
    summary: VmSummary,
    memory: GuestMemoryMmap,
    control: Arc<VcpuControl>,
    exit: Arc<ExitNotifier>,
    serial: Arc<Mutex<SerialConsole>>,
    msrs: Vec<u32>,
    checkpoint_lock: CheckpointLock,
    disks: DiskSet,
    // The VM fd must outlive the vCPU threads; `Drop` joins them first.
    fd: VmFd,
    _kvm: Kvm,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("vcpus", &self.control.count())
            .field("memory", &memory::ram_size(&self.memory))
            .finish()
    }
}

/// Opens the console sink.
pub(crate) fn console_writer(console: Console) -> Result<Box<dyn Write + Send>, VmError> {
    Ok(match console {
        Console::Stdout => Box::new(std::io::stdout()),
        Console::File(path) => Box::new(
            OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .open(&path)
                .map_err(|source| VmError::Console { path, source })?,
        ),
        Console::Append(path) => Box::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|source| VmError::Console { path, source })?,
        ),
        Console::Writer(w) => w,
    })
}

/// The pieces of a VM before its vCPUs run: shared by boot and restore.
pub(crate) struct VmParts {
    pub kvm: Kvm,
    pub fd: VmFd,
    pub memory: GuestMemoryMmap,
    pub exit: Arc<ExitNotifier>,
}

impl VmParts {
    /// Opens KVM, creates the VM and registers `memory` with it.
    pub fn new(memory: GuestMemoryMmap) -> Result<VmParts, VmError> {
        let kvm = kvm::open_kvm()?;
        let fd = kvm::create_vm(&kvm)?;
        kvm::register_memory(&fd, &memory)?;
        Ok(VmParts {
            kvm,
            fd,
            memory,
            exit: Arc::new(ExitNotifier::default()),
        })
    }

    /// Creates the legacy devices (serial console, debug exit) and the buses.
    pub fn devices(
        &self,
        serial: impl FnOnce(EventFd) -> Result<SerialConsole, VmError>,
    ) -> Result<(Arc<Mutex<SerialConsole>>, Bus, Bus), VmError> {
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
        self.fd
            .register_irqfd(&serial_irq, COM1_IRQ)
            .map_err(KvmError::ioctl("register serial irqfd"))?;
        let serial = Arc::new(Mutex::new(serial(serial_irq)?));
        let mut pio = Bus::default();
        pio.insert(COM1_PORT..COM1_PORT + COM1_SIZE, serial.clone())?;
        pio.insert(
            DEBUG_EXIT_PORT..DEBUG_EXIT_PORT + DEBUG_EXIT_SIZE,
            Arc::new(Mutex::new(DebugExit::new(self.exit.clone()))),
        )?;
        Ok((serial, pio, Bus::default()))
    }

    /// Creates and configures `count` vCPUs; `init` then sets each one's registers (boot entry
    /// or restored state). Returns them with the list of MSRs that can be saved.
    pub fn vcpus(
        &self,
        count: u8,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        mut init: impl FnMut(u8, &VcpuFd) -> Result<(), VmError>,
    ) -> Result<(Vec<Vcpu>, Vec<u32>), VmError> {
        let base_cpuid = supported_cpuid(&self.kvm)?;
        let mut vcpus = Vec::with_capacity(usize::from(count));
        let mut msrs = Vec::new();
        for id in 0..count {
            let vcpu_fd = self
                .fd
                .create_vcpu(u64::from(id))
                .map_err(KvmError::ioctl("create vCPU"))?;
            configure_vcpu(&vcpu_fd, &vcpu_cpuid(&base_cpuid, id, count))?;
            if id == 0 {
                msrs = savable_msrs(&self.kvm, &vcpu_fd)?;
            }
            init(id, &vcpu_fd)?;
            vcpus.push(Vcpu {
                id,
                fd: Arc::new(Mutex::new(vcpu_fd)),
                pio: pio.clone(),
                mmio: mmio.clone(),
            });
        }
        Ok((vcpus, msrs))
    }

    /// Starts the vCPU threads: the VM runs.
    pub fn start(
        self,
        summary: VmSummary,
        serial: Arc<Mutex<SerialConsole>>,
        vcpus: Vec<Vcpu>,
        msrs: Vec<u32>,
    ) -> Result<Vm, VmError> {
        let control = start_vcpus(vcpus, self.exit.clone())?;
        Ok(Vm {
            summary,
            memory: self.memory,
            control,
            exit: self.exit,
            serial,
            msrs,
            checkpoint_lock: CheckpointLock::default(),
            disks: DiskSet::default(),
            fd: self.fd,
            _kvm: self.kvm,
        })
    }
}

impl Vm {
    /// Builds the VM described by `config` and starts its vCPUs.
    pub fn boot(config: VmConfig) -> Result<Vm, VmError> {
        let span = info_span!("boot", mem = config.mem_size, vcpus = config.vcpus);
        let _enter = span.enter();
        if config.vcpus == 0 || config.vcpus > MAX_VCPUS {
            return Err(VmError::VcpuCount(config.vcpus));
        }
        memory::validate_size(config.mem_size)?;
        let parts = VmParts::new(memory::create_guest_memory(
            config.mem_size,
            config.hugepages,
        )?)?;
        // Disks: images are opened before anything runs; each disk adds its
        // `virtio_mmio.device=` word to the command line.
        let blocks = DiskSet::open(&config.disks, &parts.memory)
            .map_err(|(index, source)| VmError::Disk { index, source })?;
        let cmdline = DiskSet::cmdline(&config.cmdline, &blocks);
        let entry = boot::load_kernel(
            &parts.memory,
            config.mem_size,
            &BootSpec {
                kernel: &config.kernel,
                initrd: config.initrd.as_deref(),
                cmdline: &cmdline,
            },
        )?;
        let out = console_writer(config.console)?;
        let (serial, pio, mut mmio) = parts.devices(|irq| Ok(SerialConsole::new(irq, out)))?;
        DiskSet::attach(&blocks, &parts.fd, &mut mmio)
            .map_err(|source| VmError::Disk { index: 0, source })?;
        let mmio = Arc::new(mmio);
        let (vcpus, msrs) = parts.vcpus(config.vcpus, Arc::new(pio), mmio.clone(), |id, fd| {
            if id == 0 {
                set_boot_registers(fd, entry)?;
            }
            Ok(())
        })?;
        let summary = VmSummary {
            mem_size: config.mem_size,
            vcpus: config.vcpus,
            kernel: Some(config.kernel.clone()),
            cmdline: Some(config.cmdline.clone()),
        };
        let mut vm = parts.start(summary, serial, vcpus, msrs)?;
        vm.start_disks(blocks, mmio)?;
        info!(kernel = %config.kernel.display(), disks = config.disks.len(), "VM started");
        Ok(vm)
    }

    /// Starts the device thread of the disks (once the vCPUs exist).
    pub(crate) fn start_disks(
        &mut self,
        blocks: Vec<Block>,
        mmio: Arc<Bus>,
    ) -> Result<(), VmError> {
        self.disks = DiskSet::start(blocks, &self.memory, mmio)
            .map_err(|source| VmError::Disk { index: 0, source })?;
        Ok(())
    }

    /// What the VM was built from.
    pub fn summary(&self) -> &VmSummary {
        &self.summary
    }

    /// The KVM VM (for saving its state while paused).
    pub(crate) fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// MSRs saved with each vCPU.
    pub(crate) fn msr_indices(&self) -> &[u32] {
        &self.msrs
    }

    /// Serialises this VM's checkpoints.
    pub(crate) fn checkpoint_lock(&self) -> &CheckpointLock {
        &self.checkpoint_lock
    }

    /// The serial console.
    pub(crate) fn serial(&self) -> &Arc<Mutex<SerialConsole>> {
        &self.serial
    }

    /// The virtio-blk disks, in configuration order.
    pub fn disks(&self) -> &[BlockHandle] {
        self.disks.handles()
    }

    /// The MMIO bus as the vCPUs see it (tests drive devices through it).
    pub fn mmio_bus(&self) -> Option<&Bus> {
        self.disks.mmio()
    }

    /// Guest memory. While the VM runs, vCPUs write it concurrently.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// Stops every vCPU; they resume when the guard is dropped.
    pub fn pause(&self) -> Result<PauseGuard<'_>, VmError> {
        Ok(self.control.pause()?)
    }

    /// Stops every vCPU until the returned pause is dropped: for a controller whose pause
    /// spans requests (the API's `PATCH /vm`). Like [`pause`](Self::pause), it fails while
    /// another pause (a checkpoint's) is in force.
    pub fn pause_held(&self) -> Result<HeldPause, VmError> {
        Ok(self.control.pause_held()?)
    }

    /// Whether the VM is paused.
    pub fn is_paused(&self) -> bool {
        self.control.is_paused()
    }

    /// Exits of the vCPUs to the VMM so far, by reason.
    pub fn exit_counts(&self) -> ExitCounts {
        self.control.exits()
    }

    /// Number of vCPUs.
    pub fn vcpu_count(&self) -> usize {
        self.control.count()
    }

    /// The exit, if the VM has stopped.
    pub fn exit_status(&self) -> Option<VmExit> {
        self.exit.get()
    }

    /// Waits up to `timeout` for the VM to exit.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<VmExit> {
        self.exit.wait_timeout(timeout)
    }

    /// Runs until the guest exits, then stops the vCPU threads and flushes the console.
    pub fn wait(self) -> VmExit {
        self.exit.wait()
    }

    /// Stops the VM from the VMM side. The vCPUs run on until the VM is dropped (a checkpoint
    /// in progress can still pause them).
    pub fn stop(&self) {
        self.exit.notify(VmExit::Stopped);
    }

    /// Stops the VM and makes every vCPU thread leave its run loop now, even one parked by a
    /// pause: a VM replaced by a rollback is paused, then retired, and must not run again when
    /// that pause is dropped, whoever still holds a reference to it.
    pub fn retire(&self) {
        self.stop();
        self.control.request_exit();
    }

    /// Writes the console's partial line, if any, to its output (so that the console of a VM
    /// that replaces this one continues after it).
    pub fn flush_console(&self) -> std::io::Result<()> {
        self.serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .flush()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.exit.notify(VmExit::Stopped);
        self.control.request_exit();
        self.control.join();
        self.disks.stop();
        if let Err(e) = self.flush_console() {
            tracing::warn!("console flush failed: {e}");
        }
    }
}
