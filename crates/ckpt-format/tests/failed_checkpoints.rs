//! A checkpoint that fails removes what it wrote, and its store can be used again at once.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use ckpt_format::{
    Checkpoint, CheckpointWriter, DirStore, Error, Layout, MemStore, RawStore, Store, PAGE_SIZE,
};
use common::*;

/// Names in `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// A small tmpfs mounted on a fresh directory, unmounted on drop.
struct SmallFs {
    _parent: tempfile::TempDir,
    mount: PathBuf,
}

impl SmallFs {
    /// `None` (with the reason printed) where mounting is not permitted.
    fn mount(size: &str) -> Option<SmallFs> {
        let parent = tempfile::tempdir().unwrap();
        let mount = parent.path().join("fs");
        fs::create_dir(&mount).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&mount)
            .output();
        match out {
            Ok(o) if o.status.success() => Some(SmallFs {
                _parent: parent,
                mount,
            }),
            Ok(o) => {
                eprintln!(
                    "skipped: cannot mount a tmpfs: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("skipped: cannot run mount: {e}");
                None
            }
        }
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mount).status();
    }
}

/// Writes every page of `pages` non-zero pages, returning the first error.
fn fill(writer: &CheckpointWriter, pages: u64) -> Result<(), Error> {
    let mut data = [0u8; PAGE_SIZE];
    for n in 0..pages {
        data[..8].copy_from_slice(&(n + 1).to_le_bytes());
        writer.memory().write_page(n, &data)?;
    }
    Ok(())
}

#[test]
fn dropped_dir_writer_removes_its_files_and_the_directory_is_reusable() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt");
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("notes.txt"), b"the user's").unwrap();
    let store = DirStore::new(&dir);
    let mut w = CheckpointWriter::create(&store, &Layout { mem_size: MEM_SIZE }).unwrap();
    write_memory(&w, PAGES, 1, 2);
    w.write_state(&state_bytes()).unwrap();
    w.finish_memory().unwrap();
    drop(w);
    assert_eq!(listing(&dir), ["notes.txt"], "only the user's file is left");
    assert_eq!(fs::read(dir.join("notes.txt")).unwrap(), b"the user's");
    // The default store (never overwriting) takes the directory again.
    write_checkpoint(&store, 2);
    Checkpoint::open(&store).unwrap();
}

#[test]
fn failed_finish_removes_what_it_wrote() {
    let tmp = tempfile::tempdir().unwrap();
    let store = DirStore::new(tmp.path().join("ckpt"));
    let mut w = CheckpointWriter::create(&store, &Layout { mem_size: MEM_SIZE }).unwrap();
    write_memory(&w, PAGES, 1, 2);
    w.write_state(&state_bytes()).unwrap();
    // No page is missing, but the configuration disagrees with the layout: finish fails after
    // the page index is written.
    let mut vm = vm_config();
    vm.mem_size = MEM_SIZE * 2;
    w.set_vm_config(vm);
    assert!(matches!(w.finish(), Err(Error::MemorySizeMismatch { .. })));
    assert!(listing(store.path()).is_empty());
    write_checkpoint(&store, 2);
}

#[test]
fn explicit_discard_reports_and_a_finished_checkpoint_stays() {
    let tmp = tempfile::tempdir().unwrap();
    let store = DirStore::new(tmp.path().join("ckpt"));
    let w = CheckpointWriter::create(&store, &Layout { mem_size: MEM_SIZE }).unwrap();
    assert_eq!(listing(store.path()), ["memory.img"]);
    w.discard().unwrap();
    assert!(listing(store.path()).is_empty());
    // A finished writer is gone; nothing discards its checkpoint afterwards.
    write_checkpoint(&store, 3);
    assert_eq!(listing(store.path()).len(), DirStore::FILES.len());
    Checkpoint::open(&store).unwrap();
}

#[test]
fn a_fork_copy_never_discards_the_parents_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let store = DirStore::new(tmp.path().join("ckpt"));
    let mut parent = CheckpointWriter::create(&store, &Layout { mem_size: MEM_SIZE }).unwrap();
    let mut child = parent.fork_copy();
    write_memory(&child, PAGES, 4, 2);
    let report = child.finish_memory().unwrap();
    drop(child);
    parent.write_state(&state_bytes()).unwrap();
    parent.adopt_memory(report).unwrap();
    parent.set_vm_config(vm_config());
    parent.finish().unwrap();
    Checkpoint::open(&store).unwrap();
}

#[test]
fn dropped_raw_and_memory_writers_leave_a_reusable_empty_store() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("raw");
    let raw = RawStore::init(&path, Some(8 << 20)).unwrap();
    let mem = MemStore::new().unwrap();
    for store in [&raw as &dyn Store, &mem] {
        write_checkpoint(store, 1);
        let w = CheckpointWriter::create(store, &Layout { mem_size: MEM_SIZE }).unwrap();
        write_memory(&w, PAGES, 2, 2);
        drop(w);
        let e = Checkpoint::open(store).unwrap_err();
        assert!(matches!(e, Error::Incomplete { .. }), "{e}");
        write_checkpoint(store, 3);
        Checkpoint::open(store)
            .unwrap()
            .verify_memory(2, &|_| {})
            .unwrap();
    }
    // The memfd gave its memory back.
    let w = CheckpointWriter::create(&mem, &Layout { mem_size: MEM_SIZE }).unwrap();
    drop(w);
    assert_eq!(mem.file().metadata().unwrap().len(), 8192);
}

#[test]
fn full_filesystem_leaves_the_directory_empty() {
    let Some(small) = SmallFs::mount("4m") else {
        return;
    };
    let store = DirStore::new(&small.mount);
    let pages = (8 << 20) / PAGE_SIZE as u64;
    let w = CheckpointWriter::create(
        &store,
        &Layout {
            mem_size: pages * PAGE_SIZE as u64,
        },
    )
    .unwrap();
    let e = fill(&w, pages).expect_err("8 MiB of pages cannot fit in 4 MiB");
    drop(w);
    assert!(matches!(e, Error::StoreFull { .. }), "{e}");
    assert!(
        e.to_string().contains(&*small.mount.to_string_lossy()),
        "{e}"
    );
    assert!(
        listing(&small.mount).is_empty(),
        "{:?}",
        listing(&small.mount)
    );
    // The space is back: a checkpoint that fits is written in the same directory.
    write_checkpoint(&store, 1);
    Checkpoint::open(&store).unwrap();
}

#[test]
fn full_filesystem_leaves_a_raw_store_empty_and_its_space_free() {
    let Some(small) = SmallFs::mount("4m") else {
        return;
    };
    let path = small.mount.join("raw");
    // Sparse: larger than the filesystem.
    let store = RawStore::init(&path, Some(16 << 20)).unwrap();
    let pages = (8 << 20) / PAGE_SIZE as u64;
    let w = CheckpointWriter::create(
        &store,
        &Layout {
            mem_size: pages * PAGE_SIZE as u64,
        },
    )
    .unwrap();
    let e = fill(&w, pages).expect_err("8 MiB of pages cannot fit in 4 MiB");
    drop(w);
    assert!(matches!(e, Error::StoreFull { .. }), "{e}");
    assert!(e.to_string().contains(&*path.to_string_lossy()), "{e}");
    assert!(matches!(
        Checkpoint::open(&store),
        Err(Error::Incomplete { .. })
    ));
    write_checkpoint(&store, 1);
    Checkpoint::open(&store).unwrap();
}
