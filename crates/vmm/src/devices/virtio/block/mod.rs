//! virtio-blk (device id 2) on a [`disk::Image`], with asynchronous I/O on io_uring.
//!
//! A [`Block`] is one disk: its virtio-mmio transport (on the MMIO bus) and its open image.
//! [`start_worker`] hands every disk of a VM to one device thread ([`worker`]), an epoll loop
//! that pops requests when the guest notifies, maps them through the image (`map_read`,
//! `prepare_write`, which allocates and copies up synchronously) and submits the data
//! transfers to io_uring; completions come back on the same thread, which writes the status
//! byte, the used ring and raises the interrupt. The checkpoint layer drives a disk through
//! its cloneable [`BlockHandle`]: switch to a COW overlay, drain, list or save the requests in
//! flight, rebase the running overlay. Chain operations built from these (commit) belong to the
//! checkpoint layer, not to the device.

mod command;
mod generations;
mod handle;
mod lifecycle;
mod persist;
mod request;
mod submit;
mod worker;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::mmio::{reg, MmioTransport, TransportState, TransportStateError};
use super::{cmdline_entry, irq, mmio_base, MMIO_SIZE};
use crate::devices::Bus;

pub use command::ImageInfo;
pub use handle::BlockHandle;
pub use persist::{DiskArgs, DiskError};
pub use worker::{start_worker, BlockWorker};

/// virtio device id of a block device.
pub const DEVICE_ID_BLOCK: u32 = 2;
/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;
/// Descriptors per queue offered to the driver.
pub const QUEUE_SIZE: u16 = 256;
/// Length of the GET_ID answer.
pub const ID_LEN: usize = 20;

/// virtio-blk feature bits.
pub mod features {
    pub const SEG_MAX: u64 = 1 << 2;
    pub const RO: u64 = 1 << 5;
    pub const BLK_SIZE: u64 = 1 << 6;
    pub const FLUSH: u64 = 1 << 9;
}

/// Request status bytes.
pub mod status {
    pub const OK: u8 = 0;
    pub const IOERR: u8 = 1;
    pub const UNSUPP: u8 = 2;
}

/// How the VM uses one disk image.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskConfig {
    /// The image the guest writes to (raw or qcow2; its backing chain is opened read-only).
    pub path: PathBuf,
    /// Offer the disk read-only (VIRTIO_BLK_F_RO); writes fail with IOERR.
    pub readonly: bool,
    /// Test knob: hold every request this many milliseconds before its I/O is submitted; it
    /// counts as in flight meanwhile.
    pub delay_ms: u64,
    /// Directories the image's backing files may resolve into besides the directory of the
    /// image naming them.
    #[serde(default)]
    pub allow_dirs: Vec<PathBuf>,
}

impl DiskConfig {
    /// The backing-file policy of this disk: the naming image's directory and `allow_dirs`.
    pub fn backing_policy(&self) -> disk::PathPolicy {
        self.allow_dirs
            .iter()
            .fold(disk::PathPolicy::same_dir(), |p, d| p.allow_dir(d))
    }
}

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RequestKind {
    Read,
    Write,
    Flush,
    GetId,
}

/// A request popped from the queue and not yet completed to the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InflightRequest {
    /// Descriptor index of the chain head (what goes into the used ring).
    pub head: u16,
    pub kind: RequestKind,
    /// First sector (512 bytes).
    pub sector: u64,
    /// Data bytes.
    pub len: u32,
    /// Guest buffers of the data, in order: `(guest physical address, length)`.
    pub segments: Vec<(u64, u32)>,
    /// Guest physical address of the status byte.
    pub status_addr: u64,
    /// Which image the request was popped against (bumped by every switch).
    pub image_generation: u64,
}

/// Everything needed to rebuild a block device, as plain data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    pub disk: DiskConfig,
    pub transport: TransportState,
    /// Requests popped but not completed to the guest at the save; re-submitted on restore.
    pub inflight: Vec<InflightRequest>,
}

