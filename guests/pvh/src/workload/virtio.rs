//! A polling virtio-blk driver over virtio-mmio (virtio 1.x, transport version 2), in ring 3.
//!
//! Register accesses are plain 32-bit loads and stores to the transport's physical address
//! (identity-mapped): from ring 3 they exit straight to the VMM, no guest exception involved.
//! The driver never enables interrupts: it notifies with a write to QueueNotify and polls the
//! used ring. Requests are fixed three-descriptor chains, one per slot (descriptors 3s, 3s+1,
//! 3s+2 for slot s), so a used element's id (the chain's head) names the slot; completions may
//! arrive in any order.

use core::arch::x86_64::_rdtsc;
use core::fmt::{self, Write};
use core::sync::atomic::{Ordering, fence};

use crate::console::{Console, Status, exit};

const MAGIC: u32 = 0x7472_6976;
const DEVICE_ID_BLOCK: u32 = 2;

// virtio-mmio registers (virtio 1.x §4.2.2).
const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC: u64 = 0x080;
const REG_QUEUE_DRIVER: u64 = 0x090;
const REG_QUEUE_DEVICE: u64 = 0x0a0;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
const REG_CONFIG: u64 = 0x100;

const STATUS_ACKNOWLEDGE: u32 = 1;
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;

pub const FEATURE_RO: u64 = 1 << 5;
pub const FEATURE_FLUSH: u64 = 1 << 9;
const FEATURE_VERSION_1: u64 = 1 << 32;

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
/// avail.flags: the driver polls and wants no used-buffer notifications.
const AVAIL_F_NO_INTERRUPT: u16 = 1;

pub const REQ_IN: u32 = 0;
pub const REQ_OUT: u32 = 1;
pub const REQ_FLUSH: u32 = 4;
pub const REQ_GET_ID: u32 = 8;
pub const STATUS_OK: u8 = 0;
pub const STATUS_UNSUPP: u8 = 2;

pub const BLOCK_SIZE: u64 = 4096;
/// Requests in flight at most (slots).
pub const MAX_SLOTS: usize = 32;
/// The queue size used at most: descriptors, avail and used rings each fit in one page.
const MAX_QUEUE_SIZE: u32 = 256;
/// Bytes of the GET_ID answer (VIRTIO_BLK_ID_BYTES).
pub const ID_BYTES: usize = 20;

/// No request (nor the reset) may take longer than this many TSC ticks of running time: ~10 s
/// at 3 GHz, ~15 s at 2 GHz.
const TIMEOUT_TSC: u64 = 30_000_000_000;
/// A jump of the TSC this large between two polls of a spinning loop means the VM was not
/// running (paused, checkpointed and restored later, or descheduled by the host — on a PVM
/// host the guest reads the host's TSC, which a restore cannot wind back): it does not count
/// towards a timeout.
const STALL_TSC: u64 = 1_000_000_000;

/// Running time spent waiting, in TSC ticks, with stalls of the whole VM left out.
struct Waited {
    last: u64,
    total: u64,
}

impl Waited {
    fn start() -> Waited {
        Waited {
            last: rdtsc(),
            total: 0,
        }
    }

    /// Whether the wait has run out of time.
    fn expired(&mut self) -> bool {
        let now = rdtsc();
        let step = now.wrapping_sub(self.last);
        self.last = now;
        if step < STALL_TSC {
            self.total += step;
        }
        self.total > TIMEOUT_TSC
    }
}

// Layout of the DMA region, page by page: descriptor table, avail ring, used ring, request
// headers (16 bytes per slot) with the status bytes and the GET_ID buffer, then one 4 KiB data
// buffer per slot.
const DESC_OFFSET: u64 = 0;
const AVAIL_OFFSET: u64 = 0x1000;
const USED_OFFSET: u64 = 0x2000;
const HEADER_OFFSET: u64 = 0x3000;
const STATUS_OFFSET: u64 = 0x3400;
const ID_OFFSET: u64 = 0x3800;
const DATA_OFFSET: u64 = 0x4000;

/// Registers up to the block device's capacity field must be within the transport.
pub const MIN_TRANSPORT_SIZE: u64 = REG_CONFIG + 8;

/// Bytes of DMA memory the driver needs for `slots` slots.
pub const fn dma_bytes(slots: usize) -> u64 {
    DATA_OFFSET + slots as u64 * BLOCK_SIZE
}

/// The registers of one virtio-mmio transport.
#[derive(Clone, Copy)]
pub struct Mmio {
    base: u64,
}

impl Mmio {
    /// # Safety
    /// `base` must be the identity-mapped address of a virtio-mmio transport (or of MMIO space
    /// with no RAM behind it): register accesses must not touch guest memory.
    pub unsafe fn new(base: u64) -> Self {
        Self { base }
    }

