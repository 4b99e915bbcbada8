//! Segments of the page index, verified on their own: the entries of a few pages without the
//! whole index.
//!
//! The writer records in the manifest ([`IndexSegments`]) a checksum of each segment of
//! [`SEGMENT_PAGES`] pages of the encoded page index (the segment's state bytes, then its
//! hashes): 8 bytes per 2 MiB of guest memory. A reader can then fetch the entries of one
//! segment with two ranged reads and verify them alone, so a lazy restore serves its first
//! faults long before the whole index (9 bytes per page) is read. An incremental checkpoint's
//! segment resolves against the same segment of its parent chain.

use std::ops::Range;

use crate::checksum::page_is_zero;
use crate::error::{Error, Result};
use crate::manifest::IndexSegments;
use crate::page_index::{
    segment_checksum, PageEntry, PageState, STATE_PARENT, STATE_PRESENT, STATE_ZERO,
};
use crate::PAGE_SIZE;

/// Pages per checksummed segment of the page index (2 MiB of guest memory).
pub const SEGMENT_PAGES: u64 = 512;

impl IndexSegments {
    /// The checksums of `checksums`, one per segment of `pages` pages.
    pub(crate) fn new(pages: u64, checksums: &[u64]) -> IndexSegments {
        IndexSegments {
            pages,
            xxh3: checksums.iter().map(|c| format!("{c:016x}")).collect(),
        }
    }

    /// The checksum of each segment, checked to cover `total` pages.
    pub(crate) fn decode(&self, total: u64) -> Result<Vec<u64>> {
        let bad = |detail: String| Error::corrupt("manifest", detail);
        if self.pages == 0 {
            return Err(bad("page index segments of 0 pages".into()));
        }
        let count = total.div_ceil(self.pages);
        if self.xxh3.len() as u64 != 16 * count || !self.xxh3.is_ascii() {
            return Err(bad(format!(
                "{} bytes of page index segment checksums, {count} segments need {}",
                self.xxh3.len(),
                16 * count
            )));
        }
        self.xxh3
            .as_bytes()
            .chunks_exact(16)
            .map(|hex| {
                let hex = std::str::from_utf8(hex).expect("ASCII");
                u64::from_str_radix(hex, 16)
                    .map_err(|e| bad(format!("page index segment checksum {hex:?}: {e}")))
            })
            .collect()
    }
}

/// The entries of a run of whole segments, each verified against its checksum, resolved down
/// the chain: for every page, its state, its hash, and which checkpoint of the chain holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexSegment {
    first: u64,
    states: Vec<u8>,
    hashes: Vec<u64>,
    /// How far up the chain the checkpoint holding each page is (0: this one).
    links: Vec<u8>,
}

impl IndexSegment {
    /// Decodes the entries of pages `pages` (whole segments of `segment_pages`, the last one
    /// possibly short) from their encoded `states` and `hashes`, checking each segment against
    /// `checksums` (indexed by segment number) and every state; "in parent" only if `chained`.
    pub(crate) fn decode(
        pages: Range<u64>,
        states: &[u8],
        hashes: &[u8],
        segment_pages: u64,
        checksums: &[u64],
        chained: bool,
    ) -> Result<IndexSegment> {
        let n = (pages.end - pages.start) as usize;
        if states.len() != n || hashes.len() != 8 * n {
            return Err(Error::Truncated {
                section: format!("page-index (pages {}..{})", pages.start, pages.end),
                expected: 9 * n as u64,
                found: (states.len() + hashes.len()) as u64,
            });
        }
        let mut at = 0;
        while at < n {
            let end = (at + segment_pages as usize).min(n);
            let segment = (pages.start + at as u64) / segment_pages;
            let expected = checksums[segment as usize];
            let actual = segment_checksum(&states[at..end], &hashes[8 * at..8 * end]);
            if actual != expected {
                return Err(Error::ChecksumMismatch {
                    section: format!(
                        "page-index (pages {}..{})",
                        pages.start + at as u64,
                        pages.start + end as u64
                    ),
                    expected,
                    actual,
                });
            }
            at = end;
        }
        let known = |s: u8| s == STATE_ZERO || s == STATE_PRESENT || (s == STATE_PARENT && chained);
        if let Some(i) = states.iter().position(|&s| !known(s)) {
            return Err(Error::corrupt(
                "section page-index",
                format!(
                    "page {} has unknown state {}",
                    pages.start + i as u64,
                    states[i]
                ),
            ));
        }
        Ok(IndexSegment {
            first: pages.start,
            states: states.to_vec(),
            hashes: hashes
                .chunks_exact(8)
                .map(|h| u64::from_le_bytes(h.try_into().expect("8 bytes")))
                .collect(),
            links: vec![0; n],
        })
    }

