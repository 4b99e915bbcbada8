//! The destination's page source after the hand-over. The source pushes every block the
//! destination lacks, in address order; the reader thread keeps those that arrive before the
//! page service claims them (a bounded number: it stops reading while the page service catches
//! up). A block claimed before it arrived (a vCPU's first touch, usually) is requested: the
//! source answers requests ahead of its pushes, and sends each block once, so a request for a
//! block already on its way is answered by the push. Every block is checked against the pages
//! the destination lacks before it is installed.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use tracing::{debug, error};

use super::transport::{lock, ReadHalf, WriteHalf};
use super::wire::{self, Kind, WireError, DATA, UNCHANGED, ZERO};
use crate::checkpoint::dirty::PageBits;
use crate::memory::{self, RamRegion, PAGE_SIZE};
use crate::page_service::{BlockSource, PageServiceError, Run, RunKind, SourceError, BLOCK_PAGES};

/// The writing half and what the destination has said on it.
struct Writer {
    w: BufWriter<WriteHalf>,
    running_sent: bool,
    resident_pending: bool,
}

/// Blocks kept before they are claimed, at most (2 MiB each).
const PUSHED_MAX: usize = 32;
/// Frame buffers kept for reuse, at most: the blocks kept, and those being installed.
const SPARE_MAX: usize = PUSHED_MAX + 4;
/// The capacity of a frame buffer: a pages frame of a whole block (header, kinds, data).
const FRAME_CAPACITY: usize = (BLOCK_PAGES * (PAGE_SIZE + 1)) as usize + 12;

/// Blocks received and blocks awaited, by first page.
#[derive(Default)]
struct Inbox {
    /// Who waits for the block starting at each page.
    waiters: HashMap<u64, SyncSender<Vec<u8>>>,
    /// Blocks pushed before anyone claimed them.
    pushed: HashMap<u64, Vec<u8>>,
}

/// State shared with the reader thread.
struct Shared {
    inbox: Mutex<Inbox>,
    /// Signalled when a pushed block is taken (or the service ends).
    space: Condvar,
    /// Why the connection is gone, once it is.
    lost: Mutex<Option<String>>,
    /// Frame buffers to read into again: a 2 MiB buffer freshly allocated for each frame costs
    /// a fault and a clear per page.
    spare: Mutex<Vec<Vec<u8>>>,
    /// Every page is resident: the source closing the connection is expected.
    done: AtomicBool,
}

/// Pages from the migration source.
pub(super) struct PeerPages {
    peer: String,
    lacking: PageBits,
    /// The pages pre-copy left in place here: those neither held nor lacking are zero at the
    /// source (it never sent them), and are mapped as zero unless already present.
    held: PageBits,
    /// Guest memory, to look up which pages are present (huge pages can make pages present
    /// that pre-copy did not write).
    regions: Vec<RamRegion>,
    /// This process's page map.
    map: File,
    writer: Mutex<Writer>,
    shared: Arc<Shared>,
    stream: TcpStream,
    reader: Mutex<Option<JoinHandle<()>>>,
}

