//! Deleting a checkpoint (`DELETE /checkpoints`, `cowvm checkpoint delete`, and the periodic
//! trigger's `--keep`): the store goes, then the VM merges away the disk layers that no
//! retained checkpoint needs any more.
//!
//! The order is what keeps every retained checkpoint restorable after a kill -9 at any
//! instant: the checkpoint's completion marker is removed first, so a checkpoint is never
//! complete while a layer it names is being merged away; a layer is deleted only after the
//! layer above it has taken over its clusters and names the layer below as its backing file.

use std::path::PathBuf;

use ckpt_format::{Checkpoint, DirStore, Store, StoreAddress};
use tracing::{info, warn};
use vmm::LayerMerge;

use super::{lock, ControlError, Controller};

/// The disk files the manifest of the checkpoint in `store` names.
fn manifest_disks(store: &dyn Store, address: &StoreAddress) -> Result<Vec<PathBuf>, ControlError> {
    let checkpoint = Checkpoint::open(store).map_err(|source| ControlError::NotACheckpoint {
        store: address.to_string(),
        source,
    })?;
    Ok(checkpoint
        .manifest()
        .vm
        .disks
        .iter()
        .map(|d| d.path.clone())
        .collect())
}

impl Controller {
    /// Deletes the complete checkpoint at `address` (a directory, or a RAM checkpoint of this
    /// process) and merges away the disk layers of the current VM that no retained checkpoint
    /// needs any more. Returns the merges done.
    pub fn delete_checkpoint(
        &self,
        address: &StoreAddress,
    ) -> Result<Vec<LayerMerge>, ControlError> {
        let disks = match address {
            StoreAddress::Dir(dir) => {
                let store = DirStore::new(dir);
                let disks = manifest_disks(&store, address)?;
                let failed = |source| ControlError::Delete {
                    store: address.to_string(),
                    source,
                };
                // A `copy-commit` checkpoint's disk copies live in its directory.
                let own_dir = std::fs::canonicalize(dir).ok();
                store.delete().map_err(failed)?;
                for disk in disks.iter().filter(|d| d.parent() == own_dir.as_deref()) {
                    if let Err(e) = std::fs::remove_file(disk) {
                        warn!("cannot remove {}: {e}", disk.display());
                    }
                }
                store.remove_if_empty().map_err(failed)?;
                disks
            }
            StoreAddress::Mem(name) => {
                let mut stores = lock(&self.mem_stores);
                let store = stores
                    .get(name)
                    .ok_or_else(|| ControlError::NoMemStore(address.clone()))?;
                // A checkpoint in progress or a rollback reads it.
                if std::sync::Arc::strong_count(store) > 1 {
                    return Err(ControlError::StoreBusy(address.clone()));
                }
                let disks = manifest_disks(store.as_ref(), address)?;
                stores.remove(name);
                disks
            }
            StoreAddress::Raw(_) | StoreAddress::S3 { .. } => {
                return Err(ControlError::NotDeletable(address.clone()))
            }
        };
        info!(%address, "checkpoint deleted");
        self.vm()
            .release_checkpoint_disks(&disks)
            .map_err(ControlError::Merge)
    }
}
