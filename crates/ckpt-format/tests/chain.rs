//! Incremental checkpoints: a chain resolves page by page, newest first; a missing, incomplete
//! or replaced parent is refused naming it.

mod common;

use ckpt_format::{
    Checkpoint, CheckpointWriter, Checksum, DirStore, Error, Layout, PageState, ParentRef, Store,
    PAGE_SIZE,
};
use common::*;
use std::sync::Arc;

/// The pages an incremental checkpoint `n` of the chain writes (the others are in its parent).
fn changed(n: u64, page: u64) -> bool {
    page % 7 == n % 7 || page == n
}

/// Content of `page` after `n` incremental checkpoints (0: the full one).
fn content(n: u64, page: u64) -> [u8; PAGE_SIZE] {
    let last = (1..=n).rev().find(|&k| changed(k, page)).unwrap_or(0);
    common::page(1000 + last, page)
}

/// Writes incremental checkpoint `n`: odd ones are told which pages are unchanged, even ones
/// save every page and find the unchanged ones by comparing with the parent's index.
fn write_incremental(store: &dyn Store, parent: &str, n: u64) {
    let parent_ckpt = Checkpoint::open(&DirStore::new(parent)).unwrap();
    let mut w = CheckpointWriter::create(store, &Layout { mem_size: MEM_SIZE }).unwrap();
    let compare = n % 2 == 0;
    if compare {
        let index = parent_ckpt.page_index().unwrap().clone();
        w.memory().compare_with_parent(Arc::new(index)).unwrap();
    }
    for p in 0..PAGES {
        if changed(n, p) || compare {
            w.memory().write_page(p, &content(n, p)).unwrap();
        } else {
            w.memory().keep_in_parent(p, 1).unwrap();
        }
    }
    w.write_state(&state_bytes()).unwrap();
    w.set_vm_config(vm_config());
    w.set_parent(ParentRef {
        address: parent.to_string(),
        manifest_checksum: Checksum(parent_ckpt.manifest_checksum()),
    });
    let m = w.finish().unwrap();
    let kept = (0..PAGES)
        .filter(|&p| !(changed(n, p) || compare && content(n, p) == [0; PAGE_SIZE]))
        .count() as u64;
    assert_eq!(m.metrics.pages_in_parent, kept);
}

fn full(store: &dyn Store) {
    let mut w = CheckpointWriter::create(store, &Layout { mem_size: MEM_SIZE }).unwrap();
    for p in 0..PAGES {
        w.memory().write_page(p, &content(0, p)).unwrap();
    }
    w.write_state(&state_bytes()).unwrap();
    w.set_vm_config(vm_config());
    w.finish().unwrap();
}

#[test]
fn a_chain_of_ten_resolves_newest_first() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = |n: u64| tmp.path().join(format!("c{n}")).display().to_string();
    full(&DirStore::new(dir(0)));
    for n in 1..=10 {
        write_incremental(&DirStore::new(dir(n)), &dir(n - 1), n);
    }
    let ckpt = Checkpoint::open(&DirStore::new(dir(10))).unwrap();
    assert_eq!(
        ckpt.parent()
            .unwrap()
            .manifest()
            .parent
            .as_ref()
            .unwrap()
            .address,
        dir(8)
    );
    assert!(ckpt.own_page_index().unwrap().parent_pages() > 0);
    assert_eq!(ckpt.page_index().unwrap().parent_pages(), 0);
    let mut buf = vec![0u8; PAGES as usize * PAGE_SIZE];
    ckpt.read_pages(0, &mut buf).unwrap();
    for (p, bytes) in buf.chunks_exact(PAGE_SIZE).enumerate() {
        assert_eq!(bytes, content(10, p as u64), "page {p}");
        ckpt.verify_page(p as u64, bytes).unwrap();
    }
    let report = ckpt.verify_memory(2, &|_| {}).unwrap();
    assert_eq!(report.pages_verified + report.zero_pages, PAGES);
    assert!(matches!(
        ckpt.memory_source().unwrap(),
        ckpt_format::MemorySource::Pages
    ));

    // A corrupt page of a parent is found by the child's verification, naming the parent.
    let img = tmp.path().join("c4/memory.img");
    let page = (0..PAGES)
        .find(|&p| {
            changed(4, p) && (5..=10).all(|k| !changed(k, p)) && content(10, p) != [0; PAGE_SIZE]
        })
        .unwrap();
    flip_byte(&img, page * PAGE_SIZE as u64 + 5);
    let ckpt = Checkpoint::open(&DirStore::new(dir(10))).unwrap();
    let err = ckpt.verify_memory(1, &|_| {}).unwrap_err();
    assert!(
        matches!(err, Error::PageMismatch { page: p, .. } if p == page),
        "{err}"
    );
    let mut one = [0u8; PAGE_SIZE];
    ckpt.read_page(page, &mut one).unwrap();
    assert!(ckpt.verify_page(page, &one).is_err());
    let entry = ckpt.own_page_index().unwrap().entry(page).unwrap();
    assert_eq!(entry.state, PageState::Parent);
}

