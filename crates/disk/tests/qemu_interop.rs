//! Images written by us are valid for QEMU, and images written by QEMU read the same here.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;

use common::*;
use disk::{create_qcow2, create_raw, CreateOptions, Extent, Format, Image};

const MIB: u64 = 1 << 20;

fn qcow2(path: &Path, size: Option<u64>, backing: Option<(&Path, Format)>, bits: u32) {
    create_qcow2(
        path,
        &CreateOptions {
            size,
            backing,
            cluster_bits: bits,
            overwrite: false,
            ..CreateOptions::default()
        },
    )
    .unwrap();
}

fn random_raw(path: &Path, size: u64, rng: &mut Rng) -> Vec<u8> {
    let mut data = vec![0u8; size as usize];
    rng.fill(&mut data);
    std::fs::write(path, &data).unwrap();
    data
}

/// Random writes of random lengths (some cluster aligned, most not) through `img` and `model`.
fn random_writes(img: &mut Image, model: &mut [u8], rng: &mut Rng, count: usize, max_len: u64) {
    let size = model.len() as u64;
    for i in 0..count {
        let len = 1 + rng.below(max_len);
        let mut off = rng.below(size - len);
        if i % 4 == 0 {
            off -= off % img.cluster_size();
        }
        let mut buf = vec![0u8; len as usize];
        rng.fill(&mut buf);
        img.write_at(off, &buf).unwrap();
        model[off as usize..(off + len) as usize].copy_from_slice(&buf);
    }
}

#[test]
fn created_images_pass_qemu_check_for_every_cluster_size() {
    let dir = tempfile::tempdir().unwrap();
    for bits in [9, 12, 16, 21] {
        let p = dir.path().join(format!("c{bits}.qcow2"));
        qcow2(&p, Some(3 * MIB + 512), None, bits);
        assert_clean(&p);
        let info = info_chain(&p);
        assert_eq!(info[0]["virtual-size"], 3 * MIB + 512);
        assert_eq!(info[0]["cluster-size"], 1u64 << bits);
        assert_eq!(info[0]["format-specific"]["data"]["compat"], "1.1");
        let img = Image::open(&p).unwrap();
        assert_eq!(img.size(), 3 * MIB + 512);
        assert_eq!(img.cluster_size(), 1 << bits);
    }
}

#[test]
fn large_image_with_small_clusters_has_valid_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("big.qcow2");
    // 4 GiB with 512 B clusters: a 1 MiB L1 table, several refcount blocks.
    qcow2(&p, Some(4 << 30), None, 9);
    assert_clean(&p);
    let mut img = Image::open(&p).unwrap();
    img.write_at((4 << 30) - 700, &[7u8; 700]).unwrap();
    img.flush().unwrap();
    assert_clean(&p);
}

#[test]
fn chain_is_visible_to_qemu_info() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    create_raw(&base, 2 * MIB, false).unwrap();
    let mid = dir.path().join("mid.qcow2");
    let top = dir.path().join("top.qcow2");
    // Relative names are relative to the overlay's directory, as in QEMU.
    qcow2(&mid, None, Some((Path::new("base.raw"), Format::Raw)), 16);
    qcow2(
        &top,
        None,
        Some((Path::new("mid.qcow2"), Format::Qcow2)),
        12,
    );
    assert_clean(&mid);
    assert_clean(&top);
    let info = info_chain(&top);
    let chain = info.as_array().unwrap();
    assert_eq!(chain.len(), 3);
    assert_eq!(chain[0]["backing-filename"], "mid.qcow2");
    assert_eq!(chain[0]["backing-filename-format"], "qcow2");
    assert_eq!(chain[1]["backing-filename"], "base.raw");
    assert_eq!(chain[1]["backing-filename-format"], "raw");
    assert_eq!(chain[2]["format"], "raw");
    assert_eq!(chain[0]["virtual-size"], 2 * MIB);

    let img = Image::open(&top).unwrap();
    let ours: Vec<_> = img
        .backing_chain()
        .into_iter()
        .map(|e| (e.path, e.format))
        .collect();
    assert_eq!(
        ours,
        vec![
            (top.clone(), Format::Qcow2),
            (mid.clone(), Format::Qcow2),
            (base.clone(), Format::Raw)
        ]
    );
}

