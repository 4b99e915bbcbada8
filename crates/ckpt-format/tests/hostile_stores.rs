//! Stores that someone else prepared: planted symbolic links, paths into pseudo-filesystems,
//! raw "stores" that are someone's data. None of them is written through, and none is read.

mod common;

use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;

use ckpt_format::{Checkpoint, CheckpointWriter, DirStore, Error, Layout, Overwrite, RawStore};
use common::*;

fn create_err(store: &dyn ckpt_format::Store) -> Error {
    CheckpointWriter::create(store, &Layout { mem_size: MEM_SIZE })
        .expect_err("the store must be refused")
}

/// Deterministic bytes standing for someone's data.
fn user_data(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8 ^ 0x5c).collect()
}

#[test]
fn planted_memory_symlink_is_refused_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt");
    fs::create_dir(&dir).unwrap();
    // A dangling link: followed, the checkpoint would create the victim and report complete.
    let victim = tmp.path().join("victim");
    symlink(&victim, dir.join("memory.img")).unwrap();
    for overwrite in [Overwrite::Never, Overwrite::Incomplete, Overwrite::Any] {
        let e = create_err(&DirStore::new(&dir).overwrite(overwrite));
        assert!(matches!(e, Error::UnsafeStoreFile { .. }), "{e}");
        assert!(e.to_string().contains("memory.img"), "{e}");
        assert!(e.to_string().contains("symbolic link"), "{e}");
        assert!(!victim.exists(), "the link was followed");
    }
    // A link to an existing file: the file is left as it was.
    fs::write(&victim, b"precious").unwrap();
    for name in DirStore::FILES.iter().chain(&["COMPLETE.tmp"]) {
        let dir = tmp.path().join(format!("with-{name}"));
        fs::create_dir(&dir).unwrap();
        symlink(&victim, dir.join(name)).unwrap();
        let e = create_err(&DirStore::new(&dir).overwrite(Overwrite::Any));
        assert!(e.to_string().contains(name), "{name}: {e}");
        assert_eq!(fs::read(&victim).unwrap(), b"precious", "{name}");
        assert!(fs::symlink_metadata(dir.join(name)).unwrap().is_symlink());
    }
}

#[test]
fn checkpoint_files_that_are_symlinks_are_not_read() {
    let tmp = tempfile::tempdir().unwrap();
    let real = DirStore::new(tmp.path().join("real"));
    write_checkpoint(&real, 5);
    Checkpoint::open(&real).unwrap();
    for name in DirStore::FILES {
        // A copy of the checkpoint whose file `name` is a link to the real one.
        let dir = tmp.path().join(format!("linked-{name}"));
        fs::create_dir(&dir).unwrap();
        for f in DirStore::FILES {
            if f == name {
                symlink(real.path().join(f), dir.join(f)).unwrap();
            } else {
                fs::copy(real.path().join(f), dir.join(f)).unwrap();
            }
        }
        let store = DirStore::new(&dir);
        let e = Checkpoint::open(&store).expect_err(name);
        assert!(matches!(e, Error::UnsafeStoreFile { .. }), "{name}: {e}");
        assert!(e.to_string().contains(name), "{name}: {e}");
    }
}

#[test]
fn a_fifo_in_place_of_a_file_is_refused_without_blocking() {
    let tmp = tempfile::tempdir().unwrap();
    let real = DirStore::new(tmp.path().join("real"));
    write_checkpoint(&real, 5);
    let fifo = real.path().join("manifest.json");
    fs::remove_file(&fifo).unwrap();
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let e = Checkpoint::open(&real).expect_err("a FIFO is no manifest");
    assert!(matches!(e, Error::UnsafeStoreFile { .. }), "{e}");
}

