//! Round trips through every store, with pages written out of order from several threads.

mod common;

use std::os::unix::fs::FileExt;
use std::sync::atomic::AtomicU64;

use ckpt_format::{
    checksum, Checkpoint, CheckpointWriter, DirStore, Error, Layout, MemStore, MemorySource,
    PageState, RawStore, Store, MEMORY_ALIGN, PAGE_SIZE,
};
use common::*;

fn check_round_trip(store: &dyn Store, seed: u64) {
    let written = write_checkpoint(store, seed);
    let ckpt = Checkpoint::open(store).unwrap();
    assert_eq!(ckpt.manifest(), &written);
    let m = ckpt.manifest();
    assert_eq!(m.format, "cowvm-checkpoint");
    assert_eq!(m.format_version, ckpt_format::FORMAT_VERSION);
    assert_eq!(m.memory.pages, PAGES);
    assert_eq!(m.memory.zero_pages, expected_zero_pages(PAGES));
    assert_eq!(m.metrics.zero_pages, expected_zero_pages(PAGES));
    let present = PAGES - expected_zero_pages(PAGES);
    assert!(m.metrics.bytes_written >= present * PAGE_SIZE as u64);
    assert_eq!(m.metrics.pause_us, 900);
    assert_eq!(m.vm, vm_config());
    assert_eq!(ckpt.state_bytes(), state_bytes().as_slice());
    let state: FakeState = ckpt.decode_state().unwrap();
    assert_eq!(state.serial, "ttyS0");

    // Every page: bytes and hash, through read_page and through the mappable file offset.
    let MemorySource::File {
        file,
        offset,
        len,
        holes_read_as_zero,
    } = ckpt.memory_source().unwrap()
    else {
        panic!("file-backed store");
    };
    assert_eq!(
        offset % MEMORY_ALIGN,
        0,
        "memory section must be 2 MiB aligned"
    );
    assert_eq!(len, MEM_SIZE);
    assert!(holes_read_as_zero);
    let mut buf = [0u8; PAGE_SIZE];
    for i in 0..PAGES {
        let want = page(seed, i);
        ckpt.read_page(i, &mut buf).unwrap();
        assert_eq!(buf, want, "page {i} via read_page");
        ckpt.verify_page(i, &buf).unwrap();
        let mut mapped = [0u8; PAGE_SIZE];
        file.read_exact_at(&mut mapped, offset + i * PAGE_SIZE as u64)
            .unwrap();
        assert_eq!(mapped, want, "page {i} at the mappable offset");
        let entry = ckpt.page_index().unwrap().entry(i).unwrap();
        assert_eq!(entry.hash, checksum(&want), "page {i} hash");
        let zero = i % 4 == 0 || i == 1;
        assert_eq!(entry.state == PageState::Zero, zero, "page {i} state");
    }
    // A run read.
    let mut run = vec![0u8; 10 * PAGE_SIZE];
    ckpt.read_pages(100, &mut run).unwrap();
    for (k, p) in run.chunks_exact(PAGE_SIZE).enumerate() {
        assert_eq!(p, page(seed, 100 + k as u64));
    }
    let counter = Counter(AtomicU64::new(0));
    let report = ckpt.verify_memory(3, &|n| counter.bump(n)).unwrap();
    assert_eq!(report.pages_verified, present);
    assert_eq!(report.zero_pages, expected_zero_pages(PAGES));
    assert_eq!(counter.0.into_inner(), PAGES);
}

#[test]
fn dir_store_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let store = DirStore::new(dir.path().join("ckpt"));
    check_round_trip(&store, 1);
    let names: Vec<_> = std::fs::read_dir(store.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    for f in DirStore::FILES {
        assert!(names.contains(&f.to_string()), "{f} missing in {names:?}");
    }
    let manifest = std::fs::read_to_string(store.path().join("manifest.json")).unwrap();
    assert!(manifest.contains("\"strategy\": \"fork\""), "{manifest}");
}

