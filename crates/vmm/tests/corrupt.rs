//! A checkpoint that is incomplete, truncated, corrupt, of a newer format or asking for a VM
//! this VMM cannot build is refused with a precise message — never restored silently.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ckpt_format::{CheckpointOptions, Strategy};
use common::*;
use vmm::RestoreOptions;
use vmm::{CheckpointRequest, Progress, StoreSpec};
use vmm::{Vm, VmExit};

/// A fresh checkpoint of a running `dirty` guest (most pages are non-zero).
fn make_checkpoint(dir: &Path) {
    let (vm, console) = boot_guest("dirty mem=24M fill=1 every=5", 64 << 20, 1);
    console.wait_for("dirty pass=", 1, Duration::from_secs(30));
    vm.checkpoint(
        &CheckpointRequest {
            store: StoreSpec::Dir(dir.to_path_buf()),
            options: CheckpointOptions {
                strategy: Strategy::Stop,
                ..Default::default()
            },
            pause_probe: None,
            parent: None,
        },
        &Progress::default(),
    )
    .expect("checkpoint");
    vm.stop();
}

/// The whole error chain, as a user sees it.
fn chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

fn restore(dir: &Path, eager: bool) -> Result<Vm, String> {
    Vm::restore(
        &StoreSpec::Dir(dir.to_path_buf()),
        RestoreOptions {
            allow_dirs: Vec::new(),
            console: Capture::default().console(),
            eager,
            disk_dir: None,
        },
    )
    .map_err(|e| chain(&e))
}

fn refused(dir: &Path) -> String {
    match restore(dir, true) {
        Ok(_) => panic!("restore of a damaged checkpoint must fail"),
        Err(msg) => msg,
    }
}

/// Damage outside the memory image is refused before the first instruction by lazy restores
/// too, with the same message.
fn refused_lazy_too(dir: &Path) -> String {
    let eager = refused(dir);
    match restore(dir, false) {
        Ok(_) => panic!("a lazy restore of a damaged checkpoint must fail: {eager}"),
        Err(lazy) => assert_eq!(lazy, eager),
    }
    eager
}

/// Damage to the page index is found by a lazy restore after the guest started: a checkpoint
/// records a checksum of each segment of its index, so the first instruction does not wait for
/// the whole index; each block of memory is verified against its segment before the guest can
/// see it, and the VM stops naming the damage (its segment's, or the whole index's when the
/// prefetcher reads it).
fn stopped_lazy(dir: &Path) -> String {
    let vm = restore(dir, false).expect("a lazy restore starts without the whole page index");
    match vm.wait_timeout(Duration::from_secs(60)) {
        Some(VmExit::Fatal(msg)) => msg,
        other => panic!("a damaged page index must stop a lazily restored VM, got {other:?}"),
    }
}

fn flip(path: &Path, offset: u64) {
    let mut bytes = fs::read(path).unwrap();
    let i = (offset as usize).min(bytes.len() - 1);
    bytes[i] ^= 0x40;
    fs::write(path, bytes).unwrap();
}

fn truncate(path: &Path) {
    let len = fs::metadata(path).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
}

struct Fixture {
    _tmp: tempfile::TempDir,
    pristine: PathBuf,
    n: usize,
}

impl Fixture {
    fn new() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let pristine = tmp.path().join("pristine");
        make_checkpoint(&pristine);
        Fixture {
            _tmp: tmp,
            pristine,
            n: 0,
        }
    }

    /// A copy of the pristine checkpoint to damage.
    fn copy(&mut self) -> PathBuf {
        self.n += 1;
        let dir = self.pristine.with_file_name(format!("copy{}", self.n));
        fs::create_dir(&dir).unwrap();
        for entry in fs::read_dir(&self.pristine).unwrap() {
            let entry = entry.unwrap();
            fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
        }
        dir
    }
}

/// Offset of the first non-zero byte of the memory image (a present page).
fn first_data_byte(dir: &Path) -> u64 {
    fs::read(dir.join("memory.img"))
        .unwrap()
        .iter()
        .position(|&b| b != 0)
        .expect("the guest wrote memory") as u64
}

#[test]
fn every_kind_of_damage_is_refused_with_its_own_message() {
    let mut fx = Fixture::new();
    restore(&fx.pristine, true)
        .expect("the pristine checkpoint restores")
        .stop();

    let mut messages = Vec::new();
    let mut check = |what: &str, msg: String, needles: &[&str]| {
        for n in needles {
            assert!(msg.contains(n), "{what}: {msg:?} should mention {n:?}");
        }
        assert!(
            !messages.contains(&msg),
            "{what}: message not distinct: {msg}"
        );
        messages.push(msg);
    };

    let d = fx.copy();
    fs::remove_file(d.join("COMPLETE")).unwrap();
    check(
        "no marker",
        refused_lazy_too(&d),
        &["incomplete", "completion marker"],
    );

    for (file, section) in [("state.bin", "state"), ("page-index.bin", "page-index")] {
        let refused_or_stopped = |d: &Path, needles: &[&str]| {
            if file == "state.bin" {
                return refused_lazy_too(d);
            }
            let lazy = stopped_lazy(d);
            for n in needles {
                assert!(
                    lazy.contains(n),
                    "lazy restore: {lazy:?} should mention {n:?}"
                );
            }
            refused(d)
        };
        let d = fx.copy();
        flip(&d.join(file), 100);
        check(
            &format!("flipped {file}"),
            refused_or_stopped(&d, &[section, "checksum"]),
            &[section, "checksum"],
        );
        let d = fx.copy();
        truncate(&d.join(file));
        check(
            &format!("truncated {file}"),
            refused_or_stopped(&d, &[section, "truncated"]),
            &[section, "truncated"],
        );
    }

    let d = fx.copy();
    flip(&d.join("manifest.json"), 40);
    check("flipped manifest", refused_lazy_too(&d), &["manifest"]);

    let d = fx.copy();
    truncate(&d.join("memory.img"));
    check(
        "truncated memory",
        refused_lazy_too(&d),
        &["memory", "truncated"],
    );

    let d = fx.copy();
    let at = first_data_byte(&d);
    flip(&d.join("memory.img"), at);
    let page = at / 4096;
    check(
        "flipped memory (eager)",
        refused(&d),
        &["memory", &format!("page {page}")],
    );
    // A lazy restore starts at once, but its verifier stops the VM at the corrupt page.
    let vm = restore(&d, false).expect("a lazy restore starts before memory is verified");
    match vm.wait_timeout(Duration::from_secs(30)) {
        Some(VmExit::Fatal(msg)) => assert!(
            msg.contains("corrupt") && msg.contains(&format!("page {page}")),
            "{msg}"
        ),
        other => panic!("lazy restore of corrupt memory must stop the VM, got {other:?}"),
    }
}

#[test]
fn a_newer_format_and_an_impossible_vm_are_refused() {
    let mut fx = Fixture::new();

    let d = fx.copy();
    rewrite_manifest(&d, |m| m["format_version"] = 99.into());
    let msg = refused(&d);
    assert!(msg.contains("version 99") && msg.contains("newer"), "{msg}");

    let d = fx.copy();
    rewrite_manifest(&d, |m| m["vm"]["vcpus"] = 4000.into());
    let msg = refused(&d);
    assert!(msg.contains("4000 vCPUs"), "{msg}");

    let d = fx.copy();
    rewrite_manifest(&d, |m| {
        m["vm"]["devices"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({"id": "gpu0", "kind": "gpu"}))
    });
    let msg = refused(&d);
    assert!(msg.contains("unknown device kind \"gpu\""), "{msg}");
}
