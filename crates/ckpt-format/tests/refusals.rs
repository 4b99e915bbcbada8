//! Everything a reader must refuse, and every misuse a writer must report — each with its own
//! error naming the section (or page).

mod common;

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;

use ckpt_format::{
    checksum, Checkpoint, CheckpointWriter, DirStore, Error, Layout, MemStore, Overwrite, RawStore,
    Store, PAGE_SIZE,
};
use common::*;

fn open_err(store: &dyn Store) -> Error {
    Checkpoint::open(store).expect_err("checkpoint must be refused")
}

fn dir_checkpoint() -> (tempfile::TempDir, DirStore) {
    let tmp = tempfile::tempdir().unwrap();
    let store = DirStore::new(tmp.path().join("ckpt"));
    write_checkpoint(&store, 11);
    (tmp, store)
}

/// Rewrites manifest.json with `edit` applied and a COMPLETE marker that matches it, so only
/// the edit is under test.
fn rewrite_manifest(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    edit(&mut v);
    let bytes = serde_json::to_vec_pretty(&v).unwrap();
    fs::write(dir.join("manifest.json"), &bytes).unwrap();
    fs::write(
        dir.join("COMPLETE"),
        format!(
            "cowvm-checkpoint complete\nmanifest manifest.json\nlength {}\nchecksum xxh3:{:016x}\n",
            bytes.len(),
            checksum(&bytes)
        ),
    )
    .unwrap();
}

#[test]
fn missing_marker_is_incomplete() {
    let (_tmp, store) = dir_checkpoint();
    fs::remove_file(store.path().join("COMPLETE")).unwrap();
    let e = open_err(&store);
    assert!(matches!(e, Error::Incomplete { .. }), "{e}");
    assert!(e.to_string().contains("incomplete"), "{e}");
}

#[test]
fn writer_dropped_without_finish_is_incomplete() {
    let tmp = tempfile::tempdir().unwrap();
    for store in [
        Box::new(MemStore::new().unwrap()) as Box<dyn Store>,
        Box::new(DirStore::new(tmp.path().join("x"))),
    ] {
        let mut w =
            CheckpointWriter::create(store.as_ref(), &Layout { mem_size: MEM_SIZE }).unwrap();
        write_memory(&w, PAGES, 1, 2);
        w.write_state(b"s").unwrap();
        drop(w);
        assert!(matches!(open_err(store.as_ref()), Error::Incomplete { .. }));
    }
}

#[test]
fn raw_store_rewrite_is_incomplete_until_finished() {
    let tmp = tempfile::tempdir().unwrap();
    let store = RawStore::create_file(tmp.path().join("raw"), 8 << 20).unwrap();
    write_checkpoint(&store, 1);
    Checkpoint::open(&store).unwrap();
    // Starting a new checkpoint over it invalidates the old one at once.
    let w = CheckpointWriter::create(&store, &Layout { mem_size: MEM_SIZE }).unwrap();
    assert!(matches!(open_err(&store), Error::Incomplete { .. }));
    drop(w);
    assert!(matches!(open_err(&store), Error::Incomplete { .. }));
}

#[test]
fn truncated_sections_are_named() {
    for (file, section) in [
        ("state.bin", "state"),
        ("page-index.bin", "page-index"),
        ("manifest.json", "manifest"),
        ("memory.img", "memory"),
    ] {
        let (_tmp, store) = dir_checkpoint();
        let path = store.path().join(file);
        let len = fs::metadata(&path).unwrap().len();
        fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len - 1)
            .unwrap();
        match open_err(&store) {
            Error::Truncated {
                section: s,
                expected,
                found,
            } => {
                assert_eq!(s, section);
                assert_eq!((expected, found), (len, len - 1), "{section}");
            }
            e => panic!("{section}: expected truncation, got {e}"),
        }
    }
}

#[test]
fn flipped_bytes_are_named() {
    for (file, section) in [
        ("state.bin", "state"),
        ("page-index.bin", "page-index"),
        ("manifest.json", "manifest"),
    ] {
        let (_tmp, store) = dir_checkpoint();
        flip_byte(&store.path().join(file), 5);
        match open_err(&store) {
            Error::ChecksumMismatch { section: s, .. } => assert_eq!(s, section),
            e => panic!("{section}: expected checksum mismatch, got {e}"),
        }
    }
}

