//! The page index: for every guest page, whether it is zero or present in the image, and the
//! xxh3-64 hash of its content, so any page can be verified on its own, in any order.
//!
//! On-disk layout of the `page-index` section (all integers little-endian):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `b"CVPGIDX\0"` |
//! | 8 | 4 | index layout version (1, or 2 when a page is in the parent) |
//! | 12 | 4 | page size (4096) |
//! | 16 | 8 | page count `n` |
//! | 24 | 8 | reserved (0) |
//! | 32 | `n` rounded up to 8 | one state byte per page: 0 = zero, 1 = present, 2 = in parent |
//! | … | `8 n` | one u64 hash per page (the hash of a zero page for zero pages, 0 in parent) |
//!
//! An incremental checkpoint marks the pages the guest has not written since its parent's
//! instant "in parent": the image does not hold them, the parent's index (resolved down its own
//! chain) says what they are. Such an index has layout version 2, which readers that know only
//! version 1 refuse naming both versions; an index without such a page stays version 1.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

use crate::checksum::zero_page_hash;
use crate::error::{Error, Result};
use crate::PAGE_SIZE;

const MAGIC: &[u8; 8] = b"CVPGIDX\0";
const INDEX_VERSION: u32 = 1;
/// The layout of an index with pages in the parent.
const INDEX_VERSION_CHAINED: u32 = 2;
const HEADER_LEN: u64 = 32;

pub(crate) const STATE_ZERO: u8 = 0;
pub(crate) const STATE_PRESENT: u8 = 1;
pub(crate) const STATE_PARENT: u8 = 2;
/// Writer-only states, never on disk.
const STATE_UNWRITTEN: u8 = 0xff;
const STATE_CLAIMED: u8 = 0xfe;

/// What the image holds for one page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageState {
    /// All zero: not written to the image; whatever bytes are there must not be trusted.
    Zero,
    /// Written to the image at `page * 4096` of the memory section.
    Present,
    /// Not written since the parent checkpoint's instant: the parent holds it (its hash here
    /// is 0; the parent's index has it).
    Parent,
}

/// One page's entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageEntry {
    /// Zero or present.
    pub state: PageState,
    /// xxh3-64 of the page's 4096 bytes.
    pub hash: u64,
}

/// The decoded page index of a checkpoint, kept in its on-disk layout (checked once when
/// decoded): a restore needs it before the first guest instruction, and decoding it into
/// other vectors would cost a second allocation and copy of 8 MiB at 4 GiB of memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageIndex {
    encoded: Vec<u8>,
    pages: usize,
}

fn states_len(pages: u64) -> u64 {
    pages.div_ceil(8) * 8
}

impl PageIndex {
    /// Byte length of the encoded index of `pages` pages (at most 2^60 pages: every memory
    /// size a manifest can name).
    pub fn encoded_len(pages: u64) -> u64 {
        Self::checked_encoded_len(pages).expect("a page count below 2^60")
    }

    /// As [`encoded_len`](Self::encoded_len), `None` where the length does not fit in 64 bits
    /// (a count that only a corrupt header claims).
    fn checked_encoded_len(pages: u64) -> Option<u64> {
        let states = pages.checked_next_multiple_of(8)?;
        HEADER_LEN
            .checked_add(states)?
            .checked_add(pages.checked_mul(8)?)
    }

    /// Number of pages.
    pub fn pages(&self) -> u64 {
        self.pages as u64
    }

    fn states(&self) -> &[u8] {
        &self.encoded[HEADER_LEN as usize..HEADER_LEN as usize + self.pages]
    }

    fn hashes_at(&self) -> usize {
        (HEADER_LEN + states_len(self.pages as u64)) as usize
    }

