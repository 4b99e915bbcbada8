//! Loading a kernel into guest memory and preparing its boot protocol.
//!
//! Two protocols are supported: PVH (an ELF with a `XEN_ELFNOTE_PHYS32_ENTRY` note, entered in
//! 32-bit protected mode with a `hvm_start_info`) and the Linux x86 boot protocol (bzImage or a
//! vmlinux ELF, entered in 64-bit mode with `boot_params`).

pub mod elf_notes;
pub mod linux;
pub mod pvh;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::kvm::cpu::BootEntry;
use crate::memory::{MMIO_HOLE_END, MMIO_HOLE_START};

/// Guest-physical address of the kernel command line.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// Longest kernel command line we pass (the Linux x86 limit).
pub const CMDLINE_MAX: usize = 2048;
/// Where kernels expect to be loaded at the latest: 1 MiB.
pub const HIMEM_START: u64 = 0x10_0000;

/// E820 / PVH memory map type of usable RAM.
pub const E820_RAM: u32 = 1;

/// Errors of kernel loading.
#[derive(Debug, Error)]
pub enum BootError {
    /// The kernel (or initrd) file cannot be opened or read.
    #[error("cannot read {what} {path}")]
    Read {
        /// "kernel" or "initrd".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is neither an ELF nor a bzImage.
    #[error("kernel {0} is not an ELF file nor a Linux bzImage")]
    UnknownFormat(PathBuf),
    /// An ELF without a PVH entry note that is not a Linux kernel either.
    #[error("kernel {0} is an ELF without a PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY) and is not a Linux kernel")]
    NotBootable(PathBuf),
    /// The loader rejected the image.
    #[error("cannot load kernel {path}: {source}")]
    Load {
        /// The file.
        path: PathBuf,
        /// Cause (linux-loader's error does not implement `Error::source` chains usefully, so it
        /// is shown here).
        source: linux_loader::loader::Error,
    },
    /// The command line is too long or contains a NUL byte.
    #[error("kernel command line is invalid: {0}")]
    Cmdline(&'static str),
    /// A boot structure could not be written to guest memory.
    #[error("cannot write the {0} into guest memory")]
    GuestMemory(&'static str),
    /// The initrd does not fit in guest memory.
    #[error("initrd of {size} bytes does not fit in guest memory below {limit:#x}")]
    InitrdTooBig {
        /// Size of the initrd.
        size: u64,
        /// Highest address it may end at.
        limit: u64,
    },
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct BootSpec<'a> {
    /// The kernel image.
    pub kernel: &'a Path,
    /// An initial ramdisk.
    pub initrd: Option<&'a Path>,
    /// The kernel command line.
    pub cmdline: &'a str,
}

/// A RAM range of the guest, for memory maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRange {
    /// First address.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
}

/// The RAM ranges a guest of `mem_size` bytes is told about. The first 640 KiB and the range
/// from 1 MiB are RAM; the legacy video/BIOS area in between is not listed.
pub fn ram_map(mem_size: u64) -> Vec<RamRange> {
    let low_end = mem_size.min(MMIO_HOLE_START);
    let mut map = vec![
        RamRange {
            start: 0,
            len: 0x9_fc00,
        },
        RamRange {
            start: HIMEM_START,
            len: low_end - HIMEM_START,
        },
    ];
    if mem_size > MMIO_HOLE_START {
        map.push(RamRange {
            start: MMIO_HOLE_END,
            len: mem_size - MMIO_HOLE_START,
        });
    }
    map
}

/// An ELF kernel placed in guest memory.
#[derive(Debug, Clone, Copy)]
pub struct LoadedElf {
    /// ELF entry point.
    pub entry: u64,
    /// End of the highest loaded segment.
    pub end: u64,
    /// The PVH 32-bit entry point, if the ELF has one.
    pub pvh_entry: Option<u64>,
}

/// Copies an initrd into the highest page-aligned place of low RAM that ends below `max_end`
/// and starts at or above `min_start`: the end of the memory the kernel occupies, so that neither
/// the kernel's load nor its in-place decompression overwrites the initrd (GRUB places it above
/// the kernel's `init_size` for the same reason). Returns its address and size.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    mut file: File,
    path: &Path,
    min_start: u64,
    max_end: u64,
) -> Result<(u64, u64), BootError> {
    let read_err = |source| BootError::Read {
        what: "initrd",
        path: path.to_path_buf(),
        source,
    };
    let size = file.seek(SeekFrom::End(0)).map_err(read_err)?;
    file.seek(SeekFrom::Start(0)).map_err(read_err)?;
    let limit = mem_size.min(MMIO_HOLE_START).min(max_end);
    let addr = limit
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|&a| a >= min_start.max(HIMEM_START))
        .ok_or(BootError::InitrdTooBig { size, limit })?;
    let len = usize::try_from(size).map_err(|_| BootError::InitrdTooBig { size, limit })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, len)
        .map_err(|_| BootError::GuestMemory("initrd"))?;
    Ok((addr, size))
}

