//! Operations on a running disk's chain of images, built from the block device's primitives
//! (switch to a new top, wait for the older images, rebase the running top) and from
//! `disk` operations on files the device no longer writes: the commit of `copy-commit`, and
//! retention's merge of layers no retained checkpoint needs.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use disk::{Format, Image};
use thiserror::Error;
use tracing::info;

use crate::devices::virtio::block::{BlockError, BlockHandle};

/// How long the writes still in flight against the committed image may take to land.
const OLDER_IMAGES_TIMEOUT: Duration = Duration::from_secs(60);

/// What [`commit_and_rebase`] did.
#[derive(Debug, Clone)]
pub struct CommitReport {
    /// The image that was committed and deleted.
    pub committed: PathBuf,
    /// The parent it was committed into, now the backing file of the new top.
    pub base: PathBuf,
    /// The new top the VM runs on.
    pub top: PathBuf,
    /// Guest bytes written into the base.
    pub bytes: u64,
    /// Time the commit itself took (the VM kept running).
    pub commit_time: Duration,
}

/// M5, M6 on a running disk whose top T1 is a qcow2 overlay over a parent P: create `new_top`
/// (T2) over T1, switch the disk to it, wait for the writes still in flight against T1, commit
/// T1 into P (on the calling thread while the guest writes T2), rebase T2 onto P on the device
/// thread, and delete T1. `progress` is told `(done, total)` bytes of the commit.
pub fn commit_and_rebase(
    disk: &BlockHandle,
    new_top: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<CommitReport, BlockError> {
    let info = disk.image_info()?;
    let t1 = info.path;
    let (Some(top), Some(parent)) = (info.chain.first(), info.chain.get(1)) else {
        return Err(BlockError::NotCommittable(t1));
    };
    if top.format != Format::Qcow2 {
        return Err(BlockError::NotCommittable(t1));
    }
    let parent = parent.clone();
    disk::create_qcow2(
        new_top,
        &disk::CreateOptions {
            backing: Some((&t1, Format::Qcow2)),
            backing_policy: info.backing_policy.clone(),
            ..disk::CreateOptions::default()
        },
    )
    .map_err(BlockError::Image)?;
    let image = Image::open_with(
        new_top,
        &disk::OpenOptions {
            backing_policy: info.backing_policy.clone(),
            ..disk::OpenOptions::default()
        },
    )
    .map_err(BlockError::Open)?;
    disk.switch_image(image)?;
    disk.wait_older_images(OLDER_IMAGES_TIMEOUT)?;
    let start = Instant::now();
    let stats =
        disk::commit_with(&t1, &info.backing_policy, progress).map_err(BlockError::Image)?;
    let commit_time = start.elapsed();
    disk.rebase(&parent.path, Some(parent.format))?;
    std::fs::remove_file(&t1).map_err(|source| BlockError::Remove {
        path: t1.clone(),
        source,
    })?;
    info!(committed = %t1.display(), base = %parent.path.display(), bytes = stats.bytes, "commit and rebase done");
    Ok(CommitReport {
        committed: t1,
        base: parent.path,
        top: new_top.to_owned(),
        bytes: stats.bytes,
        commit_time,
    })
}

/// The layers of the VM's disk chains that this VM made (the COW files of its checkpoints, a
/// restore's COW file) and which of them a checkpoint of this VM names as its disk and still
/// retains (it has not been deleted). Paths are canonical.
#[derive(Debug, Default)]
pub(crate) struct ChainLayers {
    made: HashSet<PathBuf>,
    retained: HashMap<PathBuf, usize>,
}

fn canonical(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned())
}

impl ChainLayers {
    /// `path` is a layer this VM made: once no checkpoint needs it, it may be merged away.
    pub(crate) fn made(&mut self, path: &Path) {
        self.made.insert(canonical(path));
    }

    /// A complete checkpoint names `path` as its disk.
    pub(crate) fn retain(&mut self, path: &Path) {
        *self.retained.entry(canonical(path)).or_default() += 1;
    }

    /// A checkpoint naming `path` as its disk was deleted.
    pub(crate) fn release(&mut self, path: &Path) {
        let path = canonical(path);
        if let Some(count) = self.retained.get_mut(&path) {
            *count -= 1;
            if *count == 0 {
                self.retained.remove(&path);
            }
        }
    }

    fn is_retained(&self, path: &Path) -> bool {
        self.retained.contains_key(path)
    }

    /// Whether `path` (canonical) may be merged away: this VM made it and no retained
    /// checkpoint names it.
    fn unneeded(&self, path: &Path) -> bool {
        self.made.contains(path) && !self.is_retained(path)
    }
}

