//! The raw store (one file or block device, no filesystem) and the memory store (a memfd with
//! the same layout).
//!
//! Layout (all integers little-endian, every region 4 KiB aligned):
//!
//! ```text
//! 0            superblock (4 KiB): geometry, then at commit the section table
//! 4096         commit record (4 KiB): the completion marker, written last
//! 8192         page-index region, fixed size (known from the memory size), so a forked child
//!              can write it without coordinating with its parent
//! mem_offset   memory image, 2 MiB aligned, exactly mem_size bytes, page i at mem_offset+i*4096
//! tail_start   = mem_offset + mem_size: state, then manifest, each 4 KiB aligned
//! ```
//!
//! Superblock: magic `COWVMRAW` (0), layout version u32 (8), flags u32 (12; bit 0: zero pages
//! read as zero), page size u32 (16), reserved u32 (20), mem_size (24), mem_offset (32),
//! page-index offset (40), page-index region length (48), tail_start (56), capacity at create
//! (64, 0 if growable), then state, page-index, manifest as (offset, length, checksum) at 72,
//! 96, 120; xxh3 of bytes 0..4088 at 4088.
//!
//! Commit record: magic `COWVMEND` (0), version u32 (8), reserved u32 (12), superblock checksum
//! (16), manifest offset (24), length (32), checksum (40), xxh3 of bytes 0..48 at 48. A missing,
//! torn or stale commit record means "incomplete".
//!
//! A raw store is written only where a superblock already is: [`RawStore::init`] writes the
//! first one, with a memory size of 0, meaning "initialised, holds no checkpoint" (a checkpoint
//! that fails is discarded back to that state). A file or device without a superblock is never
//! written as a store, whatever its size.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Seek, SeekFrom};
use std::ops::Range;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rustix::fs::{fallocate, memfd_create, FallocateFlags, MemfdFlags};

use super::{
    read_exact_at, sub_entry, Layout, Location, MemorySource, Store, StoreReader, StoreWriter,
};
use crate::checksum::{checksum, Checksum};
use crate::error::{Error, Result};
use crate::manifest::{Section, SectionEntry};
use crate::page_index::PageIndex;
use crate::{MEMORY_ALIGN, PAGE_SIZE};

const BLOCK: u64 = 4096;
const SB_MAGIC: &[u8; 8] = b"COWVMRAW";
const COMMIT_MAGIC: &[u8; 8] = b"COWVMEND";
const RAW_VERSION: u32 = 1;
const COMMIT_OFFSET: u64 = BLOCK;
const PAGE_INDEX_OFFSET: u64 = 2 * BLOCK;
const FLAG_HOLES_ZERO: u32 = 1;
/// Offsets of the (offset, length, checksum) triples of the section table.
const TABLE: [(Section, usize); 3] = [
    (Section::State, 72),
    (Section::PageIndex, 96),
    (Section::Manifest, 120),
];

fn round_up(x: u64, to: u64) -> u64 {
    x.div_ceil(to) * to
}

/// Where everything goes, a pure function of the memory size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Geometry {
    mem_size: u64,
    page_index_region: u64,
    mem_offset: u64,
}

impl Geometry {
    fn new(mem_size: u64) -> Geometry {
        let page_index_region =
            round_up(PageIndex::encoded_len(mem_size / PAGE_SIZE as u64), BLOCK);
        Geometry {
            mem_size,
            page_index_region,
            mem_offset: round_up(PAGE_INDEX_OFFSET + page_index_region, MEMORY_ALIGN),
        }
    }

    fn tail_start(&self) -> u64 {
        self.mem_offset + self.mem_size
    }
}

/// The superblock, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Superblock {
    flags: u32,
    geometry: Geometry,
    capacity: u64,
    /// (offset, length, checksum) per section in [`TABLE`] order; zero until commit.
    sections: [(u64, u64, u64); 3],
}

impl Superblock {
    /// The superblock of an initialised store that holds no checkpoint.
    fn empty(capacity: u64) -> Superblock {
        Superblock {
            flags: 0,
            geometry: Geometry::new(0),
            capacity,
            sections: [(0, 0, 0); 3],
        }
    }

