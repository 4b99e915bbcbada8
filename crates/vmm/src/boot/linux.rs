//! The Linux x86 boot protocol (64-bit entry): a bzImage or a vmlinux ELF, `boot_params` (the
//! zero page) with an E820 map, the command line and an initrd, and the identity page tables and
//! GDT that the 64-bit entry point expects.
//!
//! Linux guests need a host with hardware virtualization: on a PVM host the kernel's ring-0 code
//! hits instructions that KVM does not emulate.

use std::fs::File;
use std::path::Path;

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{BzImage, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{
    load_initrd, ram_map, BootError, LoadedElf, CMDLINE_ADDR, CMDLINE_MAX, E820_RAM, HIMEM_START,
};
use crate::kvm::cpu::BootEntry;

/// Guest-physical address of the GDT for the 64-bit entry.
pub const GDT_ADDR: u64 = 0x500;
/// Guest-physical address of `boot_params`.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Guest-physical address of the PML4; the PDPT and PD follow in the next pages.
pub const PML4_ADDR: u64 = 0x9000;
const PDPT_ADDR: u64 = 0xa000;
const PD_ADDR: u64 = 0xb000;

/// `setup_header.boot_flag`.
pub const BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// `setup_header.header`: "HdrS".
pub const HDRS_MAGIC: u32 = 0x5372_6448;
/// `setup_header.type_of_loader`: a loader without an assigned id.
pub const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// Where the 64-bit entry point lies in the protected-mode kernel of a bzImage.
pub const STARTUP_64_OFFSET: u64 = 0x200;
/// Highest initrd end address when the kernel does not say (boot protocol < 2.03).
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
/// `setup_header.loadflags` bit: the kernel may use the heap after setup.
const CAN_USE_HEAP: u8 = 1 << 7;
/// `setup_header.xloadflags` bit: the kernel has the 64-bit entry point at `code32_start + 0x200`.
const XLF_KERNEL_64: u16 = 1 << 0;
/// First boot protocol with `xloadflags` (2.12), without which the 64-bit entry cannot be trusted.
const MIN_64BIT_PROTOCOL: u16 = 0x020c;
/// First boot protocol whose header says how long a command line the kernel takes (2.06).
const CMDLINE_SIZE_PROTOCOL: u16 = 0x0206;
/// First boot protocol with `pref_address` and `init_size` (2.10).
const INIT_SIZE_PROTOCOL: u16 = 0x020a;

/// Loads a bzImage's protected-mode kernel and prepares the 64-bit boot.
pub fn load_bzimage(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel: &mut File,
    path: &Path,
    cmdline: &str,
    initrd: Option<(&Path, File)>,
) -> Result<BootEntry, BootError> {
    let result =
        BzImage::load(mem, None, kernel, Some(GuestAddress(HIMEM_START))).map_err(|source| {
            BootError::Load {
                path: path.to_path_buf(),
                source,
            }
        })?;
    let header = result
        .setup_header
        .expect("the bzImage loader always returns the setup header");
    // Entering at `code32_start + 0x200` in long mode is only defined for kernels that say they
    // have the 64-bit entry point (boot.rst: "XLF_KERNEL_64 ... has the legacy 64-bit entry point
    // at 0x200"); anything else would run whatever code lies there.
    if header.version < MIN_64BIT_PROTOCOL || header.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(BootError::Load {
            path: path.to_path_buf(),
            source: linux_loader::loader::Error::Bzimage(
                linux_loader::loader::bzimage::Error::InvalidBzImage,
            ),
        });
    }
    // `cmdline_size` is the longest command line this kernel takes, without the NUL.
    if header.version >= CMDLINE_SIZE_PROTOCOL && cmdline.len() > header.cmdline_size as usize {
        return Err(BootError::Cmdline(
            "longer than the kernel accepts (setup_header.cmdline_size)",
        ));
    }
    // The protected-mode kernel decompresses itself to `pref_address` (it is loaded lower) and
    // needs `init_size` bytes there; the initrd must stay clear of that and of the loaded image.
    let mut kernel_end = result.kernel_end;
    if header.version >= INIT_SIZE_PROTOCOL {
        let decompressed_end = header
            .pref_address
            .max(result.kernel_load.0)
            .saturating_add(u64::from(header.init_size));
        kernel_end = kernel_end.max(decompressed_end);
    }
    let mut params = boot_params {
        hdr: header,
        ..Default::default()
    };
    write_boot(
        mem,
        mem_size,
        &mut params,
        result.kernel_load.0 + STARTUP_64_OFFSET,
        cmdline,
        initrd.map(|(p, f)| (p, f, kernel_end)),
    )
}

