//! Every crash point of an allocating write: the top image is opened with a hook that makes
//! every file modification after the first `n` fail, as if the process died there. For each
//! `n`, the file left behind must pass `qemu-img check` without corruption (leaks allowed) and
//! hold every completed write. The writes chosen allocate L2 tables, copy up partial clusters,
//! allocate refcount blocks and grow (move) the refcount table.

mod common;

use std::path::Path;

use common::*;
use disk::{Image, OpenOptions};

const SIZE: u64 = 8 << 20;

fn header_reftable(path: &Path) -> (u64, u32) {
    let h = std::fs::read(path).unwrap();
    (
        u64::from_be_bytes(h[48..56].try_into().unwrap()),
        u32::from_be_bytes(h[56..60].try_into().unwrap()),
    )
}

/// Writes of the sequence under test.
fn ops() -> Vec<(u64, Vec<u8>)> {
    let mut rng = Rng(4242);
    let mut v = Vec::new();
    for (off, len) in [
        (6 << 20, 3000u64),
        ((6 << 20) + 1000, 200),
        (7 << 20, 1500),
        (100, 700),
    ] {
        let mut d = vec![0u8; len as usize];
        rng.fill(&mut d);
        v.push((off + 13, d));
    }
    v
}

/// Prefills a fresh image until the file is `fill_to` bytes long, then checks every crash
/// point of `ops()`. Returns the header's (refcount table offset, clusters) before and after.
fn crash_points(fill_to: u64) -> ((u64, u32), (u64, u32)) {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    let mut rng = Rng(1);
    let mut model = vec![0u8; SIZE as usize];
    rng.fill(&mut model);
    std::fs::write(&base, &model).unwrap();
    // 512 B clusters and 64-bit refcounts: the first refcount table covers only 2 MiB.
    let baseline = dir.path().join("baseline.qcow2");
    let o = qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "refcount_bits=64,cluster_size=512",
        "-b",
        base.to_str().unwrap(),
        "-F",
        "raw",
        baseline.to_str().unwrap(),
    ]);
    assert!(o.status.success());
    assert_eq!(header_reftable(&baseline).1, 1);
    {
        let mut img = Image::open(&baseline).unwrap();
        let mut off = 0;
        while std::fs::metadata(&baseline).unwrap().len() < fill_to {
            img.write_at(off, &[0xab]).unwrap();
            model[off as usize] = 0xab;
            off += 512;
        }
        img.flush().unwrap();
    }
    assert_clean(&baseline);
    let reftable_before = header_reftable(&baseline);

    let ops = ops();
    let work = dir.path().join("work.qcow2");
    let mut points = 0;
    for n in 0.. {
        std::fs::copy(&baseline, &work).unwrap();
        let opts = OpenOptions {
            crash_after_writes: Some(n),
            ..OpenOptions::default()
        };
        let mut img = Image::open_with(&work, &opts).unwrap();
        let failed_at = ops
            .iter()
            .position(|(off, data)| img.write_at(*off, data).is_err());
        drop(img);

        assert_not_corrupt(&work);
        let mut expected = model.clone();
        let done = failed_at.unwrap_or(ops.len());
        for (off, data) in &ops[..done] {
            expected[*off as usize..*off as usize + data.len()].copy_from_slice(data);
        }
        let mut img = Image::open_read_only(&work).unwrap();
        let actual = our_content(&mut img);
        for (b, (&got, &want)) in actual.iter().zip(&expected).enumerate() {
            if got != want {
                let (off, data) = &ops[failed_at.expect("all writes done, content must match")];
                let b = b as u64;
                assert!(
                    b >= *off && b < off + data.len() as u64 && got == data[(b - off) as usize],
                    "crash after {n} writes: byte {b:#x} is {got:#x}, expected {want:#x}"
                );
            }
        }
        points += 1;
        if failed_at.is_none() {
            break;
        }
    }
    assert_clean(&work);
    assert!(points > 20, "only {points} crash points");
    eprintln!("checked {points} crash points");
    (reftable_before, header_reftable(&work))
}

#[test]
fn every_crash_point_while_allocating_a_refcount_block() {
    // One refcount block covers 64 clusters (32 KiB): the sequence crosses a block boundary.
    let (before, after) = crash_points((1 << 20) - 1536);
    assert_eq!(before, after);
}

#[test]
fn every_crash_point_while_growing_the_refcount_table() {
    // Just below 2 MiB: the sequence must move and grow the refcount table.
    let (before, after) = crash_points((2 << 20) - 1536);
    assert_ne!(before, after);
    assert!(after.1 > 1);
}