fn open(what: &'static str, path: &Path) -> Result<File, BootError> {
    File::open(path).map_err(|source| BootError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// Kinds of kernel image, told apart by their first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ImageKind {
    Elf,
    BzImage,
}

fn probe(file: &mut File, path: &Path) -> Result<ImageKind, BootError> {
    let read_err = |source| BootError::Read {
        what: "kernel",
        path: path.to_path_buf(),
        source,
    };
    let mut head = [0u8; 0x206];
    file.seek(SeekFrom::Start(0)).map_err(read_err)?;
    let mut n = 0;
    while n < head.len() {
        match file.read(&mut head[n..]).map_err(read_err)? {
            0 => break,
            k => n += k,
        }
    }
    if n >= 4 && head[..4] == *b"\x7fELF" {
        Ok(ImageKind::Elf)
    } else if n >= 0x206 && head[0x202..0x206] == *b"HdrS" {
        Ok(ImageKind::BzImage)
    } else {
        Err(BootError::UnknownFormat(path.to_path_buf()))
    }
}

/// Loads the kernel (and initrd) of `spec` into `mem` and returns where the boot vCPU starts.
pub fn load_kernel(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    spec: &BootSpec<'_>,
) -> Result<BootEntry, BootError> {
    if spec.cmdline.len() >= CMDLINE_MAX {
        return Err(BootError::Cmdline("longer than 2047 bytes"));
    }
    if spec.cmdline.contains('\0') {
        return Err(BootError::Cmdline("contains a NUL byte"));
    }
    let mut kernel = open("kernel", spec.kernel)?;
    let initrd = spec
        .initrd
        .map(|p| open("initrd", p).map(|f| (p, f)))
        .transpose()?;
    match probe(&mut kernel, spec.kernel)? {
        ImageKind::Elf => {
            // Decide from the notes before loading anything, so that an ELF that is no kernel
            // (a program, say) is refused for what it is, not for where it wants to be loaded.
            let notes = elf_notes::scan(&mut kernel);
            if !notes.pvh && !notes.linux {
                return Err(BootError::NotBootable(spec.kernel.to_path_buf()));
            }
            let loaded = pvh::load_elf(mem, &mut kernel, spec.kernel)?;
            match loaded.pvh_entry {
                Some(entry) => pvh::configure(mem, mem_size, &loaded, entry, spec.cmdline, initrd),
                None => linux::configure_vmlinux(mem, mem_size, &loaded, spec.cmdline, initrd),
            }
        }
        ImageKind::BzImage => linux::load_bzimage(
            mem,
            mem_size,
            &mut kernel,
            spec.kernel,
            spec.cmdline,
            initrd,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_map_skips_the_legacy_hole_and_the_mmio_hole() {
        let small = ram_map(256 << 20);
        assert_eq!(small.len(), 2);
        assert_eq!(small[1].start + small[1].len, 256 << 20);
        let big = ram_map(4 << 30);
        assert_eq!(big.len(), 3);
        assert_eq!(big[1].start + big[1].len, MMIO_HOLE_START);
        assert_eq!(
            big[2],
            RamRange {
                start: 1 << 32,
                len: 1 << 30
            }
        );
    }
}
