//! The KVM virtual machine: the VM file descriptor, its memory slots, in-kernel irqchip and PIT,
//! and the vCPUs with their x86 set-up.

pub(crate) mod cpu;
pub(crate) mod state;
pub(crate) mod vcpu;

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use thiserror::Error;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress};

/// Guest-physical address of the three pages KVM needs for the real-mode TSS on Intel hosts.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
/// Guest-physical address of the identity-map page KVM needs on Intel hosts.
const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// A KVM VM with its in-kernel irqchip and PIT, and guest memory registered.
pub(crate) struct KvmVm {
    pub(crate) fd: VmFd,
    pub(crate) kvm: Kvm,
}

impl KvmVm {
    /// Opens KVM, creates the VM and registers `memory` with it.
    pub(crate) fn new(memory: &GuestMemoryMmap) -> Result<KvmVm, KvmError> {
        let kvm = open_kvm()?;
        let fd = create_vm(&kvm)?;
        // Memory before the interrupt controllers (KVM allows either order before the first
        // vCPU): registering a slot once the in-kernel irqchip exists was measured 4-5 ms
        // slower for 4 GiB on a PVM host, most of a restored VM's time to its first instruction.
        register_memory(&fd, memory, 0)?;
        create_interrupt_controllers(&fd)?;
        Ok(KvmVm { fd, kvm })
    }

    /// Turns KVM's dirty log on for every memory slot of `memory`, which must be the memory
    /// the VM was created with. This write-protects the slots in KVM's page tables: a cost that
    /// grows with memory, paid while the VM runs.
    pub(crate) fn log_dirty_pages(&self, memory: &GuestMemoryMmap) -> Result<(), KvmError> {
        register_memory(&self.fd, memory, kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES)
    }

    /// Reads and clears the dirty log of memory slot `slot` of `len` bytes: one bit per page,
    /// set for each page written since the last read.
    pub(crate) fn take_dirty_log(&self, slot: u32, len: usize) -> Result<Vec<u64>, KvmError> {
        self.fd
            .get_dirty_log(slot, len)
            .map_err(KvmError::ioctl("get dirty log"))
    }
}

/// Errors of KVM set-up.
#[derive(Debug, Error)]
pub enum KvmError {
    /// `/dev/kvm` does not exist.
    #[error("/dev/kvm does not exist: this host has no KVM (load the kvm module or use a host with virtualization)")]
    NoKvm,
    /// `/dev/kvm` exists but cannot be opened.
    #[error("permission denied opening /dev/kvm: run as root or add the user to the kvm group")]
    KvmPermission,
    /// Opening `/dev/kvm` failed otherwise.
    #[error("cannot open /dev/kvm")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// The KVM API version is not the stable one.
    #[error("unsupported KVM API version {0} (12 is required)")]
    ApiVersion(i32),
    /// A KVM capability we depend on is missing.
    #[error("KVM lacks a required capability: {0}")]
    MissingCap(&'static str),
    /// More MSRs than one KVM call can carry.
    #[error("{0} MSRs exceed what one KVM call can carry")]
    TooManyMsrs(usize),
    /// KVM read fewer MSRs than asked.
    #[error("KVM read {read} of {wanted} MSRs")]
    MsrsIncomplete {
        /// MSRs read.
        read: usize,
        /// MSRs asked for.
        wanted: usize,
    },
    /// KVM refused to load an MSR.
    #[error("KVM refused to restore MSR {0:#x}")]
    MsrRejected(u32),
    /// Saved state that cannot be loaded.
    #[error("invalid saved vCPU or VM state: {0}")]
    BadState(&'static str),
    /// A KVM ioctl failed.
    #[error("KVM {op} failed")]
    Ioctl {
        /// What was being done.
        op: &'static str,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
}

impl KvmError {
    /// Wraps a failed ioctl with the name of the operation.
    pub(crate) fn ioctl(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmError {
        move |source| KvmError::Ioctl { op, source }
    }
}

/// Opens `/dev/kvm`, turning the common failures into precise errors.
fn open_kvm() -> Result<Kvm, KvmError> {
    let kvm = Kvm::new().map_err(|e| match e.errno() {
        libc::ENOENT => KvmError::NoKvm,
        libc::EACCES | libc::EPERM => KvmError::KvmPermission,
        _ => KvmError::OpenKvm(e),
    })?;
    let version = kvm.get_api_version();
    if version != kvm_bindings::KVM_API_VERSION as i32 {
        return Err(KvmError::ApiVersion(version));
    }
    for (cap, name) in [
        (kvm_ioctls::Cap::Irqchip, "in-kernel irqchip"),
        (kvm_ioctls::Cap::Pit2, "in-kernel PIT"),
        (kvm_ioctls::Cap::Irqfd, "irqfd"),
        (kvm_ioctls::Cap::UserMemory, "user memory"),
        (kvm_ioctls::Cap::ImmediateExit, "immediate_exit"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(KvmError::MissingCap(name));
        }
    }
    Ok(kvm)
}

/// Creates the VM with its TSS and identity-map addresses.
fn create_vm(kvm: &Kvm) -> Result<VmFd, KvmError> {
    // KVM_CREATE_VM may be interrupted by a signal (seen on PVM hosts while other VMs of the
    // same process are kicked or children exit): it then has created nothing and is retried.
    let mut attempts = 0;
    let vm = loop {
        match kvm.create_vm() {
            Err(e) if e.errno() == libc::EINTR && attempts < 100 => attempts += 1,
            other => break other.map_err(KvmError::ioctl("create VM"))?,
        }
    };
    vm.set_tss_address(KVM_TSS_ADDRESS)
        .map_err(KvmError::ioctl("set TSS address"))?;
    vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
        .map_err(KvmError::ioctl("set identity map address"))?;
    Ok(vm)
}

/// Creates the in-kernel irqchip and PIT (before any vCPU).
fn create_interrupt_controllers(vm: &VmFd) -> Result<(), KvmError> {
    vm.create_irq_chip()
        .map_err(KvmError::ioctl("create irqchip"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(KvmError::ioctl("create PIT"))
}

/// Registers every region of `mem` as a KVM memory slot (slot i = region i) with `flags`.
fn register_memory(vm: &VmFd, mem: &GuestMemoryMmap, flags: u32) -> Result<(), KvmError> {
    for (slot, region) in mem.iter().enumerate() {
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .expect("offset 0 lies in every region");
        let desc = kvm_userspace_memory_region {
            slot: slot as u32,
            flags,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        let started = std::time::Instant::now();
        // SAFETY: the host range is a live mapping owned by `mem`, which the caller keeps alive
        // for as long as the VM exists (the VM struct owns both).
        unsafe { vm.set_user_memory_region(desc) }
            .map_err(KvmError::ioctl("set user memory region"))?;
        tracing::debug!(
            slot,
            bytes = region.len(),
            us = started.elapsed().as_micros() as u64,
            "memory slot registered"
        );
    }
    Ok(())
}
