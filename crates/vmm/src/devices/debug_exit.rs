//! A debug-exit port, like QEMU's `isa-debug-exit`: a guest write ends the VM with a status.
//!
//! cowvm returns the written value itself as the exit status; QEMU, configured with
//! `-device isa-debug-exit,iobase=0xf4,iosize=4`, returns `(value << 1) | 1` for the same guest.

use std::sync::Arc;

use super::BusDevice;
use crate::exit::{ExitNotifier, VmExit};

/// The I/O port of the debug-exit device.
pub const DEBUG_EXIT_PORT: u64 = 0xf4;
/// Width of its port range.
pub const DEBUG_EXIT_SIZE: u64 = 4;

/// Ends the VM with the status the guest writes.
#[derive(Debug)]
pub struct DebugExit {
    exit: Arc<ExitNotifier>,
}

impl DebugExit {
    /// A device that reports guest exits to `exit`.
    pub fn new(exit: Arc<ExitNotifier>) -> Self {
        DebugExit { exit }
    }
}

impl BusDevice for DebugExit {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let mut bytes = [0u8; 4];
        let n = data.len().min(4);
        bytes[..n].copy_from_slice(&data[..n]);
        self.exit.notify(VmExit::Guest(u32::from_le_bytes(bytes)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_ends_the_vm_with_its_value() {
        let exit = Arc::new(ExitNotifier::default());
        let mut dev = DebugExit::new(exit.clone());
        dev.write(0, &[3, 0, 0, 0]);
        dev.write(0, &[9]);
        assert_eq!(exit.get(), Some(VmExit::Guest(3)));
    }
}
