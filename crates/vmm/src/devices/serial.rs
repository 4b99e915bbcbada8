//! The 16550 serial console at 0x3f8 (COM1), built on `vm-superio`, with its interrupt on IRQ 4
//! delivered through an irqfd into the in-kernel irqchip.

use std::io::{self, LineWriter, Write};

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::BusDevice;

/// First I/O port of COM1.
pub const COM1_PORT: u64 = 0x3f8;
/// Number of ports of a 16550.
pub const COM1_SIZE: u64 = 8;
/// Legacy IRQ line of COM1.
pub const COM1_IRQ: u32 = 4;

/// Raises the serial interrupt by writing the irqfd.
#[derive(Debug)]
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Where console output goes.
pub type ConsoleOut = LineWriter<Box<dyn Write + Send>>;

/// The COM1 device.
pub struct SerialConsole {
    serial: Serial<IrqTrigger, NoEvents, ConsoleOut>,
}

impl SerialConsole {
    /// A console writing whole lines to `out`, raising its interrupt through `irq`.
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        SerialConsole {
            serial: Serial::new(IrqTrigger(irq), LineWriter::new(out)),
        }
    }

    /// Flushes any partial line to the output.
    pub fn flush(&mut self) -> io::Result<()> {
        self.serial.writer_mut().flush()
    }
}

impl BusDevice for SerialConsole {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // Ports are byte-wide; a string read returns the same register repeatedly.
        for b in data.iter_mut() {
            *b = self.serial.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // A `rep outsb` arrives as one exit with every byte; each goes to the same register.
        for &b in data {
            if let Err(e) = self.serial.write(offset as u8, b) {
                tracing::warn!("serial console write failed: {e:?}");
            }
        }
    }
}

impl Drop for SerialConsole {
    fn drop(&mut self) {
        let _ = self.flush();
    }
}
