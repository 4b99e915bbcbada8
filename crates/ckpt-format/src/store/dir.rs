//! The directory store (the default): one file per section.
//!
//! ```text
//! <dir>/manifest.json   the manifest (JSON)
//! <dir>/state.bin       opaque device state
//! <dir>/memory.img      memory image, sparse: page i at byte i*4096, zero pages are holes
//! <dir>/page-index.bin  per-page state and hash
//! <dir>/COMPLETE        completion marker, written last (by rename), holding the manifest's
//!                       length and checksum
//! ```
//!
//! The directory may be reached through symbolic links, but none of them may lead into /proc,
//! /sys or /dev; the files in it are never symbolic links (see [`super`]). A checkpoint that
//! fails before its marker removes the files it wrote; the directory stays, empty of them.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};
use std::sync::OnceLock;

use super::{
    open_regular, read_exact_at, sub_entry, Layout, Location, MemorySource, Store, StoreReader,
    StoreWriter,
};
use crate::checksum::Checksum;
use crate::error::{Error, Result};
use crate::manifest::{Section, SectionEntry};

const MANIFEST: &str = "manifest.json";
const STATE: &str = "state.bin";
const MEMORY: &str = "memory.img";
const PAGE_INDEX: &str = "page-index.bin";
const COMPLETE: &str = "COMPLETE";
const COMPLETE_TMP: &str = "COMPLETE.tmp";
const MARKER_HEADER: &str = "cowvm-checkpoint complete";
/// Every name a checkpoint may leave in its directory, temporary files included.
const ALL_FILES: [&str; 6] = [MANIFEST, STATE, MEMORY, PAGE_INDEX, COMPLETE, COMPLETE_TMP];
/// Pseudo-filesystems a directory store never writes into nor reads from.
const FORBIDDEN_ROOTS: [&str; 3] = ["/proc", "/sys", "/dev"];
/// Symbolic links followed while resolving a store directory, as the kernel allows.
const MAX_LINKS: u32 = 40;

/// What [`DirStore::create`](Store::create) may overwrite.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Overwrite {
    /// Refuse a directory that holds any checkpoint file (the default).
    #[default]
    Never,
    /// Replace an incomplete checkpoint (interrupted writing); refuse a complete one.
    Incomplete,
    /// Replace any checkpoint. The old one is first made durably incomplete.
    Any,
}

/// A checkpoint stored as files in a directory.
#[derive(Clone, Debug)]
pub struct DirStore {
    dir: PathBuf,
    overwrite: Overwrite,
}

impl DirStore {
    /// A store in directory `dir` (created on write if missing).
    pub fn new(dir: impl Into<PathBuf>) -> DirStore {
        DirStore {
            dir: dir.into(),
            overwrite: Overwrite::Never,
        }
    }

