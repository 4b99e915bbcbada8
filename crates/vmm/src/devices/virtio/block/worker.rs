//! The block device thread: one epoll loop per VM serving every disk.
//!
//! A request's life: popped (parsed and checked, recorded in the disk's in-flight table, the
//! DMA observer told about the memory a read will fill) → for a write, *deferred* while a
//! write against an older image touches the clusters it would copy up (M14), then prepared
//! (`prepare_write` allocates and copies up) → *held* until its submission time (the
//! `delay_ms` test knob) → *submitted* to io_uring → *done* → published to the guest (status
//! byte, used ring, interrupt) unless publication is frozen for a checkpoint.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use disk::{Extent, Format, Image};
use tracing::{debug, error, info, warn};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::handle::{BlockHandle, ImageInfo};
use super::request::{parse, validate, Parsed};
use super::{
    status, Block, BlockError, BlockState, DiskConfig, InflightRequest, RequestKind, ID_LEN,
    SECTOR_SIZE,
};
use crate::devices::virtio::mmio::{MmioTransport, INT_USED_BUFFER};
use crate::devices::virtio::uring::{Transfer, Uring};
use crate::devices::virtio::DmaObserver;

const TOKEN_KICK: u64 = 0;
const TOKEN_URING: u64 = 1;
const TOKEN_DISK: u64 = 2;

/// What a [`BlockHandle`] asks the device thread to do; each carries its reply channel.
pub(crate) enum Command {
    Inflight(Sender<Vec<InflightRequest>>),
    Save(Sender<BlockState>),
    Switch(Box<Image>, Sender<Result<u64, BlockError>>),
    Drain(Sender<()>),
    WaitOlder(Sender<()>),
    Rebase(PathBuf, Option<Format>, Sender<Result<(), BlockError>>),
    Freeze(bool, Sender<()>),
    Observer(Option<Arc<dyn DmaObserver>>, Sender<()>),
    Info(Sender<ImageInfo>),
}

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

struct Op {
    disk: usize,
    req: u64,
    file: Arc<File>,
    gpa: u64,
    len: u32,
    offset: u64,
    write: bool,
}

struct DiskState {
    config: DiskConfig,
    transport: Arc<Mutex<MmioTransport>>,
    notify: EventFd,
    images: BTreeMap<u64, Image>,
    generation: u64,
    capacity: u64,
    requests: BTreeMap<u64, Request>,
    frozen: bool,
    observer: Option<Arc<dyn DmaObserver>>,
    drain_waiters: Vec<Sender<()>>,
    older_waiters: Vec<(u64, Sender<()>)>,
    id: [u8; ID_LEN],
}

impl DiskState {
    fn transport(&self) -> MutexGuard<'_, MmioTransport> {
        self.transport.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn current(&mut self) -> &mut Image {
        self.images
            .get_mut(&self.generation)
            .expect("the current generation always has its image")
    }

    fn live(&self) -> impl Iterator<Item = &Request> {
        self.requests.values().filter(|r| r.phase != Phase::Done)
    }

    /// M14: a write must not copy up clusters that a write against an older image still
    /// modifies, or the copy would miss that write.
    fn conflicts(&self, w: &InflightRequest) -> bool {
        let Some(image) = self.images.get(&w.image_generation) else {
            return false;
        };
        let cs = image.cluster_size();
        let offset = w.sector * SECTOR_SIZE;
        let clusters = image.clusters_touched(offset, u64::from(w.len));
        let (start, end) = (clusters.start * cs, clusters.end * cs);
        self.live().any(|r| {
            let o = r.info.sector * SECTOR_SIZE;
            r.info.kind == RequestKind::Write
                && r.info.image_generation < w.image_generation
                && o < end
                && start < o + u64::from(r.info.len)
        })
    }
}

/// The running device thread; stopping it waits for submitted I/O to finish.
#[derive(Debug)]
pub struct BlockWorker {
    thread: Option<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    kick: Arc<EventFd>,
}

impl BlockWorker {
    /// Stops the thread: requests not yet submitted are abandoned, submitted I/O completes,
    /// images are flushed.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Err(e) = self.kick.write(1) {
            error!("cannot wake the block device thread: {e}");
        }
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                error!("the block device thread panicked");
            }
        }
    }
}

