//! Saving and restoring the KVM side of a VM: every vCPU's registers, FPU/XSAVE, MSRs, LAPIC,
//! pending events and MP state, and the VM's in-kernel irqchip, PIT and KVM clock.
//!
//! The state is plain data (`serde`), so a checkpoint can carry it; restored state is untrusted
//! input and each `KVM_SET_*` ioctl validates it again.

use std::ops::{Deref, DerefMut};
use std::sync::{Arc, OnceLock};

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    CpuId, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use vm_memory::GuestMemoryMmap;

use super::{KvmError, KvmVm};
use crate::persist::Persist;

/// The state of one vCPU.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    /// Index of the vCPU (its APIC id).
    pub id: u8,
    /// CPUID table the vCPU runs with.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// MP state (runnable, halted, waiting for SIPI...).
    pub mp_state: kvm_mp_state,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// FPU, SSE and extended state.
    pub xsave: kvm_xsave,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debug_regs: kvm_debugregs,
    /// Local APIC registers.
    pub lapic: kvm_lapic_state,
    /// Model-specific registers (TSC among them).
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending exceptions, interrupts and NMIs.
    pub events: kvm_vcpu_events,
    /// TSC frequency the guest saw, in kHz (0 if unknown).
    pub tsc_khz: u32,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "VcpuState {{ id: {}, rip: {:#x}, msrs: {} }}",
            self.id,
            self.regs.rip,
            self.msrs.len()
        )
    }
}

/// The VM-wide KVM state.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmState {
    /// PIC master, PIC slave and IOAPIC, in that order.
    pub irqchips: Vec<kvm_irqchip>,
    /// The in-kernel PIT.
    pub pit: kvm_pit_state2,
    /// The KVM clock.
    pub clock: kvm_clock_data,
}

impl std::fmt::Debug for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VmState {{ clock: {} }}", self.clock.clock)
    }
}

/// A created and configured vCPU, with the MSRs saved with it. Dereferences to its KVM file
/// descriptor.
pub struct KvmVcpu {
    id: u8,
    fd: VcpuFd,
    msrs: Arc<[u32]>,
}

impl KvmVcpu {
    /// Wraps vCPU `id`, whose state saves the MSRs `msrs`.
    pub(crate) fn new(id: u8, fd: VcpuFd, msrs: Arc<[u32]>) -> KvmVcpu {
        KvmVcpu { id, fd, msrs }
    }
}

impl Deref for KvmVcpu {
    type Target = VcpuFd;

    fn deref(&self) -> &VcpuFd {
        &self.fd
    }
}

impl DerefMut for KvmVcpu {
    fn deref_mut(&mut self) -> &mut VcpuFd {
        &mut self.fd
    }
}

/// MSRs that KVM lists but that cannot be meaningfully saved and restored.
const SKIPPED_MSRS: &[u32] = &[
    0x4b56_4d00, // MSR_KVM_WALL_CLOCK_NEW: written by the guest, not state
    0x4b56_4d01, // MSR_KVM_SYSTEM_TIME_NEW: written by the guest, not state
];

/// The MSRs of `vcpu` that KVM can both read and write, found by reading each listed MSR once.
/// Done at the creation of the first VM of the process, not in the pause: the answer depends
/// on the host's KVM and on the CPUID features, which are the same for every VM of this VMM
/// (probing costs about a millisecond, which a restore would otherwise pay each time).
pub fn savable_msrs(kvm: &Kvm, vcpu: &VcpuFd) -> Result<Vec<u32>, KvmError> {
    static SAVABLE: OnceLock<Vec<u32>> = OnceLock::new();
    if let Some(found) = SAVABLE.get() {
        return Ok(found.clone());
    }
    let found = probe_savable_msrs(kvm, vcpu)?;
    Ok(SAVABLE.get_or_init(|| found).clone())
}

/// The most MSRs KVM reads in one call.
const MSRS_PER_CALL: usize = 255;