#[test]
fn raw_store_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("raw");
    let store =
        RawStore::create_file(&path, RawStore::needed_capacity(MEM_SIZE, 4096, 8192)).unwrap();
    // Stale bytes where zero pages will be (past the store's superblock and commit record):
    // the punched hole must hide them.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .write_all_at(&[0xAA; (3 << 20) - 8192], 8192)
        .unwrap();
    check_round_trip(&store, 2);
    // Again over the previous checkpoint.
    check_round_trip(&store, 3);
}

#[test]
fn mem_store_round_trip() {
    let store = MemStore::new().unwrap();
    check_round_trip(&store, 4);
    check_round_trip(&store, 5);
    // Another holder of the memfd sees the same checkpoint.
    let other = MemStore::from_file(store.file().try_clone().unwrap());
    let ckpt = Checkpoint::open(&other).unwrap();
    ckpt.verify_memory(1, &|_| {}).unwrap();
}

#[test]
fn progress_counts_pages_and_bytes() {
    let store = MemStore::new().unwrap();
    let w = CheckpointWriter::create(&store, &Layout { mem_size: MEM_SIZE }).unwrap();
    w.memory().write_page(3, &page(9, 3)).unwrap();
    w.memory().write_page(4, &page(9, 4)).unwrap(); // zero
    let p = w.memory().progress();
    assert_eq!(
        (p.pages_done, p.pages_total, p.zero_pages, p.bytes_written),
        (2, PAGES, 1, 4096)
    );
    // Pages known to be zero are recorded without bytes, once.
    w.memory().write_zero(5, 2).unwrap();
    let p = w.memory().progress();
    assert_eq!((p.pages_done, p.zero_pages, p.bytes_written), (4, 3, 4096));
    assert!(w.memory().write_zero(2, 2).is_err(), "page 3 was saved");
    assert!(w.memory().write_zero(PAGES - 1, 2).is_err(), "past the end");
    assert_eq!(w.memory().progress().pages_done, 4);
    // The refused run left page 2 unclaimed.
    w.memory().write_zero(2, 1).unwrap();
}

/// The `fork` split: the child's copy writes memory and the page index; the parent adopts
/// its report and completes.
#[test]
fn fork_split_child_writes_memory_parent_completes() {
    let dir = tempfile::tempdir().unwrap();
    for store in [
        Box::new(DirStore::new(dir.path().join("c"))) as Box<dyn Store>,
        Box::new(MemStore::new().unwrap()),
    ] {
        let mut parent =
            CheckpointWriter::create(store.as_ref(), &Layout { mem_size: MEM_SIZE }).unwrap();
        let mut child = parent.fork_copy();
        parent.write_state(&state_bytes()).unwrap();
        write_memory(&child, PAGES, 7, 2);
        let report = child.finish_memory().unwrap();
        // Through JSON, as over a pipe.
        let report = serde_json::from_slice(&serde_json::to_vec(&report).unwrap()).unwrap();
        drop(child);
        parent.adopt_memory(report).unwrap();
        parent.set_vm_config(vm_config());
        let manifest = parent.finish().unwrap();
        assert_eq!(manifest.memory.zero_pages, expected_zero_pages(PAGES));
        let ckpt = Checkpoint::open(store.as_ref()).unwrap();
        ckpt.verify_memory(2, &|_| {}).unwrap();
        let mut buf = [0u8; PAGE_SIZE];
        ckpt.read_page(7, &mut buf).unwrap();
        assert_eq!(buf, page(7, 7));
    }
}

#[test]
fn adopt_memory_rejects_a_report_that_does_not_match() {
    let store = MemStore::new().unwrap();
    let mut parent = CheckpointWriter::create(&store, &Layout { mem_size: MEM_SIZE }).unwrap();
    let mut child = parent.fork_copy();
    write_memory(&child, PAGES, 7, 1);
    let mut report = child.finish_memory().unwrap();
    report.zero_pages += 1;
    assert!(matches!(
        parent.adopt_memory(report.clone()),
        Err(Error::BadMemoryReport { .. })
    ));
    report.zero_pages -= 1;
    report.page_index.checksum = Some(ckpt_format::Checksum(1));
    assert!(matches!(
        parent.adopt_memory(report),
        Err(Error::ChecksumMismatch { .. })
    ));
}
