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
}