    /// Where the state bytes and the hashes of `pages` lie in the encoded index of `total`
    /// pages.
    pub(crate) fn encoded_ranges(total: u64, pages: Range<u64>) -> (Range<u64>, Range<u64>) {
        let hashes_at = HEADER_LEN + states_len(total);
        (
            HEADER_LEN + pages.start..HEADER_LEN + pages.end,
            hashes_at + 8 * pages.start..hashes_at + 8 * pages.end,
        )
    }

    /// The checksum of each segment of `segment_pages` pages (the last may be shorter), as
    /// [`segment_checksum`] computes it from the encoded index.
    pub fn segment_checksums(&self, segment_pages: u64) -> Vec<u64> {
        let total = self.pages as u64;
        (0..total.div_ceil(segment_pages))
            .map(|s| {
                let pages = s * segment_pages..((s + 1) * segment_pages).min(total);
                let (states, hashes) = Self::encoded_ranges(total, pages);
                let bytes = |r: Range<u64>| &self.encoded[r.start as usize..r.end as usize];
                segment_checksum(bytes(states), bytes(hashes))
            })
            .collect()
    }

    fn hash_at(&self, i: usize) -> u64 {
        let at = self.hashes_at() + 8 * i;
        u64::from_le_bytes(self.encoded[at..at + 8].try_into().expect("8 bytes"))
    }

    /// The entry of `page`, or `None` past the end.
    pub fn entry(&self, page: u64) -> Option<PageEntry> {
        let i = usize::try_from(page).ok()?;
        let state = match *self.states().get(i)? {
            STATE_ZERO => PageState::Zero,
            STATE_PARENT => PageState::Parent,
            _ => PageState::Present,
        };
        Some(PageEntry {
            state,
            hash: self.hash_at(i),
        })
    }

    /// Number of zero pages.
    pub fn zero_pages(&self) -> u64 {
        self.states().iter().filter(|&&s| s == STATE_ZERO).count() as u64
    }

    /// Number of pages in the parent.
    pub fn parent_pages(&self) -> u64 {
        self.states().iter().filter(|&&s| s == STATE_PARENT).count() as u64
    }

    /// Whether page `page` is in the parent (false past the end).
    pub fn in_parent(&self, page: u64) -> bool {
        usize::try_from(page)
            .ok()
            .and_then(|i| self.states().get(i))
            .is_some_and(|&s| s == STATE_PARENT)
    }

    /// Resolves an incremental checkpoint's index against its parent's (itself resolved): every
    /// page in the parent takes the parent's entry. Fails if the page counts differ.
    pub fn resolve(&self, parent: &PageIndex) -> Result<PageIndex> {
        if parent.pages() != self.pages() {
            return Err(Error::corrupt(
                "section page-index",
                format!(
                    "{} pages, its parent's has {}",
                    self.pages(),
                    parent.pages()
                ),
            ));
        }
        let states = self.states();
        if !states.contains(&STATE_PARENT) {
            return Ok(self.clone());
        }
        let parent_states = parent.states();
        let merged: Vec<u8> = states
            .iter()
            .zip(parent_states)
            .map(|(&s, &p)| if s == STATE_PARENT { p } else { s })
            .collect();
        let hashes = (0..self.pages).map(|i| {
            if states[i] == STATE_PARENT {
                parent.hash_at(i)
            } else {
                self.hash_at(i)
            }
        });
        Ok(PageIndex::from_parts(&merged, hashes))
    }

