//! ELF note scanning: tells a PVH kernel from a Linux vmlinux before anything is loaded.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

const PT_NOTE: u32 = 4;
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// What the ELF notes of a kernel say about how to boot it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ElfNotes {
    /// A `XEN_ELFNOTE_PHYS32_ENTRY` note ("Xen", type 18): the kernel boots with PVH.
    pub pvh: bool,
    /// Linux's own note ("Linux", present in every vmlinux).
    pub linux: bool,
}

/// Reads the PT_NOTE segments of an ELF. A malformed header reads as "no notes".
pub fn scan(file: &mut File) -> ElfNotes {
    scan_notes(file).unwrap_or_default()
}

fn read_at(file: &mut File, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
    file.seek(SeekFrom::Start(offset))?;
    file.read_exact(buf)
}

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([b[i], b[i + 1]])
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"))
}

fn scan_notes(file: &mut File) -> std::io::Result<ElfNotes> {
    let mut found = ElfNotes::default();
    let mut ehdr = [0u8; 64];
    read_at(file, 0, &mut ehdr)?;
    let (phoff, phentsize, phnum) = (
        u64_at(&ehdr, 0x20),
        u16_at(&ehdr, 0x36),
        u16_at(&ehdr, 0x38),
    );
    if usize::from(phentsize) < 56 {
        return Ok(found);
    }
    for i in 0..u64::from(phnum) {
        let mut phdr = [0u8; 56];
        // A corrupt header must not overflow (and panic in debug builds): treat it as no note.
        let Some(at) = i
            .checked_mul(u64::from(phentsize))
            .and_then(|o| o.checked_add(phoff))
        else {
            return Ok(found);
        };
        read_at(file, at, &mut phdr)?;
        if u32_at(&phdr, 0) != PT_NOTE {
            continue;
        }
        let (offset, size) = (u64_at(&phdr, 8), u64_at(&phdr, 0x20));
        if size > 1 << 20 {
            continue;
        }
        let mut notes = vec![0u8; size as usize];
        read_at(file, offset, &mut notes)?;
        let mut pos = 0usize;
        while pos + 12 <= notes.len() {
            let namesz = u32_at(&notes, pos) as usize;
            let descsz = u32_at(&notes, pos + 4) as usize;
            let name_start = pos + 12;
            let kind = u32_at(&notes, pos + 8);
            let name = notes.get(name_start..name_start + namesz).unwrap_or(&[]);
            found.linux |= name == b"Linux\0";
            found.pvh |= name == b"Xen\0" && kind == XEN_ELFNOTE_PHYS32_ENTRY;
            pos = name_start + namesz.next_multiple_of(4) + descsz.next_multiple_of(4);
        }
    }
    Ok(found)
}