#[test]
fn flipped_memory_byte_names_the_page() {
    let (_tmp, store) = dir_checkpoint();
    // Page 123 is present (not a multiple of 4).
    flip_byte(
        &store.path().join("memory.img"),
        123 * PAGE_SIZE as u64 + 77,
    );
    let ckpt = Checkpoint::open(&store).expect("memory is verified on demand, not at open");
    let e = ckpt.verify_memory(2, &|_| {}).unwrap_err();
    assert!(matches!(e, Error::PageMismatch { page: 123, .. }), "{e}");
    assert!(e.to_string().contains("memory page 123"), "{e}");
    let mut buf = [0u8; PAGE_SIZE];
    ckpt.read_page(123, &mut buf).unwrap();
    assert!(matches!(
        ckpt.verify_page(123, &buf),
        Err(Error::PageMismatch { page: 123, .. })
    ));
    ckpt.read_page(122, &mut buf).unwrap();
    ckpt.verify_page(122, &buf).unwrap();
}

#[test]
fn stale_bytes_in_a_zero_page_are_never_trusted() {
    let (_tmp, store) = dir_checkpoint();
    // Page 8 is zero: the image is a hole there. Garbage written into it is ignored.
    fs::OpenOptions::new()
        .write(true)
        .open(store.path().join("memory.img"))
        .unwrap()
        .write_all_at(&[0xEE; 64], 8 * PAGE_SIZE as u64)
        .unwrap();
    let ckpt = Checkpoint::open(&store).unwrap();
    let mut buf = [1u8; PAGE_SIZE];
    ckpt.read_page(8, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    ckpt.verify_memory(1, &|_| {}).unwrap();
    buf[0] = 1;
    assert!(matches!(
        ckpt.verify_page(8, &buf),
        Err(Error::ZeroPageMismatch { page: 8 })
    ));
}

#[test]
fn newer_format_version_is_refused() {
    let (_tmp, store) = dir_checkpoint();
    rewrite_manifest(store.path(), |v| {
        v["format_version"] = 3.into();
        v["memory"] = "changed incompatibly".into();
    });
    let e = open_err(&store);
    assert!(
        matches!(
            e,
            Error::UnsupportedVersion {
                found: 3,
                supported: 2,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn older_format_version_is_refused_naming_both_versions() {
    let (_tmp, store) = dir_checkpoint();
    rewrite_manifest(store.path(), |v| {
        v["format_version"] = 1.into();
        v["vm"]["devices"] = serde_json::json!([
            {"id": "serial0", "kind": "serial", "params": {"port": "0x3f8"}}
        ]);
    });
    let e = open_err(&store);
    assert!(
        matches!(
            e,
            Error::OutdatedVersion {
                found: 1,
                supported: 2,
                ..
            }
        ),
        "{e}"
    );
    let text = e.to_string();
    assert!(text.contains('1') && text.contains('2'), "{text}");
}

#[test]
fn unknown_option_value_in_a_manifest_names_value_and_field() {
    let (_tmp, store) = dir_checkpoint();
    rewrite_manifest(store.path(), |v| {
        v["options"]["disk"] = "teleport".into();
    });
    let e = open_err(&store);
    let cause = std::error::Error::source(&e).map(ToString::to_string);
    let text = format!("{e}: {}", cause.unwrap_or_default());
    assert!(
        text.contains("teleport") && text.contains("options.disk"),
        "{text}"
    );
}

#[test]
fn added_manifest_fields_are_tolerated() {
    let (_tmp, store) = dir_checkpoint();
    rewrite_manifest(store.path(), |v| {
        v["format_minor"] = 3.into();
        v["some_new_field"] = serde_json::json!({"x": 1});
        v["metrics"]["new_metric"] = 5.into();
    });
    let ckpt = Checkpoint::open(&store).unwrap();
    assert_eq!(ckpt.manifest().format_minor, 3);
}

#[test]
fn bad_magic_is_refused() {
    let (_tmp, store) = dir_checkpoint();
    rewrite_manifest(store.path(), |v| v["format"] = "qemu-savevm".into());
    let e = open_err(&store);
    assert!(
        matches!(
            e,
            Error::BadMagic {
                what: "manifest",
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn garbled_marker_is_refused() {
    let (_tmp, store) = dir_checkpoint();
    fs::write(store.path().join("COMPLETE"), "half").unwrap();
    assert!(matches!(open_err(&store), Error::Corrupt { .. }));
}

#[test]
fn raw_store_corruption_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("raw");
    let store = RawStore::create_file(&path, 8 << 20).unwrap();
    let m = write_checkpoint(&store, 1);
    let entry = |name: &str| m.sections.iter().find(|s| s.name == name).unwrap().clone();
    // Flipped state byte.
    flip_byte(&path, entry("state").offset + 3);
    assert!(
        matches!(open_err(&store), Error::ChecksumMismatch { section, .. } if section == "state")
    );
    flip_byte(&path, entry("state").offset + 3);
    // Flipped page-index byte.
    flip_byte(&path, entry("page-index").offset + 40);
    assert!(
        matches!(open_err(&store), Error::ChecksumMismatch { section, .. } if section == "page-index")
    );
    flip_byte(&path, entry("page-index").offset + 40);
    Checkpoint::open(&store).unwrap();
    // Flipped superblock byte.
    flip_byte(&path, 30);
    assert!(
        matches!(open_err(&store), Error::ChecksumMismatch { section, .. } if section == "superblock")
    );
    flip_byte(&path, 30);
    // Torn commit record: incomplete.
    flip_byte(&path, 4096 + 20);
    assert!(matches!(open_err(&store), Error::Incomplete { .. }));
    flip_byte(&path, 4096 + 20);
    // Truncated device: the tail (manifest) goes first.
    let f = fs::OpenOptions::new().write(true).open(&path).unwrap();
    let mem = entry("memory");
    f.set_len(mem.offset + mem.length + 10).unwrap();
    let e = open_err(&store);
    assert!(
        matches!(&e, Error::Truncated { section, .. } if section == "manifest"),
        "{e}"
    );
    f.set_len(mem.offset + mem.length - 10).unwrap();
    let e = open_err(&store);
    assert!(
        matches!(&e, Error::Truncated { section, .. } if section == "manifest"),
        "{e}"
    );
    // Not a checkpoint at all.
    f.write_all_at(b"NOTCOWVM", 0).unwrap();
    assert!(matches!(open_err(&store), Error::BadMagic { .. }));
}

#[test]
fn raw_store_too_small_says_needed_and_available() {
    let tmp = tempfile::tempdir().unwrap();
    let store = RawStore::create_file(tmp.path().join("small"), 1 << 20).unwrap();
    let e = CheckpointWriter::create(&store, &Layout { mem_size: MEM_SIZE }).unwrap_err();
    match &e {
        Error::StoreTooSmall {
            needed, available, ..
        } => {
            assert_eq!(*available, 1 << 20);
            assert!(*needed > 2 << 20);
        }
        e => panic!("{e}"),
    }
    assert!(e.to_string().starts_with("store too small"), "{e}");
    // Large enough for memory but not for a big state.
    let store = RawStore::create_file(
        tmp.path().join("tight"),
        RawStore::needed_capacity(MEM_SIZE, 4096, 4096),
    )
    .unwrap();
    let mut w = CheckpointWriter::create(&store, &Layout { mem_size: MEM_SIZE }).unwrap();
    assert!(matches!(
        w.write_state(&vec![1u8; 64 << 10]),
        Err(Error::StoreTooSmall { .. })
    ));
}

#[test]
fn missing_raw_device_is_not_found() {
    let tmp = tempfile::tempdir().unwrap();
    let store = RawStore::new(tmp.path().join("nope"));
    let e = CheckpointWriter::create(&store, &Layout { mem_size: MEM_SIZE }).unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }), "{e}");
    assert!(matches!(open_err(&store), Error::NotFound { .. }));
}

#[test]
fn dir_store_that_disappears_is_not_found() {
    let tmp = tempfile::tempdir().unwrap();
    let store = DirStore::new(tmp.path().join("ckpt"));
    let mut w = CheckpointWriter::create(&store, &Layout { mem_size: MEM_SIZE }).unwrap();
    fs::remove_dir_all(store.path()).unwrap();
    let e = w.write_state(b"state").unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }), "{e}");
    assert!(matches!(open_err(&store), Error::NotFound { .. }));
}

#[test]
fn dir_store_never_overwrites_a_complete_checkpoint_unless_asked() {
    let (_tmp, store) = dir_checkpoint();
    let layout = Layout { mem_size: MEM_SIZE };
    let before = fs::read(store.path().join("memory.img")).unwrap();
    for policy in [Overwrite::Never, Overwrite::Incomplete] {
        let e = CheckpointWriter::create(&store.clone().overwrite(policy), &layout).unwrap_err();
        assert!(
            matches!(e, Error::CheckpointExists { complete: true, .. }),
            "{e}"
        );
    }
    assert_eq!(fs::read(store.path().join("memory.img")).unwrap(), before);
    Checkpoint::open(&store)
        .unwrap()
        .verify_memory(1, &|_| {})
        .unwrap();

    // An incomplete one needs at least `Incomplete`.
    fs::remove_file(store.path().join("COMPLETE")).unwrap();
    let e = CheckpointWriter::create(&store, &layout).unwrap_err();
    assert!(
        matches!(
            e,
            Error::CheckpointExists {
                complete: false,
                ..
            }
        ),
        "{e}"
    );
    write_checkpoint(&store.clone().overwrite(Overwrite::Incomplete), 12);
    // And `Any` replaces a complete one.
    let store = store.overwrite(Overwrite::Any);
    write_checkpoint(&store, 13);
    let ckpt = Checkpoint::open(&store).unwrap();
    let mut buf = [0u8; PAGE_SIZE];
    ckpt.read_page(2, &mut buf).unwrap();
    assert_eq!(buf, page(13, 2));
}

#[test]
fn double_write_is_detected() {
    let store = MemStore::new().unwrap();
    let w = CheckpointWriter::create(&store, &Layout { mem_size: MEM_SIZE }).unwrap();
    let mem = w.memory();
    mem.write_page(5, &page(1, 5)).unwrap();
    assert!(matches!(
        mem.write_page(5, &page(1, 5)),
        Err(Error::PageWrittenTwice { page: 5 })
    ));
    mem.write_page(4, &page(1, 4)).unwrap(); // a zero page counts as written too
    assert!(matches!(
        mem.write_page(4, &page(1, 4)),
        Err(Error::PageWrittenTwice { page: 4 })
    ));
    // A run overlapping a written page writes nothing and claims nothing.
    let run = vec![7u8; 3 * PAGE_SIZE];
    assert!(matches!(
        mem.write_pages(3, &run),
        Err(Error::PageWrittenTwice { page: 4 })
    ));
    mem.write_page(3, &page(1, 3)).unwrap();
    // Concurrent writers of the same page: exactly one wins.
    let wins: usize = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| s.spawn(|| usize::from(mem.write_page(9, &page(1, 9)).is_ok())))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    });
    assert_eq!(wins, 1);
    assert!(matches!(
        mem.write_page(PAGES, &page(1, 0)),
        Err(Error::PageOutOfRange { .. })
    ));
    assert!(matches!(
        mem.write_pages(0, &[1u8; 100]),
        Err(Error::NotPageMultiple { .. })
    ));
}

