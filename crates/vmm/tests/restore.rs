//! Restoring checkpoints on /dev/kvm, and the proof that nothing diverges: a deterministic guest
//! checkpointed at a random instant and restored prints exactly what the uninterrupted run
//! prints, byte for byte, for every strategy and I/O policy; so does the original VM.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ckpt_format::{Checkpoint, CheckpointOptions, DirStore, IoPolicy, Strategy};
use common::*;
use vmm::checkpoint::restore::RestoreOptions;
use vmm::checkpoint::state::VmSnapshot;
use vmm::checkpoint::{CheckpointRequest, Progress, StoreSpec};
use vmm::{Vm, VmExit};

/// A deterministic workload that takes about half a second and prints as it goes.
const WORKLOAD: &str = "compute mem=24M rounds=8 seed=11";
const MEM: u64 = 96 << 20;
const RUN_LIMIT: Duration = Duration::from_secs(60);

fn iterations() -> usize {
    std::env::var("COWVM_DIVERGENCE_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
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

fn run_to_end(vm: Vm, console: &Capture) -> String {
    let exit = vm.wait_timeout(RUN_LIMIT).expect("the guest must finish");
    assert_eq!(exit, VmExit::Guest(0), "console: {}", console.text());
    drop(vm);
    console.text()
}

fn uninterrupted() -> (String, Duration) {
    let start = Instant::now();
    let (vm, console) = boot_guest(WORKLOAD, MEM, 1);
    let out = run_to_end(vm, &console);
    (out, start.elapsed())
}

fn checkpoint(vm: &Vm, dir: &Path, strategy: Strategy, io: IoPolicy) -> ckpt_format::Manifest {
    let request = CheckpointRequest {
        store: StoreSpec::Dir(dir.to_path_buf()),
        options: CheckpointOptions {
            strategy,
            io,
            ..Default::default()
        },
        pause_probe: None,
    };
    vm.checkpoint(&request, &Progress::default())
        .expect("checkpoint")
}

fn bytes_emitted_at_checkpoint(dir: &Path) -> usize {
    let ckpt = Checkpoint::open(&DirStore::new(dir.to_path_buf())).unwrap();
    let snapshot: VmSnapshot = ckpt.decode_state().unwrap();
    snapshot.serial.bytes_emitted as usize
}

fn restore(dir: &Path, eager: bool) -> (Vm, Capture) {
    let console = Capture::default();
    let vm = Vm::restore(
        &StoreSpec::Dir(dir.to_path_buf()),
        RestoreOptions {
            console: console.console(),
            eager,
        },
    )
    .expect("restore");
    (vm, console)
}

fn divergence(strategy: Strategy, io: IoPolicy, seed: u64) {
    let (expected, took) = uninterrupted();
    let mut rng = Rng(seed);
    let work = tempfile::tempdir().unwrap();
    for i in 0..iterations() {
        let dir = work.path().join(format!("ckpt{i}"));
        let (vm, console) = boot_guest(WORKLOAD, MEM, 1);
        std::thread::sleep(Duration::from_millis(
            rng.below(took.as_millis() as u64 * 3 / 4),
        ));
        checkpoint(&vm, &dir, strategy, io);
        assert_eq!(
            run_to_end(vm, &console),
            expected,
            "{strategy:?}/{io:?}: checkpointing changed what the running VM computed"
        );
        let at = bytes_emitted_at_checkpoint(&dir);
        let (restored, restored_console) = restore(&dir, i % 2 == 1);
        let rest = run_to_end(restored, &restored_console);
        assert_eq!(
            format!("{}{rest}", &expected[..at]),
            expected,
            "{strategy:?}/{io:?} iteration {i}: the restored VM diverged (checkpoint after {at} bytes)"
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
    let (expected, took) = uninterrupted();
    let work = tempfile::tempdir().unwrap();
    let step = took / 7;
    let (mut vm, mut console) = boot_guest(WORKLOAD, MEM, 1);
    // What the chain printed before the last checkpoint instant; `emitted` is its length, the
    // serial byte count that each restored VM continues from.
    let mut prefix = String::new();
    let strategies = [
        Strategy::Uffd,
        Strategy::Fork,
        Strategy::Stop,
        Strategy::Uffd,
        Strategy::Fork,
    ];
    for (depth, strategy) in strategies.into_iter().enumerate() {
        std::thread::sleep(step);
        let dir: PathBuf = work.path().join(format!("depth{depth}"));
        checkpoint(&vm, &dir, strategy, IoPolicy::Live);
        vm.stop();
        drop(vm);
        let at = bytes_emitted_at_checkpoint(&dir);
        prefix.push_str(&console.text()[..at - prefix.len()]);
        (vm, console) = restore(&dir, depth % 2 == 0);
    }
    let rest = run_to_end(vm, &console);
    assert_eq!(
        format!("{prefix}{rest}"),
        expected,
        "the chain of restores diverged"
    );
}
