//! Fuzzing the qcow2 open/read/write path with mutated image files (see the `fuzzkit` crate
//! for the knobs: `COWVM_FUZZ_SECS=3600 cargo test --release -p disk --test fuzz`).
//!
//! An input is 64 bytes of operations followed by the bytes of the top image. The top image
//! is written into a directory that also holds a raw and a qcow2 base image, which the seeds
//! name as their backing files. Any `Err` is fine; a panic or a hang is a bug.

mod common;

use std::path::{Path, PathBuf};

use disk::{create_qcow2, CreateOptions, Format, Image, OpenOptions};
use fuzzkit::arbitrary::Unstructured;

const OPS_LEN: usize = 64;
const KIB: u64 = 1 << 10;
/// Small clusters keep the seed images a few KiB.
const BITS: u32 = 9;

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/qcow2")
}

/// The backing files every input can name: `base.raw` and `base.qcow2` (over `base.raw`).
fn make_bases(dir: &Path) {
    let raw: Vec<u8> = (0..96 * KIB).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(dir.join("base.raw"), raw).unwrap();
    let base = dir.join("base.qcow2");
    create_qcow2(
        &base,
        &CreateOptions {
            size: Some(128 * KIB),
            backing: Some((Path::new("base.raw"), Format::Raw)),
            cluster_bits: BITS,
            ..CreateOptions::default()
        },
    )
    .unwrap();
    let mut img = Image::open(&base).unwrap();
    img.write_at(10 * KIB + 3, &[0xb5; 3000]).unwrap();
    img.write_at(100 * KIB, &[0xb6; 512]).unwrap();
    img.flush().unwrap();
}

#[derive(Debug)]
enum Op {
    Read { offset: u64, len: usize },
    Write { offset: u64, len: usize, byte: u8 },
    MapRead { offset: u64, len: u64 },
    PrepareWrite { offset: u64, len: u64 },
    Flush,
}

/// An offset mostly inside the disk, sometimes anywhere.
fn offset(u: &mut Unstructured<'_>, size: u64) -> fuzzkit::arbitrary::Result<u64> {
    let raw: u64 = u.arbitrary()?;
    Ok(if u.ratio(7, 8)? {
        raw % (size + 1)
    } else {
        raw
    })
}

fn ops(bytes: &[u8], size: u64) -> (bool, Vec<Op>) {
    let mut u = Unstructured::new(bytes);
    let read_only = u.ratio(1, 4).unwrap_or(false);
    let mut ops = Vec::new();
    let next = |u: &mut Unstructured<'_>| -> fuzzkit::arbitrary::Result<Op> {
        Ok(match u.int_in_range(0u8..=4)? {
            0 => Op::Read {
                offset: offset(u, size)?,
                len: u.int_in_range(0..=4096)?,
            },
            1 => Op::Write {
                offset: offset(u, size)?,
                len: u.int_in_range(0..=4096)?,
                byte: u.arbitrary()?,
            },
            2 => Op::MapRead {
                offset: offset(u, size)?,
                len: u.int_in_range(0..=8192)?,
            },
            3 => Op::PrepareWrite {
                offset: offset(u, size)?,
                len: u.int_in_range(0..=8192)?,
            },
            _ => Op::Flush,
        })
    };
    while !u.is_empty() && ops.len() < 12 {
        match next(&mut u) {
            Ok(op) => ops.push(op),
            Err(_) => break,
        }
    }
    (read_only, ops)
}

/// Opens `top` (format probed) and applies the operations; errors end the run quietly.
fn exercise(top: &Path, op_bytes: &[u8]) {
    let probe = Image::open_read_only(top).map(|i| i.size()).unwrap_or(0);
    let (read_only, ops) = ops(op_bytes, probe);
    let opts = OpenOptions {
        read_only,
        ..OpenOptions::default()
    };
    let Ok(mut img) = Image::open_with(top, &opts) else {
        return;
    };
    let _ = img.backing_chain();
    for op in ops {
        let result = match op {
            Op::Read { offset, len } => {
                let mut buf = vec![0u8; len];
                img.read_at(offset, &mut buf)
            }
            Op::Write { offset, len, byte } => img.write_at(offset, &vec![byte; len]),
            Op::MapRead { offset, len } => img.map_read(offset, len).map(|extents| {
                let total: u64 = extents.iter().map(|e| e.len()).sum();
                assert_eq!(total, len, "map_read covers the range it was asked for");
            }),
            Op::PrepareWrite { offset, len } => img.prepare_write(offset, len).map(|extents| {
                let total: u64 = extents.iter().map(|e| e.len()).sum();
                assert_eq!(
                    total, len,
                    "prepare_write covers the range it was asked for"
                );
            }),
            Op::Flush => img.flush(),
        };
        if result.is_err() {
            return;
        }
    }
}

