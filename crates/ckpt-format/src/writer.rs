//! Writing a checkpoint.
//!
//! ```text
//! let writer = CheckpointWriter::create(&store, &Layout { mem_size })?;
//! // any number of threads, any order, each page exactly once:
//! writer.memory().write_page(n, &page)?;           // or write_pages(first, &run)
//! writer.write_state(&state_bytes)?;
//! writer.set_vm_config(..); writer.set_options(..); writer.set_metrics(..);
//! let manifest = writer.finish()?;                 // page-index, manifest, fsync, marker, fsync
//! ```
//!
//! ## The `fork` strategy: who writes what
//! The writer is created in the VMM (parent) before `fork`; the child inherits it, descriptors
//! included. Memory writes made in the child are invisible to the parent's copy of the page
//! table, so the work splits at the page index:
//!
//! * **child**: writes every page through its `memory()`, then calls
//!   [`CheckpointWriter::finish_memory`], which checks that every page was written, makes the
//!   memory image durable, writes the `page-index` section (into its own file, or into the raw
//!   store's fixed page-index region — never into space the parent allocates) and returns a small
//!   serializable [`MemoryReport`]. The child sends the report to the parent (e.g. as JSON over a
//!   pipe) and exits with `std::process::exit` (without running the parent's destructors).
//! * **parent**: writes no page; it may call `write_state` at any time; once it has the report it
//!   calls [`CheckpointWriter::adopt_memory`], which reads the page index back from the store and
//!   checks it against the report, then [`CheckpointWriter::finish`] as usual.
//!
//! The progress counters of [`MemoryWriter`] live in the process that writes; with `fork` the
//! child must report progress itself (e.g. over the same pipe).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use serde::{Deserialize, Serialize};

use crate::checksum::{checksum, page_is_zero, zero_page_hash, Checksum};
use crate::error::{Error, Result};
use crate::index_segment::SEGMENT_PAGES;
use crate::manifest::{
    now, CheckpointOptions, IndexSegments, Manifest, MemoryInfo, Metrics, ParentRef, Section,
    SectionEntry, VmConfig,
};
use crate::page_index::{PageIndex, PageState, PageTable};
use crate::store::{Layout, Store, StoreWriter};
use crate::{FORMAT_NAME, FORMAT_VERSION, PAGE_SIZE};

const PAGE: u64 = PAGE_SIZE as u64;

/// What `finish_memory` hands from the process that wrote memory to the one that finishes the
/// checkpoint (see the module documentation on `fork`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryReport {
    /// Where the page index was written, with its checksum.
    pub page_index: SectionEntry,
    /// Pages in the image.
    pub pages: u64,
    /// Zero pages (not written).
    pub zero_pages: u64,
    /// Bytes of memory written.
    pub bytes_written: u64,
    /// Pages left in the parent checkpoint.
    #[serde(default)]
    pub pages_in_parent: u64,
}

/// Progress of the memory write-out, for a progress bar.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// Pages saved so far (zero pages included).
    pub pages_done: u64,
    /// Pages in guest memory.
    pub pages_total: u64,
    /// Zero pages seen so far.
    pub zero_pages: u64,
    /// Bytes written to the store so far.
    pub bytes_written: u64,
}

/// Writes memory pages; `Sync`, shared by every thread that saves pages.
///
/// The hot path takes no lock: a page is claimed with one compare-and-swap on its state byte,
/// hashed, written with a positional write (no shared file cursor), and recorded.
#[derive(Debug)]
pub struct MemoryWriter {
    store: Arc<dyn StoreWriter>,
    table: PageTable,
    pages_done: AtomicU64,
    zero_pages: AtomicU64,
    bytes_written: AtomicU64,
    /// The parent checkpoint's index, resolved: a page saved with the content it had there is
    /// kept in the parent rather than written.
    parent: OnceLock<Arc<PageIndex>>,
}

