//! Opening, reading and verifying a checkpoint.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use serde::de::DeserializeOwned;

use crate::checksum::{checksum, page_is_zero};
use crate::error::{Error, Result};
use crate::manifest::{decode_state, Manifest, Section, SectionEntry};
use crate::page_index::{PageIndex, PageState};
use crate::store::{MemorySource, Store, StoreReader};
use crate::PAGE_SIZE;

const PAGE: u64 = PAGE_SIZE as u64;
/// Pages read and verified per chunk by `verify_memory` (1 MiB).
const VERIFY_CHUNK: u64 = 256;

/// Result of [`Checkpoint::verify_memory`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Present pages read and checked.
    pub pages_verified: u64,
    /// Zero pages (nothing to read).
    pub zero_pages: u64,
}

/// An open, complete checkpoint whose manifest and state have been verified, and its page
/// index too unless it was opened with [`Checkpoint::open_deferred`]. Memory pages are
/// verified on demand.
#[derive(Debug)]
pub struct Checkpoint {
    store: Box<dyn StoreReader>,
    manifest: Manifest,
    manifest_checksum: u64,
    state: Vec<u8>,
    index_entry: SectionEntry,
    page_index: OnceLock<PageIndex>,
    memory: SectionEntry,
}

fn section(manifest: &Manifest, section: Section) -> Result<&SectionEntry> {
    manifest
        .section(section)
        .ok_or_else(|| Error::corrupt("manifest", format!("no section {}", section.name())))
}

fn read_checked(store: &dyn StoreReader, entry: &SectionEntry) -> Result<Vec<u8>> {
    let bytes = store.read_section(entry)?;
    let expected = entry
        .checksum
        .ok_or_else(|| {
            Error::corrupt(
                "manifest",
                format!("section {} has no checksum", entry.name),
            )
        })?
        .0;
    let actual = checksum(&bytes);
    if actual != expected {
        return Err(Error::ChecksumMismatch {
            section: entry.name.clone(),
            expected,
            actual,
        });
    }
    Ok(bytes)
}

impl Checkpoint {
    /// Opens the checkpoint in `store`. In this order: the completion marker (else
    /// [`Error::Incomplete`]), the manifest's length and checksum, its magic and version, the
    /// bounds of every section, the checksums of `state` and `page-index`.
    pub fn open(store: &dyn Store) -> Result<Checkpoint> {
        let ckpt = Checkpoint::open_deferred(store)?;
        ckpt.page_index()?;
        Ok(ckpt)
    }

    /// Opens the checkpoint like [`open`](Self::open) but leaves reading and verifying the page
    /// index (8 bytes per guest page: 8 MiB at 4 GiB) to [`page_index`](Self::page_index) or
    /// the first use that needs it, so that a restore can do it alongside other work.
    pub fn open_deferred(store: &dyn Store) -> Result<Checkpoint> {
        let store = store.open()?;
        let manifest_entry = store.read_commit()?.ok_or_else(|| Error::Incomplete {
            store: store.describe(),
        })?;
        let manifest_bytes = read_checked(store.as_ref(), &manifest_entry)?;
        let manifest = Manifest::from_json(&manifest_bytes)?;
        let state_entry = section(&manifest, Section::State)?.clone();
        let index_entry = section(&manifest, Section::PageIndex)?.clone();
        let memory = section(&manifest, Section::Memory)?.clone();
        if memory.length != manifest.memory.mem_size {
            return Err(Error::corrupt(
                "manifest",
                format!(
                    "memory section of {} bytes for {} bytes of memory",
                    memory.length, manifest.memory.mem_size
                ),
            ));
        }
        store.check_memory(&memory)?;
        let state = read_checked(store.as_ref(), &state_entry)?;
        Ok(Checkpoint {
            store,
            manifest,
            manifest_checksum: manifest_entry.checksum.map_or(0, |c| c.0),
            state,
            index_entry,
            page_index: OnceLock::new(),
            memory,
        })
    }

    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The manifest's checksum (as recorded by the completion marker): identifies the
    /// checkpoint.
    pub fn manifest_checksum(&self) -> u64 {
        self.manifest_checksum
    }

    /// The device-state section (verified).
    pub fn state_bytes(&self) -> &[u8] {
        &self.state
    }

    /// Decodes the device-state section written with [`crate::encode_state`].
    pub fn decode_state<T: DeserializeOwned>(&self) -> Result<T> {
        decode_state(&self.state)
    }

    /// The page index, read and verified on first use.
    pub fn page_index(&self) -> Result<&PageIndex> {
        if let Some(index) = self.page_index.get() {
            return Ok(index);
        }
        let bytes = read_checked(self.store.as_ref(), &self.index_entry)?;
        let index = PageIndex::decode_owned(bytes, self.manifest.memory.pages)?;
        Ok(self.page_index.get_or_init(|| index))
    }

    /// Number of guest pages.
    pub fn pages(&self) -> u64 {
        self.manifest.memory.pages
    }

    /// How to map guest memory for a restore.
    pub fn memory_source(&self) -> Result<MemorySource> {
        self.store.memory_source(&self.memory)
    }

