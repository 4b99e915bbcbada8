//! The pages written since each checkpoint of this VM, which an incremental checkpoint writes
//! (the others stay in its parent).
//!
//! Two sources, which together see every write to guest memory:
//! - **KVM's dirty log** (`KVM_MEM_LOG_DIRTY_PAGES` on every memory slot, read and cleared with
//!   `KVM_GET_DIRTY_LOG`): the guest's writes, and KVM's own (clock and steal-time pages);
//! - **the device code**: a [`DmaObserver`] installed on every disk from the first checkpoint on
//!   marks the guest pages a device is about to write (disk reads, the status byte, the used
//!   ring) in a bitmap of its own.
//!
//! Logging costs the guest: each read of the log write-protects the pages written since the
//! last one, and the guest's next write to each faults into KVM (on a host with shadow paging,
//! microseconds per page, seconds per checkpoint of a guest that rewrites gigabytes), and it
//! keeps KVM from mapping huge pages. So it starts only once wanted: at the first checkpoint
//! that names a parent, or the first checkpoint after [`DirtyLog::want`] (periodic checkpoints
//! with incrementals), or a migration. Until then every page counts as written since each
//! checkpoint, and an incremental checkpoint compares every page with its parent (a page whose
//! hash is the parent's stays in the parent): it writes what changed, but protects and reads
//! all of memory like a full one.
//!
//! Each checkpoint with logging on reads the log twice: once while it prepares (the VM runs;
//! clearing re-protects the pages written since the last checkpoint, a cost that grows with
//! them), and once in the pause, which then only reads what the guest wrote during the prepare
//! phase. At the instant T the pages read from both sources are the pages written since
//! the previous instant; they are added to the set kept for each recent complete checkpoint, so
//! an incremental checkpoint may name any of them as parent. The data of a disk read in flight
//! at T lands after T: its pages are marked again for the next interval.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use ckpt_format::PageIndex;
use tracing::{debug, warn};
use vm_memory::GuestMemoryMmap;

use crate::devices::virtio::block::{BlockState, RequestKind};
use crate::devices::virtio::DmaObserver;
use crate::kvm::KvmVm;
use crate::memory::{RamRegion, PAGE_SIZE};

/// Complete checkpoints of this VM an incremental checkpoint may name as parent (the newest).
/// Each costs a bit and a resolved page-index entry (9 bytes) per guest page.
pub(crate) const PARENTS_KEPT: usize = 4;

/// One bit per image page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PageBits {
    words: Vec<u64>,
    pages: u64,
}

impl PageBits {
    pub(crate) fn new(pages: u64) -> PageBits {
        PageBits {
            words: vec![0; pages.div_ceil(64) as usize],
            pages,
        }
    }

    /// As [`new`](Self::new), with its memory mapped already (written once): a fresh bitmap
    /// costs a page fault per 32 Ki pages at its first write, too much where that write falls
    /// in a VM's pause.
    pub(crate) fn new_mapped(pages: u64) -> PageBits {
        let mut words = vec![0u64; pages.div_ceil(64) as usize];
        // Zeroed memory from the allocator may not be mapped yet, and the compiler knows it is
        // zero: hidden from it, the fill is kept.
        std::hint::black_box(&mut words);
        words.fill(0);
        PageBits { words, pages }
    }

    pub(crate) fn get(&self, page: u64) -> bool {
        page < self.pages && self.words[(page / 64) as usize] & (1 << (page % 64)) != 0
    }

    pub(crate) fn set(&mut self, page: u64) {
        if page < self.pages {
            self.words[(page / 64) as usize] |= 1 << (page % 64);
        }
    }

    pub(crate) fn clear(&mut self, page: u64) {
        if page < self.pages {
            self.words[(page / 64) as usize] &= !(1 << (page % 64));
        }
    }