#[test]
fn three_deep_chain_random_writes_match_model_and_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(0x5eed_0001);
    let base = dir.path().join("base.raw");
    let size = 3 * MIB + 4096;
    let mut model = random_raw(&base, size, &mut rng);
    let base_before = model.clone();

    let mid = dir.path().join("mid.qcow2");
    qcow2(&mid, None, Some((&base, Format::Raw)), 12);
    {
        let mut img = Image::open(&mid).unwrap();
        random_writes(&mut img, &mut model, &mut rng, 150, 20_000);
        img.flush().unwrap();
        assert!(img.stats().copy_ups > 0);
    }
    let mid_model = model.clone();
    let top = dir.path().join("top.qcow2");
    qcow2(&top, None, Some((&mid, Format::Qcow2)), 16);
    let mut img = Image::open(&top).unwrap();
    random_writes(&mut img, &mut model, &mut rng, 150, 100_000);
    img.flush().unwrap();
    let stats = img.stats();
    assert!(stats.copy_ups > 0 && stats.clusters_allocated >= stats.copy_ups);

    assert_eq!(our_content(&mut img), model);
    drop(img);
    for p in [&mid, &top] {
        assert_clean(p);
    }
    // The backing files were not modified.
    assert_eq!(std::fs::read(&base).unwrap(), base_before);
    assert_eq!(qemu_content(&mid, dir.path()), mid_model);
    assert_eq!(qemu_content(&top, dir.path()), model);
    let model_path = dir.path().join("model.raw");
    std::fs::write(&model_path, &model).unwrap();
    let out = qemu_img(&[
        "compare",
        "-f",
        "qcow2",
        "-F",
        "raw",
        top.to_str().unwrap(),
        model_path.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // Reopening reads the same, and more writes after reopening keep the image clean.
    let mut img = Image::open(&top).unwrap();
    assert_eq!(our_content(&mut img), model);
    random_writes(&mut img, &mut model, &mut rng, 40, 70_000);
    img.flush().unwrap();
    drop(img);
    assert_clean(&top);
    assert_eq!(qemu_content(&top, dir.path()), model);
}

#[test]
fn reads_and_writes_images_made_by_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("qbase.qcow2");
    let top = dir.path().join("qtop.qcow2");
    let (b, t) = (base.to_str().unwrap(), top.to_str().unwrap());
    assert!(qemu_img(&["create", "-q", "-f", "qcow2", b, "4M"])
        .status
        .success());
    qemu_io(
        &base,
        "qcow2",
        &[
            "write -P 0xaa 0 1M",
            "write -P 0x11 1000 3000",
            "write -P 0xbb 2M 300k",
            "write -z 64k 128k",
        ],
    );
    assert!(
        qemu_img(&["create", "-q", "-f", "qcow2", "-b", b, "-F", "qcow2", t])
            .status
            .success()
    );
    qemu_io(
        &top,
        "qcow2",
        &[
            "write -P 0xcc 500k 100k",
            "write -z 2100k 8k",
            "write -P 0xdd 4000k 1k",
            "write -z -u 3M 64k",
            // Allocated, then zeroed without unmapping: a zero cluster that keeps its host
            // cluster, which our next write must reuse (else it would leak).
            "write -P 0xee 3200k 128k",
            "write -z 3200k 64k",
        ],
    );
    let expected = qemu_content(&top, dir.path());
    let mut img = Image::open(&top).unwrap();
    assert_eq!(img.backing_chain().len(), 2);
    assert_eq!(our_content(&mut img), expected);

    // Our writes into QEMU's image: over data, zero clusters and unallocated clusters.
    let mut model = expected;
    let mut rng = Rng(77);
    random_writes(&mut img, &mut model, &mut rng, 60, 200_000);
    for (off, len) in [
        (2100 * 1024 + 7, 100),
        (3 * MIB + 5, 10),
        (3200 * 1024 + 100, 10),
    ] {
        let buf = vec![0x5a; len];
        img.write_at(off, &buf).unwrap();
        model[off as usize..off as usize + len].copy_from_slice(&buf);
    }
    img.flush().unwrap();
    assert_eq!(our_content(&mut img), model);
    // Rebase QEMU's overlay (its header has a feature-name table extension to preserve).
    img.set_backing(Path::new("qbase.qcow2"), None).unwrap();
    assert_eq!(our_content(&mut img), model);
    drop(img);
    assert_clean(&top);
    assert_eq!(qemu_content(&top, dir.path()), model);
    let info = info_chain(&top);
    assert_eq!(info[0]["backing-filename"], "qbase.qcow2");
    assert_eq!(info[0]["backing-filename-format"], "qcow2");
    let o = qemu_img(&["info", "--output=json", top.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("\"lazy-refcounts\": false"), "{text}");
}

#[test]
fn other_refcount_widths_and_v2_images() {
    let dir = tempfile::tempdir().unwrap();
    for opts in [
        "refcount_bits=1",
        "refcount_bits=64",
        "refcount_bits=8",
        "compat=0.10",
    ] {
        let p = dir.path().join(format!("{opts}.qcow2"));
        let ps = p.to_str().unwrap();
        let o = qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("{opts},cluster_size=4096"),
            ps,
            "8M",
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        qemu_io(&p, "qcow2", &["write -P 0x33 10k 20k"]);
        let mut model = qemu_content(&p, dir.path());
        let mut img = Image::open(&p).unwrap();
        let mut rng = Rng(opts.len() as u64);
        // Enough data to need new refcount blocks and a larger refcount table for 1-bit.
        random_writes(&mut img, &mut model, &mut rng, 200, 60_000);
        img.flush().unwrap();
        assert_eq!(our_content(&mut img), model, "{opts}");
        drop(img);
        assert_clean(&p);
        assert_eq!(qemu_content(&p, dir.path()), model, "{opts}");
    }
}

#[test]
fn partial_cluster_write_copies_up_the_whole_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(3);
    let base = dir.path().join("base.raw");
    let base_data = random_raw(&base, 4 * 65536, &mut rng);
    let top = dir.path().join("top.qcow2");
    qcow2(&top, None, Some((&base, Format::Raw)), 16);
    let mut img = Image::open(&top).unwrap();
    img.write_at(65536 + 1000, &[0xee; 100]).unwrap();
    let s = img.stats();
    assert_eq!((s.copy_ups, s.clusters_allocated), (1, 1));
    // A write covering a whole cluster needs no copy-up.
    img.write_at(2 * 65536, &[0x77; 65536]).unwrap();
    assert_eq!(img.stats().copy_ups, 1);
    assert_eq!(img.stats().clusters_allocated, 2);
    // A second write to the copied-up cluster is in place.
    img.write_at(65536 + 5000, &[0x66; 10]).unwrap();
    assert_eq!(img.stats().clusters_allocated, 2);
    img.flush().unwrap();

    let mut expected = base_data.clone();
    expected[65536 + 1000..65536 + 1100].fill(0xee);
    expected[2 * 65536..3 * 65536].fill(0x77);
    expected[65536 + 5000..65536 + 5010].fill(0x66);
    assert_eq!(our_content(&mut img), expected);

    // The host cluster holds the merged cluster: old bytes around the write.
    let ext = img.map_read(65536, 65536).unwrap();
    assert_eq!(ext.len(), 1);
    let Extent::Data {
        file,
        file_offset,
        len,
    } = &ext[0]
    else {
        panic!("expected data, got {ext:?}");
    };
    let mut host = vec![0u8; *len as usize];
    file.read_exact_at(&mut host, *file_offset).unwrap();
    assert_eq!(host, expected[65536..2 * 65536]);
    drop(img);
    assert_clean(&top);
    assert_eq!(std::fs::read(&base).unwrap(), base_data);
}

