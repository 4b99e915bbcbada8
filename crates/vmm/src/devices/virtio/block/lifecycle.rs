//! The life of a request on one disk: popped (parsed and checked, recorded in the disk's
//! in-flight table, the DMA observer told about the memory a read will fill) → for a write,
//! *deferred* while a write against an older image touches the clusters it would copy up
//! (M14), then prepared (`prepare_write` allocates and copies up) → *held* until its
//! submission time (the `delay_ms` test knob) → *submitted* to io_uring → *done* → published
//! to the guest (status byte, used ring, interrupt) unless publication is frozen for a
//! checkpoint.

use std::collections::BTreeMap;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use disk::Extent;
use tracing::{debug, info, warn};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::generations::Images;
use super::request::{in_memory, parse, validate, Parsed};
use super::submit::{pair, Submitter};
use super::{status, Block, DiskConfig, InflightRequest, RequestKind, ID_LEN, SECTOR_SIZE};
use crate::devices::guest_warn::{guest_warn, GuestWarnings};
use crate::devices::virtio::mmio::{MmioTransport, INT_USED_BUFFER};
use crate::devices::virtio::DmaObserver;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Deferred,
    Held(Instant),
    Submitted(usize),
    Done,
}

struct Request {
    info: InflightRequest,
    epoch: u64,
    popped: Instant,
    phase: Phase,
    status: u8,
    /// Bytes the device wrote into the chain, status byte included.
    used_len: u32,
    /// Where a prepared write goes.
    extents: Vec<Extent>,
}

impl Request {
    fn new(info: InflightRequest, epoch: u64, phase: Phase, status: u8) -> Request {
        Request {
            info,
            epoch,
            popped: Instant::now(),
            phase,
            status,
            used_len: 1,
            extents: Vec::new(),
        }
    }
}

/// One disk as the device thread sees it.
pub(super) struct DiskState {
    /// Index of the disk in the VM.
    index: usize,
    pub config: DiskConfig,
    transport: Arc<Mutex<MmioTransport>>,
    pub notify: EventFd,
    pub images: Images,
    /// In pop order.
    requests: BTreeMap<u64, Request>,
    next_id: u64,
    /// Publication stopped for a checkpoint.
    pub frozen: bool,
    pub observer: Option<Arc<dyn DmaObserver>>,
    /// Replies owed once no request is live.
    pub drain_waiters: Vec<Sender<()>>,
    /// The GET_ID answer.
    id: [u8; ID_LEN],
    /// What the driver gets wrong, logged within a limit.
    warnings: GuestWarnings,
}

impl DiskState {
    /// The device thread's side of `block`, and the requests restored with it.
    pub fn new(block: Block) -> (DiskState, Vec<InflightRequest>) {
        let mut id = [0u8; ID_LEN];
        let name = format!("cowvm-disk{}", block.index);
        let n = name.len().min(ID_LEN);
        id[..n].copy_from_slice(&name.as_bytes()[..n]);
        let disk = DiskState {
            index: block.index,
            config: block.config,
            transport: block.transport,
            notify: block.notify,
            images: Images::new(block.image),
            requests: BTreeMap::new(),
            next_id: 0,
            frozen: false,
            observer: None,
            drain_waiters: Vec::new(),
            id,
            warnings: GuestWarnings::new("virtio-blk"),
        };
        (disk, block.restored)
    }

    pub fn transport(&self) -> MutexGuard<'_, MmioTransport> {
        self.transport.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Requests popped and not yet completed to the guest.
    pub fn inflight(&self) -> Vec<InflightRequest> {
        self.requests.values().map(|r| r.info.clone()).collect()
    }

    /// Requests whose I/O was never submitted.
    pub fn unsubmitted(&self) -> usize {
        self.requests
            .values()
            .filter(|r| matches!(r.phase, Phase::Held(_) | Phase::Deferred))
            .count()
    }

    fn live(&self) -> impl Iterator<Item = &Request> {
        self.requests.values().filter(|r| r.phase != Phase::Done)
    }

    fn conflicts(&self, w: &InflightRequest) -> bool {
        self.images.conflicts(w, self.live().map(|r| &r.info))
    }

    fn insert(&mut self, req: Request) -> u64 {
        self.next_id += 1;
        self.requests.insert(self.next_id, req);
        self.next_id
    }

