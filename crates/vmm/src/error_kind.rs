//! What kind of failure an error of the VMM's public operations is, so that a caller (the API
//! server) can answer it without matching on the variants of every module's error.

use crate::checkpoint::restore::RestoreError;
use crate::checkpoint::CheckpointError;
use crate::kvm::vcpu::VcpuError;
use crate::vm::VmError;

/// The kind of a failure, from the caller's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request names something unusable: a store that cannot hold the checkpoint, a
    /// checkpoint that is missing, incomplete, corrupt or not for this VMM.
    InvalidInput,
    /// The store already holds a complete checkpoint.
    AlreadyExists,
    /// The request conflicts with the VM's state (already paused, exiting).
    Conflict,
    /// The VM has ended.
    VmExited,
    /// A failure of the VMM or the host.
    Internal,
}

impl CheckpointError {
    /// The kind of this failure. A store's refusal (an existing checkpoint, an unusable path)
    /// is the request's fault; a full store is the host's.
    pub fn kind(&self) -> ErrorKind {
        match self {
            CheckpointError::Store { source, .. } => match source {
                ckpt_format::Error::CheckpointExists { .. } => ErrorKind::AlreadyExists,
                ckpt_format::Error::StoreFull { .. } => ErrorKind::Internal,
                _ => ErrorKind::InvalidInput,
            },
            _ => ErrorKind::Internal,
        }
    }
}

impl RestoreError {
    /// The kind of this failure: a checkpoint that cannot be used (missing, incomplete,
    /// corrupt, not for this VMM) is the request's fault, anything else the host's.
    pub fn kind(&self) -> ErrorKind {
        match self {
            RestoreError::Open { .. }
            | RestoreError::Config { .. }
            | RestoreError::State(_)
            | RestoreError::Memory(_)
            | RestoreError::Serial(_) => ErrorKind::InvalidInput,
            _ => ErrorKind::Internal,
        }
    }
}

impl VmError {
    /// The kind of this failure: a pause of a VM already paused or exiting conflicts with
    /// its state.
    pub fn kind(&self) -> ErrorKind {
        match self {
            VmError::Vcpu(VcpuError::AlreadyPaused | VcpuError::Exiting) => ErrorKind::Conflict,
            _ => ErrorKind::Internal,
        }
    }
}
