//! One qcow2 file: header, L1 table, cached L2 tables, and installing data clusters.
//!
//! Refcount bookkeeping and cluster allocation live in `refcount.rs`. The backing chain is not
//! known here; `image.rs` resolves reads through it and hands this layer the content of a
//! cluster to install (the copy-up).
//!
//! # Crash safety
//! Refcounts are kept exact at all times and the dirty bit is never set. Every metadata update
//! is ordered so that a crash (process kill, and with `ordered_sync` also power loss) leaves at
//! worst leaked clusters, never an entry pointing at an unreferenced or unwritten cluster:
//! 1. the file is extended to cover a new cluster and its refcount is set to one;
//! 2. the new cluster's content (L2 table zeros, or the full data cluster) is written;
//! 3. only then is the L1/L2 entry that points at it written.
//!
//! Each arrow is a `barrier()`: program order is enough against a process kill (the page cache
//! survives it); with `ordered_sync` it is an `fdatasync`, enough against power loss.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::header::{self, Header, INCOMPAT_CORRUPT, INCOMPAT_DIRTY};
use crate::io::{file_len, read_exact_at, read_zero_filled_at, sync_data, write_all_at};
use crate::table::{decode_l1, decode_table, encode_l1, Geometry, L2Entry};
use crate::Stats;
use std::io;

/// How many L2 tables / refcount blocks to keep in memory.
const CACHE_TABLES: usize = 64;

/// A small write-through cache of one-cluster tables, keyed by host offset.
pub(crate) struct TableCache<T> {
    map: HashMap<u64, T>,
}

impl<T> TableCache<T> {
    fn new() -> Self {
        TableCache {
            map: HashMap::new(),
        }
    }

    pub(crate) fn get_mut(&mut self, off: u64) -> Option<&mut T> {
        self.map.get_mut(&off)
    }

    pub(crate) fn insert(&mut self, off: u64, value: T) {
        if self.map.len() >= CACHE_TABLES && !self.map.contains_key(&off) {
            // Write-through cache: any entry can be dropped without losing data.
            if let Some(&victim) = self.map.keys().next() {
                self.map.remove(&victim);
            }
        }
        self.map.insert(off, value);
    }
}

/// What to put in a newly installed data cluster.
pub(crate) enum ClusterInit<'a> {
    /// The full cluster content (exactly one cluster long).
    Data(&'a [u8]),
    /// Zeros (a fresh cluster already reads as zeros; a reused one is overwritten).
    Zeros,
}

/// An open qcow2 file.
pub(crate) struct Qcow2 {
    pub(crate) path: PathBuf,
    pub(crate) file: Arc<File>,
    pub(crate) read_only: bool,
    pub(crate) header: Header,
    pub(crate) geo: Geometry,
    /// Raw L1 entries.
    pub(crate) l1: Vec<u64>,
    pub(crate) l2_cache: TableCache<Vec<u64>>,
    /// Raw refcount table entries (loaded when opened writable).
    pub(crate) reftable: Vec<u64>,
    pub(crate) refblock_cache: TableCache<Vec<u8>>,
    pub(crate) file_len: u64,
    /// Where the next cluster is allocated (computed on first allocation).
    pub(crate) next_free: Option<u64>,
    /// fdatasync between dependent metadata writes (power-loss safety).
    pub(crate) ordered_sync: bool,
    pub(crate) stats: Stats,
    /// Test hook: fail every file modification after this many (a simulated crash).
    pub(crate) crash_after_writes: Option<u64>,
}

/// Reads and validates the header of a qcow2 file. Reads only the first cluster.
pub(crate) fn read_header(file: &File, path: &Path) -> Result<(Header, u64)> {
    let len = file_len(file, path)?;
    let header_err = |problem| Error::Header {
        path: path.to_owned(),
        problem,
    };
    let mut first = vec![0u8; len.min(4096) as usize];
    read_exact_at(file, path, &mut first, 0, "reading the header")?;
    let bits = header::peek_cluster_bits(&first).map_err(header_err)?;
    let want = len.min(1u64 << bits) as usize;
    if want > first.len() {
        first.resize(want, 0);
        read_exact_at(file, path, &mut first, 0, "reading the header")?;
    }
    let h = Header::parse(&first, len).map_err(header_err)?;
    Ok((h, len))
}

