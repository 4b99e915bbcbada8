//! Ring-0 exception handling: emulate ring-3 port I/O that raised #GP, report anything else.
//!
//! On a PVM host IOPL 3 is ignored, so every `in`/`out` of the ring-3 workloads ends up here as
//! #GP (error code 0). The handler performs the access in ring 0 and steps over the instruction.
//! On a hardware-virtualization host the same instructions never trap. Everything here runs
//! emulated on PVM, so the decoder is a table of the few forms the guest itself emits.

use core::arch::{asm, global_asm};
use core::fmt::Write;

use crate::console::{Console, Status, signal_exit};

/// Exceptions 0–31 each have a stub; the guest uses no interrupts.
pub const TRAP_VECTORS: usize = 32;
/// Each stub is padded to 16 bytes so that boot.rs can compute its address.
pub const TRAP_STUB_SIZE: usize = 16;
/// Vectors for which the CPU pushes an error code: #DF, #TS, #NP, #SS, #GP, #PF, #AC, #CP, #VC,
/// #SX. The stubs of all other vectors push a zero in its place.
const ERROR_CODE_VECTORS: u32 = error_code_mask(&[8, 10, 11, 12, 13, 14, 17, 21, 29, 30]);

const GENERAL_PROTECTION: u64 = 13;
const RFLAGS_DF: u64 = 1 << 10;

const EXCEPTION_NAMES: [&str; TRAP_VECTORS] = [
    "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "#CSO", "#TS", "#NP", "#SS",
    "#GP", "#PF", "reserved", "#MF", "#AC", "#MC", "#XM", "#VE", "#CP", "reserved", "reserved",
    "reserved", "reserved", "reserved", "reserved", "#HV", "#VC", "#SX", "reserved",
];

const fn error_code_mask(vectors: &[u32]) -> u32 {
    let mut mask = 0;
    let mut index = 0;
    while index < vectors.len() {
        mask |= 1 << vectors[index];
        index += 1;
    }
    mask
}

/// What `cowvm_trap_common` leaves on the ring-0 stack: all 15 general registers it pushed
/// (named here only where the handler uses them), the vector and error code from the stub, then
/// the CPU's interrupt frame. It is 176 bytes, so the `call` into Rust happens with the 16-byte
/// stack alignment the ABI expects (the CPU aligns RSP before pushing the interrupt frame).
#[repr(C)]
struct TrapFrame {
    _r15_to_rdi: [u64; 10],
    rsi: u64,
    rdx: u64,
    rcx: u64,
    _rbx: u64,
    rax: u64,
    vector: u64,
    error: u64,
    rip: u64,
    cs: u64,
    rflags: u64,
    _rsp: u64,
    _ss: u64,
}

global_asm!(
    r#"
    .section .fixed.trap_stubs, "ax"
    .global cowvm_trap_stubs
    .balign 16
cowvm_trap_stubs:
    .set cowvm_vector, 0
    .rept {vectors}
    .balign {stub_size}
    .if (({error_code_vectors} >> cowvm_vector) & 1) == 0
    pushq $0
    .endif
    pushq $cowvm_vector
    jmp cowvm_trap_common
    .set cowvm_vector, cowvm_vector + 1
    .endr

    .text
cowvm_trap_common:
    pushq %rax
    pushq %rbx
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %rbp
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, %rdi
    call {handler}
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rbp
    popq %rdi
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rbx
    popq %rax
    addq $16, %rsp
    iretq
"#,
    vectors = const TRAP_VECTORS,
    stub_size = const TRAP_STUB_SIZE,
    error_code_vectors = const ERROR_CODE_VECTORS,
    handler = sym handle_trap,
    options(att_syntax)
);

/// Called by `cowvm_trap_common` in ring 0 with the saved state, which it may modify.
extern "C" fn handle_trap(frame: &mut TrapFrame) {
    let from_user = frame.cs & 3 == 3;
    if frame.vector == GENERAL_PROTECTION && frame.error == 0 && from_user {
        // SAFETY: the CPU saved RIP of the ring-3 instruction that faulted; all guest code is in
        // the identity-mapped image, so its (at most 3) bytes are readable.
        let code = unsafe { (frame.rip as *const [u8; 3]).read_unaligned() };
        if let Some((access, length)) = decode_port_io(code, frame.rdx as u16)
            && perform(access, frame)
        {
            frame.rip += length;
            return;
        }
    }
    report_and_exit(frame)
}

#[derive(Clone, Copy)]
enum Width {
    Byte,
    Word,
    Dword,
}

#[derive(Clone, Copy)]
enum PortAccess {
    Out(Width, u16),
    In(Width, u16),
    /// `outsb`, with or without `rep`: bytes from [RSI] to port DX.
    Outsb {
        rep: bool,
        port: u16,
    },
}

