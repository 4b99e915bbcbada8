//! Retention on a running VM: a guest that keeps writing its qcow2 disk is checkpointed 1000
//! times (200 in the test CI runs; `COWVM_RETENTION_CHECKPOINTS` sets the number), keeping the
//! newest K = 3. Every checkpoint must
//! succeed; the chain the VM runs on never grows beyond K + 2 images (the user's image, the
//! retained checkpoints' layers, the running top), nor does the number of files or of open
//! file descriptors; merging never changes what a retained checkpoint's disk reads; `qemu-img
//! check` finds no error in any file; and retained checkpoints restore to exactly what the
//! uninterrupted VM printed.

mod common;

use std::collections::hash_map::DefaultHasher;
use std::collections::VecDeque;
use std::hash::Hasher;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ckpt_format::{Checkpoint, CheckpointOptions, DirStore, DiskPolicy, IoPolicy, Strategy};
use common::*;
use vmm::{CheckpointRequest, DiskConfig, MachineState, Progress, RestoreOptions, StoreSpec, Vm};

/// Checkpoints kept.
const K: usize = 3;
/// 32 blocks of a 2 MiB area per round, every request held a millisecond: the guest keeps
/// writing all through the test (it never reaches its last round).
const WORKLOAD: &str = "disk blocks=32 rounds=1000000 qd=4 mem=4M seed=5 area=2M";
const MEM: u64 = 32 << 20;
const DISK_SIZE: u64 = 2 << 20;
const LIMIT: Duration = Duration::from_secs(120);
/// Every this many checkpoints: `qemu-img check` of every file, a restore of the oldest
/// retained checkpoint, every retained disk read again.
const DEEP_CHECK_EVERY: usize = 100;

