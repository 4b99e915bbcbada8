//! The virtio-mmio transport, register layout of the virtio 1.2 spec §4.2.2 (version 2).
//!
//! The transport is shared between the vCPU threads (register accesses through the MMIO bus)
//! and the device thread (popping requests, publishing used buffers, raising interrupts), so
//! it lives in an `Arc<Mutex<_>>`. Every value the driver writes is checked here: queue set-up
//! is only accepted before `DRIVER_OK`, feature negotiation fails cleanly (`FEATURES_OK` stays
//! clear) and a queue that is unusable at `DRIVER_OK` marks the device `DEVICE_NEEDS_RESET`.

use serde::{Deserialize, Serialize};
use tracing::{debug, warn};
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::devices::guest_warn::{guest_warn, GuestWarnings};
use crate::devices::BusDevice;

/// "virt", little endian.
pub const MAGIC: u32 = 0x7472_6976;
/// The modern (virtio 1.x) virtio-mmio layout.
pub const VERSION: u32 = 2;
/// Our vendor id ("COWV" would not fit the spirit; QEMU's is 0x554d4551 "QEMU").
pub const VENDOR_ID: u32 = 0x5643_4f57;

/// Register offsets.
pub mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Device status bits (virtio spec §2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    pub const FAILED: u32 = 0x80;
}

/// InterruptStatus bits.
pub const INT_USED_BUFFER: u32 = 1;
/// InterruptStatus bit: the configuration (or the device status) changed.
pub const INT_CONFIG: u32 = 2;

/// VIRTIO_F_VERSION_1.
pub const F_VERSION_1: u64 = 1 << 32;

/// [`QueueState`] as plain serde data (virtio-queue's type has no serde support).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(remote = "QueueState")]
pub struct QueueStateDef {
    pub max_size: u16,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

/// One queue's saved state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedQueue(#[serde(with = "QueueStateDef")] pub QueueState);

/// The transport registers, as plain data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    pub status: u32,
    pub driver_features: u64,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub queue_sel: u32,
    pub interrupt_status: u32,
    pub config_generation: u32,
    pub queues: Vec<SavedQueue>,
}

/// Why a saved transport state was refused.
#[derive(Debug, thiserror::Error)]
pub enum TransportStateError {
    #[error("saved state has {0} queues, the device has {1}")]
    QueueCount(usize, usize),
    #[error("saved queue {0} is invalid")]
    Queue(usize, #[source] virtio_queue::Error),
    #[error("saved queue {0} has max size {1}, the device offers {2}")]
    QueueMax(usize, u16, u16),
    #[error("saved driver features {0:#x} are not a subset of the device's {1:#x}")]
    Features(u64, u64),
    #[error("saved device status {0:#x} is not a valid state")]
    Status(u32),
}

/// A virtio-mmio device window: the registers, the queues and the device config space.
pub struct MmioTransport {
    device_id: u32,
    device_features: u64,
    driver_features: u64,
    device_features_sel: u32,
    driver_features_sel: u32,
    queue_sel: u32,
    status: u32,
    interrupt_status: u32,
    config_generation: u32,
    queues: Vec<Queue>,
    config: Vec<u8>,
    irq: EventFd,
    notify: EventFd,
    mem: GuestMemoryMmap,
    /// Bumped by every device reset, so completions of requests popped before it are dropped.
    reset_epoch: u64,
    /// What the driver gets wrong, logged within a limit.
    warnings: GuestWarnings,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_id", &self.device_id)
            .field("status", &self.status)
            .finish()
    }
}

fn set_half(value: &mut u64, high: bool, v: u32) {
    if high {
        *value = (*value & 0xffff_ffff) | (u64::from(v) << 32);
    } else {
        *value = (*value & !0xffff_ffff) | u64::from(v);
    }
}

impl MmioTransport {
    /// A device in its reset state. `queue_max` are the sizes offered per queue (powers of 2).
    pub fn new(
        device_id: u32,
        device_features: u64,
        queue_max: &[u16],
        config: Vec<u8>,
        irq: EventFd,
        notify: EventFd,
        mem: GuestMemoryMmap,
    ) -> Result<Self, virtio_queue::Error> {
        let queues = queue_max
            .iter()
            .map(|&m| Queue::new(m))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(MmioTransport {
            device_id,
            device_features: device_features | F_VERSION_1,
            driver_features: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            queue_sel: 0,
            status: 0,
            interrupt_status: 0,
            config_generation: 0,
            queues,
            config,
            irq,
            notify,
            mem,
            reset_epoch: 0,
            warnings: GuestWarnings::new("virtio-mmio"),
        })
    }