#[test]
fn fuzz_qcow2_open_read_write() {
    // On tmpfs where there is one: every flush is an fdatasync.
    let dir = match Path::new("/dev/shm").is_dir() {
        true => tempfile::tempdir_in("/dev/shm"),
        false => tempfile::tempdir(),
    }
    .unwrap();
    make_bases(dir.path());
    let top = dir.path().join("top.qcow2");
    let report = fuzzkit::run("qcow2", corpus_dir(), |data| {
        let (op_bytes, image) = data.split_at(data.len().min(OPS_LEN));
        std::fs::write(&top, image).unwrap();
        exercise(&top, op_bytes);
    });
    assert!(report.iterations > 0);
}

/// Writes the seed corpus: images made here and by `qemu-img`, each after 64 bytes of
/// operations. Run by hand when the input layout changes:
/// `cargo test --release -p disk --test fuzz -- --ignored`.
#[test]
#[ignore = "regenerates the committed seed corpus"]
fn regenerate_qcow2_corpus() {
    let out = corpus_dir();
    std::fs::create_dir_all(&out).unwrap();
    let dir = tempfile::tempdir().unwrap();
    make_bases(dir.path());
    let mut rng = common::Rng(11);
    let mut seed = |name: &str, image: &Path| {
        let mut data = vec![0u8; OPS_LEN];
        rng.fill(&mut data);
        data.extend(std::fs::read(image).unwrap());
        std::fs::write(out.join(name), data).unwrap();
    };
    let ours = |name: &str, backing: Option<(&Path, Format)>, size: Option<u64>| {
        let path = dir.path().join(name);
        create_qcow2(
            &path,
            &CreateOptions {
                size,
                backing,
                cluster_bits: BITS,
                ..CreateOptions::default()
            },
        )
        .unwrap();
        let mut img = Image::open(&path).unwrap();
        img.write_at(1000, &[0x5a; 2000]).unwrap();
        img.write_at(64 * KIB, &[0; 512]).unwrap();
        img.flush().unwrap();
        path
    };
    seed("ours-plain", &ours("plain.qcow2", None, Some(256 * KIB)));
    seed(
        "ours-over-raw",
        &ours(
            "o-raw.qcow2",
            Some((Path::new("base.raw"), Format::Raw)),
            None,
        ),
    );
    seed(
        "ours-over-qcow2",
        &ours(
            "o-q.qcow2",
            Some((Path::new("base.qcow2"), Format::Qcow2)),
            Some(160 * KIB),
        ),
    );
    let qemu = |name: &str, args: &[&str]| {
        let path = dir.path().join(name);
        let p = path.to_str().unwrap();
        let mut full = vec!["create", "-q", "-f", "qcow2", "-o", "cluster_size=512"];
        full.extend_from_slice(args);
        full.push(p);
        if !args.contains(&"-b") {
            full.push("200K");
        }
        let o = common::qemu_img(&full);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let o = common::run(
            "qemu-io",
            &[
                "-c",
                "write -P 0x33 3000 5000",
                "-c",
                "write -z 70000 1024",
                p,
            ],
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        path
    };
    seed("qemu-plain", &qemu("q-plain.qcow2", &[]));
    seed(
        "qemu-v2-over-qcow2",
        &qemu(
            "q-v2.qcow2",
            &["-o", "compat=0.10", "-b", "base.qcow2", "-F", "qcow2"],
        ),
    );
    seed(
        "qemu-over-raw",
        &qemu("q-raw.qcow2", &["-b", "base.raw", "-F", "raw"]),
    );
}
