//! The disk side of a live checkpoint (design.md §2 steps 1, 5 and 8; M1, M5–M7, M12, M15).
//!
//! - While the VM runs, each disk gets a new qcow2 COW file over the image it uses now
//!   ([`prepare_disks`]).
//! - In the pause the devices are frozen (they complete nothing to the guest, so the saved
//!   in-flight list and guest memory agree), drained first under the `drain` policy, and each
//!   disk is switched to its COW file ([`switch_disks`]). Writes already in flight finish into
//!   the parent: they were issued before the checkpoint instant, so they belong to the
//!   checkpoint's disk (and restore re-issues them anyway); new writes go to the COW file only.
//! - After the resume ([`finish_disks`]) the checkpoint waits until those writes have landed,
//!   so its disk no longer changes. With `keep`, the parent is the checkpoint's disk and the VM
//!   stays on the COW file. With `copy-commit`, the parent is copied for the checkpoint, then
//!   the COW file is committed back into the parent while the VM runs on a further COW file,
//!   so chains do not grow with every checkpoint.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ckpt_format::{DiskConfig, DiskFormat, DiskPolicy, IoPolicy};
use disk::{Format, Image};
use tracing::info;

use super::disk_chain::{commit_and_rebase, ChainLayers};
use super::{CheckpointError, Refusal};
use crate::devices::virtio::block::{BlockHandle, BlockState};

/// How long the pause may wait for disk I/O under the `drain` policy, and the write-out for
/// writes still in flight against a parent.
const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// One disk's new COW file, ready to be switched to.
pub(crate) struct DiskPrep {
    /// The image the VM used up to the checkpoint: the checkpoint's disk (`keep`).
    parent: PathBuf,
    parent_format: Format,
    /// The COW file and its open image (taken by the switch).
    overlay: PathBuf,
    image: Option<Image>,
    /// The disk's backing-file policy.
    policy: disk::PathPolicy,
}

fn disk_err(index: usize) -> impl Fn(crate::devices::virtio::block::BlockError) -> CheckpointError {
    move |source| CheckpointError::Disk { index, source }
}

fn image_err(index: usize) -> impl Fn(disk::Error) -> CheckpointError {
    move |source| CheckpointError::DiskImage { index, source }
}

/// A new file name next to `top`: `<stem>.<tag>.qcow2`.
///
/// `<stem>` is the stem of the user's image: the `.ckpt-…` and `.restore-…` parts that earlier
/// checkpoints and restores added are dropped, so a name does not grow with the number of
/// checkpoints taken (each tag is unique on its own).
pub(crate) fn overlay_path(top: &Path, tag: &str) -> PathBuf {
    let stem = top
        .file_stem()
        .map_or_else(|| "disk".into(), |s| s.to_string_lossy().into_owned());
    let mut base = stem.as_str();
    while let Some((rest, last)) = base.rsplit_once('.') {
        if rest.is_empty() || !(last.starts_with("ckpt-") || last.starts_with("restore-")) {
            break;
        }
        base = rest;
    }
    top.with_file_name(format!("{base}.{tag}.qcow2"))
}

/// Step 1, while the VM runs: a COW file over each disk's current image.
pub(crate) fn prepare_disks(
    disks: &[BlockHandle],
    tag: &str,
) -> Result<Vec<DiskPrep>, CheckpointError> {
    let mut preps = Vec::new();
    for (i, handle) in disks.iter().enumerate() {
        let info = handle.image_info().map_err(disk_err(i))?;
        let top = info
            .chain
            .first()
            .cloned()
            .ok_or(CheckpointError::NoImage(i))?;
        let overlay = overlay_path(&info.path, tag);
        disk::create_qcow2(
            &overlay,
            &disk::CreateOptions {
                backing: Some((&info.path, top.format)),
                backing_policy: info.backing_policy.clone(),
                ..disk::CreateOptions::default()
            },
        )
        .map_err(image_err(i))?;
        let image = Image::open_with(
            &overlay,
            &disk::OpenOptions {
                backing_policy: info.backing_policy.clone(),
                ..disk::OpenOptions::default()
            },
        )
        .map_err(image_err(i))?;
        preps.push(DiskPrep {
            parent: info.path,
            parent_format: top.format,
            overlay,
            image: Some(image),
            policy: info.backing_policy,
        });
    }
    Ok(preps)
}