    /// The registers as plain data.
    pub fn save(&self) -> TransportState {
        TransportState {
            status: self.status,
            driver_features: self.driver_features,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt_status,
            config_generation: self.config_generation,
            queues: self.queues.iter().map(|q| SavedQueue(q.state())).collect(),
        }
    }

    /// Loads saved registers, treating them as untrusted: queues go through virtio-queue's
    /// validation, features must be ones the device offers, the status a reachable one.
    pub fn restore(&mut self, state: &TransportState) -> Result<(), TransportStateError> {
        if state.queues.len() != self.queues.len() {
            return Err(TransportStateError::QueueCount(
                state.queues.len(),
                self.queues.len(),
            ));
        }
        if state.driver_features & !self.device_features != 0 {
            return Err(TransportStateError::Features(
                state.driver_features,
                self.device_features,
            ));
        }
        let known = status::ACKNOWLEDGE
            | status::DRIVER
            | status::DRIVER_OK
            | status::FEATURES_OK
            | status::DEVICE_NEEDS_RESET
            | status::FAILED;
        if state.status & !known != 0
            || (state.status & status::DRIVER_OK != 0 && state.status & status::FEATURES_OK == 0)
        {
            return Err(TransportStateError::Status(state.status));
        }
        let mut queues = Vec::with_capacity(state.queues.len());
        for (i, (saved, current)) in state.queues.iter().zip(&self.queues).enumerate() {
            if saved.0.max_size != current.max_size() {
                return Err(TransportStateError::QueueMax(
                    i,
                    saved.0.max_size,
                    current.max_size(),
                ));
            }
            queues.push(Queue::try_from(saved.0).map_err(|e| TransportStateError::Queue(i, e))?);
        }
        self.queues = queues;
        self.status = state.status;
        self.driver_features = state.driver_features;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.queue_sel = state.queue_sel;
        self.interrupt_status = state.interrupt_status & (INT_USED_BUFFER | INT_CONFIG);
        self.config_generation = state.config_generation;
        if self.status & status::DRIVER_OK != 0 && !self.queues_usable() {
            self.status |= status::DEVICE_NEEDS_RESET;
        }
        Ok(())
    }

    /// Whether the device may process requests: driver ready, device not broken.
    pub fn running(&self) -> bool {
        self.status & (status::DRIVER_OK | status::DEVICE_NEEDS_RESET | status::FAILED)
            == status::DRIVER_OK
    }

    /// Counter of device resets.
    pub fn reset_epoch(&self) -> u64 {
        self.reset_epoch
    }

    /// Queue `i` with the guest memory it lives in.
    pub fn queue_mut(&mut self, i: usize) -> Option<(&mut Queue, &GuestMemoryMmap)> {
        self.queues.get_mut(i).map(|q| (q, &self.mem))
    }

    /// Raises the interrupt for `bits` (used buffer and/or config change).
    pub fn signal(&mut self, bits: u32) {
        self.interrupt_status |= bits;
        if let Err(e) = self.irq.write(1) {
            warn!(device = self.device_id, "cannot raise the interrupt: {e}");
        }
    }

    /// Marks the device broken (`DEVICE_NEEDS_RESET`) after a driver error it cannot report
    /// per request; the driver must reset it.
    pub fn mark_broken(&mut self, why: &str) {
        if self.status & status::DEVICE_NEEDS_RESET == 0 {
            guest_warn!(
                self.warnings,
                device = self.device_id,
                "virtio device needs reset: {why}"
            );
            self.status |= status::DEVICE_NEEDS_RESET;
            self.signal(INT_CONFIG);
        }
    }

    fn queues_usable(&self) -> bool {
        self.queues
            .iter()
            .all(|q| !q.ready() || q.is_valid(&self.mem))
    }