    fn is_empty(&self) -> bool {
        self.geometry.mem_size == 0
    }

    fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; BLOCK as usize];
        let put = |b: &mut [u8], at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_le_bytes());
        b[0..8].copy_from_slice(SB_MAGIC);
        b[8..12].copy_from_slice(&RAW_VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&self.flags.to_le_bytes());
        b[16..20].copy_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
        let g = &self.geometry;
        put(&mut b, 24, g.mem_size);
        put(&mut b, 32, g.mem_offset);
        put(&mut b, 40, PAGE_INDEX_OFFSET);
        put(&mut b, 48, g.page_index_region);
        put(&mut b, 56, g.tail_start());
        put(&mut b, 64, self.capacity);
        for ((_, at), (off, len, sum)) in TABLE.iter().zip(self.sections) {
            put(&mut b, *at, off);
            put(&mut b, at + 8, len);
            put(&mut b, at + 16, sum);
        }
        let sum = checksum(&b[..4088]);
        put(&mut b, 4088, sum);
        b
    }

    fn decode(b: &[u8]) -> Result<Superblock> {
        let u32_at = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"));
        let u64_at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
        if &b[0..8] != SB_MAGIC {
            return Err(Error::BadMagic {
                what: "raw store superblock",
                found: String::from_utf8_lossy(&b[0..8]).into_owned(),
            });
        }
        let (recorded, actual) = (u64_at(4088), checksum(&b[..4088]));
        if recorded != actual {
            return Err(Error::ChecksumMismatch {
                section: "superblock".into(),
                expected: recorded,
                actual,
            });
        }
        if u32_at(8) > RAW_VERSION {
            return Err(Error::UnsupportedVersion {
                what: "raw store layout",
                found: u32_at(8),
                supported: RAW_VERSION,
            });
        }
        let mem_size = u64_at(24);
        // A memory size of 0 is the empty store that `RawStore::init` writes.
        if u32_at(16) as usize != PAGE_SIZE || mem_size % PAGE_SIZE as u64 != 0 {
            return Err(Error::corrupt(
                "raw store superblock",
                "bad memory geometry",
            ));
        }
        let geometry = Geometry::new(mem_size);
        if u64_at(32) != geometry.mem_offset
            || u64_at(40) != PAGE_INDEX_OFFSET
            || u64_at(48) != geometry.page_index_region
            || u64_at(56) != geometry.tail_start()
        {
            return Err(Error::corrupt(
                "raw store superblock",
                "inconsistent region offsets",
            ));
        }
        let mut sections = [(0, 0, 0); 3];
        for (slot, (_, at)) in sections.iter_mut().zip(TABLE) {
            *slot = (u64_at(at), u64_at(at + 8), u64_at(at + 16));
        }
        Ok(Superblock {
            flags: u32_at(12),
            geometry,
            capacity: u64_at(64),
            sections,
        })
    }

    fn checksum(&self) -> u64 {
        let b = self.encode();
        u64::from_le_bytes(b[4088..].try_into().expect("8 bytes"))
    }
}

fn encode_commit(superblock_checksum: u64, manifest: &SectionEntry, manifest_sum: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK as usize];
    b[0..8].copy_from_slice(COMMIT_MAGIC);
    b[8..12].copy_from_slice(&RAW_VERSION.to_le_bytes());
    for (at, v) in [
        (16, superblock_checksum),
        (24, manifest.offset),
        (32, manifest.length),
        (40, manifest_sum),
    ] {
        b[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }
    let sum = checksum(&b[..48]);
    b[48..56].copy_from_slice(&sum.to_le_bytes());
    b
}

/// Size of a file or block device (a block device's metadata length is 0).
fn size_of(file: &File, path: &Path) -> Result<u64> {
    let mut f = file;
    f.seek(SeekFrom::End(0))
        .map_err(|e| Error::io("size", path, e))
}

