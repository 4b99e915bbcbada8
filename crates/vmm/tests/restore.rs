//! Restoring checkpoints on /dev/kvm, and the proof that nothing diverges: a deterministic guest
//! that uses memory and a disk heavily, checkpointed at a random instant and restored, prints
//! exactly what the uninterrupted run prints and leaves exactly the same disk content, byte for
//! byte, for every strategy and I/O policy; so does the original VM. The disk holds every
//! request back a millisecond, so requests are in flight at most checkpoint instants.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use ckpt_format::{Checkpoint, CheckpointOptions, DirStore, DiskPolicy, IoPolicy, Strategy};
use common::*;
use vmm::MachineState;
use vmm::RestoreOptions;
use vmm::{CheckpointError, CheckpointRequest, Progress, StoreSpec};
use vmm::{Vm, VmExit};

/// A deterministic workload of disk writes, flushes, reads and memory mixing that takes about
/// half a second and prints as it goes.
const WORKLOAD: &str = "disk blocks=256 rounds=4 qd=8 mem=8M seed=11";
const MEM: u64 = 96 << 20;
const DISK_SIZE: u64 = 32 << 20;
const RUN_LIMIT: Duration = Duration::from_secs(120);
/// The workload's lines before its last round: the device, its id and rounds 1 to 3.
const PROGRESS_LINES: u64 = 5;

