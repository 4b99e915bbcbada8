//! The Linux x86 boot protocol against a real kernel: Debian's cloud kernel as a bzImage and as the
//! vmlinux ELF decompressed from it, fetched by `scripts/fetch-linux-kernel.sh`.
//!
//! A Linux guest cannot run on every host (PVM has no VMX/SVM), so these tests check what the
//! loader leaves in guest memory for the kernel's 64-bit entry instead: `boot_params` read at the
//! offsets of the boot protocol (Documentation/arch/x86/boot.rst, zero-page.rst), the kernel and
//! initrd bytes, the E820 map, the GDT and the identity page tables. No /dev/kvm is needed.

use std::fs;
use std::path::{Path, PathBuf};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::testing::elf_notes;
use vmm::testing::linux::{self, ZERO_PAGE_ADDR};
use vmm::testing::BootEntry;
use vmm::testing::{create_guest_memory, MMIO_HOLE_END, MMIO_HOLE_START};
use vmm::testing::{load_kernel, pvh, ram_map, BootError, BootSpec, CMDLINE_MAX, E820_RAM};
use vmm::HugePages;

const CMDLINE: &str = "console=ttyS0 earlyprintk=ttyS0 reboot=k panic=1 root=/dev/vda rw quiet";

// Offsets in `boot_params` (the zero page); the setup header sits at the same offsets in a bzImage.
const EXT_RAMDISK_IMAGE: usize = 0x0c0;
const EXT_RAMDISK_SIZE: usize = 0x0c4;
const EXT_CMD_LINE_PTR: usize = 0x0c8;
const E820_ENTRIES: usize = 0x1e8;
const SETUP_SECTS: usize = 0x1f1;
const BOOT_FLAG: usize = 0x1fe;
const HEADER: usize = 0x202;
const VERSION: usize = 0x206;
const TYPE_OF_LOADER: usize = 0x210;
const LOADFLAGS: usize = 0x211;
const CODE32_START: usize = 0x214;
const RAMDISK_IMAGE: usize = 0x218;
const RAMDISK_SIZE: usize = 0x21c;
const CMD_LINE_PTR: usize = 0x228;
const INITRD_ADDR_MAX: usize = 0x22c;
const XLOADFLAGS: usize = 0x236;
const CMDLINE_SIZE: usize = 0x238;
const PREF_ADDRESS: usize = 0x258;
const INIT_SIZE: usize = 0x260;
const E820_TABLE: usize = 0x2d0;
const E820_ENTRY_SIZE: usize = 20;

/// The selectors `vmm::testing::set_boot_registers` loads for `BootEntry::Linux64`, which the
/// boot protocol fixes as __BOOT_CS and __BOOT_DS.
const BOOT_CS: u64 = 0x10;
const BOOT_DS: u64 = 0x18;

// ---------------------------------------------------------------------------------------------
// The kernel files.

fn kernel_dir() -> PathBuf {
    match std::env::var_os("COWVM_LINUX_KERNEL_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/linux-kernel"),
    }
}

/// A file of the fetched kernel; fails the test (never skips it) when it is missing.
fn kernel_file(name: &str) -> PathBuf {
    let path = kernel_dir().join(name);
    assert!(
        path.is_file(),
        "{} is missing: run scripts/fetch-linux-kernel.sh (or set COWVM_LINUX_KERNEL_DIR to a \
         directory holding vmlinuz, vmlinux and initrd.img)",
        path.display()
    );
    path
}

fn bzimage() -> PathBuf {
    kernel_file("vmlinuz")
}

fn vmlinux() -> PathBuf {
    kernel_file("vmlinux")
}

fn initrd() -> PathBuf {
    kernel_file("initrd.img")
}

/// A scratch file for a test, named after it so parallel tests do not collide.
fn scratch(name: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("linux_boot-{name}"))
}

// ---------------------------------------------------------------------------------------------
// Little-endian fields.