    /// Maximal runs of zero pages, in increasing order (a restore that maps a raw device whose
    /// holes are not guaranteed zero overlays these with anonymous zero memory).
    pub fn zero_runs(&self) -> impl Iterator<Item = Range<u64>> + '_ {
        let states = self.states();
        let n = states.len();
        let mut i = 0;
        std::iter::from_fn(move || {
            while i < n && states[i] != STATE_ZERO {
                i += 1;
            }
            if i == n {
                return None;
            }
            let start = i;
            while i < n && states[i] == STATE_ZERO {
                i += 1;
            }
            Some(start as u64..i as u64)
        })
    }

    /// Encodes the index in its on-disk layout.
    pub fn encode(&self) -> Vec<u8> {
        self.encoded.clone()
    }

    /// The index of `states` and `hashes` (one each per page) in its on-disk layout.
    fn from_parts(states: &[u8], hashes: impl Iterator<Item = u64>) -> PageIndex {
        let pages = states.len() as u64;
        let mut out = Vec::with_capacity(Self::encoded_len(pages) as usize);
        out.extend_from_slice(MAGIC);
        let version = if states.contains(&STATE_PARENT) {
            INDEX_VERSION_CHAINED
        } else {
            INDEX_VERSION
        };
        out.extend_from_slice(&version.to_le_bytes());
        out.extend_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
        out.extend_from_slice(&pages.to_le_bytes());
        out.extend_from_slice(&0u64.to_le_bytes());
        out.extend_from_slice(states);
        out.resize((HEADER_LEN + states_len(pages)) as usize, 0);
        for h in hashes {
            out.extend_from_slice(&h.to_le_bytes());
        }
        PageIndex {
            encoded: out,
            pages: states.len(),
        }
    }

    /// Decodes an index, checking its header and every entry, and that it describes
    /// `expected_pages` pages.
    pub fn decode(bytes: &[u8], expected_pages: u64) -> Result<PageIndex> {
        PageIndex::decode_owned(bytes.to_vec(), expected_pages)
    }

    /// As [`decode`](Self::decode), keeping `bytes` as the index (no copy).
    pub fn decode_owned(bytes: Vec<u8>, expected_pages: u64) -> Result<PageIndex> {
        let bad = |detail: String| Error::corrupt("section page-index", detail);
        if bytes.len() < HEADER_LEN as usize {
            return Err(bad(format!(
                "{} bytes is shorter than its header",
                bytes.len()
            )));
        }
        let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().expect("8 bytes"));
        if &bytes[..8] != MAGIC {
            return Err(Error::BadMagic {
                what: "page index",
                found: String::from_utf8_lossy(&bytes[..8]).into_owned(),
            });
        }
        let version = u32_at(8);
        if version != INDEX_VERSION && version != INDEX_VERSION_CHAINED {
            return Err(Error::UnsupportedVersion {
                what: "page index",
                found: version,
                supported: INDEX_VERSION_CHAINED,
            });
        }
        if u32_at(12) as usize != PAGE_SIZE {
            return Err(bad(format!("page size {}", u32_at(12))));
        }
        let pages = u64_at(16);
        if pages != expected_pages {
            return Err(bad(format!(
                "{pages} pages, manifest says {expected_pages}"
            )));
        }
        match Self::checked_encoded_len(pages) {
            Some(len) if len == bytes.len() as u64 => {}
            Some(len) => {
                return Err(bad(format!(
                    "{} bytes, {len} expected for {pages} pages",
                    bytes.len()
                )))
            }
            None => return Err(bad(format!("{pages} pages is more than any memory holds"))),
        }
        let n = pages as usize;
        let states_at = HEADER_LEN as usize;
        let states = &bytes[states_at..states_at + n];
        let known = |s: u8| {
            s == STATE_ZERO
                || s == STATE_PRESENT
                || (s == STATE_PARENT && version == INDEX_VERSION_CHAINED)
        };
        if let Some(page) = states.iter().position(|&s| !known(s)) {
            return Err(bad(format!(
                "page {page} has unknown state {}",
                states[page]
            )));
        }
        Ok(PageIndex {
            encoded: bytes,
            pages: n,
        })
    }
}

/// The checksum of one segment of the page index: xxh3-64 of its pages' state bytes followed by
/// their hashes, both as encoded.
pub(crate) fn segment_checksum(states: &[u8], hashes: &[u8]) -> u64 {
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    hasher.update(states);
    hasher.update(hashes);
    hasher.digest()
}

