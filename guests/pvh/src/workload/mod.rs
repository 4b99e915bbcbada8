//! The ring-3 workloads, chosen by the first word of the command line.

mod compute;
mod dirty;
mod disk;
mod fault;
mod hello;
mod scan;
mod virtio;

use crate::cmdline::{Cmdline, CmdlineError};
use crate::console::Console;
use crate::start_info::MemoryMap;

const PAGE_SIZE: u64 = 4096;
const WORDS_PER_PAGE: usize = PAGE_SIZE as usize / 8;
/// Working sets start on the first 2 MiB boundary after the guest image.
const WORKING_SET_ALIGN: u64 = 2 << 20;

/// Runs the workload the command line names.
pub fn run<'a>(
    console: &mut Console,
    ram: FreeRam,
    cmdline: &'a str,
) -> Result<(), CmdlineError<'a>> {
    let Cmdline {
        workload,
        options,
        virtio_mmio,
    } = Cmdline::parse(cmdline)?;
    match workload {
        "hello" => hello::run(console, options),
        "dirty" => dirty::run(console, ram, options),
        "compute" => compute::run(console, ram, options),
        "fault" => fault::run(console, options),
        "scan" => scan::run(console, ram, options),
        "disk" => disk::run(console, ram, options, &virtio_mmio),
        _ => Err(CmdlineError::UnknownWorkload(workload)),
    }
}

/// The guest RAM above the image, handed out in page-aligned pieces that never overlap.
pub struct FreeRam {
    start: u64,
    memory_map: MemoryMap,
}

impl FreeRam {
    /// # Safety
    /// `image_end` must be the end of the loaded guest image (bss included), and at most one
    /// `FreeRam` may exist: nothing else in the guest uses memory above the image.
    /// The first piece starts on the first 2 MiB boundary after the image.
    pub unsafe fn new(image_end: u64, memory_map: MemoryMap) -> Self {
        Self {
            start: image_end.next_multiple_of(WORKING_SET_ALIGN),
            memory_map,
        }
    }

    /// The first `bytes` of free RAM (a multiple of 4 KiB), if the memory map says it is RAM.
    pub fn working_set(mut self, bytes: u64) -> Result<&'static mut [u64], CmdlineError<'static>> {
        self.take(bytes)
    }

    /// Whether any byte of [start, end) is RAM according to the loader's memory map.
    pub fn overlaps_ram(&self, start: u64, end: u64) -> bool {
        self.memory_map.overlaps_ram(start, end)
    }

    /// The next `bytes` of free RAM (a multiple of 4 KiB, so every piece is page-aligned), if
    /// the memory map says it is RAM.
    pub fn take(&mut self, bytes: u64) -> Result<&'static mut [u64], CmdlineError<'static>> {
        let in_ram = self
            .start
            .checked_add(bytes)
            .is_some_and(|end| self.memory_map.is_ram(self.start, end));
        if !in_ram {
            return Err(CmdlineError::NotInRam {
                start: self.start,
                bytes,
            });
        }
        let words = usize::try_from(bytes / 8).expect("usize is 64 bits on x86_64");
        let start = self.start;
        self.start += bytes;
        // SAFETY: [start, start + bytes) is RAM per the loader's memory map, identity-mapped, lies
        // above the guest image, and `self` (the only FreeRam) moved past it, so it hands this
        // range out only once.
        Ok(unsafe { core::slice::from_raw_parts_mut(start as *mut u64, words) })
    }
}

/// splitmix64's output function: a cheap, well-mixed 64-bit bijection.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// One FNV-1a step over a whole 64-bit word.
fn fnv_step(hash: u64, word: u64) -> u64 {
    (hash ^ word).wrapping_mul(0x0000_0100_0000_01b3)
}

/// FNV-1a, word by word, over every u64 of `words`.
fn checksum(words: &[u64]) -> u64 {
    words
        .iter()
        .fold(FNV_OFFSET, |hash, &word| fnv_step(hash, word))
}