/// Writes the superblock of an empty store (after erasing any commit record) and makes it
/// durable.
fn write_empty(file: &File, path: &Path, capacity: u64) -> Result<()> {
    file.write_all_at(&[0u8; BLOCK as usize], COMMIT_OFFSET)
        .and_then(|()| file.write_all_at(&Superblock::empty(capacity).encode(), 0))
        .and_then(|()| file.sync_all())
        .map_err(|e| Error::io_section("write", "superblock", path, e))
}

/// A checkpoint in one raw file or block device, without a filesystem.
#[derive(Clone, Debug)]
pub struct RawStore {
    path: PathBuf,
}

impl RawStore {
    /// A store on the existing file or block device `path`, initialised by [`RawStore::init`];
    /// its size is the capacity.
    pub fn new(path: impl Into<PathBuf>) -> RawStore {
        RawStore { path: path.into() }
    }

    /// Makes a new, empty raw store at `path`: creates a sparse regular file of `size` bytes,
    /// or takes an existing empty regular file (extended to `size`, which is then optional).
    /// Refuses anything holding data — a non-empty file, a block device — so no user data is
    /// ever overwritten; see [`RawStore::init_overwriting`] for those.
    pub fn init(path: impl Into<PathBuf>, size: Option<u64>) -> Result<RawStore> {
        Self::init_with(path.into(), size, false)
    }

    /// As [`RawStore::init`], but also over an existing non-empty regular file (resized to
    /// `size` if given) or a block device (whose size is its own; `size` must be `None`). Every
    /// byte there is given up: the caller has asked for it explicitly.
    pub fn init_overwriting(path: impl Into<PathBuf>, size: Option<u64>) -> Result<RawStore> {
        Self::init_with(path.into(), size, true)
    }

    /// A new sparse regular file of `capacity` bytes initialised as an empty store
    /// ([`RawStore::init`] with a size).
    pub fn create_file(path: impl Into<PathBuf>, capacity: u64) -> Result<RawStore> {
        Self::init(path, Some(capacity))
    }

    fn init_with(path: PathBuf, size: Option<u64>, overwrite: bool) -> Result<RawStore> {
        let refuse = |reason: String| Error::RawInitRefused {
            path: path.clone(),
            reason,
        };
        // Room for the superblock and the commit record; whether a checkpoint fits is checked
        // when one is written.
        let minimum = PAGE_INDEX_OFFSET;
        if size.is_some_and(|s| s < minimum) {
            return Err(refuse(format!("a store needs at least {minimum} bytes")));
        }
        let (file, created) = match fs::metadata(&path) {
            Err(e) if e.kind() == ErrorKind::NotFound => {
                if size.is_none() {
                    return Err(refuse("a new file needs a size".into()));
                }
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(&path)
                    .map_err(|e| Error::io("create", &path, e))?;
                (file, true)
            }
            Err(e) => return Err(Error::io("stat", &path, e)),
            Ok(m) if m.is_file() => {
                if m.len() > 0 && !overwrite {
                    return Err(refuse(format!(
                        "it holds {} bytes of data (initialise it only to overwrite them)",
                        m.len()
                    )));
                }
                if m.len() == 0 && size.is_none() {
                    return Err(refuse("an empty file needs a size".into()));
                }
                (Self::open_rw(&path)?, false)
            }
            Ok(m) if m.file_type().is_block_device() => {
                if !overwrite {
                    return Err(refuse(
                        "a block device is initialised only to overwrite its content".into(),
                    ));
                }
                if size.is_some() {
                    return Err(refuse("a block device keeps its own size".into()));
                }
                (Self::open_rw(&path)?, false)
            }
            Ok(_) => return Err(refuse("not a regular file or block device".into())),
        };
        let result = Self::format(&file, &path, size, minimum);
        if result.is_err() && created {
            // The error being reported is the formatting's; the file was ours.
            let _ = fs::remove_file(&path);
        }
        result.map(|()| RawStore { path })
    }

