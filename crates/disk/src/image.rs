//! An image opened with its whole backing chain: the guest-visible operations.

use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::create::probe_file;
use crate::error::{Error, Result};
use crate::policy::{resolve_backing, PathPolicy};
use crate::qcow2::{ClusterInit, Qcow2};
use crate::raw::Raw;
use crate::table::L2Entry;
use crate::{ChainEntry, Extent, Format, Stats, MAX_CHAIN_DEPTH};

/// How to open an image.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Open the top image read-only too (backing files are always read-only).
    pub read_only: bool,
    /// Format of the top image; probed from its magic when `None`.
    pub format: Option<Format>,
    /// `fdatasync` between dependent metadata writes, so that even a power loss (not only a
    /// process kill) leaves the metadata consistent. Costs a sync per allocation.
    pub ordered_sync: bool,
    /// Where the backing files of the chain may live (default: each in the directory of the
    /// image naming it). Kept by the image for [`Image::set_backing`].
    pub backing_policy: PathPolicy,
    /// Test hook: every modification of the top qcow2 file after the first `n` fails, as if
    /// the process had been killed there. Used to check every crash point of an update.
    #[doc(hidden)]
    pub crash_after_writes: Option<u64>,
}

pub(crate) enum Layer {
    Raw(Raw),
    Qcow2(Box<Qcow2>),
}

impl Layer {
    pub(crate) fn path(&self) -> &Path {
        match self {
            Layer::Raw(r) => &r.path,
            Layer::Qcow2(q) => &q.path,
        }
    }

    fn size(&self) -> u64 {
        match self {
            Layer::Raw(r) => r.size,
            Layer::Qcow2(q) => q.size(),
        }
    }

    fn file(&self) -> &Arc<File> {
        match self {
            Layer::Raw(r) => &r.file,
            Layer::Qcow2(q) => &q.file,
        }
    }

    fn format(&self) -> Format {
        match self {
            Layer::Raw(_) => Format::Raw,
            Layer::Qcow2(_) => Format::Qcow2,
        }
    }

    fn stats(&self) -> Stats {
        match self {
            Layer::Raw(r) => r.stats,
            Layer::Qcow2(q) => q.stats,
        }
    }

    fn read_only(&self) -> bool {
        match self {
            Layer::Raw(r) => r.read_only,
            Layer::Qcow2(q) => q.read_only,
        }
    }

    /// Backing file name and format named by this layer's header.
    fn backing(&self) -> Option<(String, Option<String>)> {
        match self {
            Layer::Raw(_) => None,
            Layer::Qcow2(q) => q
                .header
                .backing_file
                .clone()
                .map(|b| (b, q.header.backing_format.clone())),
        }
    }
}

/// Where a piece of a guest range lives: `Some((layer, host offset))`, or zeros.
#[derive(Debug, Clone, Copy)]
struct Piece {
    src: Option<(usize, u64)>,
    len: u64,
}

fn push_piece(out: &mut Vec<Piece>, p: Piece) {
    if p.len == 0 {
        return;
    }
    if let Some(last) = out.last_mut() {
        match (last.src, p.src) {
            (None, None) => {
                last.len += p.len;
                return;
            }
            (Some((l1, h1)), Some((l2, h2))) if l1 == l2 && h1 + last.len == h2 => {
                last.len += p.len;
                return;
            }
            _ => {}
        }
    }
    out.push(p);
}

/// Opens one image file. A backing file is given with the image naming it and the policy it
/// must satisfy, checked on the opened file before anything is read from it.
pub(crate) fn open_layer(
    path: &Path,
    format: Option<Format>,
    read_only: bool,
    ordered_sync: bool,
    named_by: Option<(&Path, &PathPolicy)>,
) -> Result<Layer> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(path)
        .map_err(|source| Error::Open {
            path: path.to_owned(),
            source,
        })?;
    if let Some((image, policy)) = named_by {
        policy.check_opened(image, path, &file)?;
    }
    let format = match format {
        Some(f) => f,
        None => probe_file(&file, path)?,
    };
    Ok(match format {
        Format::Raw => Layer::Raw(Raw::open(path, file, read_only)?),
        Format::Qcow2 => Layer::Qcow2(Box::new(Qcow2::open(path, file, read_only, ordered_sync)?)),
    })
}