impl Qcow2 {
    /// Opens a qcow2 file. Nothing is written unless the image is valid and opened writable.
    pub(crate) fn open(
        path: &Path,
        file: File,
        read_only: bool,
        ordered_sync: bool,
    ) -> Result<Qcow2> {
        let (header, len) = read_header(&file, path)?;
        let geo = Geometry {
            cluster_bits: header.cluster_bits,
            refcount_order: header.refcount_order,
        };
        let mut l1_bytes = vec![0u8; header.l1_size as usize * 8];
        read_exact_at(
            &file,
            path,
            &mut l1_bytes,
            header.l1_table_offset,
            "reading the L1 table",
        )?;
        let l1 = decode_table(&l1_bytes);
        if !read_only {
            let refuse = |what: &str| Err(Error::unsupported(path, what));
            if header.incompatible_features & INCOMPAT_CORRUPT != 0 {
                return refuse(
                    "writing an image marked corrupt (repair with qemu-img check -r all)",
                );
            }
            if header.incompatible_features & INCOMPAT_DIRTY != 0 {
                return refuse("writing a dirty image (repair with qemu-img check -r all)");
            }
            if header.nb_snapshots > 0 {
                return refuse("writing an image with internal snapshots");
            }
        }
        let mut q = Qcow2 {
            path: path.to_owned(),
            file: Arc::new(file),
            read_only,
            geo,
            l1,
            l2_cache: TableCache::new(),
            reftable: Vec::new(),
            refblock_cache: TableCache::new(),
            file_len: len,
            next_free: None,
            ordered_sync,
            stats: Stats::default(),
            crash_after_writes: None,
            header,
        };
        if !read_only {
            let rt_len = q.header.refcount_table_clusters as usize * q.geo.cluster_size() as usize;
            let mut rt = vec![0u8; rt_len];
            read_exact_at(
                &q.file,
                path,
                &mut rt,
                q.header.refcount_table_offset,
                "reading the refcount table",
            )?;
            q.reftable = decode_table(&rt);
            // Auto-clear features (e.g. persistent bitmaps) describe data we do not keep up to
            // date: the format requires clearing them before writing.
            if q.header.autoclear_features != 0 {
                tracing::info!(path = %path.display(), bits = q.header.autoclear_features,
                    "clearing auto-clear feature bits before writing");
                q.header.autoclear_features = 0;
                q.write_header()?;
            }
        }
        tracing::debug!(path = %path.display(), size = q.header.size,
            cluster_size = q.geo.cluster_size(), backing = ?q.header.backing_file, "opened qcow2");
        Ok(q)
    }

    pub(crate) fn size(&self) -> u64 {
        self.header.size
    }

    pub(crate) fn cluster_size(&self) -> u64 {
        self.geo.cluster_size()
    }

    pub(crate) fn barrier(&self) -> Result<()> {
        if self.ordered_sync {
            sync_data(&self.file, &self.path)?;
        }
        Ok(())
    }

    /// Counts a file modification for the crash-injection test hook.
    pub(crate) fn crash_point(&mut self, action: &'static str) -> Result<()> {
        if let Some(n) = &mut self.crash_after_writes {
            if *n == 0 {
                return Err(Error::io(
                    &self.path,
                    action,
                    io::Error::other("injected crash"),
                ));
            }
            *n -= 1;
        }
        Ok(())
    }

    /// Every modification of a qcow2 file goes through here.
    pub(crate) fn pwrite(&mut self, buf: &[u8], offset: u64, action: &'static str) -> Result<()> {
        self.crash_point(action)?;
        write_all_at(&self.file, &self.path, buf, offset, action)
    }

