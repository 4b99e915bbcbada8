//! Checkpoint stores: where the sections of a checkpoint are written and read.
//!
//! A [`Store`] names a place (a directory, a raw file or device, a memfd); `create` starts a new
//! checkpoint there and returns a [`StoreWriter`], `open` returns a [`StoreReader`] of the
//! checkpoint there. The checkpoint logic (hashing, page index, manifest, the order of
//! durability) lives in [`crate::CheckpointWriter`] and [`crate::Checkpoint`]; a store only moves
//! bytes and keeps the completion marker, so object storage can be added as another store.
//!
//! Contract of a store writer, in the order the checkpoint writer uses it:
//! 1. `write_memory` at any offset inside the memory section, from many threads at once;
//!    never called twice for one page, never called for zero pages (which must read back as
//!    zero where [`MemorySource::File::holes_read_as_zero`] says so), which are announced with
//!    `zero_memory` instead;
//! 2. `write_section` once per section (`state`, `page-index`, then `manifest`);
//! 3. `sync`: everything written so far is durable;
//! 4. `commit`: writes the completion marker and makes it durable. Before `commit` returns,
//!    readers refuse the checkpoint as incomplete.
//!
//! A writer that never reaches `commit` is told to `discard` what it wrote (by
//! [`crate::CheckpointWriter`], on failure or when dropped unfinished).
//!
//! Store files are never reached through a symbolic link: they are opened with `O_NOFOLLOW`,
//! created with `O_EXCL`, and must be regular files.

mod address;
mod dir;
mod raw;
pub(crate) mod s3;

pub use address::{AddressError, StoreAddress};
pub use dir::{DirStore, Overwrite};
pub use raw::{MemStore, RawStore};
pub use s3::{S3Error, S3Location, S3Store};

/// Opens `path` with `options`, never following a symbolic link, and checks that it is a
/// regular file (`O_NONBLOCK` keeps a planted FIFO from blocking the open).
pub(crate) fn open_regular(
    options: &mut OpenOptions,
    op: &'static str,
    path: &Path,
) -> Result<File> {
    let flags = OFlags::NOFOLLOW | OFlags::NONBLOCK;
    let file = options
        .custom_flags(flags.bits() as i32)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(code) if code == Errno::LOOP.raw_os_error() => Error::UnsafeStoreFile {
                path: path.to_path_buf(),
                what: "a symbolic link",
            },
            _ => Error::io(op, path, e),
        })?;
    let meta = file.metadata().map_err(|e| Error::io("stat", path, e))?;
    if !meta.is_file() {
        return Err(Error::UnsafeStoreFile {
            path: path.to_path_buf(),
            what: "not a regular file",
        });
    }
    Ok(file)
}

/// Reads exactly `buf.len()` bytes at `offset`, reporting a short read as truncation of
/// `section` (whose full length is `expected`).
pub(crate) fn read_exact_at(
    file: &File,
    path: &Path,
    section: &str,
    offset: u64,
    buf: &mut [u8],
) -> Result<()> {
    use std::os::unix::fs::FileExt;
    file.read_exact_at(buf, offset).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            let found = file
                .metadata()
                .map(|m| m.len().saturating_sub(offset))
                .unwrap_or(0);
            Error::Truncated {
                section: section.to_string(),
                expected: buf.len() as u64,
                found,
            }
        } else {
            Error::io("read", path, e)
        }
    })
}

use std::fmt;
use std::fs::{File, OpenOptions};
use std::ops::Range;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use rustix::fs::OFlags;
use rustix::io::Errno;

use crate::error::{Error, Result};
use crate::manifest::{Section, SectionEntry};

/// What a store must know to lay out a new checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Guest memory size in bytes; a whole, non-zero number of 4096-byte pages.
    pub mem_size: u64,
}

/// A place that holds one checkpoint.
pub trait Store: Send + Sync + fmt::Debug {
    /// Starts writing a new checkpoint here. Any previous checkpoint here stops being complete
    /// before anything else is written (or the store refuses, see [`DirStore`]).
    fn create(&self, layout: &Layout) -> Result<Box<dyn StoreWriter>>;
    /// Opens the checkpoint here for reading.
    fn open(&self) -> Result<Box<dyn StoreReader>>;
    /// The store at `address`, the parent of an incremental checkpoint here, reached the way
    /// this one is (an S3 store uses its own endpoint and credentials).
    fn parent(&self, address: &str) -> Result<Box<dyn Store>> {
        store_at(address)
    }
}

/// The store at `address` (a directory, `raw:PATH`, or `s3://` reached through the
/// environment's endpoint and credentials). A RAM store is reachable only inside the process
/// that holds it: refused.
pub fn store_at(address: &str) -> Result<Box<dyn Store>> {
    let unreachable = |reason: String| Error::ParentUnreachable {
        address: address.to_string(),
        reason,
    };
    let parsed: StoreAddress = address
        .parse()
        .map_err(|e: AddressError| unreachable(e.about("the address")))?;
    Ok(match parsed {
        StoreAddress::Dir(p) => Box::new(DirStore::new(p)),
        StoreAddress::Raw(p) => Box::new(RawStore::new(p)),
        StoreAddress::Mem(_) => {
            return Err(unreachable(
                "a RAM store exists only inside the process that holds it".into(),
            ))
        }
        StoreAddress::S3 { .. } => Box::new(S3Store::new(
            S3Location::parse(address).map_err(|e| unreachable(e.to_string()))?,
        )),
    })
}

