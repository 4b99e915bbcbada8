//! Serial output and VM exit, usable from ring 3 and ring 0 alike.
//!
//! Port I/O from ring 3 may trap (PVM ignores IOPL 3) and each trap costs about a millisecond,
//! so output is buffered and each complete line leaves with one `rep outsb`.

use core::arch::asm;
use core::fmt;

/// THR of the 16550 at COM1. The VMM needs no UART set-up to show the bytes written here.
const SERIAL_PORT: u16 = 0x3f8;
/// A 32-bit write of v ends the VM: cowvm exits with status v, QEMU's isa-debug-exit with
/// (v << 1) | 1.
const DEBUG_EXIT_PORT: u16 = 0xf4;
/// Longer lines leave in several pieces.
const LINE_CAPACITY: usize = 256;

/// The guest's exit statuses (README.md).
#[derive(Clone, Copy)]
#[repr(u32)]
pub enum Status {
    Success = 0,
    /// A workload's own check failed (disk: a request failed, timed out or read back wrong).
    Failed = 1,
    BadCommandLine = 2,
    Fault = 3,
}

/// A line-buffered writer to the serial port.
pub struct Console {
    line: [u8; LINE_CAPACITY],
    len: usize,
}

impl Console {
    pub const fn new() -> Self {
        Self {
            line: [0; LINE_CAPACITY],
            len: 0,
        }
    }

    fn flush(&mut self) {
        write_serial(&self.line[..self.len]);
        self.len = 0;
    }
}

impl fmt::Write for Console {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        for &byte in text.as_bytes() {
            self.line[self.len] = byte;
            self.len += 1;
            if byte == b'\n' || self.len == LINE_CAPACITY {
                self.flush();
            }
        }
        Ok(())
    }
}

fn write_serial(bytes: &[u8]) {
    // SAFETY: `rep outsb` reads exactly `bytes` and writes nothing to memory. In ring 3 it may
    // trap to trap.rs, which performs it and updates RSI/RCX the same way.
    unsafe {
        asm!(
            "rep outsb",
            inout("rsi") bytes.as_ptr() => _,
            inout("rcx") bytes.len() => _,
            in("dx") SERIAL_PORT,
            options(nostack, readonly, preserves_flags),
        );
    }
}

/// Asks the VMM to end the VM with `status`; returns only if there is no debug-exit device.
pub fn signal_exit(status: Status) {
    // SAFETY: a port write has no effect on guest memory.
    unsafe {
        asm!(
            "out dx, eax",
            in("dx") DEBUG_EXIT_PORT,
            in("eax") status as u32,
            options(nomem, nostack, preserves_flags),
        );
    }
}

/// Ends the VM from ring 3. Without a debug-exit device the guest spins forever.
pub fn exit(status: Status) -> ! {
    signal_exit(status);
    loop {
        core::hint::spin_loop();
    }
}