    /// Sets what `create` may overwrite.
    pub fn overwrite(mut self, overwrite: Overwrite) -> DirStore {
        self.overwrite = overwrite;
        self
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Names of the files of a directory checkpoint, marker last.
    pub const FILES: [&'static str; 5] = [MANIFEST, STATE, MEMORY, PAGE_INDEX, COMPLETE];

    /// Whether the directory holds a complete checkpoint (a completion marker).
    pub fn is_complete(&self) -> bool {
        fs::symlink_metadata(self.dir.join(COMPLETE)).is_ok_and(|m| m.is_file())
    }

    /// Deletes the checkpoint's files, and the directory if nothing else is left in it (other
    /// files are not the store's to delete). The completion marker goes first (synced):
    /// interrupted at any point, the directory holds an incomplete checkpoint, never one
    /// whose files are partly gone.
    pub fn delete(&self) -> Result<()> {
        remove_if_present(&self.dir.join(COMPLETE))?;
        sync_dir(&self.dir)?;
        for name in ALL_FILES {
            remove_if_present(&self.dir.join(name))?;
        }
        self.remove_if_empty()
    }

    /// Removes the directory if it is empty; a directory that still holds files stays.
    pub fn remove_if_empty(&self) -> Result<()> {
        match fs::remove_dir(&self.dir) {
            Err(e) if matches!(e.kind(), ErrorKind::DirectoryNotEmpty | ErrorKind::NotFound) => {
                Ok(())
            }
            other => other.map_err(|e| Error::io("remove directory", &self.dir, e)),
        }
    }
}

/// Resolves `dir` one symbolic link at a time and refuses it if any step of the way lies in
/// /proc, /sys or /dev (so `/proc/self/cwd`, or a link to it, is refused although it resolves
/// elsewhere). Components that do not exist yet are taken as they are written.
fn check_store_dir(dir: &Path) -> Result<()> {
    let refuse = |reason: String| {
        Err(Error::StorePathRefused {
            path: dir.to_path_buf(),
            reason,
        })
    };
    let absolute = std::path::absolute(dir).map_err(|e| Error::io("resolve", dir, e))?;
    // Components still to resolve, the next one last.
    let mut pending: Vec<OsString> = Vec::new();
    push_components(&mut pending, &absolute);
    let mut resolved = PathBuf::from("/");
    let mut links = 0;
    while let Some(name) = pending.pop() {
        if name == ".." {
            resolved.pop();
            continue;
        }
        let next = resolved.join(&name);
        if let Some(root) = FORBIDDEN_ROOTS.iter().find(|r| next.starts_with(r)) {
            return refuse(format!("{} is under {root}", next.display()));
        }
        match fs::symlink_metadata(&next) {
            Ok(m) if m.file_type().is_symlink() => {
                links += 1;
                if links > MAX_LINKS {
                    return refuse("too many symbolic links".into());
                }
                let target = fs::read_link(&next).map_err(|e| Error::io("resolve", &next, e))?;
                if target.is_absolute() {
                    resolved = PathBuf::from("/");
                }
                push_components(&mut pending, &target);
            }
            Ok(_) => resolved = next,
            Err(e) if e.kind() == ErrorKind::NotFound => resolved = next,
            Err(e) => return Err(Error::io("resolve", &next, e)),
        }
    }
    Ok(())
}

/// Pushes the components of `path` (root and `.` dropped) so that the first is popped first.
fn push_components(pending: &mut Vec<OsString>, path: &Path) {
    let names: Vec<OsString> = path
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some("..".into()),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
        })
        .collect();
    pending.extend(names.into_iter().rev());
}

/// Whether `path` exists; a symbolic link or anything but a regular file there is refused.
fn regular_file_exists(path: &Path) -> Result<bool> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => Err(Error::UnsafeStoreFile {
            path: path.to_path_buf(),
            what: "a symbolic link",
        }),
        Ok(m) if !m.is_file() => Err(Error::UnsafeStoreFile {
            path: path.to_path_buf(),
            what: "not a regular file",
        }),
        Ok(_) => Ok(true),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
        Err(e) => Err(Error::io("stat", path, e)),
    }
}

/// Creates the new file `path` for writing: never over an existing file or link.
fn create_new(path: &Path) -> Result<File> {
    open_regular(
        OpenOptions::new().read(true).write(true).create_new(true),
        "create",
        path,
    )
}

/// Opens the existing regular file `path` for reading, never through a symbolic link.
fn open_existing(path: &Path) -> Result<File> {
    open_regular(OpenOptions::new().read(true), "open", path)
}

fn file_of(section: Section) -> &'static str {
    match section {
        Section::State => STATE,
        Section::Memory => MEMORY,
        Section::PageIndex => PAGE_INDEX,
        Section::Manifest => MANIFEST,
    }
}

fn section_named(name: &str) -> Option<Section> {
    [
        Section::State,
        Section::Memory,
        Section::PageIndex,
        Section::Manifest,
    ]
    .into_iter()
    .find(|s| s.name() == name)
}

fn remove_if_present(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != ErrorKind::NotFound => Err(Error::io("remove", path, e)),
        _ => Ok(()),
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io("sync directory", dir, e))
}

