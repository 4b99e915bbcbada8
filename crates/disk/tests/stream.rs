//! Streaming a backing file into its child: the chain reads the same before and after (by our
//! code and by QEMU's), the child no longer needs the backing file, and every file stays clean.

mod common;

use std::path::Path;

use common::*;
use disk::{create_qcow2, stream, CreateOptions, Format, Image, PathPolicy};

const MIB: u64 = 1 << 20;

fn overlay(path: &Path, backing: &Path, format: Format, bits: u32) {
    create_qcow2(
        path,
        &CreateOptions {
            backing: Some((backing, format)),
            cluster_bits: bits,
            ..CreateOptions::default()
        },
    )
    .unwrap();
}

fn scribble(path: &Path, rng: &mut Rng, count: usize) {
    let mut img = Image::open(path).unwrap();
    let size = img.size();
    for _ in 0..count {
        let len = 1 + rng.below(40_000);
        let off = rng.below(size - len);
        let mut buf = vec![0u8; len as usize];
        rng.fill(&mut buf);
        img.write_at(off, &buf).unwrap();
    }
    img.flush().unwrap();
}

fn content(path: &Path) -> Vec<u8> {
    our_content(&mut Image::open_read_only(path).unwrap())
}

/// base (raw, random) ← mid (qcow2, `mid_bits`) ← top (qcow2, `top_bits`), each written at
/// random; mid also gets explicit zero clusters over base's data, which top must keep as zeros.
fn stream_case(mid_bits: u32, top_bits: u32) {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(u64::from(mid_bits * 100 + top_bits));
    let base = dir.path().join("base.raw");
    let mut data = vec![0u8; 3 * MIB as usize];
    rng.fill(&mut data);
    std::fs::write(&base, &data).unwrap();
    let mid = dir.path().join("mid.qcow2");
    overlay(&mid, &base, Format::Raw, mid_bits);
    scribble(&mid, &mut rng, 30);
    qemu_io(&mid, "qcow2", &["write -z 1M 192k"]);
    let top = dir.path().join("top.qcow2");
    overlay(&top, &mid, Format::Qcow2, top_bits);
    scribble(&top, &mut rng, 20);
    let before = content(&top);
    let reference = dir.path().join("reference.raw");
    let out = qemu_img(&[
        "convert",
        "-O",
        "raw",
        top.to_str().unwrap(),
        reference.to_str().unwrap(),
    ]);
    assert!(out.status.success());

    let stats = stream(&top, &PathPolicy::same_dir()).unwrap();
    assert_eq!(stats.removed, mid);
    assert_eq!(stats.backing, base.canonicalize().unwrap());
    assert!(stats.clusters > 0);
    // The middle layer is no longer needed: the chain reads the same without it.
    std::fs::remove_file(&mid).unwrap();
    assert_eq!(content(&top), before);
    let chain = Image::open_read_only(&top).unwrap().backing_chain();
    assert_eq!(chain.len(), 2);
    assert_clean(&top);
    let o = qemu_img(&[
        "compare",
        "-F",
        "raw",
        top.to_str().unwrap(),
        reference.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    assert_eq!(
        std::fs::read(&base).unwrap(),
        data,
        "the base is never written"
    );
}

#[test]
fn streaming_keeps_the_content_of_the_chain() {
    stream_case(16, 16);
}

#[test]
fn streaming_across_cluster_sizes() {
    stream_case(12, 16);
    stream_case(16, 12);
}

#[test]
fn a_long_chain_streamed_layer_by_layer_stays_identical() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(7);
    let base = dir.path().join("base.qcow2");
    create_qcow2(
        &base,
        &CreateOptions {
            size: Some(2 * MIB),
            ..CreateOptions::default()
        },
    )
    .unwrap();
    scribble(&base, &mut rng, 10);
    let mut chain = vec![base.clone()];
    for i in 0..6 {
        let next = dir.path().join(format!("o{i}.qcow2"));
        overlay(&next, chain.last().unwrap(), Format::Qcow2, 16);
        scribble(&next, &mut rng, 8);
        chain.push(next);
    }
    let top = chain.last().unwrap().clone();
    let before = content(&top);
    // Stream the layers just above the base one by one into their children, as retention
    // does: o0 into o1, then o1 into o2, ...
    for i in 1..chain.len() - 1 {
        let stats = stream(&chain[i + 1], &PathPolicy::same_dir()).unwrap();
        assert_eq!(stats.removed, chain[i]);
        std::fs::remove_file(&chain[i]).unwrap();
        assert_eq!(
            content(&top),
            before,
            "after streaming {}",
            chain[i].display()
        );
        assert_clean(&chain[i + 1]);
    }
    assert_eq!(
        Image::open_read_only(&top).unwrap().backing_chain().len(),
        2
    );
    assert_clean(&base);
}

#[test]
fn streaming_is_refused_without_a_layer_below() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, vec![1u8; MIB as usize]).unwrap();
    let top = dir.path().join("top.qcow2");
    overlay(&top, &base, Format::Raw, 16);
    let e = stream(&top, &PathPolicy::same_dir()).unwrap_err();
    assert!(matches!(e, disk::Error::InvalidArgument { .. }), "{e}");
    let e = stream(&base, &PathPolicy::same_dir()).unwrap_err();
    assert!(matches!(e, disk::Error::InvalidArgument { .. }), "{e}");
}

/// A crash (kill -9) at every write of a stream: the chain, with the old backing file still
/// there, reads the same, and QEMU finds no corruption (at worst leaked clusters).
#[test]
fn a_crash_at_any_write_of_a_stream_keeps_the_content() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(99);
    let base = dir.path().join("base.raw");
    let mut data = vec![0u8; 2 * MIB as usize];
    rng.fill(&mut data);
    std::fs::write(&base, &data).unwrap();
    let mid = dir.path().join("mid.qcow2");
    overlay(&mid, &base, Format::Raw, 16);
    scribble(&mid, &mut rng, 12);
    let top = dir.path().join("top.qcow2");
    overlay(&top, &mid, Format::Qcow2, 16);
    scribble(&top, &mut rng, 6);
    let pristine = std::fs::read(&top).unwrap();
    let before = content(&top);
    let mut n = 0;
    loop {
        std::fs::write(&top, &pristine).unwrap();
        let opts = disk::OpenOptions {
            crash_after_writes: Some(n),
            ..disk::OpenOptions::default()
        };
        let finished = disk::stream_with(&top, &opts).is_ok();
        assert_eq!(content(&top), before, "crash after {n} writes");
        assert_not_corrupt(&top);
        if finished {
            assert_eq!(
                Image::open_read_only(&top).unwrap().backing_chain().len(),
                2
            );
            break;
        }
        n += 1;
        assert!(n < 10_000, "the stream never finished");
    }
    assert!(n > 3, "only {n} writes");
}