/// Keeps the MSRs of KVM's list that this vCPU can read. KVM reads a batch in order and stops at
/// the first it cannot read, so each call reads a run and names the MSR that ended it: one call
/// per unreadable MSR, not one per MSR.
fn probe_savable_msrs(kvm: &Kvm, vcpu: &VcpuFd) -> Result<Vec<u32>, KvmError> {
    let list = kvm
        .get_msr_index_list()
        .map_err(KvmError::ioctl("get MSR index list"))?;
    let candidates: Vec<u32> = list
        .as_slice()
        .iter()
        .copied()
        .filter(|index| !SKIPPED_MSRS.contains(index))
        .collect();
    let mut savable = Vec::with_capacity(candidates.len());
    let mut next = 0;
    while next < candidates.len() {
        let batch = &candidates[next..candidates.len().min(next + MSRS_PER_CALL)];
        let entries: Vec<kvm_msr_entry> = batch
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs =
            Msrs::from_entries(&entries).map_err(|_| KvmError::TooManyMsrs(entries.len()))?;
        let read = vcpu.get_msrs(&mut msrs).unwrap_or(0).min(batch.len());
        savable.extend_from_slice(&batch[..read]);
        // A short read stopped at an MSR KVM cannot read: leave that one out.
        next += read + usize::from(read < batch.len());
    }
    Ok(savable)
}

/// Reads the state of a stopped vCPU.
fn save_vcpu(id: u8, vcpu: &VcpuFd, msr_indices: &[u32]) -> Result<VcpuState, KvmError> {
    let cpuid = vcpu
        .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(KvmError::ioctl("get CPUID"))?;
    let mut msrs = Msrs::from_entries(
        &msr_indices
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect::<Vec<_>>(),
    )
    .map_err(|_| KvmError::TooManyMsrs(msr_indices.len()))?;
    let read = vcpu
        .get_msrs(&mut msrs)
        .map_err(KvmError::ioctl("get MSRs"))?;
    if read != msr_indices.len() {
        return Err(KvmError::MsrsIncomplete {
            read,
            wanted: msr_indices.len(),
        });
    }
    Ok(VcpuState {
        id,
        cpuid: cpuid.as_slice().to_vec(),
        mp_state: vcpu
            .get_mp_state()
            .map_err(KvmError::ioctl("get MP state"))?,
        regs: vcpu.get_regs().map_err(KvmError::ioctl("get regs"))?,
        sregs: vcpu.get_sregs().map_err(KvmError::ioctl("get sregs"))?,
        xsave: vcpu.get_xsave().map_err(KvmError::ioctl("get XSAVE"))?,
        xcrs: vcpu.get_xcrs().map_err(KvmError::ioctl("get XCRs"))?,
        debug_regs: vcpu
            .get_debug_regs()
            .map_err(KvmError::ioctl("get debug registers"))?,
        lapic: vcpu.get_lapic().map_err(KvmError::ioctl("get LAPIC"))?,
        msrs: msrs.as_slice().to_vec(),
        events: vcpu
            .get_vcpu_events()
            .map_err(KvmError::ioctl("get vCPU events"))?,
        tsc_khz: vcpu.get_tsc_khz().unwrap_or(0),
    })
}

/// Loads `state` into a freshly created vCPU.
///
/// The order follows the kernel's dependencies: CPUID before anything that checks features,
/// special registers before XSAVE (CR4.OSXSAVE), LAPIC before MSRs (the TSC deadline MSR
/// needs the LAPIC mode), and pending events last so nothing set later discards them.
fn restore_vcpu(vcpu: &VcpuFd, state: &VcpuState) -> Result<(), KvmError> {
    let cpuid = CpuId::from_entries(&state.cpuid)
        .map_err(|_| KvmError::BadState("CPUID table too large"))?;
    vcpu.set_cpuid2(&cpuid)
        .map_err(KvmError::ioctl("set CPUID"))?;
    if state.tsc_khz != 0 {
        if let Ok(current) = vcpu.get_tsc_khz() {
            if current != state.tsc_khz {
                vcpu.set_tsc_khz(state.tsc_khz)
                    .map_err(KvmError::ioctl("set TSC frequency"))?;
            }
        }
    }
    vcpu.set_mp_state(state.mp_state)
        .map_err(KvmError::ioctl("set MP state"))?;
    vcpu.set_regs(&state.regs)
        .map_err(KvmError::ioctl("set regs"))?;
    vcpu.set_sregs(&state.sregs)
        .map_err(KvmError::ioctl("set sregs"))?;
    // SAFETY: `state.xsave` is a plain `kvm_xsave` of the legacy size, which KVM_SET_XSAVE reads
    // in full; no extended area beyond the struct is claimed.
    unsafe { vcpu.set_xsave(&state.xsave) }.map_err(KvmError::ioctl("set XSAVE"))?;
    vcpu.set_xcrs(&state.xcrs)
        .map_err(KvmError::ioctl("set XCRs"))?;
    vcpu.set_debug_regs(&state.debug_regs)
        .map_err(KvmError::ioctl("set debug registers"))?;
    vcpu.set_lapic(&state.lapic)
        .map_err(KvmError::ioctl("set LAPIC"))?;
    let msrs =
        Msrs::from_entries(&state.msrs).map_err(|_| KvmError::TooManyMsrs(state.msrs.len()))?;
    let written = vcpu.set_msrs(&msrs).map_err(KvmError::ioctl("set MSRs"))?;
    if written != state.msrs.len() {
        let index = state.msrs.get(written).map_or(0, |m| m.index);
        return Err(KvmError::MsrRejected(index));
    }
    vcpu.set_vcpu_events(&state.events)
        .map_err(KvmError::ioctl("set vCPU events"))
}

