//! Flattening: one full checkpoint equal to an incremental checkpoint's chain.

use crate::error::Result;
use crate::manifest::Manifest;
use crate::reader::Checkpoint;
use crate::store::{Layout, Store};
use crate::writer::CheckpointWriter;
use crate::PAGE_SIZE;

/// Pages read, verified and written per step (2 MiB).
const RUN_PAGES: u64 = 512;

/// Writes into `out` a full checkpoint equal to `from` resolved down its chain: every page
/// (read from the newest checkpoint of the chain that holds it, verified against that
/// checkpoint's index), the same state, configuration, options, instant and hot set. The
/// metrics are those of the flattening (no pause). Returns the manifest written.
pub fn flatten(from: &Checkpoint, out: &dyn Store) -> Result<Manifest> {
    let started = std::time::Instant::now();
    let source = from.manifest();
    let mut writer = CheckpointWriter::create(
        out,
        &Layout {
            mem_size: source.memory.mem_size,
        },
    )?;
    let pages = from.pages();
    let mut buf = vec![0u8; RUN_PAGES as usize * PAGE_SIZE];
    let mut first = 0;
    while first < pages {
        let count = RUN_PAGES.min(pages - first);
        let run = &mut buf[..count as usize * PAGE_SIZE];
        from.read_pages(first, run)?;
        for (i, page) in run.chunks_exact(PAGE_SIZE).enumerate() {
            from.verify_page(first + i as u64, page)?;
        }
        writer.memory().write_pages(first, run)?;
        first += count;
    }
    writer.write_state(from.state_bytes())?;
    writer.set_vm_config(source.vm.clone());
    writer.set_options(source.options);
    writer.set_hot_pages(source.memory.hot_pages.clone());
    writer.set_created_unix_ms(source.created_unix_ms);
    writer.set_metrics(crate::Metrics {
        total_us: started.elapsed().as_micros() as u64,
        ..crate::Metrics::default()
    });
    writer.finish()
}