/// Prepares the 64-bit boot of a vmlinux ELF already placed by [`super::pvh::load_elf`].
pub fn configure_vmlinux(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    loaded: &LoadedElf,
    cmdline: &str,
    initrd: Option<(&Path, File)>,
) -> Result<BootEntry, BootError> {
    let mut params = boot_params::default();
    params.hdr.boot_flag = BOOT_FLAG_MAGIC;
    params.hdr.header = HDRS_MAGIC;
    params.hdr.kernel_alignment = 0x100_0000;
    // No setup header to take the limit from: the x86 COMMAND_LINE_SIZE, without the NUL.
    params.hdr.cmdline_size = (CMDLINE_MAX - 1) as u32;
    write_boot(
        mem,
        mem_size,
        &mut params,
        loaded.entry,
        cmdline,
        initrd.map(|(p, f)| (p, f, loaded.end)),
    )
}

/// Writes the command line, initrd, `boot_params`, GDT and page tables. `initrd` carries the end
/// of the kernel's memory, below which the initrd must not go. `params.hdr.cmdline_size` is left
/// as the kernel's: the boot protocol makes it a field the loader reads, not writes.
fn write_boot(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    params: &mut boot_params,
    entry: u64,
    cmdline: &str,
    initrd: Option<(&Path, File, u64)>,
) -> Result<BootEntry, BootError> {
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_ADDR))
        .map_err(|_| BootError::GuestMemory("command line"))?;

    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.boot_flag = BOOT_FLAG_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.loadflags |= CAN_USE_HEAP;
    params.hdr.heap_end_ptr = 0xfe00;

    if let Some((path, file, kernel_end)) = initrd {
        let max = match params.hdr.initrd_addr_max {
            0 => DEFAULT_INITRD_ADDR_MAX,
            m => u64::from(m),
        } + 1;
        let (addr, size) = load_initrd(mem, mem_size, file, path, kernel_end, max)?;
        params.hdr.ramdisk_image =
            u32::try_from(addr).expect("the initrd is placed below the 32-bit MMIO hole");
        params.hdr.ramdisk_size =
            u32::try_from(size).expect("the initrd ends below the 32-bit MMIO hole");
    }

    let map = ram_map(mem_size);
    for (slot, range) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: range.start,
            size: range.len,
            r#type: E820_RAM,
        };
    }
    params.e820_entries = map.len() as u8;

    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new(params, GuestAddress(ZERO_PAGE_ADDR)),
        mem,
    )
    .map_err(|_| BootError::GuestMemory("boot parameters"))?;
    write_gdt(mem)?;
    write_identity_page_tables(mem)?;
    Ok(BootEntry::Linux64 {
        entry,
        boot_params: ZERO_PAGE_ADDR,
        pml4: PML4_ADDR,
        gdt: GDT_ADDR,
    })
}

/// A GDT descriptor from flags, base and limit (the x86 encoding).
fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let (flags, base, limit) = (u64::from(flags), u64::from(base), u64::from(limit));
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// The GDT matching the selectors the 64-bit entry registers use: code 0x10, data 0x18, TSS
/// 0x20.
pub fn boot_gdt() -> [u64; 5] {
    [
        0,
        0,
        gdt_entry(0xa09b, 0, 0xfffff),
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x808b, 0, 0xfffff),
    ]
}

fn write_gdt(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    for (i, entry) in boot_gdt().iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(GDT_ADDR + 8 * i as u64))
            .map_err(|_| BootError::GuestMemory("GDT"))?;
    }
    Ok(())
}

/// Identity-maps the first GiB with 2 MiB pages, enough for the kernel's early start-up code.
fn write_identity_page_tables(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    let err = |_| BootError::GuestMemory("page tables");
    // Present | writable.
    mem.write_obj(PDPT_ADDR | 0x3, GuestAddress(PML4_ADDR))
        .map_err(err)?;
    mem.write_obj(PD_ADDR | 0x3, GuestAddress(PDPT_ADDR))
        .map_err(err)?;
    for i in 0..512u64 {
        // Present | writable | 2 MiB page.
        mem.write_obj((i << 21) | 0x83, GuestAddress(PD_ADDR + i * 8))
            .map_err(err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_encode_flat_segments() {
        let gdt = boot_gdt();
        assert_eq!(gdt[2], 0x00af_9b00_0000_ffff);
        assert_eq!(gdt[3], 0x00cf_9300_0000_ffff);
        assert_eq!(gdt[4], 0x008f_8b00_0000_ffff);
    }
}
