//! cowvm's virtual machine monitor: KVM set-up, guest memory, boot protocols, devices, vCPU
//! threads and their pause/resume control, and the live checkpoint and its restore.
//!
//! The face of the crate is [`Vm`]: [`Vm::boot`] from a [`VmConfig`], [`Vm::restore`] from a
//! checkpoint store, [`Vm::checkpoint`] with a [`CheckpointRequest`], pause and resume. Its
//! errors tell their [`ErrorKind`]. The module tree is private; [`testing`] re-exports the
//! internals that the integration tests drive directly.

mod boot;
mod builder;
mod checkpoint;
mod devices;
mod error;
mod exit;
mod kvm;
mod memory;
mod migration;
mod page_service;
mod persist;
mod sched;
mod vm;

pub use builder::{Console, MachineState, VmError, VmSummary, MAX_VCPUS};
pub use checkpoint::dirty::DirtyLogRefusal;
pub use checkpoint::disk_chain::{commit_and_rebase, ChainError, CommitReport, LayerMerge};
pub use checkpoint::restore::{RestoreError, RestoreOptions, RestoreStats, Standby};
pub use checkpoint::{
    CheckpointError, CheckpointRequest, ParentSpec, PauseProbe, Phase, Progress, Refusal, StoreSpec,
};
pub use devices::virtio::block::{BlockError, BlockHandle, DiskConfig, ImageInfo};
pub use error::ErrorKind;
pub use exit::VmExit;
pub use kvm::vcpu::{ExitCounts, HeldPause, PauseGuard, VcpuError};
pub use memory::{HugePages, MemSize};
pub use migration::{
    FrameKind, MigrateOptions, MigrationError, MigrationMode, MigrationReport, ReceiveOptions,
    TlsError, TlsServer, WireError,
};
pub use page_service::{PageServiceError, PageServiceStats, SharedImage, SharedImageError};
pub use vm::{Vm, VmConfig};

/// Internals the integration tests drive directly (boot protocols, buses, the virtio
/// transport, guest memory layout). Not a stable interface.
#[doc(hidden)]
pub mod testing {
    pub use crate::boot::{
        elf_notes, linux, load_kernel, pvh, ram_map, BootError, BootSpec, CMDLINE_MAX, E820_RAM,
    };
    pub use crate::devices::virtio::block::{
        BlockState, DiskArgs, DiskError, DiskSet, RequestKind,
    };
    pub use crate::devices::virtio::mmio::{reg, status};
    pub use crate::devices::virtio::{mmio_base, DmaObserver};
    pub use crate::devices::Bus;
    pub use crate::kvm::cpu::{set_boot_registers, BootEntry};
    pub use crate::memory::{create_guest_memory, MMIO_HOLE_END, MMIO_HOLE_START};
    pub use crate::persist::Persist;
}
