//! Emulated devices and the buses that route guest port I/O and MMIO to them.

pub(crate) mod debug_exit;
pub(crate) mod guest_warn;
pub(crate) mod manager;
pub(crate) mod serial;
pub(crate) mod virtio;

use std::ops::Range;
use std::sync::{Arc, Mutex};

use thiserror::Error;
use tracing::trace;

/// Errors of bus set-up.
#[derive(Debug, Error)]
pub enum BusError {
    /// Two devices claim overlapping address ranges.
    #[error("device range {new:#x?} overlaps {existing:#x?}")]
    Overlap {
        /// The range being added.
        new: Range<u64>,
        /// The range already on the bus.
        existing: Range<u64>,
    },
}

/// A device reached through a bus. `offset` is relative to the start of the device's range.
pub trait BusDevice: Send {
    /// The guest reads `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A device shared between the bus and the VMM's own code (for saving its state).
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// An address space of devices (the port I/O space or the MMIO space). Fixed once built, so
/// vCPU threads route accesses without a bus-wide lock.
#[derive(Default)]
pub struct Bus {
    devices: Vec<(Range<u64>, SharedDevice)>,
}

impl Bus {
    /// Adds `device` at `range`.
    pub fn insert(&mut self, range: Range<u64>, device: SharedDevice) -> Result<(), BusError> {
        if let Some((existing, _)) = self
            .devices
            .iter()
            .find(|(r, _)| r.start < range.end && range.start < r.end)
        {
            return Err(BusError::Overlap {
                new: range,
                existing: existing.clone(),
            });
        }
        self.devices.push((range, device));
        self.devices.sort_by_key(|(r, _)| r.start);
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &SharedDevice)> {
        let i = self.devices.partition_point(|(r, _)| r.start <= addr);
        let (range, dev) = self.devices.get(i.checked_sub(1)?)?;
        range.contains(&addr).then(|| (addr - range.start, dev))
    }

    /// Routes a guest read; unclaimed addresses read as all ones, as on a real bus.
    pub fn read(&self, addr: u64, data: &mut [u8]) {
        match self.find(addr) {
            Some((offset, dev)) => dev
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .read(offset, data),
            None => {
                trace!(addr, len = data.len(), "read of an unclaimed address");
                data.fill(0xff);
            }
        }
    }

    /// Routes a guest write; writes to unclaimed addresses are dropped.
    pub fn write(&self, addr: u64, data: &[u8]) {
        match self.find(addr) {
            Some((offset, dev)) => dev
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .write(offset, data),
            None => trace!(addr, len = data.len(), "write to an unclaimed address"),
        }
    }
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.devices.iter().map(|(r, _)| r))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder(Vec<(u64, Vec<u8>)>);

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_by_range_and_rejects_overlaps() {
        let a = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::default();
        bus.insert(0x3f8..0x400, a.clone()).unwrap();
        bus.insert(0xf4..0xf8, Arc::new(Mutex::new(Recorder::default())))
            .unwrap();
        assert!(bus
            .insert(0x3ff..0x401, Arc::new(Mutex::new(Recorder::default())))
            .is_err());
        bus.write(0x3f9, &[7]);
        assert_eq!(a.lock().unwrap().0, vec![(1, vec![7])]);
        let mut buf = [0u8; 1];
        bus.read(0x3fd, &mut buf);
        assert_eq!(buf, [5]);
        bus.read(0x400, &mut buf);
        assert_eq!(buf, [0xff]);
        bus.read(0x3f7, &mut buf);
        assert_eq!(buf, [0xff]);
    }
}
