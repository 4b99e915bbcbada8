//! The S3 store against a real SeaweedFS server: one shared by the tests, each under its own
//! prefix, and one of its own for the test that stops it.

mod common;
mod s3_server;

use std::sync::Arc;

use ckpt_format::{
    Checkpoint, CheckpointWriter, DirStore, Error, Layout, MemorySource, Overwrite, S3Error,
    S3Location, S3Store, Store, PAGE_SIZE,
};
use common::*;
use s3_server::{Weed, ACCESS_KEY, BUCKET, SECRET_KEY};

/// Reads back every page of the checkpoint in `store` and checks it against `page(seed, _)`.
fn check_pages(store: &dyn Store, seed: u64) -> Checkpoint {
    let ckpt = Checkpoint::open(store).unwrap();
    let report = ckpt.verify_memory(3, &|_| {}).unwrap();
    assert_eq!(report.pages_verified, PAGES - expected_zero_pages(PAGES));
    let mut all = vec![0u8; MEM_SIZE as usize];
    ckpt.read_pages(0, &mut all).unwrap();
    for (i, p) in all.chunks_exact(PAGE_SIZE).enumerate() {
        assert_eq!(p, page(seed, i as u64), "page {i}");
    }
    // Runs that cross chunk boundaries (16-page chunks).
    let mut run = vec![0u8; 37 * PAGE_SIZE];
    ckpt.read_pages(13, &mut run).unwrap();
    assert_eq!(run, all[13 * PAGE_SIZE..50 * PAGE_SIZE]);
    ckpt
}

#[test]
fn round_trip_matches_a_directory_store() {
    let weed = Weed::shared();
    let s3 = weed.store("vm1/monday");
    let written = write_checkpoint(&s3, 11);
    let ckpt = check_pages(&s3, 11);
    assert_eq!(ckpt.manifest(), &written);
    assert!(matches!(ckpt.memory_source().unwrap(), MemorySource::Pages));
    assert_eq!(ckpt.state_bytes(), state_bytes().as_slice());
    // The index's segments, read with ranged GETs before the whole index, verify alone.
    let fresh = Checkpoint::open_deferred(&s3).unwrap();
    let segment = fresh.index_segment(0..PAGES).unwrap();
    assert!(!fresh.page_index_loaded());
    for p in 0..PAGES {
        assert_eq!(
            segment.entry(p),
            ckpt.page_index().unwrap().entry(p),
            "page {p}"
        );
    }

    // The same data through a directory store: same pages, same index, same manifest but for
    // where the memory section lives.
    let dir = tempfile::tempdir().unwrap();
    let local = DirStore::new(dir.path().join("ckpt"));
    let mut local_manifest = write_checkpoint(&local, 11);
    let local_ckpt = check_pages(&local, 11);
    assert_eq!(ckpt.page_index().unwrap(), local_ckpt.page_index().unwrap());
    let mut s3_manifest = ckpt.manifest().clone();
    for m in [&mut local_manifest, &mut s3_manifest] {
        m.created_unix_ms = 0;
        m.created_utc.clear();
        m.sections.retain(|s| s.name != "memory");
        for s in &mut m.sections {
            s.file = None;
        }
    }
    assert_eq!(s3_manifest, local_manifest);

    // The layout: sections, 16-page chunks, the marker.
    let chunk0 = weed.get_object("vm1/monday/memory/00000000");
    assert_eq!(chunk0.len(), 16 * PAGE_SIZE);
    assert_eq!(&chunk0[2 * PAGE_SIZE..3 * PAGE_SIZE], &page(11, 2)[..]);
    let last = weed.get_object(&format!("vm1/monday/memory/{:08}", PAGES / 16));
    assert_eq!(last.len(), (PAGES % 16) as usize * PAGE_SIZE);
    let marker = String::from_utf8(weed.get_object("vm1/monday/COMPLETE")).unwrap();
    assert!(marker.contains("chunk-size 65536"), "{marker}");
    weed.get_object("vm1/monday/manifest.json");
    weed.get_object("vm1/monday/state.bin");
    weed.get_object("vm1/monday/page-index.bin");
}