impl Drop for BlockWorker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts the device thread for `blocks`; returns it and one handle per disk, in order.
pub fn start_worker(
    blocks: Vec<Block>,
    mem: &GuestMemoryMmap,
) -> Result<(BlockWorker, Vec<BlockHandle>), BlockError> {
    let uring = Uring::new().map_err(BlockError::Uring)?;
    let epoll = Epoll::new().map_err(BlockError::Epoll)?;
    let kick = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(BlockError::EventFd)?);
    let add = |fd: i32, token: u64| {
        epoll
            .ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )
            .map_err(BlockError::Epoll)
    };
    add(kick.as_raw_fd(), TOKEN_KICK)?;
    add(uring.completion_fd(), TOKEN_URING)?;
    let (tx, rx) = mpsc::channel();
    let mut disks = Vec::with_capacity(blocks.len());
    let mut handles = Vec::with_capacity(blocks.len());
    let mut restored = Vec::new();
    for block in blocks {
        let i = disks.len();
        add(block.notify.as_raw_fd(), TOKEN_DISK + i as u64)?;
        let mut id = [0u8; ID_LEN];
        let name = format!("cowvm-disk{}", block.index);
        id[..name.len().min(ID_LEN)].copy_from_slice(&name.as_bytes()[..name.len().min(ID_LEN)]);
        restored.push(block.restored);
        disks.push(DiskState {
            capacity: block.image.size(),
            images: BTreeMap::from([(0, block.image)]),
            generation: 0,
            config: block.config,
            transport: block.transport,
            notify: block.notify,
            requests: BTreeMap::new(),
            frozen: false,
            observer: None,
            drain_waiters: Vec::new(),
            older_waiters: Vec::new(),
            id,
        });
        handles.push(BlockHandle::new(i, tx.clone(), kick.clone()));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let mut worker = Worker {
        mem: mem.clone(),
        epoll,
        uring,
        disks,
        ops: HashMap::new(),
        next_id: 1,
        commands: rx,
        stop: stop.clone(),
    };
    let thread = std::thread::Builder::new()
        .name("blk-worker".into())
        .spawn(move || {
            for (d, reqs) in restored.into_iter().enumerate() {
                worker.resubmit(d, reqs);
                // A restored guest may have posted requests before the checkpoint that the
                // device had not taken yet; their notification is gone with the old process,
                // so look at the queue once now.
                worker.pop(d);
            }
            worker.run();
        })
        .map_err(BlockError::Spawn)?;
    Ok((
        BlockWorker {
            thread: Some(thread),
            stop,
            kick,
        },
        handles,
    ))
}

struct Worker {
    mem: GuestMemoryMmap,
    epoll: Epoll,
    uring: Uring,
    disks: Vec<DiskState>,
    ops: HashMap<u64, Op>,
    next_id: u64,
    commands: Receiver<(usize, Command)>,
    stop: Arc<AtomicBool>,
}