/// Errors of merging layers of a running disk's chain. The chain reads the same after any of
/// them, and every retained checkpoint keeps its disk.
#[derive(Debug, Error)]
pub enum ChainError {
    /// The check before a merge: the layer is the disk of a retained checkpoint.
    #[error("{0} is the disk of a retained checkpoint")]
    Retained(PathBuf),
    /// The disk device refused or failed.
    #[error("disk {index}")]
    Disk {
        /// Device index.
        index: usize,
        /// Cause.
        #[source]
        source: BlockError,
    },
    /// Streaming the layer into its child failed.
    #[error("cannot merge {layer} into {child}")]
    Stream {
        /// The layer merged away.
        layer: PathBuf,
        /// The layer above it.
        child: PathBuf,
        /// Cause.
        #[source]
        source: disk::Error,
    },
    /// The merged layer cannot be deleted.
    #[error("cannot remove the merged layer {path}")]
    Remove {
        /// The layer.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

impl ChainError {
    /// What kind of failure this is.
    pub fn kind(&self) -> crate::error::ErrorKind {
        match self {
            ChainError::Retained(_) => crate::error::ErrorKind::Conflict,
            _ => crate::error::ErrorKind::Internal,
        }
    }
}

/// One layer merged into the layer above it and deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerMerge {
    /// Index of the disk.
    pub disk: usize,
    /// The layer deleted.
    pub layer: PathBuf,
    /// The layer above it, which took over its clusters.
    pub into: PathBuf,
    /// Guest bytes copied into `into`.
    pub bytes: u64,
}

/// Merges away every layer of each disk's chain that the VM made and no retained checkpoint
/// needs: the layer is streamed into its child (the layer directly above it), the device
/// reopens the chain below its top (closing the layer), and the layer is deleted. A layer
/// whose child is the running top is left until a checkpoint has moved the VM to a new top:
/// the device thread alone writes the top, and the next call merges it.
pub(crate) fn merge_unneeded(
    disks: &[BlockHandle],
    layers: &mut ChainLayers,
) -> Result<Vec<LayerMerge>, ChainError> {
    let mut merges = Vec::new();
    for disk in disks {
        let err = |source| ChainError::Disk {
            index: disk.index(),
            source,
        };
        // Writes issued before the last switch may still allocate in the layer below the top
        // (after a checkpoint that failed before waiting for them): the device must be its
        // only writer before it is merged into.
        disk.wait_older_images(OLDER_IMAGES_TIMEOUT).map_err(err)?;
        loop {
            let info = disk.image_info().map_err(err)?;
            let chain: Vec<PathBuf> = info.chain.iter().map(|e| canonical(&e.path)).collect();
            // chain[0] is the running top; chain[i - 1] is the child of chain[i]; the last one
            // is the image the VM was started on (or restored from), never ours to merge.
            let found = (2..chain.len().saturating_sub(1))
                .find(|&i| info.chain[i].format == Format::Qcow2 && layers.unneeded(&chain[i]));
            let Some(i) = found else {
                break;
            };
            let (layer, child) = (&chain[i], &chain[i - 1]);
            if layers.is_retained(layer) {
                return Err(ChainError::Retained(layer.clone()));
            }
            let stats =
                disk::stream(child, &info.backing_policy).map_err(|source| ChainError::Stream {
                    layer: layer.clone(),
                    child: child.clone(),
                    source,
                })?;
            disk.rebase(&chain[1], Some(info.chain[1].format))
                .map_err(err)?;
            std::fs::remove_file(layer).map_err(|source| ChainError::Remove {
                path: layer.clone(),
                source,
            })?;
            layers.made.remove(layer);
            info!(disk = disk.index(), layer = %layer.display(), into = %child.display(), bytes = stats.bytes, "layer merged");
            merges.push(LayerMerge {
                disk: disk.index(),
                layer: layer.clone(),
                into: child.clone(),
                bytes: stats.bytes,
            });
        }
    }
    Ok(merges)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_layer_is_unneeded_once_every_checkpoint_naming_it_is_released() {
        let mut layers = ChainLayers::default();
        let a = Path::new("/nonexistent/a.qcow2");
        let user = Path::new("/nonexistent/user.qcow2");
        layers.made(a);
        layers.retain(a);
        layers.retain(a);
        layers.retain(user);
        assert!(!layers.unneeded(a));
        layers.release(a);
        assert!(!layers.unneeded(a));
        layers.release(a);
        assert!(layers.unneeded(a));
        layers.release(user);
        assert!(!layers.unneeded(user), "never made by the VM");
    }
}