    fn reset(&mut self) {
        debug!(device = self.device_id, "virtio device reset");
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.status = 0;
        self.interrupt_status = 0;
        for q in &mut self.queues {
            q.reset();
        }
        self.reset_epoch += 1;
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        if v & self.status != self.status {
            guest_warn!(
                self.warnings,
                old = self.status,
                new = v,
                "driver cleared device status bits without a reset; ignored"
            );
            return;
        }
        let added = v & !self.status;
        let needs = [
            (status::DRIVER, status::ACKNOWLEDGE),
            (status::FEATURES_OK, status::DRIVER),
            (status::DRIVER_OK, status::FEATURES_OK),
        ];
        for (bit, required) in needs {
            if added & bit != 0 && v & required == 0 {
                guest_warn!(
                    self.warnings,
                    status = v,
                    "driver skipped a device status step; ignored"
                );
                return;
            }
        }
        let mut v = v & !status::DEVICE_NEEDS_RESET | (self.status & status::DEVICE_NEEDS_RESET);
        if added & status::FEATURES_OK != 0 {
            let unknown = self.driver_features & !self.device_features;
            if unknown != 0 || self.driver_features & F_VERSION_1 == 0 {
                guest_warn!(
                    self.warnings,
                    driver = self.driver_features,
                    device = self.device_features,
                    "feature negotiation failed (unknown bits or no VERSION_1)"
                );
                v &= !status::FEATURES_OK;
            }
        }
        self.status = v;
        if added & status::DRIVER_OK != 0 {
            if self.queues_usable() {
                // Anything posted before DRIVER_OK is processed now.
                if let Err(e) = self.notify.write(1) {
                    warn!("cannot kick the device thread: {e}");
                }
            } else {
                self.mark_broken("a ready queue lies outside guest memory");
            }
        }
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        // Queue set-up is only allowed before DRIVER_OK and while the queue is not ready.
        let locked = self.status & status::DRIVER_OK != 0;
        let q = self.queues.get_mut(self.queue_sel as usize)?;
        (!locked && !q.ready()).then_some(q)
    }

    fn read_register(&self, offset: u64) -> u32 {
        let q = self.queues.get(self.queue_sel as usize);
        match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.device_id,
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device_features as u32,
                1 => (self.device_features >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => q.map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => q.map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt_status,
            reg::STATUS => self.status,
            // No shared memory regions: a length of all ones says "absent".
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH | reg::SHM_BASE_LOW | reg::SHM_BASE_HIGH => {
                u32::MAX
            }
            reg::CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, v: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::DRIVER_FEATURES => {
                if self.status & status::FEATURES_OK != 0 || self.status & status::DRIVER == 0 {
                    guest_warn!(
                        self.warnings,
                        "driver features written outside negotiation; ignored"
                    );
                    return;
                }
                match self.driver_features_sel {
                    0 => set_half(&mut self.driver_features, false, v),
                    1 => set_half(&mut self.driver_features, true, v),
                    sel => guest_warn!(
                        self.warnings,
                        sel,
                        "driver features page out of range; ignored"
                    ),
                }
            }
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NUM => match (self.selected_queue(), u16::try_from(v)) {
                (Some(q), Ok(size)) => {
                    if let Err(e) = q.try_set_size(size) {
                        guest_warn!(self.warnings, size = v, "invalid queue size: {e}");
                    }
                }
                _ => guest_warn!(self.warnings, size = v, "queue size write ignored"),
            },
            reg::QUEUE_READY => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(v == 1);
                } else if v == 0 {
                    // Disabling a running queue needs the reset path in this device.
                    guest_warn!(
                        self.warnings,
                        "queue disable without reset is not supported; ignored"
                    );
                }
            }
            reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_DRIVER_LOW
            | reg::QUEUE_DRIVER_HIGH
            | reg::QUEUE_DEVICE_LOW
            | reg::QUEUE_DEVICE_HIGH => {
                let Some(q) = self.selected_queue() else {
                    guest_warn!(self.warnings, offset, "queue address write ignored");
                    return;
                };
                let (low, high) = if offset & 4 == 0 {
                    (Some(v), None)
                } else {
                    (None, Some(v))
                };
                match offset & !4 {
                    reg::QUEUE_DESC_LOW => q.set_desc_table_address(low, high),
                    reg::QUEUE_DRIVER_LOW => q.set_avail_ring_address(low, high),
                    _ => q.set_used_ring_address(low, high),
                }
            }
            reg::QUEUE_NOTIFY => {
                // Reached only when KVM did not take the write through the ioeventfd.
                if let Err(e) = self.notify.write(1) {
                    warn!("cannot kick the device thread: {e}");
                }
            }
            reg::INTERRUPT_ACK => self.interrupt_status &= !v,
            reg::STATUS => self.write_status(v),
            _ => debug!(
                offset,
                v, "write to a read-only or unknown virtio-mmio register"
            ),
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            let start = (offset - reg::CONFIG) as usize;
            for (i, b) in data.iter_mut().enumerate() {
                *b = self.config.get(start + i).copied().unwrap_or(0);
            }
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            debug!(
                offset,
                len = data.len(),
                "unaligned virtio-mmio register read"
            );
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_register(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            debug!(offset, "write to read-only device config space ignored");
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            debug!(
                offset,
                len = data.len(),
                "non-32-bit virtio-mmio register write"
            );
            return;
        };
        if offset % 4 != 0 {
            return;
        }
        self.write_register(offset, u32::from_le_bytes(bytes));
    }
}