    /// Clears every page of `first..end` (pages past the bitmap are ignored).
    pub(crate) fn clear_range(&mut self, first: u64, end: u64) {
        let end = end.min(self.pages);
        let mut page = first;
        while page < end {
            let in_word = page % 64;
            let n = (64 - in_word).min(end - page);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << in_word
            };
            self.words[(page / 64) as usize] &= !mask;
            page += n;
        }
    }

    /// Adds the pages set in `other`, writing only the words that gain a page: a bitmap is
    /// mostly empty, and an untouched word costs nothing (nor does its memory, if never
    /// mapped).
    pub(crate) fn or(&mut self, other: &PageBits) {
        for (w, o) in self.words.iter_mut().zip(&other.words) {
            if *o & !*w != 0 {
                *w |= o;
            }
        }
    }

    /// Clears the pages set in `other`.
    pub(crate) fn and_not(&mut self, other: &PageBits) {
        for (w, o) in self.words.iter_mut().zip(&other.words) {
            *w &= !o;
        }
    }

    /// Makes this the same set as `other` (of as many pages), in its own memory.
    pub(crate) fn copy_from(&mut self, other: &PageBits) {
        self.words.copy_from_slice(&other.words);
    }

    /// Whether any page of `first..end` is clear (pages past the bitmap do not count).
    pub(crate) fn any_clear(&self, first: u64, end: u64) -> bool {
        self.next_with(first, end.min(self.pages), false) < end.min(self.pages)
    }

    /// Number of pages below `end` set both here and in `other`.
    pub(crate) fn count_both_below(&self, other: &PageBits, end: u64) -> u64 {
        let end = end.min(self.pages);
        let full = (end / 64) as usize;
        let mut n: u64 = self.words[..full]
            .iter()
            .zip(&other.words[..full])
            .map(|(a, b)| u64::from((a & b).count_ones()))
            .sum();
        if end % 64 != 0 {
            let mask = (1u64 << (end % 64)) - 1;
            n += u64::from((self.words[full] & other.words[full] & mask).count_ones());
        }
        n
    }

    /// Sets the pages from `from` on that are set in `other`.
    pub(crate) fn or_from(&mut self, other: &PageBits, from: u64) {
        if from >= self.pages {
            return;
        }
        let first = (from / 64) as usize;
        self.words[first] |= other.words[first] & !((1u64 << (from % 64)) - 1);
        for (w, o) in self.words[first + 1..]
            .iter_mut()
            .zip(&other.words[first + 1..])
        {
            *w |= o;
        }
    }

    /// Every page set.
    pub(crate) fn all(pages: u64) -> PageBits {
        PageBits::new(pages).complement()
    }

    /// The bitmap of `pages` pages whose words are `words`, if they fit (bits past the last
    /// page are dropped).
    pub(crate) fn from_words(mut words: Vec<u64>, pages: u64) -> Option<PageBits> {
        if words.len() as u64 != pages.div_ceil(64) {
            return None;
        }
        if pages % 64 != 0 {
            if let Some(last) = words.last_mut() {
                *last &= (1u64 << (pages % 64)) - 1;
            }
        }
        Some(PageBits { words, pages })
    }

    /// Whether any page of `first..end` is set.
    pub(crate) fn any(&self, first: u64, end: u64) -> bool {
        let end = end.min(self.pages);
        let mut page = first;
        while page < end {
            if page % 64 == 0 && end - page >= 64 {
                if self.words[(page / 64) as usize] != 0 {
                    return true;
                }
                page += 64;
            } else {
                if self.get(page) {
                    return true;
                }
                page += 1;
            }
        }
        false
    }

    /// Number of pages the bitmap covers.
    pub(crate) fn len(&self) -> u64 {
        self.pages
    }

    /// The pages not set.
    pub(crate) fn complement(&self) -> PageBits {
        let mut out = PageBits {
            words: self.words.iter().map(|w| !w).collect(),
            pages: self.pages,
        };
        if self.pages % 64 != 0 {
            if let Some(last) = out.words.last_mut() {
                *last &= (1u64 << (self.pages % 64)) - 1;
            }
        }
        out
    }

    /// The bits, 64 pages per word (page `p` is bit `p % 64` of word `p / 64`).
    pub(crate) fn words(&self) -> &[u64] {
        &self.words
    }

    /// Number of pages set.
    pub(crate) fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Maximal runs of pages inside `first..end` whose bit is `value`, in order.
    pub(crate) fn runs(&self, first: u64, end: u64, value: bool) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut page = first;
        while page < end {
            let start = self.next_with(page, end, value);
            if start >= end {
                break;
            }
            page = self.next_with(start, end, !value);
            out.push((start, page - start));
        }
        out
    }

    /// The first page of `page..end` whose bit is `value` (pages past the bitmap are clear),
    /// or `end`; a word at a time.
    fn next_with(&self, mut page: u64, end: u64, value: bool) -> u64 {
        while page < end {
            if page >= self.pages {
                return if value { end } else { page };
            }
            let word = self.words[(page / 64) as usize];
            let bits = if value { word } else { !word } >> (page % 64);
            if bits != 0 {
                return (page + u64::from(bits.trailing_zeros())).min(end);
            }
            page = (page / 64 + 1) * 64;
        }
        end
    }
}

