//! Creating images, probing formats and reading sizes.
//!
//! Creating an overlay over a backing file that another process is writing (the COW file of a
//! live checkpoint, design.md §2.1) only reads the backing file's header or length.

use std::fs::File;
use std::path::Path;

use crate::error::{Error, Result};
use crate::header::{l1_entries_for, Header, MAX_CLUSTER_BITS, MIN_CLUSTER_BITS, QCOW2_MAGIC};
use crate::io::{file_len, read_zero_filled_at, write_all_at};
use crate::policy::{resolve_backing, PathPolicy};
use crate::qcow2::read_header;
use crate::table::{encode_table, set_refcount, Geometry};
use crate::{Format, DEFAULT_CLUSTER_BITS, MAX_CHAIN_DEPTH};

/// Options for [`create_qcow2`].
#[derive(Debug, Clone)]
pub struct CreateOptions<'a> {
    /// Virtual size; `None` takes the backing file's size (required without a backing file).
    pub size: Option<u64>,
    /// Backing file, stored as given (relative names are relative to the new image's
    /// directory, as in QEMU), and its format.
    pub backing: Option<(&'a Path, Format)>,
    /// log2 of the cluster size, 9..=21 (default 16: 64 KiB).
    pub cluster_bits: u32,
    /// Replace an existing file instead of failing with [`Error::Exists`].
    pub overwrite: bool,
    /// Where the backing file and the chain below it may live: an image whose chain
    /// [`crate::Image::open_with`] would refuse under this policy is not created.
    pub backing_policy: PathPolicy,
}

impl Default for CreateOptions<'_> {
    fn default() -> Self {
        CreateOptions {
            size: None,
            backing: None,
            cluster_bits: DEFAULT_CLUSTER_BITS,
            overwrite: false,
            backing_policy: PathPolicy::default(),
        }
    }
}

pub(crate) fn probe_file(file: &File, path: &Path) -> Result<Format> {
    let mut magic = [0u8; 4];
    read_zero_filled_at(file, path, &mut magic, 0, "probing the format")?;
    Ok(if magic == QCOW2_MAGIC {
        Format::Qcow2
    } else {
        Format::Raw
    })
}

fn open_ro(path: &Path) -> Result<File> {
    File::open(path).map_err(|source| Error::Open {
        path: path.to_owned(),
        source,
    })
}

/// The format of an image, from its magic.
pub fn probe_format(path: &Path) -> Result<Format> {
    probe_file(&open_ro(path)?, path)
}

/// The virtual size of an image, reading only its header (qcow2) or length (raw).
pub fn image_size(path: &Path, format: Format) -> Result<u64> {
    let file = open_ro(path)?;
    match format {
        Format::Raw => file_len(&file, path),
        Format::Qcow2 => Ok(read_header(&file, path)?.0.size),
    }
}

fn create_file(path: &Path, overwrite: bool) -> Result<File> {
    let mut o = std::fs::OpenOptions::new();
    o.read(true).write(true);
    if overwrite {
        o.create(true).truncate(true);
    } else {
        o.create_new(true);
    }
    o.open(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::AlreadyExists {
            Error::Exists {
                path: path.to_owned(),
            }
        } else {
            Error::Open {
                path: path.to_owned(),
                source,
            }
        }
    })
}

/// Syncs the new file and its directory entry.
fn sync_new(file: &File, path: &Path) -> Result<()> {
    file.sync_all().map_err(|e| Error::io(path, "syncing", e))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, "syncing the directory", e))
}

/// Creates a raw image of `size` bytes (sparse).
pub fn create_raw(path: &Path, size: u64, overwrite: bool) -> Result<()> {
    let file = create_file(path, overwrite)?;
    file.set_len(size)
        .map_err(|e| Error::io(path, "resizing", e))?;
    sync_new(&file, path)
}

/// Metadata layout of a new qcow2 image, in clusters: header, refcount table, refcount
/// blocks, L1 table.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Layout {
    pub(crate) reftable_clusters: u64,
    pub(crate) refblocks: u64,
    pub(crate) l1_clusters: u64,
}

impl Layout {
    pub(crate) fn new(geo: Geometry, l1_entries: u64) -> Layout {
        let cs = geo.cluster_size();
        let l1_clusters = (l1_entries * 8).div_ceil(cs);
        let (mut rt, mut rb) = (1u64, 1u64);
        loop {
            let total = 1 + rt + rb + l1_clusters;
            let need_rb = total.div_ceil(geo.refblock_entries());
            let need_rt = (need_rb * 8).div_ceil(cs);
            if need_rb == rb && need_rt == rt {
                return Layout {
                    reftable_clusters: rt,
                    refblocks: rb,
                    l1_clusters,
                };
            }
            rb = need_rb.max(rb);
            rt = need_rt.max(rt);
        }
    }

    pub(crate) fn total_clusters(&self) -> u64 {
        1 + self.reftable_clusters + self.refblocks + self.l1_clusters
    }
}

