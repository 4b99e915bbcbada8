//! A checkpoint as a block source: pages read from its store and verified against its page
//! index (or, until the whole index is read, against the index's segments of the block).

use std::sync::Arc;
use std::time::Instant;

use ckpt_format::{Checkpoint, IndexSegment, PageIndex, PageState, PAGE_SIZE};
use tracing::debug;

use super::source::{BlockSource, PageSource, Run, RunKind};
use super::PageServiceError;

/// The pages of a checkpoint, from `source`, verified against `checkpoint`'s page index.
pub(crate) struct CheckpointBlocks {
    /// The checkpoint: its page index verifies every page.
    pub checkpoint: Arc<Checkpoint>,
    /// Where the pages come from.
    pub source: Arc<dyn PageSource>,
    /// The store's name, for messages.
    pub store: String,
}

impl CheckpointBlocks {
    /// The entries that verify the pages of a block: the whole page index once it is read,
    /// before that the index's segments of the block alone (two ranged reads, each segment
    /// verified against its checksum in the manifest).
    fn entries(&self, first: u64, end: u64) -> Result<Entries<'_>, PageServiceError> {
        let ckpt = &self.checkpoint;
        if ckpt.page_index_loaded() || !ckpt.has_index_segments() {
            return ckpt
                .page_index()
                .map(Entries::Whole)
                .map_err(|source| self.index_error(source));
        }
        let started = Instant::now();
        let segment = ckpt
            .index_segment(first..end)
            .map_err(|source| self.index_error(source))?;
        debug!(
            first,
            us = started.elapsed().as_micros() as u64,
            "page index segment read"
        );
        Ok(Entries::Segment(segment))
    }

    fn index_error(&self, source: ckpt_format::Error) -> PageServiceError {
        PageServiceError::Index {
            store: self.store.clone(),
            source,
        }
    }
}

impl BlockSource for CheckpointBlocks {
    fn describe(&self) -> String {
        self.store.clone()
    }

    /// Reads the whole page index, off the path to the first instruction.
    fn prepare(&self) -> Result<(), PageServiceError> {
        self.checkpoint
            .page_index()
            .map(|_| ())
            .map_err(|source| self.index_error(source))
    }

    fn reads_in_order(&self) {
        self.source.reads_in_order();
    }

    fn fetch(&self, first: u64, end: u64, buf: &mut Vec<u8>) -> Result<Vec<Run>, PageServiceError> {
        self.fetch_into(first, end, buf)
    }

    fn fetch_in_place(
        &self,
        first: u64,
        end: u64,
        buf: &mut [u8],
    ) -> Option<Result<Vec<Run>, PageServiceError>> {
        Some(self.fetch_into(first, end, buf))
    }
}

impl CheckpointBlocks {
    /// Reads and verifies pages `first..end` into `buf`, each data run at its own offset.
    fn fetch_into(
        &self,
        first: u64,
        end: u64,
        buf: &mut [u8],
    ) -> Result<Vec<Run>, PageServiceError> {
        let entries = self.entries(first, end)?;
        let mut runs = Vec::new();
        let mut page = first;
        while page < end {
            let is_zero = entries.is_zero(page);
            let mut run_end = page + 1;
            while run_end < end && entries.is_zero(run_end) == is_zero {
                run_end += 1;
            }
            if !is_zero {
                let at = ((page - first) as usize) * PAGE_SIZE;
                let run = &mut buf[at..at + ((run_end - page) as usize) * PAGE_SIZE];
                entries
                    .read(self.source.as_ref(), page, run)
                    .map_err(|source| PageServiceError::Read {
                        store: self.store.clone(),
                        source,
                    })?;
                for (i, bytes) in run.chunks_exact(PAGE_SIZE).enumerate() {
                    entries
                        .verify(&self.checkpoint, page + i as u64, bytes)
                        .map_err(|source| PageServiceError::Verify {
                            store: self.store.clone(),
                            source,
                        })?;
                }
            }
            runs.push(Run {
                first: page,
                count: run_end - page,
                kind: if is_zero {
                    RunKind::Zero
                } else {
                    RunKind::Data {
                        at: ((page - first) as usize) * PAGE_SIZE,
                    }
                },
            });
            page = run_end;
        }
        Ok(runs)
    }
}

/// What verifies the pages of one block.
enum Entries<'a> {
    /// The whole page index.
    Whole(&'a PageIndex),
    /// The index's segments of the block, read and verified on their own.
    Segment(IndexSegment),
}

impl Entries<'_> {
    fn is_zero(&self, page: u64) -> bool {
        let entry = match self {
            Entries::Whole(index) => index.entry(page),
            Entries::Segment(segment) => segment.entry(page),
        };
        entry.is_some_and(|e| e.state == PageState::Zero)
    }

    fn read(
        &self,
        source: &dyn PageSource,
        first: u64,
        buf: &mut [u8],
    ) -> Result<(), super::SourceError> {
        match self {
            Entries::Whole(_) => source.read_run(first, buf),
            Entries::Segment(segment) => source.read_run_in(segment, first, buf),
        }
    }

    fn verify(&self, ckpt: &Checkpoint, page: u64, bytes: &[u8]) -> ckpt_format::Result<()> {
        match self {
            Entries::Whole(_) => ckpt.verify_page(page, bytes),
            Entries::Segment(segment) => segment.verify(page, bytes),
        }
    }
}
