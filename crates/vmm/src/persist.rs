//! The save/restore contract of every part of the machine that has state: the VM-wide KVM
//! state, each vCPU, the devices (their states together make the machine's state, which a
//! checkpoint carries).
//!
//! `save` returns plain data; `restore` builds a new object from saved state, which is untrusted
//! input and is validated. There is no default body: a part that forgets to save does not
//! compile.

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