/// The writer's lock-free per-page table: one state byte and one hash per page.
///
/// A page goes UNWRITTEN → CLAIMED (compare-and-swap, so two writers of one page cannot both
/// win) → ZERO or PRESENT (release store after its hash, so whoever sees the final state sees
/// the hash).
pub(crate) struct PageTable {
    states: Box<[AtomicU8]>,
    hashes: Box<[AtomicU64]>,
}

impl PageTable {
    pub(crate) fn new(pages: u64) -> PageTable {
        let n = usize::try_from(pages).expect("page count fits in memory");
        PageTable {
            states: (0..n).map(|_| AtomicU8::new(STATE_UNWRITTEN)).collect(),
            hashes: (0..n).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    pub(crate) fn pages(&self) -> u64 {
        self.states.len() as u64
    }

    /// Claims `page` for writing; fails if it was claimed or written before.
    pub(crate) fn claim(&self, page: u64) -> Result<()> {
        let slot = &self.states[page as usize];
        slot.compare_exchange(
            STATE_UNWRITTEN,
            STATE_CLAIMED,
            Ordering::AcqRel,
            Ordering::Acquire,
        )
        .map(|_| ())
        .map_err(|_| Error::PageWrittenTwice { page })
    }

    /// Records `page`, not yet claimed, as in the parent; fails if it was claimed before.
    pub(crate) fn keep_in_parent(&self, page: u64) -> Result<()> {
        self.claim(page)?;
        self.complete_in_parent(page);
        Ok(())
    }

    /// Records a claimed page as in the parent.
    pub(crate) fn complete_in_parent(&self, page: u64) {
        self.hashes[page as usize].store(0, Ordering::Relaxed);
        self.states[page as usize].store(STATE_PARENT, Ordering::Release);
    }

    /// Returns a claimed page to unwritten (its write failed).
    pub(crate) fn unclaim(&self, page: u64) {
        self.states[page as usize].store(STATE_UNWRITTEN, Ordering::Release);
    }

    /// Records a claimed page as written.
    pub(crate) fn complete(&self, page: u64, zero: bool, hash: u64) {
        let i = page as usize;
        self.hashes[i].store(hash, Ordering::Relaxed);
        let state = if zero { STATE_ZERO } else { STATE_PRESENT };
        self.states[i].store(state, Ordering::Release);
    }

    /// A copy of the table (what `fork` gives the child).
    pub(crate) fn copy(&self) -> PageTable {
        PageTable {
            states: self
                .states
                .iter()
                .map(|s| AtomicU8::new(s.load(Ordering::Acquire)))
                .collect(),
            hashes: self
                .hashes
                .iter()
                .map(|h| AtomicU64::new(h.load(Ordering::Relaxed)))
                .collect(),
        }
    }

    /// Snapshots the table into a [`PageIndex`]; fails naming the first page not written.
    pub(crate) fn to_index(&self) -> Result<PageIndex> {
        let states: Vec<u8> = self
            .states
            .iter()
            .map(|s| s.load(Ordering::Acquire))
            .collect();
        let unwritten = |s: u8| s == STATE_UNWRITTEN || s == STATE_CLAIMED;
        let missing = states.iter().filter(|&&s| unwritten(s)).count() as u64;
        if missing > 0 {
            let page = states
                .iter()
                .position(|&s| unwritten(s))
                .expect("a missing page exists") as u64;
            return Err(Error::PageMissing {
                page,
                missing,
                pages: self.pages(),
            });
        }
        let hashes = self.hashes.iter().map(|h| h.load(Ordering::Relaxed));
        Ok(PageIndex::from_parts(&states, hashes))
    }
}

impl PageIndex {
    /// Builds an index from entries (tests and tools).
    pub fn from_entries(entries: impl IntoIterator<Item = PageEntry>) -> PageIndex {
        let (states, hashes): (Vec<u8>, Vec<u64>) = entries
            .into_iter()
            .map(|e| match e.state {
                PageState::Zero => (STATE_ZERO, zero_page_hash()),
                PageState::Present => (STATE_PRESENT, e.hash),
                PageState::Parent => (STATE_PARENT, 0),
            })
            .unzip();
        PageIndex::from_parts(&states, hashes.into_iter())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_decode_round_trip() {
        let idx = PageIndex::from_entries((0..13u64).map(|i| PageEntry {
            state: if i % 3 == 0 {
                PageState::Zero
            } else {
                PageState::Present
            },
            hash: i * 0x1111,
        }));
        let bytes = idx.encode();
        assert_eq!(bytes.len() as u64, PageIndex::encoded_len(13));
        let back = PageIndex::decode(&bytes, 13).unwrap();
        assert_eq!(back, idx);
        assert_eq!(back.zero_pages(), 5);
        assert_eq!(
            back.zero_runs().collect::<Vec<_>>(),
            vec![0..1, 3..4, 6..7, 9..10, 12..13]
        );
        assert!(PageIndex::decode(&bytes, 12).is_err());
        let mut bad = bytes.clone();
        bad[32 + 2] = 7;
        assert!(matches!(
            PageIndex::decode(&bad, 13),
            Err(Error::Corrupt { .. })
        ));
    }

    #[test]
    fn parent_pages_need_version_2_and_resolve() {
        let entry = |state, hash| PageEntry { state, hash };
        let parent = PageIndex::from_entries([
            entry(PageState::Present, 1),
            entry(PageState::Zero, 0),
            entry(PageState::Present, 3),
        ]);
        assert_eq!(
            u32::from_le_bytes(parent.encode()[8..12].try_into().unwrap()),
            1
        );
        let child = PageIndex::from_entries([
            entry(PageState::Parent, 0),
            entry(PageState::Present, 7),
            entry(PageState::Parent, 0),
        ]);
        let mut bytes = child.encode();
        assert_eq!(u32::from_le_bytes(bytes[8..12].try_into().unwrap()), 2);
        assert_eq!(PageIndex::decode(&bytes, 3).unwrap(), child);
        assert_eq!(child.parent_pages(), 2);
        let resolved = child.resolve(&parent).unwrap();
        assert_eq!(resolved.entry(0), Some(entry(PageState::Present, 1)));
        assert_eq!(resolved.entry(1), Some(entry(PageState::Present, 7)));
        assert_eq!(resolved.entry(2), Some(entry(PageState::Present, 3)));
        assert!(child.resolve(&PageIndex::from_entries([])).is_err());
        // A version 1 index has no parent pages.
        bytes[8] = 1;
        assert!(matches!(
            PageIndex::decode(&bytes, 3),
            Err(Error::Corrupt { .. })
        ));
    }

    #[test]
    fn table_claims_once_and_reports_missing() {
        let t = PageTable::new(4);
        t.claim(2).unwrap();
        assert!(matches!(
            t.claim(2),
            Err(Error::PageWrittenTwice { page: 2 })
        ));
        t.complete(2, false, 5);
        assert!(matches!(
            t.claim(2),
            Err(Error::PageWrittenTwice { page: 2 })
        ));
        for p in [0, 3] {
            t.claim(p).unwrap();
            t.complete(p, true, zero_page_hash());
        }
        assert!(matches!(
            t.to_index(),
            Err(Error::PageMissing {
                page: 1,
                missing: 1,
                pages: 4
            })
        ));
        t.claim(1).unwrap();
        t.complete(1, false, 9);
        let idx = t.to_index().unwrap();
        assert_eq!(
            idx.entry(1),
            Some(PageEntry {
                state: PageState::Present,
                hash: 9
            })
        );
        assert_eq!(idx.entry(0).unwrap().state, PageState::Zero);
        assert_eq!(idx.entry(4), None);
    }
}