    /// The pages covered.
    pub fn pages(&self) -> Range<u64> {
        self.first..self.first + self.states.len() as u64
    }

    /// Whether any page is in the parent.
    pub(crate) fn has_parent_pages(&self) -> bool {
        self.states.contains(&STATE_PARENT)
    }

    /// Gives every page in the parent the entry of `parent` (the same pages, resolved).
    pub(crate) fn resolve(&mut self, parent: &IndexSegment) -> Result<()> {
        if parent.pages() != self.pages() {
            return Err(Error::corrupt(
                "section page-index",
                format!(
                    "segment of pages {:?}, its parent's covers {:?}",
                    self.pages(),
                    parent.pages()
                ),
            ));
        }
        for i in 0..self.states.len() {
            if self.states[i] == STATE_PARENT {
                self.states[i] = parent.states[i];
                self.hashes[i] = parent.hashes[i];
                self.links[i] = parent.links[i] + 1;
            }
        }
        Ok(())
    }

    fn slot(&self, page: u64) -> Option<usize> {
        page.checked_sub(self.first)
            .map(|i| i as usize)
            .filter(|&i| i < self.states.len())
    }

    /// The entry of `page`, or `None` outside the segment.
    pub fn entry(&self, page: u64) -> Option<PageEntry> {
        let i = self.slot(page)?;
        let state = match self.states[i] {
            STATE_ZERO => PageState::Zero,
            STATE_PARENT => PageState::Parent,
            _ => PageState::Present,
        };
        Some(PageEntry {
            state,
            hash: self.hashes[i],
        })
    }

    /// How far up the chain the checkpoint holding `page` is (0: this one).
    pub(crate) fn link(&self, page: u64) -> Option<usize> {
        self.slot(page).map(|i| usize::from(self.links[i]))
    }

    /// Checks `bytes`, the content of page `page`, against its entry.
    pub fn verify(&self, page: u64, bytes: &[u8]) -> Result<()> {
        let pages = self.pages().end;
        let entry = self
            .entry(page)
            .ok_or(Error::PageOutOfRange { page, pages })?;
        verify_entry(entry, page, bytes)
    }
}