#[test]
fn chunks_of_zero_pages_are_not_uploaded() {
    let weed = Weed::shared();
    let s3 = weed.store("sparse");
    let mut w = CheckpointWriter::create(&s3, &Layout { mem_size: MEM_SIZE }).unwrap();
    let zero = [0u8; PAGE_SIZE];
    for i in 0..PAGES {
        // Only chunk 1 (pages 16..32) holds data.
        let data = if (16..32).contains(&i) {
            page(5, i)
        } else {
            zero
        };
        w.memory().write_page(i, &data).unwrap();
    }
    w.write_state(&state_bytes()).unwrap();
    w.finish().unwrap();
    let ckpt = Checkpoint::open(&s3).unwrap();
    ckpt.verify_memory(2, &|_| {}).unwrap();
    let mut all = vec![0u8; MEM_SIZE as usize];
    ckpt.read_pages(0, &mut all).unwrap();
    for (i, p) in all.chunks_exact(PAGE_SIZE).enumerate() {
        let i = i as u64;
        let want = if (16..32).contains(&i) && i % 4 != 0 {
            page(5, i)
        } else {
            zero
        };
        assert_eq!(p, want, "page {i}");
    }
    let (status, _) = weed.filer(
        "GET",
        &format!("/buckets/{BUCKET}/sparse/memory/00000000"),
        &[],
    );
    assert_eq!(status, 404, "an all-zero chunk is not written");
    weed.get_object("sparse/memory/00000001");
}

/// One upload slot and one buffer: partly filled chunks are spilled, and merged with their
/// later pages; the result is the same.
#[test]
fn bounded_buffers_spill_and_merge() {
    let weed = Weed::shared();
    let s3 = weed.store("tight").parallelism(1, 1);
    write_checkpoint(&s3, 23);
    check_pages(&s3, 23);
}

/// The `fork` split: the child's copy writes memory and the page index, the parent adopts
/// its report and completes.
#[test]
fn fork_split_child_writes_memory_parent_completes() {
    let weed = Weed::shared();
    let s3 = weed.store("forked");
    let mut parent = CheckpointWriter::create(&s3, &Layout { mem_size: MEM_SIZE }).unwrap();
    let mut child = parent.fork_copy();
    parent.write_state(&state_bytes()).unwrap();
    write_memory(&child, PAGES, 7, 2);
    let report = child.finish_memory().unwrap();
    let report = serde_json::from_slice(&serde_json::to_vec(&report).unwrap()).unwrap();
    drop(child);
    parent.adopt_memory(report).unwrap();
    parent.set_vm_config(vm_config());
    parent.finish().unwrap();
    check_pages(&s3, 7);
}

#[test]
fn refuses_to_overwrite_unless_asked() {
    let weed = Weed::shared();
    let s3 = weed.store("again");
    write_checkpoint(&s3, 1);
    let e = CheckpointWriter::create(&s3, &Layout { mem_size: MEM_SIZE }).unwrap_err();
    assert!(
        matches!(e, Error::CheckpointExists { complete: true, .. }),
        "{e}"
    );
    assert_eq!(
        e.to_string(),
        "s3://ckpt/again already holds a complete checkpoint"
    );
    let e = CheckpointWriter::create(
        &s3.clone().overwrite(Overwrite::Incomplete),
        &Layout { mem_size: MEM_SIZE },
    )
    .unwrap_err();
    assert!(matches!(e, Error::CheckpointExists { .. }), "{e}");
    let s3 = s3.overwrite(Overwrite::Any);
    write_checkpoint(&s3, 2);
    check_pages(&s3, 2);
}

fn one_line(e: &Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    assert!(!text.contains('\n'), "one line: {text}");
    text
}