impl DiskPrep {
    /// The COW file made for the VM to continue on.
    pub(crate) fn overlay(&self) -> &Path {
        &self.overlay
    }

    /// The layer the VM used up to the switch (frozen from then on), as disk `index` of a
    /// manifest or a migration names it.
    pub(crate) fn frozen_layer(&self, index: usize, readonly: bool) -> DiskConfig {
        DiskConfig {
            id: format!("disk{index}"),
            path: std::fs::canonicalize(&self.parent).unwrap_or_else(|_| self.parent.clone()),
            format: format_of(self.parent_format),
            readonly,
        }
    }
}

/// After the switch: waits until the writes issued before it have landed in the frozen layers.
pub(crate) fn wait_parents(handles: &[BlockHandle]) -> Result<(), CheckpointError> {
    for (i, h) in handles.iter().enumerate() {
        h.wait_older_images(IO_TIMEOUT).map_err(disk_err(i))?;
    }
    Ok(())
}

/// A COW file that was never switched to (the checkpoint failed before its pause ended) is
/// removed, so a failed checkpoint leaves no file behind next to the disk.
impl Drop for DiskPrep {
    fn drop(&mut self) {
        if self.image.take().is_some() {
            if let Err(e) = std::fs::remove_file(&self.overlay) {
                tracing::warn!(path = %self.overlay.display(), "cannot remove an unused COW file: {e}");
            }
        }
    }
}

/// Disks that complete nothing to the guest until dropped.
pub(crate) struct FrozenDisks<'a> {
    handles: &'a [BlockHandle],
}

impl Drop for FrozenDisks<'_> {
    fn drop(&mut self) {
        for (i, h) in self.handles.iter().enumerate() {
            if let Err(e) = h.freeze(false) {
                tracing::error!("cannot unfreeze disk {i}: {e}");
            }
        }
    }
}

/// In the pause: with `drain`, wait until no disk request is in flight (M12); then freeze.
pub(crate) fn freeze_disks(
    handles: &[BlockHandle],
    io: IoPolicy,
) -> Result<FrozenDisks<'_>, CheckpointError> {
    if io == IoPolicy::Drain {
        for (i, h) in handles.iter().enumerate() {
            h.drain(IO_TIMEOUT).map_err(disk_err(i))?;
        }
    }
    for (i, h) in handles.iter().enumerate() {
        if let Err(e) = h.freeze(true) {
            // Thaw the ones already frozen.
            drop(FrozenDisks {
                handles: &handles[..i],
            });
            return Err(disk_err(i)(e));
        }
    }
    Ok(FrozenDisks { handles })
}

/// Step 5, in the pause: new requests go to the COW files from now on.
pub(crate) fn switch_disks(
    disks: &[BlockHandle],
    preps: &mut [DiskPrep],
) -> Result<(), CheckpointError> {
    for (i, (h, prep)) in disks.iter().zip(preps.iter_mut()).enumerate() {
        let image = prep.image.take().expect("switched once");
        h.switch_image(image).map_err(disk_err(i))?;
    }
    Ok(())
}

/// After the switch: the COW files switched to are layers the VM made.
pub(crate) fn record_layers(preps: &[DiskPrep], layers: &mut ChainLayers) {
    for prep in preps.iter().filter(|p| p.image.is_none()) {
        layers.made(&prep.overlay);
    }
}

fn format_of(format: Format) -> DiskFormat {
    match format {
        Format::Raw => DiskFormat::Raw,
        Format::Qcow2 => DiskFormat::Qcow2,
    }
}