/// Where a section was put: the file (for stores of several files) and offset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    /// File name inside the store, if the store has several files.
    pub file: Option<String>,
    /// Byte offset inside that file or device.
    pub offset: u64,
}

/// Writing side of a store. See the module documentation for the order of calls.
pub trait StoreWriter: Send + Sync + fmt::Debug {
    /// Human-readable name of the store (path), for messages.
    fn describe(&self) -> String;
    /// Where the memory section lives; its offset is 2 MiB aligned.
    fn memory_location(&self) -> Location;
    /// Positional write of whole pages at `offset` bytes into the memory section. Called
    /// concurrently from many threads (and from a forked child) for distinct pages.
    fn write_memory(&self, offset: u64, buf: &[u8]) -> Result<()>;
    /// Pages at `offset..offset + len` of the memory section were found zero and are not
    /// written. Stores that assemble memory in objects of many pages learn from it that an
    /// object is whole; others ignore it.
    fn zero_memory(&self, _offset: u64, _len: u64) -> Result<()> {
        Ok(())
    }
    /// Makes the memory section durable.
    fn sync_memory(&self) -> Result<()>;
    /// Writes a whole section (`state`, `page-index` or `manifest`).
    fn write_section(&self, section: Section, bytes: &[u8]) -> Result<Location>;
    /// Reads back a section written by this checkpoint (possibly by a forked child).
    fn read_section(&self, entry: &SectionEntry) -> Result<Vec<u8>>;
    /// Makes everything written so far durable.
    fn sync(&self) -> Result<()>;
    /// Writes the completion marker for `manifest` (whose checksum it records), after the
    /// sections `sections`, and makes it durable. Everything else must be durable already.
    fn commit(&self, sections: &[SectionEntry], manifest: &SectionEntry) -> Result<()>;
    /// Undoes an unfinished checkpoint: removes every file this checkpoint created (and no
    /// other), or leaves a single-file store marked as holding no complete checkpoint, so the
    /// store can be used again. Never called after `commit` succeeded.
    fn discard(&self) -> Result<()>;
}

/// The entry of bytes `range` of the section `entry` (from its start).
pub(crate) fn sub_entry(entry: &SectionEntry, range: Range<u64>) -> SectionEntry {
    SectionEntry {
        offset: entry.offset.saturating_add(range.start),
        length: range.end - range.start,
        checksum: None,
        ..entry.clone()
    }
}

/// Reading side of a store.
pub trait StoreReader: Send + Sync + fmt::Debug {
    /// Human-readable name of the store (path), for messages.
    fn describe(&self) -> String;
    /// The manifest's entry from the completion marker, or `None` if there is no valid
    /// marker (the checkpoint is incomplete).
    fn read_commit(&self) -> Result<Option<SectionEntry>>;
    /// Reads a whole section; a short section is [`crate::Error::Truncated`] naming it.
    fn read_section(&self, entry: &SectionEntry) -> Result<Vec<u8>>;
    /// Reads bytes `range` of a section (from its start), unverified: the caller checks them
    /// against checksums of its own. By default the whole section is read.
    fn read_section_range(&self, entry: &SectionEntry, range: Range<u64>) -> Result<Vec<u8>> {
        let bytes = self.read_section(entry)?;
        bytes
            .get(range.start as usize..range.end as usize)
            .map(<[u8]>::to_vec)
            .ok_or_else(|| crate::Error::Truncated {
                section: entry.name.clone(),
                expected: range.end,
                found: bytes.len() as u64,
            })
    }
    /// Checks that the memory section is where the store keeps it and is not truncated.
    fn check_memory(&self, entry: &SectionEntry) -> Result<()>;
    /// Reads `buf.len()` bytes at `offset` bytes into the memory section.
    fn read_memory(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// Says that the memory section will be read mostly in ascending order, so that a store on
    /// a device reads further ahead of its reader. A hint: by default, and wherever it fails,
    /// nothing happens.
    fn memory_read_in_order(&self) {}
    /// How a restore can map the memory section `entry`.
    fn memory_source(&self, entry: &SectionEntry) -> Result<MemorySource>;
}

/// Tells the kernel that `file` will be read in ascending order (`POSIX_FADV_SEQUENTIAL`): its
/// read-ahead window for this open file doubles, and reads keep the device busy ahead of the
/// reader. Explicit read-ahead (`POSIX_FADV_WILLNEED`) was measured slower here: it fills the
/// page cache in small pages, and reading 256 MiB through it took 1.7 times as long. A hint: a
/// failure only means the kernel reads ahead as it would anyway.
pub(crate) fn reads_in_order(file: &File) {
    let _ = rustix::fs::fadvise(file, 0, None, rustix::fs::Advice::Sequential);
}

/// How a restore gets at guest memory.
#[derive(Debug)]
#[non_exhaustive]
pub enum MemorySource {
    /// The memory image is a range of a file: `mmap(MAP_PRIVATE)` of `len` bytes at `offset`
    /// (2 MiB aligned) gives page i at `i * 4096`.
    File {
        /// The file or device (opened read-only, or the memfd itself).
        file: File,
        /// Offset of page 0.
        offset: u64,
        /// Length of the memory image (`mem_size`).
        len: u64,
        /// Whether pages the page index marks zero read as zero in the file. When `false`
        /// (a raw block device), such pages may hold stale bytes: map
        /// [`crate::PageIndex::zero_runs`] as anonymous memory over them.
        holes_read_as_zero: bool,
    },
    /// Not mappable (e.g. object storage): serve pages with [`crate::Checkpoint::read_page`],
    /// for example from a userfaultfd missing-page handler.
    Pages,
}
