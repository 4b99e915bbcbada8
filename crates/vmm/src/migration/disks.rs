//! Disks without shared storage (`copy_disks`): every layer of each disk's chain is streamed to
//! the destination, which runs the VM on a COW file of its own over its copy.
//!
//! Layers below a disk's top never change, but the top is being written. So, once the
//! destination is ready and before any memory moves, the source switches each disk to a fresh
//! COW file while the guest runs (no pause: requests in flight finish on the old top, new ones go
//! to the COW file, as when a commit moves a running disk to a new top), waits until the writes
//! issued before the switch have landed, and streams the now frozen chain, bottom first, while
//! the guest runs. In the pause it switches again (as for shared storage) and sends only the
//! layer written since the first switch, which holds only what the guest wrote during the
//! pre-copy. After a failure before the hand-over the VM runs on from its new COW file, like
//! after a checkpoint; after the hand-over the source keeps its chain as it was at the pause.
//!
//! A layer travels as a [`Kind::DiskLayer`] frame (disk, layer from the bottom, format, length)
//! followed by [`Kind::DiskData`] frames of at most [`CHUNK`] bytes each (all-zero chunks are
//! skipped: the copy starts as a sparse file of the layer's length).
//!
//! The destination trusts no path the source names: it writes the layers into a directory it
//! makes under its `disk_dir`, under names of its own (`disk0-layer2.qcow2`), and rewrites the
//! backing-file reference of each qcow2 layer to name its copy of the layer below it (the
//! bottom layer names none). Raw layers are copied as they are. Until the source says `Go` the
//! directory is removed if anything fails; after it, it is the VM's.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use ckpt_format::DiskFormat;
use disk::Format;
use tracing::{info, warn};

use super::send::Conn;
use super::wire::{Kind, WireError};
use super::MigrationError;
use crate::checkpoint::disk_chain::ChainLayers;
use crate::checkpoint::{disk_cow, CheckpointError};
use crate::devices::virtio::block::BlockHandle;

/// The most bytes of a layer one frame carries.
pub(super) const CHUNK: usize = 4 << 20;
/// The most disks a VM with copied disks may have.
const MAX_DISKS: usize = 64;

/// The start of a layer on the wire.
#[derive(serde::Serialize, serde::Deserialize)]
struct LayerStart {
    disk: usize,
    /// Its place in the chain, from the bottom (0).
    layer: usize,
    /// `raw` or `qcow2`.
    format: String,
    /// Its length in bytes.
    len: u64,
}

fn format_name(format: DiskFormat) -> Format {
    match format {
        DiskFormat::Raw => Format::Raw,
        DiskFormat::Qcow2 => Format::Qcow2,
    }
}

/// The source's side: what it has sent of each disk.
pub(super) struct Outgoing {
    /// Per disk: the layers sent, and the COW file it switched to before sending them.
    disks: Vec<(usize, PathBuf)>,
    /// Bytes of disk layers sent.
    pub bytes: u64,
}

impl Outgoing {
    /// While the guest runs: switches each disk to a new COW file (named with `tag`), waits for
    /// the writes issued before, and streams every layer below it.
    pub(super) fn send_frozen(
        conn: &mut Conn,
        disks: &[BlockHandle],
        layers: &mut ChainLayers,
        tag: &str,
    ) -> Result<Outgoing, MigrationError> {
        let mut preps = disk_cow::prepare_disks(disks, tag)?;
        let switched = disk_cow::switch_disks(disks, &mut preps);
        disk_cow::record_layers(&preps, layers);
        switched?;
        disk_cow::wait_parents(disks)?;
        let mut out = Outgoing {
            disks: Vec::new(),
            bytes: 0,
        };
        for (index, handle) in disks.iter().enumerate() {
            let info = handle
                .image_info()
                .map_err(|source| CheckpointError::Disk { index, source })?;
            // Top first: the COW file just switched to, then the frozen layers.
            let below = info.chain.get(1..).unwrap_or_default();
            for (layer, entry) in below.iter().rev().enumerate() {
                out.bytes += send_layer(conn, index, layer, &entry.path, entry.format)?;
            }
            out.disks.push((below.len(), canonical(&info.path)));
        }
        conn.flush()?;
        info!(bytes = out.bytes, "disk layers sent while the guest runs");
        Ok(out)
    }