impl Worker {
    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn run(&mut self) {
        let mut events = vec![EpollEvent::default(); 16 + self.disks.len()];
        while !self.stop.load(Ordering::SeqCst) {
            let timeout = self.next_deadline().map_or(-1, |d| {
                let ms = d
                    .saturating_duration_since(Instant::now())
                    .as_micros()
                    .div_ceil(1000);
                i32::try_from(ms).unwrap_or(i32::MAX)
            });
            let n = match self.epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => 0,
                Err(e) => {
                    error!("block device thread: epoll failed, stopping: {e}");
                    break;
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_KICK => self.commands(),
                    TOKEN_URING => self.completions(),
                    t => {
                        let d = (t - TOKEN_DISK) as usize;
                        if let Some(disk) = self.disks.get(d) {
                            let _ = disk.notify.read();
                            self.pop(d);
                        }
                    }
                }
            }
            self.run_due();
            self.submit();
        }
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let abandoned: usize = self
            .disks
            .iter()
            .map(|d| {
                d.requests
                    .values()
                    .filter(|r| matches!(r.phase, Phase::Held(_) | Phase::Deferred))
                    .count()
            })
            .sum();
        if abandoned > 0 {
            info!(
                abandoned,
                "block device thread stops with unsubmitted requests"
            );
        }
        // Guest memory and the files must outlive every transfer the kernel still performs.
        while self.uring.outstanding() > 0 {
            self.submit();
            if let Err(e) = self.uring.wait_one() {
                error!("waiting for io_uring completions failed: {e}");
                break;
            }
            self.completions();
        }
        for disk in &mut self.disks {
            for image in disk.images.values_mut() {
                if let Err(e) = image.flush() {
                    warn!("flush at shutdown failed: {e}");
                }
            }
        }
        debug!("block device thread exits");
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.disks
            .iter()
            .flat_map(|d| d.requests.values())
            .filter_map(|r| match r.phase {
                Phase::Held(t) => Some(t),
                _ => None,
            })
            .min()
    }

    fn submit(&mut self) {
        if let Err(e) = self.uring.submit() {
            error!("io_uring submit failed: {e}");
        }
    }

    // ---- requests from the guest ----

    fn pop(&mut self, d: usize) {
        let mem = self.mem.clone();
        let disk = &mut self.disks[d];
        let generation = disk.generation;
        if disk.frozen {
            // Popped after the thaw: a checkpoint's device state and memory must agree on
            // which requests the device has taken.
            return;
        }
        let (parsed, epoch) = {
            let mut t = disk.transport();
            if !t.running() {
                return;
            }
            let epoch = t.reset_epoch();
            let Some((queue, _)) = t.queue_mut(0) else {
                return;
            };
            let parsed: Result<Vec<Parsed>, _> = queue
                .iter(&mem)
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
                    self.disks[d].transport().mark_broken(why);
                    return;
                }
                Parsed::Fail {
                    head,
                    status_addr,
                    status,
                    why,
                } => {
                    warn!(disk = d, head, "malformed virtio-blk request: {why}");
                    let info = InflightRequest {
                        head,
                        kind: RequestKind::GetId,
                        sector: 0,
                        len: 0,
                        segments: Vec::new(),
                        status_addr,
                        image_generation: generation,
                    };
                    self.add_done(d, info, epoch, status);
                }
                Parsed::Request(info) => self.admit(d, info, epoch),
            }
        }
        self.settle(d);
    }

    /// Records a request that is already complete (failed before any I/O).
    fn add_done(&mut self, d: usize, info: InflightRequest, epoch: u64, status: u8) {
        let id = self.id();
        self.disks[d].requests.insert(
            id,
            Request {
                info,
                epoch,
                popped: Instant::now(),
                phase: Phase::Done,
                status,
                used_len: 1,
                extents: Vec::new(),
            },
        );
    }

    fn admit(&mut self, d: usize, info: InflightRequest, epoch: u64) {
        let disk = &self.disks[d];
        if let Err(why) = validate(&info, &self.mem, disk.capacity) {
            warn!(
                disk = d,
                head = info.head,
                sector = info.sector,
                "virtio-blk request refused: {why}"
            );
            return self.add_done(d, info, epoch, status::IOERR);
        }
        if info.kind == RequestKind::Write && disk.config.readonly {
            warn!(disk = d, sector = info.sector, path = %disk.config.path.display(), "write to a read-only disk refused");
            return self.add_done(d, info, epoch, status::IOERR);
        }
        if matches!(info.kind, RequestKind::Read | RequestKind::GetId) {
            if let Some(obs) = &disk.observer {
                for &(gpa, len) in &info.segments {
                    obs.before_device_write(gpa, u64::from(len));
                }
            }
        }
        let deferred = info.kind == RequestKind::Write && disk.conflicts(&info);
        let id = self.id();
        if deferred {
            debug!(
                disk = d,
                sector = info.sector,
                "write waits for an older write to the same clusters"
            );
        }
        self.disks[d].requests.insert(
            id,
            Request {
                info,
                epoch,
                popped: Instant::now(),
                phase: Phase::Deferred,
                status: status::OK,
                used_len: 1,
                extents: Vec::new(),
            },
        );
        if !deferred {
            self.prepare(d, id);
        }
    }

    /// Allocates (copy-up) for a write, then holds the request until its submission time.
    fn prepare(&mut self, d: usize, id: u64) {
        let disk = &mut self.disks[d];
        let delay = Duration::from_millis(disk.config.delay_ms);
        let Some(req) = disk.requests.get(&id) else {
            return;
        };
        let (info, popped) = (req.info.clone(), req.popped);
        let mut result = Ok(Vec::new());
        if info.kind == RequestKind::Write {
            result = match disk.images.get_mut(&info.image_generation) {
                Some(image) => image.prepare_write(info.sector * SECTOR_SIZE, u64::from(info.len)),
                None => Ok(Vec::new()),
            };
            if info.image_generation < disk.generation {
                refresh_newer(disk, info.image_generation);
            }
        }
        let req = disk.requests.get_mut(&id).expect("looked up above");
        match result {
            Ok(extents) => {
                req.extents = extents;
                req.phase = Phase::Held((popped + delay).max(Instant::now()));
            }
            Err(e) => {
                warn!(
                    disk = d,
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
    fn resubmit(&mut self, d: usize, reqs: Vec<InflightRequest>) {
        let (generation, epoch) = {
            let disk = &self.disks[d];
            (disk.generation, disk.transport().reset_epoch())
        };
        for mut info in reqs {
            info.image_generation = generation;
            if !super::request::in_memory(&self.mem, info.status_addr, 1) {
                self.disks[d]
                    .transport()
                    .mark_broken("a restored request has no status byte in guest memory");
                return;
            }
            info!(disk = d, head = info.head, kind = ?info.kind, sector = info.sector, "re-submitting a restored request");
            self.admit(d, info, epoch);
        }
        self.settle(d);
    }

    fn run_due(&mut self) {
        let now = Instant::now();
        for d in 0..self.disks.len() {
            let due: Vec<u64> = self.disks[d]
                .requests
                .iter()
                .filter(|(_, r)| matches!(r.phase, Phase::Held(t) if t <= now))
                .map(|(&id, _)| id)
                .collect();
            if due.is_empty() {
                continue;
            }
            for id in due {
                self.start(d, id);
            }
            self.settle(d);
        }
    }

    /// Issues the I/O of a held request.
    fn start(&mut self, d: usize, id: u64) {
        let mem = self.mem.clone();
        let disk = &mut self.disks[d];
        let Some(req) = disk.requests.get_mut(&id) else {
            return;
        };
        let info = req.info.clone();
        let (status, used, transfers) = match info.kind {
            RequestKind::Flush => {
                let mut st = status::OK;
                for image in disk.images.values_mut() {
                    if let Err(e) = image.flush() {
                        warn!(disk = d, "flush failed: {e}");
                        st = status::IOERR;
                    }
                }
                (st, 0, Vec::new())
            }
            RequestKind::GetId => {
                let mut at = 0usize;
                let mut st = status::OK;
                for &(gpa, len) in &info.segments {
                    let n = (len as usize).min(ID_LEN - at);
                    if mem
                        .write_slice(&disk.id[at..at + n], GuestAddress(gpa))
                        .is_err()
                    {
                        st = status::IOERR;
                    }
                    at += n;
                }
                (st, at as u32, Vec::new())
            }
            RequestKind::Read => {
                let image = disk
                    .images
                    .get_mut(&info.image_generation)
                    .expect("an in-flight request keeps its image");
                match image.map_read(info.sector * SECTOR_SIZE, u64::from(info.len)) {
                    Ok(extents) => match pair(&mem, &info.segments, &extents) {
                        Ok(t) => (status::OK, info.len, t),
                        Err(()) => (status::IOERR, 0, Vec::new()),
                    },
                    Err(e) => {
                        warn!(disk = d, sector = info.sector, "read mapping failed: {e}");
                        (status::IOERR, 0, Vec::new())
                    }
                }
            }
            RequestKind::Write => match pair(&mem, &info.segments, &req.extents) {
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
        for (file, gpa, len, offset) in transfers {
            let op_id = self.id();
            let op = Op {
                disk: d,
                req: id,
                file,
                gpa,
                len,
                offset,
                write: info.kind == RequestKind::Write,
            };
            self.push_op(op_id, op);
        }
    }

    fn push_op(&mut self, op_id: u64, op: Op) {
        let buf = self
            .mem
            .get_slice(GuestAddress(op.gpa), op.len as usize)
            .expect("transfer ranges were checked against guest memory")
            .ptr_guard_mut()
            .as_ptr();
        let t = Transfer {
            fd: op.file.as_raw_fd(),
            buf,
            len: op.len,
            offset: op.offset,
            write: op.write,
            user_data: op_id,
        };
        self.ops.insert(op_id, op);
        // SAFETY: `buf` points into guest memory, which `self.mem` keeps mapped until the
        // thread exits, and `shutdown` reaps every transfer before that; the file stays open
        // because its `Arc` lives in `self.ops` until the completion is reaped. The VMM never
        // forms Rust references to guest memory, so the kernel writing it aliases nothing.
        unsafe { self.uring.push(t) };
    }

    fn completions(&mut self) {
        let mut touched = Vec::new();
        for (op_id, res) in self.uring.reap() {
            let Some(mut op) = self.ops.remove(&op_id) else {
                continue;
            };
            let d = op.disk;
            let mut failed = res < 0;
            if res >= 0 && (res as u32) < op.len {
                let n = res as u32;
                if n == 0 && !op.write {
                    // Past the end of a file that ends inside a cluster: zeros.
                    failed = zero(&self.mem, op.gpa, op.len).is_err();
                } else if n == 0 {
                    failed = true;
                } else {
                    op.gpa += u64::from(n);
                    op.offset += u64::from(n);
                    op.len -= n;
                    let again = self.id();
                    self.push_op(again, op);
                    continue;
                }
            }
            if failed {
                warn!(disk = d, res, "disk I/O failed");
            }
            let Some(req) = self.disks[d].requests.get_mut(&op.req) else {
                continue;
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
            if !touched.contains(&d) {
                touched.push(d);
            }
        }
        for d in touched {
            self.settle(d);
        }
    }

    /// Publishes completed requests, then lets waiting work proceed: deferred writes whose
    /// conflict is gone, retirement of old images, drain waiters.
    fn settle(&mut self, d: usize) {
        self.publish(d);
        loop {
            let disk = &self.disks[d];
            let ready: Option<u64> = disk
                .requests
                .iter()
                .find(|(_, r)| r.phase == Phase::Deferred && !disk.conflicts(&r.info))
                .map(|(&id, _)| id);
            match ready {
                Some(id) => self.prepare(d, id),
                None => break,
            }
        }
        // A write that failed in preparation is done already.
        self.publish(d);
        let disk = &mut self.disks[d];
        let current = disk.generation;
        let old: Vec<u64> = disk
            .images
            .keys()
            .copied()
            .filter(|&g| g != current && !disk.live().any(|r| r.info.image_generation == g))
            .collect();
        for g in old {
            if let Some(mut image) = disk.images.remove(&g) {
                // Writes that completed into it must be durable before it is let go.
                if let Err(e) = image.flush() {
                    warn!(disk = d, "flush of a retired image failed: {e}");
                }
                info!(disk = d, generation = g, path = %image.path().display(), "old image retired");
            }
        }
        if disk.live().next().is_none() {
            for w in disk.drain_waiters.drain(..) {
                let _ = w.send(());
            }
        }
        let waiters = std::mem::take(&mut disk.older_waiters);
        for (g, w) in waiters {
            if disk.live().any(|r| r.info.image_generation < g) {
                disk.older_waiters.push((g, w));
            } else {
                let _ = w.send(());
            }
        }
    }

    fn publish(&mut self, d: usize) {
        let mem = self.mem.clone();
        let disk = &mut self.disks[d];
        if disk.frozen {
            return;
        }
        let done: Vec<u64> = disk
            .requests
            .iter()
            .filter(|(_, r)| r.phase == Phase::Done)
            .map(|(&id, _)| id)
            .collect();
        if done.is_empty() {
            return;
        }
        let observer = disk.observer.clone();
        let transport = disk.transport.clone();
        let mut t = transport.lock().unwrap_or_else(|p| p.into_inner());
        let epoch = t.reset_epoch();
        let mut published = 0;
        for id in done {
            let req = disk.requests.remove(&id).expect("listed above");
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
            if let Err(e) = queue.add_used(&mem, req.info.head, req.used_len) {
                t.mark_broken(&format!("cannot update the used ring: {e}"));
                return;
            }
            published += 1;
        }
        if published > 0 {
            t.signal(INT_USED_BUFFER);
        }
    }

    // ---- commands from handles ----

    fn commands(&mut self) {
        while let Ok((d, cmd)) = self.commands.try_recv() {
            if d >= self.disks.len() {
                continue;
            }
            self.command(d, cmd);
            self.pop(d);
            self.settle(d);
        }
    }

    fn command(&mut self, d: usize, cmd: Command) {
        let disk = &mut self.disks[d];
        match cmd {
            Command::Inflight(tx) => {
                let _ = tx.send(disk.requests.values().map(|r| r.info.clone()).collect());
            }
            Command::Save(tx) => {
                let _ = tx.send(BlockState {
                    disk: disk.config.clone(),
                    transport: disk.transport().save(),
                    inflight: disk.requests.values().map(|r| r.info.clone()).collect(),
                });
            }
            Command::Switch(image, tx) => {
                let _ = tx.send(switch(d, disk, *image));
            }
            Command::Drain(tx) => disk.drain_waiters.push(tx),
            Command::WaitOlder(tx) => disk.older_waiters.push((disk.generation, tx)),
            Command::Rebase(path, format, tx) => {
                let r = disk
                    .current()
                    .set_backing(&path, format)
                    .map_err(BlockError::Image);
                let _ = tx.send(r);
            }
            Command::Freeze(frozen, tx) => {
                disk.frozen = frozen;
                let _ = tx.send(());
            }
            Command::Observer(obs, tx) => {
                disk.observer = obs;
                let _ = tx.send(());
            }
            Command::Info(tx) => {
                let generation = disk.generation;
                let image = disk.current();
                let _ = tx.send(ImageInfo {
                    path: image.path().to_owned(),
                    generation,
                    chain: image.backing_chain(),
                    stats: image.stats(),
                });
            }
        }
    }
}

/// Makes `image` the disk's image for requests popped from now on.
fn switch(d: usize, disk: &mut DiskState, image: Image) -> Result<u64, BlockError> {
    if image.size() != disk.capacity {
        return Err(BlockError::SizeMismatch {
            new: image.size(),
            current: disk.capacity,
        });
    }
    if image.is_read_only() && !disk.config.readonly {
        return Err(BlockError::ReadOnlyImage);
    }
    // The caller opened the overlay while the VM was still writing the old top, so its view
    // of the old top's metadata may be stale; reopen it now that nothing new is prepared.
    let image = reopen(&image)?;
    disk.generation += 1;
    info!(disk = d, generation = disk.generation, path = %image.path().display(), "disk switched to a new image");
    disk.images.insert(disk.generation, image);
    Ok(disk.generation)
}

fn reopen(image: &Image) -> Result<Image, BlockError> {
    let opts = disk::OpenOptions {
        read_only: image.is_read_only(),
        format: Some(image.format()),
        ..disk::OpenOptions::default()
    };
    Image::open_with(image.path(), &opts).map_err(BlockError::Open)
}

/// An image of generation `g` allocated clusters after newer overlays were opened over it:
/// reopen those, so they do not read through a stale copy of its metadata.
fn refresh_newer(disk: &mut DiskState, g: u64) {
    let newer: Vec<u64> = disk.images.range(g + 1..).map(|(&k, _)| k).collect();
    for k in newer {
        let fresh = disk.images.get(&k).map(reopen);
        match fresh {
            Some(Ok(img)) => {
                disk.images.insert(k, img);
            }
            Some(Err(e)) => warn!("cannot reopen overlay after an allocation below it: {e}"),
            None => {}
        }
    }
}

/// Pairs the guest segments of a request with the host extents of its sectors: one transfer
/// per piece that is contiguous in both; zero extents are filled at once.
/// One transfer: file, guest address, length, file offset.
type Piece = (Arc<File>, u64, u32, u64);

fn pair(
    mem: &GuestMemoryMmap,
    segments: &[(u64, u32)],
    extents: &[Extent],
) -> Result<Vec<Piece>, ()> {
    let mut out = Vec::new();
    let mut seg = segments.iter().copied().filter(|s| s.1 > 0);
    let mut cur = seg.next();
    for ext in extents {
        let mut done = 0u64;
        while done < ext.len() {
            let Some((gpa, len)) = cur else {
                return Err(());
            };
            let n = u64::from(len).min(ext.len() - done);
            match ext {
                Extent::Data {
                    file, file_offset, ..
                } => out.push((file.clone(), gpa, n as u32, file_offset + done)),
                Extent::Zero { .. } => zero(mem, gpa, n as u32)?,
            }
            done += n;
            cur = if n == u64::from(len) {
                seg.next()
            } else {
                Some((gpa + n, len - n as u32))
            };
        }
    }
    Ok(out)
}

fn zero(mem: &GuestMemoryMmap, gpa: u64, len: u32) -> Result<(), ()> {
    const ZEROS: [u8; 4096] = [0; 4096];
    let mut at = 0u64;
    while at < u64::from(len) {
        let n = (u64::from(len) - at).min(4096) as usize;
        mem.write_slice(&ZEROS[..n], GuestAddress(gpa + at))
            .map_err(|_| ())?;
        at += n as u64;
    }
    Ok(())
}
