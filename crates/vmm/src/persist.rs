//! The save/restore contract of every part of the machine that has state (the VM-wide KVM
//! state, each vCPU, the devices), and the one typed [`MachineState`] a checkpoint carries.
//!
//! `save` returns plain data; `restore` builds a new object from saved state, which is untrusted
//! input and is validated. There is no default body: a part that forgets to save does not
//! compile.

use serde::{Deserialize, Serialize};

use crate::devices::manager::DeviceStates;
use crate::kvm::state::{VcpuState, VmState};

/// Saving an object's state as plain data and constructing an object from such state.
pub trait Persist: Sized {
    /// The saved state.
    type State;
    /// What restoring needs besides the state (file descriptors, memory, outputs).
    type Args<'a>;
    /// Why saving or restoring failed.
    type Error;

    /// The object's state now (the caller ensures nothing changes it meanwhile).
    fn save(&self) -> Result<Self::State, Self::Error>;

    /// A new object in the saved state `state`.
    fn restore(args: Self::Args<'_>, state: &Self::State) -> Result<Self, Self::Error>;
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
