//! The PVH `struct hvm_start_info` (xen/include/public/arch-x86/hvm/start_info.h), read once at
//! start-up into owned values so that no reference into loader memory outlives it.

use crate::cmdline::CmdlineError;

/// The command line is copied into the guest; longer ones are rejected.
const CMDLINE_CAPACITY: usize = 1024;
/// `struct hvm_memmap_table_entry.type` of usable RAM (the E820 value).
const MEMMAP_TYPE_RAM: u32 = 1;

/// The whole ABI struct; the guest reads only the fields without a leading underscore.
#[repr(C)]
struct HvmStartInfo {
    _magic: u32,
    version: u32,
    _flags: u32,
    _nr_modules: u32,
    _modlist_paddr: u64,
    cmdline_paddr: u64,
    _rsdp_paddr: u64,
    /// The memory map fields exist from version 1 on.
    memmap_paddr: u64,
    memmap_entries: u32,
    _reserved: u32,
}

#[repr(C)]
struct HvmMemmapEntry {
    addr: u64,
    size: u64,
    kind: u32,
    _reserved: u32,
}

/// The loader's memory map, still in loader memory; entries are read on demand.
#[derive(Clone, Copy)]
pub struct MemoryMap {
    paddr: u64,
    entries: u32,
}

impl MemoryMap {
    fn entry(&self, index: u32) -> HvmMemmapEntry {
        let entries = self.paddr as *const HvmMemmapEntry;
        // SAFETY: index < self.entries, and the loader placed that many entries at paddr
        // (StartInfo::read's contract); all memory is identity-mapped.
        unsafe { entries.add(index as usize).read_unaligned() }
    }

    /// Whether [start, end) is RAM, possibly spread over adjacent RAM entries.
    pub fn is_ram(&self, start: u64, end: u64) -> bool {
        let mut covered = start;
        while covered < end {
            let next = (0..self.entries)
                .map(|index| self.entry(index))
                .filter(|entry| entry.kind == MEMMAP_TYPE_RAM)
                .find(|entry| entry.addr <= covered && covered - entry.addr < entry.size)
                .map(|entry| entry.addr.saturating_add(entry.size));
            match next {
                Some(next) => covered = next,
                None => return false,
            }
        }
        true
    }

    /// Whether any RAM entry intersects [start, end).
    pub fn overlaps_ram(&self, start: u64, end: u64) -> bool {
        (0..self.entries)
            .map(|index| self.entry(index))
            .filter(|entry| entry.kind == MEMMAP_TYPE_RAM)
            .any(|entry| entry.addr < end && start < entry.addr.saturating_add(entry.size))
    }
}

pub struct StartInfo {
    cmdline: [u8; CMDLINE_CAPACITY],
    /// None if the command line does not fit in `cmdline`.
    cmdline_len: Option<usize>,
    pub memory_map: MemoryMap,
}

impl StartInfo {
    /// Copies what the guest needs out of the loader's start info.
    ///
    /// # Safety
    /// `paddr` must be the `hvm_start_info` the loader passed in EBX (boot.rs checked its magic),
    /// and the command line and memory map it points to must stay unchanged while the returned
    /// value is in use.
    pub unsafe fn read(paddr: u64) -> Self {
        // SAFETY: the caller guarantees paddr is the loader's start info; memory is identity-mapped.
        let info = unsafe { (paddr as *const HvmStartInfo).read_unaligned() };
        let mut cmdline = [0; CMDLINE_CAPACITY];
        let mut cmdline_len = Some(0);
        if info.cmdline_paddr != 0 {
            cmdline_len = None;
            for (index, slot) in cmdline.iter_mut().enumerate() {
                let address = info.cmdline_paddr + index as u64;
                // SAFETY: the command line is NUL-terminated and nothing is read past the NUL.
                let byte = unsafe { (address as *const u8).read() };
                if byte == 0 {
                    cmdline_len = Some(index);
                    break;
                }
                *slot = byte;
            }
        }
        let entries = if info.version >= 1 {
            info.memmap_entries
        } else {
            0
        };
        Self {
            cmdline,
            cmdline_len,
            memory_map: MemoryMap {
                paddr: info.memmap_paddr,
                entries,
            },
        }
    }

    pub fn cmdline(&self) -> Result<&str, CmdlineError<'static>> {
        let len = self.cmdline_len.ok_or(CmdlineError::TooLong {
            limit: CMDLINE_CAPACITY - 1,
        })?;
        core::str::from_utf8(&self.cmdline[..len]).map_err(|_| CmdlineError::NotUtf8)
    }
}