/// Copies the whole content of the chain at `source` into a sparse raw file `dest`.
fn copy_flat(
    source: &Path,
    policy: &disk::PathPolicy,
    dest: &Path,
    index: usize,
) -> Result<(), CheckpointError> {
    const CHUNK: usize = 1 << 20;
    let opts = disk::OpenOptions {
        read_only: true,
        backing_policy: policy.clone(),
        ..disk::OpenOptions::default()
    };
    let mut image = Image::open_with(source, &opts).map_err(image_err(index))?;
    let copy_err = |source| CheckpointError::Copy {
        path: dest.to_path_buf(),
        source,
    };
    let out = File::create(dest).map_err(copy_err)?;
    let size = image.size();
    out.set_len(size).map_err(copy_err)?;
    let mut buf = vec![0u8; CHUNK];
    let mut off = 0;
    while off < size {
        let n = CHUNK.min((size - off) as usize);
        image
            .read_at(off, &mut buf[..n])
            .map_err(image_err(index))?;
        if buf[..n].iter().any(|&b| b != 0) {
            out.write_all_at(&buf[..n], off).map_err(copy_err)?;
        }
        off += n as u64;
    }
    out.sync_all().map_err(copy_err)
}

/// Step 8, while the VM runs: make each checkpoint disk final and return what the manifest
/// records for it (the file that holds the checkpoint's disk, M7).
pub(super) fn finish_disks(
    handles: &[BlockHandle],
    preps: &[DiskPrep],
    states: &[BlockState],
    policy: DiskPolicy,
    store_dir: Option<&Path>,
    tag: &str,
) -> Result<Vec<DiskConfig>, CheckpointError> {
    let mut disks = Vec::new();
    for (i, ((h, prep), state)) in handles.iter().zip(preps).zip(states).enumerate() {
        // Writes issued before the instant land in the parent (M15); after this the parent
        // no longer changes.
        h.wait_older_images(IO_TIMEOUT).map_err(disk_err(i))?;
        let (path, format) = match policy {
            DiskPolicy::CopyCommit => {
                let dir = store_dir.ok_or(Refusal::CopyCommitNeedsDirectory)?;
                let copy = dir.join(format!("disk{i}.raw"));
                copy_flat(&prep.parent, &prep.policy, &copy, i)?;
                let next = overlay_path(&prep.parent, &format!("{tag}-next"));
                let report = commit_and_rebase(h, &next, &mut |_, _| {}).map_err(disk_err(i))?;
                info!(disk = i, copy = %copy.display(), base = %report.base.display(), "checkpoint disk copied and COW file committed");
                (copy, DiskFormat::Raw)
            }
            DiskPolicy::Keep => (prep.parent.clone(), format_of(prep.parent_format)),
        };
        disks.push(DiskConfig {
            id: format!("disk{i}"),
            path: std::fs::canonicalize(&path).unwrap_or(path),
            format,
            readonly: state.disk.readonly,
        });
        info!(disk = i, overlay = %prep.overlay.display(), "VM continues on its COW file");
    }
    Ok(disks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_names_do_not_grow_with_checkpoints() {
        let mut top = PathBuf::from("/vms/disk.qcow2");
        for i in 0..1000u64 {
            top = overlay_path(&top, &format!("ckpt-{:016}", 1_700_000_000_000_000 + i));
            top = overlay_path(&top, &format!("restore-{i}-0"));
        }
        assert_eq!(top, PathBuf::from("/vms/disk.restore-999-0.qcow2"));
        let next = overlay_path(&top, "ckpt-0000000000000001-next");
        assert_eq!(
            next,
            PathBuf::from("/vms/disk.ckpt-0000000000000001-next.qcow2")
        );
        assert_eq!(
            overlay_path(Path::new("/vms/my.disk.raw"), "ckpt-1"),
            PathBuf::from("/vms/my.disk.ckpt-1.qcow2")
        );
    }
}
