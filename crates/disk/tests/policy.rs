//! The backing-file path policy: a backing file resolves inside the directory of the image
//! naming it, or inside a directory the caller allows, symlinks followed.

use std::path::{Path, PathBuf};

use disk::{
    commit_with, create_qcow2, create_raw, CreateOptions, Error, Format, Image, OpenOptions,
    PathPolicy,
};

const MIB: u64 = 1 << 20;

/// A secret outside every image directory, and an image directory beside it.
struct Dirs {
    _root: tempfile::TempDir,
    images: PathBuf,
    secret: PathBuf,
}

fn dirs() -> Dirs {
    let root = tempfile::tempdir().unwrap();
    let images = root.path().join("images");
    let outside = root.path().join("outside");
    std::fs::create_dir(&images).unwrap();
    std::fs::create_dir(&outside).unwrap();
    let secret = outside.join("shadow");
    std::fs::write(&secret, vec![b'S'; MIB as usize]).unwrap();
    Dirs {
        images,
        secret,
        _root: root,
    }
}

fn create(path: &Path, backing: &Path, format: Format, policy: PathPolicy) -> disk::Result<()> {
    create_qcow2(
        path,
        &CreateOptions {
            backing: Some((backing, format)),
            backing_policy: policy,
            ..CreateOptions::default()
        },
    )
}

/// Writes a qcow2 image naming `backing` without any check, as a hostile tool would: a clean
/// image is created over a harmless file, then its header's backing name is patched.
fn hostile_image(path: &Path, backing: &str) {
    let dir = path.parent().unwrap();
    let harmless = dir.join("harmless.raw");
    create_raw(&harmless, MIB, true).unwrap();
    let placeholder = "x".repeat(backing.len());
    std::fs::copy(&harmless, dir.join(&placeholder)).unwrap();
    create(
        path,
        Path::new(&placeholder),
        Format::Raw,
        PathPolicy::same_dir(),
    )
    .unwrap();
    let mut data = std::fs::read(path).unwrap();
    let at = data
        .windows(placeholder.len())
        .position(|w| w == placeholder.as_bytes())
        .unwrap();
    data[at..at + backing.len()].copy_from_slice(backing.as_bytes());
    std::fs::write(path, data).unwrap();
    std::fs::remove_file(dir.join(&placeholder)).unwrap();
}

fn assert_refused(result: disk::Result<impl Sized>, image: &Path, backing_names: &str) {
    let Err(e) = result else {
        panic!("{} was opened over {backing_names}", image.display());
    };
    let Error::BackingRefused {
        image: named_by, ..
    } = &e
    else {
        panic!("expected a refusal, got {e:?}");
    };
    assert_eq!(named_by, image);
    let msg = e.to_string();
    assert!(msg.contains(backing_names), "{msg}");
    assert!(msg.contains(&image.display().to_string()), "{msg}");
    assert!(msg.contains(disk::BACKING_RULE), "{msg}");
}

#[test]
fn absolute_backing_outside_the_directory_is_refused() {
    let d = dirs();
    let evil = d.images.join("evil.qcow2");
    hostile_image(&evil, d.secret.to_str().unwrap());
    assert_refused(Image::open_read_only(&evil), &evil, "shadow");
    assert_refused(Image::open(&evil), &evil, "shadow");
    let x = d.images.join("x.qcow2");
    assert_refused(
        create(&x, &d.secret, Format::Raw, PathPolicy::same_dir()),
        &x,
        "shadow",
    );
    assert!(!x.exists(), "a refused image is not created");
}

#[test]
fn dot_dot_backing_is_refused() {
    let d = dirs();
    let evil = d.images.join("evil.qcow2");
    hostile_image(&evil, "../outside/shadow");
    assert_refused(Image::open_read_only(&evil), &evil, "../outside/shadow");
    let x = d.images.join("x.qcow2");
    assert_refused(
        create(
            &x,
            Path::new("../outside/shadow"),
            Format::Raw,
            PathPolicy::same_dir(),
        ),
        &x,
        "shadow",
    );
}

#[test]
fn dot_dot_that_stays_inside_is_accepted() {
    let d = dirs();
    std::fs::create_dir(d.images.join("sub")).unwrap();
    create_raw(&d.images.join("base.raw"), MIB, false).unwrap();
    let top = d.images.join("top.qcow2");
    create(
        &top,
        Path::new("sub/../base.raw"),
        Format::Raw,
        PathPolicy::same_dir(),
    )
    .unwrap();
    assert_eq!(Image::open(&top).unwrap().backing_chain().len(), 2);
}