impl std::fmt::Debug for PageTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PageTable({} pages)", self.pages())
    }
}

impl MemoryWriter {
    /// Number of pages of guest memory.
    pub fn pages(&self) -> u64 {
        self.table.pages()
    }

    /// Saves page `page`. Zero pages are recorded as zero and not written. Fails if the page
    /// was already saved (the engine saves each page exactly once).
    pub fn write_page(&self, page: u64, data: &[u8; PAGE_SIZE]) -> Result<()> {
        self.write_pages(page, data)
    }

    /// Saves the run of pages `first..first + data.len() / 4096`. Non-zero pages that are
    /// adjacent go to the store in one write. Fails, writing nothing, if any page of the run was
    /// already saved.
    pub fn write_pages(&self, first: u64, data: &[u8]) -> Result<()> {
        if data.len() % PAGE_SIZE != 0 {
            return Err(Error::NotPageMultiple {
                what: "page run",
                len: data.len() as u64,
            });
        }
        let count = (data.len() / PAGE_SIZE) as u64;
        self.save_claimed(first, count, || self.write_claimed(first, data))
    }

    /// Fails unless pages `first..first + count` are all pages of guest memory.
    fn check_run(&self, first: u64, count: u64) -> Result<()> {
        let pages = self.table.pages();
        if first >= pages || pages - first < count {
            return Err(Error::PageOutOfRange {
                page: first.saturating_add(count).saturating_sub(1).max(first),
                pages,
            });
        }
        Ok(())
    }

    /// Claims pages `first..first + count` (none of them if any was saved already), then runs
    /// `save`, releasing the claims if it fails.
    fn save_claimed(
        &self,
        first: u64,
        count: u64,
        save: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        self.check_run(first, count)?;
        for i in 0..count {
            if let Err(e) = self.table.claim(first + i) {
                (0..i).for_each(|j| self.table.unclaim(first + j));
                return Err(e);
            }
        }
        let result = save();
        if result.is_err() {
            (0..count).for_each(|i| self.table.unclaim(first + i));
        }
        result
    }

    /// Compares the pages saved from now on with `parent`, the resolved index of the parent
    /// of an incremental checkpoint: a page whose hash equals its hash there (a page written
    /// back with the same content, or reported written when only read) is kept in the parent.
    /// Once per writer, before any page is saved.
    pub fn compare_with_parent(&self, parent: Arc<PageIndex>) -> Result<()> {
        if parent.pages() != self.table.pages() {
            return Err(Error::corrupt(
                "parent page index",
                format!(
                    "{} pages, the checkpoint has {}",
                    parent.pages(),
                    self.table.pages()
                ),
            ));
        }
        self.parent
            .set(parent)
            .map_err(|_| Error::SectionWrittenTwice {
                section: "parent page index",
            })
    }