    /// In the pause, after the second switch: sends each disk's frozen top, `frozen[i]`, which
    /// must be the COW file [`Self::send_frozen`] switched to. Returns the bytes sent.
    pub(super) fn send_last(
        &mut self,
        conn: &mut Conn,
        frozen: &[ckpt_format::DiskConfig],
    ) -> Result<u64, MigrationError> {
        if frozen.len() != self.disks.len() {
            return Err(MigrationError::DiskChanged(
                self.disks.len().min(frozen.len()),
            ));
        }
        let mut bytes = 0;
        for (index, (d, (sent, expected))) in frozen.iter().zip(&self.disks).enumerate() {
            if canonical(&d.path) != *expected {
                return Err(MigrationError::DiskChanged(index));
            }
            bytes += send_layer(conn, index, *sent, &d.path, format_name(d.format))?;
        }
        self.bytes += bytes;
        Ok(bytes)
    }
}

fn canonical(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned())
}

/// Streams the file at `path` as layer `layer` of disk `disk`. Returns the bytes of data sent.
fn send_layer(
    conn: &mut Conn,
    disk: usize,
    layer: usize,
    path: &Path,
    format: Format,
) -> Result<u64, MigrationError> {
    let read_err = |source| MigrationError::DiskRead {
        index: disk,
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(read_err)?;
    let len = file.metadata().map_err(read_err)?.len();
    let start = LayerStart {
        disk,
        layer,
        format: format.as_str().to_owned(),
        len,
    };
    let start = serde_json::to_vec(&start).expect("a layer start serializes");
    conn.send(Kind::DiskLayer, &[&start])?;
    let mut buf = vec![0u8; CHUNK];
    let mut sent = 0;
    let mut offset = 0;
    while offset < len {
        let n = CHUNK.min((len - offset) as usize);
        file.read_exact_at(&mut buf[..n], offset)
            .map_err(read_err)?;
        if buf[..n].iter().any(|&b| b != 0) {
            conn.send(
                Kind::DiskData,
                &[
                    &(disk as u32).to_le_bytes(),
                    &(layer as u32).to_le_bytes(),
                    &offset.to_le_bytes(),
                    &buf[..n],
                ],
            )?;
            sent += n as u64;
        }
        offset += n as u64;
    }
    info!(disk, layer, len, sent, path = %path.display(), "disk layer sent");
    Ok(sent)
}

/// A layer being written.
struct OpenLayer {
    disk: usize,
    layer: usize,
    path: PathBuf,
    format: Format,
    file: File,
    len: u64,
    /// Data may not go below this offset (chunks arrive in order).
    next: u64,
}

/// The destination's side: the copies written so far, removed on drop unless kept.
pub(super) struct Incoming {
    dir: PathBuf,
    /// Per disk: its complete layers, bottom first.
    layers: Vec<Vec<(PathBuf, Format)>>,
    open: Option<OpenLayer>,
    keep: bool,
}

impl Incoming {
    /// Makes a new directory for the copies under `disk_dir`.
    pub(super) fn new(disk_dir: &Path) -> Result<Incoming, MigrationError> {
        let micros = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros());
        let dir = disk_dir.join(format!("migrated-{micros}-{}", std::process::id()));
        std::fs::create_dir(&dir).map_err(|source| MigrationError::DiskWrite {
            path: dir.clone(),
            source,
        })?;
        let dir = canonical(&dir);
        info!(dir = %dir.display(), "the disks' copies go here");
        Ok(Incoming {
            dir,
            layers: Vec::new(),
            open: None,
            keep: false,
        })
    }

    /// A [`Kind::DiskLayer`] frame: completes the layer before and starts a new file.
    pub(super) fn start(&mut self, payload: &[u8]) -> Result<(), MigrationError> {
        self.finish()?;
        let bad = |why: &str| WireError::malformed(Kind::DiskLayer, why);
        let start: LayerStart = serde_json::from_slice(payload).map_err(|e| bad(&e.to_string()))?;
        let format: Format = start.format.parse().map_err(|e: String| bad(&e))?;
        if start.disk >= MAX_DISKS {
            return Err(bad("a disk index beyond the most disks a VM has").into());
        }
        if self.layers.len() <= start.disk {
            self.layers.resize_with(start.disk + 1, Vec::new);
        }
        let have = self.layers[start.disk].len();
        if start.layer != have {
            return Err(bad("a layer out of order").into());
        }
        if have >= disk::MAX_CHAIN_DEPTH {
            return Err(bad("a chain deeper than any image opens").into());
        }
        if format == Format::Raw && have > 0 {
            return Err(bad("a raw layer above another layer").into());
        }
        let path = self.dir.join(format!(
            "disk{}-layer{}.{}",
            start.disk,
            start.layer,
            format.as_str()
        ));
        let write_err = |source| MigrationError::DiskWrite {
            path: path.clone(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(write_err)?;
        file.set_len(start.len).map_err(write_err)?;
        self.open = Some(OpenLayer {
            disk: start.disk,
            layer: start.layer,
            path,
            format,
            file,
            len: start.len,
            next: 0,
        });
        Ok(())
    }

    /// A [`Kind::DiskData`] frame: bytes of the layer being written.
    pub(super) fn data(&mut self, payload: &[u8]) -> Result<(), MigrationError> {
        let bad = |why: &str| WireError::malformed(Kind::DiskData, why);
        let open = self
            .open
            .as_mut()
            .ok_or_else(|| bad("data outside a layer"))?;
        if payload.len() < 16 {
            return Err(bad("shorter than its header").into());
        }
        let disk = u32::from_le_bytes(payload[..4].try_into().expect("4 bytes")) as usize;
        let layer = u32::from_le_bytes(payload[4..8].try_into().expect("4 bytes")) as usize;
        let offset = u64::from_le_bytes(payload[8..16].try_into().expect("8 bytes"));
        let data = &payload[16..];
        if (disk, layer) != (open.disk, open.layer) {
            return Err(bad("data of another layer").into());
        }
        if offset < open.next
            || offset
                .checked_add(data.len() as u64)
                .is_none_or(|end| end > open.len)
        {
            return Err(bad("data out of order or beyond the layer's length").into());
        }
        open.file
            .write_all_at(data, offset)
            .map_err(|source| MigrationError::DiskWrite {
                path: open.path.clone(),
                source,
            })?;
        open.next = offset + data.len() as u64;
        Ok(())
    }

    /// Completes the layer being written: a qcow2 layer is made to name the copy of the layer
    /// below it (or no backing file at the bottom), a raw one is synced.
    fn finish(&mut self) -> Result<(), MigrationError> {
        let Some(open) = self.open.take() else {
            return Ok(());
        };
        let below = self.layers[open.disk].last();
        match open.format {
            Format::Qcow2 => {
                let parent = below.map(|(p, f)| {
                    (
                        Path::new(p.file_name().expect("copies have file names")),
                        *f,
                    )
                });
                disk::set_backing_file(&open.path, parent, &disk::PathPolicy::same_dir()).map_err(
                    |source| MigrationError::DiskCopy {
                        path: open.path.clone(),
                        source,
                    },
                )?;
            }
            Format::Raw => {
                open.file
                    .sync_all()
                    .map_err(|source| MigrationError::DiskWrite {
                        path: open.path.clone(),
                        source,
                    })?;
            }
        }
        self.layers[open.disk].push((open.path, open.format));
        Ok(())
    }

    /// At the switchover: each disk's top copy, configured as the source's disk `disks[i]`
    /// (whose path is not used), and the directory that holds them.
    pub(super) fn tops(
        &mut self,
        disks: &[ckpt_format::DiskConfig],
    ) -> Result<(Vec<ckpt_format::DiskConfig>, PathBuf), MigrationError> {
        self.finish()?;
        if self.layers.len() > disks.len() {
            return Err(
                WireError::malformed(Kind::DiskLayer, "layers of a disk the VM lacks").into(),
            );
        }
        let tops = disks
            .iter()
            .enumerate()
            .map(|(index, d)| {
                let (path, format) = self
                    .layers
                    .get(index)
                    .and_then(|l| l.last())
                    .ok_or(MigrationError::DiskMissing(index))?;
                Ok(ckpt_format::DiskConfig {
                    id: format!("disk{index}"),
                    path: path.clone(),
                    format: match format {
                        Format::Raw => DiskFormat::Raw,
                        Format::Qcow2 => DiskFormat::Qcow2,
                    },
                    readonly: d.readonly,
                })
            })
            .collect::<Result<_, MigrationError>>()?;
        Ok((tops, self.dir.clone()))
    }

    /// The VM is ours: its disks stay whatever happens next.
    pub(super) fn keep(&mut self) {
        self.keep = true;
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        self.open = None;
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            warn!(dir = %self.dir.display(), "cannot remove the disks' copies of a VM not received: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(disk: usize, layer: usize, format: &str, len: u64) -> Vec<u8> {
        serde_json::to_vec(&LayerStart {
            disk,
            layer,
            format: format.into(),
            len,
        })
        .unwrap()
    }

    fn data(disk: u32, layer: u32, offset: u64, bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&disk.to_le_bytes());
        out.extend_from_slice(&layer.to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
        out.extend_from_slice(bytes);
        out
    }

    fn source_disk(readonly: bool) -> ckpt_format::DiskConfig {
        ckpt_format::DiskConfig {
            id: "disk0".into(),
            path: "/elsewhere/disk.qcow2".into(),
            format: DiskFormat::Qcow2,
            readonly,
        }
    }

    #[test]
    fn copies_are_checked_named_here_and_removed_unless_kept() {
        let root = tempfile::tempdir().unwrap();
        let mut incoming = Incoming::new(root.path()).unwrap();
        let dir = incoming.dir.clone();
        assert!(
            incoming.start(&start(0, 1, "raw", 4096)).is_err(),
            "out of order"
        );
        assert!(incoming.start(&start(0, 0, "vmdk", 4096)).is_err());
        assert!(incoming.start(&start(MAX_DISKS, 0, "raw", 4096)).is_err());
        incoming.start(&start(0, 0, "raw", 8192)).unwrap();
        incoming.data(&data(0, 0, 4096, &[1; 4096])).unwrap();
        assert!(
            incoming.data(&data(0, 0, 0, &[1; 16])).is_err(),
            "backwards"
        );
        assert!(incoming.data(&data(0, 0, 8192, &[1])).is_err(), "beyond");
        assert!(
            incoming.data(&data(1, 0, 8192, &[1])).is_err(),
            "another disk"
        );
        assert!(incoming.data(&[0; 15]).is_err());
        assert!(
            incoming.start(&start(0, 1, "raw", 4096)).is_err(),
            "raw above"
        );
        let two = [source_disk(false), source_disk(true)];
        assert!(matches!(
            incoming.tops(&two),
            Err(MigrationError::DiskMissing(1))
        ));
        let (tops, at) = incoming.tops(&two[1..]).unwrap();
        assert_eq!(at, dir);
        assert_eq!(tops[0].path, dir.join("disk0-layer0.raw"));
        assert_eq!(tops[0].format, DiskFormat::Raw);
        assert!(tops[0].readonly);
        let bytes = std::fs::read(&tops[0].path).unwrap();
        assert_eq!((bytes.len(), bytes[4095], bytes[4096]), (8192, 0, 1));
        drop(incoming);
        assert!(!dir.exists(), "a VM not received leaves no copy");

        let mut incoming = Incoming::new(root.path()).unwrap();
        let dir = incoming.dir.clone();
        incoming.start(&start(0, 0, "raw", 512)).unwrap();
        incoming.keep();
        drop(incoming);
        assert!(
            dir.join("disk0-layer0.raw").exists(),
            "a received VM keeps its disks"
        );
    }
}
