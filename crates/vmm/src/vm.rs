//! A running VM: builds memory, KVM, devices and vCPUs from a [`VmConfig`], then runs until the
//! guest exits. The VM can be paused and resumed from any thread while it runs.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvm_ioctls::{Kvm, VmFd};
use thiserror::Error;
use tracing::{info, info_span};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::boot::{self, BootError, BootSpec};
use crate::devices::debug_exit::{DebugExit, DEBUG_EXIT_PORT, DEBUG_EXIT_SIZE};
use crate::devices::serial::{SerialConsole, COM1_IRQ, COM1_PORT, COM1_SIZE};
use crate::devices::{Bus, BusError};
use crate::exit::{ExitNotifier, VmExit};
use crate::kvm::cpu::{configure_vcpu, set_boot_registers, supported_cpuid, vcpu_cpuid};
use crate::kvm::vcpu::{start_vcpus, PauseGuard, Vcpu, VcpuControl, VcpuError};
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
    /// Any writer (tests capture the console this way).
    Writer(Box<dyn Write + Send>),
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Console::Stdout => write!(f, "Stdout"),
            Console::File(p) => write!(f, "File({})", p.display()),
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
    /// An eventfd for an interrupt cannot be created.
    #[error("cannot create an interrupt eventfd")]
    EventFd(#[source] std::io::Error),
}

/// A VM whose vCPUs are running.
pub struct Vm {
    memory: GuestMemoryMmap,
    control: Arc<VcpuControl>,
    exit: Arc<ExitNotifier>,
    serial: Arc<Mutex<SerialConsole>>,
    // The VM fd must outlive the vCPU threads; `Drop` joins them first.
    _fd: VmFd,
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

fn console_writer(console: Console) -> Result<Box<dyn Write + Send>, VmError> {
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
        Console::Writer(w) => w,
    })
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
        let kvm = kvm::open_kvm()?;
        let fd = kvm::create_vm(&kvm)?;
        let memory = memory::create_guest_memory(config.mem_size, config.hugepages)?;
        kvm::register_memory(&fd, &memory)?;

        let entry = boot::load_kernel(
            &memory,
            config.mem_size,
            &BootSpec {
                kernel: &config.kernel,
                initrd: config.initrd.as_deref(),
                cmdline: &config.cmdline,
            },
        )?;

        let exit = Arc::new(ExitNotifier::default());
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
        fd.register_irqfd(&serial_irq, COM1_IRQ)
            .map_err(KvmError::ioctl("register serial irqfd"))?;
        let serial = Arc::new(Mutex::new(SerialConsole::new(
            serial_irq,
            console_writer(config.console)?,
        )));
        let mut pio = Bus::default();
        pio.insert(COM1_PORT..COM1_PORT + COM1_SIZE, serial.clone())?;
        pio.insert(
            DEBUG_EXIT_PORT..DEBUG_EXIT_PORT + DEBUG_EXIT_SIZE,
            Arc::new(Mutex::new(DebugExit::new(exit.clone()))),
        )?;
        let (pio, mmio) = (Arc::new(pio), Arc::new(Bus::default()));

        let base_cpuid = supported_cpuid(&kvm)?;
        let mut vcpus = Vec::with_capacity(usize::from(config.vcpus));
        for id in 0..config.vcpus {
            let vcpu_fd = fd
                .create_vcpu(u64::from(id))
                .map_err(KvmError::ioctl("create vCPU"))?;
            configure_vcpu(&vcpu_fd, &vcpu_cpuid(&base_cpuid, id, config.vcpus))?;
            if id == 0 {
                set_boot_registers(&vcpu_fd, entry)?;
            }
            vcpus.push(Vcpu {
                id,
                fd: Arc::new(Mutex::new(vcpu_fd)),
                pio: pio.clone(),
                mmio: mmio.clone(),
            });
        }
        let control = start_vcpus(vcpus, exit.clone())?;
        info!(kernel = %config.kernel.display(), "VM started");
        Ok(Vm {
            memory,
            control,
            exit,
            serial,
            _fd: fd,
            _kvm: kvm,
        })
    }

    /// Guest memory. While the VM runs, vCPUs write it concurrently.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// Stops every vCPU; they resume when the guard is dropped.
    pub fn pause(&self) -> Result<PauseGuard<'_>, VmError> {
        Ok(self.control.pause()?)
    }

    /// Whether the VM is paused.
    pub fn is_paused(&self) -> bool {
        self.control.is_paused()
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

    /// Stops the VM from the VMM side.
    pub fn stop(&self) {
        self.exit.notify(VmExit::Stopped);
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.exit.notify(VmExit::Stopped);
        self.control.request_exit();
        self.control.join();
        if let Err(e) = self
            .serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .flush()
        {
            tracing::warn!("console flush failed: {e}");
        }
    }
}