    pub(crate) fn ensure_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly {
                path: self.path.clone(),
            });
        }
        Ok(())
    }

    /// Rewrites the header area (header, extensions, backing name) in one write at offset 0.
    pub(crate) fn write_header(&mut self) -> Result<()> {
        self.ensure_writable()?;
        let bytes = self.header.to_bytes().map_err(|problem| Error::Header {
            path: self.path.clone(),
            problem,
        })?;
        self.pwrite(&bytes, 0, "writing the header")?;
        self.barrier()
    }

    /// The L2 table offset for L1 index `l1i`, or `None` if unallocated.
    fn l2_offset(&self, l1i: u64) -> Result<Option<u64>> {
        let Some(&raw) = self.l1.get(l1i as usize) else {
            return Ok(None);
        };
        let off = decode_l1(raw)
            .map_err(|r| Error::corrupt(&self.path, format!("L1 entry {l1i}: {r}")))?;
        if let Some(off) = off {
            if !self.geo.is_aligned(off) || off + self.cluster_size() > self.file_len {
                return Err(Error::corrupt(
                    &self.path,
                    format!("L1 entry {l1i} points at {off:#x}, outside the file or unaligned"),
                ));
            }
        }
        Ok(off)
    }

    /// Loads an L2 table into the cache.
    fn load_l2(&mut self, l2_off: u64) -> Result<&mut Vec<u64>> {
        if self.l2_cache.get_mut(l2_off).is_none() {
            let mut bytes = vec![0u8; self.cluster_size() as usize];
            read_exact_at(
                &self.file,
                &self.path,
                &mut bytes,
                l2_off,
                "reading an L2 table",
            )?;
            self.l2_cache.insert(l2_off, decode_table(&bytes));
        }
        Ok(self
            .l2_cache
            .get_mut(l2_off)
            .expect("L2 table was inserted just above"))
    }

    /// Looks up the guest cluster containing `guest`.
    pub(crate) fn lookup(&mut self, guest: u64) -> Result<L2Entry> {
        let (l1i, l2i, _) = self.geo.split_guest(guest);
        let Some(l2_off) = self.l2_offset(l1i)? else {
            return Ok(L2Entry::Unallocated);
        };
        let raw = self.load_l2(l2_off)?[l2i as usize];
        let entry = L2Entry::decode(raw, self.header.version);
        if let L2Entry::Data { host, .. } = entry {
            if !self.geo.is_aligned(host) {
                return Err(Error::corrupt(
                    &self.path,
                    format!("data cluster for guest offset {guest:#x} at unaligned {host:#x}"),
                ));
            }
        }
        Ok(entry)
    }

    /// Reads host bytes of a data cluster (zeros past the end of the file).
    pub(crate) fn read_host(&mut self, host: u64, buf: &mut [u8]) -> Result<()> {
        read_zero_filled_at(&self.file, &self.path, buf, host, "reading data")?;
        self.stats.bytes_read += buf.len() as u64;
        Ok(())
    }

    /// Writes host bytes inside an allocated data cluster. A cluster that starts past the end
    /// of the file was never allocated by a writer: the entry pointing there is corrupt (and
    /// writing there would grow the file, and the allocator after it, without bound).
    pub(crate) fn write_host(&mut self, host: u64, buf: &[u8]) -> Result<()> {
        self.ensure_writable()?;
        let cluster = host - host % self.cluster_size();
        if cluster >= self.file_len {
            return Err(Error::corrupt(
                &self.path,
                format!("data cluster at {cluster:#x} is beyond the end of the file"),
            ));
        }
        self.pwrite(buf, host, "writing data")?;
        self.file_len = self.file_len.max(host + buf.len() as u64);
        self.stats.bytes_written += buf.len() as u64;
        Ok(())
    }

    /// Returns the L2 table for `l1i`, allocating an empty one if needed.
    fn ensure_l2(&mut self, l1i: u64) -> Result<u64> {
        if let Some(off) = self.l2_offset(l1i)? {
            return Ok(off);
        }
        if l1i as usize >= self.l1.len() {
            return Err(Error::corrupt(
                &self.path,
                format!(
                    "L1 index {l1i} beyond the L1 table ({} entries)",
                    self.l1.len()
                ),
            ));
        }
        // Order: refcount (in alloc_cluster) → zeroed table → L1 entry.
        let off = self.alloc_cluster()?;
        let zeros = vec![0u8; self.cluster_size() as usize];
        self.pwrite(&zeros, off, "writing a new L2 table")?;
        self.barrier()?;
        let entry = encode_l1(off);
        self.pwrite(
            &entry.to_be_bytes(),
            self.header.l1_table_offset + l1i * 8,
            "writing an L1 entry",
        )?;
        self.l1[l1i as usize] = entry;
        self.l2_cache
            .insert(off, vec![0u64; self.geo.l2_entries() as usize]);
        self.stats.metadata_clusters_allocated += 1;
        Ok(off)
    }

    /// Makes the guest cluster at `guest` (cluster aligned) a data cluster holding `init`,
    /// and returns its host offset. The cluster must currently be unallocated or zero.
    pub(crate) fn install_cluster(&mut self, guest: u64, init: ClusterInit<'_>) -> Result<u64> {
        self.ensure_writable()?;
        let cs = self.cluster_size();
        let (l1i, l2i, _) = self.geo.split_guest(guest);
        let l2_off = self.ensure_l2(l1i)?;
        let reuse = match self.lookup(guest)? {
            L2Entry::Zero {
                shared: true,
                prealloc: Some(host),
            } => {
                return Err(Error::unsupported(
                    &self.path,
                    format!("writing a zero cluster whose host cluster {host:#x} is shared"),
                ))
            }
            L2Entry::Zero { prealloc, .. } => prealloc,
            L2Entry::Unallocated => None,
            other => {
                return Err(Error::corrupt(
                    &self.path,
                    format!("installing over an allocated cluster ({other:?})"),
                ))
            }
        };
        let host = match reuse {
            Some(h) => h,
            None => {
                self.stats.clusters_allocated += 1;
                self.alloc_cluster()?
            }
        };
        // The data goes in before the L2 entry that makes it visible.
        match init {
            ClusterInit::Data(data) => {
                debug_assert_eq!(data.len() as u64, cs);
                self.pwrite(data, host, "writing a data cluster")?;
            }
            ClusterInit::Zeros if reuse.is_some() => {
                let zeros = vec![0u8; cs as usize];
                self.pwrite(&zeros, host, "zeroing a data cluster")?;
            }
            ClusterInit::Zeros => {}
        }
        self.file_len = self.file_len.max(host + cs);
        self.barrier()?;
        let entry = L2Entry::encode_data(host);
        self.pwrite(
            &entry.to_be_bytes(),
            l2_off + l2i * 8,
            "writing an L2 entry",
        )?;
        self.load_l2(l2_off)?[l2i as usize] = entry;
        tracing::trace!(path = %self.path.display(), guest, host, "installed cluster");
        Ok(host)
    }

    /// Every guest cluster this file itself defines (data or zero), in guest order.
    pub(crate) fn allocated_clusters(&mut self) -> Result<Vec<(u64, L2Entry)>> {
        let mut out = Vec::new();
        let cs = self.cluster_size();
        let per_l2 = self.geo.l2_entries();
        for l1i in 0..self.l1.len() as u64 {
            let Some(l2_off) = self.l2_offset(l1i)? else {
                continue;
            };
            let table = self.load_l2(l2_off)?.clone();
            for (l2i, &raw) in table.iter().enumerate() {
                let guest = (l1i * per_l2 + l2i as u64) * cs;
                if guest >= self.header.size {
                    break;
                }
                match L2Entry::decode(raw, self.header.version) {
                    L2Entry::Unallocated => {}
                    L2Entry::Compressed => {
                        return Err(Error::unsupported(
                            &self.path,
                            format!("compressed cluster at guest offset {guest:#x}"),
                        ))
                    }
                    e => out.push((guest, e)),
                }
            }
        }
        Ok(out)
    }

    pub(crate) fn flush(&mut self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        sync_data(&self.file, &self.path)
    }
}
