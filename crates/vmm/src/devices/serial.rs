//! The 16550 serial console at 0x3f8 (COM1), built on `vm-superio`, with its interrupt on IRQ 4
//! delivered through an irqfd into the in-kernel irqchip.

use std::io::{self, LineWriter, Write};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use vm_superio::serial::{NoEvents, SerialState as Registers};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::BusDevice;
use crate::persist::Persist;

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

/// Console output: whole lines to the sink, counting every byte the guest sent.
pub struct ConsoleOut {
    out: LineWriter<Box<dyn Write + Send>>,
    emitted: u64,
}

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.out.write(buf)?;
        self.emitted += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// Errors of restoring the serial device.
#[derive(Debug, Error)]
pub enum SerialError {
    /// The saved state is not a valid 16550 state.
    #[error("invalid saved serial state: {0}")]
    BadState(String),
}

/// The saved state of COM1: the 16550 registers and FIFO, and how many bytes the guest had
/// written to the console (so the output of a restored VM can be lined up with the original's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Received bytes not yet read by the guest.
    pub in_buffer: Vec<u8>,
    /// Bytes the guest has written to the console so far.
    pub bytes_emitted: u64,
}

/// The COM1 device.
pub struct SerialConsole {
    serial: Serial<IrqTrigger, NoEvents, ConsoleOut>,
}

impl SerialConsole {
    /// A console writing whole lines to `out`, raising its interrupt through `irq`.
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        SerialConsole {
            serial: Serial::new(
                IrqTrigger(irq),
                ConsoleOut {
                    out: LineWriter::new(out),
                    emitted: 0,
                },
            ),
        }
    }

    /// Flushes any partial line to the output.
    pub fn flush(&mut self) -> io::Result<()> {
        self.serial.writer_mut().flush()
    }
}

/// What a restored console needs: its interrupt and its output.
pub struct SerialArgs {
    /// The irqfd of COM1's interrupt.
    pub irq: EventFd,
    /// Where the console continues.
    pub out: Box<dyn Write + Send>,
}

impl Persist for SerialConsole {
    type State = SerialState;
    type Args<'a> = SerialArgs;
    type Error = SerialError;

    /// A console in the saved state `state`, continuing on `args.out`.
    fn restore(args: SerialArgs, state: &SerialState) -> Result<Self, SerialError> {
        let SerialArgs { irq, out } = args;
        let regs = Registers {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let out = ConsoleOut {
            out: LineWriter::new(out),
            emitted: state.bytes_emitted,
        };
        let serial = Serial::from_state(&regs, IrqTrigger(irq), NoEvents, out)
            .map_err(|e| SerialError::BadState(format!("{e:?}")))?;
        Ok(SerialConsole { serial })
    }

    fn save(&self) -> Result<SerialState, SerialError> {
        let s = self.serial.state();
        Ok(SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
            bytes_emitted: self.serial.writer().emitted,
        })
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
        if let Err(e) = self.flush() {
            tracing::warn!("console flush failed: {e}");
        }
    }
}