/// Opens the backing chain below the last of `layers` (all read-only), appending to `layers`.
/// Every backing file is checked against `policy`.
fn open_backing_chain(
    layers: &mut Vec<Layer>,
    ordered_sync: bool,
    policy: &PathPolicy,
) -> Result<()> {
    loop {
        let Some(last) = layers.last() else {
            return Ok(());
        };
        let Some((name, fmt)) = last.backing() else {
            return Ok(());
        };
        let image = last.path().to_owned();
        if layers.len() >= MAX_CHAIN_DEPTH {
            return Err(Error::ChainTooDeep { path: image });
        }
        let backing = resolve_backing(&image, &name);
        let format = match fmt {
            None => None,
            Some(f) => Some(
                f.parse::<Format>()
                    .map_err(|_| Error::unsupported(&image, format!("backing format {f:?}")))?,
            ),
        };
        let layer = open_layer(&backing, format, true, ordered_sync, Some((&image, policy)))
            .map_err(|e| match e {
                refused @ Error::BackingRefused { .. } => refused,
                e => Error::OpenBacking {
                    image: image.clone(),
                    backing: backing.clone(),
                    source: Box::new(e),
                },
            })?;
        layers.push(layer);
    }
}

/// The clusters an image file defines itself, by guest offset.
pub(crate) type Clusters = Vec<(u64, L2Entry)>;

/// A disk image and its backing chain. `layers[0]` is the image the guest writes to.
pub struct Image {
    layers: Vec<Layer>,
    ordered_sync: bool,
    backing_policy: PathPolicy,
}

impl Image {
    /// Opens `path` read-write (format probed) with its backing chain read-only, each backing
    /// file in the directory of the image naming it ([`PathPolicy::same_dir`]).
    pub fn open(path: &Path) -> Result<Image> {
        Image::open_with(path, &OpenOptions::default())
    }

    /// Opens `path` and its backing chain, all read-only, each backing file in the directory
    /// of the image naming it ([`PathPolicy::same_dir`]).
    pub fn open_read_only(path: &Path) -> Result<Image> {
        Image::open_with(
            path,
            &OpenOptions {
                read_only: true,
                ..OpenOptions::default()
            },
        )
    }

    /// Opens `path` and its backing chain as `opts` say.
    pub fn open_with(path: &Path, opts: &OpenOptions) -> Result<Image> {
        let mut top = open_layer(path, opts.format, opts.read_only, opts.ordered_sync, None)?;
        if let Layer::Qcow2(q) = &mut top {
            q.crash_after_writes = opts.crash_after_writes;
        }
        let mut layers = vec![top];
        open_backing_chain(&mut layers, opts.ordered_sync, &opts.backing_policy)?;
        Ok(Image {
            layers,
            ordered_sync: opts.ordered_sync,
            backing_policy: opts.backing_policy.clone(),
        })
    }

    /// Virtual disk size in bytes.
    pub fn size(&self) -> u64 {
        self.layers[0].size()
    }

    pub fn path(&self) -> &Path {
        self.layers[0].path()
    }

    /// The policy the backing chain was opened with (and [`Image::set_backing`] checks).
    pub fn backing_policy(&self) -> &PathPolicy {
        &self.backing_policy
    }

    pub fn format(&self) -> Format {
        self.layers[0].format()
    }

    pub fn is_read_only(&self) -> bool {
        self.layers[0].read_only()
    }

    /// The copy-up unit: the qcow2 cluster size of the top image (512 for raw).
    pub fn cluster_size(&self) -> u64 {
        match &self.layers[0] {
            Layer::Qcow2(q) => q.cluster_size(),
            Layer::Raw(_) => 512,
        }
    }

    /// Indices of the clusters that `[offset, offset + len)` touches.
    pub fn clusters_touched(&self, offset: u64, len: u64) -> Range<u64> {
        let cs = self.cluster_size();
        if len == 0 {
            return offset / cs..offset / cs;
        }
        offset / cs..(offset + len).div_ceil(cs)
    }

    /// This image and every backing file below it, top first.
    pub fn backing_chain(&self) -> Vec<ChainEntry> {
        self.layers
            .iter()
            .map(|l| ChainEntry {
                path: l.path().to_owned(),
                format: l.format(),
            })
            .collect()
    }

    /// Counters of the top image.
    pub fn stats(&self) -> Stats {
        self.layers[0].stats()
    }