#[test]
fn a_missing_incomplete_or_replaced_parent_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = |n: &str| tmp.path().join(n).display().to_string();
    full(&DirStore::new(dir("full")));
    write_incremental(&DirStore::new(dir("incr")), &dir("full"), 1);
    Checkpoint::open(&DirStore::new(dir("incr"))).unwrap();

    // Incomplete.
    std::fs::rename(
        tmp.path().join("full/COMPLETE"),
        tmp.path().join("COMPLETE.saved"),
    )
    .unwrap();
    let err = Checkpoint::open(&DirStore::new(dir("incr"))).unwrap_err();
    assert!(
        matches!(&err, Error::Parent { address, source } if *address == dir("full")
        && matches!(**source, Error::Incomplete { .. })),
        "{err}"
    );
    assert!(err.to_string().contains(&dir("full")));
    std::fs::rename(
        tmp.path().join("COMPLETE.saved"),
        tmp.path().join("full/COMPLETE"),
    )
    .unwrap();

    // Replaced by another checkpoint.
    std::fs::rename(tmp.path().join("full"), tmp.path().join("full.saved")).unwrap();
    full_other(&DirStore::new(dir("full")));
    let err = Checkpoint::open(&DirStore::new(dir("incr"))).unwrap_err();
    assert!(matches!(err, Error::ParentMismatch { .. }), "{err}");
    std::fs::remove_dir_all(tmp.path().join("full")).unwrap();

    // Missing.
    let err = Checkpoint::open(&DirStore::new(dir("incr"))).unwrap_err();
    assert!(
        matches!(&err, Error::Parent { address, .. } if *address == dir("full")),
        "{err}"
    );
}

fn full_other(store: &dyn Store) {
    write_checkpoint(store, 77);
}

#[test]
fn a_flattened_chain_equals_the_chain() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = |n: u64| tmp.path().join(format!("c{n}")).display().to_string();
    full(&DirStore::new(dir(0)));
    for n in 1..=4 {
        write_incremental(&DirStore::new(dir(n)), &dir(n - 1), n);
    }
    let chain = Checkpoint::open(&DirStore::new(dir(4))).unwrap();
    let flat_dir = tmp.path().join("flat");
    let m = ckpt_format::flatten(&chain, &DirStore::new(&flat_dir)).unwrap();
    assert!(m.parent.is_none());
    assert_eq!(m.created_unix_ms, chain.manifest().created_unix_ms);
    // The flattened checkpoint stands alone: the chain may go.
    for n in 0..=4 {
        std::fs::remove_dir_all(dir(n)).unwrap();
    }
    let flat = Checkpoint::open(&DirStore::new(&flat_dir)).unwrap();
    assert_eq!(flat.state_bytes(), state_bytes());
    assert_eq!(flat.own_page_index().unwrap().parent_pages(), 0);
    let mut page = [0u8; PAGE_SIZE];
    for p in 0..PAGES {
        flat.read_page(p, &mut page).unwrap();
        assert_eq!(page, content(4, p), "page {p}");
    }
    flat.verify_memory(2, &|_| {}).unwrap();
}

#[test]
fn index_segments_of_a_chain_resolve_and_verify_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = |n: u64| tmp.path().join(format!("c{n}")).display().to_string();
    full(&DirStore::new(dir(0)));
    for n in 1..=4 {
        write_incremental(&DirStore::new(dir(n)), &dir(n - 1), n);
    }
    let ckpt = Checkpoint::open_deferred(&DirStore::new(dir(4))).unwrap();
    assert!(ckpt.has_index_segments());
    for first in [0, 17, PAGES - 1] {
        let segment = ckpt.index_segment(first..first + 1).unwrap();
        assert!(segment.pages().contains(&first));
        let pages = segment.pages();
        let mut buf = vec![0u8; (pages.end - pages.start) as usize * PAGE_SIZE];
        ckpt.read_pages_in(&segment, pages.start, &mut buf).unwrap();
        for (i, bytes) in buf.chunks_exact(PAGE_SIZE).enumerate() {
            let p = pages.start + i as u64;
            assert_eq!(bytes, content(4, p), "page {p}");
            segment.verify(p, bytes).unwrap();
        }
    }
    assert!(
        !ckpt.page_index_loaded(),
        "segments are read without the index"
    );
    let segment = ckpt.index_segment(0..PAGES).unwrap();
    let whole = ckpt.page_index().unwrap();
    for p in 0..PAGES {
        assert_eq!(segment.entry(p), whole.entry(p), "page {p}");
    }

    // A corrupt segment of a parent's index is refused, naming the parent.
    flip_byte(&tmp.path().join("c2/page-index.bin"), 40);
    let ckpt = Checkpoint::open_deferred(&DirStore::new(dir(4))).unwrap();
    let err = ckpt.index_segment(0..1).unwrap_err();
    assert!(
        matches!(&err, Error::Parent { address, source }
            if address == &dir(2) && source.to_string().contains("page-index (pages 0..")),
        "{err}"
    );
}