/// Checkpoints taken: `COWVM_RETENTION_CHECKPOINTS`, or `default`.
fn checkpoints(default: usize) -> usize {
    std::env::var("COWVM_RETENTION_CHECKPOINTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A hash of the whole content of the disk whose top image is `top`.
fn content_hash(top: &Path) -> u64 {
    let opts = disk::OpenOptions {
        read_only: true,
        ..disk::OpenOptions::default()
    };
    let mut image = disk::Image::open_with(top, &opts).unwrap();
    let mut buf = vec![0; image.size() as usize];
    image.read_at(0, &mut buf).unwrap();
    let mut h = DefaultHasher::new();
    h.write(&buf);
    h.finish()
}

fn qemu_img_check(path: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", "--output=json"])
        .arg(path)
        .output()
        .expect("qemu-img");
    assert!(
        out.status.success(),
        "qemu-img check {}: {}{}",
        path.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// A retained checkpoint: its directory, its disk file, and that disk's content hash when the
/// checkpoint was taken.
struct Retained {
    dir: PathBuf,
    disk: PathBuf,
    hash: u64,
}

/// Restores `dir` and checks that it prints what the original VM printed after the instant,
/// up to the end of the second line after it.
fn restores_identically(original: &Capture, dir: &Path, restores: &Path, disks: &Path) {
    let ckpt = Checkpoint::open(&DirStore::new(dir.to_path_buf())).unwrap();
    let state: MachineState = ckpt.decode_state().unwrap();
    let at = state.devices.serial.bytes_emitted as usize;
    let start = Instant::now();
    // The original's output up to the second line end after the instant.
    let reference = loop {
        let text = original.text();
        let end = text.get(at..).and_then(|after| {
            let first = after.find('\n')?;
            let second = after[first + 1..].find('\n')?;
            Some(at + first + 1 + second + 1)
        });
        if let Some(end) = end {
            break text[..end].to_string();
        }
        assert!(start.elapsed() < LIMIT, "the VM stopped printing: {text}");
        std::thread::sleep(Duration::from_millis(5));
    };
    let console = Capture::default();
    let disk_dir = restores.join(dir.file_name().unwrap());
    std::fs::create_dir_all(&disk_dir).unwrap();
    let vm = Vm::restore(
        &StoreSpec::Dir(dir.to_path_buf()),
        RestoreOptions {
            allow_dirs: vec![disks.to_path_buf()],
            console: console.console(),
            eager: false,
            disk_dir: Some(disk_dir.clone()),
        },
    )
    .expect("restore");
    let waited = start.elapsed();
    let want = reference.len() - at;
    while console.text().len() < want {
        assert!(
            start.elapsed() < LIMIT,
            "{}: the restored VM printed {:?}",
            dir.display(),
            console.text()
        );
        assert_eq!(vm.exit_status(), None, "{}", console.text());
        std::thread::sleep(Duration::from_millis(5));
    }
    let rest = console.text();
    eprintln!(
        "{}: waited {waited:?} for the original, {:?} in all",
        dir.display(),
        start.elapsed()
    );
    assert_eq!(
        format!("{}{}", &reference[..at], &rest[..want]),
        reference,
        "{}: the restored VM diverged (checkpoint after {at} bytes)",
        dir.display()
    );
    drop(vm);
    std::fs::remove_dir_all(&disk_dir).unwrap();
}

/// The bounded run CI makes (about a minute on a two-core host).
#[test]
fn checkpoints_with_retention_keep_the_chain_short() {
    retention(checkpoints(200));
}

/// The full run: 1000 checkpoints take about 3–6 minutes on a two-core host, too long for
/// every CI run (`cargo test --release -p vmm --test retention -- --ignored`).
#[test]
#[ignore]
fn a_thousand_checkpoints_with_retention_keep_the_chain_short() {
    retention(checkpoints(1000));
}

fn retention(total: usize) {
    let work = tempfile::tempdir().unwrap();
    let disks = work.path().join("disks");
    let ckpts = work.path().join("ckpts");
    let restores = work.path().join("restores");
    for d in [&disks, &ckpts, &restores] {
        std::fs::create_dir(d).unwrap();
    }
    let base = disks.join("base.qcow2");
    disk::create_qcow2(
        &base,
        &disk::CreateOptions {
            size: Some(DISK_SIZE),
            ..disk::CreateOptions::default()
        },
    )
    .unwrap();
    let console = Capture::default();
    let mut cfg = config(guest(), WORKLOAD, MEM, 1, console.console());
    cfg.disks = vec![DiskConfig {
        allow_dirs: Vec::new(),
        path: base.clone(),
        readonly: false,
        delay_ms: 1,
    }];
    let vm = Vm::boot(cfg).expect("boot");
    console.wait_for("disk round=", 1, LIMIT);

    let start = Instant::now();
    let mut retained: VecDeque<Retained> = VecDeque::new();
    let mut fds_early = None;
    let mut merged_bytes = 0;
    for i in 0..total {
        let dir = ckpts.join(format!("c{i:04}"));
        let request = CheckpointRequest {
            store: StoreSpec::Dir(dir.clone()),
            options: CheckpointOptions {
                strategy: Strategy::Stop,
                io: IoPolicy::Live,
                disk: DiskPolicy::Keep,
            },
            pause_probe: None,
            parent: None,
        };
        let t0 = Instant::now();
        let manifest = vm
            .checkpoint(&request, &Progress::default())
            .unwrap_or_else(|e| panic!("checkpoint {i}: {e:?}\n{}", console.text()));
        let disk = manifest.vm.disks[0].path.clone();
        let t1 = Instant::now();
        let hash = content_hash(&disk);
        let t2 = Instant::now();
        retained.push_back(Retained { dir, disk, hash });
        if retained.len() > K {
            let old = retained.pop_front().unwrap();
            DirStore::new(&old.dir).delete().unwrap();
            for m in vm.release_checkpoint_disks(&[old.disk]).unwrap() {
                assert!(
                    !m.layer.exists(),
                    "{} merged but still there",
                    m.layer.display()
                );
                merged_bytes += m.bytes;
            }
            // The oldest retained disk took over the merged layer's clusters: it must read
            // exactly as when its checkpoint was taken.
            let oldest = &retained[0];
            assert_eq!(
                content_hash(&oldest.disk),
                oldest.hash,
                "checkpoint {i}: merging changed {}",
                oldest.disk.display()
            );
        }
        let t3 = Instant::now();
        let chain = vm.disks()[0].image_info().unwrap().chain;
        assert!(
            chain.len() <= K + 2,
            "checkpoint {i}: chain of {} images: {chain:?}",
            chain.len()
        );
        let files = files_in(&disks);
        assert!(
            files.len() <= K + 2,
            "checkpoint {i}: {} files: {files:?}",
            files.len()
        );
        if std::env::var_os("COWVM_RETENTION_TRACE").is_some() {
            eprintln!(
                "{i}: checkpoint {:?} hash {:?} retention {:?} checks {:?}",
                t1 - t0,
                t2 - t1,
                t3 - t2,
                t3.elapsed()
            );
        }
        if i == 2 * K {
            fds_early = Some(open_fds());
        }
        if (i + 1) % DEEP_CHECK_EVERY == 0 || i + 1 == total {
            // Not the running top: its new clusters point past the end of the file until the
            // device's writes land, which `qemu-img check` takes for corruption.
            let top = std::fs::canonicalize(&chain[0].path).unwrap();
            for f in files.iter().filter(|f| f.canonicalize().unwrap() != top) {
                qemu_img_check(f);
            }
            for r in &retained {
                assert_eq!(content_hash(&r.disk), r.hash, "{}", r.disk.display());
            }
            restores_identically(&console, &retained[0].dir, &restores, &disks);
            eprintln!(
                "{} checkpoints in {:?}, chain of {}, {} bytes merged",
                i + 1,
                start.elapsed(),
                chain.len(),
                merged_bytes
            );
        }
    }
    if let Some(early) = fds_early {
        let now = open_fds();
        assert!(now <= early + 2, "open fds grew from {early} to {now}");
    }
    // Every retained checkpoint restores to what the VM printed.
    for r in &retained {
        restores_identically(&console, &r.dir, &restores, &disks);
    }
    assert_eq!(vm.exit_status(), None, "{}", console.text());
    drop(vm);
    for f in files_in(&disks) {
        qemu_img_check(&f);
    }
    eprintln!("{total} checkpoints with retention: {:?}", start.elapsed());
}