    /// Counters of every image of the chain, top first.
    pub fn chain_stats(&self) -> Vec<(PathBuf, Stats)> {
        self.layers
            .iter()
            .map(|l| (l.path().to_owned(), l.stats()))
            .collect()
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        let size = self.size();
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(Error::OutOfRange {
                path: self.path().to_owned(),
                offset,
                len,
                size,
            });
        }
        Ok(())
    }

    fn ensure_writable(&self) -> Result<()> {
        if self.is_read_only() {
            return Err(Error::ReadOnly {
                path: self.path().to_owned(),
            });
        }
        Ok(())
    }

    /// Resolves `[offset, offset+len)` as seen from `layer` downwards.
    fn resolve(&mut self, layer: usize, offset: u64, len: u64, out: &mut Vec<Piece>) -> Result<()> {
        let Some(l) = self.layers.get(layer) else {
            push_piece(out, Piece { src: None, len });
            return Ok(());
        };
        let size = l.size();
        let inside = if offset >= size {
            0
        } else {
            len.min(size - offset)
        };
        let cs = match l {
            Layer::Raw(_) => {
                push_piece(
                    out,
                    Piece {
                        src: Some((layer, offset)),
                        len: inside,
                    },
                );
                push_piece(
                    out,
                    Piece {
                        src: None,
                        len: len - inside,
                    },
                );
                return Ok(());
            }
            Layer::Qcow2(q) => q.cluster_size(),
        };
        let end = offset + inside;
        let mut pos = offset;
        // A run of unallocated clusters is resolved below in one go.
        let mut hole: Option<u64> = None;
        while pos < end {
            let n = (cs - pos % cs).min(end - pos);
            let Layer::Qcow2(q) = &mut self.layers[layer] else {
                unreachable!("layer {layer} was qcow2 above");
            };
            let entry = q.lookup(pos)?;
            if entry != L2Entry::Unallocated {
                if let Some(start) = hole.take() {
                    self.resolve(layer + 1, start, pos - start, out)?;
                }
            }
            match entry {
                L2Entry::Unallocated => {
                    hole.get_or_insert(pos);
                }
                L2Entry::Data { host, .. } => push_piece(
                    out,
                    Piece {
                        src: Some((layer, host + pos % cs)),
                        len: n,
                    },
                ),
                L2Entry::Zero { .. } => push_piece(out, Piece { src: None, len: n }),
                L2Entry::Compressed => {
                    return Err(Error::unsupported(
                        self.layers[layer].path(),
                        format!("compressed cluster at guest offset {pos:#x}"),
                    ))
                }
            }
            pos += n;
        }
        if let Some(start) = hole {
            self.resolve(layer + 1, start, end - start, out)?;
        }
        push_piece(
            out,
            Piece {
                src: None,
                len: len - inside,
            },
        );
        Ok(())
    }

    fn read_piece(&mut self, p: Piece, buf: &mut [u8]) -> Result<()> {
        match p.src {
            None => {
                buf.fill(0);
                Ok(())
            }
            Some((layer, host)) => match &mut self.layers[layer] {
                Layer::Raw(r) => r.read(host, buf),
                Layer::Qcow2(q) => q.read_host(host, buf),
            },
        }
    }

    /// Reads guest bytes; unallocated clusters come from the backing chain, zeros past it.
    pub fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        let mut pieces = Vec::new();
        self.resolve(0, offset, buf.len() as u64, &mut pieces)?;
        let mut at = 0usize;
        for p in pieces {
            let n = p.len as usize;
            self.read_piece(p, &mut buf[at..at + n])?;
            at += n;
        }
        Ok(())
    }

    /// Host extents to read for `[offset, offset+len)`, for asynchronous I/O by the caller.
    /// Valid until the next write or `set_backing` on this image.
    pub fn map_read(&mut self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.check_range(offset, len)?;
        let mut pieces = Vec::new();
        self.resolve(0, offset, len, &mut pieces)?;
        Ok(self.to_extents(&pieces))
    }

    fn to_extents(&self, pieces: &[Piece]) -> Vec<Extent> {
        pieces
            .iter()
            .map(|p| match p.src {
                None => Extent::Zero { len: p.len },
                Some((layer, host)) => Extent::Data {
                    file: Arc::clone(self.layers[layer].file()),
                    file_offset: host,
                    len: p.len,
                },
            })
            .collect()
    }

    /// The old content of top-image cluster `guest` (aligned) from the backing chain, or
    /// `None` if it reads as zeros there.
    pub(crate) fn backing_cluster(&mut self, guest: u64, cs: u64) -> Result<Option<Vec<u8>>> {
        if self.layers.len() < 2 {
            return Ok(None);
        }
        // Bytes past the top's size are not guest visible: keep them zero.
        let visible = cs.min(self.size() - guest);
        let mut pieces = Vec::new();
        self.resolve(1, guest, visible, &mut pieces)?;
        if pieces.iter().all(|p| p.src.is_none()) {
            return Ok(None);
        }
        let mut buf = vec![0u8; cs as usize];
        let mut at = 0usize;
        for p in pieces {
            let n = p.len as usize;
            self.read_piece(p, &mut buf[at..at + n])?;
            at += n;
        }
        Ok(Some(buf))
    }

    fn top_qcow2(&mut self) -> &mut Qcow2 {
        match &mut self.layers[0] {
            Layer::Qcow2(q) => q,
            Layer::Raw(_) => unreachable!("callers check that the top image is qcow2"),
        }
    }

    /// Writes guest bytes. The first write to a cluster not allocated in the top image copies
    /// the cluster up from the backing chain (a disk COW fault), merged with the new bytes,
    /// in one write of the whole cluster before the L2 entry points at it.
    pub fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        self.ensure_writable()?;
        if let Layer::Raw(r) = &mut self.layers[0] {
            return r.write(offset, buf);
        }
        let cs = self.cluster_size();
        let size = self.size();
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            let in_cluster = pos % cs;
            let n = (cs - in_cluster).min(end - pos);
            let data = &buf[(pos - offset) as usize..(pos - offset + n) as usize];
            let guest = pos - in_cluster;
            let entry = self.top_qcow2().lookup(pos)?;
            match entry {
                L2Entry::Data { host, copied: true } => {
                    self.top_qcow2().write_host(host + in_cluster, data)?;
                }
                L2Entry::Data { copied: false, .. } => {
                    return Err(Error::unsupported(
                        self.path(),
                        format!("writing shared cluster (refcount > 1) at {guest:#x}"),
                    ))
                }
                L2Entry::Compressed => {
                    return Err(Error::unsupported(
                        self.path(),
                        format!("writing compressed cluster at {guest:#x}"),
                    ))
                }
                L2Entry::Unallocated | L2Entry::Zero { .. } => {
                    let covers_all = in_cluster == 0 && (n == cs || pos + n == size);
                    let old = if covers_all || entry != L2Entry::Unallocated {
                        None
                    } else {
                        self.backing_cluster(guest, cs)?
                    };
                    let copied_up = old.is_some();
                    let mut cluster = old.unwrap_or_else(|| vec![0u8; cs as usize]);
                    cluster[in_cluster as usize..(in_cluster + n) as usize].copy_from_slice(data);
                    let q = self.top_qcow2();
                    q.install_cluster(guest, ClusterInit::Data(&cluster))?;
                    q.stats.bytes_written += n;
                    if copied_up {
                        q.stats.copy_ups += 1;
                        tracing::trace!(guest, "copy-up on write");
                    }
                }
            }
            pos += n;
        }
        Ok(())
    }

    /// Prepares `[offset, offset+len)` for an asynchronous write by the caller: allocates and
    /// copies up every cluster not yet in the top image (metadata updated crash-safely, the
    /// cluster holding its old content before the L2 entry points at it), then returns the host
    /// extents of the top image to write into.
    ///
    /// The caller must not let another write to the same clusters ([`Image::clusters_touched`])
    /// be in flight during this call, or the copy-up could miss it (design.md §3, M14).
    pub fn prepare_write(&mut self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.check_range(offset, len)?;
        self.ensure_writable()?;
        if let Layer::Raw(r) = &self.layers[0] {
            return Ok(vec![Extent::Data {
                file: Arc::clone(&r.file),
                file_offset: offset,
                len,
            }]);
        }
        let cs = self.cluster_size();
        let end = offset + len;
        let mut pos = offset;
        let mut pieces = Vec::new();
        while pos < end {
            let in_cluster = pos % cs;
            let n = (cs - in_cluster).min(end - pos);
            let guest = pos - in_cluster;
            let host = match self.top_qcow2().lookup(pos)? {
                L2Entry::Data { host, copied: true } => host,
                L2Entry::Data { copied: false, .. } | L2Entry::Compressed => {
                    return Err(Error::unsupported(
                        self.path(),
                        format!("writing shared or compressed cluster at {guest:#x}"),
                    ))
                }
                entry @ (L2Entry::Unallocated | L2Entry::Zero { .. }) => {
                    // Even a cluster the write covers entirely is copied up: until the caller's
                    // write lands, the cluster must read as its old content.
                    let old = if entry == L2Entry::Unallocated {
                        self.backing_cluster(guest, cs)?
                    } else {
                        None
                    };
                    let q = self.top_qcow2();
                    let host = match &old {
                        Some(data) => {
                            q.stats.copy_ups += 1;
                            q.stats.bytes_written += cs;
                            q.install_cluster(guest, ClusterInit::Data(data))?
                        }
                        None => q.install_cluster(guest, ClusterInit::Zeros)?,
                    };
                    host
                }
            };
            push_piece(
                &mut pieces,
                Piece {
                    src: Some((0, host + in_cluster)),
                    len: n,
                },
            );
            pos += n;
        }
        Ok(self.to_extents(&pieces))
    }

    /// Makes every write so far durable. Data and metadata live in the same file, and every
    /// metadata update was already ordered after the data it points at, so one `fdatasync` of
    /// the top image is enough (backing files are never written).
    pub fn flush(&mut self) -> Result<()> {
        match &mut self.layers[0] {
            Layer::Raw(r) => r.flush(),
            Layer::Qcow2(q) => q.flush(),
        }
    }

    /// Points this (qcow2, writable) image at a new backing file, e.g. after committing the
    /// old backing file into its own parent. `new_backing` is stored as given; a relative name
    /// is resolved against this image's directory. The new chain is opened first; the header
    /// is then rewritten in one write and synced before the open chain is switched. The new
    /// backing file must satisfy the policy the image was opened with.
    ///
    /// The caller guarantees the new backing file has the content of the old one.
    pub fn set_backing(&mut self, new_backing: &Path, format: Option<Format>) -> Result<()> {
        self.ensure_writable()?;
        let Layer::Qcow2(_) = &self.layers[0] else {
            return Err(Error::InvalidArgument {
                path: self.path().to_owned(),
                reason: "only a qcow2 image has a backing file".into(),
            });
        };
        let name = new_backing
            .to_str()
            .ok_or_else(|| Error::InvalidArgument {
                path: self.path().to_owned(),
                reason: "backing file name is not UTF-8".into(),
            })?
            .to_owned();
        let top_path = self.path().to_owned();
        let resolved = resolve_backing(&top_path, &name);
        let layer = open_layer(
            &resolved,
            format,
            true,
            self.ordered_sync,
            Some((&top_path, &self.backing_policy)),
        )
        .map_err(|e| match e {
            refused @ Error::BackingRefused { .. } => refused,
            e => Error::OpenBacking {
                image: top_path.clone(),
                backing: resolved.clone(),
                source: Box::new(e),
            },
        })?;
        let fmt = layer.format();
        let mut chain = vec![layer];
        open_backing_chain(&mut chain, self.ordered_sync, &self.backing_policy)?;
        if chain.len() >= MAX_CHAIN_DEPTH {
            return Err(Error::ChainTooDeep { path: top_path });
        }
        let q = self.top_qcow2();
        let old = (
            q.header.backing_file.clone(),
            q.header.backing_format.clone(),
        );
        q.header.backing_file = Some(name);
        q.header.backing_format = Some(fmt.as_str().to_owned());
        if let Err(e) = q.write_header().and_then(|()| q.flush()) {
            (q.header.backing_file, q.header.backing_format) = old;
            return Err(e);
        }
        tracing::info!(image = %top_path.display(), backing = %resolved.display(), "rebased");
        self.layers.truncate(1);
        self.layers.extend(chain);
        Ok(())
    }

    /// Grows a raw top image (used by commit into a smaller raw parent).
    pub(crate) fn grow_raw(&mut self, size: u64) -> Result<bool> {
        match &mut self.layers[0] {
            Layer::Raw(r) => {
                r.grow(size)?;
                Ok(true)
            }
            Layer::Qcow2(_) => Ok(false),
        }
    }

    /// The top image's own clusters (data or zero), for commit.
    pub(crate) fn top_allocated(&mut self) -> Result<Option<Vec<(u64, L2Entry)>>> {
        match &mut self.layers[0] {
            Layer::Qcow2(q) => q.allocated_clusters().map(Some),
            Layer::Raw(_) => Ok(None),
        }
    }

    /// The clusters layer `index` of the chain defines itself (data or zero) and its cluster
    /// size, or `None` for a raw layer or past the end of the chain.
    pub(crate) fn layer_allocated(&mut self, index: usize) -> Result<Option<(u64, Clusters)>> {
        match self.layers.get_mut(index) {
            Some(Layer::Qcow2(q)) => Ok(Some((q.cluster_size(), q.allocated_clusters()?))),
            _ => Ok(None),
        }
    }

    /// Reads host bytes of the top qcow2 image.
    pub(crate) fn read_top_host(&mut self, host: u64, buf: &mut [u8]) -> Result<()> {
        self.top_qcow2().read_host(host, buf)
    }

    pub(crate) fn layer_path(&self, index: usize) -> Option<(&Path, Format)> {
        self.layers.get(index).map(|l| (l.path(), l.format()))
    }
}