/// Why an incremental checkpoint cannot be taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DirtyLogRefusal {
    /// The host's KVM does not log dirty pages.
    #[error("this host's KVM cannot log dirty pages: {0}")]
    Unsupported(String),
    /// The parent was not taken of this VM by this process (or is too old).
    #[error(
        "it is not one of the latest {PARENTS_KEPT} complete checkpoints taken of this VM by \
         this process (since its start, restore or rollback)"
    )]
    UnknownParent,
}

/// Pages the device code wrote since the last instant, marked before each write.
struct DeviceWrites {
    regions: Vec<RamRegion>,
    bits: Box<[AtomicU64]>,
    /// The same since the last migration round.
    round_bits: Box<[AtomicU64]>,
}

impl DeviceWrites {
    fn mark(&self, gpa: u64, len: u64) {
        let end = gpa.saturating_add(len.max(1));
        for r in &self.regions {
            let (lo, hi) = (gpa.max(r.gpa), end.min(r.gpa + r.len));
            if lo >= hi {
                continue;
            }
            let first = r.first_page() + (lo - r.gpa) / PAGE_SIZE;
            let last = r.first_page() + (hi - 1 - r.gpa) / PAGE_SIZE;
            for page in first..=last {
                self.bits[(page / 64) as usize].fetch_or(1 << (page % 64), Ordering::AcqRel);
                self.round_bits[(page / 64) as usize].fetch_or(1 << (page % 64), Ordering::AcqRel);
            }
        }
    }
}

impl DmaObserver for DeviceWrites {
    fn before_device_write(&self, gpa: u64, len: u64) {
        self.mark(gpa, len);
    }
}

/// Tells two observers, in order (the checkpoint's saver first: it must copy the page before the
/// write).
pub(crate) struct BothObservers(pub Arc<dyn DmaObserver>, pub Arc<dyn DmaObserver>);

impl DmaObserver for BothObservers {
    fn before_device_write(&self, gpa: u64, len: u64) {
        self.0.before_device_write(gpa, len);
        self.1.before_device_write(gpa, len);
    }
}

#[derive(Debug)]
enum Logging {
    Off,
    On,
    Unsupported(String),
}

struct LogState {
    logging: Logging,
    /// Whether logging is wanted: it starts at the next checkpoint (or migration) then.
    wanted: bool,
    /// Pages written since the last instant, read from KVM so far.
    pending: PageBits,
    /// The next `pending`, mapped before the pause that swaps it in (see
    /// [`PageBits::new_mapped`]).
    spare: Option<PageBits>,
    /// Pages written since the last migration round, while a migration runs.
    round: Option<PageBits>,
    /// The recent complete checkpoints, newest last.
    since: VecDeque<Since>,
}

/// A recent complete checkpoint of this VM.
struct Since {
    /// Its manifest checksum.
    manifest_checksum: u64,
    /// Its page index resolved down its chain: what each page held at its instant.
    index: Arc<PageIndex>,
    /// The pages written since its instant.
    written: PageBits,
}

/// The dirty-page tracker of one VM.
pub(crate) struct DirtyLog {
    device: Arc<DeviceWrites>,
    /// Whether the disks carry the observer already.
    observing: AtomicBool,
    pages: u64,
    state: Mutex<LogState>,
}

impl std::fmt::Debug for DirtyLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyLog")
            .field("pages", &self.pages)
            .finish()
    }
}