#[test]
fn pseudo_filesystem_paths_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let target = fs::canonicalize(tmp.path()).unwrap().join("target");
    // Paths that resolve to an ordinary directory, but only through /proc.
    let via_proc = Path::new("/proc/self/root").join(target.strip_prefix("/").unwrap());
    let link = tmp.path().join("link");
    symlink(&via_proc, &link).unwrap();
    for dir in [via_proc.as_path(), link.as_path()] {
        let e = create_err(&DirStore::new(dir));
        assert!(matches!(e, Error::StorePathRefused { .. }), "{e}");
        assert!(e.to_string().contains(&*dir.to_string_lossy()), "{e}");
        assert!(e.to_string().contains("/proc"), "{e}");
    }
    assert!(!target.exists(), "the store was written through /proc");
    // Reading is refused too, before anything is opened there.
    for dir in ["/proc/self/cwd", "/proc", "/sys/kernel", "/dev/shm", "/dev"] {
        let e = Checkpoint::open(&DirStore::new(dir)).expect_err(dir);
        assert!(matches!(e, Error::StorePathRefused { .. }), "{dir}: {e}");
        assert!(e.to_string().contains(dir), "{e}");
    }
    // The check is by component: a directory merely named like one is fine.
    let lookalike = DirStore::new(tmp.path().join("proc").join("dev"));
    write_checkpoint(&lookalike, 1);
    Checkpoint::open(&lookalike).unwrap();
}

#[test]
fn raw_store_over_user_data_leaves_it_intact() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("user-file");
    let data = user_data(16 << 20);
    fs::write(&path, &data).unwrap();
    let store = RawStore::new(&path);
    let e = create_err(&store);
    assert!(matches!(e, Error::NotRawStore { .. }), "{e}");
    assert!(e.to_string().contains(&*path.to_string_lossy()), "{e}");
    assert!(fs::read(&path).unwrap() == data, "user data changed");
    // Nor does `init` take it without being asked to overwrite.
    let e = RawStore::init(&path, None).unwrap_err();
    assert!(matches!(e, Error::RawInitRefused { .. }), "{e}");
    let e = RawStore::init(&path, Some(32 << 20)).unwrap_err();
    assert!(matches!(e, Error::RawInitRefused { .. }), "{e}");
    assert!(fs::read(&path).unwrap() == data, "user data changed");
    // A short file is not a store either.
    let short = tmp.path().join("short");
    fs::write(&short, b"hello").unwrap();
    assert!(matches!(
        create_err(&RawStore::new(&short)),
        Error::NotRawStore { .. }
    ));
    assert_eq!(fs::read(&short).unwrap(), b"hello");
}

#[test]
fn raw_store_is_made_by_init_and_reused() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("store");
    let size = RawStore::needed_capacity(MEM_SIZE, 4096, 8192);
    let e = RawStore::init(&path, None).unwrap_err();
    assert!(e.to_string().contains("needs a size"), "{e}");
    assert!(!path.exists());
    let store = RawStore::init(&path, Some(size)).unwrap();
    assert_eq!(fs::metadata(&path).unwrap().len(), size);
    // Initialised and empty: no checkpoint to open.
    let e = Checkpoint::open(&store).unwrap_err();
    assert!(matches!(e, Error::Incomplete { .. }), "{e}");
    write_checkpoint(&store, 1);
    Checkpoint::open(&store)
        .unwrap()
        .verify_memory(2, &|_| {})
        .unwrap();
    // A store already, with a checkpoint: `init` refuses it, a new checkpoint replaces it.
    assert!(matches!(
        RawStore::init(&path, None),
        Err(Error::RawInitRefused { .. })
    ));
    write_checkpoint(&store, 2);
    Checkpoint::open(&store)
        .unwrap()
        .verify_memory(2, &|_| {})
        .unwrap();
    // Asked explicitly, `init` gives up the checkpoint.
    RawStore::init_overwriting(&path, None).unwrap();
    assert!(matches!(
        Checkpoint::open(&store),
        Err(Error::Incomplete { .. })
    ));
    // An empty existing file is taken, given a size.
    let empty = tmp.path().join("empty");
    fs::write(&empty, b"").unwrap();
    assert!(RawStore::init(&empty, None).is_err());
    let store = RawStore::init(&empty, Some(size)).unwrap();
    write_checkpoint(&store, 3);
    // Too small to hold even the superblock.
    assert!(matches!(
        RawStore::init(tmp.path().join("tiny"), Some(4096)),
        Err(Error::RawInitRefused { .. })
    ));
    assert!(!tmp.path().join("tiny").exists());
}

#[test]
fn raw_store_init_never_takes_a_device_unasked() {
    // A character device stands for any special file; block devices need real hardware.
    let e = RawStore::init("/dev/null", None).unwrap_err();
    assert!(matches!(e, Error::RawInitRefused { .. }), "{e}");
    let e = RawStore::init_overwriting("/dev/null", None).unwrap_err();
    assert!(matches!(e, Error::RawInitRefused { .. }), "{e}");
}
