//! PVH entry: 32-bit protected mode → long mode → ring 3.
//!
//! On a PVM host every ring-0 instruction is emulated (~0.5 µs each), so everything that can be
//! is built at compile time: the identity page tables, the GDT, the IDT and the TSS. The ring-0
//! path from the PVH entry to `iretq` into the ring-3 workload is about 25 instructions.

use core::arch::global_asm;
use core::mem::size_of;

use crate::console::Status;
use crate::trap::{TRAP_STUB_SIZE, TRAP_VECTORS};

/// `struct hvm_start_info.magic` (xen/include/public/arch-x86/hvm/start_info.h).
const START_INFO_MAGIC: u32 = 0x336e_c578;
/// XEN_ELFNOTE_PHYS32_ENTRY: the note whose descriptor is the 32-bit physical entry point.
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// Where link.ld places the TSS and the exception stubs (it asserts both).
const TSS_ADDR: u64 = 0x10_0000;
const TRAP_STUBS_ADDR: u64 = 0x10_0080;
/// Size of a 64-bit TSS, which has no I/O permission bitmap here: the I/O map base points at
/// its end, so ring-3 port I/O depends on IOPL alone.
const TSS_SIZE: u64 = 104;

const KERNEL_CS: u16 = 0x08;
const USER_DS: u16 = 0x18 | 3;
const USER_CS: u16 = 0x20 | 3;
const TSS_SELECTOR: u16 = 0x28;

/// Ring 3 starts with IOPL 3 (port I/O allowed where the CPU honours it), IF clear, bit 1 set.
const USER_RFLAGS: u64 = 0x3002;
/// CR0: PE | MP | ET | NE | PG, and EM clear, so that ring 3 may use x87/SSE.
const CR0_LONG: u32 = 0x8000_0033;
/// CR4: PAE | OSFXSR | OSXMMEXCPT. No SMEP/SMAP: ring-0 code runs from, and reads, user pages.
const CR4_LONG: u32 = 0x0000_0620;
const MSR_EFER: u32 = 0xc000_0080;
const EFER_LME: u32 = 0x100;

/// Amount of physical address space identity-mapped with 2 MiB pages: RAM and MMIO holes alike.
const IDENTITY_GIB: usize = 16;
/// Present | Writable | User | Accessed. Accessed (and Dirty, for leaves) are set in advance so
/// that the CPU never has to write back to the tables.
const TABLE_FLAGS: u64 = 0x27;
/// Leaves add Dirty and PS (a 2 MiB page).
const LEAF_2M_FLAGS: u64 = TABLE_FLAGS | 0x40 | 0x80;

const RING0_STACK_SIZE: usize = 16 * 1024;
const IST1_STACK_SIZE: usize = 4 * 1024;
const USER_STACK_SIZE: usize = 64 * 1024;

#[repr(C, align(4096))]
struct PageTable([u64; 512]);

/// The page directories of the identity map, one per GiB; the PML4 and the PDPT that point to
/// them are emitted by the assembler below because they hold link-time addresses.
#[unsafe(link_section = ".data.page_tables")]
static IDENTITY_PDS: [PageTable; IDENTITY_GIB] = identity_page_directories();

const fn identity_page_directories() -> [PageTable; IDENTITY_GIB] {
    let mut pds = [const { PageTable([0; 512]) }; IDENTITY_GIB];
    let mut index = 0;
    while index < IDENTITY_GIB * 512 {
        pds[index / 512].0[index % 512] = ((index as u64) << 21) | LEAF_2M_FLAGS;
        index += 1;
    }
    pds
}

#[repr(C, align(16))]
struct Gdt([u64; 7]);

/// Null, ring-0 code, ring-0 data, ring-3 data, ring-3 code, TSS (two slots): the order
/// `sysret` expects, should a later guest want it. Descriptors have their Accessed bit preset.
/// `ltr` marks the TSS descriptor busy, a CPU write to this table, hence `.data`.
#[unsafe(link_section = ".data.gdt")]
static GDT: Gdt = Gdt([
    0,
    0x00af_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
    0x00cf_f300_0000_ffff,
    0x00af_fb00_0000_ffff,
    tss_descriptor_low(TSS_ADDR, TSS_SIZE - 1),
    TSS_ADDR >> 32,
]);

