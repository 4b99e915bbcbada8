//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use ckpt_format::{
    encode_state, CheckpointOptions, CheckpointWriter, DiskConfig, DiskFormat, Layout, Manifest,
    Metrics, Store, Strategy, VmConfig, PAGE_SIZE,
};

pub const PAGES: u64 = 300;
pub const MEM_SIZE: u64 = PAGES * PAGE_SIZE as u64;

/// Deterministic page content; every 4th page (and page 1) is zero.
pub fn page(seed: u64, i: u64) -> [u8; PAGE_SIZE] {
    let mut p = [0u8; PAGE_SIZE];
    if i % 4 == 0 || i == 1 {
        return p;
    }
    let mut x = seed ^ (i.wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1;
    for chunk in p.chunks_exact_mut(8) {
        // xorshift64
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes());
    }
    p
}

#[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
pub struct FakeState {
    pub vcpus: Vec<u64>,
    pub serial: String,
}

pub fn state_bytes() -> Vec<u8> {
    encode_state(&FakeState {
        vcpus: vec![1, 2, 3],
        serial: "ttyS0".into(),
    })
    .unwrap()
}

pub fn vm_config() -> VmConfig {
    VmConfig {
        mem_size: MEM_SIZE,
        vcpus: 2,
        kernel: Some("/boot/vmlinux".into()),
        cmdline: Some("console=ttyS0".into()),
        disks: vec![DiskConfig {
            id: "vda".into(),
            path: "/ckpt/disk0.qcow2".into(),
            format: DiskFormat::Qcow2,
            readonly: false,
        }],
        devices: vec![],
    }
}

/// `bytes` copied into a buffer at a page-aligned address (`aligned`), or at one that is not:
/// a directory store writes the first kind with direct I/O and the second through the page
/// cache, and both must read back the same.
fn placed(bytes: &[u8], aligned: bool, scratch: &mut Vec<u8>) -> std::ops::Range<usize> {
    scratch.clear();
    scratch.resize(bytes.len() + 2 * PAGE_SIZE, 0);
    let mut at = scratch.as_ptr().align_offset(PAGE_SIZE);
    if !aligned {
        at += 8;
    }
    scratch[at..at + bytes.len()].copy_from_slice(bytes);
    at..at + bytes.len()
}

/// Writes pages out of order: `threads` threads, each taking pages in a scattered order
/// (thread t takes pages with `(i * 7) % threads == t`, walking backwards), a few via runs;
/// runs from page-aligned memory, single pages from memory that is not, and every eighth page
/// (a zero page) recorded as zero without bytes.
pub fn write_memory(writer: &CheckpointWriter, pages: u64, seed: u64, threads: u64) {
    std::thread::scope(|s| {
        for t in 0..threads {
            let mem = Arc::clone(writer.memory());
            s.spawn(move || {
                let mut scratch = Vec::new();
                let mine: Vec<u64> = (0..pages)
                    .rev()
                    .filter(|i| (i * 7) % threads == t)
                    .collect();
                let mut k = 0;
                while k < mine.len() {
                    // Every so often, a run of two consecutive pages if both are ours.
                    if k + 1 < mine.len() && mine[k + 1] + 1 == mine[k] && mine[k] % 5 == 0 {
                        let first = mine[k + 1];
                        let mut run = Vec::from(page(seed, first));
                        run.extend_from_slice(&page(seed, first + 1));
                        let at = placed(&run, true, &mut scratch);
                        mem.write_pages(first, &scratch[at]).unwrap();
                        k += 2;
                    } else if mine[k] % 8 == 0 {
                        // A zero page (every fourth page is), recorded without its bytes.
                        assert!(page(seed, mine[k]).iter().all(|&b| b == 0));
                        mem.write_zero(mine[k], 1).unwrap();
                        k += 1;
                    } else {
                        let at = placed(&page(seed, mine[k]), false, &mut scratch);
                        mem.write_pages(mine[k], &scratch[at]).unwrap();
                        k += 1;
                    }
                }
            });
        }
    });
}

/// Writes a complete checkpoint of `PAGES` pages into `store`.
pub fn write_checkpoint(store: &dyn Store, seed: u64) -> Manifest {
    let mut w = CheckpointWriter::create(store, &Layout { mem_size: MEM_SIZE }).unwrap();
    write_memory(&w, PAGES, seed, 3);
    w.write_state(&state_bytes()).unwrap();
    w.set_vm_config(vm_config());
    w.set_options(CheckpointOptions {
        strategy: Strategy::Fork,
        ..Default::default()
    });
    w.set_metrics(Metrics {
        pause_us: 900,
        total_us: 12_000,
        pages_saved_by_fault: 10,
        pages_saved_in_background: PAGES - 10,
        ..Default::default()
    });
    w.finish().unwrap()
}

pub fn expected_zero_pages(pages: u64) -> u64 {
    (0..pages).filter(|&i| i % 4 == 0 || i == 1).count() as u64
}

/// Flips one bit of `path` at `offset`.
pub fn flip_byte(path: &Path, offset: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= 0x10;
    f.write_all_at(&b, offset).unwrap();
}

/// Counts calls, for progress callbacks.
pub struct Counter(pub AtomicU64);
impl Counter {
    pub fn bump(&self, v: u64) {
        self.0.fetch_max(v, Ordering::Relaxed);
    }
}
