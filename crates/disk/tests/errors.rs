//! Refusals: corrupt headers, missing files, unsupported features, read-only violations.
//! Every refused open leaves the file byte for byte unchanged.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use disk::{
    create_qcow2, create_raw, CreateOptions, Error, Format, HeaderError, Image, OpenOptions,
};

fn new_qcow2(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    create_qcow2(
        &p,
        &CreateOptions {
            size: Some(1 << 20),
            ..CreateOptions::default()
        },
    )
    .unwrap();
    p
}

fn patch(path: &Path, at: usize, bytes: &[u8]) {
    let mut data = std::fs::read(path).unwrap();
    data[at..at + bytes.len()].copy_from_slice(bytes);
    std::fs::write(path, data).unwrap();
}

/// Opens read-write (the dangerous way) and returns the header problem.
fn refused(path: &Path) -> HeaderError {
    let before = std::fs::read(path).unwrap();
    // The format is given: probing a file with a damaged magic would (rightly) find raw.
    let opts = OpenOptions {
        format: Some(Format::Qcow2),
        ..OpenOptions::default()
    };
    let err = Image::open_with(path, &opts).err().expect("open must fail");
    assert_eq!(
        std::fs::read(path).unwrap(),
        before,
        "refused open modified the file"
    );
    match err {
        Error::Header { path: p, problem } => {
            assert_eq!(p, path);
            problem
        }
        other => panic!("expected a header error, got {other:?}"),
    }
}

#[test]
fn corrupt_headers_are_refused_each_with_its_own_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    type Case = (&'static str, usize, Vec<u8>, HeaderError);
    let cases: Vec<Case> = vec![
        ("magic", 3, vec![0xfa], HeaderError::BadMagic),
        (
            "version",
            4,
            1u32.to_be_bytes().to_vec(),
            HeaderError::Version(1),
        ),
        (
            "version4",
            4,
            4u32.to_be_bytes().to_vec(),
            HeaderError::Version(4),
        ),
        (
            "bits_small",
            20,
            8u32.to_be_bytes().to_vec(),
            HeaderError::ClusterBits(8),
        ),
        (
            "bits_big",
            20,
            22u32.to_be_bytes().to_vec(),
            HeaderError::ClusterBits(22),
        ),
        (
            "incompat",
            72,
            (1u64 << 17).to_be_bytes().to_vec(),
            HeaderError::IncompatibleFeatures(1 << 17),
        ),
        (
            "extl2",
            72,
            16u64.to_be_bytes().to_vec(),
            HeaderError::ExtendedL2,
        ),
        (
            "datafile",
            72,
            4u64.to_be_bytes().to_vec(),
            HeaderError::ExternalDataFile,
        ),
        (
            "crypt",
            32,
            1u32.to_be_bytes().to_vec(),
            HeaderError::Encrypted(1),
        ),
        (
            "l1_eof",
            40,
            (1u64 << 30).to_be_bytes().to_vec(),
            HeaderError::BeyondEof("L1 table"),
        ),
        (
            "rt_eof",
            48,
            (1u64 << 30).to_be_bytes().to_vec(),
            HeaderError::BeyondEof("refcount table"),
        ),
        (
            "rt_zero",
            48,
            0u64.to_be_bytes().to_vec(),
            HeaderError::OverlapsHeader("refcount table"),
        ),
        (
            "l1_align",
            40,
            0x30200u64.to_be_bytes().to_vec(),
            HeaderError::Misaligned("L1 table"),
        ),
        (
            "l1_small",
            36,
            0u32.to_be_bytes().to_vec(),
            HeaderError::L1TooSmall {
                l1_size: 0,
                needed: 1,
            },
        ),
        (
            "rc_order",
            96,
            9u32.to_be_bytes().to_vec(),
            HeaderError::RefcountOrder(9),
        ),
        (
            "hdr_len",
            100,
            100u32.to_be_bytes().to_vec(),
            HeaderError::HeaderLength(100),
        ),
    ];
    for (name, at, bytes, expected) in cases {
        let p = new_qcow2(d, &format!("{name}.qcow2"));
        patch(&p, at, &bytes);
        assert_eq!(refused(&p), expected, "case {name}");
        // Also refused read-only (except a damaged magic, which probes as raw), and the
        // error message names the file.
        if name != "magic" {
            let e = Image::open_read_only(&p).err().unwrap();
            assert!(e.to_string().contains(&format!("{name}.qcow2")), "{e}");
        }
    }
    // A truncated file.
    let p = d.join("short.qcow2");
    std::fs::write(&p, b"QFI\xfb\0\0\0\x03").unwrap();
    assert!(matches!(refused(&p), HeaderError::TooShort(8)));
}

