//! The PVH boot protocol: an ELF kernel with a `XEN_ELFNOTE_PHYS32_ENTRY` note, entered in 32-bit
//! protected mode with EBX pointing at a `hvm_start_info` that lists the command line, the
//! memory map and (optionally) the initrd as a module.

use std::fs::File;
use std::path::Path;

use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{load_initrd, ram_map, BootError, LoadedElf, CMDLINE_ADDR, E820_RAM, HIMEM_START};
use crate::kvm::cpu::BootEntry;

/// `hvm_start_info.magic`.
pub const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
/// Guest-physical address of `hvm_start_info`.
pub const START_INFO_ADDR: u64 = 0x6000;
/// Guest-physical address of the module list (the initrd).
pub const MODLIST_ADDR: u64 = 0x6040;
/// Guest-physical address of the memory map.
pub const MEMMAP_ADDR: u64 = 0x7000;

/// Loads the PT_LOAD segments of an ELF kernel at their physical addresses.
pub fn load_elf(
    mem: &GuestMemoryMmap,
    kernel: &mut File,
    path: &Path,
) -> Result<LoadedElf, BootError> {
    let result =
        Elf::load(mem, None, kernel, Some(GuestAddress(HIMEM_START))).map_err(|source| {
            BootError::Load {
                path: path.to_path_buf(),
                source,
            }
        })?;
    let pvh_entry = match result.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(addr) => Some(addr.0),
        _ => None,
    };
    Ok(LoadedElf {
        entry: result.kernel_load.0,
        end: result.kernel_end,
        pvh_entry,
    })
}

/// Writes the command line, memory map, initrd and `hvm_start_info` for a PVH kernel.
pub fn configure(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    loaded: &LoadedElf,
    entry: u64,
    cmdline: &str,
    initrd: Option<(&Path, File)>,
) -> Result<BootEntry, BootError> {
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_ADDR))
        .map_err(|_| BootError::GuestMemory("command line"))?;

    let memmap: Vec<hvm_memmap_table_entry> = ram_map(mem_size)
        .into_iter()
        .map(|r| hvm_memmap_table_entry {
            addr: r.start,
            size: r.len,
            type_: E820_RAM,
            reserved: 0,
        })
        .collect();

    let mut start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        memmap_paddr: MEMMAP_ADDR,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let mut params = BootParams::new(&start_info, GuestAddress(START_INFO_ADDR));
    params.set_sections(&memmap, GuestAddress(MEMMAP_ADDR));
    if let Some((path, file)) = initrd {
        let (addr, size) = load_initrd(mem, mem_size, file, path, loaded.end, u64::MAX)?;
        let module = hvm_modlist_entry {
            paddr: addr,
            size,
            ..Default::default()
        };
        start_info.nr_modules = 1;
        start_info.modlist_paddr = MODLIST_ADDR;
        params = BootParams::new(&start_info, GuestAddress(START_INFO_ADDR));
        params.set_sections(&memmap, GuestAddress(MEMMAP_ADDR));
        params.set_modules(&[module], GuestAddress(MODLIST_ADDR));
    }
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem)
        .map_err(|_| BootError::GuestMemory("PVH start info"))?;
    Ok(BootEntry::Pvh {
        entry,
        start_info: START_INFO_ADDR,
    })
}