    fn write_claimed(&self, first: u64, data: &[u8]) -> Result<()> {
        // Per page: None = zero, Some((hash, false)) = written, Some((hash, true)) = in parent.
        let mut hashes = Vec::with_capacity(data.len() / PAGE_SIZE);
        let mut run_start: Option<usize> = None;
        let mut zeros = 0;
        let mut written = 0;
        let parent = self.parent.get();
        for (i, page) in data.chunks_exact(PAGE_SIZE).enumerate() {
            let zero = page_is_zero(page);
            let hash = (!zero).then(|| checksum(page));
            let unchanged = hash.is_some_and(|h| {
                parent
                    .and_then(|p| p.entry(first + i as u64))
                    .is_some_and(|e| e.state == PageState::Present && e.hash == h)
            });
            hashes.push(hash.map(|h| (h, unchanged)));
            // Pages not written: zero, or unchanged since the parent.
            let skip = zero || unchanged;
            match (skip, run_start) {
                (true, Some(s)) => {
                    self.store.write_memory(
                        (first + s as u64) * PAGE,
                        &data[s * PAGE_SIZE..i * PAGE_SIZE],
                    )?;
                    written += (i - s) * PAGE_SIZE;
                    run_start = None;
                }
                (false, None) => run_start = Some(i),
                _ => {}
            }
            zeros += u64::from(zero);
        }
        if let Some(s) = run_start {
            self.store
                .write_memory((first + s as u64) * PAGE, &data[s * PAGE_SIZE..])?;
            written += data.len() - s * PAGE_SIZE;
        }
        let mut i = 0;
        let skipped = |h: &Option<(u64, bool)>| h.is_none_or(|(_, unchanged)| unchanged);
        while i < hashes.len() {
            let start = i;
            while i < hashes.len() && skipped(&hashes[i]) {
                i += 1;
            }
            if i > start {
                self.store
                    .zero_memory((first + start as u64) * PAGE, (i - start) as u64 * PAGE)?;
            } else {
                i += 1;
            }
        }
        // Recorded only once the bytes are in the store: a page whose state is final is saved.
        for (i, hash) in hashes.into_iter().enumerate() {
            let page = first + i as u64;
            match hash {
                Some((_, true)) => self.table.complete_in_parent(page),
                Some((h, false)) => self.table.complete(page, false, h),
                None => self.table.complete(page, true, zero_page_hash()),
            }
        }
        self.pages_done
            .fetch_add((data.len() / PAGE_SIZE) as u64, Ordering::Relaxed);
        self.zero_pages.fetch_add(zeros, Ordering::Relaxed);
        self.bytes_written
            .fetch_add(written as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Records pages `first..first + count` as zero without reading them: pages the caller
    /// knows hold only zeros (never populated). Fails, recording nothing, if any of them was
    /// already saved.
    pub fn write_zero(&self, first: u64, count: u64) -> Result<()> {
        self.save_claimed(first, count, || {
            self.store.zero_memory(first * PAGE, count * PAGE)?;
            for page in first..first + count {
                self.table.complete(page, true, zero_page_hash());
            }
            self.pages_done.fetch_add(count, Ordering::Relaxed);
            self.zero_pages.fetch_add(count, Ordering::Relaxed);
            Ok(())
        })
    }

    /// Records pages `first..first + count` as unchanged since the parent checkpoint's instant:
    /// not written, the parent holds them. Fails if any of them was saved already.
    pub fn keep_in_parent(&self, first: u64, count: u64) -> Result<()> {
        self.check_run(first, count)?;
        for page in first..first + count {
            self.table.keep_in_parent(page)?;
        }
        // A store that assembles objects of many pages learns that these need no bytes.
        self.store.zero_memory(first * PAGE, count * PAGE)?;
        self.pages_done.fetch_add(count, Ordering::Relaxed);
        Ok(())
    }

    /// Progress so far (cheap: three relaxed loads).
    pub fn progress(&self) -> Progress {
        Progress {
            pages_done: self.pages_done.load(Ordering::Relaxed),
            pages_total: self.table.pages(),
            zero_pages: self.zero_pages.load(Ordering::Relaxed),
            bytes_written: self.bytes_written.load(Ordering::Relaxed),
        }
    }
}

/// Writes one checkpoint into a store. If [`finish`](Self::finish) fails, or the writer is
/// dropped without it, what the checkpoint wrote is discarded ([`StoreWriter::discard`]): a
/// directory store loses the files this checkpoint created, a raw store is left initialised and
/// empty. Only the process that created the writer discards: a forked child's copy never does.
#[derive(Debug)]
pub struct CheckpointWriter {
    store: Arc<dyn StoreWriter>,
    memory: Arc<MemoryWriter>,
    mem_size: u64,
    state: Option<SectionEntry>,
    memory_report: Option<MemoryReport>,
    /// The page index, once memory is finished or adopted.
    index: Option<PageIndex>,
    vm: VmConfig,
    options: CheckpointOptions,
    metrics: Metrics,
    hot_pages: Vec<u64>,
    parent: Option<ParentRef>,
    created: (u64, String),
    /// The process whose writer this is, and which alone discards an unfinished checkpoint;
    /// `None` once finished or discarded, and in a [`fork_copy`](Self::fork_copy).
    discarder: Option<u32>,
}

impl Drop for CheckpointWriter {
    fn drop(&mut self) {
        if let Err(e) = self.discard_unfinished() {
            tracing::warn!(store = %self.store.describe(), "cannot discard an unfinished checkpoint: {e}");
        }
    }
}

impl CheckpointWriter {
    /// Starts a checkpoint of `layout.mem_size` bytes of memory in `store`. The creation time
    /// recorded is now: create the writer at the checkpoint instant (inside the pause) or set
    /// it with [`set_created_unix_ms`](Self::set_created_unix_ms).
    pub fn create(store: &dyn Store, layout: &Layout) -> Result<CheckpointWriter> {
        if layout.mem_size == 0 || layout.mem_size % PAGE != 0 {
            return Err(Error::NotPageMultiple {
                what: "memory size",
                len: layout.mem_size,
            });
        }
        let store: Arc<dyn StoreWriter> = Arc::from(store.create(layout)?);
        let memory = Arc::new(MemoryWriter {
            store: Arc::clone(&store),
            table: PageTable::new(layout.mem_size / PAGE),
            pages_done: AtomicU64::new(0),
            zero_pages: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
            parent: OnceLock::new(),
        });
        Ok(CheckpointWriter {
            store,
            memory,
            mem_size: layout.mem_size,
            state: None,
            memory_report: None,
            index: None,
            vm: VmConfig::default(),
            options: CheckpointOptions::default(),
            metrics: Metrics::default(),
            hot_pages: Vec::new(),
            parent: None,
            created: now(),
            discarder: Some(std::process::id()),
        })
    }

    /// Abandons the checkpoint, removing what it wrote (see the type's documentation), and
    /// reports whether that worked — as dropping the writer does, silently but for a log line.
    pub fn discard(mut self) -> Result<()> {
        self.discard_unfinished()
    }

    fn discard_unfinished(&mut self) -> Result<()> {
        match self.discarder.take() {
            Some(pid) if pid == std::process::id() => self.store.discard(),
            _ => Ok(()),
        }
    }

    /// The memory writer. Clone the `Arc` to hand it to threads; all clones must be dropped
    /// before `finish_memory`/`finish`.
    pub fn memory(&self) -> &Arc<MemoryWriter> {
        &self.memory
    }

    /// Writes the device-state section (opaque bytes, see [`crate::encode_state`]); once.
    pub fn write_state(&mut self, bytes: &[u8]) -> Result<()> {
        if self.state.is_some() {
            return Err(Error::SectionWrittenTwice { section: "state" });
        }
        let location = self.store.write_section(Section::State, bytes)?;
        self.state = Some(SectionEntry {
            name: Section::State.name().to_string(),
            file: location.file,
            offset: location.offset,
            length: bytes.len() as u64,
            checksum: Some(Checksum::of(bytes)),
        });
        Ok(())
    }

    /// Records the VM configuration. Its `mem_size` must be 0 (filled in) or the layout's.
    pub fn set_vm_config(&mut self, vm: VmConfig) {
        self.vm = vm;
    }

    /// Records how the checkpoint was taken.
    pub fn set_options(&mut self, options: CheckpointOptions) {
        self.options = options;
    }

    /// Records metrics; `bytes_written` and `zero_pages` are filled by `finish`.
    pub fn set_metrics(&mut self, metrics: Metrics) {
        self.metrics = metrics;
    }

    /// Records the guest's hot set (see [`MemoryInfo::hot_pages`]).
    pub fn set_hot_pages(&mut self, pages: Vec<u64>) {
        self.hot_pages = pages;
    }

    /// Records the checkpoint this one is incremental to (whose pages the memory writer kept
    /// with [`MemoryWriter::keep_in_parent`]).
    pub fn set_parent(&mut self, parent: ParentRef) {
        self.parent = Some(parent);
    }

    /// Overrides the creation time (milliseconds since the Unix epoch).
    pub fn set_created_unix_ms(&mut self, ms: u64) {
        self.created = (ms, crate::manifest::rfc3339_utc(ms));
    }

    /// Ends the memory write-out: checks every page was saved (naming the first missing one),
    /// makes the image durable, writes the page-index section. In the `fork` strategy this is
    /// the child's last call; see the module documentation.
    pub fn finish_memory(&mut self) -> Result<MemoryReport> {
        if let Some(report) = &self.memory_report {
            return Ok(report.clone());
        }
        let holders = Arc::strong_count(&self.memory) - 1;
        if holders > 0 {
            return Err(Error::MemoryWriterInUse { holders });
        }
        let index = self.memory.table.to_index()?;
        self.store.sync_memory()?;
        let bytes = index.encode();
        let location = self.store.write_section(Section::PageIndex, &bytes)?;
        self.store.sync()?;
        let progress = self.memory.progress();
        let report = MemoryReport {
            page_index: SectionEntry {
                name: Section::PageIndex.name().to_string(),
                file: location.file,
                offset: location.offset,
                length: bytes.len() as u64,
                checksum: Some(Checksum::of(&bytes)),
            },
            pages: index.pages(),
            zero_pages: index.zero_pages(),
            bytes_written: progress.bytes_written,
            pages_in_parent: index.parent_pages(),
        };
        self.memory_report = Some(report.clone());
        self.index = Some(index);
        Ok(report)
    }

    /// The page index as written (pages in the parent marked so), finishing the memory
    /// write-out first if need be (see [`finish_memory`](Self::finish_memory)).
    pub fn memory_index(&mut self) -> Result<&PageIndex> {
        self.finish_memory()?;
        Ok(self
            .index
            .as_ref()
            .expect("set with the memory report, by finish_memory or adopt_memory"))
    }

    /// Takes over the memory write-out done by another process (the `fork` child) from its
    /// report: reads the page index back from the store and checks it against the report.
    pub fn adopt_memory(&mut self, report: MemoryReport) -> Result<()> {
        let bad = |detail: String| Error::BadMemoryReport { detail };
        if self.memory_report.is_some() {
            return Err(Error::SectionWrittenTwice {
                section: "page-index",
            });
        }
        let pages = self.memory.pages();
        if report.pages != pages || report.page_index.name != Section::PageIndex.name() {
            return Err(bad(format!(
                "{} pages, checkpoint has {pages}",
                report.pages
            )));
        }
        let recorded = report
            .page_index
            .checksum
            .ok_or_else(|| bad("page index without checksum".into()))?;
        let bytes = self.store.read_section(&report.page_index)?;
        let actual = checksum(&bytes);
        if actual != recorded.0 {
            return Err(Error::ChecksumMismatch {
                section: Section::PageIndex.name().to_string(),
                expected: recorded.0,
                actual,
            });
        }
        let index = PageIndex::decode(&bytes, pages)?;
        if index.parent_pages() != report.pages_in_parent {
            return Err(bad(format!(
                "{} pages in the parent reported, index has {}",
                report.pages_in_parent,
                index.parent_pages()
            )));
        }
        if index.zero_pages() != report.zero_pages {
            return Err(bad(format!(
                "{} zero pages reported, index has {}",
                report.zero_pages,
                index.zero_pages()
            )));
        }
        self.memory_report = Some(report);
        self.index = Some(index);
        Ok(())
    }

    /// What `fork` does to the writer, without forking: a copy that shares the store but has
    /// its own page table, as the child's copy of the writer would. For tests of the `fork`
    /// split on a single process; not for production use.
    #[doc(hidden)]
    pub fn fork_copy(&self) -> CheckpointWriter {
        let memory = Arc::new(MemoryWriter {
            store: Arc::clone(&self.store),
            table: self.memory.table.copy(),
            pages_done: AtomicU64::new(self.memory.pages_done.load(Ordering::Relaxed)),
            zero_pages: AtomicU64::new(self.memory.zero_pages.load(Ordering::Relaxed)),
            bytes_written: AtomicU64::new(self.memory.bytes_written.load(Ordering::Relaxed)),
            parent: self.memory.parent.clone(),
        });
        CheckpointWriter {
            store: Arc::clone(&self.store),
            memory,
            mem_size: self.mem_size,
            state: self.state.clone(),
            memory_report: self.memory_report.clone(),
            index: self.index.clone(),
            vm: self.vm.clone(),
            options: self.options,
            metrics: self.metrics.clone(),
            hot_pages: self.hot_pages.clone(),
            parent: self.parent.clone(),
            created: self.created.clone(),
            discarder: None,
        }
    }

    /// Completes the checkpoint: page index (unless done by `finish_memory`/`adopt_memory`),
    /// manifest, fsync, completion marker, fsync. Returns the manifest written.
    pub fn finish(mut self) -> Result<Manifest> {
        let report = self.finish_memory()?;
        let state = self.state.clone().ok_or(Error::MissingState)?;
        if self.vm.mem_size == 0 {
            self.vm.mem_size = self.mem_size;
        } else if self.vm.mem_size != self.mem_size {
            return Err(Error::MemorySizeMismatch {
                config: self.vm.mem_size,
                layout: self.mem_size,
            });
        }
        let memory_location = self.store.memory_location();
        let memory = SectionEntry {
            name: Section::Memory.name().to_string(),
            file: memory_location.file,
            offset: memory_location.offset,
            length: self.mem_size,
            checksum: None,
        };
        let mut metrics = std::mem::take(&mut self.metrics);
        metrics.bytes_written = report.bytes_written + state.length + report.page_index.length;
        metrics.zero_pages = report.zero_pages;
        metrics.pages_in_parent = report.pages_in_parent;
        if report.pages_in_parent > 0 && self.parent.is_none() {
            return Err(Error::corrupt(
                "section page-index",
                format!(
                    "{} pages in the parent, but no parent is named",
                    report.pages_in_parent
                ),
            ));
        }
        let segments = self.memory_index()?.segment_checksums(SEGMENT_PAGES);
        let manifest = Manifest {
            format: FORMAT_NAME.to_string(),
            format_version: FORMAT_VERSION,
            format_minor: 1,
            created_unix_ms: self.created.0,
            created_utc: self.created.1.clone(),
            vm: std::mem::take(&mut self.vm),
            options: self.options,
            metrics,
            memory: MemoryInfo {
                index_segments: Some(IndexSegments::new(SEGMENT_PAGES, &segments)),
                ..MemoryInfo::new(
                    self.mem_size,
                    report.zero_pages,
                    std::mem::take(&mut self.hot_pages),
                )
            },
            sections: vec![state, report.page_index, memory],
            parent: self.parent.take(),
        };
        let bytes = manifest.to_json()?;
        let location = self.store.write_section(Section::Manifest, &bytes)?;
        let manifest_entry = SectionEntry {
            name: Section::Manifest.name().to_string(),
            file: location.file,
            offset: location.offset,
            length: bytes.len() as u64,
            checksum: Some(Checksum::of(&bytes)),
        };
        // Order matters: every section and the manifest must be durable before the marker
        // exists, or a crash could leave a "complete" checkpoint with missing data. `commit`
        // then writes the marker and makes it durable itself.
        self.store.sync()?;
        self.store.commit(&manifest.sections, &manifest_entry)?;
        self.discarder = None;
        Ok(manifest)
    }
}