fn u8_at(b: &[u8], i: usize) -> u8 {
    b[i]
}

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_le_bytes(b[i..i + 2].try_into().unwrap())
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes(b[i..i + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(b[i..i + 8].try_into().unwrap())
}

// ---------------------------------------------------------------------------------------------
// Guest memory.

fn guest_memory(size: u64) -> GuestMemoryMmap {
    create_guest_memory(size, HugePages::None).expect("guest memory")
}

fn read_guest(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    mem.read_slice(&mut buf, GuestAddress(addr))
        .unwrap_or_else(|e| panic!("read {len} bytes at {addr:#x}: {e}"));
    buf
}

fn read_u64(mem: &GuestMemoryMmap, addr: u64) -> u64 {
    mem.read_obj(GuestAddress(addr)).unwrap()
}

fn zero_page(mem: &GuestMemoryMmap) -> Vec<u8> {
    read_guest(mem, ZERO_PAGE_ADDR, 4096)
}

fn boot(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
) -> Result<BootEntry, BootError> {
    load_kernel(
        mem,
        mem_size,
        &BootSpec {
            kernel,
            initrd,
            cmdline,
        },
    )
}

/// The fields of a `BootEntry::Linux64`, or a failed test.
fn linux64(entry: BootEntry) -> (u64, u64, u64, u64) {
    match entry {
        BootEntry::Linux64 {
            entry,
            boot_params,
            pml4,
            gdt,
        } => (entry, boot_params, pml4, gdt),
        other => panic!("expected a Linux 64-bit entry, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Checks shared by the tests.

/// The boot protocol's magic numbers and what every loader must set.
fn check_magic(zp: &[u8]) {
    assert_eq!(u16_at(zp, BOOT_FLAG), 0xaa55, "boot_flag");
    assert_eq!(&zp[HEADER..HEADER + 4], b"HdrS", "header");
    assert_eq!(
        u8_at(zp, TYPE_OF_LOADER),
        0xff,
        "type_of_loader: a loader without an id"
    );
}

/// The command line is in guest memory, NUL-terminated, where `cmd_line_ptr` says.
fn check_cmdline(mem: &GuestMemoryMmap, zp: &[u8], cmdline: &str) {
    let ptr = u64::from(u32_at(zp, CMD_LINE_PTR));
    assert_ne!(ptr, 0, "cmd_line_ptr");
    assert_eq!(
        u32_at(zp, EXT_CMD_LINE_PTR),
        0,
        "ext_cmd_line_ptr: the command line lies below 4 GiB"
    );
    let mut expected = cmdline.as_bytes().to_vec();
    expected.push(0);
    assert_eq!(
        read_guest(mem, ptr, expected.len()),
        expected,
        "command line at {ptr:#x}"
    );
    assert!(
        ptr + expected.len() as u64 <= 0xa_0000,
        "the command line stays in low memory"
    );
}

/// The E820 table lists exactly `ram_map(mem_size)` as RAM.
fn check_e820(zp: &[u8], mem_size: u64) {
    let map = ram_map(mem_size);
    assert_eq!(
        usize::from(u8_at(zp, E820_ENTRIES)),
        map.len(),
        "e820_entries"
    );
    for (i, range) in map.iter().enumerate() {
        let at = E820_TABLE + i * E820_ENTRY_SIZE;
        assert_eq!(
            (u64_at(zp, at), u64_at(zp, at + 8), u32_at(zp, at + 16)),
            (range.start, range.len, E820_RAM),
            "e820 entry {i}"
        );
    }
    // Nothing after the listed entries.
    let rest = &zp[E820_TABLE + map.len() * E820_ENTRY_SIZE..E820_TABLE + 128 * E820_ENTRY_SIZE];
    assert!(rest.iter().all(|&b| b == 0), "stale e820 entries");
}

/// The initrd is where `ramdisk_image` says, byte for byte, within the limits of the protocol and
/// of RAM below the MMIO hole, and above `not_below`. Returns its address.
fn check_initrd(
    mem: &GuestMemoryMmap,
    zp: &[u8],
    mem_size: u64,
    file: &Path,
    not_below: u64,
) -> u64 {
    let bytes = fs::read(file).unwrap();
    let (image, size) = (
        u64::from(u32_at(zp, RAMDISK_IMAGE)),
        u64::from(u32_at(zp, RAMDISK_SIZE)),
    );
    assert_eq!(
        (u32_at(zp, EXT_RAMDISK_IMAGE), u32_at(zp, EXT_RAMDISK_SIZE)),
        (0, 0),
        "ext_ramdisk_*"
    );
    assert_eq!(size, bytes.len() as u64, "ramdisk_size");
    assert_eq!(image % 4096, 0, "ramdisk_image {image:#x} is page aligned");
    assert!(image >= 1 << 20, "ramdisk_image {image:#x} is above 1 MiB");
    assert!(
        image >= not_below,
        "ramdisk_image {image:#x} is above the kernel's memory {not_below:#x}"
    );
    let end = image + size;
    let addr_max = match u32_at(zp, INITRD_ADDR_MAX) {
        0 => 0x37ff_ffff,
        m => u64::from(m),
    };
    assert!(
        end <= addr_max + 1,
        "initrd end {end:#x} above initrd_addr_max {addr_max:#x}"
    );
    assert!(
        end <= mem_size.min(MMIO_HOLE_START),
        "initrd end {end:#x} outside low RAM"
    );
    assert!(
        read_guest(mem, image, bytes.len()) == bytes,
        "the initrd in guest memory at {image:#x} differs from {}",
        file.display()
    );
    image
}

/// Walks the 4-level page tables at `pml4` and returns the physical address of `va`.
fn translate(mem: &GuestMemoryMmap, pml4: u64, va: u64) -> Option<u64> {
    const PRESENT: u64 = 1;
    const PAGE_SIZE_BIT: u64 = 1 << 7;
    const ADDR: u64 = 0x000f_ffff_ffff_f000;
    let mut table = pml4;
    for (level, shift) in [(4, 39), (3, 30), (2, 21), (1, 12)] {
        let entry = read_u64(mem, table + ((va >> shift) & 0x1ff) * 8);
        if entry & PRESENT == 0 {
            return None;
        }
        if level == 1 || (level < 4 && entry & PAGE_SIZE_BIT != 0) {
            let page = (entry & ADDR) & !((1u64 << shift) - 1);
            return Some(page | (va & ((1u64 << shift) - 1)));
        }
        table = entry & ADDR;
    }
    unreachable!()
}

/// The page tables map `[start, end)` identically (checked every 4 KiB at the ends, every 2 MiB
/// in between, which covers every 2 MiB page).
fn check_identity(mem: &GuestMemoryMmap, pml4: u64, start: u64, end: u64, what: &str) {
    let mut addrs: Vec<u64> = (start..end).step_by(2 << 20).collect();
    addrs.extend([start, end - 1, (end - 1) & !0xfff]);
    for va in addrs {
        assert_eq!(
            translate(mem, pml4, va),
            Some(va),
            "{what}: {va:#x} is not identity mapped"
        );
    }
}

/// The PML4 → PDPT → PD chain maps 2 MiB pages identically, and the GDT holds the 64-bit code and
/// the data segment at the selectors the vCPU is started with.
fn check_paging_and_gdt(mem: &GuestMemoryMmap, pml4: u64, gdt: u64) {
    let pml4e = read_u64(mem, pml4);
    assert_eq!(pml4e & 0x3, 0x3, "PML4[0] present and writable");
    let pdpt = pml4e & 0x000f_ffff_ffff_f000;
    assert_ne!(pdpt, pml4, "PML4[0] points at a PDPT");
    let pdpte = read_u64(mem, pdpt);
    assert_eq!(
        pdpte & 0x83,
        0x3,
        "PDPT[0] present, writable and a table (not a 1 GiB page)"
    );
    let pd = pdpte & 0x000f_ffff_ffff_f000;
    for i in 0..512u64 {
        let pde = read_u64(mem, pd + i * 8);
        assert_eq!(
            pde & 0x83,
            0x83,
            "PD[{i}] present, writable, 2 MiB page (PS)"
        );
        assert_eq!(
            pde & 0x000f_ffff_ffe0_0000,
            i << 21,
            "PD[{i}] maps its own address"
        );
    }
    // The tables themselves, the GDT and the zero page must not overlap.
    let mut ranges = [
        (pml4, pml4 + 4096),
        (pdpt, pdpt + 4096),
        (pd, pd + 4096),
        (gdt, gdt + 5 * 8),
        (ZERO_PAGE_ADDR, ZERO_PAGE_ADDR + 4096),
    ];
    ranges.sort_unstable();
    assert!(
        ranges.windows(2).all(|w| w[0].1 <= w[1].0),
        "boot structures overlap: {ranges:x?}"
    );

    let descriptor = |selector: u64| read_u64(mem, gdt + selector);
    let (code, data) = (descriptor(BOOT_CS), descriptor(BOOT_DS));
    assert_eq!(descriptor(0), 0, "the null descriptor");
    let bit = |d: u64, n: u32| (d >> n) & 1;
    // Access byte bits 40..48: type (40..44), S (44), DPL (45..47), P (47).
    assert_eq!(
        (code >> 40) & 0xf,
        0xb,
        "__BOOT_CS: code, execute/read, accessed"
    );
    assert_eq!(
        (bit(code, 44), bit(code, 47)),
        (1, 1),
        "__BOOT_CS: code/data segment, present"
    );
    assert_eq!((code >> 45) & 0x3, 0, "__BOOT_CS: DPL 0");
    assert_eq!(bit(code, 53), 1, "__BOOT_CS: L (64-bit code)");
    assert_eq!(bit(code, 54), 0, "__BOOT_CS: D must be clear when L is set");
    assert_eq!(
        (data >> 40) & 0xf,
        0x3,
        "__BOOT_DS: data, read/write, accessed"
    );
    assert_eq!(
        (bit(data, 44), bit(data, 47)),
        (1, 1),
        "__BOOT_DS: code/data segment, present"
    );
    assert_eq!(bit(data, 53), 0, "__BOOT_DS: not a code segment");
    // What the loader wrote is what `linux::boot_gdt` describes.
    for (i, entry) in linux::boot_gdt().iter().enumerate() {
        assert_eq!(read_u64(mem, gdt + 8 * i as u64), *entry, "GDT entry {i}");
    }
}

/// The setup header fields of the bzImage file.
struct SetupHeader {
    setup_size: usize,
    version: u16,
    code32_start: u64,
    cmdline_size: u32,
    initrd_addr_max: u32,
    pref_address: u64,
    init_size: u64,
    xloadflags: u16,
}

fn setup_header(file: &[u8]) -> SetupHeader {
    let sects = match u8_at(file, SETUP_SECTS) {
        0 => 4,
        n => usize::from(n),
    };
    SetupHeader {
        setup_size: (sects + 1) * 512,
        version: u16_at(file, VERSION),
        code32_start: u64::from(u32_at(file, CODE32_START)),
        cmdline_size: u32_at(file, CMDLINE_SIZE),
        initrd_addr_max: u32_at(file, INITRD_ADDR_MAX),
        pref_address: u64_at(file, PREF_ADDRESS),
        init_size: u64::from(u32_at(file, INIT_SIZE)),
        xloadflags: u16_at(file, XLOADFLAGS),
    }
}

/// Everything a bzImage boot must leave in memory; returns the initrd address.
fn check_bzimage_boot(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    entry: BootEntry,
    cmdline: &str,
) -> u64 {
    let file = fs::read(bzimage()).unwrap();
    let hdr = setup_header(&file);
    assert!(
        hdr.version >= 0x020c,
        "the test kernel speaks boot protocol 2.12+"
    );
    assert_eq!(hdr.xloadflags & 1, 1, "the test kernel has XLF_KERNEL_64");

    let (entry, boot_params, pml4, gdt) = linux64(entry);
    assert_eq!(
        entry,
        hdr.code32_start + 0x200,
        "the 64-bit entry is startup_64 at code32_start + 0x200"
    );
    assert_eq!(
        hdr.code32_start, 0x10_0000,
        "a default kernel is loaded at 1 MiB"
    );
    assert_eq!(boot_params, ZERO_PAGE_ADDR);

    let zp = zero_page(mem);
    check_magic(&zp);
    // The setup header is the kernel's, with the loader's fields filled in.
    assert_eq!(u16_at(&zp, VERSION), hdr.version, "version");
    assert_eq!(
        u32_at(&zp, CMDLINE_SIZE),
        hdr.cmdline_size,
        "cmdline_size is the kernel's limit"
    );
    assert_eq!(
        u32_at(&zp, INITRD_ADDR_MAX),
        hdr.initrd_addr_max,
        "initrd_addr_max"
    );
    assert_eq!(u16_at(&zp, XLOADFLAGS), hdr.xloadflags, "xloadflags");
    assert_eq!(
        u64::from(u32_at(&zp, CODE32_START)),
        hdr.code32_start,
        "code32_start"
    );
    assert_eq!(u8_at(&zp, LOADFLAGS) & 1, 1, "LOADED_HIGH");
    assert!(cmdline.len() <= hdr.cmdline_size as usize);
    check_cmdline(mem, &zp, cmdline);
    check_e820(&zp, mem_size);

    // The protected-mode kernel: everything after the setup sectors, at code32_start.
    let kernel = &file[hdr.setup_size..];
    assert!(
        read_guest(mem, hdr.code32_start, kernel.len()) == kernel,
        "the protected-mode kernel in guest memory differs from the bzImage after its {} setup bytes",
        hdr.setup_size
    );

    // Boot protocol, 64-bit: "the range with setup_header.init_size from start address of loaded
    // kernel and zero page and command line buffer get ident mapping".
    check_paging_and_gdt(mem, pml4, gdt);
    check_identity(
        mem,
        pml4,
        hdr.code32_start,
        hdr.code32_start + hdr.init_size,
        "kernel + init_size",
    );
    check_identity(
        mem,
        pml4,
        ZERO_PAGE_ADDR,
        ZERO_PAGE_ADDR + 4096,
        "zero page",
    );
    let cmd = u64::from(u32_at(&zp, CMD_LINE_PTR));
    check_identity(
        mem,
        pml4,
        cmd,
        cmd + cmdline.len() as u64 + 1,
        "command line",
    );
    check_identity(mem, pml4, gdt, gdt + 5 * 8, "GDT");

    // The kernel decompresses itself to pref_address and uses init_size bytes from there.
    let kernel_end = hdr.pref_address.max(hdr.code32_start) + hdr.init_size;
    check_initrd(mem, &zp, mem_size, &initrd(), kernel_end)
}

// ---------------------------------------------------------------------------------------------
// bzImage.

#[test]
fn bzimage_with_initrd_and_command_line_in_512m() {
    let size = 512 << 20;
    let mem = guest_memory(size);
    let entry = boot(&mem, size, &bzimage(), Some(&initrd()), CMDLINE).expect("load the bzImage");
    let initrd_addr = check_bzimage_boot(&mem, size, entry, CMDLINE);
    // Loaders put the initrd as high as they may: its end is within a page of the top of RAM.
    let initrd_len = fs::metadata(initrd()).unwrap().len();
    assert!(
        initrd_addr + initrd_len > size - 4096,
        "initrd at {initrd_addr:#x}"
    );
}

#[test]
fn bzimage_in_4g_keeps_the_initrd_below_the_mmio_hole_and_initrd_addr_max() {
    let size = 4u64 << 30;
    let mem = guest_memory(size);
    let entry = boot(&mem, size, &bzimage(), Some(&initrd()), CMDLINE).expect("load the bzImage");
    let initrd_addr = check_bzimage_boot(&mem, size, entry, CMDLINE);

    let zp = zero_page(&mem);
    assert_eq!(u8_at(&zp, E820_ENTRIES), 3, "low, 1 MiB..hole, above 4 GiB");
    let high = E820_TABLE + 2 * E820_ENTRY_SIZE;
    assert_eq!(
        u64_at(&zp, high),
        MMIO_HOLE_END,
        "the high RAM range starts at 4 GiB"
    );
    assert_eq!(
        u64_at(&zp, high + 8),
        size - MMIO_HOLE_START,
        "the high RAM range holds the rest"
    );
    let low = E820_TABLE + E820_ENTRY_SIZE;
    assert_eq!(
        u64_at(&zp, low) + u64_at(&zp, low + 8),
        MMIO_HOLE_START,
        "low RAM ends at the hole"
    );

    let initrd_end = initrd_addr + fs::metadata(initrd()).unwrap().len();
    let addr_max = u64::from(u32_at(&zp, INITRD_ADDR_MAX));
    assert!(
        initrd_end <= MMIO_HOLE_START,
        "initrd end {initrd_end:#x} in the MMIO hole"
    );
    assert!(
        initrd_end <= addr_max + 1,
        "initrd end {initrd_end:#x} above {addr_max:#x}"
    );
    // As high as initrd_addr_max allows (0x7fffffff for this kernel).
    assert!(
        initrd_end > addr_max + 1 - 4096,
        "initrd at {initrd_addr:#x} is not at the top"
    );
}

#[test]
fn bzimage_without_initrd_has_no_ramdisk() {
    let size = 256 << 20;
    let mem = guest_memory(size);
    let entry = boot(&mem, size, &bzimage(), None, "").expect("load the bzImage");
    let (entry, ..) = linux64(entry);
    assert_eq!(entry, 0x10_0200);
    let zp = zero_page(&mem);
    check_magic(&zp);
    assert_eq!(
        (u32_at(&zp, RAMDISK_IMAGE), u32_at(&zp, RAMDISK_SIZE)),
        (0, 0)
    );
    check_cmdline(&mem, &zp, "");
}

#[test]
fn the_longest_command_line_the_kernel_takes_is_passed_whole() {
    let size = 256 << 20;
    let mem = guest_memory(size);
    let cmdline: String = "x".repeat(CMDLINE_MAX - 1);
    let entry = boot(&mem, size, &bzimage(), Some(&initrd()), &cmdline).expect("2047 bytes fit");
    check_bzimage_boot(&mem, size, entry, &cmdline);
}

#[test]
fn an_initrd_is_kept_clear_of_the_kernels_decompression_area() {
    // The vmlinux (~51 MiB) as a big initrd. In 96 MiB it could only sit inside the area the
    // bzImage decompresses into (pref_address .. pref_address + init_size): refuse it.
    let big = vmlinux();
    let big_len = fs::metadata(&big).unwrap().len();
    let hdr = setup_header(&fs::read(bzimage()).unwrap());
    let kernel_end = hdr.pref_address + hdr.init_size;
    let small = 96 << 20;
    assert!(
        small - big_len < kernel_end,
        "the test needs an initrd that would overlap the kernel"
    );
    let mem = guest_memory(small);
    match boot(&mem, small, &bzimage(), Some(&big), CMDLINE) {
        Err(BootError::InitrdTooBig { size, .. }) => assert_eq!(size, big_len),
        other => panic!("expected InitrdTooBig, got {other:?}"),
    }
    // With room above the kernel it is loaded there.
    let roomy = 160 << 20;
    let mem = guest_memory(roomy);
    boot(&mem, roomy, &bzimage(), Some(&big), CMDLINE).expect("load with a big initrd");
    let zp = zero_page(&mem);
    check_initrd(&mem, &zp, roomy, &big, kernel_end);
}

// ---------------------------------------------------------------------------------------------
// vmlinux ELF.

struct Segment {
    offset: usize,
    paddr: u64,
    filesz: usize,
}

struct ElfInfo {
    entry: u64,
    loads: Vec<Segment>,
    /// File offset of the type word of the XEN_ELFNOTE_PHYS32_ENTRY note, and its value.
    pvh_note: Option<(usize, u64)>,
    /// File offsets of the PT_NOTE program headers.
    note_phdrs: Vec<usize>,
}

fn parse_elf(b: &[u8]) -> ElfInfo {
    assert_eq!(&b[..4], b"\x7fELF");
    assert_eq!(b[4], 2, "ELF64");
    let (phoff, phentsize, phnum) = (
        u64_at(b, 0x20) as usize,
        usize::from(u16_at(b, 0x36)),
        usize::from(u16_at(b, 0x38)),
    );
    let mut info = ElfInfo {
        entry: u64_at(b, 0x18),
        loads: Vec::new(),
        pvh_note: None,
        note_phdrs: Vec::new(),
    };
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        let (offset, paddr, filesz) = (
            u64_at(b, ph + 8) as usize,
            u64_at(b, ph + 0x18),
            u64_at(b, ph + 0x20) as usize,
        );
        match u32_at(b, ph) {
            1 => info.loads.push(Segment {
                offset,
                paddr,
                filesz,
            }),
            4 => {
                info.note_phdrs.push(ph);
                let mut pos = offset;
                while pos + 12 <= offset + filesz {
                    let (namesz, descsz, kind) = (
                        u32_at(b, pos) as usize,
                        u32_at(b, pos + 4) as usize,
                        u32_at(b, pos + 8),
                    );
                    let desc = pos + 12 + namesz.next_multiple_of(4);
                    if &b[pos + 12..pos + 12 + namesz] == b"Xen\0" && kind == 18 {
                        let value = if descsz >= 8 {
                            u64_at(b, desc)
                        } else {
                            u64::from(u32_at(b, desc))
                        };
                        info.pvh_note = Some((pos + 8, value));
                    }
                    pos = desc + descsz.next_multiple_of(4);
                }
            }
            _ => {}
        }
    }
    info
}

/// The PT_LOAD segments are in guest memory at their physical addresses.
fn check_segments(mem: &GuestMemoryMmap, file: &[u8], elf: &ElfInfo) {
    assert!(!elf.loads.is_empty());
    for seg in &elf.loads {
        assert!(
            read_guest(mem, seg.paddr, seg.filesz) == file[seg.offset..seg.offset + seg.filesz],
            "segment at file offset {:#x} is not at its physical address {:#x}",
            seg.offset,
            seg.paddr
        );
    }
}

/// The zero page and page tables of a vmlinux boot; `loaded_end` is the end of the kernel.
fn check_vmlinux_boot(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    entry: BootEntry,
    elf: &ElfInfo,
    loaded_end: u64,
) {
    let (entry, boot_params, pml4, gdt) = linux64(entry);
    assert_eq!(
        entry, elf.entry,
        "the entry is the ELF entry (phys_startup_64)"
    );
    assert_eq!(boot_params, ZERO_PAGE_ADDR);
    let zp = zero_page(mem);
    check_magic(&zp);
    assert_eq!(
        u32_at(&zp, CMDLINE_SIZE),
        (CMDLINE_MAX - 1) as u32,
        "cmdline_size"
    );
    check_cmdline(mem, &zp, CMDLINE);
    check_e820(&zp, mem_size);
    check_paging_and_gdt(mem, pml4, gdt);
    let low = elf.loads.iter().map(|s| s.paddr).min().unwrap();
    check_identity(mem, pml4, low, loaded_end, "the loaded kernel");
    check_identity(mem, pml4, entry, entry + 1, "the entry point");
    check_identity(
        mem,
        pml4,
        ZERO_PAGE_ADDR,
        ZERO_PAGE_ADDR + 4096,
        "zero page",
    );
    check_initrd(mem, &zp, mem_size, &initrd(), loaded_end);
}

#[test]
fn vmlinux_boots_through_the_linux_protocol() {
    let path = vmlinux();
    let file = fs::read(&path).unwrap();
    let elf = parse_elf(&file);
    let mut kernel = fs::File::open(&path).unwrap();
    assert!(
        elf_notes::scan(&mut kernel).linux,
        "a vmlinux carries the Linux ELF note"
    );

    let size = 512 << 20;
    let mem = guest_memory(size);
    let loaded = pvh::load_elf(&mem, &mut kernel, &path).expect("load the vmlinux segments");
    assert_eq!(loaded.entry, elf.entry);
    check_segments(&mem, &file, &elf);
    let initrd_file = fs::File::open(initrd()).unwrap();
    let entry =
        linux::configure_vmlinux(&mem, size, &loaded, CMDLINE, Some((&initrd(), initrd_file)))
            .expect("configure the Linux boot");
    check_vmlinux_boot(&mem, size, entry, &elf, loaded.end);
}

#[test]
fn a_pvh_capable_vmlinux_is_booted_with_pvh() {
    // Debian's kernel is built with CONFIG_PVH: load_kernel prefers its PVH entry.
    let path = vmlinux();
    let elf = parse_elf(&fs::read(&path).unwrap());
    let (_, pvh_entry) = elf
        .pvh_note
        .expect("the test kernel has a XEN_ELFNOTE_PHYS32_ENTRY note");
    let size = 512 << 20;
    let mem = guest_memory(size);
    let entry = boot(&mem, size, &path, Some(&initrd()), CMDLINE).expect("load the vmlinux");
    assert_eq!(
        entry,
        BootEntry::Pvh {
            entry: pvh_entry,
            start_info: pvh::START_INFO_ADDR
        }
    );
}

#[test]
fn vmlinux_without_a_pvh_note_is_booted_with_the_linux_protocol() {
    // The same kernel with its PVH note renamed to an unknown note type: load_kernel must
    // recognise it as Linux by its "Linux" note and use the 64-bit boot protocol.
    let mut file = fs::read(vmlinux()).unwrap();
    let elf = parse_elf(&file);
    let (type_at, _) = elf.pvh_note.expect("the test kernel has a PVH note");
    file[type_at..type_at + 4].copy_from_slice(&0xffffu32.to_le_bytes());
    let path = scratch("vmlinux-no-pvh");
    fs::write(&path, &file).unwrap();
    let notes = elf_notes::scan(&mut fs::File::open(&path).unwrap());
    assert!(notes.linux && !notes.pvh);

    let size = 512 << 20;
    let mem = guest_memory(size);
    let entry = boot(&mem, size, &path, Some(&initrd()), CMDLINE).expect("load the vmlinux");
    check_segments(&mem, &file, &elf);
    let loaded_end = loaded_end(&file);
    check_vmlinux_boot(&mem, size, entry, &elf, loaded_end);
    fs::remove_file(path).unwrap();
}

/// The end of the highest PT_LOAD segment in memory (p_paddr + p_memsz).
fn loaded_end(b: &[u8]) -> u64 {
    let (phoff, phentsize, phnum) = (
        u64_at(b, 0x20) as usize,
        usize::from(u16_at(b, 0x36)),
        usize::from(u16_at(b, 0x38)),
    );
    (0..phnum)
        .map(|i| phoff + i * phentsize)
        .filter(|&ph| u32_at(b, ph) == 1)
        .map(|ph| u64_at(b, ph + 0x18) + u64_at(b, ph + 0x28))
        .max()
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// Bad input.

#[test]
fn a_truncated_bzimage_is_an_error() {
    let file = fs::read(bzimage()).unwrap();
    let path = scratch("vmlinuz-4k");
    fs::write(&path, &file[..4096]).unwrap();
    let size = 64 << 20;
    let mem = guest_memory(size);
    let err = boot(&mem, size, &path, None, CMDLINE).expect_err("4 KiB of a bzImage cannot load");
    assert!(matches!(err, BootError::Load { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
    fs::remove_file(path).unwrap();
}

#[test]
fn an_initrd_larger_than_memory_is_initrd_too_big() {
    let size = 32 << 20;
    let mem = guest_memory(size);
    let big = vmlinux();
    match boot(&mem, size, &bzimage(), Some(&big), CMDLINE) {
        Err(BootError::InitrdTooBig { size, limit }) => {
            assert_eq!(size, fs::metadata(&big).unwrap().len());
            assert!(limit <= 32 << 20);
        }
        other => panic!("expected InitrdTooBig, got {other:?}"),
    }
}

#[test]
fn a_command_line_of_2048_bytes_is_refused() {
    let size = 64 << 20;
    let mem = guest_memory(size);
    let cmdline = "x".repeat(CMDLINE_MAX);
    let err = boot(&mem, size, &bzimage(), None, &cmdline).expect_err("too long");
    assert!(matches!(err, BootError::Cmdline(_)), "{err:?}");
    let err = boot(&mem, size, &bzimage(), None, "console=ttyS0\0init=/bin/sh").expect_err("NUL");
    assert!(matches!(err, BootError::Cmdline(_)), "{err:?}");
}

#[test]
fn a_file_that_is_no_kernel_is_unknown_format() {
    let size = 64 << 20;
    let mem = guest_memory(size);
    let not_a_kernel = initrd();
    match boot(&mem, size, &not_a_kernel, None, CMDLINE) {
        Err(BootError::UnknownFormat(path)) => assert_eq!(path, not_a_kernel),
        other => panic!("expected UnknownFormat, got {other:?}"),
    }
}

#[test]
fn a_missing_kernel_or_initrd_is_a_read_error() {
    let size = 64 << 20;
    let mem = guest_memory(size);
    let missing = kernel_dir().join("no-such-file");
    let err = boot(&mem, size, &missing, None, CMDLINE).expect_err("no kernel");
    assert!(
        matches!(err, BootError::Read { what: "kernel", .. }),
        "{err:?}"
    );
    let err = boot(&mem, size, &bzimage(), Some(&missing), CMDLINE).expect_err("no initrd");
    assert!(
        matches!(err, BootError::Read { what: "initrd", .. }),
        "{err:?}"
    );
}

#[test]
fn an_elf_without_pvh_or_linux_notes_is_not_bootable() {
    // The real vmlinux with its PT_NOTE segments turned into PT_NULL: a loadable ELF that says
    // neither "PVH" nor "Linux".
    let mut file = fs::read(vmlinux()).unwrap();
    let elf = parse_elf(&file);
    assert!(!elf.note_phdrs.is_empty());
    for &ph in &elf.note_phdrs {
        file[ph..ph + 4].copy_from_slice(&0u32.to_le_bytes());
    }
    let path = scratch("vmlinux-no-notes");
    fs::write(&path, &file).unwrap();
    assert_eq!(
        elf_notes::scan(&mut fs::File::open(&path).unwrap()),
        elf_notes::ElfNotes::default()
    );

    let size = 512 << 20;
    let mem = guest_memory(size);
    match boot(&mem, size, &path, Some(&initrd()), CMDLINE) {
        Err(BootError::NotBootable(p)) => assert_eq!(p, path),
        other => panic!("expected NotBootable, got {other:?}"),
    }
    fs::remove_file(path).unwrap();
}

#[test]
fn a_user_space_elf_is_refused_with_an_error() {
    // /bin/true: an x86-64 ELF (a position-independent ET_DYN) with notes, but neither PVH nor
    // Linux ones.
    let path = Path::new("/bin/true");
    assert!(!elf_notes::scan(&mut fs::File::open(path).unwrap()).linux);
    let size = 64 << 20;
    let mem = guest_memory(size);
    let err = boot(&mem, size, path, None, CMDLINE).expect_err("/bin/true is no kernel");
    // The notes are read before anything is loaded, so it is refused for what it is.
    assert!(matches!(err, BootError::NotBootable(_)), "{err:?}");
    assert!(err.to_string().contains("/bin/true"), "{err}");
    eprintln!("/bin/true: {err}");
}

#[test]
fn a_bzimage_without_the_64_bit_entry_is_refused() {
    // The real bzImage with XLF_KERNEL_64 cleared, as a 32-bit-only kernel has it: entering it at
    // code32_start + 0x200 in long mode would run arbitrary code.
    let mut file = fs::read(bzimage()).unwrap();
    let flags = u16_at(&file, XLOADFLAGS) & !1;
    file[XLOADFLAGS..XLOADFLAGS + 2].copy_from_slice(&flags.to_le_bytes());
    let path = scratch("vmlinuz-no-64bit-entry");
    fs::write(&path, &file).unwrap();
    let size = 64 << 20;
    let mem = guest_memory(size);
    let err = boot(&mem, size, &path, None, CMDLINE).expect_err("no 64-bit entry");
    assert!(matches!(err, BootError::Load { .. }), "{err:?}");
    fs::remove_file(path).unwrap();
}
