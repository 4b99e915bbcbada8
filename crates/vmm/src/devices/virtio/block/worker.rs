//! The block device thread: one epoll loop per VM serving every disk. It wakes for a queue
//! notification (pop the disk's new requests), an io_uring completion (count finished
//! transfers), a command from a [`BlockHandle`], or the next held request falling due; each
//! disk's requests then follow their life cycle ([`super::lifecycle`]).

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use tracing::{debug, error, info, warn};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::command::Command;
use super::handle::BlockHandle;
use super::lifecycle::DiskState;
use super::submit::Submitter;
use super::{Block, BlockError, BlockState};

const TOKEN_KICK: u64 = 0;
const TOKEN_URING: u64 = 1;
const TOKEN_DISK: u64 = 2;

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
    let sub = Submitter::new(mem)?;
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
    add(sub.completion_fd(), TOKEN_URING)?;
    let (tx, rx) = mpsc::channel();
    let mut disks = Vec::with_capacity(blocks.len());
    let mut handles = Vec::with_capacity(blocks.len());
    let mut restored = Vec::new();
    for block in blocks {
        let i = disks.len();
        add(block.notify.as_raw_fd(), TOKEN_DISK + i as u64)?;
        let (disk, reqs) = DiskState::new(block);
        disks.push(disk);
        restored.push(reqs);
        handles.push(BlockHandle::new(i, tx.clone(), kick.clone()));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let mut worker = Worker {
        mem: mem.clone(),
        epoll,
        sub,
        disks,
        commands: rx,
        stop: stop.clone(),
    };
    let thread = std::thread::Builder::new()
        .name("blk-worker".into())
        .spawn(move || {
            for (disk, reqs) in worker.disks.iter_mut().zip(restored) {
                disk.resubmit(&worker.mem, reqs);
                // A restored guest may have posted requests before the checkpoint that the
                // device had not taken yet; their notification is gone with the old process,
                // so look at the queue once now.
                disk.pop(&worker.mem);
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
    sub: Submitter,
    disks: Vec<DiskState>,
    commands: Receiver<(usize, Command)>,
    stop: Arc<AtomicBool>,
}

impl Worker {
    fn run(&mut self) {
        let mut events = vec![EpollEvent::default(); 16 + self.disks.len()];
        while !self.stop.load(Ordering::SeqCst) {
            let deadline = self.disks.iter().filter_map(DiskState::next_deadline).min();
            let timeout = deadline.map_or(-1, |d| {
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
                        if let Some(disk) = self.disks.get_mut((t - TOKEN_DISK) as usize) {
                            let _ = disk.notify.read();
                            disk.pop(&self.mem);
                        }
                    }
                }
            }
            for disk in &mut self.disks {
                disk.run_due(&self.mem, &mut self.sub);
            }
            self.sub.submit();
        }
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let abandoned: usize = self.disks.iter().map(DiskState::unsubmitted).sum();
        if abandoned > 0 {
            info!(
                abandoned,
                "block device thread stops with unsubmitted requests"
            );
        }
        // Guest memory and the files must outlive every transfer the kernel still performs.
        while self.sub.outstanding() > 0 {
            self.sub.submit();
            if let Err(e) = self.sub.wait_one() {
                error!("waiting for io_uring completions failed: {e}");
                break;
            }
            self.completions();
        }
        for disk in &mut self.disks {
            for e in disk.images.flush_all() {
                warn!("flush at shutdown failed: {e}");
            }
        }
        debug!("block device thread exits");
    }

    fn completions(&mut self) {
        let mut touched = Vec::new();
        for f in self.sub.reap() {
            if self.disks[f.disk].transfer_done(f.req, f.failed) && !touched.contains(&f.disk) {
                touched.push(f.disk);
            }
        }
        for d in touched {
            self.disks[d].settle(&self.mem);
        }
    }

    fn commands(&mut self) {
        while let Ok((d, cmd)) = self.commands.try_recv() {
            let Some(disk) = self.disks.get_mut(d) else {
                continue;
            };
            command(d, disk, cmd);
            disk.pop(&self.mem);
            disk.settle(&self.mem);
        }
    }
}

fn command(d: usize, disk: &mut DiskState, cmd: Command) {
    match cmd {
        Command::Inflight(tx) => {
            let _ = tx.send(disk.inflight());
        }
        Command::Save(tx) => {
            let _ = tx.send(BlockState {
                disk: disk.config.clone(),
                transport: disk.transport().save(),
                inflight: disk.inflight(),
            });
        }
        Command::Switch(image, tx) => {
            let _ = tx.send(disk.images.switch(d, *image, disk.config.readonly));
        }
        Command::Drain(tx) => disk.drain_waiters.push(tx),
        Command::WaitOlder(tx) => disk.images.wait_older(tx),
        Command::Rebase(path, format, tx) => {
            let _ = tx.send(disk.images.rebase(&path, format));
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
            let _ = tx.send(disk.images.info());
        }
    }
}
