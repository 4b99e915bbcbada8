//! A local cache of checkpoints read from S3 (`--cache DIR`), so that later restores of the same
//! checkpoint on this host read from local files instead of the object store.
//!
//! ```text
//! DIR/<manifest checksum>/manifest.json   sections, as read (each checked against the
//! DIR/<manifest checksum>/state.bin       checksum its manifest or marker records before
//! DIR/<manifest checksum>/page-index.bin  it is used, and only then written here)
//! DIR/<manifest checksum>/memory          sparse image of guest memory: the pages read from
//!                                         the bucket (checked against the page index when
//!                                         the reader has it already)
//! ```
//!
//! A section read in ranges (the page index's segments, before a lazy restore needs the whole
//! index) is read whole from the cache once, verified, and served from memory.
//!
//! The cache is keyed by the manifest's checksum, which the completion marker in the bucket
//! records and which covers every section and every page hash: two checkpoints with one key
//! have the same content, wherever they are stored. The marker itself is always read from the
//! bucket, so a checkpoint that is not complete there is never restored from the cache.
//!
//! Nothing read from the cache is trusted: a section is used only if its checksum holds, a page
//! only if its hash matches the page index (a page never written reads as zeros and fails that
//! check, unless the index says it is zero). What fails is read from the bucket again and
//! rewritten. A cache that cannot be written (disk full, no permission) slows restores down but
//! never fails them: the failure is logged once per checkpoint and the cache is bypassed.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use tracing::warn;

use crate::checksum::{checksum, Checksum};
use crate::manifest::SectionEntry;

/// The cache of one checkpoint.
#[derive(Debug)]
pub(super) struct CheckpointCache {
    dir: PathBuf,
    memory: OnceLock<Option<File>>,
    broken: AtomicBool,
}

impl CheckpointCache {
    /// The cache of the checkpoint whose manifest has checksum `manifest` under `root`.
    pub(super) fn new(root: &Path, manifest: Checksum) -> CheckpointCache {
        CheckpointCache {
            dir: root.join(format!("{:016x}", manifest.0)),
            memory: OnceLock::new(),
            broken: AtomicBool::new(false),
        }
    }

    /// Logs the first failure to write the cache, then bypasses it.
    fn failed(&self, what: &str, e: std::io::Error) {
        if !self.broken.swap(true, Ordering::Relaxed) {
            warn!(
                "cache {}: cannot {what}, reading from the bucket only: {e}",
                self.dir.display()
            );
        }
    }

    fn usable(&self) -> bool {
        !self.broken.load(Ordering::Relaxed)
    }

    fn make_dir(&self) -> std::io::Result<()> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
    }

    fn section_path(&self, entry: &SectionEntry) -> PathBuf {
        self.dir.join(section_file(&entry.name))
    }

    /// The section `entry` from the cache, if it is there and its checksum holds.
    pub(super) fn section(&self, entry: &SectionEntry) -> Option<Vec<u8>> {
        let want = entry.checksum?;
        let bytes = std::fs::read(self.section_path(entry)).ok()?;
        (bytes.len() as u64 == entry.length && Checksum(checksum(&bytes)) == want).then_some(bytes)
    }

    /// Keeps `bytes`, read from the bucket, as the section `entry` if its checksum holds.
    pub(super) fn put_section(&self, entry: &SectionEntry, bytes: &[u8]) {
        if !self.usable() || entry.checksum != Some(Checksum(checksum(bytes))) {
            return;
        }
        let path = self.section_path(entry);
        let tmp = path.with_extension("tmp");
        let written = self.make_dir().and_then(|()| {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(bytes)?;
            std::fs::rename(&tmp, &path)
        });
        if let Err(e) = written {
            self.failed("write a section", e);
        }
    }

    /// The sparse memory image, created on first use and at least `len` bytes long.
    fn memory(&self, len: u64) -> Option<&File> {
        self.memory
            .get_or_init(|| {
                let opened = self.make_dir().and_then(|()| {
                    let f = OpenOptions::new()
                        .read(true)
                        .write(true)
                        .create(true)
                        .truncate(false)
                        .mode(0o600)
                        .open(self.dir.join("memory"))?;
                    if f.metadata()?.len() < len {
                        f.set_len(len)?;
                    }
                    Ok(f)
                });
                match opened {
                    Ok(f) => Some(f),
                    Err(e) => {
                        self.failed("open its memory image", e);
                        None
                    }
                }
            })
            .as_ref()
            .filter(|_| self.usable())
    }

    /// Reads `buf.len()` bytes of the memory image at `offset` (unverified: the caller checks
    /// every page against the page index). `false` if the cache has no memory image.
    pub(super) fn read_memory(&self, len: u64, offset: u64, buf: &mut [u8]) -> bool {
        self.memory(len)
            .is_some_and(|f| f.read_exact_at(buf, offset).is_ok())
    }

    /// Keeps `buf`, verified pages of the memory image at `offset`.
    pub(super) fn put_memory(&self, len: u64, offset: u64, buf: &[u8]) {
        if let Some(f) = self.memory(len) {
            if let Err(e) = f.write_all_at(buf, offset) {
                self.failed("write memory", e);
            }
        }
    }
}

/// The file of a section: its name with characters other than ASCII letters, digits, `-` and
/// `_` replaced (section names come from the manifest, which is not trusted yet).
fn section_file(name: &str) -> String {
    let safe: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("section-{safe}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, bytes: &[u8]) -> SectionEntry {
        SectionEntry {
            name: name.into(),
            file: None,
            offset: 0,
            length: bytes.len() as u64,
            checksum: Some(Checksum(checksum(bytes))),
        }
    }

    #[test]
    fn sections_are_kept_only_when_their_checksum_holds() {
        let root = tempfile::tempdir().unwrap();
        let cache = CheckpointCache::new(root.path(), Checksum(7));
        let e = entry("state", b"device state");
        assert_eq!(cache.section(&e), None);
        cache.put_section(&e, b"device stat!");
        assert_eq!(cache.section(&e), None);
        cache.put_section(&e, b"device state");
        assert_eq!(cache.section(&e).as_deref(), Some(&b"device state"[..]));
        std::fs::write(cache.section_path(&e), b"device stat!").unwrap();
        assert_eq!(cache.section(&e), None, "a changed file is not served");
        let hostile = entry("../../etc/passwd", b"x");
        assert!(cache
            .section_path(&hostile)
            .starts_with(root.path().join("0000000000000007")));
    }

    #[test]
    fn memory_reads_back_what_was_kept() {
        let root = tempfile::tempdir().unwrap();
        let cache = CheckpointCache::new(root.path(), Checksum(9));
        let len = 16 * 4096;
        cache.put_memory(len, 4096, &[0xab; 8192]);
        let mut buf = vec![0u8; 3 * 4096];
        assert!(cache.read_memory(len, 0, &mut buf));
        assert!(buf[..4096].iter().all(|&b| b == 0));
        assert!(buf[4096..].iter().all(|&b| b == 0xab));
    }
}