    /// Takes every request the guest has made available.
    pub fn pop(&mut self, mem: &GuestMemoryMmap) {
        let d = self.index;
        let generation = self.images.generation();
        if self.frozen {
            // Popped after the thaw: a checkpoint's device state and memory must agree on
            // which requests the device has taken.
            return;
        }
        let (parsed, epoch) = {
            let mut t = self.transport();
            if !t.running() {
                return;
            }
            let epoch = t.reset_epoch();
            let Some((queue, _)) = t.queue_mut(0) else {
                return;
            };
            let parsed: Result<Vec<Parsed>, _> = queue
                .iter(mem)
                .map(|it| it.map(|chain| parse(chain, generation)).collect());
            match parsed {
                Ok(p) => (p, epoch),
                Err(virtio_queue::Error::QueueNotReady) => return,
                Err(e) => {
                    t.mark_broken(&format!("bad available ring: {e}"));
                    return;
                }
            }
        };
        for p in parsed {
            match p {
                Parsed::Broken(why) => {
                    self.transport().mark_broken(why);
                    return;
                }
                Parsed::Fail {
                    head,
                    status_addr,
                    status,
                    why,
                } => {
                    guest_warn!(
                        self.warnings,
                        disk = d,
                        head,
                        "malformed virtio-blk request: {why}"
                    );
                    let info = InflightRequest {
                        head,
                        kind: RequestKind::GetId,
                        sector: 0,
                        len: 0,
                        segments: Vec::new(),
                        status_addr,
                        image_generation: generation,
                    };
                    self.insert(Request::new(info, epoch, Phase::Done, status));
                }
                Parsed::Request(info) => self.admit(mem, info, epoch),
            }
        }
        self.settle(mem);
    }

    fn admit(&mut self, mem: &GuestMemoryMmap, info: InflightRequest, epoch: u64) {
        let d = self.index;
        let refused = if let Err(why) = validate(&info, mem, self.images.capacity()) {
            guest_warn!(
                self.warnings,
                disk = d,
                head = info.head,
                sector = info.sector,
                "virtio-blk request refused: {why}"
            );
            true
        } else if info.kind == RequestKind::Write && self.config.readonly {
            guest_warn!(self.warnings, disk = d, sector = info.sector, path = %self.config.path.display(), "write to a read-only disk refused");
            true
        } else {
            false
        };
        if refused {
            self.insert(Request::new(info, epoch, Phase::Done, status::IOERR));
            return;
        }
        if matches!(info.kind, RequestKind::Read | RequestKind::GetId) {
            if let Some(obs) = &self.observer {
                for &(gpa, len) in &info.segments {
                    obs.before_device_write(gpa, u64::from(len));
                }
            }
        }
        let deferred = info.kind == RequestKind::Write && self.conflicts(&info);
        if deferred {
            debug!(
                disk = d,
                sector = info.sector,
                "write waits for an older write to the same clusters"
            );
        }
        let id = self.insert(Request::new(info, epoch, Phase::Deferred, status::OK));
        if !deferred {
            self.prepare(id);
        }
    }

    /// Allocates (copy-up) for a write, then holds the request until its submission time.
    fn prepare(&mut self, id: u64) {
        let delay = Duration::from_millis(self.config.delay_ms);
        let Some(req) = self.requests.get(&id) else {
            return;
        };
        let (info, popped) = (req.info.clone(), req.popped);
        let result = if info.kind == RequestKind::Write {
            self.images.prepare_write(&info)
        } else {
            Ok(Vec::new())
        };
        let req = self.requests.get_mut(&id).expect("looked up above");
        match result {
            Ok(extents) => {
                req.extents = extents;
                req.phase = Phase::Held((popped + delay).max(Instant::now()));
            }
            Err(e) => {
                warn!(
                    disk = self.index,
                    sector = info.sector,
                    "write preparation failed: {e}"
                );
                req.status = status::IOERR;
                req.phase = Phase::Done;
            }
        }
    }

    /// Re-submits requests restored from a checkpoint: they were popped before the save and
    /// the guest has not seen them complete.
    pub fn resubmit(&mut self, mem: &GuestMemoryMmap, reqs: Vec<InflightRequest>) {
        let generation = self.images.generation();
        let epoch = self.transport().reset_epoch();
        for mut info in reqs {
            info.image_generation = generation;
            if !in_memory(mem, info.status_addr, 1) {
                self.transport()
                    .mark_broken("a restored request has no status byte in guest memory");
                return;
            }
            info!(disk = self.index, head = info.head, kind = ?info.kind, sector = info.sector, "re-submitting a restored request");
            self.admit(mem, info, epoch);
        }
        self.settle(mem);
    }

