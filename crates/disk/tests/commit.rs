//! Commit of an overlay into raw and qcow2 parents, and rebasing a running overlay (M5, M6).

mod common;

use std::path::Path;

use common::*;
use disk::{commit, create_qcow2, CreateOptions, Format, Image};

const MIB: u64 = 1 << 20;

fn overlay(path: &Path, backing: &Path, format: Format, bits: u32, size: Option<u64>) {
    create_qcow2(
        path,
        &CreateOptions {
            size,
            backing: Some((backing, format)),
            cluster_bits: bits,
            overwrite: false,
            ..CreateOptions::default()
        },
    )
    .unwrap();
}

fn scribble(img: &mut Image, model: &mut Vec<u8>, rng: &mut Rng, count: usize) {
    let size = img.size();
    model.resize(size as usize, 0);
    for _ in 0..count {
        let len = 1 + rng.below(50_000);
        let off = rng.below(size - len);
        let mut buf = vec![0u8; len as usize];
        rng.fill(&mut buf);
        img.write_at(off, &buf).unwrap();
        model[off as usize..(off + len) as usize].copy_from_slice(&buf);
    }
    img.flush().unwrap();
}

/// Runs commit and checks the progress reports.
fn commit_checked(top: &Path) -> disk::CommitStats {
    let mut reports = Vec::new();
    let stats = commit(top, &mut |done, total| reports.push((done, total))).unwrap();
    let total = reports[0].1;
    assert_eq!(reports.first(), Some(&(0, total)));
    assert_eq!(reports.last(), Some(&(total, total)));
    assert!(reports
        .windows(2)
        .all(|w| w[0].0 <= w[1].0 && w[1].1 == total));
    assert_eq!(stats.bytes, total);
    stats
}

#[test]
fn commit_into_raw_parent() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(11);
    let base = dir.path().join("base.raw");
    let mut model = vec![0u8; 2 * MIB as usize];
    rng.fill(&mut model);
    std::fs::write(&base, &model).unwrap();
    let top = dir.path().join("top.qcow2");
    overlay(&top, &base, Format::Raw, 16, None);
    let mut img = Image::open(&top).unwrap();
    scribble(&mut img, &mut model, &mut rng, 40);
    drop(img);
    // Zero clusters written by QEMU must be committed as zeros.
    qemu_io(&top, "qcow2", &["write -z 1M 128k"]);
    model[MIB as usize..(MIB + 131_072) as usize].fill(0);
    let top_before = std::fs::read(&top).unwrap();

    let stats = commit_checked(&top);
    assert_eq!(stats.base, base);
    assert!(stats.clusters > 0);
    assert_eq!(std::fs::read(&base).unwrap(), model);
    // The top keeps its content and is untouched.
    assert_eq!(std::fs::read(&top).unwrap(), top_before);
    assert_clean(&top);
    let o = qemu_img(&["compare", top.to_str().unwrap(), base.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
}

#[test]
fn commit_into_qcow2_parent_with_other_cluster_sizes() {
    // Top clusters smaller than the parent's (partial parent clusters need copy-ups from the
    // parent's own backing file) and larger.
    for (top_bits, mid_bits) in [(12u32, 16u32), (16, 12)] {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = Rng(u64::from(top_bits) * 100 + u64::from(mid_bits));
        let base = dir.path().join("base.raw");
        let mut model = vec![0u8; 3 * MIB as usize];
        rng.fill(&mut model);
        std::fs::write(&base, &model).unwrap();
        let base_before = model.clone();
        let mid = dir.path().join("mid.qcow2");
        overlay(&mid, &base, Format::Raw, mid_bits, None);
        let mut m = Image::open(&mid).unwrap();
        scribble(&mut m, &mut model, &mut rng, 20);
        drop(m);
        let top = dir.path().join("top.qcow2");
        overlay(&top, &mid, Format::Qcow2, top_bits, None);
        let mut t = Image::open(&top).unwrap();
        scribble(&mut t, &mut model, &mut rng, 30);
        drop(t);

        commit_checked(&top);
        let mut m = Image::open_read_only(&mid).unwrap();
        assert_eq!(our_content(&mut m), model, "{top_bits}/{mid_bits}");
        assert_clean(&mid);
        assert_clean(&top);
        assert_eq!(qemu_content(&mid, dir.path()), model);
        assert_eq!(qemu_content(&top, dir.path()), model);
        assert_eq!(std::fs::read(&base).unwrap(), base_before);
    }
}

#[test]
fn commit_of_a_larger_overlay_grows_a_raw_parent() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, vec![0x42u8; 100_000]).unwrap();
    let top = dir.path().join("top.qcow2");
    overlay(&top, &base, Format::Raw, 16, Some(MIB));
    let mut img = Image::open(&top).unwrap();
    img.write_at(MIB - 10, &[7u8; 10]).unwrap();
    img.flush().unwrap();
    drop(img);
    commit_checked(&top);
    let data = std::fs::read(&base).unwrap();
    assert_eq!(data.len() as u64, MIB);
    assert!(data[..100_000].iter().all(|&b| b == 0x42));
    assert!(data[100_000..(MIB - 10) as usize].iter().all(|&b| b == 0));
    assert!(data[(MIB - 10) as usize..].iter().all(|&b| b == 7));
}