    /// Sizes a file (not a device) to `size` and writes the empty superblock.
    fn format(file: &File, path: &Path, size: Option<u64>, minimum: u64) -> Result<()> {
        if let Some(size) = size {
            file.set_len(size)
                .map_err(|e| Error::io("extend", path, e))?;
        }
        let capacity = size_of(file, path)?;
        if capacity < minimum {
            return Err(Error::StoreTooSmall {
                path: path.to_path_buf(),
                needed: minimum,
                available: capacity,
            });
        }
        write_empty(file, path, capacity)
    }

    fn open_rw(path: &Path) -> Result<File> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| Error::io("open", path, e))
    }

    /// Bytes a raw store needs for memory of `mem_size` bytes plus `state_len` bytes of state
    /// and `manifest_len` bytes of manifest.
    pub fn needed_capacity(mem_size: u64, state_len: u64, manifest_len: u64) -> u64 {
        Geometry::new(mem_size).tail_start()
            + round_up(state_len, BLOCK)
            + round_up(manifest_len, BLOCK)
    }

    /// The path of the file or device.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Store for RawStore {
    fn create(&self, layout: &Layout) -> Result<Box<dyn StoreWriter>> {
        let file = Self::open_rw(&self.path)?;
        // Written only where a store was initialised: anything else may be someone's data.
        let mut block = vec![0u8; BLOCK as usize];
        read_exact_at(&file, &self.path, "superblock", 0, &mut block)
            .and_then(|()| Superblock::decode(&block))
            .map_err(|e| match e {
                Error::UnsupportedVersion { .. } => e,
                e => Error::NotRawStore {
                    path: self.path.clone(),
                    header: Box::new(e),
                },
            })?;
        let capacity = size_of(&file, &self.path)?;
        let geometry = Geometry::new(layout.mem_size);
        // At least one block each for the state and the manifest.
        let needed = geometry.tail_start() + 2 * BLOCK;
        if capacity < needed {
            return Err(Error::StoreTooSmall {
                path: self.path.clone(),
                needed,
                available: capacity,
            });
        }
        let is_block_device = file
            .metadata()
            .map_err(|e| Error::io("stat", &self.path, e))?
            .file_type()
            .is_block_device();
        RawWriter::start(self.path.clone(), file, geometry, Some(capacity), |file| {
            // On a regular file, punching a hole over the memory region makes zero pages read
            // as zero (so a restore can map the image as it is). A block device keeps stale
            // bytes: the reader then relies on the page index alone.
            Ok(!is_block_device
                && fallocate(
                    file,
                    FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
                    geometry.mem_offset,
                    geometry.mem_size,
                )
                .is_ok())
        })
    }

    fn open(&self) -> Result<Box<dyn StoreReader>> {
        let file = File::open(&self.path).map_err(|e| Error::io("open", &self.path, e))?;
        RawReader::open(self.path.clone(), file)
    }
}

/// A checkpoint in RAM: a memfd with the raw store's layout, so another VM in the same host can
/// `mmap` its memory image (pass the fd, e.g. over a Unix socket, or use `/proc/<pid>/fd`).
#[derive(Debug)]
pub struct MemStore {
    file: File,
    path: PathBuf,
}

impl MemStore {
    /// A new, empty memory store.
    pub fn new() -> Result<MemStore> {
        let path = PathBuf::from("memfd:cowvm-checkpoint");
        let fd = memfd_create("cowvm-checkpoint", MemfdFlags::CLOEXEC)
            .map_err(|e| Error::io("memfd_create", &path, e.into()))?;
        Ok(MemStore {
            file: File::from(fd),
            path,
        })
    }

    /// A memory store over an existing memfd (received from another process).
    pub fn from_file(file: File) -> MemStore {
        MemStore {
            file,
            path: PathBuf::from("memfd:cowvm-checkpoint"),
        }
    }

    /// The memfd.
    pub fn file(&self) -> &File {
        &self.file
    }

    fn dup(&self) -> Result<File> {
        self.file
            .try_clone()
            .map_err(|e| Error::io("duplicate", &self.path, e))
    }
}

