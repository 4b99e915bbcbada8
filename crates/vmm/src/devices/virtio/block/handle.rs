//! [`BlockHandle`]: what the checkpoint layer (and tests) call on a running disk. Every call
//! is a command to the device thread, answered once the thread has done it, so each takes
//! effect atomically between two requests.

use std::path::Path;
use std::sync::mpsc::{self, Sender};
use std::sync::Arc;
use std::time::Duration;

use disk::{Format, Image};
use vmm_sys_util::eventfd::EventFd;

use super::command::{Command, ImageInfo};
use super::{BlockError, BlockState, InflightRequest};
use crate::devices::virtio::DmaObserver;

/// A cloneable, thread-safe remote control of one disk.
#[derive(Clone)]
pub struct BlockHandle {
    disk: usize,
    tx: Sender<(usize, Command)>,
    kick: Arc<EventFd>,
}

impl std::fmt::Debug for BlockHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockHandle")
            .field("disk", &self.disk)
            .finish()
    }
}

impl BlockHandle {
    pub(crate) fn new(disk: usize, tx: Sender<(usize, Command)>, kick: Arc<EventFd>) -> Self {
        BlockHandle { disk, tx, kick }
    }

    fn call<T>(
        &self,
        make: impl FnOnce(Sender<T>) -> Command,
        timeout: Option<Duration>,
    ) -> Result<T, BlockError> {
        let (tx, rx) = mpsc::channel();
        self.tx
            .send((self.disk, make(tx)))
            .map_err(|_| BlockError::WorkerGone)?;
        self.kick.write(1).map_err(|_| BlockError::WorkerGone)?;
        match timeout {
            None => rx.recv().map_err(|_| BlockError::WorkerGone),
            Some(t) => rx.recv_timeout(t).map_err(|e| match e {
                mpsc::RecvTimeoutError::Timeout => BlockError::Timeout(t),
                mpsc::RecvTimeoutError::Disconnected => BlockError::WorkerGone,
            }),
        }
    }

    /// Index of the disk in the VM.
    pub fn index(&self) -> usize {
        self.disk
    }

    /// Requests popped from the queue and not yet completed to the guest.
    pub fn inflight(&self) -> Result<Vec<InflightRequest>, BlockError> {
        self.call(Command::Inflight, None)
    }

    /// Device state as plain data. For a checkpoint, call it while publication is frozen
    /// ([`BlockHandle::freeze`]) so that guest memory and the saved in-flight list agree.
    pub fn save(&self) -> Result<BlockState, BlockError> {
        self.call(Command::Save, None)
    }

    /// Makes `image` the disk for every request popped from now on; requests in flight finish
    /// against the old image, which stays open until its last one completes. Returns the new
    /// image generation. `image` is normally a qcow2 overlay over the current top, created
    /// while the VM runs; the device thread reopens it so its view of the old top is current.
    pub fn switch_image(&self, image: Image) -> Result<u64, BlockError> {
        self.call(|tx| Command::Switch(Box::new(image), tx), None)?
    }

    /// Waits until no request is in flight (I/O done; publication may still be frozen).
    pub fn drain(&self, timeout: Duration) -> Result<(), BlockError> {
        self.call(Command::Drain, Some(timeout))
    }

    /// Waits until every request popped against an image older than the current one has
    /// finished its I/O and the old images are flushed and closed.
    pub fn wait_older_images(&self, timeout: Duration) -> Result<(), BlockError> {
        self.call(Command::WaitOlder, Some(timeout))
    }

    /// Stops (true) or resumes (false) completing requests to the guest: while frozen, the
    /// device writes no status byte and no used ring entry and pops no new request, so a
    /// checkpoint can save memory and device state that agree. I/O keeps going.
    pub fn freeze(&self, frozen: bool) -> Result<(), BlockError> {
        self.call(|tx| Command::Freeze(frozen, tx), None)
    }

    /// Installs (or removes) the observer told about guest memory before the device writes it.
    pub fn set_dma_observer(
        &self,
        observer: Option<Arc<dyn DmaObserver>>,
    ) -> Result<(), BlockError> {
        self.call(|tx| Command::Observer(observer, tx), None)
    }

    /// Rebases the running top image onto `backing` (which must have the content of the
    /// current backing file), on the device thread's open image.
    pub fn rebase(&self, backing: &Path, format: Option<Format>) -> Result<(), BlockError> {
        self.call(|tx| Command::Rebase(backing.to_owned(), format, tx), None)?
    }

    /// The image in use now.
    pub fn image_info(&self) -> Result<ImageInfo, BlockError> {
        self.call(Command::Info, None)
    }
}