    fn read(self, offset: u64) -> u32 {
        // SAFETY: an aligned 32-bit register of the transport (Mmio::new's contract); a read
        // exits to the VMM and has no effect on guest memory.
        unsafe { ((self.base + offset) as *const u32).read_volatile() }
    }

    fn write(self, offset: u64, value: u32) {
        // SAFETY: as in `read`; the write goes to the device, not to guest memory.
        unsafe { ((self.base + offset) as *mut u32).write_volatile(value) }
    }

    /// MagicValue and DeviceID, to find a block device among the transports.
    pub fn identify(self) -> (u32, u32) {
        (self.read(REG_MAGIC), self.read(REG_DEVICE_ID))
    }
}

/// What a slot's request is doing, for the caller to tell completions apart.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Free,
    Write { block: u64 },
    Read { block: u64 },
    Flush,
    GetId,
}

/// A completed request.
pub struct Completion {
    pub slot: usize,
    pub request: Request,
    pub status: u8,
}

/// The initialized device with queue 0 ready.
pub struct BlockDevice {
    mmio: Mmio,
    /// The identity-mapped DMA region, `dma_bytes(slots)` long, owned by the driver.
    dma: u64,
    pub queue_size: u16,
    pub slots: usize,
    pub features: u64,
    pub capacity: u64,
    requests: [Request; MAX_SLOTS],
    /// Bit s set: slot s is free.
    free: u32,
    avail_idx: u16,
    used_idx: u16,
    notify_pending: bool,
}

/// Prints `disk: <message>` and ends the VM with status 1.
pub fn fail(console: &mut Console, message: fmt::Arguments) -> ! {
    let _ = writeln!(console, "disk: {message}");
    exit(Status::Failed)
}

fn rdtsc() -> u64 {
    // SAFETY: rdtsc has no preconditions; CR4.TSD is clear, so ring 3 may use it.
    unsafe { _rdtsc() }
}

impl BlockDevice {
    /// Initializes the device per virtio 1.x §3.1.1 and §4.2.3, with at most `slots` requests
    /// in flight (fewer if the queue is too small; 3 descriptors per request).
    ///
    /// # Safety
    /// `dma` must be the identity-mapped address of `dma_bytes(slots)` bytes of page-aligned
    /// RAM that nothing else in the guest uses from now on.
    pub unsafe fn init(console: &mut Console, mmio: Mmio, dma: u64, slots: usize) -> Self {
        let (magic, device_id) = mmio.identify();
        if magic != MAGIC {
            fail(
                console,
                format_args!("bad virtio-mmio magic {magic:#x} (expected {MAGIC:#x})"),
            );
        }
        let version = mmio.read(REG_VERSION);
        if version != 2 {
            fail(
                console,
                format_args!(
                    "virtio-mmio version {version}, need 2 (virtio 1.x; QEMU: \
                     -global virtio-mmio.force-legacy=false)"
                ),
            );
        }
        if device_id != DEVICE_ID_BLOCK {
            fail(
                console,
                format_args!("device id {device_id} is not a block device (2)"),
            );
        }

        mmio.write(REG_STATUS, 0);
        let mut waited = Waited::start();
        while mmio.read(REG_STATUS) != 0 {
            if waited.expired() {
                fail(
                    console,
                    format_args!("timeout waiting for the device reset"),
                );
            }
            core::hint::spin_loop();
        }
        let mut status = STATUS_ACKNOWLEDGE;
        mmio.write(REG_STATUS, status);
        status |= STATUS_DRIVER;
        mmio.write(REG_STATUS, status);

        mmio.write(REG_DEVICE_FEATURES_SEL, 0);
        let low = mmio.read(REG_DEVICE_FEATURES);
        mmio.write(REG_DEVICE_FEATURES_SEL, 1);
        let high = mmio.read(REG_DEVICE_FEATURES);
        let offered = u64::from(high) << 32 | u64::from(low);
        if offered & FEATURE_VERSION_1 == 0 {
            fail(
                console,
                format_args!("device does not offer VIRTIO_F_VERSION_1 (features {offered:#x})"),
            );
        }
        let features = FEATURE_VERSION_1 | (offered & (FEATURE_RO | FEATURE_FLUSH));
        mmio.write(REG_DRIVER_FEATURES_SEL, 0);
        mmio.write(REG_DRIVER_FEATURES, features as u32);
        mmio.write(REG_DRIVER_FEATURES_SEL, 1);
        mmio.write(REG_DRIVER_FEATURES, (features >> 32) as u32);
        status |= STATUS_FEATURES_OK;
        mmio.write(REG_STATUS, status);
        if mmio.read(REG_STATUS) & STATUS_FEATURES_OK == 0 {
            fail(
                console,
                format_args!("device refused features {features:#x} (FEATURES_OK cleared)"),
            );
        }

        mmio.write(REG_QUEUE_SEL, 0);
        if mmio.read(REG_QUEUE_READY) != 0 {
            fail(
                console,
                format_args!("queue 0 is already ready after reset"),
            );
        }
        // Split virtqueue sizes are powers of two; a request takes 3 descriptors.
        let max = mmio.read(REG_QUEUE_NUM_MAX).min(MAX_QUEUE_SIZE);
        if max < 4 {
            fail(
                console,
                format_args!("queue 0 has at most {max} descriptors, need at least 4"),
            );
        }
        let wanted = (3 * slots as u32).next_power_of_two();
        let queue_size = if wanted <= max {
            wanted
        } else {
            // The largest power of two the device allows.
            1 << (31 - max.leading_zeros())
        };
        let slots = slots.min(queue_size as usize / 3);

        let mut device = Self {
            mmio,
            dma,
            queue_size: queue_size as u16,
            slots,
            features,
            capacity: 0,
            requests: [Request::Free; MAX_SLOTS],
            free: if slots == 32 {
                u32::MAX
            } else {
                (1 << slots) - 1
            },
            avail_idx: 0,
            used_idx: 0,
            notify_pending: false,
        };
        // Rings start empty: descriptors, avail and used rings zeroed.
        for offset in (0..HEADER_OFFSET).step_by(8) {
            device.write64(offset, 0);
        }
        device.write16(AVAIL_OFFSET, AVAIL_F_NO_INTERRUPT);
        mmio.write(REG_QUEUE_NUM, queue_size);
        for (register, offset) in [
            (REG_QUEUE_DESC, DESC_OFFSET),
            (REG_QUEUE_DRIVER, AVAIL_OFFSET),
            (REG_QUEUE_DEVICE, USED_OFFSET),
        ] {
            let address = dma + offset;
            mmio.write(register, address as u32);
            mmio.write(register + 4, (address >> 32) as u32);
        }
        // The rings must be visible to the device before QueueReady.
        fence(Ordering::SeqCst);
        mmio.write(REG_QUEUE_READY, 1);
        status |= STATUS_DRIVER_OK;
        mmio.write(REG_STATUS, status);

        device.capacity = loop {
            let generation = mmio.read(REG_CONFIG_GENERATION);
            let low = mmio.read(REG_CONFIG);
            let high = mmio.read(REG_CONFIG + 4);
            if mmio.read(REG_CONFIG_GENERATION) == generation {
                break u64::from(high) << 32 | u64::from(low);
            }
        };
        device
    }