#[test]
fn missing_image_and_missing_backing_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.qcow2");
    match Image::open(&missing) {
        Err(Error::Open { path, .. }) => assert_eq!(path, missing),
        other => panic!("{:?}", other.err()),
    }
    let base = dir.path().join("base.raw");
    create_raw(&base, 1 << 20, false).unwrap();
    let top = dir.path().join("top.qcow2");
    create_qcow2(
        &top,
        &CreateOptions {
            backing: Some((&base, Format::Raw)),
            ..CreateOptions::default()
        },
    )
    .unwrap();
    std::fs::remove_file(&base).unwrap();
    let before = std::fs::read(&top).unwrap();
    let err = Image::open(&top).err().unwrap();
    match &err {
        Error::OpenBacking {
            image,
            backing,
            source,
        } => {
            assert_eq!(image, &top);
            assert_eq!(backing, &base);
            assert!(matches!(**source, Error::Open { .. }));
        }
        other => panic!("{other:?}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("top.qcow2") && msg.contains("base.raw"),
        "{msg}"
    );
    assert_eq!(std::fs::read(&top).unwrap(), before);
    // Creating an overlay over a missing file fails too, and creates nothing.
    let other = dir.path().join("other.qcow2");
    let e = create_qcow2(
        &other,
        &CreateOptions {
            backing: Some((&base, Format::Raw)),
            ..CreateOptions::default()
        },
    );
    assert!(matches!(e, Err(Error::OpenBacking { .. })));
    assert!(!other.exists());
}

#[test]
fn unknown_backing_format_is_unsupported() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    create_raw(&base, 1 << 20, false).unwrap();
    let top = dir.path().join("top.qcow2");
    create_qcow2(
        &top,
        &CreateOptions {
            backing: Some((Path::new("base.raw"), Format::Raw)),
            ..CreateOptions::default()
        },
    )
    .unwrap();
    // Replace "raw" by "vdi" in the backing format extension.
    let data = std::fs::read(&top).unwrap();
    let at = data.windows(3).position(|w| w == b"raw").unwrap();
    patch(&top, at, b"vdi");
    let e = Image::open(&top).err().unwrap();
    assert!(matches!(e, Error::Unsupported { .. }), "{e:?}");
}

