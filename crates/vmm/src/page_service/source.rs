//! Where the page service takes pages from.
//!
//! A source only moves bytes: it reads a run of pages as they were saved, and knows nothing of
//! their checksums. The page service verifies every page against the checkpoint's page index
//! before it installs it, so a source may be anything that can be wrong — a file, a raw device,
//! a memfd, and later an object store or a migration peer.

use ckpt_format::{Checkpoint, IndexSegment};
use thiserror::Error;

/// A source failed to deliver a run of pages.
#[derive(Debug, Error)]
#[error("cannot read pages {first}..{end}", end = first + count)]
pub struct SourceError {
    /// First page of the run.
    pub first: u64,
    /// Pages in the run.
    pub count: u64,
    /// Cause.
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

/// Pages of a checkpoint's memory image, by page number (page `i` is guest image byte
/// `i * 4096`).
pub trait PageSource: Send + Sync {
    /// Reads pages `first..first + buf.len() / 4096` into `buf`, unverified.
    fn read_run(&self, first: u64, buf: &mut [u8]) -> Result<(), SourceError>;

    /// As [`read_run`](Self::read_run) for pages within `segment`, before the whole page index
    /// is read: the segment says which pages are zero and which checkpoint of a chain holds
    /// each of the others.
    fn read_run_in(
        &self,
        segment: &IndexSegment,
        first: u64,
        buf: &mut [u8],
    ) -> Result<(), SourceError> {
        let _ = segment;
        self.read_run(first, buf)
    }

    /// Says that pages will be read mostly in ascending order, so that a source on a device
    /// can read further ahead. A hint: by default nothing happens.
    fn reads_in_order(&self) {}
}

fn source_error(first: u64, buf: &[u8], e: ckpt_format::Error) -> SourceError {
    SourceError {
        first,
        count: (buf.len() / ckpt_format::PAGE_SIZE) as u64,
        source: Box::new(e),
    }
}

/// The checkpoint reader serves every store it opens: directory, raw device and memory stores.
impl PageSource for Checkpoint {
    fn read_run(&self, first: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        self.read_pages(first, buf)
            .map_err(|e| source_error(first, buf, e))
    }

    fn read_run_in(
        &self,
        segment: &IndexSegment,
        first: u64,
        buf: &mut [u8],
    ) -> Result<(), SourceError> {
        self.read_pages_in(segment, first, buf)
            .map_err(|e| source_error(first, buf, e))
    }

    fn reads_in_order(&self) {
        Checkpoint::reads_in_order(self);
    }
}

/// What a run of a fetched block holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RunKind {
    /// All zeros: mapped with the zero page, nothing read.
    Zero,
    /// Verified data, in the fetch buffer from byte `at` on.
    Data {
        /// Where the run's first page starts in the fetch buffer.
        at: usize,
    },
    /// Already in guest memory: left as it is.
    Present,
}

/// Consecutive pages of a block that are the same kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Run {
    /// First page.
    pub first: u64,
    /// Pages.
    pub count: u64,
    /// What they hold.
    pub kind: RunKind,
}

/// Where the page service gets the verified pages of a block: a checkpoint (its store and page
/// index) or a migration source.
pub(crate) trait BlockSource: Send + Sync {
    /// Its name, for messages.
    fn describe(&self) -> String;

    /// Called once by the prefetcher before it starts, off the path to the first instruction.
    fn prepare(&self) -> Result<(), super::PageServiceError> {
        Ok(())
    }

    /// Whether any of pages `first..end` is missing when the service starts (otherwise their
    /// block starts resident).
    fn missing_at_start(&self, first: u64, end: u64) -> bool {
        let _ = (first, end);
        true
    }

    /// Fetches pages `first..end` (one block), verified, as runs covering the block in order;
    /// a data run's bytes are in `buf` from its `at` on. `buf` holds a block when called; a
    /// source that received the pages in a buffer of its own may swap that one in instead of
    /// copying.
    fn fetch(
        &self,
        first: u64,
        end: u64,
        buf: &mut Vec<u8>,
    ) -> Result<Vec<Run>, super::PageServiceError>;

    /// Says that blocks will be fetched mostly in ascending order, so that the source can read
    /// further ahead. A hint: by default nothing happens.
    fn reads_in_order(&self) {}

    /// As [`fetch`](Self::fetch), into `buf` itself (one block long), every data run at its
    /// own offset, so that the page service can hand the buffer's pages to guest memory
    /// whole. `None` where the source delivers into buffers of its own.
    fn fetch_in_place(
        &self,
        first: u64,
        end: u64,
        buf: &mut [u8],
    ) -> Option<Result<Vec<Run>, super::PageServiceError>> {
        let _ = (first, end, buf);
        None
    }

    /// Every block is resident: nothing more will be fetched.
    fn all_resident(&self) {}
}