impl Store for MemStore {
    fn create(&self, layout: &Layout) -> Result<Box<dyn StoreWriter>> {
        let file = self.dup()?;
        let geometry = Geometry::new(layout.mem_size);
        RawWriter::start(self.path.clone(), file, geometry, None, |file| {
            // Dropping all old content and re-extending leaves holes that read as zero (and
            // cost no RAM) wherever a zero page is never written.
            file.set_len(0)
                .and_then(|()| file.set_len(geometry.tail_start()))
                .map_err(|e| Error::io_section("extend", "memory", Path::new("memfd"), e))?;
            Ok(true)
        })
    }

    fn open(&self) -> Result<Box<dyn StoreReader>> {
        RawReader::open(self.path.clone(), self.dup()?)
    }
}

#[derive(Debug)]
struct RawWriter {
    path: PathBuf,
    file: File,
    geometry: Geometry,
    /// `None`: the file grows as needed (memfd).
    capacity: Option<u64>,
    flags: u32,
    /// Next free offset in the tail (state, manifest).
    tail: Mutex<u64>,
}

impl RawWriter {
    fn start(
        path: PathBuf,
        file: File,
        geometry: Geometry,
        capacity: Option<u64>,
        prepare_memory: impl FnOnce(&File) -> Result<bool>,
    ) -> Result<Box<dyn StoreWriter>> {
        // Order matters: the old commit record is erased and made durable before anything else
        // is overwritten, so an interruption from here on leaves an incomplete checkpoint,
        // never a "complete" mix of old and new.
        file.write_all_at(&[0u8; BLOCK as usize], COMMIT_OFFSET)
            .and_then(|()| file.sync_data())
            .map_err(|e| Error::io_section("write", "commit record", &path, e))?;
        let holes_zero = prepare_memory(&file)?;
        let flags = if holes_zero { FLAG_HOLES_ZERO } else { 0 };
        let superblock = Superblock {
            flags,
            geometry,
            capacity: capacity.unwrap_or(0),
            sections: [(0, 0, 0); 3],
        };
        file.write_all_at(&superblock.encode(), 0)
            .map_err(|e| Error::io_section("write", "superblock", &path, e))?;
        Ok(Box::new(RawWriter {
            path,
            file,
            geometry,
            capacity,
            flags,
            tail: Mutex::new(geometry.tail_start()),
        }))
    }

    fn check_capacity(&self, end: u64) -> Result<()> {
        match self.capacity {
            Some(available) if end > available => Err(Error::StoreTooSmall {
                path: self.path.clone(),
                needed: end,
                available,
            }),
            _ => Ok(()),
        }
    }
}

impl StoreWriter for RawWriter {
    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    fn memory_location(&self) -> Location {
        Location {
            file: None,
            offset: self.geometry.mem_offset,
        }
    }

    fn write_memory(&self, offset: u64, buf: &[u8]) -> Result<()> {
        debug_assert!(offset + buf.len() as u64 <= self.geometry.mem_size);
        self.file
            .write_all_at(buf, self.geometry.mem_offset + offset)
            .map_err(|e| Error::io_section("write", "memory", &self.path, e))
    }

