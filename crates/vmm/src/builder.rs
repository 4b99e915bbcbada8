//! Assembling a machine, the same way for a boot and a restore: guest memory, the KVM VM, the
//! device manager, the vCPUs, then the vCPU threads and the device thread. The two differ only
//! in where the state comes from ([`Start`]): a kernel's entry point and devices at reset, or a
//! checkpoint's [`MachineState`].

use std::fs::OpenOptions;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use vm_memory::GuestMemoryMmap;

use crate::boot::{self, BootError, BootSpec};
use crate::devices::manager::{DeviceArgs, DeviceError, DeviceManager, DeviceStates};
use crate::devices::virtio::block::DiskConfig;
use crate::error::ErrorKind;
use crate::exit::ExitNotifier;
use crate::kvm::cpu::{configure_vcpu, set_boot_registers, supported_cpuid, vcpu_cpuid};
use crate::kvm::state::{savable_msrs, KvmVcpu, VcpuState, VmState};
use crate::kvm::vcpu::{start_vcpus, Vcpu, VcpuControl, VcpuError};
use crate::kvm::{KvmError, KvmVm};
use crate::memory::MemoryError;
use crate::persist::Persist;

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
    /// The devices.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// The console file cannot be created.
    #[error("cannot open console file {path}")]
    Console {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

impl VmError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            VmError::Vcpu(VcpuError::AlreadyPaused | VcpuError::Exiting) => ErrorKind::Conflict,
            VmError::Device(DeviceError::Serial(_)) => ErrorKind::InvalidInput,
            _ => ErrorKind::Internal,
        }
    }
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

/// Everything but memory and disk content, captured in the pause. Encoded as CBOR into the
/// checkpoint's `state` section.
#[derive(Debug, Serialize, Deserialize)]
pub struct MachineState {
    /// In-kernel irqchip, PIT and KVM clock.
    pub vm: VmState,
    /// Each vCPU, in id order.
    pub vcpus: Vec<VcpuState>,
    /// The emulated devices.
    pub devices: DeviceStates,
}

/// Where the machine's state comes from.
pub(crate) enum Start<'a> {
    /// A fresh boot: the kernel is loaded, vCPU 0 starts at its entry, devices at reset.
    Boot(BootSpec<'a>),
    /// A checkpoint's state.
    Restore(&'a MachineState),
}

/// What both a boot and a restore provide.
pub(crate) struct Parts<'a> {
    /// What the VM is built from.
    pub summary: VmSummary,
    /// Guest memory (filled by the kernel loader, or the checkpoint's memory).
    pub memory: GuestMemoryMmap,
    /// The KVM VM over `memory`, from [`create_vm`].
    pub vm: KvmVm,
    /// Told how the VM ends (a restore's page service already holds it).
    pub exit: Arc<ExitNotifier>,
    /// The serial console's output.
    pub console: Console,
    /// The disk images, in device order.
    pub disks: &'a [DiskConfig],
    /// The vCPUs, if made ahead with [`create_vcpus`] (else they are made here).
    pub vcpus: Option<NewVcpus>,
}

/// A VM's vCPUs, created and given their CPUID but holding no state yet.
pub(crate) struct NewVcpus {
    fds: Vec<VcpuFd>,
    /// The MSRs a vCPU's state carries (the same for all).
    msrs: Arc<[u32]>,
}

/// Creates the `count` vCPUs of `vm`: a step of its own so that a VM whose state arrives
/// later (a migration's destination) makes them before it does.
pub(crate) fn create_vcpus(vm: &KvmVm, count: u8) -> Result<NewVcpus, VmError> {
    let base_cpuid = supported_cpuid(&vm.kvm)?;
    let mut fds = Vec::with_capacity(usize::from(count));
    let mut msrs: Option<Arc<[u32]>> = None;
    for id in 0..count {
        let fd = vm
            .fd
            .create_vcpu(u64::from(id))
            .map_err(KvmError::ioctl("create vCPU"))?;
        configure_vcpu(&fd, &vcpu_cpuid(&base_cpuid, id, count))?;
        if msrs.is_none() {
            msrs = Some(savable_msrs(&vm.kvm, &fd)?.into());
        }
        fds.push(fd);
    }
    let msrs = msrs.ok_or(VmError::VcpuCount(count))?;
    Ok(NewVcpus { fds, msrs })
}