    fn check_range(&self, first: u64, count: u64) -> Result<()> {
        let pages = self.pages();
        if first >= pages || pages - first < count {
            return Err(Error::PageOutOfRange {
                page: first.saturating_add(count.max(1) - 1),
                pages,
            });
        }
        Ok(())
    }

    /// Reads page `page` as saved (zero pages as zeros, without reading the store). Not
    /// verified: see [`verify_page`](Self::verify_page).
    pub fn read_page(&self, page: u64, buf: &mut [u8; PAGE_SIZE]) -> Result<()> {
        self.read_pages(page, buf)
    }

    /// Reads pages `first..first + buf.len() / 4096` (one store read for the run; pages that
    /// the index says are zero are zeroed, whatever the store holds there).
    pub fn read_pages(&self, first: u64, buf: &mut [u8]) -> Result<()> {
        if buf.len() % PAGE_SIZE != 0 {
            return Err(Error::NotPageMultiple {
                what: "page buffer",
                len: buf.len() as u64,
            });
        }
        let count = (buf.len() / PAGE_SIZE) as u64;
        self.check_range(first, count)?;
        let index = self.page_index()?;
        let zero = |i: u64| {
            index
                .entry(first + i)
                .is_some_and(|e| e.state == PageState::Zero)
        };
        if (0..count).all(zero) {
            buf.fill(0);
            return Ok(());
        }
        self.store.read_memory(first * PAGE, buf)?;
        for (i, page) in buf.chunks_exact_mut(PAGE_SIZE).enumerate() {
            if zero(i as u64) {
                page.fill(0);
            }
        }
        Ok(())
    }

    /// Checks `bytes` (the content of page `page`, from wherever it was read or mapped)
    /// against the page index.
    pub fn verify_page(&self, page: u64, bytes: &[u8]) -> Result<()> {
        if bytes.len() != PAGE_SIZE {
            return Err(Error::NotPageMultiple {
                what: "page",
                len: bytes.len() as u64,
            });
        }
        let entry = self
            .page_index()?
            .entry(page)
            .ok_or(Error::PageOutOfRange {
                page,
                pages: self.pages(),
            })?;
        match entry.state {
            PageState::Zero if page_is_zero(bytes) => Ok(()),
            PageState::Zero => Err(Error::ZeroPageMismatch { page }),
            PageState::Present => {
                let actual = checksum(bytes);
                if actual == entry.hash {
                    Ok(())
                } else {
                    Err(Error::PageMismatch {
                        page,
                        expected: entry.hash,
                        actual,
                    })
                }
            }
        }
    }

    /// Reads and verifies every present page, on `threads` threads (1 MiB chunks taken in
    /// turn), calling `progress(pages_done)` after each chunk. Stops at the first mismatch
    /// and reports the lowest mismatching page found.
    pub fn verify_memory(
        &self,
        threads: usize,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<VerifyReport> {
        let index = self.page_index()?;
        let pages = self.pages();
        let chunks = pages.div_ceil(VERIFY_CHUNK);
        let next = AtomicU64::new(0);
        let done = AtomicU64::new(0);
        let verified = AtomicU64::new(0);
        let stop = AtomicBool::new(false);
        let first_error: Mutex<Option<(u64, Error)>> = Mutex::new(None);
        let fail = |page: u64, e: Error| {
            stop.store(true, Ordering::Relaxed);
            let mut slot = first_error.lock().unwrap_or_else(|p| p.into_inner());
            if slot.as_ref().is_none_or(|(p, _)| page < *p) {
                *slot = Some((page, e));
            }
        };
        let worker = || {
            let mut buf = vec![0u8; (VERIFY_CHUNK * PAGE) as usize];
            while !stop.load(Ordering::Relaxed) {
                let chunk = next.fetch_add(1, Ordering::Relaxed);
                if chunk >= chunks {
                    break;
                }
                let first = chunk * VERIFY_CHUNK;
                let count = VERIFY_CHUNK.min(pages - first);
                let buf = &mut buf[..(count * PAGE) as usize];
                let any_present = (first..first + count).any(|p| {
                    index
                        .entry(p)
                        .is_some_and(|e| e.state == PageState::Present)
                });
                if any_present {
                    if let Err(e) = self.store.read_memory(first * PAGE, buf) {
                        fail(first, e);
                        break;
                    }
                }
                let mut ok = 0;
                for (i, bytes) in buf.chunks_exact(PAGE_SIZE).enumerate() {
                    let page = first + i as u64;
                    // Zero pages are not in the image: whatever bytes are there are not theirs.
                    if index
                        .entry(page)
                        .is_some_and(|e| e.state == PageState::Zero)
                    {
                        continue;
                    }
                    if let Err(e) = self.verify_page(page, bytes) {
                        fail(page, e);
                        break;
                    }
                    ok += 1;
                }
                verified.fetch_add(ok, Ordering::Relaxed);
                progress(done.fetch_add(count, Ordering::Relaxed) + count);
            }
        };
        std::thread::scope(|s| {
            for _ in 1..threads.max(1) {
                s.spawn(worker);
            }
            worker();
        });
        if let Some((_, e)) = first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
            return Err(e);
        }
        Ok(VerifyReport {
            pages_verified: verified.into_inner(),
            zero_pages: index.zero_pages(),
        })
    }
}
