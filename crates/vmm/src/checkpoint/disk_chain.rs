//! Operations on a running disk's chain of images, built from the block device's primitives
//! (switch to a new top, wait for the older images, rebase the running top) and from
//! `disk` operations on files the device no longer writes.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use disk::{Format, Image};
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