    pub fn has_free_slot(&self) -> bool {
        self.free != 0
    }

    /// A free slot, now reserved for the request the caller submits next.
    pub fn take_slot(&mut self) -> usize {
        assert!(self.free != 0, "no free slot");
        let slot = self.free.trailing_zeros() as usize;
        self.free &= !(1 << slot);
        slot
    }

    /// The slot's 4 KiB data buffer, as a pointer to its u64 words (identity-mapped).
    pub fn data(&self, slot: usize) -> *mut u64 {
        (self.dma + DATA_OFFSET + slot as u64 * BLOCK_SIZE) as *mut u64
    }

    /// The GET_ID answer of the last GET_ID request.
    pub fn id(&self) -> [u8; ID_BYTES] {
        let mut id = [0; ID_BYTES];
        for (index, byte) in id.iter_mut().enumerate() {
            *byte = self.read8(ID_OFFSET + index as u64);
        }
        id
    }

    /// Queues `request` in `slot` (from `take_slot`; the data buffer already filled for a
    /// write). The device hears of it at the next `wait`.
    pub fn submit(&mut self, slot: usize, request: Request) {
        let (kind, sector, data) = match request {
            Request::Write { block } => (REQ_OUT, block * 8, Some((DATA_OFFSET, BLOCK_SIZE))),
            Request::Read { block } => (REQ_IN, block * 8, Some((DATA_OFFSET, BLOCK_SIZE))),
            Request::Flush => (REQ_FLUSH, 0, None),
            Request::GetId => (REQ_GET_ID, 0, Some((ID_OFFSET, ID_BYTES as u64))),
            Request::Free => unreachable!("submitting nothing"),
        };
        let header = HEADER_OFFSET + slot as u64 * 16;
        self.write64(header, u64::from(kind));
        self.write64(header + 8, sector);
        let status = STATUS_OFFSET + slot as u64;
        self.write8(status, 0xff);

        let head = 3 * slot as u16;
        let status_desc = head + 2;
        match data {
            Some((offset, len)) => {
                // The data buffer: per slot, except the single GET_ID buffer.
                let address = if offset == DATA_OFFSET {
                    self.dma + DATA_OFFSET + slot as u64 * BLOCK_SIZE
                } else {
                    self.dma + offset
                };
                let device_writes = if kind == REQ_OUT { 0 } else { DESC_F_WRITE };
                self.write_desc(head, self.dma + header, 16, DESC_F_NEXT, head + 1);
                self.write_desc(
                    head + 1,
                    address,
                    len as u32,
                    DESC_F_NEXT | device_writes,
                    status_desc,
                );
            }
            None => self.write_desc(head, self.dma + header, 16, DESC_F_NEXT, status_desc),
        }
        self.write_desc(status_desc, self.dma + status, 1, DESC_F_WRITE, 0);

        let ring_slot = u64::from(self.avail_idx % self.queue_size);
        self.write16(AVAIL_OFFSET + 4 + 2 * ring_slot, head);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // The descriptors and the ring entry before the index that publishes them.
        fence(Ordering::Release);
        self.write16(AVAIL_OFFSET + 2, self.avail_idx);
        self.requests[slot] = request;
        self.notify_pending = true;
    }

