//! Stop-and-copy: the VM stays paused while all of memory is written. The baseline the live
//! strategies are measured against (Firecracker's and QEMU's `savevm` way).

use ckpt_format::MemoryWriter;

use super::{write_all, CowError, SaveCounters, Unpopulated};
use crate::checkpoint::dirty::PageBits;
use crate::memory::RamRegion;

/// Writes all of guest memory (but the pages of `in_parent`, kept in the parent checkpoint).
/// Must be called while the VM (vCPUs and devices) is paused — the caller holds the pause for
/// the whole call.
pub fn copy_while_paused(
    regions: &[RamRegion],
    writer: &MemoryWriter,
    counters: &SaveCounters,
    in_parent: Option<&PageBits>,
    unpopulated: Unpopulated,
) -> Result<(), CowError> {
    // SAFETY: the caller holds the VM paused, so nothing writes guest memory.
    unsafe { write_all(regions, writer, counters, in_parent, unpopulated) }
}