impl DirtyLog {
    pub(crate) fn new(regions: &[RamRegion]) -> DirtyLog {
        let pages: u64 = regions.iter().map(RamRegion::pages).sum();
        DirtyLog {
            device: Arc::new(DeviceWrites {
                regions: regions.to_vec(),
                bits: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
                round_bits: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            }),
            observing: AtomicBool::new(false),
            pages,
            state: Mutex::new(LogState {
                logging: Logging::Off,
                wanted: false,
                pending: PageBits::new_mapped(pages),
                spare: None,
                round: None,
                since: VecDeque::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, LogState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The observer the disks must carry from the first checkpoint on.
    pub(crate) fn observer(&self) -> Arc<dyn DmaObserver> {
        self.device.clone()
    }

    /// Whether this is the first call: the disks do not carry the observer yet.
    pub(crate) fn observer_first_installed(&self) -> bool {
        !self.observing.swap(true, Ordering::AcqRel)
    }

    /// The resolved page index of the parent, unless it is not a recent complete checkpoint of
    /// this VM or this host cannot log.
    pub(crate) fn check_parent(
        &self,
        manifest_checksum: u64,
    ) -> Result<Arc<PageIndex>, DirtyLogRefusal> {
        let state = self.lock();
        if let Logging::Unsupported(why) = &state.logging {
            return Err(DirtyLogRefusal::Unsupported(why.clone()));
        }
        state
            .since
            .iter()
            .find(|s| s.manifest_checksum == manifest_checksum)
            .map(|s| s.index.clone())
            .ok_or(DirtyLogRefusal::UnknownParent)
    }

    /// Asks for logging from the next checkpoint or migration on; once on, it stays on.
    pub(crate) fn want(&self) {
        self.lock().wanted = true;
    }

    /// Whether logging is wanted (see [`Self::want`]).
    pub(crate) fn wanted(&self) -> bool {
        self.lock().wanted
    }

    /// While the VM runs, before the pause: turns logging on if it is wanted and not on yet,
    /// or reads and clears the log so that the pause reads little.
    pub(crate) fn prepare(&self, vm: &KvmVm, memory: &GuestMemoryMmap) {
        let mut state = self.lock();
        if state.spare.is_none() {
            state.spare = Some(PageBits::new_mapped(self.pages));
        }
        match state.logging {
            Logging::Off if !state.wanted => {}
            Logging::Off => {
                match vm.log_dirty_pages(memory) {
                    Ok(()) => state.logging = Logging::On,
                    Err(e) => {
                        warn!("KVM cannot log dirty pages, incremental checkpoints are unavailable: {e}");
                        state.logging = Logging::Unsupported(e.to_string());
                    }
                }
            }
            Logging::On => {
                if let Err(e) = self.read_kvm(vm, &mut state) {
                    self.give_up(&mut state, e.to_string());
                }
            }
            Logging::Unsupported(_) => {}
        }
    }

    fn give_up(&self, state: &mut LogState, why: String) {
        warn!("KVM dirty log failed, incremental checkpoints are unavailable: {why}");
        state.logging = Logging::Unsupported(why);
        state.since.clear();
    }

    fn read_kvm(&self, vm: &KvmVm, state: &mut LogState) -> Result<(), crate::kvm::KvmError> {
        for (slot, region) in self.device.regions.iter().enumerate() {
            let bits = vm.take_dirty_log(slot as u32, region.len as usize)?;
            let first = region.first_page();
            for (w, &word) in bits.iter().enumerate() {
                let mut word = word;
                while word != 0 {
                    let bit = u64::from(word.trailing_zeros());
                    word &= word - 1;
                    let page = first + w as u64 * 64 + bit;
                    state.pending.set(page);
                    if let Some(round) = &mut state.round {
                        round.set(page);
                    }
                }
            }
        }
        Ok(())
    }

    /// A migration's pre-copy starts, the VM running: logging on (or read, so that the first
    /// round starts clean). Refused if this host's KVM cannot log.
    pub(crate) fn start_rounds(
        &self,
        vm: &KvmVm,
        memory: &GuestMemoryMmap,
    ) -> Result<(), DirtyLogRefusal> {
        self.want();
        self.prepare(vm, memory);
        let mut state = self.lock();
        if let Logging::Unsupported(why) = &state.logging {
            return Err(DirtyLogRefusal::Unsupported(why.clone()));
        }
        state.round = Some(PageBits::new(self.pages));
        for word in self.device.round_bits.iter() {
            word.store(0, Ordering::Release);
        }
        Ok(())
    }

    /// The pages written since the previous round of the migration (the guest's, read from
    /// KVM, and the devices').
    pub(crate) fn next_round(&self, vm: &KvmVm) -> Result<PageBits, DirtyLogRefusal> {
        let mut state = self.lock();
        if let Err(e) = self.read_kvm(vm, &mut state) {
            self.give_up(&mut state, e.to_string());
            return Err(DirtyLogRefusal::Unsupported(e.to_string()));
        }
        let mut written = state
            .round
            .replace(PageBits::new(self.pages))
            .unwrap_or_else(|| PageBits::all(self.pages));
        for (w, word) in self.device.round_bits.iter().enumerate() {
            written.words[w] |= word.swap(0, Ordering::AcqRel);
        }
        Ok(written)
    }

    /// The migration is over (or failed): rounds are no longer kept.
    pub(crate) fn end_rounds(&self) {
        self.lock().round = None;
    }

    /// While the VM runs, after [`Self::prepare`]: the pages known written so far since the
    /// checkpoint whose manifest checksum is `parent` (the pause adds those written meanwhile).
    /// `None` if it is not a recent checkpoint of this VM or logging is off.
    pub(crate) fn written_so_far(&self, parent: u64) -> Option<PageBits> {
        let state = self.lock();
        if !matches!(state.logging, Logging::On) {
            return None;
        }
        let mut written = state
            .since
            .iter()
            .find(|s| s.manifest_checksum == parent)?
            .written
            .clone();
        written.or(&state.pending);
        for (w, word) in self.device.bits.iter().enumerate() {
            written.words[w] |= word.load(Ordering::Acquire);
        }
        Some(written)
    }

    /// In the pause, at the instant T (vCPUs parked, devices frozen): the pages written since
    /// the previous instant join the set of every recent checkpoint. Returns the pages written
    /// since the checkpoint whose manifest checksum is `parent`, if asked.
    pub(crate) fn instant(
        &self,
        vm: &KvmVm,
        parent: Option<u64>,
    ) -> Result<Option<PageBits>, DirtyLogRefusal> {
        let started = Instant::now();
        let mut state = self.lock();
        if let Logging::On = state.logging {
            if let Err(e) = self.read_kvm(vm, &mut state) {
                self.give_up(&mut state, e.to_string());
            }
        }
        if let Logging::Unsupported(why) = &state.logging {
            return match parent {
                Some(_) => Err(DirtyLogRefusal::Unsupported(why.clone())),
                None => Ok(None),
            };
        }
        let next = state
            .spare
            .take()
            .unwrap_or_else(|| PageBits::new_mapped(self.pages));
        let mut written = std::mem::replace(&mut state.pending, next);
        for (w, word) in self.device.bits.iter().enumerate() {
            let bits = word.swap(0, Ordering::AcqRel);
            if bits != 0 {
                written.words[w] |= bits;
            }
        }
        for since in state.since.iter_mut() {
            since.written.or(&written);
        }
        let result = match parent {
            None => None,
            Some(p) => Some(
                state
                    .since
                    .iter()
                    .find(|s| s.manifest_checksum == p)
                    .map(|s| s.written.clone())
                    .ok_or(DirtyLogRefusal::UnknownParent)?,
            ),
        };
        debug!(
            written = written.count(),
            us = started.elapsed().as_micros() as u64,
            "dirty pages read at the instant"
        );
        Ok(result)
    }

    /// In the pause, once the devices are saved: the disk reads in flight at T fill their
    /// buffers after it, in the next interval.
    pub(crate) fn in_flight(&self, disks: &[BlockState]) {
        for request in disks.iter().flat_map(|d| &d.inflight) {
            if matches!(request.kind, RequestKind::Read | RequestKind::GetId) {
                for &(gpa, len) in &request.segments {
                    self.device.mark(gpa, u64::from(len));
                }
            }
        }
    }

    /// A checkpoint whose instant was the last one completed, with its resolved page index: it
    /// may be a parent from now on. Without logging every page counts as written since it: an
    /// incremental checkpoint of it then compares every page with it.
    pub(crate) fn completed(&self, manifest_checksum: u64, index: Arc<PageIndex>) {
        let mut state = self.lock();
        let written = match state.logging {
            Logging::On => PageBits::new(self.pages),
            Logging::Off => PageBits::all(self.pages),
            Logging::Unsupported(_) => return,
        };
        state.since.push_back(Since {
            manifest_checksum,
            index,
            written,
        });
        while state.since.len() > PARENTS_KEPT {
            state.since.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_bits_runs() {
        let mut b = PageBits::new(130);
        for p in [0, 1, 2, 64, 65, 129] {
            b.set(p);
        }
        assert_eq!(b.count(), 6);
        assert_eq!(b.runs(0, 130, true), vec![(0, 3), (64, 2), (129, 1)]);
        assert_eq!(b.runs(1, 66, false), vec![(3, 61)]);
        assert!(!b.get(130));
        assert!(b.any(60, 65) && b.any(129, 200) && !b.any(3, 64) && !b.any(66, 129));
        assert_eq!(b.runs(100, 200, false), vec![(100, 29), (130, 70)]);
    }

    #[test]
    fn page_bits_counts_and_merges_match_a_page_by_page_scan() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut random = |pages: u64| {
            let mut b = PageBits::new(pages);
            for p in 0..pages {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                if (seed >> 33) % 3 == 0 {
                    b.set(p);
                }
            }
            b
        };
        for pages in [1u64, 63, 64, 65, 200] {
            let (a, b) = (random(pages), random(pages));
            for at in [0, 1, 63, 64, 65, pages / 2, pages, pages + 9] {
                let want = (0..at.min(pages)).filter(|&p| a.get(p) && b.get(p)).count();
                assert_eq!(
                    a.count_both_below(&b, at),
                    want as u64,
                    "{pages} pages, below {at}"
                );
                let want_clear = (at.min(pages) / 2..at.min(pages)).any(|p| !a.get(p));
                assert_eq!(
                    a.any_clear(at.min(pages) / 2, at),
                    want_clear,
                    "{pages} pages"
                );
                let mut without = a.clone();
                without.and_not(&b);
                let mut copy = PageBits::new(pages);
                copy.copy_from(&without);
                for p in 0..pages {
                    assert_eq!(
                        copy.get(p),
                        a.get(p) && !b.get(p),
                        "{pages} pages, page {p}"
                    );
                }
                let mut cleared = a.clone();
                cleared.clear_range(at / 3, at);
                cleared.clear(at);
                for p in 0..pages {
                    assert_eq!(
                        cleared.get(p),
                        a.get(p) && !(at / 3..=at).contains(&p),
                        "{pages} pages, cleared {}..={at}, page {p}",
                        at / 3
                    );
                }
                let mut merged = a.clone();
                merged.or_from(&b, at);
                for p in 0..pages {
                    assert_eq!(
                        merged.get(p),
                        a.get(p) || (p >= at && b.get(p)),
                        "{pages} pages, from {at}, page {p}"
                    );
                }
            }
        }
    }

    #[test]
    fn page_bits_runs_match_a_page_by_page_scan() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for pages in [1u64, 63, 64, 65, 1000] {
            let mut b = PageBits::new(pages);
            for p in 0..pages {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                // Long runs and single pages both.
                if (seed >> 33) % 5 < 2 {
                    b.set(p);
                }
            }
            for value in [true, false] {
                for (first, end) in [(0, pages), (pages / 3, pages), (1, pages + 70)] {
                    let mut want = Vec::new();
                    let mut page = first;
                    while page < end {
                        if b.get(page) == value {
                            let start = page;
                            while page < end && b.get(page) == value {
                                page += 1;
                            }
                            want.push((start, page - start));
                        } else {
                            page += 1;
                        }
                    }
                    assert_eq!(
                        b.runs(first, end, value),
                        want,
                        "{pages} {value} {first}..{end}"
                    );
                }
            }
        }
    }
}
