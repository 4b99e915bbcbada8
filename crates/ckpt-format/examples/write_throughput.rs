//! Quick throughput check (not a test): writes N MiB of non-zero pages (default 1024) with
//! hashing into a directory store, from T threads (default 2), and reports GB/s next to the
//! cost of hashing alone.
//!
//! `cargo run --release -p ckpt-format --example write_throughput -- <dir> [MiB] [threads]`

use std::sync::Arc;
use std::time::Instant;

use ckpt_format::{
    checksum, page_is_zero, CheckpointWriter, DirStore, Layout, Overwrite, PAGE_SIZE,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = args
        .next()
        .unwrap_or_else(|| "/tmp/cowvm-throughput".into());
    let mib: u64 = args.next().map_or(Ok(1024), |s| s.parse())?;
    let threads: u64 = args.next().map_or(Ok(2), |s| s.parse())?;
    let pages = mib * 256;
    // One 64 MiB source buffer of pseudo-random bytes, reused (content varies per page offset).
    let src: Vec<u8> = (0..64u64 << 20)
        .map(|i| (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8 | 1)
        .collect();
    let src_pages = (src.len() / PAGE_SIZE) as u64;

    let t = Instant::now();
    let mut acc = 0u64;
    for p in 0..pages {
        let s = ((p % src_pages) as usize) * PAGE_SIZE;
        let page = &src[s..s + PAGE_SIZE];
        acc ^= u64::from(page_is_zero(page)) ^ checksum(page);
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "zero-check + xxh3 alone, 1 thread: {:.2} GB/s ({acc:x})",
        (pages * PAGE_SIZE as u64) as f64 / secs / 1e9
    );

    let store = DirStore::new(&dir).overwrite(Overwrite::Any);
    let mut w = CheckpointWriter::create(
        &store,
        &Layout {
            mem_size: pages * PAGE_SIZE as u64,
        },
    )?;
    let t = Instant::now();
    let run = 64u64; // pages per write_pages call (256 KiB)
    std::thread::scope(|s| {
        for th in 0..threads {
            let mem = Arc::clone(w.memory());
            let src = &src;
            s.spawn(move || {
                let mut first = th * run;
                while first < pages {
                    let n = run.min(pages - first);
                    let off = ((first % src_pages) as usize) * PAGE_SIZE;
                    let off = off.min(src.len() - (n as usize) * PAGE_SIZE);
                    mem.write_pages(first, &src[off..off + n as usize * PAGE_SIZE])
                        .expect("write");
                    first += run * threads;
                }
            });
        }
    });
    let write_secs = t.elapsed().as_secs_f64();
    w.write_state(b"state")?;
    let m = w.finish()?;
    let total_secs = t.elapsed().as_secs_f64();
    let bytes = m.metrics.bytes_written as f64;
    println!(
        "{mib} MiB, {threads} threads: pages written in {write_secs:.2} s ({:.2} GB/s), \
         with page index + fsync + marker {total_secs:.2} s ({:.2} GB/s)",
        bytes / write_secs / 1e9,
        bytes / total_secs / 1e9
    );
    Ok(())
}