#[test]
fn missing_page_is_detected_at_finish() {
    let store = MemStore::new().unwrap();
    let mut w = CheckpointWriter::create(&store, &Layout { mem_size: MEM_SIZE }).unwrap();
    for i in (0..PAGES).filter(|&i| i != 42 && i != 200) {
        w.memory().write_page(i, &page(1, i)).unwrap();
    }
    w.write_state(b"s").unwrap();
    let e = w.finish().unwrap_err();
    assert!(
        matches!(
            e,
            Error::PageMissing {
                page: 42,
                missing: 2,
                pages: PAGES
            }
        ),
        "{e}"
    );
    assert!(matches!(open_err(&store), Error::Incomplete { .. }));
}

#[test]
fn finish_refuses_while_memory_writers_are_alive_and_without_state() {
    let store = MemStore::new().unwrap();
    let mut w = CheckpointWriter::create(&store, &Layout { mem_size: 4096 }).unwrap();
    w.memory().write_page(0, &[1u8; PAGE_SIZE]).unwrap();
    let extra = std::sync::Arc::clone(w.memory());
    assert!(matches!(
        w.finish_memory(),
        Err(Error::MemoryWriterInUse { holders: 1 })
    ));
    drop(extra);
    w.write_state(b"x").unwrap();
    assert!(matches!(
        w.write_state(b"x"),
        Err(Error::SectionWrittenTwice { .. })
    ));
    w.finish().unwrap();
    let w = CheckpointWriter::create(&store, &Layout { mem_size: 4096 }).unwrap();
    w.memory().write_page(0, &[1u8; PAGE_SIZE]).unwrap();
    assert!(matches!(w.finish(), Err(Error::MissingState)));
    assert!(matches!(
        CheckpointWriter::create(&store, &Layout { mem_size: 1000 }),
        Err(Error::NotPageMultiple { .. })
    ));
}

