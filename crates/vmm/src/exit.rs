//! How a VM ends: the guest's own exit status, a triple fault, or a fatal VMM error.

use std::fmt;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use kvm_ioctls::VcpuFd;

/// The reason a VM stopped running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest wrote this status to the debug-exit port.
    Guest(u32),
    /// A vCPU triple-faulted (KVM_EXIT_SHUTDOWN); the registers at that moment.
    TripleFault {
        /// The vCPU.
        vcpu: u8,
        /// Its registers, formatted.
        registers: String,
    },
    /// The guest asked for a shutdown or reset through a KVM system event.
    SystemEvent(u32),
    /// The VMM cannot go on (an exit it cannot handle, a failed ioctl).
    Fatal(String),
    /// The VMM was asked to stop the VM.
    Stopped,
    /// The VM moved to another VMM (the destination's address).
    Migrated(String),
}

/// The largest guest status passed on as it is: 125 and above are the VMM's own (a VMM-side
/// failure, and 128 plus a signal's number), so a larger status a guest writes is reported as
/// this one.
const GUEST_STATUS_MAX: i32 = 124;

impl VmExit {
    /// The process exit status `cowvm run` returns for this exit.
    pub fn status(&self) -> i32 {
        match self {
            VmExit::Guest(v) => i32::try_from(*v).unwrap_or(i32::MAX).min(GUEST_STATUS_MAX),
            VmExit::Stopped | VmExit::Migrated(_) => 0,
            VmExit::TripleFault { .. } | VmExit::SystemEvent(_) | VmExit::Fatal(_) => 125,
        }
    }
}

impl fmt::Display for VmExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmExit::Guest(v) => write!(f, "guest exited with status {v}"),
            VmExit::TripleFault { vcpu, registers } => {
                write!(f, "guest triple fault on vCPU {vcpu}: {registers}")
            }
            VmExit::SystemEvent(kind) => write!(f, "guest requested system event {kind}"),
            VmExit::Fatal(msg) => write!(f, "{msg}"),
            VmExit::Stopped => write!(f, "stopped by the VMM"),
            VmExit::Migrated(to) => write!(f, "migrated to {to}"),
        }
    }
}

/// The first exit reported by any vCPU or device; later ones are ignored.
#[derive(Debug, Default)]
pub struct ExitNotifier {
    exit: Mutex<Option<VmExit>>,
    done: Condvar,
}

impl ExitNotifier {
    /// Records `exit` unless another exit came first.
    pub fn notify(&self, exit: VmExit) {
        let mut slot = self.exit.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(exit);
            self.done.notify_all();
        }
    }

    /// Waits until an exit is reported.
    pub fn wait(&self) -> VmExit {
        let slot = self.exit.lock().unwrap_or_else(|p| p.into_inner());
        let slot = self
            .done
            .wait_while(slot, |s| s.is_none())
            .unwrap_or_else(|p| p.into_inner());
        slot.clone()
            .expect("wait_while returns once an exit is recorded")
    }

    /// Waits up to `timeout` for an exit.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<VmExit> {
        let slot = self.exit.lock().unwrap_or_else(|p| p.into_inner());
        let (slot, _) = self
            .done
            .wait_timeout_while(slot, timeout, |s| s.is_none())
            .unwrap_or_else(|p| p.into_inner());
        slot.clone()
    }

    /// The exit, if one was reported.
    pub fn get(&self) -> Option<VmExit> {
        self.exit.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// A one-line dump of a vCPU's registers for error reports.
pub fn describe_registers(vcpu: &VcpuFd) -> String {
    let regs = match vcpu.get_regs() {
        Ok(r) => r,
        Err(e) => return format!("(registers unavailable: {e})"),
    };
    let sregs = match vcpu.get_sregs() {
        Ok(s) => s,
        Err(e) => return format!("(system registers unavailable: {e})"),
    };
    format!(
        "rip={:#x} rsp={:#x} rflags={:#x} rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x} \
         cs={:#x} cpl={} cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
        regs.rip,
        regs.rsp,
        regs.rflags,
        regs.rax,
        regs.rbx,
        regs.rcx,
        regs.rdx,
        regs.rsi,
        regs.rdi,
        sregs.cs.selector,
        sregs.cs.dpl,
        sregs.cr0,
        sregs.cr2,
        sregs.cr3,
        sregs.cr4,
        sregs.efer
    )
}