/// Checkpoint-restore cycles per strategy and I/O policy (`COWVM_DIVERGENCE_ITERS` for a soak).
fn iterations() -> usize {
    std::env::var("COWVM_DIVERGENCE_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8)
}

/// The seed of the checkpoint instants: `COWVM_DIVERGENCE_SEED`, else new on every run (so that
/// runs together cover more instants than one run's few), mixed with `salt` so that each
/// strategy and policy gets its own.
fn seed(salt: u64) -> u64 {
    let base = std::env::var("COWVM_DIVERGENCE_SEED")
        .ok()
        .and_then(|v| u64::from_str_radix(v.trim_start_matches("0x"), 16).ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    eprintln!("checkpoint instants from COWVM_DIVERGENCE_SEED={base:#x}");
    (base ^ salt) | 1
}

/// A small deterministic PRNG for the checkpoint instants (no dependency needed).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// The reference: output and disk content of an uninterrupted run, and how long it took. The
/// workload is deterministic on a zeroed disk, so the first test to ask runs it once for all.
fn uninterrupted() -> (&'static str, &'static [u8], Duration) {
    static REFERENCE: OnceLock<(String, Vec<u8>, Duration)> = OnceLock::new();
    let (out, disk, took) = REFERENCE.get_or_init(|| {
        let work = tempfile::tempdir().unwrap();
        let start = Instant::now();
        let (vm, console) = boot_with_disk(
            WORKLOAD,
            MEM,
            &new_raw_disk(work.path(), "reference.raw", DISK_SIZE),
        );
        let (out, disk) = run_to_end(vm, &console, RUN_LIMIT);
        (out, disk, start.elapsed())
    });
    (out, disk, *took)
}

fn checkpoint(vm: &Vm, dir: &Path, strategy: Strategy, io: IoPolicy) -> ckpt_format::Manifest {
    checkpoint_with(vm, dir, strategy, io, DiskPolicy::Keep)
}

fn checkpoint_with(
    vm: &Vm,
    dir: &Path,
    strategy: Strategy,
    io: IoPolicy,
    disk: DiskPolicy,
) -> ckpt_format::Manifest {
    try_checkpoint(vm, StoreSpec::Dir(dir.to_path_buf()), strategy, io, disk).expect("checkpoint")
}

fn try_checkpoint(
    vm: &Vm,
    store: StoreSpec,
    strategy: Strategy,
    io: IoPolicy,
    disk: DiskPolicy,
) -> Result<ckpt_format::Manifest, CheckpointError> {
    let request = CheckpointRequest {
        store,
        options: CheckpointOptions { strategy, io, disk },
        pause_probe: None,
        parent: None,
    };
    vm.checkpoint(&request, &Progress::default())
}

fn bytes_emitted_at_checkpoint(dir: &Path) -> usize {
    let ckpt = Checkpoint::open(&DirStore::new(dir.to_path_buf())).unwrap();
    let snapshot: MachineState = ckpt.decode_state().unwrap();
    snapshot.devices.serial.bytes_emitted as usize
}

fn restore(dir: &Path, eager: bool) -> (Vm, Capture) {
    let console = Capture::default();
    let disk_dir = dir.with_extension("disks");
    std::fs::create_dir_all(&disk_dir).unwrap();
    let vm = Vm::restore(
        &StoreSpec::Dir(dir.to_path_buf()),
        RestoreOptions {
            allow_dirs: vec![dir.parent().unwrap().to_path_buf()],
            console: console.console(),
            eager,
            disk_dir: Some(disk_dir),
        },
    )
    .expect("restore");
    (vm, console)
}

fn divergence(strategy: Strategy, io: IoPolicy, salt: u64) {
    let work = tempfile::tempdir().unwrap();
    let (expected, expected_disk, took) = uninterrupted();
    let mut rng = Rng(seed(salt));
    let mut ended_first = 0;
    for i in 0..iterations() {
        let dir = work.path().join(format!("ckpt{i}"));
        let (vm, console) = boot_with_disk(
            WORKLOAD,
            MEM,
            &new_raw_disk(work.path(), &format!("disk{i}.raw"), DISK_SIZE),
        );
        // The instant: after a random number of the workload's lines (it prints one per
        // round), then a random part of a round; tied to the guest's progress, not to the
        // reference run's speed, so a slow or fast host still puts it inside the run.
        let lines = rng.below(PROGRESS_LINES + 1) as usize;
        console.wait_for("\n", lines, RUN_LIMIT);
        std::thread::sleep(Duration::from_millis(
            rng.below(took.as_millis() as u64 / 8),
        ));
        let store = StoreSpec::Dir(dir.clone());
        let m = match try_checkpoint(&vm, store, strategy, io, DiskPolicy::Keep) {
            Ok(m) => m,
            // A descheduled test thread can still miss the last round: the guest ended
            // before the instant, which the checkpoint must refuse.
            Err(CheckpointError::Exited(exit)) => {
                assert_eq!(exit, VmExit::Guest(0), "console: {}", console.text());
                ended_first += 1;
                eprintln!("iteration {i}: the guest ended before the checkpoint instant");
                assert!(
                    ended_first <= iterations() / 4,
                    "{strategy:?}/{io:?}: too many guests ended before their checkpoint instant"
                );
                continue;
            }
            Err(e) => panic!("{strategy:?}/{io:?} iteration {i}: checkpoint: {e:?}"),
        };
        eprintln!("iteration {i}: checkpoint {:?}", m.metrics.phases_us);
        let (out, disk) = run_to_end(vm, &console, RUN_LIMIT);
        assert_eq!(
            out, expected,
            "{strategy:?}/{io:?}: checkpointing changed what the running VM computed"
        );
        assert!(
            disk == expected_disk,
            "{strategy:?}/{io:?}: the running VM's disk differs"
        );
        let at = bytes_emitted_at_checkpoint(&dir);
        let (restored, restored_console) = restore(&dir, i % 2 == 1);
        eprintln!("iteration {i}: restoring");
        let (rest, disk) = run_to_end(restored, &restored_console, RUN_LIMIT);
        assert_eq!(
            format!("{}{rest}", &expected[..at]),
            expected,
            "{strategy:?}/{io:?} iteration {i}: the restored VM diverged (checkpoint after {at} bytes)"
        );
        assert!(
            disk == expected_disk,
            "{strategy:?}/{io:?} iteration {i}: the restored VM's disk differs"
        );
    }
}

#[test]
fn uffd_live_restores_without_divergence() {
    divergence(Strategy::Uffd, IoPolicy::Live, 0x1234_5678);
}

#[test]
fn uffd_drain_restores_without_divergence() {
    divergence(Strategy::Uffd, IoPolicy::Drain, 0x2345_6789);
}

#[test]
fn fork_live_restores_without_divergence() {
    divergence(Strategy::Fork, IoPolicy::Live, 0x3456_789a);
}

#[test]
fn fork_drain_restores_without_divergence() {
    divergence(Strategy::Fork, IoPolicy::Drain, 0x4567_89ab);
}

#[test]
fn stop_live_restores_without_divergence() {
    divergence(Strategy::Stop, IoPolicy::Live, 0x5678_9abc);
}

#[test]
fn stop_drain_restores_without_divergence() {
    divergence(Strategy::Stop, IoPolicy::Drain, 0x6789_abcd);
}

#[test]
fn a_chain_of_five_restores_stays_identical() {
    let work = tempfile::tempdir().unwrap();
    let (expected, expected_disk, took) = uninterrupted();
    let (mut vm, mut console) = boot_with_disk(
        WORKLOAD,
        MEM,
        &new_raw_disk(work.path(), "chain.raw", DISK_SIZE),
    );
    // What the chain printed before the last checkpoint instant; its length is the serial byte
    // count that each restored VM continues from.
    let mut prefix = String::new();
    let strategies = [
        Strategy::Uffd,
        Strategy::Fork,
        Strategy::Stop,
        Strategy::Uffd,
        Strategy::Fork,
    ];
    for (depth, strategy) in strategies.into_iter().enumerate() {
        // Depth d is taken inside the d-th line of output (not after a wall-clock delay, so
        // that every instant falls inside the run however slow the host is).
        console.wait_for(
            "\n",
            (depth + 1).saturating_sub(prefix.matches('\n').count()),
            RUN_LIMIT,
        );
        std::thread::sleep(took / 40);
        let dir: PathBuf = work.path().join(format!("depth{depth}"));
        checkpoint(&vm, &dir, strategy, IoPolicy::Live);
        vm.stop();
        drop(vm);
        let at = bytes_emitted_at_checkpoint(&dir);
        prefix.push_str(&console.text()[..at - prefix.len()]);
        (vm, console) = restore(&dir, depth % 2 == 0);
    }
    let (rest, disk) = run_to_end(vm, &console, RUN_LIMIT);
    assert_eq!(
        format!("{prefix}{rest}"),
        expected,
        "the chain of restores diverged"
    );
    assert!(
        disk == expected_disk,
        "the chain of restores left a different disk"
    );
}

#[test]
fn copy_commit_keeps_a_private_disk_copy_and_a_short_chain() {
    let work = tempfile::tempdir().unwrap();
    let (expected, expected_disk, took) = uninterrupted();
    let base = new_raw_disk(work.path(), "base.raw", DISK_SIZE);
    let (vm, console) = boot_with_disk(WORKLOAD, MEM, &base);
    console.wait_for("disk round=", 1, RUN_LIMIT);
    std::thread::sleep(took / 20);
    let dir = work.path().join("ckpt");
    let manifest = checkpoint_with(
        &vm,
        &dir,
        Strategy::Uffd,
        IoPolicy::Live,
        DiskPolicy::CopyCommit,
    );
    let copy = &manifest.vm.disks[0].path;
    assert!(
        copy.starts_with(std::fs::canonicalize(&dir).unwrap()),
        "{copy:?}"
    );
    let copy_at_checkpoint = std::fs::read(copy).unwrap();
    // The VM now runs on one overlay directly over the committed base: no chain growth.
    let chain = vm.disks()[0].image_info().unwrap().chain;
    assert_eq!(chain.len(), 2, "{chain:?}");
    assert_eq!(chain[1].path, base);
    let (out, disk) = run_to_end(vm, &console, RUN_LIMIT);
    assert_eq!(out, expected);
    assert!(
        disk == expected_disk,
        "the running VM's disk differs after the commit"
    );
    assert_eq!(
        std::fs::read(copy).unwrap(),
        copy_at_checkpoint,
        "the checkpoint's copy changed"
    );

    let at = bytes_emitted_at_checkpoint(&dir);
    let (restored, restored_console) = restore(&dir, false);
    let (rest, disk) = run_to_end(restored, &restored_console, RUN_LIMIT);
    assert_eq!(format!("{}{rest}", &expected[..at]), expected);
    assert!(disk == expected_disk, "the restored VM's disk differs");
}

/// The RAM store (a memfd): a checkpoint taken into it restores, lazily (mapping the memfd)
/// and eagerly, into VMs that continue exactly as the uninterrupted run.
#[test]
fn a_memory_store_restores_like_a_directory() {
    let work = tempfile::tempdir().unwrap();
    let (expected, expected_disk, took) = uninterrupted();
    let (vm, console) = boot_with_disk(
        WORKLOAD,
        MEM,
        &new_raw_disk(work.path(), "mem.raw", DISK_SIZE),
    );
    console.wait_for("disk round=", 2, RUN_LIMIT);
    std::thread::sleep(took / 20);
    let store = StoreSpec::Mem(std::sync::Arc::new(ckpt_format::MemStore::new().unwrap()));
    try_checkpoint(
        &vm,
        store.clone(),
        Strategy::Uffd,
        IoPolicy::Live,
        DiskPolicy::Keep,
    )
    .expect("checkpoint into RAM");
    let (out, _) = run_to_end(vm, &console, RUN_LIMIT);
    assert_eq!(out, expected);
    let StoreSpec::Mem(mem) = &store else {
        unreachable!()
    };
    let ckpt = Checkpoint::open(mem.as_ref()).unwrap();
    let snapshot: MachineState = ckpt.decode_state().unwrap();
    let at = snapshot.devices.serial.bytes_emitted as usize;
    for eager in [false, true] {
        let restored_console = Capture::default();
        let disk_dir = work.path().join(format!("disks-{eager}"));
        std::fs::create_dir_all(&disk_dir).unwrap();
        let restored = Vm::restore(
            &store,
            RestoreOptions {
                allow_dirs: vec![work.path().to_path_buf()],
                console: restored_console.console(),
                eager,
                disk_dir: Some(disk_dir),
            },
        )
        .expect("restore from RAM");
        let (rest, disk) = run_to_end(restored, &restored_console, RUN_LIMIT);
        assert_eq!(
            format!("{}{rest}", &expected[..at]),
            expected,
            "eager={eager}: the VM restored from RAM diverged"
        );
        assert!(
            disk == expected_disk,
            "eager={eager}: the VM restored from RAM left a different disk"
        );
    }
}