#[test]
fn symlink_leaving_the_directory_is_refused() {
    let d = dirs();
    let link = d.images.join("base.raw");
    std::os::unix::fs::symlink(&d.secret, &link).unwrap();
    let top = d.images.join("top.qcow2");
    assert_refused(
        create(
            &top,
            Path::new("base.raw"),
            Format::Raw,
            PathPolicy::same_dir(),
        ),
        &top,
        "base.raw",
    );
    hostile_image(&top, "base.raw");
    assert_refused(Image::open_read_only(&top), &top, "base.raw");
}

#[test]
fn symlink_inside_the_directory_is_accepted() {
    let d = dirs();
    create_raw(&d.images.join("real.raw"), MIB, false).unwrap();
    std::os::unix::fs::symlink("real.raw", d.images.join("base.raw")).unwrap();
    let top = d.images.join("top.qcow2");
    create(
        &top,
        Path::new("base.raw"),
        Format::Raw,
        PathPolicy::same_dir(),
    )
    .unwrap();
    Image::open_read_only(&top).unwrap();
}

#[test]
fn backing_in_an_allowed_directory_is_accepted() {
    let d = dirs();
    let base_dir = d.images.parent().unwrap().join("checkpoint");
    std::fs::create_dir(&base_dir).unwrap();
    let base = base_dir.join("disk.raw");
    std::fs::write(&base, vec![7u8; MIB as usize]).unwrap();
    let top = d.images.join("restore.qcow2");
    assert_refused(
        create(&top, &base, Format::Raw, PathPolicy::same_dir()),
        &top,
        "disk.raw",
    );
    let policy = PathPolicy::same_dir().allow_dir(&base_dir);
    create(&top, &base, Format::Raw, policy.clone()).unwrap();
    assert_refused(Image::open(&top), &top, "disk.raw");
    let opts = OpenOptions {
        backing_policy: policy.clone(),
        ..OpenOptions::default()
    };
    let mut img = Image::open_with(&top, &opts).unwrap();
    assert_eq!(img.backing_policy(), &policy);
    let mut buf = [0u8; 16];
    img.read_at(4096, &mut buf).unwrap();
    assert_eq!(buf, [7u8; 16]);
    img.write_at(0, &[1u8; 512]).unwrap();
    img.flush().unwrap();
    drop(img);
    // The allowed directory holds for the whole chain, and for a commit through it.
    let next = d.images.join("next.qcow2");
    assert_refused(
        create(&next, &top, Format::Qcow2, PathPolicy::same_dir()),
        &top,
        "disk.raw",
    );
    create(&next, &top, Format::Qcow2, policy.clone()).unwrap();
    assert_refused(Image::open(&next), &top, "disk.raw");
    Image::open_with(&next, &opts).unwrap();
    assert!(matches!(
        disk::commit(&top, &mut |_, _| {}),
        Err(Error::BackingRefused { .. })
    ));
    commit_with(&top, &policy, &mut |_, _| {}).unwrap();
    assert_eq!(std::fs::read(&base).unwrap()[..512], [1u8; 512]);
    // The allowed directory does not let a symlink in it point elsewhere.
    std::os::unix::fs::symlink(&d.secret, base_dir.join("link.raw")).unwrap();
    let x = d.images.join("x.qcow2");
    assert_refused(
        create(&x, &base_dir.join("link.raw"), Format::Raw, policy),
        &x,
        "link.raw",
    );
}

#[test]
fn create_refuses_a_chain_that_leaves_further_down() {
    let d = dirs();
    let evil = d.images.join("evil.qcow2");
    hostile_image(&evil, d.secret.to_str().unwrap());
    let top = d.images.join("top.qcow2");
    assert_refused(
        create(
            &top,
            Path::new("evil.qcow2"),
            Format::Qcow2,
            PathPolicy::same_dir(),
        ),
        &evil,
        "shadow",
    );
    assert!(!top.exists());
}

#[test]
fn set_backing_applies_the_policy() {
    let d = dirs();
    create_raw(&d.images.join("base.raw"), MIB, false).unwrap();
    let top = d.images.join("top.qcow2");
    create(
        &top,
        Path::new("base.raw"),
        Format::Raw,
        PathPolicy::same_dir(),
    )
    .unwrap();
    let mut img = Image::open(&top).unwrap();
    assert_refused(
        img.set_backing(&d.secret, Some(Format::Raw)),
        &top,
        "shadow",
    );
    assert_eq!(img.backing_chain()[1].path, d.images.join("base.raw"));
}