/// Reads the VM-wide state (irqchip, PIT, clock) of a stopped VM.
fn save_vm(vm: &VmFd) -> Result<VmState, KvmError> {
    let mut irqchips = Vec::with_capacity(3);
    for chip_id in [
        KVM_IRQCHIP_PIC_MASTER,
        KVM_IRQCHIP_PIC_SLAVE,
        KVM_IRQCHIP_IOAPIC,
    ] {
        let mut chip = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        vm.get_irqchip(&mut chip)
            .map_err(KvmError::ioctl("get irqchip"))?;
        irqchips.push(chip);
    }
    Ok(VmState {
        irqchips,
        pit: vm.get_pit2().map_err(KvmError::ioctl("get PIT"))?,
        clock: vm.get_clock().map_err(KvmError::ioctl("get clock"))?,
    })
}

/// Loads VM-wide state into a new VM (before its vCPUs run).
pub(crate) fn restore_vm(vm: &VmFd, state: &VmState) -> Result<(), KvmError> {
    for chip in &state.irqchips {
        if chip.chip_id > KVM_IRQCHIP_IOAPIC {
            return Err(KvmError::BadState("unknown irqchip id"));
        }
        vm.set_irqchip(chip)
            .map_err(KvmError::ioctl("set irqchip"))?;
    }
    vm.set_pit2(&state.pit)
        .map_err(KvmError::ioctl("set PIT"))?;
    // Only the clock value is restored; the flags describe how it was read.
    let clock = kvm_clock_data {
        clock: state.clock.clock,
        ..Default::default()
    };
    vm.set_clock(&clock).map_err(KvmError::ioctl("set clock"))
}

impl Persist for KvmVcpu {
    type State = VcpuState;
    /// The vCPU freshly created and configured, to load the state into.
    type Args<'a> = KvmVcpu;
    type Error = KvmError;

    fn save(&self) -> Result<VcpuState, KvmError> {
        save_vcpu(self.id, &self.fd, &self.msrs)
    }

    fn restore(vcpu: KvmVcpu, state: &VcpuState) -> Result<KvmVcpu, KvmError> {
        if state.id != vcpu.id {
            return Err(KvmError::BadState("vCPU states out of order"));
        }
        restore_vcpu(&vcpu.fd, state)?;
        Ok(vcpu)
    }
}

impl Persist for KvmVm {
    type State = VmState;
    /// The guest memory the new VM registers.
    type Args<'a> = &'a GuestMemoryMmap;
    type Error = KvmError;

    fn save(&self) -> Result<VmState, KvmError> {
        save_vm(&self.fd)
    }

    /// A new VM on `memory` with the saved irqchip, PIT and clock, before any vCPU exists.
    fn restore(memory: &GuestMemoryMmap, state: &VmState) -> Result<KvmVm, KvmError> {
        let vm = KvmVm::new(memory)?;
        restore_vm(&vm.fd, state)?;
        Ok(vm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The batched probe keeps exactly the MSRs that can be read one at a time.
    #[test]
    fn batched_probe_keeps_what_reads_alone() {
        let kvm = Kvm::new().expect("open /dev/kvm");
        let vm = kvm.create_vm().expect("create VM");
        let vcpu = vm.create_vcpu(0).expect("create vCPU");
        let list = kvm.get_msr_index_list().expect("MSR index list");
        let alone: Vec<u32> = list
            .as_slice()
            .iter()
            .copied()
            .filter(|index| !SKIPPED_MSRS.contains(index))
            .filter(|&index| {
                let mut one = Msrs::from_entries(&[kvm_msr_entry {
                    index,
                    ..Default::default()
                }])
                .expect("one MSR fits");
                matches!(vcpu.get_msrs(&mut one), Ok(1))
            })
            .collect();
        assert!(!alone.is_empty());
        assert_eq!(probe_savable_msrs(&kvm, &vcpu).expect("probe"), alone);
    }
}