/// Checks the chain an image at `image` would have over `backing` against `policy`, reading
/// only headers (the backing file may be in use by a VM), and returns the backing file's size.
/// Below the backing file itself only refusals by the policy are errors: a missing or invalid
/// file further down is reported when the chain is opened, as before this check existed.
fn check_backing_chain(
    image: &Path,
    backing: &Path,
    format: Format,
    policy: &PathPolicy,
) -> Result<u64> {
    let mut naming = image.to_owned();
    let mut link = (backing.to_owned(), Some(format));
    let mut size = None;
    for _ in 0..MAX_CHAIN_DEPTH {
        let (path, format) = link;
        let opened = open_ro(&path).and_then(|file| {
            policy.check_opened(&naming, &path, &file)?;
            Ok(file)
        });
        let wrap = |e: Error| match e {
            refused @ Error::BackingRefused { .. } => refused,
            e => Error::OpenBacking {
                image: naming.clone(),
                backing: path.clone(),
                source: Box::new(e),
            },
        };
        let step = opened.and_then(|file| {
            let format = match format {
                Some(f) => f,
                None => probe_file(&file, &path)?,
            };
            Ok(match format {
                Format::Raw => (file_len(&file, &path)?, None),
                Format::Qcow2 => {
                    let (header, _) = read_header(&file, &path)?;
                    let next = header.backing_file.map(|b| {
                        let f = header.backing_format.and_then(|f| f.parse().ok());
                        (resolve_backing(&path, &b), f)
                    });
                    (header.size, next)
                }
            })
        });
        let (len, next) = match (step, size) {
            (Ok(step), _) => step,
            (Err(e), None) => return Err(wrap(e)),
            (Err(e @ Error::BackingRefused { .. }), Some(_)) => return Err(e),
            (Err(_), Some(size)) => return Ok(size),
        };
        let backing_size = *size.get_or_insert(len);
        match next {
            None => return Ok(backing_size),
            Some(l) => {
                naming = path;
                link = l;
            }
        }
    }
    Err(Error::ChainTooDeep {
        path: image.to_owned(),
    })
}

/// Creates a qcow2 (v3) image, optionally over a backing file. The backing file and the chain
/// below it must satisfy `opts.backing_policy`.
pub fn create_qcow2(path: &Path, opts: &CreateOptions<'_>) -> Result<()> {
    let bits = opts.cluster_bits;
    let invalid = |reason: String| Error::InvalidArgument {
        path: path.to_owned(),
        reason,
    };
    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&bits) {
        return Err(invalid(format!("cluster_bits {bits} outside 9..=21")));
    }
    let mut header = Header::new_v3(bits, 0);
    let backing_size = match opts.backing {
        None => None,
        Some((backing, format)) => {
            let name = backing
                .to_str()
                .ok_or_else(|| invalid("backing file name is not UTF-8".into()))?;
            let resolved = resolve_backing(path, name);
            let size = check_backing_chain(path, &resolved, format, &opts.backing_policy)?;
            header.backing_file = Some(name.to_owned());
            header.backing_format = Some(format.as_str().to_owned());
            Some(size)
        }
    };
    let size = opts
        .size
        .or(backing_size)
        .ok_or_else(|| invalid("size needed for an image without backing file".into()))?;
    header.size = size;
    let geo = Geometry {
        cluster_bits: bits,
        refcount_order: header.refcount_order,
    };
    let l1_entries = l1_entries_for(size, bits);
    if l1_entries * 8 > 32 << 20 {
        return Err(invalid(format!(
            "size {size} needs an L1 table over 32 MiB; use larger clusters"
        )));
    }
    let layout = Layout::new(geo, l1_entries);
    let cs = geo.cluster_size();
    header.l1_size = l1_entries as u32;
    header.refcount_table_offset = cs;
    header.refcount_table_clusters = layout.reftable_clusters as u32;
    let refblocks_at = cs * (1 + layout.reftable_clusters);
    header.l1_table_offset = refblocks_at + cs * layout.refblocks;
    let header_bytes = header.to_bytes().map_err(|problem| Error::Header {
        path: path.to_owned(),
        problem,
    })?;

    // Refcount table and blocks: every metadata cluster has refcount one.
    let rt: Vec<u64> = (0..layout.refblocks)
        .map(|i| refblocks_at + i * cs)
        .collect();
    let mut blocks = vec![0u8; (layout.refblocks * cs) as usize];
    let per_block = geo.refblock_entries();
    for c in 0..layout.total_clusters() {
        let b = (c / per_block) as usize;
        let block = &mut blocks[b * cs as usize..(b + 1) * cs as usize];
        set_refcount(block, c % per_block, geo.refcount_order, 1);
    }

    let file = create_file(path, opts.overwrite)?;
    write_all_at(&file, path, &header_bytes, 0, "writing the header")?;
    write_all_at(
        &file,
        path,
        &encode_table(&rt),
        cs,
        "writing the refcount table",
    )?;
    write_all_at(
        &file,
        path,
        &blocks,
        refblocks_at,
        "writing refcount blocks",
    )?;
    // The L1 table is all zeros: extending the file writes it.
    file.set_len(layout.total_clusters() * cs)
        .map_err(|e| Error::io(path, "resizing", e))?;
    sync_new(&file, path)?;
    tracing::info!(path = %path.display(), size, cluster_size = cs,
        backing = ?opts.backing.map(|b| b.0), "created qcow2");
    Ok(())
}

