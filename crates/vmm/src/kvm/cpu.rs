//! x86 vCPU set-up: CPUID, LAPIC local interrupts, boot MSRs and the registers at the entry
//! point of each boot protocol.

use kvm_bindings::{
    kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, CpuId, Msrs,
    KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd};

use super::KvmError;

/// Where and how a vCPU starts executing guest code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootEntry {
    /// PVH: 32-bit protected mode, paging off, EBX = physical address of `hvm_start_info`.
    Pvh {
        /// 32-bit entry point from `XEN_ELFNOTE_PHYS32_ENTRY`.
        entry: u64,
        /// Guest-physical address of `hvm_start_info`.
        start_info: u64,
    },
    /// Linux 64-bit boot protocol: long mode with identity paging, RSI = `boot_params`.
    Linux64 {
        /// 64-bit entry point.
        entry: u64,
        /// Guest-physical address of `boot_params` (the zero page).
        boot_params: u64,
        /// Guest-physical address of the PML4 the loader built.
        pml4: u64,
        /// Guest-physical address of the GDT the loader built.
        gdt: u64,
    },
}

const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// MTRRs enabled, default memory type write-back.
const MTRR_DEF_TYPE_ENABLED_WB: u64 = (1 << 11) | 6;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// The CPUID table KVM supports on this host, read once and specialised per vCPU.
pub(crate) fn supported_cpuid(kvm: &Kvm) -> Result<CpuId, KvmError> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(KvmError::ioctl("get supported CPUID"))
}

/// Specialises the host CPUID for vCPU `id` of `count`: APIC ids and topology.
pub(crate) fn vcpu_cpuid(base: &CpuId, id: u8, count: u8) -> CpuId {
    let mut cpuid = base.clone();
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => {
                // EBX[31:24] initial APIC id, EBX[23:16] logical processors per package.
                entry.ebx =
                    (entry.ebx & 0x0000_ffff) | (u32::from(id) << 24) | (u32::from(count) << 16);
                // ECX[31]: running under a hypervisor.
                entry.ecx |= 1 << 31;
                if count > 1 {
                    entry.edx |= 1 << 28;
                }
            }
            0xb | 0x1f => {
                // x2APIC id of this logical processor.
                entry.edx = u32::from(id);
            }
            _ => {}
        }
    }
    cpuid
}

/// Sets CPUID, MSRs, FPU and LAPIC of a freshly created vCPU.
pub(crate) fn configure_vcpu(vcpu: &VcpuFd, cpuid: &CpuId) -> Result<(), KvmError> {
    vcpu.set_cpuid2(cpuid)
        .map_err(KvmError::ioctl("set CPUID"))?;

    let msrs = Msrs::from_entries(&[
        kvm_msr_entry {
            index: MSR_IA32_MISC_ENABLE,
            data: MSR_IA32_MISC_ENABLE_FAST_STRING,
            ..Default::default()
        },
        kvm_msr_entry {
            index: MSR_MTRR_DEF_TYPE,
            data: MTRR_DEF_TYPE_ENABLED_WB,
            ..Default::default()
        },
    ])
    .expect("two MSR entries fit the FAM wrapper");
    vcpu.set_msrs(&msrs).map_err(KvmError::ioctl("set MSRs"))?;

    // x87 control word 0x37f and MXCSR 0x1f80: the values a CPU has after FNINIT / reset.
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(KvmError::ioctl("set FPU"))?;

    // LINT0 delivers the legacy PIC (ExtINT) and LINT1 NMIs, as firmware leaves them.
    let mut lapic = vcpu.get_lapic().map_err(KvmError::ioctl("get LAPIC"))?;
    set_lvt_mode(&mut lapic, APIC_LVT0, APIC_MODE_EXTINT);
    set_lvt_mode(&mut lapic, APIC_LVT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic).map_err(KvmError::ioctl("set LAPIC"))
}

fn set_lvt_mode(lapic: &mut kvm_lapic_state, reg: usize, mode: u32) {
    let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[reg + i] as u8);
    let value = u32::from_le_bytes(bytes);
    // Delivery mode is bits 8..=10.
    let value = (value & !0x700) | (mode << 8);
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        lapic.regs[reg + i] = *b as _;
    }
}

fn flat_segment(selector: u16, type_: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Loads flat code (64-bit if `long`) and data segments, and a task register at `tr_selector`.
fn set_flat_segments(sregs: &mut kvm_sregs, long: bool, tr_selector: u16) {
    // Code type 0xb: execute/read, accessed. Data type 0x3: read/write, accessed.
    let data = flat_segment(0x18, 0x3, false);
    sregs.cs = flat_segment(0x10, 0xb, long);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        limit: 0x67,
        type_: 0xb,
        present: 1,
        selector: tr_selector,
        ..Default::default()
    };
}

/// Sets the registers of the boot vCPU at the entry point of `entry`.
pub fn set_boot_registers(vcpu: &VcpuFd, entry: BootEntry) -> Result<(), KvmError> {
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(KvmError::ioctl("get sregs"))?;
    let mut regs = kvm_regs {
        rflags: 0x2,
        ..Default::default()
    };
    match entry {
        BootEntry::Pvh { entry, start_info } => {
            set_flat_segments(&mut sregs, false, 0);
            // CR0.PE | CR0.ET: protected mode, paging off, as the PVH ABI specifies.
            sregs.cr0 = 0x11;
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rip = entry;
            regs.rbx = start_info;
        }
        BootEntry::Linux64 {
            entry,
            boot_params,
            pml4,
            gdt,
        } => {
            sregs.gdt.base = gdt;
            sregs.gdt.limit = 5 * 8 - 1;
            set_flat_segments(&mut sregs, true, 0x20);
            // CR0.PE | CR0.ET | CR0.PG, CR4.PAE, EFER.LME | EFER.LMA: long mode.
            sregs.cr0 = 0x8000_0011;
            sregs.cr3 = pml4;
            sregs.cr4 = 1 << 5;
            sregs.efer = (1 << 8) | (1 << 10);
            regs.rip = entry;
            regs.rsi = boot_params;
        }
    }
    vcpu.set_sregs(&sregs)
        .map_err(KvmError::ioctl("set sregs"))?;
    vcpu.set_regs(&regs).map_err(KvmError::ioctl("set regs"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lvt_mode_only_changes_delivery_bits() {
        let mut lapic = kvm_lapic_state::default();
        lapic.regs[APIC_LVT0] = 0x30;
        lapic.regs[APIC_LVT0 + 2] = 0x01;
        set_lvt_mode(&mut lapic, APIC_LVT0, APIC_MODE_EXTINT);
        assert_eq!(lapic.regs[APIC_LVT0] as u8, 0x30);
        assert_eq!(lapic.regs[APIC_LVT0 + 1] as u8, 0x07);
        assert_eq!(lapic.regs[APIC_LVT0 + 2] as u8, 0x01);
    }
}
