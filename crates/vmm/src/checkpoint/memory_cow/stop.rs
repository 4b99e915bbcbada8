//! Stop-and-copy: the VM stays paused while all of memory is copied. The baseline the live
//! strategies are measured against (Firecracker's and QEMU's `savevm` way), with one difference:
//! the pause copies memory into an arena of host memory mapped before it, at memory speed, and
//! the VM resumes before the copies are written to the store. What does not fit the arena is
//! written to the store in the pause.

use ckpt_format::MemoryWriter;
use tracing::debug;

use super::{populated_in, save_all, Arena, CowError, SaveCounters, Unpopulated, RUN_PAGES};
use crate::checkpoint::dirty::PageBits;
use crate::memory::{RamRegion, PAGE_SIZE};

/// One checkpoint's stop-and-copy: the arena, and the runs of pages copied into it.
pub struct StopCopy {
    unpopulated: Unpopulated,
    arena: Option<Arena>,
    /// (first image page, pages, offset in the arena), in arena order.
    runs: Vec<(u64, u64, usize)>,
}

impl std::fmt::Debug for StopCopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StopCopy")
            .field("arena", &self.arena.as_ref().map(|a| a.len()))
            .field("runs", &self.runs.len())
            .finish()
    }
}

impl StopCopy {
    /// While the VM runs: maps and populates the arena, as large as the pages the guest has
    /// populated (all of memory where they are not known), at most `budget` bytes. Without an
    /// arena (none fits, or mapping it fails) all of memory is written in the pause.
    pub fn prepare(regions: &[RamRegion], unpopulated: Unpopulated, budget: u64) -> StopCopy {
        let all: u64 = regions.iter().map(RamRegion::pages).sum();
        let wanted = match unpopulated {
            Unpopulated::Zero => populated_in(regions, RUN_PAGES).map_or(all, |(pages, _)| pages),
            Unpopulated::Read => all,
        };
        let len = (wanted * PAGE_SIZE).min(budget / PAGE_SIZE * PAGE_SIZE);
        let arena = (len > 0)
            .then(|| {
                Arena::new(len as usize, true)
                    .map_err(|e| debug!(len, "no arena for stop-and-copy: {e}"))
                    .ok()
            })
            .flatten();
        StopCopy {
            unpopulated,
            arena,
            runs: Vec::new(),
        }
    }

    /// Copies all of guest memory (but the pages of `in_parent`, kept in the parent
    /// checkpoint) into the arena, and writes what does not fit to the store. Must be called
    /// while the VM (vCPUs and devices) is paused — the caller holds the pause for the whole
    /// call.
    pub fn copy_while_paused(
        &mut self,
        regions: &[RamRegion],
        writer: &MemoryWriter,
        counters: &SaveCounters,
        in_parent: Option<&PageBits>,
    ) -> Result<(), CowError> {
        let StopCopy {
            unpopulated,
            arena,
            runs,
        } = self;
        let mut sink = |first: u64, bytes: &[u8]| -> Result<(), CowError> {
            let used = runs.last().map_or(0, |&(_, pages, offset)| {
                offset + (pages * PAGE_SIZE) as usize
            });
            match arena {
                Some(arena) if arena.len() - used >= bytes.len() => {
                    arena[used..used + bytes.len()].copy_from_slice(bytes);
                    runs.push((first, bytes.len() as u64 / PAGE_SIZE, used));
                    Ok(())
                }
                _ => writer.write_pages(first, bytes).map_err(CowError::Store),
            }
        };
        // SAFETY: the caller holds the VM paused, so nothing writes guest memory.
        unsafe {
            save_all(
                regions,
                writer,
                counters,
                in_parent,
                *unpopulated,
                &mut sink,
            )
        }
    }

    /// After the resume: writes the copies in the arena to the store, and frees it.
    pub fn write_out(self, writer: &MemoryWriter) -> Result<(), CowError> {
        let Some(arena) = &self.arena else {
            return Ok(());
        };
        for &(first, pages, offset) in &self.runs {
            let len = (pages * PAGE_SIZE) as usize;
            writer
                .write_pages(first, &arena[offset..offset + len])
                .map_err(CowError::Store)?;
        }
        Ok(())
    }
}