#[test]
fn compressed_clusters_are_refused_not_misread() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let mut data = vec![0u8; 1 << 20];
    for (i, b) in data.iter_mut().enumerate() {
        *b = (i / 1000) as u8;
    }
    std::fs::write(&src, &data).unwrap();
    let comp = dir.path().join("comp.qcow2");
    let o = qemu_img(&[
        "convert",
        "-c",
        "-O",
        "qcow2",
        src.to_str().unwrap(),
        comp.to_str().unwrap(),
    ]);
    assert!(o.status.success());
    let before = std::fs::read(&comp).unwrap();
    let mut img = Image::open(&comp).unwrap();
    let mut buf = vec![0u8; 4096];
    let e = img.read_at(0, &mut buf).err().unwrap();
    assert!(
        matches!(&e, Error::Unsupported { what, .. } if what.contains("compressed")),
        "{e:?}"
    );
    assert!(matches!(
        img.map_read(0, 10),
        Err(Error::Unsupported { .. })
    ));
    assert!(matches!(
        img.write_at(0, &[1]),
        Err(Error::Unsupported { .. })
    ));
    drop(img);
    assert_eq!(std::fs::read(&comp).unwrap(), before);
    // An overlay over it reads fine where it has its own data and refuses elsewhere.
    let top = dir.path().join("top.qcow2");
    create_qcow2(
        &top,
        &CreateOptions {
            backing: Some((&comp, Format::Qcow2)),
            ..Default::default()
        },
    )
    .unwrap();
    let mut img = Image::open(&top).unwrap();
    img.write_at(0, &vec![9u8; 65536]).unwrap();
    img.read_at(0, &mut buf).unwrap();
    assert!(img.read_at(65536, &mut buf).is_err());
    // A partial write needs a copy-up from the compressed cluster: refused.
    assert!(img.write_at(65536 + 10, &[1]).is_err());
}

#[test]
fn dirty_corrupt_and_snapshot_images_are_not_written() {
    let dir = tempfile::tempdir().unwrap();
    for (name, at, bytes) in [
        ("dirty", 72usize, 1u64.to_be_bytes().to_vec()),
        ("corrupt", 72, 2u64.to_be_bytes().to_vec()),
    ] {
        let p = new_qcow2(dir.path(), &format!("{name}.qcow2"));
        patch(&p, at, &bytes);
        let before = std::fs::read(&p).unwrap();
        assert!(
            matches!(Image::open(&p), Err(Error::Unsupported { .. })),
            "{name}"
        );
        // Read-only opening is allowed.
        let mut img = Image::open_read_only(&p).unwrap();
        let mut b = [0u8; 10];
        img.read_at(0, &mut b).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), before);
    }
    let p = new_qcow2(dir.path(), "snap.qcow2");
    assert!(qemu_img(&["snapshot", "-c", "s1", p.to_str().unwrap()])
        .status
        .success());
    assert!(matches!(Image::open(&p), Err(Error::Unsupported { .. })));
    assert!(Image::open_read_only(&p).is_ok());
}

#[test]
fn read_only_violations() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, vec![3u8; 1 << 20]).unwrap();
    let top = dir.path().join("top.qcow2");
    create_qcow2(
        &top,
        &CreateOptions {
            backing: Some((&base, Format::Raw)),
            ..Default::default()
        },
    )
    .unwrap();
    let before = std::fs::read(&top).unwrap();
    let mut img = Image::open_read_only(&top).unwrap();
    assert!(img.is_read_only());
    assert!(matches!(img.write_at(0, &[1]), Err(Error::ReadOnly { .. })));
    assert!(matches!(
        img.prepare_write(0, 1),
        Err(Error::ReadOnly { .. })
    ));
    assert!(matches!(
        img.set_backing(&base, None),
        Err(Error::ReadOnly { .. })
    ));
    img.flush().unwrap();
    drop(img);
    assert_eq!(std::fs::read(&top).unwrap(), before);
    let mut raw = Image::open_read_only(&base).unwrap();
    assert!(matches!(raw.write_at(0, &[1]), Err(Error::ReadOnly { .. })));

    // Writes through an overlay never reach the backing file.
    let mut img = Image::open(&top).unwrap();
    img.write_at(100, &[9u8; 70_000]).unwrap();
    img.flush().unwrap();
    assert_eq!(std::fs::read(&base).unwrap(), vec![3u8; 1 << 20]);

    // Out-of-range accesses.
    let mut buf = [0u8; 2];
    assert!(matches!(
        img.read_at((1 << 20) - 1, &mut buf),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        img.write_at(u64::MAX, &buf),
        Err(Error::OutOfRange { .. })
    ));
}