/// Checks `bytes`, the content of page `page`, against its resolved entry.
pub(crate) fn verify_entry(entry: PageEntry, page: u64, bytes: &[u8]) -> Result<()> {
    if bytes.len() != PAGE_SIZE {
        return Err(Error::NotPageMultiple {
            what: "page",
            len: bytes.len() as u64,
        });
    }
    match entry.state {
        PageState::Zero if page_is_zero(bytes) => Ok(()),
        PageState::Zero => Err(Error::ZeroPageMismatch { page }),
        // A resolved entry is never in the parent.
        PageState::Present | PageState::Parent => {
            let actual = crate::checksum(bytes);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checksum::zero_page_hash;
    use crate::PageIndex;

    fn entry(state: PageState, hash: u64) -> PageEntry {
        PageEntry { state, hash }
    }

    /// The segment of `pages` of `index`, decoded as a reader does.
    fn segment(index: &PageIndex, pages: Range<u64>, per: u64) -> Result<IndexSegment> {
        let bytes = index.encode();
        let (s, h) = PageIndex::encoded_ranges(index.pages(), pages.clone());
        let sums = index.segment_checksums(per);
        IndexSegment::decode(
            pages,
            &bytes[s.start as usize..s.end as usize],
            &bytes[h.start as usize..h.end as usize],
            per,
            &sums,
            index.parent_pages() > 0,
        )
    }

    #[test]
    fn segments_verify_alone_and_match_the_whole_index() {
        let index = PageIndex::from_entries((0..10u64).map(|i| {
            if i % 4 == 0 {
                entry(PageState::Zero, 0)
            } else {
                entry(PageState::Present, 100 + i)
            }
        }));
        let sums = index.segment_checksums(4);
        assert_eq!(sums.len(), 3);
        let recorded = IndexSegments::new(4, &sums);
        assert_eq!(recorded.decode(10).unwrap(), sums);
        assert!(recorded.decode(13).is_err());
        for pages in [0..4, 4..8, 8..10, 4..10] {
            let seg = segment(&index, pages.clone(), 4).unwrap();
            for p in pages {
                assert_eq!(seg.entry(p), index.entry(p));
                assert_eq!(seg.link(p), Some(0));
            }
        }
        let seg = segment(&index, 0..4, 4).unwrap();
        assert_eq!(seg.entry(4), None);
        assert_eq!(seg.entry(0).unwrap().hash, zero_page_hash());
        assert!(seg.verify(0, &[0; PAGE_SIZE]).is_ok());
        assert!(matches!(
            seg.verify(0, &[1; PAGE_SIZE]),
            Err(Error::ZeroPageMismatch { page: 0 })
        ));
        assert!(matches!(
            seg.verify(1, &[1; PAGE_SIZE]),
            Err(Error::PageMismatch { page: 1, .. })
        ));
    }

    #[test]
    fn a_corrupt_segment_is_refused_naming_its_pages() {
        let index =
            PageIndex::from_entries((0..10u64).map(|i| entry(PageState::Present, 7 * i + 1)));
        let sums = index.segment_checksums(4);
        let bytes = index.encode();
        let (s, h) = PageIndex::encoded_ranges(10, 4..8);
        let states = &bytes[s.start as usize..s.end as usize];
        let mut hashes = bytes[h.start as usize..h.end as usize].to_vec();
        hashes[9] ^= 1;
        let err = IndexSegment::decode(4..8, states, &hashes, 4, &sums, false).unwrap_err();
        assert!(err.to_string().contains("page-index (pages 4..8)"), "{err}");
        let mut states = states.to_vec();
        states[0] = STATE_PARENT;
        let sums = {
            let mut sums = sums;
            sums[1] = segment_checksum(&states, &bytes[h.start as usize..h.end as usize]);
            sums
        };
        let hashes = &bytes[h.start as usize..h.end as usize];
        assert!(matches!(
            IndexSegment::decode(4..8, &states, hashes, 4, &sums, false),
            Err(Error::Corrupt { .. })
        ));
        assert!(IndexSegment::decode(4..8, &states, hashes, 4, &sums, true).is_ok());
    }

    #[test]
    fn a_child_segment_resolves_against_its_parents() {
        let parent = PageIndex::from_entries([
            entry(PageState::Present, 1),
            entry(PageState::Zero, 0),
            entry(PageState::Present, 3),
            entry(PageState::Present, 4),
        ]);
        let child = PageIndex::from_entries([
            entry(PageState::Parent, 0),
            entry(PageState::Present, 7),
            entry(PageState::Parent, 0),
            entry(PageState::Zero, 0),
        ]);
        let mut seg = segment(&child, 0..4, 4).unwrap();
        assert!(seg.has_parent_pages());
        seg.resolve(&segment(&parent, 0..4, 4).unwrap()).unwrap();
        let whole = child.resolve(&parent).unwrap();
        for p in 0..4 {
            assert_eq!(seg.entry(p), whole.entry(p));
        }
        assert_eq!(
            (0..4).map(|p| seg.link(p).unwrap()).collect::<Vec<_>>(),
            vec![1, 0, 1, 0]
        );
        assert!(seg.resolve(&segment(&parent, 0..2, 2).unwrap()).is_err());
    }
}