#[test]
fn unreachable_endpoint_is_named() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let s3 = S3Store::new(S3Location::parse("s3://ckpt/x").unwrap())
        .endpoint(&endpoint)
        .credentials(ACCESS_KEY, SECRET_KEY);
    let start = std::time::Instant::now();
    let e = CheckpointWriter::create(&s3, &Layout { mem_size: MEM_SIZE }).unwrap_err();
    let text = one_line(&e);
    assert!(
        text.starts_with(&format!("cannot reach S3 endpoint {endpoint}")),
        "{text}"
    );
    assert!(matches!(&e, Error::S3(b) if matches!(**b, S3Error::Unreachable { .. })));
    let e = Checkpoint::open(&s3).unwrap_err();
    assert!(one_line(&e).starts_with("cannot reach S3 endpoint"), "{e}");
    assert!(
        start.elapsed().as_secs() < 60,
        "gave up in {:?}",
        start.elapsed()
    );
}

#[test]
fn wrong_credentials_and_missing_bucket_get_one_clear_line() {
    let weed = Weed::shared();
    let wrong = weed.store("x").credentials(ACCESS_KEY, "not-the-secret");
    let e = CheckpointWriter::create(&wrong, &Layout { mem_size: MEM_SIZE }).unwrap_err();
    let text = one_line(&e);
    assert!(
        text.starts_with(&format!(
            "access denied to bucket ckpt at {}",
            weed.endpoint()
        )),
        "{text}"
    );
    let e = Checkpoint::open(&wrong).unwrap_err();
    assert!(
        one_line(&e).starts_with("access denied to bucket ckpt"),
        "{e}"
    );

    let missing = weed.store_in("no-such-bucket", "x");
    let e = CheckpointWriter::create(&missing, &Layout { mem_size: MEM_SIZE }).unwrap_err();
    assert_eq!(
        one_line(&e),
        format!(
            "bucket no-such-bucket does not exist at {}",
            weed.endpoint()
        )
    );
    let e = Checkpoint::open(&missing).unwrap_err();
    assert!(
        one_line(&e).starts_with("bucket no-such-bucket does not exist"),
        "{e}"
    );
}

#[test]
fn incomplete_and_corrupt_checkpoints_are_refused() {
    let weed = Weed::shared();
    let s3 = weed.store("broken");
    write_checkpoint(&s3, 3);

    // A corrupted chunk: the page index check names it.
    let key = "broken/memory/00000002";
    let good = weed.get_object(key);
    let mut bad = good.clone();
    bad[5 * PAGE_SIZE + 100] ^= 0x10;
    weed.put_object(key, &bad);
    let ckpt = Checkpoint::open(&s3).unwrap();
    let e = ckpt.verify_memory(2, &|_| {}).unwrap_err();
    assert_eq!(
        e.to_string(),
        "memory chunk s3://ckpt/broken/memory/00000002 is corrupt: page 37 does not match the page index"
    );
    let mut buf = [0u8; PAGE_SIZE];
    assert!(ckpt.read_page(37, &mut buf).is_err());
    ckpt.read_page(36 + 2, &mut buf).unwrap();
    assert_eq!(buf, page(3, 38));

    // A missing chunk is named too.
    weed.delete_object(key);
    let e = ckpt.verify_memory(1, &|_| {}).unwrap_err();
    assert_eq!(
        e.to_string(),
        "memory chunk s3://ckpt/broken/memory/00000002 is missing"
    );
    weed.put_object(key, &good);
    check_pages(&s3, 3);

    // No completion marker: incomplete.
    weed.delete_object("broken/COMPLETE");
    let e = Checkpoint::open(&s3).unwrap_err();
    assert!(matches!(e, Error::Incomplete { .. }), "{e}");
    assert_eq!(
        e.to_string(),
        "checkpoint in s3://ckpt/broken is incomplete: no completion marker"
    );
}