#[test]
fn create_refuses_to_overwrite_unless_asked() {
    let dir = tempfile::tempdir().unwrap();
    let p = new_qcow2(dir.path(), "x.qcow2");
    let before = std::fs::read(&p).unwrap();
    let opts = CreateOptions {
        size: Some(1 << 20),
        ..Default::default()
    };
    assert!(matches!(create_qcow2(&p, &opts), Err(Error::Exists { .. })));
    assert!(matches!(
        create_raw(&p, 10, false),
        Err(Error::Exists { .. })
    ));
    assert_eq!(std::fs::read(&p).unwrap(), before);
    create_qcow2(
        &p,
        &CreateOptions {
            overwrite: true,
            size: Some(2 << 20),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(Image::open(&p).unwrap().size(), 2 << 20);
    assert!(matches!(
        create_qcow2(
            &dir.path().join("y"),
            &CreateOptions {
                cluster_bits: 8,
                size: Some(1),
                ..Default::default()
            }
        ),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(matches!(
        create_qcow2(&dir.path().join("z"), &CreateOptions::default()),
        Err(Error::InvalidArgument { .. })
    ));
}

#[test]
fn backing_chain_loop_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.qcow2");
    let b = dir.path().join("b.qcow2");
    create_raw(&a, 1 << 20, false).unwrap();
    create_qcow2(
        &b,
        &CreateOptions {
            backing: Some((Path::new("a.qcow2"), Format::Raw)),
            ..Default::default()
        },
    )
    .unwrap();
    std::fs::remove_file(&a).unwrap();
    create_qcow2(
        &a,
        &CreateOptions {
            size: Some(1 << 20),
            backing: Some((Path::new("b.qcow2"), Format::Qcow2)),
            ..Default::default()
        },
    )
    .unwrap();
    // Now a → b → a → ...: b names a with format raw, but a is qcow2 now; force qcow2 via probing.
    let mut data = std::fs::read(&b).unwrap();
    let at = data.windows(3).position(|w| w == b"raw").unwrap();
    data[at - 8..at - 4].copy_from_slice(&[0, 0, 0, 0]); // drop the extension: format probed
    std::fs::write(&b, data).unwrap();
    let e = Image::open(&a).err().unwrap();
    let mut cur: &Error = &e;
    while let Error::OpenBacking { source, .. } = cur {
        cur = source;
    }
    assert!(matches!(cur, Error::ChainTooDeep { .. }), "{e:?}");
}

#[test]
fn write_into_a_data_cluster_beyond_the_file_is_refused() {
    // Found by fuzzing: an L2 entry pointing far past the end of the file made a write grow
    // the file there, and the next allocation then tried to grow the refcount table to cover
    // it, which took unbounded time and memory.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("far.qcow2");
    create_qcow2(
        &p,
        &CreateOptions {
            size: Some(1 << 20),
            cluster_bits: 9,
            ..Default::default()
        },
    )
    .unwrap();
    let mut img = Image::open(&p).unwrap();
    img.write_at(0, &[1u8; 512]).unwrap();
    img.flush().unwrap();
    drop(img);
    let mut data = std::fs::read(&p).unwrap();
    let be = |d: &[u8], at: usize| u64::from_be_bytes(d[at..at + 8].try_into().unwrap());
    let l1 = be(&data, 40) as usize;
    let l2 = (be(&data, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    let entry = be(&data, l2);
    let far = (entry & !0x00ff_ffff_ffff_fe00) | (1 << 40);
    data[l2..l2 + 8].copy_from_slice(&far.to_be_bytes());
    std::fs::write(&p, &data).unwrap();
    let len = data.len() as u64;
    let mut img = Image::open(&p).unwrap();
    let e = img.write_at(100, &[2u8; 10]).unwrap_err();
    assert!(matches!(e, Error::Corrupt { .. }), "{e:?}");
    img.write_at(4096, &[3u8; 512]).unwrap();
    drop(img);
    assert!(std::fs::metadata(&p).unwrap().len() < len + 8192);
}