impl Store for DirStore {
    fn create(&self, layout: &Layout) -> Result<Box<dyn StoreWriter>> {
        let dir = &self.dir;
        check_store_dir(dir)?;
        fs::create_dir_all(dir).map_err(|e| Error::io("create directory", dir, e))?;
        // Again, now that it exists: a component may have appeared as a link meanwhile.
        check_store_dir(dir)?;
        let mut present = Vec::new();
        for name in ALL_FILES {
            if regular_file_exists(&dir.join(name))? {
                present.push(name);
            }
        }
        let complete = dir.join(COMPLETE);
        if present.contains(&COMPLETE) {
            if self.overwrite != Overwrite::Any {
                return Err(Error::CheckpointExists {
                    path: dir.clone(),
                    complete: true,
                });
            }
            // The old checkpoint must stop being complete, durably, before any of its files
            // is touched: a crash in between must not leave a "complete" checkpoint whose
            // memory image is half new.
            remove_if_present(&complete)?;
            sync_dir(dir)?;
        } else if self.overwrite == Overwrite::Never
            && present.iter().any(|f| Self::FILES.contains(f))
        {
            return Err(Error::CheckpointExists {
                path: dir.clone(),
                complete: false,
            });
        }
        // From here on every checkpoint name in the directory is this checkpoint's: the old
        // files are removed, and the new ones are created afresh (O_EXCL), so `discard` can
        // remove them all.
        for stale in ALL_FILES {
            remove_if_present(&dir.join(stale))?;
        }
        let mem_path = dir.join(MEMORY);
        let memory = create_new(&mem_path)?;
        let writer = DirWriter {
            dir: dir.clone(),
            direct: reopen_direct(&memory),
            memory,
            mem_path,
            mem_size: layout.mem_size,
        };
        // A new file extended to its size is one hole, so zero pages (never written) read as
        // zero.
        writer
            .memory
            .set_len(layout.mem_size)
            .map_err(|e| Error::io_section("extend", "memory", &writer.mem_path, e))
            .inspect_err(|_| {
                // The extension's own error is the one to report.
                let _ = writer.discard();
            })?;
        Ok(Box::new(writer))
    }

    fn open(&self) -> Result<Box<dyn StoreReader>> {
        check_store_dir(&self.dir)?;
        let meta = fs::metadata(&self.dir).map_err(|e| Error::io("open", &self.dir, e))?;
        if !meta.is_dir() {
            return Err(Error::corrupt(
                self.dir.display().to_string(),
                "not a directory",
            ));
        }
        Ok(Box::new(DirReader {
            dir: self.dir.clone(),
            memory: OnceLock::new(),
        }))
    }
}

#[derive(Debug)]
struct DirWriter {
    dir: PathBuf,
    mem_path: PathBuf,
    mem_size: u64,
    memory: File,
    /// The memory image again, bypassing the page cache (`O_DIRECT`), where the filesystem
    /// allows it: whole pages from page-aligned memory go through it. A buffered write costs
    /// a copy into the page cache and the filesystem's work per page, and writeback later; a
    /// direct one is handed to the device as it is, a fraction of the CPU time, which a host
    /// whose few cores also run the guest needs.
    direct: Option<File>,
}

/// Opens `file` again with `O_DIRECT` (through `/proc/self/fd`: the same file, whatever its
/// path now names), or `None` where that is not possible (no `/proc`, or a filesystem without
/// direct I/O, such as tmpfs).
fn reopen_direct(file: &File) -> Option<File> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .write(true)
        .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
        .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .ok()
}

/// Reads a section file, checking its name and length against `entry`.
/// Reads bytes `range` (from its start) of the section `entry`, checking the file holds the
/// whole section and nothing after it.
fn read_section_file(dir: &Path, entry: &SectionEntry, range: Range<u64>) -> Result<Vec<u8>> {
    let section = section_named(&entry.name)
        .filter(|s| *s != Section::Memory)
        .ok_or_else(|| Error::corrupt("manifest", format!("unknown section {:?}", entry.name)))?;
    let name = file_of(section);
    if entry.file.as_deref().is_some_and(|f| f != name) {
        return Err(Error::corrupt(
            "manifest",
            format!(
                "section {} in file {:?}, expected {name}",
                entry.name, entry.file
            ),
        ));
    }
    let path = dir.join(name);
    let file = open_existing(&path)?;
    let len = file
        .metadata()
        .map_err(|e| Error::io("stat", &path, e))?
        .len();
    let end = entry.offset.saturating_add(entry.length);
    if len < end {
        return Err(Error::Truncated {
            section: entry.name.clone(),
            expected: entry.length,
            found: len.saturating_sub(entry.offset),
        });
    }
    if len > end {
        return Err(Error::corrupt(
            format!("section {}", entry.name),
            format!("{} trailing bytes in {name}", len - end),
        ));
    }
    let part = sub_entry(entry, range);
    let mut buf = vec![0u8; usize::try_from(part.length).expect("section length fits in memory")];
    read_exact_at(&file, &path, &entry.name, part.offset, &mut buf)?;
    Ok(buf)
}