    /// Notifies the device of new requests if there are any, then polls until one completes
    /// and returns it, its slot freed. Fails the workload after `TIMEOUT_TSC`.
    pub fn wait(&mut self, console: &mut Console) -> Completion {
        if self.notify_pending {
            // The avail index before the notification (and before reading the used ring).
            fence(Ordering::SeqCst);
            self.mmio.write(REG_QUEUE_NOTIFY, 0);
            self.notify_pending = false;
        }
        let mut waited = Waited::start();
        loop {
            let used_idx = self.read16(USED_OFFSET + 2);
            if used_idx != self.used_idx {
                break;
            }
            if waited.expired() {
                let _ = writeln!(console, "disk: timeout waiting for request");
                fail(
                    console,
                    format_args!(
                        "device status={:#x} in-flight={} avail.idx={} used.idx={}",
                        self.mmio.read(REG_STATUS),
                        self.slots - self.free.count_ones() as usize,
                        self.avail_idx,
                        self.used_idx,
                    ),
                );
            }
            core::hint::spin_loop();
        }
        // The used element (and the buffers it names) only after the index.
        fence(Ordering::Acquire);
        let element = USED_OFFSET + 4 + 8 * u64::from(self.used_idx % self.queue_size);
        let id = self.read32(element);
        self.used_idx = self.used_idx.wrapping_add(1);
        let slot = (id / 3) as usize;
        if !id.is_multiple_of(3) || slot >= self.slots || self.requests[slot] == Request::Free {
            fail(
                console,
                format_args!("device returned used id {id}, which is no request in flight"),
            );
        }
        let request = self.requests[slot];
        self.requests[slot] = Request::Free;
        self.free |= 1 << slot;
        let status = self.read8(STATUS_OFFSET + slot as u64);
        Completion {
            slot,
            request,
            status,
        }
    }

    fn write_desc(&self, index: u16, address: u64, len: u32, flags: u16, next: u16) {
        let desc = DESC_OFFSET + 16 * u64::from(index);
        self.write64(desc, address);
        self.write32(desc + 8, len);
        self.write16(desc + 12, flags);
        self.write16(desc + 14, next);
    }

    // Volatile accesses to the DMA region: the device reads and writes it behind the
    // compiler's back. `offset` is always below `dma_bytes(self.slots)` and naturally aligned.

    fn write64(&self, offset: u64, value: u64) {
        // SAFETY: inside the driver's own DMA region (BlockDevice::init's contract), aligned.
        unsafe { ((self.dma + offset) as *mut u64).write_volatile(value) }
    }

    fn write32(&self, offset: u64, value: u32) {
        // SAFETY: inside the driver's own DMA region (BlockDevice::init's contract), aligned.
        unsafe { ((self.dma + offset) as *mut u32).write_volatile(value) }
    }

    fn write16(&self, offset: u64, value: u16) {
        // SAFETY: inside the driver's own DMA region (BlockDevice::init's contract), aligned.
        unsafe { ((self.dma + offset) as *mut u16).write_volatile(value) }
    }

    fn write8(&self, offset: u64, value: u8) {
        // SAFETY: inside the driver's own DMA region (BlockDevice::init's contract).
        unsafe { ((self.dma + offset) as *mut u8).write_volatile(value) }
    }

    fn read32(&self, offset: u64) -> u32 {
        // SAFETY: inside the driver's own DMA region (BlockDevice::init's contract), aligned.
        unsafe { ((self.dma + offset) as *const u32).read_volatile() }
    }

    fn read16(&self, offset: u64) -> u16 {
        // SAFETY: inside the driver's own DMA region (BlockDevice::init's contract), aligned.
        unsafe { ((self.dma + offset) as *const u16).read_volatile() }
    }

    fn read8(&self, offset: u64) -> u8 {
        // SAFETY: inside the driver's own DMA region (BlockDevice::init's contract).
        unsafe { ((self.dma + offset) as *const u8).read_volatile() }
    }
}
