//! virtio devices over the virtio-mmio transport (virtio 1.x, MMIO version 2).
//!
//! Each device gets one 4 KiB register window at [`mmio_base`]`(i)` and the interrupt line
//! [`irq`]`(i)` (an irqfd into the in-kernel IOAPIC); the VMM announces it to the guest with
//! [`cmdline_entry`], in Linux's `virtio_mmio.device=` syntax. The only device so far is the
//! block device ([`block`]).

pub(crate) mod block;
pub(crate) mod mmio;
mod uring;

/// Guest-physical address of the first virtio-mmio window (inside the 32-bit MMIO hole).
pub const MMIO_BASE: u64 = 0xd000_0000;
/// Size of one virtio-mmio window.
pub const MMIO_SIZE: u64 = 0x1000;
/// Interrupt line (GSI) of the first device.
pub const FIRST_IRQ: u32 = 5;

/// Base address of the window of device `index`.
pub fn mmio_base(index: usize) -> u64 {
    MMIO_BASE + index as u64 * MMIO_SIZE
}

/// Interrupt line (GSI) of device `index`.
pub fn irq(index: usize) -> u32 {
    FIRST_IRQ + index as u32
}

/// The kernel command-line word that tells the guest where device `index` is.
pub fn cmdline_entry(index: usize) -> String {
    format!(
        "virtio_mmio.device=4K@{:#x}:{}",
        mmio_base(index),
        irq(index)
    )
}

/// Told about guest memory the device is about to write, before the write is issued, so a
/// live checkpoint can preserve the original pages first (design.md §3, M11). Called on the device
/// thread; it must not wait on anything a vCPU or the device thread holds.
pub trait DmaObserver: Send + Sync {
    /// The device will write `[gpa, gpa + len)` of guest memory.
    fn before_device_write(&self, gpa: u64, len: u64);
}