/// Decodes the port-I/O forms the guest uses; returns the access and the instruction length.
fn decode_port_io(code: [u8; 3], dx: u16) -> Option<(PortAccess, u64)> {
    let (prefix, opcode, imm) = match code[0] {
        0x66 | 0xf3 => (Some(code[0]), code[1], code[2]),
        _ => (None, code[0], code[1]),
    };
    let wide = if prefix == Some(0x66) {
        Width::Word
    } else {
        Width::Dword
    };
    let imm_port = u16::from(imm);
    let access = match (prefix, opcode) {
        (None, 0xee) => PortAccess::Out(Width::Byte, dx),
        (None | Some(0x66), 0xef) => PortAccess::Out(wide, dx),
        (None, 0xe6) => PortAccess::Out(Width::Byte, imm_port),
        (None | Some(0x66), 0xe7) => PortAccess::Out(wide, imm_port),
        (None, 0xec) => PortAccess::In(Width::Byte, dx),
        (None | Some(0x66), 0xed) => PortAccess::In(wide, dx),
        (None, 0xe4) => PortAccess::In(Width::Byte, imm_port),
        (None | Some(0x66), 0xe5) => PortAccess::In(wide, imm_port),
        (None, 0x6e) => PortAccess::Outsb {
            rep: false,
            port: dx,
        },
        (Some(0xf3), 0x6e) => PortAccess::Outsb {
            rep: true,
            port: dx,
        },
        _ => return None,
    };
    let length = 1 + u64::from(prefix.is_some()) + u64::from(matches!(opcode, 0xe4..=0xe7));
    Some((access, length))
}

/// Performs `access` on behalf of ring 3 and updates the saved registers as the instruction
/// would have. Returns false for a string access with DF set, which the guest never emits.
fn perform(access: PortAccess, frame: &mut TrapFrame) -> bool {
    match access {
        PortAccess::Out(width, port) => port_out(width, port, frame.rax as u32),
        PortAccess::In(width, port) => {
            let value = u64::from(port_in(width, port));
            frame.rax = match width {
                Width::Byte => (frame.rax & !0xff) | value,
                Width::Word => (frame.rax & !0xffff) | value,
                Width::Dword => value,
            };
        }
        PortAccess::Outsb { rep, port } => {
            if frame.rflags & RFLAGS_DF != 0 {
                return false;
            }
            let count = if rep { frame.rcx } else { 1 };
            // SAFETY: ring 3 asked to send these bytes; all memory is identity-mapped, so the
            // range [RSI, RSI + count) is readable here at the same addresses.
            unsafe {
                asm!(
                    "rep outsb",
                    inout("rsi") frame.rsi => _,
                    inout("rcx") count => _,
                    in("dx") port,
                    options(nostack, readonly, preserves_flags),
                );
            }
            frame.rsi += count;
            if rep {
                frame.rcx = 0;
            }
        }
    }
    true
}

fn port_out(width: Width, port: u16, value: u32) {
    // SAFETY: port output has no effect on memory; the guest's own ring-3 code chose the port.
    unsafe {
        match width {
            Width::Byte => asm!("out dx, al", in("dx") port, in("al") value as u8,
                options(nomem, nostack, preserves_flags)),
            Width::Word => asm!("out dx, ax", in("dx") port, in("ax") value as u16,
                options(nomem, nostack, preserves_flags)),
            Width::Dword => asm!("out dx, eax", in("dx") port, in("eax") value,
                options(nomem, nostack, preserves_flags)),
        }
    }
}

fn port_in(width: Width, port: u16) -> u32 {
    // SAFETY: port input has no effect on memory; the guest's own ring-3 code chose the port.
    unsafe {
        match width {
            Width::Byte => {
                let value: u8;
                asm!("in al, dx", in("dx") port, out("al") value,
                    options(nomem, nostack, preserves_flags));
                u32::from(value)
            }
            Width::Word => {
                let value: u16;
                asm!("in ax, dx", in("dx") port, out("ax") value,
                    options(nomem, nostack, preserves_flags));
                u32::from(value)
            }
            Width::Dword => {
                let value: u32;
                asm!("in eax, dx", in("dx") port, out("eax") value,
                    options(nomem, nostack, preserves_flags));
                value
            }
        }
    }
}

/// Prints the fault on the serial port (directly: this is ring 0) and ends the VM with status 3.
fn report_and_exit(frame: &TrapFrame) -> ! {
    let cr2: u64;
    // SAFETY: reading CR2 has no side effects; this runs in ring 0.
    unsafe { asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack, preserves_flags)) };
    let mut console = Console::new();
    // Console::write_str never fails.
    let _ = writeln!(
        console,
        "cowvm-guest: exception {} (vector {}) at rip={:#x} err={:#x} cr2={:#x} ring={}",
        EXCEPTION_NAMES[frame.vector as usize % TRAP_VECTORS],
        frame.vector,
        frame.rip,
        frame.error,
        cr2,
        frame.cs & 3,
    );
    signal_exit(Status::Fault);
    // Without a debug-exit device the VM stays halted (IF is clear, so for good).
    loop {
        // SAFETY: hlt only stops this vCPU; this runs in ring 0.
        unsafe { asm!("hlt", options(nomem, nostack, preserves_flags)) };
    }
}
