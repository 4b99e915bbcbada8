//! The device state a checkpoint carries, as plain data: every vCPU, the VM-wide KVM state and
//! the emulated devices. Encoded as CBOR into the checkpoint's `state` section.

use serde::{Deserialize, Serialize};

use crate::devices::serial::SerialSnapshot;
use crate::devices::virtio::block::BlockState;
use crate::kvm::state::{VcpuState, VmState};

/// Everything but memory and disks, captured in the pause.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmSnapshot {
    /// In-kernel irqchip, PIT and KVM clock.
    pub vm: VmState,
    /// Each vCPU, in id order.
    pub vcpus: Vec<VcpuState>,
    /// COM1.
    pub serial: SerialSnapshot,
    /// The virtio-blk devices, in device order, with the requests in flight at the instant.
    #[serde(default)]
    pub disks: Vec<BlockState>,
}