#[test]
fn a_checkpoint_without_index_segment_checksums_reads_its_whole_index() {
    let (_tmp, store) = dir_checkpoint();
    let ckpt = Checkpoint::open_deferred(&store).unwrap();
    assert!(ckpt.has_index_segments());
    let segment = ckpt.index_segment(0..1).unwrap();
    assert_eq!(segment.entry(0), ckpt.page_index().unwrap().entry(0));

    // An older writer's manifest: no segment checksums.
    rewrite_manifest(store.path(), |v| {
        v["memory"]
            .as_object_mut()
            .unwrap()
            .remove("index_segments");
    });
    let ckpt = Checkpoint::open_deferred(&store).unwrap();
    assert!(!ckpt.has_index_segments());
    assert!(ckpt.index_segment(0..1).is_err());
    assert!(!ckpt.page_index_loaded());
    let report = ckpt.verify_memory(1, &|_| {}).unwrap();
    assert_eq!(report.pages_verified + report.zero_pages, PAGES);
    assert!(ckpt.page_index_loaded());

    // Checksums that do not cover the index are refused at open.
    rewrite_manifest(store.path(), |v| {
        v["memory"]["index_segments"] = serde_json::json!({"pages": 512, "xxh3": "00"});
    });
    let err = Checkpoint::open_deferred(&store).unwrap_err();
    assert!(err.to_string().contains("manifest"), "{err}");
}