impl PeerPages {
    /// Starts the reader thread on `r`; requests and reports go to `w`. `held`: the pages
    /// pre-copy put in place (and that are not stale).
    pub(super) fn start(
        peer: String,
        lacking: PageBits,
        held: PageBits,
        regions: Vec<RamRegion>,
        mut r: BufReader<ReadHalf>,
        w: BufWriter<WriteHalf>,
    ) -> std::io::Result<PeerPages> {
        let stream = w.get_ref().socket().try_clone()?;
        let map = File::open("/proc/self/pagemap")?;
        let shared = Arc::new(Shared {
            inbox: Mutex::new(Inbox::default()),
            space: Condvar::new(),
            lost: Mutex::new(None),
            spare: Mutex::new(Vec::new()),
            done: AtomicBool::new(false),
        });
        let pages = lacking.len();
        let reader = std::thread::Builder::new()
            .name("migration-in".into())
            .spawn({
                let shared = shared.clone();
                move || {
                    let mut lost_why = None;
                    let why = loop {
                        let mut payload = shared.spare_buffer();
                        match wire::read_frame_into(&mut r, &mut payload) {
                            Ok(Kind::Pages) => {
                                let first = match wire::decode_pages(&payload, pages) {
                                    Ok(p) => p.first,
                                    Err(e) => break e.to_string(),
                                };
                                let mut inbox = lock(&shared.inbox);
                                // A fetch may start waiting for this block while the reader
                                // waits for room: each wake looks for one again.
                                loop {
                                    if let Some(tx) = inbox.waiters.remove(&first) {
                                        let _ = tx.send(payload);
                                        break;
                                    }
                                    if inbox.pushed.len() < PUSHED_MAX
                                        || shared.done.load(Ordering::Acquire)
                                    {
                                        if inbox.pushed.insert(first, payload).is_some() {
                                            lost_why = Some("a block sent twice".to_string());
                                        }
                                        break;
                                    }
                                    inbox =
                                        shared.space.wait(inbox).unwrap_or_else(|p| p.into_inner());
                                }
                                if let Some(why) = lost_why.take() {
                                    break why;
                                }
                            }
                            Ok(got) => {
                                break WireError::Unexpected {
                                    got,
                                    expected: "pages",
                                }
                                .to_string()
                            }
                            Err(WireError::Closed) => {
                                break "the source closed the connection".into()
                            }
                            Err(e) => break e.to_string(),
                        }
                    };
                    if !shared.done.load(Ordering::Acquire) {
                        error!("migration source lost: {why}");
                    }
                    *lock(&shared.lost) = Some(why);
                    // Dropping the senders fails every fetch waiting.
                    lock(&shared.inbox).waiters.clear();
                }
            })?;
        Ok(PeerPages {
            peer,
            lacking,
            held,
            regions,
            map,
            writer: Mutex::new(Writer {
                w,
                running_sent: false,
                resident_pending: false,
            }),
            shared,
            stream,
            reader: Mutex::new(Some(reader)),
        })
    }

    /// Tells the source the vCPUs run, `took_us` after the switchover arrived (and, if every
    /// page arrived before, that too).
    pub(super) fn running(&self, took_us: u64) -> Result<(), WireError> {
        let mut w = lock(&self.writer);
        wire::write_frame(&mut w.w, Kind::Running, &[&took_us.to_le_bytes()])?;
        w.running_sent = true;
        if w.resident_pending {
            wire::write_frame(&mut w.w, Kind::Resident, &[])?;
        }
        w.w.flush()?;
        Ok(())
    }

    fn failure(&self, first: u64, count: u64, why: String) -> PageServiceError {
        PageServiceError::Peer {
            peer: self.peer.clone(),
            source: SourceError {
                first,
                count,
                source: why.into(),
            },
        }
    }
}

impl Shared {
    /// A buffer to read a frame into: one read before, if any is spare.
    fn spare_buffer(&self) -> Vec<u8> {
        lock(&self.spare)
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(FRAME_CAPACITY))
    }

    /// Keeps `buf` to read a frame into again (its contents are overwritten then, not cleared),
    /// while frames may still come.
    fn give_back(&self, buf: Vec<u8>) {
        let mut spare = lock(&self.spare);
        if buf.capacity() >= FRAME_CAPACITY
            && spare.len() < SPARE_MAX
            && !self.done.load(Ordering::Acquire)
        {
            spare.push(buf);
        }
    }
}

impl Drop for PeerPages {
    fn drop(&mut self) {
        self.shared.done.store(true, Ordering::Release);
        drop(lock(&self.shared.inbox));
        self.shared.space.notify_all();
        let _ = self.stream.shutdown(Shutdown::Both);
        if let Some(t) = lock(&self.reader).take() {
            let _ = t.join();
        }
    }
}

/// Pages and their kinds, in order, as runs (data pages join a run if their bytes follow its
/// bytes in the buffer).
fn runs_of(kinds: impl Iterator<Item = (u64, RunKind)>) -> Vec<Run> {
    let mut runs: Vec<Run> = Vec::new();
    for (page, kind) in kinds {
        let joins = |last: &Run| match (last.kind, kind) {
            (RunKind::Data { at: a }, RunKind::Data { at: b }) => {
                b == a + (last.count * PAGE_SIZE) as usize
            }
            (a, b) => a == b,
        };
        match runs.last_mut() {
            Some(last) if joins(last) => last.count += 1,
            _ => runs.push(Run {
                first: page,
                count: 1,
                kind,
            }),
        }
    }
    runs
}

impl BlockSource for PeerPages {
    fn describe(&self) -> String {
        self.peer.clone()
    }

    fn missing_at_start(&self, first: u64, end: u64) -> bool {
        self.lacking.any(first, end) || self.held.any_clear(first, end)
    }