#[test]
fn backing_smaller_than_overlay_reads_zeros_beyond() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(4);
    let base = dir.path().join("small.raw");
    let base_data = random_raw(&base, 100_000, &mut rng);
    let top = dir.path().join("top.qcow2");
    qcow2(&top, Some(MIB), Some((&base, Format::Raw)), 16);
    let mut img = Image::open(&top).unwrap();
    let mut model = vec![0u8; MIB as usize];
    model[..100_000].copy_from_slice(&base_data);
    assert_eq!(our_content(&mut img), model);
    // Copy-up of the cluster that straddles the end of the backing file.
    img.write_at(99_000, &[1u8; 2000]).unwrap();
    model[99_000..101_000].fill(1);
    assert_eq!(our_content(&mut img), model);
    let ext = img.map_read(200_000, 1000).unwrap();
    assert!(matches!(ext[..], [Extent::Zero { len: 1000 }]), "{ext:?}");
    drop(img);
    assert_clean(&top);
    assert_eq!(qemu_content(&top, dir.path()), model);
}

#[test]
fn mapping_api_for_asynchronous_io() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(5);
    let base = dir.path().join("base.raw");
    let mut model = random_raw(&base, MIB, &mut rng);
    let top = dir.path().join("top.qcow2");
    qcow2(&top, None, Some((&base, Format::Raw)), 14);
    let mut img = Image::open(&top).unwrap();
    assert_eq!(img.cluster_size(), 16384);
    assert_eq!(img.clusters_touched(16383, 2), 0..2);
    assert_eq!(img.clusters_touched(16384, 16384), 1..2);
    assert_eq!(img.clusters_touched(5, 0), 0..0);

    // Before any write everything maps to the base file, in one extent.
    let ext = img.map_read(0, MIB).unwrap();
    assert_eq!(ext.len(), 1);
    for round in 0..50 {
        let len = 1 + rng.below(60_000);
        let off = rng.below(MIB - len);
        let mut data = vec![0u8; len as usize];
        rng.fill(&mut data);
        let extents = img.prepare_write(off, len).unwrap();
        assert_eq!(extents.iter().map(Extent::len).sum::<u64>(), len);
        // Prepared, not yet written: the content must still be the old one.
        if round % 10 == 0 {
            assert_eq!(our_content(&mut img), model);
        }
        let mut at = 0usize;
        for e in extents {
            let Extent::Data {
                file,
                file_offset,
                len,
            } = e
            else {
                panic!("prepare_write returned a zero extent");
            };
            file.write_all_at(&data[at..at + len as usize], file_offset)
                .unwrap();
            at += len as usize;
        }
        model[off as usize..(off + len) as usize].copy_from_slice(&data);
    }
    // map_read agrees with read_at.
    let mut via_map = vec![0u8; MIB as usize];
    let mut at = 0usize;
    for e in img.map_read(0, MIB).unwrap() {
        match e {
            Extent::Zero { len } => at += len as usize,
            Extent::Data {
                file,
                file_offset,
                len,
            } => {
                file.read_exact_at(&mut via_map[at..at + len as usize], file_offset)
                    .unwrap();
                at += len as usize;
            }
        }
    }
    assert_eq!(via_map, model);
    assert_eq!(our_content(&mut img), model);
    assert!(img.stats().copy_ups > 0);
    img.flush().unwrap();
    drop(img);
    assert_clean(&top);
    assert_eq!(qemu_content(&top, dir.path()), model);
}