const fn tss_descriptor_low(base: u64, limit: u64) -> u64 {
    (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (0x89 << 40)
        | (((limit >> 16) & 0xf) << 48)
        | (((base >> 24) & 0xff) << 56)
}

const BREAKPOINT_VECTOR: usize = 3;

#[repr(C, align(16))]
struct Idt([[u64; 2]; TRAP_VECTORS]);

static IDT: Idt = Idt(interrupt_gates());

/// One ring-0 interrupt gate per exception, to the 16-byte stub at `TRAP_STUBS_ADDR + 16 × v`.
/// NMI, #DF and #MC switch to the IST1 stack, so they work even on a broken ring-0 stack.
/// The #BP gate has DPL 3, so that `int3` in ring 3 arrives as #BP rather than #GP (the
/// handler reports it like any other exception).
const fn interrupt_gates() -> [[u64; 2]; TRAP_VECTORS] {
    let mut gates = [[0; 2]; TRAP_VECTORS];
    let mut vector = 0;
    while vector < TRAP_VECTORS {
        let handler = TRAP_STUBS_ADDR + (vector * TRAP_STUB_SIZE) as u64;
        let ist: u64 = match vector {
            2 | 8 | 18 => 1,
            _ => 0,
        };
        // Present, interrupt gate, DPL 0 (0x8e) or DPL 3 (0xee).
        let kind: u64 = if vector == BREAKPOINT_VECTOR {
            0xee
        } else {
            0x8e
        };
        gates[vector][0] = (handler & 0xffff)
            | ((KERNEL_CS as u64) << 16)
            | (ist << 32)
            | (kind << 40)
            | (((handler >> 16) & 0xffff) << 48);
        gates[vector][1] = handler >> 32;
        vector += 1;
    }
    gates
}

// The entry point, in the order the CPU needs it: check the start-info magic (EBX); load the GDT
// (the loader's CS stays cached until the far jump); PAE and the SSE enables in CR4; CR3; EFER.LME;
// CR0.PG turns long mode on (in compatibility mode until the far jump into the 64-bit code
// segment). Then load the TSS and the IDT and `iretq` into ring 3 at `guest_main(start_info,
// image_end)`, with RSP ≡ 8 (mod 16) as if `guest_main` had been called. The data segment
// registers are never loaded: long mode ignores them, and `iretq` to ring 3 nulls them.
global_asm!(
    r#"
    .section .text.boot32, "ax"
    .code32
    .global cowvm_pvh_entry
cowvm_pvh_entry:
    cmpl ${magic}, (%ebx)
    jne 2f
    lgdt cowvm_gdt_pointer
    movl ${cr4}, %eax
    movl %eax, %cr4
    movl $cowvm_pml4, %eax
    movl %eax, %cr3
    movl ${efer}, %ecx
    movl ${efer_lme}, %eax
    xorl %edx, %edx
    wrmsr
    movl ${cr0}, %eax
    movl %eax, %cr0
    ljmp ${kernel_cs}, $1f

2:  movl $cowvm_bad_magic, %esi
    movl $cowvm_bad_magic_end - cowvm_bad_magic, %ecx
    movw $0x3f8, %dx
    rep outsb
    movw $0xf4, %dx
    movl ${fault}, %eax
    outl %eax, %dx
3:  hlt
    jmp 3b

    .code64
1:  movl %ebx, %edi
    movl $__cowvm_image_end, %esi
    movl $cowvm_ring0_stack_top, %esp
    movw ${tss_selector}, %ax
    ltr %ax
    lidt cowvm_idt_pointer(%rip)
    pushq ${user_ds}
    pushq $cowvm_user_stack_top - 8
    pushq ${user_rflags}
    pushq ${user_cs}
    pushq ${guest_main}
    iretq

    .section .note.Xen, "a", @note
    .balign 4
    .long 4
    .long 4
    .long {phys32_entry_note}
    .asciz "Xen"
    .balign 4
    .long cowvm_pvh_entry
    .balign 4

    .section .rodata.boot, "a"
cowvm_bad_magic:
    .ascii "cowvm-guest: bad boot: EBX does not point to an hvm_start_info\n"
cowvm_bad_magic_end:
    .balign 8
cowvm_gdt_pointer:
    .word {gdt_size} - 1
    .quad {gdt}
    .balign 8
cowvm_idt_pointer:
    .word {idt_size} - 1
    .quad {idt}

    .section .data.page_tables, "aw"
    .balign 4096
cowvm_pml4:
    .quad cowvm_pdpt + {table_flags}
    .fill 511, 8, 0
cowvm_pdpt:
    .set cowvm_gib, 0
    .rept {identity_gib}
    .quad {pds} + cowvm_gib * 4096 + {table_flags}
    .set cowvm_gib, cowvm_gib + 1
    .endr
    .fill 512 - {identity_gib}, 8, 0

    .section .fixed.tss, "a"
    .global cowvm_tss
cowvm_tss:
    .long 0
    .quad cowvm_ring0_stack_top
    .quad 0, 0, 0
    .quad cowvm_ist1_stack_top
    .quad 0, 0, 0, 0, 0, 0, 0
    .word 0
    .word {tss_size}

    .section .bss.stacks, "aw", @nobits
    .balign 16
    .skip {ring0_stack_size}
cowvm_ring0_stack_top:
    .skip {ist1_stack_size}
cowvm_ist1_stack_top:
    .skip {user_stack_size}
cowvm_user_stack_top:

    .text
"#,
    magic = const START_INFO_MAGIC,
    cr4 = const CR4_LONG,
    efer = const MSR_EFER,
    efer_lme = const EFER_LME,
    cr0 = const CR0_LONG,
    kernel_cs = const KERNEL_CS,
    fault = const Status::Fault as u32,
    tss_selector = const TSS_SELECTOR,
    user_ds = const USER_DS,
    user_rflags = const USER_RFLAGS,
    user_cs = const USER_CS,
    guest_main = sym crate::guest_main,
    phys32_entry_note = const XEN_ELFNOTE_PHYS32_ENTRY,
    gdt_size = const size_of::<Gdt>(),
    gdt = sym GDT,
    idt_size = const size_of::<Idt>(),
    idt = sym IDT,
    table_flags = const TABLE_FLAGS,
    identity_gib = const IDENTITY_GIB,
    pds = sym IDENTITY_PDS,
    tss_size = const TSS_SIZE,
    ring0_stack_size = const RING0_STACK_SIZE,
    ist1_stack_size = const IST1_STACK_SIZE,
    user_stack_size = const USER_STACK_SIZE,
    options(att_syntax)
);