    fn sync_memory(&self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| Error::io_section("sync", "memory", &self.path, e))
    }

    fn write_section(&self, section: Section, bytes: &[u8]) -> Result<Location> {
        let len = bytes.len() as u64;
        let offset = match section {
            Section::PageIndex => {
                if len > self.geometry.page_index_region {
                    return Err(Error::corrupt(
                        "section page-index",
                        format!(
                            "{len} bytes do not fit its {}-byte region",
                            self.geometry.page_index_region
                        ),
                    ));
                }
                PAGE_INDEX_OFFSET
            }
            Section::State | Section::Manifest => {
                let mut tail = self.tail.lock().unwrap_or_else(|e| e.into_inner());
                let offset = *tail;
                self.check_capacity(offset + len)?;
                *tail = round_up(offset + len, BLOCK);
                offset
            }
            Section::Memory => {
                return Err(Error::corrupt(
                    "section memory",
                    "written page by page, not whole",
                ))
            }
        };
        self.file
            .write_all_at(bytes, offset)
            .map_err(|e| Error::io_section("write", section.name(), &self.path, e))?;
        Ok(Location { file: None, offset })
    }

    fn read_section(&self, entry: &SectionEntry) -> Result<Vec<u8>> {
        let mut buf =
            vec![0u8; usize::try_from(entry.length).expect("section length fits in memory")];
        read_exact_at(&self.file, &self.path, &entry.name, entry.offset, &mut buf)?;
        Ok(buf)
    }

    fn sync(&self) -> Result<()> {
        self.file
            .sync_all()
            .map_err(|e| Error::io("sync", &self.path, e))
    }

    fn commit(&self, sections: &[SectionEntry], manifest: &SectionEntry) -> Result<()> {
        let mut table = [(0, 0, 0); 3];
        for (slot, (section, _)) in table.iter_mut().zip(TABLE) {
            let entry = if section == Section::Manifest {
                Some(manifest)
            } else {
                sections.iter().find(|e| e.name == section.name())
            };
            if let Some(e) = entry {
                *slot = (e.offset, e.length, e.checksum.map_or(0, |c| c.0));
            }
        }
        let superblock = Superblock {
            flags: self.flags,
            geometry: self.geometry,
            capacity: self.capacity.unwrap_or(0),
            sections: table,
        };
        let manifest_sum = manifest.checksum.map_or(0, |c| c.0);
        // Superblock durable first, then the commit record that names its checksum: a reader
        // that sees the commit record sees the final superblock.
        self.file
            .write_all_at(&superblock.encode(), 0)
            .and_then(|()| self.file.sync_data())
            .map_err(|e| Error::io_section("write", "superblock", &self.path, e))?;
        self.file
            .write_all_at(
                &encode_commit(superblock.checksum(), manifest, manifest_sum),
                COMMIT_OFFSET,
            )
            .and_then(|()| self.file.sync_data())
            .map_err(|e| Error::io_section("write", "commit record", &self.path, e))
    }

    fn discard(&self) -> Result<()> {
        match self.capacity {
            Some(capacity) => {
                write_empty(&self.file, &self.path, capacity)?;
                if self.flags & FLAG_HOLES_ZERO != 0 {
                    // A regular file: give the space back. Failing to is no error, the store
                    // is reusable either way.
                    let _ = fallocate(
                        &self.file,
                        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
                        PAGE_INDEX_OFFSET,
                        capacity - PAGE_INDEX_OFFSET,
                    );
                }
                Ok(())
            }
            // A memfd: its RAM is freed by shrinking it to the empty superblock.
            None => self
                .file
                .set_len(PAGE_INDEX_OFFSET)
                .map_err(|e| Error::io("truncate", &self.path, e))
                .and_then(|()| write_empty(&self.file, &self.path, 0)),
        }
    }
}

#[derive(Debug)]
struct RawReader {
    path: PathBuf,
    file: File,
    superblock: Superblock,
    size: u64,
}

impl RawReader {
    fn open(path: PathBuf, file: File) -> Result<Box<dyn StoreReader>> {
        let mut block = vec![0u8; BLOCK as usize];
        read_exact_at(&file, &path, "superblock", 0, &mut block)?;
        let superblock = Superblock::decode(&block)?;
        let size = size_of(&file, &path)?;
        Ok(Box::new(RawReader {
            path,
            file,
            superblock,
            size,
        }))
    }

    fn check_bounds(&self, entry: &SectionEntry) -> Result<()> {
        let end = entry.offset.saturating_add(entry.length);
        if end > self.size {
            return Err(Error::Truncated {
                section: entry.name.clone(),
                expected: entry.length,
                found: self.size.saturating_sub(entry.offset),
            });
        }
        Ok(())
    }
}