/// Rewrites the backing-file reference of the qcow2 image at `path` in place, without opening
/// the chain it names now (as `qemu-img rebase -u`): `backing` is stored as given (a relative
/// name is relative to the image's directory, as in QEMU) with its format, or `None` leaves the
/// image without a backing file. The new backing file and the chain below it must satisfy
/// `policy`. The header is rewritten in one write at offset 0 and synced.
///
/// The caller guarantees the new backing file has the content of the old one (a copy of it,
/// for instance), since no data is moved.
pub fn set_backing_file(
    path: &Path,
    backing: Option<(&Path, Format)>,
    policy: &PathPolicy,
) -> Result<()> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|source| Error::Open {
            path: path.to_owned(),
            source,
        })?;
    if probe_file(&file, path)? != Format::Qcow2 {
        return Err(Error::InvalidArgument {
            path: path.to_owned(),
            reason: "only a qcow2 image has a backing file".into(),
        });
    }
    let (mut header, _) = read_header(&file, path)?;
    match backing {
        None => {
            header.backing_file = None;
            header.backing_format = None;
        }
        Some((backing, format)) => {
            let name = backing.to_str().ok_or_else(|| Error::InvalidArgument {
                path: path.to_owned(),
                reason: "backing file name is not UTF-8".into(),
            })?;
            check_backing_chain(path, &resolve_backing(path, name), format, policy)?;
            header.backing_file = Some(name.to_owned());
            header.backing_format = Some(format.as_str().to_owned());
        }
    }
    let bytes = header.to_bytes().map_err(|problem| Error::Header {
        path: path.to_owned(),
        problem,
    })?;
    write_all_at(&file, path, &bytes, 0, "writing the header")?;
    file.sync_all().map_err(|e| Error::io(path, "syncing", e))?;
    tracing::info!(path = %path.display(), backing = ?backing.map(|b| b.0), "backing file set");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_small_image() {
        let geo = Geometry {
            cluster_bits: 16,
            refcount_order: 4,
        };
        assert_eq!(
            Layout::new(geo, 2),
            Layout {
                reftable_clusters: 1,
                refblocks: 1,
                l1_clusters: 1
            }
        );
    }

    #[test]
    fn layout_needs_many_refblocks() {
        // 512 B clusters, 16-bit refcounts: 256 clusters per block.
        let geo = Geometry {
            cluster_bits: 9,
            refcount_order: 4,
        };
        // 1 GiB: 32768 L1 entries = 512 L1 clusters.
        let l = Layout::new(geo, 32768);
        assert_eq!(l.l1_clusters, 512);
        assert!(l.refblocks * 256 >= l.total_clusters());
        assert!(l.reftable_clusters * 64 >= l.refblocks);
        assert_eq!(l.refblocks, 3);
    }

    #[test]
    fn set_backing_file_points_a_copied_layer_at_its_local_parent() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.raw");
        create_raw(&base, 1 << 20, false).unwrap();
        let layer = dir.path().join("layer.qcow2");
        create_qcow2(
            &layer,
            &CreateOptions {
                backing: Some((&base, Format::Raw)),
                ..CreateOptions::default()
            },
        )
        .unwrap();
        let mut image = crate::Image::open(&layer).unwrap();
        image.write_at(4096, &[7u8; 512]).unwrap();
        image.flush().unwrap();
        drop(image);
        // A copy elsewhere still names the original parent, in a directory not allowed.
        let other = tempfile::tempdir().unwrap();
        let copy_base = other.path().join("disk0-layer0.raw");
        std::fs::copy(&base, &copy_base).unwrap();
        let copy = other.path().join("disk0-layer1.qcow2");
        std::fs::copy(&layer, &copy).unwrap();
        assert!(matches!(
            crate::Image::open(&copy),
            Err(Error::BackingRefused { .. })
        ));
        let policy = PathPolicy::same_dir();
        // A parent outside the policy is refused, and nothing is written.
        assert!(matches!(
            set_backing_file(&copy, Some((&base, Format::Raw)), &policy),
            Err(Error::BackingRefused { .. })
        ));
        set_backing_file(
            &copy,
            Some((Path::new("disk0-layer0.raw"), Format::Raw)),
            &policy,
        )
        .unwrap();
        let mut image = crate::Image::open(&copy).unwrap();
        assert_eq!(image.backing_chain()[1].path, copy_base);
        let mut buf = vec![0u8; 512];
        image.read_at(4096, &mut buf).unwrap();
        assert_eq!(buf, vec![7u8; 512]);
        drop(image);
        // Without a backing file the layer stands alone; a raw file has none to set.
        set_backing_file(&copy, None, &policy).unwrap();
        assert_eq!(crate::Image::open(&copy).unwrap().backing_chain().len(), 1);
        assert!(matches!(
            set_backing_file(&copy_base, None, &policy),
            Err(Error::InvalidArgument { .. })
        ));
    }
}