    fn fetch(&self, first: u64, end: u64, buf: &mut Vec<u8>) -> Result<Vec<Run>, PageServiceError> {
        let count = end - first;
        let lost = |why: String| {
            self.failure(
                first,
                count,
                format!(
                    "{why}: the source went away before all memory arrived (a VM migrated \
                     post-copy cannot run without its source)"
                ),
            )
        };
        // Which pages not lacking are here already (a block of lacking pages only, as in a
        // post-copy, needs no look); a block with none lacking needs nothing from the source.
        let present = if self.lacking.any_clear(first, end) {
            let region = self
                .regions
                .iter()
                .find(|r| first >= r.first_page() && end <= r.first_page() + r.pages())
                .ok_or_else(|| self.failure(first, count, "not a block of guest memory".into()))?;
            memory::populated(&self.map, region.host_of_page(first), count)
                .map_err(|e| self.failure(first, count, format!("cannot read the page map: {e}")))?
        } else {
            Vec::new()
        };
        if !self.lacking.any(first, end) {
            return Ok(runs_of((first..end).map(|page| {
                let present = present[(page - first) as usize];
                (
                    page,
                    if present {
                        RunKind::Present
                    } else {
                        RunKind::Zero
                    },
                )
            })));
        }
        let (tx, rx) = sync_channel(1);
        let pushed = {
            let mut inbox = lock(&self.shared.inbox);
            match inbox.pushed.remove(&first) {
                Some(payload) => {
                    self.shared.space.notify_all();
                    Some(payload)
                }
                None => {
                    if let Some(why) = lock(&self.shared.lost).clone() {
                        return Err(lost(why));
                    }
                    inbox.waiters.insert(first, tx);
                    // The reader may hold this very block, waiting for room to keep it.
                    self.shared.space.notify_all();
                    None
                }
            }
        };
        let payload = match pushed {
            Some(payload) => payload,
            None => {
                {
                    let mut w = lock(&self.writer);
                    let sent =
                        wire::write_frame(&mut w.w, Kind::Request, &[&wire::request(first, end)])
                            .and_then(|()| w.w.flush());
                    if let Err(e) = sent {
                        return Err(lost(e.to_string()));
                    }
                }
                rx.recv().map_err(|_| {
                    lost(
                        lock(&self.shared.lost)
                            .clone()
                            .unwrap_or_else(|| "the connection ended".into()),
                    )
                })?
            }
        };
        let pages = wire::decode_pages(&payload, self.lacking.len())
            .map_err(|e| self.failure(first, count, e.to_string()))?;
        if pages.first != first || pages.kinds.len() as u64 != count {
            return Err(self.failure(first, count, "the source answered other pages".into()));
        }
        // The pages are installed straight from the frame: it becomes the fetch buffer, and
        // the fetch buffer a spare one for the reader.
        let data_at = payload.len() - pages.data.len();
        let mut kinds = Vec::with_capacity(count as usize);
        let mut data_pages = 0;
        for (page, kind, _) in pages.iter() {
            let kind = match (kind, self.lacking.get(page)) {
                (UNCHANGED, false) if present[(page - first) as usize] => RunKind::Present,
                (UNCHANGED, false) => RunKind::Zero,
                (ZERO, true) => RunKind::Zero,
                (DATA, true) => {
                    data_pages += 1;
                    RunKind::Data {
                        at: data_at + (data_pages - 1) * PAGE_SIZE as usize,
                    }
                }
                _ => {
                    return Err(self.failure(
                        first,
                        count,
                        format!(
                        "page {page}: the source's answer does not match the pages this VM lacks"
                    ),
                    ))
                }
            };
            kinds.push((page, kind));
        }
        let mut payload = payload;
        std::mem::swap(buf, &mut payload);
        self.shared.give_back(payload);
        Ok(runs_of(kinds.into_iter()))
    }

    fn all_resident(&self) {
        self.shared.done.store(true, Ordering::Release);
        // No frame of pages comes any more: the buffers kept for them go.
        lock(&self.shared.spare).clear();
        let mut w = lock(&self.writer);
        if !w.running_sent {
            w.resident_pending = true;
            return;
        }
        let told = wire::write_frame(&mut w.w, Kind::Resident, &[]).and_then(|()| w.w.flush());
        match told {
            Ok(()) => debug!("every page arrived: the source may end"),
            Err(e) => error!("cannot tell the migration source that every page arrived: {e}"),
        }
    }
}
