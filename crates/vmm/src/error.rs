//! The kind of a failure, for callers that answer for it.

/// What kind of failure an error is, for callers that answer for it (the API's status code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request or what it names (a store, a checkpoint, an option) is unusable.
    InvalidInput,
    /// The target already holds a complete checkpoint.
    AlreadyExists,
    /// The request conflicts with the VM's state (another checkpoint, a pause, exiting).
    Conflict,
    /// The guest has ended.
    VmExited,
    /// A failure of the VMM or the host (including a full store).
    Internal,
}