impl StoreReader for RawReader {
    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    fn read_commit(&self) -> Result<Option<SectionEntry>> {
        let mut b = vec![0u8; BLOCK as usize];
        read_exact_at(
            &self.file,
            &self.path,
            "commit record",
            COMMIT_OFFSET,
            &mut b,
        )?;
        let u64_at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
        // Empty, absent, torn, or left from another superblock: not committed.
        if self.superblock.is_empty()
            || &b[0..8] != COMMIT_MAGIC
            || u64_at(48) != checksum(&b[..48])
            || u64_at(16) != self.superblock.checksum()
        {
            return Ok(None);
        }
        let entry = SectionEntry {
            name: Section::Manifest.name().to_string(),
            file: None,
            offset: u64_at(24),
            length: u64_at(32),
            checksum: Some(Checksum(u64_at(40))),
        };
        let (off, len, sum) = self.superblock.sections[2];
        if (off, len, sum) != (entry.offset, entry.length, u64_at(40)) {
            return Err(Error::corrupt(
                "raw store superblock",
                "manifest entry differs from the commit record",
            ));
        }
        Ok(Some(entry))
    }

    fn read_section(&self, entry: &SectionEntry) -> Result<Vec<u8>> {
        self.read_section_range(entry, 0..entry.length)
    }

    fn read_section_range(&self, entry: &SectionEntry, range: Range<u64>) -> Result<Vec<u8>> {
        if let Some((_, i)) = TABLE
            .iter()
            .zip(0..)
            .find(|((s, _), _)| s.name() == entry.name)
        {
            let (off, len, sum) = self.superblock.sections[i];
            let recorded = (
                entry.offset,
                entry.length,
                entry.checksum.map_or(0, |c| c.0),
            );
            if (off, len, sum) != recorded {
                return Err(Error::corrupt(
                    format!("section {}", entry.name),
                    "manifest and raw store superblock disagree on its place or checksum",
                ));
            }
        }
        self.check_bounds(entry)?;
        let part = sub_entry(entry, range);
        let mut buf =
            vec![0u8; usize::try_from(part.length).expect("section length fits in memory")];
        read_exact_at(&self.file, &self.path, &entry.name, part.offset, &mut buf)?;
        Ok(buf)
    }

    fn check_memory(&self, entry: &SectionEntry) -> Result<()> {
        let g = &self.superblock.geometry;
        if entry.offset != g.mem_offset || entry.length != g.mem_size {
            return Err(Error::corrupt(
                "section memory",
                "manifest and raw store superblock disagree on its place",
            ));
        }
        self.check_bounds(entry)
    }

    fn read_memory(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        read_exact_at(
            &self.file,
            &self.path,
            "memory",
            self.superblock.geometry.mem_offset + offset,
            buf,
        )
    }

    fn memory_read_in_order(&self) {
        super::reads_in_order(&self.file);
    }

    fn memory_source(&self, entry: &SectionEntry) -> Result<MemorySource> {
        let file = self
            .file
            .try_clone()
            .map_err(|e| Error::io("duplicate", &self.path, e))?;
        Ok(MemorySource::File {
            file,
            offset: entry.offset,
            len: entry.length,
            holes_read_as_zero: self.superblock.flags & FLAG_HOLES_ZERO != 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_is_aligned() {
        for mem in [4096, 1 << 20, 1 << 30, (4 << 30) + 4096 * 3] {
            let g = Geometry::new(mem);
            assert_eq!(g.mem_offset % MEMORY_ALIGN, 0);
            assert!(g.mem_offset >= PAGE_INDEX_OFFSET + g.page_index_region);
            assert!(g.page_index_region >= PageIndex::encoded_len(mem / 4096));
        }
    }

    #[test]
    fn superblock_round_trip() {
        let sb = Superblock {
            flags: 1,
            geometry: Geometry::new(1 << 20),
            capacity: 99 << 20,
            sections: [(1, 2, 3), (4, 5, 6), (7, 8, 9)],
        };
        let b = sb.encode();
        assert_eq!(Superblock::decode(&b).unwrap(), sb);
        let mut bad = b.clone();
        bad[100] ^= 1;
        assert!(matches!(
            Superblock::decode(&bad),
            Err(Error::ChecksumMismatch { .. })
        ));
        bad = b;
        bad[0] = b'X';
        assert!(matches!(
            Superblock::decode(&bad),
            Err(Error::BadMagic { .. })
        ));
    }
}
