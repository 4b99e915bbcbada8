//! The prefetcher: reads the whole page index, then installs every block nobody has faulted on
//! yet, the checkpoint's hot set first (the blocks the guest was writing while it was
//! checkpointed, in the order it wrote them), then the rest in address order, having told the
//! source that it reads in order (so that a store on a device reads ahead while it installs);
//! then waits for the blocks the fault handler is still installing and lets go of memory.

use std::sync::atomic::Ordering;
use std::time::Instant;

use tracing::debug;

use super::{finish_resident, Installer, Shared, BLOCK_PAGES};
use crate::memory::PAGE_SIZE;

/// The blocks in prefetch order: those holding `hot_pages` (in that order, each once), then all
/// others ascending. Pages out of range are ignored.
pub(super) fn order(hot_pages: &[u64], blocks: u64) -> Vec<u64> {
    let mut seen = vec![false; blocks as usize];
    let mut out = Vec::with_capacity(blocks as usize);
    for block in hot_pages.iter().map(|p| p / BLOCK_PAGES).chain(0..blocks) {
        if let Some(s) = seen.get_mut(block as usize) {
            if !*s {
                *s = true;
                out.push(block);
            }
        }
    }
    out
}

pub(super) fn prefetch_loop(shared: &Shared, order: &[u64]) {
    // The whole page index is read here, off the path to the first instruction: faults served
    // before it is there verify their blocks against its segments alone.
    let started = Instant::now();
    if let Err(e) = shared.source.prepare() {
        shared.fail(&e);
        return;
    }
    debug!(
        after_us = shared.started.elapsed().as_micros() as u64,
        took_us = started.elapsed().as_micros() as u64,
        "page source prepared"
    );
    shared.source.reads_in_order();
    let mut buf = vec![0u8; (BLOCK_PAGES * PAGE_SIZE) as usize];
    for &block in order {
        if shared.stop.load(Ordering::Acquire) || shared.is_finished() {
            return;
        }
        if shared.claim(block) && shared.serve(block, &mut buf, Installer::Prefetch).is_err() {
            return;
        }
    }
    // Blocks claimed by the fault handler may still be being installed.
    let finished = shared.finished.lock().unwrap_or_else(|p| p.into_inner());
    let finished = shared
        .finished_cv
        .wait_while(finished, |f| {
            f.is_none()
                && !shared.stop.load(Ordering::Acquire)
                && shared.resident.load(Ordering::Acquire) < shared.block_count()
        })
        .unwrap_or_else(|p| p.into_inner());
    let all_resident =
        finished.is_none() && shared.resident.load(Ordering::Acquire) == shared.block_count();
    drop(finished);
    if all_resident {
        finish_resident(shared);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hot_blocks_come_first_then_the_rest_once() {
        assert_eq!(order(&[1030, 5, 9999, 700, 1100], 4), vec![2, 0, 1, 3]);
        assert_eq!(order(&[], 3), vec![0, 1, 2]);
    }
}