#[test]
fn refcount_table_grows_with_small_clusters() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("grow.qcow2");
    // 512 B clusters: the initial one-cluster refcount table covers 8 MiB of file.
    qcow2(&p, Some(24 * MIB), None, 9);
    let mut model = vec![0u8; 24 * MIB as usize];
    let mut rng = Rng(6);
    for round in 0..3 {
        let mut img = Image::open(&p).unwrap();
        // Scattered writes: many L2 tables and data clusters.
        for _ in 0..400 {
            let len = 512 + rng.below(16_000);
            let off = rng.below(24 * MIB - len);
            let mut buf = vec![0u8; len as usize];
            rng.fill(&mut buf);
            img.write_at(off, &buf).unwrap();
            model[off as usize..(off + len) as usize].copy_from_slice(&buf);
        }
        img.flush().unwrap();
        assert_eq!(our_content(&mut img), model, "round {round}");
        drop(img);
        assert_clean(&p);
    }
    let info = info_chain(&p);
    assert!(info[0]["actual-size"].as_u64().unwrap() > 8 * MIB);
    // The refcount table really moved and grew (header bytes 48..60).
    let header = std::fs::read(&p).unwrap();
    let rt_offset = u64::from_be_bytes(header[48..56].try_into().unwrap());
    let rt_clusters = u32::from_be_bytes(header[56..60].try_into().unwrap());
    assert!(
        rt_clusters > 1 && rt_offset > 512,
        "{rt_offset:#x} {rt_clusters}"
    );
    assert_eq!(qemu_content(&p, dir.path()), model);
}

