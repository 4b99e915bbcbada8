//! The device manager: owns the port I/O and MMIO buses and every device on them (the serial
//! console, the debug-exit port, the virtio-blk disks), and saves and restores their state.

use std::io::Write;
use std::sync::{Arc, Mutex};

use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::debug_exit::{DebugExit, DEBUG_EXIT_PORT, DEBUG_EXIT_SIZE};
use super::serial::{
    SerialArgs, SerialConsole, SerialError, SerialState, COM1_IRQ, COM1_PORT, COM1_SIZE,
};
use super::virtio::block::{
    BlockError, BlockHandle, BlockState, DiskArgs, DiskConfig, DiskError, DiskSet,
};
use super::{Bus, BusError};
use crate::exit::ExitNotifier;
use crate::persist::Persist;

/// Errors of building, saving or restoring the devices.
#[derive(Debug, Error)]
pub enum DeviceError {
    /// An eventfd for an interrupt cannot be created.
    #[error("cannot create an interrupt eventfd")]
    EventFd(#[source] std::io::Error),
    /// KVM refused an irqfd.
    #[error("cannot register the serial irqfd")]
    Irqfd(#[source] kvm_ioctls::Error),
    /// Device placement.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// The serial console's state.
    #[error(transparent)]
    Serial(#[from] SerialError),
    /// A disk.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// The device thread of the disks.
    #[error("cannot start the disks")]
    DiskThread(#[source] BlockError),
}

/// The saved state of every device.
#[derive(Debug, Serialize, Deserialize)]
pub struct DeviceStates {
    /// COM1.
    pub serial: SerialState,
    /// The virtio-blk devices, in device order, with the requests in flight at the instant.
    pub blocks: Vec<BlockState>,
}

/// What building the devices needs.
pub struct DeviceArgs<'a> {
    /// The KVM VM, for irqfds and ioeventfds.
    pub vm: &'a VmFd,
    /// Guest memory, for the disks' DMA.
    pub mem: &'a GuestMemoryMmap,
    /// Where the debug-exit port reports the guest's exit.
    pub exit: Arc<ExitNotifier>,
    /// The serial console's output.
    pub console: Box<dyn Write + Send>,
    /// The disk images, in device order.
    pub disks: &'a [DiskConfig],
}

/// The buses and the devices on them.
pub(crate) struct DeviceManager {
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    serial: Arc<Mutex<SerialConsole>>,
    disks: DiskSet,
}

impl DeviceManager {
    /// Devices at reset, with the disks opened (not yet started).
    pub(crate) fn new(args: DeviceArgs<'_>) -> Result<DeviceManager, DeviceError> {
        let disks = DiskSet::open(args.disks, args.mem)?;
        DeviceManager::assemble(args, disks, |irq, out| Ok(SerialConsole::new(irq, out)))
    }

    /// Creates the serial interrupt and places every device on its bus.
    fn assemble(
        args: DeviceArgs<'_>,
        disks: DiskSet,
        serial: impl FnOnce(EventFd, Box<dyn Write + Send>) -> Result<SerialConsole, DeviceError>,
    ) -> Result<DeviceManager, DeviceError> {
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
        args.vm
            .register_irqfd(&irq, COM1_IRQ)
            .map_err(DeviceError::Irqfd)?;
        let serial = Arc::new(Mutex::new(serial(irq, args.console)?));
        let mut pio = Bus::default();
        pio.insert(COM1_PORT..COM1_PORT + COM1_SIZE, serial.clone())?;
        pio.insert(
            DEBUG_EXIT_PORT..DEBUG_EXIT_PORT + DEBUG_EXIT_SIZE,
            Arc::new(Mutex::new(DebugExit::new(args.exit))),
        )?;
        let mut mmio = Bus::default();
        disks.attach(args.vm, &mut mmio)?;
        Ok(DeviceManager {
            pio: Arc::new(pio),
            mmio: Arc::new(mmio),
            serial,
            disks,
        })
    }

    /// `cmdline` with the words that announce the disks to the guest.
    pub(crate) fn cmdline(&self, cmdline: &str) -> String {
        self.disks.cmdline(cmdline)
    }

    /// The port I/O bus.
    pub(crate) fn pio(&self) -> &Arc<Bus> {
        &self.pio
    }

    /// The MMIO bus.
    pub(crate) fn mmio(&self) -> &Arc<Bus> {
        &self.mmio
    }

    /// Starts the device thread of the disks (once the vCPUs exist).
    pub(crate) fn start(&mut self, mem: &GuestMemoryMmap) -> Result<(), DeviceError> {
        self.disks.start(mem).map_err(DeviceError::DiskThread)
    }

    /// The disks, in device order.
    pub(crate) fn disks(&self) -> &[BlockHandle] {
        self.disks.handles()
    }

    /// Writes the console's partial line, if any, to its output.
    pub(crate) fn flush_console(&self) -> std::io::Result<()> {
        self.serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .flush()
    }

    /// Stops the device thread (after the vCPUs, so no new notification arrives).
    pub(crate) fn stop(&mut self) {
        self.disks.stop();
    }
}

impl Persist for DeviceManager {
    type State = DeviceStates;
    type Args<'a> = DeviceArgs<'a>;
    type Error = DeviceError;

    /// Every device's state. For a checkpoint: in the pause, with the disks frozen.
    fn save(&self) -> Result<DeviceStates, DeviceError> {
        Ok(DeviceStates {
            serial: self
                .serial
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .save()?,
            blocks: self.disks.save()?,
        })
    }

    fn restore(args: DeviceArgs<'_>, state: &DeviceStates) -> Result<DeviceManager, DeviceError> {
        let disks = DiskSet::restore(
            DiskArgs {
                configs: args.disks,
                mem: args.mem,
            },
            &state.blocks,
        )?;
        DeviceManager::assemble(args, disks, |irq, out| {
            Ok(SerialConsole::restore(
                SerialArgs { irq, out },
                &state.serial,
            )?)
        })
    }
}