/// A machine whose vCPUs and devices run.
pub(crate) struct Machine {
    pub summary: VmSummary,
    pub memory: GuestMemoryMmap,
    pub control: Arc<VcpuControl>,
    pub exit: Arc<ExitNotifier>,
    pub devices: DeviceManager,
    // The VM fd must outlive the vCPU threads; the owner joins them before dropping this.
    pub vm: KvmVm,
}

/// The KVM VM over `memory`: fresh, or with the VM-wide state of `state`. A step of its own so
/// that a restore can verify the checkpoint's page index meanwhile.
pub(crate) fn create_vm(
    memory: &GuestMemoryMmap,
    state: Option<&MachineState>,
) -> Result<KvmVm, KvmError> {
    match state {
        None => KvmVm::new(memory),
        Some(s) => KvmVm::restore(memory, &s.vm),
    }
}

/// Builds the devices and the vCPUs and starts them.
pub(crate) fn assemble(parts: Parts<'_>, start: Start<'_>) -> Result<Machine, VmError> {
    let Parts {
        summary,
        memory,
        vm,
        exit,
        console,
        disks,
        vcpus: made_vcpus,
    } = parts;
    let started = std::time::Instant::now();
    let phase = |done: &'static str| {
        tracing::debug!(done, us = started.elapsed().as_micros() as u64, "assemble")
    };
    let args = DeviceArgs {
        vm: &vm.fd,
        mem: &memory,
        exit: exit.clone(),
        console: console_writer(console)?,
        disks,
    };
    let (mut devices, entry) = match &start {
        Start::Boot(spec) => {
            let devices = DeviceManager::new(args)?;
            // Each disk adds its `virtio_mmio.device=` word to the command line.
            let cmdline = devices.cmdline(spec.cmdline);
            let spec = BootSpec {
                cmdline: &cmdline,
                ..spec.clone()
            };
            let entry = boot::load_kernel(&memory, summary.mem_size, &spec)?;
            (devices, Some(entry))
        }
        Start::Restore(state) => (DeviceManager::restore(args, &state.devices)?, None),
    };
    phase("devices");
    let made = match made_vcpus {
        Some(made) => made,
        None => create_vcpus(&vm, summary.vcpus)?,
    };
    phase("vcpus made");
    let mut vcpus = Vec::with_capacity(made.fds.len());
    for (id, fd) in (0u8..).zip(made.fds) {
        let vcpu = KvmVcpu::new(id, fd, made.msrs.clone());
        let vcpu = match (&start, entry) {
            (Start::Restore(state), _) => {
                let saved = state
                    .vcpus
                    .get(usize::from(id))
                    .ok_or(KvmError::BadState("fewer vCPU states than vCPUs"))?;
                KvmVcpu::restore(vcpu, saved)?
            }
            (Start::Boot(_), Some(entry)) if id == 0 => {
                set_boot_registers(&vcpu, entry)?;
                vcpu
            }
            (Start::Boot(_), _) => vcpu,
        };
        vcpus.push(Vcpu {
            id,
            fd: Arc::new(Mutex::new(vcpu)),
            pio: devices.pio().clone(),
            mmio: devices.mmio().clone(),
        });
    }
    phase("vcpus");
    let control = start_vcpus(vcpus, exit.clone())?;
    phase("started");
    if let Err(e) = devices.start(&memory) {
        control.request_exit();
        control.join();
        return Err(e.into());
    }
    Ok(Machine {
        summary,
        memory,
        control,
        exit,
        devices,
        vm,
    })
}

/// Opens the console sink.
fn console_writer(console: Console) -> Result<Box<dyn Write + Send>, VmError> {
    let open = |path: PathBuf, append: bool| {
        OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(&path)
            .map_err(|source| VmError::Console { path, source })
    };
    Ok(match console {
        Console::Stdout => Box::new(std::io::stdout()),
        Console::File(path) => Box::new(open(path, false)?),
        Console::Append(path) => Box::new(open(path, true)?),
        Console::Writer(w) => w,
    })
}