impl StoreWriter for DirWriter {
    fn describe(&self) -> String {
        self.dir.display().to_string()
    }

    fn memory_location(&self) -> Location {
        Location {
            file: Some(MEMORY.to_string()),
            offset: 0,
        }
    }

    fn write_memory(&self, offset: u64, buf: &[u8]) -> Result<()> {
        debug_assert!(offset + buf.len() as u64 <= self.mem_size);
        let aligned = |n: usize| n % crate::PAGE_SIZE == 0;
        if let Some(direct) = &self.direct {
            if aligned(buf.as_ptr() as usize) && aligned(buf.len()) && aligned(offset as usize) {
                match direct.write_all_at(buf, offset) {
                    Ok(()) => return Ok(()),
                    // Alignment this device refuses: the buffered write below.
                    Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                    }
                    Err(e) => {
                        return Err(Error::io_section("write", "memory", &self.mem_path, e));
                    }
                }
            }
        }
        self.memory
            .write_all_at(buf, offset)
            .map_err(|e| Error::io_section("write", "memory", &self.mem_path, e))
    }

    fn sync_memory(&self) -> Result<()> {
        self.memory
            .sync_data()
            .map_err(|e| Error::io_section("sync", "memory", &self.mem_path, e))
    }

    fn write_section(&self, section: Section, bytes: &[u8]) -> Result<Location> {
        let name = file_of(section);
        let path = self.dir.join(name);
        let mut file = create_new(&path)?;
        file.write_all(bytes)
            .map_err(|e| Error::io_section("write", section.name(), &path, e))?;
        Ok(Location {
            file: Some(name.to_string()),
            offset: 0,
        })
    }

    fn read_section(&self, entry: &SectionEntry) -> Result<Vec<u8>> {
        read_section_file(&self.dir, entry, 0..entry.length)
    }

    fn sync(&self) -> Result<()> {
        // Files may have been written by a forked child through its own descriptors; fsync
        // through a fresh descriptor flushes the same page cache.
        for name in [MEMORY, STATE, PAGE_INDEX, MANIFEST] {
            let path = self.dir.join(name);
            match open_existing(&path) {
                Ok(f) => f.sync_all().map_err(|e| Error::io("sync", &path, e))?,
                Err(Error::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        sync_dir(&self.dir)
    }

    fn commit(&self, _sections: &[SectionEntry], manifest: &SectionEntry) -> Result<()> {
        let checksum = manifest
            .checksum
            .ok_or_else(|| Error::corrupt("manifest entry", "no checksum"))?;
        let text = format!(
            "{MARKER_HEADER}\nmanifest {MANIFEST}\nlength {}\nchecksum {checksum}\n",
            manifest.length
        );
        // Written to a temporary name, made durable, then renamed: the marker appears whole
        // or not at all; the directory fsync makes the rename itself durable.
        let tmp = self.dir.join(COMPLETE_TMP);
        let mut f = create_new(&tmp)?;
        f.write_all(text.as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(|e| Error::io_section("write", "completion marker", &tmp, e))?;
        let done = self.dir.join(COMPLETE);
        fs::rename(&tmp, &done).map_err(|e| Error::io("rename", &done, e))?;
        sync_dir(&self.dir)
    }

    fn discard(&self) -> Result<()> {
        // `create` left no checkpoint name in the directory but its own, so every one of them
        // present now was written by this checkpoint (possibly by a forked child). The marker
        // goes first: whatever else fails to go, no reader takes the rest for a checkpoint.
        let mut first_error = None;
        for name in [COMPLETE, COMPLETE_TMP, MANIFEST, STATE, PAGE_INDEX, MEMORY] {
            if let Err(e) = remove_if_present(&self.dir.join(name)) {
                first_error.get_or_insert(e);
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => match sync_dir(&self.dir) {
                Err(Error::NotFound { .. }) => Ok(()),
                other => other,
            },
        }
    }
}

#[derive(Debug)]
struct DirReader {
    dir: PathBuf,
    memory: OnceLock<File>,
}

impl DirReader {
    fn memory_file(&self) -> Result<&File> {
        if let Some(f) = self.memory.get() {
            return Ok(f);
        }
        let f = open_existing(&self.dir.join(MEMORY))?;
        Ok(self.memory.get_or_init(|| f))
    }
}

fn parse_marker(text: &str) -> Option<SectionEntry> {
    let mut lines = text.lines();
    if lines.next()? != MARKER_HEADER {
        return None;
    }
    let (mut file, mut length, mut checksum) = (None, None, None);
    for line in lines {
        let (key, value) = line.split_once(' ')?;
        match key {
            "manifest" => file = Some(value.to_string()),
            "length" => length = Some(value.parse().ok()?),
            "checksum" => checksum = Some(value.parse::<Checksum>().ok()?),
            _ => {} // tolerate fields added later
        }
    }
    Some(SectionEntry {
        name: Section::Manifest.name().to_string(),
        file: Some(file?),
        offset: 0,
        length: length?,
        checksum: Some(checksum?),
    })
}

impl StoreReader for DirReader {
    fn describe(&self) -> String {
        self.dir.display().to_string()
    }

    fn read_commit(&self) -> Result<Option<SectionEntry>> {
        let path = self.dir.join(COMPLETE);
        let mut file = match open_existing(&path) {
            Ok(f) => f,
            Err(Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut text = Vec::new();
        file.read_to_end(&mut text)
            .map_err(|e| Error::io("read", &path, e))?;
        let entry = std::str::from_utf8(&text).ok().and_then(parse_marker);
        match entry {
            Some(e) => Ok(Some(e)),
            None => Err(Error::corrupt(
                "completion marker",
                format!("{} is not a completion marker", path.display()),
            )),
        }
    }

    fn read_section(&self, entry: &SectionEntry) -> Result<Vec<u8>> {
        read_section_file(&self.dir, entry, 0..entry.length)
    }

    fn read_section_range(&self, entry: &SectionEntry, range: Range<u64>) -> Result<Vec<u8>> {
        read_section_file(&self.dir, entry, range)
    }

    fn check_memory(&self, entry: &SectionEntry) -> Result<()> {
        if entry.file.as_deref() != Some(MEMORY) || entry.offset != 0 {
            return Err(Error::corrupt(
                "manifest",
                format!(
                    "memory at {:?}+{}, expected {MEMORY}+0",
                    entry.file, entry.offset
                ),
            ));
        }
        let path = self.dir.join(MEMORY);
        let len = self
            .memory_file()?
            .metadata()
            .map_err(|e| Error::io("stat", &path, e))?
            .len();
        if len < entry.length {
            return Err(Error::Truncated {
                section: entry.name.clone(),
                expected: entry.length,
                found: len,
            });
        }
        Ok(())
    }

    fn read_memory(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let path = self.dir.join(MEMORY);
        read_exact_at(self.memory_file()?, &path, "memory", offset, buf)
    }

    fn memory_read_in_order(&self) {
        if let Ok(file) = self.memory_file() {
            super::reads_in_order(file);
        }
    }

    fn memory_source(&self, entry: &SectionEntry) -> Result<MemorySource> {
        let path = self.dir.join(MEMORY);
        let file = self
            .memory_file()?
            .try_clone()
            .map_err(|e| Error::io("duplicate", &path, e))?;
        Ok(MemorySource::File {
            file,
            offset: 0,
            len: entry.length,
            holes_read_as_zero: true,
        })
    }
}
