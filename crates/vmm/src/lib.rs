//! cowvm's virtual machine monitor: KVM set-up, guest memory, boot protocols, devices, vCPU
//! threads and their pause/resume control.

pub mod boot;
pub mod checkpoint;
pub mod devices;
pub mod exit;
pub mod kvm;
pub mod memory;
pub mod page_service;
pub mod vm;

pub use exit::VmExit;
pub use memory::{HugePages, MemSize};
pub use vm::{Console, Vm, VmConfig, VmError};
