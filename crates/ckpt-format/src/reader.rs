//! Opening, reading and verifying a checkpoint.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use serde::de::DeserializeOwned;

use crate::checksum::checksum;
use crate::error::{Error, Result};
use crate::index_segment::{verify_entry, IndexSegment};
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

/// Longest chain of checkpoints a reader follows: an incremental checkpoint, its parents, and
/// the full checkpoint at the end.
pub const MAX_CHAIN: usize = 64;

/// An open, complete checkpoint whose manifest and state have been verified, and its page
/// index too unless it was opened with [`Checkpoint::open_deferred`]. Memory pages are
/// verified on demand.
///
/// An incremental checkpoint is opened with its chain of parents (each complete, each the one
/// recorded): its page index and memory read as the chain resolved, each page from the newest
/// checkpoint of the chain that holds it, verified against that checkpoint's index.
#[derive(Debug)]
pub struct Checkpoint {
    store: Box<dyn StoreReader>,
    manifest: Manifest,
    manifest_checksum: u64,
    state: Vec<u8>,
    index_entry: SectionEntry,
    /// The index as stored (pages in the parent marked so).
    own_index: OnceLock<PageIndex>,
    /// The index resolved down the chain.
    page_index: OnceLock<PageIndex>,
    /// Pages per segment of the index and each segment's checksum, if the writer recorded
    /// them.
    segments: Option<(u64, Vec<u64>)>,
    memory: SectionEntry,
    parent: Option<Box<Checkpoint>>,
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
        Checkpoint::open_link(store, 1)
    }

    /// Opens the checkpoint in `store`, the `depth`th of its chain, and its parents.
    fn open_link(at: &dyn Store, depth: usize) -> Result<Checkpoint> {
        if depth > MAX_CHAIN {
            return Err(Error::ChainTooLong(MAX_CHAIN));
        }
        let store = at.open()?;
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
        let segments = match &manifest.memory.index_segments {
            Some(s) => Some((s.pages, s.decode(manifest.memory.pages)?)),
            None => None,
        };
        let state = read_checked(store.as_ref(), &state_entry)?;
        let parent = match &manifest.parent {
            None => None,
            Some(p) => {
                let in_parent = |source: Error| Error::Parent {
                    address: p.address.clone(),
                    source: Box::new(source),
                };
                let parent = at
                    .parent(&p.address)
                    .and_then(|s| Checkpoint::open_link(s.as_ref(), depth + 1))
                    .map_err(|e| match e {
                        // The chain's end is refused once, not at every link.
                        Error::ChainTooLong(_) | Error::Parent { .. } => e,
                        e => in_parent(e),
                    })?;
                if parent.manifest_checksum != p.manifest_checksum.0 {
                    return Err(Error::ParentMismatch {
                        address: p.address.clone(),
                        expected: p.manifest_checksum.0,
                        found: parent.manifest_checksum,
                    });
                }
                if parent.manifest.memory.mem_size != manifest.memory.mem_size {
                    return Err(in_parent(Error::corrupt(
                        "manifest",
                        format!(
                            "{} bytes of memory, its child has {}",
                            parent.manifest.memory.mem_size, manifest.memory.mem_size
                        ),
                    )));
                }
                Some(Box::new(parent))
            }
        };
        Ok(Checkpoint {
            store,
            manifest,
            manifest_checksum: manifest_entry.checksum.map_or(0, |c| c.0),
            state,
            index_entry,
            own_index: OnceLock::new(),
            page_index: OnceLock::new(),
            segments,
            memory,
            parent,
        })
    }

    /// The parent of an incremental checkpoint (opened, complete, the one recorded).
    pub fn parent(&self) -> Option<&Checkpoint> {
        self.parent.as_deref()
    }

    /// The page index as this checkpoint stores it: an incremental checkpoint's marks the pages
    /// its parent holds.
    pub fn own_page_index(&self) -> Result<&PageIndex> {
        if let Some(index) = self.own_index.get() {
            return Ok(index);
        }
        let bytes = read_checked(self.store.as_ref(), &self.index_entry)?;
        let index = PageIndex::decode_owned(bytes, self.manifest.memory.pages)?;
        if self.parent.is_none() && index.parent_pages() > 0 {
            return Err(Error::corrupt(
                "section page-index",
                format!(
                    "{} pages in the parent, but the manifest names no parent",
                    index.parent_pages()
                ),
            ));
        }
        Ok(self.own_index.get_or_init(|| index))
    }

    /// Whether the entries of a few pages can be read and verified without the whole index:
    /// this checkpoint and every parent recorded checksums of the index's segments.
    pub fn has_index_segments(&self) -> bool {
        self.segments.is_some() && self.parent.as_ref().is_none_or(|p| p.has_index_segments())
    }

    /// Whether the page index (resolved down the chain) has been read and verified.
    pub fn page_index_loaded(&self) -> bool {
        match self.parent {
            None => self.own_index.get().is_some(),
            Some(_) => self.page_index.get().is_some(),
        }
    }

    /// The entries of the whole segments of the index that hold `pages`, read with ranged
    /// reads and each verified against its checksum in the manifest, resolved down the chain
    /// (each parent's same segment). Needs [`has_index_segments`](Self::has_index_segments).
    pub fn index_segment(&self, pages: Range<u64>) -> Result<IndexSegment> {
        let (per, checksums) = self.segments.as_ref().ok_or_else(|| {
            Error::corrupt("manifest", "no checksums of the page index's segments")
        })?;
        let total = self.pages();
        if pages.start >= pages.end || pages.end > total {
            return Err(Error::PageOutOfRange {
                page: pages.end.saturating_sub(1),
                pages: total,
            });
        }
        let whole =
            pages.start / per * per..pages.end.div_ceil(*per).saturating_mul(*per).min(total);
        let (states, hashes) = PageIndex::encoded_ranges(total, whole.clone());
        if hashes.end > self.index_entry.length {
            return Err(Error::Truncated {
                section: self.index_entry.name.clone(),
                expected: PageIndex::encoded_len(total),
                found: self.index_entry.length,
            });
        }
        let states = self.store.read_section_range(&self.index_entry, states)?;
        let hashes = self.store.read_section_range(&self.index_entry, hashes)?;
        let mut segment = IndexSegment::decode(
            whole.clone(),
            &states,
            &hashes,
            *per,
            checksums,
            self.parent.is_some(),
        )?;
        if let (Some(parent), true) = (&self.parent, segment.has_parent_pages()) {
            let resolved = parent.index_segment(whole).map_err(|e| self.in_parent(e))?;
            segment.resolve(&resolved)?;
        }
        Ok(segment)
    }

    /// The checkpoint `link` steps up the chain (0: this one).
    fn link(&self, link: usize) -> Result<&Checkpoint> {
        let mut at = self;
        for _ in 0..link {
            at = at
                .parent
                .as_deref()
                .ok_or_else(|| Error::corrupt("section page-index", "a page beyond the chain"))?;
        }
        Ok(at)
    }

    /// Reads pages `first..first + buf.len() / 4096`, all within `segment`, each from the
    /// checkpoint of the chain that holds it (zero pages as zeros, without reading). Not
    /// verified: see [`IndexSegment::verify`].
    pub fn read_pages_in(&self, segment: &IndexSegment, first: u64, buf: &mut [u8]) -> Result<()> {
        if buf.len() % PAGE_SIZE != 0 {
            return Err(Error::NotPageMultiple {
                what: "page buffer",
                len: buf.len() as u64,
            });
        }
        let count = (buf.len() / PAGE_SIZE) as u64;
        let covered = segment.pages();
        if first < covered.start || first + count > covered.end {
            return Err(Error::PageOutOfRange {
                page: first + count.max(1) - 1,
                pages: covered.end,
            });
        }
        // Which checkpoint holds the page, or `None` for a zero page.
        let holder = |p: u64| {
            segment
                .entry(p)
                .filter(|e| e.state != PageState::Zero)
                .and(segment.link(p))
        };
        let mut i = 0;
        while i < count {
            let from = holder(first + i);
            let mut end = i + 1;
            while end < count && holder(first + end) == from {
                end += 1;
            }
            let run = &mut buf[(i * PAGE) as usize..(end * PAGE) as usize];
            match from {
                None => run.fill(0),
                Some(link) => self
                    .link(link)?
                    .store
                    .read_memory((first + i) * PAGE, run)?,
            }
            i = end;
        }
        Ok(())
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

    /// The page index, read and verified on first use; an incremental checkpoint's resolved
    /// down its chain (no page is "in parent").
    pub fn page_index(&self) -> Result<&PageIndex> {
        let Some(parent) = &self.parent else {
            return self.own_page_index();
        };
        if let Some(index) = self.page_index.get() {
            return Ok(index);
        }
        let own = self.own_page_index()?;
        let resolved = parent.page_index().map_err(|e| self.in_parent(e))?;
        let index = own.resolve(resolved)?;
        Ok(self.page_index.get_or_init(|| index))
    }

    fn in_parent(&self, source: Error) -> Error {
        match (&self.manifest.parent, source) {
            (_, e @ Error::Parent { .. }) | (None, e) => e,
            (Some(p), e) => Error::Parent {
                address: p.address.clone(),
                source: Box::new(e),
            },
        }
    }

    /// Number of guest pages.
    pub fn pages(&self) -> u64 {
        self.manifest.memory.pages
    }

    /// How to map guest memory for a restore: memory resolved from a chain is not one image.
    pub fn memory_source(&self) -> Result<MemorySource> {
        if self.parent.is_some() {
            return Ok(MemorySource::Pages);
        }
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
        if let Some(parent) = &self.parent {
            return self.read_chained(parent, first, buf);
        }
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

    /// Says that memory will be read mostly in ascending page order, so that the store (and
    /// each parent's store) reads further ahead of the reader.
    pub fn reads_in_order(&self) {
        self.store.memory_read_in_order();
        if let Some(parent) = &self.parent {
            parent.reads_in_order();
        }
    }

    /// Reads a run of an incremental checkpoint: each maximal run of pages the parent holds
    /// from the parent, the others from this checkpoint's image (zero pages as zeros).
    fn read_chained(&self, parent: &Checkpoint, first: u64, buf: &mut [u8]) -> Result<()> {
        let own = self.own_page_index()?;
        let count = (buf.len() / PAGE_SIZE) as u64;
        let mut i = 0;
        while i < count {
            let from_parent = own.in_parent(first + i);
            let mut end = i + 1;
            while end < count && own.in_parent(first + end) == from_parent {
                end += 1;
            }
            let run = &mut buf[(i * PAGE) as usize..(end * PAGE) as usize];
            if from_parent {
                parent
                    .read_pages(first + i, run)
                    .map_err(|e| self.in_parent(e))?;
            } else {
                let zero = |p: u64| own.entry(p).is_some_and(|e| e.state == PageState::Zero);
                if !(first + i..first + end).all(zero) {
                    self.store.read_memory((first + i) * PAGE, run)?;
                }
                for (j, page) in run.chunks_exact_mut(PAGE_SIZE).enumerate() {
                    if zero(first + i + j as u64) {
                        page.fill(0);
                    }
                }
            }
            i = end;
        }
        Ok(())
    }

    /// Checks `bytes` (the content of page `page`, from wherever it was read or mapped)
    /// against the page index.
    pub fn verify_page(&self, page: u64, bytes: &[u8]) -> Result<()> {
        let entry = self
            .page_index()?
            .entry(page)
            .ok_or(Error::PageOutOfRange {
                page,
                pages: self.pages(),
            })?;
        verify_entry(entry, page, bytes)
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
                    if let Err(e) = self.read_pages(first, buf) {
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