/// Errors of the block device.
#[derive(Debug, Error)]
pub enum BlockError {
    /// The image (or its backing chain) cannot be opened; the message names the file.
    #[error(transparent)]
    Open(disk::Error),
    #[error("disk image {path} has size {size}, not a multiple of 512 bytes")]
    OddSize { path: PathBuf, size: u64 },
    #[error("disk image operation failed")]
    Image(#[source] disk::Error),
    #[error("the new image has {new} bytes, the disk has {current}")]
    SizeMismatch { new: u64, current: u64 },
    #[error("the new image is read-only but the disk is writable")]
    ReadOnlyImage,
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("cannot set up io_uring")]
    Uring(#[source] std::io::Error),
    #[error("cannot set up the device thread's epoll")]
    Epoll(#[source] std::io::Error),
    #[error("cannot spawn the block device thread")]
    Spawn(#[source] std::io::Error),
    #[error("invalid virtio queue set-up")]
    Queue(#[source] virtio_queue::Error),
    #[error("invalid saved block device state")]
    BadState(#[from] TransportStateError),
    #[error("{configs} disks configured but {states} disk states saved")]
    DiskCount { configs: usize, states: usize },
    #[error("the block device thread has stopped")]
    WorkerGone,
    #[error("requests still in flight after {0:?}")]
    Timeout(std::time::Duration),
    #[error("disk {0} has no backing file to commit into, or is not qcow2")]
    NotCommittable(PathBuf),
    #[error("KVM {op} failed")]
    Kvm {
        op: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Bus(#[from] crate::devices::BusError),
    #[error("cannot remove the committed image {path}")]
    Remove {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One block device: transport registers, the open image and the eventfds of its interrupt
/// and queue notification.
pub struct Block {
    index: usize,
    config: DiskConfig,
    image: disk::Image,
    transport: Arc<Mutex<MmioTransport>>,
    irq: EventFd,
    notify: EventFd,
    restored: Vec<InflightRequest>,
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("index", &self.index)
            .field("config", &self.config)
            .finish()
    }
}

/// The `virtio_blk_config` bytes: capacity, size_max, seg_max, geometry, blk_size.
fn config_space(capacity_sectors: u64) -> Vec<u8> {
    let mut c = vec![0u8; 0x3c];
    c[0..8].copy_from_slice(&capacity_sectors.to_le_bytes());
    c[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
    c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
    c
}

fn open_image(config: &DiskConfig) -> Result<disk::Image, BlockError> {
    let opts = disk::OpenOptions {
        read_only: config.readonly,
        backing_policy: config.backing_policy(),
        ..disk::OpenOptions::default()
    };
    let image = disk::Image::open_with(&config.path, &opts).map_err(BlockError::Open)?;
    if image.size() % SECTOR_SIZE != 0 {
        return Err(BlockError::OddSize {
            path: config.path.clone(),
            size: image.size(),
        });
    }
    Ok(image)
}

impl Block {
    /// Opens the disk image of `config` (with its backing chain) as device `index`.
    pub fn new(
        index: usize,
        config: &DiskConfig,
        mem: &GuestMemoryMmap,
    ) -> Result<Block, BlockError> {
        let image = open_image(config)?;
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(BlockError::EventFd)?;
        let notify = EventFd::new(libc::EFD_NONBLOCK).map_err(BlockError::EventFd)?;
        let mut feats = features::FLUSH | features::SEG_MAX | features::BLK_SIZE;
        if config.readonly {
            feats |= features::RO;
        }
        let transport = MmioTransport::new(
            DEVICE_ID_BLOCK,
            feats,
            &[QUEUE_SIZE],
            config_space(image.size() / SECTOR_SIZE),
            irq.try_clone().map_err(BlockError::EventFd)?,
            notify.try_clone().map_err(BlockError::EventFd)?,
            mem.clone(),
        )
        .map_err(BlockError::Queue)?;
        Ok(Block {
            index,
            config: config.clone(),
            image,
            transport: Arc::new(Mutex::new(transport)),
            irq,
            notify,
            restored: Vec::new(),
        })
    }

    /// The device's MMIO window.
    pub fn mmio_range(&self) -> std::ops::Range<u64> {
        mmio_base(self.index)..mmio_base(self.index) + MMIO_SIZE
    }

    /// The register window, for the MMIO bus.
    pub fn transport(&self) -> Arc<Mutex<MmioTransport>> {
        self.transport.clone()
    }
}

/// The virtio-blk disks of a VM: opened (or restored) devices until [`DiskSet::start`] hands
/// them to the device thread, then their handles.
#[derive(Debug, Default)]
pub struct DiskSet {
    pending: Vec<Block>,
    handles: Vec<BlockHandle>,
    worker: Option<BlockWorker>,
}

impl DiskSet {
    /// Opens every disk of `configs` (device `i` = `configs[i]`), so that a missing image, a
    /// backing file that cannot be opened or a corrupt header fails before the VM runs.
    pub fn open(configs: &[DiskConfig], mem: &GuestMemoryMmap) -> Result<DiskSet, DiskError> {
        let pending = configs
            .iter()
            .enumerate()
            .map(|(index, c)| {
                Block::new(index, c, mem).map_err(|source| DiskError { index, source })
            })
            .collect::<Result<_, _>>()?;
        Ok(DiskSet {
            pending,
            ..DiskSet::default()
        })
    }

    /// `cmdline` with one `virtio_mmio.device=` word per disk.
    pub fn cmdline(&self, cmdline: &str) -> String {
        let mut out = cmdline.to_owned();
        for b in &self.pending {
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str(&cmdline_entry(b.index));
        }
        out
    }

    /// Wires the disks into the VM: irqfd for the interrupt, ioeventfd for QueueNotify (KVM
    /// then signals the device thread without an exit to the vCPU thread), window on `mmio`.
    pub fn attach(&self, vm: &kvm_ioctls::VmFd, mmio: &mut Bus) -> Result<(), DiskError> {
        for b in &self.pending {
            let err = |source| DiskError {
                index: b.index,
                source,
            };
            vm.register_irqfd(&b.irq, irq(b.index)).map_err(|source| {
                err(BlockError::Kvm {
                    op: "register virtio irqfd",
                    source,
                })
            })?;
            let notify = kvm_ioctls::IoEventAddress::Mmio(b.mmio_range().start + reg::QUEUE_NOTIFY);
            vm.register_ioevent(&b.notify, &notify, kvm_ioctls::NoDatamatch)
                .map_err(|source| {
                    err(BlockError::Kvm {
                        op: "register virtio ioeventfd",
                        source,
                    })
                })?;
        }
        self.insert_windows(mmio)
    }

    /// Places each disk's register window on `mmio`.
    pub fn insert_windows(&self, mmio: &mut Bus) -> Result<(), DiskError> {
        for b in &self.pending {
            mmio.insert(b.mmio_range(), b.transport())
                .map_err(|e| DiskError {
                    index: b.index,
                    source: e.into(),
                })?;
        }
        Ok(())
    }

    /// Starts the device thread for the disks (none: no thread). Call it once the vCPUs exist.
    pub fn start(&mut self, mem: &GuestMemoryMmap) -> Result<(), BlockError> {
        let blocks = std::mem::take(&mut self.pending);
        if !blocks.is_empty() {
            let (worker, handles) = start_worker(blocks, mem)?;
            self.worker = Some(worker);
            self.handles = handles;
        }
        Ok(())
    }

    /// One handle per started disk.
    pub fn handles(&self) -> &[BlockHandle] {
        &self.handles
    }

    /// Stops the device thread (after the vCPUs, so no new notification arrives).
    pub fn stop(&mut self) {
        if let Some(mut w) = self.worker.take() {
            w.stop();
        }
    }
}
