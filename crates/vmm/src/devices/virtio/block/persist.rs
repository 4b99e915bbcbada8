//! Saving and restoring the virtio-blk devices of a VM. A running disk's state lives on the
//! device thread, so saving asks each disk's [`BlockHandle`](super::BlockHandle) for it;
//! restoring opens each disk anew and loads its transport and in-flight requests.

use thiserror::Error;
use vm_memory::GuestMemoryMmap;

use super::{Block, BlockError, BlockState, DiskConfig, DiskSet};
use crate::persist::Persist;

/// A failure of one disk.
#[derive(Debug, Error)]
#[error("disk {index}")]
pub struct DiskError {
    /// Position of the disk in the VM.
    pub index: usize,
    /// Cause.
    #[source]
    pub source: BlockError,
}

/// What restored disks need: the images to open (a restore gives each disk a fresh COW file,
/// so the paths may differ from the saved ones) and guest memory.
#[derive(Debug, Clone, Copy)]
pub struct DiskArgs<'a> {
    /// One per saved disk, in device order.
    pub configs: &'a [DiskConfig],
    /// Guest memory.
    pub mem: &'a GuestMemoryMmap,
}

impl Persist for DiskSet {
    type State = Vec<BlockState>;
    type Args<'a> = DiskArgs<'a>;
    type Error = DiskError;

    /// Each disk's state, in-flight requests included. For a checkpoint, call it while the
    /// disks are frozen, so that guest memory and the saved in-flight lists agree.
    fn save(&self) -> Result<Vec<BlockState>, DiskError> {
        self.handles()
            .iter()
            .enumerate()
            .map(|(index, h)| h.save().map_err(|source| DiskError { index, source }))
            .collect()
    }

    /// The state is untrusted: each transport is validated now, each in-flight request again
    /// when it is re-submitted (a bad one completes with IOERR).
    fn restore(args: DiskArgs<'_>, states: &Vec<BlockState>) -> Result<DiskSet, DiskError> {
        if args.configs.len() != states.len() {
            return Err(DiskError {
                index: args.configs.len().min(states.len()),
                source: BlockError::DiskCount {
                    configs: args.configs.len(),
                    states: states.len(),
                },
            });
        }
        let mut set = DiskSet::open(args.configs, args.mem)?;
        for (index, (block, state)) in set.pending.iter_mut().zip(states).enumerate() {
            restore_block(block, state).map_err(|source| DiskError { index, source })?;
        }
        Ok(set)
    }
}

fn restore_block(block: &mut Block, state: &BlockState) -> Result<(), BlockError> {
    block
        .transport
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .restore(&state.transport)?;
    block.restored = state.inflight.clone();
    Ok(())
}