#[test]
fn commit_refuses_images_without_backing() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("alone.qcow2");
    create_qcow2(
        &p,
        &CreateOptions {
            size: Some(MIB),
            ..Default::default()
        },
    )
    .unwrap();
    assert!(matches!(
        commit(&p, &mut |_, _| {}),
        Err(disk::Error::InvalidArgument { .. })
    ));
}

/// The checkpoint sequence of design.md §2.8: the VM runs on C over P; a checkpoint switches it to
/// a new COW file C2 over C; C is committed into P while the VM keeps writing C2; C2 is then
/// rebased onto P, all without the VM seeing a single byte change.
#[test]
fn commit_while_running_on_a_new_overlay_then_rebase() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(99);
    let p = dir.path().join("parent.qcow2");
    create_qcow2(
        &p,
        &CreateOptions {
            size: Some(2 * MIB),
            ..Default::default()
        },
    )
    .unwrap();
    let c = dir.path().join("c.qcow2");
    overlay(&c, Path::new("parent.qcow2"), Format::Qcow2, 16, None);
    let mut model = Vec::new();
    let mut vm = Image::open(&c).unwrap();
    scribble(&mut vm, &mut model, &mut rng, 30);

    // M1: the new COW file is created while the VM still writes C (reads only C's header).
    let c2 = dir.path().join("c2.qcow2");
    overlay(&c2, Path::new("c.qcow2"), Format::Qcow2, 16, None);
    // M2: switch the disk.
    drop(vm);
    let mut vm = Image::open(&c2).unwrap();
    assert_eq!(our_content(&mut vm), model);

    // M5/M6: commit C into P in another thread while the VM writes C2.
    let c_path = c.clone();
    let committer = std::thread::spawn(move || commit(&c_path, &mut |_, _| {}).unwrap());
    scribble(&mut vm, &mut model, &mut rng, 30);
    committer.join().unwrap();
    assert_eq!(our_content(&mut vm), model);

    // Rebase the running overlay onto P: C drops out of the chain.
    vm.set_backing(Path::new("parent.qcow2"), Some(Format::Qcow2))
        .unwrap();
    assert_eq!(vm.backing_chain().len(), 2);
    assert_eq!(our_content(&mut vm), model);
    scribble(&mut vm, &mut model, &mut rng, 10);
    drop(vm);
    std::fs::remove_file(&c).unwrap();
    let info = info_chain(&c2);
    assert_eq!(info.as_array().unwrap().len(), 2);
    assert_eq!(info[0]["backing-filename"], "parent.qcow2");
    assert_clean(&c2);
    assert_clean(&p);
    assert_eq!(qemu_content(&c2, dir.path()), model);
    let mut reopened = Image::open(&c2).unwrap();
    assert_eq!(our_content(&mut reopened), model);
}