#[test]
fn raw_top_image_reads_and_writes() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("disk.raw");
    create_raw(&p, MIB, false).unwrap();
    let mut img = Image::open(&p).unwrap();
    assert_eq!(img.format(), Format::Raw);
    img.write_at(4095, b"hello").unwrap();
    let mut buf = [0u8; 7];
    img.read_at(4094, &mut buf).unwrap();
    assert_eq!(&buf, b"\0hello\0");
    img.flush().unwrap();
    assert!(img.write_at(MIB - 2, b"abc").is_err());
    let ext = img.prepare_write(10, 20).unwrap();
    assert!(matches!(
        ext[..],
        [Extent::Data {
            file_offset: 10,
            len: 20,
            ..
        }]
    ));
}

#[test]
fn qemu_made_backing_outside_the_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    let other = dir.path().join("other");
    std::fs::create_dir(&images).unwrap();
    std::fs::create_dir(&other).unwrap();
    let secret = other.join("secret.raw");
    std::fs::write(&secret, vec![b'S'; MIB as usize]).unwrap();
    let qimg = |args: &[&str]| {
        let out = qemu_img(args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let evil = images.join("evil.qcow2");
    let evil_s = evil.to_str().unwrap();
    qimg(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "/etc/shadow",
        "-F",
        "raw",
        evil_s,
        "1M",
    ]);
    let e = Image::open_read_only(&evil)
        .err()
        .expect("opened over /etc/shadow");
    assert!(matches!(e, disk::Error::BackingRefused { .. }), "{e:?}");
    assert!(e.to_string().contains("/etc/shadow"), "{e}");
    let up = images.join("up.qcow2");
    let up_s = up.to_str().unwrap();
    qimg(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "../other/secret.raw",
        "-F",
        "raw",
        up_s,
    ]);
    assert!(matches!(
        Image::open_read_only(&up),
        Err(disk::Error::BackingRefused { .. })
    ));
    // Allowed explicitly, the same image reads its backing file.
    let opts = disk::OpenOptions {
        read_only: true,
        backing_policy: disk::PathPolicy::same_dir().allow_dir(&other),
        ..disk::OpenOptions::default()
    };
    let mut img = Image::open_with(&up, &opts).unwrap();
    let mut buf = [0u8; 8];
    img.read_at(0, &mut buf).unwrap();
    assert_eq!(buf, [b'S'; 8]);
    // A QEMU chain inside one directory opens as before.
    let base = images.join("base.raw");
    std::fs::write(&base, vec![3u8; MIB as usize]).unwrap();
    let mid = images.join("mid.qcow2");
    let top = images.join("top.qcow2");
    qimg(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        mid.to_str().unwrap(),
    ]);
    qimg(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        top.to_str().unwrap(),
    ]);
    let mut img = Image::open(&top).unwrap();
    assert_eq!(img.backing_chain().len(), 3);
    img.read_at(MIB - 8, &mut buf).unwrap();
    assert_eq!(buf, [3u8; 8]);
}
