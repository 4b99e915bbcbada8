//! `fault [kind=ud|pf|gp|priv|de|bp]`: raises one exception in ring 3 on purpose, so that VMM
//! tests can check that a guest exception is reported clearly and ends the VM with status 3.
//!
//! The report comes from the ring-0 handler (trap.rs), e.g.
//! `cowvm-guest: exception #UD (vector 6) at rip=0x101234 err=0x0 cr2=0x0 ring=3`.
//! Should the instruction not fault, the workload prints
//! `fault: kind=<kind> raised no exception` and exits 1.

use core::arch::asm;
use core::fmt::Write;

use crate::cmdline::{CmdlineError, Options};
use crate::console::{Console, Status, exit};

/// The first address above the 16 GiB identity map (boot.rs): not mapped, so a read is #PF.
const UNMAPPED_ADDR: u64 = 16 << 30;
/// Non-canonical with 4-level and 5-level paging alike (bit 63 ≠ bits 62..47/56), so an access
/// is #GP(0) before any page walk, on every CPU and hypervisor.
const NON_CANONICAL_ADDR: u64 = 0x8000_0000_0000_0000;

pub fn run<'a>(console: &mut Console, options: Options<'a>) -> Result<(), CmdlineError<'a>> {
    let mut kind = "ud";
    for option in options {
        let (key, value) = option?;
        match key {
            "kind" => match value {
                "ud" | "pf" | "gp" | "priv" | "de" | "bp" => kind = value,
                _ => {
                    return Err(CmdlineError::BadValue {
                        key,
                        value,
                        expected: "ud, pf, gp, priv, de or bp",
                    });
                }
            },
            _ => {
                return Err(CmdlineError::UnknownOption {
                    workload: "fault",
                    key,
                });
            }
        }
    }
    // Whatever is buffered must leave before the exception: the handler writes directly.
    let _ = writeln!(console, "fault kind={kind}");
    raise(kind);
    let _ = writeln!(console, "fault: kind={kind} raised no exception");
    exit(Status::Failed)
}

fn raise(kind: &str) {
    match kind {
        // SAFETY: ud2 raises #UD and does nothing else; the handler never returns from it.
        "ud" => unsafe { asm!("ud2", options(nomem, nostack)) },
        // SAFETY: the read faults (#PF, not present) and the handler ends the VM; were it
        // to succeed, it would only load a register.
        "pf" => unsafe {
            asm!("mov {0}, qword ptr [{0}]", inout(reg) UNMAPPED_ADDR => _,
                options(readonly, nostack))
        },
        // SAFETY: as above, with #GP(0) for the non-canonical address.
        "gp" => unsafe {
            asm!("mov {0}, qword ptr [{0}]", inout(reg) NON_CANONICAL_ADDR => _,
                options(readonly, nostack))
        },
        // SAFETY: hlt at CPL 3 is #GP(0) (IOPL does not matter); were it to run, it would only
        // wait for an interrupt, and IF is clear.
        "priv" => unsafe { asm!("hlt", options(nomem, nostack)) },
        // SAFETY: `div` by a zero register raises #DE; it touches only RAX and RDX.
        "de" => unsafe {
            asm!("xor ecx, ecx", "div rcx", inout("rax") 1u64 => _, inout("rdx") 0u64 => _,
                out("rcx") _, options(nomem, nostack))
        },
        // SAFETY: int3 raises #BP on hardware virtualization (#UD on PVM, where `int N` from
        // ring 3 is not delivered as such); either way the handler reports it and ends the VM.
        "bp" => unsafe { asm!("int3", options(nomem, nostack)) },
        _ => {}
    }
}
