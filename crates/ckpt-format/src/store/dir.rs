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

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use super::{read_exact_at, Layout, Location, MemorySource, Store, StoreReader, StoreWriter};
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
        self.dir.join(COMPLETE).exists()
    }
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
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io("remove", path, e)),
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
        fs::create_dir_all(dir).map_err(|e| Error::io("create directory", dir, e))?;
        let complete = dir.join(COMPLETE);
        if complete.exists() {
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
            && Self::FILES.iter().any(|f| dir.join(f).exists())
        {
            return Err(Error::CheckpointExists {
                path: dir.clone(),
                complete: false,
            });
        }
        for stale in [MANIFEST, STATE, PAGE_INDEX, COMPLETE_TMP] {
            remove_if_present(&dir.join(stale))?;
        }
        let mem_path = dir.join(MEMORY);
        // Truncate then extend: the whole image becomes a hole, so zero pages (never written)
        // read as zero.
        let memory = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&mem_path)
            .map_err(|e| Error::io("create", &mem_path, e))?;
        memory
            .set_len(layout.mem_size)
            .map_err(|e| Error::io_section("extend", "memory", &mem_path, e))?;
        Ok(Box::new(DirWriter {
            dir: dir.clone(),
            mem_path,
            mem_size: layout.mem_size,
            memory,
        }))
    }

    fn open(&self) -> Result<Box<dyn StoreReader>> {
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
}

/// Reads a section file, checking its name and length against `entry`.
fn read_section_file(dir: &Path, entry: &SectionEntry) -> Result<Vec<u8>> {
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
    let file = File::open(&path).map_err(|e| Error::io("open", &path, e))?;
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
    let mut buf = vec![0u8; usize::try_from(entry.length).expect("section length fits in memory")];
    read_exact_at(&file, &path, &entry.name, entry.offset, &mut buf)?;
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
        let mut file = File::create(&path).map_err(|e| Error::io("create", &path, e))?;
        file.write_all(bytes)
            .map_err(|e| Error::io_section("write", section.name(), &path, e))?;
        Ok(Location {
            file: Some(name.to_string()),
            offset: 0,
        })
    }

    fn read_section(&self, entry: &SectionEntry) -> Result<Vec<u8>> {
        read_section_file(&self.dir, entry)
    }

    fn sync(&self) -> Result<()> {
        // Files may have been written by a forked child through its own descriptors; fsync
        // through a fresh descriptor flushes the same page cache.
        for name in [MEMORY, STATE, PAGE_INDEX, MANIFEST] {
            let path = self.dir.join(name);
            match File::open(&path) {
                Ok(f) => f.sync_all().map_err(|e| Error::io("sync", &path, e))?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io("open", &path, e)),
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
        let mut f = File::create(&tmp).map_err(|e| Error::io("create", &tmp, e))?;
        f.write_all(text.as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(|e| Error::io_section("write", "completion marker", &tmp, e))?;
        let done = self.dir.join(COMPLETE);
        fs::rename(&tmp, &done).map_err(|e| Error::io("rename", &done, e))?;
        sync_dir(&self.dir)
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
        let path = self.dir.join(MEMORY);
        let f = File::open(&path).map_err(|e| Error::io("open", &path, e))?;
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
        let text = match fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("read", &path, e)),
        };
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
        read_section_file(&self.dir, entry)
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