/// A restore through a cache directory fills it; a later one reads memory and sections from
/// it (the chunks may be gone from the bucket), and a cached page that was changed is read from
/// the bucket again, never returned.
#[test]
fn a_cache_directory_serves_later_restores_and_is_verified() {
    let weed = Weed::shared();
    let cache = tempfile::tempdir().unwrap();
    let s3 = weed.store("cached");
    write_checkpoint(&s3, 8);
    let cached = weed.store("cached").cache_dir(cache.path());
    check_pages(&cached, 8);
    let entries: Vec<_> = std::fs::read_dir(cache.path()).unwrap().collect();
    assert_eq!(entries.len(), 1, "one checkpoint, one directory");
    let dir = entries[0].as_ref().unwrap().path();
    let memory = dir.join("memory");
    assert_eq!(std::fs::metadata(&memory).unwrap().len(), MEM_SIZE);

    // Every chunk gone from the bucket: the cache serves them all.
    let chunks = PAGES.div_ceil(16);
    let keys: Vec<String> = (0..chunks)
        .map(|c| format!("cached/memory/{c:08}"))
        .collect();
    let saved: Vec<Vec<u8>> = keys.iter().map(|k| weed.get_object(k)).collect();
    for k in &keys {
        weed.delete_object(k);
    }
    check_pages(&cached, 8);
    let e = Checkpoint::open(&s3)
        .unwrap()
        .verify_memory(1, &|_| {})
        .unwrap_err();
    assert!(e.to_string().ends_with("is missing"), "{e}");

    // A changed page in the cache is not served: with its chunk gone from the bucket too, the
    // read fails naming the chunk.
    flip_byte(&memory, 41 * PAGE_SIZE as u64 + 9);
    let ckpt = Checkpoint::open(&cached).unwrap();
    let mut buf = [0u8; PAGE_SIZE];
    let e = ckpt.read_page(41, &mut buf).unwrap_err();
    assert_eq!(
        e.to_string(),
        "memory chunk s3://ckpt/cached/memory/00000002 is missing"
    );
    // With the chunk back, the page is read from the bucket and the cache repaired.
    for (k, bytes) in keys.iter().zip(&saved) {
        weed.put_object(k, bytes);
    }
    ckpt.read_page(41, &mut buf).unwrap();
    assert_eq!(buf, page(8, 41));
    weed.delete_object(&keys[2]);
    let ckpt = Checkpoint::open(&cached).unwrap();
    ckpt.read_page(41, &mut buf).unwrap();
    assert_eq!(buf, page(8, 41));

    // The marker is always read from the bucket: a checkpoint no longer complete there is not
    // restored from the cache.
    weed.delete_object("cached/COMPLETE");
    let e = Checkpoint::open(&cached).unwrap_err();
    assert!(matches!(e, Error::Incomplete { .. }), "{e}");
}

/// The server dies while memory is being uploaded: the checkpoint fails, naming the
/// endpoint, and once the server is back the checkpoint is incomplete.
#[test]
fn server_stopped_mid_upload_never_completes() {
    let mut weed = Weed::start();
    let s3 = weed.store("interrupted").parallelism(2, 4);
    let mut w = CheckpointWriter::create(&s3, &Layout { mem_size: MEM_SIZE }).unwrap();
    let mem = Arc::clone(w.memory());
    for i in 0..PAGES / 2 {
        mem.write_page(i, &page(9, i)).unwrap();
    }
    w.write_state(&state_bytes()).unwrap();
    weed.stop();
    let mut failed = None;
    for i in PAGES / 2..PAGES {
        if let Err(e) = mem.write_page(i, &page(9, i)) {
            failed = Some(e);
            break;
        }
    }
    drop(mem);
    let e = match failed {
        Some(e) => e,
        None => w.finish().unwrap_err(),
    };
    let text = one_line(&e);
    assert!(
        text.contains("cannot reach S3 endpoint") || text.contains("failed"),
        "{text}"
    );
    weed.restart();
    let e = Checkpoint::open(&s3).unwrap_err();
    assert!(matches!(e, Error::Incomplete { .. }), "{e}");
}