    /// When the next held request is due.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.requests
            .values()
            .filter_map(|r| match r.phase {
                Phase::Held(t) => Some(t),
                _ => None,
            })
            .min()
    }

    /// Starts the held requests that are due.
    pub fn run_due(&mut self, mem: &GuestMemoryMmap, sub: &mut Submitter) {
        let now = Instant::now();
        let due: Vec<u64> = self
            .requests
            .iter()
            .filter(|(_, r)| matches!(r.phase, Phase::Held(t) if t <= now))
            .map(|(&id, _)| id)
            .collect();
        if due.is_empty() {
            return;
        }
        for id in due {
            self.start(mem, sub, id);
        }
        self.settle(mem);
    }

    /// Issues the I/O of a held request.
    fn start(&mut self, mem: &GuestMemoryMmap, sub: &mut Submitter, id: u64) {
        let d = self.index;
        let Some(req) = self.requests.get_mut(&id) else {
            return;
        };
        let info = req.info.clone();
        let (status, used, transfers) = match info.kind {
            RequestKind::Flush => {
                let mut st = status::OK;
                for e in self.images.flush_all() {
                    warn!(disk = d, "flush failed: {e}");
                    st = status::IOERR;
                }
                (st, 0, Vec::new())
            }
            RequestKind::GetId => {
                let mut at = 0usize;
                let mut st = status::OK;
                for &(gpa, len) in &info.segments {
                    let n = (len as usize).min(ID_LEN - at);
                    if mem
                        .write_slice(&self.id[at..at + n], GuestAddress(gpa))
                        .is_err()
                    {
                        st = status::IOERR;
                    }
                    at += n;
                }
                (st, at as u32, Vec::new())
            }
            RequestKind::Read => {
                let image = self
                    .images
                    .get_mut(info.image_generation)
                    .expect("an in-flight request keeps its image");
                match image.map_read(info.sector * SECTOR_SIZE, u64::from(info.len)) {
                    Ok(extents) => match pair(mem, &info.segments, &extents) {
                        Ok(t) => (status::OK, info.len, t),
                        Err(()) => (status::IOERR, 0, Vec::new()),
                    },
                    Err(e) => {
                        warn!(disk = d, sector = info.sector, "read mapping failed: {e}");
                        (status::IOERR, 0, Vec::new())
                    }
                }
            }
            RequestKind::Write => match pair(mem, &info.segments, &req.extents) {
                Ok(t) => (status::OK, 0, t),
                Err(()) => (status::IOERR, 0, Vec::new()),
            },
        };
        req.status = status;
        req.used_len = used + 1;
        req.extents.clear();
        if status != status::OK || transfers.is_empty() {
            req.phase = Phase::Done;
            return;
        }
        req.phase = Phase::Submitted(transfers.len());
        sub.push(d, id, transfers, info.kind == RequestKind::Write);
    }

    /// Counts one finished transfer of request `id`; false if the request is gone.
    pub fn transfer_done(&mut self, id: u64, failed: bool) -> bool {
        let Some(req) = self.requests.get_mut(&id) else {
            return false;
        };
        if failed {
            req.status = status::IOERR;
            req.used_len = 1;
        }
        if let Phase::Submitted(n) = &mut req.phase {
            *n -= 1;
            if *n == 0 {
                req.phase = Phase::Done;
            }
        }
        true
    }

    /// Publishes completed requests, then lets waiting work proceed: deferred writes whose
    /// conflict is gone, retirement of old images, drain and older-image waiters.
    pub fn settle(&mut self, mem: &GuestMemoryMmap) {
        self.publish(mem);
        loop {
            let ready: Option<u64> = self
                .requests
                .iter()
                .find(|(_, r)| r.phase == Phase::Deferred && !self.conflicts(&r.info))
                .map(|(&id, _)| id);
            match ready {
                Some(id) => self.prepare(id),
                None => break,
            }
        }
        // A write that failed in preparation is done already.
        self.publish(mem);
        let live: Vec<u64> = self.live().map(|r| r.info.image_generation).collect();
        self.images.settle(self.index, &live);
        if live.is_empty() {
            for w in self.drain_waiters.drain(..) {
                let _ = w.send(());
            }
        }
    }

    fn publish(&mut self, mem: &GuestMemoryMmap) {
        let d = self.index;
        if self.frozen {
            return;
        }
        let done: Vec<u64> = self
            .requests
            .iter()
            .filter(|(_, r)| r.phase == Phase::Done)
            .map(|(&id, _)| id)
            .collect();
        if done.is_empty() {
            return;
        }
        let observer = self.observer.clone();
        let transport = self.transport.clone();
        let mut t = transport.lock().unwrap_or_else(|p| p.into_inner());
        let epoch = t.reset_epoch();
        let mut published = 0;
        for id in done {
            let req = self.requests.remove(&id).expect("listed above");
            if req.epoch != epoch {
                debug!(
                    disk = d,
                    head = req.info.head,
                    "completion after a device reset dropped"
                );
                continue;
            }
            let Some((queue, _)) = t.queue_mut(0) else {
                continue;
            };
            if let Some(obs) = &observer {
                obs.before_device_write(req.info.status_addr, 1);
                let size = u64::from(queue.size());
                let elem = queue.used_ring() + 4 + 8 * (u64::from(queue.next_used()) % size.max(1));
                obs.before_device_write(queue.used_ring() + 2, 2);
                obs.before_device_write(elem, 8);
            }
            if mem
                .write_obj(req.status, GuestAddress(req.info.status_addr))
                .is_err()
            {
                warn!(disk = d, "status byte write failed");
            }
            if let Err(e) = queue.add_used(mem, req.info.head, req.used_len) {
                t.mark_broken(&format!("cannot update the used ring: {e}"));
                return;
            }
            published += 1;
        }
        if published > 0 {
            t.signal(INT_USED_BUFFER);
        }
    }
}
